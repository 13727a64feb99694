"""Volumes and their geometry, with the project's one index↔physical conversion. numpy only.

Arrays are in SimpleITK/Slicer order (k, j, i) = (z, y, x); geometry is in SimpleITK's LPS convention:
physical = origin + direction · (spacing ⊙ ijk). Slicer's RAS is diag(-1, -1, 1) · LPS. SimpleITK is imported only by
`to_sitk`/`from_sitk`, so code that runs inside Slicer can hold volumes without loading it at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class ImageError(ValueError):
    """An image or label that cannot be used, with a message that says why."""


@dataclass
class Geometry:
    """Physical placement of a voxel grid: spacing (x, y, z) in mm, origin in mm (LPS), 3×3 direction (row-major)."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def matches(self, other: "Geometry", tol: float = 1e-4) -> bool:
        return (
            np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol * 100)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def to_dict(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]))

    # -- the one index <-> physical conversion ------------------------------------------------------------------
    def ijk_to_lps(self) -> np.ndarray:
        """4×4 IJK→LPS matrix (homogeneous), ijk in (x, y, z) = (i, j, k) index order."""
        direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        m = np.eye(4)
        m[:3, :3] = direction @ np.diag(np.asarray(self.spacing, dtype=float))
        m[:3, 3] = np.asarray(self.origin, dtype=float)
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """4×4 IJK→RAS matrix, what a Slicer volume node holds."""
        return LPS_TO_RAS @ self.ijk_to_lps()

    def index_to_lps(self, ijk: Sequence[float]) -> tuple[float, float, float]:
        """A continuous (i, j, k) index to its physical LPS point in mm."""
        p = self.ijk_to_lps() @ np.append(np.asarray(ijk, dtype=float), 1.0)
        return tuple(float(v) for v in p[:3])

    def index_to_ras(self, ijk: Sequence[float]) -> tuple[float, float, float]:
        return lps_to_ras(self.index_to_lps(ijk))

    @classmethod
    def from_ijk_to_ras(cls, matrix: np.ndarray) -> "Geometry":
        """Inverse of `ijk_to_ras` for a matrix without shear (what every volume node holds)."""
        lps = LPS_TO_RAS @ np.asarray(matrix, dtype=float)
        columns = lps[:3, :3]
        spacing = np.linalg.norm(columns, axis=0)
        if np.any(spacing <= 0):
            raise ImageError(f"degenerate IJK→RAS matrix (column norms {spacing})")
        direction = columns / spacing
        return cls(tuple(float(s) for s in spacing), tuple(float(o) for o in lps[:3, 3]),
                   tuple(float(d) for d in direction.reshape(-1)))


def lps_to_ras(point: Sequence[float]) -> tuple[float, float, float]:
    return (-float(point[0]), -float(point[1]), float(point[2]))


def ras_to_lps(point: Sequence[float]) -> tuple[float, float, float]:
    return lps_to_ras(point)  # the flip is its own inverse


@dataclass
class Volume:
    """A 3D array (z, y, x) with its geometry."""

    array: np.ndarray
    geometry: Geometry = field(default_factory=lambda: Geometry((1.0, 1.0, 1.0)))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def to_sitk(self):
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        img.SetSpacing([float(s) for s in self.geometry.spacing])
        img.SetOrigin([float(o) for o in self.geometry.origin])
        img.SetDirection([float(d) for d in self.geometry.direction])
        return img

    @classmethod
    def from_sitk(cls, img) -> "Volume":
        import SimpleITK as sitk

        return cls(
            sitk.GetArrayFromImage(img),
            Geometry(tuple(img.GetSpacing()), tuple(img.GetOrigin()), tuple(img.GetDirection())),
        )

    def like(self, array: np.ndarray) -> "Volume":
        """A new volume with this one's geometry and another array of the same shape."""
        if tuple(array.shape) != self.shape:
            raise ImageError(f"array shape {tuple(array.shape)} does not match the volume shape {self.shape}")
        return Volume(array, self.geometry)
