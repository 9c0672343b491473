"""One emr-chain node: its chain, its peers, its IPFS daemon and its data directory.

`Node` is the only door into a node. The Flask routes in app.py each call one
public method here and shape its answer; a notebook or a test can call the same
methods. Nothing here knows HTTP: failures are the errors of errors.py.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import queue
import re
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

import crypto
from blockchain import Block, Blockchain, Receipt, Transaction, hash_block, is_cid
from config import Config
from errors import BadInput, Busy, Conflict, InvalidBlock, IpfsError, NodeError, NotFound, PathRefused, StateDamaged
from ipfs_client import IpfsClient
from mining import Miner
from network import NODE_HEADER, Network, peer_netloc
from storage import MAX_NAME_BYTES, confine_path, safe_file_name
from store import LEGACY_STATE_FILE, STORE_FILE, Store, legacy_state_file, migrate_legacy_state

__all__ = ["NODE_HEADER", "Node"]

log = logging.getLogger("emr.node")

UPLOADS_FOLDER = "uploads"
IMPORTED_SUFFIX = ".imported"
PRIVATE_FOLDER_MODE = 0o700
SIZE_CACHE_ENTRIES = 100_000
MAX_GOSSIP_BATCH = 1000
CONNECT_EXAMPLE = '["http://127.0.0.1:5003"]'
BLOCK_INDEX = re.compile(r"[0-9]{1,18}")


def network_fingerprint(config: Config) -> dict[str, str]:
    """The settings a saved chain belongs to: a store made under others is refused."""
    return {"genesis_timestamp": config.genesis_timestamp, "difficulty": str(config.difficulty),
            "pow_mode": config.pow_mode}


def migrate_state(config: Config) -> str:
    """Import the state.json an older --persist wrote into the node's store, and move the file aside."""
    legacy = legacy_state_file(config.data_path)
    if legacy is None:
        raise NotFound(f"there is no {LEGACY_STATE_FILE} to import in {config.data_path}")
    config.state_path.mkdir(parents=True, exist_ok=True)
    store_path = config.state_path / STORE_FILE
    blocks = migrate_legacy_state(legacy, store_path, network_fingerprint(config))
    legacy.rename(legacy.with_name(legacy.name + IMPORTED_SUFFIX))
    return f"imported {blocks} blocks from {legacy} into {store_path}; the old file is now {legacy.name}{IMPORTED_SUFFIX}"


class Node:
    def __init__(self, config: Config, ipfs: IpfsClient | None = None) -> None:
        self.config = config
        self.miner = Miner(config.mining_workers or os.cpu_count() or 1)
        self.blockchain = Blockchain(config.difficulty, config.genesis_timestamp, config.pow_mode,
                                     self.miner.proof_of_work, finality_depth=config.finality_depth,
                                     max_pending=config.max_pending)
        self.network = Network(self.blockchain, config)
        self.ipfs = ipfs or IpfsClient(config.ipfs_api, config.ipfs_timeout, config.ipfs_lookup_timeout)
        self.data_dir = config.data_path
        self.downloads = config.downloads_path
        self.state_dir = config.state_path
        self.uploads = self.state_dir / UPLOADS_FOLDER
        for folder in (self.data_dir, self.downloads, self.state_dir, self.uploads):
            folder.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(PRIVATE_FOLDER_MODE)
        self._sizes: dict[str, str] = {}
        self._document: tuple[tuple[int, str] | None, bytes] = (None, b"")
        self._document_lock = threading.Lock()
        self.store: Store | None = None
        if config.persist:
            self._restore()

    # -- the chain -----------------------------------------------------------

    def chain(self) -> list[Block]:
        return self.blockchain.chain

    def chain_document(self) -> bytes:
        """{"chain": ..., "length": ...} as JSON text (sorted keys, compact, as Flask writes it), made once per
        state of the chain: many clients asking for a long chain at once share one copy instead of one each."""
        chain = self.blockchain.chain
        key = (len(chain), hash_block(chain[-1]))
        with self._document_lock:
            if self._document[0] != key:
                self._document = (key, (json.dumps({"chain": chain, "length": len(chain)}, sort_keys=True,
                                                   separators=(",", ":")) + "\n").encode())
            return self._document[1]

    def chain_problem(self) -> str | None:
        """Why this node's own chain is not valid, or None if it is."""
        return self.blockchain.chain_problem(self.blockchain.chain)

    def add_transaction(self, fields: Any) -> Receipt:
        """Record a transaction a client sent; it is gossiped to every peer."""
        return self.network.add_transaction(fields)

    def receive_transaction(self, tx: Any, from_node: str | None = None) -> Receipt:
        """A transaction a peer gossiped (it carries the id its first node gave it)."""
        if not isinstance(tx, dict) or "id" not in tx:
            raise BadInput("'id' is required on a transaction from another node")
        return self.network.add_transaction(tx, sender=self.network.sender_netloc(from_node))

    def receive_transactions(self, body: Any, from_node: str | None = None) -> dict[str, Any]:
        """A batch of transactions a peer gossiped: each is taken or refused on its own."""
        batch = body.get("transactions") if isinstance(body, dict) else None
        if not isinstance(batch, list) or not 0 < len(batch) <= MAX_GOSSIP_BATCH or \
                not all(isinstance(tx, dict) for tx in batch):
            raise BadInput(f"'transactions' must be a list of 1 to {MAX_GOSSIP_BATCH} transaction objects")
        sender, counts, refused = self.network.sender_netloc(from_node), {"new": 0, "known": 0}, []
        for tx in batch:
            try:
                if "id" not in tx:
                    raise BadInput("'id' is required on a transaction from another node")
                counts["new" if self.network.add_transaction(tx, sender=sender).new else "known"] += 1
            except BadInput as exc:
                refused.append({"id": tx.get("id"), "error": str(exc)})
        return {**counts, "refused": refused}

    def mine_block(self) -> Block:
        return self.network.mine_block()

    def blocks(self, from_index: Any) -> dict[str, Any]:
        """A page of our blocks from `from_index` on (about sync_page_bytes of them), for a peer's sync."""
        if isinstance(from_index, str) and BLOCK_INDEX.fullmatch(from_index):
            from_index = int(from_index)
        if type(from_index) is not int or from_index < 1:
            raise BadInput("'from' must be a block index: a whole number from 1")
        return {"from": from_index, "length": len(self.blockchain),
                "blocks": self.blockchain.blocks_from(from_index, self.config.sync_page_bytes)}

    def receive_block(self, block: Any, from_node: str | None = None) -> str:
        """A block a peer mined: "appended", "known" or "behind" (then we sync with that peer)."""
        outcome = self.network.receive_block(block, self.network.sender_netloc(from_node))
        if outcome == "invalid":
            raise InvalidBlock("the block does not pass this node's checks (shape, index, link, proof of work)")
        return outcome

    # -- peers ---------------------------------------------------------------

    def connect(self, urls: Any, from_node: str | None = None) -> tuple[list[str], list[str]]:
        """Add peers: (every peer, ignored entries). A node announcing itself is not told back."""
        if not isinstance(urls, list) or not urls:
            raise BadInput(f"'nodes' must be a non-empty list of node URLs, e.g. {CONNECT_EXAMPLE}")
        return self.network.connect(urls, announce=self.network.sender_netloc(from_node) is None)

    def remove_peers(self, urls: Any) -> tuple[list[str], list[str]]:
        """Forget peers: (peers left, entries that were not peers)."""
        if not isinstance(urls, list) or not urls:
            raise BadInput(f"'nodes' must be a non-empty list of node URLs, e.g. {CONNECT_EXAMPLE}")
        return self.network.remove(urls)

    def peers(self) -> list[dict[str, Any]]:
        """Every peer with how it behaved lately: faults in a row, the last error, the length it had."""
        return self.network.describe_peers()

    def sync(self) -> tuple[bool, list[Block], dict[str, str]]:
        """Adopt the best valid chain among the peers: (replaced, our chain now, a verdict per peer)."""
        replaced, report = self.network.sync()
        return replaced, self.blockchain.chain, report

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "port": self.config.port, "role": self.config.role_name,
                "length": len(self.blockchain), "pending": self.blockchain.pending_count,
                "peers": self.network.peers, "ipfs_api": self.config.ipfs_api}

    # -- life cycle ----------------------------------------------------------

    def start(self) -> None:
        """Connect to the configured peers, keep syncing, and start the mining processes in the background."""
        self.network.start()
        threading.Thread(target=self.miner.warm_up, name="mining-warm-up", daemon=True).start()

    def close(self) -> None:
        self.network.stop()
        self.miner.close()
        if self.store is not None:
            self.store.close()

    # -- persistence ---------------------------------------------------------

    def _restore(self) -> None:
        """Open the store (creating it on the first start), load and check what it holds, and journal every
        later change to it before the change is made."""
        legacy = legacy_state_file(self.data_dir)
        store_path = self.state_dir / STORE_FILE
        if legacy and not store_path.exists():
            raise StateDamaged(
                f"{legacy} holds state in an older format. Nothing was changed. Import it with "
                f"'python app.py migrate-state --data-dir {self.config.data_dir or self.data_dir}' (the same "
                f"network settings as this node), or move it aside to start with an empty chain.")
        self.store = Store(store_path, network_fingerprint(self.config))
        saved = self.store.load()
        try:
            if saved.chain:
                self.blockchain.restore(saved.chain, saved.pending)
            else:
                self.store.append_block(self.blockchain.chain[0])
            peers = [peer_netloc(url, self.network.allowed)[1] for url in saved.peers]
        except (ValueError, NodeError) as exc:
            self.store.close()
            raise StateDamaged(
                f"the saved state {store_path} cannot be used ({type(exc).__name__}: {exc}). It may be damaged, "
                f"or from a network with other settings (genesis, difficulty, proof of work). Nothing was changed: "
                f"move the file aside to start with an empty chain, or restore it from a backup.") from None
        self.blockchain.journal = self.store
        self.network.on_peers_change = lambda: self.store.set_peers(self.network.peer_urls)
        if peers:
            self.network.connect(peers, announce=False)
        log.info("restored a chain of %d blocks, %d pending transactions and %d peers from %s",
                 len(self.blockchain), self.blockchain.pending_count, len(peers), store_path)

    # -- IPFS ----------------------------------------------------------------

    def create_hash(self, file_path: Any) -> dict[str, str]:
        return self.ipfs.add_file(self._existing(file_path))

    def create_hash_from_upload(self, chunks: Iterable[bytes], filename: str) -> dict[str, str]:
        """Add an uploaded file to IPFS as its bytes arrive (`chunks`), under a safe form of its name.

        Nothing is written here: the bytes go on to Kubo as they come, and an upload that breaks off (or that
        `chunks` finds malformed, raising) breaks the add off too, so nothing is added.
        """
        return self.ipfs.add_stream(chunks, safe_file_name(filename, "upload"))

    def file_info(self, name: Any) -> dict[str, Any]:
        """The newest mined record matching `name` and every version of it, newest first."""
        matches = self.blockchain.find_records(name)
        if not matches:
            pending = self.blockchain.pending_count
            hint = f"; {pending} pending transaction(s) are not searched until mined" if pending else ""
            raise NotFound(f"no record named '{name}' on the chain{hint}")
        versions = [{**self._describe(tx, name), "block_index": index, "EHR_name": tx["EHR_name"],
                     "user_id": tx["user_id"]} for index, tx in matches]
        newest = dict(versions[0])
        if newest["Size"] is None:
            newest["Size"] = self._ipfs_size(newest["Hash"])
            versions[0]["Size"] = newest["Size"]
        return {"File info": {key: newest[key] for key in ("Hash", "Name", "Size")}, "versions": versions}

    @staticmethod
    def _describe(tx: Transaction, asked: str) -> dict[str, Any]:
        return {"Hash": tx["ipfs_hash"], "Name": tx.get("file_name") or asked, "Size": tx.get("file_size")}

    def _ipfs_size(self, cid: str) -> str | None:
        """Kubo's size figure for a CID (the one its add reports), or None if IPFS cannot tell now.

        A CID names fixed content, so its size is remembered once known.
        """
        if cid not in self._sizes:
            try:
                size = str(self.ipfs.stat(cid)["CumulativeSize"])
            except IpfsError:
                return None
            if len(self._sizes) >= SIZE_CACHE_ENTRIES:
                self._sizes.clear()
            self._sizes[cid] = size
        return self._sizes[cid]

    def _download_name(self, cid: str) -> str:
        record = self.blockchain.record_for_cid(cid)
        return safe_file_name(record.get("file_name", "") if record else "", cid)

    def get_file(self, cid: Any) -> tuple[str, int]:
        """Fetch a file from IPFS into the downloads folder; returns (path within data dir, size)."""
        cid = _checked_cid(cid)
        destination = self.downloads / self._download_name(cid)
        size, chunks = self.ipfs.open(cid)
        write_download(destination, size, chunks)
        return self._relative(destination), size

    def stream_file(self, cid: Any) -> tuple[str, int, "SpooledDownload"]:
        """(download name, size, the download) of an IPFS file, for sending it back as an attachment.

        The download holds the file for one client while it is sent: `fill()` copies it from Kubo, and the
        server reads it at the client's pace. A file up to SPOOL_IN_MEMORY_BYTES is filled here, at once; a
        larger one is left for the caller to fill, which the server does once the answer has begun, so the
        bytes go out as they arrive (app.download_file). So a slow reader holds a spool, never a thread, and
        the bytes held at once for readers are bounded (max_spool_bytes): Busy beyond. Close it when sent.
        """
        cid = _checked_cid(cid)
        size, chunks = self.ipfs.open(cid)
        budget = self._spool_budget
        if not budget.reserve(size):
            chunks.close()
            if size > budget.limit:
                raise Busy(f"the file has {size} bytes, more than this node holds for downloads at once "
                           f"({budget.limit} bytes, max_spool_bytes); fetch it with POST /get_file instead")
            raise Busy(f"the node is holding {budget.used} bytes of downloads for clients still reading them and "
                       f"this file has {size}; its limit is {budget.limit} bytes (max_spool_bytes): try again later")
        try:
            # Made now, while the client can still be told (503), not half way through the answer.
            spill = tempfile.TemporaryFile(dir=self.uploads) if size > SPOOL_IN_MEMORY_BYTES else None
        except OSError as exc:  # the disk is full, or the uploads folder is gone
            chunks.close()
            budget.release(size)
            raise Busy(f"the node cannot hold the download in {self.uploads} now ({exc.strerror or exc}); "
                       f"try again later") from None
        download = SpooledDownload(size, chunks, spill, functools.partial(budget.release, size), self._spool_memory)
        if spill is None:
            try:
                download.fill()
            except BaseException:
                download.close()
                raise
        return self._download_name(cid), size, download

    @functools.cached_property
    def _spool_budget(self) -> "SpoolBudget":
        return SpoolBudget(self.config.max_spool_bytes)

    @functools.cached_property
    def _spool_memory(self) -> "SpoolBudget":
        return SpoolBudget(SPOOL_MEMORY_BYTES)

    # -- encryption ----------------------------------------------------------

    def encrypt_file(self, file_path: Any, password: str, output_path: Any = None,
                     overwrite: bool = False) -> tuple[str, int]:
        source = self._existing(file_path)
        target = self._crypt_target(source, output_path, encrypting=True)
        return self._crypt(crypto.encrypt_file, source, target, password, overwrite)

    def decrypt_file(self, file_path: Any, password: str, output_path: Any = None,
                     overwrite: bool = False) -> tuple[str, int]:
        source = self._existing(file_path)
        target = self._crypt_target(source, output_path, encrypting=False)
        return self._crypt(crypto.decrypt_file, source, target, password, overwrite)

    def _crypt_target(self, source: Path, output_path: Any, encrypting: bool) -> Path:
        if output_path:
            target = self._user_path(output_path, "output_path")
        else:
            target = crypto.default_output(source, encrypting)
            if target is None:
                raise BadInput(f"'file_path' does not end in {crypto.AES_SUFFIX}: "
                               f"give 'output_path' for the decrypted file")
        if len(os.fsencode(target.name)) > MAX_NAME_BYTES:
            raise PathRefused(f"the output's name would be longer than {MAX_NAME_BYTES} bytes; give a shorter "
                              f"'output_path'")
        if target == self.data_dir or target.is_dir():
            raise PathRefused("'output_path' names a folder; name the file to write")
        return target

    def _user_path(self, user_path: Any, field: str = "file_path") -> Path:
        """A path a request named: inside the data directory, outside the node's own files."""
        return confine_path(self.data_dir, user_path, field, private=self.state_dir)

    def _existing(self, file_path: Any) -> Path:
        path = self._user_path(file_path)
        if not path.is_file():
            raise NotFound(f"no file at '{file_path}' in the node's data directory")
        return path

    def _crypt(self, operation: Any, source: Path, target: Path, password: str, overwrite: bool) -> tuple[str, int]:
        if target == source:
            raise BadInput("the output would overwrite the input")
        if target.exists() and not overwrite:
            raise Conflict(f"'{self._relative(target)}' already exists; "
                           f"send \"overwrite\": true to replace it")
        try:
            size = operation(source, target, password, overwrite=overwrite)
        except crypto.CryptoError as exc:  # name the file as the user did, not by its path on this machine
            raise type(exc)(self._relative(exc.path), exc.reason) from None
        except (IsADirectoryError, NotADirectoryError, FileNotFoundError) as exc:
            raise PathRefused(f"'{self._relative(target)}' cannot be written: a folder is in the way "
                              f"({exc.strerror})") from None
        return self._relative(target), size

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.data_dir).as_posix()


SPOOL_IN_MEMORY_BYTES = 1024 * 1024  # a download this small is filled at once, in memory; larger ones as sent
# Bytes of large downloads arrived and not yet sent, held in memory by the whole node; beyond, each download puts
# what arrives in its file. (A per-download window of 2 MiB made even a fast reader's download spill 2 to 8 MiB of
# 16 MiB, and pay a write and a read for each of those bytes.)
SPOOL_MEMORY_BYTES = 32 * 1024 * 1024
SPOOL_READ_BYTES = 1024 * 1024  # read from a download's file at a time (the server sends a socket's worth of it)


class SpoolBudget:
    """Bytes of downloads held at once for clients still reading them, shared by the request threads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, size: int) -> bool:
        with self._lock:
            if self.used + size > self.limit:
                return False
            self.used += size
            return True

    def release(self, size: int) -> None:
        with self._lock:
            self.used -= size


class SpooledDownload:
    """A download held for one client while it is sent: filled from IPFS by one thread (`fill`) while another
    (waitress's I/O thread) reads it at the client's pace as a file (read, seek, tell: it is sent as a
    wsgi.file_wrapper of `size` bytes).

    The bytes are a run of segments in arrival order. A piece is kept in memory as it came while `memory` (the
    node's budget for such pieces, SPOOL_MEMORY_BYTES, shared by its downloads) has room for it; else it goes
    to `spill`, a temporary file that disappears when closed, and later ones to memory again once readers have
    taken enough. `read` never waits: it gives what has arrived (b"" if nothing yet), as a view of the piece where it can
    (no copy), and `waiting()` tells the server to wait for `fill`'s wake-up rather than ask again. The bytes
    count against the node's SpoolBudget until the download is closed, by whichever thread finishes with it.
    """

    def __init__(self, size: int, chunks: Iterator[bytes], spill: IO[bytes] | None, release: Any,
                 memory: SpoolBudget | None = None) -> None:
        self.size = size
        self._memory = memory  # (a download without a spill file is small, and held in memory whole)
        self._in_memory = 0  # bytes of this download counted against `memory`
        self._chunks = chunks
        self._spill = spill
        self._spilled = 0  # bytes written to the spill file
        self._release = release
        self._lock = threading.Lock()
        self._file_lock = threading.Lock()  # a read and a close of the spill file never overlap
        # segments: [offset in the download, bytes (in memory) or None (in the file), length, offset in the file]
        self._segments: deque[list[Any]] = deque()
        self._cache: tuple[int, bytes] = (0, b"")  # the last piece read from the file, and where it starts
        self._arrived = 0
        self._position = 0
        self.filled = False  # fill() ended: with every byte, or failed
        self.failed = False
        self.closed = False
        self._fill_started = False

    # -- the filling thread ----------------------------------------------------

    def fill(self, wake: Callable[[], None] | None = None) -> None:
        """Copy the file from IPFS, calling `wake` (the server's) as pieces arrive. What the transfer raises is
        raised again: the reader gets what arrived and no more, so the answer is cut short."""
        chunks = self._chunks
        with self._lock:
            if self.closed:  # closed before it was filled (a HEAD request, say): close() let go of the transfer
                return
            self._fill_started = True
        try:
            for chunk in chunks:
                if self.closed:  # the reader is gone
                    break
                self._append(chunk)
                if wake is not None:
                    wake()
        except BaseException:
            self.failed = True
            raise
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # (closing it part read drops its connection to Kubo)
            self.filled = True
            if wake is not None:
                wake()

    def _append(self, chunk: bytes) -> None:
        with self._lock:
            if self._spill is None or self._memory is None or self._memory.reserve(len(chunk)):
                self._segments.append([self._arrived, chunk, len(chunk), 0])
                self._arrived += len(chunk)
                if self._spill is not None and self._memory is not None:
                    self._in_memory += len(chunk)
                return
            file_offset = self._spilled
            self._spilled += len(chunk)
        with self._file_lock:  # the reader reads only what has arrived: no segment covers this piece yet
            if self.closed:
                return
            assert self._spill is not None
            if hasattr(os, "pwrite"):
                os.pwrite(self._spill.fileno(), chunk, file_offset)
            else:
                self._spill.seek(file_offset)
                self._spill.write(chunk)
                self._spill.flush()
        with self._lock:
            self._segments.append([self._arrived, None, len(chunk), file_offset])
            self._arrived += len(chunk)

    # -- the reading thread ----------------------------------------------------

    def read(self, size: int = -1) -> bytes | memoryview:
        """Up to `size` bytes of what has arrived, from the position on (which moves past them, as a file's)."""
        with self._lock:
            position = self._position
            if position >= self._arrived or self.closed:
                return b""
            segments = self._segments
            while segments[0][0] + segments[0][2] <= position:  # sent: let it go
                gone = segments.popleft()
                if gone[1] is not None and self._in_memory:
                    self._in_memory -= gone[2]
                    self._memory.release(gone[2])  # type: ignore[union-attr]
            start, data, length, file_offset = segments[0]
            offset = position - start
            count = length - offset if size < 0 else min(size, length - offset)
            if data is not None:
                self._position += count
                return memoryview(data)[offset:offset + count]
            cached_at, cached = self._cache
            if not cached_at <= position < cached_at + len(cached):
                with self._file_lock:
                    if self.closed:
                        return b""
                    want = min(length - offset, SPOOL_READ_BYTES)
                    assert self._spill is not None
                    if hasattr(os, "pread"):
                        cached = os.pread(self._spill.fileno(), want, file_offset + offset)
                    else:
                        self._spill.seek(file_offset + offset)
                        cached = self._spill.read(want)
                cached_at = position
                self._cache = (cached_at, cached)
            piece = memoryview(cached)[position - cached_at:position - cached_at + count]
            self._position += len(piece)
            return piece

    def seek(self, offset: int, whence: int = 0) -> int:
        with self._lock:
            self._position = offset if whence == 0 else self._position + offset if whence == 1 else self.size + offset
            return self._position

    def tell(self) -> int:
        return self._position

    def seekable(self) -> bool:
        return True

    def waiting(self) -> bool:
        """Nothing to send now, and more to come: wait for fill's wake-up."""
        return not self.filled and self._position >= self._arrived

    def broken(self) -> bool:
        """The transfer failed and what arrived of it is sent: the answer ends here, short."""
        return self.filled and self.failed and self._position >= self._arrived

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._segments.clear()
            self._cache = (0, b"")
            unread = not self._fill_started
            if self._in_memory:
                self._memory.release(self._in_memory)  # type: ignore[union-attr]
                self._in_memory = 0
        if unread:  # never filled: let go of the transfer (and its connection to Kubo) now
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
            self.filled = True
        try:
            if self._spill is not None:
                with self._file_lock:
                    if self._spilled:
                        close_later(self._spill)  # freeing what it holds is no work for the I/O thread
                    else:
                        self._spill.close()
        finally:
            self._release()

    def __enter__(self) -> "SpooledDownload":
        return self

    def __del__(self) -> None:  # a download dropped without being sent still gives its bytes back
        self.close()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_download(destination: Path, size: int, chunks: Iterable[bytes]) -> None:
    """Write a download of `size` bytes beside `destination` (owner-only) and rename it into place only once it
    is whole, as storage.written_atomically does. Not fsync'd: a download lost to a power cut is fetched again.

    Replacing a file costs more than writing a new one, and two of those costs are kept off the request
    (measured on ext4: 10 of 45 ms for 16 MiB, 0.19 of 0.31 ms for 64 KB). The new file's blocks are reserved
    before it is written (posix_fallocate), so the rename does not first allocate them and start flushing them
    (ext4's auto_da_alloc, meant for files written without fsync); and the file it replaces is held open across
    the rename and let go by a thread of its own (close_later), so its blocks are freed there, not inside the
    rename. Neither changes what a reader of the path sees: the old file whole, then the new one whole.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=destination.parent, prefix=".part-")
    try:
        try:
            if size > 0 and hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError:  # a filesystem without it: the blocks are taken as written
                    pass
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        replaced = None
        if os.name == "posix":  # (Windows cannot rename over an open file)
            try:
                replaced = os.open(destination, os.O_RDONLY)
            except OSError:
                pass
        try:
            os.replace(temp_name, destination)
        finally:
            if replaced is not None:
                close_later(replaced)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


_to_close: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
_closer_lock = threading.Lock()
_closer: threading.Thread | None = None


def close_later(handle: Any) -> None:
    """Close a file descriptor (or file) on the closer thread: the last close of a large unlinked file frees its
    blocks, which takes milliseconds a request, or the server's I/O thread, should not wait for."""
    global _closer
    if _closer is None:
        with _closer_lock:
            if _closer is None:
                _closer = threading.Thread(target=_close_queued, name="closer", daemon=True)
                _closer.start()
    _to_close.put(handle)


def _close_queued() -> None:
    while True:
        handle = _to_close.get()
        try:
            if isinstance(handle, int):
                os.close(handle)
            else:
                handle.close()
        except OSError:
            pass


def _checked_cid(cid: Any) -> str:
    if not isinstance(cid, str) or not cid.strip():
        raise BadInput("'ipfs_hash' must be a non-empty string")
    if not is_cid(cid.strip()):
        raise BadInput("'ipfs_hash' is not an IPFS CID (expected Qm... or b...)")
    return cid.strip()
