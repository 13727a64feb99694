"""`make bench`: SSL methods side by side, same seed, budget and network, on a fixed data split.

    python -m benchmarks.ssl_methods --profile quick [--seeds 0 1 2] [--methods supervised brl ...] [--jobs 4]
    python -m benchmarks.ssl_methods --profile la-quick [--data FOLDER | --la-source LA2018] [--labeled 4 8]
    python -m benchmarks.ssl_methods --profile paper --data FOLDER [--iterations 6000] [--device cuda]
    python -m benchmarks.ssl_methods --profile la-quick --measure 20     # seconds per iteration of each method

Profiles:
  quick     phantoms on the CPU (the default), 800 iterations.
  la-quick  LA2018 at half resolution (sslsegment import-la --half-resolution), default UNet, 48×48×32 patches,
            4 and 8 labeled, 2000 iterations, poly learning rate (its wall time on 2 cores: results/ssl-la-quick.md).
  paper     the LA protocol of the seeds (V-Net, 112×112×80 patches, batch 2+2, 6000 iterations, lr 0.01 ×0.1 every
            2500, 8 and 16 labeled, dense sliding window): for a GPU, on any data-set folder (phantoms at LA scale
            by default). Selection on the validation split; the last checkpoint is reported too.

Writes RESULTS/ssl[-PROFILE].json and .md (rewritten after every finished run, so a cut-off run keeps what finished):
Dice, Jaccard, HD95, ASD (mean ± sd over test cases, or over seeds when several) and gap closed =
(method − supervised) / (full − supervised) on mean Dice. "full" is supervised training with every training case
labeled (the upper reference); it does not depend on the labeled count, so it runs once per seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from SSLSegmentLib.ml.inference import pick_device
from SSLSegmentLib.ml.networks import NetworkConfig
from SSLSegmentLib.ml.trainer import TrainConfig
from benchmarks.experiment import environment, run_experiment

RESULTS = Path("benchmarks/results")
METRICS = ("dice", "jaccard", "hd95_vox", "asd_vox")
# What each run's row may hold: the best checkpoint's test metrics, the last checkpoint's, and the best one's with
# the prediction cut to its largest connected component.
EVALUATIONS = ("test", "test_last", "test_lcc")
DEFAULT_METHODS = ["supervised", "full", "mean-teacher", "ua-mt", "ug-mcl", "sgrs", "lcc", "brl"]
# Rows that train a registered method with options of their own on top of the profile's for that method:
# row name -> (method, options). `--methods brl-cp bcp` adds them to a run.
ROW_VARIANTS: dict[str, tuple[str, dict]] = {"brl-cp": ("brl", {"copy_paste": True})}
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Profile:
    """A benchmark set-up. `make_data(work, args)` builds (or names) the data-set folder; `config` is shared by every
    method. eval_overlap: sliding-window overlap for the test evaluation; evaluate_last: also report last.pt.
    method_options: per method, options that differ from the method's defaults on this data (chosen on its
    validation split; every table prints them). row_config: per row, training settings on top of `config` (a
    method's own recipe, such as BCP's labeled-only pre-training stage; every table prints them)."""

    name: str
    description: str
    n_labeled: list[int]
    config: dict
    methods: list[str]
    make_data: object = None
    seeds: list[int] = field(default_factory=lambda: [0])
    eval_overlap: float = 0.5
    evaluate_last: bool = False
    notes: list[str] = field(default_factory=list)
    method_options: dict[str, dict] = field(default_factory=dict)
    row_config: dict[str, dict] = field(default_factory=dict)


# -- data ------------------------------------------------------------------------------------------------------


def _phantom_data(work: Path, n_train=40, n_val=8, n_test=12, shape=(40, 64, 64), seed=0, difficulty=1.0,
                  spacing=None, workers: int = 1, variability: float = 0.0) -> Path:
    """The phantom data set of `write_phantom_dataset` in WORK, named after its settings and written once."""
    from SSLSegmentLib.data.phantoms import PhantomConfig, write_phantom_dataset

    cfg = PhantomConfig(shape=tuple(shape), difficulty=difficulty, variability=variability, **({"spacing": tuple(spacing)} if spacing else {}))
    tag = f"phantoms-{n_train}-{n_val}-{n_test}-{'x'.join(map(str, shape))}-d{difficulty}{f'-v{variability}' if variability else ''}-s{seed}"
    out = work / (tag + (f"-sp{'x'.join(map(str, spacing))}" if spacing else ""))
    if (out / "dataset.json").is_file():
        return out
    return write_phantom_dataset(out, n_train, n_val, n_test, cfg, seed=seed, progress=workers <= 1, workers=workers)


# The quick profile's phantoms: case-to-case variability is what makes 4 labeled cases fall short of 40
# (docs/methods.md, "The phantoms"); chosen on the validation split.
QUICK_PHANTOMS = dict(difficulty=1.0, variability=1.5)


def _la_data(work: Path, args) -> Path:
    """The imported LA2018 folder: --data if given, else import --la-source at half resolution, z-scored per volume
    (see SSLSegmentLib/data/la.py), into WORK."""
    if getattr(args, "data", None):
        return Path(args.data)
    src = Path(getattr(args, "la_source", None) or os.environ.get("SSLSEGMENT_LA2018", REPO.parent / "shared" / "data" / "LA2018"))
    out = work / "la2018-half-z"
    if not (out / "dataset.json").is_file():
        from SSLSegmentLib.data.la import import_la

        if not (src / "train.list").is_file():
            raise FileNotFoundError(
                f"LA2018 not found at {src}: pass --la-source (the h5 layout) or --data (an imported folder)"
            )
        import_la(src, out, half_res=True, zscore=True, progress=True)
    return out


PROFILES: dict[str, Profile] = {
    "quick": Profile(
        name="quick",
        description="phantoms 40 train (4 labeled = 10%) / 8 val / 12 test at 40×64×64, case-to-case variability 1.5, "
        "default UNet, 800 iterations",
        n_labeled=[4],
        config=dict(
            network=NetworkConfig().to_dict(),
            patch_size=(32, 48, 48),
            batch_labeled=2,
            batch_unlabeled=2,
            iterations=800,
            lr=0.02,
            lr_schedule="poly",
            val_interval=100,
        ),
        methods=DEFAULT_METHODS,
        make_data=lambda work, args: Path(args.data) if getattr(args, "data", None) else _phantom_data(
            work, workers=getattr(args, "jobs", 1), **QUICK_PHANTOMS),
    ),
    "la-quick": Profile(
        name="la-quick",
        description="LA2018 (real LGE-MRI) at half resolution (1.25 mm), z-scored per volume, 60 train / 10 val / "
        "10 test, default UNet, patches 48×48×32 (x×y×z), batch 2+2, 2000 iterations, lr 0.03 poly",
        n_labeled=[4, 8],
        config=dict(
            network=NetworkConfig().to_dict(),
            # Patch and iterations sized to the CPU budget from the measured cost per iteration
            # (benchmarks/results/cost-la-quick*-cpu.md): a larger patch would leave too few iterations to learn;
            # 2000 iterations once the network and the trainer step reached their floor (results/training-speed.md).
            # lr 0.03 chosen on the validation split. Both in docs/methods.md, "la-quick".
            patch_size=(32, 48, 48),
            batch_labeled=2,
            batch_unlabeled=2,
            iterations=2000,
            lr=0.03,
            lr_schedule="poly",
            val_interval=400,
        ),
        methods=DEFAULT_METHODS,
        make_data=_la_data,
        notes=[
            "4 and 8 labeled are the first cases of train.list (5% and 10% of the 80 of the standard protocol).",
        ],
        # Chosen on the validation split (benchmarks/results/tuning-la-quick-validation.json): brl's default β is
        # unstable with this few fully labeled cases of real MRI, and the lower consistency weight suits the lower β
        # (docs/methods.md, "brl's β").
        # The copy-paste rows also train on their labeled patches unmixed: at 2000 iterations the mixes alone give the
        # student too little labeled signal (benchmarks/results/tuning-bcp-validation.md).
        method_options={"brl": {"beta": 0.3, "consistency_weight": 0.1}, "bcp": {"keep_labeled": True},
                        "brl-cp": {"keep_labeled": True}},
        # No labeled-only copy-paste stage (BCP's recipe has 2000 of its 17000 iterations): with keep_labeled every
        # step trains on the labeled patches anyway, and 0 beat 300 (and 300 beat 1000) on both validation folds.
    ),
    "paper": Profile(
        name="paper",
        description="the LA protocol: V-Net (16 filters, dropout 0.5 before the output conv), patches 112×112×80 "
        "(x×y×z), batch 2+2, SGD lr 0.01 ×0.1 every 2500 iterations, 6000 iterations, consistency ramp over the "
        "whole run; phantoms at LA scale (88×144×176 voxels of 0.625 mm, 80 train / 10 val / 20 test) unless --data",
        n_labeled=[8, 16],
        config=dict(
            network=NetworkConfig(arch="vnet", dropout=0.5, dropout_placement="head").to_dict(),
            patch_size=(80, 112, 112),
            batch_labeled=2,
            batch_unlabeled=2,
            iterations=6000,
            lr=0.01,
            lr_schedule="step",
            lr_step=2500,
            rampup_steps=6000,
            val_interval=200,
        ),
        methods=DEFAULT_METHODS,
        make_data=lambda work, args: Path(args.data) if getattr(args, "data", None) else _phantom_data(
            work, 80, 10, 20, (88, 144, 176), spacing=(0.625, 0.625, 0.625), workers=max(1, getattr(args, "jobs", 1)) * 3
        ),
        # MONAI's window step is int(roi·(1 − overlap)): 0.84 comes within a voxel of the seeds' in-plane step and
        # keeps a coarser step in z than theirs, which would triple the windows (docs/methods.md, "paper").
        eval_overlap=0.84,
        evaluate_last=True,
    ),
    "smoke": Profile(
        name="smoke",
        description="tiny phantoms, a few iterations: checks the benchmark machinery only",
        n_labeled=[2],
        config=dict(
            network=NetworkConfig(channels=(8, 16, 32), strides=(2, 2), features=8).to_dict(),
            patch_size=(16, 32, 32),
            iterations=20,
            val_interval=10,
        ),
        methods=DEFAULT_METHODS,
        make_data=lambda work, args: _phantom_data(work, 8, 2, 2, (24, 32, 32)),
        evaluate_last=True,
    ),
}


def scaled_config(profile: Profile, iterations: int | None) -> dict:
    """The profile's config with the iteration count overridden: the lr step and the ramp keep their share of the run,
    and validation runs at least 5 times."""
    cfg = dict(profile.config)
    if iterations is None or iterations == cfg["iterations"]:
        return cfg
    scale = iterations / cfg["iterations"]
    cfg["iterations"] = int(iterations)
    for k in ("lr_step", "rampup_steps"):
        if cfg.get(k):
            cfg[k] = max(1, int(round(cfg[k] * scale)))
    cfg["val_interval"] = max(1, min(cfg.get("val_interval", 100), iterations // 5))
    return cfg


# -- one run ---------------------------------------------------------------------------------------------------


def _run_one(task: dict) -> dict:
    """Train one method (in this process or a worker) and evaluate best.pt (and last.pt) on the test cases."""
    from SSLSegmentLib.data.dataset import DataSet
    from SSLSegmentLib.ml.evaluation import evaluate_model
    from SSLSegmentLib.ml.inference import Predictor

    torch.set_num_threads(task["threads"])
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # fixed patch sizes: let cuDNN pick the fastest 3D convolutions
    method, n_labeled, seed = task["method"], task["n_labeled"], task["seed"]
    full = method == "full"
    cfg = TrainConfig(method="supervised" if full else task.get("train_method", method), seed=seed,
                      method_options=task.get("method_options", {}), **task["config"])
    out_dir = Path(task["out_dir"])
    t0 = time.time()
    print(f"[bench] {task['profile']} labeled={n_labeled} seed={seed} {method}", flush=True)
    res = run_experiment(
        task["data"], cfg, None if full else n_labeled, out_dir, evaluate_split=None,
        train_ids=task.get("train_ids"), val_ids=task.get("val_ids"),
    )
    ds = DataSet(task["data"])
    test_ids = task.get("test_ids") or ds.splits["test"]
    row = {
        "method": method,
        "n_labeled": "all" if full else n_labeled,
        "seed": seed,
        "best_val_dice": res["train"]["best_val_dice"],
        "best_step": res["train"]["best_step"],
        "last_val_dice": res["train"]["last_val_dice"],
        "train_seconds": res["train"]["seconds"],
        "method_options": res["method_options"],
        "checkpoint": res["checkpoint"],
        "history": res["history"],
    }
    t1 = time.time()
    device = pick_device(cfg.device)
    for which in ("best", "last") if task["evaluate_last"] else ("best",):
        predictor = Predictor.from_checkpoint(out_dir / f"{which}.pt", device=device, overlap=task["eval_overlap"])
        # The best checkpoint is also scored with its prediction cut to the largest component (the copy-paste
        # papers' test-time post-processing), from the same forward pass: reported beside, never instead.
        ev = evaluate_model(predictor, ds, test_ids, largest=which == "best")
        key = "test" if which == "best" else "test_last"
        for k, e in ((key, ev), ("test_lcc", ev.get("largest_component"))):
            if e is None:
                continue
            s = e["summary"]
            row[k] = {m: s[m]["mean"] for m in METRICS}
            row[k + "_sd_over_cases"] = {m: s[m]["sd"] for m in METRICS}
            row[k + "_undefined_cases"] = s["hd95_vox"]["n_undefined"]
            row[k + "_cases"] = e["cases"]
    row["eval_seconds"] = time.time() - t1
    row["wall_seconds"] = time.time() - t0
    row["date"] = time.strftime("%Y-%m-%d")
    print(f"[bench]   {method} l={n_labeled} s={seed}: test Dice {row['test']['dice']:.4f}  ({row['wall_seconds']:.0f} s)", flush=True)
    return row


def _per_row(items, flag: str, base: dict[str, dict]) -> dict[str, dict]:
    """`base` (row -> settings) with ROW:KEY=VALUE items of `flag` on top."""
    from training.commands import parse_key_values

    out = {m: dict(o) for m, o in base.items()}
    for item in items or []:
        row, sep, kv = item.partition(":")
        if not sep or "=" not in kv:
            raise ValueError(f"{flag} takes ROW:KEY=VALUE, got {item!r}")
        out.setdefault(row, {}).update(parse_key_values([kv]))
    return out


def method_options(profile: Profile, args) -> dict[str, dict]:
    """The profile's per-method options with --method-option METHOD:KEY=VALUE on top."""
    return _per_row(getattr(args, "method_option", None), "--method-option", profile.method_options)


def row_config(profile: Profile, args) -> dict[str, dict]:
    """The profile's per-row training settings with --row-config ROW:KEY=VALUE on top."""
    return _per_row(getattr(args, "row_config", None), "--row-config", profile.row_config)


def network_options(args) -> dict:
    """--network KEY=VALUE items as a dict (NetworkConfig fields that differ from the profile's network)."""
    from training.commands import parse_key_values

    items = getattr(args, "network", None) or []
    bad = [i for i in items if "=" not in i or not i.partition("=")[0]]
    if bad:
        raise ValueError(f"--network takes KEY=VALUE, got {bad[0]!r}")
    return parse_key_values(items)


def with_network_options(config: dict, options: dict) -> dict:
    """The config with its network overridden by `options`, checked by NetworkConfig (an unknown field or a bad value
    fails before any run starts)."""
    if not options:
        return config
    try:
        network = NetworkConfig(**{**config["network"], **options})
    except TypeError as e:  # an unknown field
        raise ValueError(f"--network: {e}") from None
    return {**config, "network": network.to_dict()}


def unknown_rows(methods) -> list[str]:
    """The names in `methods` that are neither "full", a registered method nor a row variant."""
    from SSLSegmentLib.ml.methods import available_methods

    return [m for m in methods if m != "full" and m not in ROW_VARIANTS and m not in available_methods()]


def plan_tasks(profile: Profile, data: Path, work: Path, methods, seeds, labeled, config, args,
               run_name: str | None = None) -> list[dict]:
    """One task per run; run folders under WORK/runs/RUN_NAME (the result file's name; default the profile's), so
    invocations writing other result files never train into, or evaluate, each other's checkpoints."""
    root = work / "runs" / (run_name or profile.name)
    lists = {}
    for key in ("train", "val", "test"):
        path = getattr(args, f"{key}_list", None)
        if path:
            from SSLSegmentLib.data.la import read_list

            lists[f"{key}_ids"] = read_list(path)
    device = getattr(args, "device", None)
    if device:
        config = {**config, "device": device}
    options, per_row = method_options(profile, args), row_config(profile, args)
    base = dict(profile=profile.name, data=str(data), config=config, threads=getattr(args, "threads", 2),
                eval_overlap=profile.eval_overlap, evaluate_last=profile.evaluate_last, **lists)
    tasks = []
    for seed in seeds:
        if "full" in methods:
            tasks.append({**base, "method": "full", "n_labeled": None, "seed": seed, "method_options": {},
                          "out_dir": str(root / "full" / f"s{seed}")})
        for n in labeled:
            for m in methods:
                if m != "full":
                    trained, extra = ROW_VARIANTS.get(m, (m, {}))
                    opts = {**options.get(trained, {}), **extra, **(options.get(m, {}) if m != trained else {})}
                    tasks.append({**base, "config": {**config, **per_row.get(m, {})},
                                  "method": m, "train_method": trained, "n_labeled": n, "seed": seed,
                                  "method_options": opts,
                                  "out_dir": str(root / f"l{n}" / f"s{seed}" / m)})
    return tasks


def run_profile(profile: Profile, work: Path, methods: list[str], seeds: list[int], out_name: str, args=None,
                results_dir: Path = RESULTS) -> dict:
    args = args or argparse.Namespace()
    data = profile.make_data(work, args)
    labeled = list(getattr(args, "labeled", None) or profile.n_labeled)
    config = with_network_options(scaled_config(profile, getattr(args, "iterations", None)), network_options(args))
    tasks = plan_tasks(profile, data, work, methods, seeds, labeled, config, args, run_name=out_name)
    jobs = max(1, int(getattr(args, "jobs", 1) or 1))
    meta = {
        "profile": profile.name,
        "description": profile.description,
        "notes": profile.notes + _data_notes(data, args),
        "data": str(data),
        "config": TrainConfig(**config).to_dict(),
        "method_options": method_options(profile, args),
        "row_config": {m: c for m, c in row_config(profile, args).items() if m in methods},
        "network_options": network_options(args),
        "profile_iterations": profile.config["iterations"],
        "seeds": seeds,
        "n_labeled": labeled,
        "methods": methods,
        "eval_overlap": profile.eval_overlap,
        "jobs": jobs,
        "environment": _environment(config),
    }
    runs: list[dict] = []
    if getattr(args, "resume", False) or getattr(args, "merge", None):
        paths = [results_dir / f"{out_name}.json"] + [Path(p) for p in getattr(args, "merge", None) or []]
        runs, tasks = _resume(paths, meta, tasks)
    t0 = time.time()

    def write(done: bool) -> dict:
        result = {**meta, "complete": done, "wall_seconds": time.time() - t0, "runs": runs,
                  "summary": summarize_runs(runs, methods, labeled)}
        results_dir.mkdir(parents=True, exist_ok=True)
        _atomic_text(results_dir / f"{out_name}.json", json.dumps(result, indent=2))
        _atomic_text(results_dir / f"{out_name}.md", markdown_table(result))
        return result

    if jobs == 1:
        for t in tasks:
            runs.append(_run_one(t))
            write(False)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_run_one, t) for t in tasks]
            for f in as_completed(futures):
                runs.append(f.result())
                write(False)
    return write(True)


def _resume(paths, meta: dict, tasks: list[dict]) -> tuple[list[dict], list[dict]]:
    """Runs already in the result files `paths` (same profile, data and config; the first file wins for a run
    present in several) and the tasks still to do. A run is kept only where it was trained as its task would be:
    the same method options (compared as the method reports them, so a default named explicitly is the same
    run) and the same row settings (a file without the keys had the defaults); the others are run again, so an
    option chosen later re-runs just the rows it touches."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    key = lambda r: (r["method"], "all" if r["method"] == "full" else r["n_labeled"], r["seed"])  # noqa: E731
    wanted = {key(t): t for t in tasks}
    trained_as = {k: _trained_options(t) for k, t in wanted.items()}
    row_config = meta.get("row_config", {})
    # A TrainConfig field added after a file was written is read at its default: a new field's default is the
    # behaviour from before it existed (e.g. reviewed_patch_share only acts on corrected cases).
    defaults = TrainConfig().to_dict()
    kept, done = [], set()
    for path in map(Path, paths):
        if not path.is_file():
            continue
        old = json.loads(path.read_text())
        old["config"] = {**{k: defaults[k] for k in meta["config"] if k in defaults}, **old.get("config", {})}
        if not all(old.get(k) == meta[k] for k in ("profile", "data", "config")):
            raise ValueError(f"{path} holds results of another profile, data set or config; choose another --out-name")
        for r in old["runs"]:
            task = wanted.get(key(r))
            if task is None or key(r) in done:
                continue
            same_options = _trained_options(task, r.get("method_options", {})) == trained_as[key(r)]
            same_row = old.get("row_config", {}).get(r["method"], {}) == row_config.get(r["method"], {})
            if same_options and same_row:
                kept.append({**r, "kept_from": str(path), "date": r.get("date") or old.get("environment", {}).get("date")})
                done.add(key(r))
    todo = [t for t in tasks if key(t) not in done]
    print(f"[bench] resuming from {', '.join(map(str, paths))}: {len(kept)} runs kept, {len(todo)} to do", flush=True)
    return kept, todo


def _wall_sentence(result: dict) -> str:
    """The wall time, and where runs were kept from earlier result files, which runs it covers."""
    wall = f"{result.get('wall_seconds', 0) / 60:.1f} min"
    kept = [r for r in result.get("runs", []) if r.get("kept_from")]
    if not kept:
        return f"total wall {wall}."
    dates = sorted({r.get("date") or "?" for r in kept})
    return (f"wall {wall} for the {len(result['runs']) - len(kept)} runs of this invocation; {len(kept)} runs kept "
            f"from an earlier result file (dated {', '.join(dates)}), their times per run in the table.")


def _trained_options(task: dict, recorded: dict | None = None) -> dict:
    """The method options a task trains with, as the method reports them (every option, defaults included); with
    `recorded` (a finished run's report), that report with the options it lacks (added since) at their defaults."""
    from SSLSegmentLib.ml.methods import get_method

    trained = "supervised" if task["method"] == "full" else task.get("train_method", task["method"])
    if recorded is None:
        return get_method(trained, **task.get("method_options", {})).options()
    return {**get_method(trained).options(), **recorded}


def _environment(config: dict) -> dict:
    """`environment()` with the device the runs actually use (a CPU run on a GPU machine says cpu)."""
    env = environment()
    if pick_device(config.get("device", "auto")).type == "cpu":
        env["device"] = "cpu"
    return env


def _data_notes(data: Path, args) -> list[str]:
    notes = []
    meta_path = Path(data) / "dataset.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    split_notes = meta.get("split_notes", {})
    if getattr(args, "test_list", None):
        notes.append(f"Test cases: the given list {args.test_list}.")
    elif split_notes.get("test"):
        notes.append(f"Test split: {split_notes['test']}; validation split: {split_notes.get('val', 'fixed')}.")
    return notes


def _atomic_text(path: Path, text: str) -> None:
    from SSLSegmentLib.data.imageio import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


# -- summaries -------------------------------------------------------------------------------------------------


def _mean_sd(values):
    v = np.array([x for x in values if x is not None and math.isfinite(x)], float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def summarize_runs(runs: list[dict], methods: list[str], labeled: list[int]) -> dict:
    """Per labeled count and method: (mean, sd) per metric; over seeds when several, else over test cases."""
    out = {}
    for n in labeled:
        rows = {}
        for m in methods:
            rs = [r for r in runs if r["method"] == m and r["n_labeled"] in (n, "all")]
            if not rs:
                continue
            row = {}
            for key in EVALUATIONS:
                if not all(key in r for r in rs):
                    continue
                if len(rs) > 1:  # across seeds: mean ± sd of the per-seed means
                    row[key] = {k: _mean_sd([r[key][k] for r in rs]) for k in METRICS}
                else:  # one seed: mean ± sd over test cases
                    row[key] = {k: (rs[0][key][k], rs[0][key + "_sd_over_cases"][k]) for k in METRICS}
            row["best_val_dice"] = _mean_sd([r["best_val_dice"] for r in rs])
            row["best_step"] = float(np.mean([r["best_step"] for r in rs]))
            row["seconds"] = float(np.mean([r["train_seconds"] for r in rs]))
            row["n_seeds"] = len(rs)
            rows[m] = row
        sup, full = rows.get("supervised"), rows.get("full")
        for m, row in rows.items():
            for key in EVALUATIONS:
                # Only a positive gap can be closed: where full supervision is not above supervised-only (an
                # undertrained budget), a ratio would flip sign and rank nothing.
                if sup and full and key in row and key in sup and key in full and full[key]["dice"][0] > sup[key]["dice"][0]:
                    row[f"gap_closed_{key}"] = (row[key]["dice"][0] - sup[key]["dice"][0]) / (full[key]["dice"][0] - sup[key]["dice"][0])
                else:
                    row[f"gap_closed_{key}"] = math.nan
        out[str(n)] = rows
    return out


def markdown_table(result: dict) -> str:
    env = result["environment"]
    seeds = result["seeds"]
    cfg = result["config"]
    sd_note = "± is the sd over seeds (of the per-seed test means)" if len(seeds) > 1 else "± is the sd over test cases"
    reduced = cfg["iterations"] != result.get("profile_iterations", cfg["iterations"])
    lines = [
        f"# SSL benchmark: profile `{result['profile']}`" + ("" if result.get("complete", True) else " (INCOMPLETE)"),
        "",
        f"{result['description']}.",
        "",
        f"Seeds {seeds}; {sd_note}. Model selection on the validation split (best validation Dice); "
        f"test-split metrics, Dice/Jaccard in %, HD95/ASD in voxels (MONAI definitions).",
        "",
    ]
    if reduced:
        lines += [
            f"**Reduced run: {cfg['iterations']} iterations instead of the profile's {result['profile_iterations']}** "
            f"(lr step at {cfg.get('lr_step')}, ramp over {cfg.get('rampup_steps')}: same shares of the run). "
            "Numbers are not comparable with the published tables.",
            "",
        ]
    for note in result.get("notes", []):
        lines += [f"- {note}"]
    if result.get("notes"):
        lines.append("")
    lines += [
        f"Device: **{env['device']}**; machine {env['machine']} ({env['processor']}), {env['cpu_threads']} torch "
        f"threads per run, {result.get('jobs', 1)} run(s) at a time; Python {env['python']}, torch {env['torch']}, "
        f"MONAI {env['monai']}; date {env['date']}; " + _wall_sentence(result),
        "",
        "Config: " + json.dumps({k: cfg.get(k) for k in ("patch_size", "iterations", "lr", "lr_schedule", "lr_step",
                                                           "batch_labeled", "batch_unlabeled", "ema_decay", "rampup_steps",
                                                           "val_interval")})
        + f"; network {cfg['network']['arch']} {cfg['network'].get('channels') if cfg['network']['arch'] == 'unet' else ''}"
        + f"; test sliding-window overlap {result.get('eval_overlap')}.",
        "",
    ]
    if result.get("method_options"):
        opts = "; ".join(f"{m}: " + ", ".join(f"{k} = {v}" for k, v in o.items()) for m, o in result["method_options"].items())
        lines += [f"Method options other than the defaults: {opts}.", ""]
    if result.get("network_options"):
        opts = ", ".join(f"{k} = {v}" for k, v in result["network_options"].items())
        lines += [f"Network options other than the profile's: {opts}.", ""]
    variants = [m for m in result.get("methods", []) if m in ROW_VARIANTS]
    if variants:
        opts = "; ".join(f"{m} = {ROW_VARIANTS[m][0]} with " + ", ".join(f"{k} = {v}" for k, v in ROW_VARIANTS[m][1].items())
                         + f" (and {ROW_VARIANTS[m][0]}'s options)" for m in variants)
        lines += [f"Rows that are variants of a method: {opts}.", ""]
    if result.get("row_config"):
        opts = "; ".join(f"{m}: " + ", ".join(f"{k} = {v}" for k, v in c.items()) for m, c in result["row_config"].items())
        lines += [f"Training settings of single rows on top of the config: {opts}.", ""]
    has_last = any("test_last" in r for rows in result["summary"].values() for r in rows.values())
    has_lcc = any("test_lcc" in r for rows in result["summary"].values() for r in rows.values())
    if has_lcc:
        lines += ["*largest component*: the best checkpoint's prediction cut to its largest connected component before "
                  "scoring (the copy-paste papers' test-time post-processing); its gap is against supervised and full "
                  "scored the same way.", ""]
    for n, rows in result["summary"].items():
        lines += [f"## {n} labeled", ""]
        sup, full = rows.get("supervised", {}).get("test"), rows.get("full", {}).get("test")
        if sup and full and full["dice"][0] <= sup["dice"][0]:
            lines += ["No gap to close: full supervision is not above supervised-only at this budget "
                      f"({100 * full['dice'][0]:.2f} vs {100 * sup['dice'][0]:.2f} Dice %).", ""]
        head = "| method | Dice % | Jaccard % | HD95 (vox) | ASD (vox) | gap closed | val Dice % (step) |"
        sep = "|---|---|---|---|---|---|---|"
        if has_last:
            head += " last: Dice % | last: gap closed |"
            sep += "---|---|"
        if has_lcc:
            head += " largest component: Dice % | largest component: gap closed |"
            sep += "---|---|"
        lines += [head + " train s |", sep + "---|"]
        for m, r in rows.items():
            if "test" not in r:
                continue
            d, j, h, a = (r["test"][k] for k in METRICS)
            gap = r.get("gap_closed_test", math.nan)
            gap_s = "" if not math.isfinite(gap) or m in ("supervised", "full") else f"{100 * gap:.0f}%"
            line = (
                f"| {m} | {100 * d[0]:.2f} ± {100 * d[1]:.2f} | {100 * j[0]:.2f} ± {100 * j[1]:.2f} | "
                f"{h[0]:.2f} ± {h[1]:.2f} | {a[0]:.2f} ± {a[1]:.2f} | {gap_s} | "
                f"{100 * r['best_val_dice'][0]:.2f} ({r['best_step']:.0f}) |"
            )
            for shown, key in ((has_last, "test_last"), (has_lcc, "test_lcc")):
                if not shown:
                    continue
                if key in r:
                    dl = r[key]["dice"]
                    gl = r.get(f"gap_closed_{key}", math.nan)
                    gl_s = "" if not math.isfinite(gl) or m in ("supervised", "full") else f"{100 * gl:.0f}%"
                    line += f" {100 * dl[0]:.2f} ± {100 * dl[1]:.2f} | {gl_s} |"
                else:
                    line += " | |"
            lines.append(line + f" {r['seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


# -- cost measurement ------------------------------------------------------------------------------------------


def _measure_one(task: dict) -> dict:
    """Seconds per training iteration of one method (after `warmup` untimed steps), wall and process CPU."""
    from SSLSegmentLib.data.dataset import DataSet
    from SSLSegmentLib.ml.trainer import Trainer

    torch.set_num_threads(task["threads"])
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    full = task["method"] == "full"
    cfg = TrainConfig(method="supervised" if full else task["method"], seed=0, method_options=task.get("method_options", {}),
                      **{**task["config"], "iterations": task["iterations"] + task["warmup"]})
    ds = DataSet(task["data"])
    train = ds.splits["train"]
    n = len(train) if full else task["n_labeled"]
    trainer = Trainer(cfg, ds.training_samples(train, train[:n]))
    for _ in range(task["warmup"]):
        trainer.train_step()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(task["iterations"]):
        trainer.train_step()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"method": task["method"], "wall_s_per_it": wall / task["iterations"], "cpu_s_per_it": cpu / task["iterations"]}


def measure_profile(profile: Profile, work: Path, methods: list[str], iterations: int, out_name: str, args,
                    results_dir: Path = RESULTS) -> dict:
    """Time `iterations` training steps of each method with the profile's config, and estimate the profile's training
    time (iterations × s/it summed over the runs one seed needs; validation and test evaluation not included)."""
    data = profile.make_data(work, args)
    labeled = list(getattr(args, "labeled", None) or profile.n_labeled)
    config = with_network_options(scaled_config(profile, getattr(args, "iterations", None)), network_options(args))
    if getattr(args, "device", None):
        config["device"] = args.device
    jobs = max(1, int(getattr(args, "jobs", 1) or 1))
    options = method_options(profile, args)
    tasks = [dict(method=m, n_labeled=labeled[-1], data=str(data), config=config, threads=getattr(args, "threads", 2),
                  iterations=iterations, warmup=2, method_options=options.get(m, {})) for m in methods]
    if jobs == 1:
        rows = [_measure_one(t) for t in tasks]
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            rows = list(pool.map(_measure_one, tasks))
    # On a CPU the process time is what a run costs whoever else uses the machine (with one thread per run);
    # on a GPU the wall time per iteration, measured with `jobs` runs sharing the device.
    on_cpu = pick_device(config.get("device", "auto")).type == "cpu"
    key = "cpu_s_per_it" if on_cpu and getattr(args, "threads", 2) == 1 else "wall_s_per_it"
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    result = {"profile": profile.name, "config": TrainConfig(**config).to_dict(), "measured_iterations": iterations,
              "jobs": jobs, "estimate_from": key, "labeled": labeled, "rows": rows, "load_average": list(load),
              "environment": _environment(config)}
    result["estimated_training_seconds_one_seed"] = estimated_seconds(result)
    results_dir.mkdir(parents=True, exist_ok=True)
    _atomic_text(results_dir / f"{out_name}.json", json.dumps(result, indent=2))
    _atomic_text(results_dir / f"{out_name}.md", cost_markdown(result))
    return result


def _seconds_per_iteration(cost: dict, methods: list[str], labeled: list[int]) -> float:
    """Σ over the runs of one seed (full once, every other method once per labeled count) of s/it, with the cost
    file's basis (CPU seconds on a CPU with one thread per run, else wall seconds)."""
    key = cost.get("estimate_from", "wall_s_per_it")
    per_it = {r["method"]: r[key] for r in cost["rows"]}
    missing = [m for m in methods if m not in per_it]
    if missing:
        raise ValueError(f"the cost file has no measurement for {missing}")
    return sum(per_it[m] * (1 if m == "full" else len(labeled)) for m in methods)


def estimated_seconds(cost: dict) -> float:
    """Training time of one seed of the profile with `jobs` runs at a time: Σ_runs s/it · iterations / jobs."""
    methods = [r["method"] for r in cost["rows"]]
    return _seconds_per_iteration(cost, methods, cost["labeled"]) * cost["config"]["iterations"] / max(1, cost["jobs"])


def cost_markdown(cost: dict) -> str:
    env, jobs, key, load = cost["environment"], cost["jobs"], cost.get("estimate_from", "wall_s_per_it"), cost["load_average"]
    its, labeled = cost["config"]["iterations"], cost["labeled"]
    lines = [f"# Cost per training iteration: profile `{cost['profile']}`", "",
             f"Device {env['device']} ({env['machine']}), {env['cpu_threads']} torch threads per run, {jobs} run(s) at "
             f"a time; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} while measuring (other users "
             f"included); {cost['measured_iterations']} timed steps after 2 warm-up steps; date {env['date']}.", "",
             "| method | wall s / it | CPU s / it | runs | run time, min (one seed) |", "|---|---|---|---|---|"]
    for r in cost["rows"]:
        k = 1 if r["method"] == "full" else len(labeled)
        lines.append(f"| {r['method']} | {r['wall_s_per_it']:.3f} | {r['cpu_s_per_it']:.3f} | {k} | "
                     f"{r[key] * its * k / 60:.1f} |")
    basis = ("CPU seconds per iteration (one thread per run), largely independent of other users' load"
             if key == "cpu_s_per_it" else f"wall seconds per iteration with {jobs} run(s) sharing the device")
    lines += ["", f"Estimated training time of the profile ({its} iterations, one seed, labeled {labeled}) with "
              f"{jobs} run(s) at a time, from {basis}: **{estimated_seconds(cost) / 60:.0f} min** (validation, test "
              "evaluation and data loading not included).", ""]
    return "\n".join(lines)


def fit_iterations(cost: dict, methods: list[str], labeled: list[int], jobs: int, seconds: float, step: int = 50) -> int:
    """Iterations such that Σ_runs (s/it) · iterations / jobs ≈ `seconds` (runs packed `jobs` at a time), rounded
    down to a multiple of `step` (at least `step`). s/it comes from `measure_profile` with the same job count."""
    return max(step, int(seconds * max(1, jobs) / _seconds_per_iteration(cost, methods, labeled)) // step * step)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    ap.add_argument("--methods", nargs="+", default=None, help="rows to run, by space or comma (default: the "
                    "profile's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--labeled", type=int, nargs="+", default=None, help="labeled counts (default: the profile's)")
    ap.add_argument("--iterations", type=int, default=None, help="override the profile's iterations (reported)")
    ap.add_argument("--data", default=None, help="a data-set folder to use instead of the profile's default")
    ap.add_argument("--la-source", default=None, help="LA2018 h5 layout to import for la-quick (default ../shared/data/LA2018)")
    ap.add_argument("--train-list", default=None, help="training cases in order (the first N are labeled)")
    ap.add_argument("--val-list", default=None, help="validation cases (model selection)")
    ap.add_argument("--test-list", default=None, help="test cases")
    ap.add_argument("--method-option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                    help="a method option on top of the profile's, e.g. brl:beta=0.3 (repeatable; printed in the table)")
    ap.add_argument("--row-config", action="append", default=[], metavar="ROW:KEY=VALUE",
                    help="a training setting of one row on top of the profile's (e.g. bcp:pretrain_iterations=1000)")
    ap.add_argument("--network", action="append", default=[], metavar="KEY=VALUE",
                    help="a NetworkConfig field on top of the profile's network, e.g. features=8 (repeatable; printed "
                    "in the table)")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: the profile's, i.e. auto)")
    # Two single-threaded runs use two cores better than one run with two threads (no idle thread per step).
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (processes; default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    ap.add_argument("--work", default="benchmarks/work")
    ap.add_argument("--results", default=str(RESULTS), help="folder for the JSON and markdown results")
    ap.add_argument("--out-name", default=None)
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs already in the results JSON (same profile, data and config) and do the rest; a run "
                    "trained with other method options or row settings than its task now is run again")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="also keep the runs of these result files (same profile, data and config), e.g. methods run "
                    "by another process")
    ap.add_argument("--measure", type=int, default=None, metavar="STEPS",
                    help="only time STEPS training iterations of each method and estimate the profile's cost")
    ap.add_argument("--fit-seconds", type=float, default=None, metavar="S",
                    help="choose the iteration count so that training takes about S seconds with --jobs runs at a "
                    "time, from a --measure result (--cost); the table flags the reduced run")
    ap.add_argument("--cost", default=None, help="a --measure JSON of this profile on this device (for --fit-seconds)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    profile = PROFILES[args.profile]
    methods = [m for arg in args.methods for m in arg.split(",") if m] if args.methods else profile.methods
    bad = unknown_rows(methods)
    if bad:
        from SSLSegmentLib.ml.methods import available_methods

        ap.error(f"unknown method(s) {bad}; available: full, "
                 f"{', '.join(list(available_methods()) + sorted(ROW_VARIANTS))}")
    try:
        with_network_options(profile.config, network_options(args))
    except ValueError as e:
        ap.error(str(e))
    seeds = args.seeds or profile.seeds
    work, results = Path(args.work), Path(args.results)
    if args.measure:
        out_name = args.out_name or f"cost-{profile.name}"
        measure_profile(profile, work, methods, args.measure, out_name, args, results)
        print((results / f"{out_name}.md").read_text())
        return 0
    out_name = args.out_name or ("ssl" if profile.name == "quick" else f"ssl-{profile.name}")
    if args.fit_seconds:
        if not args.cost:
            ap.error("--fit-seconds needs --cost (a --measure result)")
        args.iterations = fit_iterations(json.loads(Path(args.cost).read_text()), methods,
                                         args.labeled or profile.n_labeled, args.jobs, args.fit_seconds)
        profile = Profile(**{**profile.__dict__, "notes": profile.notes + [
            f"Iterations chosen to fit about {args.fit_seconds:.0f} s of training with {args.jobs} runs at a time, "
            f"from seconds per iteration measured on this device ({args.cost})."]})
        print(f"[bench] fitted iterations: {args.iterations}", flush=True)
    result = run_profile(profile, work, methods, seeds, out_name, args, results)
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
