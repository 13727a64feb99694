"""Backend commands: serve, worker, import-datastore, token, exclude, exclusions, datastore-check, datastore-settings,
import-model."""

from __future__ import annotations

from training.commands import parse_key_values

import json
import math
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the REST backend for a datastore (127.0.0.1 by default)")
    p.add_argument("--datastore", required=True, help="datastore folder (created if missing)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--max-upload-mb", type=float, default=None, help="request size limit (default: datastore setting, 512)")
    p.add_argument("--retrain-every", type=int, default=None,
                   help="queue a training job after this many new corrections (0 = manual only; stored in the datastore)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="promote a new version if its validation Dice drops by at most this (stored in the datastore)")
    p.add_argument("--device", default="auto", help="inference device")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.add_argument("--body-timeout-s", type=float, default=None,
                   help="give up on a request body that pauses this long between two pieces (default 60)")
    p.add_argument("--show-token", action="store_true", help="print the API token itself, not only where it is")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run the training worker for a datastore (claims queued jobs)")
    p.add_argument("--datastore", required=True)
    p.add_argument("--once", action="store_true", help="exit when the queue is empty")
    p.add_argument("--nproc", type=int, default=None, help="default DDP processes per job (torchrun); a job's nproc wins")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--device", default=None, help="training device (default: the job's, else auto)")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between queue polls")
    p.add_argument("--stale-after", type=float, default=60.0,
                   help="re-queue running jobs whose heartbeat is older than this many seconds")
    p.add_argument("--max-attempts", type=int, default=2, help="starts of one job before a lost worker fails it")
    p.add_argument("--heartbeat", type=float, default=2.0, help="seconds between heartbeats")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("import-datastore",
                       help="import a MONAI-Label-style or phantom folder (images, labels/final, dataset.json) into a datastore")
    p.add_argument("source")
    p.add_argument("--datastore", required=True, help="datastore folder (created if missing)")
    p.add_argument("--labels", default="all",
                   help="final labels to import: all, none, val, val+test, or train:N (first N train cases + val)")
    p.add_argument("--split", type=float, nargs=3, default=[0.8, 0.2, 0.0], metavar=("TRAIN", "VAL", "TEST"),
                   help="split ratios for cases without dataset.json splits (used only when the datastore is created)")
    p.add_argument("--split-seed", default=None, help="seed of the hash split (used only when the datastore is created)")
    p.add_argument("--model", default=None, help="also register this checkpoint as the first model version")
    p.add_argument("--train-defaults", default=None, help="JSON object merged into the datastore's training defaults")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("import-model", help="register a checkpoint as a new model version of a datastore")
    p.add_argument("checkpoint")
    p.add_argument("--datastore", required=True)
    p.add_argument("--promote", action="store_true", help="make it current")
    p.set_defaults(func=cmd_import_model)

    p = sub.add_parser("token", help="print the datastore's API token (owner only)")
    p.add_argument("--datastore", required=True)
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("exclude", help="take a case or one label revision out of training (files kept, recorded)")
    p.add_argument("--datastore", required=True)
    p.add_argument("--case", required=True)
    p.add_argument("--revision", type=int, default=None, help="one label revision of the case (default: the case)")
    p.add_argument("--reason", required=True, help="why, for the audit trail")
    p.add_argument("--author", default="anonymous")
    p.set_defaults(func=cmd_exclude)

    p = sub.add_parser("exclusions", help="list every exclusion (the audit trail), or lift one back into training")
    p.add_argument("--datastore", required=True)
    p.add_argument("--active", action="store_true", help="only those in force")
    p.add_argument("--lift", type=int, default=None, metavar="ID", help="lift this exclusion (needs --reason)")
    p.add_argument("--reason", default=None)
    p.add_argument("--author", default="anonymous")
    p.set_defaults(func=cmd_exclusions)

    p = sub.add_parser("datastore-check", help="check a datastore's index and files; --clean removes staging "
                       "leftovers and uploads older than an hour")
    p.add_argument("--datastore", required=True)
    p.add_argument("--clean", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("datastore-settings", help="show or change datastore settings (KEY=JSON ...)")
    p.add_argument("--datastore", required=True)
    p.add_argument("changes", nargs="*", metavar="KEY=VALUE", help='e.g. retrain_every=5 train=\'{"iterations": 200}\'')
    p.set_defaults(func=cmd_settings)


def cmd_serve(args) -> int:
    from training.datastore import Datastore
    from training.server import serve

    store = Datastore(args.datastore, create=True)
    changes = {}
    if args.retrain_every is not None:
        if args.retrain_every < 0:
            raise ValueError("--retrain-every must be >= 0")
        changes["retrain_every"] = args.retrain_every
    if args.tolerance is not None:
        changes["tolerance"] = args.tolerance
    if changes:
        store.update_settings(changes)
    from training.server import BODY_TIMEOUT_S

    timeout = BODY_TIMEOUT_S if args.body_timeout_s is None else args.body_timeout_s
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError("--body-timeout-s must be a positive number of seconds")
    serve(args.datastore, args.host, args.port, max_upload_mb=args.max_upload_mb, device=args.device,
          log_level=args.log_level, announce=lambda m: print(m, flush=True), body_timeout_s=timeout,
          show_token=args.show_token)
    return 0


def cmd_worker(args) -> int:
    import signal

    from training.worker import Worker

    worker = Worker(args.datastore, poll_s=args.poll, stale_after_s=args.stale_after, max_attempts=args.max_attempts,
                    heartbeat_s=args.heartbeat, nproc=args.nproc, threads=args.threads, device=args.device,
                    log=lambda m: print(m, flush=True))
    def on_term(signum, frame):
        # Stop now rather than finish the job in hand: the job's heartbeat stops and the next worker re-queues it.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        worker.run(once=args.once)
    except KeyboardInterrupt:
        print("worker stopped", flush=True)
    return 0


def cmd_import(args) -> int:
    from training.datastore import Datastore, import_folder
    from training.registry import ModelRegistry

    store = Datastore(args.datastore, create=True, split_ratios=tuple(args.split), split_seed=args.split_seed)
    if args.train_defaults:
        store.update_settings({"train": json.loads(args.train_defaults)})
    counts = import_folder(store, args.source, labels=args.labels, progress=True)
    print(f"imported {counts['registered']} new cases ({counts['existing']} already there), "
          f"{counts['labels']} final labels, {counts['originals']} original labels into {store.root}")
    s = store.summary()
    print(f"splits: train {s['splits']['train']}, val {s['splits']['val']}, test {s['splits']['test']}")
    if args.model:
        registry = ModelRegistry(store)
        model = registry.add_version(Path(args.model), {"parent": None, "metrics": {}, "trained_on": {},
                                                        "decision": "imported"})
        registry.promote(model["version"], reason=f"imported from {Path(args.model).name}")
        print(f"registered {args.model} as {model['version']} (current)")
    return 0


def cmd_import_model(args) -> int:
    from training.datastore import Datastore
    from training.registry import ModelRegistry

    registry = ModelRegistry(Datastore(args.datastore))
    model = registry.add_version(Path(args.checkpoint), {"parent": registry.current, "metrics": {},
                                                         "trained_on": {}, "decision": "imported"})
    if args.promote:
        registry.promote(model["version"], reason=f"imported from {Path(args.checkpoint).name}")
    print(f"registered {args.checkpoint} as {model['version']}{' (current)' if args.promote else ''}")
    return 0


def cmd_token(args) -> int:
    from training.datastore import Datastore

    store = Datastore(args.datastore)
    token, created = store.ensure_token()
    print(token)
    return 0


def cmd_check(args) -> int:
    from training.datastore import Datastore

    report = Datastore(args.datastore).check(clean=args.clean)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


def cmd_exclude(args) -> int:
    from training.datastore import Datastore

    print(json.dumps(Datastore(args.datastore).exclude(args.case, args.reason, args.author, args.revision), indent=2))
    return 0


def cmd_exclusions(args) -> int:
    from training.datastore import Datastore

    store = Datastore(args.datastore)
    if args.lift is not None:
        print(json.dumps(store.lift_exclusion(args.lift, args.author, args.reason or ""), indent=2))
    else:
        print(json.dumps(store.exclusions(active_only=args.active), indent=2))
    return 0


def cmd_settings(args) -> int:
    from training.datastore import Datastore

    store = Datastore(args.datastore)
    settings = store.update_settings(parse_key_values(args.changes)) if args.changes else store.settings
    print(json.dumps(settings, indent=2))
    return 0
