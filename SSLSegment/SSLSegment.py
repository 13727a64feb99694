"""SSLSegment: review a model's 3D segmentation where it is unsure, correct it, and send the correction back.

Module layout (Slicer's scripted-module convention):
- `SSLSegment`: metadata and help.
- `SSLSegmentWidget`: the panel. Thin: loads Resources/UI/SSLSegment.ui, binds the parameter node, and wires buttons
  to the review session (SSLSegmentLib.review.session, pure Python) and to the Logic. Network calls run on a worker
  thread polled by a QTimer, so the application never freezes and every wait can be cancelled.
- `SSLSegmentLogic`: all MRML work (SSLSegmentLib.review.scene.ReviewSceneLogic, tested outside Slicer on
  slicer-core), dependency installation and the local backend.
- `SSLSegmentTest`: self-test on phantom data and the bundled phantom model.

Nothing heavy is imported when Slicer starts: torch and MONAI are only ever imported by the backend processes.
"""

import enum
import logging
import os
import pathlib
import sys
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _libraryDirectory():
    """The folder holding SSLSegmentLib/ (put on sys.path): next to this file once installed (the extension ships
    it there), one folder up in a source checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(candidate, "SSLSegmentLib", "__init__.py")):
            if candidate not in sys.path:
                sys.path.insert(0, candidate)
            return candidate
    return here


def _backendDirectory():
    """The folder holding the backend package training/, for the local backend's PYTHONPATH only: the private
    SSLSegmentBackend/ folder next to this file once installed (kept off Slicer's sys.path, where a top-level
    `training` could collide with another extension's module), the repository root in a source checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "SSLSegmentBackend"), os.path.dirname(here)):
        if os.path.isfile(os.path.join(candidate, "training", "__init__.py")):
            return candidate
    return os.path.join(here, "SSLSegmentBackend")


LIBRARY_DIR = _libraryDirectory()
BACKEND_DIR = _backendDirectory()

# Needs only numpy (which ships with Slicer): no SimpleITK, scipy, torch or MONAI at start-up (test_review_imports.py).
from SSLSegmentLib.review.scene import ReviewSceneLogic  # noqa: E402
from SSLSegmentLib.review import defaults  # noqa: E402

NEXT_REGION_SHORTCUT = "Ctrl+Shift+N"
PREVIOUS_REGION_SHORTCUT = "Ctrl+Shift+P"


#
# SSLSegment
#


class SSLSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SSLSegment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []  # PyTorch is needed only to run a backend here; checked when it starts
        self.parent.contributors = ["SSLSegment contributors"]
        self.parent.helpText = _("""
<p>Review an AI segmentation where the model is <b>unsure</b>, correct it, and send the correction back so the
model learns from it.</p>
<ol>
<li><b>Backend</b>: enter the server address and token you were given and press Connect, or choose
"Start on this computer" with a datastore folder.</li>
<li><b>Case</b>: Fetch next case gives you the case where your review helps most; or review a volume you loaded.</li>
<li><b>Run</b>: the model segments the case and estimates its uncertainty.</li>
<li><b>Heat map</b>: colour shows how unsure the model is (dark red: somewhat, yellow/white: very). Voxels below the
"Hide below" value are not coloured.</li>
<li><b>Review regions</b>: press Next (Ctrl+Shift+N) to jump to the most uncertain regions in turn; each visited
region counts as reviewed.</li>
<li><b>Correct</b> the segmentation with Paint/Erase where it is wrong.</li>
<li><b>Submit</b>: the corrected label, the regions you visited and every voxel you edited are stored as a new
label revision. Unvisited parts of the case are <i>not</i> treated as checked.</li>
</ol>
<p>The heat map shows where the model is unsure, not where it is wrong: a confident mistake stays cold. Look at the
whole structure before submitting a case as final.</p>
<p>See the <a href="https://github.com/sslsegment/SSLSegment/blob/main/docs/slicer.md">user guide</a>.</p>
""")
        self.parent.acknowledgementText = _("""
Built on 3D Slicer, MONAI and PyTorch. The uncertainty-aware training follows published semi-supervised
segmentation methods (mean teacher, uncertainty-aware mean teacher, bidirectional region-level losses).
""")


#
# Parameter node
#


class ConnectionMode(enum.Enum):
    REMOTE = "remote"
    LOCAL = "local"

    def label(self):
        return {ConnectionMode.REMOTE: _("Remote server"), ConnectionMode.LOCAL: _("Start on this computer")}[self]


class CaseStrategy(enum.Enum):
    UNCERTAINTY = "uncertainty"
    RANDOM = "random"

    def label(self):
        return {CaseStrategy.UNCERTAINTY: _("most uncertain first"), CaseStrategy.RANDOM: _("random")}[self]


class UncertaintyKind(enum.Enum):
    ENTROPY = "entropy"
    MUTUAL_INFORMATION = "mutual_information"

    def label(self):
        return {UncertaintyKind.ENTROPY: _("total uncertainty (entropy)"),
                UncertaintyKind.MUTUAL_INFORMATION: _("model doubt (mutual information)")}[self]


@parameterNodeWrapper
class SSLSegmentParameterNode:
    """What the panel shows, saved with the scene (the token never is)."""

    connectionMode: ConnectionMode = ConnectionMode.REMOTE
    serverUrl: str = "http://127.0.0.1:8765"
    datastore: pathlib.Path = pathlib.Path.home() / "SSLSegment" / "datastore"
    annotator: str = "anonymous"
    strategy: CaseStrategy = CaseStrategy.UNCERTAINTY
    inputVolume: vtkMRMLScalarVolumeNode
    passes: Annotated[int, WithinRange(*defaults.PASSES_RANGE)] = defaults.PASSES
    regionThreshold: Annotated[float, WithinRange(*defaults.REGION_THRESHOLD_RANGE)] = defaults.REGION_THRESHOLD
    uncertaintyKind: UncertaintyKind = UncertaintyKind.ENTROPY
    showHeatmap: bool = True
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = defaults.HEATMAP_OPACITY
    heatmapThreshold: Annotated[float, WithinRange(*defaults.HEATMAP_THRESHOLD_RANGE)] = defaults.HEATMAP_THRESHOLD
    wholeCase: bool = False
    trainIterations: Annotated[int, WithinRange(10, 100000)] = defaults.TRAIN_ITERATIONS
    # The current case's nodes (set by the module, not shown as widgets).
    imageVolume: vtkMRMLScalarVolumeNode
    uncertaintyVolume: vtkMRMLScalarVolumeNode  # the map shown: the one the review regions are of
    segmentation: vtkMRMLSegmentationNode


#
# SSLSegmentWidget
#


class SSLSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.session = None
        self.localBackend = None
        self._task = None
        self._taskDone = None
        self._taskFailed = None
        self._trainingTask = None
        self._startingLocalBackend = False
        self._observedSegmentation = None
        self._shortcuts = []

    # ---- set-up and life cycle ------------------------------------------------------------------------------

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SSLSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.logic = SSLSegmentLogic()

        # The segment editor wants its parameter node before the scene.
        self.ui.embeddedSegmentEditorWidget.setMRMLSegmentEditorNode(self.logic.getSegmentEditorNode())
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.stopLocalButton.connect("clicked(bool)", self.onStopLocal)
        self.ui.nextCaseButton.connect("clicked(bool)", self.onNextCase)
        self.ui.sendVolumeButton.connect("clicked(bool)", self.onSendVolume)
        self.ui.runButton.connect("clicked(bool)", self.onRun)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.nextRegionButton.connect("clicked(bool)", self.onNextRegion)
        self.ui.previousRegionButton.connect("clicked(bool)", self.onPreviousRegion)
        self.ui.regionsTableWidget.connect("cellClicked(int,int)", self.onRegionClicked)
        self.ui.submitButton.connect("clicked(bool)", self.onSubmit)
        self.ui.skipCaseButton.connect("clicked(bool)", self.onSkipCase)
        self.ui.undoSubmitButton.connect("clicked(bool)", self.onUndoSubmit)
        self.ui.startTrainingButton.connect("clicked(bool)", self.onStartTraining)
        self.ui.stopTrainingButton.connect("clicked(bool)", self.onStopTraining)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.onRefreshModels)
        self.ui.updateModelButton.connect("clicked(bool)", self.onUpdateModel)
        self.ui.modelsTableWidget.connect("itemSelectionChanged()", self._updateButtonStates)


        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(200)
        self._pollTimer.connect("timeout()", self._pollTask)
        self._trainingTimer = qt.QTimer()
        self._trainingTimer.setInterval(2000)
        self._trainingTimer.connect("timeout()", self._pollTraining)
        self._editTimer = qt.QTimer()
        self._editTimer.setSingleShot(True)
        self._editTimer.setInterval(600)  # count edited voxels once a paint stroke settles, not on every event
        self._editTimer.connect("timeout()", self._updateEditedCount)

        self.initializeParameterNode()
        self._updateButtonStates()

    def cleanup(self) -> None:
        for timer in (self._pollTimer, self._trainingTimer, self._editTimer):
            timer.stop()
        self._removeShortcuts()
        if self._task is not None:
            self._task.cancel()
        if self.localBackend is not None:
            self.localBackend.stop()  # our child processes end with the application
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        editor = self.ui.embeddedSegmentEditorWidget
        editor.setupViewObservations()
        editor.installKeyboardShortcuts()  # Ctrl+Z, 1-0, Esc, Space ... as in the Segment Editor module
        self._installShortcuts()

    def exit(self) -> None:
        editor = self.ui.embeddedSegmentEditorWidget
        editor.setActiveEffect(None)
        editor.uninstallKeyboardShortcuts()
        editor.removeViewObservations()
        self._removeShortcuts()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def _installShortcuts(self) -> None:
        """Next/previous region keys, only while the module is shown (in another module they must not visit
        regions, which would count them as reviewed)."""
        self._removeShortcuts()
        for key, slot in ((NEXT_REGION_SHORTCUT, self.onNextRegion), (PREVIOUS_REGION_SHORTCUT, self.onPreviousRegion)):
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.connect("activated()", slot)
            self._shortcuts.append(shortcut)

    def _removeShortcuts(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
        self._shortcuts = []

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self._observeSegmentation(None)

    def onSceneEndClose(self, caller, event) -> None:
        self.ui.embeddedSegmentEditorWidget.setMRMLSegmentEditorNode(self.logic.getSegmentEditorNode())
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets carry a "SlicerParameterName" property in the .ui file.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        local = p.connectionMode == ConnectionMode.LOCAL
        for widget in (self.ui.serverUrlLabel, self.ui.serverUrlLineEdit, self.ui.tokenLabel, self.ui.tokenLineEdit):
            widget.setVisible(not local)
        for widget in (self.ui.datastoreLabel, self.ui.datastorePathLineEdit, self.ui.stopLocalButton):
            widget.setVisible(local)
        self.ui.connectButton.text = _("Start and connect") if local else _("Connect")
        self._applyDisplaySettings()
        self._updateButtonStates()
        self._followRegionSettings()

    # ---- state shown in the panel ---------------------------------------------------------------------------

    def _state(self):
        return None if self.session is None else self.session.state.value

    def _updateButtonStates(self) -> None:
        from SSLSegmentLib.review.presenter import PanelInputs, controls

        p = self._parameterNode
        enabled = controls(self.session, PanelInputs(
            busy=self._task is not None, local_backend=self.localBackend is not None,
            input_volume=p is not None and p.inputVolume is not None,
            model_selected=self.ui.modelsTableWidget.currentRow() >= 0))
        for name, button in (("connect", self.ui.connectButton), ("stop_local", self.ui.stopLocalButton),
                             ("next_case", self.ui.nextCaseButton), ("send_volume", self.ui.sendVolumeButton),
                             ("run", self.ui.runButton), ("cancel", self.ui.cancelButton),
                             ("next_region", self.ui.nextRegionButton),
                             ("previous_region", self.ui.previousRegionButton), ("submit", self.ui.submitButton),
                             ("skip_case", self.ui.skipCaseButton), ("undo_submit", self.ui.undoSubmitButton),
                             ("start_training", self.ui.startTrainingButton),
                             ("stop_training", self.ui.stopTrainingButton),
                             ("refresh_models", self.ui.refreshModelsButton),
                             ("update_model", self.ui.updateModelButton)):
            button.enabled = enabled[name]

    def _confirmDiscard(self) -> bool:
        """Ask before a click replaces the case or its segmentation while edits or visited regions are not
        submitted; True to go on. The count is taken now, from the segmentation on screen."""
        from SSLSegmentLib.review.presenter import unsaved_work

        p = self._parameterNode
        edited = 0
        if self.session is not None and self._state() == "inferred" and p is not None and p.segmentation is not None:
            try:
                corrected = self.logic.labelArrayFromSegmentation(p.segmentation, p.imageVolume)
                edited = int(self.session.edited_mask(corrected).sum())
            except Exception:  # an unreadable segmentation is still work to keep: ask
                edited = 1
        question = unsaved_work(self.session, edited)
        return question is None or slicer.util.confirmYesNoDisplay(question, windowTitle=_("SSLSegment"))

    def _setStatus(self, text: str, error: bool = False) -> None:
        self.ui.runStatusLabel.text = text
        self.ui.runStatusLabel.setStyleSheet("color: #c0392b;" if error else "")
        slicer.util.showStatusMessage(text, 5000)

    def _showError(self, what: str, exc: Exception) -> None:
        from SSLSegmentLib.review.presenter import failure_hint, failure_message

        hint = failure_hint(exc)  # the web page gives the same advice
        message = failure_message(what, exc)
        self._setStatus(message, error=True)
        logging.error(message)
        slicer.util.errorDisplay(f"{message}\n\n{hint}".strip(), windowTitle=_("SSLSegment"))

    # ---- background work ------------------------------------------------------------------------------------

    def _runInBackground(self, description: str, function, onDone, *args, onFailed=None, **kwargs) -> bool:
        """Run `function` on a worker thread; call `onDone(result)` on the main thread when it finishes, or
        `onFailed()` (if given) when it failed or was cancelled."""
        from SSLSegmentLib.review.tasks import BackgroundTask

        if self._task is not None:
            self._setStatus(_("Busy: {what}. Wait, or press Cancel.").format(what=self._task.description))
            return False
        self._task = BackgroundTask(description, function, *args, **kwargs)
        self._taskDone, self._taskFailed = onDone, onFailed
        self.ui.runProgressBar.setRange(0, 0)  # indeterminate: the backend reports no progress for one request
        self._setStatus(f"{description}…")
        self._updateButtonStates()
        self._pollTimer.start()
        return True

    def _pollTask(self) -> None:
        task = self._task
        if task is None:
            self._pollTimer.stop()
            return
        if not task.done():
            self.ui.runStatusLabel.text = f"{task.description}… {int(task.elapsed_s())} s"
            return
        self._pollTimer.stop()
        self._task, onDone, onFailed = None, self._taskDone, self._taskFailed
        self._startingLocalBackend = False
        self.ui.runProgressBar.setRange(0, 1)
        self.ui.runProgressBar.value = 0 if task.cancelled else 1
        result, error = task.outcome()
        try:
            if task.cancelled:
                self._setStatus(_("Cancelled: {what}.").format(what=task.description))
            elif error is not None:
                self._showError(task.description, error)
            else:
                self._setStatus(_("{what}: done.").format(what=task.description))
                onDone(result)
                onFailed = None
        except Exception as exc:  # a failure while showing the result must not leave the panel stuck
            logging.exception("SSLSegment")
            self._showError(task.description, exc)
        finally:
            if onFailed is not None:
                onFailed()
            self._updateButtonStates()
            self._followRegionSettings()  # a kind chosen while the panel was busy

    def onCancel(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        if self._startingLocalBackend and self.localBackend is not None:
            self.localBackend.stop()  # also ends the thread waiting for it
            self.localBackend = None
        self._pollTask()

    # ---- connection -----------------------------------------------------------------------------------------

    def onConnect(self) -> None:
        p = self._parameterNode
        from SSLSegmentLib.data.contract import validate_author

        try:
            validate_author(p.annotator)
        except ValueError as exc:
            self._setStatus(str(exc), error=True)
            return
        if p.connectionMode == ConnectionMode.LOCAL:
            # No wait cursor here: setting up may ask before installing, and a question is not put under it.
            with slicer.util.tryWithErrorDisplay(_("Cannot start the local backend.")):
                if self.logic.setupPythonRequirements(local=True):
                    return  # installed something that needs a restart; the logic said so
                if self.localBackend is None or not self.localBackend.running():
                    self.localBackend = self.logic.createLocalBackend(p.datastore)
                    self.localBackend.start()
                self._startingLocalBackend = self._runInBackground(
                    _("Starting the local backend"), self.localBackend.wait_until_ready, self._onLocalBackendReady,
                    timeout=300)
        else:
            self._connectTo(p.serverUrl.strip(), self.ui.tokenLineEdit.text.strip() or None)

    def _onLocalBackendReady(self, backend) -> None:
        self._connectTo(backend.base_url, backend.token)

    def _connectTo(self, url: str, token) -> None:
        from SSLSegmentLib.review.client import SSLSegmentClient
        from SSLSegmentLib.review.session import ReviewSession

        try:
            client = SSLSegmentClient(url, token=token)
        except ValueError as exc:
            self._setStatus(str(exc), error=True)
            return
        self.session = ReviewSession(client, self.logic.workDirectory(), annotator=self._parameterNode.annotator)
        self.ui.connectionStatusLabel.text = _("Connecting to {url}…").format(url=url)
        self._runInBackground(_("Connecting"), self.session.connect, self._onConnected)

    def _onConnected(self, info: dict) -> None:
        splits = info.get("splits", {})
        self.ui.connectionStatusLabel.text = _("Connected to {url}: {n} cases ({train} to train on), backend {v}.").format(
            url=self.session.client.base_url, n=info.get("n_cases", "?"), train=splits.get("train", "?"),
            v=info.get("version", "?"))
        self._showModelVersion()
        self.onRefreshModels()

    def _showModelVersion(self) -> None:
        version = self.session.model_version if self.session else None
        self.ui.modelVersionLabel.text = version or _("none yet: train one in the Training section")

    def onStopLocal(self) -> None:
        if not self._confirmDiscard():
            return
        backend, self.localBackend, self.session = self.localBackend, None, None
        if backend is None:
            return
        # Stopping waits for the processes to end (up to ~15 s when one hangs): off the GUI thread.
        self._runInBackground(_("Stopping the local backend"), backend.stop, lambda _result: setattr(
            self.ui.connectionStatusLabel, "text", _("Local backend stopped.")))

    # ---- cases ----------------------------------------------------------------------------------------------

    def onNextCase(self) -> None:
        if not self._confirmDiscard():
            return
        self._runInBackground(_("Fetching the next case"), self.session.fetch_next_case, self._onCaseFetched,
                              strategy=self._parameterNode.strategy.value)

    def _onCaseFetched(self, case) -> None:
        if case is None:
            self.ui.caseLabel.text = _("Nothing left to review: every case is reviewed or held by a colleague.")
            return
        node = self.logic.showCase(case.image_path, name=case.case_id)
        self._startCase(case, node)

    def onSendVolume(self) -> None:
        if not self._confirmDiscard():
            return
        node = self._parameterNode.inputVolume
        path = self.logic.workDirectory() / "uploads" / f"{node.GetID()}.nrrd"
        with slicer.util.tryWithErrorDisplay(_("Cannot export the selected volume."), waitCursor=True):
            self.logic.writeVolumeNode(node, path)
            self._runInBackground(_("Sending the volume"), self.session.open_image,
                                  lambda case: self._startCase(case, self.logic.showCase(imageNode=node)), path)

    def _startCase(self, case, imageNode) -> None:
        p = self._parameterNode
        wasModified = p.StartModify()
        p.imageVolume = imageNode
        p.uncertaintyVolume = p.segmentation = None
        p.wholeCase = False
        p.EndModify(wasModified)
        self._observeSegmentation(None)
        score = f", uncertainty score {case.score:.3f}" if case.score is not None else ""
        self.ui.caseLabel.text = f"{case.case_id} ({case.split or '?'} split{score})"
        self.ui.regionsTableWidget.setRowCount(0)
        self.ui.regionStatusLabel.text = _("Press Run to segment the case.")
        self.ui.submitStatusLabel.text = ""
        self.ui.editedVoxelsLabel.text = _("No edits yet.")

    def onSkipCase(self) -> None:
        if not self._confirmDiscard():
            return
        self._runInBackground(_("Giving the case back"), self.session.skip_case, self._onSkipped)

    def _onSkipped(self, _result) -> None:
        self.logic.removeCaseNodes(keep=[self._parameterNode.inputVolume])
        self.ui.caseLabel.text = _("Skipped. Fetch the next case.")
        self.ui.regionsTableWidget.setRowCount(0)

    # ---- inference and display ------------------------------------------------------------------------------

    def onRun(self) -> None:
        if not self._confirmDiscard():  # a new output replaces the segmentation being corrected
            return
        p = self._parameterNode
        # The network half only: a Cancel drops it and the review on screen stays as it is.
        self._runInBackground(_("Running the model"), self.session.fetch_inference, self._onInferred, passes=p.passes,
                              uncertainty=p.uncertaintyKind.value, threshold=p.regionThreshold)

    def _onInferred(self, pending) -> None:
        p = self._parameterNode
        result = self.session.apply_inference(pending)
        nodes = self.logic.showInference(result, p.imageVolume, threshold=p.heatmapThreshold,
                                         opacity=p.heatmapOpacity, visible=p.showHeatmap)
        wasModified = p.StartModify()  # one GUI update for the two references, not two
        p.uncertaintyVolume = nodes["uncertainty"]
        p.segmentation = nodes["segmentation"]
        p.EndModify(wasModified)
        editor = self.ui.embeddedSegmentEditorWidget
        editor.setSegmentationNode(nodes["segmentation"])
        editor.setSourceVolumeNode(p.imageVolume)
        self._observeSegmentation(nodes["segmentation"])
        self._fillRegionsTable()
        self._showModelVersion()
        self._showRegionCount(result)

    def _showRegionCount(self, result) -> None:
        n = len(result.regions)
        self.ui.regionStatusLabel.text = (
            _("{n} regions above {t:.2f}. Press Next ({key}) to visit the most uncertain first.").format(
                n=n, t=result.threshold, key=NEXT_REGION_SHORTCUT) if n else
            _("No region is above {t:.2f}: the model is fairly sure everywhere. Check the whole structure anyway.").format(
                t=result.threshold))

    def _followRegionSettings(self) -> None:
        """The review regions (and the reviewed mask built from them) are those of the map and threshold shown: a kind
        or region threshold chosen after Run asks the backend for those regions (a cache hit, no new forward pass)."""
        from SSLSegmentLib.review.presenter import regions_to_fetch

        p = self._parameterNode
        if p is None or self._task is not None:
            return  # a change made while a call is in flight is followed when it ends
        wanted = regions_to_fetch(self.session, p.uncertaintyKind.value, p.regionThreshold)
        if wanted is None:
            return
        kind, threshold = wanted
        self._runInBackground(_("Ranking the regions of the {kind} map").format(kind=UncertaintyKind(kind).label()),
                              self.session.fetch_regions, self._onRegionsFetched, kind, threshold,
                              onFailed=self._showSessionRegionSettings)

    def _onRegionsFetched(self, ranked) -> None:
        p = self._parameterNode
        result = self.session.result
        self.session.apply_regions(ranked)  # on the main thread: an abandoned fetch changes nothing
        nodes = self.logic.showReviewRegions(result, p.imageVolume, threshold=p.heatmapThreshold,
                                             opacity=p.heatmapOpacity, visible=p.showHeatmap)
        p.uncertaintyVolume = nodes["uncertainty"]
        self._fillRegionsTable()
        self._showRegionCount(result)
        self._editTimer.start()  # the visited regions were reset, so the reviewed-voxel count changes

    def _showSessionRegionSettings(self) -> None:
        """After a failed or cancelled change: the panel shows the kind and threshold whose regions are under review."""
        p = self._parameterNode
        if p is not None and self.session is not None and self.session.result is not None:
            wasModified = p.StartModify()
            p.uncertaintyKind = UncertaintyKind(self.session.result.kind)
            p.regionThreshold = self.session.result.threshold
            p.EndModify(wasModified)

    def _applyDisplaySettings(self) -> None:
        p = self._parameterNode
        if p is None or p.uncertaintyVolume is None:
            return
        self.logic.setUncertaintyThreshold(p.uncertaintyVolume, p.heatmapThreshold)
        self.logic.setSliceLayers(foreground=p.uncertaintyVolume, foregroundOpacity=p.heatmapOpacity)
        self.logic.setUncertaintyVisible(p.uncertaintyVolume, p.showHeatmap)

    # ---- review regions -------------------------------------------------------------------------------------

    def _fillRegionsTable(self) -> None:
        table = self.ui.regionsTableWidget
        regions = self.session.regions if self.session else []
        table.setRowCount(len(regions))
        voxel_ml = self.logic.voxelVolumeMl(self._parameterNode.imageVolume)
        for row, region in enumerate(regions):
            cells = (str(region.rank), f"{region.voxel_count * voxel_ml:.2f}", f"{region.uncertainty_mean:.2f}",
                     "✓" if region.rank in self.session.visited else "")
            for column, text in enumerate(cells):
                table.setItem(row, column, qt.QTableWidgetItem(text))
        if self.session and self.session.current_index is not None:
            table.selectRow(self.session.current_index)
        if regions:
            self.ui.regionStatusLabel.text = _("{visited} of {n} regions visited.").format(
                visited=len(self.session.visited), n=len(regions))

    def onNextRegion(self) -> None:
        self._visitRegion(lambda: self.session.next_region())

    def onPreviousRegion(self) -> None:
        self._visitRegion(lambda: self.session.previous_region())

    def onRegionClicked(self, row: int, column: int) -> None:
        self._visitRegion(lambda: self.session.go_to_region(row))

    def _visitRegion(self, step) -> None:
        if (self._parameterNode is None or self.session is None or self._state() != "inferred"
                or not self.session.regions or self._task is not None):
            return  # a shortcut pressed before there are regions (or while a call is in flight) does nothing
        region = step()
        self.logic.jumpToRegion(region, self._parameterNode.imageVolume)
        self.logic.markRegionVisited(region.rank)
        self._fillRegionsTable()
        self._editTimer.start()  # the reviewed-voxel count grows with each visited region

    # ---- corrections ----------------------------------------------------------------------------------------

    def _observeSegmentation(self, segmentationNode) -> None:
        events = (slicer.vtkSegmentation.RepresentationModified, slicer.vtkSegmentation.SegmentModified)
        if self._observedSegmentation is not None:
            for event in events:
                self.removeObserver(self._observedSegmentation, event, self._onSegmentationEdited)
        self._observedSegmentation = segmentationNode.GetSegmentation() if segmentationNode else None
        if self._observedSegmentation is not None:
            for event in events:
                self.addObserver(self._observedSegmentation, event, self._onSegmentationEdited)

    def _onSegmentationEdited(self, caller=None, event=None) -> None:
        self._editTimer.start()

    def _updateEditedCount(self) -> None:
        p = self._parameterNode
        if self.session is None or self._state() != "inferred" or p.segmentation is None:
            return
        try:
            corrected = self.logic.labelArrayFromSegmentation(p.segmentation, p.imageVolume)
            edited = int(self.session.edited_mask(corrected).sum())
            reviewed = int(self.session.reviewed_mask(corrected).sum())
        except Exception as exc:  # e.g. a segment the user added that is not a model class
            self.ui.editedVoxelsLabel.text = str(exc)
            return
        ml = self.logic.voxelVolumeMl(p.imageVolume)
        self.ui.editedVoxelsLabel.text = _("{edited} voxels edited ({ml:.2f} mL); {reviewed} voxels count as reviewed.").format(
            edited=edited, ml=edited * ml, reviewed=reviewed)

    # ---- submit ---------------------------------------------------------------------------------------------

    def onSubmit(self) -> None:
        p = self._parameterNode
        # Asked before the wait cursor goes up, so the question is not shown under it.
        if p.wholeCase and not slicer.util.confirmOkCancelDisplay(
                _("Submit as a final label? Every voxel of the case will be trusted as checked.")):
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot read the corrected segmentation."), waitCursor=True):
            corrected = self.logic.labelArrayFromSegmentation(p.segmentation, p.imageVolume)
            # A local copy first: if the backend is down, nothing the clinician did is lost.
            caseDir = self.logic.workDirectory() / "cases" / self.session.case.case_id
            self.logic.saveSegmentation(p.segmentation, caseDir / "corrected.seg.nrrd")
            # Named by its content: Submit again after a Cancel sends the same id, and the backend stores it once.
            pending = self.session.prepare_submission(corrected, whole_case=p.wholeCase)
        self._runInBackground(_("Submitting"), self.session.send_submission,
                              lambda revision: self._onSubmitted(pending, revision), pending)

    def _onSubmitted(self, pending, revision: dict) -> None:
        self.session.apply_submission(pending, revision)
        last = self.session.last_submission
        self.ui.submitStatusLabel.text = _(
            "Saved as revision {rev} ({kind}, {n} reviewed voxels, model {model}). Fetch the next case.").format(
            rev=revision.get("revision", "?"), kind=last["kind"], n=last["reviewed_voxels"],
            model=self.session.result.model_version)
        self.ui.submitStatusLabel.setStyleSheet("color: #1e8449;")

    def onUndoSubmit(self) -> None:
        last = self.session.last_submission
        if not slicer.util.confirmYesNoDisplay(
                _("Take revision {rev} of {case} out of training? It stays in the case's history, and training uses "
                  "the case as it was before this submission.").format(
                    rev=last["revision"].get("revision", "?"), case=self.session.case.case_id),
                windowTitle=_("SSLSegment")):
            return
        self._runInBackground(_("Withdrawing the submission"), self.session.withdraw_submission, self._onWithdrawn)

    def _onWithdrawn(self, exclusion: dict) -> None:
        self.ui.submitStatusLabel.text = _(
            "Revision {rev} withdrawn (exclusion {id}): training uses the case as before it. Fetch the next case.").format(
            rev=exclusion.get("revision", "?"), id=exclusion.get("id", "?"))
        self.ui.submitStatusLabel.setStyleSheet("")

    # ---- training and models --------------------------------------------------------------------------------

    def onStartTraining(self) -> None:
        self._runInBackground(_("Queueing a training job"), self.session.start_training, self._onTrainingQueued,
                              iterations=self._parameterNode.trainIterations)

    def _onTrainingQueued(self, job: dict) -> None:
        self._showJob(job)
        self._trainingTimer.start()

    def onStopTraining(self) -> None:
        self._runInBackground(_("Stopping the training job"), self.session.cancel_training, self._showJob)

    def _pollTraining(self) -> None:
        from SSLSegmentLib.review.tasks import BackgroundTask

        if self.session is None:
            self._trainingTimer.stop()
            return
        task = self._trainingTask
        if task is None:
            self._trainingTask = BackgroundTask(_("training status"), self.session.training_status)
            return
        if not task.done():
            return
        self._trainingTask = None
        job, error = task.outcome()
        if error is not None:
            self.ui.trainingStatusLabel.text = _("Cannot read the training status: {e}").format(e=error)
            return
        self._showJob(job)
        if job is None or job.get("status") in ("succeeded", "failed", "cancelled"):
            self._trainingTimer.stop()
            self._showModelVersion()
            self.onRefreshModels()

    def _showJob(self, job) -> None:
        from SSLSegmentLib.review.session import describe_job, job_fraction

        self.ui.trainingStatusLabel.text = describe_job(job)
        self.ui.trainingProgressBar.setRange(0, 100)
        self.ui.trainingProgressBar.value = int(round(100 * job_fraction(job)))
        self._updateButtonStates()

    def onRefreshModels(self) -> None:
        if self.session is None or self._task is not None:
            return
        self._runInBackground(_("Listing model versions"), self.session.models, self._fillModelsTable)

    def _fillModelsTable(self, models: list) -> None:
        table = self.ui.modelsTableWidget
        table.setRowCount(len(models))
        for row, model in enumerate(reversed(models)):  # newest first
            dice = (model.get("metrics") or {}).get("val_dice")
            trained = model.get("trained_on") or {}
            cells = (model["version"], "-" if dice is None else f"{dice:.3f}",
                     _("{l} labeled, {c} corrected").format(l=trained.get("n_labeled_cases", 0),
                                                             c=trained.get("n_corrected_cases", 0)),
                     "✓" if model.get("current") else "")
            for column, text in enumerate(cells):
                table.setItem(row, column, qt.QTableWidgetItem(text))
        self._updateButtonStates()

    def onUpdateModel(self) -> None:
        row = self.ui.modelsTableWidget.currentRow()
        if row < 0:
            return
        version = self.ui.modelsTableWidget.item(row, 0).text()
        if not slicer.util.confirmOkCancelDisplay(_("Use model {v} for all inference from now on?").format(v=version)):
            return
        self._runInBackground(_("Switching the model"), self.session.promote, lambda answer: (
            self._showModelVersion(), self.onRefreshModels()), version)


#
# SSLSegmentLogic
#


class InstallError(RuntimeError):
    """Dependencies could not be installed; `restartRequired` says whether restarting Slicer would help."""

    def __init__(self, message: str, restartRequired: bool = False):
        super().__init__(message)
        self.restartRequired = restartRequired


class SSLSegmentLogic(ScriptedLoadableModuleLogic, ReviewSceneLogic):
    """All MRML work of the module (inherited from ReviewSceneLogic, which runs on slicer.mrmlScene here), plus
    what only the application can do: the dependency check and the local backend.

    Usable without the widget, e.g. from the Python console:
        logic = slicer.util.getModuleLogic("SSLSegment")
        image = logic.showCase("/path/case.nrrd")
    """

    @staticmethod
    def torchSpecifier() -> str:
        """The version part of the backend's torch requirement, as PyTorch Util takes it (">=2.2")."""
        from SSLSegmentLib.review.requirements import TORCH_REQUIREMENT

        return TORCH_REQUIREMENT[len("torch"):].strip()

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        ReviewSceneLogic.__init__(self, scene=None)  # None: always the application's current scene

    def getParameterNode(self):
        return SSLSegmentParameterNode(super().getParameterNode())

    def getSegmentEditorNode(self):
        node = slicer.mrmlScene.GetSingletonNode("SSLSegment", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag("SSLSegment")
            node = slicer.mrmlScene.AddNode(node)
        return node

    def workDirectory(self) -> pathlib.Path:
        """Downloaded images, inference outputs and local copies of submissions (kept across sessions)."""
        folder = pathlib.Path(slicer.app.temporaryPath) / "SSLSegment"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # ---- dependencies ---------------------------------------------------------------------------------------

    def setupPythonRequirements(self, local: bool, askConfirmation: bool = True) -> bool:
        """Make sure what a mode needs is installed; ask before installing. Returns True if Slicer must restart.

        Remote mode needs nothing beyond Slicer (numpy, scipy and SimpleITK ship with it; the client is standard
        library). Local mode runs the backend with Slicer's Python: PyTorch (through the PyTorch extension, which
        picks the CUDA build for the GPU), MONAI, FastAPI and uvicorn.
        """
        from SSLSegmentLib.review.requirements import (
            LOCAL_BACKEND_REQUIREMENTS,
            TORCH_REQUIREMENT,
            missing_requirements,
            torch_status,
        )

        missing = missing_requirements(LOCAL_BACKEND_REQUIREMENTS) if local else []
        torchState, torchVersion = torch_status() if local else ("ok", None)
        if torchState == "old":
            # Replacing a torch that Slicer may have loaded needs a restart, and the build (CPU or which CUDA) is
            # the PyTorch extension's choice: say what to do rather than reinstall behind its back.
            raise InstallError(_("PyTorch {v} is installed; the local backend needs {req}. In the PyTorch Util "
                                 "module, set the version requirement to '{spec}', install, and restart Slicer.").format(
                v=torchVersion, req=TORCH_REQUIREMENT, spec=self.torchSpecifier()), restartRequired=True)
        needTorch = torchState == "missing"
        if not missing and not needTorch:
            return False
        listing = ", ".join((["torch (PyTorch)"] if needTorch else []) + missing)
        if askConfirmation and not slicer.app.commandOptions().testingEnabled:
            if not slicer.util.confirmOkCancelDisplay(
                    _("Running the backend on this computer needs these Python packages: {p}.\n\n"
                      "Install them now? This downloads several hundred MB and can take a few minutes.").format(p=listing),
                    windowTitle=_("SSLSegment")):
                raise InstallError(_("Installation cancelled; choose a remote server or install later."))
        if needTorch:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise InstallError(_("Install the PyTorch extension from the Extensions Manager, restart Slicer, "
                                     "and try again."), restartRequired=True) from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                with slicer.util.WaitCursor():
                    torch = torchLogic.installTorch(askConfirmation=False,
                                                    torchVersionRequirement=self.torchSpecifier())
                if torch is None:
                    raise InstallError(_("PyTorch was not installed."))
        alreadyImported = [r for r in missing if r.split(">")[0].split("=")[0].strip().lower() in sys.modules]
        if missing:
            with slicer.util.WaitCursor():  # only around the install: the questions above are asked without it
                slicer.util.pip_install(missing)
        still = missing_requirements(missing)
        if still:
            raise InstallError(_("Could not install: {p}").format(p=", ".join(still)))
        if alreadyImported:
            slicer.util.infoDisplay(_("Packages were updated that Slicer had already loaded ({p}). "
                                      "Restart Slicer before starting the backend.").format(p=", ".join(alreadyImported)))
            return True
        return False

    # ---- local backend --------------------------------------------------------------------------------------

    def createLocalBackend(self, datastore):
        """`sslsegment serve` + `worker` on 127.0.0.1 with Slicer's own Python and environment."""
        import shutil

        from SSLSegmentLib.review.local_backend import LocalBackend

        datastore = pathlib.Path(datastore).expanduser()
        if not str(datastore).strip() or datastore == pathlib.Path():
            raise ValueError(_("Choose a datastore folder for the local backend."))
        python = shutil.which("PythonSlicer") or sys.executable
        logs = self.workDirectory() / "local-backend-logs"
        # `python -m` puts its working folder first on sys.path: run in a folder of our own, not wherever Slicer was
        # started (which could hold some other `training/`).
        return LocalBackend(datastore, python=python, pythonpath=[LIBRARY_DIR, BACKEND_DIR],
                            env=slicer.util.startupEnvironment(), log_dir=logs, cwd=logs)


#
# SSLSegmentTest
#


class SSLSegmentTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (ctest: py_SSLSegment, or the Reload & Test button).

    test_ShortcutsOnlyInTheModule: the next/previous region keys exist only while the module is shown.
    test_ReviewLogic: the Logic on the application's scene with phantom data: heat overlay, segmentation import,
    review regions, slice jumps, the corrected label map and its reviewed mask, .seg.nrrd saved and loaded back
    through Slicer's own loader.
    test_ReviewSessionOnLocalBackend: a whole case against a local backend started with PythonSlicer, using the
    bundled phantom model (needs the local-mode packages; it says so and stops if they are missing).
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ShortcutsOnlyInTheModule()
        self.setUp()
        self.test_ReviewLogic()
        self.setUp()
        self.test_ReviewSessionOnLocalBackend()

    def test_ShortcutsOnlyInTheModule(self):
        """The region keys exist while the module is shown and are gone in another module."""
        self.delayDisplay("Region shortcuts only while the module is shown")
        slicer.util.selectModule("SSLSegment")
        widget = slicer.modules.sslsegment.widgetRepresentation().self()
        self.assertEqual(len(widget._shortcuts), 2)
        slicer.util.selectModule("Data")
        self.assertEqual(len(widget._shortcuts), 0)
        slicer.util.selectModule("SSLSegment")
        self.assertEqual(len(widget._shortcuts), 2)

    def _phantomCase(self, folder):
        import numpy as np

        from SSLSegmentLib.data.imageio import write_volume
        from SSLSegmentLib.data.phantoms import PhantomConfig, make_phantom
        from SSLSegmentLib.data.regions import find_review_regions

        image, label = make_phantom(11, PhantomConfig(shape=(24, 32, 32)))
        # A prediction that misses the target's last slices, and uncertainty high on its boundary band.
        predicted = label.array.copy()
        predicted[18:] = 0
        from scipy import ndimage

        band = ndimage.binary_dilation(label.array, iterations=1) ^ ndimage.binary_erosion(label.array, iterations=1)
        uncertainty = np.where(band, 0.8, 0.05).astype(np.float32)
        imagePath = write_volume(image, folder / "image.nrrd")
        regions, rankMap = find_review_regions(uncertainty, 0.5, geometry=image.geometry)
        return image, label, predicted, uncertainty, imagePath, regions, rankMap

    def test_ReviewLogic(self):
        import tempfile

        import numpy as np

        from SSLSegmentLib.review.session import InferenceResult, reviewed_mask

        self.delayDisplay("Review logic on a phantom")
        folder = pathlib.Path(tempfile.mkdtemp(prefix="SSLSegmentTest-"))
        image, label, predicted, uncertainty, imagePath, regions, rankMap = self._phantomCase(folder)
        self.assertGreater(len(regions), 0)

        result = InferenceResult("v0001", "selftest", None, image.like(predicted),
                                 {"entropy": image.like(uncertainty)}, "entropy", 0.5, regions, rankMap)
        logic = SSLSegmentLogic()
        imageNode = logic.showCase(imagePath, name="phantom")
        nodes = logic.showInference(result, imageNode, threshold=0.3, opacity=0.5)
        self.assertEqual(nodes["uncertainty"].GetDisplayNode().GetColorNodeID(), "vtkMRMLPETProceduralColorNodePET-Heat")
        redComposite = slicer.app.layoutManager().sliceWidget("Red").sliceLogic().GetSliceCompositeNode()
        self.assertEqual(redComposite.GetForegroundVolumeID(), nodes["uncertainty"].GetID())
        np.testing.assert_array_equal(logic.labelArrayFromSegmentation(nodes["segmentation"], imageNode), predicted)

        ras = logic.jumpToRegion(regions[0], imageNode)
        redSlice = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        np.testing.assert_allclose([redSlice.GetSliceToRAS().GetElement(i, 3) for i in range(3)], ras, atol=1e-3)
        logic.markRegionVisited(regions[0].rank)

        # The clinician restores the missing slices (what Paint does to the segment).
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            label.array, nodes["segmentation"], nodes["segmentation"].GetSegmentation().GetNthSegmentID(0), imageNode)
        corrected = logic.labelArrayFromSegmentation(nodes["segmentation"], imageNode)
        np.testing.assert_array_equal(corrected, label.array)
        mask = reviewed_mask(rankMap, {regions[0].rank}, predicted, corrected)
        np.testing.assert_array_equal(mask.astype(bool), (rankMap == regions[0].rank) | (predicted != label.array))

        segFile = logic.saveSegmentation(nodes["segmentation"], folder / "corrected.seg.nrrd")
        loaded = slicer.util.loadSegmentation(str(segFile))
        self.assertEqual(loaded.GetSegmentation().GetNthSegment(0).GetName(), "target")
        np.testing.assert_array_equal(logic.labelArrayFromSegmentation(loaded, imageNode), label.array)
        self.delayDisplay("Review logic passed")

    def test_ReviewSessionOnLocalBackend(self):
        import tempfile

        import numpy as np

        from SSLSegmentLib.review.requirements import LOCAL_BACKEND_REQUIREMENTS, missing_requirements
        from SSLSegmentLib.review.session import ReviewSession

        missing = missing_requirements(LOCAL_BACKEND_REQUIREMENTS + ("torch>=2.2",))
        if missing:  # reported as skipped, not as passed
            self.skipTest(f"local backend test not run: missing {', '.join(missing)} (install them from the "
                          "module's Backend section, Start on this computer)")
        self.delayDisplay("Whole case on a local backend with the bundled phantom model")
        folder = pathlib.Path(tempfile.mkdtemp(prefix="SSLSegmentTest-"))
        logic = SSLSegmentLogic()
        model = pathlib.Path(os.path.dirname(__file__)) / "Resources" / "Models" / "phantom-tiny.pt"
        local = logic.createLocalBackend(folder / "store")
        python, env = local.python, local.environment()
        import subprocess

        subprocess.check_call([python, "-m", "training.cli", "make-phantoms", str(folder / "phantoms"), "--train", "4",
                               "--val", "2", "--test", "0", "--shape", "24", "32", "32"], env=env)
        subprocess.check_call([python, "-m", "training.cli", "import-datastore", str(folder / "phantoms"),
                               "--datastore", str(folder / "store"), "--labels", "val", "--model", str(model)], env=env)
        backend = logic.createLocalBackend(folder / "store").start().wait_until_ready(timeout=180)
        try:
            session = ReviewSession(backend.client(), folder / "work", annotator="selftest")
            session.connect()
            case = session.fetch_next_case()
            self.assertIsNotNone(case)
            imageNode = logic.showCase(case.image_path, name=case.case_id)
            result = session.infer(passes=4)
            nodes = logic.showInference(result, imageNode)
            # The other map: the backend ranks its regions on the same inference, the scene shows them.
            session.recompute_regions(kind="mutual_information")
            shown = logic.showReviewRegions(result, imageNode)
            self.assertEqual(shown["regions"].GetNumberOfControlPoints(), len(result.regions))
            for _i in range(min(2, len(result.regions))):
                region = session.next_region()
                logic.jumpToRegion(region, imageNode)
            corrected = logic.labelArrayFromSegmentation(nodes["segmentation"], imageNode)
            corrected[0] = 0  # an edit
            if not session.visited and not np.any(corrected != result.label.array):
                corrected[0, 0, 0] = 1
            revision = session.submit(corrected)
            history = session.client.label_history(case.case_id)
            self.assertEqual(history[-1]["revision"], revision["revision"])
            self.assertEqual(history[-1]["kind"], "correction")
            self.assertEqual(history[-1]["model_version"], result.model_version)
            self.assertEqual(history[-1]["uncertainty_kind"], "mutual_information")
        finally:
            backend.stop()
        self.delayDisplay("Local backend session passed")
