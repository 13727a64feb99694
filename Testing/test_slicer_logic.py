"""The module's MRML logic (SSLSegmentLib.review.scene.ReviewSceneLogic) on real MRML from slicer-core.

Every node, storage node, colour node, slice node and the segmentations logic used here is Slicer's own C++ code;
nothing is replaced. The scene is set up as the application sets it up (default colours, layout slice nodes,
slice logics with their composite nodes).
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
pytest.importorskip("slicer.util")

import vtk  # noqa: E402

from SSLSegmentLib.review import scene as sa  # noqa: E402
from SSLSegmentLib.data.volume import ImageError, Volume
from SSLSegmentLib.data.imageio import read_label, write_volume  # noqa: E402
from SSLSegmentLib.data.phantoms import PhantomConfig, make_phantom  # noqa: E402
from SSLSegmentLib.data.regions import find_review_regions  # noqa: E402
from SSLSegmentLib.review.session import reviewed_mask  # noqa: E402

SHAPE = (24, 32, 32)


@pytest.fixture(scope="module")
def phantom():
    """A phantom with anisotropic spacing, a non-zero origin and a rotated direction (the cases that break LPS/RAS)."""
    image, label = make_phantom(4, PhantomConfig(shape=SHAPE))
    assert not np.allclose(np.reshape(image.geometry.direction, (3, 3)), np.eye(3))
    return image, label


@pytest.fixture
def headless():
    scene, app_logic = sa.new_headless_scene()
    yield scene, sa.ReviewSceneLogic(scene)
    scene.Clear(0)  # as the application's "close scene"; singletons (slice nodes) stay with their logics
    del app_logic


def _uncertainty(image: Volume) -> Volume:
    rng = np.random.default_rng(7)
    return image.like(rng.random(image.shape).astype(np.float32))


def _display_rgba(node) -> np.ndarray:
    """Run the volume display node's own pipeline (window/level, colour map, threshold → alpha) on its voxels."""
    from vtk.util import numpy_support

    display = node.GetDisplayNode()
    display.SetInputImageDataConnection(node.GetImageDataConnection())
    producer = display.GetOutputImageDataConnection().GetProducer()
    producer.Update()
    out = producer.GetOutputDataObject(0)
    rgba = numpy_support.vtk_to_numpy(out.GetPointData().GetScalars())
    return rgba.reshape(tuple(reversed(out.GetDimensions())) + (rgba.shape[-1],))


# ---- geometry --------------------------------------------------------------------------------------------------


def test_geometry_matches_slicers_own_reader_and_flips_lps_to_ras(headless, phantom, tmp_path):
    scene, logic = headless
    image, _ = phantom
    path = write_volume(image, tmp_path / "image.nrrd")
    from_file = logic.loadVolumeFile(path, "from file")  # Slicer's reader does its own LPS→RAS
    from_array = logic.addVolume(image, "from array")  # ours
    np.testing.assert_allclose(sa.node_ijk_to_ras(from_array), sa.node_ijk_to_ras(from_file), atol=1e-5)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(from_file), image.array)

    # One voxel, two ways: SimpleITK's physical point (LPS) and the node's IJK→RAS.
    ijk = (5, 17, 9)
    lps = image.to_sitk().TransformIndexToPhysicalPoint(ijk)
    ras = (sa.node_ijk_to_ras(from_file) @ np.array([*ijk, 1.0]))[:3]
    np.testing.assert_allclose(ras, [-lps[0], -lps[1], lps[2]], atol=1e-4)

    back = sa.volume_from_node(from_file)
    assert back.geometry.matches(image.geometry)
    np.testing.assert_array_equal(back.array, image.array)


def test_transformed_volume_is_refused(headless, phantom):
    scene, logic = headless
    node = logic.addVolume(phantom[0], "moved")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(ImageError, match="transform"):
        sa.volume_from_node(node)
    with pytest.raises(ImageError, match="transform"):
        logic.writeVolumeNode(node, "unused.nrrd")


def test_missing_file_is_a_clear_error(headless, tmp_path):
    _, logic = headless
    with pytest.raises(ImageError, match="no such file"):
        logic.loadVolumeFile(tmp_path / "nope.nrrd", "x")


# ---- uncertainty overlay ----------------------------------------------------------------------------------------


def test_uncertainty_overlay_heat_colours_fixed_window_and_transparent_below_threshold(headless, phantom):
    scene, logic = headless
    image, _ = phantom
    background = logic.addVolume(image, "image")
    u = _uncertainty(image)
    node = logic.addVolume(u, "uncertainty", role="uncertainty")
    logic.showUncertainty(node, threshold=0.3, opacity=0.4, backgroundNode=background)

    display = node.GetDisplayNode()
    assert display.GetColorNodeID() == sa.HEAT_COLOR_NODE_ID
    assert scene.GetNodeByID(sa.HEAT_COLOR_NODE_ID) is not None  # built into Slicer's default colours
    assert not display.GetAutoWindowLevel()
    assert display.GetWindow() == pytest.approx(1.0) and display.GetLevel() == pytest.approx(0.5)

    rgba = _display_rgba(node)
    assert rgba.shape[:3] == image.shape
    np.testing.assert_array_equal(rgba[..., 3] == 0, u.array < 0.3)  # below threshold: fully transparent
    assert np.all(rgba[..., 3][u.array >= 0.3] == 255)
    # Heat ramp: more uncertain voxels are brighter.
    brightness = rgba[..., :3].astype(float).sum(-1)
    assert brightness[u.array > 0.9].mean() > brightness[(u.array > 0.3) & (u.array < 0.4)].mean() + 50

    composites = logic.sliceCompositeNodes()
    assert len(composites) == 3
    for composite in composites:
        assert composite.GetForegroundVolumeID() == node.GetID()
        assert composite.GetBackgroundVolumeID() == background.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.4)

    logic.setUncertaintyThreshold(node, 0.8)
    np.testing.assert_array_equal(_display_rgba(node)[..., 3] == 0, u.array < 0.8)
    logic.setUncertaintyOpacity(0.75)
    assert all(c.GetForegroundOpacity() == pytest.approx(0.75) for c in composites)
    logic.setUncertaintyVisible(node, False)
    assert all(c.GetForegroundVolumeID() is None for c in composites)

    with pytest.raises(ValueError, match="threshold"):
        logic.setUncertaintyThreshold(node, 1.5)


def test_heat_table_is_created_once_on_a_bare_scene(phantom):
    scene = slicer.vtkMRMLScene()  # no default colour nodes at all
    logic = sa.ReviewSceneLogic(scene)
    node = logic.addVolume(_uncertainty(phantom[0]), "u", role="uncertainty")
    logic.showUncertainty(node, threshold=0.5)
    table = scene.GetNodeByID(node.GetDisplayNode().GetColorNodeID())
    assert table.GetName() == sa.FALLBACK_HEAT_TABLE_NAME
    assert table.GetNumberOfColors() == 256
    low, high = [0.0] * 4, [0.0] * 4
    table.GetColor(0, low)
    table.GetColor(255, high)
    assert sum(high[:3]) > sum(low[:3])
    logic.showUncertainty(logic.addVolume(_uncertainty(phantom[0]), "u2"), threshold=0.5)
    assert scene.GetNodesByName(sa.FALLBACK_HEAT_TABLE_NAME).GetNumberOfItems() == 1


# ---- segmentation --------------------------------------------------------------------------------------------


def test_prediction_imports_as_named_segments_and_exports_back_exactly(headless, phantom):
    scene, _ = headless
    image, label = phantom
    logic = sa.ReviewSceneLogic(scene, class_names=("atrium", "vein", "unused"))
    multi = label.array.copy()
    multi[(multi == 1) & (np.arange(SHAPE[2])[None, None, :] > 20)] = 2  # a second class
    reference = logic.addVolume(image, "image")
    prediction = logic.addVolume(image.like(multi), "prediction", labelmap=True, role="prediction")
    segmentation_node = logic.importSegmentation(prediction, referenceVolumeNode=reference)

    segmentation = segmentation_node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert sorted(names) == ["atrium", "unused", "vein"]  # the class not predicted still gets a segment
    exported = logic.labelArrayFromSegmentation(segmentation_node, reference)
    np.testing.assert_array_equal(exported, multi)

    too_many = logic.addVolume(image.like(np.full(SHAPE, 4, np.uint8)), "bad", labelmap=True)
    with pytest.raises(ImageError, match="only 3 classes"):
        logic.importSegmentation(too_many)


def test_segment_not_named_after_a_class_blocks_export(headless, phantom):
    scene, logic = headless
    image, label = phantom
    reference = logic.addVolume(image, "image")
    node = logic.importSegmentation(logic.addVolume(label, "p", labelmap=True), referenceVolumeNode=reference)
    node.GetSegmentation().AddEmptySegment("", "my scribbles")
    with pytest.raises(ImageError, match="my scribbles"):
        logic.labelArrayFromSegmentation(node, reference)


def test_seg_nrrd_written_by_the_logic_reads_back_in_slicerio(headless, phantom, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    scene, _ = headless
    image, label = phantom
    logic = sa.ReviewSceneLogic(scene, class_names=("left atrium",))
    reference = logic.addVolume(image, "image")
    node = logic.importSegmentation(logic.addVolume(label, "p", labelmap=True), referenceVolumeNode=reference)
    path = logic.saveSegmentation(node, tmp_path / "case.seg.nrrd")

    seg = slicerio.read_segmentation(str(path))
    assert [(s["name"], s["labelValue"]) for s in seg["segments"]] == [("left atrium", 1)]
    np.testing.assert_allclose(seg["ijkToLPS"], image.geometry.ijk_to_lps(), atol=1e-4)
    voxels = np.asarray(seg["voxels"])  # slicerio: (i, j, k)
    np.testing.assert_array_equal(voxels.transpose(2, 1, 0), label.array)

    # The label map for submitting: Slicer's writer, read back by our reader with its grid check.
    submitted = logic.writeLabelmap(node, reference, tmp_path / "label.nrrd")
    np.testing.assert_array_equal(read_label(submitted, image).array, label.array)
    with pytest.raises(ValueError, match=".seg.nrrd"):
        logic.saveSegmentation(node, tmp_path / "case.nrrd")


# ---- review regions ------------------------------------------------------------------------------------------


@pytest.fixture
def regions_case(headless, phantom):
    scene, logic = headless
    image, label = phantom
    # Uncertainty high on two boundary slabs of the target: two separate regions of different size.
    u = np.zeros(SHAPE, np.float32)
    u[4:8, 8:20, 8:20] = 0.9
    u[14:17, 20:26, 18:28] = 0.7
    regions, rank_map = find_review_regions(u, threshold=0.5, min_voxels=8, geometry=image.geometry)
    assert len(regions) == 2
    reference = logic.addVolume(image, "image")
    return scene, logic, image, label, regions, rank_map, reference


def test_regions_become_markups_at_their_ras_centres(regions_case):
    scene, logic, image, _, regions, _, reference = regions_case
    node = logic.showRegions(regions, reference)
    assert node.IsA("vtkMRMLMarkupsFiducialNode")
    assert node.GetNumberOfControlPoints() == 2
    for index, region in enumerate(regions):
        assert node.GetNthControlPointLabel(index) == f"R{region.rank}"
        position = node.GetNthControlPointPosition(index)
        lps = region.centroid_lps
        np.testing.assert_allclose(position, [-lps[0], -lps[1], lps[2]], atol=1e-4)
        # The same centre from the IJK centroid through the volume node's matrix.
        ijk = np.array([*region.centroid_ijk, 1.0])
        np.testing.assert_allclose(position, (sa.node_ijk_to_ras(reference) @ ijk)[:3], atol=1e-4)
        assert node.GetNthControlPointSelected(index)
    logic.markRegionVisited(regions[1].rank)
    assert node.GetNthControlPointSelected(0) and not node.GetNthControlPointSelected(1)
    with pytest.raises(KeyError):
        logic.markRegionVisited(99)


def test_jump_centres_every_slice_view_on_the_region_and_frames_it(regions_case):
    scene, logic, image, _, regions, _, reference = regions_case
    region = regions[1]
    ras = logic.jumpToRegion(region, reference)
    lps = region.centroid_lps
    np.testing.assert_allclose(ras, [-lps[0], -lps[1], lps[2]], atol=1e-6)
    slice_nodes = logic.sliceNodes()
    assert sorted(n.GetLayoutName() for n in slice_nodes) == ["Green", "Red", "Yellow"]
    for slice_node in slice_nodes:
        np.testing.assert_allclose(sa._numpy_matrix(slice_node.GetSliceToRAS())[:3, 3], ras, atol=1e-4)

    roi = logic.currentRegionRoiNode
    centre = [0.0, 0.0, 0.0]
    roi.GetCenter(centre)
    mid = (np.asarray(region.bbox_min_ijk) + np.asarray(region.bbox_max_ijk)) / 2.0
    np.testing.assert_allclose(centre, (sa.node_ijk_to_ras(reference) @ np.array([*mid, 1.0]))[:3], atol=1e-4)
    extent = np.asarray(region.bbox_max_ijk) - np.asarray(region.bbox_min_ijk) + 1
    np.testing.assert_allclose(roi.GetSize(), extent * np.asarray(image.geometry.spacing), atol=1e-4)
    # The box is shown in every view, the 3D views included.
    display = roi.GetDisplayNode()
    assert display.GetVisibility() and display.GetVisibility3D() and display.GetNumberOfViewNodeIDs() == 0
    # A second jump reuses the box.
    logic.jumpToRegion(regions[0], reference)
    assert len(logic.nodesWithRole("region-roi")) == 1


def test_jump_zooms_every_slice_view_to_the_region_and_keeps_its_aspect(regions_case):
    scene, logic, image, _, regions, _, reference = regions_case
    for slice_node in logic.sliceNodes():
        slice_node.SetFieldOfView(400.0, 200.0, 1.0)  # a wide view, far out
    big, small = regions  # rank 1 is the larger of the two slabs
    axes = sa.node_ijk_to_ras(reference)[:3, :3]

    def expected_short_side(region, slice_node):
        extent = np.asarray(region.bbox_max_ijk) - np.asarray(region.bbox_min_ijk) + 1
        box = np.abs(axes) @ extent
        in_plane = np.abs(sa._numpy_matrix(slice_node.GetSliceToRAS())[:3, :2].T) @ box
        return max(logic.ZOOM_CONTEXT * in_plane.max(), logic.ZOOM_MIN_FOV_MM)

    logic.jumpToRegion(big, reference)
    sides = {}
    for slice_node in logic.sliceNodes():
        fov = slice_node.GetFieldOfView()
        assert fov[0] / fov[1] == pytest.approx(2.0)  # the view's shape is the view's, not the region's
        assert min(fov[0], fov[1]) == pytest.approx(expected_short_side(big, slice_node))
        assert min(fov[0], fov[1]) < 200.0  # zoomed in
        sides[slice_node.GetName()] = min(fov[0], fov[1])
    # A smaller region is shown closer; no zoom leaves the field of view as it is.
    logic.jumpToRegion(small, reference)
    for slice_node in logic.sliceNodes():
        assert min(slice_node.GetFieldOfView()[:2]) == pytest.approx(expected_short_side(small, slice_node))
    assert any(min(n.GetFieldOfView()[:2]) < sides[n.GetName()] for n in logic.sliceNodes())
    before = [n.GetFieldOfView() for n in logic.sliceNodes()]
    logic.jumpToRegion(big, reference, zoom=False)
    assert [n.GetFieldOfView() for n in logic.sliceNodes()] == before


def test_reviewed_mask_is_visited_regions_plus_edited_voxels(regions_case):
    scene, logic, image, label, regions, rank_map, reference = regions_case
    prediction = logic.addVolume(label, "prediction", labelmap=True, role="prediction")
    segmentation_node = logic.importSegmentation(prediction, referenceVolumeNode=reference)

    # The clinician paints a block and erases a patch (what a Segment Editor stroke does to the segment).
    edited = label.array.copy()
    edited[2:5, 2:7, 2:7] = 1
    edited[label.array == 1] = np.where(np.arange(label.array.sum()) % 7 == 0, 0, 1)
    edit_node = logic.addVolume(image.like(edited), "edit", labelmap=True, role="labelmap")
    edit_node.GetDisplayNode().SetAndObserveColorNodeID(logic.classColorTable().GetID())
    segment_ids = vtk.vtkStringArray()
    segment_ids.InsertNextValue(segmentation_node.GetSegmentation().GetNthSegmentID(0))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        edit_node, segmentation_node, segment_ids)

    corrected = logic.labelArrayFromSegmentation(segmentation_node, reference)
    np.testing.assert_array_equal(corrected, edited)
    mask = reviewed_mask(rank_map, {regions[0].rank}, label.array, corrected)
    expected = (rank_map == regions[0].rank) | (edited != label.array)
    np.testing.assert_array_equal(mask.astype(bool), expected)
    assert mask.dtype == np.uint8
    assert not mask[rank_map == regions[1].rank][~(edited != label.array)[rank_map == regions[1].rank]].any()
    assert reviewed_mask(rank_map, set(), label.array, label.array).sum() == 0


def test_new_case_removes_the_previous_cases_nodes_only(regions_case):
    scene, logic, image, label, regions, _, reference = regions_case
    user_volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "user's own")
    logic.showRegions(regions, reference)
    logic.jumpToRegion(regions[0], reference)
    logic.importSegmentation(logic.addVolume(label, "p", labelmap=True, role="prediction"), referenceVolumeNode=reference)
    removed = logic.removeCaseNodes(keep=[reference])
    assert removed == 4  # prediction, segmentation, regions, region box
    assert scene.IsNodePresent(reference) and scene.IsNodePresent(user_volume)
    assert not logic.nodesWithRole("segmentation") and logic.regionsNode is None


# ---- a whole case, as the widget shows it --------------------------------------------------------------------


def test_show_case_and_inference_build_the_review_scene_and_clean_up(headless, phantom, tmp_path):
    from SSLSegmentLib.review.session import InferenceResult

    scene, logic = headless
    image, label = phantom
    u = _uncertainty(image)
    regions, rank_map = find_review_regions(u.array, threshold=0.97, min_voxels=1, geometry=image.geometry)
    # What the session holds after infer(uncertainty="mutual_information"): the nodes are built from these
    # in-memory volumes (no file is read again).
    result = InferenceResult("v0001", "0123abcd", 2, label, {"mutual_information": u}, "mutual_information", 0.97,
                             regions, rank_map)
    baseline = scene.GetNumberOfNodes()

    image_node = logic.showCase(write_volume(image, tmp_path / "image.nrrd"), name="case_1")
    assert all(c.GetBackgroundVolumeID() == image_node.GetID() for c in logic.sliceCompositeNodes())
    nodes = logic.showInference(result, image_node, threshold=0.4, opacity=0.3)
    assert set(nodes) == {"uncertainty", "segmentation", "regions"}
    heat = nodes["uncertainty"]
    assert "mutual information" in heat.GetName() and logic.nodesWithRole("uncertainty") == [heat]
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(heat), u.array)
    np.testing.assert_allclose(sa.node_ijk_to_ras(heat), sa.node_ijk_to_ras(image_node), atol=1e-5)
    assert all(c.GetForegroundVolumeID() == heat.GetID() for c in logic.sliceCompositeNodes())
    assert all(c.GetForegroundOpacity() == pytest.approx(0.3) for c in logic.sliceCompositeNodes())
    display = heat.GetDisplayNode()
    assert display.GetColorNodeID() == sa.HEAT_COLOR_NODE_ID and display.GetLowerThreshold() == pytest.approx(0.4)
    np.testing.assert_array_equal(logic.labelArrayFromSegmentation(nodes["segmentation"], image_node), label.array)
    after_first_export = scene.GetNumberOfNodes()
    logic.labelArrayFromSegmentation(nodes["segmentation"], image_node)  # the widget exports after every edit
    assert scene.GetNumberOfNodes() == after_first_export
    assert nodes["regions"].GetNumberOfControlPoints() == len(regions) > 1
    assert not logic.nodesWithRole("prediction")  # imported, then removed with its display and storage nodes
    per_case = scene.GetNumberOfNodes()

    # Running again replaces the outputs instead of piling them up.
    logic.showInference(result, image_node, visible=False)
    assert scene.GetNumberOfNodes() == per_case
    assert all(c.GetForegroundVolumeID() is None for c in logic.sliceCompositeNodes())

    # The next case removes this one's nodes with their display and storage nodes; the colour table stays.
    logic.showCase(tmp_path / "image.nrrd", name="case_2")
    assert len(logic.nodesWithRole("image")) == 1
    assert not logic.nodesWithRole("uncertainty") and not logic.nodesWithRole("segmentation")
    # image + its display + storage, the class table, and the subject hierarchy (a singleton the export creates)
    assert scene.GetNumberOfNodes() == baseline + 3 + 1 + 1

    with pytest.raises(ValueError, match="either"):
        logic.showCase()


def test_recomputed_regions_replace_the_heat_map_and_markups_but_keep_the_edits(headless, phantom, tmp_path):
    """After ReviewSession.recompute_regions (another kind): the map and regions change, the segmentation with the
    clinician's edits stays."""
    from SSLSegmentLib.review.session import InferenceResult

    scene, logic = headless
    image, label = phantom
    entropy = _uncertainty(image)
    mi = image.like((entropy.array * 0.5).astype(np.float32))
    regions, rank_map = find_review_regions(entropy.array, threshold=0.97, min_voxels=1, geometry=image.geometry)
    result = InferenceResult("v0001", "0123abcd", 2, label, {"entropy": entropy}, "entropy", 0.97, regions, rank_map)
    image_node = logic.showCase(write_volume(image, tmp_path / "image.nrrd"), name="case")
    nodes = logic.showInference(result, image_node, threshold=0.3)
    logic.jumpToRegion(regions[0], image_node)
    edited = label.array.copy()
    edited[2:5, 2:7, 2:7] = 1
    edit_node = logic.addVolume(image.like(edited), "edit", labelmap=True, role="labelmap")
    edit_node.GetDisplayNode().SetAndObserveColorNodeID(logic.classColorTable().GetID())
    segment_ids = vtk.vtkStringArray()
    segment_ids.InsertNextValue(nodes["segmentation"].GetSegmentation().GetNthSegmentID(0))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        edit_node, nodes["segmentation"], segment_ids)  # what a Segment Editor stroke does to the segment
    logic.removeNode(edit_node)
    np.testing.assert_array_equal(logic.labelArrayFromSegmentation(nodes["segmentation"], image_node), edited)
    box = logic.currentRegionRoiNode
    box_nodes = 1 + box.GetNumberOfDisplayNodes() + box.GetNumberOfStorageNodes()
    per_case = scene.GetNumberOfNodes()

    # What apply_regions leaves in the result for the mutual-information map.
    mi_regions, mi_rank_map = find_review_regions(mi.array, threshold=0.45, min_voxels=1, max_regions=5,
                                                  geometry=image.geometry)
    assert len(mi_regions) != len(regions)
    result.uncertainty["mutual_information"] = mi
    result.kind, result.threshold, result.regions, result.rank_map = "mutual_information", 0.45, mi_regions, mi_rank_map
    shown = logic.showReviewRegions(result, image_node, threshold=0.3, opacity=0.6)

    assert set(shown) == {"uncertainty", "regions"}
    assert logic.nodesWithRole("uncertainty") == [shown["uncertainty"]]
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(shown["uncertainty"]), mi.array)
    assert all(c.GetForegroundVolumeID() == shown["uncertainty"].GetID() for c in logic.sliceCompositeNodes())
    assert shown["regions"].GetNumberOfControlPoints() == len(mi_regions)
    assert logic.regionsNode is shown["regions"] and not logic.nodesWithRole("region-roi")  # the old box is gone
    assert logic.nodesWithRole("segmentation") == [nodes["segmentation"]]
    np.testing.assert_array_equal(logic.labelArrayFromSegmentation(nodes["segmentation"], image_node), edited)
    assert scene.GetNumberOfNodes() == per_case - box_nodes  # the same nodes, less the region box
    with pytest.raises(ValueError, match="uncertainty must be one of"):
        result.kind = "variance"
        logic.showReviewRegions(result, image_node)


def test_the_heat_map_has_a_colour_legend_titled_with_its_kind_that_follows_its_visibility(headless, phantom, tmp_path):
    from SSLSegmentLib.review.session import InferenceResult

    scene, logic = headless
    image, label = phantom
    entropy = _uncertainty(image)
    regions, rank_map = find_review_regions(entropy.array, threshold=0.97, min_voxels=1, geometry=image.geometry)
    result = InferenceResult("v0001", "0123abcd", 2, label, {"entropy": entropy}, "entropy", 0.97, regions, rank_map)
    image_node = logic.showCase(write_volume(image, tmp_path / "image.nrrd"), name="case")
    heat = logic.showInference(result, image_node, threshold=0.3)["uncertainty"]
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(heat)
    assert legend is not None and legend.GetTitleText() == "Uncertainty (entropy)" and legend.GetVisibility()
    assert legend.GetPrimaryDisplayNode() is heat.GetDisplayNode()  # the heat map's own colours and window
    logic.setUncertaintyVisible(heat, False)
    assert not legend.GetVisibility()
    logic.setUncertaintyVisible(heat, True)
    assert legend.GetVisibility()
    legends = scene.GetNodesByClass("vtkMRMLColorLegendDisplayNode").GetNumberOfItems()
    logic.showInference(result, image_node, threshold=0.3)  # the next inference replaces the map and its legend
    assert scene.GetNodesByClass("vtkMRMLColorLegendDisplayNode").GetNumberOfItems() == legends
