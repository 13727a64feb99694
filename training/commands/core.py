"""Core commands: make-phantoms, train, infer, evaluate, methods."""

from __future__ import annotations

from training.commands import parse_key_values

import json
from pathlib import Path


def _net_args(p) -> None:
    p.add_argument("--arch", choices=["unet", "vnet"], default="unet")
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128], help="UNet channels per level")
    p.add_argument("--patch", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="training patch (default: TrainConfig's)")


def register(sub) -> None:
    p = sub.add_parser("make-phantoms", help="write a phantom data set folder (images, labels/final, dataset.json)")
    p.add_argument("out")
    p.add_argument("--train", type=int, default=40)
    p.add_argument("--val", type=int, default=8)
    p.add_argument("--test", type=int, default=12)
    p.add_argument("--shape", type=int, nargs=3, default=[40, 64, 64], metavar=("Z", "Y", "X"))
    p.add_argument("--difficulty", type=float, default=1.0)
    p.add_argument("--variability", type=float, default=0.0,
                   help="how much cases differ in contrast, noise, blur and anatomy (0 … 2; see PhantomConfig)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_phantoms)

    p = sub.add_parser("train", help="train a method on a data set folder (first N training cases labeled)")
    p.add_argument("--data", required=True)
    p.add_argument("--method", default="brl")
    p.add_argument("--labeled", type=int, default=None, help="number of labeled training cases (default: all)")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch", type=int, nargs=2, default=[2, 2], metavar=("LABELED", "UNLABELED"))
    p.add_argument("--val-interval", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE", help="e.g. beta=0.3")
    p.add_argument("--out", required=True)
    _net_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("infer", help="segment an image with a checkpoint; writes label, probability and uncertainty")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--passes", type=int, default=8, help="MC-dropout passes for the uncertainty")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("evaluate", help="Dice/Jaccard/HD95/ASD of a checkpoint on a data set split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", default=None, help="write the per-case JSON here")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("methods", help="list the registered SSL methods")
    p.set_defaults(func=cmd_methods)


def cmd_make_phantoms(args) -> int:
    from SSLSegmentLib.data.phantoms import PhantomConfig, write_phantom_dataset

    cfg = PhantomConfig(shape=tuple(args.shape), difficulty=args.difficulty, variability=args.variability)
    out = write_phantom_dataset(args.out, args.train, args.val, args.test, cfg, seed=args.seed, progress=True)
    print(f"wrote {args.train + args.val + args.test} phantoms to {out}")
    return 0


def cmd_train(args) -> int:
    from SSLSegmentLib.ml.methods import available_methods
    from SSLSegmentLib.ml.networks import NetworkConfig
    from SSLSegmentLib.ml.trainer import TrainConfig
    from benchmarks.experiment import run_experiment

    if args.method not in available_methods():
        raise KeyError(f"unknown method {args.method!r}; available: {', '.join(available_methods())}")
    if not Path(args.data).is_dir():
        raise FileNotFoundError(f"data set folder {args.data} does not exist")
    net = NetworkConfig(arch=args.arch, channels=tuple(args.channels), strides=(2,) * (len(args.channels) - 1))
    cfg = TrainConfig(
        method=args.method, method_options=parse_key_values(args.method_option), network=net.to_dict(),
        patch_size=tuple(args.patch or TrainConfig.patch_size), batch_labeled=args.batch[0], batch_unlabeled=args.batch[1],
        iterations=args.iterations, lr=args.lr, val_interval=args.val_interval, seed=args.seed, device=args.device,
    )
    result = run_experiment(args.data, cfg, args.labeled, args.out, progress_bar=True)
    s = result.get("test", {}).get("summary", {})
    print(f"best validation Dice {result['train']['best_val_dice']:.4f} at step {result['train']['best_step']}")
    if s:
        print(f"test Dice {s['dice']['mean']:.4f} ± {s['dice']['sd']:.4f}  HD95 {s['hd95_vox']['mean']:.2f} vox")
    print(f"checkpoint {result['checkpoint']}; result {Path(args.out) / 'result.json'}")
    return 0


def cmd_infer(args) -> int:
    from SSLSegmentLib.data.imageio import read_volume, write_volume
    from SSLSegmentLib.ml.inference import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, passes=args.passes)
    image = read_volume(args.image)
    pred = predictor(image)
    out = Path(args.out)
    for name, vol in pred.volumes(image).items():
        write_volume(vol, out / f"{name}.nrrd")
    print(f"wrote label, probability, entropy and mutual_information to {out}")
    return 0


def cmd_evaluate(args) -> int:
    from SSLSegmentLib.data.dataset import DataSet
    from SSLSegmentLib.ml.evaluation import EVAL_OVERLAP, evaluate_model
    from SSLSegmentLib.ml.inference import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, overlap=EVAL_OVERLAP)
    ds = DataSet(args.data)
    ids = ds.splits[args.split]
    if not ids:
        raise ValueError(f"{args.data}: the {args.split} split is empty")
    res = evaluate_model(predictor, ds, ids, progress=True)
    for k in ("dice", "jaccard", "hd95_vox", "asd_vox", "hd95_mm", "asd_mm"):
        v = res["summary"][k]
        print(f"{k:10s} {v['mean']:.4f} ± {v['sd']:.4f}  (n={v['n']}, undefined={v['n_undefined']})")
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint": args.checkpoint, "split": args.split, **res}, indent=2))
    return 0


def cmd_methods(args) -> int:
    from SSLSegmentLib.ml.methods import available_methods

    for name, cls in available_methods().items():
        print(f"{name:14s} {cls.summary}")
    return 0
