"""Low-confidence consistency with class separation (after Gao & Yu, ISBP 2023; see docs/methods.md for what is
reconstructed: the paper's code is not public).

The EMA teacher's probability q = softmax(f'(x + ε)) and confidence c = max_k q_k split the unknown voxels:
  low confidence  M_lc = [c < γ]   consistency L_lc = Σ M_lc·‖p − q‖² / (C·Σ M_lc)   (the opposite of UA-MT: the
                                   student is pulled towards the teacher where the teacher is NOT yet sure)
  high confidence M_hc = [c ≥ γ]   pseudo class ŷ = argmax q, used by the separation loss
Class separation works on the network's decoder features F (SegNet's "features" output, L2-normalised per voxel):
class prototypes μ_k are EMA means (momentum m) of the labeled voxels' features, and each labeled voxel (true y) and
each confident unknown voxel (ŷ) is classified against the prototypes by cosine similarity:
  L_cs = −log( exp(cos(F_v, μ_y)/τ) / Σ_k exp(cos(F_v, μ_k)/τ) ),  τ = 0.1, averaged over those voxels
    L = L_sup + λ(t)·(L_lc + η·L_cs)
The prototypes are buffers of this module, so they are saved with checkpoints (`method_state`). They are refreshed
after each optimiser step from the batch's labeled features (`after_step`); the very first batch initialises them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from SSLSegmentLib.ml.methods.base import MethodOutput, SSLMethod, StepContext, register_method
from SSLSegmentLib.ml.methods.losses import class_index, masked_mse, supervised_loss, teacher_probabilities, unit_vectors


def _voxel_rows(features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows (N, F) of features (B, F, ...) at flat voxel indices `idx` (N,) into the (B, 1, ...) grid, in idx order.

    Gathered from a view, so only the selected voxels are copied (not the whole channels-last feature volume).
    """
    flat = features.flatten(2)  # (B, F, S)
    s = flat.shape[2]
    return flat[idx // s, :, idx % s]


@register_method
class LowConfidenceConsistency(SSLMethod):
    name = "lcc"
    summary = "consistency on the teacher's low-confidence voxels + prototype class separation of decoder features"

    # consistency_weight: 0.1 (the SSL4MIS value) rather than the 1.0 of the 3D mean-teacher recipes: L_lc is averaged
    # over the few low-confidence voxels, so each of them weighs ~1/low_frac more than in mean-teacher's average, and
    # 1.0 held validation Dice under supervised-only (chosen on the validation split; docs/methods.md, "Earlier
    # phantoms").
    def __init__(
        self,
        consistency_weight: float = 0.1,
        confidence: float = 0.9,
        separation_weight: float = 0.1,
        temperature: float = 0.1,
        prototype_momentum: float = 0.99,
        max_feature_voxels: int = 32768,
    ):
        super().__init__(consistency_weight)
        if not 0.0 < confidence <= 1.0:
            raise ValueError(f"confidence (γ) must be in (0, 1], got {confidence}")
        if separation_weight < 0:
            raise ValueError(f"separation_weight (η) must be >= 0, got {separation_weight}")
        if temperature <= 0:
            raise ValueError(f"temperature (τ) must be > 0, got {temperature}")
        if not 0.0 <= prototype_momentum < 1.0:
            raise ValueError(f"prototype_momentum must be in [0, 1), got {prototype_momentum}")
        if max_feature_voxels < 1:
            raise ValueError(f"max_feature_voxels must be >= 1, got {max_feature_voxels}")
        self.confidence, self.separation_weight = float(confidence), float(separation_weight)
        self.temperature, self.prototype_momentum = float(temperature), float(prototype_momentum)
        self.max_feature_voxels = int(max_feature_voxels)
        # (C, F) prototypes and (C,) "seen" flags; sized on first use because F and C come from the network.
        self.register_buffer("prototypes", torch.zeros(0, 0))
        self.register_buffer("prototype_seen", torch.zeros(0))
        self._pending: torch.Tensor | None = None

    def options(self) -> dict:
        return {
            **super().options(),
            "confidence": self.confidence,
            "separation_weight": self.separation_weight,
            "temperature": self.temperature,
            "prototype_momentum": self.prototype_momentum,
            "max_feature_voxels": self.max_feature_voxels,
        }

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The buffers are sized lazily: take the saved size so a checkpoint loads into a fresh module.
        for name in ("prototypes", "prototype_seen"):
            saved = state_dict.get(prefix + name)
            if saved is not None and getattr(self, name).shape != saved.shape:
                setattr(self, name, torch.zeros_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- pieces that can be checked by hand ------------------------------------------------------------------
    def confidence_masks(self, teacher_probs: torch.Tensor, unknown: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M_lc, M_hc), each (B, 1, ...) float: unknown voxels below / at or above the confidence γ."""
        conf = teacher_probs.max(1, keepdim=True).values
        low = (conf < self.confidence).float() * unknown
        return low, unknown - low

    @staticmethod
    def class_means(features: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean L2-normalised feature per class over masked voxels: ((C, F), (C,) count). features (B, F, ...)."""
        idx = (mask.reshape(-1) > 0.5).nonzero().flatten()
        with torch.no_grad():  # the means feed a no-grad prototype update
            f = unit_vectors(_voxel_rows(features, idx))  # (N, F)
        onehot = F.one_hot(target.reshape(-1)[idx].long().clamp(0, num_classes - 1), num_classes).float()  # (N, C)
        counts = onehot.sum(0)
        sums = onehot.T @ f
        return sums / counts.clamp_min(1.0).unsqueeze(1), counts

    def separation_loss(self, features: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, generator=None) -> torch.Tensor:
        """Prototype cross-entropy over the masked voxels (subsampled to max_feature_voxels): features (B, F, ...),
        target (B, 1, ...) long, mask (B, 1, ...). 0 when no voxel is selected or a prototype is still missing."""
        if self.prototypes.numel() == 0 or not bool(self.prototype_seen.all()):
            return features.sum() * 0.0
        t = target.reshape(-1).long()
        idx = (mask.reshape(-1) > 0.5).nonzero().flatten()
        if idx.numel() == 0:
            return features.sum() * 0.0
        if idx.numel() > self.max_feature_voxels:
            keep = torch.randperm(idx.numel(), generator=generator)[: self.max_feature_voxels].to(idx.device)
            idx = idx[keep]
        sim = F.normalize(_voxel_rows(features, idx), dim=1) @ F.normalize(self.prototypes, dim=1).T  # (N, C) cosine
        return F.cross_entropy(sim / self.temperature, t[idx].clamp(0, self.prototypes.shape[0] - 1))

    @torch.no_grad()
    def update_prototypes(self, means: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA update of the prototypes of classes present in the batch (first sighting: take the batch mean)."""
        if self.prototypes.shape != means.shape:
            self.prototypes = torch.zeros_like(means)
            self.prototype_seen = torch.zeros(means.shape[0], device=means.device)
        present = counts > 0
        seen = self.prototype_seen > 0.5
        m = self.prototype_momentum
        fresh = present & ~seen
        again = present & seen
        self.prototypes[fresh] = means[fresh]
        self.prototypes[again] = m * self.prototypes[again] + (1.0 - m) * means[again]
        self.prototype_seen[present] = 1.0

    # -- the step --------------------------------------------------------------------------------------------
    def compute_loss(self, ctx: StepContext) -> MethodOutput:
        out = ctx.student(ctx.image)
        logits, feats = out["logits"], out["features"]
        labeled = ctx.labeled_mask
        unknown = 1.0 - labeled
        sup = supervised_loss(logits, ctx.label, labeled)
        q = teacher_probabilities(ctx.teacher, ctx.image, passes=1, noise=True, generator=ctx.generator)
        low, high = self.confidence_masks(q, unknown)
        lc = masked_mse(logits.softmax(1), q, low)

        means, counts = self.class_means(feats.detach(), ctx.label, labeled, logits.shape[1])
        if self.prototypes.numel() == 0 or not bool(self.prototype_seen.all()):
            self.update_prototypes(means, counts)  # initialise from the first batch, so step 0 already separates
            self._pending = None
        else:
            self._pending = (means, counts)
        target = torch.where(labeled > 0.5, ctx.label, class_index(q))
        cs = self.separation_loss(feats, target, labeled + high, ctx.generator)
        w = self.weight(ctx)
        loss = sup + w * (lc + self.separation_weight * cs)
        n_unknown = unknown.sum().clamp_min(1.0)
        return MethodOutput(
            loss,
            {
                "sup": float(sup.detach()),
                "lc": float(lc.detach()),
                "cs": float(cs.detach()),
                "w": w,
                "low_frac": float(low.sum() / n_unknown),
            },
        )

    def after_step(self, ctx: StepContext) -> None:
        if self._pending is not None:
            self.update_prototypes(*self._pending)
            self._pending = None
