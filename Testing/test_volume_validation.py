"""The volume and label readers as the backend's door: properties over generated inputs (hypothesis), and headers
that declare more than they may, refused before a voxel is decoded."""

from __future__ import annotations

import gzip
import time

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from SSLSegmentLib.data.imageio import read_label, read_volume, write_volume  # noqa: E402
from SSLSegmentLib.data.volume import Geometry, ImageError, Volume  # noqa: E402

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
SHAPES = hnp.array_shapes(min_dims=3, max_dims=3, min_side=2, max_side=5)


@PROPERTY
@given(values=st.one_of(
    *[hnp.arrays(t, SHAPES, elements=st.integers(-300, 300)) for t in (np.int16, np.int32, np.float32)],
    hnp.arrays(np.uint16, SHAPES, elements=st.integers(0, 300)), hnp.arrays(np.uint8, SHAPES)))
def test_a_label_is_read_exactly_or_refused_never_wrapped(tmp_path, values):
    """Every value in 0..255 comes back as itself; anything else is refused with the range in the message, in
    whatever type the file stores it (a uint8 cast would wrap 256 to 0 and -1 to 255)."""
    path = write_volume(Volume(values), tmp_path / "label.nrrd")
    if values.min() >= 0 and values.max() <= 255:
        label = read_label(path)
        assert label.array.dtype == np.uint8 and np.array_equal(label.array, values.astype(np.int64))
    else:
        with pytest.raises(ImageError, match="label values must be 0..255"):
            read_label(path)


@PROPERTY
@given(values=hnp.arrays(np.float32, SHAPES, elements=st.floats(-1e3, 1e3, width=32)))
def test_a_fractional_label_is_refused(tmp_path, values):
    path = write_volume(Volume(values), tmp_path / "label.nrrd")
    if np.array_equal(values, np.round(values)) and values.min() >= 0 and values.max() <= 255:
        assert np.array_equal(read_label(path).array, values)
    else:
        with pytest.raises(ImageError, match="integer values|0..255"):
            read_label(path)


@PROPERTY
@given(values=hnp.arrays(np.float32, SHAPES, elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
def test_an_image_with_a_non_finite_voxel_is_refused_and_a_finite_one_round_trips(tmp_path, values):
    path = write_volume(Volume(values), tmp_path / "image.nrrd")
    bad = int((~np.isfinite(values)).sum())
    if bad:
        with pytest.raises(ImageError, match=f"{bad} voxels? hold NaN or infinity"):
            read_volume(path)
    else:
        assert np.array_equal(read_volume(path).array, values)


@PROPERTY
@given(spacing=st.tuples(*[st.floats(-10, 100, allow_nan=False) | st.just(float("nan")) | st.just(0.0)] * 3))
def test_spacing_is_refused_unless_positive_finite_and_plausible(tmp_path, spacing):
    path = tmp_path / "image.nrrd"
    _nrrd_header(path, (3, 3, 3), b"\0" * 27, spacing=spacing, encoding="raw")
    if all(np.isfinite(s) and 0 < s <= 50 for s in spacing):
        assert read_volume(path).geometry.spacing == pytest.approx(spacing)
    else:
        with pytest.raises(ImageError, match="implausible voxel spacing|not a readable image"):
            read_volume(path)


def _nrrd_header(path, size, data: bytes, spacing=(1.0, 1.0, 1.0), encoding="gzip", direction=None):
    """An NRRD file written by hand: whatever header an attacker likes, over `data`."""
    sx, sy, sz = spacing
    d = direction or ((sx, 0, 0), (0, sy, 0), (0, 0, sz))
    dirs = " ".join("(" + ",".join(repr(float(v)) for v in row) + ")" for row in d)
    header = (f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: {size[0]} {size[1]} {size[2]}\n"
              f"space: left-posterior-superior\nspace directions: {dirs}\n"
              f"space origin: (0,0,0)\nencoding: {encoding}\n\n").encode()
    path.write_bytes(header + data)
    return path


def test_a_header_that_declares_gigabytes_is_refused_before_decoding(tmp_path):
    """A few kilobytes that claim 8 GB of voxels (a decompression bomb's header) are refused from the header, in
    well under a second, without allocating the volume."""
    bomb = _nrrd_header(tmp_path / "bomb.nrrd", (2048, 2048, 2048), gzip.compress(b"\0" * 2**20))
    assert bomb.stat().st_size < 10_000
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="more than the limit"):
        read_volume(bomb)
    assert time.perf_counter() - t0 < 5  # generous: the point is that nothing was decoded
    with pytest.raises(ImageError, match="more than the limit"):
        read_label(bomb)
    # A label is bounded by its case's grid: one voxel more than the case has is refused the same way.
    small = write_volume(Volume(np.zeros((4, 5, 6), np.uint8)), tmp_path / "small.nrrd")
    assert read_label(small, max_voxels=120).array.shape == (4, 5, 6)
    with pytest.raises(ImageError, match="more than the limit of 119"):
        read_label(small, max_voxels=119)


def test_a_direction_that_is_not_a_rotation_is_refused(tmp_path):
    sheared = _nrrd_header(tmp_path / "sheared.nrrd", (3, 3, 3), b"\0" * 27, encoding="raw",
                           direction=((1, 0, 0), (1, 1, 0), (0, 0, 1)))
    with pytest.raises(ImageError, match="not a rotation"):
        read_volume(sheared)
    ok = write_volume(Volume(np.zeros((3, 3, 3), np.float32), Geometry(spacing=(1, 1, 2))), tmp_path / "ok.nrrd")
    assert read_volume(ok).shape == (3, 3, 3)
