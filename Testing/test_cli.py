"""The `sslsegment` command line, end to end on tiny phantoms, and its errors."""

import json
import shutil
import subprocess
import sys

from conftest import TINY_NET
from SSLSegmentLib.data.volume import Geometry, Volume
from SSLSegmentLib.data.imageio import read_volume, write_volume
from training.cli import main


def _run(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_methods_lists_the_registered_methods():
    out = subprocess.run([sys.executable, "-m", "training.cli", "methods"], capture_output=True, text=True, check=True).stdout
    for name in ("supervised", "mean-teacher", "ua-mt", "brl"):
        assert name in out


def test_make_phantoms_train_infer_evaluate(tmp_path, capsys):
    data = tmp_path / "data"
    assert _run(["make-phantoms", str(data), "--train", "4", "--val", "1", "--test", "1", "--shape", "24", "32", "32"], capsys)[0] == 0
    assert len(json.loads((data / "dataset.json").read_text())["splits"]["train"]) == 4
    net = ["--channels", *map(str, TINY_NET["channels"]), "--patch", "16", "32", "32"]
    rc, out, err = _run(["train", "--data", str(data), "--method", "brl", "--labeled", "2", "--iterations", "6",
                         "--val-interval", "3", "--out", str(tmp_path / "run"), *net], capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["n_labeled"] == 2 and result["data"]["labeled"] == result["data"]["train"][:2]
    assert "dice" in result["test"]["summary"] and result["seed"] == 0
    image = data / f"{result['data']['val'][0]}.nrrd"
    rc, out, err = _run(["infer", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--image", str(image),
                         "--out", str(tmp_path / "pred"), "--passes", "2"], capsys)
    assert rc == 0, err
    src = read_volume(image)
    for name in ("label", "probability", "entropy", "mutual_information"):
        vol = read_volume(tmp_path / "pred" / f"{name}.nrrd")
        assert vol.shape == src.shape and vol.geometry.matches(src.geometry)
    rc, out, err = _run(["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--data", str(data),
                         "--out", str(tmp_path / "eval.json")], capsys)
    assert rc == 0 and "dice" in out
    assert len(json.loads((tmp_path / "eval.json").read_text())["cases"]) == 1


def test_user_errors_are_clear_and_exit_2(tmp_path, capsys, tiny_dataset):
    rc, _, err = _run(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "does not exist" in err
    rc, _, err = _run(["train", "--data", str(tiny_dataset), "--method", "magic", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "unknown method 'magic'" in err
    bad = tmp_path / "bad.nrrd"
    bad.write_text("garbage")
    rc, _, err = _run(["make-phantoms", str(tmp_path / "p"), "--train", "1", "--val", "0", "--test", "0", "--shape", "8", "16", "16"], capsys)
    rc, _, err = _run(["infer", "--checkpoint", str(tmp_path / "none.pt"), "--image", str(bad), "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "none.pt" in err


def test_unreadable_image_and_mismatched_label_in_a_dataset(tmp_path, capsys, tiny_dataset):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    meta = json.loads((data / "dataset.json").read_text())
    first = meta["splits"]["train"][0]
    (data / f"{first}.nrrd").write_bytes(b"broken")
    rc, _, err = _run(["train", "--data", str(data), "--labeled", "2", "--iterations", "2", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "not a readable image" in err and first in err
    shutil.rmtree(data)
    shutil.copytree(tiny_dataset, data)
    label_path = data / "labels" / "final" / f"{first}.nrrd"
    lab = read_volume(label_path)
    write_volume(Volume(lab.array, Geometry((9.0, 9.0, 9.0))), label_path)
    rc, _, err = _run(["train", "--data", str(data), "--labeled", "2", "--iterations", "2", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "geometry does not match" in err
