"""Deterministic 3D phantoms that look like the left-atrium MRI task.

Each phantom has a bright blood-pool target (a deformed ellipsoid with 2-4 tubular veins) and touching neighbours
of the same intensity that are *not* target, so that parts of the boundary can only be told from shape and position,
as in late-gadolinium MRI where the atrium touches the aorta and the ventricle. Tissue texture, a smooth bias field,
Rician noise, partial-volume blur, anisotropic spacing and a non-identity direction complete the picture.
Ground truth marks the target only.

Same seed, same config → the same volume, bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from SSLSegmentLib.data.volume import Geometry, Volume
from SSLSegmentLib.data.imageio import atomic_write_bytes, write_volume


@dataclass
class PhantomConfig:
    """Knobs of the generator.

    shape: voxels (z, y, x). spacing: mm (x, y, z); anisotropic by default like many clinical scans.
    difficulty: scales noise, bias field and how many neighbours touch the target (0.5 easy … 2 hard).
    variability: how much the cases differ from each other (0 = one scanner and one anatomy range … 2 = wide):
        per-case contrast curve (gamma), blood/tissue contrast, neighbour brightness relative to the target, noise
        level, blur, target size and extra neighbours. This is what a few labeled cases cannot cover and what
        unlabeled cases show the model, as with multi-centre MRI. Drawn from a separate random stream, so
        variability 0 gives the same volumes as before the knob existed.
    """

    shape: tuple[int, int, int] = (40, 64, 64)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.6)
    difficulty: float = 1.0
    rotation_deg: float = 12.0  # direction cosines: rotation about the z axis
    variability: float = 0.0

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise ValueError(f"shape must be three sizes of at least 8 voxels, got {self.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive numbers, got {self.spacing}")
        if not 0.0 < self.difficulty <= 4.0:
            raise ValueError(f"difficulty must be in (0, 4], got {self.difficulty}")
        if not 0.0 <= self.variability <= 4.0:
            raise ValueError(f"variability must be in [0, 4], got {self.variability}")


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Zero-mean, unit-sd smooth random field."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=sigma, mode="wrap")
    return (n - n.mean()) / (n.std() + 1e-8)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _ellipsoid_distance(pts: np.ndarray, centre, radii, rot) -> np.ndarray:
    """Normalised ellipsoid distance (1 on the surface) for points (..., 3) in mm."""
    local = (pts - centre) @ rot
    return np.sqrt(np.sum((local / radii) ** 2, axis=-1))


def _tube_distance(pts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in mm from each point to the segment a-b."""
    ab = b - a
    t = np.clip(((pts - a) @ ab) / float(ab @ ab), 0.0, 1.0)
    closest = a + t[..., None] * ab
    return np.linalg.norm(pts - closest, axis=-1)


def make_phantom(seed: int, config: PhantomConfig | None = None) -> tuple[Volume, Volume]:
    """One phantom: (image, label). Image is z-scored float32; label is uint8 {0, 1} for the target only."""
    cfg = config or PhantomConfig()
    rng = np.random.default_rng(seed)
    nz, ny, nx = cfg.shape
    sx, sy, sz = cfg.spacing
    zz, yy, xx = np.meshgrid(np.arange(nz) * sz, np.arange(ny) * sy, np.arange(nx) * sx, indexing="ij")
    pts = np.stack([xx, yy, zz], axis=-1).astype(np.float32)  # mm, (x, y, z) per voxel
    extent = np.array([nx * sx, ny * sy, nz * sz], dtype=np.float32)
    d = cfg.difficulty
    v = cfg.variability
    # Per-case appearance and anatomy factors: their own stream, so that v = 0 leaves `rng`'s draws unchanged.
    case_rng = np.random.default_rng([seed, 0x5EED])
    spread = case_rng.uniform(-1.0, 1.0, 7) * v
    gamma = float(np.exp(0.45 * spread[0]))
    tissue_level = 0.35 * float(np.exp(0.35 * spread[1]))
    neighbour_gain = float(np.exp(0.12 * spread[2]))
    noise_gain = float(np.exp(0.45 * spread[3]))
    blur_gain = float(np.exp(0.35 * spread[4]))
    size_gain = float(np.exp(0.18 * spread[5]))
    extra_neighbours = int(case_rng.integers(0, int(round(v)) + 1))

    # Target: deformed ellipsoid near the centre, radii a fraction of the field of view.
    centre = extent * (0.5 + rng.uniform(-0.08, 0.08, 3))
    radii = extent.min() * rng.uniform(0.19, 0.27, 3)
    radii[2] = min(radii[2], extent[2] * 0.3)
    radii = radii * size_gain
    rot = _random_rotation(rng)
    shape_noise = ndimage.zoom(_smooth_noise(rng, (6, 6, 6), 1.0), np.array(cfg.shape) / 6.0, order=1)
    target = (_ellipsoid_distance(pts, centre, radii, rot) + 0.18 * shape_noise[: nz, : ny, : nx]) < 1.0

    # Veins: 2-4 tubes leaving the target outward.
    for _ in range(int(rng.integers(2, 5))):
        direction = _unit(rng)
        direction[2] *= 0.5
        direction /= np.linalg.norm(direction)
        start = centre + direction * radii.mean() * 0.6
        end = centre + direction * radii.mean() * rng.uniform(1.7, 2.4)
        target |= _tube_distance(pts, start, end) < rng.uniform(1.8, 3.0) * min(sx, sy) * 1.2

    # Neighbours: same-intensity structures touching the target, never labeled.
    neighbours = np.zeros(cfg.shape, bool)
    n_neigh = int(np.clip(rng.integers(1, 3) + round(d - 1.0), 1, 4)) + extra_neighbours
    for _ in range(n_neigh):
        direction = _unit(rng)
        nb_radii = extent.min() * rng.uniform(0.10, 0.17, 3)
        reach = radii.mean() * 0.85 + nb_radii.mean() * 0.8
        nb_centre = centre + direction * reach
        neighbours |= _ellipsoid_distance(pts, nb_centre, nb_radii, _random_rotation(rng)) < 1.0
    # A vessel crossing near the target (aorta-like), same intensity.
    a = centre + _unit(rng) * radii.mean() * 1.3
    b = a + _unit(rng) * extent.max()
    neighbours |= _tube_distance(pts, a - (b - a), b) < rng.uniform(2.5, 4.0)
    neighbours &= ~target

    # A thin, partly missing darker wall between target and neighbours: a cue, but not a reliable one.
    target_shell = ndimage.binary_dilation(target, iterations=1) & ~target
    wall = target_shell & neighbours & (_smooth_noise(rng, cfg.shape, 2.0) > 0.3 * d)

    # Intensities: tissue texture, blood pool, wall.
    tissue = tissue_level + 0.06 * _smooth_noise(rng, cfg.shape, 1.5) + 0.05 * _smooth_noise(rng, cfg.shape, 4.0)
    img = tissue.astype(np.float32)
    blood = 1.0 + 0.04 * _smooth_noise(rng, cfg.shape, 3.0)
    img = np.where(target, blood, np.where(neighbours, blood * neighbour_gain, img))
    img = np.where(wall, 0.5 * img + 0.15, img)
    # Partial-volume blur (anisotropic in voxels because the spacing is), then bias field, then Rician noise.
    img = ndimage.gaussian_filter(img, sigma=(0.6 * blur_gain, 0.9 * blur_gain, 0.9 * blur_gain))
    bias = np.exp(0.25 * d * ndimage.zoom(_smooth_noise(rng, (4, 4, 4), 0.8), np.array(cfg.shape) / 4.0, order=1))
    img = img * bias[: nz, : ny, : nx]
    img = np.power(np.clip(img, 0.0, None), gamma)  # the scanner's contrast curve differs from case to case
    sigma = 0.07 * d * noise_gain
    img = np.sqrt((img + sigma * rng.standard_normal(cfg.shape)) ** 2 + (sigma * rng.standard_normal(cfg.shape)) ** 2)
    img = ((img - img.mean()) / (img.std() + 1e-8)).astype(np.float32)

    angle = np.deg2rad(cfg.rotation_deg)
    c, s = np.cos(angle), np.sin(angle)
    geometry = Geometry(
        spacing=tuple(float(v) for v in cfg.spacing),
        origin=(-0.5 * extent[0], -0.5 * extent[1], 10.0),
        direction=(c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0),
    )
    return Volume(img, geometry), Volume(target.astype(np.uint8), geometry)


def write_phantom_dataset(
    out: str | Path,
    n_train: int = 40,
    n_val: int = 8,
    n_test: int = 12,
    config: PhantomConfig | None = None,
    seed: int = 0,
    suffix: str = ".nrrd",
    progress: bool = False,
    workers: int = 1,
) -> Path:
    """Write a data-set folder: images at the root, `labels/final/`, and `dataset.json` with the fixed splits.

    Case ids are `phantom_NNN`; the split is fixed by the order (train, then val, then test).
    Every train case has a label on disk; how many count as labeled is the trainer's choice (the first N).
    workers > 1 writes the cases from that many processes (worth it at LA scale); each case depends on its seed
    alone, so the folder is the same either way. `dataset.json` is written last, so its presence means complete.
    """
    cfg = config or PhantomConfig()
    out = Path(out)
    (out / "labels" / "final").mkdir(parents=True, exist_ok=True)
    total = n_train + n_val + n_test
    if n_train < 1 or n_val < 0 or n_test < 0:
        raise ValueError("need at least one training case and non-negative val/test counts")
    ids = [f"phantom_{i:03d}" for i in range(total)]
    jobs = [(str(out), ids[i], seed * 100_003 + i, cfg, suffix) for i in range(total)]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_phantom_case, jobs))
    else:
        if progress:
            from tqdm import tqdm

            jobs = tqdm(jobs, desc="phantoms", unit="case")
        for job in jobs:
            _write_phantom_case(job)
    meta = {
        "name": "phantom-la",
        "description": "Synthetic left-atrium-like MRI phantoms (target: blood pool with veins; neighbours unlabeled)",
        "generator": {"seed": seed, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}},
        "labels": {"0": "background", "1": "target"},
        "splits": {"train": ids[:n_train], "val": ids[n_train : n_train + n_val], "test": ids[n_train + n_val :]},
    }
    atomic_write_bytes(out / "dataset.json", json.dumps(meta, indent=2).encode())
    return out


def _write_phantom_case(job: tuple) -> None:
    out, case_id, case_seed, cfg, suffix = job
    image, label = make_phantom(case_seed, cfg)
    write_volume(image, Path(out) / f"{case_id}{suffix}")
    write_volume(label, Path(out) / "labels" / "final" / f"{case_id}{suffix}")
