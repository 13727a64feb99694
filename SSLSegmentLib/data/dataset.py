"""A data-set folder: images at the root, `labels/final/<id>.<ext>`, and `dataset.json` with fixed splits.

This is the layout the phantom generator and `import-la` write, and close to MONAI Label's, so the backend's
datastore can import it in one step. `dataset.json` keys: `splits` {train, val, test} (lists of case ids).
When `dataset.json` is missing, every image with a final label is a training case and there are no splits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from SSLSegmentLib.data.volume import ImageError, Volume
from SSLSegmentLib.data.imageio import IMAGE_SUFFIXES, read_label, read_volume, strip_suffix

@dataclass
class Sample:
    """One training sample in memory. Arrays are (z, y, x).

    label: uint8 class map (zeros where unknown). labeled_mask: uint8, 1 where the label is known.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    labeled_mask: np.ndarray

    @property
    def is_labeled(self) -> bool:
        return bool(self.labeled_mask.any())


class DataSet:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data set folder {self.root} does not exist")
        meta_path = self.root / "dataset.json"
        self.meta: dict = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self._images = {
            strip_suffix(p.name): p
            for p in sorted(self.root.iterdir())
            if p.is_file() and p.name.endswith(IMAGE_SUFFIXES) and not p.name.startswith(".")
        }
        label_dir = self.root / "labels" / "final"
        self._labels = (
            {strip_suffix(p.name): p for p in sorted(label_dir.iterdir()) if p.name.endswith(IMAGE_SUFFIXES)}
            if label_dir.is_dir()
            else {}
        )
        if not self._images:
            raise FileNotFoundError(f"{self.root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        splits = self.meta.get("splits")
        if splits is None:
            splits = {"train": [c for c in self._images if c in self._labels], "val": [], "test": []}
        self.splits: dict[str, list[str]] = {k: list(splits.get(k, [])) for k in ("train", "val", "test")}
        for split, ids in self.splits.items():
            missing = [c for c in ids if c not in self._images]
            if missing:
                raise FileNotFoundError(f"{self.root}: {split} split names cases without an image: {missing[:5]}")

    @property
    def case_ids(self) -> list[str]:
        return list(self._images)

    def image_path(self, case_id: str) -> Path:
        return self._images[case_id]

    def label_path(self, case_id: str) -> Path | None:
        return self._labels.get(case_id)

    def load_image(self, case_id: str) -> Volume:
        return read_volume(self.image_path(case_id))

    def load_label(self, case_id: str, image: Volume | None = None) -> Volume:
        path = self.label_path(case_id)
        if path is None:
            raise ImageError(f"case {case_id} has no final label in {self.root / 'labels' / 'final'}")
        return read_label(path, image)

    def load_pair(self, case_id: str) -> tuple[Volume, Volume]:
        image = self.load_image(case_id)
        return image, self.load_label(case_id, image)

    def training_samples(self, case_ids: list[str], labeled_ids: set[str] | list[str]) -> list[Sample]:
        """Samples for the trainer: cases in `labeled_ids` are fully labeled, the others unlabeled."""
        labeled_ids = set(labeled_ids)
        samples = []
        for cid in case_ids:
            if cid in labeled_ids:
                image, label = self.load_pair(cid)
                samples.append(Sample(cid, image.array.astype(np.float32), label.array, np.ones(image.shape, np.uint8)))
            else:
                image = self.load_image(cid)
                zeros = np.zeros(image.shape, np.uint8)
                samples.append(Sample(cid, image.array.astype(np.float32), zeros, zeros.copy()))
        return samples
