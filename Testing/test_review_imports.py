"""What runs inside Slicer's Python imports without torch, MONAI or scipy, and the module's start-up pulls in no SimpleITK.

Slicer's Python has no torch or MONAI until the PyTorch extension and the local-backend packages are installed, so
every module of SSLSegmentLib.review must import without them. Each check runs in a fresh interpreter whose import
system refuses those packages (a meta-path finder that raises ModuleNotFoundError, as an absent package does), so a
module already imported by another test cannot hide a dependency. The package is walked with pkgutil: a new module
is covered without editing this file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "monai", "scipy")

BLOCKER = """
import sys

BLOCKED = {blocked!r}


class Absent:
    # Ahead of every other finder: the blocked packages and their submodules look uninstalled.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, Absent())
for name in list(sys.modules):
    if name.partition(".")[0] in BLOCKED:
        raise SystemExit(f"{{name}} was imported before the blocker was installed")
"""


def _run(body: str) -> dict:
    code = BLOCKER.format(blocked=BLOCKED) + body
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_blocker_makes_the_heavy_packages_absent():
    report = _run("""
import importlib, json
failed = {}
for name in ("torch", "monai.networks", "scipy.ndimage"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        failed[name] = str(exc)
print(json.dumps(failed))
""")
    assert sorted(report) == ["monai.networks", "scipy.ndimage", "torch"], report


def test_every_review_module_imports_without_torch_monai_or_scipy():
    pytest.importorskip("slicer")  # review/scene.py needs slicer and vtk (slicer-core provides both)
    report = _run("""
import importlib, json, pkgutil
import SSLSegmentLib.review as package
names = sorted(m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + "."))
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)}))
""")
    # The walk found the package's modules (not an empty list that would pass trivially).
    assert {"SSLSegmentLib.review.client", "SSLSegmentLib.review.session", "SSLSegmentLib.review.scene",
            "SSLSegmentLib.review.local_backend"} <= set(report["modules"]), report["modules"]
    assert report["loaded"] == []


def test_what_the_slicer_module_imports_at_start_up_pulls_in_no_simpleitk():
    """SSLSegment/SSLSegment.py imports SSLSegmentLib.review.scene when Slicer loads the module; SimpleITK (and the
    readers behind it) are for later, when a case is opened."""
    pytest.importorskip("slicer")
    report = _run("""
import json
import SSLSegmentLib.review.scene
print(json.dumps({"loaded": sorted(m for m in ("SimpleITK", "torch", "monai", "scipy", "fastapi", "training")
                                   if m in sys.modules)}))
""")
    assert report["loaded"] == []
