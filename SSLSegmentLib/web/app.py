"""The review page: trame layout and state bindings around `WebReview` (the workflow) and trame-slicer (the views and
the Segment Editor). Rendering is Slicer's own displayable managers, on the server, streamed to the page as images;
the browser holds no image data, no segmentation and no token.

Thin on purpose: every decision (what is enabled, what a click would discard, what a failure says) is `WebReview`'s
or the review presenter's; this module only binds them to widgets and runs actions off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from trame.app import TrameApp
from trame.ui.vuetify3 import VAppLayout
from trame.widgets import html
from trame.widgets import vuetify3 as v
from trame_slicer.app.logic.segmentation import SegmentEditorLogic
from trame_slicer.app.ui import SegmentEditorUI
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

from SSLSegmentLib.data.contract import UNCERTAINTY_KINDS
from SSLSegmentLib.review import defaults
from SSLSegmentLib.review.scene import ReviewSceneLogic
from SSLSegmentLib.review.session import ReviewSession
from SSLSegmentLib.web.access import PageAccess, page_access_middleware
from SSLSegmentLib.web.review import RunOptions, WebReview

log = logging.getLogger(__name__)

SLICES_LAYOUT = "Slices"
SLICES_3D_LAYOUT = "Slices and 3D"
# Recount edited voxels this long after the last stroke, not on every brush move.
RECOUNT_DELAY_S = 0.3
TRAINING_POLL_S = 2.0


def _layouts() -> dict[str, Layout]:
    axial, coronal = ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view()
    sagittal, threed = ViewLayoutDefinition.sagittal_view(), ViewLayoutDefinition.threed_view()
    return {
        SLICES_LAYOUT: Layout(LayoutDirection.Horizontal, [axial, Layout(LayoutDirection.Vertical, [sagittal, coronal])],
                              flex_sizes=["2", "1"]),
        SLICES_3D_LAYOUT: Layout(LayoutDirection.Horizontal,
                                 [axial, Layout(LayoutDirection.Vertical, [threed, sagittal, coronal])],
                                 flex_sizes=["2", "1"]),
    }


class ReviewWebApp(TrameApp):
    """The review page of one web server, for one reviewer.

    session: the `ReviewSession` on the backend (its client holds the backend token). access: the page's access
    rule (`PageAccess(None)` on loopback). server: a trame server (default: a new one).
    """

    def __init__(self, session: ReviewSession, access: PageAccess | None = None, server=None):
        super().__init__(server)
        self.access = access or PageAccess(None)
        self.slicer = SlicerApp()
        register_rca_factories(self.slicer.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer.scene, self.slicer.view_manager, self.server)
        layouts = _layouts()
        self.layout_manager.register_layout(SLICES_LAYOUT, layouts[SLICES_LAYOUT])
        # The 3D view is made only when asked for: on two cores every extra view costs rendering time.
        self.layout_manager.register_layout(SLICES_3D_LAYOUT, layouts[SLICES_3D_LAYOUT], lazy_initialization=True)
        self.layout_manager.set_layout(SLICES_LAYOUT)
        self.editor_logic = SegmentEditorLogic(self.server, self.slicer)
        self.review = WebReview(session, ReviewSceneLogic(self.slicer.scene), on_segmentation=self._edit_segmentation,
                                on_case=self._case_shown)
        self.slicer.segmentation_editor.segmentation_modified.connect(self._segmentation_modified)
        self._recount_handle = None
        self._poll_task = None
        self._pending_action: str | None = None
        self.server.controller.on_server_bind.add(self._bind_access_check)
        self._init_state()
        self._build_ui()
        self._push()

    # ---- access ---------------------------------------------------------------------------------------------

    def _bind_access_check(self, wslink_server) -> None:
        # Before the server starts, so the check covers the page, its assets and the websocket alike.
        wslink_server.app.middlewares.append(page_access_middleware(self.access))

    # ---- state ----------------------------------------------------------------------------------------------

    def _init_state(self) -> None:
        s = self.state
        s.trame__title = "SSLSegment review"
        s.strategy = "uncertainty"
        s.picked_case = None
        s.run_passes = defaults.PASSES
        s.run_kind = UNCERTAINTY_KINDS[0]
        s.run_threshold = defaults.REGION_THRESHOLD
        s.heat_threshold = self.review.display.threshold
        s.heat_opacity = self.review.display.opacity
        s.heat_visible = self.review.display.visible
        s.train_iterations = defaults.TRAIN_ITERATIONS
        s.view_layout = SLICES_LAYOUT
        s.confirm_text = ""
        s.page = {}
        s.change("heat_threshold", "heat_opacity", "heat_visible")(self._heatmap_changed)
        s.change("view_layout")(self._layout_changed)

    def _push(self) -> None:
        with self.state:
            self.state.page = self.review.page()

    # ---- actions --------------------------------------------------------------------------------------------

    async def _act(self, make_action) -> None:
        """Build an action (its description, network half, apply half) and run it; errors go to the page."""
        try:
            description, network, apply = make_action()
        except Exception as exc:  # refused before anything is sent (bad input, nothing reviewed, ...)
            self.review.fail("This step", exc)
            self._push()
            return
        task = asyncio.ensure_future(self.review.perform(description, network, apply))
        await asyncio.sleep(0)  # let perform mark the review busy before the page is told
        self._push()
        await task
        self._push()
        self._follow_training()

    async def connect(self):
        await self._act(self.review.connect)

    async def refresh_cases(self):
        await self._act(self.review.list_cases)

    async def _guarded(self, name: str, make_action):
        """Ask first when the action would discard unsubmitted edits or visited regions."""
        question = self.review.discard_question()
        if question and self._pending_action != name:
            self._pending_action = name
            with self.state:
                self.state.confirm_text = question
            return
        self._pending_action = None
        with self.state:
            self.state.confirm_text = ""
        await self._act(make_action)

    async def next_case(self):
        await self._guarded("next_case", lambda: self.review.fetch_next_case(self.state.strategy))

    async def open_picked_case(self):
        picked = self.state.picked_case
        if not picked:
            self.review.fail("Opening a case", ValueError("pick a case from the list first"))
            self._push()
            return
        await self._guarded("open_case", lambda: self.review.open_case(picked))

    async def skip_case(self):
        await self._guarded("skip_case", self.review.skip_case)

    async def run(self):
        def make():
            return self.review.run(RunOptions(int(self.state.run_passes), self.state.run_kind,
                                              float(self.state.run_threshold)))
        await self._guarded("run", make)

    async def submit(self):
        await self._act(self.review.submit)

    async def start_training(self):
        await self._act(lambda: self.review.start_training(int(self.state.train_iterations)))

    async def confirm_discard(self):
        name = self._pending_action
        handlers = {"next_case": self.next_case, "open_case": self.open_picked_case, "skip_case": self.skip_case,
                    "run": self.run}
        if name in handlers:
            await handlers[name]()

    def keep_case(self):
        self._pending_action = None
        with self.state:
            self.state.confirm_text = ""

    def visit(self, index):
        self._step_region(lambda: self.review.visit(int(index)))

    def next_region(self):
        self._step_region(self.review.next_region)

    def previous_region(self):
        self._step_region(self.review.previous_region)

    def _step_region(self, step) -> None:
        try:
            step()
        except Exception as exc:
            self.review.fail("Visiting a region", exc)
        self._push()

    # ---- views and the Segment Editor -----------------------------------------------------------------------

    def _case_shown(self, image_node) -> None:
        self.slicer.segmentation_editor.deactivate_effect()
        if image_node is not None:
            self.slicer.display_manager.reset_views()

    def _edit_segmentation(self, segmentation_node, image_node) -> None:
        """Put the Segment Editor on the model's segmentation, its first class segment active."""
        editor = self.slicer.segmentation_editor
        editor.deactivate_effect()
        editor.set_active_segmentation(segmentation_node, image_node)
        editor.set_surface_representation_enabled(self.state.view_layout == SLICES_3D_LAYOUT)
        ids = self.review.scene.segmentIdsInClassOrder(segmentation_node)
        if ids:
            editor.set_active_segment_id(ids[0])
        self.slicer.display_manager.reset_views()

    def _segmentation_modified(self, *_args) -> None:
        if self._recount_handle is not None:
            self._recount_handle.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # before the server runs (the editor's own set-up)
        self._recount_handle = loop.call_later(RECOUNT_DELAY_S, self._recount)

    def _recount(self) -> None:
        self._recount_handle = None
        self.review.recount()
        self._push()

    def _heatmap_changed(self, heat_threshold, heat_opacity, heat_visible, **_):
        try:
            self.review.set_heatmap(float(heat_threshold), float(heat_opacity), bool(heat_visible))
        except (TypeError, ValueError) as exc:
            self.review.fail("Changing the heat map", exc)
        self._push()

    def _layout_changed(self, view_layout, **_):
        self.layout_manager.set_layout(view_layout)
        self.slicer.segmentation_editor.set_surface_representation_enabled(view_layout == SLICES_3D_LAYOUT)

    # ---- training -------------------------------------------------------------------------------------------

    def _follow_training(self) -> None:
        if self.review.training_active() and (self._poll_task is None or self._poll_task.done()):
            self._poll_task = asyncio.ensure_future(self._poll_training())

    async def _poll_training(self) -> None:
        while self.review.training_active():
            await asyncio.sleep(TRAINING_POLL_S)
            try:
                await asyncio.to_thread(self.review.poll_training)
            except Exception as exc:
                self.review.fail("Reading the training status", exc)
                self._push()
                return
            self._push()

    # ---- layout ---------------------------------------------------------------------------------------------

    def _build_ui(self) -> None:
        with VAppLayout(self.server, full_height=True, theme="dark") as self.ui:
            with html.Div(style="display: flex; flex-direction: row; height: 100vh; width: 100vw;"):
                with html.Div(style="width: 380px; min-width: 380px; overflow-y: auto; padding: 8px;",
                              id="panel"):
                    self._build_panel()
                with html.Div(style="flex: 1; display: flex; min-width: 0;", id="views"):
                    self.layout_manager.initialize_layout_grid(self.ui)
            self._build_confirm_dialog()

    def _button(self, text: str, handler, control: str, element_id: str, **kwargs):
        return v.VBtn(text, click=handler, id=element_id, disabled=(f"!page.controls || !page.controls.{control}",),
                      size="small", classes="ma-1", **kwargs)

    def _build_panel(self) -> None:
        html.Div("SSLSegment review", classes="text-h6")
        html.Div("{{ page.status }}", id="status", classes="text-body-2 my-1")
        v.VProgressLinear(indeterminate=True, v_show=("page.busy",), color="primary")
        v.VAlert(text=("page.error + (page.hint ? ' ' + page.hint : '')",), v_show=("page.error",), type="error",
                 density="compact", id="error", classes="my-1")

        with v.VCard(title="Backend", variant="tonal", density="compact", classes="my-2"):
            with v.VCardText():
                html.Div("{{ page.backend_url }} as {{ page.annotator }}")
                html.Div("Current model: {{ page.model_version || 'none' }}", id="model-version")
                self._button("Connect", self.connect, "connect", "connect")

        with v.VCard(title="Case", variant="tonal", density="compact", classes="my-2"):
            with v.VCardText():
                html.Div("{{ page.case }}", id="case")
                v.VSelect(v_model=("strategy",), items=("['uncertainty', 'random']",), label="Next case by",
                          density="compact", hide_details=True)
                self._button("Fetch next case", self.next_case, "next_case", "fetch-next")
                self._button("Skip case", self.skip_case, "skip_case", "skip-case")
                with html.Div(classes="d-flex flex-row align-center"):
                    v.VSelect(v_model=("picked_case",), items=("page.cases",), label="Or pick a case",
                              density="compact", hide_details=True, id="pick-case")
                    v.VBtn(icon="mdi-refresh", click=self.refresh_cases, size="small", variant="text",
                           disabled=("!page.controls || !page.controls.next_case",), id="refresh-cases")
                self._button("Open case", self.open_picked_case, "next_case", "open-case")

        with v.VCard(title="Model output", variant="tonal", density="compact", classes="my-2"):
            with v.VCardText():
                with html.Div(classes="d-flex flex-row"):
                    v.VTextField(v_model=("run_passes",), label="Passes", type="number", density="compact",
                                 hide_details=True, id="run-passes", classes="mr-1")
                    v.VTextField(v_model=("run_threshold",), label="Region threshold", type="number", step="0.01",
                                 density="compact", hide_details=True, id="run-threshold")
                v.VSelect(v_model=("run_kind",), items=(repr(list(UNCERTAINTY_KINDS)),), label="Uncertainty map",
                          density="compact", hide_details=True)
                self._button("Run", self.run, "run", "run")
                html.Div("Reviewing the output of model {{ page.reviewed_model }}", v_show=("page.reviewed_model",))
                v.VCheckbox(v_model=("heat_visible",), label="Heat map visible", density="compact",
                            hide_details=True, id="heat-visible")
                v.VSlider(v_model=("heat_threshold",), label="Hide below", min=defaults.HEATMAP_THRESHOLD_RANGE[0],
                          max=defaults.HEATMAP_THRESHOLD_RANGE[1], step=0.01, density="compact", hide_details=True,
                          thumb_label=True)
                v.VSlider(v_model=("heat_opacity",), label="Opacity", min=0.0, max=1.0, step=0.05,
                          density="compact", hide_details=True, thumb_label=True)
                v.VSelect(v_model=("view_layout",), items=(repr([SLICES_LAYOUT, SLICES_3D_LAYOUT]),), label="Views",
                          density="compact", hide_details=True)

        with v.VCard(title="Review regions", variant="tonal", density="compact", classes="my-2"):
            with v.VCardText():
                html.Div("{{ page.region_text }}", id="region-text")
                self._button("Previous", self.previous_region, "previous_region", "previous-region")
                self._button("Next", self.next_region, "next_region", "next-region")
                with v.VTable(density="compact", height="180px", fixed_header=True):
                    with html.Thead(), html.Tr():
                        for heading in ("#", "mL", "mean unc.", "visited"):
                            html.Th(heading)
                    with html.Tbody():
                        with html.Tr(v_for="row in page.regions", key="row.rank", id=("'region-' + row.rank",),
                                     click=(self.visit, "[row.index]"), style="cursor: pointer;",
                                     classes=("{'bg-primary': row.current}",)):
                            html.Td("{{ row.rank }}")
                            html.Td("{{ row.ml }}")
                            html.Td("{{ row.uncertainty }}")
                            html.Td("{{ row.visited ? '✓' : '' }}", classes="visited-mark")

        with v.VCard(title="Correct", variant="tonal", density="compact", classes="my-2", id="editor"):
            with v.VCardText():
                html.Div("{{ page.count_text }}", id="edit-count")
                with html.Div(classes="d-flex flex-row"):
                    self.editor_ui_undo = html.Div(classes="d-flex flex-row", id="undo-redo")
                with html.Div(style="height: 420px;"):
                    self.editor_ui = SegmentEditorUI()
                with self.editor_ui_undo:
                    self.editor_ui.build_undo_redo_buttons()
                self.editor_logic.set_ui(self.editor_ui)
                self._button("Submit", self.submit, "submit", "submit", color="primary")
                html.Div("{{ page.submit_text }}", id="submit-text")

        with v.VCard(title="Training", variant="tonal", density="compact", classes="my-2"):
            with v.VCardText():
                html.Div("{{ page.job_text }}", id="job-text")
                v.VProgressLinear(model_value=("page.job_fraction",), height=6, classes="my-1")
                v.VTextField(v_model=("train_iterations",), label="Iterations", type="number", density="compact",
                             hide_details=True)
                self._button("Start training", self.start_training, "start_training", "start-training")

    def _build_confirm_dialog(self) -> None:
        with v.VDialog(model_value=("!!confirm_text",), persistent=True, max_width=480):
            with v.VCard(title="Unsubmitted work", id="confirm"):
                v.VCardText("{{ confirm_text }}")
                with v.VCardActions():
                    v.VBtn("Keep the case", click=self.keep_case, id="confirm-keep")
                    v.VBtn("Discard", click=self.confirm_discard, color="error", id="confirm-discard")

    # ---- running --------------------------------------------------------------------------------------------

    def serve(self, host: str = "127.0.0.1", port: int = 8080) -> None:
        """Serve the page (blocking) until interrupted."""
        # trame parses the process's command line again; ours is already parsed and would only confuse it.
        sys.argv = sys.argv[:1]
        self.server.start(host=host, port=port, open_browser=False, show_connection_info=False, timeout=0)


__all__ = ["ReviewWebApp", "SLICES_3D_LAYOUT", "SLICES_LAYOUT"]
