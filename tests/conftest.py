"""Shared fixtures: in-process nodes, real node processes, and real Kubo daemons on free loopback ports."""
from __future__ import annotations

import ipaddress
import json
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from app import create_app
from config import Config
from scripts.cluster import Kubo, NodeProcess, describe_node, free_port, node_args, write_members_file

PAPER_HASH = "QmbWxSqxhZms74885xceSaiHVvdjqiVWrATtYUrrUnVE1K"
# Fixtures that start real daemons or node processes: a test using one is "slow", left out of `make test-fast`.
SLOW_FIXTURES = frozenset({"kubo", "ipfs_client", "spawn_node", "fuzzed_app", "signed_network"})
RECEIVE_CHUNK = 4 * 1024 * 1024  # how much read_answer takes from a socket at once


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())) or item.get_closest_marker("process"):
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail any test whose in-process code tries to connect beyond the loopback range (the machine's hard rule)."""
    real_connect = socket.socket.connect
    attempts: list[Any] = []

    def connect(sock: socket.socket, address: Any) -> Any:
        if isinstance(address, tuple) and not ipaddress.ip_address(address[0].split("%")[0]).is_loopback:
            attempts.append(address)
            raise ConnectionRefusedError(f"test guard: {address[0]} is not a loopback address")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    yield
    assert not attempts, f"tried to connect beyond loopback: {attempts}"


# -- Kubo ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def kubo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kubo]:
    daemon = Kubo(tmp_path_factory.mktemp("kubo") / "repo").start()
    yield daemon
    daemon.stop()


# -- nodes in-process ----------------------------------------------------------

def node_settings(default_data_dir: Path, /, **settings: Any) -> dict[str, Any]:
    """A node for tests: its own data dir, no background sync, one mining process, short waits,
    and no IPFS daemon unless the test gives one."""
    return {"data_dir": str(default_data_dir), "sync_interval": 0.0, "mining_workers": 1, "peer_timeout": 2.0,
            "ipfs_api": f"http://127.0.0.1:{free_port()}", "ipfs_lookup_timeout": 2.0, **settings}


def node_config(data_dir: Path, **settings: Any) -> Config:
    return Config(**node_settings(data_dir, **settings))


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

@pytest.fixture
def spawn_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """spawn_node(role="patient", port=None, **settings) starts a node process; all are stopped after the test."""
    started: list[NodeProcess] = []

    def spawn(role: str = "patient", port: int | None = None, **settings: Any) -> NodeProcess:
        port = port or free_port()
        settings = node_settings(tmp_path / f"node-{port}", **settings)
        node = NodeProcess(port, node_args(role, **settings), tmp_path / f"node-{port}.log").start()
        started.append(node)
        return node

    yield spawn
    for node in started:
        node.stop()


@pytest.fixture
def signed_network(spawn_node: Callable[..., NodeProcess], tmp_path: Path) -> Callable[..., list[NodeProcess]]:
    """signed_network(roles=(...), network={members file settings}, **settings) starts one node per role as the
    members of a signed network: each node's identity made first, one members file built from them and given to
    all."""
    def start(roles: tuple[str, ...] = ("patient", "healthcare_authority", "healthcare_provider"),
              network: dict[str, Any] | None = None, **settings: Any) -> list[NodeProcess]:
        ports = [free_port() for _ in roles]
        data_dirs = [tmp_path / f"member-{port}" for port in ports]
        members = write_members_file(tmp_path / f"members-{ports[0]}.json", "emr-test",
                                     [describe_node(role, port, data_dir)
                                      for role, port, data_dir in zip(roles, ports, data_dirs)],
                                     {"security": "signed", **(network or {})})
        return [spawn_node(role, port=port, data_dir=data_dir, security="signed", members_file=members, **settings)
                for role, port, data_dir in zip(roles, ports, data_dirs)]
    return start


def read_answer(sock: socket.socket, timeout: float = 10.0, digest: Any = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP answer with a Content-Length; with `digest` (a hashlib object) the
    body goes into it instead, and b"" is returned."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before an answer: {data!r}")
        data += chunk
    head, _, first = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    remaining = int(headers.get("content-length", "0")) - len(first)
    body = bytearray() if digest is None else None
    for chunk in _chunks(sock, first, remaining):
        if body is None:
            digest.update(chunk)
        else:
            body.extend(chunk)
    return int(lines[0].split()[1]), headers, bytes(body or b"")


def _chunks(sock: socket.socket, first: bytes, remaining: int) -> Any:
    yield first
    while remaining > 0:
        chunk = sock.recv(min(RECEIVE_CHUNK, remaining))
        if not chunk:
            raise ConnectionError("closed in the middle of the body")
        remaining -= len(chunk)
        yield chunk


def closes(sock: socket.socket, timeout: float) -> bool:
    """Whether the node ends the connection (EOF or reset) within `timeout`, whatever it says first."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionError:
        return True
    except socket.timeout:
        return False


def dump(response: Any) -> str:
    """A response, for assertion messages."""
    try:
        return json.dumps(response.json(), indent=1)[:2000]
    except ValueError:
        return response.text[:2000]
