"""Bidirectional uncertainty-aware region learning (BRL; Zhou et al., arXiv 2502.07457).

Uncertainty U = normalised entropy of the EMA teacher's prediction, in [0, 1]. It is used in both directions:
  URL, labeled voxels:   the supervised loss, plus extra weight β on labeled voxels where U > τ_h
                         (the hard regions, learned with the true labels);
  CRL, unlabeled voxels: CE + Dice against the teacher's hard pseudo-label, only where U < τ_l
                         (the regions the teacher is sure about).
    L = L_sup(L) + β·½(CE + Dice)(M_h) + λ(t)·½(CE + Dice)(ŷ; M_c)
with M_h = labeled_mask·[U > τ_h] and M_c = (1 − labeled_mask)·[U < τ_l]. A corrected case is both at once:
its reviewed voxels take the URL branch, the rest the CRL branch.

copy_paste=True trains on the bidirectional copy-paste mix of the batch (copy_paste.py) instead of the batch itself:
the teacher's probabilities on the unmixed batch, the labels and labeled_mask are mixed with the same cuboids, so
M_h and M_c are computed on the mixed batch (ground truth where a voxel came from a known voxel, the teacher's
pseudo-label elsewhere), and a corrected case's reviewed voxels stay labeled through the mix.
"""

from __future__ import annotations

import torch

from SSLSegmentLib.ml.methods.base import MethodOutput, SSLMethod, StepContext, register_method
from SSLSegmentLib.ml.methods.copy_paste import BidirectionalCopyPaste
from SSLSegmentLib.ml.methods.losses import class_index, masked_cross_entropy, masked_dice_loss, normalized_entropy, supervised_loss, teacher_probabilities


@register_method
class BidirectionalRegionLoss(SSLMethod):
    name = "brl"
    summary = "bidirectional uncertainty-aware regions: extra weight on uncertain labeled voxels, pseudo-labels on certain unlabeled voxels"

    def __init__(
        self,
        consistency_weight: float = 1.0,
        # β = 1 is what makes a correction stick in a short retrain (the corrected regions are the uncertain ones;
        # Testing/test_refinement_loop.py checks it). With very few fully labeled cases of real MRI a smaller β is
        # steadier, so the la-quick profile sets its own (chosen on the validation split; docs/methods.md, "brl's β").
        beta: float = 1.0,
        high_threshold: float = 0.5,
        low_threshold: float = 0.5,
        passes: int = 1,
        copy_paste: bool = False,
        size_ratio: float = 2.0 / 3.0,
        keep_labeled: bool = False,
    ):
        super().__init__(consistency_weight)
        for name, v in (("high_threshold", high_threshold), ("low_threshold", low_threshold)):
            if not 0.0 < v < 1.0:
                raise ValueError(f"{name} is a normalised entropy and must be in (0, 1), got {v}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta, self.high_threshold, self.low_threshold = float(beta), float(high_threshold), float(low_threshold)
        self.passes = int(passes)
        if not isinstance(copy_paste, bool):
            raise ValueError(f"copy_paste must be a bool, got {copy_paste!r}")
        if keep_labeled and not copy_paste:
            raise ValueError("keep_labeled keeps the labeled patches beside the copy-paste mix; it needs copy_paste=True")
        self.copy_paste = BidirectionalCopyPaste(size_ratio, keep_labeled) if copy_paste else None

    def options(self) -> dict:
        return {
            **super().options(),
            "beta": self.beta,
            "high_threshold": self.high_threshold,
            "low_threshold": self.low_threshold,
            "passes": self.passes,
            "copy_paste": self.copy_paste is not None,
            **(self.copy_paste.options() if self.copy_paste is not None else {}),
        }

    def region_masks(self, uncertainty: torch.Tensor, labeled_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M_h, M_c): uncertain labeled voxels, certain unlabeled voxels; both (B, 1, ...) float."""
        high = labeled_mask * (uncertainty > self.high_threshold).float()
        certain = (1.0 - labeled_mask) * (uncertainty < self.low_threshold).float()
        return high, certain

    def loss_from_predictions(self, logits, teacher_probs, label, labeled_mask, weight: float) -> MethodOutput:
        """The loss from student logits and teacher probabilities; separated out so it can be checked by hand."""
        probs = logits.softmax(1)
        uncertainty = normalized_entropy(teacher_probs)
        high, certain = self.region_masks(uncertainty, labeled_mask)
        sup = supervised_loss(logits, label, labeled_mask)
        url = 0.5 * (masked_cross_entropy(logits, label, high) + masked_dice_loss(probs, label, high))
        pseudo = class_index(teacher_probs)
        crl = 0.5 * (masked_cross_entropy(logits, pseudo, certain) + masked_dice_loss(probs, pseudo, certain))
        loss = sup + self.beta * url + weight * crl
        n_lab = labeled_mask.sum().clamp_min(1.0)
        n_unl = (1.0 - labeled_mask).sum().clamp_min(1.0)
        return MethodOutput(
            loss,
            {
                "sup": float(sup.detach()),
                "url": float(url.detach()),
                "crl": float(crl.detach()),
                "w": weight,
                "high_frac": float(high.sum() / n_lab),
                "certain_frac": float(certain.sum() / n_unl),
            },
        )

    def compute_loss(self, ctx: StepContext) -> MethodOutput:
        image, label, known = ctx.image, ctx.label, ctx.labeled_mask
        q = teacher_probabilities(ctx.teacher, image, passes=self.passes, noise=True, generator=ctx.generator)
        if self.copy_paste is not None:
            mix = self.copy_paste.draw(len(image), int(ctx.batch["n_labeled"]), ctx.generator, tuple(image.shape[2:]))
            image, label, known, q = mix.apply(image), mix.apply(label), mix.apply(known), mix.apply(q)
        logits = ctx.student(image)["logits"]
        return self.loss_from_predictions(logits, q, label, known, self.weight(ctx))
