"""Window-level uncertainty estimators: one window in, per-pass logits out, reduced to statistics that stitch.

Every estimator turns a window x (B, 1, D, H, W) into T stochastic or transformed predictions (T, B, C, D, H, W)
and reduces them with `PassStatistics` to three quantities that average linearly, so MONAI's sliding-window
blending of overlapping windows keeps them meaningful:

    E_t[p_t]          mean probability                    (B, C, ...)
    E_t[H(p_t)]       mean per-pass entropy (nats)         (B, 1, ...)
    E_t[p_t²]         second moment of each class         (B, C, ...)

`maps_from_statistics` turns the stitched statistics into the display maps (see its docstring for their meaning).

Estimators (`ESTIMATORS`):
    plain       one deterministic forward pass (eval mode); no epistemic part.
    mc_dropout  full MC dropout: the whole network runs T times with dropout sampling.
    head_mc     head MC dropout: the deterministic trunk runs once, only the stochastic head T times. Needs dropout
                confined to the head (SegNet.head_only_dropout). With a Dropout3d → 1×1-conv head each pass is
                one small matrix product with the mask folded into the weights.
    flips       test-time flips: T of the 8 flip combinations of the window's axes, predictions flipped back.
    ensemble    one deterministic pass of each model version in a list.

Dropout masks of the head are drawn from a generator seeded by (seed, window index) rather than from the global
random stream, so full MC and head MC see the same masks whatever the order or batching of passes and windows: with
head-only dropout both give the same samples to float tolerance. The T masks of a window are balanced across passes
(see HeadDropoutMasks): each is a proper Dropout3d mask, and their mean varies less from seed to seed. Dropout elsewhere in the network (trunk placement)
samples from the global stream, seeded by `seed` inside a forked RNG state so the caller's stream is untouched.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

ESTIMATORS = ("plain", "mc_dropout", "head_mc", "flips", "ensemble")
# Chosen from benchmarks/results/uncertainty.md: as good at finding errors as full MC dropout at close to the cost
# of one forward pass. Models without head-only dropout fall back (see `resolve_estimator`).
DEFAULT_ESTIMATOR = "head_mc"
# Passes run together in one batch, per device type (None = all T at once). Measured (benchmarks/results/
# uncertainty.md): on a CPU one pass at a time is faster (the activations of one pass stay in cache) and needs less
# memory, for the whole network and for head MC's heads alike; on a GPU batching fills the device.
DEFAULT_PASS_BATCH: dict[str, int | None] = {"cpu": 1, "cuda": None}
# Sliding windows run together in one batch, per device type. With the default network one training-size window
# leaves a GPU mostly idle between kernel launches, and a few windows per batch fill it; on a CPU more windows only
# add memory (benchmarks/results/uncertainty.md, docs/uncertainty.md "Speed and memory").
DEFAULT_WINDOW_BATCH: dict[str, int] = {"cpu": 1, "cuda": 4}

# The memory format of the inference copy that plain and head MC run on, per device type. On a CPU the default
# network's full-resolution layers (its top transposed convolution above all) run several times faster in
# channels_last_3d with the default whole-volume window, and the folded head then reads a voxel's features as one row
# (benchmarks/results/training-speed.md, uncertainty.md). Not measured on a GPU: off there.
DEFAULT_CHANNELS_LAST: dict[str, bool] = {"cpu": True, "cuda": False}
# Voxels per block of head MC's folded two-class passes: a block's T passes are one small product whose statistics
# stay in cache on a CPU; None = the whole window in one product (GPU).
DEFAULT_VOXEL_BLOCK: dict[str, int | None] = {"cpu": 32768, "cuda": None}

_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_CHANNEL_DROPOUT_TYPES = (nn.Dropout3d,)
_FLIP_ORDER = ((), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2))


# -- helpers ---------------------------------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside DistributedDataParallel / DataParallel."""
    return getattr(model, "module", model)


def logits_of(output) -> torch.Tensor:
    """SegNet returns a dict with "logits"; plain MONAI networks return the tensor itself."""
    return output["logits"] if isinstance(output, dict) else output


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _DROPOUT_TYPES) and getattr(m, "p", 0.0) > 0]


def head_dropout_of(model: nn.Module) -> nn.Module | None:
    """The network's head dropout when it is a channel dropout (Dropout3d) with p > 0, else None."""
    m = getattr(unwrap(model), "head_dropout", None)
    if isinstance(m, _CHANNEL_DROPOUT_TYPES) and m.p > 0:
        return m
    return None


def has_head_only_dropout(model: nn.Module) -> bool:
    net = unwrap(model)
    return bool(getattr(net, "head_only_dropout", False)) and callable(getattr(net, "features", None)) and callable(
        getattr(net, "head", None)
    )


def resolve_estimator(model: nn.Module | Sequence[nn.Module], estimator: str | None = None, passes: int = 8) -> str:
    """The estimator that will actually run.

    - a list or tuple of models means "ensemble" (the only estimator that takes several models);
    - passes == 1 with a sampling estimator is one deterministic pass ("plain"), as callers that only want a label
      (validation, evaluation) have always used it;
    - estimator None means DEFAULT_ESTIMATOR; when the model cannot run it (no head-only dropout), full MC dropout
      if the model has any dropout, else test-time flips. An estimator named explicitly is never replaced.
    """
    if isinstance(model, (list, tuple)):
        if estimator not in (None, "ensemble"):
            raise ValueError(f"several models were given, which only the 'ensemble' estimator takes (got {estimator!r})")
        if len(model) < 2:
            raise ValueError(f"an ensemble needs at least 2 model versions, got {len(model)}")
        return "ensemble"
    if estimator is not None and estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "ensemble":
        raise ValueError("the 'ensemble' estimator needs a list of at least 2 models (model versions)")
    name = estimator or DEFAULT_ESTIMATOR
    if passes == 1 and name in ("mc_dropout", "head_mc", "flips"):
        return "plain"
    if name == "head_mc" and not has_head_only_dropout(model):
        if estimator is not None:
            raise ValueError(
                "head MC dropout needs dropout confined to the segmentation head (NetworkConfig dropout_placement='head', "
                "dropout > 0); use estimator='mc_dropout' or 'flips' for this network"
            )
        name = "mc_dropout" if dropout_modules(model) else "flips"
    if name == "mc_dropout" and not dropout_modules(model):
        raise ValueError("MC dropout needs a network with dropout (dropout > 0); use estimator='flips' or 'plain'")
    return name


def _mix_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for (seed, index): neighbouring windows get unrelated streams."""
    return int(np.random.SeedSequence([int(seed) % (2**63), int(index)]).generate_state(1, np.uint64)[0] >> 1)


class HeadDropoutMasks:
    """Channel masks of a Dropout3d head, one set per window: masks[t, f] ∈ {0, 1/(1-p)}.

    Window w's masks come from a generator seeded by (seed, w) alone, so every way of running the passes (one at a
    time, all at once, head only or whole network) uses the same mask for pass t of window w.

    balanced (default): each channel is dropped in a uniformly random subset of about p·T of the T passes (exactly
    p·T when that is a whole number, else floor or ceil at random so that the expectation is p·T). Every pass's mask
    still has Dropout3d's distribution (each channel dropped with probability p, independently of the others); only
    the passes are no longer independent of each other, which is stratified sampling: the mean over T passes varies
    less from seed to seed than with independent masks (measured in benchmarks/results/uncertainty.md).
    balanced=False draws every mask independently, as nn.Dropout3d does.
    """

    def __init__(self, p: float, channels: int, seed: int = 0, balanced: bool = True):
        if not 0.0 < p < 1.0:
            raise ValueError(f"dropout probability must be in (0, 1), got {p}")
        self.p, self.channels, self.seed, self.balanced = float(p), int(channels), int(seed), bool(balanced)

    def window(self, index: int, passes: int) -> torch.Tensor:
        """(passes, channels) float32 on the CPU."""
        g = torch.Generator().manual_seed(_mix_seed(self.seed, index))
        u = torch.rand(passes, self.channels, generator=g)
        if not self.balanced:
            keep = u >= self.p
        else:
            rank = u.argsort(0).argsort(0)  # per channel: a uniformly random order of the passes
            expected = self.p * passes
            whole = math.floor(expected)
            dropped = whole + (torch.rand(self.channels, generator=g) < expected - whole).long()
            keep = rank >= dropped[None]
        return keep.float() / (1.0 - self.p)

    def windows(self, first: int, count: int, passes: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(passes, count, channels) for windows first … first+count−1."""
        return torch.stack([self.window(first + b, passes) for b in range(count)], dim=1).to(device)


class PassStatistics:
    """Running sums over passes of p, H(p) and p² for one window; `result()` gives (B, 2C+1, ...) means.

    Sequential passes add one at a time, so memory stays at one pass whatever T is. Two classes are summed through
    the logit difference d = l₁ − l₀ (p₁ = σ(d), H = softplus(d) − d·σ(d)): half the work of the general softmax path,
    which matters for head MC, where these sums are most of what the T passes cost.
    """

    def __init__(self) -> None:
        self.count = 0
        self.binary: bool | None = None
        self.sums: list[torch.Tensor] | None = None

    def add(self, logits: torch.Tensor) -> None:
        """logits: (N, B, C, ...) for N passes."""
        if logits.shape[2] == 2:
            self.add_difference((logits[:, :, 1:2] - logits[:, :, 0:1]))
            return
        logp = torch.log_softmax(logits.float(), dim=2)
        p = logp.exp()
        h = -(p * logp).sum(2, keepdim=True)
        self._accumulate(False, [p.sum(0), h.sum(0), (p * p).sum(0)], logits.shape[0])

    def add_difference(self, d: torch.Tensor) -> None:
        """d: (N, B, 1, ...) logit differences l₁ − l₀ of N two-class passes."""
        p1, h = binary_pass_terms(d.float())
        if d.shape[0] == 1:  # one pass: no reduction, and in-place sums (this runs T times per window)
            p1, h = p1[0], h[0]
            if self.sums is None:
                self._accumulate(True, [p1, h, p1 * p1], 1)
            else:
                self._check_kind(True)
                self.sums[0].add_(p1)
                self.sums[1].add_(h)
                self.sums[2].addcmul_(p1, p1)
                self.count += 1
            return
        self._accumulate(True, [p1.sum(0), h.sum(0), (p1 * p1).sum(0)], d.shape[0])

    def _check_kind(self, binary: bool) -> None:
        if binary != self.binary:
            raise RuntimeError("passes of one window mix two-class and multi-class logits")

    def _accumulate(self, binary: bool, sums: list[torch.Tensor], n: int) -> None:
        if self.sums is None:
            self.binary, self.sums = binary, sums
        else:
            self._check_kind(binary)
            for acc, s in zip(self.sums, sums):
                acc += s
        self.count += n

    def result(self) -> torch.Tensor:
        """The means, written straight into the output's channels: with one window per volume the statistics are
        volume-sized, and temporaries would each be another copy of the volume."""
        if self.sums is None:
            raise RuntimeError("no pass was added")
        sum_p, sum_h, sum_p2 = self.sums
        c = sum_p.shape[1]
        k = 2 * c + 1 if not self.binary else 5
        out = torch.empty((sum_p.shape[0], k, *sum_p.shape[2:]), dtype=sum_p.dtype, device=sum_p.device)
        scale = 1.0 / self.count
        if not self.binary:
            torch.mul(sum_p, scale, out=out[:, :c])
            torch.mul(sum_h, scale, out=out[:, c : c + 1])
            torch.mul(sum_p2, scale, out=out[:, c + 1 :])
            return out
        torch.mul(sum_p, scale, out=out[:, 1:2])
        torch.mul(sum_h, scale, out=out[:, 2:3])
        torch.mul(sum_p2, scale, out=out[:, 4:5])
        return complete_binary_means(out)


def binary_pass_terms(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p₁ = σ(d) and the pass's entropy H = softplus(d) − d·σ(d) (nats) from logit differences d = l₁ − l₀ (any
    shape): the one place the two-class per-pass formula lives."""
    p1 = torch.sigmoid(d)
    return p1, torch.nn.functional.softplus(d).addcmul_(d, p1, value=-1.0)


def complete_binary_means(out: torch.Tensor) -> torch.Tensor:
    """Two-class statistics (B, 5, ...) with E[p₁], E[H], E[p₁²] in channels 1, 2, 4: fill in channels 0 and 3 in
    place (p₀ = 1 − p₁, so E[p₀] = 1 − E[p₁] and E[p₀²] = 1 − 2E[p₁] + E[p₁²]) and return `out`."""
    mean_p, mean_p2 = out[:, 1:2], out[:, 4:5]
    torch.neg(mean_p, out=out[:, 0:1]).add_(1.0)
    torch.add(mean_p2, mean_p, alpha=-2.0, out=out[:, 3:4]).add_(1.0)
    return out


def split_statistics(stats: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 2C+1, ...) → mean p (B, C, ...), mean entropy (B, 1, ...), mean p² (B, C, ...)."""
    if stats.shape[1] != 2 * num_classes + 1:
        raise ValueError(f"expected {2 * num_classes + 1} statistic channels for {num_classes} classes, got {stats.shape[1]}")
    c = num_classes
    return stats[:, :c], stats[:, c : c + 1], stats[:, c + 1 :]


def maps_from_statistics(stats: torch.Tensor, num_classes: int, temperature: float | None = None) -> dict[str, torch.Tensor]:
    """Display maps from stitched statistics (B, 2C+1, ...). All maps are in [0, 1]:

    probabilities       p̄ = E_t[p_t], renormalised to sum to 1                                  (B, C, ...)
    entropy             H[p̄] / log C: total predictive uncertainty; 0 = certain, 1 = uniform  (B, 1, ...)
    mutual_information  (H[p̄] − E_t[H(p_t)]) / log C: the epistemic part, how much the passes disagree
                        (0 = all passes give the same distribution)                           (B, 1, ...)
    variance            4·Var_t[p_t,c] per class: 1 = half the passes say p_c = 0, half p_c = 1  (B, C, ...)

    With a temperature τ the predictive distribution becomes softmax(log p̄ / τ) (the label is unchanged), entropy
    is recomputed from it, and the mutual information is capped by the new entropy; the variance describes the spread
    of the passes and is not rescaled.
    """
    mean_p, mean_h, mean_p2 = split_statistics(stats.float(), num_classes)
    variance = (4.0 * (mean_p2 - mean_p * mean_p)).clamp(0.0, 1.0)
    p = mean_p / mean_p.sum(1, keepdim=True).clamp_min(1e-12)
    norm = math.log(num_classes)
    h_passes = -(p * torch.log(p.clamp_min(1e-12))).sum(1, keepdim=True)
    mi = (h_passes - mean_h).clamp_min(0.0)
    if temperature is not None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        p = torch.softmax(torch.log(p.clamp_min(1e-12)) / float(temperature), dim=1)
        h = -(p * torch.log(p.clamp_min(1e-12))).sum(1, keepdim=True)
        mi = torch.minimum(mi, h)
    else:
        h = h_passes
    return {
        "probabilities": p,
        "entropy": (h / norm).clamp(0.0, 1.0),
        "mutual_information": (mi / norm).clamp(0.0, 1.0),
        "variance": variance,
    }


# -- estimators ------------------------------------------------------------------------------------------------------
class UncertaintyEstimator:
    """Base class: a callable for MONAI's sliding_window_inference, window (B, 1, ...) → statistics (B, 2C+1, ...).

    Use inside `with estimator.activate():`, which puts the network(s) in the right train/eval state, installs the
    mask hook where needed and restores everything on exit. Windows are counted from 0 at each activation, in the
    order MONAI visits them (deterministic), which is what the per-window dropout masks are keyed by.
    """

    name = ""

    def __init__(self, passes: int, seed: int = 0, pass_batch: int | None = 1):
        if passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        if pass_batch is not None and pass_batch < 1:
            raise ValueError(f"pass_batch must be >= 1 or None (all passes at once), got {pass_batch}")
        self.passes = int(passes)
        self.seed = int(seed)
        self.pass_batch = self.passes if pass_batch is None else min(int(pass_batch), self.passes)
        self.window_index = 0

    @property
    def models(self) -> list[nn.Module]:
        raise NotImplementedError

    def pass_logits(self, window: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield logits (N, B, C, ...) in chunks of N passes; T passes in all. Does not advance the window count."""
        raise NotImplementedError

    def _setup(self, stack: contextlib.ExitStack) -> None:
        for m in self.models:
            m.eval()

    @contextlib.contextmanager
    def activate(self):
        self.window_index = 0
        with contextlib.ExitStack() as stack:
            try:
                self._setup(stack)
                yield self
            finally:
                for m in self.models:
                    m.eval()

    def chunks(self) -> list[tuple[int, int]]:
        """(start, size) of each batch of passes."""
        return [(s, min(self.pass_batch, self.passes - s)) for s in range(0, self.passes, self.pass_batch)]

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        stats = PassStatistics()
        for logits in self.pass_logits(window):
            stats.add(logits)
        self.window_index += window.shape[0]
        return stats.result()

    def samples(self, window: torch.Tensor) -> torch.Tensor:
        """Each pass's softmax (T, B, C, ...) for one window (advances the window count like a call does)."""
        out = torch.cat([torch.softmax(lg.float(), dim=2) for lg in self.pass_logits(window)], dim=0)
        self.window_index += window.shape[0]
        return out


# model → (what the copy was made from, the copy): a trainer validating every few hundred steps, or an evaluation of
# many cases, would otherwise rebuild the same copy for every volume. The key changes with any in-place update of a
# parameter or buffer (optimiser steps, EMA, load_state_dict bump the tensors' versions).
_COPIES: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]]" = weakref.WeakKeyDictionary()
_COPIES_LOCK = threading.Lock()


def _cached_inference_copy(net: nn.Module, channels_last: bool) -> nn.Module:
    from SSLSegmentLib.ml.networks import inference_copy

    tensors = [*net.parameters(), *net.buffers()]
    if any(t.is_inference() for t in tensors):  # no version counter to tell a change by: copy every time
        return inference_copy(net, channels_last)
    key = (bool(channels_last), *((t.device, t.data_ptr(), t._version) for t in tensors))
    with _COPIES_LOCK:
        hit = _COPIES.get(net)
    if hit is not None and hit[0] == key:
        return hit[1]
    fresh = inference_copy(net, channels_last)
    with _COPIES_LOCK:
        _COPIES[net] = (key, fresh)
    return fresh


class _InferenceCopyMixin:
    """Deterministic passes run on `inference_copy(model)` in the device type's memory format, made at activation
    (and reused while the model's weights are unchanged).

    A copy, not the model: the caller's network may be training elsewhere, and converting its parameters in place
    under inference mode would leave them untrainable. channels_last None = DEFAULT_CHANNELS_LAST of the device.
    """

    model: nn.Module
    channels_last: bool | None = None
    _net: nn.Module | None = None
    _memory_format = torch.contiguous_format

    @staticmethod
    def _check_channels_last(channels_last) -> None:
        if channels_last not in (None, True, False):
            raise ValueError(f"channels_last must be True, False or None (the device's default), got {channels_last!r}")

    def _copy_for_inference(self, stack: contextlib.ExitStack) -> nn.Module:
        net = unwrap(self.model)
        kind = _model_device(net).type
        channels_last = DEFAULT_CHANNELS_LAST.get(kind, False) if self.channels_last is None else self.channels_last
        self._net = _cached_inference_copy(net, channels_last)
        self._memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        stack.callback(self._release)
        return self._net

    def _release(self) -> None:
        self._net = None

    def _run_net(self) -> nn.Module:
        if self._net is None:
            raise RuntimeError(f"the {type(self).__name__} runs inside `with estimator.activate():`")
        return self._net

    def _as_input(self, window: torch.Tensor) -> torch.Tensor:
        return window.contiguous(memory_format=self._memory_format) if window.dim() == 5 else window


class PlainEstimator(_InferenceCopyMixin, UncertaintyEstimator):
    """One deterministic pass in eval mode: entropy of the softmax only, no epistemic part."""

    name = "plain"

    def __init__(self, model: nn.Module, seed: int = 0, channels_last: bool | None = None):
        super().__init__(1, seed, 1)
        self._check_channels_last(channels_last)
        self.model, self.channels_last = model, channels_last

    @property
    def models(self) -> list[nn.Module]:
        return [self.model]

    def _setup(self, stack):
        super()._setup(stack)
        self._copy_for_inference(stack)

    def pass_logits(self, window):
        yield logits_of(self._run_net()(self._as_input(window))).unsqueeze(0)


class _SeededDropoutMixin:
    """Shared by full and head MC: explicit head masks through a forward hook, other dropout seeded and sampling."""

    model: nn.Module
    seed: int
    balanced_masks: bool = True
    _current_mask: torch.Tensor | None = None
    masks: HeadDropoutMasks | None = None

    def _install_head_masks(self, stack: contextlib.ExitStack, net: nn.Module | None = None) -> None:
        """Masks for the head dropout of `net` (default: the estimator's model), applied by a forward hook."""
        head = head_dropout_of(self.model if net is None else net)
        self.masks = None
        if head is None:
            return
        head.eval()  # identity; the hook applies the explicit mask instead
        self.masks = HeadDropoutMasks(head.p, self._head_channels(), self.seed, self.balanced_masks)
        handle = head.register_forward_hook(self._apply_head_mask)
        stack.callback(handle.remove)
        stack.callback(self._clear_mask)

    def _head_channels(self) -> int:
        net = unwrap(self.model)
        conv = getattr(net, "seg_head", None)
        if isinstance(conv, nn.Conv3d):
            return conv.in_channels
        cfg = getattr(net, "config", None)
        if cfg is not None and hasattr(cfg, "features"):
            return int(cfg.features)
        raise ValueError("cannot tell how many channels the head dropout sees; give the network a seg_head Conv3d")

    def _clear_mask(self) -> None:
        self._current_mask = None

    def _apply_head_mask(self, module, inputs, output):
        mask = self._current_mask
        if mask is None:
            raise RuntimeError("the head dropout ran outside an estimator pass (no mask prepared)")
        if mask.shape[:2] != output.shape[:2]:
            raise RuntimeError(f"head mask {tuple(mask.shape[:2])} does not fit the features {tuple(output.shape[:2])}")
        return output * mask.view(*mask.shape[:2], *([1] * (output.dim() - 2))).to(output.dtype)

    def _set_mask(self, masks: torch.Tensor | None, start: int, n: int) -> None:
        """masks (T, B, F) → the (n·B, F) batch layout of passes start … start+n−1 (pass-major, like repeat)."""
        if masks is not None:
            self._current_mask = masks[start : start + n].reshape(-1, masks.shape[-1])

    def _seed_global_stream(self, stack: contextlib.ExitStack, device: torch.device) -> None:
        devices = []
        if device.type == "cuda":
            devices = [device.index if device.index is not None else torch.cuda.current_device()]
        stack.enter_context(torch.random.fork_rng(devices=devices))
        torch.manual_seed(self.seed)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class MCDropoutEstimator(_SeededDropoutMixin, UncertaintyEstimator):
    """Full MC dropout: the whole network runs T times (BatchNorm on running statistics, dropout sampling).

    pass_batch = N runs N passes as one batch of N·B windows; 1 runs them one after another.
    """

    name = "mc_dropout"

    def __init__(self, model: nn.Module, passes: int = 8, seed: int = 0, pass_batch: int | None = 1,
                 balanced_masks: bool = True):
        super().__init__(passes, seed, pass_batch)
        self.model = model
        self.balanced_masks = balanced_masks
        if not dropout_modules(model):
            raise ValueError("MC dropout needs a network with dropout (dropout > 0)")

    @property
    def models(self) -> list[nn.Module]:
        return [self.model]

    def _setup(self, stack):
        from SSLSegmentLib.ml.methods.losses import enable_mc_dropout

        enable_mc_dropout(self.model)
        self._install_head_masks(stack)
        self._seed_global_stream(stack, _model_device(self.model))

    def pass_logits(self, window):
        b = window.shape[0]
        masks = self.masks.windows(self.window_index, b, self.passes, window.device) if self.masks else None
        for start, n in self.chunks():
            x = window if n == 1 else window.repeat(n, *([1] * (window.dim() - 1)))
            self._set_mask(masks, start, n)
            logits = logits_of(self.model(x))
            yield logits.view(n, b, *logits.shape[1:])


class HeadMCDropoutEstimator(_InferenceCopyMixin, _SeededDropoutMixin, UncertaintyEstimator):
    """Head MC dropout: trunk once per window, the stochastic head T times.

    For SegNet's Dropout3d → 1×1-conv head, dropping feature channel f scales column f of the conv weight, so a pass
    is one matrix product with the mask folded into the weights: logits[t] = (W·diag(m_t)) f + b (a batch of passes is
    one product with stacked weights; two classes need only the logit difference). Other heads run `net.head` with the
    same explicit masks. Either way the samples equal full MC dropout's for the same seed.

    Two classes (the fast path): all T passes of a block of `voxel_block` voxels are one product
    (B, T, F) × (B, F, n) → (B, T, n) whose means over T go straight into the output; no pass is ever volume-sized.
    The trunk runs on an inference copy (see _InferenceCopyMixin); in channels_last_3d the features of a voxel are
    contiguous too; None / "auto" take the device type's defaults (DEFAULT_CHANNELS_LAST,
    DEFAULT_VOXEL_BLOCK; voxel_block None = the whole window).
    """

    name = "head_mc"

    def __init__(self, model: nn.Module, passes: int = 8, seed: int = 0, pass_batch: int | None = 1, fold: bool = True,
                 balanced_masks: bool = True, channels_last: bool | None = None,
                 voxel_block: int | None | str = "auto"):
        super().__init__(passes, seed, pass_batch)
        self.balanced_masks = balanced_masks
        if not has_head_only_dropout(model):
            raise ValueError(
                "head MC dropout needs dropout confined to the segmentation head (dropout_placement='head', dropout > 0)"
            )
        self._check_channels_last(channels_last)
        if not (voxel_block in ("auto", None) or (isinstance(voxel_block, int) and voxel_block >= 1)):
            raise ValueError(f"voxel_block must be 'auto', None (whole window) or an integer >= 1, got {voxel_block!r}")
        self.model = model
        self.fold = fold and self._foldable()
        self.channels_last, self.voxel_block = channels_last, voxel_block
        self._block: int | None = None

    @property
    def models(self) -> list[nn.Module]:
        return [self.model]

    def _foldable(self) -> bool:
        from SSLSegmentLib.ml.networks import SegNet

        net = unwrap(self.model)
        conv = getattr(net, "seg_head", None)
        return (
            isinstance(net, SegNet)
            and type(net).head is SegNet.head
            and head_dropout_of(net) is not None
            and isinstance(conv, nn.Conv3d)
            and tuple(conv.kernel_size) == (1, 1, 1)
            and conv.groups == 1
        )

    def _setup(self, stack):
        unwrap(self.model).eval()
        kind = _model_device(unwrap(self.model)).type
        self._block = DEFAULT_VOXEL_BLOCK.get(kind) if self.voxel_block == "auto" else self.voxel_block
        net = self._copy_for_inference(stack)
        self._install_head_masks(stack, net)
        if self.masks is None:  # a head dropout we cannot mask explicitly: let it sample, seeded
            for m in dropout_modules(net):
                m.train()
            stack.callback(net.eval)  # the copy is shared with later estimators (see _cached_inference_copy)
            self._seed_global_stream(stack, _model_device(net))

    def _trunk(self, window: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
        """(the network the passes run on, the trunk's features of `window`)."""
        net = self._run_net()
        return net, net.features(self._as_input(window))

    def _folded_weights(self, net) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(C, F) weight and (C,) bias of the 1×1 conv; for two classes the difference row w₁ − w₀ (1, F), b₁ − b₀."""
        conv = net.seg_head
        weight = conv.weight.reshape(conv.out_channels, conv.in_channels)
        bias = conv.bias
        if conv.out_channels == 2:
            weight = weight[1:2] - weight[0:1]
            bias = None if bias is None else bias[1:2] - bias[0:1]
        return weight, bias

    def _folded_products(self, net, features: torch.Tensor, masks: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield (n, B, K, ...) per chunk: K = C logits, or K = 1 logit difference for two classes."""
        weight, bias = self._folded_weights(net)
        b, f = features.shape[:2]
        k = weight.shape[0]
        spatial = features.shape[2:]
        flat = features.reshape(b, f, -1)
        for start, n in self.chunks():
            m = masks[start : start + n]  # (n, B, F)
            folded = torch.einsum("kf,nbf->bnkf", weight, m).reshape(b, n * k, f)
            out = torch.bmm(folded.to(flat.dtype), flat)  # (B, n·K, V)
            if bias is not None:  # in place: `out` is this chunk's own product
                out.add_(bias.to(out.dtype).repeat(n)[None, :, None])
            yield out.view(b, n, k, *spatial).transpose(0, 1)

    def _folded_logits(self, net, features, masks) -> Iterator[torch.Tensor]:
        c = net.seg_head.out_channels
        for out in self._folded_products(net, features, masks):
            if c == 2:  # logits (0, d) have the softmax of (l₀, l₁)
                out = torch.cat([torch.zeros_like(out), out], dim=2)
            yield out

    def _binary_statistics(self, net, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """features (B, F, ...), masks (T, B, F) → the two-class statistics (B, 5, ...) of the T folded passes."""
        weight, bias = self._folded_weights(net)  # (1, F), (1,)
        b = features.shape[0]
        flat = features.flatten(2)  # (B, F, V): a view in either memory format
        folded = (masks.transpose(0, 1) * weight[0]).to(flat.dtype)  # (B, T, F)
        out = torch.empty((b, 5, *features.shape[2:]), dtype=torch.float32, device=features.device)
        means = out.flatten(2)
        voxels = flat.shape[2]
        step = voxels if self._block is None else self._block
        for s in range(0, voxels, step):
            e = min(s + step, voxels)
            d = torch.bmm(folded, flat[:, :, s:e]).float()  # (B, T, n): pass t's logit differences
            if bias is not None:
                d.add_(bias.float())
            p1, h = binary_pass_terms(d)
            torch.mean(p1, 1, out=means[:, 1, s:e])
            torch.mean(h, 1, out=means[:, 2, s:e])
            torch.mean(p1.mul_(p1), 1, out=means[:, 4, s:e])
        return complete_binary_means(out)

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        if not (self.fold and unwrap(self.model).seg_head.out_channels == 2):
            return super().__call__(window)
        net, features = self._trunk(window)
        masks = self.masks.windows(self.window_index, window.shape[0], self.passes, window.device)
        self.window_index += window.shape[0]
        return self._binary_statistics(net, features, masks)

    def pass_logits(self, window):
        b = window.shape[0]
        net, features = self._trunk(window)
        masks = self.masks.windows(self.window_index, b, self.passes, window.device) if self.masks else None
        if self.fold:
            yield from self._folded_logits(net, features, masks)
            return
        for start, n in self.chunks():
            x = features if n == 1 else features.repeat(n, *([1] * (features.dim() - 1)))
            self._set_mask(masks, start, n)
            logits = net.head(x)
            yield logits.view(n, b, *logits.shape[1:])


class FlipEstimator(UncertaintyEstimator):
    """Test-time flips: the first T of the flip combinations of `axes` (spatial axes 0=z, 1=y, 2=x), identity first;
    each prediction is flipped back before it is averaged. Deterministic (eval mode)."""

    name = "flips"

    def __init__(self, model: nn.Module, passes: int = 8, seed: int = 0, pass_batch: int | None = 1,
                 axes: Sequence[int] = (0, 1, 2)):
        axes = tuple(sorted(set(int(a) for a in axes)))
        if not axes or any(a not in (0, 1, 2) for a in axes):
            raise ValueError(f"flip axes must be a non-empty subset of (0, 1, 2) (z, y, x), got {axes}")
        self.flips = [combo for combo in _FLIP_ORDER if set(combo) <= set(axes)]
        if passes > len(self.flips):
            raise ValueError(f"{len(axes)} flip axes give {len(self.flips)} flip combinations; passes={passes} is too many")
        super().__init__(passes, seed, pass_batch)
        self.model = model

    @property
    def models(self) -> list[nn.Module]:
        return [self.model]

    def pass_logits(self, window):
        b = window.shape[0]
        for start, n in self.chunks():
            dims = [tuple(a + 2 for a in combo) for combo in self.flips[start : start + n]]
            x = torch.cat([window.flip(d) if d else window for d in dims], dim=0)
            logits = logits_of(self.model(x))
            parts = [lg.flip(d) if d else lg for lg, d in zip(logits.split(b, dim=0), dims)]
            yield torch.stack(parts, dim=0)


class EnsembleEstimator(UncertaintyEstimator):
    """One deterministic pass of each model (model versions), in eval mode; T = the number of models."""

    name = "ensemble"

    def __init__(self, models: Sequence[nn.Module], seed: int = 0):
        models = list(models)
        if len(models) < 2:
            raise ValueError(f"an ensemble needs at least 2 model versions, got {len(models)}")
        super().__init__(len(models), seed, 1)
        self._models = models

    @property
    def models(self) -> list[nn.Module]:
        return self._models

    def pass_logits(self, window):
        for m in self._models:
            yield logits_of(m(window)).unsqueeze(0)


def make_estimator(
    name: str,
    model: nn.Module | Sequence[nn.Module],
    passes: int = 8,
    seed: int = 0,
    pass_batch: int | None = 1,
    flip_axes: Sequence[int] = (0, 1, 2),
    balanced_masks: bool = True,
    channels_last: bool | None = None,
) -> UncertaintyEstimator:
    """Build a concrete estimator by name (see `resolve_estimator` for the default and fallbacks)."""
    if name == "ensemble":
        if not isinstance(model, (list, tuple)):
            raise ValueError("the 'ensemble' estimator needs a list of at least 2 models (model versions)")
        return EnsembleEstimator(model, seed)
    if isinstance(model, (list, tuple)):
        raise ValueError(f"estimator {name!r} takes one model, got {len(model)}")
    if name == "plain":
        return PlainEstimator(model, seed, channels_last)
    if name == "mc_dropout":
        return MCDropoutEstimator(model, passes, seed, pass_batch, balanced_masks=balanced_masks)
    if name == "head_mc":
        return HeadMCDropoutEstimator(model, passes, seed, pass_batch, balanced_masks=balanced_masks,
                                      channels_last=channels_last)
    if name == "flips":
        return FlipEstimator(model, passes, seed, pass_batch, flip_axes)
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {name!r}")
