"""Phantom generator and geometry-preserving I/O."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from SSLSegmentLib.data.contract import validate_case_id
from SSLSegmentLib.data.dataset import DataSet
from SSLSegmentLib.data.volume import Geometry, ImageError, Volume
from SSLSegmentLib.data.imageio import read_label, read_volume, write_volume
from SSLSegmentLib.data.phantoms import PhantomConfig, make_phantom

SMALL = PhantomConfig(shape=(24, 32, 32))


def test_phantom_is_deterministic_and_seed_dependent():
    a_img, a_lab = make_phantom(7, SMALL)
    b_img, b_lab = make_phantom(7, SMALL)
    c_img, _ = make_phantom(8, SMALL)
    assert np.array_equal(a_img.array, b_img.array) and np.array_equal(a_lab.array, b_lab.array)
    assert not np.array_equal(a_img.array, c_img.array)


def test_phantom_has_unlabeled_neighbours_as_bright_as_the_target():
    for seed in range(4):
        img, lab = make_phantom(seed, PhantomConfig())
        target = lab.array == 1
        assert 0.01 < target.mean() < 0.25
        bright = img.array > np.percentile(img.array[target], 25)
        # Same-intensity structures outside the label: what makes the boundary ambiguous.
        assert (bright & ~target).sum() > 0.1 * (bright & target).sum()
        assert img.array[target].mean() > img.array[~target].mean() + 1.0


def test_phantom_geometry_is_anisotropic_with_rotation():
    img, lab = make_phantom(2, SMALL)
    assert img.geometry.spacing == lab.geometry.spacing
    assert len(set(img.geometry.spacing)) > 1
    assert not np.allclose(np.reshape(img.geometry.direction, (3, 3)), np.eye(3))


def test_phantom_config_is_validated():
    with pytest.raises(ValueError, match="shape"):
        PhantomConfig(shape=(4, 32, 32))
    with pytest.raises(ValueError, match="difficulty"):
        PhantomConfig(difficulty=0)
    with pytest.raises(ValueError, match="variability"):
        PhantomConfig(variability=-1)


def _contrast(seed: int, cfg: PhantomConfig) -> float:
    """Target-to-background contrast of one phantom, in background standard deviations."""
    img, lab = make_phantom(seed, cfg)
    target = lab.array == 1
    return float((np.median(img.array[target]) - np.median(img.array[~target])) / img.array[~target].std())


def test_variability_spreads_the_cases_appearance_and_zero_keeps_the_old_volumes():
    # The knob draws from its own random stream: at 0 the volumes are those of a config without it.
    plain, _ = make_phantom(5, SMALL)
    zero, _ = make_phantom(5, PhantomConfig(shape=SMALL.shape, variability=0.0))
    assert np.array_equal(plain.array, zero.array)
    # The labels keep their meaning (same seed: the target moves only by the size factor) ...
    _, lab_wide = make_phantom(5, PhantomConfig(shape=SMALL.shape, variability=2.0))
    _, lab_plain = make_phantom(5, SMALL)
    overlap = (lab_wide.array & lab_plain.array).sum() / max(1, min(lab_wide.array.sum(), lab_plain.array.sum()))
    assert overlap > 0.7
    # ... while the contrast from case to case spreads much more than with one "scanner".
    narrow = [_contrast(s, SMALL) for s in range(8)]
    wide = [_contrast(s, PhantomConfig(shape=SMALL.shape, variability=2.0)) for s in range(8)]
    assert np.std(wide) > 1.5 * np.std(narrow)


def test_dataset_folder_layout_and_fixed_splits(tiny_dataset):
    meta = json.loads((tiny_dataset / "dataset.json").read_text())
    ds = DataSet(tiny_dataset)
    assert [len(ds.splits[k]) for k in ("train", "val", "test")] == [8, 2, 2]
    assert set(ds.splits["train"]).isdisjoint(ds.splits["val"] + ds.splits["test"])
    assert meta["splits"] == ds.splits
    image, label = ds.load_pair(ds.splits["val"][0])
    # Geometry written through SimpleITK survives the round trip.
    itk = sitk.ReadImage(str(ds.image_path(ds.splits["val"][0])))
    assert np.allclose(itk.GetSpacing(), image.geometry.spacing) and np.allclose(itk.GetDirection(), image.geometry.direction)
    assert label.array.dtype == np.uint8 and set(np.unique(label.array)) <= {0, 1}
    samples = ds.training_samples(ds.splits["train"][:3], ds.splits["train"][:1])
    assert samples[0].labeled_mask.all() and not samples[1].labeled_mask.any() and not samples[1].label.any()


def test_dataset_written_by_several_processes_is_the_same_folder(tmp_path):
    from SSLSegmentLib.data.phantoms import write_phantom_dataset

    one = write_phantom_dataset(tmp_path / "one", 3, 1, 1, SMALL, seed=5)
    two = write_phantom_dataset(tmp_path / "two", 3, 1, 1, SMALL, seed=5, workers=2)
    assert (one / "dataset.json").read_text() == (two / "dataset.json").read_text()
    a, b = DataSet(one), DataSet(two)
    for cid in a.case_ids:
        (ia, la), (ib, lb) = a.load_pair(cid), b.load_pair(cid)
        np.testing.assert_array_equal(ia.array, ib.array)
        np.testing.assert_array_equal(la.array, lb.array)


def test_volume_round_trip_keeps_geometry(tmp_path):
    geo = Geometry((0.7, 0.8, 2.5), (10.0, -5.0, 3.0), (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    vol = Volume(np.random.default_rng(0).random((5, 6, 7)).astype(np.float32), geo)
    for name in ("a.nrrd", "b.nii.gz"):
        back = read_volume(write_volume(vol, tmp_path / name))
        assert back.shape == (5, 6, 7) and back.geometry.matches(geo)
        assert np.allclose(back.array, vol.array)


def test_unreadable_and_bad_images_get_clear_errors(tmp_path):
    (tmp_path / "junk.nrrd").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="not a readable image"):
        read_volume(tmp_path / "junk.nrrd")
    with pytest.raises(ImageError, match="no such file"):
        read_volume(tmp_path / "missing.nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.float32)), str(tmp_path / "flat.nrrd"))
    with pytest.raises(ImageError, match="3D"):
        read_volume(tmp_path / "flat.nrrd")


def test_label_geometry_must_match_image(tmp_path):
    img = Volume(np.zeros((4, 5, 6), np.float32), Geometry((1.0, 1.0, 2.0)))
    write_volume(img.like(np.ones((4, 5, 6), np.uint8)), tmp_path / "ok.nrrd")
    assert read_label(tmp_path / "ok.nrrd", img).array.sum() == 120
    write_volume(Volume(np.ones((4, 5, 6), np.uint8), Geometry((1.0, 1.0, 3.0))), tmp_path / "spacing.nrrd")
    with pytest.raises(ImageError, match="geometry does not match"):
        read_label(tmp_path / "spacing.nrrd", img)
    write_volume(Volume(np.ones((4, 5, 7), np.uint8), Geometry((1.0, 1.0, 2.0))), tmp_path / "size.nrrd")
    with pytest.raises(ImageError, match="does not match the image size"):
        read_label(tmp_path / "size.nrrd", img)
    write_volume(Volume(np.full((4, 5, 6), 0.5, np.float32), Geometry((1.0, 1.0, 2.0))), tmp_path / "float.nrrd")
    with pytest.raises(ImageError, match="integer"):
        read_label(tmp_path / "float.nrrd", img)


def test_immutable_write_never_overwrites(tmp_path):
    vol = Volume(np.ones((3, 3, 3), np.uint8))
    path = write_volume(vol, tmp_path / "rev1.nrrd", overwrite=False)
    with pytest.raises(FileExistsError):
        write_volume(Volume(np.zeros((3, 3, 3), np.uint8)), path, overwrite=False)
    assert read_volume(path).array.sum() == 27
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", ".hidden", "x" * 200, "a..b"])
def test_case_ids_that_could_become_paths_are_refused(bad):
    with pytest.raises(ValueError):
        validate_case_id(bad)
