"""Import the LA2018 h5 layout of the SSL literature into a data-set folder (images, labels/final, dataset.json).

Source layout (as redistributed by the UA-MT authors): `<case>/mri_norm2.h5` with datasets `image` (float, z-scored)
and `label` (0/1), axis order (x, y, z) as stored, and `train.list` (one case per line, the standard order: the first
N are the labeled ones in the usual protocol). No spacing is stored; the challenge volumes are 0.625 mm isotropic.
Our arrays are (z, y, x), so the stored arrays are transposed.

Splits written to dataset.json (case order is kept, so `train[:N]` are the protocol's labeled cases):
  test  the `test_ids` given, else the source's `test.list` when all its cases are present, else a DEVELOPMENT test
        split: the last `n_test` cases of train.list (the official 20 test cases are not part of the 80);
  val   the `val_ids` given, else the last `n_val` of the remaining train.list cases;
  train everything else, in train.list order.
With the defaults on the 80 cases: train = the first 60, val = cases 61-70, test = cases 71-80.

The stored intensities were z-scored before cropping, so their scale varies between cases (foreground means from
0.3 to 3.9 in LA2018); `zscore` re-normalises each volume to zero mean and unit sd over the stored crop, which a
short training budget needs (without it one LA2018 case is missed entirely by every method after 450 iterations).
Half resolution averages 2×2×2 blocks (odd sizes are padded by repeating the edge) and keeps a label voxel when at
least half of its block is foreground; the spacing becomes 1.25 mm and the origin moves by half an original voxel,
so the new voxel centres sit at the centres of the blocks they summarise.
h5py is an optional dependency (`pip install 'sslsegment[la]'`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from SSLSegmentLib.data.contract import validate_case_id
from SSLSegmentLib.data.volume import Geometry, ImageError, Volume
from SSLSegmentLib.data.imageio import atomic_write_bytes, write_volume

LA_SPACING_MM = 0.625
LA_FILE = "mri_norm2.h5"


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError("reading the LA h5 layout needs h5py: pip install 'sslsegment[la]'") from None
    return h5py


def read_list(path: str | Path) -> list[str]:
    """Case names from a list file (one per line, blank lines and '#' comments ignored), each a valid case id."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"case list {path} does not exist")
    names = [ln.strip() for ln in path.read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    for n in names:
        validate_case_id(n)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{path}: cases listed twice: {dup[:5]}")
    return names


def read_la_case(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One `mri_norm2.h5` → (image float32, label uint8), both (z, y, x)."""
    h5py = _h5py()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("image", "label") if k not in f]
            if missing:
                raise ImageError(f"{path}: no dataset {', '.join(missing)} (has {', '.join(f.keys()) or 'nothing'})")
            image, label = f["image"][()], f["label"][()]
    except OSError as exc:
        raise ImageError(f"{path}: not a readable h5 file ({exc})") from None
    if image.ndim != 3 or label.shape != image.shape:
        raise ImageError(f"{path}: image {image.shape} and label {label.shape} must be 3D and the same shape")
    if min(image.shape) < 2:
        raise ImageError(f"{path}: degenerate size {image.shape}")
    image = np.asarray(image, np.float32)
    if not np.isfinite(image).all():
        raise ImageError(f"{path}: the image holds NaN or infinite values")
    values = np.unique(label)
    if not set(values.tolist()) <= {0, 1}:
        raise ImageError(f"{path}: the label must be binary (0/1); found values {values[:10].tolist()}")
    # Stored (x, y, z); ours (z, y, x).
    return np.ascontiguousarray(image.transpose(2, 1, 0)), np.ascontiguousarray(label.transpose(2, 1, 0).astype(np.uint8))


def half_resolution(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2×2×2 block mean of the image and block majority (≥ half) of the label; (z, y, x) → (⌈z/2⌉, ⌈y/2⌉, ⌈x/2⌉)."""
    if image.shape != label.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and label {label.shape} must be 3D and the same shape")
    pad = [(0, s % 2) for s in image.shape]
    small = tuple((s + 1) // 2 for s in image.shape)

    def blocks(a: np.ndarray) -> np.ndarray:
        a = np.pad(a.astype(np.float32), pad, mode="edge")
        return a.reshape(small[0], 2, small[1], 2, small[2], 2).mean(axis=(1, 3, 5))

    return blocks(image).astype(np.float32), (blocks(label) >= 0.5).astype(np.uint8)


def la_splits(
    train_order: list[str],
    n_val: int = 10,
    n_test: int = 10,
    val_ids: list[str] | None = None,
    test_ids: list[str] | None = None,
    test_kind: str | None = None,
) -> dict:
    """{"train", "val", "test", "test_kind"}; see the module docstring for the rule. Order within each is kept."""
    if n_val < 0 or n_test < 0:
        raise ValueError("n_val and n_test must be >= 0")
    order = list(train_order)
    if test_ids is not None:
        test, kind = list(test_ids), test_kind or "given"
    else:
        if n_test >= len(order):
            raise ValueError(f"cannot hold out {n_test} test cases from {len(order)}")
        test, kind = (order[len(order) - n_test :] if n_test else []), "development (the last cases of train.list)"
    rest = [c for c in order if c not in set(test)]
    if val_ids is not None:
        val = list(val_ids)
    else:
        if n_val >= len(rest):
            raise ValueError(f"cannot hold out {n_val} validation cases from the {len(rest)} left after the test split")
        val = rest[len(rest) - n_val :] if n_val else []
    train = [c for c in rest if c not in set(val)]
    overlap = set(val) & set(test)
    if overlap:
        raise ValueError(f"cases in both the validation and the test list: {sorted(overlap)[:5]}")
    if not train:
        raise ValueError("no training cases left after the validation and test splits")
    return {"train": train, "val": val, "test": test, "test_kind": kind}


def import_la(
    src: str | Path,
    dst: str | Path,
    half_res: bool = False,
    n_val: int = 10,
    n_test: int = 10,
    val_ids: list[str] | None = None,
    test_ids: list[str] | None = None,
    train_list: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
    zscore: bool = False,
) -> Path:
    """Convert `src` (LA h5 layout) into the data-set folder `dst`; returns `dst`. dataset.json is written last."""
    src, dst = Path(src), Path(dst)
    _h5py()
    if not src.is_dir():
        raise FileNotFoundError(f"LA source folder {src} does not exist")
    order = read_list(train_list or src / "train.list")
    if not order:
        raise ValueError(f"{train_list or src / 'train.list'} lists no cases")
    test_kind = None
    if test_ids is None and (src / "test.list").is_file():
        official = read_list(src / "test.list")
        if official and all((src / c / LA_FILE).is_file() for c in official):
            test_ids, test_kind = official, "official (the source's test.list)"
    for ids in (val_ids, test_ids):
        for c in ids or []:
            validate_case_id(c)
    splits = la_splits(order, n_val, n_test, val_ids, test_ids, test_kind)
    cases = splits["train"] + splits["val"] + splits["test"]
    missing = [c for c in cases if not (src / c / LA_FILE).is_file()]
    if missing:
        raise FileNotFoundError(f"{src}: no {LA_FILE} for {len(missing)} listed case(s), e.g. {missing[:3]}")
    if (dst / "dataset.json").exists() and not overwrite:
        raise FileExistsError(f"{dst} already holds a data set (dataset.json); choose another folder or pass --overwrite")

    spacing = LA_SPACING_MM * (2 if half_res else 1)
    origin = LA_SPACING_MM / 2 if half_res else 0.0
    geometry = Geometry((spacing,) * 3, (origin,) * 3)
    iterator = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, desc="import-la", unit="case")
    shapes = {}
    for cid in iterator:
        image, label = read_la_case(src / cid / LA_FILE)
        if half_res:
            image, label = half_resolution(image, label)
        if zscore:
            image = ((image - image.mean()) / max(float(image.std()), 1e-6)).astype(np.float32)
        write_volume(Volume(image, geometry), dst / f"{cid}.nrrd", overwrite=overwrite)
        write_volume(Volume(label, geometry), dst / "labels" / "final" / f"{cid}.nrrd", overwrite=overwrite)
        shapes[cid] = list(image.shape)
    meta = {
        "name": "LA2018" + (" (half resolution)" if half_res else ""),
        "description": "Left atrium cavity in 3D LGE-MRI, 2018 Atrial Segmentation Challenge, as preprocessed by the "
        "UA-MT authors (cropped around the atrium, z-scored). Cite Xiong et al., Medical Image Analysis 67 (2021).",
        "source": str(src.resolve()),
        "spacing_mm": spacing,
        "half_resolution": bool(half_res),
        "intensity": "z-scored per volume over the stored crop" if zscore else "as stored in the source",
        "labels": {"0": "background", "1": "left atrium"},
        "splits": {k: splits[k] for k in ("train", "val", "test")},
        "split_notes": {
            "train": "train.list order; the first N are the labeled cases of the usual protocol",
            "val": "given list" if val_ids is not None else f"the last {n_val} train.list cases before the test split",
            "test": splits["test_kind"],
        },
        "shapes_zyx": shapes,
    }
    atomic_write_bytes(dst / "dataset.json", json.dumps(meta, indent=2).encode(), overwrite=True)
    return dst
