"""`import-la` on a small synthetic folder in the LA h5 layout (the real data is never used in tests)."""

import json

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from SSLSegmentLib.data.dataset import DataSet  # noqa: E402
from SSLSegmentLib.data.imageio import ImageError  # noqa: E402
from SSLSegmentLib.data.la import half_resolution, import_la, la_splits, read_la_case  # noqa: E402
from training.cli import main  # noqa: E402

SHAPE_XYZ = (9, 8, 6)


def _case(rng, shape=SHAPE_XYZ):
    image = rng.standard_normal(shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[2:6, 3:7, 1:4] = 1
    return image, label


def _write(folder, name, image, label, keys=("image", "label")):
    (folder / name).mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / name / "mri_norm2.h5", "w") as f:
        if "image" in keys:
            f.create_dataset("image", data=image, compression="gzip")
        if "label" in keys:
            f.create_dataset("label", data=label, compression="gzip")


@pytest.fixture
def la_src(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "LA"
    names = [f"CASE{i:02d}X" for i in range(8)]
    arrays = {}
    for n in names:
        arrays[n] = _case(rng)
        _write(src, n, *arrays[n])
    (src / "train.list").write_text("\n".join(names) + "\n")
    return src, names, arrays


def test_import_transposes_to_zyx_sets_spacing_and_carves_splits(la_src, tmp_path):
    src, names, arrays = la_src
    out = import_la(src, tmp_path / "ds", n_val=2, n_test=2)
    ds = DataSet(out)
    assert ds.splits == {"train": names[:4], "val": names[4:6], "test": names[6:]}
    image, label = ds.load_pair(names[0])
    x, y, z = SHAPE_XYZ
    assert image.shape == (z, y, x)
    assert np.array_equal(image.array, arrays[names[0]][0].transpose(2, 1, 0))
    assert np.array_equal(label.array, arrays[names[0]][1].transpose(2, 1, 0))
    assert image.geometry.spacing == pytest.approx((0.625, 0.625, 0.625))
    meta = json.loads((out / "dataset.json").read_text())
    assert "development" in meta["split_notes"]["test"] and meta["half_resolution"] is False


def test_half_resolution_block_mean_and_majority_label():
    image = np.arange(4 * 4 * 3, dtype=np.float32).reshape(4, 4, 3)
    label = np.zeros((4, 4, 3), np.uint8)
    label[:2, :2, :2] = 1
    label[0, 2, 0] = 1  # 1 of 8 in its block: dropped
    label[2:4, 0:2, 0] = 1  # 4 of 8 (half) in its block: kept
    small, small_label = half_resolution(image, label)
    assert small.shape == (2, 2, 2) and small_label.shape == (2, 2, 2)
    assert small[0, 0, 0] == pytest.approx(image[:2, :2, :2].mean())
    # odd size: the last plane is repeated before averaging
    assert small[0, 0, 1] == pytest.approx(np.concatenate([image[:2, :2, 2:3]] * 2, axis=2).mean())
    assert small_label[:, :, 0].tolist() == [[1, 0], [1, 0]] and small_label[:, :, 1].sum() == 0


def test_half_resolution_import_geometry(la_src, tmp_path):
    src, names, _ = la_src
    ds = DataSet(import_la(src, tmp_path / "half", half_res=True, n_val=1, n_test=1))
    image, label = ds.load_pair(names[0])
    assert image.shape == (3, 4, 5)  # (6, 8, 9) halved, rounding up
    assert image.geometry.spacing == pytest.approx((1.25, 1.25, 1.25))
    assert image.geometry.origin == pytest.approx((0.3125, 0.3125, 0.3125))
    assert label.array.max() == 1


def test_explicit_lists_and_cli(la_src, tmp_path):
    src, names, _ = la_src
    (tmp_path / "val.txt").write_text(names[0] + "\n")
    (tmp_path / "test.txt").write_text(f"# held out\n{names[1]}\n{names[2]}\n")
    rc = main(["import-la", str(src), str(tmp_path / "ds"), "--val-list", str(tmp_path / "val.txt"),
               "--test-list", str(tmp_path / "test.txt")])
    assert rc == 0
    ds = DataSet(tmp_path / "ds")
    assert ds.splits == {"train": names[3:], "val": names[:1], "test": names[1:3]}
    # a second import into the same folder is refused, and nothing there is touched
    before = (tmp_path / "ds" / "dataset.json").read_bytes()
    assert main(["import-la", str(src), str(tmp_path / "ds")]) == 2
    assert (tmp_path / "ds" / "dataset.json").read_bytes() == before


def test_splits_rules_and_errors():
    order = [f"c{i}" for i in range(10)]
    s = la_splits(order, n_val=2, n_test=3)
    assert s["train"] == order[:5] and s["val"] == order[5:7] and s["test"] == order[7:]
    s = la_splits(order, n_val=2, test_ids=["t1", "t2"], test_kind="official")
    assert s["train"] == order[:8] and s["test"] == ["t1", "t2"] and s["test_kind"] == "official"
    with pytest.raises(ValueError, match="both"):
        la_splits(order, val_ids=["c1"], test_ids=["c1"])
    with pytest.raises(ValueError, match="test cases"):
        la_splits(order, n_test=10)


def test_bad_sources_give_clear_errors(la_src, tmp_path):
    src, names, _ = la_src
    rng = np.random.default_rng(1)
    image, label = _case(rng)
    _write(tmp_path / "bad", "nolabel", image, label, keys=("image",))
    with pytest.raises(ImageError, match="no dataset label"):
        read_la_case(tmp_path / "bad" / "nolabel" / "mri_norm2.h5")
    _write(tmp_path / "bad", "shape", image, label[:-1])
    with pytest.raises(ImageError, match="same shape"):
        read_la_case(tmp_path / "bad" / "shape" / "mri_norm2.h5")
    _write(tmp_path / "bad", "multi", image, label * 2)
    with pytest.raises(ImageError, match="binary"):
        read_la_case(tmp_path / "bad" / "multi" / "mri_norm2.h5")
    (tmp_path / "bad" / "junk").mkdir()
    (tmp_path / "bad" / "junk" / "mri_norm2.h5").write_bytes(b"not an h5 file")
    with pytest.raises(ImageError, match="not a readable h5"):
        read_la_case(tmp_path / "bad" / "junk" / "mri_norm2.h5")
    # a listed case without its file, and an unsafe case name
    (src / "train.list").write_text("\n".join(names + ["MISSING01"]))
    with pytest.raises(FileNotFoundError, match="MISSING01"):
        import_la(src, tmp_path / "out", n_val=1, n_test=1)
    assert not (tmp_path / "out" / "dataset.json").exists()
    (src / "train.list").write_text("../escape\n")
    with pytest.raises(ValueError, match="invalid case id"):
        import_la(src, tmp_path / "out2")
    assert main(["import-la", str(tmp_path / "nowhere"), str(tmp_path / "out3")]) == 2


def test_zscore_option_normalises_each_volume(la_src, tmp_path):
    src, names, arrays = la_src
    ds = DataSet(import_la(src, tmp_path / "z", n_val=1, n_test=1, zscore=True))
    image = ds.load_image(names[0]).array
    assert abs(float(image.mean())) < 1e-5 and float(image.std()) == pytest.approx(1.0, rel=1e-4)
    raw = arrays[names[0]][0].transpose(2, 1, 0)
    assert np.allclose(image, (raw - raw.mean()) / raw.std(), atol=1e-5)
    assert "z-scored" in json.loads((tmp_path / "z" / "dataset.json").read_text())["intensity"]
