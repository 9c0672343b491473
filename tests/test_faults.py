"""Faults: Kubo dying mid-upload, and a bounded stress run of mixed requests over three nodes."""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from conftest import paper_transaction, wait_until
from scripts.cluster import Kubo, NodeProcess

MIB = 1024 * 1024
STRESS_THREADS = 12
STRESS_REQUESTS_PER_THREAD = 250
NODE_MEMORY_LIMIT_MIB = 250


def write_random(path: Path, size: int) -> Path:
    with open(path, "wb") as out:
        for _ in range(size // MIB):
            out.write(os.urandom(MIB))
    return path


def test_kubo_killed_mid_upload_is_a_503_and_the_node_recovers_with_it(spawn_node, tmp_path: Path) -> None:
    daemon = Kubo(tmp_path / "kubo").start()
    try:
        node = spawn_node(ipfs_api=daemon.api_url, data_dir=tmp_path / "node")
        write_random(tmp_path / "node" / "big.bin", 400 * MIB)
        outcome: dict[str, requests.Response] = {}
        upload = threading.Thread(target=lambda: outcome.setdefault(
            "response", node.post("/create_hash", {"file_path": "big.bin"}, timeout=120)))
        upload.start()
        time.sleep(0.7)
        os.kill(int((daemon.repo / "daemon.pid").read_text()), signal.SIGKILL)
        upload.join(timeout=120)
        response = outcome["response"]
        assert response.status_code == 503, response.text
        assert daemon.api_url in response.json()["error"]
        assert node.get("/health").status_code == 200
        assert node.post("/add_transaction", paper_transaction()).status_code == 201

        daemon.start()
        (tmp_path / "node" / "small.bin").write_bytes(b"after the restart")
        assert node.post("/create_hash", {"file_path": "small.bin"}).status_code == 200
    finally:
        daemon.stop()


def resident_mib(node: NodeProcess) -> float:
    status = Path(f"/proc/{node.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


def test_stress_of_mixed_requests_loses_and_duplicates_nothing(spawn_node) -> None:
    # Three nodes mining hundreds of blocks a minute on their own forks part further than the default finality
    # depth within seconds; such reorganisations are refused by design (test_network.py), not what this run tests.
    nodes = [spawn_node("patient", difficulty=3, threads=8, finality_depth=100_000) for _ in range(3)]
    nodes[0].post("/connect_node", {"nodes": [nodes[1].url, nodes[2].url]})
    nodes[1].post("/connect_node", {"nodes": [nodes[2].url]})
    acknowledged: list[str] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        session = requests.Session()
        for number in range(STRESS_REQUESTS_PER_THREAD):
            node = rng.choice(nodes)
            roll = rng.random()
            if roll < 0.6:
                response = session.post(node.url + "/add_transaction", timeout=30,
                                        json=paper_transaction(EHR_name=f"t{seed}-{number}"))
                assert response.status_code == 201, response.text
                with lock:
                    acknowledged.append(response.json()["id"])
            elif roll < 0.65:
                assert session.get(node.url + "/mine_block", timeout=30).status_code == 200
            elif roll < 0.8:
                assert session.get(node.url + "/get_chain", timeout=30).status_code == 200
            elif roll < 0.9:
                assert session.post(node.url + "/get_file_hash", json={"name": f"t{seed}-{number // 2}"},
                                    timeout=30).status_code in (200, 404)
            else:
                assert session.post(node.url + "/add_transaction", data=b"{broken", timeout=30,
                                    headers={"Content-Type": "application/json"}).status_code == 400

    with ThreadPoolExecutor(STRESS_THREADS) as pool:
        for future in [pool.submit(worker, seed) for seed in range(STRESS_THREADS)]:
            future.result()

    def converged() -> list | None:
        chains = [node.chain() for node in nodes]
        return chains[0] if all(chain == chains[0] for chain in chains) else None

    # Equal-length forks deeper than their last block never win a tie: one more block settles them.
    nodes[0].get("/replace_chain")
    nodes[0].get("/mine_block")
    wait_until(converged, timeout=60, interval=0.5)
    wait_until(lambda: len({node.get("/health").json()["pending"] for node in nodes}) == 1, timeout=30)
    nodes[0].get("/mine_block")  # the pending rest (transactions gossiped but not yet mined) into one block
    chain = wait_until(converged, timeout=60, interval=0.5)
    mined = [tx["id"] for block in chain for tx in block["transactions"]]
    assert len(mined) == len(set(mined)), "a transaction was mined twice"
    assert sorted(mined) == sorted(acknowledged), "an acknowledged transaction was lost"
    assert all(node.get("/is_valid").json()["valid"] for node in nodes)
    for node in nodes:
        assert resident_mib(node) < NODE_MEMORY_LIMIT_MIB
