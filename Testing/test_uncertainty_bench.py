"""The uncertainty benchmark's bookkeeping: ratios against the right plain row, and a GPU run merged into the table."""

from __future__ import annotations

import json

import pytest

from benchmarks import uncertainty as bench


def _raw(plain: float, head: float, whole: float, whole_head: float) -> dict:
    def row(wall, cpu=None, name="plain"):
        return {"wall_s": wall, "cpu_s": cpu or wall, "peak_mb": 100.0, "estimator": name, "passes": 8, "window": [32, 48, 48]}

    return {
        "plain": row([plain * 1.3, plain]),
        "head_mc": row([head, head * 1.1], name="head_mc"),
        "mc_dropout_sequential": row([plain * 8]),
        "mc_dropout_batched": row([plain * 11]),
        "plain_contiguous": row([plain * 1.5]),
        "head_mc_contiguous": row([head * 1.6], name="head_mc"),
        "plain_whole_volume": row([whole]),
        "head_mc_whole_volume": row([whole_head], name="head_mc"),
        "head_mc_whole_volume_contiguous": row([whole_head * 2], name="head_mc"),
    }


def test_ratios_use_the_best_run_and_the_matching_plain_row():
    s = bench._summarise_speed(_raw(plain=2.0, head=2.2, whole=0.5, whole_head=0.6))
    rows = s["rows"]
    assert rows["plain"]["wall_s_best"] == 2.0 and rows["plain"]["runs"] == 2
    assert s["head_mc_over_plain"] == pytest.approx(1.1)
    assert rows["mc_dropout_sequential"]["x_plain"] == pytest.approx(8.0)
    assert rows["head_mc_whole_volume"]["x_plain"] == pytest.approx(1.2)  # against the whole-volume plain row
    assert s["head_mc_over_plain_whole_volume"] == pytest.approx(1.2)
    assert rows["head_mc_whole_volume_contiguous"]["x_plain"] == pytest.approx(2.4)  # whole-volume rows: whole plain


def test_gpu_run_merges_into_the_committed_table(tmp_path):
    cpu = {"environment": {"date": "d", "processor": "cpu", "cpu_count": 2, "torch": "t", "torch_threads": 1,
                           "monai": "m", "python": "p"},
           "config": {"volume_shape": [96, 128, 128], "patch": [32, 48, 48], "overlap": 0.25},
           "speed": bench._summarise_speed(_raw(2.0, 2.2, 0.5, 0.6))}
    cpu["conclusion"] = bench.conclusion(cpu)
    out = tmp_path / "uncertainty.json"
    bench._write(cpu, out)
    md = out.with_suffix(".md").read_text()
    assert "GPU column: not measured" in md and "| GPU s |" not in md
    gpu = {"environment": {**cpu["environment"], "gpu": "Some GPU", "cuda": "13"},
           "speed": bench._summarise_speed(_raw(0.2, 0.21, 0.05, 0.06))}
    gpu_json = tmp_path / "gpu.json"
    gpu_json.write_text(json.dumps(gpu))
    bench.merge_gpu(gpu_json, out)
    md = out.with_suffix(".md").read_text()
    assert "Some GPU" in md and "| GPU s |" in md and "GPU column: not measured" not in md
    assert json.loads(out.read_text())["gpu"]["speed"]["head_mc_over_plain"] == pytest.approx(1.05)
    assert "1.10×** on the CPU" in md and "1.05×** on the GPU" in md
    # The layout comparison names both windows' numbers (contiguous against channels_last_3d).
    assert "3.52 s contiguous against 2.20 s" in md and "1.20 s contiguous against 0.60 s" in md
