"""store.py: what a node saves comes back equal, survives kill -9, and a file it cannot trust stops it, loudly."""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest

from blockchain import PAPER_GENESIS_TIMESTAMP, Blockchain, make_genesis
from conftest import paper_transaction
from store import SCHEMA_VERSION, Store, StoreError, legacy_state_file, migrate_legacy_state

ROOT = Path(__file__).resolve().parent.parent
NETWORK = {"genesis": PAPER_GENESIS_TIMESTAMP, "difficulty": "4", "pow_mode": "paper", "security": "paper"}
ACKNOWLEDGED_BEFORE_KILL = 300
BLOCK_EVERY = 25  # the burst mines a block after this many transactions
KILLS = 3  # bursts, each killed and continued from what was saved
BURST_TIMEOUT = 60
KILL_JITTER = 0.05  # seconds the burst may run on after the acknowledgements the test waited for
MINER_PAUSE = 0.001  # seconds between the concurrent test's blocks


def tx(**fields: Any) -> dict[str, Any]:
    return paper_transaction(id=uuid.uuid4().hex, file_name="mri.pdf.aes", file_size="63884", **fields)


def block(index: int, transactions: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """A block as the store sees it: opaque, so the fields need not pass the proof of work."""
    return {"index": index, "timestamp": f"2026-11-25 10:00:{index % 60:02d}.000000", "nonce": index,
            "previous_hash": f"{index - 1:064x}", "transactions": transactions, **fields}


def ids_of(state: Any) -> Counter[str]:
    return Counter([t["id"] for b in state.chain for t in b["transactions"]] + [t["id"] for t in state.pending])


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "store.sqlite3"


@pytest.fixture
def store(path: Path) -> Any:
    with Store(path, NETWORK) as opened:
        opened.append_block(make_genesis(PAPER_GENESIS_TIMESTAMP))
        yield opened


def test_chain_pending_and_peers_come_back_equal(store: Store, path: Path) -> None:
    first, second = [tx(EHR_name="MRI"), tx(EHR_name="X-ray")], [tx(user_id="patient-2")]
    store.append_block(block(2, first, signature="miner's signature, a field added later"))
    store.append_block(block(3, second))
    waiting = [tx(EHR_name=f"scan {n}") for n in range(3)]
    for transaction in waiting:
        store.add_pending(transaction)
    store.set_peers(["http://127.0.0.1:5001", "http://127.0.0.2:5002"])
    state = store.load()
    assert state.chain == [make_genesis(PAPER_GENESIS_TIMESTAMP), block(2, first, signature="miner's signature, "
                           "a field added later"), block(3, second)]
    assert state.pending == waiting
    assert state.peers == ["http://127.0.0.1:5001", "http://127.0.0.2:5002"]
    store.set_peers([])
    assert store.load().peers == []


def test_a_new_store_is_empty(path: Path) -> None:
    with Store(path, NETWORK) as store:
        state = store.load()
    assert (state.chain, state.pending, state.peers) == ([], [], [])


def test_a_block_takes_its_transactions_off_the_pending_list(store: Store) -> None:
    waiting = [tx() for _ in range(4)]
    for transaction in waiting:
        store.add_pending(transaction)
    store.append_block(block(2, waiting[1:3]))
    state = store.load()
    assert state.pending == [waiting[0], waiting[3]]
    assert state.chain[-1]["transactions"] == waiting[1:3]


def test_a_transaction_already_pending_or_mined_is_not_added_again(store: Store) -> None:
    mined, waiting = tx(), tx()
    store.add_pending(mined)
    store.append_block(block(2, [mined]))
    store.add_pending(waiting)
    store.add_pending(dict(waiting))
    store.add_pending(mined)
    state = store.load()
    assert state.pending == [waiting]
    assert ids_of(state) == {mined["id"]: 1, waiting["id"]: 1}


def test_replace_chain_keeps_drops_appends_and_sets_pending(store: Store) -> None:
    ours = [tx() for _ in range(3)]
    store.append_block(block(2, ours[:1]))
    store.append_block(block(3, ours[1:]))
    store.add_pending(tx())
    theirs = [block(3, [tx(), ours[1]], miner="peer"), block(4, [tx()])]
    orphans = [ours[2]]
    store.replace_chain(2, theirs, orphans)
    state = store.load()
    assert state.chain[:2] == [make_genesis(PAPER_GENESIS_TIMESTAMP), block(2, ours[:1])]
    assert state.chain[2:] == theirs
    assert state.pending == orphans
    store.add_pending(ours[1])  # now in their block 3: still ignored
    store.append_block(block(5, orphans))  # the dropped block's transaction can be mined again
    assert max(ids_of(store.load()).values()) == 1


def test_a_wrong_call_changes_nothing(store: Store) -> None:
    waiting = tx()
    store.add_pending(waiting)
    before = store.load()
    with pytest.raises(ValueError):
        store.append_block(block(5, [waiting]))  # does not follow block 1
    with pytest.raises(ValueError):
        store.replace_chain(1, [block(2, [waiting]), block(3, [waiting])], [])  # one transaction in two blocks
    with pytest.raises(ValueError):
        store.replace_chain(7, [], [])  # more blocks than there are
    with pytest.raises(ValueError):
        store.add_pending({"user_id": "no id"})
    assert store.load() == before


def test_everything_is_kept_across_close_and_reopen(store: Store, path: Path) -> None:
    store.append_block(block(2, [tx()]))
    store.add_pending(tx())
    store.set_peers(["http://127.0.0.1:5001"])
    saved = store.load()
    store.close()
    with Store(path, NETWORK) as reopened:
        assert reopened.load() == saved
    with pytest.raises(StoreError, match="closed"):
        store.load()


def test_concurrent_callers_lose_and_repeat_nothing(store: Store) -> None:
    added: list[str] = []
    mined_up_to = threading.Event()

    def add(count: int) -> None:
        for _ in range(count):
            transaction = tx()
            store.add_pending(transaction)
            added.append(transaction["id"])

    def mine() -> None:
        index = 1
        while not mined_up_to.wait(MINER_PAUSE):
            waiting = store.load().pending
            if waiting:
                index += 1
                store.append_block(block(index, waiting))

    miner = threading.Thread(target=mine)
    miner.start()
    adders = [threading.Thread(target=add, args=(50,)) for _ in range(6)]
    for thread in adders:
        thread.start()
    for thread in adders:
        thread.join()
    mined_up_to.set()
    miner.join()
    assert ids_of(store.load()) == Counter(added)


BURST = """
import json, sys, uuid
from pathlib import Path
from store import Store
path, network, block_every = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
store = Store(path, network)
state = store.load()  # after a kill: go on from what was saved, as a restarted node does
if not state.chain:
    store.append_block({"index": 1, "transactions": []})
index, waiting = state.chain[-1]["index"] if state.chain else 1, state.pending
while True:
    tx = {"user_id": "xxxxx", "ipfs_hash": "QmbWxSqxhZms74885xceSaiHVvdjqiVWrATtYUrrUnVE1K", "EHR_name": "MRI",
          "id": uuid.uuid4().hex}
    store.add_pending(tx)
    print(tx["id"], flush=True)  # acknowledged: add_pending returned
    waiting.append(tx)
    if len(waiting) == block_every:
        index += 1
        store.append_block({"index": index, "transactions": waiting})
        waiting = []
"""


def burst_until_killed(path: Path) -> list[str]:
    """Run the burst, kill -9 it mid-way; the ids it acknowledged."""
    burst = subprocess.Popen([sys.executable, "-c", BURST, str(path), json.dumps(NETWORK), str(BLOCK_EVERY)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                             text=True)
    acknowledged = []
    try:
        assert burst.stdout is not None
        while len(acknowledged) < ACKNOWLEDGED_BEFORE_KILL:
            line = burst.stdout.readline()
            assert line, f"the burst ended early: {burst.stderr.read() if burst.stderr else ''}"
            acknowledged.append(line.strip())
        time.sleep(random.uniform(0, KILL_JITTER))  # let it run on, so the kill lands anywhere in its work
        burst.send_signal(signal.SIGKILL)
        rest = burst.stdout.read()
    finally:
        burst.kill()
        burst.wait(BURST_TIMEOUT)
    assert burst.returncode == -signal.SIGKILL  # it was killed mid-burst, not finished
    return acknowledged + rest.split("\n")[:-1]  # a line cut short by the kill was not acknowledged


def test_every_acknowledged_transaction_survives_kill_9(path: Path) -> None:
    acknowledged: list[str] = []
    for _ in range(KILLS):
        acknowledged += burst_until_killed(path)
        with Store(path, NETWORK) as store:
            stored = ids_of(store.load())
        assert {tx_id: stored[tx_id] for tx_id in acknowledged} == {tx_id: 1 for tx_id in acknowledged}
        assert max(stored.values()) == 1


def write_store(path: Path, blocks: int = 200) -> None:
    with Store(path, NETWORK) as store:
        store.append_block(make_genesis(PAPER_GENESIS_TIMESTAMP))
        store.replace_chain(1, [block(index, [tx(), tx()]) for index in range(2, blocks + 2)], [tx()])


def truncated(path: Path) -> None:
    write_store(path)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def with_sql(statement: str) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        write_store(path)
        with sqlite3.connect(path) as conn:
            conn.execute(statement)
        conn.close()
    return damage


def other_program(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    conn.close()


DAMAGE: dict[str, Callable[[Path], Any]] = {
    "random bytes": lambda path: path.write_bytes(os.urandom(64 * 1024)),
    "truncated database": truncated,
    "empty file": lambda path: path.write_bytes(b""),
    "directory": lambda path: (path.mkdir(), (path / "inside").write_text("kept")),
    "older format": with_sql(f"PRAGMA user_version = {SCHEMA_VERSION - 1}"),
    "newer format": with_sql(f"PRAGMA user_version = {SCHEMA_VERSION + 1}"),
    "missing table": with_sql("DROP TABLE pending"),
    "another program's database": other_program,
}


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_or_foreign_file_stops_the_open_with_what_to_do(damage: str, tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    DAMAGE[damage](path)
    before = snapshot(tmp_path)
    with pytest.raises(StoreError) as refused:
        Store(path, NETWORK)
    message = str(refused.value)
    assert str(path) in message and "aside" in message
    assert snapshot(tmp_path) == before  # the file as it was, and nothing left beside it


@pytest.mark.parametrize("setting", NETWORK)
def test_a_store_of_another_network_is_refused_naming_the_setting(setting: str, tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    write_store(path)
    before = snapshot(tmp_path)
    with pytest.raises(StoreError) as refused:
        Store(path, {**NETWORK, setting: NETWORK[setting] + "0"})
    message = str(refused.value)
    assert str(path) in message and setting in message and NETWORK[setting] in message and "aside" in message
    assert snapshot(tmp_path) == before


def test_the_store_is_readable_by_its_owner_only(store: Store, path: Path) -> None:
    store.add_pending(tx())
    files = [p for p in path.parent.iterdir() if p.name.startswith(path.name)]
    assert path in files and len(files) > 1  # the write-ahead log beside it too
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o600 for p in files}


def test_a_state_json_of_the_old_persist_is_imported_equal(tmp_path: Path) -> None:
    chain = Blockchain()
    for number in range(3):
        chain.add_transaction(paper_transaction(EHR_name=f"scan {number}"))
    chain.mine_block()
    chain.add_transaction(paper_transaction(EHR_name="waiting"))
    data_dir = tmp_path / "node"
    data_dir.mkdir()
    # What --persist wrote before the store: the whole state as one JSON file in the data directory.
    (data_dir / "state.json").write_text(json.dumps({"chain": chain.chain, "pending": chain.pending,
                                                     "peers": ["http://127.0.0.1:9"]}))
    json_path = legacy_state_file(data_dir)
    assert json_path is not None
    saved = json.loads(json_path.read_text())
    store_path = data_dir / "store.sqlite3"
    assert migrate_legacy_state(json_path, store_path, NETWORK) == len(saved["chain"]) == 2
    with Store(store_path, NETWORK) as store:
        state = store.load()
    assert (state.chain, state.pending, state.peers) == (saved["chain"], saved["pending"], saved["peers"])
    assert stat.S_IMODE(store_path.stat().st_mode) == 0o600
    assert json.loads(json_path.read_text()) == saved
    with pytest.raises(StoreError, match="already exists"):
        migrate_legacy_state(json_path, store_path, NETWORK)


def test_no_state_json_is_no_legacy_state(tmp_path: Path) -> None:
    assert legacy_state_file(tmp_path) is None


def test_a_damaged_state_json_imports_nothing(tmp_path: Path) -> None:
    json_path, store_path = tmp_path / "state.json", tmp_path / "store.sqlite3"
    for damage in ("{not json", '{"chain": "x", "pending": [], "peers": []}',
                   json.dumps({"chain": [block(1, []), block(3, [])], "pending": [], "peers": []})):
        json_path.write_text(damage)
        with pytest.raises(StoreError) as refused:
            migrate_legacy_state(json_path, store_path, NETWORK)
        assert str(json_path) in str(refused.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
