"""Whole-volume inference with uncertainty, in the image's grid: one call for every estimator.

    predict_volume(model, image, patch_size, passes=8, estimator=None) -> Prediction

Windows (`roi`): "auto" (the default, `inference_window`) takes the cheapest tiling of the volume by windows that stay
inside the image, fit the device's voxel budget (`DEFAULT_WINDOW_VOXELS`) and are never smaller than `patch_size`,
the training patch: one window of the whole volume when its sizes are multiples of the network's and it fits. A
convolutional network pays for every window's border and overlap, so fewer, larger windows cost less. An explicit
(z, y, x) window is used as given. One window covering the volume runs without the stitching buffers; otherwise
MONAI's sliding_window_inference visits the windows one batch at a time (only `sw_batch_size` windows live on the
compute device; the stitched output can live on the CPU). The estimator runs its T passes per window
(SSLSegmentLib.ml.uncertainty.estimators). Each window returns E_t[p_t], E_t[H(p_t)] and E_t[p_t²], which blend
linearly across overlapping windows; after stitching (all maps in [0, 1]):

    entropy             H[p̄] / log C                 total predictive uncertainty (0 certain … 1 uniform)
    mutual_information  (H[p̄] − E_t[H(p_t)]) / log C the epistemic part: how much the passes disagree
    variance            4·Var_t[p_t,c] per class       spread of the passes' class probabilities

The default estimator is `DEFAULT_ESTIMATOR` (head MC dropout; see docs/uncertainty.md and
benchmarks/results/uncertainty.md for the measurements behind it). `passes=1` is one deterministic forward pass.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from SSLSegmentLib.data import contract
from SSLSegmentLib.data.volume import Volume
from SSLSegmentLib.ml.uncertainty.calibration import Calibration
from SSLSegmentLib.ml.uncertainty.estimators import (
    DEFAULT_ESTIMATOR,
    DEFAULT_PASS_BATCH,
    DEFAULT_WINDOW_BATCH,
    ESTIMATORS,
    make_estimator,
    maps_from_statistics,
    resolve_estimator,
    unwrap,
)

# The maps a reviewer can be shown (SSLSegmentLib.data.contract, shared with the backend and the Slicer side), plus the
# class variance, which only the ML side computes.
UNCERTAINTY_KINDS = (*contract.UNCERTAINTY_KINDS, "variance")

# Voxels of the windows of one batch, per device type: what bounds the memory of a window's forward (the trunk's
# full-resolution activations and the estimator's statistics grow with it). Sized for the default network: on a CPU a
# 128×128×96 volume is one window with room to spare, and a GPU holds twice that per batch; larger volumes are tiled
# (docs/uncertainty.md, "Windows").
DEFAULT_WINDOW_VOXELS: dict[str, int] = {"cpu": 1 << 22, "cuda": 1 << 23}

__all__ = [
    "DEFAULT_ESTIMATOR",
    "DEFAULT_WINDOW_VOXELS",
    "ESTIMATORS",
    "UNCERTAINTY_KINDS",
    "Prediction",
    "Predictor",
    "inference_window",
    "pick_device",
    "predict_volume",
]


@dataclass
class Prediction:
    """Outputs in the input's grid (z, y, x).

    label: uint8 (z, y, x) argmax class. probabilities: (C, z, y, x) float32 predictive distribution p̄.
    entropy, mutual_information: (z, y, x) float32 in [0, 1] (normalised by log C).
    variance: (C, z, y, x) float32 in [0, 1], 4·Var_t[p_t,c] (None when not computed).
    passes: the T that ran (1 for a plain pass; the number of models for an ensemble).
    estimator: the estimator that ran. temperature: the calibration temperature applied (None = none).
    """

    label: np.ndarray
    probabilities: np.ndarray
    entropy: np.ndarray
    mutual_information: np.ndarray
    passes: int
    variance: np.ndarray | None = None
    estimator: str = "plain"
    temperature: float | None = None

    def uncertainty(self, kind: str = "entropy") -> np.ndarray:
        """A (z, y, x) map in [0, 1]; "variance" is the largest class variance per voxel."""
        if kind not in UNCERTAINTY_KINDS:
            raise ValueError(f"uncertainty kind must be one of {UNCERTAINTY_KINDS}, got {kind!r}")
        if kind == "entropy":
            return self.entropy
        if kind == "mutual_information":
            return self.mutual_information
        if self.variance is None:
            return np.zeros_like(self.entropy)
        return self.variance.max(0)

    def volumes(self, like: Volume, with_variance: bool = False) -> dict[str, Volume]:
        """Label map, foreground probability and uncertainties as volumes with the image's geometry.

        with_variance adds "variance" (the largest class variance per voxel)."""
        fg = 1.0 - self.probabilities[0]
        out = {"label": like.like(self.label.astype(np.uint8)), "probability": like.like(fg.astype(np.float32))}
        for kind in UNCERTAINTY_KINDS if with_variance else contract.UNCERTAINTY_KINDS:
            out[kind] = like.like(self.uncertainty(kind).astype(np.float32))
        return out


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _stitch_device(compute: torch.device, voxels: int, channels: int, requested) -> torch.device:
    """Where the stitched output lives: the compute device unless the buffers would take over a quarter of the free
    GPU memory, then the CPU (windows still run on the GPU; only finished windows are copied back)."""
    if requested is not None:
        return torch.device(requested)
    if compute.type != "cuda":
        return compute
    need = voxels * (channels + 2) * 4  # output + count map + input, float32
    free, _ = torch.cuda.mem_get_info(compute)
    return compute if need < 0.25 * free else torch.device("cpu")


def _validate_window(patch_size, passes: int, overlap: float) -> tuple[int, int, int]:
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    roi = tuple(int(p) for p in patch_size)
    if len(roi) != 3 or min(roi) < 1:
        raise ValueError(f"patch_size must be three positive sizes (z, y, x), got {patch_size}")
    return roi


def _round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def _windows_along(size: int, window: int, overlap: float) -> int:
    """How many windows MONAI's sliding window places along an axis of `size` (its scan interval and end alignment)."""
    if size <= window:
        return 1
    interval = max(int(window * (1.0 - overlap)), 1)
    return math.ceil((size - window) / interval) + 1


def inference_window(
    image_shape: Sequence[int],
    patch_size: Sequence[int],
    size_multiple: int = 1,
    max_voxels: int | None = None,
    overlap: float = 0.25,
) -> tuple[int, int, int]:
    """The "auto" sliding window (z, y, x) for a volume of `image_shape`: the cheapest tiling with windows that stay
    inside the image and fit `max_voxels` (None = no cap).

    Candidates on each axis are the multiples of `size_multiple` from the training patch (the lower bound, known to
    fit) up to the image's size rounded down: a window stays inside the image, as every training patch did, because
    padding the image out to the network's multiple costs accuracy at its borders
    (benchmarks/results/inference-windows-validation.md). A tiling costs the voxels its windows run plus a fixed
    overhead of one training patch per window (a window's borders, the stitching); the cheapest wins, ties going to
    fewer, larger windows. A volume whose sizes are multiples of `size_multiple` and that fits the budget is one window
    of the whole volume; an image smaller than the patch on an axis gets the patch there (padded, as before).
    """
    if len(image_shape) != 3 or len(patch_size) != 3:
        raise ValueError(f"expected 3D sizes (z, y, x), got image {tuple(image_shape)} and window {tuple(patch_size)}")
    m = int(size_multiple)
    if m < 1:
        raise ValueError(f"size_multiple must be >= 1, got {size_multiple}")
    if max_voxels is not None and max_voxels < 1:
        raise ValueError(f"max_voxels must be >= 1 or None, got {max_voxels}")
    dims = [max(int(d), 1) for d in image_shape]
    low = [int(p) for p in patch_size]
    overhead = math.prod(low)
    # Per axis, for each window count the smallest window that gives it: (count, window) pairs, fewest windows first.
    options = []
    for d, p in zip(dims, low):
        best: dict[int, int] = {}
        for w in [p, *range(_round_up(p + 1, m), d // m * m + 1, m)]:
            n = _windows_along(d, w, overlap)
            best[n] = min(best.get(n, w), w)
        options.append(sorted(best.items()))
    choice, cost = tuple(low), None
    for (nz, wz), (ny, wy), (nx, wx) in itertools.product(*options):
        window = (wz, wy, wx)
        if max_voxels is not None and math.prod(window) > max_voxels and window != tuple(low):
            continue
        count = nz * ny * nx
        key = (count * (math.prod(window) + overhead), count)
        if cost is None or key < cost:
            choice, cost = window, key
    return choice


def _size_multiple(models: Sequence[torch.nn.Module], patch: tuple[int, int, int]) -> int:
    """The spatial multiple every model accepts: NetworkConfig.size_multiple where the models carry one, else the
    largest number that divides every size of the training patch (which the network accepts)."""
    multiple = 1
    for m in models:
        own = getattr(getattr(unwrap(m), "config", None), "size_multiple", None)
        if not isinstance(own, int) or own < 1:
            return math.gcd(*patch)
        multiple = math.lcm(multiple, own)
    return multiple


def _resolve_roi(roi, array_shape, patch, models, overlap: float, max_voxels, batch: int, dev: torch.device):
    if isinstance(roi, str):
        if roi == "patch":
            return patch
        if roi != "auto":
            raise ValueError(f"roi must be 'auto', 'patch' or three positive sizes (z, y, x), got {roi!r}")
        if max_voxels is None:
            max_voxels = DEFAULT_WINDOW_VOXELS.get(dev.type, DEFAULT_WINDOW_VOXELS["cpu"])
        elif not (isinstance(max_voxels, int) and max_voxels >= 1):
            raise ValueError(f"max_window_voxels must be None or an integer >= 1, got {max_voxels!r}")
        return inference_window(array_shape, patch, _size_multiple(models, patch), max(1, int(max_voxels) // batch),
                                overlap)
    window = tuple(int(r) for r in roi) if isinstance(roi, (list, tuple)) else ()
    if len(window) != 3 or min(window) < 1:
        raise ValueError(f"roi must be 'auto', 'patch' or three positive sizes (z, y, x), got {roi!r}")
    return window


def _one_window(x: torch.Tensor, roi, predictor, cval: float, dev: torch.device, out_dev: torch.device) -> torch.Tensor:
    """A window that covers the whole image: pad it as MONAI's sliding window would (constant, split evenly between
    the two sides), run it, crop back. No stitching buffers: with one window their weighted sum is the window itself."""
    spatial = x.shape[2:]
    pads = [max(r - n, 0) for r, n in zip(roi, spatial)]
    if any(pads):
        flat = [q for p in reversed(pads) for q in (p // 2, p - p // 2)]
        x = torch.nn.functional.pad(x, flat, mode="constant", value=cval)
    out = predictor(x.to(dev))
    if any(pads):
        out = out[(slice(None), slice(None), *(slice(p // 2, p // 2 + n) for p, n in zip(pads, spatial)))]
    return out.to(out_dev)


def _validate(array: np.ndarray, patch_size, passes: int, overlap: float) -> tuple[int, int, int]:
    if array.ndim != 3:
        raise ValueError(f"expected a 3D volume (z, y, x), got shape {array.shape}")
    roi = _validate_window(patch_size, passes, overlap)
    if not np.isfinite(array).all():
        raise ValueError("the image contains NaN or infinite values")
    return roi


@torch.inference_mode()
def predict_volume(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    image: np.ndarray | Volume,
    patch_size: tuple[int, int, int],
    passes: int = 8,
    overlap: float = 0.25,
    device: str | torch.device | None = "auto",
    sw_batch_size: int | str = "auto",
    seed: int = 0,
    *,
    roi: str | Sequence[int] = "auto",
    max_window_voxels: int | None = None,
    estimator: str | None = None,
    pass_batch: int | None | str = "auto",
    amp: bool = False,
    temperature: float | Calibration | None = None,
    stitch_device: str | torch.device | None = None,
    flip_axes: Sequence[int] = (0, 1, 2),
    balanced_masks: bool = True,
    channels_last: bool | None = None,
    progress: bool = False,
) -> Prediction:
    """Segment a whole volume (z, y, x) with sliding windows and estimate voxelwise uncertainty.

    model: a network (SegNet or any module returning logits (B, C, ...) or a dict with "logits"), or a list of model
        versions for the ensemble estimator.
    patch_size: the training patch (z, y, x): the smallest window the "auto" policy takes, and the window of
        roi="patch".
    passes: T, the stochastic passes (MC dropout, head MC) or flip combinations; 1 = one deterministic pass.
    roi: the sliding window: "auto" = `inference_window` (the cheapest tiling inside the image under
        max_window_voxels; the whole volume when its sizes are multiples of the network's and it fits), "patch" =
        patch_size, or an explicit (z, y, x) window, used as given.
    max_window_voxels: the "auto" budget for the voxels of one batch of windows (None = DEFAULT_WINDOW_VOXELS of the
        device type); one window gets the budget divided by sw_batch_size.
    estimator: one of ESTIMATORS; None = DEFAULT_ESTIMATOR with fallbacks (see resolve_estimator).
    pass_batch: passes run as one batch; "auto" = the device type's default (DEFAULT_PASS_BATCH); None = all T at
        once; 1 = one after another.
    sw_batch_size: windows per batch; "auto" = the device type's default (DEFAULT_WINDOW_BATCH).
    amp: bfloat16 autocast. Off by default: with the default network it saves little time for a larger
        rounding error in the maps (docs/uncertainty.md, "Speed and memory"); worth trying for large networks.
    temperature: a fitted calibration (float τ or Calibration).
    stitch_device: where the stitched output lives (None = the compute device unless too big for the GPU).
    seed: dropout masks (head) and dropout sampling (elsewhere) depend on it alone; the caller's RNG is untouched.
    balanced_masks: the head's T dropout masks are balanced across passes (stratified; see HeadDropoutMasks);
        False draws them independently.
    channels_last: plain and head MC run on an inference copy of the network (norms folded into their convolutions)
        in channels_last_3d when True; None = the device type's default (DEFAULT_CHANNELS_LAST: on a CPU). A speed
        setting: the maps are the same to float rounding.
    """
    from monai.inferers import sliding_window_inference

    array = image.array if isinstance(image, Volume) else np.asarray(image)
    patch = _validate(array, patch_size, passes, overlap)
    if isinstance(temperature, Calibration):
        temperature = temperature.temperature
    if temperature is not None and not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    name = resolve_estimator(model, estimator, passes)
    dev = pick_device(device)
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    for m in models:
        m.to(dev)
    if not (pass_batch in ("auto", None) or (isinstance(pass_batch, int) and pass_batch >= 1)):
        raise ValueError(f"pass_batch must be 'auto', None (all passes at once) or an integer >= 1, got {pass_batch!r}")
    if pass_batch == "auto":
        pass_batch = DEFAULT_PASS_BATCH.get(dev.type, 1)
    if sw_batch_size == "auto":
        sw_batch_size = DEFAULT_WINDOW_BATCH.get(dev.type, 1)
    if not (isinstance(sw_batch_size, int) and sw_batch_size >= 1):
        raise ValueError(f"sw_batch_size must be 'auto' or an integer >= 1, got {sw_batch_size!r}")
    window = _resolve_roi(roi, array.shape, patch, models, overlap, max_window_voxels, sw_batch_size, dev)
    est = make_estimator(name, models if name == "ensemble" else models[0], passes, seed, pass_batch, flip_axes,
                         balanced_masks, channels_last)
    use_amp = bool(amp)

    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    classes = int(getattr(getattr(unwrap(models[0]), "config", None), "num_classes", 2))
    out_dev = _stitch_device(dev, x.numel(), 2 * classes + 1, stitch_device)
    x = x.to(out_dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    cval = float(array.min())
    with est.activate(), autocast:
        if all(w >= n for w, n in zip(window, array.shape)):
            stats = _one_window(x, window, est, cval, dev, out_dev)
        else:
            stats = sliding_window_inference(
                x, roi_size=window, sw_batch_size=sw_batch_size, predictor=est, overlap=overlap, mode="gaussian",
                padding_mode="constant", cval=cval, sw_device=dev, device=out_dev, progress=progress,
            )
    num_classes = (stats.shape[1] - 1) // 2
    maps = maps_from_statistics(stats, num_classes, temperature)
    if est.passes == 1:  # one pass has no spread; what blending overlapping windows leaves is not epistemic
        maps["mutual_information"].zero_()
        maps["variance"].zero_()
    p = maps["probabilities"]
    return Prediction(
        # max().indices, not argmax(): the same first-max class, without argmax's slow strided CPU reduction.
        label=p.max(1).indices[0].to(torch.uint8).cpu().numpy(),
        probabilities=p[0].cpu().numpy(),
        entropy=maps["entropy"][0, 0].cpu().numpy(),
        mutual_information=maps["mutual_information"][0, 0].cpu().numpy(),
        passes=est.passes,
        variance=maps["variance"][0].cpu().numpy(),
        estimator=name,
        temperature=float(temperature) if temperature is not None else None,
    )


class Predictor:
    """A model version ready to segment volumes: settings at construction, volumes at call.

    model: a network (or a list of model versions for the ensemble estimator); patch_size: the training patch (z, y, x),
    the smallest window of the default roi="auto" policy; passes, overlap, device and the keyword settings (roi,
    estimator, seed, pass_batch, sw_batch_size, amp, temperature, ...) are `predict_volume`'s and are checked here, so
    a wrong name fails when the predictor is built, not at the first volume. `version` names the model version the
    predictions come from (None outside a datastore).

        predictor = Predictor.from_checkpoint("v0003.pt", passes=8)
        prediction = predictor(volume)              # Prediction in the volume's grid
        segmentation = predictor(volume, passes=1)  # a setting overridden for one call
    """

    def __init__(self, model: torch.nn.Module | Sequence[torch.nn.Module], patch_size: Sequence[int], *,
                 passes: int = 8, overlap: float = 0.25, device: str | torch.device | None = "auto",
                 version: str | None = None, **settings):
        roi = _validate_window(patch_size, passes, overlap)
        _check_settings(settings)
        self.device = pick_device(device)
        self.model, self.patch_size, self.version = model, roi, version
        self.settings = {"passes": int(passes), "overlap": float(overlap), **settings}
        for m in model if isinstance(model, (list, tuple)) else [model]:
            m.to(self.device).eval()

    @property
    def passes(self) -> int:
        return self.settings["passes"]

    @property
    def overlap(self) -> float:
        return self.settings["overlap"]

    @classmethod
    def from_checkpoint(cls, path_or_ckpt, *, device: str | torch.device | None = "auto", version: str | None = None,
                        **settings) -> "Predictor":
        """Load a checkpoint (a path or a loaded dict; weights only); the patch size it was trained with
        (`checkpoint_patch_size`) is the lower bound of the windows (or the window, with roi="patch")."""
        from SSLSegmentLib.ml.checkpoint import checkpoint_patch_size, model_from_checkpoint

        dev = pick_device(device)
        model, ckpt = model_from_checkpoint(path_or_ckpt, device=dev)
        return cls(model, checkpoint_patch_size(ckpt), device=dev, version=version, **settings)

    def __call__(self, image: np.ndarray | Volume, passes: int | None = None, **overrides) -> Prediction:
        """`predict_volume(model, image, patch_size, **settings)` with this predictor's settings, `overrides` on top."""
        _check_settings(overrides)
        if passes is not None:
            overrides["passes"] = passes
        return predict_volume(self.model, image, self.patch_size, device=self.device, **{**self.settings, **overrides})


def _check_settings(settings: dict) -> None:
    """Names a Predictor passes on to predict_volume: its keyword settings, not the model, image, window or device."""
    unknown = sorted(set(settings) - _PREDICTOR_SETTINGS)
    if unknown:
        raise TypeError(f"unknown predict_volume setting(s) {unknown}; known: {sorted(_PREDICTOR_SETTINGS)}")


_PREDICTOR_SETTINGS = frozenset(inspect.signature(predict_volume).parameters) - {"model", "image", "patch_size", "device"}
