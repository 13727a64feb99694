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
import os
import re
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


def _device(name, v, store):
    """A device this machine has: the server and its workers share the machine (docs/backend.md)."""
    import torch

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    m = re.fullmatch(r"(auto|cpu|cuda)(?::(\d{1,3}))?", v)
    ok = m is not None and (m.group(2) is None or m.group(1) == "cuda")
    if ok and m.group(1) == "cuda":
        ok = n_gpus > 0 and (m.group(2) is None or int(m.group(2)) < n_gpus)
    if not ok:
        raise InvalidInput(f"{name} must be auto, cpu, cuda or cuda:N on this machine ({n_gpus} GPU(s)), got {v!r}")


def _nproc(name, v, store):
    import torch

    most = max(os.cpu_count() or 1, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    _between(1, most)(f"{name} (processes: at most this machine's {most} cores or GPUs)", v, store)


def _init(name, v, store):
    if v in ("current", "scratch"):
        return
    try:
        validate_version(v)
        ModelRegistry(store).model(v)
    except (InvalidInput, NotFound) as exc:
        raise InvalidInput(f"{name} must be 'current', 'scratch' or an existing version: {exc}") from None


def _patch_size(name, v, store):
    if len(v) != 3 or not all(0 < p <= MAX_PATCH_SIDE for p in v):
        raise InvalidInput(f"{name} must be three integers [z, y, x] in 1..{MAX_PATCH_SIDE}, got {v!r}")


def _network(name, v, store):
    """A network this datastore can train: sizes that are positive integers, one input channel (its images have
    one), its class count, and a network the builder makes. Built on the meta device: no memory, so a refusal
    costs nothing, and a network that cannot be built is a 422 now rather than a job that fails later."""
    import torch

    from SSLSegmentLib.ml.networks import NetworkConfig, build_network

    try:
        cfg = NetworkConfig(**v)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{name}: {exc}") from None
    sizes = {"channels": list(cfg.channels), "strides": list(cfg.strides), "features": [cfg.features],
             "num_res_units": [cfg.num_res_units + 1]}
    for key, values in sizes.items():
        if not values or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in values):
            low = 0 if key == "num_res_units" else 1
            raise InvalidInput(f"{name}: {key} must be integers of at least {low}, got {getattr(cfg, key)!r}")
    if cfg.in_channels != 1:
        raise InvalidInput(f"{name}: in_channels must be 1 (the datastore's images have one channel), "
                           f"got {cfg.in_channels!r}")
    classes = int(store.settings["num_classes"])
    if cfg.num_classes != classes:
        raise InvalidInput(f"{name}: num_classes must be the datastore's {classes}, got {cfg.num_classes!r}")
    try:
        with torch.device("meta"):
            build_network(cfg)
    except Exception as exc:  # the builder's own refusal: an unknown norm, a level count it cannot make
        raise InvalidInput(f"{name}: the network cannot be built ({type(exc).__name__}: {str(exc).strip()[:200]})") from None


# Bounds of the API, not of the method: a request beyond them is a typo or an attack, never a training run
# (the activation estimate that bounds the network, patch and batch together is NetworkConfig's).
MAX_PATCH_SIDE = 1024
MAX_BATCH = 64
MAX_TRAIN_MEMORY_BYTES = 256 * 2**30  # above the largest single accelerator; caps channels × patch × batch
MAX_SEED = 2**32 - 1  # numpy's seed range

PARAMS: tuple[Param, ...] = (
    Param("method", str, "SSL method (GET /info lists them)", check=_method),
    Param("iterations", int, "training steps", check=_between(1, 1_000_000)),
    Param("lr", float, "learning rate", check=_positive),
    Param("batch_labeled", int, "labeled patches per step", check=_between(1, MAX_BATCH)),
    Param("batch_unlabeled", int, "unlabeled patches per step", check=_between(0, MAX_BATCH)),
    Param("seed", int, "random seed", check=_between(0, MAX_SEED)),
    Param("val_interval", int, "steps between validations (at most the iterations)", check=_between(1, 1_000_000)),
    Param("patch_size", list[int], "training patch [z, y, x]", PARENT, check=_patch_size),
    Param("tolerance", float, "promote when the validation Dice drops by at most this",
          "settings.train, else the datastore's tolerance setting", config=False, check=_between(-1, 1),
          fallback=lambda settings: settings["tolerance"]),
    Param("init", str, "'current', 'scratch' or a model version to fine-tune from", "settings.train, else 'current'",
          config=False, check=_init, fallback=lambda settings: "current"),
    Param("network", dict, "NetworkConfig fields for training from scratch (fine-tuning keeps the parent's)",
          "settings.train, else NetworkConfig's default", config=False, check=_network),
    Param("method_options", dict, "the method's own options", TRAINER),
    Param("nproc", int, "DDP processes (torchrun)", "the worker's --nproc, else settings.train", config=False,
          check=_nproc),
    Param("device", str, "training device (auto, cpu, cuda, cuda:N)", check=_device),
    Param("momentum", float, "SGD momentum", TRAINER, check=_between(0, 0.999)),
    Param("weight_decay", float, "SGD weight decay", TRAINER, check=_between(0, 1)),
    Param("ema_decay", float, "EMA teacher decay", TRAINER, check=_between(0, 1)),
    Param("augment", bool, "random flips and 90-degree turns of the patches", TRAINER),
    Param("lr_schedule", str, "constant, step or poly", TRAINER),
    Param("rampup_steps", int, "length of the unsupervised weight's ramp", TRAINER, check=_between(0, 1_000_000)),
    Param("pretrain_iterations", int, "first steps trained on labeled-only copy-paste mixes (BCP's stage)", TRAINER,
          check=_between(0, 1_000_000)),
    Param("eval_model", str, "which weights are validated and exported: student or teacher", TRAINER),
    Param("reviewed_patch_share", float, "share of a corrected case's patches centred on its reviewed voxels", TRAINER,
          check=_between(0, 1)),
)
PARAM_BY_NAME = {p.name: p for p in PARAMS}

TrainRequest = create_model(
    "TrainRequest",
    # strict: "10" is not an integer and true is not a number; NaN and infinities are not numbers of a request.
    __config__=ConfigDict(extra="forbid", strict=True, allow_inf_nan=False),
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
    _check_whole_config(store, merged)
    return merged


def _check_whole_config(store: Datastore, params: dict) -> None:
    """What only the whole job can tell: the TrainConfig it would run (the trainer's own rules: schedules, method
    options, patch multiples, pre-training) and a network, patch and batch that fit in memory at all."""
    from SSLSegmentLib.ml.checkpoint import load_checkpoint
    from SSLSegmentLib.ml.networks import NetworkConfig

    init = params.get("init", "current")
    version = ModelRegistry(store).current if init == "current" else (None if init == "scratch" else init)
    parent = load_checkpoint(ModelRegistry(store).checkpoint_path(version)) if version else None
    try:
        config = build_train_config(params, parent)
    except JobFailed as exc:
        raise InvalidInput(str(exc)) from None
    batch = config.batch_labeled + config.batch_unlabeled
    need = NetworkConfig(**config.network).training_bytes_lower_bound(config.patch_size, batch)
    if need > MAX_TRAIN_MEMORY_BYTES:
        raise InvalidInput(f"network, patch_size and batch need at least {need / 2**30:.0f} GiB per training step "
                           f"(limit {MAX_TRAIN_MEMORY_BYTES // 2**30} GiB): use fewer channels or a smaller patch")


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
