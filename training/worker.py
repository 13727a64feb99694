"""The training worker: claims queued jobs from the datastore index and turns label revisions into model versions.

One job:
  1. fix the training set (a snapshot of label revisions: later submissions don't leak in) and the parent version
     (the `current` one when the job starts);
  2. fine-tune from the parent (or from scratch) with the chosen method (default BRL) through the shared Trainer,
     in this process or under `torchrun` with N processes (DDP);
  3. validate the best checkpoint and the parent on the same fixed validation cases;
  4. publish the checkpoint as a new immutable version and promote it when its validation Dice does not drop by more
     than the tolerance (compare-and-set against the parent, so a manual promotion meanwhile is never overridden);
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
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

import numpy as np

from training.datastore import Conflict, Datastore, InvalidInput, NotFound, validate_version

TRAIN_PARAM_KEYS = {
    "method", "iterations", "lr", "batch_labeled", "batch_unlabeled", "seed", "val_interval", "patch_size", "tolerance",
    "init", "network", "method_options", "nproc", "device", "momentum", "weight_decay", "ema_decay", "augment",
    "lr_schedule", "rampup_steps", "eval_model",
}
_CONFIG_KEYS = {
    "method", "iterations", "lr", "batch_labeled", "batch_unlabeled", "seed", "val_interval", "patch_size",
    "method_options", "device", "momentum", "weight_decay", "ema_decay", "augment", "lr_schedule", "rampup_steps",
    "eval_model",
}
DEFAULT_PATCH = (32, 48, 48)


class JobFailed(RuntimeError):
    """A job ended with a reason the user should read."""


def resolve_train_params(store: Datastore, params: dict | None, default_nproc: int | None = None) -> dict:
    """Merge request params over the datastore's training defaults and check them; raises InvalidInput.

    The server calls this before queueing (a bad request is a 400, not a failed job) and the worker again when the
    job starts (the parent model may have changed in between)."""
    from SSLSegmentLib.ml.methods import available_methods

    params = dict(params or {})
    unknown = sorted(set(params) - TRAIN_PARAM_KEYS)
    if unknown:
        raise InvalidInput(f"unknown training parameter(s) {unknown}; known: {sorted(TRAIN_PARAM_KEYS)}")
    settings = store.settings
    merged = {**settings["train"], **{k: v for k, v in params.items() if v is not None}}
    if "nproc" not in params and default_nproc:
        merged["nproc"] = default_nproc
    merged.setdefault("tolerance", settings["tolerance"])
    merged.setdefault("init", "current")
    if merged["method"] not in available_methods():
        raise InvalidInput(f"unknown method {merged['method']!r}; available: {', '.join(available_methods())}")
    for key in ("iterations", "batch_labeled", "batch_unlabeled", "val_interval", "seed", "nproc"):
        v = merged.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise InvalidInput(f"{key} must be an integer, got {v!r}")
    if not 1 <= merged["iterations"] <= 1_000_000:
        raise InvalidInput(f"iterations must be between 1 and 1000000, got {merged['iterations']}")
    if not 1 <= int(merged.get("nproc", 1)) <= 64:
        raise InvalidInput(f"nproc must be between 1 and 64, got {merged['nproc']}")
    for key in ("lr", "tolerance"):
        v = merged[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InvalidInput(f"{key} must be a finite number, got {v!r}")
    if merged["lr"] <= 0:
        raise InvalidInput(f"lr must be positive, got {merged['lr']}")
    init = merged["init"]
    if init not in ("current", "scratch"):
        try:
            validate_version(init)
            store.model(init)
        except (InvalidInput, NotFound) as exc:
            raise InvalidInput(f"init must be 'current', 'scratch' or an existing version: {exc}") from None
    if "patch_size" in merged and merged["patch_size"] is not None:
        ps = merged["patch_size"]
        if not isinstance(ps, (list, tuple)) or len(ps) != 3 or not all(isinstance(p, int) and p > 0 for p in ps):
            raise InvalidInput(f"patch_size must be three positive integers [z, y, x], got {ps!r}")
    if "method_options" in merged and not isinstance(merged["method_options"], dict):
        raise InvalidInput("method_options must be an object")
    if "network" in merged and merged["network"] is not None:
        from SSLSegmentLib.ml.networks import NetworkConfig

        if not isinstance(merged["network"], dict):
            raise InvalidInput("network must be an object of NetworkConfig fields")
        try:
            NetworkConfig(**merged["network"])
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"network: {exc}") from None
    return merged


def build_train_config(params: dict, init_ckpt: dict | None):
    """The TrainConfig of a job: the parent's network (and patch size, unless given) when fine-tuning."""
    from SSLSegmentLib.ml.networks import NetworkConfig
    from SSLSegmentLib.ml.trainer import TrainConfig

    cfg = {k: params[k] for k in _CONFIG_KEYS if k in params and params[k] is not None}
    if init_ckpt is not None:
        cfg["network"] = init_ckpt["network"]
        cfg.setdefault("patch_size", tuple(init_ckpt.get("train_config", {}).get("patch_size", DEFAULT_PATCH)))
    else:
        cfg["network"] = NetworkConfig(**params["network"]).to_dict() if params.get("network") else NetworkConfig().to_dict()
        cfg.setdefault("patch_size", DEFAULT_PATCH)
    cfg["val_interval"] = min(int(cfg.get("val_interval", 50)), int(cfg["iterations"]))
    try:
        return TrainConfig(**cfg)
    except (TypeError, ValueError) as exc:
        raise JobFailed(f"invalid training configuration: {exc}") from None


def validation_dice(model, val_samples, patch_size, device="cpu", overlap: float = 0.25) -> float:
    """Mean foreground Dice over fixed validation samples (same rule as Trainer.validate)."""
    from SSLSegmentLib.ml.inference import predict_volume

    if not val_samples:
        return math.nan
    dices = []
    for s in val_samples:
        pred = predict_volume(model=model, image=s.image, patch_size=tuple(patch_size), passes=1, overlap=overlap,
                              device=device)
        p, t = pred.label > 0, s.label > 0
        denom = p.sum() + t.sum()
        dices.append(1.0 if denom == 0 else 2.0 * np.logical_and(p, t).sum() / denom)
    return float(np.mean(dices))


def promotion_decision(new_dice: float, parent_dice: float | None, parent: str | None, tolerance: float) -> tuple[bool, str]:
    """(promote?, reason). Rules in docs/backend.md: no validation → never automatic; no parent → promote;
    else promote when new >= parent − tolerance."""
    if new_dice is None or not math.isfinite(new_dice):
        return False, "no validation case has a final label, so the version was not promoted automatically; promote it by hand"
    if parent is None:
        return True, f"first model version (validation Dice {new_dice:.4f})"
    if parent_dice is None or not math.isfinite(parent_dice):
        return True, f"validation Dice {new_dice:.4f}; the parent {parent} could not be validated"
    if new_dice >= parent_dice - tolerance:
        return True, (f"validation Dice {new_dice:.4f} vs {parent_dice:.4f} for {parent} "
                      f"(change {new_dice - parent_dice:+.4f}, tolerance {tolerance})")
    return False, (f"not promoted: validation Dice dropped from {parent_dice:.4f} ({parent}) to {new_dice:.4f} "
                   f"({new_dice - parent_dice:+.4f}, more than the tolerance {tolerance})")


def score_cases(store: Datastore, model, version: str, patch_size, passes: int, device="cpu",
                should_stop=lambda: False) -> int:
    """Mean and summed normalised entropy of every unreviewed train case under `version` (active-learning ranks)."""
    from SSLSegmentLib.ml.inference import predict_volume

    n = 0
    for case_id in store.unreviewed("train"):
        if should_stop():
            break
        pred = predict_volume(model=model, image=store.load_image(case_id), patch_size=tuple(patch_size), passes=passes,
                              device=device)
        store.set_score(case_id, float(pred.entropy.mean()), float(pred.entropy.sum()), version)
        n += 1
    return n


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
        except (JobFailed, InvalidInput) as exc:
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
        from SSLSegmentLib.ml.trainer import load_checkpoint, model_from_checkpoint

        store, job_id = self.store, job["job_id"]
        params = resolve_train_params(store, job["params"], self.nproc)
        if self.device and "device" not in job["params"]:
            params["device"] = self.device
        parent = store.current_model
        init_version = parent if params["init"] == "current" else (None if params["init"] == "scratch" else params["init"])
        init_path = store.model_path(init_version) if init_version else None
        init_ckpt = load_checkpoint(init_path) if init_path else None
        config = build_train_config(params, init_ckpt)
        snapshot = store.training_snapshot()
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
        _, val = store.load_training_set({"train": {}, "val": snapshot["val"]})
        from SSLSegmentLib.ml.inference import pick_device

        device = pick_device(config.device)
        new_model, new_ckpt = model_from_checkpoint(best, device=device)
        new_dice = validation_dice(new_model, val, config.patch_size, device, config.val_overlap)
        parent_dice = None
        if parent is not None and val:
            parent_model, parent_ckpt = model_from_checkpoint(store.model_path(parent), device=device)
            parent_patch = parent_ckpt.get("train_config", {}).get("patch_size", config.patch_size)
            parent_dice = validation_dice(parent_model, val, parent_patch, device, config.val_overlap)
        promote, reason = promotion_decision(new_dice, parent_dice, parent, float(params["tolerance"]))
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
                   "iterations": config.iterations, "nproc": nproc}
        store.update_progress(job_id, {"phase": "publishing", "step": config.iterations, "iterations": config.iterations})
        model = store.add_model_version(best, {
            "parent": parent, "init": init_version, "method": config.method, "metrics": metrics,
            "trained_on": trained_on, "decision": reason, "params": params,
        }, job_id=job_id)
        version = model["version"]
        promoted = False
        if promote:
            try:
                store.promote(version, reason=f"job {job_id}: {reason}", expected_current=parent)
                promoted = True
            except Conflict as exc:
                reason = f"not promoted: {exc}"
                store.set_decision(version, reason)
        self.log(f"job {job_id}: published {version} ({'promoted' if promoted else 'kept'}; {reason})")
        n_scored = 0
        passes = int(store.settings.get("score_passes", 0))
        if promoted and passes > 0:
            store.update_progress(job_id, {"phase": "scoring", "step": config.iterations, "iterations": config.iterations})
            n_scored = score_cases(store, new_model, version, config.patch_size, passes, device, cancel.is_set)
        return {"model_version": version, "promoted": promoted, "reason": reason, "val_dice": _finite(new_dice),
                "parent": parent, "parent_val_dice": _finite(parent_dice), "best_step": fit.get("best_step"),
                "train_seconds": round(train_s, 2), "n_scored": n_scored, "history": fit.get("history", []),
                "ranks": fit.get("ranks", [])}

    def _fit_local(self, job_id, config, snapshot, init_path, scratch, cancel) -> dict:
        from SSLSegmentLib.ml.trainer import Trainer, TrainingCancelled

        samples, val = self.store.load_training_set(snapshot)
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
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                while proc.poll() is None:
                    if cancel.is_set():
                        # The ranks agree to stop at the next step; kill the group only if they don't within seconds.
                        try:
                            proc.wait(timeout=20)
                        except subprocess.TimeoutExpired:
                            os.killpg(proc.pid, signal.SIGKILL)
                        break
                    time.sleep(0.2)
            except BaseException:
                _kill_group(proc)
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


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
        samples, val = store.load_training_set(spec["snapshot"])
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
