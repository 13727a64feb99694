"""Every Slicer name the module and its MRML logic use exists: checked against slicer-core, or listed below.

The module file (SSLSegment/SSLSegment.py) and the MRML adapter (SSLSegmentLib/review/scene.py) are parsed, not
imported. Each `slicer.util.<fn>` must exist in slicer-core's slicer.util and accept the arguments it is given;
each `slicer.vtkMRML*` / `vtkSlicer*` / `vtkSegmentation*` class (and the attribute used on it) must exist in
slicer-core; each MRML class named in a string (AddNewNodeByClass("vtkMRML...")) too. Names that only the
application defines are allowed only if listed in APPLICATION_ONLY with the Slicer source file that defines them.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")
slicer_util = pytest.importorskip("slicer.util")

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "SSLSegment" / "SSLSegment.py", ROOT / "SSLSegmentLib" / "review" / "scene.py"]

# Defined by the Slicer application, absent from slicer-core. Paths are in the Slicer/Slicer repository.
APPLICATION_ONLY = {
    "slicer.app": "Base/Python/slicer/slicerqt.py (slicer.app = the qSlicerApplication; temporaryPath and "
                  "commandOptions() in Base/QTCore/qSlicerCoreApplication.h, layoutManager() in "
                  "Base/QTGUI/qSlicerApplication.h)",
    "slicer.mrmlScene": "Base/Python/slicer/slicerqt.py (slicer.mrmlScene = slicer.app.mrmlScene())",
    "slicer.ScriptedLoadableModule": "Base/Python/slicer/ScriptedLoadableModule.py",
    "slicer.parameterNodeWrapper": "Base/Python/slicer/parameterNodeWrapper/__init__.py (wrapper.py, validators.py)",
    "slicer.i18n": "Base/Python/slicer/i18n.py (tr, translate)",
    "slicer.modules": "Base/Python/slicer/__init__.py (the slicer.modules namespace, one attribute per loaded "
                      "module, each a qSlicerAbstractCoreModule; widgetRepresentation() in "
                      "Base/QTCore/qSlicerAbstractCoreModule.h)",
}

CORE_PREFIXES = ("vtkMRML", "vtkSlicer", "vtkSegment", "vtkOriented")
CLASS_NAME = re.compile(r"^vtk(MRML|Slicer)[A-Za-z0-9]+$")  # a node ID such as "...PET-Heat" does not match
CLASS_NAME_METHODS = {"AddNewNodeByClass", "GetNodesByClass", "GetNumberOfNodesByClass", "GetNthNodeByClass",
                      "GetFirstNodeByClass", "CreateNodeByClass", "IsA", "GetSingletonNode"}


def _dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


class Uses:
    """What one source file uses from `slicer`."""

    def __init__(self, path: Path):
        self.path = path
        self.tree = ast.parse(path.read_text(), filename=str(path))
        self.attributes: set[str] = set()  # longest dotted chains starting at `slicer`
        self.util_calls: list[tuple[str, int, list[str], int]] = []  # fn, n positional, keywords, line
        self.imports: set[str] = set()  # slicer.X from `import`/`from slicer... import`
        self.class_strings: set[tuple[str, int]] = set()
        self._collect()

    def _collect(self) -> None:
        chains = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Attribute):
                dotted = _dotted(node)
                if dotted and dotted.startswith("slicer."):
                    chains[dotted] = node.lineno
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "slicer":
                if node.module == "slicer":
                    self.imports.update(f"slicer.{a.name}" for a in node.names)
                else:
                    self.imports.add(node.module)
                    if node.module == "slicer.util":
                        self.attributes.update(f"slicer.util.{a.name}" for a in node.names)
            if isinstance(node, ast.Call):
                dotted = _dotted(node.func)
                if dotted and dotted.startswith("slicer.util.") and dotted.count(".") == 2:
                    if not any(isinstance(a, ast.Starred) for a in node.args) and all(k.arg for k in node.keywords):
                        self.util_calls.append((dotted.split(".")[2], len(node.args), [k.arg for k in node.keywords],
                                                node.lineno))
                if (isinstance(node.func, ast.Attribute) and node.func.attr in CLASS_NAME_METHODS):
                    for arg in node.args:
                        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("vtk"):
                            self.class_strings.add((arg.value, node.lineno))
            # Class names kept in variables first (className = "vtkMRMLLabelMapVolumeNode" if ... else ...).
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and CLASS_NAME.match(node.value):
                self.class_strings.add((node.value, node.lineno))
        # Keep only maximal chains: slicer.vtkMRMLSliceNode.JumpAllSlices, not also slicer.vtkMRMLSliceNode.
        for dotted in chains:
            if not any(other.startswith(dotted + ".") for other in chains):
                self.attributes.add(dotted)


@pytest.fixture(scope="module", params=SOURCES, ids=lambda p: p.name)
def uses(request):
    return Uses(request.param)


def _allowed(name: str) -> bool:
    return any(name == key or name.startswith(key + ".") for key in APPLICATION_ONLY)


def _resolve(dotted: str):
    """Follow slicer.A.B... in slicer-core; return the object or raise AttributeError naming the missing part."""
    obj = slicer
    for part in dotted.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def test_the_parse_finds_the_slicer_names(uses):
    assert uses.attributes, f"no slicer.* names found in {uses.path.name}"


def test_slicer_util_functions_exist_in_slicer_core(uses):
    util_names = {a.split(".")[2] for a in uses.attributes if a.startswith("slicer.util.")}
    assert util_names
    missing = sorted(n for n in util_names if not hasattr(slicer_util, n))
    assert not missing, f"{uses.path.name}: slicer.util has no {missing}"


def test_slicer_util_calls_match_the_signatures(uses):
    for name, n_positional, keywords, line in uses.util_calls:
        function = getattr(slicer_util, name)
        if not callable(function) or inspect.isclass(function):
            continue
        try:
            inspect.signature(function).bind(*([None] * n_positional), **{k: None for k in keywords})
        except TypeError as exc:
            raise AssertionError(f"{uses.path.name}:{line}: slicer.util.{name}(...) does not fit its signature "
                                 f"{inspect.signature(function)}: {exc}") from None


def test_mrml_and_logic_classes_exist_in_slicer_core(uses):
    checked = 0
    for dotted in sorted(uses.attributes | uses.imports):
        head = dotted.split(".")[1]
        if head.startswith(CORE_PREFIXES):
            try:
                _resolve(dotted)
            except AttributeError as exc:
                raise AssertionError(f"{uses.path.name}: {dotted} is not in slicer-core ({exc})") from None
            checked += 1
    for class_name, line in uses.class_strings:
        assert hasattr(slicer, class_name), f"{uses.path.name}:{line}: no MRML class {class_name!r} in slicer-core"
        checked += 1
    assert checked > 0


def test_every_other_slicer_name_is_in_slicer_core_or_listed(uses):
    unknown = []
    for dotted in sorted(uses.attributes | uses.imports):
        head = dotted.split(".")[1]
        if head.startswith(CORE_PREFIXES) or head == "util":
            continue
        try:
            _resolve(dotted)
        except AttributeError:
            if not _allowed(dotted):
                unknown.append(dotted)
    assert not unknown, (f"{uses.path.name} uses {unknown}: neither in slicer-core nor in APPLICATION_ONLY "
                         "(add it there with the Slicer source file that defines it)")


def test_the_allow_list_has_no_stale_or_core_entries():
    used = set()
    for path in SOURCES:
        u = Uses(path)
        used |= u.attributes | u.imports
    for key in APPLICATION_ONLY:
        assert any(name == key or name.startswith(key + ".") for name in used), f"{key} is listed but not used"
        with pytest.raises(AttributeError):
            _resolve(key)  # present in slicer-core? then it does not belong in the list


def test_the_mrml_adapter_needs_nothing_application_only():
    adapter = Uses(ROOT / "SSLSegmentLib" / "review" / "scene.py")
    app_names = sorted(n for n in adapter.attributes | adapter.imports if _allowed(n) and n != "slicer.mrmlScene")
    assert not app_names, f"review/scene.py must run on slicer-core but uses {app_names}"
    # slicer.mrmlScene is only the fallback when no scene is given; the tests always pass one.
    source = (ROOT / "SSLSegmentLib" / "review" / "scene.py").read_text()
    assert 'getattr(slicer, "mrmlScene", None)' in source


def test_module_file_imports_nothing_heavy_at_load():
    tree = ast.parse((ROOT / "SSLSegment" / "SSLSegment.py").read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module)
    heavy = {"torch", "monai", "SSLSegmentLib.ml.inference", "SSLSegmentLib.ml.trainer", "SSLSegmentLib.ml.networks",
             "SSLSegmentLib.review.session", "scipy", "training"}
    assert not (top_level & heavy), f"imported when Slicer starts: {top_level & heavy}"
