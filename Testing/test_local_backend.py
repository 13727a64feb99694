"""The one launcher of a local backend (SSLSegmentLib.review.local_backend), with real processes on 127.0.0.1:
start with a worker, health, a second worker, killing a worker's whole process group, stop() leaving nothing behind,
and a backend run from the layout the installed extension has (SSLSegmentLib/ next to the module, training/ in the
private SSLSegmentBackend/ folder) with only the PYTHONPATH the launcher sets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from SSLSegmentLib.review.client import BackendUnavailable, SSLSegmentClient
from SSLSegmentLib.review.local_backend import LocalBackend, kill_group, process_group_kwargs

ROOT = Path(__file__).resolve().parents[1]
WORKER_ARGS = ["--threads", "1", "--poll", "0.2", "--heartbeat", "0.5"]
THREADS = {"OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.skipif(os.name != "posix", reason="process groups are checked with POSIX calls")


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting for a parent that no longer exists to reap it."""
    if Path("/proc/self/stat").is_file():  # Linux: the state letter follows the command name in parentheses
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _group_empty(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _until(predicate, what: str, limit_s: float = 30.0):
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


def test_start_health_second_worker_kill_and_stop(tmp_path):
    store = tmp_path / "store"  # new: the server creates the datastore, the worker starts once the server answers
    backend = LocalBackend(store, worker_args=WORKER_ARGS, env_overrides=THREADS)
    with backend.start().wait_until_ready(timeout=60):
        assert SSLSegmentClient(backend.base_url).health()["status"] == "ok"
        assert backend.token and backend.client().info()["n_cases"] == 0
        first = backend.processes["worker"]
        assert backend.workers == [first] and backend.running()

        second = backend.start_worker()
        assert os.getpgid(second.pid) == second.pid  # it leads its own group
        _until(lambda: "on datastore" in (backend.log_dir / "worker1.log").read_text(), "the second worker to run")
        status = backend.kill_worker(second)
        assert status == -9 and second.returncode == -9  # reaped, killed by SIGKILL
        assert _group_empty(second.pid)
        assert backend.workers == [first] and first.poll() is None and backend.running()

        pids = [p.pid for p in backend.processes.values()]
        assert len(pids) == 2
    # Leaving the block stopped the server and the first worker, with their groups.
    assert backend.processes == {} and not backend.running()
    assert not any(_alive(pid) for pid in pids) and all(_group_empty(pid) for pid in pids)
    with pytest.raises(BackendUnavailable):
        SSLSegmentClient(backend.base_url, retries=1, timeout=2).health()
    with pytest.raises(RuntimeError, match="stopped"):
        backend.poll_ready()
    assert "== serve.log" in backend.log_tail() and "== worker1.log" in backend.log_tail()


def test_kill_group_ends_the_children_too(tmp_path):
    """What kill_worker and the worker's torchrun launch rely on: the children of the process die with it."""
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              **process_group_kwargs())
    child = int(parent.stdout.readline())
    assert _alive(child)
    assert kill_group(parent) == -9
    _until(lambda: not _alive(child), "the child to end")  # dead; reaping it is for whoever adopted it
    parent.stdout.close()


def test_a_failed_start_says_why_and_leaves_nothing_running(tmp_path):
    backend = LocalBackend(tmp_path / "store", with_worker=False, serve_args=["--no-such-option"], env_overrides=THREADS)
    backend.start()
    server = backend.server
    with pytest.raises(RuntimeError, match="exited with status"):
        backend.wait_until_ready(timeout=60)
    assert server.poll() is not None and backend.processes == {}


def _stage_like_the_extension(module_dir: Path) -> tuple[Path, Path]:
    """What SSLSegment/CMakeLists.txt stages: SSLSegmentLib/ next to the module, training/ under SSLSegmentBackend/."""
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "SSLSegmentLib", module_dir / "SSLSegmentLib", ignore=skip)
    shutil.copytree(ROOT / "training", module_dir / "SSLSegmentBackend" / "training", ignore=skip)
    return module_dir, module_dir / "SSLSegmentBackend"


def test_backend_runs_from_the_installed_layout(tmp_path):
    """With the repository off PYTHONPATH and the working folder outside it, the processes import the staged copies.

    The project is also installed in editable mode in this environment, so a served /health alone would not show
    where the code came from; the bytecode the processes write next to the sources they import does."""
    lib_dir, backend_dir = _stage_like_the_extension(tmp_path / "qt-scripted-modules")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONHOME")}
    work = tmp_path / "work"
    backend = LocalBackend(tmp_path / "store", pythonpath=[lib_dir, backend_dir], env=env, env_overrides=THREADS,
                           worker_args=WORKER_ARGS, cwd=work, log_dir=work / "logs")
    assert backend.environment()["PYTHONPATH"] == os.pathsep.join([str(lib_dir), str(backend_dir)])
    with backend.start().wait_until_ready(timeout=60):
        assert backend.client().health()["status"] == "ok"
        _until(lambda: "on datastore" in (backend.log_dir / "worker.log").read_text(), "the worker to run")

        def compiled(folder: Path, module: str) -> bool:
            return any((folder / "__pycache__").glob(f"{module}.*.pyc"))

        assert compiled(backend_dir / "training", "server") and compiled(backend_dir / "training", "worker")
        assert compiled(lib_dir / "SSLSegmentLib" / "review", "client")
        assert not (lib_dir / "training").exists()  # the backend package is not beside the module on sys.path
        # The same interpreter, environment and folder the processes had, asked where the packages come from.
        where = subprocess.run([backend.python, "-c", "import training, SSLSegmentLib; "
                                "print(training.__file__); print(SSLSegmentLib.__file__)"],
                               env=backend.environment(), cwd=work, capture_output=True, text=True, check=True)
        assert where.stdout.split() == [str(backend_dir / "training" / "__init__.py"),
                                        str(lib_dir / "SSLSegmentLib" / "__init__.py")]


def test_windows_children_get_no_console_and_are_stopped_as_a_tree():
    """What a Windows Slicer needs (checked here as the calls made; the in-Slicer self-test runs them): children
    in their own group without a console window, and a stop that ends the whole tree (PythonSlicer.exe is only a
    launcher), never a console break that cannot reach them."""
    from SSLSegmentLib.review.local_backend import (CREATE_NEW_PROCESS_GROUP, CREATE_NO_WINDOW, process_group_kwargs,
                                                    tree_kill_command)

    kwargs = process_group_kwargs("nt")
    assert kwargs["creationflags"] == CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW == 0x08000200
    assert process_group_kwargs("posix") == {"start_new_session": True}
    assert tree_kill_command(4242) == ["taskkill", "/F", "/T", "/PID", "4242"]


def test_a_stop_that_times_out_returns_instead_of_raising(tmp_path):
    import signal
    import subprocess
    import sys

    from SSLSegmentLib.review.local_backend import kill_group, process_group_kwargs

    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
                                stdout=subprocess.PIPE, **process_group_kwargs())
    assert stubborn.stdout.readline().strip() == b"ready"
    assert kill_group(stubborn, signal.SIGTERM, timeout=0.5) is None  # ignored: the caller is not stuck
    assert kill_group(stubborn) == -signal.SIGKILL
