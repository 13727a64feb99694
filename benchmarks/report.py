"""The refinement loop's report: a markdown page with PNG pictures, written under the run folder.

    write_report(result, out_dir) -> out_dir/report.md (+ loop.json and the PNGs next to it)

`result` is what `benchmarks.refinement.run_loop` returns (its `_detail` arrays feed the pictures). Pictures are meant to
be read at a glance by a clinician: one message per picture, plain-language titles and axis labels, the product's
strategy always in the same warm colour, the references in greys and green.
"""

from __future__ import annotations

import math
import textwrap
import time
from pathlib import Path

import numpy as np

ARM_STYLE = {
    "uncertainty": ("#d7301f", "-", "o", "uncertainty-guided regions (ours)"),
    "uncertainty-full-label": ("#f4a582", "-", "D", "guided, folded in as a full label"),
    "random": ("#7f7f7f", "-", "s", "random regions, same sizes"),
    "boundary": ("#4a7fb5", "-", "^", "random regions on the predicted edge"),
    "oracle": ("#1a9850", "--", "v", "oracle: largest error components"),
    "none": ("#000000", ":", "x", "no correction (retrain only)"),
    "whole_case": ("#762a83", "-.", "P", "whole-case labeling (final label)"),
}


def _style(arm: str):
    return ARM_STYLE.get(arm, ("#984ea3", "-", "o", arm))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


# -- pictures ------------------------------------------------------------------------------------------------------
def plot_dice_per_round(summary: dict, path: Path) -> str:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4))
    for arm, row in summary["arms"].items():
        c, ls, m, label = _style(arm)
        dice = 100 * np.asarray(row["dice"])
        a1.plot(range(len(dice)), dice, color=c, ls=ls, marker=m, lw=2.5 if arm == "uncertainty" else 1.6, label=label)
        cum = np.concatenate([[0], np.cumsum(row["reviewed_per_round"])]) / 1000.0
        if arm != "none":
            a2.plot(cum, dice, color=c, ls=ls, marker=m, lw=2.5 if arm == "uncertainty" else 1.6, label=label)
    none = summary["arms"].get("none")
    if none:
        a2.axhline(100 * none["dice"][-1], color="#000000", ls=":", lw=1.2, label="no correction, after the last retrain")
    a1.set(xlabel="round (review, then retrain)", ylabel="test Dice (%)", title="Test Dice after each round")
    a1.set_xticks(range(len(next(iter(summary["arms"].values()))["dice"])))
    a2.set(xlabel="voxels reviewed so far (thousands)", ylabel="test Dice (%)", title="Test Dice against clinician effort")
    a1.grid(alpha=0.3)
    a2.grid(alpha=0.3)
    handles, labels = a1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=3, frameon=False, bbox_to_anchor=(0.5, 0.0))
    return _save(fig, path)


def plot_efficiency(summary: dict, path: Path) -> str:
    plt = _plt()
    arms = [a for a in summary["arms"] if a != "none"]
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.2), gridspec_kw={"wspace": 0.35})
    panels = [
        ("fixed_per_1000", 1.0, "wrong voxels fixed\nper 1000 reviewed voxels", "How much of the review landed on errors"),
        ("gain_vs_none_per_1000" if "none" in summary["arms"] else "gain_per_1000", 100.0,
         "test Dice gain (% points)\nper 1000 reviewed voxels", "What the corrections bought the model"
         + (" (vs no correction)" if "none" in summary["arms"] else "")),
    ]
    for ax, (key, scale, ylabel, title) in zip(axes, panels):
        vals = [summary["arms"][a][key] for a in arms]
        ys = [scale * v if v is not None else 0.0 for v in vals]
        colors = [_style(a)[0] for a in arms]
        bars = ax.bar(range(len(arms)), ys, color=colors)
        for b, v, y in zip(bars, vals, ys):
            ax.annotate("n/a" if v is None else (f"{y:.0f}" if abs(y) >= 10 else f"{y:.3f}"), (b.get_x() + b.get_width() / 2, y),
                        ha="center", va="bottom" if y >= 0 else "top", fontsize=10)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels([textwrap.fill(_style(a)[3], 18) for a in arms], fontsize=9)
        ax.set(ylabel=ylabel, title=title)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_corrected_voxels(summary: dict, path: Path) -> str:
    plt = _plt()
    arms = [a for a in summary["arms"] if a != "none"]
    rounds = len(next(iter(summary["arms"].values()))["reviewed_per_round"])
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        row = summary["arms"][arm]
        x = np.arange(1, rounds + 1) + (i - (len(arms) - 1) / 2) * width
        c = _style(arm)[0]
        ax.bar(x, row["reviewed_per_round"], width, color=c, alpha=0.3, edgecolor=c)
        ax.bar(x, row["edited_per_round"], width, color=c, label=_style(arm)[3])
    ax.set(xlabel="round", ylabel="voxels", title="Per round: voxels reviewed (light) and of those, wrong and fixed (solid)")
    ax.set_xticks(range(1, rounds + 1))
    ax.legend(frameon=False, fontsize=9, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _pick_slice(weight: np.ndarray) -> int:
    """The axial slice (z) where `weight` (z, y, x) is largest."""
    per = weight.reshape(weight.shape[0], -1).sum(1)
    return int(np.argmax(per)) if per.max() > 0 else weight.shape[0] // 2


def _contour(ax, mask2d, color, lw=1.6, ls="-"):
    if mask2d.any() and not mask2d.all():
        ax.contour(mask2d.astype(float), levels=[0.5], colors=[color], linewidths=lw, linestyles=ls)


def _gray(ax, img2d):
    lo, hi = np.percentile(img2d, [1, 99])
    ax.imshow(img2d, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _heat(ax, unc2d):
    """The uncertainty as a heat overlay whose opacity grows with the value: sure voxels show the image."""
    import matplotlib

    rgba = matplotlib.colormaps["inferno"](np.clip(unc2d, 0, 1))
    rgba[..., 3] = np.clip(1.6 * unc2d, 0.0, 0.9)
    ax.imshow(rgba, interpolation="nearest")
    return matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap="inferno")


def _error_rgba(pred2d, truth2d):
    """RGBA overlay: missed target (truth, not predicted) in blue, extra (predicted, not truth) in red."""
    rgba = np.zeros(pred2d.shape + (4,), float)
    missed = (truth2d > 0) & (pred2d == 0)
    extra = (pred2d > 0) & (truth2d == 0)
    rgba[missed] = (0.15, 0.45, 1.0, 0.85)
    rgba[extra] = (1.0, 0.15, 0.1, 0.85)
    return rgba


def plot_heatmap(detail: dict, result: dict, path: Path) -> str | None:
    """One test case before and after the rounds: segmentation, uncertainty heatmap, errors."""
    from SSLSegmentLib.ml.metrics import dice

    before, after = detail.get("before"), detail.get("after")
    if before is None or after is None:
        return None
    plt = _plt()
    image, truth = detail["image"], detail["truth"]
    z = _pick_slice((before["label"] != truth).astype(float))
    arm = detail["detail_arm"]
    rounds = len(result["arms"][arm]["rounds"])
    rows = [(f"before: teacher {result['teacher']['version']}", before),
            (f"after {rounds} rounds ({_style(arm)[3].replace(' (ours)', '')})", after)]
    fig, axes = plt.subplots(2, 3, figsize=(12.5, 8.6))
    im = None
    for r, (name, d) in enumerate(rows):
        lab, unc = d["label"], d["entropy"]
        wrong = int((lab != truth).sum())
        a = axes[r, 0]
        _gray(a, image[z])
        _contour(a, truth[z] > 0, "#00d060", 2.0)
        _contour(a, lab[z] > 0, "#ff00ff", 1.4, "--")
        a.set_title(f"{name}\nDice {100 * dice(lab > 0, truth > 0):.1f} %  (green truth, magenta model)", fontsize=10.5)
        a = axes[r, 1]
        _gray(a, image[z])
        im = _heat(a, unc[z])
        a.set_title(f"uncertainty heatmap\nmean {unc.mean():.3f} over the case", fontsize=10.5)
        a = axes[r, 2]
        _gray(a, image[z])
        a.imshow(_error_rgba(lab[z], truth[z]), interpolation="nearest")
        _contour(a, unc[z] > 0.5, "#ffd000", 1.2)
        a.set_title(f"errors: {wrong} wrong voxels in the case\nblue missed, red extra; yellow: uncertain > 0.5",
                     fontsize=10.5)
    cax = fig.add_axes([0.925, 0.3, 0.012, 0.4])
    cb = fig.colorbar(im, cax=cax)
    cb.set_label("uncertainty (0 = sure, 1 = coin toss)")
    fig.suptitle(f"Test case {detail['detail_case']}, axial slice {z}: the model before and after the review rounds",
                 fontsize=13)
    fig.subplots_adjust(right=0.9, wspace=0.05, hspace=0.18)
    return _save(fig, path)


def plot_review_regions(detail: dict, path: Path) -> str | None:
    """The first reviewed case of every arm: where each strategy looked, and which errors it found there."""
    reviews = detail.get("reviews") or {}
    arms = [a for a in ARM_STYLE if a in reviews and a != "uncertainty-full-label"] + \
        [a for a in reviews if a not in ARM_STYLE]
    if not arms:
        return None
    plt = _plt()
    ref = reviews.get("uncertainty") or reviews[arms[0]]
    z = _pick_slice((ref["prediction"] != ref["truth"]).astype(float) + ref["reviewed"])
    n = len(arms) + 1
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 4.4))
    a = axes[0]
    _gray(a, ref["image"][z])
    _heat(a, ref["uncertainty"][z])
    a.set_title(f"{ref['case_id']}: the heatmap\nthe clinician was shown", fontsize=10.5)
    for a, arm in zip(axes[1:], arms):
        r = reviews[arm]
        _gray(a, r["image"][z])
        a.imshow(_error_rgba(r["prediction"][z], r["truth"][z]), interpolation="nearest")
        rev = r["reviewed"][z] > 0
        overlay = np.zeros(rev.shape + (4,), float)
        overlay[rev] = (1.0, 0.85, 0.0, 0.35)
        a.imshow(overlay, interpolation="nearest")
        _contour(a, rev, "#ffd000", 1.3)
        fixed = int(((r["prediction"] != r["truth"]) & (r["reviewed"] > 0)).sum())
        total = int((r["prediction"] != r["truth"]).sum())
        a.set_title(f"{_style(arm)[3]}\nfixed {fixed} of {total} wrong voxels\n({int(r['reviewed'].sum())} reviewed)",
                    fontsize=10, color=_style(arm)[0] if arm != "none" else "black")
    fig.suptitle(f"Where each strategy looked on the first case (slice {z}): yellow = reviewed; blue missed, red extra",
                 fontsize=12)
    return _save(fig, path)


def plot_error_detection(result: dict, path: Path) -> str:
    """Left: errors found when reviewing the most uncertain voxels first. Right: error rate per uncertainty level."""
    plt = _plt()
    arms = result["arms"]
    first = next(iter(arms.values()))
    teacher = first["start"]
    guided_arm = "uncertainty" if "uncertainty" in arms else next(iter(arms))
    final = arms[guided_arm]["final_eval"]
    teacher_full = result.get("teacher_eval") or _find_eval(arms, teacher["sha256"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4))
    for ev, name, c in ((teacher_full, f"teacher {teacher['version']}", "#fdae61"),
                        (final, f"after the rounds ({final['version']})", "#d7301f")):
        if ev is None:
            continue
        fc = ev["found_curve"]
        x, y = 100 * np.asarray(fc["reviewed"]), 100 * np.asarray(fc["found"])
        a1.plot(x, y, color=c, lw=2.2, label=f"most uncertain first, {name}")
    er = (final["found_curve"]["error_rate"])
    xs = np.linspace(0, 100, 201)
    a1.plot(xs, np.minimum(100.0, xs / max(er * 100, 1e-9) * 100), color="#1a9850", ls="--", lw=1.4,
            label="oracle (every reviewed voxel wrong)")
    a1.plot(xs, xs, color="#7f7f7f", lw=1.4, label="random order")
    a1.axvline(5, color="black", lw=0.8, ls=":")
    det = final["error_detection"]
    if det.get("top5_recall") is not None:
        a1.annotate(f"top 5 %: {100 * det['top5_recall']:.0f} % of the errors", (5, 100 * det["top5_recall"]),
                    xytext=(8, 100 * det["top5_recall"] - 12), arrowprops={"arrowstyle": "->"}, fontsize=10)
    a1.set(xlim=(0, 20), ylim=(0, 101), xlabel="voxels reviewed (% of the test volumes), most uncertain first",
           ylabel="wrong voxels found (%)", title="How quickly the heatmap leads to the errors (test split)")
    a1.legend(frameon=False, fontsize=9, loc="lower right")
    a1.grid(alpha=0.3)
    rel = final["reliability"]
    edges = np.asarray(rel["edges"])
    rates = [np.nan if v is None else 100 * v for v in rel["error_rate"]]
    centers = (edges[:-1] + edges[1:]) / 2
    bars = a2.bar(centers, rates, width=0.09, color="#d7301f", alpha=0.85)
    for b, n in zip(bars, rel["count"]):
        if n:
            a2.annotate(f"{n:,}".replace(",", " "), (b.get_x() + b.get_width() / 2, b.get_height() if np.isfinite(b.get_height()) else 0),
                        ha="center", va="bottom", fontsize=8, rotation=90)
    a2.set(xlabel="uncertainty of the voxel", ylabel="share of voxels that are wrong (%)", xlim=(0, 1),
           ylim=(0, 100), title="The more uncertain, the more often wrong\n(numbers: voxels per bin)")
    a2.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _find_eval(arms: dict, sha: str) -> dict | None:
    for a in arms.values():
        if a["final_eval"]["sha256"] == sha:
            return a["final_eval"]
    return None


# -- markdown ------------------------------------------------------------------------------------------------------
def _pct(v, digits=2):
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.{digits}f}"


def _num(v, fmt="{:.3f}"):
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def retrain_words(cfg: dict) -> str:
    """How the loop's retrains were sized: by the request (a fixed length) or by the worker's schedule."""
    n = (cfg.get("finetune") or {}).get("iterations")
    if n:
        return f"fine-tune, {n} iterations"
    return "fine-tune sized by the worker's schedule to the round's corrections"


def markdown(result: dict, pictures: dict) -> str:
    s, cfg, env = result["summary"], result["config"], result["environment"]
    arms = s["arms"]
    rounds = cfg["rounds"]
    lines = [
        "# SSLSegment: interactive refinement report",
        "",
        f"Data: `{Path(result['data']).name}` ({result['n_cases']['train']} train, {result['n_cases']['val']} val, "
        f"{result['n_cases']['test']} test cases); {cfg['n_labeled']} train cases labeled at the start. "
        f"Teacher `{result['teacher']['version']}` (brl) trained on the backend. Then {rounds} rounds of: the simulated "
        f"clinician takes {cfg['cases_per_round']} case(s) from `GET /cases/next?strategy=uncertainty`, reviews at most "
        f"{100 * cfg['budget_fraction']:g} % of each case's voxels, replaces the model's segmentation by the truth "
        f"there and submits a correction; the backend retrains ({retrain_words(cfg)}) and promotes the new version "
        f"if validation does not drop. Every strategy starts from the same teacher and spends the same reviewed "
        f"voxels per case.",
        "",
    ]
    g = arms.get("uncertainty")
    r = arms.get("random")
    ratios = s.get("guided_vs_random", {})
    if g:
        lines += ["## In short", ""]
        lines.append(f"- Test Dice: {_pct(g['dice'][0])} % at the start → {_pct(g['dice'][-1])} % after {rounds} rounds "
                     f"of uncertainty-guided review ({g['reviewed_voxels']} voxels reviewed in {g['n_cases']} cases)"
                     + (f"; {_pct(arms['none']['dice'][-1])} % with retraining alone" if "none" in arms else "") + ".")
        if r:
            lines.append(f"- Of every 1000 voxels reviewed, {_num(g['fixed_per_1000'], '{:.0f}')} were wrong and got "
                         f"fixed with the uncertainty regions, {_num(r['fixed_per_1000'], '{:.0f}')} with random regions "
                         f"of the same sizes (×{_num(ratios.get('fixed_per_1000'), '{:.1f}')}).")
            lines.append(f"- Test Dice gain per 1000 reviewed voxels, beyond retraining alone: "
                         f"{_num(_scaled(g['gain_vs_none_per_1000']), '{:+.3f}')} % points guided vs "
                         f"{_num(_scaled(r['gain_vs_none_per_1000']), '{:+.3f}')} random"
                         + (f" (×{ratios['gain_vs_none_per_1000']:.1f})" if ratios.get("gain_vs_none_per_1000") else "")
                         + f". One run: a retrain ({retrain_words(cfg)}) with promotion on a few "
                         "validation cases moves test Dice by 1-2 points on its own, so read this line over several "
                         "seeds (`make bench-loop`; docs/refinement.md, \"Results\").")
        det0, det1 = s["teacher_error_detection"], g["error_detection_final"]
        lines.append(f"- The heatmap points at the errors: AUROC {_num(det0.get('auroc'))} (teacher) → "
                     f"{_num(det1.get('auroc'))} (after); the 5 % most uncertain test voxels hold "
                     f"{_pct(det0.get('top5_recall'), 0)} % → {_pct(det1.get('top5_recall'), 0)} % of the wrong voxels.")
        lines.append("")
    lines += ["## Test Dice (%) after each round", "",
              "| strategy | " + " | ".join(["start"] + [f"round {i}" for i in range(1, rounds + 1)]) + " |",
              "|---|" + "---|" * (rounds + 1)]
    for arm, row in arms.items():
        lines.append(f"| {_style(arm)[3]} | " + " | ".join(_pct(d) for d in row["dice"]) + " |")
    lines += ["", f"![test Dice per round]({pictures.get('dice')})", "",
              "## Effort and what it bought", "",
              "| strategy | cases | reviewed voxels | wrong voxels fixed | fixed per 1000 reviewed | case Dice gain per 1000 "
              "reviewed (% points) | test Dice gain (% points) | … per 1000 reviewed | … beyond retraining alone, per 1000 "
              "| new versions promoted |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, row in arms.items():
        lines.append(
            f"| {_style(arm)[3]} | {row['n_cases']} | {row['reviewed_voxels']} | {row['edited_voxels']} | "
            f"{_num(row['fixed_per_1000'], '{:.0f}')} | {_num(_scaled(row['case_gain_per_1000']), '{:.2f}')} | "
            f"{_num(_scaled(row['gain']), '{:+.2f}')} | {_num(_scaled(row['gain_per_1000']), '{:+.3f}')} | "
            f"{_num(_scaled(row['gain_vs_none_per_1000']), '{:+.3f}')} | {sum(row['promoted'])}/{len(row['promoted'])} |")
    lines += ["", f"![efficiency]({pictures.get('efficiency')})", "", f"![voxels per round]({pictures.get('voxels')})", ""]
    if pictures.get("regions"):
        lines += ["## Where each strategy looked", "", f"![review regions]({pictures['regions']})", ""]
    lines += ["## The uncertainty heatmap before and after", ""]
    if pictures.get("heatmap"):
        lines += [f"![heatmap]({pictures['heatmap']})", ""]
    lines += ["## Does the uncertainty find the errors? (test split)", "",
              "| model | AUROC (uncertainty → wrong voxel) | wrong voxels in the top 5 % most uncertain | error rate |",
              "|---|---|---|---|"]
    det0 = s["teacher_error_detection"]
    lines.append(f"| teacher {result['teacher']['version']} | {_num(det0.get('auroc'))} | {_pct(det0.get('top5_recall'), 1)} % | "
                 f"{_pct(det0.get('error_rate'), 2)} % |")
    for arm, row in arms.items():
        d = row["error_detection_final"]
        lines.append(f"| after {_style(arm)[3]} | {_num(d.get('auroc'))} | {_pct(d.get('top5_recall'), 1)} % | "
                     f"{_pct(d.get('error_rate'), 2)} % |")
    lines += ["", f"![error detection]({pictures.get('detection')})", ""]
    lines += ["## How long it took", "",
              f"Wall {result['seconds']:.0f} s, CPU {result.get('cpu_seconds', float('nan')):.0f} s (this process, the "
              f"servers and the workers). Teacher: {result['teacher']['wall_seconds']:.0f} s wall. Per strategy: "
              + ", ".join(f"{a} {row['seconds']:.0f} s" for a, row in arms.items()) + ".",
              "",
              f"Machine: {env['machine']} ({env['processor']}), {env['cpu_threads']} torch threads, device {env['device']}; "
              f"Python {env['python']}, torch {env['torch']}, MONAI {env['monai']}; {env['date']}.",
              "",
              "## How to read this", "",
              "- *Reviewed voxels* are the clinician's effort: the voxels they looked at and vouched for (the reviewed "
              "mask of the correction). *Fixed* voxels are those whose label changed because the model was wrong there.",
              "- *Beyond retraining alone* subtracts the no-correction arm, which retrains just as often without new "
              "labels, so what remains is what the corrections themselves bought.",
              "- The oracle needs the truth to know where the errors are; it is the best any review order could do with "
              "the same effort.",
              "- Small test sets move by fractions of a Dice point between retrains; `make bench-loop` repeats the loop "
              "over seeds.",
              ""]
    return "\n".join(lines)


def _scaled(v):
    return None if v is None else 100.0 * v


def write_report(result: dict, out_dir: str | Path) -> Path:
    """Write report.md, loop.json and the PNGs into out_dir (created); returns the report's path."""
    from benchmarks.refinement import save_result

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = result["summary"]
    detail = result.get("_detail") or {}
    pictures = {
        "dice": plot_dice_per_round(summary, out / "dice_per_round.png"),
        "efficiency": plot_efficiency(summary, out / "efficiency.png"),
        "voxels": plot_corrected_voxels(summary, out / "corrected_voxels.png"),
        "detection": plot_error_detection(result, out / "error_detection.png"),
    }
    if detail:
        pictures["heatmap"] = plot_heatmap(detail, result, out / "heatmap_before_after.png")
        pictures["regions"] = plot_review_regions(detail, out / "review_regions.png")
    save_result(result, out / "loop.json")
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(markdown(result, pictures) + f"\n_Generated {time.strftime('%Y-%m-%d %H:%M')}._\n")
    tmp.replace(path)
    return path


def main(argv=None) -> int:
    """python -m benchmarks.report RUN: draw the report of a demo run folder again (RUN/report/loop.json and
    RUN/work/detail.npz), e.g. after changing a picture."""
    import argparse
    import json

    from benchmarks.refinement import load_detail

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("run", help="the demo's --out folder")
    args = ap.parse_args(argv)
    run = Path(args.run)
    result = json.loads((run / "report" / "loop.json").read_text())
    detail = run / "work" / "detail.npz"
    if detail.is_file():
        result["_detail"] = load_detail(detail)
    print(write_report(result, run / "report"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
