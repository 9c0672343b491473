"""--persist: what a node acknowledged survives kill -9; a damaged, foreign or older store stops the start, loudly."""
from __future__ import annotations

import itertools
import json
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
import requests

from conftest import paper_transaction, wait_until
from scripts.cluster import ROOT, NodeProcess, free_port
from store import STORE_FILE, Store

FINGERPRINT = {"genesis_timestamp": "2020-09-02 23:31:41.258101", "difficulty": "4", "pow_mode": "paper",
               "security": "paper"}


def store_file(data_dir: Path) -> Path:
    return data_dir / ".emr" / STORE_FILE


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


BURST_CLIENTS = 4
BURST_ROUNDS = 2
ACKNOWLEDGED_PER_ROUND = 120  # the kill comes once the clients have this many answers, and more are on their way
MINE_EVERY = 25  # the first client mines a block after this many of its own transactions: kills land in mining too


def burst_until_killed(node: NodeProcess, round_number: int) -> tuple[dict[str, str], int]:
    """Clients send add_transaction (one mines now and then) until the node is killed with SIGKILL among their
    requests; ({id: EHR_name} of every transaction answered 201, how many requests the kill cut off in flight)."""
    acknowledged: dict[str, str] = {}
    cut_off, refused = [], []
    killed_at = [float("inf")]
    lock = threading.Lock()

    def request(what: str, send: Callable[[], requests.Response], status: int) -> requests.Response | None:
        sent = time.monotonic()
        try:
            answer = send()
        except requests.RequestException:
            with lock:
                if sent < killed_at[0]:
                    cut_off.append(what)
            return None
        if answer.status_code != status:
            with lock:
                refused.append(f"{what}: {answer.status_code} {answer.text}")
            return None
        return answer

    def client(number: int) -> None:
        session = requests.Session()
        for sequence in itertools.count():
            name = f"burst {round_number}.{number}.{sequence}"
            added = request(name, lambda: session.post(node.url + "/add_transaction", timeout=30,
                                                       json=paper_transaction(EHR_name=name)), 201)
            if added is None:
                return
            with lock:
                acknowledged[added.json()["id"]] = name
            if number == 0 and sequence % MINE_EVERY == MINE_EVERY - 1 and \
                    request("mine_block", lambda: session.get(node.url + "/mine_block", timeout=30), 200) is None:
                return

    clients = [threading.Thread(target=client, args=(number,), daemon=True) for number in range(BURST_CLIENTS)]
    for thread in clients:
        thread.start()
    wait_until(lambda: len(acknowledged) >= ACKNOWLEDGED_PER_ROUND or refused, timeout=60, interval=0.01)
    assert not refused, refused
    time.sleep(random.uniform(0, 0.05))  # so the kill lands anywhere in the node's work
    with lock:
        killed_at[0] = time.monotonic()
    assert node.process is not None
    node.process.send_signal(signal.SIGKILL)
    node.process.wait(timeout=30)
    for thread in clients:
        thread.join(timeout=60)
        assert not thread.is_alive(), "a client still waits on a killed node"
    return acknowledged, len(cut_off)


def test_kill_9_among_concurrent_requests_keeps_every_acknowledged_transaction_once(spawn_node,
                                                                                    tmp_path: Path) -> None:
    node = spawn_node(data_dir=tmp_path / "burst", persist=True)
    acknowledged: dict[str, str] = {}
    cut_off = 0
    for round_number in range(BURST_ROUNDS):
        answered, cut = burst_until_killed(node, round_number)
        acknowledged.update(answered)
        cut_off += cut
        node.start()
    assert cut_off, "the kills landed between requests, not among them"
    while node.get("/health").json()["pending"]:
        assert node.get("/mine_block").status_code == 200
    assert node.get("/is_valid").status_code == 200
    recorded = [(tx["id"], tx["EHR_name"]) for block in node.chain() for tx in block["transactions"]]
    ids, names = Counter(tx_id for tx_id, _ in recorded), Counter(name for _, name in recorded)
    assert [tx_id for tx_id in acknowledged if ids[tx_id] != 1] == [], "acknowledged, then lost or recorded twice"
    assert max(ids.values()) == 1 and max(names.values()) == 1, "a transaction was recorded twice"
    assert all(dict(recorded)[tx_id] == name for tx_id, name in acknowledged.items())


def test_peers_are_kept_across_a_restart(spawn_node, tmp_path: Path) -> None:
    other = spawn_node()
    node = spawn_node(data_dir=tmp_path / "persisted", persist=True)
    node.post("/connect_node", {"nodes": [other.url]})
    node.stop(kill=True)
    node.start()
    assert node.get("/health").json()["peers"] == [other.netloc]


def test_the_store_holds_every_change_as_it_is_acknowledged(make_client) -> None:
    client = make_client(persist=True)
    for request in (lambda: client.post("/add_transaction", json=paper_transaction()),
                    lambda: client.get("/mine_block"),
                    lambda: client.post("/add_transaction", json=paper_transaction(EHR_name="X-Ray")),
                    lambda: client.post("/connect_node", json={"nodes": ["http://127.0.0.1:9"]})):
        request()
        with Store(store_file(client.node.data_dir), FINGERPRINT) as store:
            saved = store.load()
        assert saved.chain == client.get("/get_chain").get_json()["chain"]
        assert saved.pending == client.node.blockchain.pending
    assert saved.peers == ["http://127.0.0.1:9"]


def test_no_request_reaches_the_nodes_own_files(make_client) -> None:
    client = make_client(persist=True)
    client.post("/add_transaction", json=paper_transaction())
    store = store_file(client.node.data_dir)
    before = store.read_bytes()
    (client.node.data_dir / "MRI.pdf").write_bytes(b"scan")
    for path, body in (("/create_hash", {"file_path": ".emr/store.sqlite3"}),
                       ("/encrypt_file", {"file_path": "MRI.pdf", "password": "p",
                                          "output_path": ".emr/store.sqlite3", "overwrite": True}),
                       ("/encrypt_file", {"file_path": ".emr/store.sqlite3", "password": "p"})):
        response = client.post(path, json=body)
        assert response.status_code == 400 and "node's own files" in response.get_json()["error"], body
    assert store.read_bytes() == before


def start_fails(data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "app.py"), "--port", str(free_port()), "--data-dir",
                           str(data_dir), "--persist", *extra], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


@pytest.mark.process
@pytest.mark.parametrize("damage", [b"{not json", b"SQLite format 3\x00" + b"\x00" * 200, b""],
                         ids=["not-sqlite", "cut-short", "empty"])
def test_damaged_store_stops_the_start_with_what_to_do(tmp_path: Path, damage: bytes) -> None:
    data_dir = tmp_path / "damaged"
    store_file(data_dir).parent.mkdir(parents=True)
    store_file(data_dir).write_bytes(damage)
    result = start_fails(data_dir)
    assert result.returncode != 0
    assert str(store_file(data_dir)) in result.stderr and "Move the file aside" in result.stderr
    assert store_file(data_dir).read_bytes() == damage


DEEP = 200_000  # levels of nesting: far past what Python's JSON parser can take (about a thousand)


def with_sql(statement: str, *values: object) -> Callable[[Path], Path]:
    def damage(data_dir: Path) -> Path:
        with sqlite3.connect(store_file(data_dir)) as conn:
            conn.execute(statement, values)
        conn.close()
        return store_file(data_dir)
    return damage


def nested_deep(table: str) -> Callable[[Path], Path]:
    """A saved block (or pending transaction) whose record name is a list nested DEEP levels."""
    key, where = ("block_index", "block_index = 2") if table == "blocks" else ("position", "1 = 1")

    def damage(data_dir: Path) -> Path:
        with sqlite3.connect(store_file(data_dir)) as conn:
            row_key, body = conn.execute(f"SELECT {key}, body FROM {table} WHERE {where}").fetchone()
            value = json.loads(body)
            (value["transactions"][0] if table == "blocks" else value)["EHR_name"] = "@deep@"
            deep = json.dumps(value).replace('"@deep@"', "[" * DEEP + "]" * DEEP)
            conn.execute(f"UPDATE {table} SET body = ? WHERE {key} = ?", (deep, row_key))
        conn.close()
        return store_file(data_dir)
    return damage


def store_made_a_directory(data_dir: Path) -> Path:
    store_file(data_dir).unlink()
    store_file(data_dir).mkdir()
    (store_file(data_dir) / "inside").write_text("kept")
    return store_file(data_dir)


def state_folder_made_a_file(data_dir: Path) -> Path:
    folder = store_file(data_dir).parent
    for path in sorted(folder.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    folder.rmdir()
    folder.write_text("not a folder")
    return folder


DAMAGED_STATE: dict[str, Callable[[Path], Path]] = {
    "chain nested deep": nested_deep("blocks"),
    "pending nested deep": nested_deep("pending"),
    "peer not a URL": with_sql("INSERT INTO peers (url) VALUES (?)", "not a url"),
    "peer a number": with_sql("INSERT INTO peers (url) VALUES (?)", 5003),
    "store a directory": store_made_a_directory,
    "state folder a file": state_folder_made_a_file,
}


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.mark.process
@pytest.mark.parametrize("damage", DAMAGED_STATE)
def test_damaged_state_stops_the_start_with_what_to_do_not_a_traceback(make_client, damage: str) -> None:
    client = make_client(persist=True)
    client.post("/add_transaction", json=paper_transaction())
    client.get("/mine_block")
    client.post("/add_transaction", json=paper_transaction(EHR_name="X-Ray"))
    client.post("/connect_node", json={"nodes": ["http://127.0.0.1:9"]})
    client.node.close()
    data_dir = client.node.data_dir
    damaged = DAMAGED_STATE[damage](data_dir)
    before = snapshot(data_dir)
    result = start_fails(data_dir)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    assert str(damaged) in result.stderr and "aside" in result.stderr.lower(), result.stderr
    assert snapshot(data_dir) == before


@pytest.mark.process
def test_a_state_json_nested_deep_is_refused_by_the_import_not_a_traceback(tmp_path: Path) -> None:
    data_dir = tmp_path / "old"
    data_dir.mkdir()
    legacy = data_dir / "state.json"
    legacy.write_text('{"chain": ' + "[" * DEEP + "]" * DEEP + ', "pending": [], "peers": []}')
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "migrate-state", "--data-dir", str(data_dir)],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output
    assert str(legacy) in result.stderr and "nested too deeply" in result.stderr, result.stderr
    assert not store_file(data_dir).exists()


@pytest.mark.process
def test_tampered_saved_chain_is_refused(make_client) -> None:
    client = make_client(persist=True)
    client.post("/add_transaction", json=paper_transaction())
    client.get("/mine_block")
    client.node.close()
    with sqlite3.connect(store_file(client.node.data_dir)) as conn:
        body = json.loads(conn.execute("SELECT body FROM blocks WHERE block_index = 2").fetchone()[0])
        body["nonce"] += 1
        conn.execute("UPDATE blocks SET body = ? WHERE block_index = 2", (json.dumps(body),))
    result = start_fails(client.node.data_dir)
    assert result.returncode != 0 and "proof of work" in result.stderr


@pytest.mark.process
def test_saved_chain_does_not_load_under_another_difficulty(make_client) -> None:
    client = make_client(persist=True)
    client.get("/mine_block")
    client.node.close()
    result = start_fails(client.node.data_dir, "--difficulty", "5")
    assert result.returncode != 0 and "difficulty" in result.stderr and "settings" in result.stderr


@pytest.mark.process
def test_an_older_state_json_stops_the_start_until_it_is_imported(tmp_path: Path) -> None:
    data_dir = tmp_path / "old"
    data_dir.mkdir()
    genesis = {"index": 1, "timestamp": FINGERPRINT["genesis_timestamp"], "nonce": 1, "previous_hash": "0",
               "transactions": []}
    tx = {**paper_transaction(), "id": "a" * 32}
    (data_dir / "state.json").write_text(json.dumps({"chain": [genesis], "pending": [tx], "peers": []}))
    refused = start_fails(data_dir)
    assert refused.returncode != 0 and "migrate-state" in refused.stderr
    imported = subprocess.run([sys.executable, str(ROOT / "app.py"), "migrate-state", "--data-dir", str(data_dir)],
                              capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert imported.returncode == 0, imported.stderr
    assert not (data_dir / "state.json").exists()
    with Store(store_file(data_dir), FINGERPRINT) as store:
        assert store.load().pending == [tx]


def test_restarted_persistent_node_still_follows_its_network(spawn_node, tmp_path: Path) -> None:
    patient = spawn_node()
    authority = spawn_node("healthcare_authority", data_dir=tmp_path / "authority", persist=True, peers=patient.url)
    wait_until(lambda: patient.get("/health").json()["peers"])
    authority.stop(kill=True)
    patient.post("/add_transaction", paper_transaction())
    patient.get("/mine_block")
    authority.start()
    wait_until(lambda: authority.chain() == patient.chain(), timeout=15)
