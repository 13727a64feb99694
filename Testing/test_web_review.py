"""The review page (`sslsegment review-web`) against a real backend (`sslsegment serve` + `worker`) on 127.0.0.1.

The page's workflow (`SSLSegmentLib.web.review.WebReview`) is driven directly on a slicer-core scene; the page
itself is driven in Debian's Chromium (headless, through Playwright) against the web server started by its own
command: open, fetch the next case, run, visit two regions, paint a stroke over one, reload, submit. The stored
revision is then read back from the backend: its reviewed mask must be exactly the visited regions plus the edited
voxels, and a screenshot must show the heat map where the map is hot.

Screenshots go to $SSLSEGMENT_SCREENSHOTS (default: the test's temporary folder). Without Chromium, Playwright or
trame-slicer the browser test is skipped with the reason; the rest still runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_NET, TINY_PATCH, bundled_model_backend
from SSLSegmentLib.data.imageio import read_label, read_volume
from SSLSegmentLib.review import defaults
from SSLSegmentLib.review.client import SSLSegmentClient
from SSLSegmentLib.review.local_backend import free_port
from SSLSegmentLib.review.session import ReviewSession, SessionState
from SSLSegmentLib.web.access import (
    COOKIE_NAME,
    PageAccess,
    create_page_token,
    is_loopback,
    read_token_file,
)

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# What runs headless Chromium in a container without a GPU (docs/web.md, "Testing").
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TRAIN = {"network": TINY_NET, "patch_size": list(TINY_PATCH), "iterations": 20, "val_interval": 10,
         "batch_labeled": 2, "batch_unlabeled": 2, "device": "cpu"}
PASSES = 2


# ---- the access rules (no server) -------------------------------------------------------------------------------


def test_loopback_hosts_and_the_page_access_rule(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    with pytest.raises(ValueError, match="host"):
        is_loopback("")

    assert PageAccess(None).decide(None, None) == "allow"  # loopback: nothing to present
    path = tmp_path / "page-token"
    token = create_page_token(path)
    assert read_token_file(path) == token and (path.stat().st_mode & 0o777) == 0o600
    assert create_page_token(path) != token  # a restart never honours a link handed out before
    access = PageAccess(token)
    assert access.decide(None, None) == "deny"
    assert access.decide("wrong", None) == "deny" and access.decide(None, "wrong") == "deny"
    assert access.decide(token, None) == "set-cookie" and access.decide(None, token) == "allow"
    with pytest.raises(ValueError, match="16"):
        PageAccess("short")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="one token"):
        read_token_file(tmp_path / "empty")


def test_run_and_display_options_are_checked_before_anything_is_sent():
    pytest.importorskip("slicer")
    from SSLSegmentLib.web.review import HeatmapDisplay, RunOptions

    assert RunOptions().passes == defaults.PASSES and RunOptions().threshold == defaults.REGION_THRESHOLD
    with pytest.raises(ValueError, match="passes"):
        RunOptions(passes=0)
    with pytest.raises(ValueError, match="region threshold"):
        RunOptions(threshold=0.99)
    with pytest.raises(ValueError, match="uncertainty must be one of"):
        RunOptions(kind="variance")
    assert HeatmapDisplay().threshold == defaults.HEATMAP_THRESHOLD
    with pytest.raises(ValueError, match="opacity"):
        HeatmapDisplay(opacity=1.5)


# ---- a real backend --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend(tmp_path_factory, tiny_dataset):
    """serve + worker on phantoms with the bundled model as v0001 (two labeled train cases; six to review)."""
    with bundled_model_backend(tmp_path_factory.mktemp("web"), tiny_dataset, TRAIN) as local:
        yield local


def _threshold_with_regions(client: SSLSegmentClient, case_id: str, folder: Path, n: int = 2) -> float:
    """A region threshold at which the model's map of `case_id` has at least `n` review regions (a small model is
    unsure along one connected shell at some thresholds, which only others break into pieces)."""
    low, high = defaults.REGION_THRESHOLD_RANGE
    # Hot thresholds first, so the regions are where the heat map is clearly coloured (the server only re-ranks).
    for threshold in (0.5, 0.4, 0.6, 0.3, 0.7, 0.8, 0.9, high, 0.2, 0.1, low):
        if len(client.infer(case_id, folder, passes=PASSES, threshold=threshold)["regions"]) >= n:
            return threshold
    pytest.fail(f"no threshold gives {n} review regions on {case_id}")


def _backend_output(client: SSLSegmentClient, case_id: str, threshold: float, folder: Path):
    """The model's label and region map for the case as the backend serves them (its cached inference)."""
    answer = client.infer(case_id, folder, passes=PASSES, threshold=threshold)
    assert answer["cached"]
    return answer, read_label(answer["paths"]["label"]).array, read_volume(answer["paths"]["regions"]).array


# ---- the page's workflow, without a browser ---------------------------------------------------------------------


def test_the_page_workflow_on_a_scene(backend, tmp_path):
    """WebReview on a slicer-core scene: the same session, scene logic and presenter rules as the Slicer panel."""
    pytest.importorskip("slicer")
    from SSLSegmentLib.review.scene import ReviewSceneLogic, new_headless_scene
    from SSLSegmentLib.web.review import RunOptions, WebReview

    scene, app_logic = new_headless_scene()
    session = ReviewSession(backend.client(), tmp_path, annotator="bob")
    review = WebReview(session, ReviewSceneLogic(scene))

    def act(action, on=review):
        return asyncio.run(on.perform(*action))

    page = review.page()
    assert page["controls"]["connect"] and not page["controls"]["next_case"]
    assert act(review.connect()) and "model v0001" in review.status and review.page()["model_version"] == "v0001"

    # A 4xx reaches the page verbatim, and the review stays where it was.
    assert not act(review.open_case("no-such-case"))
    assert review.error.startswith("Opening case no-such-case failed: ") and "no-such-case" in review.error
    assert session.state == SessionState.CONNECTED

    assert act(review.list_cases()) and len(review.page()["cases"]) == 12
    assert act(review.fetch_next_case())
    case_id = session.case.case_id
    assert review.page()["case"].startswith(case_id) and review.image_node is not None
    threshold = _threshold_with_regions(session.client, case_id, tmp_path / "probe")
    assert act(review.run(RunOptions(passes=PASSES, threshold=threshold)))
    page = review.page()
    assert page["controls"]["submit"] and len(page["regions"]) >= 2 and page["reviewed_model"] == "v0001"
    assert review.uncertainty_node is not None and review.segmentation_node is not None

    # Visiting centres and zooms the slice views on the region.
    red = next(n for n in review.scene.sliceNodes() if n.GetName() == "Red")
    red.SetFieldOfView(200.0, 100.0, 1.0)
    region = review.visit(1)
    assert region.rank == 2 and review.page()["regions"][1]["visited"] and review.page()["regions"][1]["current"]
    width, height, _ = red.GetFieldOfView()
    assert width / height == pytest.approx(2.0) and height < 100.0
    ras = review.scene.regionCentreRas(region, review.image_node)
    np.testing.assert_allclose(red.GetSliceToRAS().GetElement(2, 3), ras[2], atol=2.0)
    assert review.page()["reviewed_voxels"] == region.voxel_count and review.page()["edited_voxels"] == 0

    # Moving on with a visited region asks first (the presenter's rule).
    assert "1 visited region" in review.discard_question()

    # Heat map display: the same display-node calls as the panel's sliders.
    review.set_heatmap(threshold=0.4, opacity=0.3, visible=False)
    display = review.uncertainty_node.GetDisplayNode()
    assert display.GetLowerThreshold() == pytest.approx(0.4)
    assert all(c.GetForegroundVolumeID() is None for c in review.scene.sliceCompositeNodes())
    review.set_heatmap(visible=True)
    assert all(c.GetForegroundVolumeID() == review.uncertainty_node.GetID()
               and c.GetForegroundOpacity() == pytest.approx(0.3) for c in review.scene.sliceCompositeNodes())

    assert act(review.submit()) and "Saved as revision" in review.submit_text
    stored = session.client.label_history(case_id)[-1]
    assert stored["kind"] == "correction" and stored["author"] == "bob" and stored["reviewed_voxels"] == region.voxel_count
    assert str(backend.token) not in json.dumps(review.page())

    # A case picked from the list, then given back.
    other = next(c["value"] for c in review.cases if c["value"] != case_id)
    assert act(review.open_case(other)) and session.case.case_id == other and session.state == SessionState.CASE_LOADED
    assert review.page()["case"].startswith(other) and review.segmentation_node is None
    assert act(review.skip_case()) and session.state == SessionState.CONNECTED and review.image_node is None

    # Unreachable backend: the page says so and how to go on.
    down = WebReview(ReviewSession(SSLSegmentClient(f"http://127.0.0.1:{free_port()}", retries=1, timeout=2),
                                   tmp_path / "down"), ReviewSceneLogic(scene))
    assert not act(down.connect(), on=down)
    assert "Connecting failed" in down.error and "cannot be reached" in down.hint
    assert down.session.state == SessionState.DISCONNECTED
    del app_logic


# ---- the page in a browser ---------------------------------------------------------------------------------------


def _get(url: str, cookie: str | None = None):
    request = urllib.request.Request(url, headers={"Cookie": f"{COOKIE_NAME}={cookie}"} if cookie else {})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=10) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


@pytest.fixture(scope="module")
def web(backend, tmp_path_factory):
    """`sslsegment review-web` on 127.0.0.1 with the page token required (as beyond loopback)."""
    pytest.importorskip("trame_slicer", reason="the review page needs trame-slicer[standalone] (pip install "
                                               "'sslsegment[web]')")
    folder = tmp_path_factory.mktemp("review-web")
    token_file = folder / "backend-token"
    token_file.write_text(backend.token + "\n")
    token_file.chmod(0o600)
    page_token_file = folder / "page-token"
    port = free_port()
    log_path = folder / "review-web.log"
    cmd = [sys.executable, "-m", "training.cli", "review-web", "--backend", backend.base_url,
           "--token-file", str(token_file), "--port", str(port), "--annotator", "web-tester",
           "--work-dir", str(folder / "work"), "--require-page-token", "--page-token-file", str(page_token_file)]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            try:
                status, _ = _get(url)
                break
            except OSError:
                assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
                time.sleep(0.3)
        yield {"url": url, "page_token": read_token_file(page_token_file), "log": log_path,
               "backend_token": backend.token}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_page_needs_its_token_and_the_server_holds_the_backend_token(web):
    url, token = web["url"], web["page_token"]
    assert _get(url)[0] == 403 and _get(url + "?access=wrong")[0] == 403
    status, headers = _get(url + "?access=" + token)
    assert status == 302 and headers["Location"] == "/"  # the token leaves the address bar
    assert f"{COOKIE_NAME}={token}" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]
    assert _get(url + "index.html", cookie=token)[0] == 200 and _get(url + "index.html")[0] == 403
    log = web["log"].read_text(errors="replace")
    assert token not in log and web["backend_token"] not in log  # the command names the token's file, not it


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright "
                                                                 "(pip install 'sslsegment[test]')")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (`apt-get install -y chromium`)")
    manager = sync_api.sync_playwright().start()
    try:
        instance = manager.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
    except Exception as exc:
        manager.stop()
        pytest.skip(f"Chromium at {CHROMIUM} does not start under Playwright: {exc}")
    yield instance
    instance.close()
    manager.stop()


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("SSLSEGMENT_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _rgb(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def _hot(rgb: np.ndarray) -> np.ndarray:
    """Pixels tinted by the heat ramp (PET-Heat: red, orange, yellow) over a grey image: red well above blue and
    green above blue; the segmentation's red-orange fill has little green, so it does not count."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (r - b > 60) & (g - b > 40)


def _shoot_until(page, path: Path, clip: dict, ready, timeout: float = 20.0) -> np.ndarray:
    """Screenshots of `clip` until `ready(pixels)` holds or `timeout` s pass; the last one's pixels."""
    deadline = time.monotonic() + timeout
    while True:
        page.screenshot(path=str(path), clip=clip)
        rgb = _rgb(path)
        if ready(rgb) or time.monotonic() > deadline:
            return rgb
        time.sleep(0.3)


def test_review_in_the_browser(backend, web, browser, shots, tmp_path):
    started = time.monotonic()
    client = backend.client()
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    frames: list[str] = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: frames.append(
        payload if isinstance(payload, str) else payload.decode("latin-1"))))

    assert page.goto(web["url"]).status == 403
    page.goto(web["url"] + "?access=" + web["page_token"])
    assert "access=" not in page.url
    page.click("#connect")
    page.wait_for_function("document.querySelector('#model-version').innerText.includes('v0001')", timeout=30000)

    page.click("#fetch-next")
    page.wait_for_function("!document.querySelector('#case').innerText.startsWith('No case')", timeout=30000)
    case_id = page.inner_text("#case").split(" ")[0]
    threshold = _threshold_with_regions(client, case_id, tmp_path / "probe")
    page.fill("#run-passes", str(PASSES))
    page.fill("#run-threshold", str(threshold))
    page.click("#run")
    page.wait_for_selector("#region-2", timeout=60000)
    answer, predicted, rank_map = _backend_output(client, case_id, threshold, tmp_path / "output")

    for rank in (1, 2):
        page.click(f"#region-{rank}")
        page.wait_for_function(f"document.querySelector('#region-{rank} .visited-mark').innerText.includes('✓')",
                               timeout=10000)

    # The heat map: hot where the map is hot (region 2, now at the view's centre), gone when hidden. The views
    # stream new images a moment after each change, so each picture is retaken until it shows the change.
    axial = page.query_selector_all("#views img")[0].bounding_box()
    clip = {k: axial[k] for k in ("x", "y", "width", "height")}
    centre = tuple(slice(int(n * 0.4), int(n * 0.6)) for n in (int(axial["height"]), int(axial["width"])))
    on = _shoot_until(page, shots / "heat-on.png", clip, lambda rgb: _hot(rgb[centre]).mean() > 0.2)
    page.screenshot(path=str(shots / "web-review.png"))
    page.click("#heat-visible")
    off = _shoot_until(page, shots / "heat-off.png", clip, lambda rgb: 5 * max(1, _hot(rgb).sum()) < _hot(on).sum())
    page.click("#heat-visible")
    assert _hot(on[centre]).mean() > 0.2, "the heat map should colour the visited region"
    assert _hot(on).sum() > 5 * max(1, _hot(off).sum()), "hiding the heat map should take its colours away"

    # A stroke over region 2, on the axial slice through its centre (where the views now are): Paint where the
    # model left the region's surroundings on that slice mostly background, else Erase, so the stroke changes voxels.
    region = next(r for r in answer["regions"] if r["rank"] == 2)
    k = int(round(region["centroid_ijk"][2]))
    (i0, j0, _), (i1, j1, _) = region["bbox_min_ijk"], region["bbox_max_ijk"]
    near = np.zeros(predicted.shape, bool)
    near[max(0, k - 1):k + 2, max(0, j0 - 3):j1 + 4, max(0, i0 - 3):i1 + 4] = True
    around = predicted[k, max(0, j0 - 1):j1 + 2, max(0, i0 - 1):i1 + 2]
    effect = "mdi-brush" if (around == 0).mean() >= 0.5 else "mdi-eraser"
    page.click(f"#editor button:has(.{effect})")
    time.sleep(0.5)
    # The view is zoomed on the region (its box a third of the view): a raster over the middle third covers it.
    x, y = axial["x"] + axial["width"] / 2, axial["y"] + axial["height"] / 2
    half = min(axial["width"], axial["height"]) * 0.15
    page.mouse.move(x - half, y - half)
    page.mouse.down()
    for row in range(5):
        yy = y - half + row * half / 2
        page.mouse.move(x - half if row % 2 else x + half, yy, steps=6)
        page.mouse.move(x + half if row % 2 else x - half, yy, steps=6)
    page.mouse.up()
    page.wait_for_function("/^[1-9][0-9]* voxels edited/.test(document.querySelector('#edit-count').innerText)",
                           timeout=15000)
    counted = page.inner_text("#edit-count")

    # The edit lives on the web server: a reload shows it, and Submit sends it.
    page.reload()
    page.wait_for_selector("#submit", timeout=30000)
    page.wait_for_function(f"document.querySelector('#edit-count').innerText === {json.dumps(counted)}", timeout=15000)
    page.click("#submit")
    page.wait_for_function("document.querySelector('#submit-text').innerText.includes('Saved as revision')",
                           timeout=30000)
    page.screenshot(path=str(shots / "web-review-submitted.png"))
    seconds = time.monotonic() - started

    stored = client.label_history(case_id)[-1]
    assert stored["kind"] == "correction" and stored["author"] == "web-tester"
    assert stored["model_version"] == "v0001" and stored["uncertainty_kind"] == "entropy"
    assert stored["threshold"] == pytest.approx(threshold)
    label = read_label(client.download_label(case_id, stored["revision"], tmp_path / "back" / "label.nrrd")).array
    mask = read_volume(client.download_label(case_id, stored["revision"], tmp_path / "back" / "mask.nrrd",
                                             "reviewed_mask")).array.astype(bool)
    edited = label != predicted
    assert edited.any() and not (edited & ~near).any(), "the stroke should change voxels at region 2, nowhere else"
    expected = np.isin(rank_map, [1, 2]) | edited
    np.testing.assert_array_equal(mask, expected)
    assert stored["reviewed_voxels"] == int(expected.sum())
    assert f"{int(edited.sum())} voxels edited" in counted

    # The backend token never reached the browser: not in the page, not in any websocket message.
    assert frames and all(web["backend_token"] not in f for f in frames)
    assert web["backend_token"] not in page.content()
    page.close()
    print(f"browser review: {seconds:.1f} s")
