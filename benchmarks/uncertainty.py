"""`make bench-uncertainty`: what each uncertainty estimator costs and how well its map finds the errors.

Speed: one 128×128×96 phantom volume (make_phantom, PhantomConfig(shape=(96, 128, 128))), the default network
(NetworkConfig()), sliding windows of the default training patch, T = 8. For each estimator and pass arrangement:
wall time (best of the repeats after a warm-up window; the machine may be shared, and the best run is the one least
disturbed), process CPU time, and peak memory: on a CPU the growth of the peak resident set (getrusage maxrss) in a
fresh subprocess per measurement, on a GPU torch.cuda.max_memory_allocated above what was allocated before.

Error detection: the default network trained briefly with the shared Trainer on a small phantom data set, three model
versions in a row (each retrain starts from the previous, as the product's model registry does). Single-model
estimators use the newest version; the ensemble uses all three. On the test split: Dice, error-detection AUROC of
the entropy map (and of the mutual information), the share of wrong voxels among the 5% most uncertain, and ECE
before/after a temperature fitted on the validation split.

    python -m benchmarks.uncertainty                      # CPU, writes benchmarks/results/uncertainty.{json,md}
    python -m benchmarks.uncertainty --device cuda --parts speed --json-out $OUT/uncertainty_gpu.json
    python -m benchmarks.uncertainty --merge-gpu uncertainty_gpu.json   # adds the GPU column to the table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VOLUME_SHAPE = (96, 128, 128)
DATA_SHAPE = (40, 64, 64)
PASSES = 8



def _case(name, estimator, pass_batch=1, sw="auto", amp=None, window="patch", repeats=0, threads=None,
          channels_last=None):
    """One speed row. window: "patch" = windows of the training patch, "volume" = the whole volume as one window (what
    the product's default, roi="auto", takes for this volume). sw "auto" and amp None = the product's defaults
    (windows per batch: 1 on a CPU, 4 on CUDA; float32). repeats: timed runs on a CPU after the
    first (the first run is timed too; for the long rows it is the only one). channels_last None = the device's
    default layout of the inference copy (channels_last_3d on a CPU)."""
    return {"name": name, "estimator": estimator, "pass_batch": pass_batch, "sw": sw, "amp": amp, "window": window,
            "repeats": repeats, "threads": threads, "channels_last": channels_last}


SPEED_CASES = [
    _case("plain", "plain", repeats=3),
    _case("head_mc", "head_mc", "auto", repeats=3),
    _case("mc_dropout_sequential", "mc_dropout", 1),
    _case("mc_dropout_batched", "mc_dropout", None),
    _case("flips_sequential", "flips", 1),
    _case("ensemble_3", "ensemble"),
    _case("plain_contiguous", "plain", channels_last=False, repeats=1),
    _case("head_mc_contiguous", "head_mc", "auto", channels_last=False, repeats=1),
    _case("plain_whole_volume", "plain", window="volume", repeats=3),
    _case("head_mc_whole_volume", "head_mc", "auto", window="volume", repeats=3),
    _case("plain_whole_volume_contiguous", "plain", window="volume", channels_last=False, repeats=1),
    _case("head_mc_whole_volume_contiguous", "head_mc", "auto", window="volume", channels_last=False, repeats=1),
    _case("mc_dropout_sequential_whole_volume", "mc_dropout", 1, window="volume"),
    _case("mc_dropout_batched_whole_volume", "mc_dropout", None, window="volume"),
]
CPU_ONLY_CASES = [  # what a second thread buys on this (possibly shared) machine
    _case("plain_2_threads", "plain", threads=2, repeats=1),
    _case("head_mc_2_threads", "head_mc", "auto", threads=2, repeats=1),
]
GPU_EXTRA_CASES = [
    _case("flips_batched", "flips", None),
    _case("plain_1_window", "plain", sw=1),
    _case("head_mc_1_window", "head_mc", "auto", sw=1),
    _case("plain_bf16", "plain", amp=True),
    _case("head_mc_bf16", "head_mc", "auto", amp=True),
]
QUALITY_ESTIMATORS = ["plain", "mc_dropout", "head_mc", "flips", "ensemble"]


def environment(device: str) -> dict:
    import monai
    import torch

    env = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    try:
        env["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- models ----------------------------------------------------------------------------------------------------------
def _network_config():
    from SSLSegmentLib.ml.networks import NetworkConfig

    return NetworkConfig()


def _patch() -> tuple[int, int, int]:
    from SSLSegmentLib.ml.trainer import TrainConfig

    return tuple(TrainConfig().patch_size)


def _load_models(paths: list[str], device: str):
    import torch

    from SSLSegmentLib.ml.networks import build_network

    models = []
    for i, p in enumerate(paths):
        torch.manual_seed(i)
        net = build_network(_network_config())
        if p:
            net.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
        models.append(net.to(device).eval())
    return models


def train_versions(work: Path, iterations: int, more: int, threads: int, log) -> tuple[list[Path], dict, Path]:
    """Write the phantom data set and train three model versions; returns their weight files, a summary, the data."""
    import torch

    from SSLSegmentLib.data.dataset import DataSet
    from SSLSegmentLib.data.phantoms import PhantomConfig, write_phantom_dataset
    from SSLSegmentLib.ml.trainer import TrainConfig, Trainer

    data = work / "data"
    if not (data / "dataset.json").is_file():
        log(f"writing phantom data set {DATA_SHAPE} to {data}")
        write_phantom_dataset(data, n_train=16, n_val=4, n_test=6, config=PhantomConfig(shape=DATA_SHAPE), seed=7)
    ds = DataSet(data)
    n_labeled = 8
    train_ids = ds.splits["train"]
    samples = ds.training_samples(train_ids, train_ids[:n_labeled])
    val = ds.training_samples(ds.splits["val"], ds.splits["val"])
    models_dir = work / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    paths, summary, init = [], {"versions": []}, None
    for version, (its, seed) in enumerate([(iterations, 0), (more, 1), (more, 2)], start=1):
        cfg = TrainConfig(method="supervised", network=_network_config().to_dict(), iterations=its, seed=seed,
                          batch_labeled=2, batch_unlabeled=0, lr=0.02,
                          val_interval=max(its // 2, 1), device="cpu")
        out = work / "runs" / f"v{version}"
        t0 = time.time()
        trainer = Trainer(cfg, samples, val, out_dir=out, init_checkpoint=init,
                          data_snapshot={"train": train_ids, "labeled": train_ids[:n_labeled]})
        fit = trainer.fit()
        init = out / "best.pt"
        from SSLSegmentLib.ml.checkpoint import load_checkpoint

        state = load_checkpoint(init)["model"]
        path = models_dir / f"v{version}.pt"
        torch.save(state, path)
        paths.append(path)
        row = {"version": version, "iterations": its, "seed": seed, "best_val_dice": round(fit["best_val_dice"], 4),
               "seconds": round(time.time() - t0, 1)}
        summary["versions"].append(row)
        log(f"model v{version}: {row}")
    summary.update({"method": "supervised", "labeled": n_labeled, "train_cases": len(train_ids), "data_shape": DATA_SHAPE,
                    "train_patch": list(_patch()), "threads": threads})
    return paths, summary, data


# -- speed -----------------------------------------------------------------------------------------------------------
def _kwargs(case: dict, device: str) -> dict:
    kw = {"passes": 1 if case["estimator"] == "plain" else PASSES, "estimator": case["estimator"],
          "pass_batch": case["pass_batch"], "sw_batch_size": case["sw"], "device": device,
          # The window given is the one that runs (predict_volume's default, roi="auto", would take this whole volume).
          "roi": "patch"}
    if case["amp"] is not None:
        kw["amp"] = case["amp"]
    if case.get("channels_last") is not None:
        kw["channels_last"] = case["channels_last"]
    return kw


def _window(case: dict, volume_shape) -> tuple[int, int, int]:
    return tuple(volume_shape) if case["window"] == "volume" else _patch()


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_child(spec: dict) -> dict:
    """One speed row in this fresh process. Memory: peak resident set during the first run above the resident set
    after loading the model and the volume (VmHWM after a reset; getrusage maxrss where the reset is not allowed).
    Time: every run, the first included (for the long rows it is the only one)."""
    import gc
    import resource

    import torch

    from SSLSegmentLib.ml.inference import predict_volume

    torch.set_num_threads(spec["case"].get("threads") or spec["threads"])
    volume = np.load(spec["volume"])
    models = _load_models(spec["models"], "cpu")
    case = spec["case"]
    kw = _kwargs(case, "cpu")
    model = models if case["estimator"] == "ensemble" else models[-1]
    window = _window(case, volume.shape)
    gc.collect()
    precise = _reset_peak_rss()
    base_kb = _proc_status_kb("VmRSS") if precise else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = [], []
    for i in range(1 + case["repeats"]):
        t0, c0 = time.perf_counter(), time.process_time()
        pred = predict_volume(model, volume, window, **kw)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if i == 0:
            peak_kb = _proc_status_kb("VmHWM") if precise else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"wall_s": wall, "cpu_s": cpu, "peak_mb": (peak_kb - base_kb) / 1024.0, "estimator": pred.estimator,
            "passes": pred.passes, "window": list(window), "memory_method": "VmHWM" if precise else "ru_maxrss"}


def speed_cpu(volume_path: Path, model_paths: list[str], threads: int, repeats_scale: float, log) -> dict:
    out: dict[str, dict] = {}
    for case in SPEED_CASES + CPU_ONLY_CASES:
        spec = {"case": {**case, "repeats": max(0, round(case["repeats"] * repeats_scale))}, "volume": str(volume_path),
                "models": model_paths, "threads": threads}
        proc = subprocess.run([sys.executable, "-m", "benchmarks.uncertainty", "--measure", json.dumps(spec)],
                              cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"measurement {case['name']} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        out[case["name"]] = res
        log(f"  {case['name']:36s} wall {min(res['wall_s']):7.2f} s  cpu {min(res['cpu_s']):7.2f} s  "
            f"peak +{res['peak_mb']:.0f} MB  ({len(res['wall_s'])} runs)")
    return _summarise_speed(out)


def speed_in_process(volume: np.ndarray, model_paths: list[str], device: str, repeats: int, log) -> dict:
    """Every row in this process (a GPU run): warm-up run, then `repeats` timed runs; peak = max_memory_allocated
    above what was allocated before the runs (CUDA only)."""
    import torch

    from SSLSegmentLib.ml.inference import predict_volume

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    models = _load_models(model_paths, device)
    out, errors = {}, {}
    for case in SPEED_CASES + GPU_EXTRA_CASES:
        kw = _kwargs(case, device)
        model = models if case["estimator"] == "ensemble" else models[-1]
        window = _window(case, volume.shape)
        try:
            predict_volume(model, volume, window, **kw)  # warm-up: kernels, allocator, autotuning
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            wall, cpu = [], []
            for _ in range(repeats):
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                pred = predict_volume(model, volume, window, **kw)
                sync()
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        except Exception as exc:  # one failing row must not cost the others (device time is scarce)
            errors[case["name"]] = f"{type(exc).__name__}: {exc}"[:500]
            log(f"  {case['name']:36s} FAILED {errors[case['name']]}")
            continue
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
        out[case["name"]] = {"wall_s": wall, "cpu_s": cpu, "peak_mb": peak, "estimator": pred.estimator,
                             "passes": pred.passes, "window": list(window)}
        log(f"  {case['name']:36s} wall {min(wall):7.3f} s  peak +{peak:.0f} MB")
    summary = _summarise_speed(out)
    summary["errors"] = errors
    try:
        summary["exactness"] = {
            "bf16_autocast": _exactness_check(models[-1], volume, _patch(), device, amp=True),
            "float32": _exactness_check(models[-1], volume, _patch(), device, amp=False),
        }
    except Exception as exc:
        summary["exactness"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return summary


def _exactness_check(model, volume, patch, device, amp: bool) -> dict:
    """Largest difference between head MC and full MC maps on the benchmark volume (same seed) on `device`."""
    from SSLSegmentLib.ml.inference import predict_volume

    head = predict_volume(model, volume, patch, passes=PASSES, estimator="head_mc", device=device, amp=amp)
    full = predict_volume(model, volume, patch, passes=PASSES, estimator="mc_dropout", pass_batch=1, device=device,
                          amp=amp)
    return {k: float(np.abs(getattr(head, k) - getattr(full, k)).max())
            for k in ("probabilities", "entropy", "mutual_information", "variance")}


def _summarise_speed(raw: dict) -> dict:
    nan = float("nan")
    plain = min(raw["plain"]["wall_s"]) if "plain" in raw else nan
    plain_cpu = min(raw["plain"]["cpu_s"]) if "plain" in raw else nan
    rows = {}
    whole = min(raw["plain_whole_volume"]["wall_s"]) if "plain_whole_volume" in raw else None
    whole_cpu = min(raw["plain_whole_volume"]["cpu_s"]) if "plain_whole_volume" in raw else None
    for name, r in raw.items():
        best = min(r["wall_s"])
        in_whole = "_whole_volume" in name and whole
        ref = whole if in_whole else plain
        ref_cpu = whole_cpu if in_whole else plain_cpu
        rows[name] = {
            "estimator": r["estimator"],
            "passes": r["passes"],
            "wall_s_best": round(best, 4),
            "wall_s_median": round(float(np.median(r["wall_s"])), 4),
            "cpu_s_best": round(min(r["cpu_s"]), 3),
            "runs": len(r["wall_s"]),
            "window": r.get("window"),
            "x_plain": round(best / ref, 3),
            "x_plain_cpu_time": round(min(r["cpu_s"]) / ref_cpu, 3),
            "peak_mb": round(r["peak_mb"], 1),
        }
    out = {"rows": rows, "head_mc_over_plain": rows["head_mc"]["x_plain"] if "head_mc" in rows else nan}
    if "head_mc_whole_volume" in rows:
        out["head_mc_over_plain_whole_volume"] = rows["head_mc_whole_volume"]["x_plain"]
    return out


# -- error detection -------------------------------------------------------------------------------------------------
def quality(data: Path, model_paths: list[str], log) -> dict:
    from SSLSegmentLib.data.dataset import DataSet
    from SSLSegmentLib.ml.inference import UNCERTAINTY_KINDS, predict_volume
    from SSLSegmentLib.ml.metrics import dice as dice_of
    from SSLSegmentLib.ml.uncertainty import (
        apply_temperature,
        calibration_from_predictions,
        error_detection,
        expected_calibration_error,
    )

    ds = DataSet(data)
    models = _load_models(model_paths, "cpu")
    patch = _patch()
    val = [ds.load_pair(c) for c in ds.splits["val"]]
    test = [ds.load_pair(c) for c in ds.splits["test"]]
    out = {}
    for name in QUALITY_ESTIMATORS:
        model = models if name == "ensemble" else models[-1]
        kw = {"passes": 1 if name == "plain" else PASSES, "estimator": name, "device": "cpu"}
        t0 = time.time()
        vp = [predict_volume(model, img, patch, **kw) for img, _ in val]
        cal = calibration_from_predictions([p.probabilities for p in vp], [lab.array for _, lab in val],
                                           estimator=name, passes=kw["passes"])
        preds = [predict_volume(model, img, patch, **kw) for img, _ in test]
        seconds = time.time() - t0
        labels = [lab.array for _, lab in test]
        errors = [p.label != y for p, y in zip(preds, labels)]
        det = {kind: error_detection([p.uncertainty(kind) for p in preds], errors) for kind in UNCERTAINTY_KINDS}
        ent, mi = det["entropy"], det["mutual_information"]
        dice = [dice_of(p.label > 0, y > 0) for p, y in zip(preds, labels)]
        probs = [p.probabilities for p in preds]
        out[name] = {
            "passes": preds[0].passes,
            "dice": round(float(np.mean(dice)), 4),
            "error_rate": round(ent["error_rate"], 5),
            **{f"auroc_{kind}": round(d["auroc"], 4) for kind, d in det.items()},
            "top5_recall_entropy": round(ent["top5_recall"], 4),
            "top5_precision_entropy": round(ent["top5_precision"], 4),
            "top5_recall_mutual_information": round(mi["top5_recall"], 4),
            "temperature": round(cal.temperature, 4),
            "val_ece_before": round(cal.ece_before, 5),
            "val_ece_after": round(cal.ece_after, 5),
            "test_ece_before": round(expected_calibration_error(probs, labels), 5),
            "test_ece_after": round(expected_calibration_error([apply_temperature(p, cal.temperature) for p in probs],
                                                              labels), 5),
            "seconds": round(seconds, 1),
        }
        log(f"  {name:12s} {out[name]}")
    spread = head_mc_seed_spread(models[-1], test, patch, log)
    return {"estimators": out, "head_mc_seeds": spread, "test_cases": len(test), "val_cases": len(val),
            "test_voxels": int(sum(y.size for y in labels))}


def head_mc_seed_spread(model, test, patch, log, seeds=range(5)) -> dict:
    """Head MC's error detection over several mask seeds, with balanced and with independent masks."""
    from SSLSegmentLib.data.contract import UNCERTAINTY_KINDS
    from SSLSegmentLib.ml.inference import predict_volume
    from SSLSegmentLib.ml.uncertainty import error_detection

    labels = [lab.array for _, lab in test]
    out = {}
    for mode, balanced in (("balanced", True), ("independent", False)):
        vals: dict[str, list[float]] = {f"{m}_{k}": [] for k in UNCERTAINTY_KINDS for m in ("auroc", "top5_recall")}
        for seed in seeds:
            preds = [predict_volume(model, img, patch, passes=PASSES, estimator="head_mc", device="cpu", seed=seed,
                                    balanced_masks=balanced) for img, _ in test]
            errors = [p.label != y for p, y in zip(preds, labels)]
            for kind in UNCERTAINTY_KINDS:
                d = error_detection([p.uncertainty(kind) for p in preds], errors)
                vals[f"auroc_{kind}"].append(d["auroc"])
                vals[f"top5_recall_{kind}"].append(d["top5_recall"])
        out[mode] = {k: {"mean": round(float(np.mean(v)), 4), "sd": round(float(np.std(v, ddof=1)), 4),
                         "values": [round(x, 4) for x in v]} for k, v in vals.items()}
        log(f"  head_mc seeds, {mode} masks: " + ", ".join(f"{k} {v['mean']:.4f}±{v['sd']:.4f}" for k, v in out[mode].items()))
    return out


# -- report ----------------------------------------------------------------------------------------------------------
SPEED_LABELS = {
    "plain": "plain forward (1 pass)",
    "head_mc": "**head MC dropout, T=8** (device default arrangement)",
    "head_mc_sequential": "head MC dropout, T=8, one head at a time",
    "head_mc_batched": "head MC dropout, T=8, all heads in one product",
    "plain_contiguous": "plain, contiguous layout (channels_last=False)",
    "head_mc_contiguous": "head MC, T=8, contiguous layout (channels_last=False)",
    "plain_whole_volume_contiguous": "whole volume as one window: plain, contiguous layout",
    "head_mc_whole_volume_contiguous": "whole volume as one window: head MC, T=8, contiguous layout",
    "mc_dropout_sequential": "full MC dropout, T=8, sequential",
    "mc_dropout_batched": "full MC dropout, T=8, batched",
    "flips_sequential": "test-time flips, 8, sequential",
    "flips_batched": "test-time flips, 8, batched",
    "ensemble_3": "ensemble of 3 model versions",
    "plain_whole_volume": "whole volume as one window: plain",
    "head_mc_whole_volume": "whole volume as one window: head MC, T=8",
    "mc_dropout_sequential_whole_volume": "whole volume as one window: full MC, sequential",
    "mc_dropout_batched_whole_volume": "whole volume as one window: full MC, batched",
    "plain_2_threads": "plain, 2 torch threads",
    "head_mc_2_threads": "head MC, 2 torch threads",
    "plain_1_window": "plain, 1 window per batch",
    "head_mc_1_window": "head MC, 1 window per batch",
    "plain_bf16": "plain, bf16 autocast",
    "head_mc_bf16": "head MC, bf16 autocast",
}


def render_markdown(res: dict) -> str:
    env = res["environment"]
    cpu = res.get("speed", {}).get("rows", {})
    gpu_res = res.get("gpu") or {}
    gpu = gpu_res.get("speed", {}).get("rows", {})
    lines = [
        "# Uncertainty estimators: cost and error detection",
        "",
        f"Generated by `make bench-uncertainty` (benchmarks/uncertainty.py) on {env['date']}.",
        f"CPU: {env['processor']}, {env['cpu_count']} cores, torch {env['torch']} (torch threads: {env['torch_threads']}), "
        f"MONAI {env['monai']}, Python {env['python']}; load average at start {env.get('load_average_at_start')}. "
        "The machine is shared: with other jobs running, wall times stretch; the process-CPU-time ratio is the steadier "
        "measure of what an estimator costs.",
    ]
    if gpu_res:
        genv = gpu_res["environment"]
        lines.append(f"GPU: {genv.get('gpu')} (CUDA {genv.get('cuda')}, torch {genv['torch']}, MONAI {genv['monai']}), "
                     f"run on {genv['date']}; float32 and 4 windows per batch (the CUDA defaults) unless marked.")
    cfg = res["config"]
    lines += [
        "",
        f"## Speed: one {cfg['volume_shape'][2]}×{cfg['volume_shape'][1]}×{cfg['volume_shape'][0]} phantom volume "
        f"(x×y×z), default network, windows {'×'.join(map(str, cfg['patch']))} (z×y×x), overlap {cfg['overlap']}",
        "",
        "Wall time: the best run (CPU: every run of a fresh process, the first included, 4 runs for the cheap rows and "
        "1 for the long ones; GPU: after a warm-up run, best of the repeats); the JSON has every run and the process "
        "CPU time. × plain divides by the plain forward's best with the same windows. CPU peak: growth of the peak "
        "resident set during the first run in a fresh process; GPU peak: `torch.cuda.max_memory_allocated` above the "
        "model and input already there.",
        "",
        "| estimator | CPU s | CPU × plain | × plain in process CPU time | CPU peak MB |"
        + (" GPU s | GPU × plain | GPU peak MB |" if gpu else ""),
        "|---|---:|---:|---:|---:|" + ("---:|---:|---:|" if gpu else ""),
    ]
    names = list(dict.fromkeys(list(cpu) + list(gpu)))
    for name in names:
        c, g = cpu.get(name), gpu.get(name)
        cells = [SPEED_LABELS.get(name, name)]
        cells += ([f"{c['wall_s_best']:.2f}", f"{c['x_plain']:.2f}", f"{c['x_plain_cpu_time']:.2f}", f"{c['peak_mb']:.0f}"]
                  if c else ["–"] * 4)
        if gpu:
            cells += [f"{g['wall_s_best']:.3f}", f"{g['x_plain']:.2f}", f"{g['peak_mb']:.0f}"] if g else ["–"] * 3
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Whole-volume rows divide by the whole-volume plain forward."]
    if not gpu:
        lines += ["", "GPU column: not measured; no GPU was available to this run. On a CUDA machine, "
                      "`python -m benchmarks.uncertainty --device cuda --parts speed --json-out gpu.json`, then "
                      "`--merge-gpu gpu.json` here adds it."]
    if cpu:
        lines += ["", f"Head MC / plain forward at T=8: **{res['speed']['head_mc_over_plain']:.2f}×** on the CPU "
                      f"(process CPU time: {cpu['head_mc']['x_plain_cpu_time']:.2f}×)"
                  + (f", **{gpu_res['speed']['head_mc_over_plain']:.2f}×** on the GPU." if gpu else ".")]
    ex = gpu_res.get("speed", {}).get("exactness", {})
    if "float32" in ex:
        lines.append("On the GPU, head MC vs full MC on this volume with the same seed, largest difference in any map: "
                     f"{max(ex['float32'].values()):.2g} in float32, {max(ex['bf16_autocast'].values()):.2g} under "
                     "bf16 autocast (rounding of the trunk's and head's products; the dropout masks are the same).")
    q = res.get("quality")
    if q:
        tr = res.get("training", {})
        vs = ", ".join(f"v{v['version']} {v['iterations']} it (val Dice {v['best_val_dice']:.3f})" for v in tr.get("versions", []))
        lines += [
            "",
            f"## Error detection on the phantom test split ({q['test_cases']} cases {'×'.join(map(str, DATA_SHAPE))}, "
            f"{q['test_voxels']:,} voxels)",
            "",
            f"Model: default network trained on {tr.get('train_patch')} patches, {tr.get('method')} on {tr.get('labeled')} labeled of {tr.get('train_cases')} cases; "
            f"versions {vs}. Single-model rows use v3; the ensemble uses v1-v3. "
            "AUROC: the map as a detector of wrong voxels; top 5 %: the share of all wrong voxels among the 5 % most "
            "uncertain voxels. ECE (15 bins, voxelwise) on the test split before → after the temperature fitted on the "
            "validation split.",
            "",
            "| estimator | T | Dice | AUROC entropy | AUROC MI | AUROC variance | top 5 % holds (entropy) | temperature | val ECE before → after | test ECE before → after |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in q["estimators"].items():
            mi = "–" if name == "plain" else f"{r['auroc_mutual_information']:.3f}"
            var = "–" if name == "plain" else f"{r['auroc_variance']:.3f}"
            lines.append(
                f"| {name} | {r['passes']} | {r['dice']:.3f} | {r['auroc_entropy']:.3f} | {mi} | {var} | "
                f"{100 * r['top5_recall_entropy']:.1f} % | {r['temperature']:.2f} | "
                f"{r['val_ece_before']:.4f} → {r['val_ece_after']:.4f} | "
                f"{r['test_ece_before']:.4f} → {r['test_ece_after']:.4f} |"
            )
        lines += ["", f"Voxels wrong (plain): {100 * q['estimators']['plain']['error_rate']:.2f} %."]
        spread = q.get("head_mc_seeds")
        if spread:
            n = len(next(iter(spread["balanced"].values()))["values"])
            lines += [
                "",
                f"Head MC over {n} mask seeds (mean ± sd): the T=8 masks balanced across passes (the default) against "
                "independent masks (as nn.Dropout3d draws them).",
                "",
                "| masks | AUROC entropy | top 5 % holds (entropy) | AUROC MI | top 5 % holds (MI) |",
                "|---|---:|---:|---:|---:|",
            ]
            for mode, r in spread.items():
                lines.append(
                    f"| {mode} | {r['auroc_entropy']['mean']:.4f} ± {r['auroc_entropy']['sd']:.4f} | "
                    f"{100 * r['top5_recall_entropy']['mean']:.1f} ± {100 * r['top5_recall_entropy']['sd']:.1f} % | "
                    f"{r['auroc_mutual_information']['mean']:.4f} ± {r['auroc_mutual_information']['sd']:.4f} | "
                    f"{100 * r['top5_recall_mutual_information']['mean']:.1f} ± "
                    f"{100 * r['top5_recall_mutual_information']['sd']:.1f} % |"
                )
    if res.get("conclusion"):
        lines += ["", "## Conclusion", "", res["conclusion"]]
    return "\n".join(lines) + "\n"


def conclusion(res: dict) -> str:
    from SSLSegmentLib.ml.uncertainty import DEFAULT_ESTIMATOR

    rows = res["speed"]["rows"]
    q = res.get("quality", {}).get("estimators", {})
    x = lambda name: rows[name]["x_plain_cpu_time"] if name in rows else float("nan")  # noqa: E731
    parts = [f"In process CPU time, head MC dropout costs {x('head_mc'):.2f}× one plain forward on this CPU at T=8 "
             f"(wall {rows['head_mc']['x_plain']:.2f}×; whole volume as one window: {x('head_mc_whole_volume'):.2f}×); "
             f"full MC dropout {x('mc_dropout_sequential'):.1f}× sequential and {x('mc_dropout_batched'):.1f}× batched, "
             f"flips {x('flips_sequential'):.1f}×, an ensemble of 3 versions {x('ensemble_3'):.1f}×."]
    if q:
        parts.append(f"With dropout confined to the head, head MC draws the same samples as full MC dropout, so their "
                     f"maps and error detection are the same (entropy AUROC {q['head_mc']['auroc_entropy']:.4f} and "
                     f"{q['mc_dropout']['auroc_entropy']:.4f}).")
        ranked = sorted(q, key=lambda k: -q[k]["auroc_entropy"])
        parts.append("Entropy AUROC, best first: " + ", ".join(f"{k} {q[k]['auroc_entropy']:.4f}" for k in ranked) + ".")
        spread = res["quality"].get("head_mc_seeds", {}).get("balanced")
        if spread:
            parts.append(f"Head MC's entropy AUROC varies with the mask seed by ±{spread['auroc_entropy']['sd']:.4f} "
                         f"(mean {spread['auroc_entropy']['mean']:.4f}), so differences of that size are noise.")
        worse = [k for k in q if q[k]["test_ece_after"] > q[k]["test_ece_before"]]
        if worse:
            parts.append(f"The temperature fitted on the {res['quality']['val_cases']} validation cases lowers their ECE "
                         f"but raises the test ECE for {', '.join(worse)}: on this small phantom split the voxelwise "
                         f"test ECE is at most {100 * max(q[k]['test_ece_before'] for k in q):.2f} % before it and the "
                         "fit does not transfer, so calibration stays optional and off by default.")
        mi = {k: q[k]["auroc_mutual_information"] for k in q if k != "plain"}
        parts.append("Only the sampling estimators give an epistemic map; mutual-information AUROC: "
                     + ", ".join(f"{k} {v:.4f}" for k, v in sorted(mi.items(), key=lambda kv: -kv[1])) + ".")
    seq, bat = rows["mc_dropout_sequential"], rows["mc_dropout_batched"]
    parts.append(f"Full MC passes on this CPU: sequential {seq['cpu_s_best']:.1f} s CPU and +{seq['peak_mb']:.0f} MB, "
                 f"batched {bat['cpu_s_best']:.1f} s and +{bat['peak_mb']:.0f} MB; the CPU default "
                 "(`DEFAULT_PASS_BATCH`) runs them one after another, for the memory. Head MC's two-class passes are "
                 "one product per block of voxels whatever the pass batch.")
    if "head_mc_contiguous" in rows:
        layout = [(rows[a]["cpu_s_best"], rows[b]["cpu_s_best"]) for a, b in
                  (("head_mc_contiguous", "head_mc"), ("head_mc_whole_volume_contiguous", "head_mc_whole_volume"))
                  if a in rows and b in rows]
        parts.append("The inference copy's layout (`DEFAULT_CHANNELS_LAST`): head MC " + ", ".join(
            f"{c:.2f} s contiguous against {d:.2f} s in channels_last_3d" for c, d in layout)
            + " (training-patch windows, then the whole volume as one window; process CPU time).")
    if "plain_2_threads" in rows:
        two = rows["plain_2_threads"]
        parts.append(f"Two torch threads took {two['x_plain']:.2f}× the wall time of one for the plain forward "
                     f"({two['x_plain_cpu_time']:.2f}× its process CPU time) "
                     f"on this shared {res['environment'].get('cpu_count')}-core machine.")
    parts.append(f"Default estimator (`SSLSegmentLib.ml.uncertainty.DEFAULT_ESTIMATOR`): {DEFAULT_ESTIMATOR}: it adds the "
                 "epistemic maps at about the cost of one forward pass and finds errors as well as full MC dropout.")
    if {"flips", "plain"} <= set(q) and "flips_sequential" in rows:
        parts.append(f"Flips (entropy AUROC {q['flips']['auroc_entropy']:.4f}, Dice {q['flips']['dice']:.3f} against "
                     f"{q['plain']['dice']:.3f} plain) cost {x('flips_sequential'):.1f}× a plain forward on this CPU, so "
                     "they are an explicit choice (`estimator=\"flips\"`), e.g. for offline re-scoring.")
    return " ".join(parts)


def merge_gpu(gpu_json: Path, results_json: Path) -> dict:
    res = json.loads(results_json.read_text())
    gpu = json.loads(Path(gpu_json).read_text())
    res["gpu"] = {"environment": gpu["environment"], "speed": gpu["speed"]}
    _write(res, results_json)
    return res


def _write(res: dict, results_json: Path) -> None:
    from SSLSegmentLib.data.imageio import atomic_write_bytes

    atomic_write_bytes(results_json, (json.dumps(res, indent=2) + "\n").encode())
    atomic_write_bytes(results_json.with_suffix(".md"), render_markdown(res).encode())


# -- main ------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.uncertainty", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--parts", default="speed,quality", help="comma list of speed, quality")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads on the CPU (1: on a shared machine two threads stall on each other's barriers)")
    ap.add_argument("--iterations", type=int, default=400, help="training iterations of model v1")
    ap.add_argument("--more", type=int, default=100, help="further iterations of v2 and v3, each from the one before")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of the cheap rows after the first (others: the "
                                                            "first only); on a GPU, of every row after a warm-up")
    ap.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # GPU code path on a CPU (checks)
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "uncertainty"))
    ap.add_argument("--models", default=None, help="folder with v1.pt v2.pt v3.pt state dicts (else the work folder's, "
                                                  "else freshly initialised networks: fine for timing)")
    ap.add_argument("--volume-shape", type=int, nargs=3, default=list(VOLUME_SHAPE), metavar=("Z", "Y", "X"),
                    help="speed volume (z y x); the table's is the default")
    ap.add_argument("--json-out", default=str(RESULTS / "uncertainty.json"))
    ap.add_argument("--merge-gpu", default=None, help="merge a GPU run's JSON into --json-out and re-render the table")
    ap.add_argument("--render", action="store_true", help="re-render the markdown table from --json-out")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.measure:
        print(json.dumps(measure_child(json.loads(args.measure))))
        return 0
    if args.render:
        out = Path(args.json_out)
        res = json.loads(out.read_text())
        if "speed" in res:
            res["conclusion"] = conclusion(res)
        _write(res, out)
        print(f"rendered {out.with_suffix('.md')}")
        return 0
    if args.merge_gpu:
        merge_gpu(Path(args.merge_gpu), Path(args.json_out))
        print(f"merged {args.merge_gpu} into {args.json_out} and {Path(args.json_out).with_suffix('.md')}")
        return 0

    import torch

    from SSLSegmentLib.data.phantoms import PhantomConfig, make_phantom

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible")
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts <= {"speed", "quality"}:
        raise SystemExit(f"error: --parts takes speed and/or quality, got {sorted(parts)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.0f} s] {msg}", flush=True)

    res: dict = {"environment": environment(args.device),
                 "config": {"volume_shape": list(args.volume_shape), "patch": list(_patch()), "overlap": 0.25, "passes": PASSES,
                            "network": _network_config().to_dict()}}
    models_dir = Path(args.models) if args.models else work / "models"
    model_paths = [str(models_dir / f"v{i}.pt") for i in (1, 2, 3)]
    data = None
    if "quality" in parts:
        log("training three model versions")
        paths, res["training"], data = train_versions(work, args.iterations, args.more, args.threads, log)
        model_paths = [str(p) for p in paths]
    elif not all(Path(p).is_file() for p in model_paths):
        log("no trained models found: timing freshly initialised networks")
        model_paths = ["", "", ""]

    if "speed" in parts:
        volume = make_phantom(2026, PhantomConfig(shape=tuple(args.volume_shape)))[0].array
        log(f"speed on a {tuple(args.volume_shape)} volume, device {args.device}")
        if args.device == "cpu" and not args.in_process:
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                vpath = Path(tmp) / "volume.npy"
                np.save(vpath, volume)
                res["speed"] = speed_cpu(vpath, model_paths, args.threads, args.repeats / 3.0, log)
        else:
            res["speed"] = speed_in_process(volume, model_paths, args.device, args.repeats, log)
    if "quality" in parts:
        log("error detection on the test split")
        res["quality"] = quality(data, model_paths, log)
    res["seconds"] = round(time.time() - t_start, 1)

    out = Path(args.json_out)
    if args.device == "cuda":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {out}")
        return 0
    if out.is_file():  # keep a GPU column measured earlier (it carries its own date and device)
        old = json.loads(out.read_text())
        if old.get("gpu"):
            res["gpu"] = old["gpu"]
    if "speed" in res:
        res["conclusion"] = conclusion(res)
    _write(res, out)
    log(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
