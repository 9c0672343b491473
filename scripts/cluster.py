#!/usr/bin/env python3
"""Start and stop a local emr-chain network: Kubo daemon(s) and one node process per role.

    python scripts/cluster.py up [--per-node-kubo] [--foreground] [--clean]
    python scripts/cluster.py down
    python scripts/cluster.py peers   (each Kubo daemon's swarm peers; fails if one is off loopback)

By default one Kubo daemon (API 5001) serves every node, as in the paper. With
--per-node-kubo every node gets its own daemon, all joined over loopback as a
private IPFS network (one swarm key, peered with each other), so a file one
node adds reaches another through IPFS itself.

The classes here are also what the tests and benchmarks use to run real
processes: Kubo (a daemon with its own repo and ports, via scripts/kubo.sh)
and NodeProcess (a `python app.py` process).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
KUBO_SCRIPT = ROOT / "scripts" / "kubo.sh"
STATE = ROOT / ".state"
CLUSTER_FILE = STATE / "cluster.json"
NODE_START_SECONDS = 30
STOP_SECONDS = 10
SAMPLE_RECORD = "MRI.pdf"
MEMBERS_FILE = "members.json"
DEMO_NETWORK = "emr-demo"
# The healthcare authority may break the glass (README's Consent step 6, the Postman collection's Consent folder).
DEMO_NETWORK_SETTINGS = {"security": "signed", "emergency_members": "healthcare_authority"}

# The paper's ports: IPFS on 5001, patient 5002, healthcare authority 5003; Healthcare B on 5004.
ROLES = (("patient", 5002), ("healthcare_authority", 5003), ("healthcare_provider", 5004))
KUBO_API_PORT = 5001
PER_NODE_KUBO_PORTS = {5002: (5101, 8101, 4101), 5003: (5102, 8102, 4102), 5004: (5103, 8103, 4103)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Kubo:
    """A Kubo daemon with its own repo and loopback ports, managed through scripts/kubo.sh."""

    repo: Path
    api_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    swarm_port: int = field(default_factory=free_port)
    swarm_key: Path | None = None
    peers: list[str] = field(default_factory=list)  # "PEERID@SWARMPORT" on 127.0.0.1, or "PEERID@ADDR:PORT"
    bind: str = "127.0.0.1"  # the swarm's address: a lab host's 198.18.x.y in scripts/lab.py

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict[str, str]:
        env = {**os.environ, "KUBO_REPO": str(self.repo), "IPFS_PATH": str(self.repo),
               "IPFS_API_PORT": str(self.api_port), "IPFS_GATEWAY_PORT": str(self.gateway_port),
               "IPFS_SWARM_PORT": str(self.swarm_port), "KUBO_PEERS": " ".join(self.peers),
               "KUBO_BIND": self.bind, "KUBO_API_BIND": "127.0.0.1"}  # api_url is on 127.0.0.1
        env.pop("KUBO_SWARM_KEY", None)
        if self.swarm_key:
            env["KUBO_SWARM_KEY"] = str(self.swarm_key)
        return env

    def script(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(KUBO_SCRIPT), *args], env=self.env(), capture_output=True, text=True,
                              timeout=120, check=check)

    def init(self) -> str:
        """Create and configure the repo without starting it; returns the daemon's peer ID."""
        self.script("init")
        return self.ipfs("config", "Identity.PeerID").strip()

    def start(self) -> "Kubo":
        result = self.script("start", check=False)
        if result.returncode != 0:
            raise RuntimeError(f"Kubo did not start: {result.stderr.strip()}")
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


def write_swarm_key(path: Path) -> Path:
    """A private-network key in the format Kubo reads (/key/swarm/psk/1.0.0/)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"/key/swarm/psk/1.0.0/\n/base16/\n{secrets.token_hex(32)}\n")
    return path


def private_network(repos: list[Path], ports: list[tuple[int, int, int]], key: Path) -> list[Kubo]:
    """Daemons that share a swarm key and know each other's loopback address, started."""
    daemons = [Kubo(repo, api, gateway, swarm, swarm_key=key) for repo, (api, gateway, swarm) in zip(repos, ports)]
    identities = [daemon.init() for daemon in daemons]
    for daemon in daemons:
        daemon.peers = [f"{peer_id}@{other.swarm_port}" for peer_id, other in zip(identities, daemons)
                        if other is not daemon]
    for daemon in daemons:
        daemon.start()
    # Peering reconnects with a back-off, and the first daemon started before the others listened:
    # connect every pair now instead of waiting for the next retry.
    for number, daemon in enumerate(daemons):
        for peer_id, other in list(zip(identities, daemons))[number + 1:]:
            daemon.rpc("swarm/connect", arg=f"/ip4/127.0.0.1/tcp/{other.swarm_port}/p2p/{peer_id}")
    return daemons


@dataclass
class NodeProcess:
    """A real `python app.py` process."""

    port: int
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=lambda: {k: v for k, v in os.environ.items()
                                                         if not k.startswith("EMR_")})
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> "NodeProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(self.port),
                                             *self.args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + NODE_START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node on {self.port} exited: {self.log_path.read_text()[-2000:]}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                time.sleep(0.1)
        self.stop(kill=True)
        raise RuntimeError(f"node on {self.port} did not answer within {NODE_START_SECONDS}s (log: {self.log_path})")

    def stop(self, kill: bool = False) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 60), **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=kwargs.pop("timeout", 60), **kwargs)

    def chain(self) -> list[dict[str, Any]]:
        return self.get("/get_chain").json()["chain"]


def describe_node(role: str, port: int, data_dir: Path, host: str = "127.0.0.1") -> dict[str, Any]:
    """The identity of the node that will run from `data_dir` (made now, kept in its own folder), as its
    GET /identity will describe it: `python app.py identity`."""
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "identity", "--role", role, "--port", str(port),
                             "--host", host, "--data-dir", str(data_dir)], capture_output=True, text=True,
                            timeout=60, check=True, cwd=ROOT, stdin=subprocess.DEVNULL,
                            env={key: value for key, value in os.environ.items() if not key.startswith("EMR_")})
    return json.loads(result.stdout)


def write_members_file(path: Path, network: str, descriptions: list[dict[str, Any]],
                       settings: dict[str, Any] | None = None) -> Path:
    """The members file every node of a signed network shares: `python members.py build`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    described = path.with_suffix(".described.json")
    described.write_text(json.dumps(descriptions))
    built = subprocess.run([sys.executable, str(ROOT / "members.py"), "build", "--network", network,
                            *(arg for key, value in (settings or {"security": "signed"}).items()
                              for arg in ("--setting", f"{key}={value}")),
                            "-o", str(path), str(described)], capture_output=True, text=True, timeout=60,
                           cwd=ROOT, stdin=subprocess.DEVNULL)
    described.unlink()
    if built.returncode != 0:
        raise RuntimeError(f"members.py build failed: {built.stderr.strip()}")
    return path


def node_args(role: str, **settings: Any) -> list[str]:
    """Command-line flags for app.py: role plus every setting as its --flag."""
    args = ["--role", role]
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif str(value).startswith("-"):
            args.append(f"{flag}={value}")  # argparse would take "--api-key -x..." for two flags
        else:
            args += [flag, str(value)]
    return args


def write_sample_record(path: Path, size: int = 63_795) -> Path:
    """A small valid PDF standing in for the paper's 62.3 KB MRI report, padded to exactly `size` bytes."""
    text = b"MRI report - sample patient xxxxx - no findings. (emr-chain demo record)"
    stream = b"BT /F1 12 Tf 72 720 Td (" + text + b") Tj ET"
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    head, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, obj in enumerate(objects, start=1):
        offsets.append(len(head))
        head += b"%d 0 obj\n%s\nendobj\n" % (number, obj)

    def tail(xref_at: int) -> bytes:
        entries = b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
        return (b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1) + entries
                + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref_at))

    padding = size - len(head) - len(tail(size))  # startxref has as many digits either way
    line = b"% scan data" + b" ." * 30 + b"\n"  # PDF comment lines: ignored by readers
    filler = line * (padding // len(line))
    rest = padding - len(filler)
    filler += (b"%" + b" " * (rest - 2) + b"\n") if rest >= 2 else b"\n" * rest
    document = bytes(head) + filler + tail(len(head) + len(filler))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(document)
    return path


# -- the command line ---------------------------------------------------------------

def up(per_node_kubo: bool, clean: bool, data_root: Path, security: str = "paper") -> dict[str, Any]:
    """Start Kubo and the three role nodes on the paper's ports; returns what was started.

    security="signed": each node's identity is made first, and one members file built from them is given to
    all (data_root/members.json), as the operators of a permissioned network would."""
    if CLUSTER_FILE.exists():
        down()
    if clean:
        subprocess.run(["rm", "-rf", str(data_root)], check=True)
    state: dict[str, Any] = {"kubo": [], "nodes": [], "per_node_kubo": per_node_kubo, "security": security}
    CLUSTER_FILE.parent.mkdir(parents=True, exist_ok=True)
    if per_node_kubo:
        ports = [PER_NODE_KUBO_PORTS[port] for _, port in ROLES]
        daemons = private_network([STATE / "kubo" / f"node-{port}" for _, port in ROLES], ports,
                                  write_swarm_key(STATE / "swarm.key"))
    else:
        daemons = [Kubo(STATE / "kubo" / "main", KUBO_API_PORT, 8080, 4001).start()]
    state["kubo"] = [str(daemon.repo) for daemon in daemons]
    _save(state)
    urls = [f"http://127.0.0.1:{port}" for _, port in ROLES]
    signed: dict[str, Any] = {}
    if security == "signed":
        descriptions = [describe_node(role, port, data_root / f"node-{port}") for role, port in ROLES]
        signed = {"security": "signed",
                  "members_file": write_members_file(data_root / MEMBERS_FILE, DEMO_NETWORK, descriptions,
                                                     DEMO_NETWORK_SETTINGS)}
        state["members_file"] = str(signed["members_file"])
    for number, (role, port) in enumerate(ROLES):
        daemon = daemons[number] if per_node_kubo else daemons[0]
        data_dir = data_root / f"node-{port}"
        peers = ",".join(url for url in urls[:number])
        node = NodeProcess(port, node_args(role, data_dir=data_dir, ipfs_api=daemon.api_url, peers=peers, **signed),
                           STATE / "logs" / f"node-{port}.log").start()
        state["nodes"].append({"role": role, "port": port, "pid": node.pid, "data_dir": str(data_dir),
                               "ipfs_api": daemon.api_url, "log": str(node.log_path)})
        _save(state)
    write_sample_record(data_root / f"node-{ROLES[0][1]}" / SAMPLE_RECORD)
    return state


def _save(state: dict[str, Any]) -> None:
    CLUSTER_FILE.write_text(json.dumps(state, indent=1))


def down() -> None:
    """Stop whatever `up` started (nodes first, then Kubo), and any daemon left by scripts/kubo.sh."""
    if CLUSTER_FILE.exists():
        state = json.loads(CLUSTER_FILE.read_text())
        _terminate([node["pid"] for node in state.get("nodes", [])])
        for repo in state.get("kubo", []):
            subprocess.run([str(KUBO_SCRIPT), "stop"], env={**os.environ, "KUBO_REPO": repo}, check=False,
                           capture_output=True)
        CLUSTER_FILE.unlink()
    subprocess.run([str(KUBO_SCRIPT), "stop", "--all"], check=False)


def _alive(pid: int) -> bool:
    """Running, and not merely a zombie waiting for a parent that may never reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
    except OSError:  # no /proc: ask the process itself
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def _terminate(pids: list[int]) -> None:
    """SIGTERM all at once, then SIGKILL whatever still runs after STOP_SECONDS."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_SECONDS
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in filter(_alive, pids):
        os.kill(pid, signal.SIGKILL)


def check_swarm_peers() -> bool:
    """Print every running daemon's swarm peers; False if any is beyond 127.0.0.1."""
    state = json.loads(CLUSTER_FILE.read_text()) if CLUSTER_FILE.exists() else {"nodes": []}
    loopback_only = True
    for api in sorted({node["ipfs_api"] for node in state["nodes"]}):
        peers = requests.post(f"{api}/api/v0/swarm/peers", timeout=10).json().get("Peers") or []
        addresses = [peer["Addr"] for peer in peers]
        loopback_only &= all(address.startswith("/ip4/127.0.0.1/") for address in addresses)
        print(f"Kubo {api} swarm peers: {', '.join(addresses) or 'none'}")
    return loopback_only


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("up", help="start Kubo and the patient (5002), authority (5003) and provider (5004) nodes")
    start.add_argument("--per-node-kubo", action="store_true", default=os.environ.get("PER_NODE_KUBO") == "1",
                       help="one Kubo daemon per node, joined as a private IPFS network (env PER_NODE_KUBO=1)")
    start.add_argument("--foreground", action="store_true", help="keep running until Ctrl-C, then stop everything")
    start.add_argument("--clean", action="store_true", help="start from empty node data directories")
    start.add_argument("--data-root", type=Path, default=ROOT / "data", help="folder holding node-PORT data dirs")
    start.add_argument("--security", choices=("paper", "signed"), default=os.environ.get("SECURITY") or "paper",
                       help="paper (the paper's open network) or signed (members with keys; env SECURITY)")
    sub.add_parser("down", help="stop everything `up` started")
    sub.add_parser("peers", help="list each Kubo daemon's swarm peers; fail if any is beyond 127.0.0.1")
    args = parser.parse_args(argv)
    if args.command == "down":
        down()
        return 0
    if args.command == "peers":
        return 0 if check_swarm_peers() else 1
    try:
        state = up(args.per_node_kubo, args.clean, args.data_root, args.security)
    except BaseException:
        down()
        raise
    for node in state["nodes"]:
        print(f"{node['role']:<21} http://127.0.0.1:{node['port']}  data {node['data_dir']}  IPFS {node['ipfs_api']}")
    print(f"sample record: {state['nodes'][0]['data_dir']}/{SAMPLE_RECORD}")
    if state.get("members_file"):
        print(f"signed network {DEMO_NETWORK}: members file {state['members_file']}")
    if args.foreground:
        print("running; press Ctrl-C to stop")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            signal.pause()
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
