"""Bidirectional copy-paste (BCP; Bai et al., CVPR 2023): the mix any method can train on.

A batch (labeled stream first, then unlabeled; base.py's layout) is paired up, labeled sample i with unlabeled sample
i, and each pair (a, b) gets one random cuboid M (1 inside; each side `size_ratio` of the patch's, uniform position):

    into labeled    a·(1 − M) + b·M      the unlabeled crop pasted into the labeled image
    into unlabeled  b·(1 − M) + a·M      the labeled crop pasted into the unlabeled image

Every per-voxel tensor of the batch is mixed with the same cuboids (`CopyPasteMix.apply`): the image, the label, the
labeled_mask, and whatever the teacher predicted on the unmixed batch (its probabilities, hence its pseudo-labels and
its uncertainty). So the mixed labeled_mask is 1 exactly where the voxel came from a known voxel: a fully labeled
case's part of the mix, or the reviewed voxels of a corrected case; the rest is learned like unlabeled data.

keep_labeled=True also keeps the labeled stream's own patches, unmixed, as the last rows of every mixed tensor.
At a short schedule the mix alone is slow to fit the few labeled cases: a network only ever trained on pasted
images sees the labeled anatomy only next to foreign cuboids, and its normalisation statistics only those images.
The unmixed rows give the student the patches it will be tested on, with their labels (docs/methods.md, "copy-paste
at a short schedule", has the validation-fold comparison).

The labeled-only variant (`labeled_only=True`, BCP's pre-training stage) pairs labeled samples with each other
(i with i + n/2) and keeps the true labels everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from SSLSegmentLib.ml.methods.base import MethodOutput, StepContext
from SSLSegmentLib.ml.methods.losses import supervised_loss


@dataclass
class CopyPasteMix:
    """The cuboids and pairing of one step: `apply` mixes any (B, C, D, H, W) tensor of that batch into
    (2P + K, C, ...), P pairs; rows [0, P) are the mixes into the first member of each pair, rows [P, 2P) into the
    second, rows [2P, 2P + K) the `kept` samples unmixed (K = 0 unless keep_labeled)."""

    first: list[int]
    second: list[int]
    cuboids: torch.Tensor  # (P, 1, D, H, W) float, 1 inside the pasted cuboid
    kept: list[int] = field(default_factory=list)  # rows appended unmixed (keep_labeled: the labeled stream)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[2:] != self.cuboids.shape[2:]:
            raise ValueError(f"expected (B, C, {', '.join(map(str, self.cuboids.shape[2:]))}), got {tuple(x.shape)}")
        m = self.cuboids.to(x.device)
        a, b = x[self.first], x[self.second]
        if x.dtype.is_floating_point:
            mixed = [a * (1 - m) + b * m, b * (1 - m) + a * m]
        else:
            inside = m.bool()
            mixed = [torch.where(inside, b, a), torch.where(inside, a, b)]
        return torch.cat(mixed + ([x[self.kept]] if self.kept else []))

    @property
    def pairs(self) -> int:
        return len(self.first)


class BidirectionalCopyPaste:
    """Draws the step's `CopyPasteMix`.

    size_ratio: each side of the cuboid as a fraction of the patch side (BCP: 2/3), in (0, 1).
    keep_labeled: also keep the labeled stream's patches unmixed (the module docstring says why); not in the
        labeled-only pre-training mix, which is all labeled already.
    """

    def __init__(self, size_ratio: float = 2.0 / 3.0, keep_labeled: bool = False):
        if not 0.0 < size_ratio < 1.0:
            raise ValueError(f"size_ratio is the cuboid side over the patch side and must be in (0, 1), got {size_ratio}")
        if not isinstance(keep_labeled, bool):
            raise ValueError(f"keep_labeled must be a bool, got {keep_labeled!r}")
        self.size_ratio = float(size_ratio)
        self.keep_labeled = keep_labeled

    def options(self) -> dict:
        """The mix's settings as plain values, for a method's options()."""
        return {"size_ratio": self.size_ratio, "keep_labeled": self.keep_labeled}

    def cuboids(self, n: int, spatial: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, 1, *spatial) float masks, 1 inside a cuboid of round(size_ratio·side) per axis at a uniform position."""
        masks = torch.zeros(n, 1, *spatial)
        for i in range(n):
            index = [i, 0]
            for side in spatial:
                size = max(1, min(side, round(self.size_ratio * side)))
                start = int(torch.randint(0, side - size + 1, (1,), generator=generator))
                index.append(slice(start, start + size))
            masks[tuple(index)] = 1.0
        return masks

    def draw(self, batch_size: int, n_labeled: int, generator: torch.Generator | None = None,
             spatial: tuple[int, ...] = (), labeled_only: bool = False) -> CopyPasteMix:
        """Pair the batch: labeled i with unlabeled i (both directions), or labeled i with labeled i + n/2."""
        if not 0 <= n_labeled <= batch_size:
            raise ValueError(f"n_labeled must be in [0, {batch_size}], got {n_labeled}")
        if labeled_only:
            p = n_labeled // 2
            first, second = list(range(p)), list(range(p, 2 * p))
        else:
            p = min(n_labeled, batch_size - n_labeled)
            first, second = list(range(p)), list(range(n_labeled, n_labeled + p))
        if p == 0:
            raise ValueError(f"copy-paste needs two samples to pair: {n_labeled} labeled of {batch_size}"
                             + (" (labeled only)" if labeled_only else ""))
        kept = list(range(n_labeled)) if self.keep_labeled and not labeled_only else []
        return CopyPasteMix(first, second, self.cuboids(p, tuple(spatial), generator), kept)


def labeled_copy_paste_loss(ctx: StepContext, copy_paste: BidirectionalCopyPaste) -> MethodOutput:
    """BCP's pre-training step: the labeled stream's patches mixed with each other, ½(CE + Dice) on the mixed
    labels where known (a corrected case's unreviewed voxels stay out)."""
    n = int(ctx.batch["n_labeled"])
    mix = copy_paste.draw(n, n, ctx.generator, tuple(ctx.image.shape[2:]), labeled_only=True)
    image, label, known = (mix.apply(t[:n]) for t in (ctx.image, ctx.label, ctx.labeled_mask))
    sup = supervised_loss(ctx.student(image)["logits"], label, known)
    return MethodOutput(sup, {"sup": float(sup.detach()), "pretrain": 1.0})


__all__ = ["BidirectionalCopyPaste", "CopyPasteMix", "labeled_copy_paste_loss"]
