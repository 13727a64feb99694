"""The shared teacher-student trainer. Every method plugs in through `SSLMethod.compute_loss`.

What it owns: student + EMA teacher, two-stream batches (labeled first, then unlabeled), voxelwise
`labeled_mask`, sigmoid ramp-up, SGD with a learning-rate schedule, patch sampling and augmentation on tensors,
validation on a fixed split with the best checkpoint kept, atomic checkpoints carrying config, seed, data
snapshot and metrics, NaN detection, progress callbacks and cooperative cancellation.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from SSLSegmentLib.data.dataset import Sample
from SSLSegmentLib.ml.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from SSLSegmentLib.ml.inference import pick_device, predict_volume
from SSLSegmentLib.ml.methods import StepContext, get_method
from SSLSegmentLib.ml.methods.copy_paste import BidirectionalCopyPaste, labeled_copy_paste_loss
from SSLSegmentLib.ml.methods.losses import sigmoid_rampup
from SSLSegmentLib.ml.metrics import dice
from SSLSegmentLib.ml.networks import NetworkConfig, SegNet, build_network
from SSLSegmentLib.ml.train_options import EVAL_MODELS, LR_SCHEDULES

__all__ = [
    "PatchSampler",
    "Progress",
    "TrainConfig",
    "Trainer",
    "TrainingCancelled",
    "TrainingError",
    "TwoStreamSampler",
    "seed_everything",
]


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must see (NaN loss, no labeled data, ...)."""


class TrainingCancelled(RuntimeError):
    pass


@dataclass
class TrainConfig:
    """Everything that determines a training run (stored in every checkpoint and result).

    patch_size: (z, y, x). batch_labeled/batch_unlabeled: the two streams per step.
    rampup_steps: length of the sigmoid ramp of λ(t) (None: 40% of the iterations).
    lr_schedule: "constant", "step" (×0.1 every lr_step iterations) or "poly" ((1−t/T)^0.9).
    eval_model: which weights are validated and exported ("student" as in the LA papers, or "teacher").
    pretrain_iterations: the first steps of the run train on labeled-only copy-paste mixes with the supervised loss
        (BCP's pre-training stage; methods/copy_paste.py), whatever the method; needs batch_labeled >= 2. The EMA
        teacher follows the student through them, so the method's stage starts from a teacher of the pre-trained model.
    reviewed_patch_share: the probability that a patch of a corrected case (labeled only where reviewed) is centred
        on a reviewed voxel (PatchSampler); other cases are cropped uniformly.
    """

    method: str = "brl"
    method_options: dict = field(default_factory=dict)
    network: dict = field(default_factory=lambda: NetworkConfig().to_dict())
    patch_size: tuple[int, int, int] = (32, 48, 48)
    batch_labeled: int = 2
    batch_unlabeled: int = 2
    iterations: int = 1000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "constant"
    lr_step: int = 2500
    ema_decay: float = 0.99
    rampup_steps: int | None = None
    val_interval: int = 100
    val_overlap: float = 0.25
    eval_model: str = "student"
    seed: int = 0
    device: str = "auto"
    augment: bool = True
    pretrain_iterations: int = 0
    reviewed_patch_share: float = 0.5

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if isinstance(self.network, NetworkConfig):
            self.network = self.network.to_dict()
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {self.lr_schedule!r}")
        if self.eval_model not in EVAL_MODELS:
            raise ValueError(f"eval_model must be one of {', '.join(EVAL_MODELS)}; got {self.eval_model!r}")
        if self.iterations < 1 or self.batch_labeled < 1 or self.batch_unlabeled < 0:
            raise ValueError("iterations and batch_labeled must be >= 1, batch_unlabeled >= 0")
        if not 0 <= self.pretrain_iterations < self.iterations:
            raise ValueError(f"pretrain_iterations must be in [0, iterations), got {self.pretrain_iterations}")
        if not 0.0 <= self.reviewed_patch_share <= 1.0:
            raise ValueError(f"reviewed_patch_share must be in [0, 1], got {self.reviewed_patch_share}")
        if self.pretrain_iterations and self.batch_labeled < 2:
            raise ValueError("labeled-only copy-paste pre-training pairs labeled patches: batch_labeled must be >= 2")
        from SSLSegmentLib.ml.methods import available_methods
        from SSLSegmentLib.ml.methods.base import check_options

        if self.method in available_methods():  # an unknown name is refused where the method is built
            check_options(self.method, self.method_options)
        net = NetworkConfig(**self.network)
        bad = [p for p in self.patch_size if p % net.size_multiple]
        if len(self.patch_size) != 3 or bad:
            raise ValueError(f"patch_size {self.patch_size} must be 3 sizes, each a multiple of {net.size_multiple}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @property
    def ramp_length(self) -> int:
        return int(0.4 * self.iterations) if self.rampup_steps is None else int(self.rampup_steps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class PatchSampler:
    """Random training patches of in-memory volumes, cut and augmented as torch tensors.

    Per patch: zero-pad a volume smaller than the patch (symmetrically, as MONAI's SpatialPad), a crop whose corner is
    uniform over every position that keeps it inside the volume, then with `augment` a flip of y and a flip of x,
    each with probability 1/2, and with probability 1/2 an in-plane (y, x) turn by k·90°, k uniform in {1, 2, 3}
    (only when the plane is square, so the patch keeps its shape). These are the draws of MONAI's RandSpatialCropd,
    RandFlipd and RandRotate90d; done here directly on views of the volumes, a step costs two small copies per patch
    instead of dictionary transforms and a whole-volume dtype conversion per sample. Image, label and labeled_mask
    get the same crop and the same turns. Deterministic given the seed.

    reviewed_share: for a sample labeled only in part (a correction: labeled_mask marks the reviewed voxels), the
    probability that the crop is centred on one of its reviewed voxels (uniform over them, the crop then moved inside
    the volume) instead of uniform; as MONAI's RandCropByPosNegLabeld with the reviewed mask as the positive set.
    A corrected region is a few percent of the case, so a uniform crop would hold it only now and then. Fully
    labeled and unlabeled samples are cropped uniformly and draw the same random numbers as without the option.
    """

    def __init__(self, patch_size, augment: bool, seed: int, reviewed_share: float = 0.0):
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive sizes (z, y, x), got {patch_size}")
        if not 0.0 <= reviewed_share <= 1.0:
            raise ValueError(f"reviewed_share is a probability and must be in [0, 1], got {reviewed_share}")
        self.augment = bool(augment)
        self.turns = self.augment and self.patch_size[1] == self.patch_size[2]
        self.reviewed_share = float(reviewed_share)
        self.rng = np.random.default_rng(seed)
        self._reviewed: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def reviewed_voxels(self, labeled_mask: np.ndarray) -> np.ndarray | None:
        """Flat indices of a partly labeled mask's labeled voxels; None when it is all or nothing (cached per array;
        the cache holds the array, so its id is not reused while the entry lives)."""
        key = id(labeled_mask)
        if key not in self._reviewed:
            flat = np.flatnonzero(np.asarray(labeled_mask).reshape(-1))
            partial = 0 < flat.size < labeled_mask.size
            self._reviewed[key] = (labeled_mask, flat if partial else None)
        return self._reviewed[key][1]

    def draw(self, shape, reviewed: np.ndarray | None = None) -> dict:
        """The random choices for one patch of a volume of `shape` (z, y, x), after padding to the patch; with
        `reviewed` (flat indices into the unpadded volume) the crop may be centred on one of them."""
        size = [max(int(n), p) for n, p in zip(shape, self.patch_size)]
        if reviewed is not None and self.reviewed_share > 0 and self.rng.random() < self.reviewed_share:
            centre = np.unravel_index(int(reviewed[self.rng.integers(0, reviewed.size)]), tuple(int(n) for n in shape))
            start = [int(min(max(c + (m - int(n)) // 2 - p // 2, 0), m - p))
                     for c, n, m, p in zip(centre, shape, size, self.patch_size)]
        else:
            start = [int(self.rng.integers(0, n - p + 1)) for n, p in zip(size, self.patch_size)]
        flips: list[int] = []
        k = 0
        if self.augment:
            flips = [axis for axis in (1, 2) if self.rng.random() < 0.5]
            if self.turns and self.rng.random() < 0.5:
                k = int(self.rng.integers(1, 4))
        return {"start": start, "flips": flips, "k": k}

    def apply(self, volume: torch.Tensor, params: dict) -> torch.Tensor:
        """One volume (z, y, x) → its patch (z, y, x) under `params` (from `draw`)."""
        if volume.dim() != 3:
            raise ValueError(f"expected a volume (z, y, x), got shape {tuple(volume.shape)}")
        short = [max(p - n, 0) for n, p in zip(volume.shape, self.patch_size)]
        if any(short):
            pad = []
            for d in reversed(short):  # F.pad lists the last axis first
                pad += [d // 2, d - d // 2]
            volume = torch.nn.functional.pad(volume, pad)
        (z, y, x), (pz, py, px) = params["start"], self.patch_size
        patch = volume[z : z + pz, y : y + py, x : x + px]
        if params["flips"]:
            patch = torch.flip(patch, params["flips"])
        if params["k"]:
            patch = torch.rot90(patch, params["k"], (1, 2))
        return patch

    def __call__(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image, label, labeled_mask) patches (z, y, x) of one sample, in the sample's dtypes."""
        volumes = [torch.as_tensor(np.ascontiguousarray(a)) for a in (sample.image, sample.label, sample.labeled_mask)]
        if not volumes[0].shape == volumes[1].shape == volumes[2].shape:
            raise ValueError(f"sample {sample.case_id}: image, label and labeled_mask differ in shape "
                             f"{[tuple(v.shape) for v in volumes]}")
        reviewed = self.reviewed_voxels(sample.labeled_mask) if self.reviewed_share > 0 else None
        params = self.draw(volumes[0].shape, reviewed)
        return tuple(self.apply(v, params) for v in volumes)


class TwoStreamSampler:
    """Labeled stream and unlabeled stream, each reshuffled when exhausted (deterministic given the seed)."""

    def __init__(self, samples: list[Sample], batch_labeled: int, batch_unlabeled: int, seed: int):
        self.labeled = [i for i, s in enumerate(samples) if s.is_labeled]
        self.unlabeled = [i for i, s in enumerate(samples) if not s.is_labeled]
        if not self.labeled:
            raise TrainingError("no labeled voxels in the training set: label at least one case or one region")
        self.bl, self.bu = batch_labeled, batch_unlabeled if self.unlabeled else 0
        self.rng = np.random.default_rng(seed)
        self._queues: dict[str, list[int]] = {"l": [], "u": []}

    def _take(self, key: str, pool: list[int], n: int) -> list[int]:
        out = []
        while len(out) < n:
            if not self._queues[key]:
                self._queues[key] = list(self.rng.permutation(pool))
            out.append(int(self._queues[key].pop()))
        return out

    def next(self) -> tuple[list[int], list[int]]:
        return self._take("l", self.labeled, self.bl), self._take("u", self.unlabeled, self.bu)


@dataclass
class Progress:
    step: int
    iterations: int
    loss: float
    terms: dict
    lr: float
    elapsed_s: float
    val_dice: float | None = None
    best_dice: float | None = None

    @property
    def eta_s(self) -> float:
        return self.elapsed_s / max(self.step, 1) * (self.iterations - self.step)


class Trainer:
    """Train one method on in-memory samples; validate on `val` samples (image, label) pairs."""

    def __init__(
        self,
        config: TrainConfig,
        samples: list[Sample],
        val: list[Sample] | None = None,
        out_dir: str | Path | None = None,
        data_snapshot: dict | None = None,
        init_checkpoint: str | Path | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        distributed: bool = False,
    ):
        self.config = config
        self.samples = samples
        self.val = val or []
        self.out_dir = Path(out_dir) if out_dir else None
        self.data_snapshot = data_snapshot or {}
        self.on_progress = on_progress
        self.should_stop = should_stop or (lambda: False)
        self.distributed = distributed and torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if self.distributed else 0
        self.world = torch.distributed.get_world_size() if self.distributed else 1

        seed_everything(config.seed + self.rank)
        self.device = pick_device(config.device)
        self.method = get_method(config.method, **config.method_options).to(self.device)
        net_cfg = NetworkConfig(**{**config.network, **self.method.network_options})
        self.net_config = net_cfg
        self.student: SegNet = build_network(net_cfg).to(self.device)
        if init_checkpoint:
            ckpt = load_checkpoint(init_checkpoint)
            self.student.load_state_dict(ckpt["model"], strict=False)
        self.teacher: SegNet = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.model = self.student
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.student, find_unused_parameters=True)
        self.optimizer = torch.optim.SGD(
            self.student.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        self.patches = PatchSampler(config.patch_size, config.augment, config.seed * 7919 + self.rank,
                                    config.reviewed_patch_share)
        bu = config.batch_unlabeled if self.method.uses_unlabeled else 0
        self.sampler = TwoStreamSampler(samples, config.batch_labeled, bu, config.seed * 104729 + self.rank)
        self.generator = torch.Generator().manual_seed(config.seed * 31 + self.rank)
        self.copy_paste = BidirectionalCopyPaste()
        self.step = 0
        self.history: list[dict] = []
        self.best = {"dice": -1.0, "step": 0}

    # -- one step -------------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        c = self.config
        if c.lr_schedule == "step":
            return c.lr * (0.1 ** (step // c.lr_step))
        if c.lr_schedule == "poly":
            return c.lr * (1.0 - step / c.iterations) ** 0.9
        return c.lr

    def make_batch(self) -> dict[str, torch.Tensor]:
        """The next step's batch: labeled stream first, then unlabeled; image/labeled_mask float, label long, each
        (B, 1, *patch_size), and n_labeled (a 0-d tensor)."""
        li, ui = self.sampler.next()
        patches = [self.patches(self.samples[i]) for i in li + ui]
        image, label, mask = (torch.stack([p[k] for p in patches])[:, None] for k in range(3))
        return {
            "image": image.to(self.device, torch.float32),
            "label": label.to(self.device, torch.long),
            "labeled_mask": mask.to(self.device, torch.float32),
            "n_labeled": torch.tensor(len(li)),
        }

    @torch.no_grad()
    def update_teacher(self) -> None:
        """teacher ← α·teacher + (1 − α)·student over the parameters (α = min(1 − 1/(step + 1), ema_decay)); the
        buffers (BatchNorm statistics) are copied. One fused call per list rather than two kernels per tensor."""
        alpha = min(1.0 - 1.0 / (self.step + 1), self.config.ema_decay)
        teacher = list(self.teacher.parameters())
        torch._foreach_mul_(teacher, alpha)
        torch._foreach_add_(teacher, [p.detach() for p in self.student.parameters()], alpha=1.0 - alpha)
        torch._foreach_copy_(list(self.teacher.buffers()), list(self.student.buffers()))

    def train_step(self) -> tuple[float, dict]:
        c = self.config
        lr = self.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.student.train()
        batch = self.make_batch()
        ctx = StepContext(
            student=self.model,
            teacher=self.teacher,
            batch=batch,
            step=self.step,
            max_steps=c.iterations,
            rampup=sigmoid_rampup(self.step, c.ramp_length),
            generator=self.generator,
        )
        if self.step < c.pretrain_iterations:
            out = labeled_copy_paste_loss(ctx, self.copy_paste)
        else:
            out = self.method.compute_loss(ctx)
        if not torch.isfinite(out.loss):
            raise TrainingError(
                f"loss became {float(out.loss.detach())} at step {self.step} (terms {out.terms}); "
                f"try a lower learning rate (now {lr})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        self.step += 1
        self.update_teacher()
        self.method.after_step(ctx)
        return float(out.loss.detach()), {**out.terms, "lr": lr}

    # -- validation and checkpoints -------------------------------------------------------------------------
    @property
    def eval_net(self) -> SegNet:
        return self.student if self.config.eval_model == "student" else self.teacher

    def validate(self) -> float:
        if not self.val:
            return math.nan
        dices = []
        for s in self.val:
            pred = predict_volume(
                self.eval_net, s.image, self.config.patch_size, passes=1, overlap=self.config.val_overlap, device=self.device
            )
            dices.append(dice(pred.label > 0, s.label > 0))
        return float(np.mean(dices))

    def checkpoint(self, metrics: dict) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": {k: v.detach().cpu() for k, v in self.eval_net.state_dict().items()},
            "student": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
            "teacher": {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()},
            "method_state": {k: v.detach().cpu() for k, v in self.method.state_dict().items()},
            "network": self.net_config.to_dict(),
            "train_config": self.config.to_dict(),
            "method": self.config.method,
            "method_options": self.method.options(),
            "seed": self.config.seed,
            "step": self.step,
            "data": self.data_snapshot,
            "metrics": metrics,
            "history": self.history,
            "versions": {"torch": str(torch.__version__)},
        }

    def save(self, name: str, metrics: dict) -> Path | None:
        if self.out_dir is None or self.rank != 0:
            return None
        return save_checkpoint(self.checkpoint(metrics), self.out_dir / name)

    # -- the loop -------------------------------------------------------------------------------------------
    def fit(self, progress_bar: bool = False) -> dict:
        c = self.config
        t0 = time.time()
        bar = None
        if progress_bar and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=c.iterations, desc=f"train {c.method}", unit="it")
        last_loss, terms = math.nan, {}
        while self.step < c.iterations:
            if self.should_stop():
                raise TrainingCancelled(f"cancelled at step {self.step}")
            last_loss, terms = self.train_step()
            val_dice = None
            if self.val and (self.step % c.val_interval == 0 or self.step == c.iterations):
                val_dice = self.validate()
                self.history.append({"step": self.step, "loss": last_loss, "val_dice": val_dice})
                if val_dice > self.best["dice"]:
                    self.best = {"dice": val_dice, "step": self.step}
                    self.save("best.pt", {"val_dice": val_dice, "val_step": self.step})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.3f}", val=f"{self.best['dice']:.3f}")
            if self.on_progress is not None:
                self.on_progress(
                    Progress(self.step, c.iterations, last_loss, terms, terms.get("lr", c.lr), time.time() - t0, val_dice,
                             self.best["dice"] if self.best["dice"] >= 0 else None)
                )
        if bar is not None:
            bar.close()
        if not self.val:
            self.best = {"dice": math.nan, "step": self.step}
            self.save("best.pt", {"val_dice": math.nan, "val_step": self.step})
        last_dice = self.history[-1]["val_dice"] if self.history else math.nan
        self.save("last.pt", {"val_dice": last_dice, "val_step": self.step})
        return {
            "best_val_dice": self.best["dice"],
            "best_step": self.best["step"],
            "last_val_dice": last_dice,
            "final_loss": last_loss,
            "seconds": time.time() - t0,
            "history": self.history,
        }
