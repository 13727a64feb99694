"""One network shape for every method: a MONAI trunk emitting F feature channels, then small heads.

    image (B, 1, D, H, W) ─ trunk (UNet or VNet) ─ features (B, F, D, H, W)
                                                   ├─ seg head:      Dropout3d(p) → 1×1 conv → logits (B, C, D, H, W)
                                                   └─ level-set head (optional): 1×1 conv → tanh → φ (B, C-1, D, H, W)

Dropout confined to the seg head ("head" placement) lets uncertainty run the deterministic trunk once and only the
head T times. "trunk" placement uses MONAI's own per-block dropout instead (the VNet paper protocol); "both" does both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

DROPOUT_PLACEMENTS = ("head", "trunk", "both", "none")


@dataclass
class NetworkConfig:
    """What network to build.

    arch: "unet" (CPU default, MONAI UNet) or "vnet" (paper protocol, MONAI VNet; sizes must be multiples of 16).
    channels/strides: UNet levels. features: F, channels out of the trunk. num_classes: C (softmax, background incl.).
    dropout: probability; dropout_placement: one of head / trunk / both / none.
    levelset_head: add the tanh level-set head (UG-MCL).
    top_res_unit: keep the residual unit MONAI's UNet runs after its last up-sampling, a 3×3×3 convolution F → F at
        full resolution. False (default) ends the trunk at the last up-sampling's convolution + norm + PReLU: that
        one full-resolution convolution dominated the step cost beyond the bare UNet, and the trunk's output is
        then already activated, so SegNet adds no feature activation of its own. Only a UNet with residual units
        has the unit (`drops_top_unit`); VNet and a UNet without residual units ignore the setting. Checkpoints
        written before the option existed carry no field and load with the unit (ml/checkpoint.py).
    """

    arch: str = "unet"
    in_channels: int = 1
    num_classes: int = 2
    features: int = 16
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    norm: str = "batch"
    dropout: float = 0.5
    dropout_placement: str = "head"
    levelset_head: bool = False
    top_res_unit: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ("unet", "vnet"):
            raise ValueError(f"arch must be 'unet' or 'vnet', got {self.arch!r}")
        if self.dropout_placement not in DROPOUT_PLACEMENTS:
            raise ValueError(f"dropout_placement must be one of {DROPOUT_PLACEMENTS}, got {self.dropout_placement!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes < 2:
            raise ValueError("num_classes counts the background too; it must be at least 2")
        if not isinstance(self.top_res_unit, bool):
            raise ValueError(f"top_res_unit must be a bool, got {self.top_res_unit!r}")
        self.channels = tuple(self.channels)
        self.strides = tuple(self.strides)
        if self.arch == "unet" and len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"UNet needs len(strides) == len(channels) - 1, got {self.strides} for {self.channels}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"], d["strides"] = list(self.channels), list(self.strides)
        return d

    @property
    def drops_top_unit(self) -> bool:
        """Whether the trunk ends without MONAI's top residual unit. Without residual units MONAI's top up-sampling
        is a bare convolution and VNet has no such unit: nothing to drop."""
        return not self.top_res_unit and self.arch == "unet" and self.num_res_units >= 1

    def training_bytes_lower_bound(self, patch_size, batch: int) -> int:
        """A lower bound on the memory of one training step with `batch` patches of `patch_size` (z, y, x), in bytes:
        the float32 weights with their gradients, and per level and patch the convolution, norm and activation outputs
        kept for the backward pass, once on the way down and once up. The real step needs more (residual units,
        skip concatenations, optimiser state, the teacher); the bound only refuses what cannot run anywhere."""
        voxels = 1
        for p in patch_size:
            voxels *= int(p)
        if self.arch == "vnet":
            channels, strides = tuple(16 * 2**i for i in range(5)), (2, 2, 2, 2)
        else:
            channels, strides = self.channels, self.strides
        weights = sum(a * b * 27 for a, b in zip((self.in_channels,) + tuple(channels), channels))
        activations, scale = 0, 1
        for i, c in enumerate(channels):
            activations += c * (voxels // scale)
            if i < len(strides):
                scale *= strides[i] ** 3
        return 4 * (2 * weights + 3 * 2 * int(batch) * activations)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes the trunk accepts must be multiples of this."""
        if self.arch == "vnet":
            return 16
        m = 1
        for s in self.strides:
            m *= s
        return m


class _PReLUFunction(torch.autograd.Function):
    """PReLU y = max(0, x) + a·min(0, x) with one slope a, its backward in two fused passes: dx from leaky_relu's
    backward kernel, da as one dot product. On a CPU torch's own PReLU backward takes ~15x as long at a full-resolution
    feature map (benchmarks/results/training-speed.md), the largest single cost of the step beyond the bare UNet."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, a)
        return torch.nn.functional.prelu(x, a)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, a = ctx.saved_tensors
        g = g.contiguous()
        gx = torch.ops.aten.leaky_relu_backward(g, x, float(a), False) if ctx.needs_input_grad[0] else None
        ga = None
        if ctx.needs_input_grad[1]:
            neg = x.clamp(max=0).to(g.dtype).reshape(-1)
            ga = torch.dot(g.reshape(-1), neg).reshape(1).to(a.dtype)
        return gx, ga


class FastPReLU(nn.PReLU):
    """`nn.PReLU` (same parameter, same state-dict key) whose backward is cheap on a CPU; single-slope only. Elsewhere
    (a GPU, or several slopes) it is nn.PReLU: reading the slope as a float would sync a GPU once per layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_parameters == 1 and x.device.type == "cpu" and torch.is_grad_enabled():
            return _PReLUFunction.apply(x, self.weight)
        return super().forward(x)

    @classmethod
    def replace_in(cls, module: nn.Module) -> int:
        """Swap every single-slope nn.PReLU under `module` for a FastPReLU holding the same parameter; returns how
        many were swapped."""
        n = 0
        for parent in module.modules():
            for child in parent.children():
                if type(child) is nn.PReLU and child.num_parameters == 1:
                    child.__class__ = cls  # same attributes, same parameter: only forward differs
                    n += 1
        return n


class SegNet(nn.Module):
    """Trunk + heads. `forward` returns a dict: logits (B, C, ...), features (B, F, ...), and levelset if enabled."""

    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config = config
        trunk_dropout = config.dropout if config.dropout_placement in ("trunk", "both") else 0.0
        head_dropout = config.dropout if config.dropout_placement in ("head", "both") else 0.0
        if config.arch == "unet":
            from monai.networks.nets import UNet

            self.trunk = UNet(
                spatial_dims=3,
                in_channels=config.in_channels,
                out_channels=config.features,
                channels=config.channels,
                strides=config.strides,
                num_res_units=config.num_res_units,
                norm=config.norm,
                dropout=trunk_dropout,
            )
            if config.drops_top_unit:
                # model = Sequential(down, SkipConnection(...), up); up = Sequential(transposed conv + ADN, unit).
                up = self.trunk.model[2]
                if not (isinstance(up, nn.Sequential) and len(up) == 2):
                    raise RuntimeError("unexpected MONAI UNet layout: cannot find the top residual unit")
                self.trunk.model[2] = up[0]
        else:
            from monai.networks.nets import VNet

            self.trunk = VNet(
                spatial_dims=3,
                in_channels=config.in_channels,
                out_channels=config.features,
                dropout_prob=trunk_dropout or None,
                dropout_prob_down=trunk_dropout or None,
                dropout_prob_up=(trunk_dropout or None, trunk_dropout),
            )
        # Features go through a non-linearity so the head is more than a linear read-out of the trunk's last conv.
        # Without the top unit the trunk ends in norm + PReLU already.
        self.feature_act = nn.Identity() if config.drops_top_unit else nn.PReLU(config.features)
        self.head_dropout = nn.Dropout3d(head_dropout) if head_dropout > 0 else nn.Identity()
        self.seg_head = nn.Conv3d(config.features, config.num_classes, kernel_size=1)
        self.levelset = nn.Conv3d(config.features, config.num_classes - 1, kernel_size=1) if config.levelset_head else None
        FastPReLU.replace_in(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic trunk (B, in, D, H, W) → (B, F, D, H, W) when dropout is head-only."""
        return self.feature_act(self.trunk(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Segmentation head (stochastic in train mode when dropout is in the head): (B, F, ...) → logits (B, C, ...)."""
        return self.seg_head(self.head_dropout(features))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        out = {"logits": self.head(f), "features": f}
        if self.levelset is not None:
            out["levelset"] = torch.tanh(self.levelset(f))
        return out

    @property
    def head_only_dropout(self) -> bool:
        return self.config.dropout_placement == "head" and self.config.dropout > 0


class _InplacePReLU(nn.Module):
    """PReLU with one slope a, applied in place: max(0, x) + a·min(0, x) is leaky_relu(x, a). Eval only, and only
    where its input is a block's own fresh output (see `inference_copy`)."""

    def __init__(self, slope: float):
        super().__init__()
        self.slope = float(slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.leaky_relu_(x, self.slope)


def inference_copy(net: nn.Module, channels_last: bool = False) -> nn.Module:
    """An eval-only copy of `net` that computes the same function with less memory traffic; `net` is left as it is.

    In every MONAI `Convolution` block whose norm comes first (ordering "N…"), an eval BatchNorm is folded into the
    convolution (or transposed convolution) before it, and a one-slope PReLU runs in place on the block's output; at
    full resolution these two layers cost as much as a convolution. channels_last: weights in channels_last_3d (give
    the input in that format too; on a CPU the full-resolution transposed convolution is several times faster, see
    benchmarks/results/training-speed.md). The copy is made outside inference mode, so it can be called from inside
    it; it is for inference only (its norms no longer exist to train).
    """
    import copy

    from monai.networks.blocks import Convolution
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    with torch.inference_mode(False), torch.no_grad():
        out = copy.deepcopy(net).eval()
        for block in out.modules():
            adn = getattr(block, "adn", None)
            if not isinstance(block, Convolution) or adn is None:
                continue
            order = list(adn._modules)
            bn = adn._modules.get("N")
            if order[:1] == ["N"] and isinstance(bn, nn.BatchNorm3d) and bn.track_running_stats:
                conv = block.conv
                block.conv = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose3d))
                adn.N = nn.Identity()
            act = adn._modules.get("A")
            if isinstance(act, nn.PReLU) and act.num_parameters == 1:
                adn.A = _InplacePReLU(float(act.weight))
        if channels_last:
            out = out.to(memory_format=torch.channels_last_3d)
        for p in out.parameters():
            p.requires_grad_(False)
    return out


def build_network(config: NetworkConfig | dict | None = None, **overrides) -> SegNet:
    if config is None:
        config = NetworkConfig(**overrides)
    elif isinstance(config, dict):
        config = NetworkConfig(**{**config, **overrides})
    elif overrides:
        config = NetworkConfig(**{**config.to_dict(), **overrides})
    return SegNet(config)


__all__ = ["NetworkConfig", "SegNet", "FastPReLU", "build_network", "inference_copy", "DROPOUT_PLACEMENTS"]
