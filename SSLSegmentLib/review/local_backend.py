"""The one launcher of a backend on this machine: `sslsegment serve` and `sslsegment worker` on 127.0.0.1.

Used by the Slicer module ("Start on this computer", with Slicer's Python), by the benchmarks and by the tests.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from SSLSegmentLib.review.client import BackendUnavailable, SSLSegmentClient


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalBackend:
    """`sslsegment serve` and `sslsegment worker` on 127.0.0.1, as subprocesses of `python`.

    python: the interpreter (in Slicer: PythonSlicer, so the backend uses Slicer's packages and the GPU build of
    torch the PyTorch extension installed). pythonpath: folders that hold `SSLSegmentLib` and `training` (the
    module folder of an installed extension). Logs go to `log_dir`. The token is read from the datastore.
    """

    def __init__(self, datastore: str | os.PathLike, python: str | None = None, port: int | None = None,
                 with_worker: bool = True, pythonpath: list[str] | None = None, log_dir: str | os.PathLike | None = None,
                 env: dict | None = None, serve_args: list[str] | None = None, worker_args: list[str] | None = None):
        self.datastore = Path(datastore)
        self.python = python or sys.executable
        self.host = "127.0.0.1"
        self.port = int(port) if port else free_port(self.host)
        self.with_worker = with_worker
        self.pythonpath = [str(p) for p in (pythonpath or [])]
        self.log_dir = Path(log_dir) if log_dir else self.datastore.parent / f"{self.datastore.name}-logs"
        self.base_env = dict(env) if env is not None else dict(os.environ)
        self.serve_args = list(serve_args or [])
        self.worker_args = list(worker_args or [])
        self.processes: dict[str, subprocess.Popen] = {}
        self._logs: list = []
        self._stopped = False

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def commands(self) -> dict[str, list[str]]:
        base = [self.python, "-m", "training.cli"]
        cmds = {"serve": base + ["serve", "--datastore", str(self.datastore), "--host", self.host,
                                 "--port", str(self.port)] + self.serve_args}
        if self.with_worker:
            cmds["worker"] = base + ["worker", "--datastore", str(self.datastore)] + self.worker_args
        return cmds

    def _env(self) -> dict:
        env = dict(self.base_env)
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(self.pythonpath + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _spawn(self, name: str) -> None:
        popen_kw = {"start_new_session": True} if os.name == "posix" else {
            "creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
        log_file = open(self.log_dir / f"{name}.log", "ab")
        self._logs.append(log_file)
        self.processes[name] = subprocess.Popen(self.commands()[name], stdout=log_file, stderr=subprocess.STDOUT,
                                                env=self._env(), stdin=subprocess.DEVNULL, **popen_kw)

    def start(self) -> "LocalBackend":
        """Start the server; the worker follows once the server answers (the server creates the datastore)."""
        if self.processes:
            raise RuntimeError("the local backend is already started")
        self._stopped = False
        self.datastore.parent.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._spawn("serve")
        return self

    def token(self) -> str | None:
        path = self.datastore / ".sslsegment" / "token"
        return path.read_text().strip() if path.is_file() else None

    def failed(self) -> str | None:
        """A message if a process has exited, with the end of its log."""
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                tail = ""
                log_path = self.log_dir / f"{name}.log"
                if log_path.is_file():
                    tail = log_path.read_text(errors="replace")[-1500:]
                return f"`sslsegment {name}` exited with status {proc.returncode}:\n{tail}"
        return None

    def poll_ready(self) -> bool:
        """True once the server answers /health (non-blocking: one quick attempt)."""
        if self._stopped:
            raise RuntimeError("the local backend was stopped")
        failure = self.failed()
        if failure:
            raise RuntimeError(failure)
        try:
            SSLSegmentClient(self.base_url, timeout=2.0, retries=1).health()
        except BackendUnavailable:
            return False
        if self.with_worker and "worker" not in self.processes:
            self._spawn("worker")
        return True

    def wait_until_ready(self, timeout: float = 120.0, poll_s: float = 0.25) -> "LocalBackend":
        deadline = time.monotonic() + timeout
        while not self.poll_ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the local backend did not answer on {self.base_url} within {timeout} s "
                                   f"(logs: {self.log_dir})")
            time.sleep(poll_s)
        return self

    def client(self, **kwargs) -> SSLSegmentClient:
        return SSLSegmentClient(self.base_url, token=self.token(), **kwargs)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate both processes (and their children: each runs in its own process group)."""
        self._stopped = True
        for proc in self.processes.values():
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, getattr(signal, "SIGKILL", signal.SIGTERM))
                proc.wait(5)
        for fh in self._logs:
            fh.close()
        self.processes, self._logs = {}, []

    def running(self) -> bool:
        return bool(self.processes) and all(p.poll() is None for p in self.processes.values())

    def __enter__(self) -> "LocalBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig) -> None:
    try:
        if os.name == "posix":
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(signal.CTRL_BREAK_EVENT if sig == signal.SIGTERM else sig)
    except (ProcessLookupError, PermissionError, OSError):
        pass
