"""One experiment = one method trained on a data set's train split with the first N cases labeled, selected on the
validation split, evaluated on the test split. The CLI's `train`, the benchmarks and the demo all go through here,
so the result JSON always carries the config, seed, data snapshot and model checkpoint it came from."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from SSLSegmentLib.data.dataset import DataSet
from SSLSegmentLib.ml.evaluation import EVAL_OVERLAP, evaluate_model
from SSLSegmentLib.ml.inference import Predictor
from SSLSegmentLib.ml.trainer import TrainConfig, Trainer


def run_experiment(
    data_dir: str | Path,
    config: TrainConfig,
    n_labeled: int | None,
    out_dir: str | Path,
    evaluate_split: str | None = "test",
    progress_bar: bool = False,
    train_ids: list[str] | None = None,
    val_ids: list[str] | None = None,
    test_ids: list[str] | None = None,
    evaluate_last: bool = False,
) -> dict:
    """Train and evaluate. n_labeled None = every training case labeled (full supervision)."""
    ds = DataSet(data_dir)
    train_ids = list(train_ids or ds.splits["train"])
    val_ids = list(val_ids if val_ids is not None else ds.splits["val"])
    if not train_ids:
        raise ValueError(f"{data_dir}: the train split is empty")
    n = len(train_ids) if n_labeled is None else int(n_labeled)
    if not 1 <= n <= len(train_ids):
        raise ValueError(f"--labeled must be between 1 and {len(train_ids)} (the training cases), got {n}")
    labeled = train_ids[:n]
    samples = ds.training_samples(train_ids, labeled)
    val = ds.training_samples(val_ids, val_ids)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    snapshot = {"dataset": str(Path(data_dir).resolve()), "train": train_ids, "labeled": labeled, "val": val_ids}
    trainer = Trainer(config, samples, val, out_dir=out_dir, data_snapshot=snapshot)
    fit = trainer.fit(progress_bar=progress_bar)
    result = {
        "method": config.method,
        "n_labeled": n,
        "n_train": len(train_ids),
        "config": config.to_dict(),
        "method_options": trainer.method.options(),
        "seed": config.seed,
        "data": snapshot,
        "train": {k: v for k, v in fit.items() if k != "history"},
        "history": fit["history"],
        "checkpoint": str(out_dir / "best.pt"),
        "environment": environment(),
    }
    if evaluate_split:
        ids = list(test_ids if test_ids is not None else ds.splits[evaluate_split])
        t0 = time.time()
        checkpoints = {"test": "best.pt", **({"test_last": "last.pt"} if evaluate_last else {})}
        for key, name in checkpoints.items():
            predictor = Predictor.from_checkpoint(out_dir / name, device=trainer.device, overlap=EVAL_OVERLAP)
            result[key] = evaluate_model(predictor, ds, ids)
        result["test"]["split"] = evaluate_split if test_ids is None else "given"
        result["test"]["seconds"] = time.time() - t0
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def environment() -> dict:
    import monai
    import numpy

    dev = "cpu"
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": dev,
        "date": time.strftime("%Y-%m-%d"),
    }
