"""A review replayed on real MRML against a real backend, compared with a stored reference by Dice.

The clinician's actions are recorded in `Testing/data/replay/review.json`: the case the uncertainty ordering hands out
first, the region threshold, the regions visited (next, next) and one paint stroke (a brush sphere at a voxel, as the
Segment Editor's Paint effect applies it: a modifier labelmap merged into the segment by
vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment). The replay drives the panel's own pieces in order:
the review session against `sslsegment serve` + worker on 127.0.0.1 serving the model the extension bundles, the
scene logic on a scene set up as the application's (showCase, showInference, jumpToRegion, markRegionVisited,
labelArrayFromSegmentation). The reviewed mask the backend stored must equal the stored reference (Dice 1.0): a
change in how regions are ranked, visited, painted, exported or stored shows as a different mask.

SSLSEGMENT_WRITE_REPLAY_REFERENCE=1 records a new reference (after a deliberate change of the bundled model or the
phantoms); the test then fails, so that a recording is never mistaken for a pass.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from conftest import bundled_model_backend  # noqa: E402
from SSLSegmentLib.data.imageio import read_volume, write_volume  # noqa: E402
from SSLSegmentLib.review import scene as sa  # noqa: E402
from SSLSegmentLib.review.session import ReviewSession  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parent / "data" / "replay"
RECORD = os.environ.get("SSLSEGMENT_WRITE_REPLAY_REFERENCE") == "1"
PASSES = 2
# A voxel of the map this close to the threshold could fall either side of it on another CPU's arithmetic; the
# recorded threshold sits in a gap of the map at least this wide on each side.
THRESHOLD_MARGIN = 1e-4


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def brush(shape, centre_zyx, radius: float) -> np.ndarray:
    """The voxels a spherical Paint brush of `radius` voxels covers around `centre_zyx`."""
    grid = np.indices(shape).reshape(3, -1).T
    inside = np.linalg.norm(grid - np.asarray(centre_zyx), axis=1) <= radius
    return inside.reshape(shape)


def paint(segmentation_node, segment_id: str, reference_node, stroke: np.ndarray) -> None:
    """Merge a brush stroke into a segment the way the Paint effect does (a modifier labelmap on the reference
    volume's grid, MODE_MERGE_MAX over its extent)."""
    import vtk
    from vtk.util import numpy_support

    modifier = slicer.vtkOrientedImageData()
    modifier.SetDimensions(*reversed(stroke.shape))  # vtk: i, j, k = x, y, z
    matrix = vtk.vtkMatrix4x4()
    reference_node.GetIJKToRASMatrix(matrix)
    modifier.SetImageToWorldMatrix(matrix)
    modifier.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    voxels = numpy_support.vtk_to_numpy(modifier.GetPointData().GetScalars())
    voxels[:] = stroke.astype(np.uint8).ravel()  # C order of (z, y, x) is vtk's point order
    modifier.Modified()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(modifier, segmentation_node, segment_id, logic.MODE_MERGE_MAX,
                                            modifier.GetExtent())


@pytest.fixture(scope="module")
def backend(tmp_path_factory, tiny_dataset):
    with bundled_model_backend(tmp_path_factory.mktemp("replay"), tiny_dataset) as local:
        yield local


def _record(session, result) -> dict:
    """Choose the recorded actions on this run: a threshold in a gap of the map with >= 2 regions, the first two
    regions, a stroke on background voxels inside region 1 (so it is an edit)."""
    heat = np.sort(result.uncertainty["entropy"].array.ravel())
    for quantile in (0.95, 0.98, 0.99, 0.995):
        at = int(quantile * (heat.size - 1))
        window = heat[max(at - 50, 0):at + 50]
        gaps = np.diff(window)
        k = int(np.argmax(gaps))
        threshold = float((window[k] + window[k + 1]) / 2.0)
        ranked = session.fetch_regions("entropy", threshold)
        if len(ranked.regions) >= 2:
            session.apply_regions(ranked)
            break
    else:
        pytest.fail("the bundled model has fewer than two regions at every threshold tried")
    region = session.result.regions[0]
    candidates = np.argwhere((session.result.rank_map == region.rank) & (result.label.array == 0))
    centre = candidates[len(candidates) // 2] if len(candidates) else np.round(region.centroid_ijk[::-1]).astype(int)
    return {"case_id": session.case.case_id, "threshold": threshold, "passes": PASSES, "visits": 2,
            "stroke": {"centre_zyx": [int(v) for v in centre], "radius": 1.5}}


def test_a_replayed_review_stores_the_reference_reviewed_mask(backend, tmp_path):
    session = ReviewSession(backend.client(), tmp_path / "work", annotator="replay")
    assert session.connect()["current_model"] == "v0001"  # the bundled model: no training in this file
    scene, app_logic = sa.new_headless_scene()
    logic = sa.ReviewSceneLogic(scene)
    try:
        recorded = None if RECORD else json.loads((REFERENCE / "review.json").read_text())
        case = session.fetch_next_case(strategy="uncertainty")
        assert case is not None
        if recorded is not None:
            assert case.case_id == recorded["case_id"], "the uncertainty ordering now hands out another case first"
        image_node = logic.showCase(case.image_path, name=case.case_id)
        result = session.infer(passes=PASSES, uncertainty="entropy",
                               threshold=None if recorded is None else recorded["threshold"])
        if recorded is None:
            recorded = _record(session, result)
        heat = result.uncertainty["entropy"].array
        assert np.abs(heat - recorded["threshold"]).min() > THRESHOLD_MARGIN, \
            "a voxel of the map sits on the recorded threshold: record the reference again"
        nodes = logic.showInference(result, image_node, threshold=recorded["threshold"])
        segmentation = nodes["segmentation"]

        visited = []
        for _ in range(recorded["visits"]):  # Next, Next
            region = session.next_region()
            logic.jumpToRegion(region, image_node)
            logic.markRegionVisited(region.rank)
            visited.append(region.rank)
        stroke = brush(result.label.shape, recorded["stroke"]["centre_zyx"], recorded["stroke"]["radius"])
        (segment_id,) = logic.segmentIdsInClassOrder(segmentation)
        paint(segmentation, segment_id, image_node, stroke)

        corrected = logic.labelArrayFromSegmentation(segmentation, image_node)
        painted = stroke & (result.label.array == 0)
        assert painted.any(), "the recorded stroke must change the segmentation"
        np.testing.assert_array_equal(corrected, np.where(stroke, 1, result.label.array))
        pending = session.prepare_submission(corrected)
        revision = session.send_submission(pending)
        session.apply_submission(pending, revision)

        stored = read_volume(session.client.download_label(case.case_id, revision["revision"],
                                                           tmp_path / "mask.nrrd", "reviewed_mask"))
        # The rule, independently of the reference: visited regions plus edited voxels, nothing else.
        expected = np.isin(session.result.rank_map, visited) | painted
        np.testing.assert_array_equal(stored.array.astype(bool), expected)
        if RECORD:
            REFERENCE.mkdir(parents=True, exist_ok=True)
            write_volume(stored.like(stored.array.astype(np.uint8)), REFERENCE / "reviewed_mask.nrrd")
            (REFERENCE / "review.json").write_text(json.dumps(recorded, indent=2) + "\n")
            pytest.fail(f"recorded a new reference in {REFERENCE}; run again without SSLSEGMENT_WRITE_REPLAY_REFERENCE")
        reference = read_volume(REFERENCE / "reviewed_mask.nrrd")
        assert reference.geometry.matches(stored.geometry)
        assert dice(stored.array, reference.array) == 1.0
    finally:
        scene.Clear(0)
        del app_logic
