"""`sslsegment demo`: the main job on its embedded default, with nothing to prepare.

phantom data set with few labels → a `brl` teacher → evaluation on the test split → uncertainty on one case.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the embedded default end to end on phantom data")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--iterations", type=int, default=400)
    p.add_argument("--labeled", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    import torch

    from SSLSegmentLib.data.dataset import DataSet
    from SSLSegmentLib.data.imageio import write_volume
    from SSLSegmentLib.data.phantoms import PhantomConfig, write_phantom_dataset
    from SSLSegmentLib.inference import predict_volume
    from SSLSegmentLib.regions import find_review_regions
    from SSLSegmentLib.trainer import TrainConfig, model_from_checkpoint
    from training.experiment import run_experiment

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    out = Path(args.out)
    t0 = time.time()
    data = out / "data"
    if not (data / "dataset.json").is_file():
        print(f"[1/3] phantom data set → {data}")
        write_phantom_dataset(data, n_train=24, n_val=4, n_test=6, config=PhantomConfig(), seed=args.seed, progress=True)
    cfg = TrainConfig(method="brl", iterations=args.iterations, lr=0.02, lr_schedule="poly", val_interval=100,
                      seed=args.seed, device=args.device)
    print(f"[2/3] training a brl teacher with {args.labeled} labeled cases ({args.iterations} iterations)")
    result = run_experiment(data, cfg, args.labeled, out / "teacher", progress_bar=True)
    s = result["test"]["summary"]
    print(f"      test Dice {100 * s['dice']['mean']:.1f} ± {100 * s['dice']['sd']:.1f} %, HD95 {s['hd95_vox']['mean']:.1f} vox")
    print("[3/3] uncertainty and review regions on one test case")
    ds = DataSet(data)
    case = ds.splits["test"][0]
    image, _ = ds.load_pair(case)
    model, _ = model_from_checkpoint(out / "teacher" / "best.pt")
    pred = predict_volume(model, image, cfg.patch_size, passes=8, device=args.device)
    for name, vol in pred.volumes(image).items():
        write_volume(vol, out / "prediction" / case / f"{name}.nrrd")
    regions, _ = find_review_regions(pred.entropy, threshold=0.5, geometry=image.geometry)
    summary = {
        "test_dice": s["dice"]["mean"],
        "test_hd95_vox": s["hd95_vox"]["mean"],
        "case": case,
        "review_regions": [r.to_dict() for r in regions[:10]],
        "checkpoint": str(out / "teacher" / "best.pt"),
        "seconds": time.time() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"      {len(regions)} review regions; top: " + ", ".join(f"#{r.rank} {r.voxel_count} vox" for r in regions[:3]))
    print(f"done in {time.time() - t0:.0f} s; results in {out}")
    return 0
