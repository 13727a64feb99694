"""Draw the review loop diagram (Resources/Screenshots/workflow.png) used by docs/slicer.md and the extension page.

    .venv/bin/python Resources/Screenshots/render_workflow.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parent / "workflow.png"

SLICER = "#dbe9f6"
BACKEND = "#f6e7d2"
steps = [  # (x, y, text, colour)
    (1.0, 3.0, "Fetch next case\n(most uncertain first)", SLICER),
    (3.4, 3.0, "Run the model\nsegmentation +\nuncertainty", SLICER),
    (5.8, 3.0, "Heat map +\nranked review regions", SLICER),
    (8.2, 3.0, "Next region\n(Ctrl+Shift+N):\nviews jump there", SLICER),
    (8.2, 1.0, "Correct in the\nSegment Editor", SLICER),
    (5.8, 1.0, "Submit: label +\nreviewed mask\n(visited ∪ edited) +\nmodel version", SLICER),
    (3.4, 1.0, "Backend stores an\nimmutable label revision", BACKEND),
    (1.0, 1.0, "Retrain (semi-supervised);\nnew version current only\nif validation Dice holds", BACKEND),
]
arrows = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 0)]

fig, ax = plt.subplots(figsize=(10, 4.2), dpi=110)
ax.set_xlim(-0.2, 9.4)
ax.set_ylim(0.0, 4.1)
ax.axis("off")
w, h = 2.0, 1.15
for x, y, text, colour in steps:
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05,rounding_size=0.12",
                                facecolor=colour, edgecolor="#445566", linewidth=1.2))
    ax.text(x, y, text, ha="center", va="center", fontsize=8.6)
for a, b in arrows:
    (x0, y0, *_), (x1, y1, *_) = steps[a], steps[b]
    ax.add_patch(FancyArrowPatch(
        (x0 + (w / 2 if x1 > x0 else -w / 2 if x1 < x0 else 0), y0 + (0 if y1 == y0 else -h / 2 if y1 < y0 else h / 2)),
        (x1 + (-w / 2 if x1 > x0 else w / 2 if x1 < x0 else 0), y1 + (0 if y1 == y0 else h / 2 if y1 < y0 else -h / 2)),
        arrowstyle="-|>", mutation_scale=14, color="#334455", linewidth=1.3))
ax.text(0.0, 3.95, "In 3D Slicer (SSLSegment module)", color="#2c5d8a", fontsize=10, weight="bold")
ax.text(0.0, 0.12, "Backend (sslsegment serve + worker), local or on a GPU server", color="#8a5a2c", fontsize=10,
        weight="bold")
fig.tight_layout()
fig.savefig(OUT)
print(f"wrote {OUT}")
