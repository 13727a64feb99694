"""What a review starts with, for the Slicer panel and the web page alike (standard library only, so both import it
before anything heavy)."""

from __future__ import annotations

# MC-dropout passes asked of the backend per Run.
PASSES = 8
PASSES_RANGE = (1, 64)
# Threshold of the review regions on the normalised uncertainty map.
REGION_THRESHOLD = 0.5
REGION_THRESHOLD_RANGE = (0.05, 0.95)
# The heat map's display: how strongly it covers the image, and below which uncertainty it stays uncoloured.
HEATMAP_OPACITY = 0.5
HEATMAP_THRESHOLD = 0.2
HEATMAP_THRESHOLD_RANGE = (0.0, 0.99)
# Iterations of a training job started from the review.
TRAIN_ITERATIONS = 500
