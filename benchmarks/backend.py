"""`make bench-backend`: latency of the retraining loop and throughput of the REST API on loopback.

    python -m benchmarks.backend --profile quick [--repeats 3] [--requests 200]

Measures, with the real server and worker as subprocesses on 127.0.0.1 and a fresh datastore of phantoms:
  1. correction → promoted model: from the moment a correction is submitted (with `retrain_every = 1`, so the
     submission itself queues the job) until `GET /models` reports the new version as current; broken down into the
     submit call, queue wait, training, validation + publishing, and the scoring pass. The promotion gate is opened
     (tolerance 1.0) because this measures the pipeline's latency, not the gate.
  2. requests per second of `GET /cases/next` (which takes a lease: one write transaction per call) and of the
     correction upload (`POST /cases/{id}/labels`: multipart label + reviewed mask, validated, written as an
     immutable revision, fsynced, indexed), with 1 and 4 concurrent clients, each its own keep-alive-less connection.

Profiles: quick: 24×32×32 phantoms, tiny UNet (CPU, about two minutes); standard: 40×64×64 phantoms, default UNet.
A correction's retrain names no length, so the worker's retrain schedule sizes it (training/retrain.py).
Writes benchmarks/results/backend[-PROFILE].json and .md (machine, versions, date, load average).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path("benchmarks/results")

PROFILES = {
    "quick": {
        "shape": (24, 32, 32),
        "n_train": 10, "n_val": 2, "n_test": 2,
        "train": {"network": {"channels": [8, 16, 32], "strides": [2, 2], "features": 8, "num_res_units": 1},
                  "patch_size": [16, 32, 32], "iterations": 40, "val_interval": 20, "batch_labeled": 2,
                  "batch_unlabeled": 2, "device": "cpu"},
        "initial_iterations": 60,
        "infer_passes": 4,
    },
    "standard": {
        "shape": (40, 64, 64),
        "n_train": 12, "n_val": 3, "n_test": 3,
        "train": {"patch_size": [32, 48, 48], "iterations": 200, "val_interval": 100, "batch_labeled": 2,
                  "batch_unlabeled": 2, "device": "cpu"},
        "initial_iterations": 300,
        "infer_passes": 8,
    },
}


def machine() -> dict:
    import sqlite3
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        # The installed distribution's version: importing monai only to read it costs seconds.
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "torch": installed("torch"), "monai": installed("monai"),
        "fastapi": installed("fastapi"), "uvicorn": installed("uvicorn"), "sqlite": sqlite3.sqlite_version,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _ts(iso: str | None) -> float | None:
    from datetime import datetime

    return None if iso is None else datetime.fromisoformat(iso).timestamp()


def _correction_files(client, case_id: str, truth_dir: Path, work: Path) -> tuple[Path, Path, str]:
    """Infer, then fix the review regions and every wrong voxel (a simulated clinician)."""
    from SSLSegmentLib.data.imageio import read_label, read_volume, write_volume

    out = work / f"infer-{case_id}"
    result = client.infer(case_id, out)
    pred = read_label(result["paths"]["label"])
    truth = read_label(truth_dir / f"{case_id}.nrrd").array
    rank_map = read_volume(result["paths"]["regions"]).array  # the server's regions, computed where the map is made
    reviewed = ((rank_map > 0) | (pred.array != truth)).astype(np.uint8)
    label = np.where(reviewed > 0, truth, pred.array).astype(np.uint8)
    return (write_volume(pred.like(label), out / "corrected.nrrd"), write_volume(pred.like(reviewed), out / "reviewed.nrrd"),
            result["model_version"])


def bench_correction_to_promotion(backend, client, truth_dir: Path, work: Path, repeats: int) -> dict:
    from training.datastore import Datastore

    store = Datastore(backend.datastore)
    store.update_settings({"retrain_every": 1, "tolerance": 1.0})
    runs = []
    try:
        for i in range(repeats):
            case = client.next_case(annotator=f"bench{i}")
            label, mask, version = _correction_files(client, case["case_id"], truth_dir, work)
            before = client.current_model()
            t0 = time.time()
            rev = client.submit_label(case["case_id"], label, kind="correction", reviewed_mask_path=mask,
                                      model_version=version, author=f"bench{i}")
            t_submit = time.time()
            job_id = rev.get("queued_job")
            if job_id is None:
                raise RuntimeError("the correction did not queue a training job")
            while client.current_model() == before:
                job = client.job_status(job_id)
                if job["status"] in ("failed", "cancelled"):
                    raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}")
                time.sleep(0.05)
            t_current = time.time()
            job = client.wait_for_job(job_id, timeout=3600)
            r = job["result"]
            started, finished = _ts(job["started"]), _ts(job["finished"])
            runs.append({
                "case_id": case["case_id"], "model_version": r["model_version"], "promoted": r["promoted"],
                "submit_to_current_s": round(t_current - t0, 3),
                "submit_call_s": round(t_submit - t0, 3),
                "queue_wait_s": round(started - _ts(job["created"]), 3),
                "train_s": r["train_seconds"],
                "validate_publish_s": round(t_current - started - r["train_seconds"], 3),
                "job_total_s": round(finished - started, 3),
                "scoring_after_promotion_s": round(finished - t_current, 3),
                "val_dice": r["val_dice"], "parent_val_dice": r["parent_val_dice"], "reviewed_voxels": rev["reviewed_voxels"],
                "iterations": r.get("iterations"),
            })
            print(f"  correction → {r['model_version']} current in {runs[-1]['submit_to_current_s']:.1f} s "
                  f"(training {r['train_seconds']:.1f} s)", flush=True)
    finally:
        store.update_settings({"retrain_every": 0})
    keys = ("submit_to_current_s", "submit_call_s", "queue_wait_s", "train_s", "validate_publish_s",
            "scoring_after_promotion_s")
    return {"runs": runs, "median": {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}}


def _throughput(fn, n_requests: int, concurrency: int) -> dict:
    """Run fn(worker_index, i) n_requests times over `concurrency` threads; requests/s and latency percentiles."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(n_requests))
    errors = []

    def run(w):
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t = time.perf_counter()
            try:
                fn(w, i)
            except Exception as exc:  # recorded, not hidden
                errors.append(repr(exc))
                continue
            with lock:
                latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(concurrency)]
    t0 = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": len(errors), "first_error": errors[0] if errors else None,
            "concurrency": concurrency, "seconds": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 1),
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 2), "latency_ms_p95": round(float(np.percentile(lat, 95)), 2)}


def bench_requests(backend, work: Path, n_requests: int) -> dict:
    from SSLSegmentLib.review.client import SSLSegmentClient
    from SSLSegmentLib.data.imageio import read_volume, write_volume

    clients = [SSLSegmentClient(backend.base_url, token=backend.token) for _ in range(4)]
    out = {"next_case": [], "label_upload": []}
    for conc in (1, 4):
        out["next_case"].append(_throughput(lambda w, i: clients[w].next_case(annotator=f"reader{w}"), n_requests, conc))
        print(f"  GET /cases/next ×{conc}: {out['next_case'][-1]['requests_per_s']} req/s", flush=True)
    # Uploads go to the test split's cases (never trained on), so the numbers don't depend on training state.
    cases = [c["case_id"] for c in clients[0].list_cases("test")]
    image = read_volume(clients[0].download_image(cases[0], work / "grid.nrrd"))
    rng = np.random.default_rng(0)
    label = write_volume(image.like((rng.random(image.shape) > 0.7).astype(np.uint8)), work / "up-label.nrrd")
    mask = np.zeros(image.shape, np.uint8)
    mask[: image.shape[0] // 2] = 1
    maskp = write_volume(image.like(mask), work / "up-mask.nrrd")
    payload = label.stat().st_size + maskp.stat().st_size
    for conc in (1, 4):
        out["label_upload"].append(_throughput(
            lambda w, i: clients[w].submit_label(cases[i % len(cases)], label, kind="correction", reviewed_mask_path=maskp,
                                                 author=f"uploader{w}"), n_requests, conc))
        print(f"  POST /cases/{{id}}/labels ×{conc}: {out['label_upload'][-1]['requests_per_s']} req/s", flush=True)
    out["label_upload_payload_bytes"] = payload
    out["volume_shape"] = list(image.shape)
    return out


def run(profile_name: str, repeats: int, n_requests: int, threads: int, keep: bool) -> dict:
    from SSLSegmentLib.data.phantoms import PhantomConfig, write_phantom_dataset
    from SSLSegmentLib.review.local_backend import LocalBackend
    from training.datastore import Datastore, import_folder

    prof = PROFILES[profile_name]
    env_info = machine()
    work = Path(tempfile.mkdtemp(prefix="bench-backend-"))
    result = {"profile": profile_name, "environment": env_info, "config": prof, "threads_per_process": threads}
    try:
        data = write_phantom_dataset(work / "phantoms", prof["n_train"], prof["n_val"], prof["n_test"],
                                     PhantomConfig(shape=tuple(prof["shape"])), seed=11)
        store = Datastore(work / "store", create=True)
        import_folder(store, data, labels="train:2")
        store.update_settings({"train": prof["train"], "infer": {"passes": prof["infer_passes"]}})
        env = {"OMP_NUM_THREADS": str(threads)}
        with LocalBackend(store.root, worker_args=["--threads", str(threads), "--poll", "0.1", "--heartbeat", "1"],
                          serve_args=["--log-level", "error"], env_overrides=env).start().wait_until_ready() as backend:
            client = backend.client(timeout=120)
            print(f"backend on {backend.base_url}; training the first version", flush=True)
            t = time.time()
            job = client.wait_for_job(client.start_training(init="scratch", iterations=prof["initial_iterations"])["job_id"],
                                      timeout=3600)
            if job["status"] != "succeeded" or not job["result"]["promoted"]:
                raise RuntimeError(f"initial training: {job['status']} {job['error'] or job['result']}")
            result["initial_model"] = {"seconds": round(time.time() - t, 2), "val_dice": job["result"]["val_dice"]}
            print("correction → promoted model", flush=True)
            result["correction_to_promotion"] = bench_correction_to_promotion(
                backend, client, data / "labels" / "final", work, repeats)
            print("request throughput", flush=True)
            result["requests"] = bench_requests(backend, work, n_requests)
    finally:
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return result


def _retrain_words(r: dict) -> str:
    """How long the timed retrains trained: a correction's job names no length, so the worker's retrain schedule
    sizes it; results from before the jobs' iterations were recorded name the settings' length."""
    its = sorted({run.get("iterations") for run in r["correction_to_promotion"]["runs"]} - {None})
    if not its:
        return f"Fine-tuning {r['config']['train']['iterations']} iterations."
    return (f"Each correction's retrain ran {', '.join(map(str, its))} iterations, sized by the worker's retrain "
            f"schedule (training/retrain.py).")


def markdown(r: dict) -> str:
    e, c = r["environment"], r["correction_to_promotion"]
    m = c["median"]
    lines = [
        f"# Backend benchmark ({r['profile']} profile)",
        "",
        f"{e['date']} · {e['cpu']} ({e['cpu_count']} cores, load average at start {e['load_average_at_start']}) · "
        f"Python {e['python']}, torch {e['torch']}, MONAI {e['monai']}, FastAPI {e['fastapi']}, uvicorn {e['uvicorn']}, "
        f"SQLite {e['sqlite']} · {r['threads_per_process']} torch thread(s) per process",
        "",
        "Server and worker ran as subprocesses on 127.0.0.1 against a fresh datastore of phantoms "
        f"({'×'.join(map(str, r['config']['shape']))} voxels; patch {'×'.join(map(str, r['config']['train']['patch_size']))}). "
        + _retrain_words(r),
        "",
        "## Correction → promoted model version",
        "",
        f"Median of {len(c['runs'])} corrections (`retrain_every = 1`: the submission queues the job; promotion gate open).",
        "",
        "| stage | median (s) |",
        "|---|---:|",
        f"| submit call (upload, validate, write revision, queue job) | {m['submit_call_s']:.3f} |",
        f"| queue wait until a worker claims the job | {m['queue_wait_s']:.3f} |",
        f"| fine-tuning | {m['train_s']:.2f} |",
        f"| loading data, validation of new and parent version, publishing, promotion | {m['validate_publish_s']:.2f} |",
        f"| **submit → new version current** | **{m['submit_to_current_s']:.2f}** |",
        f"| (after promotion) re-scoring unreviewed cases | {m['scoring_after_promotion_s']:.2f} |",
        "",
        "| run | case | version | submit → current (s) | training (s) | val Dice (parent → new) |",
        "|---|---|---|---:|---:|---|",
    ]
    for i, run in enumerate(c["runs"], 1):
        pd = "–" if run["parent_val_dice"] is None else f"{run['parent_val_dice']:.3f}"
        lines.append(f"| {i} | {run['case_id']} | {run['model_version']} | {run['submit_to_current_s']:.2f} | "
                     f"{run['train_s']:.2f} | {pd} → {run['val_dice']:.3f} |")
    q = r["requests"]
    lines += [
        "",
        "## Requests per second on loopback",
        "",
        f"Label upload: a correction (label + reviewed mask, {q['label_upload_payload_bytes'] / 1024:.1f} KiB together, "
        f"{'×'.join(map(str, q['volume_shape']))} voxels) validated, written as an immutable fsynced revision and indexed.",
        "",
        "| request | clients | requests | req/s | p50 (ms) | p95 (ms) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in (("next_case", "GET /cases/next"), ("label_upload", "POST /cases/{id}/labels")):
        for t in q[name]:
            lines.append(f"| {label} | {t['concurrency']} | {t['requests']} | {t['requests_per_s']} | "
                         f"{t['latency_ms_p50']} | {t['latency_ms_p95']} | {t['errors']} |")
    lines += ["", "Reproduce: `make bench-backend` (or `python -m benchmarks.backend --profile quick`).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.backend", description=__doc__.split("\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--repeats", type=int, default=3, help="corrections timed to promotion")
    p.add_argument("--requests", type=int, default=200, help="requests per throughput measurement")
    p.add_argument("--threads", type=int, default=1, help="torch threads per server/worker process")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--keep", action="store_true", help="keep the temporary datastore")
    args = p.parse_args(argv)
    result = run(args.profile, args.repeats, args.requests, args.threads, args.keep)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "backend" if args.profile == "quick" else f"backend-{args.profile}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
