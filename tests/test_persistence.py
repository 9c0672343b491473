"""--persist: what a node acknowledged survives kill -9; a damaged state file stops the start, loudly."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import paper_transaction, wait_until
from scripts.cluster import ROOT, free_port


def state_file(data_dir: Path) -> Path:
    return data_dir / "state.json"


def test_acknowledged_transactions_survive_kill_9(spawn_node, tmp_path: Path) -> None:
    data_dir = tmp_path / "persisted"
    node = spawn_node(data_dir=data_dir, persist=True)
    acknowledged = []
    for number in range(60):
        response = node.post("/add_transaction", paper_transaction(EHR_name=f"scan {number}"))
        assert response.status_code == 201
        acknowledged.append(response.json()["id"])
        if number % 25 == 24:
            assert node.get("/mine_block").status_code == 200
    node.stop(kill=True)
    node.start()
    chain = node.chain()
    assert len(chain) == 3
    assert node.get("/health").json()["pending"] == 10
    node.get("/mine_block")
    mined = [tx["id"] for block in node.chain() for tx in block["transactions"]]
    assert sorted(mined) == sorted(acknowledged)


def test_peers_are_kept_across_a_restart(spawn_node, tmp_path: Path) -> None:
    other = spawn_node()
    node = spawn_node(data_dir=tmp_path / "persisted", persist=True)
    node.post("/connect_node", {"nodes": [other.url]})
    node.stop(kill=True)
    node.start()
    assert node.get("/health").json()["peers"] == [other.netloc]


def test_state_is_valid_json_after_every_change_and_no_temporary_file_is_left(make_client) -> None:
    client = make_client(persist=True)
    path = state_file(client.node.data_dir)
    for request in (lambda: client.post("/add_transaction", json=paper_transaction()),
                    lambda: client.get("/mine_block"),
                    lambda: client.post("/connect_node", json={"nodes": ["http://127.0.0.1:9"]})):
        request()
        state = json.loads(path.read_text())
        assert state["chain"] == client.get("/get_chain").get_json()["chain"]
        assert state["pending"] == client.node.blockchain.pending
    assert state["peers"] == ["http://127.0.0.1:9"]
    assert [p.name for p in client.node.data_dir.iterdir() if p.name.startswith(".part")] == []


def start_fails(data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "app.py"), "--port", str(free_port()), "--data-dir",
                           str(data_dir), "--persist", *extra], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def test_damaged_state_file_stops_the_start_with_what_to_do(tmp_path: Path) -> None:
    for damage in ("{not json", '{"chain": [], "pending": [], "peers": []}', '{"chain": "x"}'):
        data_dir = tmp_path / f"damaged{len(damage)}"
        data_dir.mkdir()
        state_file(data_dir).write_text(damage)
        result = start_fails(data_dir)
        assert result.returncode != 0
        assert str(state_file(data_dir)) in result.stderr and "move the file aside" in result.stderr
        assert state_file(data_dir).read_text() == damage


def test_tampered_saved_chain_is_refused(make_client, tmp_path: Path) -> None:
    client = make_client(persist=True)
    client.post("/add_transaction", json=paper_transaction())
    client.get("/mine_block")
    path = state_file(client.node.data_dir)
    state = json.loads(path.read_text())
    state["chain"][1]["nonce"] += 1
    path.write_text(json.dumps(state))
    result = start_fails(client.node.data_dir)
    assert result.returncode != 0 and "proof of work" in result.stderr


def test_saved_chain_does_not_load_under_another_difficulty(make_client) -> None:
    client = make_client(persist=True)
    client.get("/mine_block")
    result = start_fails(client.node.data_dir, "--difficulty", "5")
    assert result.returncode != 0 and "settings" in result.stderr


def test_restarted_persistent_node_still_follows_its_network(spawn_node, tmp_path: Path) -> None:
    patient = spawn_node()
    authority = spawn_node("healthcare_authority", data_dir=tmp_path / "authority", persist=True, peers=patient.url)
    wait_until(lambda: patient.get("/health").json()["peers"])
    authority.stop(kill=True)
    patient.post("/add_transaction", paper_transaction())
    patient.get("/mine_block")
    authority.start()
    wait_until(lambda: authority.chain() == patient.chain(), timeout=15)
