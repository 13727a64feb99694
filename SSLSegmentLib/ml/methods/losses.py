"""Loss pieces shared by the methods. All take a voxel mask so they work on full, partial and pseudo labels.

Shapes: logits/probs (B, C, D, H, W); target (B, 1, D, H, W) long; mask (B, 1, D, H, W) float in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-5


def sigmoid_rampup(step: float, length: float) -> float:
    """r(t; L) = exp(-5 (1 - min(t, L)/L)^2), the ramp used by the mean-teacher family; 1 when L is 0."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(step, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ mask·CE / Σ mask (0 when the mask is empty)."""
    ce = F.cross_entropy(logits, target[:, 0].long(), reduction="none").unsqueeze(1)
    return (ce * mask).sum() / mask.sum().clamp_min(EPS)


def masked_dice_loss(
    probs: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    smooth: float = EPS,
    *,
    squared_pred: bool = True,
    include_background: bool = False,
    batch: bool = True,
) -> torch.Tensor:
    """Soft Dice loss restricted to the voxels of `mask`: the one masked Dice of every method.

    probs (B, C, ...) probabilities; target (B, 1, ...) class indices; mask (B, 1, ...) float, 1 = the voxel counts.
    With p̃ = p·mask and ỹ = onehot(y)·mask, per class (and per sample unless `batch`):

        squared_pred=True   D = (2 Σ p̃ỹ + s) / (Σ p̃² + Σ ỹ + s)            the V-Net / UA-MT Dice of the LA codebases
        squared_pred=False  D = (2 tp + s) / (2 tp + fp + fn + s)            nnU-Net's SoftDiceLoss
                            tp = Σ p̃ỹ, fp = Σ p̃(1 − ỹ), fn = Σ (1 − p̃)ỹ

    loss = 1 − mean D over the classes (1 … C−1 unless `include_background`) and, when `batch` is False, the samples;
    `batch` True pools the batch before the ratio, as MONAI's DiceLoss(batch=True). Returns a 0 that keeps the graph
    when the mask is empty. The arguments are MONAI's and so are the definitions, but MONAI's MaskedDiceLoss is not
    used: it sums in another order (which moves the methods' losses in their last bits), and it masks a class-index
    target before one-hot encoding it, which makes the masked-out voxels background truth when the background counts.
    """
    if probs.dim() < 3 or target.shape != (probs.shape[0], 1, *probs.shape[2:]):
        raise ValueError(f"expected probs (B, C, ...) and target (B, 1, ...) on the same grid, got {tuple(probs.shape)} "
                         f"and {tuple(target.shape)}")
    if mask.shape != target.shape:
        raise ValueError(f"mask must be (B, 1, ...) like the target {tuple(target.shape)}, got {tuple(mask.shape)}")
    if smooth < 0:
        raise ValueError(f"smooth must be >= 0, got {smooth}")
    if mask.sum() <= 0:
        return probs.sum() * 0.0
    c = probs.shape[1]
    first = 0 if include_background else 1
    onehot = F.one_hot(target[:, 0].long().clamp(0, c - 1), c).movedim(-1, 1).float()
    p, y = probs[:, first:] * mask, onehot[:, first:] * mask
    axes = ((0,) if batch else ()) + tuple(range(2, probs.dim()))
    tp = (p * y).sum(axes)
    if squared_pred:
        denominator = (p * p).sum(axes) + y.sum(axes)
    else:
        denominator = 2 * tp + (p * (1 - y)).sum(axes) + ((1 - p) * y).sum(axes)
    return 1.0 - ((2 * tp + smooth) / (denominator + smooth)).mean()


def supervised_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0.5·(CE + Dice) on the masked voxels: the common supervised loss of the LA codebases."""
    return 0.5 * (masked_cross_entropy(logits, target, mask) + masked_dice_loss(logits.softmax(1), target, mask))


def class_index(probs: torch.Tensor) -> torch.Tensor:
    """The most probable class per voxel, (B, C, ...) → (B, 1, ...) long; the first one on a tie, as argmax.

    `max(dim).indices` rather than `argmax(dim)`: on the CPU, argmax over the class axis of a 5-D tensor runs as a slow
    strided reduction that costs more than the rest of a method's loss.
    """
    return probs.max(1, keepdim=True).indices


def keep_largest_component(label: torch.Tensor) -> torch.Tensor:
    """Per sample, each foreground class cut to its largest 26-connected component: (B, 1, ...) long → the same,
    background where cut. SciPy's labelling (MONAI's KeepLargestConnectedComponent needs scikit-image on the CPU)."""
    import numpy as np
    from scipy import ndimage

    out = label.detach().cpu().numpy().copy()
    structure = np.ones((3,) * (label.dim() - 2), dtype=bool)
    for sample in out[:, 0]:
        for c in np.unique(sample):
            if c == 0:
                continue
            parts, n = ndimage.label(sample == c, structure=structure)
            if n > 1:
                sizes = np.bincount(parts.ravel())[1:]
                sample[(parts > 0) & (parts != 1 + int(sizes.argmax()))] = 0
    return torch.from_numpy(out).to(label.device)


def unit_vectors(x: torch.Tensor, dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """x / max(‖x‖, eps) along `dim`, as F.normalize, for tensors without gradients.

    The norm as a plain sum of squares: torch's vector_norm over a non-innermost axis is a slow strided reduction on
    the CPU. (Its square root has no safe gradient at 0, hence no-grad use only; rows with gradients use F.normalize.)
    """
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError("unit_vectors is for tensors without gradients; use F.normalize")
    return x / (x * x).sum(dim, keepdim=True).sqrt().clamp_min(eps)


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """−Σ_c p_c log p_c / log C, in [0, 1]: (B, C, ...) → (B, 1, ...)."""
    c = probs.shape[1]
    return -(probs * torch.log(probs.clamp_min(1e-8))).sum(1, keepdim=True) / math.log(c)


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ mask·‖a−b‖² / (C·Σ mask): squared error per voxel averaged over channels and masked voxels."""
    return (((a - b) ** 2) * mask).sum() / (a.shape[1] * mask.sum()).clamp_min(EPS)


def input_noise(x: torch.Tensor, generator: torch.Generator | None = None, sd: float = 0.1, clip: float = 0.2) -> torch.Tensor:
    """ε = clip(N(0, sd²), ±clip), the teacher's input perturbation in UA-MT and its descendants."""
    noise = torch.randn(x.shape, generator=generator, device="cpu" if generator is None else generator.device)
    return x + (noise.to(x.device) * sd).clamp(-clip, clip)


def enable_mc_dropout(model: torch.nn.Module) -> None:
    """Eval mode (BatchNorm uses its running statistics) with dropout layers sampling: MC dropout."""
    model.eval()
    for m in model.modules():
        if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout)):
            m.train()


@torch.no_grad()
def teacher_probabilities(
    teacher: torch.nn.Module,
    image: torch.Tensor,
    passes: int = 1,
    noise: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean teacher softmax over `passes` stochastic passes (noise + MC dropout when passes > 1): (B, C, ...).

    With head-only dropout the trunk runs once per input noise draw and the head `passes` times.
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    if passes == 1:
        teacher.eval()
        x = input_noise(image, generator) if noise else image
        return teacher(x)["logits"].softmax(1)
    enable_mc_dropout(teacher)
    net = getattr(teacher, "module", teacher)
    total = None
    if getattr(net, "head_only_dropout", False):
        feats = net.features(input_noise(image, generator) if noise else image)
        for _ in range(passes):
            p = net.head(feats).softmax(1)
            total = p if total is None else total + p
    else:
        for _ in range(passes):
            p = net(input_noise(image, generator) if noise else image)["logits"].softmax(1)
            total = p if total is None else total + p
    teacher.eval()
    return total / passes
