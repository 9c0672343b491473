"""A node's durable state in one SQLite file: chain, pending transactions and peers.

Every change is one transaction committed with fsync (WAL mode, synchronous=FULL)
before the method returns, so what the node acknowledges after a call survives
kill -9 and power loss, and a change costs the same however long the chain is.

Blocks and transactions are opaque JSON objects: the store reads only a block's
"index" and "transactions" and a transaction's "id", and gives back dicts equal
to what it was given. Each transaction id is held at most once, pending or mined.

The file records the network it belongs to (genesis, difficulty, proof of work...)
and its format version; a file that is not such a store, is damaged, is of
another format or belongs to another network raises StoreError and is left as
it was, so the node never starts as if it had no state.
"""
from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator

from errors import StateDamaged

STORE_FILE = "store.sqlite3"
LEGACY_STATE_FILE = "state.json"
SCHEMA_VERSION = 1  # PRAGMA user_version; raise it with every change of the schema below
APPLICATION_ID = 0x454D5243  # PRAGMA application_id, "EMRC": tells our files from other SQLite databases
FILE_MODE = 0o600  # medical metadata: owner only (SQLite gives its -wal and -shm files the same mode)
SQLITE_MAGIC = b"SQLite format 3\x00"
HEADER_SIZE = 100
USER_VERSION_OFFSET = 60
APPLICATION_ID_OFFSET = 68
LOCK_WAIT_SECONDS = 10.0  # how long a write waits for another process's lock before failing
MAX_REPORTED_PROBLEMS = 3
NETWORK_KEY_PREFIX = "network."

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE blocks (block_index INTEGER PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE transactions (id TEXT PRIMARY KEY, block_index INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX transactions_by_block ON transactions (block_index);
CREATE TABLE pending (position INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, body TEXT NOT NULL);
CREATE TABLE peers (position INTEGER PRIMARY KEY, url TEXT NOT NULL);
"""
TABLE_COLUMNS = {"meta": ("key", "value"), "blocks": ("block_index", "body"),
                 "transactions": ("id", "block_index"), "pending": ("position", "id", "body"),
                 "peers": ("position", "url")}

MOVE_ASIDE = ("Nothing was changed. Move the file aside (or restore it from a backup) to start the node; "
              "a node started without it begins with an empty chain and takes its peers' chain.")


class StoreError(StateDamaged):
    """The store cannot be used; the message names the file, what is wrong and what to do.

    Raised instead of ever starting the node as if it had no state.
    """


@dataclass
class SavedState:
    chain: list[dict[str, Any]]  # blocks, genesis first, equal to what was stored
    pending: list[dict[str, Any]]  # pending transactions in the order they were added
    peers: list[str]  # peer base URLs


class Store:
    """One SQLite file, one connection, one lock: safe to call from several threads.

    A single connection suffices: SQLite lets one writer in at a time anyway, and a
    Python lock hands the turn over far more cheaply than SQLite's busy-waiting
    between connections.
    """

    def __init__(self, path: Path, network: dict[str, str]) -> None:
        self.path = Path(path)
        self.network = {str(key): str(value) for key, value in network.items()}
        self._lock = threading.Lock()
        if not os.path.lexists(self.path):
            _create(self.path, self.network)
        self._conn: sqlite3.Connection | None = _open_checked(self.path, self.network)

    # -- reading -------------------------------------------------------------

    def load(self) -> SavedState:
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN")  # one snapshot across the three tables
                chain = [_decoded(body, "a block") for (body,) in
                         conn.execute("SELECT body FROM blocks ORDER BY block_index")]
                pending = [_decoded(body, "a pending transaction") for (body,) in
                           conn.execute("SELECT body FROM pending ORDER BY position")]
                peers = [url for (url,) in conn.execute("SELECT url FROM peers ORDER BY position")]
                conn.execute("COMMIT")
            except (sqlite3.Error, ValueError) as exc:
                _rollback(conn)
                raise StoreError(f"the store {self.path} cannot be read ({exc}). {MOVE_ASIDE}") from None
        return SavedState(chain, pending, peers)

    # -- changing ------------------------------------------------------------

    def append_block(self, block: dict[str, Any]) -> None:
        """Add `block` after the last one and take its transactions off the pending list."""
        index, body, ids = _block_row(block)
        with self._transaction() as conn:
            self._insert_block(conn, index, body, ids)

    def replace_chain(self, keep: int, blocks: list[dict[str, Any]], pending: list[dict[str, Any]]) -> None:
        """A reorganisation: keep the first `keep` blocks, append `blocks`, and make `pending` the pending list."""
        rows = [_block_row(block) for block in blocks]
        pending_rows = [_transaction_row(tx) for tx in pending]
        if len({tx_id for tx_id, _ in pending_rows}) != len(pending_rows):
            raise ValueError("the new pending list holds a transaction id twice")
        with self._transaction() as conn:
            (count, first), = conn.execute("SELECT count(*), min(block_index) FROM blocks")
            if type(keep) is not int or not 0 <= keep <= count:
                raise ValueError(f"keep must be a whole number from 0 to the chain's length ({count}), not {keep!r}")
            if keep < count:
                cut = first + keep
                conn.execute("DELETE FROM transactions WHERE block_index >= ?", (cut,))
                conn.execute("DELETE FROM blocks WHERE block_index >= ?", (cut,))
            conn.execute("DELETE FROM pending")
            for index, body, ids in rows:
                self._insert_block(conn, index, body, ids)
            for tx_id, body in pending_rows:
                if _mined_in(conn, tx_id) is not None:
                    raise ValueError(f"pending transaction {tx_id} is already in a block")
                conn.execute("INSERT INTO pending (id, body) VALUES (?, ?)", (tx_id, body))

    def add_pending(self, tx: dict[str, Any]) -> None:
        """Queue a transaction; one whose id is already pending or mined is ignored."""
        tx_id, body = _transaction_row(tx)
        with self._transaction() as conn:
            if _mined_in(conn, tx_id) is None:
                conn.execute("INSERT INTO pending (id, body) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
                             (tx_id, body))

    def set_peers(self, urls: list[str]) -> None:
        if not all(isinstance(url, str) for url in urls):
            raise ValueError("peer URLs must be strings")
        with self._transaction() as conn:
            conn.execute("DELETE FROM peers")
            conn.executemany("INSERT INTO peers (url) VALUES (?)", [(url,) for url in urls])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    # -- inside --------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the store {self.path} was closed; open it again to use it")
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed durably (fsync) before the block's caller goes on.

        ValueError (a wrong call) and StoreError (the disk refused) roll everything back.
        """
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except ValueError:
                _rollback(conn)
                raise
            except sqlite3.Error as exc:
                _rollback(conn)
                raise StoreError(f"the store {self.path} could not be written ({exc}); the change was not saved. "
                                 f"Check the disk (space, permissions) before going on.") from None
            except BaseException:
                _rollback(conn)
                raise

    @staticmethod
    def _insert_block(conn: sqlite3.Connection, index: int, body: str, ids: list[str]) -> None:
        (last,), = conn.execute("SELECT max(block_index) FROM blocks")
        if last is not None and index != last + 1:
            raise ValueError(f"block {index} does not follow the last stored block, {last}")
        for tx_id in ids:
            mined = _mined_in(conn, tx_id)
            if mined is not None:
                raise ValueError(f"block {index} holds transaction {tx_id}, already in block {mined}")
        conn.execute("INSERT INTO blocks (block_index, body) VALUES (?, ?)", (index, body))
        conn.executemany("INSERT INTO transactions (id, block_index) VALUES (?, ?)", [(i, index) for i in ids])
        conn.executemany("DELETE FROM pending WHERE id = ?", [(i,) for i in ids])


def legacy_state_file(data_dir: Path) -> Path | None:
    """The state.json an older --persist wrote in `data_dir`, if there is one."""
    path = Path(data_dir) / LEGACY_STATE_FILE
    return path if os.path.lexists(path) else None


def migrate_legacy_state(json_path: Path, store_path: Path, network: dict[str, str]) -> int:
    """Import an older --persist's state.json into a new store; returns the number of blocks imported.

    The store appears complete or not at all: it is built under a temporary name and
    then given its own. The JSON file is left as it was. The chain is not checked here;
    the node checks it when it loads the store, as it did the JSON file.
    """
    json_path, store_path = Path(json_path), Path(store_path)
    if os.path.lexists(store_path):
        raise StoreError(f"cannot import {json_path}: the store {store_path} already exists. Nothing was changed. "
                         f"Move the store aside first if the JSON file is the state to keep.")
    chain, pending, peers = _read_legacy(json_path)
    network = {str(key): str(value) for key, value in network.items()}
    temp = _new_temp_file(store_path)
    try:
        _initialise(temp, network)
        with Store(temp, network) as store:
            store.replace_chain(0, chain, [])
            for tx in pending:  # as the old restore did: ids already mined or seen are dropped
                store.add_pending(tx)
            store.set_peers(peers)
        published = _publish(temp, store_path)
    except (ValueError, sqlite3.Error) as exc:
        raise StoreError(f"cannot import {json_path}: {exc}. Nothing was changed.") from None
    finally:
        temp.unlink(missing_ok=True)
    if not published:
        raise StoreError(f"cannot import {json_path}: the store {store_path} appeared while importing. "
                         f"Nothing was changed in it; check which process created it.")
    return len(chain)


def _read_legacy(json_path: Path) -> tuple[list[Any], list[Any], list[Any]]:
    try:
        state = _parsed(json_path.read_text(encoding="utf-8"), "the file")
        chain, pending, peers = state["chain"], state["pending"], state["peers"]
        if not all(isinstance(part, list) for part in (chain, pending, peers)):
            raise ValueError("chain, pending and peers must be lists")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"cannot import {json_path}: it is not a state file of emr-chain's --persist "
                         f"({type(exc).__name__}: {exc}). Nothing was changed.") from None
    return chain, pending, peers


# -- rows ----------------------------------------------------------------------

def _encoded(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _parsed(text: str, what: str) -> Any:
    """json.loads, with nesting too deep for Python's parser (a RecursionError) as the ValueError it is."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{what} is JSON nested too deeply to read") from None


def _decoded(body: str, what: str) -> dict[str, Any]:
    value = _parsed(body, what)
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a JSON object")
    return value


def _transaction_row(tx: Any) -> tuple[str, str]:
    if not isinstance(tx, dict) or not isinstance(tx.get("id"), str) or not tx["id"]:
        raise ValueError("a transaction must be a JSON object with a string 'id'")
    return tx["id"], _encoded(tx)


def _block_row(block: Any) -> tuple[int, str, list[str]]:
    if not isinstance(block, dict) or type(block.get("index")) is not int:
        raise ValueError("a block must be a JSON object with a whole-number 'index'")
    transactions = block.get("transactions")
    if not isinstance(transactions, list):
        raise ValueError(f"block {block['index']}: 'transactions' must be a list")
    ids = [_transaction_row(tx)[0] for tx in transactions]
    if len(set(ids)) != len(ids):
        raise ValueError(f"block {block['index']} holds a transaction id twice")
    return block["index"], _encoded(block), ids


def _mined_in(conn: sqlite3.Connection, tx_id: str) -> int | None:
    row = conn.execute("SELECT block_index FROM transactions WHERE id = ?", (tx_id,)).fetchone()
    return None if row is None else row[0]


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


# -- files -----------------------------------------------------------------------

def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are the explicit BEGIN/COMMIT above, nothing implicit
    return sqlite3.connect(path, timeout=LOCK_WAIT_SECONDS, isolation_level=None, check_same_thread=False)


def _use_wal(path: Path, conn: sqlite3.Connection) -> None:
    """Write-ahead log, fsync'd at every commit: a commit is one append to the log, durable when it returns."""
    (mode,), = conn.execute("PRAGMA journal_mode=WAL")
    if mode != "wal":
        raise StoreError(f"the store {path} cannot use SQLite's write-ahead log here (journal mode {mode!r}); "
                         f"put the data directory on a local file system.")
    conn.execute("PRAGMA synchronous=FULL")


def _new_temp_file(path: Path) -> Path:
    """An empty owner-only file beside `path`, for building a store before it gets its name."""
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".new")
    except OSError as exc:
        raise StoreError(f"cannot create the store {path} ({exc.strerror}): check that its folder exists "
                         f"and is writable.") from None
    os.close(fd)
    os.chmod(name, FILE_MODE)
    return Path(name)


def _initialise(path: Path, network: dict[str, str]) -> None:
    """Write the schema, version and network into the empty file at `path`, durably."""
    conn = _connect(path)
    try:
        _use_wal(path, conn)  # persistent: recorded in the file's header
        conn.execute("BEGIN IMMEDIATE")
        for statement in SCHEMA.strip().split(";\n"):
            conn.execute(statement)
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                         [(NETWORK_KEY_PREFIX + key, value) for key, value in network.items()])
        conn.execute("COMMIT")
    finally:
        conn.close()  # the last connection's close checkpoints the WAL into the file and removes it


def _publish(temp: Path, path: Path) -> bool:
    """Give the finished file at `temp` the name `path`; False if a file took that name meanwhile."""
    try:
        os.link(temp, path)  # unlike a rename, never replaces a store another process just created
    except FileExistsError:
        return False
    finally:
        temp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the new name itself must survive a power cut
    finally:
        os.close(directory)
    return True


def _create(path: Path, network: dict[str, str]) -> None:
    """Create an empty store at `path`: it appears complete or not at all."""
    temp = _new_temp_file(path)
    try:
        _initialise(temp, network)
        _publish(temp, path)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot create the store {path} ({exc}): check the disk (space, permissions).") from None
    finally:
        temp.unlink(missing_ok=True)


def _open_checked(path: Path, network: dict[str, str]) -> sqlite3.Connection:
    """Open an existing store for writing, after checking, without writing, that it is ours and whole."""
    _check_header(path)
    try:
        conn = _connect(path)
    except sqlite3.Error as exc:
        raise StoreError(f"the store {path} cannot be opened ({exc}). {MOVE_ASIDE}") from None
    try:
        _check_contents(path, conn, network)
        _use_wal(path, conn)
    except sqlite3.Error as exc:
        conn.close()
        if "locked" in str(exc):
            raise StoreError(f"the store {path} is locked by another process ({exc}): is another node running "
                             f"with this data directory? Stop it first.") from None
        raise StoreError(f"the store {path} is damaged ({exc}). {MOVE_ASIDE}") from None
    except StoreError:
        conn.close()
        raise
    return conn


def _check_header(path: Path) -> None:
    """Refuse, from its first bytes, a file that is not a store of this format."""
    if path.is_dir():
        raise StoreError(f"the store {path} is a directory, not a file. Nothing was changed. "
                         f"Move it aside to let the node create its store there.")
    try:
        with open(path, "rb") as handle:
            header = handle.read(HEADER_SIZE)
    except OSError as exc:
        raise StoreError(f"the store {path} cannot be read ({exc.strerror}): check its owner and permissions.") \
            from None
    if not header:
        raise StoreError(f"the store {path} is an empty file, not a store: it may have been cut short. {MOVE_ASIDE}")
    if len(header) < HEADER_SIZE or not header.startswith(SQLITE_MAGIC):
        raise StoreError(f"the store {path} is not a SQLite database: it is damaged or another kind of file. "
                         f"{MOVE_ASIDE}")
    application_id = int.from_bytes(header[APPLICATION_ID_OFFSET:APPLICATION_ID_OFFSET + 4], "big")
    if application_id != APPLICATION_ID:
        raise StoreError(f"the store {path} is a SQLite database of another program, not an emr-chain store. "
                         f"{MOVE_ASIDE}")
    _check_version(path, int.from_bytes(header[USER_VERSION_OFFSET:USER_VERSION_OFFSET + 4], "big"))


def _check_version(path: Path, version: int) -> None:
    if version != SCHEMA_VERSION:
        age = "an older" if version < SCHEMA_VERSION else "a newer"
        raise StoreError(f"the store {path} was written by {age} version of emr-chain (store format {version}; this "
                         f"version reads format {SCHEMA_VERSION}). Nothing was changed. Run the emr-chain version "
                         f"that wrote it, or move the file aside to start with an empty chain.")


def _check_contents(path: Path, conn: sqlite3.Connection, network: dict[str, str]) -> None:
    """Tables, a quick integrity check and the network, read only. Raises StoreError or sqlite3.Error."""
    (version,), = conn.execute("PRAGMA user_version")
    _check_version(path, version)  # again: the file's header can lag behind a write-ahead log not yet merged
    for table, expected in TABLE_COLUMNS.items():
        columns = tuple(row[1] for row in conn.execute(f"PRAGMA table_info({table})"))
        if columns != expected:
            problem = "is missing" if not columns else f"has columns {', '.join(columns)}"
            raise StoreError(f"the store {path} is damaged: its table '{table}' {problem}. {MOVE_ASIDE}")
    problems = [row[0] for row in conn.execute(f"PRAGMA quick_check({MAX_REPORTED_PROBLEMS})")]
    if problems != ["ok"]:
        raise StoreError(f"the store {path} is damaged (integrity check: {'; '.join(problems)}). {MOVE_ASIDE}")
    stored = {key.removeprefix(NETWORK_KEY_PREFIX): value for key, value in conn.execute("SELECT key, value FROM meta")
              if key.startswith(NETWORK_KEY_PREFIX)}
    for setting in sorted(set(stored) | set(network)):
        if stored.get(setting) != network.get(setting):
            raise StoreError(
                f"the store {path} belongs to a network with {setting} = {stored.get(setting, '(not set)')!r}, "
                f"but this node is set to {setting} = {network.get(setting, '(not set)')!r}. Nothing was changed. "
                f"Start the node with the network's settings, or give it another data directory (or move the "
                f"file aside) to start a new chain.")
