"""The speed benchmark's machinery on tiny sizes: every row is timed and the ratios are written (no timed assertion)."""

from __future__ import annotations

import json
import math

from benchmarks import speed
from SSLSegmentLib.ml.methods import available_methods


def test_quick_run_writes_the_ratios_and_a_row_per_variant(tmp_path, one_torch_thread):
    assert speed.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "training-speed.json").read_text())
    methods = set(available_methods())
    assert set(result["step_vs_floor"]) == methods
    ratios = [result["network_vs_bare"], result["map_vs_bare_forward"], result["map_vs_bare_fast_forward"],
              result["map_vs_bare_sliding"],
              result["map_vs_network_forward"], *result["step_vs_floor"].values()]
    assert all(isinstance(r, float) and math.isfinite(r) and r > 0 for r in ratios)
    rows = result["rows"]
    for name in ("bare-unet", "segnet", "map:predict_volume", "map:predict_volume-patch", "map:bare-forward",
                 "map:bare-whole-volume", "map:bare-whole-volume-fast", "map:segnet-whole-volume", *(f"step:{m}" for m in methods),
                 *(f"floor:{m}" for m in methods)):
        assert rows[name]["ms"] > 0 and len(rows[name]["ms_rounds"]) >= 1
    # The candidates beside the default network: the former default with the top residual unit, fewer features, and
    # the CPU formats (channels_last_3d, bf16 autocast).
    assert {"segnet-top", "segnet-f8", "segnet-channels-last", "segnet-bf16"} <= {n for n, r in rows.items()
                                                                                 if r["group"] == "candidate"}
    env = result["environment"]
    assert {"date", "torch", "monai", "processor", "load_average_at_start", "load_average_at_end"} <= set(env)
    md = (tmp_path / "training-speed.md").read_text()
    assert "network_vs_bare" in md and "step_vs_floor" in md and "Load average" in md
    # The map's bound is against the bare UNet's whole-volume forward; the sliding-window ratio has its own key.
    ms = {n: r["ms"] for n, r in rows.items()}
    for key, row in (("map_vs_bare_forward", "map:bare-whole-volume"), ("map_vs_bare_sliding", "map:bare-forward"),
                     ("map_vs_bare_fast_forward", "map:bare-whole-volume-fast")):
        assert math.isclose(result[key], ms["map:predict_volume"] / ms[row], rel_tol=1e-2, abs_tol=2e-3)
    assert "map_vs_bare_sliding" in md and "whole-volume forward" in md


def test_every_method_has_a_floor():
    from SSLSegmentLib.ml.methods import get_method

    for name in available_methods():
        spec = speed._floor_spec(get_method(name), 2, 2)
        assert spec["student"] >= 2 and speed._describe_floor(spec).startswith("student")
