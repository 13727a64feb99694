"""The interactive-refinement loop end to end on a real backend: what `sslsegment demo` and `make bench-loop` run.

    data-set folder (ground truth of every case; the test split is only evaluated)
      → base datastore: the data set imported with few final labels (first N train cases + the val split)
      → teacher: POST /train (from scratch, brl) on a real server + worker on 127.0.0.1; version v0001 is promoted
        and the worker scores the unreviewed cases
      → one arm per review strategy, each on its own copy of the base datastore with its own server + worker:
          R rounds × ( K cases from GET /cases/next?strategy=uncertainty → simulated clinician (POST /infer,
                       review within the voxel budget, POST /labels) → POST /train (fine-tune from current)
                       → test Dice of the current version )
      → a result dict (JSON): the input of benchmarks/report.py and of the benchmark tables

Every arm starts from the same teacher and the same data, retrains with the same parameters and seeds, and spends the
same number of reviewed voxels per case (benchmarks.simulated_clinician), so the arms differ only in which voxels
the clinician looked at (and, for `uncertainty-full-label`, in how the correction is folded in).
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.simulated_clinician import STRATEGIES, DataSetTruth, SimulatedClinician
from training.retrain import RetrainSchedule

# arm name -> (review strategy, how the correction is submitted)
ARMS = {
    "uncertainty": ("uncertainty", "correction"),
    "random": ("random", "correction"),
    "boundary": ("boundary", "correction"),
    "oracle": ("oracle", "correction"),
    "none": ("none", "correction"),
    # The same guided review, folded in as a full label (the prediction outside the reviewed voxels taken as truth),
    # which is what MONAI Label does with a submitted segmentation.
    "uncertainty-full-label": ("uncertainty", "final"),
    # Whole-case labeling (MONAI Label's active learning): the most uncertain case labeled completely, folded in as
    # a final label; its effort is the target's bounding box plus a margin (simulated_clinician.plan_whole_case).
    "whole_case": ("whole", "final"),
}
ANNOTATOR = "simulated-clinician"


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the server and worker processes it started)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class LoopError(RuntimeError):
    """The loop cannot go on (a training job failed, the backend did not start, ...); the message says why."""


def finetune_params(iterations: int = 60) -> dict:
    """POST /train parameters of a fixed-length retrain after a round of corrections (the loop's retrain before the
    worker sized retrains to what changed; kept for `--finetune-iterations` comparisons).

    A gentle fine-tune: a low constant learning rate and the EMA teacher's weights published (eval_model="teacher"),
    because a short fine-tune of the student at the teacher's learning rate moves test Dice from seed to seed by more
    than a round of corrections changes it (docs/refinement.md, "Retraining after corrections")."""
    return {"iterations": int(iterations), "lr": 0.003, "lr_schedule": "constant", "eval_model": "teacher",
            "val_interval": max(1, int(iterations) // 2)}


@dataclass
class LoopConfig:
    """One run of the loop.

    arms: names from ARMS. rounds R, cases_per_round K, budget_fraction: reviewed voxels per case / case voxels.
    n_labeled: train cases with a final label at the start (plus the whole val split, for model selection).
    teacher / finetune: POST /train parameters of the first model and of each retrain (fine-tune from current);
    finetune {} leaves the retrain to the worker's schedule, as the Slicer panel does. retrain: the datastore's
    "retrain" settings (training/retrain.py, RetrainSchedule), which size a retrain the request leaves open.
    infer: POST /infer options for the clinician. eval_passes: MC passes of the test evaluation (the server's default
    so the test maps are the ones a clinician sees). threads: torch threads of worker, server and evaluation.
    """

    arms: list = field(default_factory=lambda: ["uncertainty", "random", "oracle", "none"])
    rounds: int = 3
    cases_per_round: int = 2
    budget_fraction: float = 0.02
    n_labeled: int = 4
    teacher: dict = field(default_factory=lambda: {"method": "brl", "iterations": 300, "lr": 0.02, "lr_schedule": "poly",
                                                   "val_interval": 100})
    finetune: dict = field(default_factory=dict)
    retrain: dict = field(default_factory=lambda: RetrainSchedule().to_dict())
    infer: dict = field(default_factory=lambda: {"passes": 8})
    eval_passes: int = 8
    threads: int = 2
    seed: int = 0
    detail_case: str | None = None

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown}; known: {sorted(ARMS)}")
        if not self.arms:
            raise ValueError("at least one arm is needed")
        if self.rounds < 1 or self.cases_per_round < 1:
            raise ValueError("rounds and cases_per_round must be >= 1")
        if not 0.0 < self.budget_fraction <= 1.0:
            raise ValueError(f"budget_fraction must be in (0, 1], got {self.budget_fraction}")
        if self.n_labeled < 1:
            raise ValueError("n_labeled must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


class Console:
    """Progress lines with the elapsed time, and a bar for training jobs (tqdm on a terminal, lines otherwise)."""

    def __init__(self, quiet: bool = False, stream=None):
        self.t0 = time.time()
        self.quiet = quiet
        self.stream = stream or sys.stdout

    def elapsed(self) -> str:
        s = int(time.time() - self.t0)
        return f"{s // 60:2d}:{s % 60:02d}"

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{self.elapsed()}] {message}", file=self.stream, flush=True)

    def job_bar(self, description: str, total: int):
        if self.quiet:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=f"        {description}", unit="it", leave=False, file=self.stream,
                    disable=not getattr(self.stream, "isatty", lambda: False)())


def wait_for_job(client, job: dict, console: Console | None = None, description: str = "train",
                 poll_s: float = 0.5, timeout: float | None = None) -> dict:
    """Poll a training job until it ends, showing its progress; raise LoopError unless it succeeded."""
    bar = console.job_bar(description, int(job.get("params", {}).get("iterations") or 1)) if console else None
    deadline = None if timeout is None else time.monotonic() + timeout
    last_line = 0.0
    try:
        while True:
            job = client.job_status(job["job_id"])
            p = job.get("progress") or {}
            if bar is not None and p.get("iterations"):
                bar.total = int(p["iterations"])
                bar.n = int(p.get("step") or 0)
                bar.set_postfix_str(f"{p.get('phase', '')} loss {p.get('loss') or float('nan'):.3f}")
                bar.refresh()
                if bar.disable and console and time.monotonic() - last_line > 30:
                    console(f"  {description}: {p.get('phase', '')} step {p.get('step')}/{p.get('iterations')}")
                    last_line = time.monotonic()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            if deadline is not None and time.monotonic() > deadline:
                raise LoopError(f"training job {job['job_id']} still {job['status']} after {timeout} s")
            time.sleep(poll_s)
    finally:
        if bar is not None:
            bar.close()
    if job["status"] != "succeeded":
        raise LoopError(f"training job {job['job_id']} {job['status']}: {job.get('error')}")
    return job


# -- evaluation on the test split -----------------------------------------------------------------------------------
class TestEvaluator:
    """Test Dice and error detection of model versions, from their published weights (GET /models/{v}/weights).

    The same version (same sha256) is evaluated once. Per version: mean and per-case Dice of the segmentation the
    server would show (argmax of the MC mean, `passes` passes), error detection of its normalised entropy (AUROC,
    share of the wrong voxels inside the 5% most uncertain), a 'found vs reviewed' curve and reliability bins.
    """

    CURVE = np.concatenate([[0.0, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075], np.linspace(0.1, 1.0, 19)])
    BINS = np.linspace(0.0, 1.0, 11)

    def __init__(self, dataset, case_ids: list[str], passes: int = 8, detail_case: str | None = None,
                 device: str = "cpu"):
        self.dataset, self.case_ids, self.passes, self.device = dataset, list(case_ids), int(passes), device
        if not self.case_ids:
            raise LoopError("the data set has no test cases to evaluate on")
        self.detail_case = detail_case or self.case_ids[0]
        if self.detail_case not in self.case_ids:
            raise LoopError(f"detail case {self.detail_case!r} is not a test case")
        self._pairs = {}
        self._cache: dict[str, dict] = {}
        self.detail: dict[str, dict] = {}  # sha256 -> {"label", "entropy"} of the detail case

    def pair(self, case_id: str):
        if case_id not in self._pairs:
            image, label = self.dataset.load_pair(case_id)
            self._pairs[case_id] = (image.array.astype(np.float32), (label.array > 0).astype(np.uint8))
        return self._pairs[case_id]

    def evaluate(self, client, version: str, scratch: Path) -> dict:
        from SSLSegmentLib.ml.inference import Predictor
        from SSLSegmentLib.ml.metrics import dice
        from SSLSegmentLib.ml.uncertainty.quality import error_detection

        sha = next((m["sha256"] for m in client.models() if m["version"] == version), None)
        if sha is None:
            raise LoopError(f"the backend lists no model version {version!r}")
        if sha in self._cache:
            return {**self._cache[sha], "version": version}
        t0 = time.time()
        path = client.download_weights(version, Path(scratch) / f"{sha[:16]}.pt")
        predictor = Predictor.from_checkpoint(path, device=self.device, passes=self.passes)
        dices, uncert, wrong = {}, [], []
        for cid in self.case_ids:
            image, truth = self.pair(cid)
            pred = predictor(image)
            label = (pred.label > 0).astype(np.uint8)
            dices[cid] = dice(label, truth)
            uncert.append(pred.entropy.reshape(-1).astype(np.float32))
            wrong.append((label != truth).reshape(-1))
            if cid == self.detail_case:
                self.detail[sha] = {"label": label, "entropy": pred.entropy.astype(np.float32)}
        u, e = np.concatenate(uncert), np.concatenate(wrong)
        det = error_detection(u, e, fraction=0.05)
        out = {
            "version": version,
            "sha256": sha,
            "dice_mean": float(np.mean(list(dices.values()))),
            "dice": dices,
            "error_detection": {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in det.items()},
            "found_curve": self._found_curve(u, e),
            "reliability": self._reliability(u, e),
            "seconds": round(time.time() - t0, 2),
        }
        self._cache[sha] = out
        return out

    def cached(self, sha256: str) -> dict | None:
        """The full evaluation of a version already evaluated (by its weights' sha256)."""
        return self._cache.get(sha256)

    def _found_curve(self, u: np.ndarray, e: np.ndarray) -> dict:
        """Share of the wrong voxels inside the top-x most uncertain voxels, for x in CURVE (ties broken by index)."""
        order = np.argsort(-u, kind="stable")
        cum = np.concatenate([[0], np.cumsum(e[order])])
        n_err = max(int(e.sum()), 1)
        ks = np.round(self.CURVE * u.size).astype(int)
        return {"reviewed": self.CURVE.tolist(), "found": (cum[ks] / n_err).tolist(), "error_rate": float(e.mean())}

    def _reliability(self, u: np.ndarray, e: np.ndarray) -> dict:
        idx = np.clip(np.digitize(u, self.BINS[1:-1]), 0, len(self.BINS) - 2)
        counts = np.bincount(idx, minlength=len(self.BINS) - 1)
        errs = np.bincount(idx, weights=e.astype(float), minlength=len(self.BINS) - 1)
        rate = [float(er / c) if c else None for er, c in zip(errs, counts)]
        return {"edges": self.BINS.tolist(), "count": counts.tolist(), "error_rate": rate}


# -- the loop --------------------------------------------------------------------------------------------------------
def _start(store_dir: Path, cfg: LoopConfig, console: Console):
    from SSLSegmentLib.review.local_backend import LocalBackend

    try:
        return LocalBackend(store_dir, worker_args=["--threads", str(cfg.threads), "--poll", "0.3"],
                            env_overrides={"OMP_NUM_THREADS": str(cfg.threads)}).start().wait_until_ready(timeout=240)
    except (RuntimeError, TimeoutError) as exc:
        raise LoopError(f"the backend for {store_dir} did not start: {exc}") from None


def prepare_base(data_dir: Path, base_dir: Path, cfg: LoopConfig, console: Console) -> dict:
    """Import the data set with few labels into a new datastore and train the teacher on the real backend."""
    from training.datastore import Datastore, import_folder

    if base_dir.exists():
        raise LoopError(f"{base_dir} already exists; the loop needs a fresh datastore folder")
    store = Datastore(base_dir, create=True)
    store.update_settings({"retrain": cfg.retrain})
    counts = import_folder(store, data_dir, labels=f"train:{cfg.n_labeled}")
    summary = store.summary()
    store.close()
    console(f"datastore: {counts['registered']} cases (train {summary['splits']['train']}, val "
            f"{summary['splits']['val']}, test {summary['splits']['test']}), {counts['labels']} final labels "
            f"({cfg.n_labeled} train + the val split)")
    t0 = time.time()
    with _start(base_dir, cfg, console) as backend:
        client = backend.client(timeout=60)
        console(f"backend up on {backend.base_url} (server + worker, {time.time() - t0:.0f} s); training the teacher")
        params = {**cfg.teacher, "init": "scratch", "seed": cfg.seed}
        job = wait_for_job(client, client.start_training(**params), console, "teacher")
        res = job["result"]
        if not res.get("promoted"):
            raise LoopError(f"the teacher {res.get('model_version')} was not promoted: {res.get('reason')}")
        console(f"teacher {res['model_version']}: validation Dice {100 * res['val_dice']:.1f} % "
                f"({res['train_seconds']:.0f} s training, {res['n_scored']} cases scored)")
    return {"version": res["model_version"], "val_dice": res["val_dice"], "train_seconds": res["train_seconds"],
            "wall_seconds": round(time.time() - t0, 1), "labels": counts["labels"], "splits": summary["splits"]}


def run_arm(arm: str, base_dir: Path, arm_dir: Path, data_dir: Path, cfg: LoopConfig, evaluator: TestEvaluator,
            console: Console, snapshots: dict | None = None) -> dict:
    """R rounds of review + retrain on a copy of the base datastore. Returns the arm's record."""
    from SSLSegmentLib.data.dataset import DataSet

    strategy, submit_kind = ARMS[arm]
    if arm_dir.exists():
        raise LoopError(f"{arm_dir} already exists")
    shutil.copytree(base_dir, arm_dir, ignore=shutil.ignore_patterns("logs", "uploads"))
    truth = DataSetTruth(DataSet(data_dir))
    t_arm = time.time()
    rounds = []

    def on_plan(case_id, plan, arrays):
        # The first reviewed case of an arm is the same in every arm (same teacher, same ranking): keep it for pictures.
        if snapshots is not None and arm not in snapshots:
            snapshots[arm] = {"case_id": case_id, "reviewed": plan.reviewed.copy(), **{k: v.copy() for k, v in arrays.items()
                                                                                     if k != "rank_map"}}

    with _start(arm_dir, cfg, console) as backend, tempfile.TemporaryDirectory(prefix="weights-") as scratch:
        client = backend.client(timeout=120)
        clinician = None
        if strategy != "none":
            clinician = SimulatedClinician(client, truth, arm_dir.parent / f"{arm}-clinician", strategy=strategy,
                                           budget_fraction=cfg.budget_fraction, annotator=ANNOTATOR,
                                           case_strategy="uncertainty", submit_kind=submit_kind, infer=cfg.infer,
                                           seed=cfg.seed, on_plan=on_plan)
        start = evaluator.evaluate(client, client.current_model(), Path(scratch))
        for r in range(1, cfg.rounds + 1):
            t0 = time.time()
            reviews = []
            if clinician is not None:
                for _ in range(cfg.cases_per_round):
                    review = clinician.review_next()
                    if review is None:
                        console(f"{arm}: no unreviewed case left")
                        break
                    reviews.append(review.to_dict())
                    console(f"{arm} round {r}/{cfg.rounds}: {review.case_id} reviewed {review.spent} voxels "
                            f"({review.n_visited} regions), fixed {review.edited} of {review.errors_before} wrong voxels")
            t_review = time.time() - t0
            params = {**cfg.finetune, "init": "current", "seed": cfg.seed * 1000 + r}
            job = wait_for_job(client, client.start_training(**params), console, f"{arm} retrain {r}")
            res = job["result"]
            version = client.current_model()
            test = evaluator.evaluate(client, version, Path(scratch))
            rounds.append({
                "round": r,
                "reviews": reviews,
                "reviewed_voxels": int(sum(v["spent"] for v in reviews)),
                "edited_voxels": int(sum(v["edited"] for v in reviews)),
                "job": {k: res.get(k) for k in ("model_version", "promoted", "reason", "val_dice", "parent_val_dice",
                                                 "train_seconds", "n_scored", "best_step", "iterations", "retrain")},
                # Of the model now current: the retrained one if promoted, else its parent (the worker measures both
                # on every correction in the training set).
                "retention": (res.get("retention") if res.get("promoted") else res.get("parent_retention") or {}
                              ).get("overall"),
                "current_version": version,
                "test_dice": test["dice_mean"],
                "test_dice_cases": test["dice"],
                "seconds": {"review": round(t_review, 2), "job": round(time.time() - t0 - t_review, 2)},
            })
            console(f"{arm} round {r}/{cfg.rounds}: retrained → {res['model_version']} "
                    f"({'promoted' if res['promoted'] else 'kept ' + str(version)}); test Dice "
                    f"{100 * test['dice_mean']:.2f} % (start {100 * start['dice_mean']:.2f} %)")
        final = evaluator.evaluate(client, client.current_model(), Path(scratch))
    return {"arm": arm, "strategy": strategy, "submit_kind": submit_kind, "start": _brief_eval(start),
            "rounds": rounds, "final_eval": final, "seconds": round(time.time() - t_arm, 1)}


def _brief_eval(ev: dict) -> dict:
    return {k: ev[k] for k in ("version", "sha256", "dice_mean", "dice", "error_detection")}


def run_loop(data_dir: str | Path, work_dir: str | Path, cfg: LoopConfig, console: Console | None = None,
             device: str = "cpu", base: tuple[Path, dict] | None = None) -> dict:
    """The whole loop on one data-set folder; returns the result dict (see module docstring). work_dir must not
    exist yet or be empty: it receives the datastores (base and one per arm) and the clinician's files.
    base: (datastore folder, prepare_base's answer) of a teacher already trained on the same data, to start from."""
    import torch

    from SSLSegmentLib.data.dataset import DataSet
    from benchmarks.experiment import environment

    console = console or Console()
    torch.set_num_threads(cfg.threads)
    data_dir, work_dir = Path(data_dir).resolve(), Path(work_dir)
    if work_dir.exists() and any(work_dir.iterdir()):
        raise LoopError(f"{work_dir} is not empty; the loop writes fresh datastores there")
    work_dir.mkdir(parents=True, exist_ok=True)
    ds = DataSet(data_dir)
    if not ds.splits["test"]:
        raise LoopError(f"{data_dir}: the data set has no test split to measure the loop on")
    if not ds.splits["val"]:
        raise LoopError(f"{data_dir}: the data set has no validation split (needed to select and promote models)")
    if len(ds.splits["train"]) < cfg.n_labeled + cfg.rounds * cfg.cases_per_round:
        raise LoopError(f"{data_dir}: {len(ds.splits['train'])} training cases are too few for {cfg.n_labeled} labeled "
                        f"+ {cfg.rounds} rounds × {cfg.cases_per_round} reviewed cases")
    t0, c0 = time.time(), cpu_seconds()
    evaluator = TestEvaluator(ds, ds.splits["test"], cfg.eval_passes, cfg.detail_case, device=device)
    if base is None:
        base_dir = work_dir / "base"
        teacher = prepare_base(data_dir, base_dir, cfg, console)
        teacher["cpu_seconds"] = round(cpu_seconds() - c0, 1)
    else:
        base_dir, teacher = Path(base[0]), dict(base[1])
    arms, snapshots = {}, {}
    for i, arm in enumerate(cfg.arms, start=1):
        console(f"arm {i}/{len(cfg.arms)}: {arm} ({_describe(arm)})")
        c1 = cpu_seconds()
        arms[arm] = run_arm(arm, base_dir, work_dir / arm, data_dir, cfg, evaluator, console, snapshots)
        arms[arm]["cpu_seconds"] = round(cpu_seconds() - c1, 1)
    result = {
        "config": cfg.to_dict(),
        "data": str(data_dir),
        "n_cases": {k: len(v) for k, v in ds.splits.items()},
        "teacher": teacher,
        "arms": arms,
        "environment": environment(),
        "seconds": round(time.time() - t0, 1),
        "cpu_seconds": round(cpu_seconds() - c0, 1),
    }
    teacher_sha = next(iter(arms.values()))["start"]["sha256"]
    result["teacher_eval"] = evaluator.cached(teacher_sha)
    result["summary"] = summarize(result)
    result["_detail"] = _detail_arrays(evaluator, result, snapshots)
    return result


def _describe(arm: str) -> str:
    strategy, kind = ARMS[arm]
    what = {"uncertainty": "the backend's uncertainty regions in rank order",
            "random": "random regions of the same sizes", "boundary": "random regions of the same sizes on the predicted edge",
            "oracle": "the largest error components (upper reference)", "none": "no correction, retrain only",
            "whole": "the whole case labeled (effort: its target's bounding box plus a margin)"}[strategy]
    return what + (", submitted as a full label" if kind == "final" and strategy != "whole" else "")


# -- summaries ---------------------------------------------------------------------------------------------------
def summarize(result: dict) -> dict:
    """Per arm: test Dice after each round, effort, gains and gains per 1000 reviewed voxels.

    gain = Dice(R) − Dice(0); gain_vs_none = Dice(R) − Dice_none(R) (the part the corrections bought, when the none
    arm ran); per_1000 = gain / (reviewed voxels / 1000). fixed_per_1000: wrong voxels fixed per 1000 reviewed (how
    much of the clinician's effort landed on errors). case_gain_per_1000: Dice of the reviewed cases themselves,
    after − before, summed, per 1000 reviewed voxels."""
    arms = result["arms"]
    out = {}
    for name, a in arms.items():
        dice = [a["start"]["dice_mean"]] + [r["test_dice"] for r in a["rounds"]]
        reviews = [v for r in a["rounds"] for v in r["reviews"]]
        reviewed = int(sum(v["spent"] for v in reviews))
        edited = int(sum(v["edited"] for v in reviews))
        gain = dice[-1] - dice[0]
        row = {
            "dice": dice,
            "reviewed_voxels": reviewed,
            "edited_voxels": edited,
            "reviewed_per_round": [r["reviewed_voxels"] for r in a["rounds"]],
            "edited_per_round": [r["edited_voxels"] for r in a["rounds"]],
            "n_cases": len(reviews),
            "gain": gain,
            "gain_per_1000": gain / (reviewed / 1000.0) if reviewed else None,
            "fixed_per_1000": 1000.0 * edited / reviewed if reviewed else None,
            "case_gain_per_1000": (1000.0 * sum(v["dice_after"] - v["dice_before"] for v in reviews) / reviewed
                                   if reviewed else None),
            "promoted": [bool(r["job"]["promoted"]) for r in a["rounds"]],
            # Fraction of the corrections' reviewed voxels the current model reproduces after the last retrain
            # (None where the arm folded in no correction: none, or final labels only).
            "retention": a["rounds"][-1].get("retention") if a["rounds"] else None,
            "retention_per_round": [r.get("retention") for r in a["rounds"]],
            "cumulative_effort": [0] + list(np.cumsum([r["reviewed_voxels"] for r in a["rounds"]]).astype(int).tolist()),
            "error_detection_final": a["final_eval"]["error_detection"],
            "seconds": a["seconds"],
        }
        out[name] = row
    set_gains_vs_none(out)
    teacher_eval = next(iter(arms.values()))["start"]
    return {"arms": out, "guided_vs_random": guided_vs_random(out),
            "teacher_error_detection": teacher_eval["error_detection"], "teacher_dice": teacher_eval["dice_mean"]}


RATIO_KEYS = ("gain_per_1000", "gain_vs_none_per_1000", "fixed_per_1000", "case_gain_per_1000")


def set_gains_vs_none(rows: dict) -> None:
    """Set every arm row's gain_vs_none (its final Dice − the none arm's) and gain_vs_none_per_1000 (per 1000 reviewed
    voxels), None without a none arm. rows: arm name → summarize's row."""
    none_final = rows["none"]["dice"][-1] if "none" in rows else None
    for row in rows.values():
        row["gain_vs_none"] = row["dice"][-1] - none_final if none_final is not None else None
        reviewed = row["reviewed_voxels"]
        row["gain_vs_none_per_1000"] = (row["gain_vs_none"] / (reviewed / 1000.0)
                                        if reviewed and row["gain_vs_none"] is not None else None)


def guided_vs_random(rows: dict) -> dict:
    """The guided arm's RATIO_KEYS over the random arm's ({} unless both ran)."""
    if "uncertainty" not in rows or "random" not in rows:
        return {}
    g, r = rows["uncertainty"], rows["random"]
    return {key: gain_ratio(g[key], r[key]) for key in RATIO_KEYS}


def gain_ratio(a, b):
    """a / b when both are finite and positive, else None: a ratio of two gains says something only when both gained
    (guided +0.02 vs random -0.01 is "random gained nothing", not "×-2")."""
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or a <= 0 or b <= 0:
        return None
    return a / b


def _detail_arrays(evaluator: TestEvaluator, result: dict, snapshots: dict) -> dict:
    """Arrays the report draws (kept out of the JSON): the detail test case before/after, the first review per arm."""
    image, truth = evaluator.pair(evaluator.detail_case)
    arms = result["arms"]
    teacher_sha = next(iter(arms.values()))["start"]["sha256"]
    final_arm = "uncertainty" if "uncertainty" in arms else next(iter(arms))
    final_sha = arms[final_arm]["final_eval"]["sha256"]
    out = {"detail_case": evaluator.detail_case, "detail_arm": final_arm, "image": image, "truth": truth,
           "before": evaluator.detail.get(teacher_sha), "after": evaluator.detail.get(final_sha), "reviews": {}}
    from SSLSegmentLib.data.dataset import DataSet

    ds = DataSet(result["data"])
    for arm, snap in snapshots.items():
        out["reviews"][arm] = {**snap, "image": ds.load_image(snap["case_id"]).array.astype(np.float32)}
    return out


def save_result(result: dict, path: str | Path) -> Path:
    """The result without its arrays, as JSON (atomically)."""
    from SSLSegmentLib.data.imageio import atomic_write_bytes

    clean = {k: v for k, v in result.items() if not k.startswith("_")}
    return atomic_write_bytes(Path(path), json.dumps(clean, indent=2, default=_json_default).encode())


def save_detail(detail: dict, path: str | Path) -> Path:
    """The report's arrays as one compressed .npz (no pickles), so a report can be drawn again later."""
    flat, meta = {}, {"detail_case": detail.get("detail_case"), "detail_arm": detail.get("detail_arm"), "reviews": {}}
    for key in ("image", "truth"):
        flat[key] = detail[key]
    for when in ("before", "after"):
        for k, v in (detail.get(when) or {}).items():
            flat[f"{when}__{k}"] = v
    for arm, snap in (detail.get("reviews") or {}).items():
        meta["reviews"][arm] = snap["case_id"]
        for k, v in snap.items():
            if isinstance(v, np.ndarray):
                flat[f"review__{arm}__{k}"] = v
    flat["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **flat)
    return path


def load_detail(path: str | Path) -> dict:
    with np.load(Path(path), allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        out = {"detail_case": meta["detail_case"], "detail_arm": meta["detail_arm"], "image": z["image"],
               "truth": z["truth"], "before": {}, "after": {}, "reviews": {}}
        for name in z.files:
            parts = name.split("__")
            if parts[0] in ("before", "after"):
                out[parts[0]][parts[1]] = z[name]
            elif parts[0] == "review":
                out["reviews"].setdefault(parts[1], {"case_id": meta["reviews"][parts[1]]})[parts[2]] = z[name]
    for when in ("before", "after"):
        out[when] = out[when] or None
    return out


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


__all__ = ["ARMS", "Console", "LoopConfig", "finetune_params", "guided_vs_random", "LoopError", "set_gains_vs_none", "TestEvaluator", "prepare_base", "run_arm", "run_loop",
           "save_result", "save_detail", "load_detail", "summarize", "wait_for_job", "STRATEGIES"]
