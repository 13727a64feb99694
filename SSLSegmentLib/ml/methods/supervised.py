"""Supervised only: learns from labeled voxels, ignores everything else (the lower reference)."""

from __future__ import annotations

from SSLSegmentLib.ml.methods.base import MethodOutput, SSLMethod, StepContext, register_method
from SSLSegmentLib.ml.methods.losses import supervised_loss


@register_method
class Supervised(SSLMethod):
    name = "supervised"
    summary = "labeled voxels only: 0.5·(CE + Dice) where labeled_mask is 1"
    uses_unlabeled = False

    def __init__(self, consistency_weight: float = 0.0):
        super().__init__(consistency_weight)

    def compute_loss(self, ctx: StepContext) -> MethodOutput:
        logits = ctx.student(ctx.image)["logits"]
        loss = supervised_loss(logits, ctx.label, ctx.labeled_mask)
        return MethodOutput(loss, {"sup": float(loss.detach())})
