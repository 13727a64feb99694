"""The one training-parameter schema: every parameter of `POST /train` (and of a job) once.

Each `Param` says its name, its type, how it is checked beyond the type, where its default comes from and whether it
maps onto a TrainConfig field of the same name. From PARAMS follow:

- `TrainRequest`, the request model of `POST /train` (pydantic; an unknown key is refused with 422);
- `resolve_train_params`, the checks the server runs before queueing (a bad request is a 4xx, not a failed job)
  and the worker again when the job starts (the registry may have changed in between);
- `build_train_config`, the job's TrainConfig.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import ConfigDict, Field, create_model

from training.datastore import Datastore, InvalidInput, NotFound, validate_version
from training.registry import ModelRegistry


class JobFailed(RuntimeError):
    """A job ended with a reason the user should read."""


# Where a parameter's value comes from when the request leaves it out. The datastore's training defaults
# (settings.train) come first for every parameter; a parameter not set there falls back to its own source.
SETTINGS_TRAIN = "settings.train"
TRAINER = "settings.train, else TrainConfig's default"
PARENT = "settings.train, else the parent version's checkpoint when fine-tuning, else TrainConfig's default"


@dataclass(frozen=True)
class Param:
    """One training parameter.

    type: its JSON type (int, float, bool, str, dict or list[int]). check(name, value, store): raises InvalidInput
    with the reason, after the type check. default: where the value comes from when the request leaves it out;
    fallback(settings): the value when settings.train does not set it either (None: TrainConfig's or the worker's).
    config: whether the value is passed as the TrainConfig field of the same name (else the worker uses it itself;
    the network is the parent's when fine-tuning, so build_train_config sets it).
    """

    name: str
    type: Any
    doc: str
    default: str = SETTINGS_TRAIN
    config: bool = True
    check: Callable[[str, Any, Datastore], None] | None = None
    fallback: Callable[[dict], Any] | None = None


def _between(lo, hi):
    def check(name, v, store):
        if not lo <= v <= hi:
            raise InvalidInput(f"{name} must be between {lo} and {hi}, got {v}")
    return check


def _positive(name, v, store):
    if v <= 0:
        raise InvalidInput(f"{name} must be positive, got {v}")


def _method(name, v, store):
    from SSLSegmentLib.ml.methods import available_methods

    if v not in available_methods():
        raise InvalidInput(f"unknown method {v!r}; available: {', '.join(available_methods())}")


def _init(name, v, store):
    if v in ("current", "scratch"):
        return
    try:
        validate_version(v)
        ModelRegistry(store).model(v)
    except (InvalidInput, NotFound) as exc:
        raise InvalidInput(f"{name} must be 'current', 'scratch' or an existing version: {exc}") from None


def _patch_size(name, v, store):
    if len(v) != 3 or not all(p > 0 for p in v):
        raise InvalidInput(f"{name} must be three positive integers [z, y, x], got {v!r}")


def _network(name, v, store):
    from SSLSegmentLib.ml.networks import NetworkConfig

    try:
        NetworkConfig(**v)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{name}: {exc}") from None


PARAMS: tuple[Param, ...] = (
    Param("method", str, "SSL method (GET /info lists them)", check=_method),
    Param("iterations", int, "training steps", check=_between(1, 1_000_000)),
    Param("lr", float, "learning rate", check=_positive),
    Param("batch_labeled", int, "labeled patches per step"),
    Param("batch_unlabeled", int, "unlabeled patches per step"),
    Param("seed", int, "random seed"),
    Param("val_interval", int, "steps between validations (at most the iterations)"),
    Param("patch_size", list[int], "training patch [z, y, x]", PARENT, check=_patch_size),
    Param("tolerance", float, "promote when the validation Dice drops by at most this",
          "settings.train, else the datastore's tolerance setting", config=False,
          fallback=lambda settings: settings["tolerance"]),
    Param("init", str, "'current', 'scratch' or a model version to fine-tune from", "settings.train, else 'current'",
          config=False, check=_init, fallback=lambda settings: "current"),
    Param("network", dict, "NetworkConfig fields for training from scratch (fine-tuning keeps the parent's)",
          "settings.train, else NetworkConfig's default", config=False, check=_network),
    Param("method_options", dict, "the method's own options", TRAINER),
    Param("nproc", int, "DDP processes (torchrun)", "the worker's --nproc, else settings.train", config=False,
          check=_between(1, 64)),
    Param("device", str, "training device (auto, cpu, cuda, cuda:N)"),
    Param("momentum", float, "SGD momentum", TRAINER),
    Param("weight_decay", float, "SGD weight decay", TRAINER),
    Param("ema_decay", float, "EMA teacher decay", TRAINER),
    Param("augment", bool, "random flips and 90-degree turns of the patches", TRAINER),
    Param("lr_schedule", str, "constant, step or poly", TRAINER),
    Param("rampup_steps", int, "length of the unsupervised weight's ramp", TRAINER),
    Param("pretrain_iterations", int, "first steps trained on labeled-only copy-paste mixes (BCP's stage)", TRAINER),
    Param("eval_model", str, "which weights are validated and exported: student or teacher", TRAINER),
)
PARAM_BY_NAME = {p.name: p for p in PARAMS}

TrainRequest = create_model(
    "TrainRequest",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Training job parameters; all optional (defaults: see training/jobs.py).",
    **{p.name: (p.type | None, Field(None, description=f"{p.doc} (default: {p.default})")) for p in PARAMS},
)


def _check_type(p: Param, v) -> None:
    """JSON types as the request model accepts them; booleans are not numbers here."""
    if p.type is bool:
        ok = isinstance(v, bool)
    elif p.type is int:
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif p.type is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    elif p.type is str or p.type is dict:
        ok = isinstance(v, p.type)
    else:  # list[int]
        ok = isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    if not ok:
        what = {bool: "a boolean", int: "an integer", float: "a finite number", str: "a string",
                dict: "an object"}.get(p.type, "a list of integers")
        raise InvalidInput(f"{p.name} must be {what}, got {v!r}")


def resolve_train_params(store: Datastore, params: dict | None, default_nproc: int | None = None) -> dict:
    """The request's parameters over their defaults, checked against PARAMS; raises InvalidInput."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(PARAM_BY_NAME))
    if unknown:
        raise InvalidInput(f"unknown training parameter(s) {unknown}; known: {sorted(PARAM_BY_NAME)}")
    settings = store.settings
    merged = {**settings["train"], **{k: v for k, v in params.items() if v is not None}}
    if params.get("nproc") is None and default_nproc:
        merged["nproc"] = default_nproc
    for p in PARAMS:
        if merged.get(p.name) is None and p.fallback is not None:
            merged[p.name] = p.fallback(settings)
        v = merged.get(p.name)
        if v is None:
            continue
        _check_type(p, v)
        if p.check is not None:
            p.check(p.name, v, store)
    return merged


def build_train_config(params: dict, init_ckpt: dict | None):
    """The TrainConfig of a job from resolved params: the parent's network (and patch size, unless given) when
    fine-tuning, else the requested network or NetworkConfig's default."""
    from SSLSegmentLib.ml.networks import NetworkConfig
    from SSLSegmentLib.ml.checkpoint import checkpoint_patch_size
    from SSLSegmentLib.ml.trainer import TrainConfig

    cfg = {p.name: params[p.name] for p in PARAMS if p.config and params.get(p.name) is not None}
    if init_ckpt is not None:
        cfg["network"] = init_ckpt["network"]
        cfg.setdefault("patch_size", checkpoint_patch_size(init_ckpt))
    else:
        cfg["network"] = NetworkConfig(**(params.get("network") or {})).to_dict()
    cfg["val_interval"] = min(int(cfg.get("val_interval", TrainConfig.val_interval)),
                              int(cfg.get("iterations", TrainConfig.iterations)))
    try:
        return TrainConfig(**cfg)
    except (TypeError, ValueError) as exc:
        raise JobFailed(f"invalid training configuration: {exc}") from None
