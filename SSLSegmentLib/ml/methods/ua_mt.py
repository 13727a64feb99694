"""UA-MT (Yu et al., MICCAI 2019): mean-teacher consistency only where the teacher's MC-dropout entropy is low.

Threshold H(t) = (0.75 + 0.25·r(t))·ln C ramps from 0.75·ln C to ln C; T = 8 teacher passes with input noise.
"""

from __future__ import annotations

import math

from SSLSegmentLib.ml.methods.base import MethodOutput, SSLMethod, StepContext, register_method
from SSLSegmentLib.ml.methods.losses import masked_mse, supervised_loss, teacher_probabilities


@register_method
class UAMT(SSLMethod):
    name = "ua-mt"
    summary = "mean teacher with consistency masked to low MC-dropout entropy (T passes, ramped threshold)"

    def __init__(self, consistency_weight: float = 0.1, passes: int = 8):
        super().__init__(consistency_weight)
        if passes < 2:
            raise ValueError("UA-MT needs at least 2 teacher passes to estimate uncertainty")
        self.passes = int(passes)

    def options(self) -> dict:
        return {**super().options(), "passes": self.passes}

    def certainty_mask(self, teacher_probs, labeled_mask, rampup: float):
        """(B, 1, ...) float mask: unlabeled voxels whose entropy (nats) is below H(t)."""
        c = teacher_probs.shape[1]
        entropy = -(teacher_probs * (teacher_probs + 1e-6).log()).sum(1, keepdim=True)
        threshold = (0.75 + 0.25 * rampup) * math.log(c)
        return (entropy < threshold).float() * (1.0 - labeled_mask)

    def compute_loss(self, ctx: StepContext) -> MethodOutput:
        logits = ctx.student(ctx.image)["logits"]
        sup = supervised_loss(logits, ctx.label, ctx.labeled_mask)
        q = teacher_probabilities(ctx.teacher, ctx.image, passes=self.passes, noise=True, generator=ctx.generator)
        mask = self.certainty_mask(q, ctx.labeled_mask, ctx.rampup)
        cons = masked_mse(logits.softmax(1), q, mask)
        w = self.weight(ctx)
        kept = float(mask.sum() / (1.0 - ctx.labeled_mask).sum().clamp_min(1.0))
        return MethodOutput(sup + w * cons, {"sup": float(sup.detach()), "cons": float(cons.detach()), "kept": kept, "w": w})
