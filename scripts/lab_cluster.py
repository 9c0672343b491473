"""emr-chain deployed on the hosts of a lab (scripts/lab.py): on each host its own Kubo daemon and its own node.

Each host runs what a hospital would run on a machine of its own (see the README's "Deploying on separate
machines"): a Kubo daemon in the network's private IPFS network (one swarm key, no bootstrap, routing none,
Peering to the other hosts, swarm on the host's address, API on 127.0.0.1), and a node listening on the host's
address with the network's API key, its peers the other hosts' nodes, `--peer-allow 198.18.0.0/15`.

    with Lab(hosts=3) as lab:
        cluster = LabCluster(lab, {1: "patient", 2: "healthcare_authority", 3: "healthcare_provider"}).start()
        result = cluster.workflow(patient=1, provider=3, authority=2, record=b"...")   # the paper's Fig. 3
        cluster.wait_converged()

Used by tests/test_lab_faults.py, scripts/lab_demo.py (`make lab`) and bench/soak.py. Every request is made
from inside a lab host (`Lab.http`): the root namespace has no way in.
"""
from __future__ import annotations

import os
import re
import secrets
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from blockchain import hash_block  # noqa: E402
from scripts.lab import KUBO_SWARM_PORT, NODE_PORT, Lab, LabError, LabKubo, LabNode, Reply  # noqa: E402

THREE_ROLES = {1: "patient", 2: "healthcare_authority", 3: "healthcare_provider"}
# Quick reactions for a lab run: sync every second, retry pins soon, short waits for a host that is gone.
LAB_SETTINGS = {"sync_interval": 1.0, "peer_timeout": 2.0, "pin_retry_max": 2.0, "pin_timeout": 20.0,
                "ipfs_lookup_timeout": 5.0}
ATTEMPTS = 8  # a request that finds no connection (a lost link) is tried again this often
# What network.py logs when a request to a peer node met a reset connection (wire.PeerClient names the error).
RESET_IN_LOG = re.compile(r"unreachable \((?:ConnectionResetError|RemoteDisconnected|BrokenPipeError|"
                          r"ConnectionAbortedError)\)")


@dataclass
class WorkflowResult:
    cid: str
    tx_id: str
    block: int
    steps: list[tuple[str, float]]  # (step, seconds)
    identical: bool
    seconds: float


@dataclass
class LabCluster:
    """A node and a Kubo daemon on each given host of a lab, the nodes peered with each other."""

    lab: Lab
    roles: dict[int, str] = field(default_factory=lambda: dict(THREE_ROLES))
    via_proxy: bool = False  # every node and swarm behind Toxiproxy in its host, for latency and loss
    latency_ms: int = 0  # latency on every link into every host, set before anything connects (implies via_proxy)
    loss: float = 0.0  # the fraction of connections into every host that are reset (Lab.add_loss), likewise
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    settings: dict[str, Any] = field(default_factory=dict)
    persist: Iterable[int] = ()  # hosts whose node keeps its state (--persist)
    say: Callable[[str], None] = lambda text: None
    nodes: dict[int, LabNode] = field(default_factory=dict)
    kubos: dict[int, LabKubo] = field(default_factory=dict)
    unanswered: int = 0  # requests of ours that got no answer at all (reset or refused) and were tried again
    accepted_before_faults: dict[int, dict[str, int]] = field(default_factory=dict)  # host -> proxy -> count

    @property
    def hosts(self) -> list[int]:
        return sorted(self.roles)

    def url(self, host: int) -> str:
        return f"http://{self.lab.address(host)}:{NODE_PORT}"

    def data_dir(self, host: int) -> Path:
        args = self.nodes[host].args
        return Path(args[args.index("--data-dir") + 1])

    # -- starting and stopping -------------------------------------------------------------------

    def start(self) -> "LabCluster":
        started = time.monotonic()
        if self.latency_ms or self.loss:
            self.via_proxy = True
            self._faults_first()
            self.say(f"{self.latency_ms} ms latency and {self.loss:.0%} loss on every link, before anything connects")
        self.kubos = {daemon.host: daemon for daemon in self.lab.kubo_network(self.hosts, via_proxy=self.via_proxy)}
        self.say(f"Kubo on {len(self.kubos)} hosts, one private IPFS network ({time.monotonic() - started:.1f} s)")
        for number, host in enumerate(self.hosts):
            self.nodes[host] = self.lab.start_node(
                host, self.roles[host], api_key=self.api_key, via_proxy=self.via_proxy,
                peers=[self.url(other) for other in self.hosts[:number]], persist=host in set(self.persist),
                **{**LAB_SETTINGS, **self.settings})
        self.wait(lambda: all(len(self.get(host, "/health").json()["peers"]) == len(self.hosts) - 1
                              for host in self.hosts), 30, "the nodes did not all connect to each other")
        self.say(f"{len(self.nodes)} nodes up and peered ({time.monotonic() - started:.1f} s)")
        return self

    def _faults_first(self) -> None:
        """Every host's proxies (its node's port and its Kubo swarm's) with their toxics, before any service
        starts: so every connection between hosts, Kubo's long-lived swarm connections included, is made
        through them and meets the loss when it opens. Notes what each proxy had accepted by then (nothing)."""
        for host in self.hosts:
            self.lab.proxy(host, "kubo-swarm", KUBO_SWARM_PORT)
            self.lab.proxy(host, f"node-{NODE_PORT}", NODE_PORT)
            if self.latency_ms:
                self.lab.add_latency(host, self.latency_ms)
            if self.loss:
                self.lab.add_loss(host, self.loss)
        self.accepted_before_faults = {host: dict(self.lab.accepted_connections(host)) for host in self.hosts}

    def resets_between_nodes(self) -> dict[int, int]:
        """Host -> requests its node made to a peer node that found the connection reset (its log says so)."""
        return {host: len(RESET_IN_LOG.findall(node.log_path.read_text(errors="replace")))
                for host, node in self.nodes.items() if node.log_path.exists()}

    def kill_host(self, host: int) -> None:
        """What a host that loses power does: its node and its Kubo die at once (SIGKILL), nothing is flushed."""
        self.nodes[host].stop(kill=True)
        daemon = self.kubos[host]
        pid_file = daemon.repo / "daemon.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().strip())
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and _state(pid) not in ("Z", "") and time.monotonic() < deadline:
                time.sleep(0.05)
        daemon.running = False

    def restart_host(self, host: int) -> None:
        """Start a killed host's Kubo and node again, from their own repo and data directory."""
        self.kubos[host].start()
        self.kubos[host].running = True
        for other in self.hosts:
            if other != host and self.kubos[other].running:
                try:
                    self.kubos[host].connect(other)
                except LabError:
                    pass  # Peering keeps trying
        self.nodes[host].start()

    # -- requests, from inside the lab ------------------------------------------------------------

    def request(self, host: int, method: str, path: str, body: Any = None, *, via: int | None = None,
                expect: Iterable[int] = (200, 201), attempts: int = ATTEMPTS, timeout: float = 30.0,
                headers: dict[str, str] | None = None) -> Reply:
        """A request to the node of `host`, made from host `via` (default the same host). A request that got
        no answer at all (a connection reset or refused on a bad link) is tried again: every call used here is
        safe to repeat (transactions carry their id)."""
        node, expect = self.nodes[host], tuple(expect)
        reply = Reply(None)
        for attempt in range(attempts):
            if method == "GET":
                reply = node.get(path, from_host=via or host, timeout=timeout, expect=expect, headers=headers or {})
            else:
                reply = node.post(path, body, from_host=via or host, timeout=timeout, expect=expect,
                                  headers=headers or {})
            if reply.status is not None:
                break
            self.unanswered += 1
            time.sleep(min(0.2 * 2 ** attempt, 2.0))
        if reply.status not in expect:
            raise LabError(f"{method} {path} on host {host} (from host {via or host}): {reply}")
        return reply

    def get(self, host: int, path: str, **kwargs: Any) -> Reply:
        return self.request(host, "GET", path, **kwargs)

    def post(self, host: int, path: str, body: Any, **kwargs: Any) -> Reply:
        return self.request(host, "POST", path, body, **kwargs)

    def chain(self, host: int) -> list[dict[str, Any]]:
        return self.get(host, "/get_chain").json()["chain"]

    def add_record(self, host: int, data: bytes, name: str, user_id: str = "patient-1",
                   ehr_name: str | None = None) -> tuple[str, str]:
        """Put a file in the node's data folder, add it to IPFS and record it: (cid, transaction id)."""
        (self.data_dir(host) / name).write_bytes(data)
        added = self.post(host, "/create_hash", {"file_path": name}).json()["IPFS Hash"]
        tx_id = uuid.uuid4().hex
        self.post(host, "/add_transaction", {"user_id": user_id, "ipfs_hash": added["Hash"], "id": tx_id,
                                             "EHR_name": ehr_name or name.split(".")[0],
                                             "file_name": added["Name"], "file_size": added["Size"]})
        return added["Hash"], tx_id

    def mine(self, host: int) -> dict[str, Any]:
        return self.get(host, "/mine_block", timeout=60).json()

    def record_status(self, host: int, cid: str, peers: bool = False) -> dict[str, Any] | None:
        reply = self.get(host, f"/records/{cid}?peers={'true' if peers else 'false'}", expect=(200, 404))
        return reply.json() if reply.status == 200 else None

    # -- waiting ------------------------------------------------------------------------------------

    @staticmethod
    def wait(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = condition()
            except LabError:
                result = None
            if result:
                return result
            if time.monotonic() > deadline:
                raise LabError(f"{what} within {timeout:g}s")
            time.sleep(interval)

    def heads(self, hosts: Iterable[int] | None = None) -> dict[int, tuple[int, str]]:
        """(length, hash of the last block) of each host's chain."""
        heads = {}
        for host in hosts or self.hosts:
            chain = self.chain(host)
            heads[host] = (len(chain), hash_block(chain[-1]))
        return heads

    def wait_converged(self, hosts: Iterable[int] | None = None, timeout: float = 60.0) -> float:
        """Seconds until every host's chain is the same chain."""
        started = time.monotonic()
        chosen = list(hosts or self.hosts)
        self.wait(lambda: len(set(self.heads(chosen).values())) == 1, timeout,
                  f"the chains of hosts {chosen} did not converge")
        return time.monotonic() - started

    def wait_length(self, host: int, length: int, timeout: float = 30.0) -> None:
        self.wait(lambda: self.get(host, "/health").json()["length"] >= length, timeout,
                  f"host {host}'s chain did not reach length {length}")

    def wait_pinned(self, cid: str, hosts: Iterable[int] | None = None, timeout: float = 60.0) -> dict[int, Any]:
        """Each host's status of the record once every one of them has it pinned."""
        chosen = list(hosts or self.hosts)

        def pinned() -> dict[int, Any] | None:
            found = {host: self.record_status(host, cid) for host in chosen}
            return found if all(s and s["pin"] and s["pin"]["state"] == "pinned" for s in found.values()) else None

        return self.wait(pinned, timeout, f"record {cid} was not pinned on hosts {chosen}", interval=0.3)

    # -- the paper's workflow, across hosts ------------------------------------------------------

    def workflow(self, patient: int, provider: int, authority: int, record: bytes,
                 password: str | None = None, name: str = "MRI.pdf") -> WorkflowResult:
        """Fig. 3 across hosts: the patient's node encrypts, adds to IPFS, records and mines; the provider's node
        finds the record on its own chain, fetches it through its own Kubo and decrypts it. Compares bytes."""
        password = password or secrets.token_urlsafe(18)
        steps: list[tuple[str, float]] = []
        began = last = time.monotonic()

        def step(text: str) -> None:
            nonlocal last
            now = time.monotonic()
            steps.append((text, now - last))
            self.say(f"  {text} ({(now - last) * 1000:.0f} ms)")
            last = now

        (self.data_dir(patient) / name).write_bytes(record)
        encrypted = self.post(patient, "/encrypt_file", {"file_path": name, "password": password,
                                                         "overwrite": True}).json()["file_path"]
        step(f"host {patient}: encrypt_file {name} -> {encrypted}")
        added = self.post(patient, "/create_hash", {"file_path": encrypted}).json()["IPFS Hash"]
        step(f"host {patient}: create_hash -> {added['Hash']}")
        tx_id = uuid.uuid4().hex
        self.post(patient, "/add_transaction", {"user_id": "xxxxx", "ipfs_hash": added["Hash"], "EHR_name": "MRI",
                                                "file_name": added["Name"], "file_size": added["Size"],
                                                "id": tx_id})
        step(f"host {patient}: add_transaction {tx_id}")
        block = self.mine(patient)["index"]
        step(f"host {patient}: mine_block -> block {block}")
        self.wait_length(provider, block, timeout=60)
        step(f"host {provider}: the block reached its chain")
        found = self.post(provider, "/get_file_hash", {"name": added["Name"]}).json()["File info"]
        if found["Hash"] != added["Hash"]:
            raise LabError(f"host {provider} found {found['Hash']} for {added['Name']}, not {added['Hash']}")
        step(f"host {provider}: get_file_hash {added['Name']} -> {found['Hash']}")
        if not self.get(authority, "/is_valid").json()["valid"]:
            raise LabError(f"host {authority}'s chain is not valid")
        step(f"host {authority}: is_valid -> true")
        fetched = self.post(provider, "/get_file", {"ipfs_hash": added["Hash"]}, timeout=120).json()["path"]
        step(f"host {provider}: get_file -> {fetched}")
        decrypted = self.post(provider, "/decrypt_file", {"file_path": fetched, "password": password,
                                                          "overwrite": True}).json()["file_path"]
        step(f"host {provider}: decrypt_file -> {decrypted}")
        identical = (self.data_dir(provider) / decrypted).read_bytes() == record
        step(f"bytes identical: {identical}")
        return WorkflowResult(added["Hash"], tx_id, block, steps, identical, time.monotonic() - began)

    # -- faults -------------------------------------------------------------------------------------

    def degrade(self, latency_ms: int = 100, loss: float = 0.05) -> None:
        """Latency and loss on every link into every host (nodes and IPFS swarm; Toxiproxy, via_proxy), from
        now on. Connections already open meet the loss once, now (see Lab.add_loss); for faults that every
        connection meets from its start, give `latency_ms` and `loss` to the cluster instead."""
        if not self.via_proxy:
            raise LabError("start the cluster with via_proxy=True to add latency or loss")
        self.accepted_before_faults = {host: dict(self.lab.accepted_connections(host)) for host in self.hosts}
        for host in self.hosts:
            self.lab.add_latency(host, latency_ms)
            self.lab.add_loss(host, loss)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
