"""What every measurement of bench/run.py shares: processes, a lean HTTP client, statistics, memory.

Processes are started only through scripts/cluster.py (Kubo: a loopback-only repo via
scripts/kubo.sh; NodeProcess: `python app.py`), on free 127.0.0.1 ports, and stopped by
their own handles (never by name).
"""
from __future__ import annotations

import http.client
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.cluster import Kubo, NodeProcess, free_port, node_args, write_sample_record  # noqa: E402,F401 (re-exported)

BENCH_MAX_PENDING = 10_000_000

MB = 1_000_000
MIB = 1024 * 1024
SAMPLE_SIZE = 63_795  # the paper's 62.3 KB MRI report (write_sample_record)
HTTP_TIMEOUT = 600.0


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- statistics ------------------------------------------------------------------

def quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarize(values: Iterable[float], scale: float = 1.0) -> dict[str, Any]:
    """n, median, mean, p95, p99, min, max, q1, q3 of `values` times `scale`."""
    ordered = sorted(v * scale for v in values)
    if not ordered:
        return {"n": 0}
    return {"n": len(ordered), "median": quantile(ordered, 0.5), "mean": statistics.fmean(ordered),
            "p95": quantile(ordered, 0.95), "p99": quantile(ordered, 0.99), "min": ordered[0], "max": ordered[-1],
            "q1": quantile(ordered, 0.25), "q3": quantile(ordered, 0.75)}


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


# -- a lean keep-alive HTTP client -------------------------------------------------

class Http:
    """One keep-alive HTTP/1.1 connection; reconnects once if the server closed it.

    Deliberately thin (http.client), so the client's own cost is small and the same
    for the node and for Kubo's RPC API when the two are compared.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = HTTP_TIMEOUT) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                sink: bool = False) -> tuple[int, bytes | int]:
        """(status, body), or (status, byte count) with sink=True (the body is read and dropped)."""
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=headers or {})
                response = conn.getresponse()
                if sink:
                    count = 0
                    while chunk := response.read(1024 * 1024):
                        count += len(chunk)
                    data: bytes | int = count
                else:
                    data = response.read()
                if response.will_close:
                    self.close()
                return response.status, data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, body: Any = None, expect: tuple[int, ...] = (200, 201),
             headers: dict[str, str] | None = None) -> Any:
        payload = None if body is None else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})} if payload is not None else dict(headers or {})
        status, data = self.request(method, path, payload, hdrs)
        assert isinstance(data, bytes)
        if status not in expect:
            raise RuntimeError(f"{method} {path} on port {self.port} answered {status}: {data[:500]!r}")
        return json.loads(data) if data else None

    def timed(self, method: str, path: str, body: Any = None, expect: tuple[int, ...] = (200, 201),
              headers: dict[str, str] | None = None) -> tuple[float, Any]:
        start = time.perf_counter()
        result = self.json(method, path, body, expect, headers)
        return time.perf_counter() - start, result


def multipart(field_name: str, file_name: str, data: bytes) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body holding one file, as curl -F and Postman send it."""
    boundary = "bench" + uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field_name}\"; filename=\"{file_name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(len(body))}


# -- memory and CPU of a process (Linux /proc) -------------------------------------------

def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss(pid: int) -> bool:
    """Reset the process's RSS high-water mark (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(pid: int) -> int | None:
    kib = proc_status_kib(pid, "VmHWM")
    return None if kib is None else kib * 1024


def rss_bytes(pid: int) -> int | None:
    kib = proc_status_kib(pid, "VmRSS")
    return None if kib is None else kib * 1024


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds."""
    split = cpu_split(pid)
    return None if split is None else split[0] + split[1]


def cpu_split(pid: int) -> tuple[float, float] | None:
    """(utime, stime) of a process, in seconds: its own code, and the kernel's work for it (copies, syscalls)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick
    except (OSError, ValueError, IndexError):
        return None


class PeakWatch:
    """Peak RSS of some processes over a block of code (VmHWM, reset at the start)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peaks: dict[str, int | None] = {}
        self.reset_ok: dict[str, bool] = {}

    def __enter__(self) -> "PeakWatch":
        self.reset_ok = {name: reset_peak_rss(pid) for name, pid in self.pids.items()}
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peaks = {name: peak_rss_bytes(pid) for name, pid in self.pids.items()}


# -- processes ---------------------------------------------------------------------

@dataclass
class Cluster:
    """Every Kubo daemon and node process the bench starts, so all are stopped at the end."""

    workdir: Path
    daemons: list[Kubo] = field(default_factory=list)
    nodes: list[NodeProcess] = field(default_factory=list)
    others: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def kubo(self, name: str) -> Kubo:
        daemon = Kubo(self.workdir / "kubo" / name)
        self.daemons.append(daemon)
        daemon.start()
        return daemon

    def stop_kubo(self, daemon: Kubo, remove_repo: bool = True) -> None:
        try:
            daemon.stop()
        finally:
            if daemon in self.daemons:
                self.daemons.remove(daemon)
            if remove_repo:
                shutil.rmtree(daemon.repo, ignore_errors=True)

    def node(self, name: str, ipfs: Kubo | None, role: str = "patient", port: int | None = None,
             **settings: Any) -> NodeProcess:
        port = port or free_port()
        data_dir = Path(settings["data_dir"]) if settings.get("data_dir") else self.workdir / "nodes" / name
        # The load runs add thousands of transactions a second and mine only between runs: no pending limit
        # (max_pending, there for a node under attack) may stand in the way of what they measure.
        base: dict[str, Any] = {"data_dir": str(data_dir), "sync_interval": 0, "max_pending": BENCH_MAX_PENDING,
                                "ipfs_api": ipfs.api_url if ipfs else f"http://127.0.0.1:{free_port()}"}
        process = NodeProcess(port, node_args(role, **{**base, **settings}), self.workdir / "logs" / f"{name}.log")
        self.nodes.append(process)
        process.start()
        process.data_dir = data_dir  # type: ignore[attr-defined]
        return process

    def stop_node(self, process: NodeProcess) -> None:
        process.stop()
        if process.pid:
            end_session(process.pid)
        if process in self.nodes:
            self.nodes.remove(process)

    def dev_server(self, name: str, ipfs: Kubo, **settings: Any) -> "DevServer":
        """The same app under Flask's development server (threaded=True), in its own process."""
        port = free_port()
        data_dir = self.workdir / "nodes" / name
        args = node_args("patient", **{"data_dir": str(data_dir), "sync_interval": 0, "ipfs_api": ipfs.api_url,
                                       "port": port, "max_pending": BENCH_MAX_PENDING, **settings})
        code = ("import logging, signal, sys\n"
                "from app import create_app\n"
                "from config import load_config\n"
                f"config = load_config({args!r})\n"
                "logging.basicConfig(level=config.log_level, stream=sys.stderr,"
                " format='%(asctime)s %(levelname)s [%(name)s] %(message)s')\n"
                "app = create_app(config)\n"
                "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
                "try:\n"
                "    app.run(host='127.0.0.1', port=config.port, threaded=True)\n"
                "finally:\n"
                "    app.extensions['emr_node'].close()  # its mining processes\n")
        log_path = self.workdir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMR_")}
        with open(log_path, "ab") as out:
            process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.others.append(process)
        server = DevServer(port, process)
        wait_for_health(port, process, log_path)
        return server

    def stop_process(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        end_session(process.pid)
        if process in self.others:
            self.others.remove(process)

    def stop_all(self) -> None:
        for process in list(self.others):
            self.stop_process(process)
        for node in list(self.nodes):
            try:
                self.stop_node(node)
            except Exception as exc:  # keep stopping the rest
                log(f"could not stop node {node.port}: {exc}")
        for daemon in list(self.daemons):
            try:
                self.stop_kubo(daemon)
            except Exception as exc:
                log(f"could not stop Kubo {daemon.repo}: {exc}")


def end_session(pid: int) -> None:
    """Stop what is left of a process group we started (start_new_session: its id is the leader's pid).

    A node that dies without closing its Blockchain (killed, or Flask's dev server) leaves its
    mining processes running: they do not exit with their parent.
    """
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class DevServer:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def wait_for_health(port: int, process: subprocess.Popen[bytes], log_path: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server on {port} exited: {log_path.read_text()[-2000:]}")
        try:
            status, _ = Http(port, timeout=2).request("GET", "/health")
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server on {port} did not answer within {seconds}s (log {log_path})")


def kubo_version(daemon: Kubo) -> str:
    try:
        return str(daemon.rpc("version").get("Version"))
    except Exception as exc:  # the version is a label, not a measurement
        return f"unknown ({type(exc).__name__})"


def kubo_pid(daemon: Kubo) -> int | None:
    try:
        return int((daemon.repo / "daemon.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def interleaved(names: list[str], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, name) with the order rotated each round, so no side always goes first."""
    for number in range(rounds):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            yield number, name


def timed_call(function: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


__all__ = ["ROOT", "MB", "MIB", "SAMPLE_SIZE", "Cluster", "DevServer", "Http", "Kubo", "NodeProcess", "PeakWatch",
           "cpu_seconds", "cpu_split", "free_port", "interleaved", "kubo_pid", "kubo_version", "log", "multipart", "node_args",
           "peak_rss_bytes", "quantile", "ratio", "reset_peak_rss", "rss_bytes", "summarize", "timed_call",
           "wait_for_health", "write_sample_record"]
