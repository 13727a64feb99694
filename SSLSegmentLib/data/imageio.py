"""Image and label files that keep the full geometry (spacing, origin, direction); `Volume` lives in data/volume.py.

Arrays are in SimpleITK/Slicer order (k, j, i) = (z, y, x); geometry is in SimpleITK's LPS convention.
Every write goes to a temporary file in the destination folder, is fsynced and then renamed, so a reader
never sees a half-written file and an existing file is never left truncated.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import tempfile
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SSLSegmentLib.data.volume import ImageError, Volume

IMAGE_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")


# Who is writing a temporary file: the host (a short digest of its name) and the process. A crash leaves the file
# under this name, and a later process on the same host can tell that its writer is gone (training/datastore.py).
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
TEMP_RE = re.compile(r"^\.tmp-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-")


def writer_tag() -> str:
    """This process's name in its temporary files: "<host digest>-<pid>"."""
    return f"{HOST_TAG}-{os.getpid()}"


def temp_prefix() -> str:
    """The prefix of this process's temporary files and folders (a leading dot keeps them out of listings)."""
    return f".tmp-{writer_tag()}-"


# Voxels a file may declare (about 2 GB as float32): far above any clinical 3D scan (LA2018 at full resolution is
# 36 M, a 512 x 512 x 1000 CT 262 M), and what keeps a few compressed bytes from claiming gigabytes of memory.
DEFAULT_MAX_VOXELS = 2**29


def read_volume(path: str | os.PathLike, *, max_spacing_mm: float = 50.0, max_voxels: int | None = DEFAULT_MAX_VOXELS,
                max_expansion: float | None = None) -> Volume:
    """Read a 3D image; raise `ImageError` naming the file and the problem when it cannot be used.

    The header is checked before any voxel is decoded: the data in the file itself (never a separate data file the
    header names), 3D, one component, sane spacing and direction, a size of at most `max_voxels` (None: no cap)
    and, with `max_expansion`, a decoded size of at most that many times the file's. The decoded volume is exactly
    the declared size, so a compressed file that unpacks to more than the caps is refused without being unpacked."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    _check_data_is_inside(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImageError(f"{path}: not a readable image ({str(exc).strip().splitlines()[-1][:200]})") from None
    if reader.GetDimension() != 3:
        raise ImageError(f"{path}: expected a 3D image, got {reader.GetDimension()}D")
    if reader.GetNumberOfComponents() != 1:
        raise ImageError(f"{path}: expected one scalar component per voxel, got {reader.GetNumberOfComponents()}")
    spacing, size = reader.GetSpacing(), reader.GetSize()
    if not all(np.isfinite(s) and 0 < s <= max_spacing_mm for s in spacing):
        raise ImageError(f"{path}: implausible voxel spacing {tuple(round(s, 4) for s in spacing)} mm")
    if min(size) < 2:
        raise ImageError(f"{path}: degenerate size {size}")
    if max_voxels is not None and int(np.prod(size, dtype=np.int64)) > max_voxels:
        raise ImageError(f"{path}: {'x'.join(map(str, size))} voxels is more than the limit of {max_voxels:,}")
    if max_expansion:
        declared = int(np.prod(size, dtype=np.int64)) * _BYTES_PER_VOXEL.get(reader.GetPixelID(), 8)
        if declared > max_expansion * max(path.stat().st_size, 1):
            raise ImageError(f"{path}: {'x'.join(map(str, size))} voxels ({declared / 2**20:,.0f} MB) from a "
                             f"{path.stat().st_size / 1024:,.0f} KB file: more than {max_expansion:g} times its size, "
                             "which no scan compresses to")
    direction = np.asarray(reader.GetDirection(), np.float64).reshape(3, 3)
    if not (np.isfinite(direction).all() and np.allclose(direction @ direction.T, np.eye(3), atol=1e-3)):
        raise ImageError(f"{path}: the direction matrix is not a rotation (orthonormal axes)")
    if not np.isfinite(reader.GetOrigin()).all():
        raise ImageError(f"{path}: the origin is not finite")
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise ImageError(f"{path}: not a readable image ({str(exc).strip().splitlines()[-1][:200]})") from None
    vol = Volume.from_sitk(img)
    if np.issubdtype(vol.array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(vol.array)))
        if bad:
            raise ImageError(f"{path}: {bad} voxel{'s' if bad > 1 else ''} hold NaN or infinity; "
                             "every voxel must be a finite number")
    return vol


_BYTES_PER_VOXEL = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
                    sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8, sitk.sitkFloat32: 4, sitk.sitkFloat64: 8}
_HEAD_BYTES = 1 << 16
_NRRD_DATA_FILE = re.compile(rb"^[ \t]*data ?file[ \t]*:(.*)$", re.IGNORECASE | re.MULTILINE)
_META_DATA_FILE = re.compile(rb"^[ \t]*ElementDataFile[ \t]*=(.*)$", re.IGNORECASE | re.MULTILINE)


def _check_data_is_inside(path: Path) -> None:
    """Refuse a header whose voxels live in another file: an NRRD `data file:`, a MetaImage `ElementDataFile` other
    than LOCAL, a NIfTI pair (.hdr/.img) or Analyze header. The reader would open whatever the header names (another
    user's file, the datastore's token, /dev/zero); every image here is one file. Decided from the file's content,
    as the reader picks its format, whatever the name says."""
    with open(path, "rb") as fh:
        head = fh.read(_HEAD_BYTES)
    if head[:2] == b"\x1f\x8b":  # gzip (.nii.gz): the header is at the start of the decompressed stream
        try:
            head = zlib.decompressobj(31).decompress(head, _HEAD_BYTES)
        except zlib.error:
            return  # the reader will say it is not readable
    if head.startswith(b"NRRD"):
        header = re.split(rb"\r?\n\r?\n", head, maxsplit=1)[0]
        m = _NRRD_DATA_FILE.search(header)
        if m:
            raise ImageError(f"{path}: the header names a separate data file ({m.group(1).strip()[:80].decode('latin-1')!r});"
                             " send the image as one file (NRRD with its data attached)")
        return
    m = _META_DATA_FILE.search(head)
    if m:
        if m.group(1).strip().upper() != b"LOCAL":
            raise ImageError(f"{path}: the header names a separate data file ({m.group(1).strip()[:80].decode('latin-1')!r});"
                             " send the image as one file (ElementDataFile = LOCAL)")
        return
    if len(head) >= 348:
        size_le, size_be = int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")
        if 348 in (size_le, size_be) and head[344:348] != b"n+1\0":
            raise ImageError(f"{path}: a NIfTI-1 or Analyze header whose data is in a separate .img file; send a "
                             "single-file .nii or .nii.gz")
        if 540 in (size_le, size_be) and head[4:8] != b"n+2\0":
            raise ImageError(f"{path}: a NIfTI-2 header whose data is in a separate file; send a single-file .nii")


def read_label(path: str | os.PathLike, image: Volume | None = None, *,
               max_voxels: int | None = DEFAULT_MAX_VOXELS) -> Volume:
    """Read a label map (stored as uint8); with `image`, check that its grid matches the image's exactly.

    The values are checked in the file's own type before the cast, which would otherwise wrap 256 to 0 and 257
    to 1 and turn an out-of-range label into a plausible one."""
    label = read_volume(path, max_voxels=max_voxels)
    arr = label.array
    if not np.issubdtype(arr.dtype, np.integer) and not np.array_equal(arr, np.round(arr)):
        raise ImageError(f"{path}: a label map must hold integer values")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ImageError(f"{path}: label values must be 0..255, found {arr.min():g}..{arr.max():g}")
    label.array = arr.astype(np.uint8)
    if image is not None:
        check_same_grid(image, label, what=str(path))
    return label


def check_same_grid(image: Volume, label: Volume, what: str = "label") -> None:
    if image.shape != label.shape:
        raise ImageError(f"{what}: size {label.shape[::-1]} does not match the image size {image.shape[::-1]} (x, y, z)")
    if not image.geometry.matches(label.geometry):
        raise ImageError(
            f"{what}: geometry does not match the image "
            f"(spacing {tuple(np.round(label.geometry.spacing, 4))} vs {tuple(np.round(image.geometry.spacing, 4))}, "
            f"origin {tuple(np.round(label.geometry.origin, 3))} vs {tuple(np.round(image.geometry.origin, 3))})"
        )


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_target(path: Path, overwrite: bool, suffix: str):
    """Yield a temporary path next to `path`; on success fsync it and move it into place (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists and is immutable")
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(), suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails if the target exists, so two writers can never both "create" the same revision.
            os.link(tmp, path)
            tmp.unlink()
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    """Write bytes to `path` through a fsynced temporary file and a rename."""
    path = Path(path)
    with _atomic_target(path, overwrite, path.name) as tmp:
        tmp.write_bytes(data)
    return path


def write_volume(volume: Volume, path: str | os.PathLike, *, overwrite: bool = True, compress: bool = True) -> Path:
    """Write a volume atomically (temp file in the same folder, fsync, rename). Suffix picks the format."""
    path = Path(path)
    if not str(path).endswith(IMAGE_SUFFIXES):
        raise ImageError(f"{path}: unsupported suffix; use one of {', '.join(IMAGE_SUFFIXES)}")
    suffix = ".nii.gz" if str(path).endswith(".nii.gz") else path.suffix
    with _atomic_target(path, overwrite, suffix) as tmp:
        sitk.WriteImage(volume.to_sitk(), str(tmp), useCompression=compress)
    return path


def strip_suffix(name: str) -> str:
    for s in IMAGE_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name
