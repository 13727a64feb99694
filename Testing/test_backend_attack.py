"""The reduced attack on the live backend (benchmarks/backend_attack.py --quick): a slice of every category of
malformed request, a damaged checkpoint promoted, a diverging job, corrections sent at once and across a
server kill. Nothing bad may get through, nothing acknowledged may be lost, nothing may be left behind."""

from __future__ import annotations

from benchmarks.backend_attack import run_attack


def test_the_quick_attack_finds_nothing(tmp_path):
    r = run_attack(tmp_path / "attack", quick=True, log=lambda message: None)
    h, m = r["headline"], r["malformed"]
    bad = [row for row in m["rows"] if row["outcome"] != "refused"]
    assert h["tried"] >= 40 and len(m["by_category"]) == 5  # every category is in the slice
    assert h["5xx"] == 0 and h["accepted"] == 0 and h["no answer"] == 0 and not bad, bad
    assert h["refused requests that reached storage"] == 0 and m["clean"], (m["reached storage"], m["datastore check"])
    assert h["faults tried"] == 2 and h["faults survived"] == 2, [(f["name"], f["checks"]) for f in r["faults"]]
    assert h["submissions acknowledged"] == 24 and h["submissions lost"] == 0 and h["submissions duplicated"] == 0
    assert h["server kills during submissions"] == 1 and h["datastore clean at the end"]
