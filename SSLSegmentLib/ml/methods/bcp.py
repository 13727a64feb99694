"""BCP: bidirectional copy-paste (Bai et al., CVPR 2023; DeepMed-Lab-ECNU/BCP), the strongest public LA baseline here.

Per step, with the EMA teacher's hard pseudo-label Ŷ on the unmixed batch (optionally cleaned to its largest
connected component, as BCP does):
    target  T = label where labeled_mask, else Ŷ
    mix     copy_paste.py: each labeled sample's crop swapped with an unlabeled sample's, both ways; the image, T and
            labeled_mask mixed with the same cuboids, so K = mix(labeled_mask) marks the voxels whose label is known
    L = ½(CE + Dice)(f(mix(x)), mix(T); K) + λ(t)·½(CE + Dice)(f(mix(x)), mix(T); 1 − K)
BCP weighs the unlabeled-origin voxels 0.5 inside one loss; here the two parts are normalised separately and λ's full
value (the consistency weight) is 0.5. BCP's labeled-only pre-training stage is the trainer's `pretrain_iterations`.
"""

from __future__ import annotations

import torch

from SSLSegmentLib.ml.methods.base import MethodOutput, SSLMethod, StepContext, register_method
from SSLSegmentLib.ml.methods.copy_paste import BidirectionalCopyPaste
from SSLSegmentLib.ml.methods.losses import class_index, keep_largest_component, supervised_loss, teacher_probabilities


@register_method
class BCP(SSLMethod):
    name = "bcp"
    summary = "bidirectional copy-paste: labeled and unlabeled crops swapped both ways, true labels + teacher pseudo-labels"

    def __init__(self, consistency_weight: float = 0.5, size_ratio: float = 2.0 / 3.0, pseudo_lcc: bool = True,
                 keep_labeled: bool = False):
        super().__init__(consistency_weight)
        if not isinstance(pseudo_lcc, bool):
            raise ValueError(f"pseudo_lcc must be a bool, got {pseudo_lcc!r}")
        self.copy_paste = BidirectionalCopyPaste(size_ratio, keep_labeled)
        self.pseudo_lcc = pseudo_lcc

    def options(self) -> dict:
        return {**super().options(), **self.copy_paste.options(), "pseudo_lcc": self.pseudo_lcc}

    def compute_loss(self, ctx: StepContext) -> MethodOutput:
        image, known = ctx.image, ctx.labeled_mask
        pseudo = class_index(teacher_probabilities(ctx.teacher, image, passes=1, noise=False))
        if self.pseudo_lcc:
            pseudo = keep_largest_component(pseudo)
        target = torch.where(known > 0, ctx.label, pseudo)
        mix = self.copy_paste.draw(len(image), int(ctx.batch["n_labeled"]), ctx.generator, tuple(image.shape[2:]))
        x, t, k = mix.apply(image), mix.apply(target), mix.apply(known)
        logits = ctx.student(x)["logits"]
        sup = supervised_loss(logits, t, k)
        unsup = supervised_loss(logits, t, 1.0 - k)
        w = self.weight(ctx)
        return MethodOutput(sup + w * unsup, {"sup": float(sup.detach()), "unsup": float(unsup.detach()), "w": w,
                                              "known_frac": float(k.mean())})
