"""Several node processes: linking, gossip, consensus, and peers that are down, slow or lying."""
from __future__ import annotations

import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import pytest

from conftest import dump, paper_transaction, wait_until
from scripts.cluster import NodeProcess, free_port


def all_ids(chain: list[dict[str, Any]]) -> list[str]:
    return [tx["id"] for block in chain for tx in block["transactions"]]


def same_chain(*nodes: NodeProcess) -> list[dict[str, Any]] | None:
    chains = [node.chain() for node in nodes]
    return chains[0] if all(chain == chains[0] for chain in chains) else None


@pytest.fixture
def trio(spawn_node: Callable[..., NodeProcess]) -> tuple[NodeProcess, NodeProcess, NodeProcess]:
    """Patient, healthcare authority and a third provider, linked by one connect_node on the patient's node."""
    patient = spawn_node("patient")
    authority = spawn_node("healthcare_authority")
    provider = spawn_node("healthcare_provider")
    response = patient.post("/connect_node", {"nodes": [authority.url, provider.url]})
    assert response.status_code == 201, dump(response)
    return patient, authority, provider


def test_connect_node_on_one_node_links_both_ways(trio) -> None:
    patient, authority, provider = trio
    assert sorted(patient.get("/health").json()["peers"]) == sorted([authority.netloc, provider.netloc])
    wait_until(lambda: authority.get("/health").json()["peers"] == [patient.netloc])
    wait_until(lambda: provider.get("/health").json()["peers"] == [patient.netloc])


def test_transaction_added_on_the_patient_node_is_in_every_chain_after_one_mine(trio) -> None:
    patient, authority, provider = trio
    added = patient.post("/add_transaction", paper_transaction())
    assert added.status_code == 201
    patient.get("/mine_block")
    chain = wait_until(lambda: same_chain(patient, authority, provider), timeout=15)
    assert len(chain) == 2 and all_ids(chain) == [added.json()["id"]]


def test_transaction_reaches_every_node_once_through_a_chain_of_peers(spawn_node) -> None:
    first, middle, last = spawn_node(), spawn_node(), spawn_node()
    first.post("/connect_node", {"nodes": [middle.url]})
    middle.post("/connect_node", {"nodes": [last.url]})
    tx_id = first.post("/add_transaction", paper_transaction()).json()["id"]
    wait_until(lambda: last.get("/health").json()["pending"] == 1)
    time.sleep(0.5)  # room for any echo to come back, which it must not
    for node in (first, middle, last):
        assert node.get("/health").json()["pending"] == 1
    last.get("/mine_block")
    chain = wait_until(lambda: same_chain(first, middle, last), timeout=15)
    assert all_ids(chain) == [tx_id]
    assert all(node.get("/health").json()["pending"] == 0 for node in (first, middle, last))


def test_two_nodes_mining_at_once_converge_without_losing_or_duplicating(spawn_node) -> None:
    left, right = spawn_node(difficulty=3), spawn_node(difficulty=3)
    left.post("/connect_node", {"nodes": [right.url]})
    wait_until(lambda: right.get("/health").json()["peers"])
    acknowledged = []
    for round_number in range(3):
        acknowledged.append(left.post("/add_transaction", paper_transaction(EHR_name=f"L{round_number}")).json()["id"])
        acknowledged.append(right.post("/add_transaction", paper_transaction(EHR_name=f"R{round_number}")).json()["id"])
        barrier = threading.Barrier(2)

        def mine(node: NodeProcess) -> None:
            barrier.wait()
            assert node.get("/mine_block").status_code == 200

        miners = [threading.Thread(target=mine, args=(node,)) for node in (left, right)]
        for miner in miners:
            miner.start()
        for miner in miners:
            miner.join()
    # Forks of equal length that differ deeper than their last block never win a tie (no free rewrites):
    # the node that mines next is strictly longer, and the other takes its chain.
    left.get("/mine_block")
    wait_until(lambda: same_chain(left, right), timeout=20)
    left.get("/mine_block")  # whatever a lost fork put back to pending goes into this block
    chain = wait_until(lambda: same_chain(left, right), timeout=20)
    assert sorted(all_ids(chain)) == sorted(acknowledged)
    assert left.get("/is_valid").json()["valid"]


def test_killed_node_catches_up_when_restarted(spawn_node) -> None:
    patient = spawn_node()
    authority = spawn_node("healthcare_authority", peers=patient.url)
    wait_until(lambda: patient.get("/health").json()["peers"] == [authority.netloc])
    authority.stop(kill=True)
    for number in range(2):
        patient.post("/add_transaction", paper_transaction(EHR_name=f"while down {number}"))
        started = time.monotonic()
        assert patient.get("/mine_block").status_code == 200
        assert time.monotonic() - started < 5  # a dead peer does not hold up mining
    authority.start()
    chain = wait_until(lambda: same_chain(patient, authority), timeout=15)
    assert len(chain) == 3


# -- peers that misbehave (a tiny HTTP server stands in for them) ---------------

class FakePeer:
    """Answers /get_chain and /blocks with whatever a test sets: an invalid chain, garbage, or nothing for a while."""

    def __init__(self) -> None:
        self.body: bytes = b"{}"
        self.chain: list[dict[str, Any]] | None = None
        self.claimed_length: int | None = None
        self.delay = 0.0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                time.sleep(fake.delay)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                try:
                    self.wfile.write(fake.answer(self.path))
                except OSError:
                    pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve_chain(self, chain: list[dict[str, Any]], claimed_length: int | None = None) -> None:
        self.chain, self.claimed_length = chain, claimed_length

    def answer(self, path: str) -> bytes:
        """A served chain as a node would give it (whole, or a page of /blocks); else the raw body."""
        if self.chain is None:
            return self.body
        length = self.claimed_length or len(self.chain)
        if path.startswith("/blocks"):
            start = int(path.split("from=", 1)[1]) if "from=" in path else 1
            return json.dumps({"from": start, "length": length, "blocks": self.chain[start - 1:]}).encode()
        return json.dumps({"chain": self.chain, "length": length}).encode()


@pytest.fixture
def fake_peer() -> Iterator[FakePeer]:
    peer = FakePeer()
    yield peer
    peer.server.shutdown()


def test_replace_chain_adopts_a_longer_valid_chain_mined_elsewhere(spawn_node) -> None:
    left, right = spawn_node(port=free_port()), spawn_node(port=free_port())
    for number in range(3):
        right.post("/add_transaction", paper_transaction(EHR_name=f"r{number}"))
        right.get("/mine_block")
    left.post("/add_transaction", paper_transaction(EHR_name="kept"))
    left.post("/connect_node", {"nodes": [right.url]})
    body = left.get("/replace_chain").json()
    assert body["replaced"] is True or same_chain(left, right)  # the connect itself may already have synced
    assert wait_until(lambda: same_chain(left, right))
    assert left.get("/health").json()["pending"] == 1


def test_invalid_longer_chain_is_ignored(spawn_node, fake_peer: FakePeer) -> None:
    honest = spawn_node()
    honest.post("/add_transaction", paper_transaction())
    honest.get("/mine_block")
    forged = copy.deepcopy(honest.chain())
    for index in range(3, 9):
        forged.append({**copy.deepcopy(forged[-1]), "index": index, "nonce": 7})
    fake_peer.serve_chain(forged)
    honest.post("/connect_node", {"nodes": [fake_peer.url]})
    body = honest.get("/replace_chain").json()
    assert body["replaced"] is False and body["length"] == 2
    assert "invalid" in body["peers"][f"127.0.0.1:{fake_peer.port}"]


def test_valid_shorter_chain_claiming_a_larger_length_is_refused(spawn_node, fake_peer: FakePeer) -> None:
    node = spawn_node()
    for _ in range(3):
        node.get("/mine_block")
    fake_peer.serve_chain(node.chain()[:2], claimed_length=50)
    node.post("/connect_node", {"nodes": [fake_peer.url]})
    body = node.get("/replace_chain").json()
    assert body["replaced"] is False and body["length"] == 4


@pytest.mark.parametrize("misbehaviour", ["garbage", "slow", "huge"])
def test_misbehaving_peer_costs_a_bounded_wait_and_is_reported(spawn_node, fake_peer: FakePeer,
                                                                misbehaviour: str) -> None:
    node = spawn_node(peer_timeout=1, max_peer_response_bytes=100_000)
    if misbehaviour == "garbage":
        fake_peer.body = b"\x00\xffnot json at all"
    elif misbehaviour == "slow":
        fake_peer.delay = 5
    else:
        fake_peer.body = b'{"chain": [' + b'"x",' * 200_000 + b'"x"]}'
    node.post("/connect_node", {"nodes": [fake_peer.url]})
    started = time.monotonic()
    response = node.get("/replace_chain")
    assert time.monotonic() - started < 4
    assert response.status_code == 200 and response.json()["replaced"] is False
    assert "skipped" in response.json()["peers"][f"127.0.0.1:{fake_peer.port}"]
    assert node.get("/health").status_code == 200


def test_transactions_of_a_dropped_block_are_announced_again_to_the_peers(spawn_node) -> None:
    left, right = spawn_node(), spawn_node()
    kept_alone = left.post("/add_transaction", paper_transaction(EHR_name="only left knows")).json()["id"]
    left.get("/mine_block")
    for _ in range(2):
        right.get("/mine_block")
    right.post("/connect_node", {"nodes": [left.url]})  # left takes right's longer chain, dropping its block
    wait_until(lambda: same_chain(left, right), timeout=15)
    wait_until(lambda: right.get("/health").json()["pending"] == 1, timeout=15)
    mined = right.get("/mine_block").json()
    assert [tx["id"] for tx in mined["transactions"]] == [kept_alone]
