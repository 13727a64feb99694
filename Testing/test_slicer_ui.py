"""The module's Qt Designer file against the code that uses it, loaded by PySide6's QUiLoader offscreen.

Slicer's own loader fails at run time on the mistakes checked here (a widget the code expects but the .ui lacks, a
custom class that is not declared, a parameter bound to a widget that cannot represent its type), so catching them
without Slicer saves a round trip through the application. QUiLoader turns declared custom classes (ctk*, qMRML*)
into plain QWidget placeholders that keep their objectName and properties; an undeclared one is dropped.
"""

from __future__ import annotations

import ast
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtCore = pytest.importorskip("PySide6.QtCore")
QtWidgets = pytest.importorskip("PySide6.QtWidgets")
QtUiTools = pytest.importorskip("PySide6.QtUiTools")

ROOT = Path(__file__).resolve().parents[1]
UI_FILE = ROOT / "SSLSegment" / "Resources" / "UI" / "SSLSegment.ui"
MODULE_FILE = ROOT / "SSLSegment" / "SSLSegment.py"

# What Slicer's parameterNodeWrapper can bind (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py):
# unannotated type → widget classes that have a connector for it.
CONNECTORS = {
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "str": {"QLineEdit", "QTextEdit"},
    "enum": {"QComboBox"},
    "path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox"},
}
NEEDS_RANGE = {"QSlider", "ctkSliderWidget"}  # the connector refuses an unbounded type on these


@pytest.fixture(scope="module")
def app():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


def _quiet_expected_qt_messages(mode, context, message):
    # Expected with placeholders: custom classes become QWidget and lose their Slicer-only signals.
    if "unable to create a custom widget" in message or "mrmlSceneChanged" in message or "QObject::connect" in message \
            or "set-type property" in message:
        return
    print(message)


@pytest.fixture(scope="module")
def loaded(app):
    previous = QtCore.qInstallMessageHandler(_quiet_expected_qt_messages)
    loader = QtUiTools.QUiLoader()
    ui_file = QtCore.QFile(str(UI_FILE))
    assert ui_file.open(QtCore.QFile.ReadOnly)
    widget = loader.load(ui_file)
    ui_file.close()
    assert widget is not None, loader.errorString()
    yield widget, loader
    widget.deleteLater()
    QtCore.qInstallMessageHandler(previous)


@pytest.fixture(scope="module")
def xml_widgets():
    """objectName → class for every <widget> in the .ui file."""
    tree = ET.parse(UI_FILE)
    return {w.get("name"): w.get("class") for w in tree.iter("widget")}, tree


@pytest.fixture(scope="module")
def module_ast():
    return ast.parse(MODULE_FILE.read_text(), filename=str(MODULE_FILE))


def _ui_attributes(tree) -> set[str]:
    """Every name used as self.ui.<name> in the module."""
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def _ui_connections(tree) -> list[tuple[str, str]]:
    """(widget name, signal signature) for every self.ui.<name>.connect("signal(...)", slot) call."""
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"
                and isinstance(node.func.value, ast.Attribute) and isinstance(node.func.value.value, ast.Attribute)
                and node.func.value.value.attr == "ui" and node.args and isinstance(node.args[0], ast.Constant)):
            found.append((node.func.value.attr, node.args[0].value))
    return found


def _parameter_fields(tree) -> dict[str, str]:
    """name → annotation source of the @parameterNodeWrapper class."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list):
            return {item.target.id: ast.unparse(item.annotation) for item in node.body
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
    raise AssertionError("no @parameterNodeWrapper class in the module")


def _enum_names(tree) -> set[str]:
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
            and any(ast.unparse(b) in ("enum.Enum", "Enum") for b in node.bases)}


def _kind(annotation: str, enums: set[str]) -> str:
    base = re.sub(r"^Annotated\[\s*([^,\]]+).*$", r"\1", annotation).strip()
    if base in enums:
        return "enum"
    if base in ("pathlib.Path", "Path"):
        return "path"
    if base.startswith("vtkMRML"):
        return "node"
    return base


def test_every_widget_the_module_uses_exists_in_the_ui(loaded, module_ast, xml_widgets):
    widget, _ = loaded
    names, _tree = xml_widgets
    used = _ui_attributes(module_ast)
    assert len(used) > 25  # the parse found the panel's widgets, not nothing
    missing = sorted(n for n in used if widget.findChild(QtCore.QObject, n) is None)
    assert not missing, f"SSLSegment.py uses self.ui.{missing} but the .ui file has no such widget"
    # Every widget of the .ui is instantiated (an undeclared custom class would have been dropped silently).
    dropped = sorted(n for n in names if n != widget.objectName() and widget.findChild(QtCore.QObject, n) is None)
    assert not dropped, f"widgets dropped by the loader (undeclared custom class?): {dropped}"


def test_every_custom_class_is_declared(loaded, xml_widgets):
    _, loader = loaded
    names, tree = xml_widgets
    standard = set(loader.availableWidgets())
    declared = {c.findtext("class"): c.findtext("extends") for c in tree.iter("customwidget")}
    used_custom = {cls for cls in names.values() if cls not in standard}
    assert used_custom, "expected Slicer widgets (ctk*, qMRML*) in the panel"
    assert not used_custom - set(declared), f"custom classes used but not declared: {used_custom - set(declared)}"
    for cls, extends in declared.items():
        assert extends in standard or extends in declared, f"{cls} extends unknown class {extends}"
        assert tree.find(f".//customwidget[class='{cls}']/header").text == f"{cls}.h"


def test_mrml_widgets_receive_the_scene(xml_widgets):
    names, tree = xml_widgets
    top = tree.getroot().find("widget").get("name")
    receivers = {c.findtext("receiver") for c in tree.iter("connection")
                 if c.findtext("sender") == top and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml_widgets = {n for n, cls in names.items() if cls.startswith("qMRML") and n != top}
    assert mrml_widgets and mrml_widgets == receivers, \
        f"qMRML widgets without the scene connection: {mrml_widgets - receivers}"


def test_signals_the_module_connects_exist_on_those_widgets(loaded, module_ast, xml_widgets):
    widget, _ = loaded
    names, _tree = xml_widgets
    connections = _ui_connections(module_ast)
    assert len(connections) >= 15
    for name, signal in connections:
        child = widget.findChild(QtCore.QObject, name)
        meta = child.metaObject()
        assert meta.className() == names[name], f"{name}: connect() on a placeholder class, cannot check {signal}"
        signatures = {bytes(meta.method(i).methodSignature()).decode() for i in range(meta.methodCount())}
        assert signal in signatures, f"{name} ({names[name]}) has no signal {signal}"


def test_parameter_bindings_match_slicers_connectors(loaded, module_ast, xml_widgets):
    widget, _ = loaded
    names, _tree = xml_widgets
    fields = _parameter_fields(module_ast)
    enums = _enum_names(module_ast)
    bound = {}
    for child in widget.findChildren(QtWidgets.QWidget):
        parameter = child.property("SlicerParameterName")
        if parameter:
            assert parameter not in bound, f"{parameter} bound twice"
            bound[parameter] = child.objectName()
    assert len(bound) >= 12
    for parameter, object_name in bound.items():
        assert parameter in fields, f"{object_name} is bound to {parameter!r}, which the parameter node lacks"
        annotation = fields[parameter]
        cls = names[object_name]
        kind = _kind(annotation, enums)
        assert cls in CONNECTORS[kind], f"{parameter}: {annotation} cannot be shown by a {cls}"
        if cls in NEEDS_RANGE:
            assert "WithinRange" in annotation, f"{parameter}: a {cls} needs Annotated[..., WithinRange(a, b)]"


def test_parameter_defaults_lie_within_their_ranges(module_ast):
    """Defaults and ranges are literals or names from SSLSegmentLib.review.defaults (shared with the web page)."""
    from SSLSegmentLib.review import defaults

    def value_of(text: str):
        return eval(text, {"__builtins__": {}}, {"defaults": defaults})  # literals and defaults.NAME only

    for node in ast.walk(module_ast):
        if isinstance(node, ast.AnnAssign) and node.value is not None and "WithinRange" in ast.unparse(node.annotation):
            call = next(n for n in ast.walk(node.annotation) if isinstance(n, ast.Call) and ast.unparse(n.func) == "WithinRange")
            bounds = [value_of(ast.unparse(a.value if isinstance(a, ast.Starred) else a)) for a in call.args]
            low, high = bounds[0] if len(bounds) == 1 else bounds
            value = value_of(ast.unparse(node.value))
            assert float(low) <= value <= float(high), f"{node.target.id} = {value} outside [{low}, {high}]"


def test_shortcuts_and_buttons_tell_the_same_keys(loaded, module_ast):
    widget, _ = loaded
    constants = {n.targets[0].id: n.value.value for n in module_ast.body
                 if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant) and isinstance(n.targets[0], ast.Name)}
    for button, key in (("nextRegionButton", "NEXT_REGION_SHORTCUT"), ("previousRegionButton", "PREVIOUS_REGION_SHORTCUT")):
        assert constants[key] in widget.findChild(QtWidgets.QPushButton, button).toolTip()


def test_the_panels_uncertainty_kinds_are_the_contracts(module_ast):
    """The combo box offers the maps the backend serves, in the contract's order (the default first)."""
    from SSLSegmentLib.data.contract import DEFAULT_UNCERTAINTY, UNCERTAINTY_KINDS

    enum_class = next(n for n in ast.walk(module_ast) if isinstance(n, ast.ClassDef) and n.name == "UncertaintyKind")
    members = {item.targets[0].id: item.value.value for item in enum_class.body
               if isinstance(item, ast.Assign) and isinstance(item.value, ast.Constant)}
    assert tuple(members.values()) == UNCERTAINTY_KINDS
    default = next(n for n in ast.walk(module_ast) if isinstance(n, ast.AnnAssign)
                   and isinstance(n.target, ast.Name) and n.target.id == "uncertaintyKind")
    assert ast.unparse(default.annotation) == "UncertaintyKind"
    assert members[ast.unparse(default.value).split(".")[-1]] == DEFAULT_UNCERTAINTY


def _calls_in(tree, class_name: str, method: str) -> list[str]:
    """The calls made in `class_name.method`, as source text ("editor.setActiveEffect(None)", ...), in order."""
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == class_name)
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == method)
    return [ast.unparse(n) for n in ast.walk(fn) if isinstance(n, ast.Call)]


def test_keyboard_shortcuts_live_only_while_the_module_is_shown(module_ast):
    """What Slicer's Segment Editor module does on enter/exit, for the embedded editor; the region keys are made on
    enter and removed on exit and cleanup, never in setup (where they would fire in every module and count regions
    as reviewed). The in-Slicer half is SSLSegmentTest.test_ShortcutsOnlyInTheModule."""
    enter = _calls_in(module_ast, "SSLSegmentWidget", "enter")
    exit_ = _calls_in(module_ast, "SSLSegmentWidget", "exit")
    assert "editor.installKeyboardShortcuts()" in enter and "self._installShortcuts()" in enter
    assert {"editor.setActiveEffect(None)", "editor.uninstallKeyboardShortcuts()", "self._removeShortcuts()"} <= set(exit_)
    assert "self._removeShortcuts()" in _calls_in(module_ast, "SSLSegmentWidget", "cleanup")
    makers = [name for name in ("setup", "enter", "exit", "cleanup", "_installShortcuts")
              if any("QShortcut(" in call for call in _calls_in(module_ast, "SSLSegmentWidget", name))]
    assert makers == ["_installShortcuts"]
    assert not any("installKeyboardShortcuts" in call or "_installShortcuts" in call
                   for call in _calls_in(module_ast, "SSLSegmentWidget", "setup"))
