"""Render a preview of the SSLSegment panel (Resources/Screenshots/panel.png) without Slicer.

The real .ui file is loaded by PySide6's QUiLoader offscreen. Slicer's own widget classes (ctk*, qMRML*) do not
exist outside Slicer, so for this picture only they are drawn by small look-alikes registered under the same class
names; the layout, labels, tooltips and standard Qt widgets are the module's own. The table and status texts are
filled with example values of a review in progress.

    QT_QPA_PLATFORM=offscreen .venv/bin/python Resources/Screenshots/render_panel.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtGui, QtWidgets  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
UI_FILE = ROOT / "SSLSegment" / "Resources" / "UI" / "SSLSegment.ui"
OUT = Path(__file__).resolve().parent / "panel.png"


class ctkCollapsibleButton(QtWidgets.QGroupBox):  # noqa: N801 (Slicer's class name)
    def _get_text(self):
        return self.title()

    def _set_text(self, text):
        self.setTitle("▼ " + text)

    text = QtCore.Property(str, _get_text, _set_text)

    def _get_collapsed(self):
        return False

    def _set_collapsed(self, collapsed):
        if collapsed:
            self.setTitle(self.title().replace("▼", "▶"))
            self.setMaximumHeight(24)

    collapsed = QtCore.Property(bool, _get_collapsed, _set_collapsed)


class ctkSliderWidget(QtWidgets.QWidget):  # noqa: N801
    def __init__(self, parent=None):
        super().__init__(parent)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.slider = QtWidgets.QSlider(QtCore.Qt.Horizontal)
        self.slider.setRange(0, 100)
        self.spin = QtWidgets.QDoubleSpinBox()
        self.spin.setRange(0, 1)
        self.spin.setSingleStep(0.05)
        layout.addWidget(self.slider, 1)
        layout.addWidget(self.spin)

    def set_value(self, value):
        self.spin.setValue(value)
        self.slider.setValue(int(round(value * 100)))


class ctkPathLineEdit(QtWidgets.QWidget):  # noqa: N801
    def __init__(self, parent=None):
        super().__init__(parent)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.edit = QtWidgets.QLineEdit()
        layout.addWidget(self.edit, 1)
        layout.addWidget(QtWidgets.QToolButton(text="…"))


class qMRMLNodeComboBox(QtWidgets.QComboBox):  # noqa: N801
    pass


class qMRMLWidget(QtWidgets.QWidget):  # noqa: N801
    pass


class qMRMLSegmentEditorWidget(QtWidgets.QFrame):  # noqa: N801
    """A sketch of Slicer's segment editor: segment list and effect buttons."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setFrameShape(QtWidgets.QFrame.StyledPanel)
        layout = QtWidgets.QVBoxLayout(self)
        segments = QtWidgets.QTableWidget(1, 2)
        segments.horizontalHeader().setVisible(False)
        segments.verticalHeader().setVisible(False)
        swatch = QtWidgets.QTableWidgetItem("")
        swatch.setBackground(QtGui.QColor(242, 89, 64))
        segments.setItem(0, 0, swatch)
        segments.setItem(0, 1, QtWidgets.QTableWidgetItem("target"))
        segments.setColumnWidth(0, 24)
        segments.horizontalHeader().setStretchLastSection(True)
        segments.setMaximumHeight(34)
        layout.addWidget(segments)
        grid = QtWidgets.QGridLayout()
        effects = ["Paint", "Draw", "Erase", "Level tracing", "Grow from seeds", "Fill between slices",
                   "Threshold", "Margin", "Islands", "Smoothing", "Scissors", "Logical operators"]
        for i, name in enumerate(effects):
            button = QtWidgets.QToolButton(text=name)
            button.setMinimumWidth(110)
            button.setCheckable(True)
            button.setChecked(name == "Paint")
            grid.addWidget(button, i // 3, i % 3)
        layout.addLayout(grid)
        undo = QtWidgets.QHBoxLayout()
        undo.addWidget(QtWidgets.QPushButton("Undo"))
        undo.addWidget(QtWidgets.QPushButton("Redo"))
        layout.addLayout(undo)


def main() -> int:
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv)
    loader = QUiLoader()
    for cls in (ctkCollapsibleButton, ctkSliderWidget, ctkPathLineEdit, qMRMLNodeComboBox, qMRMLWidget,
                qMRMLSegmentEditorWidget):
        loader.registerCustomWidget(cls)
    ui_file = QtCore.QFile(str(UI_FILE))
    ui_file.open(QtCore.QFile.ReadOnly)
    panel = loader.load(ui_file)
    ui_file.close()
    find = lambda cls, name: panel.findChild(cls, name)  # noqa: E731

    # Example state: connected to a remote backend, a case under review, two of six regions visited.
    find(QtWidgets.QComboBox, "connectionModeComboBox").addItems(["Remote server", "Start on this computer"])
    find(QtWidgets.QLineEdit, "serverUrlLineEdit").setText("http://127.0.0.1:8765")
    find(QtWidgets.QLineEdit, "tokenLineEdit").setText("x" * 24)
    find(QtWidgets.QLineEdit, "annotatorLineEdit").setText("dr_lee")
    for name in ("datastoreLabel", "datastorePathLineEdit", "stopLocalButton"):
        find(QtWidgets.QWidget, name).setVisible(False)
    find(QtWidgets.QLabel, "connectionStatusLabel").setText(
        "Connected to http://127.0.0.1:8765: 60 cases (40 to train on), backend 0.1.0.")
    find(QtWidgets.QLabel, "modelVersionLabel").setText("v0003")
    find(QtWidgets.QComboBox, "strategyComboBox").addItems(["most uncertain first", "random"])
    find(QtWidgets.QComboBox, "inputVolumeSelector").addItem("None")
    find(QtWidgets.QLabel, "caseLabel").setText("case_0017 (train split, uncertainty score 0.184)")
    spin = find(QtWidgets.QSpinBox, "passesSpinBox")
    spin.setRange(1, 64)
    spin.setValue(8)
    threshold = find(QtWidgets.QDoubleSpinBox, "regionThresholdSpinBox")
    threshold.setRange(0.05, 0.95)
    threshold.setValue(0.5)
    progress = find(QtWidgets.QProgressBar, "runProgressBar")
    progress.setRange(0, 1)
    progress.setValue(1)
    find(QtWidgets.QLabel, "runStatusLabel").setText("Running the model: done.")
    find(QtWidgets.QComboBox, "uncertaintyKindComboBox").addItems(
        ["total uncertainty (entropy)", "model doubt (mutual information)"])
    find(QtWidgets.QCheckBox, "showHeatmapCheckBox").setChecked(True)
    find(ctkSliderWidget, "opacitySliderWidget").set_value(0.5)
    find(ctkSliderWidget, "thresholdSliderWidget").set_value(0.2)
    table = find(QtWidgets.QTableWidget, "regionsTableWidget")
    rows = [("1", "2.41", "0.83", "✓"), ("2", "1.77", "0.79", "✓"), ("3", "0.96", "0.74", ""),
            ("4", "0.52", "0.71", ""), ("5", "0.31", "0.66", ""), ("6", "0.12", "0.61", "")]
    table.setRowCount(len(rows))
    for r, row in enumerate(rows):
        for c, text in enumerate(row):
            table.setItem(r, c, QtWidgets.QTableWidgetItem(text))
    table.selectRow(1)
    find(QtWidgets.QLabel, "regionStatusLabel").setText("2 of 6 regions visited.")
    find(QtWidgets.QLabel, "editedVoxelsLabel").setText(
        "412 voxels edited (0.66 mL); 2897 voxels count as reviewed.")
    trainingIterations = find(QtWidgets.QSpinBox, "iterationsSpinBox")
    trainingIterations.setRange(10, 100000)
    trainingIterations.setValue(500)

    panel.resize(440, 1480)
    panel.show()
    app.processEvents()
    panel.resize(panel.width(), panel.sizeHint().height())
    app.processEvents()
    panel.grab().save(str(OUT))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
