"""Hostile peers against real node processes: no free rewrite, every byte from a peer bounded, one bad peer harms
no one. Each hostile peer is a small loopback HTTP server of the test's own."""
from __future__ import annotations

import copy
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests

from blockchain import hash_block, proof_of_work
from conftest import paper_transaction, wait_until
from scripts.cluster import NodeProcess, free_port
from scripts.hostile import MIB, Answer, HostilePeer, drip, endless_body, garbage, nested, packed, serving

MEMORY_BOUND_MIB = 200  # a node holding a short chain stays far below this whatever a peer sends
HEALTH_SECONDS = 2.0
SHARED_COPY_FACTOR = 10  # generous: the 100 ms target is measured in bench/, not asserted in a timed test


def resident_mib(node: NodeProcess) -> float:
    status = Path(f"/proc/{node.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def health_answers(node: NodeProcess) -> bool:
    return requests.get(node.url + "/health", timeout=HEALTH_SECONDS).status_code == 200


@pytest.fixture
def hostile() -> Iterator[Callable[[Answer], HostilePeer]]:
    peers: list[HostilePeer] = []

    def make(answer: Answer) -> HostilePeer:
        peers.append(HostilePeer(answer))
        return peers[-1]

    yield make
    for peer in peers:
        peer.close()


def mined(node: NodeProcess, blocks: int) -> list[dict[str, Any]]:
    for number in range(blocks):
        node.post("/add_transaction", paper_transaction(EHR_name=f"record {number}"))
        assert node.get("/mine_block").status_code == 200
    return node.chain()


def relinked(chain: list[dict[str, Any]], start: int) -> list[dict[str, Any]]:
    """The chain with every link from block `start` on recomputed: what a forger does after an edit.
    The paper's proof depends only on the previous nonce, so every nonce stays valid."""
    for position in range(start, len(chain)):
        chain[position]["previous_hash"] = hash_block(chain[position - 1])
    return chain


# -- no free rewrites ----------------------------------------------------------------

def test_an_old_transaction_edited_at_equal_length_is_not_adopted(spawn_node, hostile) -> None:
    node = spawn_node()
    honest = mined(node, 4)
    forged = relinked(copy.deepcopy(honest), 1)
    forged[1]["transactions"][0]["user_id"] = "mallory"
    relinked(forged, 2)
    # grind the last block's timestamp until its hash beats ours: what used to win the tie
    for micro in range(100_000):
        forged[-1]["timestamp"] = forged[-1]["timestamp"][:-6] + f"{micro:06d}"
        if hash_block(forged[-1]) < hash_block(honest[-1]) and forged[-1]["timestamp"] >= forged[-2]["timestamp"]:
            break
    peer = hostile(serving(forged))
    node.post("/connect_node", {"nodes": [peer.url]})
    body = node.get("/replace_chain").json()
    assert body["replaced"] is False and body["chain"] == honest
    assert node.chain()[1]["transactions"][0]["user_id"] == "xxxxx"
    assert node.get("/is_valid").json()["valid"]


def test_a_longer_rewrite_deeper_than_the_finality_depth_is_refused_and_shown(spawn_node, hostile) -> None:
    node = spawn_node(finality_depth=3)
    honest = mined(node, 6)
    forged = copy.deepcopy(honest)
    forged[1]["transactions"][0]["user_id"] = "mallory"
    relinked(forged, 2)
    nonce = proof_of_work(forged[-1]["nonce"], 4)
    forged.append({"index": len(forged) + 1, "timestamp": forged[-1]["timestamp"], "nonce": nonce,
                   "previous_hash": hash_block(forged[-1]), "transactions": []})
    peer = hostile(serving(forged))
    node.post("/connect_node", {"nodes": [peer.url]})
    body = node.get("/replace_chain").json()
    assert body["replaced"] is False and body["chain"] == honest
    assert "finality depth" in body["peers"][peer.netloc]
    listed = {entry["peer"]: entry for entry in node.get("/peers").json()["peers"]}
    assert "finality depth" in listed[peer.netloc]["last_error"] and listed[peer.netloc]["faults"] == 0
    assert "finality depth" in node.log_path.read_text()


# -- every byte from a peer bounded ---------------------------------------------------

def test_a_peer_answering_gossip_with_a_huge_body_costs_no_memory(spawn_node, hostile) -> None:
    peer = hostile(lambda method, path: endless_body()(method, path) if method == "POST"
                   else (200, b'{"from": 2, "length": 1, "blocks": []}', 0.0))
    node = spawn_node(max_peer_response_bytes=MIB)
    node.post("/connect_node", {"nodes": [peer.url]})
    for number in range(5):
        node.post("/add_transaction", paper_transaction(EHR_name=f"gossiped {number}"))
    node.get("/mine_block")
    # The announcement, the transactions and the block are each answered with an endless body, until the node
    # drops the peer for its faults.
    wait_until(lambda: any(asked.startswith("POST /receive_block") for asked in peer.asked)
               or peer.netloc not in node.get("/health").json()["peers"], timeout=20)
    assert health_answers(node)
    assert resident_mib(node) < MEMORY_BOUND_MIB


def test_an_answer_of_packed_empty_objects_is_refused_before_it_is_parsed(spawn_node, hostile) -> None:
    peer = hostile(packed())
    node = spawn_node(max_peer_response_bytes=32 * MIB)
    node.post("/connect_node", {"nodes": [peer.url]})
    verdict = node.get("/replace_chain").json()["peers"][peer.netloc]
    assert "skipped" in verdict and "values" in verdict
    assert resident_mib(node) < MEMORY_BOUND_MIB


def test_a_peer_dripping_its_answer_is_cut_at_the_deadline_and_health_stays_up(spawn_node, hostile) -> None:
    dripping = hostile(drip(1.0))
    node = spawn_node(peer_timeout=2)
    node.post("/connect_node", {"nodes": [dripping.url]})
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        calls = [pool.submit(node.get, "/replace_chain") for _ in range(16)]
        time.sleep(0.5)
        assert health_answers(node)
        answers = [call.result() for call in calls]
    assert time.monotonic() - started < 10
    assert {answer.status_code for answer in answers} <= {200, 503}
    verdicts = [answer.json()["peers"][dripping.netloc] for answer in answers if answer.status_code == 200]
    assert verdicts and all("did not answer within 2s" in verdict for verdict in verdicts)


@pytest.mark.parametrize("poison", ["nested", "long-nonce"])
def test_a_poisoned_chain_is_skipped_and_good_peers_still_sync(spawn_node, hostile, poison: str) -> None:
    good = spawn_node()
    wanted = mined(good, 2)
    if poison == "nested":
        bad = hostile(nested())
    else:
        block = {**wanted[1], "nonce": 0}
        page = json.dumps({"from": 2, "length": 5, "blocks": [block]}).replace('"nonce": 0', '"nonce": ' + "9" * 5000)
        bad = hostile(lambda method, path: (200, page.encode(), 0.0))
    node = spawn_node()
    node.post("/connect_node", {"nodes": [bad.url, good.url]})
    body = node.get("/replace_chain").json()
    assert "skipped" in body["peers"][bad.netloc]
    wait_until(lambda: node.chain() == wanted)
    assert health_answers(node)


def test_a_block_with_an_enormous_nonce_is_a_400_not_a_500(spawn_node) -> None:
    node = spawn_node()
    block = json.dumps({"index": 2, "timestamp": "2020-09-02 23:33:07.304063", "nonce": 1, "previous_hash": "0",
                        "transactions": []}).replace('"nonce": 1', '"nonce": ' + "7" * 4400)
    response = requests.post(node.url + "/receive_block", data=block, timeout=10,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "number longer" in response.json()["error"]
    assert len(node.chain()) == 1


def test_a_peer_that_keeps_misbehaving_is_dropped(spawn_node, hostile) -> None:
    bad = hostile(garbage())
    node = spawn_node(max_peer_faults=3)
    node.post("/connect_node", {"nodes": [bad.url]})
    for _ in range(3):
        node.get("/replace_chain")
    wait_until(lambda: bad.netloc not in node.get("/health").json()["peers"])
    assert "dropped peer" in node.log_path.read_text()


# -- peers listed, removed, limited; pending limited; long chains joined -------------------

def test_peers_are_listed_removed_and_limited(spawn_node) -> None:
    node = spawn_node(max_peers=3)
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(4)]
    assert node.post("/connect_node", {"nodes": urls[:3]}).status_code == 201
    refused = node.post("/connect_node", {"nodes": urls[3:]})
    assert refused.status_code == 409 and "max_peers" in refused.json()["error"]
    assert [entry["url"] for entry in node.get("/peers").json()["peers"]] == urls[:3]
    removed = node.post("/remove_node", {"nodes": [urls[0], urls[3]]}).json()
    assert removed["total_nodes"] == [url.removeprefix("http://") for url in urls[1:3]]
    assert removed["not_peers"] == [urls[3].removeprefix("http://")]
    assert node.post("/connect_node", {"nodes": urls[3:]}).status_code == 201


def test_a_thousand_dead_urls_are_refused_at_once(spawn_node) -> None:
    node = spawn_node()
    started = time.monotonic()
    response = node.post("/connect_node", {"nodes": [f"http://127.0.0.1:{port}" for port in range(2000, 3000)]})
    assert response.status_code == 400 and "max_peers" in response.json()["error"]
    assert time.monotonic() - started < HEALTH_SECONDS and node.get("/health").json()["peers"] == []


def test_pending_transactions_have_a_limit(spawn_node) -> None:
    node = spawn_node(max_pending=5)
    for number in range(5):
        assert node.post("/add_transaction", paper_transaction(EHR_name=f"t{number}")).status_code == 201
    full = node.post("/add_transaction", paper_transaction(EHR_name="one too many"))
    assert full.status_code == 503 and "max_pending" in full.json()["error"]
    node.get("/mine_block")
    assert node.post("/add_transaction", paper_transaction(EHR_name="after the block")).status_code == 201


def test_a_new_node_joins_a_chain_far_longer_than_one_answer(spawn_node) -> None:
    old = spawn_node(sync_page_bytes=2048, difficulty=2)
    chain = mined(old, 120)
    pages = len(json.dumps(chain)) // 2048
    assert pages > 10
    new = spawn_node(difficulty=2, max_peer_response_bytes=16 * 1024, peers=old.url)
    wait_until(lambda: new.chain() == chain, timeout=30)
    assert new.get("/is_valid").json()["valid"]


def test_many_clients_reading_a_long_chain_share_one_copy_of_it(spawn_node) -> None:
    node = spawn_node(max_pending=50_000)
    for batch in range(20):
        transactions = [{**paper_transaction(EHR_name=f"record {batch}-{number}", user_id="u" * 200),
                         "id": f"{batch:08x}{number:024x}"} for number in range(1000)]
        assert node.post("/receive_transactions", {"transactions": transactions}).status_code == 200
        if batch % 10 == 9:
            node.get("/mine_block")
    size = len(node.get("/get_chain").content)
    assert size > 5 * MIB
    before = resident_mib(node)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: node.get("/get_chain"), range(8)))
        assert health_answers(node)
    assert all(answer.status_code == 200 and len(answer.content) == size for answer in answers)
    # One serialised copy, sent from it piece by piece: far less than eight copies of the text and its objects
    # (measured: 7x the document's size at the peak, most of it the allocator's; 14x when each request made its own).
    assert resident_mib(node) - before < SHARED_COPY_FACTOR * size / MIB
