"""The MRML side of a review: the one module of SSLSegmentLib that imports Slicer's MRML classes.

`ReviewSceneLogic` shows a model's output in a Slicer scene and reads the clinician's correction back:
the uncertainty as a thresholded heat overlay in the slice views' foreground layer, the predicted label map as a
segmentation node, the review regions as markups, slice jumps to a region's centre, and the corrected label map
exported on the image's grid. It uses only MRML nodes, storage nodes and the segmentations logic class, never
`slicer.app`, `slicer.modules` or `slicer.util.load*/save*`, so the same code runs inside the Slicer application
(where `SSLSegmentLogic` inherits it) and on the pip `slicer-core` wheel, where the test suite exercises it.

Coordinates: SSLSegmentLib's arrays are (z, y, x) = (k, j, i) and its `Geometry` is in LPS (SimpleITK's
convention); Slicer's IJKToRAS matrices are in RAS. RAS = diag(-1, -1, 1) · LPS.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import slicer
import vtk

from SSLSegmentLib.data.contract import validate_uncertainty_kind
from SSLSegmentLib.data.volume import Geometry, ImageError, Volume, lps_to_ras

# A heat ramp built into Slicer (and slicer-core) once vtkMRMLColorLogic has added the default colour nodes.
HEAT_COLOR_NODE_ID = "vtkMRMLPETProceduralColorNodePET-Heat"
# Our own table, created when the built-in one is missing from the scene (e.g. a bare scene outside the app).
FALLBACK_HEAT_TABLE_NAME = "SSLSegment uncertainty heat"

# Attribute that tags the nodes this module creates, so a new case can remove the previous case's nodes.
NODE_ROLE_ATTRIBUTE = "SSLSegment.Role"

# Region marker colours: not yet visited (orange), visited (grey-green).
REGION_COLOR = (1.0, 0.55, 0.0)
VISITED_REGION_COLOR = (0.55, 0.75, 0.55)


# ----------------------------------------------------------------------------------------------------------------
# MRML volume nodes <-> Volume (the conversion itself is Geometry's, in data/volume.py)
# ----------------------------------------------------------------------------------------------------------------


def _vtk_matrix(m: np.ndarray) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def _numpy_matrix(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def node_ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return _numpy_matrix(m)


def volume_from_node(node) -> Volume:
    """A copy of a volume node's voxels (k, j, i) with its geometry in LPS."""
    if node is None or node.GetImageData() is None:
        raise ImageError("the volume node holds no image data")
    if node.GetParentTransformNode() is not None:
        # A transformed volume would need resampling; reviewing in the image's own grid keeps labels exact.
        raise ImageError(f"volume {node.GetName()!r} is under a transform; harden or remove the transform first")
    return Volume(np.array(slicer.util.arrayFromVolume(node)), Geometry.from_ijk_to_ras(node_ijk_to_ras(node)))


def update_node_from_volume(node, volume: Volume) -> None:
    """Copy a Volume (k, j, i array + LPS geometry) into a volume node, replacing its voxels and geometry."""
    array = np.ascontiguousarray(volume.array)
    if array.ndim != 3:
        raise ImageError(f"expected a 3D array (z, y, x), got shape {array.shape}")
    slicer.util.updateVolumeFromArray(node, array)
    node.SetIJKToRASMatrix(_vtk_matrix(volume.geometry.ijk_to_ras()))


def new_headless_scene():
    """A scene set up the way the Slicer application sets one up, for using `ReviewSceneLogic` outside it.

    Default colour tables (vtkMRMLColorLogic), the standard Red/Yellow/Green slice nodes (vtkMRMLLayoutLogic) and a
    slice logic with its composite node for each (vtkMRMLSliceLogic). Returns (scene, application_logic); keep the
    application logic alive as long as the scene is used.
    """
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    color_logic = slicer.vtkMRMLColorLogic()
    color_logic.SetMRMLScene(scene)
    app_logic.SetColorLogic(color_logic)
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLScene(scene)
    layout_logic.GetLayoutNode().SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
    slice_logics = vtk.vtkCollection()
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        slice_logic = slicer.vtkMRMLSliceLogic()
        slice_logic.SetMRMLApplicationLogic(app_logic)
        slice_logic.SetMRMLScene(scene)
        slice_logic.SetSliceNode(scene.GetNthNodeByClass(index, "vtkMRMLSliceNode"))
        slice_logic.GetSliceCompositeNode()  # creates the composite node as the application's slice widgets do
        slice_logics.AddItem(slice_logic)
    app_logic.SetSliceLogics(slice_logics)
    # The logics hold the scene; the caller holds the logics (Python drops them otherwise).
    app_logic._sslsegment_keep = (color_logic, layout_logic, slice_logics)
    return scene, app_logic


# ----------------------------------------------------------------------------------------------------------------
# The logic
# ----------------------------------------------------------------------------------------------------------------


class ReviewSceneLogic:
    """All MRML work of a review, on one scene.

    scene: a vtkMRMLScene (slicer.mrmlScene in the application, `new_headless_scene()` outside it).
    class_names: segment names for label values 1..C-1 (value 0 is background and has no segment).
    """

    def __init__(self, scene=None, class_names: Sequence[str] = ("target",)):
        self._scene = scene
        self.class_names = tuple(class_names)
        self.regionsNode = None
        self.currentRegionRoiNode = None
        self._regions: list = []

    # The Slicer application replaces the scene on close/load; `scene` is looked up late for that reason.
    @property
    def scene(self):
        if self._scene is None:
            scene = getattr(slicer, "mrmlScene", None)
            if scene is None:
                raise RuntimeError("no MRML scene: pass one to ReviewSceneLogic(scene=...)")
            return scene
        return self._scene

    # ---- nodes ------------------------------------------------------------------------------------------------

    def _newNode(self, className: str, name: str, role: str):
        node = self.scene.AddNewNodeByClass(className, self.scene.GenerateUniqueName(name))
        node.SetAttribute(NODE_ROLE_ATTRIBUTE, role)
        return node

    def nodesWithRole(self, role: str) -> list:
        nodes = []
        collection = self.scene.GetNodes()
        for index in range(collection.GetNumberOfItems()):
            node = collection.GetItemAsObject(index)
            if node.GetAttribute(NODE_ROLE_ATTRIBUTE) == role:
                nodes.append(node)
        return nodes

    def removeNode(self, node) -> None:
        """Remove a node with its display and storage nodes (the scene leaves those behind otherwise)."""
        if node is None or not self.scene.IsNodePresent(node):
            return
        helpers = []
        if node.IsA("vtkMRMLDisplayableNode"):
            helpers += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        if node.IsA("vtkMRMLStorableNode"):
            helpers += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
        self.scene.RemoveNode(node)
        for helper in helpers:
            if helper is not None and self.scene.IsNodePresent(helper):
                self.scene.RemoveNode(helper)

    def removeCaseNodes(self, keep: Sequence = ()) -> int:
        """Remove every node this logic created for the previous case (not the image unless it was ours)."""
        keep_ids = {n.GetID() for n in keep if n is not None}
        removed = 0
        for role in ("image", "uncertainty", "prediction", "segmentation", "regions", "region-roi", "labelmap"):
            for node in self.nodesWithRole(role):
                if node.GetID() not in keep_ids:
                    self.removeNode(node)
                    removed += 1
        self.regionsNode = None
        self.currentRegionRoiNode = None
        self._regions = []
        return removed

    def loadVolumeFile(self, path: str | os.PathLike, name: str, labelmap: bool = False, role: str = "image"):
        """Read an image file through Slicer's own reader (vtkMRMLVolumeArchetypeStorageNode); LPS→RAS is Slicer's."""
        path = Path(path)
        if not path.is_file():
            raise ImageError(f"{path}: no such file")
        className = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
        node = self._newNode(className, name, role)
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        storage.SetSingleFile(True)
        if not storage.ReadData(node):
            self.scene.RemoveNode(storage)
            self.removeNode(node)
            raise ImageError(f"{path}: Slicer could not read this image")
        node.SetAndObserveStorageNodeID(storage.GetID())
        node.CreateDefaultDisplayNodes()
        return node

    def addVolume(self, volume: Volume, name: str, labelmap: bool = False, role: str = "image"):
        """A new volume node holding a Volume's voxels and geometry."""
        className = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
        node = self._newNode(className, name, role)
        update_node_from_volume(node, volume)
        node.CreateDefaultDisplayNodes()
        return node

    def writeVolumeNode(self, node, path: str | os.PathLike) -> Path:
        """Write a volume node with Slicer's writer (RAS→LPS is Slicer's), through a temporary name and a rename."""
        if node.GetParentTransformNode() is not None:
            # The file would hold the untransformed grid while the user sees the transformed one.
            raise ImageError(f"volume {node.GetName()!r} is under a transform; harden or remove the transform first")
        return self._writeWithStorageNode(slicer.vtkMRMLVolumeArchetypeStorageNode(), node, path)

    def _writeWithStorageNode(self, storage, node, path: str | os.PathLike) -> Path:
        """Write `node` with a configured storage node to a temporary name, then rename: never a half-written file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        storage.SetScene(self.scene)
        storage.SetFileName(str(tmp))
        storage.SetUseCompression(True)
        try:
            if not storage.WriteData(node):
                raise ImageError(f"{path}: Slicer could not write {node.GetName()!r}")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    # ---- slice views ------------------------------------------------------------------------------------------

    def sliceCompositeNodes(self) -> list:
        return [self.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
                for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]

    def sliceNodes(self) -> list:
        return [self.scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
                for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceNode"))]

    def setSliceLayers(self, background=None, foreground=None, foregroundOpacity: float | None = None) -> None:
        """Show volumes in every slice view (what slicer.util.setSliceViewerLayers does, on any scene)."""
        for composite in self.sliceCompositeNodes():
            if background is not None:
                composite.SetBackgroundVolumeID(background.GetID())
            if foreground is not None:
                composite.SetForegroundVolumeID(foreground.GetID())
            if foregroundOpacity is not None:
                composite.SetForegroundOpacity(float(foregroundOpacity))

    # ---- uncertainty heat map ---------------------------------------------------------------------------------

    def heatColorNode(self):
        """The built-in PET-Heat ramp, or (bare scene) a black-free red→yellow table created once."""
        node = self.scene.GetNodeByID(HEAT_COLOR_NODE_ID)
        if node is not None:
            return node
        existing = self.scene.GetFirstNodeByName(FALLBACK_HEAT_TABLE_NAME)
        if existing is not None:
            return existing
        table = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode", FALLBACK_HEAT_TABLE_NAME)
        table.SetTypeToUser()
        n = 256
        table.SetNumberOfColors(n)
        for i in range(n):
            t = i / (n - 1)
            table.SetColor(i, f"{t:.3f}", 1.0, min(1.0, 0.15 + t), max(0.0, 2.0 * t - 1.0), 1.0)
        table.SetAttribute(NODE_ROLE_ATTRIBUTE, "colors")
        return table

    def showUncertainty(self, uncertaintyNode, threshold: float = 0.2, opacity: float = 0.5, backgroundNode=None):
        """Heat overlay in the foreground layer: fixed 0-1 window, voxels below `threshold` transparent."""
        _check_unit("threshold", threshold)
        _check_unit("opacity", opacity)
        uncertaintyNode.CreateDefaultDisplayNodes()
        display = uncertaintyNode.GetDisplayNode()
        display.SetAndObserveColorNodeID(self.heatColorNode().GetID())
        # A fixed window keeps the same colour meaning the same uncertainty from case to case.
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        display.SetInterpolate(False)
        display.AutoThresholdOff()
        display.ApplyThresholdOn()
        display.SetThreshold(float(threshold), 1.0)
        self.setSliceLayers(background=backgroundNode, foreground=uncertaintyNode, foregroundOpacity=opacity)
        return uncertaintyNode

    def showColorLegend(self, uncertaintyNode, title: str):
        """The heat map's colour legend in the views (the Colors module's legend display node), titled with the map
        shown; the Slicer application registers its node class, a bare scene gets it registered here."""
        if not self.scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):
            self.scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())
        legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(uncertaintyNode)
        if legend is None:
            legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(uncertaintyNode)
        legend.SetTitleText(title)
        legend.SetLabelFormat("%.1f")
        legend.SetVisibility(True)
        return legend

    def setUncertaintyThreshold(self, uncertaintyNode, threshold: float) -> None:
        _check_unit("threshold", threshold)
        uncertaintyNode.GetDisplayNode().SetThreshold(float(threshold), 1.0)

    def setUncertaintyOpacity(self, opacity: float) -> None:
        _check_unit("opacity", opacity)
        self.setSliceLayers(foregroundOpacity=opacity)

    def setUncertaintyVisible(self, uncertaintyNode, visible: bool) -> None:
        for composite in self.sliceCompositeNodes():
            composite.SetForegroundVolumeID(uncertaintyNode.GetID() if visible and uncertaintyNode else None)
        legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(uncertaintyNode) if uncertaintyNode else None
        if legend is not None:
            legend.SetVisibility(bool(visible))

    # ---- segmentation -----------------------------------------------------------------------------------------

    def classColorTable(self):
        """A user colour table naming label values: 0 background, then `class_names`; used on import and export."""
        name = "SSLSegment classes"
        for node in self.nodesWithRole("classes"):
            if node.GetNumberOfColors() == len(self.class_names) + 1:
                return node
        table = self._newNode("vtkMRMLColorTableNode", name, "classes")
        table.SetTypeToUser()
        table.SetNumberOfColors(len(self.class_names) + 1)
        table.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
        palette = [(0.95, 0.35, 0.25), (0.25, 0.6, 0.95), (0.4, 0.85, 0.4), (0.9, 0.8, 0.2), (0.75, 0.4, 0.9)]
        for value, class_name in enumerate(self.class_names, start=1):
            r, g, b = palette[(value - 1) % len(palette)]
            table.SetColor(value, class_name, r, g, b, 1.0)
        return table

    def importSegmentation(self, labelNode, name: str = "Segmentation", referenceVolumeNode=None):
        """A segmentation node with one segment per class present in the label map, named from `class_names`."""
        if not labelNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise TypeError("importSegmentation expects a vtkMRMLLabelMapVolumeNode")
        labels = np.unique(slicer.util.arrayFromVolume(labelNode))
        if labels.size and labels.max() > len(self.class_names):
            raise ImageError(f"label map holds value {int(labels.max())} but only {len(self.class_names)} classes "
                             f"are named ({', '.join(self.class_names)})")
        labelNode.CreateDefaultDisplayNodes()
        labelNode.GetDisplayNode().SetAndObserveColorNodeID(self.classColorTable().GetID())
        segmentationNode = self._newNode("vtkMRMLSegmentationNode", name, "segmentation")
        segmentationNode.CreateDefaultDisplayNodes()
        if referenceVolumeNode is not None:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelNode, segmentationNode):
            self.removeNode(segmentationNode)
            raise ImageError(f"could not import {labelNode.GetName()!r} into a segmentation")
        # Classes the model did not predict still get an (empty) segment so the clinician can paint them.
        segmentation = segmentationNode.GetSegmentation()
        present = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
        table = self.classColorTable()
        for value, class_name in enumerate(self.class_names, start=1):
            if class_name not in present:
                color = [0.0, 0.0, 0.0, 0.0]
                table.GetColor(value, color)
                segmentation.AddEmptySegment("", class_name, color[:3])
        return segmentationNode

    def _colorTableIds(self) -> set[str]:
        return {self.scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode").GetID()
                for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode"))}

    def segmentIdsInClassOrder(self, segmentationNode) -> list[str]:
        segmentation = segmentationNode.GetSegmentation()
        by_name = {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegmentID(i)
                   for i in range(segmentation.GetNumberOfSegments())}
        unknown = sorted(set(by_name) - set(self.class_names))
        if unknown:
            raise ImageError(f"segment(s) {unknown} are not model classes ({', '.join(self.class_names)}); "
                             "rename or delete them before submitting")
        return [by_name[c] for c in self.class_names if c in by_name]

    def labelArrayFromSegmentation(self, segmentationNode, referenceVolumeNode) -> np.ndarray:
        """The segmentation as a (k, j, i) uint8 label map on the reference volume's grid, values from class names."""
        classTable = self.classColorTable()
        colorTablesBefore = self._colorTableIds()
        labelNode = self._newNode("vtkMRMLLabelMapVolumeNode", "SSLSegment export", "labelmap")
        try:
            ids = vtk.vtkStringArray()
            for segment_id in self.segmentIdsInClassOrder(segmentationNode):
                ids.InsertNextValue(segment_id)
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentationNode, ids, labelNode, referenceVolumeNode,
                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, classTable)
            if not ok:
                raise ImageError(f"could not export {segmentationNode.GetName()!r} to a label map")
            array = np.array(slicer.util.arrayFromVolume(labelNode), dtype=np.uint8)
        finally:
            self.removeNode(labelNode)
            # The export adds a "<segmentation>_ColorTable" node each time; without this they pile up per edit.
            for nodeId in self._colorTableIds() - colorTablesBefore:
                self.scene.RemoveNode(self.scene.GetNodeByID(nodeId))
        expected = tuple(slicer.util.arrayFromVolume(referenceVolumeNode).shape)
        if array.shape != expected:
            raise ImageError(f"exported label map {array.shape} does not match the image grid {expected}")
        return array

    def writeLabelmap(self, segmentationNode, referenceVolumeNode, path: str | os.PathLike) -> Path:
        """Write the segmentation as a label map (.nrrd) on the image's grid, e.g. for submitting a correction."""
        array = self.labelArrayFromSegmentation(segmentationNode, referenceVolumeNode)
        node = self.addVolume(Volume(array, volume_from_node(referenceVolumeNode).geometry), "SSLSegment submit",
                              labelmap=True, role="labelmap")
        try:
            return self.writeVolumeNode(node, path)
        finally:
            self.removeNode(node)

    def saveSegmentation(self, segmentationNode, path: str | os.PathLike) -> Path:
        """Write a .seg.nrrd (segment names, colours, label values) on the segmentation's own grid, uncropped."""
        path = Path(path)
        if not path.name.endswith(".seg.nrrd"):
            raise ValueError(f"{path}: a segmentation file must end in .seg.nrrd")
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetCropToMinimumExtent(False)  # keep the image grid so the file lines up with the image voxel by voxel
        return self._writeWithStorageNode(storage, segmentationNode, path)

    # ---- a whole case ----------------------------------------------------------------------------------------

    def showCase(self, imagePath=None, name: str = "case", imageNode=None):
        """Start a case: remove the previous case's nodes and show the image (read from `imagePath`, or an
        existing node the user selected, which is kept) in the background of every slice view."""
        if (imagePath is None) == (imageNode is None):
            raise ValueError("give either imagePath or imageNode")
        self.removeCaseNodes(keep=[imageNode] if imageNode is not None else [])
        if imageNode is None:
            imageNode = self.loadVolumeFile(imagePath, name, role="image")
        for composite in self.sliceCompositeNodes():
            composite.SetBackgroundVolumeID(imageNode.GetID())
            composite.SetForegroundVolumeID(None)
            composite.SetLabelVolumeID(None)
        return imageNode

    def showInference(self, result, imageNode, threshold: float = 0.2, opacity: float = 0.5,
                      visible: bool = True) -> dict:
        """Show an inference (review.session.InferenceResult: `label`, `uncertainty[kind]`, `kind`, `regions`): the
        predicted label map as a segmentation, the shown uncertainty map as a heat volume in the foreground and the
        regions as markups. Nodes are built from the session's volumes, so no file is read twice.

        threshold / opacity / visible: the heat map's display (voxels below `threshold` stay transparent).
        Returns {"uncertainty", "segmentation", "regions"}.
        """
        for role in ("prediction", "segmentation"):
            for node in self.nodesWithRole(role):
                self.removeNode(node)
        base = imageNode.GetName()
        prediction = self.addVolume(result.label, f"{base} prediction", labelmap=True, role="prediction")
        try:
            segmentation = self.importSegmentation(prediction, f"{base} segmentation", referenceVolumeNode=imageNode)
        finally:
            self.removeNode(prediction)  # the segmentation holds it now; the session keeps the array
        nodes = self.showReviewRegions(result, imageNode, threshold=threshold, opacity=opacity, visible=visible)
        nodes["segmentation"] = segmentation
        return nodes

    def showReviewRegions(self, result, imageNode, threshold: float = 0.2, opacity: float = 0.5,
                          visible: bool = True) -> dict:
        """Show the regions of `result` and the map they are of (after `ReviewSession.recompute_regions`): the
        previous heat map, markups and region box are replaced; the segmentation, with the clinician's edits, stays.
        Returns {"uncertainty", "regions"}."""
        kind = validate_uncertainty_kind(result.kind)
        for role in ("uncertainty", "regions", "region-roi"):
            for node in self.nodesWithRole(role):
                self.removeNode(node)
        self.regionsNode, self.currentRegionRoiNode = None, None
        heat = self.addVolume(result.uncertainty[kind], f"{imageNode.GetName()} uncertainty ({kind.replace('_', ' ')})",
                              role="uncertainty")
        self.showUncertainty(heat, threshold, opacity, backgroundNode=imageNode)  # colours, window, threshold
        self.showColorLegend(heat, f"Uncertainty ({kind.replace('_', ' ')})")
        regions = self.showRegions(result.regions, imageNode)
        if not visible:
            self.setUncertaintyVisible(heat, False)
        return {"uncertainty": heat, "regions": regions}

    # ---- review regions ---------------------------------------------------------------------------------------

    def regionCentreRas(self, region, referenceVolumeNode=None) -> tuple[float, float, float]:
        """A region's centre in RAS, from its LPS centroid or (without one) its IJK centroid and the image geometry."""
        if getattr(region, "centroid_lps", None) is not None:
            return lps_to_ras(region.centroid_lps)
        if referenceVolumeNode is None:
            raise ValueError(f"region {region.rank} has no physical centroid; pass the reference volume")
        ijk = np.append(np.asarray(region.centroid_ijk, dtype=float), 1.0)
        return tuple(float(v) for v in (node_ijk_to_ras(referenceVolumeNode) @ ijk)[:3])

    def showRegions(self, regions: Sequence, referenceVolumeNode=None, name: str = "Review regions"):
        """One markups point per review region at its centre, labelled with its rank; points are locked."""
        if self.regionsNode is not None:
            self.removeNode(self.regionsNode)
        node = self._newNode("vtkMRMLMarkupsFiducialNode", name, "regions")
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetSelectedColor(*REGION_COLOR)
        display.SetColor(*VISITED_REGION_COLOR)
        display.SetGlyphScale(2.0)
        node.SetLocked(True)
        for region in regions:
            index = node.AddControlPoint(vtk.vtkVector3d(*self.regionCentreRas(region, referenceVolumeNode)),
                                         f"R{region.rank}")
            node.SetNthControlPointDescription(
                index, f"{region.voxel_count} voxels, mean uncertainty {region.uncertainty_mean:.2f}")
            node.SetNthControlPointSelected(index, True)  # selected = still to visit
        self.regionsNode = node
        self._regions = list(regions)
        return node

    def _regionIndex(self, rank: int) -> int:
        for index, region in enumerate(self._regions):
            if region.rank == rank:
                return index
        raise KeyError(f"no review region with rank {rank}")

    def markRegionVisited(self, rank: int, visited: bool = True) -> None:
        if self.regionsNode is None:
            raise RuntimeError("no review regions are shown")
        self.regionsNode.SetNthControlPointSelected(self._regionIndex(rank), not visited)

    def jumpToRegion(self, region, referenceVolumeNode=None, showBox: bool = True,
                     zoom: bool = True) -> tuple[float, float, float]:
        """Centre every slice view on the region (vtkMRMLSliceNode.JumpAllSlices), frame it with an ROI box (shown
        in the 3D views too) and, with `zoom`, fit each slice view to the region with a margin around it."""
        ras = self.regionCentreRas(region, referenceVolumeNode)
        slicer.vtkMRMLSliceNode.JumpAllSlices(self.scene, *ras, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        if referenceVolumeNode is not None:
            if showBox:
                self.showRegionBox(region, referenceVolumeNode)
            if zoom:
                self.zoomToRegion(region, referenceVolumeNode)
        return ras

    # The view shows the region and as much again around it on each side (the structure it sits on), and never
    # less than ZOOM_MIN_FOV_MM across, so a region of a few voxels is not blown up into a blur of single voxels.
    ZOOM_CONTEXT = 3.0
    ZOOM_MIN_FOV_MM = 30.0

    def zoomToRegion(self, region, referenceVolumeNode) -> None:
        """Set every slice view's field of view so the region's bounding box fills the middle third of its shorter
        side; the view's aspect ratio is kept (vtkMRMLSliceNode.SetFieldOfView, as the slice controller's zoom)."""
        axes = node_ijk_to_ras(referenceVolumeNode)[:3, :3]
        extent = np.asarray(region.bbox_max_ijk, dtype=float) - np.asarray(region.bbox_min_ijk, dtype=float) + 1.0
        box = np.abs(axes) @ extent  # the region's bounding box in RAS, per axis (mm)
        for slice_node in self.sliceNodes():
            slice_to_ras = _numpy_matrix(slice_node.GetSliceToRAS())[:3, :3]
            # The box's extent along the view's in-plane axes.
            in_plane = np.abs(slice_to_ras[:, :2].T) @ box
            target = max(self.ZOOM_CONTEXT * float(in_plane.max()), self.ZOOM_MIN_FOV_MM)
            fov = slice_node.GetFieldOfView()
            if min(fov[0], fov[1]) <= 0:
                continue  # a view that was never laid out has no field of view to scale
            scale = target / min(fov[0], fov[1])
            slice_node.SetFieldOfView(fov[0] * scale, fov[1] * scale, fov[2])

    @staticmethod
    def voxelVolumeMl(volumeNode) -> float:
        """The volume of one voxel of `volumeNode` in mL (0 without a node), for region sizes and edit counts."""
        if volumeNode is None:
            return 0.0
        sx, sy, sz = volumeNode.GetSpacing()
        return sx * sy * sz / 1000.0

    def showRegionBox(self, region, referenceVolumeNode):
        """An ROI box over the region's voxel bounding box, oriented with the image axes."""
        ijk_to_ras = node_ijk_to_ras(referenceVolumeNode)
        lo = np.asarray(region.bbox_min_ijk, dtype=float) - 0.5  # voxel edges, not centres
        hi = np.asarray(region.bbox_max_ijk, dtype=float) + 0.5
        centre = (ijk_to_ras @ np.append((lo + hi) / 2.0, 1.0))[:3]
        axes = ijk_to_ras[:3, :3]
        spacing = np.linalg.norm(axes, axis=0)
        orientation = np.eye(4)
        orientation[:3, :3] = axes / spacing
        node = self.currentRegionRoiNode
        if node is None or not self.scene.IsNodePresent(node):
            node = self._newNode("vtkMRMLMarkupsROINode", "Current review region", "region-roi")
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetHandlesInteractive(False)
            node.SetLocked(True)
            self.currentRegionRoiNode = node
        node.SetAndObserveObjectToNodeMatrix(_vtk_matrix(orientation))
        node.SetCenter(*centre)
        node.SetSize(*((hi - lo) * spacing))
        return node


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
