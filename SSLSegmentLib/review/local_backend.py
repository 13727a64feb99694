"""The one launcher of a backend on this machine: `sslsegment serve` and `sslsegment worker` on 127.0.0.1.

Used by the Slicer module ("Start on this computer", with Slicer's Python), by the benchmarks and by the tests. The
helpers beside it are the one place that picks a free loopback port and signals or stops a process together with
its children (each launched process leads its own process group); the worker's `torchrun` launch uses them too.

Standard library only: this module runs inside Slicer's Python.
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

# Windows has no SIGKILL and no process groups a signal can reach from another console (Slicer has none): there a
# stop ends the whole process tree (taskkill /T; psutil when Slicer's Python has it, as SlicerMONAIAuto3DSeg does).
KILL = getattr(signal, "SIGKILL", signal.SIGTERM)
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000  # no console window pops up for a child of a GUI application


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it; the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_group_kwargs(platform: str = os.name) -> dict:
    """Popen arguments that make the child lead a new process group (POSIX: a new session, so one signal reaches
    its children too; Windows: its own group, no console window, hidden as slicer.util starts processes)."""
    if platform == "posix":
        return {"start_new_session": True}
    kwargs = {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW}
    if hasattr(subprocess, "STARTUPINFO"):
        info = subprocess.STARTUPINFO()
        info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
        info.wShowWindow = 0  # SW_HIDE
        kwargs["startupinfo"] = info
    return kwargs


def tree_kill_command(pid: int) -> list[str]:
    """Windows: end `pid` and every process it started (PythonSlicer.exe is a launcher: its python-real child is
    the server, and stopping the launcher alone would orphan it)."""
    return ["taskkill", "/F", "/T", "/PID", str(int(pid))]


def _kill_tree_windows(proc: subprocess.Popen) -> None:
    try:
        import psutil  # Slicer's Python usually has it
    except ImportError:
        subprocess.run(tree_kill_command(proc.pid), capture_output=True, timeout=30,
                       creationflags=CREATE_NO_WINDOW)
        return
    try:
        parent = psutil.Process(proc.pid)
        for child in parent.children(recursive=True) + [parent]:
            child.kill()
    except psutil.Error:
        pass


def signal_group(proc: subprocess.Popen, sig: int, platform: str = os.name) -> None:
    """Send `sig` to the process group `proc` leads (Windows: end its process tree); a group that is already gone
    is not an error."""
    try:
        if platform == "posix":
            os.killpg(proc.pid, sig)
        else:
            _kill_tree_windows(proc)
    except (ProcessLookupError, PermissionError, OSError, subprocess.SubprocessError):
        pass


def kill_group(proc: subprocess.Popen, sig: int = KILL, timeout: float | None = 30.0) -> int | None:
    """Signal the whole group `proc` leads (SIGKILL by default) and reap `proc`; returns its exit status, or None if
    it has not ended within `timeout` s (never raises, so a stop cannot leave the caller stuck)."""
    signal_group(proc, sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def stop_groups(procs, timeout: float = 10.0) -> None:
    """SIGTERM every group, wait up to `timeout` s in all, then SIGKILL the groups still running; all reaped."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_group(proc, timeout=5)


class LocalBackend:
    """`sslsegment serve` and `sslsegment worker` on 127.0.0.1, as subprocesses of `python`.

    python: the interpreter (in Slicer: PythonSlicer, so the backend uses Slicer's packages and the GPU build of
    torch the PyTorch extension installed). pythonpath: folders put first on the processes' PYTHONPATH, those that
    hold `SSLSegmentLib` and `training` (in an installed extension: the module folder and its private backend
    folder). env: the processes' environment (default: this process's); env_overrides: variables set on top of it.
    serve_args / worker_args: extra command-line arguments. Logs go to `log_dir`, one file per process. cwd: the
    processes' working folder (default: this process's); `python -m` puts it first on sys.path, so a folder that
    holds a stray `training/` must not be it. The token is the one the server keeps in the datastore.

    `start()` launches the server; `poll_ready()` (one quick attempt, for a GUI timer) or `wait_until_ready()`
    (blocking) report when it answers, and then launch the worker, so the worker never races the server creating a
    new datastore. Use as a context manager to stop both on leaving.
    """

    def __init__(self, datastore: str | os.PathLike, python: str | None = None, port: int | None = None,
                 with_worker: bool = True, pythonpath: list[str] | None = None, log_dir: str | os.PathLike | None = None,
                 env: dict | None = None, serve_args: list[str] | None = None, worker_args: list[str] | None = None,
                 env_overrides: dict | None = None, cwd: str | os.PathLike | None = None):
        self.datastore = Path(datastore).absolute()  # the processes may run in another folder (cwd)
        self.python = python or sys.executable
        self.host = "127.0.0.1"
        self.port = int(port) if port else free_port(self.host)
        self.with_worker = with_worker
        self.pythonpath = [str(p) for p in (pythonpath or [])]
        self.log_dir = Path(log_dir) if log_dir else self.datastore.parent / f"{self.datastore.name}-logs"
        self.base_env = dict(env) if env is not None else dict(os.environ)
        self.base_env.update({k: str(v) for k, v in (env_overrides or {}).items()})
        self.serve_args = list(serve_args or [])
        self.worker_args = list(worker_args or [])
        self.cwd = Path(cwd) if cwd else None
        self.processes: dict[str, subprocess.Popen] = {}  # name (its log file's stem) -> process, while it runs
        self._n_workers = 0
        self._stopped = False

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def token(self) -> str | None:
        """The datastore's bearer token (the server creates it when it first starts on the datastore)."""
        path = self.datastore / ".sslsegment" / "token"
        return path.read_text().strip() if path.is_file() else None

    @property
    def server(self) -> subprocess.Popen | None:
        return self.processes.get("serve")

    @property
    def workers(self) -> list[subprocess.Popen]:
        return [p for name, p in self.processes.items() if name != "serve"]

    def commands(self) -> dict[str, list[str]]:
        """The server's command line, and the first worker's if this backend has one."""
        base = [self.python, "-m", "training.cli"]
        cmds = {"serve": base + ["serve", "--datastore", str(self.datastore), "--host", self.host,
                                 "--port", str(self.port)] + self.serve_args}
        if self.with_worker:
            cmds["worker"] = self._worker_command()
        return cmds

    def _worker_command(self, *extra: str) -> list[str]:
        return [self.python, "-m", "training.cli", "worker", "--datastore", str(self.datastore),
                *self.worker_args, *extra]

    def environment(self) -> dict:
        """The environment the backend's processes get (also right for other `training.cli` commands)."""
        env = dict(self.base_env)
        if self.pythonpath:
            paths = list(dict.fromkeys(self.pythonpath))
            env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.cwd is not None:
            self.cwd.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log_file:  # the child keeps its own copy of the handle
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=self.environment(),
                                    stdin=subprocess.DEVNULL, cwd=self.cwd, **process_group_kwargs())
        self.processes[name] = proc
        return proc

    def start(self) -> "LocalBackend":
        """Start the server; the worker follows once the server answers (the server creates the datastore)."""
        if self.processes:
            raise RuntimeError("the local backend is already started")
        self._stopped = False
        self._n_workers = 0
        self.datastore.parent.mkdir(parents=True, exist_ok=True)
        self._spawn("serve", self.commands()["serve"])
        return self

    def start_worker(self, *extra: str) -> subprocess.Popen:
        """Start a `sslsegment worker` (worker_args, then `extra`). Logs: worker.log for the first, then worker1.log,
        worker2.log, ... (numbered by start order, so a killed worker's log is never reused)."""
        if self._stopped:
            raise RuntimeError("the local backend was stopped")
        name = "worker" if self._n_workers == 0 else f"worker{self._n_workers}"
        self._n_workers += 1
        return self._spawn(name, self._worker_command(*extra))

    def kill_worker(self, proc: subprocess.Popen | None = None, sig: int = KILL) -> int:
        """Signal a worker's whole process group (its torchrun children too; default: the last started worker, with
        SIGKILL) and reap it. Returns its exit status."""
        workers = self.workers
        if proc is None:
            if not workers:
                raise RuntimeError("no worker is running")
            proc = workers[-1]
        status = kill_group(proc, sig)
        self.processes = {name: p for name, p in self.processes.items() if p is not proc}
        return status

    def kill_server(self, sig: int = KILL) -> int | None:
        """Signal the server's process group (SIGKILL by default: a crash) and reap it; the workers keep running.
        Returns its exit status."""
        proc = self.processes.pop("serve", None)
        if proc is None:
            raise RuntimeError("no server is running")
        return kill_group(proc, sig)

    def restart_server(self) -> subprocess.Popen:
        """Start `sslsegment serve` again on the same port and datastore (after `kill_server`); `poll_ready()` or
        `wait_until_ready()` say when it answers. Its log goes on in serve.log."""
        if self._stopped:
            raise RuntimeError("the local backend was stopped")
        if "serve" in self.processes:
            raise RuntimeError("the server is running")
        return self._spawn("serve", self.commands()["serve"])

    def failed(self) -> str | None:
        """A message if a process has exited, with the end of its log."""
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                return f"`sslsegment {name}` exited with status {proc.returncode}:\n{self._tail(name)}"
        return None

    def _tail(self, name: str, n: int = 1500) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-n:] if path.is_file() else ""

    def log_tail(self, n: int = 3000) -> str:
        """The end of every log file in log_dir, each under its name."""
        if not self.log_dir.is_dir():
            return ""
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in sorted(self.log_dir.glob("*.log")))

    def poll_ready(self) -> bool:
        """True once the server answers /health (non-blocking: one quick attempt); then the worker starts."""
        if self._stopped:
            raise RuntimeError("the local backend was stopped")
        failure = self.failed()
        if failure:
            raise RuntimeError(failure)
        try:
            SSLSegmentClient(self.base_url, timeout=2.0, retries=1).health()
        except BackendUnavailable:
            return False
        if self.with_worker and self._n_workers == 0:
            self.start_worker()
        return True

    def wait_until_ready(self, timeout: float = 120.0, poll_s: float = 0.25) -> "LocalBackend":
        """Block until poll_ready() is true. On a timeout or an exited process, stop what was started and raise."""
        deadline = time.monotonic() + timeout
        try:
            while not self.poll_ready():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the local backend did not answer on {self.base_url} within {timeout} s "
                                       f"(logs: {self.log_dir}):\n{self._tail('serve')}")
                time.sleep(poll_s)
        except BaseException:
            self.stop()
            raise
        return self

    def client(self, **kwargs) -> SSLSegmentClient:
        return SSLSegmentClient(self.base_url, token=self.token, **kwargs)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate every process with its children (SIGTERM, then SIGKILL after `timeout` s) and reap them."""
        self._stopped = True
        stop_groups(self.processes.values(), timeout)
        self.processes = {}

    def running(self) -> bool:
        return bool(self.processes) and all(p.poll() is None for p in self.processes.values())

    def __enter__(self) -> "LocalBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
