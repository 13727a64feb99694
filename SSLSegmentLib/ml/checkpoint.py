"""The checkpoint file: what a training run leaves behind and every reader loads.

A checkpoint is a dict of tensors and plain containers (format `CHECKPOINT_FORMAT`): the exported weights ("model"),
the student's, the teacher's and the method's state, the network config ("network"), the TrainConfig as a dict
("train_config"), the data snapshot, the metrics and the training history. The trainer writes it
(`Trainer.checkpoint`); the worker, the server, the inference `Predictor` and the benchmarks read it through the
functions below, so the format has one owner. This module imports no trainer and no inference, so both can use it.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from SSLSegmentLib.data.imageio import atomic_write_bytes
from SSLSegmentLib.ml.networks import NetworkConfig, SegNet, build_network

CHECKPOINT_FORMAT = "sslsegment-checkpoint/1"

__all__ = ["CHECKPOINT_FORMAT", "checkpoint_patch_size", "load_checkpoint", "model_from_checkpoint", "save_checkpoint"]


def save_checkpoint(ckpt: dict, path: str | Path, overwrite: bool = True) -> Path:
    """Serialise to memory, then write atomically (temp file, fsync, rename)."""
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return atomic_write_bytes(path, buf.getvalue(), overwrite=overwrite)


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> dict:
    """Load with `weights_only=True`: tensors and plain containers only, never arbitrary pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable SSLSegment checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an SSLSegment checkpoint (format {ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt)})")
    return _with_legacy_network(ckpt)


def _with_legacy_network(ckpt: dict) -> dict:
    """Network fields added after a checkpoint was written get the value the network then had: `top_res_unit` was
    always on before the option existed, and its weights are in the state dict. Every reader goes through here
    (load_checkpoint, model_from_checkpoint), so fine-tuning and inference rebuild the trained network."""
    net = ckpt.get("network")
    if isinstance(net, dict) and "top_res_unit" not in net:
        ckpt["network"] = {**net, "top_res_unit": True}
    return ckpt


def checkpoint_patch_size(ckpt: dict) -> tuple[int, int, int]:
    """The sliding-window size (z, y, x) a checkpoint was trained with: `train_config["patch_size"]`.

    Every checkpoint the trainer writes carries it. There is no fallback: inferring with another window than the
    one a model was trained on is a silent quality loss, so a checkpoint without it is refused."""
    patch = (ckpt.get("train_config") or {}).get("patch_size") if isinstance(ckpt, dict) else None
    if patch is None:
        raise ValueError("the checkpoint has no train_config.patch_size (the window it was trained with)")
    roi = tuple(int(p) for p in patch)
    if len(roi) != 3 or min(roi) < 1:
        raise ValueError(f"the checkpoint's patch_size must be three positive sizes (z, y, x), got {patch}")
    return roi


def model_from_checkpoint(path_or_ckpt, device: str | torch.device = "cpu") -> tuple[SegNet, dict]:
    """The exported network of a checkpoint (a path, or a dict already loaded), in eval mode on `device`."""
    ckpt = load_checkpoint(path_or_ckpt) if not isinstance(path_or_ckpt, dict) else _with_legacy_network(path_or_ckpt)
    net = build_network(NetworkConfig(**ckpt["network"]))
    net.load_state_dict(ckpt["model"])
    net.to(device).eval()
    return net, ckpt
