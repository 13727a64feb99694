"""The benchmark runner's bookkeeping: run plan, scaled configs, summaries over seeds, the table (no training here)."""

import argparse
import copy
import math

import pytest

from benchmarks.ssl_methods import DEFAULT_METHODS, PROFILES, markdown_table, plan_tasks, scaled_config, summarize_runs


def test_all_eight_methods_by_default_and_full_runs_once_per_seed(tmp_path):
    assert DEFAULT_METHODS == ["supervised", "full", "mean-teacher", "ua-mt", "ug-mcl", "sgrs", "lcc", "brl"]
    p = PROFILES["la-quick"]
    tasks = plan_tasks(p, tmp_path, tmp_path, DEFAULT_METHODS, [0, 1], [4, 8], p.config, argparse.Namespace(device="cuda"))
    assert len(tasks) == 2 * (1 + 2 * 7)
    assert sum(t["method"] == "full" for t in tasks) == 2
    assert all(t["config"]["device"] == "cuda" for t in tasks)
    assert len({t["out_dir"] for t in tasks}) == len(tasks)
    # Two invocations with other result names (e.g. two validation folds side by side) never share a run folder:
    # each run's evaluation reloads its best.pt from there.
    other = plan_tasks(p, tmp_path, tmp_path, DEFAULT_METHODS, [0, 1], [4, 8], p.config, argparse.Namespace(),
                       run_name="f1-brl")
    assert not {t["out_dir"] for t in tasks} & {t["out_dir"] for t in other}


def test_reduced_iterations_keep_the_schedule_shares():
    p = PROFILES["paper"]
    cfg = scaled_config(p, 600)
    assert cfg["iterations"] == 600 and cfg["lr_step"] == 250 and cfg["rampup_steps"] == 600
    assert cfg["val_interval"] == 120  # at least 5 validations
    assert scaled_config(p, None) == p.config


def _run(method, n, seed, dice):
    test = {"dice": dice, "jaccard": dice / (2 - dice), "hd95_vox": 5.0, "asd_vox": 1.0}
    return {"method": method, "n_labeled": n, "seed": seed, "test": test,
            "test_sd_over_cases": {k: 0.1 for k in test}, "best_val_dice": dice, "best_step": 100, "train_seconds": 10.0}


def test_summary_over_seeds_and_gap_closed():
    runs = [_run("supervised", 4, 0, 0.60), _run("supervised", 4, 1, 0.70), _run("full", "all", 0, 0.90),
            _run("full", "all", 1, 0.90), _run("sgrs", 4, 0, 0.80), _run("sgrs", 4, 1, 0.80)]
    rows = summarize_runs(runs, ["supervised", "full", "sgrs"], [4])["4"]
    assert rows["supervised"]["test"]["dice"][0] == pytest.approx(0.65)
    assert rows["supervised"]["test"]["dice"][1] == pytest.approx(math.sqrt(0.005))  # sd over the two seeds
    assert rows["sgrs"]["gap_closed_test"] == pytest.approx((0.80 - 0.65) / (0.90 - 0.65))
    one = summarize_runs(runs[:1] + runs[2:3] + runs[4:5], ["supervised", "full", "sgrs"], [4])["4"]
    assert one["sgrs"]["test"]["dice"] == (0.80, 0.1)  # one seed: the sd over test cases


def test_no_gap_closed_when_full_supervision_is_not_above_supervised():
    # An undertrained budget can leave full supervision below supervised-only; a ratio would then flip sign.
    runs = [_run("supervised", 8, 0, 0.75), _run("full", "all", 0, 0.73), _run("ua-mt", 8, 0, 0.76)]
    result = {"profile": "la-quick", "description": "d", "seeds": [0], "config": PROFILES["la-quick"].config | {
              "network": {"arch": "unet", "channels": [16]}}, "environment": {"device": "cpu", "machine": "x86_64",
              "processor": "x86_64", "cpu_threads": 1, "python": "3", "torch": "2", "monai": "1", "date": "today"},
              "summary": summarize_runs(runs, ["supervised", "full", "ua-mt"], [8]), "method_options": {"brl": {"beta": 0.3}}}
    assert math.isnan(result["summary"]["8"]["ua-mt"]["gap_closed_test"])
    table = markdown_table(result)
    assert "No gap to close" in table and "73.00 vs 75.00" in table
    assert "Method options other than the defaults: brl: beta = 0.3." in table
    assert "Network options" not in table
    table = markdown_table({**result, "network_options": {"features": 8, "top_res_unit": False}})
    assert "Network options other than the profile's: features = 8, top_res_unit = False." in table
    assert "%" not in table.split("| ua-mt |")[1].split("|")[4]  # the gap column stays empty


def test_table_names_the_device_and_flags_a_reduced_run():
    runs = [_run("supervised", 8, 0, 0.6), _run("full", "all", 0, 0.9), _run("lcc", 8, 0, 0.7)]
    result = {"profile": "paper", "description": "d", "seeds": [0], "config": scaled_config(PROFILES["paper"], 300),
              "profile_iterations": 6000, "environment": {"device": "NVIDIA H100 80GB HBM3", "machine": "x86_64",
              "processor": "x86_64", "cpu_threads": 2, "python": "3", "torch": "2", "monai": "1", "date": "today"},
              "summary": summarize_runs(runs, ["supervised", "full", "lcc"], [8]), "notes": ["dev test split"]}
    md = markdown_table(result)
    assert "NVIDIA H100 80GB HBM3" in md and "Reduced run: 300 iterations" in md and "dev test split" in md
    assert "| lcc | 70.00 ± 10.00 |" in md and "33%" in md


def test_largest_component_scores_are_summarised_and_tabled_beside_the_raw_ones():
    def with_lcc(run, dice):
        lcc = {"dice": dice, "jaccard": dice / (2 - dice), "hd95_vox": 3.0, "asd_vox": 0.5}
        return {**run, "test_lcc": lcc, "test_lcc_sd_over_cases": {k: 0.05 for k in lcc}}

    runs = [with_lcc(_run("supervised", 4, 0, 0.60), 0.70), with_lcc(_run("full", "all", 0, 0.90), 0.91),
            with_lcc(_run("brl", 4, 0, 0.80), 0.85)]
    summary = summarize_runs(runs, ["supervised", "full", "brl"], [4])
    brl = summary["4"]["brl"]
    assert brl["gap_closed_test"] == pytest.approx((0.80 - 0.60) / (0.90 - 0.60))
    assert brl["gap_closed_test_lcc"] == pytest.approx((0.85 - 0.70) / (0.91 - 0.70))  # against cut rows only
    result = {"profile": "la-quick", "description": "d", "seeds": [0], "config": PROFILES["la-quick"].config | {
              "network": {"arch": "unet", "channels": [16]}}, "environment": {"device": "cpu", "machine": "x86_64",
              "processor": "x86_64", "cpu_threads": 1, "python": "3", "torch": "2", "monai": "1", "date": "today"},
              "summary": summary}
    table = markdown_table(result)
    assert "largest component: Dice %" in table
    assert "| brl | 80.00 ± 10.00 |" in table and "85.00 ± 5.00 | 71% |" in table


def test_the_largest_component_cut_keeps_each_classs_biggest_blob_only():
    import numpy as np

    from SSLSegmentLib.ml.evaluation import largest_component

    label = np.zeros((8, 10, 10), np.uint8)
    label[1:4, 1:4, 1:4] = 1  # 27 voxels
    label[6, 8, 8] = 1  # a stray voxel of class 1
    label[5:7, 1:3, 6:9] = 2  # class 2: its own largest blob, kept
    label[0, 9, 0] = 2
    cut = largest_component(label)
    assert cut.dtype == label.dtype and cut.shape == label.shape
    assert (cut == 1).sum() == 27 and cut[6, 8, 8] == 0
    assert (cut == 2).sum() == 12 and cut[0, 9, 0] == 0
    diagonal = np.zeros((4, 4, 4), np.uint8)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = 1  # 26-connected: one component, nothing cut
    np.testing.assert_array_equal(largest_component(diagonal), diagonal)


def test_fit_iterations_packs_runs_into_the_time_budget():
    from benchmarks.ssl_methods import fit_iterations

    cost = {"rows": [{"method": "supervised", "wall_s_per_it": 0.1}, {"method": "full", "wall_s_per_it": 0.1},
                     {"method": "sgrs", "wall_s_per_it": 0.3}]}
    # runs: full once, supervised and sgrs once per labeled count → 0.1 + 2·(0.1 + 0.3) = 0.9 s per iteration, 3 jobs
    assert fit_iterations(cost, ["supervised", "full", "sgrs"], [4, 8], 3, 300) == 1000
    assert fit_iterations(cost, ["supervised"], [8], 1, 1) == 50  # never below one step
    with pytest.raises(ValueError, match="lcc"):
        fit_iterations(cost, ["lcc"], [8], 1, 100)
    # A CPU cost file estimates from CPU seconds (one thread per run), and so does the fit.
    cpu = {"estimate_from": "cpu_s_per_it", "rows": [{**r, "cpu_s_per_it": r["wall_s_per_it"] / 2} for r in cost["rows"]]}
    assert fit_iterations(cpu, ["supervised", "full", "sgrs"], [4, 8], 3, 300) == 2000


def test_cost_estimate_and_fit_agree():
    from benchmarks.ssl_methods import estimated_seconds, fit_iterations

    cost = {"estimate_from": "cpu_s_per_it", "labeled": [4, 8], "jobs": 2, "config": {"iterations": 1000},
            "rows": [{"method": "full", "cpu_s_per_it": 0.2, "wall_s_per_it": 1.0},
                     {"method": "brl", "cpu_s_per_it": 0.5, "wall_s_per_it": 3.0}]}
    # (0.2 + 2·0.5) CPU s per iteration of the seed's runs, 1000 iterations, 2 at a time
    assert estimated_seconds(cost) == pytest.approx(600.0)
    assert fit_iterations(cost, ["full", "brl"], [4, 8], 2, estimated_seconds(cost), step=10) == 1000


def test_resume_keeps_finished_runs_of_the_same_config_only(tmp_path):
    import json

    from benchmarks.ssl_methods import _resume

    p = PROFILES["quick"]
    tasks = plan_tasks(p, tmp_path, tmp_path, ["supervised", "full", "lcc"], [0], [4], p.config, argparse.Namespace())
    meta = {"profile": "quick", "data": str(tmp_path), "config": {"iterations": 800}}
    path = tmp_path / "ssl.json"
    path.write_text(json.dumps({**meta, "runs": [_run("full", "all", 0, 0.9), _run("lcc", 8, 0, 0.7)]}))
    kept, todo = _resume(path, meta, tasks)
    assert [r["method"] for r in kept] == ["full"]  # lcc was for another labeled count
    assert sorted(t["method"] for t in todo) == ["lcc", "supervised"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**meta, "runs": [_run("lcc", 4, 0, 0.75), _run("full", "all", 0, 0.1)]}))
    kept, todo = _resume([path, other], meta, tasks)
    assert sorted(r["method"] for r in kept) == ["full", "lcc"] and [t["method"] for t in todo] == ["supervised"]
    assert [r["test"]["dice"] for r in kept if r["method"] == "full"] == [0.9]  # the first file wins
    # The table says which runs this invocation's wall time covers and when the kept ones ran
    from benchmarks.ssl_methods import _wall_sentence

    assert {r["kept_from"] for r in kept} == {str(path), str(other)}
    sentence = _wall_sentence({"wall_seconds": 120, "runs": kept + [_run("supervised", 4, 0, 0.6)]})
    assert sentence.startswith("wall 2.0 min for the 1 runs of this invocation; 2 runs kept")
    assert _wall_sentence({"wall_seconds": 120, "runs": [_run("supervised", 4, 0, 0.6)]}) == "total wall 2.0 min."
    # A file written before a TrainConfig field existed reads it at its default (the behaviour before the field)
    path.write_text(json.dumps({**meta, "runs": [_run("full", "all", 0, 0.9)]}))
    kept, _ = _resume(path, {**meta, "config": {"iterations": 800, "reviewed_patch_share": 0.5}}, tasks)
    assert [r["method"] for r in kept] == ["full"]
    with pytest.raises(ValueError, match="another profile"):
        _resume(path, {**meta, "config": {"iterations": 800, "reviewed_patch_share": 0.25}}, tasks)
    path.write_text(json.dumps({**meta, "config": {"iterations": 400}, "runs": []}))
    with pytest.raises(ValueError, match="another profile"):
        _resume(path, meta, tasks)
    # A run trained with other method options or other row settings than its task is run again, not mixed in
    # (a run or file without the key had the defaults); the rows an option does not touch are kept.
    lcc_task = next(t for t in tasks if t["method"] == "lcc")
    lcc_task["method_options"] = {"consistency_weight": 0.3}
    path.write_text(json.dumps({**meta, "runs": [_run("full", "all", 0, 0.9), _run("lcc", 4, 0, 0.7)]}))
    kept, todo = _resume(path, meta, tasks)
    assert [r["method"] for r in kept] == ["full"] and sorted(t["method"] for t in todo) == ["lcc", "supervised"]
    path.write_text(json.dumps({**meta, "runs": [{**_run("lcc", 4, 0, 0.7), "method_options": {"consistency_weight": 0.3}}]}))
    kept, _ = _resume(path, meta, tasks)
    assert [r["method"] for r in kept] == ["lcc"]
    kept, _ = _resume(path, {**meta, "row_config": {"lcc": {"pretrain_iterations": 300}}}, tasks)
    assert kept == []
    # Options compare as the method reports them: a run recorded with every option kept, a default named explicitly
    # is the same run
    from SSLSegmentLib.ml.methods import get_method

    path.write_text(json.dumps({**meta, "runs": [{**_run("lcc", 4, 0, 0.7),
                                                  "method_options": get_method("lcc").options()}]}))
    lcc_task["method_options"] = {"consistency_weight": get_method("lcc").options()["consistency_weight"]}
    kept, _ = _resume(path, meta, tasks)
    assert [r["method"] for r in kept] == ["lcc"]


def test_method_options_come_from_the_profile_and_the_command_line(tmp_path):
    from benchmarks.ssl_methods import method_options

    p = PROFILES["la-quick"]
    copy_paste_rows = {"bcp": {"keep_labeled": True}, "brl-cp": {"keep_labeled": True}}
    assert method_options(p, argparse.Namespace()) == {"brl": {"beta": 0.3, "consistency_weight": 0.1}, **copy_paste_rows}
    args = argparse.Namespace(method_option=["brl:beta=0.5", "sgrs:consistency_weight=0.3"])
    assert method_options(p, args) == {"brl": {"beta": 0.5, "consistency_weight": 0.1}, "sgrs": {"consistency_weight": 0.3},
                                       **copy_paste_rows}
    assert PROFILES["la-quick"].method_options["brl"]["beta"] == 0.3  # the profile itself is untouched
    tasks = plan_tasks(p, tmp_path, tmp_path, ["full", "supervised", "brl", "sgrs"], [0], [4], p.config, args)
    by = {t["method"]: t["method_options"] for t in tasks}
    assert by == {"full": {}, "supervised": {}, "brl": {"beta": 0.5, "consistency_weight": 0.1}, "sgrs": {"consistency_weight": 0.3}}
    with pytest.raises(ValueError, match="--method-option takes ROW:KEY=VALUE"):
        method_options(p, argparse.Namespace(method_option=["beta=0.5"]))


def test_row_training_settings_come_from_the_profile_and_the_command_line(tmp_path):
    from benchmarks.ssl_methods import row_config

    p = PROFILES["la-quick"]
    before = copy.deepcopy(p.row_config)
    args = argparse.Namespace(row_config=["bcp:pretrain_iterations=1000", "supervised:lr=0.01"])
    assert row_config(p, args) == {**p.row_config, "bcp": {"pretrain_iterations": 1000}, "supervised": {"lr": 0.01}}
    assert p.row_config == before  # the profile itself is untouched
    tasks = plan_tasks(p, tmp_path, tmp_path, ["supervised", "bcp", "brl-cp"], [0], [4], p.config, args)
    by = {t["method"]: t["config"] for t in tasks}
    assert by["bcp"]["pretrain_iterations"] == 1000  # a training setting of that row only
    assert by["brl-cp"].get("pretrain_iterations", 0) == p.row_config.get("brl-cp", {}).get("pretrain_iterations", 0)
    assert by["supervised"]["lr"] == 0.01 and by["bcp"]["lr"] == p.config["lr"]
    with pytest.raises(ValueError, match="--row-config takes ROW:KEY=VALUE"):
        row_config(p, argparse.Namespace(row_config=["pretrain_iterations=1000"]))


def test_the_harness_finds_the_repository_it_lives_in():
    """Default data and result paths are relative to the repository root (benchmarks/ sits directly under it)."""
    from benchmarks import loop, ssl_methods, uncertainty

    for root in (loop.REPO, ssl_methods.REPO, uncertainty.ROOT):
        assert (root / "benchmarks" / "results").is_dir() and (root / "SSLSegmentLib").is_dir(), root


def test_a_row_variant_trains_its_method_with_the_profiles_options_and_its_own(tmp_path):
    from benchmarks.ssl_methods import ROW_VARIANTS

    p = PROFILES["la-quick"]
    assert ROW_VARIANTS["brl-cp"] == ("brl", {"copy_paste": True})
    tasks = plan_tasks(p, tmp_path, tmp_path, ["brl", "brl-cp", "bcp"], [0], [4], p.config, argparse.Namespace())
    by_row = {t["method"]: t for t in tasks}
    assert by_row["brl-cp"]["train_method"] == "brl" and by_row["bcp"]["train_method"] == "bcp"
    assert by_row["brl-cp"]["method_options"] == {**p.method_options["brl"], "copy_paste": True, "keep_labeled": True}
    assert by_row["brl"]["method_options"] == p.method_options["brl"]  # the plain row is untouched
    assert by_row["brl-cp"]["out_dir"] != by_row["brl"]["out_dir"]
    # A row's training settings are printed with the table
    runs = [_run("supervised", 4, 0, 0.6), _run("full", "all", 0, 0.9), _run("bcp", 4, 0, 0.8)]
    result = {"profile": "la-quick", "description": "d", "seeds": [0], "config": p.config, "profile_iterations": 2000,
              "environment": {"device": "cpu", "machine": "x86_64", "processor": "x86_64", "cpu_threads": 2,
                              "python": "3", "torch": "2", "monai": "1", "date": "today"},
              "methods": ["supervised", "full", "bcp"], "row_config": {"bcp": {"pretrain_iterations": 300}},
              "summary": summarize_runs(runs, ["supervised", "full", "bcp"], [4])}
    assert "bcp: pretrain_iterations = 300" in markdown_table(result)


def test_the_command_line_accepts_row_variants_and_refuses_unknown_names():
    from benchmarks.ssl_methods import unknown_rows

    assert unknown_rows(["full", "brl", "brl-cp", "bcp"]) == []
    assert unknown_rows(["brl-cp", "bcpp"]) == ["bcpp"]


def test_the_command_line_names_the_rows_it_knows_when_one_is_unknown(capsys):
    from benchmarks.ssl_methods import main

    with pytest.raises(SystemExit) as exit_:
        main(["--profile", "quick", "--methods", "supervised,bcpp", "brl"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "unknown method(s) ['bcpp']" in err and "available: full, bcp, brl" in err and "brl-cp" in err
