"""The loop benchmark's aggregate over seeds and its tables: the keys the checks read, the effort curve, retention."""

from __future__ import annotations

import pytest

from benchmarks.loop import aggregate, markdown


def _arm(dice, gain_vs_none, retention, effort):
    return {"dice": dice, "promoted": [True] * (len(dice) - 1), "gain": dice[-1] - dice[0], "gain_per_1000": None,
            "gain_vs_none": gain_vs_none, "gain_vs_none_per_1000": None, "fixed_per_1000": 100.0,
            "case_gain_per_1000": 0.01, "reviewed_voxels": effort[-1], "edited_voxels": 10, "retention": retention,
            "cumulative_effort": effort, "error_detection_final": {"auroc": 0.9, "top5_recall": 0.4}}


def _run(seed, guided_final):
    arms = {"uncertainty": _arm([0.70, 0.72, guided_final], guided_final - 0.71, 0.97, [0, 100, 200]),
            "none": _arm([0.70, 0.70, 0.71], 0.0, None, [0, 0, 0]),
            "whole_case": _arm([0.70, 0.74, 0.76], 0.05, None, [0, 3000, 6000])}
    return {"seed": seed, "summary": {"arms": arms, "teacher_dice": 0.70,
                                      "teacher_error_detection": {"auroc": 0.9, "top5_recall": 0.4, "error_rate": 0.01}}}


def test_the_aggregate_holds_per_seed_gains_retention_and_the_effort_curve():
    agg = aggregate([_run(0, 0.73), _run(1, 0.75)])
    assert agg["n_seeds"] == 2
    guided = agg["arms"]["uncertainty"]
    assert guided["dice"][0] == (0.70, 0.0) and guided["dice"][-1][0] == pytest.approx(0.74)
    assert guided["gain_vs_none_per_seed"] == pytest.approx([0.02, 0.04])
    assert guided["gain_vs_none"][0] == pytest.approx(0.03)
    assert guided["retention"] == (pytest.approx(0.97), 0.0)
    assert [e[0] for e in guided["cumulative_effort"]] == [0, 100, 200]
    assert agg["arms"]["none"]["retention"] == (None, None)  # no correction: nothing to retain
    assert agg["arms"]["whole_case"]["cumulative_effort"][-1][0] == 6000

    result = {"profile": "quick", "description": "d", "seeds": [0, 1], "aggregate": agg, "seconds": 1.0,
              "cpu_seconds": 1.0, "config": {"rounds": 2, "finetune": {}, "teacher": {}},
              "environment": {"machine": "x86_64", "processor": "x86_64", "cpu_threads": 1, "device": "cpu",
                              "python": "3", "torch": "2", "monai": "1", "date": "today"}}
    text = markdown(result)
    assert "## Test Dice against cumulative effort" in text
    assert "| whole-case labeling (most uncertain case, final label) | 0 → 70.00 | 3000 → 74.00 | 6000 → 76.00 |" in text
    guided_row = next(line for line in text.splitlines() if line.startswith("| uncertainty-guided (ours) | 0 →"))
    assert "97.0" in guided_row and "+2.00, +4.00" in guided_row


def _result(seeds, guided=0.73, config=None):
    runs = [{**_run(s, guided), "cpu_seconds": 10.0} for s in seeds]
    return {"profile": "quick", "description": "d", "seeds": seeds, "runs": runs, "aggregate": aggregate(runs),
            "seconds": 5.0 * len(seeds), "cpu_seconds": 10.0 * len(seeds),
            "config": config or {"rounds": 2, "finetune": {}, "teacher": {}},
            "environment": {"machine": "x86_64", "processor": "x86_64", "cpu_threads": 1, "device": "cpu",
                            "python": "3", "torch": "2", "monai": "1", "date": "today"}}


def test_merging_seed_groups_run_side_by_side_gives_the_aggregate_of_all_their_seeds(tmp_path, monkeypatch):
    import json

    import benchmarks.loop as loop

    monkeypatch.setattr(loop, "RESULTS", tmp_path)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result([2])))
    b.write_text(json.dumps(_result([0, 1], guided=0.75)))
    merged = loop.merge([a, b], "both")
    assert merged["seeds"] == [0, 1, 2] and merged["aggregate"]["n_seeds"] == 3
    assert merged["aggregate"]["arms"]["uncertainty"]["gain_vs_none_per_seed"] == pytest.approx([0.04, 0.04, 0.02])
    assert merged["seconds"] == 10.0 and merged["cpu_seconds"] == 30.0
    assert json.loads((tmp_path / "both.json").read_text())["seeds"] == [0, 1, 2]
    assert "the longest of 2 invocations run side by side" in (tmp_path / "both.md").read_text()

    b.write_text(json.dumps(_result([0, 2])))
    with pytest.raises(ValueError, match="seed 2 is in two of the files with the same arm"):
        loop.merge([a, b], "both")
    b.write_text(json.dumps(_result([0], config={"rounds": 4, "finetune": {}, "teacher": {}})))
    with pytest.raises(ValueError, match="another loop configuration"):
        loop.merge([a, b], "both")


def test_merging_arm_groups_of_one_seed_recomputes_the_gains_beyond_retraining(tmp_path, monkeypatch):
    import json

    import benchmarks.loop as loop

    monkeypatch.setattr(loop, "RESULTS", tmp_path)
    guided_only, rest = _result([0, 1]), _result([0, 1])
    for res, keep in ((guided_only, {"uncertainty"}), (rest, {"none", "whole_case"})):
        res["config"]["arms"] = sorted(keep)
        for run in res["runs"]:
            run["summary"]["arms"] = {a: v for a, v in run["summary"]["arms"].items() if a in keep}
            run["summary"]["arms"].get("uncertainty", {})["gain_vs_none"] = None  # its run had no none arm
            run["seconds"], run["data"] = 3.0, f"phantoms-s{run['seed']}"
    for run in rest["runs"]:
        run["summary"]["arms"]["none"]["dice"][-1] = 0.72
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(guided_only))
    b.write_text(json.dumps(rest))
    merged = loop.merge([a, b], "joined")
    assert merged["config"]["arms"] == ["uncertainty", "none", "whole_case"]
    guided = merged["aggregate"]["arms"]["uncertainty"]
    assert guided["gain_vs_none_per_seed"] == pytest.approx([0.01, 0.01])  # 0.73 against the other file's 0.72
    assert merged["runs"][0]["seconds"] == 6.0 and merged["runs"][0]["cpu_seconds"] == 20.0
    assert merged["seconds"] == 10.0  # the files' own 10 s beat a joined seed's 6 s here
    assert "the invocations of its arm groups added; 2 invocations" in (tmp_path / "joined.md").read_text()

    rest["runs"][1]["summary"]["teacher_dice"] = 0.69
    b.write_text(json.dumps(rest))
    with pytest.raises(ValueError, match="seed 1 started from another teacher"):
        loop.merge([a, b], "joined")
    rest["runs"] = rest["runs"][:1]
    b.write_text(json.dumps(rest))
    with pytest.raises(ValueError, match="different arms after merging"):
        loop.merge([a, b], "joined")


def test_the_report_says_how_its_retrains_were_sized():
    from benchmarks.report import retrain_words

    assert retrain_words({"finetune": {"iterations": 60, "lr": 0.003}}) == "fine-tune, 60 iterations"
    words = retrain_words({"finetune": {}})
    assert "None" not in words and "worker's schedule" in words


def test_the_loops_retrain_options_parse_as_json_and_are_checked_by_the_schedule():
    from benchmarks.loop import retrain_options

    assert retrain_options(["per_new_case=90", "eval_model=teacher"]) == {"per_new_case": 90, "eval_model": "teacher"}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        retrain_options(["per_new_case"])
    with pytest.raises(ValueError, match="unknown retrain setting"):
        retrain_options(["iterations=5"])


def test_the_loops_finetune_options_are_training_parameters_and_keep_the_schedule_in_the_report():
    from benchmarks.loop import _retrain_sentence, finetune_options

    assert finetune_options(["reviewed_patch_share=0.9"]) == {"reviewed_patch_share": 0.9}
    with pytest.raises(ValueError, match="unknown training parameter"):
        finetune_options(["per_new_case=90"])
    schedule = {"base_iterations": 60}
    sized = _retrain_sentence({"finetune": {"reviewed_patch_share": 0.9}, "retrain": schedule})
    assert "worker's schedule" in sized and "reviewed_patch_share" in sized
    assert "fixed by the request" in _retrain_sentence({"finetune": {"iterations": 60}, "retrain": schedule})
    assert "worker's schedule" in _retrain_sentence({"finetune": {}, "retrain": schedule})


def test_extra_validation_phantoms_leave_the_train_and_test_cases_of_the_four_case_split(tmp_path, monkeypatch):
    import json

    import SSLSegmentLib.data.phantoms as phantoms
    from benchmarks.loop import _phantoms

    small = phantoms.PhantomConfig(shape=(8, 16, 16))
    monkeypatch.setattr(phantoms, "PhantomConfig", lambda: small)
    four, ten = _phantoms(tmp_path, 3, 4), _phantoms(tmp_path, 3, 10)
    s4 = json.loads((four / "dataset.json").read_text())["splits"]
    s10 = json.loads((ten / "dataset.json").read_text())["splits"]
    assert (s10["train"], s10["test"]) == (s4["train"], s4["test"])
    assert len(s10["val"]) == 10 and s10["val"][:4] == s4["val"] and not set(s10["val"]) & set(s10["test"])
    for case in s4["test"]:  # the same volumes, not only the same names
        assert (ten / f"{case}.nrrd").read_bytes() == (four / f"{case}.nrrd").read_bytes()
    assert not list(tmp_path.glob("*.partial"))
