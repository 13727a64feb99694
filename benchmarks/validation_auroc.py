"""Head-MC error detection of one trained run on its validation cases (the network-choice record,
benchmarks/results/tuning-network-validation.*).

    python -m benchmarks.validation_auroc RUN_DIR VAL_LIST [--data benchmarks/work/la2018-half-z]

RUN_DIR holds a benchmark run (its best.pt under runs/); VAL_LIST names the fold's validation cases, one per line.
Windows are the training patch, given explicitly, so the numbers do not move with the inference window policy.
Writes RUN_DIR/auroc.json: Dice of the head-MC label, pooled error-detection AUROC of the entropy and
mutual-information maps (and of one plain pass's entropy), top-5 % recall, seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from SSLSegmentLib.data.dataset import DataSet
from SSLSegmentLib.data.la import read_list
from SSLSegmentLib.ml.checkpoint import checkpoint_patch_size, load_checkpoint, model_from_checkpoint
from SSLSegmentLib.ml.inference import predict_volume
from SSLSegmentLib.ml.metrics import dice
from SSLSegmentLib.ml.uncertainty import error_detection


def score(run_dir: Path, cases: list[str], data: str, passes: int = 8, overlap: float = 0.25) -> dict:
    ckpt_path = next(run_dir.glob("runs/**/best.pt"))
    ckpt = load_checkpoint(ckpt_path)
    net, _ = model_from_checkpoint(ckpt)
    patch = checkpoint_patch_size(ckpt)
    ds = DataSet(data)
    t0 = time.time()
    mc, plain, errs, errs_plain, dices = [], [], [], [], []
    for case in cases:
        image, label = ds.load_pair(case)
        y = label.array > 0
        p = predict_volume(net, image, patch, passes=passes, overlap=overlap, device="cpu", estimator="head_mc",
                           seed=0, roi=tuple(patch))
        q = predict_volume(net, image, patch, passes=1, overlap=overlap, device="cpu", roi=tuple(patch))
        mc.append(p)
        plain.append(q.entropy)
        errs.append((p.label > 0) != y)
        errs_plain.append((q.label > 0) != y)
        dices.append(dice(p.label > 0, y))
    det = {k: error_detection([p.uncertainty(k) for p in mc], errs) for k in ("entropy", "mutual_information")}
    per_case = [error_detection(p.entropy, e)["auroc"] for p, e in zip(mc, errs)]
    return {"checkpoint": str(ckpt_path), "network": ckpt["network"], "patch": list(patch), "passes": passes,
            "overlap": overlap, "estimator": mc[0].estimator, "windows": list(patch), "cases": cases,
            "dice_head_mc_label": float(np.mean(dices)), "auroc_head_mc_entropy": det["entropy"]["auroc"],
            "auroc_head_mc_mi": det["mutual_information"]["auroc"],
            "top5_recall_head_mc_entropy": det["entropy"]["top5_recall"], "error_rate": det["entropy"]["error_rate"],
            "auroc_plain_entropy": error_detection(plain, errs_plain)["auroc"],
            "auroc_head_mc_entropy_per_case_mean": float(np.nanmean(per_case)), "seconds": time.time() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("val_list")
    ap.add_argument("--data", default="benchmarks/work/la2018-half-z", help="the la-quick data-set folder")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = score(args.run_dir, read_list(args.val_list), args.data)
    (args.run_dir / "auroc.json").write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k not in ("cases", "network")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
