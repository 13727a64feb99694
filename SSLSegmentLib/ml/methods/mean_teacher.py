"""Mean Teacher (Tarvainen & Valpola 2017): student matches the EMA teacher's prediction on unlabeled voxels."""

from __future__ import annotations

from SSLSegmentLib.ml.methods.base import MethodOutput, SSLMethod, StepContext, register_method
from SSLSegmentLib.ml.methods.losses import masked_mse, supervised_loss, teacher_probabilities


@register_method
class MeanTeacher(SSLMethod):
    name = "mean-teacher"
    summary = "supervised + λ(t)·MSE(student, noisy EMA teacher) on unlabeled voxels"

    def __init__(self, consistency_weight: float = 0.1):
        super().__init__(consistency_weight)

    def compute_loss(self, ctx: StepContext) -> MethodOutput:
        logits = ctx.student(ctx.image)["logits"]
        sup = supervised_loss(logits, ctx.label, ctx.labeled_mask)
        q = teacher_probabilities(ctx.teacher, ctx.image, passes=1, noise=True, generator=ctx.generator)
        cons = masked_mse(logits.softmax(1), q, 1.0 - ctx.labeled_mask)
        w = self.weight(ctx)
        return MethodOutput(sup + w * cons, {"sup": float(sup.detach()), "cons": float(cons.detach()), "w": w})
