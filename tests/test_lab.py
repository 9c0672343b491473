"""The lab (scripts/lab.py): hosts as network namespaces that reach each other and nothing else,
Kubo as a private IPFS network across them, partitions, and Toxiproxy faults between them.

Everything that talks to a lab process runs inside a lab host (the root namespace has no way in),
so these tests never connect anywhere themselves: the loopback guard of conftest.py stays quiet.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import secrets
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from scripts.cluster import _alive
from scripts.lab import LAB_NETWORK, TOXIPROXY_SCRIPT, Lab, available, namespaces, sweep_orphans

AVAILABLE, REASON = available()
pytestmark = [pytest.mark.process, pytest.mark.skipif(not AVAILABLE, reason=f"lab tests skipped: {REASON}")]


def unique_prefix() -> str:
    return f"emrlab-t{os.getpid()}-{secrets.token_hex(3)}"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """Three hosts; closing the lab kills its processes and deletes its namespaces, also after a failure."""
    with Lab(hosts=3, prefix=unique_prefix(), workdir=tmp_path / "lab") as built:
        yield built
    assert not set(built.namespaces) & namespaces()


@pytest.fixture(scope="session")
def toxiproxy() -> None:
    """Toxiproxy's server binary (quick when it is there already)."""
    result = subprocess.run([str(TOXIPROXY_SCRIPT), "install"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


def serve(lab: Lab, host: int, folder: Path, text: str) -> str:
    """A static HTTP server on the host's lab address; returns the URL of a file holding `text`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.txt").write_text(text)
    server = lab.popen(host, [sys.executable, "-m", "http.server", "8000", "--bind", lab.address(host),
                              "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://{lab.address(host)}:8000/index.txt"
    lab.wait_http(host, url, server, timeout=30)
    return url


def test_hosts_reach_each_other_over_http_on_lab_addresses(lab: Lab, tmp_path: Path) -> None:
    urls = {host: serve(lab, host, tmp_path / f"www{host}", f"host {host}\n") for host in lab.hosts}
    for client in lab.hosts:
        for server, url in urls.items():
            reply = lab.get(client, url)
            assert reply.status == 200 and reply.text == f"host {server}\n", f"h{client} -> {url}: {reply}"


def test_no_host_has_a_route_beyond_the_lab(lab: Lab) -> None:
    lab.assert_wiring()  # every veth ends in the lab's switch: no link to the root namespace
    for host in lab.hosts:
        routes = lab.routes(host).splitlines()
        assert [line.split()[:3] for line in routes] == [["198.18.0.0/24", "dev", f"v{host}"]], routes
        assert ipaddress.ip_address(lab.address(host)) in LAB_NETWORK
        # TEST-NET-1 (RFC 5737) is never a real host; without a route the kernel refuses at once,
        # before a single packet is sent.
        outside = lab.connect(host, "192.0.2.1", 80, timeout=3)
        assert outside.status is None and outside.errno == errno.ENETUNREACH, outside
        assert "Network is unreachable" in (outside.error or "")
        assert outside.elapsed < 1.0, outside


def test_kubo_daemons_in_three_hosts_form_a_private_network_over_lab_addresses(lab: Lab) -> None:
    daemons = lab.kubo_network()
    for daemon in daemons:
        addresses = daemon.swarm_peer_addresses()
        assert len(addresses) == 2, addresses
        for address in addresses:  # /ip4/198.18.0.N/tcp/4001
            assert address.startswith("/ip4/") and ipaddress.ip_address(address.split("/")[2]) in LAB_NETWORK, address
        config = json.loads(daemon.ipfs("config", "show"))
        assert config["Addresses"]["Swarm"] == [f"/ip4/{lab.address(daemon.host)}/tcp/4001"]
        assert config["Addresses"]["API"] == "/ip4/127.0.0.1/tcp/5001"
        assert config["Bootstrap"] == [] and config["Routing"]["Type"] == "none"
        assert config["AutoConf"]["Enabled"] is False and config["Discovery"]["MDNS"]["Enabled"] is False
        assert {peer["Addrs"][0] for peer in config["Peering"]["Peers"]} == {
            f"/ip4/{lab.address(other)}/tcp/4001" for other in lab.hosts if other != daemon.host}
        assert (daemon.repo / "swarm.key").read_bytes() == lab.swarm_key.read_bytes()
    record = os.urandom(200_000)
    (lab.workdir / "record.bin").write_bytes(record)
    cid = daemons[0].ipfs("add", "-Q", str(lab.workdir / "record.bin")).strip()
    assert daemons[2].ipfs("cat", "--timeout=30s", cid, text=False) == record


def test_a_partitioned_host_is_unreachable_until_healed(lab: Lab, tmp_path: Path) -> None:
    url = serve(lab, 2, tmp_path / "www", "on host 2\n")
    assert lab.get(1, url).status == 200
    try:
        lab.partition(2)
        cut = lab.get(1, url, timeout=2)
        assert cut.status is None, cut
        back = serve(lab, 1, tmp_path / "www1", "on host 1\n")
        assert lab.get(3, back).status == 200  # the rest of the lab goes on
        assert lab.get(2, back, timeout=2).status is None  # and host 2 reaches nobody
    finally:
        lab.heal(2)
    healed = lab.get(1, url, timeout=2, wait=15)
    assert healed.status == 200 and healed.text == "on host 2\n", healed


def test_toxiproxy_latency_delays_requests_to_a_node_and_clearing_restores_speed(lab: Lab, toxiproxy: None) -> None:
    node = lab.start_node(2, "healthcare_authority", via_proxy=True)
    assert lab.proxies(2) == {"node-5000": "198.18.0.2:5000"}  # the node itself listens on 127.0.0.1 only

    def timings() -> list[float]:
        replies = lab.http(1, node.url + "/health", count=5)
        assert all(reply.status == 200 for reply in replies), [str(reply) for reply in replies]
        return [reply.elapsed for reply in replies]

    before = timings()
    lab.add_latency(2, 100)
    slowed = timings()
    lab.clear_toxics(2)
    after = timings()
    # Lower bounds are firm (the toxic sleeps); upper ones are generous for a loaded 2-core machine.
    assert min(slowed) >= 0.095, slowed
    assert min(before) < 0.08 and min(after) < 0.08, (before, after)
    assert statistics.median(slowed) - statistics.median(after) > 0.05, (slowed, after)
    assert node.get("/get_chain", from_host=3).json()["chain"][0]["index"] == 1  # the API key goes along


def test_toxiproxy_loss_resets_connections_and_clearing_restores_them(lab: Lab, toxiproxy: None) -> None:
    node = lab.start_node(3, via_proxy=True)
    lab.add_loss(3, rate=1.0)  # every new connection: reset as soon as the client sends
    lost = lab.http(1, node.url + "/health", count=3, timeout=5)
    assert all(reply.status is None and reply.errno == errno.ECONNRESET for reply in lost), [str(r) for r in lost]
    assert max(reply.elapsed for reply in lost) < 2.0
    lab.clear_toxics()
    assert lab.get(1, node.url + "/health").status == 200


@pytest.mark.parametrize("body_raises", [False, True])
def test_no_namespace_or_process_of_the_lab_is_left_after_it_closes(tmp_path: Path, body_raises: bool) -> None:
    names: list[str] = []
    pids: list[int] = []
    try:
        with Lab(hosts=2, prefix=unique_prefix(), workdir=tmp_path / "lab") as lab:
            names = lab.namespaces
            assert set(names) <= namespaces()
            pids.append(lab.popen(1, ["sleep", "300"]).pid)
            # A process that detaches (as Kubo's daemon does) is found through its namespace.
            detached = lab.run(2, ["sh", "-c", "setsid sleep 300 >/dev/null 2>&1 </dev/null & echo $!"])
            pids.append(int(detached.stdout.strip()))
            if body_raises:
                raise RuntimeError("the test body failed")
    except RuntimeError as exc:
        assert body_raises and "body failed" in str(exc)
    assert len(names) == 3 and not set(names) & namespaces()
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)


def test_a_lab_killed_outright_leaves_namespaces_the_next_lab_deletes(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    token = secrets.token_hex(3)
    orphan = f"emrlab-{gone.pid}-{token}-h1"
    ours = f"emrlab-{os.getpid()}-{token}-h1"  # a lab still running in this process: not an orphan
    for name in (orphan, ours):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert orphan in sweep_orphans()
        assert orphan not in namespaces() and ours in namespaces()
    finally:
        for name in (orphan, ours):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
