"""Sliding-window inference with MC-dropout uncertainty, in the image's geometry.

Per window the trunk runs once and the stochastic head T times when dropout is confined to the head (otherwise
the whole network runs T times). Each window returns two quantities that average linearly across overlapping
windows, the mean probability p̄ and the mean per-pass entropy E_t[H(p_t)]; after stitching:
    predictive entropy  H[p̄]             (total uncertainty), normalised by log C to [0, 1]
    mutual information  H[p̄] − E_t[H(p_t)] (epistemic part), normalised by log C
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .data.imageio import Volume
from .methods.losses import enable_mc_dropout

UNCERTAINTY_KINDS = ("entropy", "mutual_information")


@dataclass
class Prediction:
    """Outputs in the input's grid (z, y, x). probabilities: (C, z, y, x) float32."""

    label: np.ndarray
    probabilities: np.ndarray
    entropy: np.ndarray
    mutual_information: np.ndarray
    passes: int

    def uncertainty(self, kind: str = "entropy") -> np.ndarray:
        if kind not in UNCERTAINTY_KINDS:
            raise ValueError(f"uncertainty kind must be one of {UNCERTAINTY_KINDS}, got {kind!r}")
        return self.entropy if kind == "entropy" else self.mutual_information

    def volumes(self, like: Volume) -> dict[str, Volume]:
        """Label map, foreground probability and uncertainties as volumes with the image's geometry."""
        fg = 1.0 - self.probabilities[0]
        return {
            "label": like.like(self.label.astype(np.uint8)),
            "probability": like.like(fg.astype(np.float32)),
            "entropy": like.like(self.entropy.astype(np.float32)),
            "mutual_information": like.like(self.mutual_information.astype(np.float32)),
        }


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-8))).sum(1, keepdim=True)


class MCWindowPredictor:
    """Callable for MONAI's sliding_window_inference: window (B, 1, ...) → (p̄, E_t[H(p_t)]) for the window."""

    def __init__(self, model: torch.nn.Module, passes: int):
        self.model = model
        self.passes = passes

    def __call__(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.model
        if self.passes == 1:
            p = net(window)["logits"].float().softmax(1)
            return p, _entropy(p)
        mean_p, mean_h = None, None
        if getattr(net, "head_only_dropout", False):
            feats = net.features(window)
            outputs = (net.head(feats) for _ in range(self.passes))
        else:
            outputs = (net(window)["logits"] for _ in range(self.passes))
        for logits in outputs:
            p = logits.float().softmax(1)
            h = _entropy(p)
            mean_p = p if mean_p is None else mean_p + p
            mean_h = h if mean_h is None else mean_h + h
        return mean_p / self.passes, mean_h / self.passes


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.inference_mode()
def predict_volume(
    model: torch.nn.Module,
    image: np.ndarray | Volume,
    patch_size: tuple[int, int, int],
    passes: int = 8,
    overlap: float = 0.25,
    device: str | torch.device | None = "auto",
    sw_batch_size: int = 1,
    seed: int = 0,
) -> Prediction:
    """Segment a whole volume (z, y, x) with sliding windows; uncertainty from `passes` MC-dropout passes."""
    from monai.inferers import sliding_window_inference

    array = image.array if isinstance(image, Volume) else image
    if array.ndim != 3:
        raise ValueError(f"expected a 3D volume (z, y, x), got shape {array.shape}")
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    dev = pick_device(device)
    model = model.to(dev)
    if passes > 1:
        enable_mc_dropout(model)
    else:
        model.eval()
    torch.manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(dev)
    roi = tuple(int(p) for p in patch_size)  # smaller volumes are padded by MONAI
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else _nullcontext()
    with autocast:
        mean_p, mean_h = sliding_window_inference(
            x, roi_size=roi, sw_batch_size=sw_batch_size, predictor=MCWindowPredictor(model, passes),
            overlap=overlap, mode="gaussian", padding_mode="constant", cval=float(array.min()),
        )
    model.eval()
    mean_p = mean_p.float()
    mean_p = mean_p / mean_p.sum(1, keepdim=True).clamp_min(1e-8)
    c = mean_p.shape[1]
    h_total = _entropy(mean_p)
    mi = (h_total - mean_h.float()).clamp_min(0.0)
    norm = math.log(c)
    return Prediction(
        label=mean_p.argmax(1)[0].to(torch.uint8).cpu().numpy(),
        probabilities=mean_p[0].cpu().numpy(),
        entropy=(h_total[0, 0] / norm).clamp(0, 1).cpu().numpy(),
        mutual_information=(mi[0, 0] / norm).clamp(0, 1).cpu().numpy(),
        passes=passes,
    )


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
