"""`make bench`: SSL methods side by side, same seed, budget and network, on a fixed data split.

    python -m training.bench.ssl --profile quick [--seeds 0 1 2] [--methods supervised brl ...]

Writes benchmarks/results/ssl[-PROFILE].json and .md: Dice, Jaccard, HD95, ASD (mean ± sd over test cases, and over
seeds when several) and gap closed = (method − supervised) / (full − supervised) on mean Dice.
"full" is supervised training with every training case labeled (the upper reference).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from SSLSegmentLib.networks import NetworkConfig
from SSLSegmentLib.trainer import TrainConfig
from training.experiment import environment, run_experiment

RESULTS = Path("benchmarks/results")
METRICS = ("dice", "jaccard", "hd95_vox", "asd_vox")


@dataclass
class Profile:
    """A benchmark set-up. `data` builds (or names) the data-set folder; `config` is shared by every method."""

    name: str
    description: str
    n_labeled: list[int]
    config: dict
    methods: list[str]
    make_data: object = None  # callable(work_dir) -> data folder
    seeds: list[int] = field(default_factory=lambda: [0])


def _phantom_data(work: Path, n_train=40, n_val=8, n_test=12, shape=(40, 64, 64), seed=0, difficulty=1.0) -> Path:
    from SSLSegmentLib.data.phantoms import PhantomConfig, write_phantom_dataset

    out = work / f"phantoms-{n_train}-{n_val}-{n_test}-{'x'.join(map(str, shape))}-d{difficulty}-s{seed}"
    if not (out / "dataset.json").is_file():
        write_phantom_dataset(out, n_train, n_val, n_test, PhantomConfig(shape=shape, difficulty=difficulty), seed=seed, progress=True)
    return out


DEFAULT_METHODS = ["supervised", "full", "mean-teacher", "ua-mt", "brl"]

PROFILES: dict[str, Profile] = {
    "quick": Profile(
        name="quick",
        description="phantoms 40 train (4 labeled = 10%) / 8 val / 12 test at 40×64×64, CPU, default UNet",
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
        make_data=lambda work: _phantom_data(work),
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
        make_data=lambda work: _phantom_data(work, 8, 2, 2, (24, 32, 32)),
    ),
}


def _mean_sd(values):
    v = np.array([x for x in values if x is not None and math.isfinite(x)], float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def run_profile(profile: Profile, work: Path, methods: list[str], seeds: list[int], out_name: str) -> dict:
    data = profile.make_data(work)
    runs = []
    for n_labeled in profile.n_labeled:
        for seed in seeds:
            for method in methods:
                full = method == "full"
                cfg = TrainConfig(method="supervised" if full else method, seed=seed, **profile.config)
                out_dir = work / "runs" / profile.name / f"l{n_labeled}" / f"s{seed}" / method
                t0 = time.time()
                print(f"[bench] {profile.name} labeled={n_labeled} seed={seed} {method}", flush=True)
                res = run_experiment(data, cfg, None if full else n_labeled, out_dir, progress_bar=False)
                s = res["test"]["summary"]
                runs.append(
                    {
                        "method": method,
                        "n_labeled": n_labeled,
                        "seed": seed,
                        "test": {k: s[k]["mean"] for k in METRICS},
                        "test_sd_over_cases": {k: s[k]["sd"] for k in METRICS},
                        "undefined_cases": s["hd95_vox"]["n_undefined"],
                        "best_val_dice": res["train"]["best_val_dice"],
                        "best_step": res["train"]["best_step"],
                        "train_seconds": res["train"]["seconds"],
                        "wall_seconds": time.time() - t0,
                        "method_options": res["method_options"],
                        "checkpoint": res["checkpoint"],
                    }
                )
                print(f"[bench]   test Dice {s['dice']['mean']:.4f}  ({time.time() - t0:.0f} s)", flush=True)
    summary = summarize_runs(runs, methods, profile.n_labeled)
    result = {
        "profile": profile.name,
        "description": profile.description,
        "data": str(data),
        "config": TrainConfig(**profile.config).to_dict(),
        "seeds": seeds,
        "environment": environment(),
        "runs": runs,
        "summary": summary,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{out_name}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{out_name}.md").write_text(markdown_table(result))
    return result


def summarize_runs(runs: list[dict], methods: list[str], labeled: list[int]) -> dict:
    out = {}
    for n in labeled:
        rows = {}
        for m in methods:
            rs = [r for r in runs if r["method"] == m and r["n_labeled"] == n]
            if not rs:
                continue
            if len(rs) > 1:  # across seeds: mean ± sd of the per-seed means
                rows[m] = {k: _mean_sd([r["test"][k] for r in rs]) for k in METRICS}
            else:  # one seed: mean ± sd over test cases
                rows[m] = {k: (rs[0]["test"][k], rs[0]["test_sd_over_cases"][k]) for k in METRICS}
            rows[m]["seconds"] = float(np.mean([r["train_seconds"] for r in rs]))
        sup, full = rows.get("supervised"), rows.get("full")
        for m, row in rows.items():
            if sup and full and full["dice"][0] != sup["dice"][0]:
                row["gap_closed"] = (row["dice"][0] - sup["dice"][0]) / (full["dice"][0] - sup["dice"][0])
            else:
                row["gap_closed"] = math.nan
        out[str(n)] = rows
    return out


def markdown_table(result: dict) -> str:
    env = result["environment"]
    seeds = result["seeds"]
    sd_note = "sd over seeds (per-seed test means)" if len(seeds) > 1 else "sd over test cases"
    lines = [
        f"# SSL benchmark: profile `{result['profile']}`",
        "",
        f"{result['description']}. Seeds {seeds}; {sd_note}. Test split of the data set; model selection on the "
        f"validation split (best validation Dice checkpoint).",
        "",
        f"Machine: {env['machine']} ({env['processor']}), {env['cpu_threads']} torch threads, device {env['device']}; "
        f"Python {env['python']}, torch {env['torch']}, MONAI {env['monai']}; date {env['date']}.",
        "",
        f"Config: {json.dumps({k: result['config'][k] for k in ('patch_size', 'iterations', 'lr', 'lr_schedule', 'batch_labeled', 'batch_unlabeled', 'ema_decay')})}",
        "",
    ]
    for n, rows in result["summary"].items():
        lines += [
            f"## {n} labeled",
            "",
            "| method | Dice % | Jaccard % | HD95 (vox) | ASD (vox) | gap closed | train s |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, r in rows.items():
            d, j, h, a = r["dice"], r["jaccard"], r["hd95_vox"], r["asd_vox"]
            gap = "" if not math.isfinite(r["gap_closed"]) or m in ("supervised", "full") else f"{100 * r['gap_closed']:.0f}%"
            lines.append(
                f"| {m} | {100 * d[0]:.2f} ± {100 * d[1]:.2f} | {100 * j[0]:.2f} ± {100 * j[1]:.2f} | "
                f"{h[0]:.2f} ± {h[1]:.2f} | {a[0]:.2f} ± {a[1]:.2f} | {gap} | {r['seconds']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--work", default="benchmarks/work")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-name", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    profile = PROFILES[args.profile]
    methods = args.methods or profile.methods
    seeds = args.seeds or profile.seeds
    out_name = args.out_name or ("ssl" if profile.name == "quick" else f"ssl-{profile.name}")
    result = run_profile(profile, Path(args.work), methods, seeds, out_name)
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
