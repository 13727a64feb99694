"""The method interface every SSL method implements, and the registry that makes it selectable by name.

A method is a small `nn.Module` (so any state it keeps, such as class prototypes, travels in checkpoints).
The shared trainer owns the models, the EMA teacher, ramp-up, sampling and checkpoints; each step it hands a
`StepContext` to `method.compute_loss` and backpropagates the returned loss.

Batch layout (labeled stream first, then unlabeled; B = labeled + unlabeled):
    image        (B, 1, D, H, W) float
    label        (B, 1, D, H, W) long   (undefined where labeled_mask is 0)
    labeled_mask (B, 1, D, H, W) float  1 = the voxel's label is known (full case: all ones; corrected case: the
                                         reviewed mask; unlabeled case: all zeros)
"""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn


@dataclass
class StepContext:
    student: nn.Module
    teacher: nn.Module
    batch: dict[str, torch.Tensor]
    step: int
    max_steps: int
    rampup: float  # sigmoid ramp-up value r(t) in [0, 1]
    generator: torch.Generator | None = None  # for method-level randomness (noise, mixing), seeded by the trainer

    @property
    def image(self) -> torch.Tensor:
        return self.batch["image"]

    @property
    def label(self) -> torch.Tensor:
        return self.batch["label"]

    @property
    def labeled_mask(self) -> torch.Tensor:
        return self.batch["labeled_mask"]


@dataclass
class MethodOutput:
    loss: torch.Tensor
    terms: dict[str, float] = field(default_factory=dict)


class SSLMethod(nn.Module):
    """Base class. Subclasses set `name`, `summary`, and implement `compute_loss`.

    uses_unlabeled: whether the trainer should sample the unlabeled stream for this method.
    network_options: NetworkConfig fields the method needs (e.g. a level-set head).
    consistency_weight: w in λ(t) = w·r(t), the weight of the unsupervised term at full ramp-up.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    uses_unlabeled: ClassVar[bool] = True
    network_options: ClassVar[dict] = {}

    def __init__(self, consistency_weight: float = 1.0):
        super().__init__()
        if consistency_weight < 0:
            raise ValueError(f"consistency_weight must be >= 0, got {consistency_weight}")
        self.consistency_weight = float(consistency_weight)

    def weight(self, ctx: StepContext) -> float:
        return self.consistency_weight * ctx.rampup

    def compute_loss(self, ctx: StepContext) -> MethodOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def after_step(self, ctx: StepContext) -> None:
        """Hook after the optimiser step and the EMA update (e.g. prototype updates)."""

    def options(self) -> dict:
        """The method's options as plain values, stored with checkpoints and results."""
        return {"consistency_weight": self.consistency_weight}


_REGISTRY: dict[str, type[SSLMethod]] = {}


def register_method(cls: type[SSLMethod]) -> type[SSLMethod]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    # Every module in this package registers itself on import: adding a method is adding a file.
    from SSLSegmentLib.ml import methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("base", "losses"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")


def available_methods() -> dict[str, type[SSLMethod]]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def check_options(name: str, options: dict) -> None:
    """Raise ValueError naming the option when `options` are not the method's: an unknown name, or a value whose
    JSON type differs from the default's (an integer for an integer, a finite number for a float, a boolean for
    a boolean, a string for a string)."""
    cls = available_methods()[name]
    params = {}
    for klass in reversed(cls.__mro__):  # subclasses pass **kwargs on to the base's consistency_weight
        if issubclass(klass, SSLMethod):
            params.update({k: p for k, p in inspect.signature(klass.__init__).parameters.items()
                           if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)})
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"method_options: {name} has no option(s) {unknown}; its options: {sorted(params)}")
    for key, value in options.items():
        default = params[key].default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            ok = True  # no default or None: the method checks it itself
        if not ok:
            raise ValueError(f"method_options: {name}'s {key} must be like its default {default!r}, got {value!r}")


def get_method(name: str, **options) -> SSLMethod:
    methods = available_methods()
    if name not in methods:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(methods)}")
    check_options(name, options)
    return methods[name](**options)


MethodFactory = Callable[..., SSLMethod]
