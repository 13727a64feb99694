"""UG-MCL: uncertainty-guided mutual consistency learning (Zhang et al., Artificial Intelligence in Medicine 2022).

Two tasks share the trunk: the segmentation head (logits s, p = softmax(s)) and a tanh level-set head φ (negative
inside the object). The level set becomes a mask through the DTC transform m = σ(−k·φ), k = 1500.
    L = ½·[CE(s, y) + Dice(p, y) + Dice(m, y)]                               labeled voxels
      + β·MSE(φ, SDF(y))                                                      fully labeled patches, optional (β = 0)
      + λ(t)·(L_intra + L_cross)                                              unlabeled voxels
    L_intra = ½·Σ M·‖p − p'‖² / (C·Σ M),  M = [U < H(t)]                      intra-task: the EMA teacher, masked
                                                                              by its MC-dropout entropy U (T passes)
    L_cross = Σ ‖m − p_fg‖² / ((C−1)·Σ 1)                                     cross-task: level-set mask vs softmax
with H(t) = (0.75 + 0.25·r(t))·ln C as in UA-MT. The released code applies the consistency terms to the whole batch;
here they cover the voxels whose label is unknown (labeled_mask = 0), so a corrected case contributes its reviewed
voxels to the supervised terms and the rest to the consistency terms. The network gets a separate 1×1 level-set head
(`levelset_head`), the V-Net variant of the LA recipe, instead of reading tanh off the segmentation logits.

The signed distance map is DTC's normalised one: negdis/max(negdis) − posdis/max(posdis), 0 on the inner boundary,
computed with scipy's Euclidean distance transform (a patch without foreground is +1 everywhere, one without background
−1 everywhere).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from SSLSegmentLib.ml.methods.base import MethodOutput, SSLMethod, StepContext, register_method
from SSLSegmentLib.ml.methods.losses import masked_cross_entropy, masked_dice_loss, masked_mse, teacher_probabilities


def signed_distance_map(label: np.ndarray, num_classes: int = 2) -> np.ndarray:
    """Normalised SDF per sample and foreground class: (B, D, H, W) int → (B, C−1, D, H, W) float32 in [−1, 1].

    Negative inside the class, positive outside, 0 on the inner boundary (DTC's `compute_sdf`).
    """
    if label.ndim != 4:
        raise ValueError(f"label must be (B, D, H, W), got shape {label.shape}")
    out = np.zeros((label.shape[0], num_classes - 1, *label.shape[1:]), np.float32)
    for b in range(label.shape[0]):
        for c in range(1, num_classes):
            pos = label[b] == c
            if not pos.any():
                out[b, c - 1] = 1.0
                continue
            if pos.all():
                out[b, c - 1] = -1.0
                continue
            posdis = ndimage.distance_transform_edt(pos)
            negdis = ndimage.distance_transform_edt(~pos)
            boundary = pos & ~ndimage.binary_erosion(pos, border_value=1)
            sdf = negdis / negdis.max() - posdis / posdis.max()
            sdf[boundary] = 0.0
            out[b, c - 1] = sdf
    return out


@register_method
class UGMCL(SSLMethod):
    name = "ug-mcl"
    summary = "uncertainty-masked teacher consistency + cross-task consistency with a tanh level-set head"
    network_options = {"levelset_head": True}

    def __init__(self, consistency_weight: float = 0.1, passes: int = 8, k: float = 1500.0, sdf_weight: float = 0.0):
        super().__init__(consistency_weight)
        if passes < 2:
            raise ValueError("UG-MCL needs at least 2 teacher passes to estimate uncertainty")
        if k <= 0:
            raise ValueError(f"k (the level-set sharpness) must be > 0, got {k}")
        if sdf_weight < 0:
            raise ValueError(f"sdf_weight must be >= 0, got {sdf_weight}")
        self.passes, self.k, self.sdf_weight = int(passes), float(k), float(sdf_weight)

    def options(self) -> dict:
        return {**super().options(), "passes": self.passes, "k": self.k, "sdf_weight": self.sdf_weight}

    def levelset_mask(self, phi: torch.Tensor) -> torch.Tensor:
        """m = σ(−k·φ): (B, C−1, ...) level set → foreground probability per class."""
        return torch.sigmoid(-self.k * phi)

    @staticmethod
    def certainty_mask(teacher_probs: torch.Tensor, unlabeled: torch.Tensor, rampup: float) -> torch.Tensor:
        """(B, 1, ...) float: voxels of `unlabeled` whose teacher entropy (nats) is below (0.75 + 0.25·r)·ln C."""
        entropy = -(teacher_probs * (teacher_probs + 1e-6).log()).sum(1, keepdim=True)
        threshold = (0.75 + 0.25 * rampup) * math.log(teacher_probs.shape[1])
        return (entropy < threshold).float() * unlabeled

    def loss_from_predictions(self, logits, phi, teacher_probs, label, labeled_mask, weight: float, rampup: float) -> MethodOutput:
        """The loss from the student's logits (B, C, ...) and level set φ (B, C−1, ...) and the teacher's mean
        probabilities (B, C, ...); separated from `compute_loss` so it can be checked by hand."""
        if phi.shape[1] != logits.shape[1] - 1:
            raise ValueError(f"level set has {phi.shape[1]} channels; expected {logits.shape[1] - 1} (C − 1)")
        probs = logits.softmax(1)
        mask_ls = self.levelset_mask(phi)
        unlabeled = 1.0 - labeled_mask
        # masked_dice_loss reads classes 1..C−1, so channel 0 of the level-set "probabilities" is a placeholder.
        ls_probs = torch.cat([torch.zeros_like(mask_ls[:, :1]), mask_ls], 1)
        sup = 0.5 * (
            masked_cross_entropy(logits, label, labeled_mask)
            + masked_dice_loss(probs, label, labeled_mask)
            + masked_dice_loss(ls_probs, label, labeled_mask)
        )
        certain = self.certainty_mask(teacher_probs, unlabeled, rampup)
        intra = 0.5 * masked_mse(probs, teacher_probs, certain)
        cross = masked_mse(mask_ls, probs[:, 1:], unlabeled)
        loss = sup + weight * (intra + cross)
        terms = {"sup": float(sup.detach()), "intra": float(intra.detach()), "cross": float(cross.detach()), "w": weight}
        if self.sdf_weight > 0:
            sdf_loss = self.sdf_loss(phi, label, labeled_mask)
            loss = loss + self.sdf_weight * sdf_loss
            terms["sdf"] = float(sdf_loss.detach())
        terms["kept"] = float(certain.sum() / unlabeled.sum().clamp_min(1.0))
        return MethodOutput(loss, terms)

    def sdf_loss(self, phi: torch.Tensor, label: torch.Tensor, labeled_mask: torch.Tensor) -> torch.Tensor:
        """MSE(φ, SDF(y)) on patches whose every voxel is labeled (an SDF of a partial label would be wrong)."""
        full = (labeled_mask.flatten(1).min(1).values > 0.5).nonzero().flatten()
        if full.numel() == 0:
            return phi.sum() * 0.0
        sdf = signed_distance_map(label[full, 0].detach().cpu().numpy(), phi.shape[1] + 1)
        return ((phi[full] - torch.from_numpy(sdf).to(phi.device)) ** 2).mean()

    def compute_loss(self, ctx: StepContext) -> MethodOutput:
        out = ctx.student(ctx.image)
        if "levelset" not in out:
            raise ValueError("UG-MCL needs a network with the level-set head (NetworkConfig.levelset_head=True)")
        q = teacher_probabilities(ctx.teacher, ctx.image, passes=self.passes, noise=True, generator=ctx.generator)
        return self.loss_from_predictions(
            out["logits"], out["levelset"], q, ctx.label, ctx.labeled_mask, self.weight(ctx), ctx.rampup
        )
