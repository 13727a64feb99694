"""`make bench-speed`: what one training step and one uncertainty map cost, against the network they run.

Every row is timed in ONE process, interleaved round by round (each round times every variant once, in a rotated
order), so a neighbour's load shifts all rows alike; a row's number is the median over the rounds of the mean
milliseconds per call in that round. One torch thread unless --threads says otherwise.

Training rows (batch of 2 labeled + 2 unlabeled patches of 32×48×48; 2 labeled where a method ignores unlabeled data):
  network   the bare MONAI UNet with the default network's channels, strides and residual units and 2 output classes,
            and the default SegNet, each forward + cross-entropy + backward + SGD step on fixed tensors; candidate
            SegNets (fewer feature channels, no or an in-place feature activation, no full-resolution top residual
            unit) the same way
  method    every registered method's real `Trainer.train_step` on in-memory phantom samples (sampling, augmentation,
            the method's loss, the optimiser step, the EMA teacher)
  floor     per method, the same network's student forward/backward/step on the patches that method's student sees,
            plus the no-grad teacher passes that method makes (FLOORS says which), on fixed tensors
  parts     pieces of the trainer step on their own (batch sampling + augmentation, the EMA update)
Map rows (one 128×128×96 phantom volume, overlap 0.25):
  map       `predict_volume` with its defaults (head MC, T = 8, roi="auto": here one window of the whole volume) and
            with windows of the training patch (roi="patch"); the bare MONAI UNet's and the default SegNet's forward
            of the whole volume (one call, no sliding window) and their sliding-window forwards with windows of the
            training patch

Top-level ratios: network_vs_bare = SegNet / bare UNet step, step_vs_floor = method step / its floor,
map_vs_bare_forward = predict_volume / bare UNet whole-volume forward (issue 13's bound),
map_vs_bare_fast_forward = predict_volume / the bare UNet's whole-volume forward on its `inference_copy` in
channels_last_3d (the layout head MC's trunk runs in: what the map costs beyond the same speed-ups on the bare net),
map_vs_bare_sliding = predict_volume / bare UNet sliding-window forward with the training patch,
map_vs_network_forward = predict_volume / default SegNet whole-volume forward (what the map adds to its network).

    python -m benchmarks.speed            # writes benchmarks/results/training-speed.{json,md}
    python -m benchmarks.speed --quick    # tiny sizes, a few seconds: checks the machinery, not the speed
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from SSLSegmentLib.data.dataset import Sample
from SSLSegmentLib.data.phantoms import PhantomConfig, make_phantom
from SSLSegmentLib.ml.inference import DEFAULT_WINDOW_VOXELS, inference_window, predict_volume
from SSLSegmentLib.ml.methods import available_methods
from SSLSegmentLib.ml.methods.losses import enable_mc_dropout
from SSLSegmentLib.ml.networks import NetworkConfig, build_network, inference_copy
from SSLSegmentLib.ml.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Profile:
    network: dict
    patch: tuple[int, int, int]
    sample_shape: tuple[int, int, int]
    volume_shape: tuple[int, int, int]
    rounds: int
    map_rounds: int
    warmup: int
    n_samples: int  # per stream (labeled, unlabeled)


FULL = Profile(network=NetworkConfig().to_dict(), patch=(32, 48, 48), sample_shape=(64, 96, 96),
               volume_shape=(96, 128, 128), rounds=15, map_rounds=5, warmup=2, n_samples=3)
QUICK = Profile(network=NetworkConfig(channels=(4, 8), strides=(2,), features=4).to_dict(), patch=(8, 16, 16),
                sample_shape=(12, 20, 20), volume_shape=(12, 24, 24), rounds=2, map_rounds=1, warmup=1, n_samples=2)


# The teacher passes each method makes per step, read off its compute_loss (SSLSegmentLib/ml/methods/):
#   student: patches the student's forward sees; teacher: patches the teacher sees; full: full teacher forwards;
#   trunk/heads: head-MC passes (the trunk once, the head `passes` times; head-only dropout, the default network).
def _floor_spec(method, bl: int, bu: int) -> dict:
    b = bl + bu
    name = method.name
    if name == "supervised":
        return {"student": bl, "teacher": 0, "full": 0, "trunk": 0, "heads": 0}
    if name in ("mean-teacher", "lcc"):
        return {"student": b, "teacher": b, "full": 1, "trunk": 0, "heads": 0}
    # Copy-paste trains the student on the 2·min(bl, bu) mixes of the labeled/unlabeled pairs (copy_paste.py).
    mixed = 2 * min(bl, bu)
    if name == "bcp":
        return {"student": mixed, "teacher": b, "full": 1, "trunk": 0, "heads": 0}
    if name == "brl":  # teacher_probabilities(passes=self.passes): one forward, or head MC when passes > 1
        student = mixed if method.copy_paste is not None else b
        if method.passes == 1:
            return {"student": student, "teacher": b, "full": 1, "trunk": 0, "heads": 0}
        return {"student": student, "teacher": b, "full": 0, "trunk": 1, "heads": method.passes}
    if name in ("ua-mt", "ug-mcl"):
        return {"student": b, "teacher": b, "full": 0, "trunk": 1, "heads": method.passes}
    if name == "sgrs":  # the student sees the batch and the mixed unlabeled patches; the teacher the unlabeled ones
        return {"student": b + bu, "teacher": bu, "full": 1, "trunk": 0, "heads": 0}
    raise KeyError(f"no floor for method {name!r}: add what its step needs to benchmarks/speed.py _floor_spec")


def _describe_floor(spec: dict) -> str:
    s = f"student fwd/bwd/step on {spec['student']}"
    if spec["full"]:
        s += f" + {spec['full']} teacher fwd on {spec['teacher']}"
    if spec["trunk"]:
        s += f" + teacher trunk on {spec['teacher']} + {spec['heads']} heads"
    return s


# -- the things timed ----------------------------------------------------------------------------------------------
def _bare_unet(net_cfg: dict) -> torch.nn.Module:
    from monai.networks.nets import UNet

    c = NetworkConfig(**net_cfg)
    return UNet(spatial_dims=3, in_channels=c.in_channels, out_channels=c.num_classes, channels=c.channels,
                strides=c.strides, num_res_units=c.num_res_units, norm=c.norm)


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out


def _network_step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, channels_last: bool = False,
                  bf16: bool = False) -> Callable[[], None]:
    """Forward + cross-entropy + backward + SGD step of `net` on fixed (B, 1, ...) tensors; optionally in
    channels_last_3d memory format and/or under bf16 autocast (the CPU-speed candidates)."""
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    net.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(x)
            loss = F.cross_entropy(_logits(out).float(), y[:, 0])
            if isinstance(out, dict) and "levelset" in out:
                loss = loss + out["levelset"].float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _floor_step(net_cfg: NetworkConfig, spec: dict, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    student = build_network(net_cfg)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    xs, ys = x[: spec["student"]], y[: spec["student"]]
    if xs.shape[0] < spec["student"]:  # sgrs: the batch plus its mixed patches
        extra = spec["student"] - xs.shape[0]
        xs, ys = torch.cat([x, x[-extra:]]), torch.cat([y, y[-extra:]])
    xt = x[x.shape[0] - spec["teacher"]:] if spec["teacher"] else None
    student_step = _network_step(student, xs, ys)

    def step():
        with torch.no_grad():
            if spec["full"]:
                teacher.eval()
                for _ in range(spec["full"]):
                    teacher(xt)["logits"].softmax(1)
            if spec["trunk"]:
                enable_mc_dropout(teacher)
                f = teacher.features(xt)
                total = None
                for _ in range(spec["heads"]):
                    p = teacher.head(f).softmax(1)
                    total = p if total is None else total + p
        student_step()

    return step


def _phantom_samples(profile: Profile) -> list[Sample]:
    cfg = PhantomConfig(shape=profile.sample_shape)
    out = []
    for i in range(2 * profile.n_samples):
        image, label = make_phantom(100 + i, cfg)
        labeled = i < profile.n_samples
        mask = np.full(image.shape, 1 if labeled else 0, np.uint8)
        lab = label.array.astype(np.uint8) if labeled else np.zeros(image.shape, np.uint8)
        out.append(Sample(f"s{i}", image.array.astype(np.float32), lab, mask))
    return out


def _sliding_forward(net: torch.nn.Module, volume: np.ndarray, patch, overlap: float) -> Callable[[], None]:
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    net.eval()

    def run():
        with torch.inference_mode():
            sliding_window_inference(x, roi_size=patch, sw_batch_size=1, predictor=lambda w: _logits(net(w)),
                                     overlap=overlap, mode="gaussian", padding_mode="constant", cval=float(volume.min()))

    return run


def _whole_forward(net: torch.nn.Module, volume: np.ndarray, channels_last: bool = False) -> Callable[[], None]:
    """The network's forward of the whole volume as one call: the floor of any map made with that network.
    channels_last: the input in channels_last_3d (for a network converted with `inference_copy(net, True)`)."""
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    net.eval()

    def run():
        with torch.inference_mode():
            _logits(net(x))

    return run


# -- timing --------------------------------------------------------------------------------------------------------
def interleaved(variants: dict[str, Callable[[], None]], rounds: int, warmup: int, log=print) -> dict[str, list[float]]:
    """Milliseconds per call of each variant, one call per variant per round, the order rotated each round."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}")
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(1000.0 * (time.perf_counter() - t0))
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.0f}" for n in names[:4]) + " ...")
    return times


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _environment() -> dict:
    from benchmarks.experiment import environment
    from benchmarks.uncertainty import _cpu_name

    env = environment()
    env["processor"] = _cpu_name()
    env["cpu_count"] = os.cpu_count()
    return env


def run(profile: Profile, threads: int = 1, methods: list[str] | None = None, log=print) -> dict:
    """Build every variant, time them interleaved, and return the result dict (rows + the three ratios)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    load_start = _load()
    t_start = time.time()
    net_cfg = NetworkConfig(**profile.network)
    bl, bu = 2, 2
    b = bl + bu
    x = torch.randn(b, 1, *profile.patch)
    y = (torch.rand(b, 1, *profile.patch) > 0.7).long()

    rows: dict[str, dict] = {}
    train: dict[str, Callable[[], None]] = {}

    def add(name, group, fn, contains):
        rows[name] = {"group": group, "contains": contains}
        train[name] = fn

    add("bare-unet", "network", _network_step(_bare_unet(profile.network), x, y),
        f"MONAI UNet channels {list(net_cfg.channels)}, strides {list(net_cfg.strides)}, {net_cfg.num_res_units} res "
        f"unit, 2 classes: fwd + CE + bwd + SGD on {b}")
    top = "without" if net_cfg.drops_top_unit else "with"
    add("segnet", "network", _network_step(build_network(net_cfg), x, y),
        f"default SegNet (features {net_cfg.features}, {top} the top residual unit, head dropout, 1x1 head): "
        f"fwd + CE + bwd + SGD on {b}")
    if net_cfg.arch == "unet" and net_cfg.num_res_units > 0:
        other = not net_cfg.top_res_unit
        add("segnet-top" if other else "segnet-notop", "candidate",
            _network_step(build_network(net_cfg, top_res_unit=other), x, y),
            f"SegNet features {net_cfg.features}, top_res_unit={other}")
    for f in (4, 8):
        if f != net_cfg.features:
            add(f"segnet-f{f}", "candidate", _network_step(build_network(net_cfg, features=f), x, y),
                f"the default SegNet with features {f}")
    add("segnet-channels-last", "candidate", _network_step(build_network(net_cfg), x, y, channels_last=True),
        "the default SegNet, weights and input in channels_last_3d")
    add("segnet-bf16", "candidate", _network_step(build_network(net_cfg), x, y, bf16=True),
        "the default SegNet, forward and loss under CPU bf16 autocast")

    samples = _phantom_samples(profile)
    names = methods or list(available_methods())
    trainers: dict[str, Trainer] = {}
    floors: dict[str, str] = {}
    for name in names:
        cfg = TrainConfig(method=name, network=profile.network, patch_size=profile.patch, batch_labeled=bl,
                          batch_unlabeled=bu, iterations=1000, device="cpu", seed=0)
        t = Trainer(cfg, samples)
        trainers[name] = t
        spec = _floor_spec(t.method, bl, bu if t.method.uses_unlabeled else 0)
        floors[name] = _describe_floor(spec)
        add(f"step:{name}", "method", t.train_step, f"Trainer.train_step, batch {bl}+{bu if t.method.uses_unlabeled else 0}")
        add(f"floor:{name}", "floor", _floor_step(t.net_config, spec, x, y), floors[name])
    ref = trainers.get("mean-teacher") or next(iter(trainers.values()))
    add("part:make_batch", "parts", ref.make_batch, "Trainer.make_batch (sampling, crop, flips, turns) of 2+2")
    add("part:update_teacher", "parts", ref.update_teacher, "Trainer.update_teacher (EMA over the parameters)")

    log(f"training rows: {len(train)} variants x {profile.rounds} rounds")
    times = interleaved(train, profile.rounds, profile.warmup, log)

    # The map rows: one volume, one overlap; the training patch for every sliding-window row.
    vol_image, _ = make_phantom(7, PhantomConfig(shape=profile.volume_shape))
    volume = vol_image.array.astype(np.float32)
    segnet = build_network(net_cfg).eval()
    bare = _bare_unet(profile.network).eval()
    overlap = 0.25
    maps = {
        "map:predict_volume": lambda: predict_volume(segnet, volume, profile.patch, overlap=overlap, device="cpu"),
        "map:predict_volume-patch": lambda: predict_volume(segnet, volume, profile.patch, overlap=overlap, device="cpu",
                                                           roi="patch"),
        "map:segnet-whole-volume": _whole_forward(segnet, volume),
        "map:segnet-forward": _sliding_forward(segnet, volume, profile.patch, overlap),
        "map:bare-whole-volume": _whole_forward(bare, volume),
        "map:bare-whole-volume-fast": _whole_forward(inference_copy(bare, channels_last=True), volume, True),
        "map:bare-forward": _sliding_forward(bare, volume, profile.patch, overlap),
    }
    shape = "x".join(str(s) for s in reversed(profile.volume_shape))
    patch = "x".join(map(str, profile.patch))
    window = "x".join(str(s) for s in inference_window(profile.volume_shape, profile.patch, net_cfg.size_multiple,
                                                          DEFAULT_WINDOW_VOXELS["cpu"], overlap))
    rows["map:predict_volume"] = {"group": "map", "contains": f"predict_volume defaults (head MC, T=8, roi auto: window "
                                                              f"{window}) on {shape}, overlap {overlap}"}
    rows["map:predict_volume-patch"] = {"group": "map", "contains": f"the same with windows of the training patch {patch}"}
    rows["map:segnet-whole-volume"] = {"group": "map", "contains": "default SegNet forward of the whole volume, one call"}
    rows["map:segnet-forward"] = {"group": "map", "contains": f"default SegNet sliding-window forward, windows {patch}"}
    rows["map:bare-whole-volume"] = {"group": "map", "contains": "bare MONAI UNet forward of the whole volume, one call"}
    rows["map:bare-whole-volume-fast"] = {"group": "map", "contains": "the same on the bare UNet's inference copy "
                                                                      "(norms folded, channels_last_3d), as head MC runs"}
    rows["map:bare-forward"] = {"group": "map", "contains": f"bare MONAI UNet sliding-window forward, windows {patch}"}
    log(f"map rows: {len(maps)} variants x {profile.map_rounds} rounds")
    times.update(interleaved(maps, profile.map_rounds, min(profile.warmup, 1), log))

    for name, ts in times.items():
        rows[name].update({"ms": round(statistics.median(ts), 2), "ms_rounds": [round(t, 2) for t in ts]})
    ms = {n: r["ms"] for n, r in rows.items()}
    result = {
        "network_vs_bare": round(ms["segnet"] / ms["bare-unet"], 3),
        "step_vs_floor": {n: round(ms[f"step:{n}"] / ms[f"floor:{n}"], 3) for n in names},
        "map_vs_bare_forward": round(ms["map:predict_volume"] / ms["map:bare-whole-volume"], 3),
        "map_vs_bare_sliding": round(ms["map:predict_volume"] / ms["map:bare-forward"], 3),
        "map_vs_bare_fast_forward": round(ms["map:predict_volume"] / ms["map:bare-whole-volume-fast"], 3),
        "map_vs_network_forward": round(ms["map:predict_volume"] / ms["map:segnet-whole-volume"], 3),
        "environment": {**_environment(), "load_average_at_start": load_start, "load_average_at_end": _load(),
                        "torch_threads": threads},
        "config": {"patch": list(profile.patch), "batch": [bl, bu], "network": profile.network,
                   "sample_shape": list(profile.sample_shape), "volume_shape": list(profile.volume_shape),
                   "rounds": profile.rounds, "map_rounds": profile.map_rounds, "warmup": profile.warmup},
        "seconds": round(time.time() - t_start, 1),
        "rows": rows,
    }
    return result


def threads_busy(env: dict) -> float:
    """The 1-minute load above which the machine was not this benchmark's alone (its own threads + 0.5)."""
    return env.get("torch_threads", 1) + 0.5


def render(result: dict) -> str:
    env, rows = result["environment"], result["rows"]
    start, end = env.get("load_average_at_start"), env.get("load_average_at_end")
    lines = [
        "# Training speed: the trainer and the uncertainty map against the network they run",
        "",
        f"{env['date']}, {env['processor']} ({env.get('cpu_count')} cores), {env['torch_threads']} torch thread(s); "
        f"torch {env['torch']}, MONAI {env['monai']}, Python {env['python']}. `make bench-speed` "
        f"(`python -m benchmarks.speed`), {result['seconds']:.0f} s.",
        "",
        f"Load average (1, 5, 15 min) at start {start}, at end {end}.",
    ]
    # The end load includes this benchmark's own thread; anything well above it is another process.
    if start and (start[0] > 0.5 or (end and end[0] > threads_busy(env))):
        lines.append(f"**The machine was busy during this run**: another process was using CPU on these "
                     f"{env.get('cpu_count')} cores, so the absolute milliseconds are higher than on an idle machine; "
                     f"the ratios compare rows timed in the same rounds, under the same load.")
    cfg = result["config"]
    lines += [
        "",
        f"Every row is timed in one process, interleaved round by round ({cfg['rounds']} rounds for the training rows, "
        f"{cfg['map_rounds']} for the map rows, after {cfg['warmup']} warm-up calls); a row is the median over the "
        f"rounds. Training rows: batch {cfg['batch'][0]} labeled + {cfg['batch'][1]} unlabeled patches of "
        f"{'x'.join(map(str, cfg['patch']))}; methods train on phantom samples of {'x'.join(map(str, cfg['sample_shape']))}.",
        "",
        f"- **network_vs_bare** (default SegNet / bare MONAI UNet step): {result['network_vs_bare']:.2f}",
        f"- **map_vs_bare_forward** (predict_volume T=8 / bare UNet whole-volume forward): "
        f"{result['map_vs_bare_forward']:.2f}",
        f"- **map_vs_bare_fast_forward** (predict_volume T=8 / the same forward on the bare UNet's inference copy, "
        f"the layout head MC's trunk runs in): {result['map_vs_bare_fast_forward']:.2f}",
        f"- **map_vs_bare_sliding** (predict_volume T=8 / bare UNet sliding-window forward, training patch): "
        f"{result['map_vs_bare_sliding']:.2f}",
        f"- **map_vs_network_forward** (predict_volume T=8 / default SegNet whole-volume forward): "
        f"{result['map_vs_network_forward']:.2f}",
        "- **step_vs_floor**: " + ", ".join(f"{m} {v:.2f}" for m, v in result["step_vs_floor"].items()),
        "",
        "| row | group | ms | x bare | what it contains |",
        "|---|---|---:|---:|---|",
    ]
    bare, bare_map = rows["bare-unet"]["ms"], rows["map:bare-whole-volume"]["ms"]
    for name, r in rows.items():
        ref = bare_map if r["group"] == "map" else bare
        lines.append(f"| {name} | {r['group']} | {r['ms']:.1f} | {r['ms'] / ref:.2f} | {r['contains']} |")
    lines += ["", "| method | step ms | floor ms | step / floor | the floor |", "|---|---:|---:|---:|---|"]
    for m, ratio in result["step_vs_floor"].items():
        lines.append(f"| {m} | {rows['step:' + m]['ms']:.1f} | {rows['floor:' + m]['ms']:.1f} | {ratio:.2f} | "
                     f"{rows['floor:' + m]['contains']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds: checks the machinery in seconds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=None, help="training rounds (default: the profile's)")
    ap.add_argument("--methods", default=None, help="comma list (default: every registered method)")
    ap.add_argument("--render", action="store_true", help="re-render training-speed.md from the JSON in --out")
    ap.add_argument("--out", default=None, help="folder for training-speed.{json,md} (default: benchmarks/results, "
                                                "or benchmarks/work/speed-quick with --quick)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    profile = QUICK if args.quick else FULL
    if args.rounds is not None:
        if args.rounds < 1:
            ap.error("--rounds must be >= 1")
        profile = Profile(**{**profile.__dict__, "rounds": args.rounds})
    out = Path(args.out) if args.out else (ROOT / "benchmarks" / "work" / "speed-quick" if args.quick else RESULTS)
    if args.render:
        (out / "training-speed.md").write_text(render(json.loads((out / "training-speed.json").read_text())))
        return 0
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    result = run(profile, args.threads, methods, log=lambda s: print(s, flush=True))
    ratios = [(k, result[k]) for k in ("network_vs_bare", "map_vs_bare_forward", "map_vs_bare_fast_forward",
                                       "map_vs_bare_sliding",
                                       "map_vs_network_forward")]
    bad = [k for k, v in [*ratios, *result["step_vs_floor"].items()] if not (math.isfinite(v) and v > 0)]
    if bad:
        print(f"ratios not positive and finite: {bad}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "training-speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "training-speed.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
