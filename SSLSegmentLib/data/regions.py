"""Review regions: connected components of high uncertainty, ranked by how much error they probably hold.

The clinician (or the simulated one) visits them in rank order. Each region carries its voxel count, summed and mean
uncertainty, centroid and bounding box in IJK (x, y, z) index order, and the centroid in physical LPS mm when the
geometry is known (Slicer converts LPS to RAS by flipping the first two axes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from SSLSegmentLib.data.contract import validate_threshold
from SSLSegmentLib.data.volume import Geometry, ImageError


@dataclass
class ReviewRegion:
    rank: int  # 1 = visit first; also the region's value in the component map
    voxel_count: int
    uncertainty_sum: float
    uncertainty_mean: float
    centroid_ijk: tuple[float, float, float]
    bbox_min_ijk: tuple[int, int, int]
    bbox_max_ijk: tuple[int, int, int]  # inclusive
    centroid_lps: tuple[float, float, float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ReviewRegion":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def find_review_regions(
    uncertainty: np.ndarray,
    threshold: float = 0.5,
    min_voxels: int = 8,
    max_regions: int = 50,
    geometry: Geometry | None = None,
) -> tuple[list[ReviewRegion], np.ndarray]:
    """Components (26-connected) of `uncertainty > threshold`, ranked by summed uncertainty, largest first.

    uncertainty: (z, y, x) in [0, 1]. Returns the regions and a (z, y, x) int32 map holding each kept region's rank
    (0 elsewhere), so visited regions can be turned into a reviewed mask.
    """
    # Imported here: the review side (Slicer) imports ReviewRegion and visited_mask and must not need scipy.
    from scipy import ndimage

    if uncertainty.ndim != 3:
        raise ValueError(f"uncertainty must be a 3D (z, y, x) array, got shape {uncertainty.shape}")
    threshold = validate_threshold(threshold)
    u = np.nan_to_num(uncertainty.astype(np.float32), nan=0.0)
    components, n = ndimage.label(u > threshold, structure=np.ones((3, 3, 3), bool))
    rank_map = np.zeros(u.shape, np.int32)
    if n == 0:
        return [], rank_map
    index = np.arange(1, n + 1)
    counts = ndimage.sum_labels(np.ones_like(u), components, index)
    sums = ndimage.sum_labels(u, components, index)
    order = [i for i in np.argsort(-sums, kind="stable") if counts[i] >= min_voxels][:max_regions]
    slices = ndimage.find_objects(components)
    centroids = ndimage.center_of_mass(np.ones_like(u), components, [index[i] for i in order]) if order else []
    regions = []
    lut = np.zeros(n + 1, np.int32)
    for rank, (i, (cz, cy, cx)) in enumerate(zip(order, centroids), start=1):
        sl = slices[i]
        lut[i + 1] = rank
        centroid = (float(cx), float(cy), float(cz))
        regions.append(
            ReviewRegion(
                rank=rank,
                voxel_count=int(counts[i]),
                uncertainty_sum=float(sums[i]),
                uncertainty_mean=float(sums[i] / counts[i]),
                centroid_ijk=centroid,
                bbox_min_ijk=(sl[2].start, sl[1].start, sl[0].start),
                bbox_max_ijk=(sl[2].stop - 1, sl[1].stop - 1, sl[0].stop - 1),
                centroid_lps=geometry.index_to_lps(centroid) if geometry is not None else None,
            )
        )
    rank_map = lut[components]
    return regions, rank_map


def visited_mask(rank_map: np.ndarray, visited_ranks) -> np.ndarray:
    """uint8 (z, y, x) mask of the regions whose ranks are in `visited_ranks`."""
    ranks = np.asarray(sorted(set(int(r) for r in visited_ranks)), np.int32)
    return np.isin(rank_map, ranks[ranks > 0]).astype(np.uint8) if ranks.size else np.zeros(rank_map.shape, np.uint8)


def check_rank_map(rank_map: np.ndarray, regions: Sequence[ReviewRegion]) -> np.ndarray:
    """A region map received with its regions (what `find_review_regions` returns, computed elsewhere), as int32.

    rank_map: integer (z, y, x), region r's voxels hold r, 0 elsewhere. regions: ranked 1..n. Raises `ImageError`
    unless the map holds exactly the listed regions' voxel counts: a reviewed mask built from a map that does not
    match the regions shown would mark voxels the reviewer never saw.
    """
    n = len(regions)
    if [int(r.rank) for r in regions] != list(range(1, n + 1)):
        raise ImageError(f"review regions must be ranked 1..{n} in order, got ranks {[r.rank for r in regions][:10]}")
    array = np.asarray(rank_map)
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.integer):
        raise ImageError(f"a region map must be a 3D integer array, got {array.dtype} of shape {array.shape}")
    array = array.astype(np.int32, copy=False)
    if array.size and (int(array.min()) < 0 or int(array.max()) > n):
        raise ImageError(f"the region map holds ranks outside 0..{n}")
    counts = np.bincount(array.reshape(-1), minlength=n + 1)[1:]
    if [int(c) for c in counts] != [int(r.voxel_count) for r in regions]:
        raise ImageError(f"the region map does not hold the voxels of the {n} regions listed with it")
    return array
