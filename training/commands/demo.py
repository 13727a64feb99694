"""`sslsegment demo` (`make demo`): the interactive-refinement loop end to end on its embedded default.

    phantom data set (few labels) → brl teacher trained by the backend's worker → server + worker on 127.0.0.1
    → a simulated clinician reviews the uncertainty regions of the cases `GET /cases/next?strategy=uncertainty` serves,
      submits corrections, the backend retrains after each round; the same from the same teacher with random regions
      of the same sizes, the oracle's largest errors, and no correction
    → report (markdown + PNGs) under OUT/report/, whose path is printed at the end.

Sized for a small CPU-only machine; docs/refinement.md has the measurements behind the defaults.
Running it again into the same folder reuses the phantoms and replaces the previous run's datastores and report.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

MARKER = ".sslsegment-demo"
PHANTOMS = {"n_train": 24, "n_val": 4, "n_test": 6}
# The demo's retrains train half as long per new case as the worker's default schedule so that its four arms fit the
# demo's time budget on a 2-core machine; what the longer default buys: docs/refinement.md, "The retrain".
DEMO_PER_NEW_CASE = 60


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the interactive-refinement loop end to end on phantom data (report under OUT)")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--rounds", type=int, default=3, help="review + retrain rounds per strategy")
    p.add_argument("--cases-per-round", type=int, default=2, help="cases the clinician reviews per round")
    p.add_argument("--budget", type=float, default=0.02, help="share of a case's voxels the clinician reviews (0.02 = 2%%)")
    p.add_argument("--labeled", type=int, default=4, help="train cases labeled at the start")
    p.add_argument("--teacher-iterations", type=int, default=300)
    p.add_argument("--finetune-iterations", type=int, default=None,
                   help="a fixed retrain length (default: the worker's schedule, sized to the round's corrections)")
    p.add_argument("--arms", nargs="+", default=["uncertainty", "random", "oracle", "none"],
                   help="strategies to compare (uncertainty random boundary oracle none uncertainty-full-label)")
    # One thread by default: the loop runs one thing at a time, and on a small machine that is also busy a second
    # torch thread per process spins against the other processes' threads and multiplies the CPU time
    # (docs/refinement.md).
    p.add_argument("--threads", type=int, default=1, help="torch threads of the worker, server and evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


def _prepare_out(out: Path) -> None:
    """A demo folder is ours to refresh; any other non-empty folder is refused (nothing of the user's is deleted)."""
    from training.cli import CommandError

    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise CommandError(f"{out} exists and was not made by `sslsegment demo`; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by sslsegment demo; the work/ and report/ folders are replaced on every run\n")
    for sub in ("work", "report"):
        shutil.rmtree(out / sub, ignore_errors=True)


def cmd_demo(args) -> int:
    import torch

    from SSLSegmentLib.data.phantoms import PhantomConfig, write_phantom_dataset
    from benchmarks.refinement import Console, LoopConfig, LoopError, finetune_params, run_loop, save_detail
    from benchmarks.report import write_report
    from training.cli import CommandError
    from training.retrain import RetrainSchedule

    cfg = LoopConfig(
        arms=list(args.arms), rounds=args.rounds, cases_per_round=args.cases_per_round, budget_fraction=args.budget,
        n_labeled=args.labeled,
        teacher={"method": "brl", "iterations": args.teacher_iterations, "lr": 0.02, "lr_schedule": "poly",
                 "val_interval": max(1, args.teacher_iterations // 3)},
        finetune=finetune_params(args.finetune_iterations) if args.finetune_iterations else {},
        retrain={**RetrainSchedule().to_dict(), "per_new_case": DEMO_PER_NEW_CASE},
        threads=args.threads, seed=args.seed,
    )
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    _prepare_out(out)
    console = Console()
    t0 = time.time()
    data = out / "data"
    gen = {"seed": args.seed, **PHANTOMS}
    stamp = data / "demo-phantoms.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == gen):
        shutil.rmtree(data, ignore_errors=True)
        console(f"[1/4] phantom data set ({PHANTOMS['n_train']} train / {PHANTOMS['n_val']} val / "
                f"{PHANTOMS['n_test']} test, 40×64×64) → {data}")
        write_phantom_dataset(data, config=PhantomConfig(), seed=args.seed, **PHANTOMS)
        stamp.write_text(json.dumps(gen))
    else:
        console(f"[1/4] phantom data set: reusing {data}")
    console(f"[2/4] backend on 127.0.0.1 and a brl teacher from {args.labeled} labeled cases "
            f"({args.teacher_iterations} iterations)")
    console(f"[3/4] {args.rounds} rounds × {args.cases_per_round} cases × {len(cfg.arms)} strategies "
            f"({', '.join(cfg.arms)}); review budget {100 * args.budget:g} % of each case; after each round a retrain "
            + (f"of {args.finetune_iterations} iterations" if args.finetune_iterations else
               f"sized to the round's corrections (the worker's schedule at {DEMO_PER_NEW_CASE} iterations per new "
               "case)"))
    try:
        result = run_loop(data, out / "work", cfg, console)
    except LoopError as exc:
        raise CommandError(str(exc)) from None
    console("[4/4] report")
    save_detail(result["_detail"], out / "work" / "detail.npz")
    report = write_report(result, out / "report")
    s = result["summary"]["arms"]
    for arm, row in s.items():
        console(f"      {arm:>24}: test Dice {100 * row['dice'][0]:.2f} → {100 * row['dice'][-1]:.2f} %, "
                f"{row['reviewed_voxels']} voxels reviewed, {row['edited_voxels']} fixed")
    console(f"done in {time.time() - t0:.0f} s (CPU {result['cpu_seconds']:.0f} s)")
    print(f"report: {report.resolve()}", flush=True)
    return 0
