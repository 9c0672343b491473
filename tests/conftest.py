"""Shared fixtures: in-process nodes, real node processes, and real Kubo daemons on free loopback ports."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests

from app import create_app
from config import Config

ROOT = Path(__file__).resolve().parent.parent
KUBO_SCRIPT = ROOT / "scripts" / "kubo.sh"
NODE_START_SECONDS = 20
PAPER_HASH = "QmbWxSqxhZms74885xceSaiHVvdjqiVWrATtYUrrUnVE1K"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.1) -> Any:
    """Poll `condition` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(interval)


def paper_transaction(**overrides: Any) -> dict[str, Any]:
    return {"user_id": "xxxxx", "ipfs_hash": PAPER_HASH, "EHR_name": "MRI", **overrides}


# -- Kubo ----------------------------------------------------------------------

@dataclass
class Kubo:
    """A Kubo daemon of the test suite's own, with its own repo and ports, started by scripts/kubo.sh."""

    repo: Path
    api_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    swarm_port: int = field(default_factory=free_port)
    swarm_key: Path | None = None
    peers: list[str] = field(default_factory=list)  # "PEERID@SWARMPORT"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict[str, str]:
        env = {**os.environ, "KUBO_REPO": str(self.repo), "IPFS_PATH": str(self.repo),
               "IPFS_API_PORT": str(self.api_port), "IPFS_GATEWAY_PORT": str(self.gateway_port),
               "IPFS_SWARM_PORT": str(self.swarm_port), "KUBO_PEERS": " ".join(self.peers)}
        if self.swarm_key:
            env["KUBO_SWARM_KEY"] = str(self.swarm_key)
        return env

    def script(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(KUBO_SCRIPT), *args], env=self.env(), capture_output=True, text=True,
                              timeout=120, check=check)

    def start(self) -> "Kubo":
        self.script("start")
        return self

    def stop(self) -> None:
        self.script("stop")

    def ipfs(self, *args: str) -> str:
        binary = self.script("bin").stdout.strip()
        return subprocess.run([binary, *args], env=self.env(), capture_output=True, text=True, timeout=60,
                              check=True).stdout

    def rpc(self, command: str, **params: str) -> Any:
        response = requests.post(f"{self.api_url}/api/v0/{command}", params=params, timeout=30)
        response.raise_for_status()
        return response.json()

    def peer_id(self) -> str:
        return self.rpc("id")["ID"]

    def swarm_peer_addresses(self) -> list[str]:
        return [peer["Addr"] for peer in self.rpc("swarm/peers").get("Peers") or []]


@pytest.fixture(scope="session")
def kubo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kubo]:
    daemon = Kubo(tmp_path_factory.mktemp("kubo") / "repo").start()
    yield daemon
    daemon.stop()


# -- nodes in-process ----------------------------------------------------------

def node_config(data_dir: Path, **settings: Any) -> Config:
    """A node for tests: its own data dir, no background sync, one mining process."""
    defaults: dict[str, Any] = {"data_dir": str(data_dir), "sync_interval": 0.0, "mining_workers": 1,
                                "ipfs_api": f"http://127.0.0.1:{free_port()}", "ipfs_lookup_timeout": 2.0,
                                "peer_timeout": 2.0}
    return Config(**{**defaults, **settings})


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Build isolated in-process nodes: make_client(role="patient", **settings) -> Flask test client."""
    apps = []

    def make(**settings: Any) -> Any:
        app = create_app(node_config(tmp_path / f"node{len(apps)}", **settings))
        apps.append(app)
        client = app.test_client()
        client.node = app.extensions["emr_node"]
        return client

    yield make
    for app in apps:
        app.extensions["emr_node"].close()


@pytest.fixture
def client(make_client: Callable[..., Any]) -> Any:
    """A patient node whose IPFS daemon is absent: for everything that is not IPFS."""
    return make_client()


@pytest.fixture
def ipfs_client(make_client: Callable[..., Any], kubo: Kubo) -> Any:
    """A patient node talking to the test suite's real Kubo daemon."""
    return make_client(ipfs_api=kubo.api_url)


# -- node processes ------------------------------------------------------------

@dataclass
class NodeProcess:
    """A real `python app.py` process on a free port."""

    port: int
    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "NodeProcess":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), *self.args], env=self.env,
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
        log.close()
        deadline = time.monotonic() + NODE_START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"node on {self.port} exited: {self.log_path.read_text()[-2000:]}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                time.sleep(0.1)
        pytest.fail(f"node on {self.port} did not answer within {NODE_START_SECONDS}s")

    def stop(self, kill: bool = False) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=30, **kwargs)

    def chain(self) -> list[dict[str, Any]]:
        return self.get("/get_chain").json()["chain"]


@pytest.fixture
def spawn_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """spawn_node(role="patient", port=None, **settings) starts a node process; all are stopped after the test."""
    started: list[NodeProcess] = []

    def spawn(role: str = "patient", port: int | None = None, **settings: Any) -> NodeProcess:
        port = port or free_port()
        data_dir = tmp_path / f"node-{port}"
        settings = {"sync_interval": 0, "mining_workers": 1, "peer_timeout": 2,
                    "ipfs_api": f"http://127.0.0.1:{free_port()}", "data_dir": str(data_dir), **settings}
        args = ["--port", str(port), "--role", role]
        for name, value in settings.items():
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + flag[2:])
            else:
                args += [flag, str(value)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMR_")}
        node = NodeProcess(port, args, env, tmp_path / f"node-{port}.log").start()
        started.append(node)
        return node

    yield spawn
    for node in started:
        node.stop()


def dump(response: Any) -> str:
    """A response, for assertion messages."""
    try:
        return json.dumps(response.json(), indent=1)[:2000]
    except ValueError:
        return response.text[:2000]
