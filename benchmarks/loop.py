"""`make bench-loop`: the interactive-refinement loop as a benchmark (the demo's loop without the pictures).

    python -m benchmarks.loop --profile quick            # phantoms, 3 seeds   → benchmarks/results/loop.json/.md
    python -m benchmarks.loop --profile la               # LA2018, 3 seeds     → benchmarks/results/loop-la.json/.md
    python -m benchmarks.loop --profile la --la-source PATH | --data IMPORTED_FOLDER

Per seed: a data set (phantoms: generated with the seed; LA: fixed splits), a brl teacher trained by the real worker,
then every arm from that teacher on its own datastore copy with its own server + worker on 127.0.0.1 (see
benchmarks/refinement.py). Reported per arm: test Dice after each round, reviewed and fixed voxels, gains per 1000
reviewed voxels (raw, and beyond the retrain-only arm), the ratio guided / random, error detection of the uncertainty
map on the test split (AUROC, share of the wrong voxels in the 5 % most uncertain), and the fold-in comparison:
guided corrections folded in through the reviewed mask vs the same corrections taken as full labels.
Results are rewritten after every seed, so a cut-off run keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.refinement import (Console, LoopConfig, finetune_params, gain_ratio, guided_vs_random, run_loop,
                                   set_gains_vs_none)
from training.retrain import RetrainSchedule

RESULTS = Path("benchmarks/results")
REPO = Path(__file__).resolve().parents[1]
MAIN_ARMS = ["uncertainty", "random", "boundary", "oracle", "none", "uncertainty-full-label", "whole_case"]


@dataclass
class Profile:
    name: str
    description: str
    loop: dict
    seeds: list = field(default_factory=lambda: [0])
    out_name: str = "loop"
    val_phantoms: int = 4


def _phantoms(work: Path, seed: int, n_val: int = 4) -> Path:
    """24 train / `n_val` val / 6 test phantoms of `seed`. Validation phantoms beyond the first 4 are drawn after the
    test ones, so the train and test cases stay those of the 4-case runs and results stay paired across them."""
    from SSLSegmentLib.data.phantoms import PhantomConfig, write_phantom_dataset

    if n_val < 4:
        raise ValueError(f"the loop's phantom split needs at least 4 validation cases, got {n_val}")
    out = work / f"loop-phantoms-24-{n_val}-6-s{seed}"
    if (out / "dataset.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write_phantom_dataset(tmp, 24, 4, 6 + n_val - 4, PhantomConfig(), seed=seed)
    meta = json.loads((tmp / "dataset.json").read_text())
    rest = meta["splits"]["test"]
    meta["splits"]["val"] += rest[6:]
    meta["splits"]["test"] = rest[:6]
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _la(work: Path, source: str | None) -> Path:
    """LA2018 at half resolution, imported once into WORK (the same folder `make bench` uses); never committed."""
    out = work / "la2018-half"
    if (out / "dataset.json").is_file():
        return out
    from SSLSegmentLib.data.la import import_la

    src = Path(source or os.environ.get("SSLSEGMENT_LA2018", REPO.parent / "shared" / "data" / "LA2018"))
    if not (src / "train.list").is_file():
        raise FileNotFoundError(f"LA2018 not found at {src}: pass --la-source (the h5 layout) or --data (an imported folder)")
    import_la(src, out, half_res=True, progress=True)
    return out


PROFILES = {
    "quick": Profile(
        name="quick",
        description="phantoms 24 train (4 labeled) / 10 val / 6 test at 40×64×64 per seed, default UNet, brl teacher "
                    "300 iterations; 4 rounds × 2 cases, 2 % review budget per case, retrains sized by the worker's schedule",
        loop=dict(arms=MAIN_ARMS, rounds=4, cases_per_round=2, budget_fraction=0.02, n_labeled=4,
                  teacher={"method": "brl", "iterations": 300, "lr": 0.02, "lr_schedule": "poly", "val_interval": 100},
                  finetune={}),
        seeds=[0, 1, 2],
        out_name="loop",
        # 4 validation phantoms could not tell a retrain that fixes one case a lot from harm (docs/refinement.md).
        val_phantoms=10,
    ),
    "la": Profile(
        name="la",
        description="LA2018 (real LGE-MRI) at half resolution (1.25 mm), 60 train (8 labeled) / 10 val / 10 test, "
                    "default UNet, patches 48×48×32 (x×y×z), brl teacher of la-quick's schedule (2000 iterations, "
                    "lr 0.03 poly, its brl options); 4 rounds × 2 cases, 2 % review budget per case, retrains sized "
                    "by the worker's schedule",
        # The teacher converged as la-quick trains it (docs/methods.md), not early-stopped: a teacher at 58 % Dice
        # (450 iterations) is wrong on four times the voxels a review budget can reach.
        loop=dict(arms=["uncertainty", "random", "oracle", "none", "whole_case", "uncertainty-full-label"], rounds=4,
                  cases_per_round=2, budget_fraction=0.02, n_labeled=8,
                  teacher={"method": "brl", "iterations": 2000, "lr": 0.03, "lr_schedule": "poly", "val_interval": 400,
                           "patch_size": [32, 48, 48], "method_options": {"beta": 0.3, "consistency_weight": 0.1}},
                  finetune={}),
        seeds=[0, 1, 2],
        out_name="loop-la",
    ),
    "smoke": Profile(
        name="smoke",
        description="tiny phantoms and networks: checks the benchmark machinery only",
        loop=dict(arms=["uncertainty", "random", "none"], rounds=1, cases_per_round=1, budget_fraction=0.05,
                  n_labeled=2,
                  teacher={"method": "brl", "iterations": 30, "lr": 0.02, "val_interval": 15, "patch_size": [16, 32, 32],
                           "network": {"channels": [8, 16, 32], "strides": [2, 2], "features": 8, "num_res_units": 1}},
                  finetune={"iterations": 10, "lr": 0.003, "eval_model": "teacher", "val_interval": 10},
                  infer={"passes": 2}, eval_passes=2),
        seeds=[0],
        out_name="loop-smoke",
    ),
}


def _mean_sd(values):
    v = np.array([x for x in values if x is not None and isinstance(x, (int, float)) and math.isfinite(x)], float)
    if v.size == 0:
        return None, None
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else 0.0)


def aggregate(runs: list[dict]) -> dict:
    """Mean ± sd over seeds of each arm's numbers, the guided / random ratios, error detection, the fold-in test."""
    arms = []
    for r in runs:
        for a in r["summary"]["arms"]:
            if a not in arms:
                arms.append(a)
    out = {"arms": {}, "n_seeds": len(runs)}
    keys = ("gain", "gain_per_1000", "gain_vs_none", "gain_vs_none_per_1000", "fixed_per_1000", "case_gain_per_1000",
            "reviewed_voxels", "edited_voxels")
    for a in arms:
        rows = [r["summary"]["arms"][a] for r in runs if a in r["summary"]["arms"]]
        n_rounds = len(rows[0]["dice"])
        agg = {"dice": [_mean_sd([row["dice"][i] for row in rows]) for i in range(n_rounds)],
               "promoted": [sum(row["promoted"]) for row in rows], "n": len(rows)}
        for k in keys:
            agg[k] = _mean_sd([row[k] for row in rows])
        agg["gain_vs_none_per_seed"] = [row["gain_vs_none"] for row in rows]
        agg["retention"] = _mean_sd([row.get("retention") for row in rows])
        if all("cumulative_effort" in row for row in rows):
            agg["cumulative_effort"] = [_mean_sd([row["cumulative_effort"][i] for row in rows]) for i in range(n_rounds)]
        agg["auroc_final"] = _mean_sd([row["error_detection_final"].get("auroc") for row in rows])
        agg["top5_final"] = _mean_sd([row["error_detection_final"].get("top5_recall") for row in rows])
        out["arms"][a] = agg
    ratios = {}
    for key in ("fixed_per_1000", "case_gain_per_1000", "gain_per_1000", "gain_vs_none_per_1000"):
        per_seed = [gain_ratio(r["summary"]["arms"].get("uncertainty", {}).get(key),
                               r["summary"]["arms"].get("random", {}).get(key)) for r in runs]
        g, rnd = out["arms"].get("uncertainty", {}).get(key), out["arms"].get("random", {}).get(key)
        of_means = gain_ratio(g[0], rnd[0]) if g and rnd else None
        ratios[key] = {"of_means": of_means, "per_seed": per_seed}
    out["guided_vs_random"] = ratios
    out["teacher"] = {"dice": _mean_sd([r["summary"]["teacher_dice"] for r in runs]),
                      "auroc": _mean_sd([r["summary"]["teacher_error_detection"].get("auroc") for r in runs]),
                      "top5": _mean_sd([r["summary"]["teacher_error_detection"].get("top5_recall") for r in runs]),
                      "error_rate": _mean_sd([r["summary"]["teacher_error_detection"].get("error_rate") for r in runs])}
    if "uncertainty" in out["arms"] and "uncertainty-full-label" in out["arms"]:
        part = [r["summary"]["arms"]["uncertainty"]["dice"][-1] for r in runs if "uncertainty-full-label" in r["summary"]["arms"]]
        full = [r["summary"]["arms"]["uncertainty-full-label"]["dice"][-1] for r in runs
                if "uncertainty-full-label" in r["summary"]["arms"]]
        diff = _mean_sd([p - f for p, f in zip(part, full)])
        out["fold_in"] = {"reviewed_mask": _mean_sd(part), "full_label": _mean_sd(full), "difference": diff,
                          "per_seed": [p - f for p, f in zip(part, full)],
                          "winner": None if diff[0] is None else ("reviewed mask" if diff[0] > 0 else
                                                                 "full label" if diff[0] < 0 else "tie")}
    return out


def _f(ms, scale=100.0, digits=2, sign=False):
    if ms is None or ms[0] is None:
        return "n/a"
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    m = fmt.format(scale * ms[0])
    return m if not ms[1] else f"{m} ± {scale * ms[1]:.{digits}f}"


def markdown(result: dict) -> str:
    env, agg, cfg = result["environment"], result["aggregate"], result["config"]
    seeds = result["seeds"]
    rounds = cfg["rounds"]
    names = {"uncertainty": "uncertainty-guided (ours)", "random": "random regions, same sizes",
             "boundary": "random regions on the predicted edge", "oracle": "oracle (largest errors)",
             "none": "no correction (retrain only)", "uncertainty-full-label": "guided, folded in as full label",
             "whole_case": "whole-case labeling (most uncertain case, final label)"}
    sd_note = "mean ± sd over seeds" if len(seeds) > 1 else "one seed"
    lines = [
        f"# Refinement-loop benchmark: profile `{result['profile']}`",
        "",
        f"{result['description']}. Seeds {seeds} ({sd_note}). Each arm starts from the same teacher and reviews the "
        f"same number of voxels per case; cases come from `GET /cases/next?strategy=uncertainty` of the arm's own "
        f"backend; retrains go through the real worker (promotion on the validation split, tolerance 0.02).",
        "",
        f"Machine: {env['machine']} ({env['processor']}), {env['cpu_threads']} torch thread(s), device {env['device']}; "
        f"Python {env['python']}, torch {env['torch']}, MONAI {env['monai']}; date {env['date']}. "
        f"Wall {result['seconds']:.0f} s" + _merged_words(result)
        + f", CPU {result['cpu_seconds']:.0f} s in all (the loop, servers and workers).",
        "",
        f"Retrain: {_retrain_sentence(cfg)} Teacher: {json.dumps(cfg['teacher'])}.",
        "",
        "## Test Dice (%) after each round",
        "",
        "| strategy | " + " | ".join(["start"] + [f"round {i}" for i in range(1, rounds + 1)]) + " | versions promoted |",
        "|---|" + "---|" * (rounds + 2),
    ]
    for a, row in agg["arms"].items():
        lines.append(f"| {names.get(a, a)} | " + " | ".join(_f(d) for d in row["dice"]) +
                     f" | {sum(row['promoted'])}/{rounds * row['n']} |")
    lines += [
        "",
        "## Effort and gains",
        "",
        "Reviewed voxels = the clinician's effort (the corrections' reviewed masks), over all rounds. Gains in Dice % "
        "points; *beyond retraining* subtracts the no-correction arm's final Dice (same seeds, same retrains).",
        "",
        "| strategy | reviewed voxels | fixed voxels | fixed per 1000 reviewed | case Dice gain per 1000 reviewed | "
        "test Dice gain | per 1000 reviewed | beyond retraining | beyond retraining, per 1000 reviewed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a, row in agg["arms"].items():
        lines.append(
            f"| {names.get(a, a)} | {_f(row['reviewed_voxels'], 1, 0)} | {_f(row['edited_voxels'], 1, 0)} | "
            f"{_f(row['fixed_per_1000'], 1, 0)} | {_f(row['case_gain_per_1000'], 100, 2)} | {_f(row['gain'], sign=True)} | "
            f"{_f(row['gain_per_1000'], 100, 3, True)} | {_f(row['gain_vs_none'], sign=True)} | "
            f"{_f(row['gain_vs_none_per_1000'], 100, 3, True)} |")
    lines += [
        "",
        "## Test Dice against cumulative effort",
        "",
        "Per arm and round: the reviewed voxels so far (whole-case labeling: its cases' target boxes plus a margin, "
        "`simulated_clinician.plan_whole_case`) → test Dice %. Retention: the fraction of the corrections' reviewed "
        "voxels the current model reproduces after the last retrain; *beyond retraining per seed*: final Dice minus "
        "the no-correction arm's, seed by seed.",
        "",
        "| strategy | " + " | ".join(["start"] + [f"round {i}" for i in range(1, rounds + 1)]) +
        " | retention | beyond retraining per seed |",
        "|---|" + "---|" * (rounds + 3),
    ]
    for a, row in agg["arms"].items():
        effort = row.get("cumulative_effort") or [None] * len(row["dice"])
        cells = [("" if e is None or e[0] is None else f"{e[0]:.0f} → ") + _f(d) for e, d in zip(effort, row["dice"])]
        per_seed = ", ".join("n/a" if g is None else f"{100 * g:+.2f}" for g in row.get("gain_vs_none_per_seed", []))
        lines.append(f"| {names.get(a, a)} | " + " | ".join(cells) +
                     f" | {_f(row.get('retention'), 100, 1)} | {per_seed} |")
    rat = agg["guided_vs_random"]

    def r(key):
        v = rat.get(key, {})
        per = ", ".join("n/a" if x is None else f"{x:.1f}" for x in v.get("per_seed", []))
        return ("n/a" if v.get("of_means") is None else f"×{v['of_means']:.1f}") + (f" (per seed: {per})" if per else "")

    lines += [
        "",
        "**Guided / random, same effort:** wrong voxels fixed per reviewed voxel " + r("fixed_per_1000") +
        "; Dice gain of the reviewed cases per reviewed voxel " + r("case_gain_per_1000") +
        "; test Dice gain per reviewed voxel " + r("gain_per_1000") +
        "; beyond retraining alone " + r("gain_vs_none_per_1000") + ".",
        "",
        "## Error detection of the uncertainty map (test split)",
        "",
        "| model | AUROC (uncertainty → wrong voxel) | wrong voxels in the top 5 % most uncertain |",
        "|---|---|---|",
        f"| teacher | {_f(agg['teacher']['auroc'], 1, 3)} | {_f(agg['teacher']['top5'], 100, 1)} % |",
    ]
    for a, row in agg["arms"].items():
        lines.append(f"| after {names.get(a, a)} | {_f(row['auroc_final'], 1, 3)} | {_f(row['top5_final'], 100, 1)} % |")
    lines.append(f"\nTest error rate of the teacher: {_f(agg['teacher']['error_rate'], 100, 2)} % of the voxels.")
    fold = agg.get("fold_in")
    if fold:
        lines += [
            "",
            "## Folding in: reviewed mask vs full label",
            "",
            "The same guided reviews, submitted as a correction (only the reviewed voxels count as labeled; the rest of "
            "the case is learned from like unlabeled data) or as a final label (the corrected segmentation taken as "
            "truth everywhere, as MONAI Label does).",
            "",
            "| fold-in | test Dice after the last round (%) |",
            "|---|---|",
            f"| reviewed mask (ours) | {_f(fold['reviewed_mask'])} |",
            f"| full label | {_f(fold['full_label'])} |",
            "",
            f"Difference (reviewed mask − full label): {_f(fold['difference'], sign=True)} points "
            f"(per seed: {', '.join(f'{100 * d:+.2f}' for d in fold['per_seed'])}); "
            f"{'winner: ' + fold['winner'] if fold['winner'] else ''}.",
        ]
    lines += ["", "## Verdict", "", verdict(agg)]
    if result.get("note"):
        lines += ["", "## Note", "", result["note"]]
    lines.append("")
    return "\n".join(lines)


def verdict(agg: dict) -> str:
    """The goal of the loop in one paragraph: does guided review beat random review of the same effort, per reviewed
    voxel, and by 2x? Written from the numbers (model-level and case-level separately)."""
    rat = agg["guided_vs_random"]
    out = []
    fixed = rat.get("fixed_per_1000", {}).get("of_means")
    case = rat.get("case_gain_per_1000", {}).get("of_means")
    if fixed is not None:
        out.append(f"Per reviewed voxel, the uncertainty-guided review fixes ×{fixed:.1f} as many wrong voxels as random "
                   f"regions of the same sizes" + (f" and raises the reviewed cases' Dice ×{case:.1f} as much" if case else "")
                   + ".")
    g = agg["arms"].get("uncertainty", {})
    r = agg["arms"].get("random", {})
    for key, what in (("gain_per_1000", "test Dice gain per 1000 reviewed voxels"),
                      ("gain_vs_none_per_1000", "the same beyond retraining alone")):
        gv, rv = (g.get(key) or (None,))[0], (r.get(key) or (None,))[0]
        if gv is None or rv is None:
            continue
        ratio = rat.get(key, {}).get("of_means")
        text = f"On the model ({what}) guided {100 * gv:+.3f} vs random {100 * rv:+.3f} Dice points"
        if ratio is not None:
            text += f": ×{ratio:.1f}, which {'reaches' if ratio >= 2 else 'does not reach'} 2×."
        elif gv > 0 >= rv:
            text += ": random gained nothing, guided did (no finite ratio)."
        elif gv <= 0 and rv <= 0:
            text += ": neither gained" + (" (guided lost less)." if gv > rv else ".")
        else:
            text += ": guided gained nothing."
        out.append(text)
    out.append("Why the model-level numbers are small and noisy, and what would change them: docs/refinement.md, "
               "\"Results\".")
    return " ".join(out)


def render(json_path: str | Path) -> Path:
    """Rewrite a result JSON's aggregate and its markdown with the current code, from the runs it holds (no training)."""
    path = Path(json_path)
    result = json.loads(path.read_text())
    for run in result["runs"]:
        run["summary"]["guided_vs_random"] = guided_vs_random(run["summary"]["arms"])
    result["aggregate"] = aggregate(result["runs"])
    _write_files(path, result)
    return path.with_suffix(".md")


def _merged_words(result: dict) -> str:
    """What the wall time of a merged result is."""
    if not result.get("merged_from"):
        return ""
    n = len(result["merged_from"])
    if result.get("joined_arms"):
        return f" (the longest seed, the invocations of its arm groups added; {n} invocations in all)"
    return f" (the longest of {n} invocations run side by side, one per seed group)"


def _join_arms(seed: int, parts: list[dict], paths: list) -> dict:
    """One run record of a seed whose arms ran in several invocations: the same teacher (checked by its test Dice
    and the data folder), disjoint arms; gains beyond retraining and the guided / random ratios are recomputed
    against the joined arms, as summarize computes them within one run."""
    first = parts[0]
    arms, summary_arms = {}, {}
    for path, run in zip(paths, parts):
        both = sorted(set(summary_arms) & set(run["summary"]["arms"]))
        if both:
            raise ValueError(f"{path}: seed {seed} is in two of the files with the same arm(s) {both}")
        if run["summary"]["teacher_dice"] != first["summary"]["teacher_dice"] or run.get("data") != first.get("data"):
            raise ValueError(f"{path}: seed {seed} started from another teacher or data set than in {paths[0]}")
        arms.update(run.get("arms", {}))
        summary_arms.update(run["summary"]["arms"])
    set_gains_vs_none(summary_arms)
    order = [a for a in MAIN_ARMS if a in summary_arms] + [a for a in summary_arms if a not in MAIN_ARMS]
    summary = {**first["summary"], "arms": {a: summary_arms[a] for a in order},
               "guided_vs_random": guided_vs_random(summary_arms)}
    return {**first, "arms": {a: arms[a] for a in order if a in arms}, "summary": summary,
            "seconds": round(sum(p["seconds"] for p in parts), 1),
            "cpu_seconds": round(sum(p["cpu_seconds"] for p in parts), 1)}


def merge(paths: list[str | Path], out_name: str) -> dict:
    """One result of several result files of the same loop run side by side, one invocation each: the
    configurations must agree but for the seed and the arms. A seed's arms may come from several files (the same
    teacher, each arm in one file only); the merged result holds the arms every seed has."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    first = results[0]
    same = {k: v for k, v in first["config"].items() if k != "arms"}
    by_seed: dict[int, list] = {}
    for path, res in zip(paths, results):
        if {k: v for k, v in res["config"].items() if k != "arms"} != same or res["profile"] != first["profile"]:
            raise ValueError(f"{path}: another loop configuration than {paths[0]}'s; only seeds and arms may differ")
        for run in res["runs"]:
            by_seed.setdefault(run["seed"], []).append((path, run))
    runs = []
    for seed in sorted(by_seed):
        group = by_seed[seed]
        if len(group) == 1:
            runs.append(group[0][1])
            continue
        runs.append(_join_arms(seed, [run for _, run in group], [path for path, _ in group]))
    arm_sets = [set(r["summary"]["arms"]) for r in runs]
    if any(a != arm_sets[0] for a in arm_sets):
        raise ValueError(f"the seeds hold different arms after merging: {[sorted(a) for a in arm_sets]}")
    joined = any(len(group) > 1 for group in by_seed.values())
    config = {**first["config"], "arms": list(runs[0]["summary"]["arms"])}
    merged = {**first, "config": config, "seeds": [r["seed"] for r in runs], "runs": runs, "aggregate": aggregate(runs),
              "seconds": round(max([r["seconds"] for r in results] + [r.get("seconds", 0.0) for r in runs]), 1),
              "cpu_seconds": round(sum(r["cpu_seconds"] for r in runs), 1), "joined_arms": joined,
              "merged_from": [{"file": Path(p).name, "seeds": r["seeds"], "arms": r["config"].get("arms"),
                               "seconds": r["seconds"], "date": r["environment"].get("date")}
                              for p, r in zip(paths, results)]}
    _write(merged, out_name)
    return merged


def _write(result: dict, out_name: str) -> None:
    _write_files(RESULTS / f"{out_name}.json", result)


def _write_files(json_path: Path, result: dict) -> None:
    from SSLSegmentLib.data.imageio import atomic_write_bytes

    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(json_path, json.dumps(result, indent=2, default=float).encode())
    atomic_write_bytes(json_path.with_suffix(".md"), markdown(result).encode())


def _run_record(seed: int, data: Path, res: dict) -> dict:
    arms = {}
    for a, rec in res["arms"].items():
        arms[a] = {
            "rounds": [{k: r.get(k) for k in ("round", "reviewed_voxels", "edited_voxels", "current_version",
                                               "test_dice", "seconds", "retention")} | {"job": r["job"],
                                                          "reviews": [{k: v[k] for k in ("case_id", "spent", "edited",
                                                                                         "errors_before", "dice_before",
                                                                                         "dice_after", "n_visited")}
                                                                      for v in r["reviews"]]}
                       for r in rec["rounds"]],
            "final_error_detection": rec["final_eval"]["error_detection"],
            "seconds": rec["seconds"], "cpu_seconds": rec.get("cpu_seconds"),
        }
    return {"seed": seed, "data": str(data), "teacher": res["teacher"], "summary": res["summary"], "arms": arms,
            "teacher_error_detection": res["teacher_eval"]["error_detection"],
            "teacher_found_curve": res["teacher_eval"]["found_curve"], "seconds": res["seconds"],
            "cpu_seconds": res["cpu_seconds"]}


def run_profile(profile: Profile, work: Path, seeds: list[int], threads: int, data: str | None = None,
                la_source: str | None = None, arms: list[str] | None = None, finetune_iterations: int | None = None,
                out_name: str | None = None, retrain: dict | None = None, finetune: dict | None = None,
                teacher_iterations: int | None = None) -> dict:
    """Every seed of `profile`; each invocation trains under WORK/loop/<result name>/, so two side by side with
    other result names never share (or delete) each other's datastores."""
    from benchmarks.experiment import environment

    runs, t0 = [], time.time()
    result = None
    for seed in seeds:
        if profile.name == "la":
            folder = Path(data) if data else _la(work, la_source)
        else:
            folder = Path(data) if data else _phantoms(work, seed, profile.val_phantoms)
        loop = dict(profile.loop)
        if arms:
            loop["arms"] = arms
        if finetune_iterations is not None:
            loop["finetune"] = {**loop["finetune"], **finetune_params(finetune_iterations)}
        if teacher_iterations is not None:
            loop["teacher"] = {**loop["teacher"], "iterations": teacher_iterations,
                               "val_interval": max(1, teacher_iterations // 3)}
        if finetune:
            loop["finetune"] = {**loop["finetune"], **finetune}
        if retrain:
            loop["retrain"] = {**loop.get("retrain", RetrainSchedule().to_dict()), **retrain}
        cfg = LoopConfig(**loop, seed=seed, threads=threads)
        run_dir = work / "loop" / (out_name or profile.out_name) / f"s{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        console = Console()
        console(f"[bench-loop] profile {profile.name}, seed {seed}, data {folder}")
        res = run_loop(folder, run_dir, cfg, console)
        runs.append(_run_record(seed, folder, res))
        result = {"profile": profile.name, "description": profile.description, "config": cfg.to_dict() | {"seed": None},
                  "seeds": [r["seed"] for r in runs], "environment": environment(), "runs": runs,
                  "aggregate": aggregate(runs), "seconds": round(time.time() - t0, 1),
                  "cpu_seconds": round(sum(r["cpu_seconds"] for r in runs), 1)}
        _write(result, out_name or profile.out_name)
    return result


def _retrain_sentence(cfg: dict) -> str:
    """What each retrain ran: the request's fixed parameters, or the worker's schedule with the iterations it chose
    (results written before the schedule carry no "retrain" and are described by their request alone)."""
    finetune = cfg.get("finetune", {})
    if "retrain" not in cfg or {"iterations", "lr"} & set(finetune):
        return f"{json.dumps(finetune)} (fixed by the request)."
    extra = f", with the request's {json.dumps(finetune)}" if finetune else ""
    return f"the worker's schedule {json.dumps(cfg['retrain'])} (training/retrain.py){extra}."


def retrain_options(pairs: list[str]) -> dict:
    """--retrain KEY=VALUE pairs (JSON values) checked against RetrainSchedule; ValueError names the bad one."""
    from training.commands import parse_key_values

    out = parse_key_values(pairs)
    RetrainSchedule.from_settings(out)
    return out


def finetune_options(pairs: list[str]) -> dict:
    """--finetune KEY=VALUE pairs → retrain request parameters; ValueError names a parameter POST /train does not
    take (the server checks the values)."""
    from training.commands import parse_key_values
    from training.jobs import PARAM_BY_NAME

    out = parse_key_values(pairs)
    unknown = sorted(set(out) - set(PARAM_BY_NAME))
    if unknown:
        raise ValueError(f"unknown training parameter(s) {unknown}; known: {sorted(PARAM_BY_NAME)}")
    return out


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--arms", nargs="+", default=None)
    ap.add_argument("--work", default="benchmarks/work")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest on a shared machine)")
    ap.add_argument("--data", default=None, help="an imported data-set folder instead of the profile's")
    ap.add_argument("--la-source", default=None, help="the LA2018 h5 layout (default ../shared/data/LA2018)")
    ap.add_argument("--render", default=None, metavar="JSON", help="only rewrite the markdown of a result JSON")
    ap.add_argument("--finetune-iterations", type=int, default=None, metavar="N",
                    help="iterations of each retrain (default: the profile's); the rest of the retrain as the profile's")
    ap.add_argument("--teacher-iterations", type=int, default=None, metavar="N",
                    help="iterations of the first model (default: the profile's; validation every N/3)")
    ap.add_argument("--retrain", nargs="+", default=[], metavar="KEY=VALUE",
                    help="the datastore's retrain schedule fields, e.g. per_new_case=90 lr=0.005 (JSON values)")
    ap.add_argument("--finetune", nargs="+", default=[], metavar="KEY=VALUE",
                    help="POST /train parameters of every retrain, e.g. reviewed_patch_share=0.9 (JSON values); "
                         "without iterations or lr the worker's schedule still sizes the run")
    ap.add_argument("--out-name", default=None, help="result file name (default: the profile's)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="only combine the seeds of result files of the same loop into --out-name (no training)")
    args = ap.parse_args(argv)
    if args.merge:
        try:
            print(markdown(merge(args.merge, args.out_name or PROFILES[args.profile].out_name)))
        except (ValueError, KeyError) as exc:
            ap.error(str(exc))
        return 0
    try:
        retrain = retrain_options(args.retrain)
        finetune = finetune_options(args.finetune)
        if args.teacher_iterations is not None and args.teacher_iterations < 1:
            raise ValueError(f"--teacher-iterations must be >= 1, got {args.teacher_iterations}")
    except ValueError as exc:
        ap.error(str(exc))
    if args.render:
        print(render(args.render))
        return 0
    torch.set_num_threads(args.threads)
    profile = PROFILES[args.profile]
    result = run_profile(profile, Path(args.work), args.seeds or profile.seeds, args.threads, args.data,
                         args.la_source, args.arms, args.finetune_iterations, args.out_name, retrain, finetune,
                         args.teacher_iterations)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
