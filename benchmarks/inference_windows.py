"""Inference windows on the validation split: the training patch against `roi="auto"` (and the alternatives weighed).

    python -m benchmarks.inference_windows --data benchmarks/work/la2018-half-z --out benchmarks/work/windows

Trains the default network supervised on 8 labeled cases with the la-quick configuration (seed 0) unless
`--checkpoint` is given, then maps every validation case (never a test case) with each window policy, interleaved per
case so each sees the same load: Dice of the plain and head-MC labels, error-detection AUROC of the entropy and
mutual-information maps, ECE, seconds per map, and the peak memory of one 128x128x96 map per policy. Writes
benchmarks/results/inference-windows-validation.json; the write-up is inference-windows-validation.md and
docs/uncertainty.md ("Windows"). The data folder is what `make bench PROFILE=la-quick` imports from LA2018.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from SSLSegmentLib.data.dataset import DataSet
from SSLSegmentLib.ml.checkpoint import checkpoint_patch_size, model_from_checkpoint
from SSLSegmentLib.ml.inference import DEFAULT_WINDOW_VOXELS, inference_window, predict_volume
from SSLSegmentLib.ml.metrics import dice
from SSLSegmentLib.ml.uncertainty import error_detection
from SSLSegmentLib.ml.uncertainty.calibration import expected_calibration_error

RESULT = Path(__file__).resolve().parent / "results" / "inference-windows-validation.json"

# Peak memory of one map of a 128x128x96 volume, each policy in a fresh process.
MEM = r'''
import resource, sys, numpy as np, torch
torch.set_num_threads(1)
from SSLSegmentLib.ml.networks import build_network
from SSLSegmentLib.ml.inference import predict_volume
net = build_network().eval(); vol = np.random.default_rng(0).standard_normal((96, 128, 128)).astype(np.float32)
def rss(key):
    return [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)][0]
base = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
predict_volume(net, vol, (32, 48, 48), device="cpu", roi=sys.argv[1])
print((rss("VmHWM:") - base) / 1024)
'''


def _policies(patch):
    """name: (volume transform, window for that volume)."""
    def _inside(shape):  # the largest windows inside the image (sizes rounded down to the multiple)
        return tuple(max(p, d // 8 * 8) for p, d in zip(patch, shape))

    def _padded(shape):  # the whole image as one window, sizes rounded up (the image padded by MONAI)
        return tuple(max(p, -(-d // 8) * 8) for p, d in zip(patch, shape))

    def _crop(a):  # centred crop to multiples of 8: where "auto" is one window of the whole volume
        sl = tuple(slice((d - d // 8 * 8) // 2, (d - d // 8 * 8) // 2 + d // 8 * 8) for d in a.shape)
        return a[sl]

    POLICIES = {  # name: (volume transform, window for that volume)
        "patch": (None, lambda shape: "patch"),
        "auto": (None, lambda shape: "auto"),
        "largest-inside": (None, _inside),
        "whole-padded": (None, _padded),
        "cropped8:patch": (_crop, lambda shape: "patch"),
        "cropped8:auto": (_crop, lambda shape: "auto"),
    }
    return POLICIES


def train(data: str, out: Path) -> Path:
    """The model the comparison uses: supervised, 8 labeled, the la-quick configuration, seed 0."""
    from benchmarks.experiment import run_experiment
    from benchmarks.ssl_methods import PROFILES
    from SSLSegmentLib.ml.trainer import TrainConfig

    cfg = TrainConfig(method="supervised", seed=0, **PROFILES["la-quick"].config)
    run_experiment(data, cfg, 8, out, evaluate_split=None)
    return out / "last.pt"


def main(argv=None) -> int:
    from benchmarks.speed import _environment

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="benchmarks/work/la2018-half-z", help="the la-quick data-set folder")
    ap.add_argument("--out", default="benchmarks/work/windows", help="work folder (the trained model)")
    ap.add_argument("--checkpoint", default=None, help="use this checkpoint instead of training one")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ckpt_path = args.checkpoint or train(args.data, Path(args.out) / "run")
    model, ckpt = model_from_checkpoint(ckpt_path, device="cpu")
    patch = checkpoint_patch_size(ckpt)
    ds = DataSet(args.data)
    val_ids = ds.splits["val"]
    samples = ds.training_samples(val_ids, val_ids)
    POLICIES = _policies(patch)
    rows = {k: [] for k in POLICIES}
    store = {k: {"p": [], "y": [], "h": [], "mi": [], "err": []} for k in POLICIES}
    for s in samples:
        for name, (transform, window_of) in POLICIES.items():  # interleaved per case: the same load for each policy
            image = s.image if transform is None else transform(s.image)
            y = ((s.label if transform is None else transform(s.label)) > 0).astype(np.uint8)
            roi = window_of(image.shape)
            used = inference_window(image.shape, patch, 8, DEFAULT_WINDOW_VOXELS["cpu"]) if roi == "auto" else (patch if roi == "patch" else roi)
            t = time.perf_counter(); mc = predict_volume(model, image, patch, passes=8, device="cpu", seed=0, roi=roi)
            t_mc = time.perf_counter() - t
            t = time.perf_counter(); one = predict_volume(model, image, patch, passes=1, device="cpu", roi=roi)
            t_one = time.perf_counter() - t
            err = mc.label != y
            det = error_detection(mc.entropy, err)
            rows[name].append({"case": s.case_id, "shape": list(image.shape), "window": list(used),
                               "dice_plain": dice(one.label, y), "dice_head_mc": dice(mc.label, y),
                               "auroc_entropy": det["auroc"], "auroc_mi": error_detection(mc.mutual_information, err)["auroc"],
                               "top5_recall": det["top5_recall"], "seconds_head_mc": t_mc, "seconds_plain": t_one})
            st = store[name]; st["p"].append(mc.probabilities); st["y"].append(y); st["h"].append(mc.entropy)
            st["mi"].append(mc.mutual_information); st["err"].append(err)
        print(s.case_id, {n: round(r[-1]["dice_head_mc"], 4) for n, r in rows.items()}, flush=True)

    summary = {}
    for name, r in rows.items():
        st = store[name]
        pooled = error_detection(st["h"], st["err"])
        summary[name] = {
            **{k: float(np.mean([x[k] for x in r])) for k in ("dice_plain", "dice_head_mc", "auroc_entropy", "auroc_mi",
                                                               "top5_recall", "seconds_head_mc", "seconds_plain")},
            "pooled_auroc_entropy": pooled["auroc"], "pooled_top5_recall": pooled["top5_recall"],
            "pooled_auroc_mi": error_detection(st["mi"], st["err"])["auroc"],
            "ece_head_mc": expected_calibration_error(st["p"], st["y"]),
        }
    delta = {f"{new}_minus_{ref}": {k: summary[new][k] - summary[ref][k] for k in summary[ref]}
             for new, ref in [("auto", "patch"), ("largest-inside", "patch"), ("whole-padded", "patch"),
                              ("cropped8:auto", "cropped8:patch")]}

    memory = {roi: float(subprocess.run([sys.executable, "-c", MEM, roi], capture_output=True, text=True, check=True).stdout.split()[-1])
              for roi in ("patch", "auto")}

    env = _environment()
    result = {
        "what": "inference windows: the training patch vs roi='auto' (whole volume up to a voxel budget), la-quick validation split only",
        "date": date.today().isoformat(), "environment": env,
        "config": {"data": "LA2018 imported as la-quick (half resolution, z-scored), validation split", "val_cases": val_ids,
                   "model": "supervised, 8 labeled (first 8 of train.list), la-quick config, 700 iterations, seed 0, last.pt",
                   "train_config": ckpt.get("train_config"), "patch": list(patch), "estimator": "head_mc", "passes": 8,
                   "mask_seed": 0, "overlap": 0.25, "torch_threads": 1,
                   "policies": {"patch": "roi='patch' (the training patch)", "auto": "roi='auto' (inference_window)",
                                "largest-inside": "explicit: each size the largest multiple of 8 inside the image",
                                "whole-padded": "explicit: the whole image, sizes rounded up to multiples of 8 (MONAI pads with the image minimum)",
                                "cropped8:*": "the volume and label centre-cropped to multiples of 8 first (auto = one window of the whole volume)"}, "auto_budget_voxels_cpu": DEFAULT_WINDOW_VOXELS["cpu"],
                   "errors": "head-MC label != reference label", "auroc": "SSLSegmentLib.ml.uncertainty.error_detection of the entropy map (per case, mean; and pooled)",
                   "ece": "expected_calibration_error of the head-MC probabilities, 15 bins, pooled voxels"},
        "summary": summary, "differences": delta,
        "peak_rss_mib_128x128x96": memory,
        "cases": rows,
    }
    RESULT.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(json.dumps({"summary": summary, "delta": delta, "memory": memory}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
