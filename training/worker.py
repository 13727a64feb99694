"""The training worker: claims queued jobs from the datastore index and turns label revisions into model versions.

One job:
  1. fix the training set (a snapshot of label revisions: later submissions don't leak in) and the parent version
     (the `current` one when the job starts);
  2. fine-tune from the parent (or from scratch) with the chosen method (default BRL) through the shared Trainer,
     in this process or under `torchrun` with N processes (DDP);
  3. validate the best checkpoint and the parent on the same fixed validation cases, and measure how much of each
     correction in the training set each of them reproduces (retention);
  4. publish the checkpoint as a new immutable version and promote it when, on the paired per-case differences, it
     is not worse than the parent by more than the tolerance (registry.promotion_decision; compare-and-set against
     the parent, so a manual promotion meanwhile is never overridden);
  5. after a promotion, re-score the unreviewed cases so `GET /cases/next` ranks them under the new model.

A heartbeat thread refreshes the job row every couple of seconds and watches for cancellation; a worker that dies
mid-job is noticed by the next worker (same host: its process is gone; otherwise the heartbeat goes stale) and the
job is re-queued. Nothing is published before step 4's atomic folder rename, so a killed job leaves no half version.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

import numpy as np

from SSLSegmentLib.review.local_backend import free_port, kill_group, process_group_kwargs

from training.datastore import Conflict, Damaged, Datastore, InvalidInput
from training.jobs import JobFailed, build_train_config, resolve_train_params
from training.registry import ModelRegistry, promotion_decision
from training.retrain import RetrainSchedule, scheduled_params
from training.strategies import record_score
from training.training_set import corrected_samples, load_training_set, training_snapshot


def validation_dices(model, val_samples, patch_size, device="cpu", overlap: float = 0.25) -> dict[str, float]:
    """Foreground Dice per fixed validation case (one deterministic pass each): case_id -> Dice."""
    from SSLSegmentLib.ml.inference import Predictor
    from SSLSegmentLib.ml.metrics import dice

    predictor = Predictor(model, patch_size, passes=1, overlap=overlap, device=device)
    return {s.case_id: float(dice(predictor(s.image).label > 0, s.label > 0)) for s in val_samples}


def retention(model, corrected, patch_size, device="cpu", overlap: float = 0.25) -> dict:
    """How much of each correction a model reproduces: per corrected train case, the fraction of its reviewed
    voxels where the model's label (one deterministic pass) equals the submitted label; with the lowest and the
    voxel-weighted overall fraction. Empty when the training set holds no correction."""
    from SSLSegmentLib.ml.inference import Predictor

    if not corrected:
        return {}
    predictor = Predictor(model, patch_size, passes=1, overlap=overlap, device=device)
    per_case, voxels, agree = {}, {}, 0
    for s in corrected:
        reviewed = s.labeled_mask > 0
        same = int((predictor(s.image).label[reviewed] == s.label[reviewed]).sum())
        per_case[s.case_id], voxels[s.case_id] = same / int(reviewed.sum()), int(reviewed.sum())
        agree += same
    return {"per_case": per_case, "reviewed_voxels": voxels, "min": min(per_case.values()),
            "overall": agree / sum(voxels.values())}


def _mean(scores: dict[str, float] | None) -> float | None:
    return float(np.mean(list(scores.values()))) if scores else None


def score_cases(store: Datastore, model, version: str, patch_size, passes: int, device="cpu",
                should_stop=lambda: False) -> tuple[int, list[str]]:
    """Score every unreviewed train case under `version` (the case score of training.strategies), so the
    uncertainty orderings of `GET /cases/next` rank them under the new model. Returns (cases scored, errors).

    It runs after the promotion, which stands whatever happens here: a case that cannot be scored (its image gone
    or unreadable) keeps its former score, is named in the errors, and the others are still scored."""
    from SSLSegmentLib.ml.inference import Predictor

    predictor = Predictor(model, patch_size, passes=passes, device=device, version=version)
    n, errors = 0, []
    for case_id in store.unreviewed("train"):
        if should_stop():
            break
        try:
            record_score(store, case_id, predictor(store.load_image(case_id)), version)
        except Exception as exc:
            errors.append(f"{case_id}: {type(exc).__name__}: {exc}")
            continue
        n += 1
    return n, errors


class _Heartbeat(threading.Thread):
    """Refreshes the job's heartbeat and turns a cancel request into an Event (and a file, for DDP ranks)."""

    def __init__(self, store: Datastore, job_id: str, worker: str, interval_s: float, cancel_file: Path):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.store, self.job_id, self.worker, self.interval_s = store, job_id, worker, interval_s
        self.cancel = threading.Event()
        self.cancel_file = cancel_file
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            self._beat()
        finally:
            self.store.close()  # this thread's own SQLite connection

    def _beat(self) -> None:
        while not self._halt.is_set():
            try:
                if self.store.heartbeat(self.job_id, self.worker):
                    self.cancel.set()
                    self.cancel_file.touch()
            except Exception:  # a busy index must not kill the job; the next beat retries
                pass
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


class _ProgressWriter:
    """Trainer on_progress → job row (throttled; validation steps always written)."""

    def __init__(self, store: Datastore, job_id: str, min_interval_s: float = 0.5):
        self.store, self.job_id, self.min_interval_s = store, job_id, min_interval_s
        self.history: list[dict] = []
        self._last = 0.0

    def __call__(self, p) -> None:
        val = p.val_dice is not None
        if val:
            self.history.append({"step": p.step, "loss": p.loss, "val_dice": p.val_dice})
        now = time.monotonic()
        if not val and p.step != p.iterations and now - self._last < self.min_interval_s:
            return
        self._last = now
        self.store.update_progress(self.job_id, {
            "phase": "training", "step": p.step, "iterations": p.iterations, "loss": _finite(p.loss), "lr": p.lr,
            "elapsed_s": round(p.elapsed_s, 2), "eta_s": round(p.eta_s, 2), "val_dice": _finite(p.val_dice),
            "best_dice": _finite(p.best_dice), "terms": {k: _finite(v) for k, v in p.terms.items()
                                                          if isinstance(v, (int, float))},
        }, self.history if val else None)


def _finite(v):
    return None if v is None or not math.isfinite(float(v)) else float(v)


class Worker:
    """Claims and runs jobs from one datastore.

    stale_after_s: a running job whose heartbeat is older than this is re-queued by any worker.
    max_attempts: how many times a job may be started before a lost worker fails it for good.
    nproc: default number of DDP processes (a job's own `nproc` wins). threads: torch threads per process.
    """

    def __init__(self, datastore: str | os.PathLike, worker_id: str | None = None, poll_s: float = 1.0,
                 stale_after_s: float = 60.0, max_attempts: int = 2, heartbeat_s: float = 2.0, nproc: int | None = None,
                 threads: int | None = None, device: str | None = None, log=print):
        self.store = Datastore(datastore)
        self.registry = ModelRegistry(self.store)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.poll_s, self.stale_after_s, self.max_attempts = poll_s, stale_after_s, max_attempts
        self.heartbeat_s, self.nproc, self.device = heartbeat_s, nproc, device
        self.threads = threads or max(1, min(4, os.cpu_count() or 1))
        self.log = log
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def recover(self) -> list[dict]:
        recovered = self.store.recover_stale_jobs(self.stale_after_s, self.max_attempts)
        for r in recovered:
            self.log(f"recovered job {r['job_id']}: {r['reason']}")
        return recovered

    def run(self, once: bool = False) -> int:
        """Loop: recover stale jobs, claim one, run it. once=True: return after the queue is empty."""
        import torch

        torch.set_num_threads(self.threads)
        self.log(f"worker {self.worker_id} on datastore {self.store.root}")
        removed = self.store.clean_interrupted()  # what a killed worker or server left (a half-published version)
        if removed:
            self.log(f"removed {len(removed)} leftover(s) of interrupted writes")
        n = 0
        while not self._stop.is_set():
            self.recover()
            job = self.store.claim_job(self.worker_id)
            if job is None:
                if once:
                    break
                self._stop.wait(self.poll_s)
                continue
            self.run_job(job)
            n += 1
        return n

    # -- one job --------------------------------------------------------------------------------------------
    def run_job(self, job: dict) -> dict:
        job_id = job["job_id"]
        self.log(f"job {job_id}: started (attempt {job['attempts']}, trigger {job['trigger']})")
        job_dir = self.store.root / "jobs" / job_id
        scratch = job_dir / "train"
        shutil.rmtree(scratch, ignore_errors=True)  # leftovers of an interrupted attempt are never reused
        scratch.mkdir(parents=True, exist_ok=True)
        cancel_file = job_dir / "cancel"
        cancel_file.unlink(missing_ok=True)
        hb = _Heartbeat(self.store, job_id, self.worker_id, self.heartbeat_s, cancel_file)
        hb.start()
        status, result, error = "failed", None, None
        try:
            result = self._train(job, scratch, hb.cancel)
            status = "succeeded"
        except _Cancelled as exc:
            status, error = "cancelled", str(exc)
        except (JobFailed, InvalidInput, Damaged) as exc:
            error = str(exc)
        except Exception as exc:
            from SSLSegmentLib.ml.trainer import TrainingError

            error = str(exc) if isinstance(exc, TrainingError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, TrainingError):
                (job_dir / "traceback.txt").write_text(traceback.format_exc())
        finally:
            hb.stop()
        if not self.store.finish_job(job_id, status, result, error, worker=self.worker_id):
            self.log(f"job {job_id}: no longer owned by this worker (recovered elsewhere); result not recorded")
        shutil.rmtree(scratch, ignore_errors=True)  # the published version holds its own copy
        self.log(f"job {job_id}: {status}" + (f" ({error})" if error else ""))
        return self.store.job(job_id)

    def _train(self, job: dict, scratch: Path, cancel: threading.Event) -> dict:
        from SSLSegmentLib.ml.checkpoint import checkpoint_patch_size, load_checkpoint, model_from_checkpoint

        store, registry, job_id = self.store, self.registry, job["job_id"]
        params = resolve_train_params(store, job["params"], self.nproc)
        if self.device and "device" not in job["params"]:
            params["device"] = self.device
        parent = registry.current
        init_version = parent if params["init"] == "current" else (None if params["init"] == "scratch" else params["init"])
        init_path = registry.checkpoint_path(init_version) if init_version else None
        init_ckpt = load_checkpoint(init_path) if init_path else None
        snapshot = training_snapshot(store)
        retrain = None
        if init_version is not None:  # a fine-tune: sized to what changed since the model it starts from
            given = {k for k, v in (job["params"] or {}).items() if v is not None}
            params, retrain = scheduled_params(RetrainSchedule.from_settings(store.settings["retrain"]), params,
                                               given, snapshot["train"],
                                               registry.model(init_version)["trained_on"].get("revisions", []))
        config = build_train_config(params, init_ckpt)
        n_lab = sum(1 for revs in snapshot["train"].values() if revs)
        if n_lab == 0:
            raise JobFailed("no labeled or corrected training case yet: submit a final label or a correction first")
        store.update_progress(job_id, {"phase": "loading", "step": 0, "iterations": config.iterations})
        nproc = int(params.get("nproc", 1))
        t0 = time.time()
        if nproc > 1:
            fit = self._fit_distributed(job_id, config, snapshot, init_path, scratch, nproc, cancel)
        else:
            fit = self._fit_local(job_id, config, snapshot, init_path, scratch, cancel)
        train_s = time.time() - t0
        best = scratch / "best.pt"
        if not best.is_file():
            raise JobFailed("training produced no checkpoint")

        store.update_progress(job_id, {"phase": "validating", "step": config.iterations, "iterations": config.iterations})
        _, val = load_training_set(store, {"train": {}, "val": snapshot["val"]})
        from SSLSegmentLib.ml.inference import pick_device

        device = pick_device(config.device)
        new_model, new_ckpt = model_from_checkpoint(best, device=device)
        new_scores = validation_dices(new_model, val, config.patch_size, device, config.val_overlap)
        corrected = corrected_samples(store, snapshot)
        kept = retention(new_model, corrected, config.patch_size, device, config.val_overlap)
        parent_scores, parent_kept = None, {}
        if parent is not None:
            parent_model, parent_ckpt = model_from_checkpoint(registry.checkpoint_path(parent), device=device)
            parent_patch = checkpoint_patch_size(parent_ckpt)
            parent_scores = validation_dices(parent_model, val, parent_patch, device, config.val_overlap) or None
            parent_kept = retention(parent_model, corrected, parent_patch, device, config.val_overlap)
        new_dice, parent_dice = _mean(new_scores), _mean(parent_scores)
        promote, reason, comparison = promotion_decision(new_scores, parent_scores, parent, float(params["tolerance"]))
        if cancel.is_set():
            raise _Cancelled("cancelled before publishing")

        trained_on = {
            "revisions": sorted(r for revs in snapshot["train"].values() for r in revs),
            "n_labeled_cases": n_lab,
            "n_unlabeled_cases": sum(1 for revs in snapshot["train"].values() if not revs),
            "val_cases": sorted(snapshot["val"]),
            "val_revisions": sorted(snapshot["val"].values()),
        }
        metrics = {"val_dice": _finite(new_dice), "parent_val_dice": _finite(parent_dice),
                   "trainer_best_val_dice": _finite(fit.get("best_val_dice")), "best_step": fit.get("best_step"),
                   "final_loss": _finite(fit.get("final_loss")), "train_seconds": round(train_s, 2),
                   "iterations": config.iterations, "nproc": nproc, "val_dice_per_case": new_scores,
                   "promotion": comparison, "retention": kept, "parent_retention": parent_kept, "retrain": retrain}
        store.update_progress(job_id, {"phase": "publishing", "step": config.iterations, "iterations": config.iterations})
        model = registry.add_version(best, {
            "parent": parent, "init": init_version, "method": config.method, "metrics": metrics,
            "trained_on": trained_on, "decision": reason, "params": params,
        }, job_id=job_id)
        version = model["version"]
        promoted = False
        if promote:
            try:
                registry.promote(version, reason=f"job {job_id}: {reason}", expected_current=parent)
                promoted = True
            except Conflict as exc:
                reason = f"not promoted: {exc}"
                registry.set_decision(version, reason)
        self.log(f"job {job_id}: published {version} ({'promoted' if promoted else 'kept'}; {reason})")
        n_scored, scoring_errors = 0, []
        passes = int(store.settings.get("score_passes", 0))
        if promoted and passes > 0:
            store.update_progress(job_id, {"phase": "scoring", "step": config.iterations, "iterations": config.iterations})
            n_scored, scoring_errors = score_cases(store, new_model, version, config.patch_size, passes, device,
                                                   cancel.is_set)
            for e in scoring_errors:
                self.log(f"job {job_id}: not scored: {e}")
        return {"model_version": version, "promoted": promoted, "reason": reason, "val_dice": _finite(new_dice),
                "parent": parent, "parent_val_dice": _finite(parent_dice), "best_step": fit.get("best_step"),
                "train_seconds": round(train_s, 2), "n_scored": n_scored, "scoring_errors": scoring_errors,
                "history": fit.get("history", []),
                "retention": kept, "parent_retention": parent_kept, "promotion": comparison,
                "iterations": config.iterations, "retrain": retrain,
                "ranks": fit.get("ranks", [])}

    def _fit_local(self, job_id, config, snapshot, init_path, scratch, cancel) -> dict:
        from SSLSegmentLib.ml.trainer import Trainer, TrainingCancelled

        samples, val = load_training_set(self.store, snapshot)
        progress = _ProgressWriter(self.store, job_id)
        trainer = Trainer(config, samples, val, out_dir=scratch, data_snapshot=snapshot, init_checkpoint=init_path,
                          on_progress=progress, should_stop=cancel.is_set)
        try:
            return trainer.fit()
        except TrainingCancelled as exc:
            raise _Cancelled(str(exc)) from None

    def _fit_distributed(self, job_id, config, snapshot, init_path, scratch, nproc, cancel) -> dict:
        spec = {"datastore": str(self.store.root), "job_id": job_id, "config": config.to_dict(), "snapshot": snapshot,
                "init_checkpoint": str(init_path) if init_path else None, "out_dir": str(scratch),
                "cancel_file": str(scratch.parent / "cancel"), "threads": max(1, self.threads // nproc)}
        spec_path = scratch / "spec.json"
        spec_path.write_text(json.dumps(spec))
        log_path = scratch.parent / "torchrun.log"
        cmd = torchrun_command(nproc, ["-m", "training.worker", "--ddp-spec", str(spec_path)])
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, **process_group_kwargs())
            try:
                while proc.poll() is None:
                    if cancel.is_set():
                        # The ranks agree to stop at the next step; kill the group only if they don't within seconds.
                        try:
                            proc.wait(timeout=20)
                        except subprocess.TimeoutExpired:
                            kill_group(proc)
                        break
                    time.sleep(0.2)
            except BaseException:
                kill_group(proc, timeout=None)
                raise
        rc = proc.wait()
        if (scratch / "cancelled.json").is_file() or cancel.is_set():
            raise _Cancelled(json.loads((scratch / "cancelled.json").read_text())["reason"]
                             if (scratch / "cancelled.json").is_file() else "cancelled")
        errors = sorted(scratch.glob("error-rank*.json"))
        if errors:
            raise JobFailed(json.loads(errors[0].read_text())["error"])
        if rc != 0 or not (scratch / "fit.json").is_file():
            tail = log_path.read_text(errors="replace")[-1500:] if log_path.is_file() else ""
            raise JobFailed(f"distributed training exited with status {rc}: {tail.strip().splitlines()[-1] if tail.strip() else 'no output'}")
        fit = json.loads((scratch / "fit.json").read_text())
        fit["ranks"] = [json.loads(p.read_text()) for p in sorted(scratch.glob("rank*.json"))]
        return fit


class _Cancelled(RuntimeError):
    pass


def torchrun_command(nproc: int, target: list[str]) -> list[str]:
    """torchrun with N local processes and the rendezvous on 127.0.0.1 (nothing listens beyond loopback)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={int(nproc)}",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", "--max-restarts=0", *target]


# -- the DDP rank entry point (run by torchrun) -----------------------------------------------------------------
def ddp_rank_main(spec_path: str) -> int:
    """One DDP rank: join the process group (gloo on CPU, NCCL on GPU), build the same samples as every other rank
    from the datastore snapshot, and train with Trainer(distributed=True). Rank 0 reports progress and saves."""
    import torch
    import torch.distributed as dist

    from SSLSegmentLib.ml.trainer import TrainConfig, Trainer, TrainingCancelled, TrainingError
    from SSLSegmentLib.data.imageio import atomic_write_bytes

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(int(spec.get("threads", 1)))
    out_dir = Path(spec["out_dir"])
    cuda = torch.cuda.is_available() and spec["config"].get("device", "auto") in ("auto", "cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()

    def write(name: str, payload: dict) -> None:
        atomic_write_bytes(out_dir / name, json.dumps(payload, default=float).encode())

    try:
        store = Datastore(spec["datastore"])
        samples, val = load_training_set(store, spec["snapshot"])
        cfg = dict(spec["config"])
        cfg["device"] = f"cuda:{local_rank}" if cuda else "cpu"
        config = TrainConfig(**cfg)
        cancel_file = Path(spec["cancel_file"])
        flag = torch.zeros(1, device=cfg["device"])

        def should_stop() -> bool:
            # Every rank must stop at the same step (or the others block in the gradient all-reduce): rank 0 looks
            # for the cancel file and the all-reduce shares its answer.
            flag.fill_(1.0 if rank == 0 and cancel_file.exists() else 0.0)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item() > 0)

        progress = _ProgressWriter(store, spec["job_id"]) if rank == 0 else None
        trainer = Trainer(config, samples, val, out_dir=out_dir, data_snapshot=spec["snapshot"],
                          init_checkpoint=spec["init_checkpoint"], on_progress=progress, should_stop=should_stop,
                          distributed=True)
        if not trainer.distributed:
            raise RuntimeError("the process group is not initialised; DDP was not enabled")
        fit = trainer.fit()
        # A digest of the final weights on every rank: DDP keeps them identical, and the tests check that it did.
        digest = float(sum(float(p.detach().double().sum()) for p in trainer.student.parameters()))
        write(f"rank{rank}.json", {"rank": rank, "world": trainer.world, "param_sum": digest, "step": trainer.step})
        if rank == 0:
            write("fit.json", fit)
        return 0
    except TrainingCancelled as exc:
        if rank == 0:
            write("cancelled.json", {"reason": str(exc)})
        return 0
    except TrainingError as exc:
        write(f"error-rank{rank}.json", {"error": str(exc)})
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.worker")
    parser.add_argument("--ddp-spec", required=True, help="job spec written by the worker (internal)")
    args = parser.parse_args(argv)
    return ddp_rank_main(args.ddp_spec)


if __name__ == "__main__":
    sys.exit(main())
