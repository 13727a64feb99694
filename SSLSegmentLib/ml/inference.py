"""Whole-volume inference with uncertainty, in the image's grid: one call for every estimator.

    predict_volume(model, image, patch_size, passes=8, estimator=None) -> Prediction

MONAI's sliding_window_inference visits the windows one batch at a time (only `sw_batch_size` windows live on the
compute device; the stitched output can live on the CPU), and the estimator runs its T passes per window
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

__all__ = [
    "DEFAULT_ESTIMATOR",
    "ESTIMATORS",
    "UNCERTAINTY_KINDS",
    "Prediction",
    "Predictor",
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
    estimator: str | None = None,
    pass_batch: int | None | str = "auto",
    amp: bool = False,
    temperature: float | Calibration | None = None,
    stitch_device: str | torch.device | None = None,
    flip_axes: Sequence[int] = (0, 1, 2),
    balanced_masks: bool = True,
    progress: bool = False,
) -> Prediction:
    """Segment a whole volume (z, y, x) with sliding windows and estimate voxelwise uncertainty.

    model: a network (SegNet or any module returning logits (B, C, ...) or a dict with "logits"), or a list of model
        versions for the ensemble estimator.
    passes: T, the stochastic passes (MC dropout, head MC) or flip combinations; 1 = one deterministic pass.
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
    """
    from monai.inferers import sliding_window_inference

    array = image.array if isinstance(image, Volume) else np.asarray(image)
    roi = _validate(array, patch_size, passes, overlap)
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
    est = make_estimator(name, models if name == "ensemble" else models[0], passes, seed, pass_batch, flip_axes,
                         balanced_masks)
    use_amp = bool(amp)

    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    classes = int(getattr(getattr(unwrap(models[0]), "config", None), "num_classes", 2))
    out_dev = _stitch_device(dev, x.numel(), 2 * classes + 1, stitch_device)
    x = x.to(out_dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    with est.activate(), autocast:
        stats = sliding_window_inference(
            x, roi_size=roi, sw_batch_size=sw_batch_size, predictor=est, overlap=overlap, mode="gaussian",
            padding_mode="constant", cval=float(array.min()), sw_device=dev, device=out_dev, progress=progress,
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

    model: a network (or a list of model versions for the ensemble estimator); patch_size: the sliding window (z, y, x);
    passes, overlap, device and the keyword settings (estimator, seed, pass_batch, sw_batch_size, amp, temperature,
    ...) are `predict_volume`'s and are checked here, so a wrong name fails when the predictor is built, not at the
    first volume. `version` names the model version the predictions come from (None outside a datastore).

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
        """Load a checkpoint (a path or a loaded dict; weights only) and infer with the patch size it was trained
        with (`checkpoint_patch_size`)."""
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
