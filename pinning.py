"""Records kept by the chain: every record a block names is pinned in this node's own Kubo daemon.

A block that joins the chain (mined here, gossiped, or taken from a peer in a sync) hands its records to
`Pinner.on_block`, which only notes them and queues them: it runs under the chain's lock, so block
acceptance never waits for IPFS. Worker threads then `pin/add` each one in the node's own daemon, which
fetches whatever it lacks from the private IPFS network, within a per-pin timeout; a pin that fails is tried
again after a back-off that doubles up to a cap, for as long as the record is on the chain.

A reorganisation can take a record off the chain: its block is dropped and the new blocks do not hold it (its
transaction is pending again, to be mined once more). The first block of a reorganisation reaches `on_block`
with an index we have seen already, when the new chain is in place; every record noted at that index or later
that `on_chain` no longer finds is then forgotten: it is not counted as known, not retried, and GET /records
answers for it as for any pending record. If it is mined again, its block brings it back like a new record (a
pin already made is found at once: the node never unpins, so a copy pinned before the reorganisation stays in
Kubo either way).

What is pinned is kept in memory only. At start the worker reads the chain and asks Kubo which CIDs it
holds pinned already; every record of the chain that is not is queued. So a node that was down catches up on
the pins it missed, and a Kubo repo restored from elsewhere is taken as it is.

`mode`: "all" pins every record, "openable" only those the node's `may_open` says it may open (Node.may_open:
every record on the paper's network; on a signed one its own records, those a valid grant to it covers and its
break-glass copies; a grant that arrives later makes `reconsider` queue them), "none" pins nothing (records are
still listed, as skipped).

Plain Python: no Flask, no HTTP; the IPFS daemon is anything with `pin_add(cid, timeout)` and `pinned()`
(ipfs_client.IpfsClient), raising the IPFS errors of errors.py.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Protocol

from errors import IpfsError, IpfsRefused, IpfsUnknownCid, IpfsUnreachable

log = logging.getLogger("emr.pinning")

MODES = ("all", "openable", "none")
QUEUED, FETCHING, PINNED, FAILED, SKIPPED = "queued", "fetching", "pinned", "failed", "skipped"
STATES = (QUEUED, FETCHING, PINNED, FAILED, SKIPPED)
DEFAULT_QUEUE_LIMIT = 10_000  # records waiting in the work queue at once; more wait in the table
FIRST_RETRY_SECONDS = 1.0


class PinDaemon(Protocol):
    def pin_add(self, cid: str, timeout: float) -> None: ...

    def pinned(self) -> set[str]: ...


@dataclass
class PinRecord:
    """What this node knows of one record's copy in its own daemon."""

    cid: str
    block_index: int
    block_timestamp: str  # when the block holding it was mined (the miner's clock)
    seen_at: float  # when that block joined our chain (wall clock)
    state: str = QUEUED
    reason: str = ""
    attempts: int = 0
    pinned_at: float | None = None  # wall clock; None if found pinned at start or never pinned
    next_try: float | None = None  # monotonic time of the next attempt, for a failed one
    in_queue: bool = False  # in the work queue (else it waits in the table for room)
    ticket: int = -1  # its entry in the work queue; older entries for its CID are stale

    def describe(self, now: float) -> dict[str, Any]:
        retry = None if self.next_try is None or self.state != FAILED else max(0.0, self.next_try - now)
        return {"state": self.state, "reason": self.reason, "attempts": self.attempts,
                "block_index": self.block_index, "block_timestamp": self.block_timestamp,
                "seen_at": _iso(self.seen_at), "pinned_at": _iso(self.pinned_at),
                "lag_ms": None if self.pinned_at is None else round((self.pinned_at - self.seen_at) * 1000),
                "retry_in_ms": None if retry is None else round(retry * 1000)}


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record_cids(block: dict[str, Any]) -> list[str]:
    """The CIDs a block's transactions record, in order, once each. Transactions without an `ipfs_hash`
    (kinds other than records, should they come) are skipped."""
    found: list[str] = []
    for tx in block.get("transactions") or ():
        cid = tx.get("ipfs_hash") if isinstance(tx, dict) else None
        if isinstance(cid, str) and cid and cid not in found:
            found.append(cid)
    return found


class Pinner:
    """The pins of one node: a table of every record the chain names, and workers that pin them."""

    def __init__(self, daemon: PinDaemon, mode: str = "all", may_open: Callable[[str], bool] = lambda cid: True,
                 *, on_chain: Callable[[str], bool] = lambda cid: True, timeout: float = 60.0, workers: int = 2,
                 retry_max: float = 60.0, queue_limit: int = DEFAULT_QUEUE_LIMIT,
                 first_retry: float = FIRST_RETRY_SECONDS) -> None:
        if mode not in MODES:
            raise ValueError(f"pin mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.daemon = daemon
        self.mode = mode
        self.may_open = may_open
        self.on_chain = on_chain  # whether a mined block of the chain records this CID now
        self.timeout = timeout
        self.workers = max(1, workers)
        self.retry_max = retry_max
        self.first_retry = min(first_retry, retry_max) if retry_max > 0 else first_retry
        self.queue_limit = max(1, queue_limit)
        self._records: dict[str, PinRecord] = {}
        self._queue: list[tuple[float, int, str]] = []  # (when, order, cid): a heap
        self._order = itertools.count()
        self._last_index = 0  # the index of the last block on_block was given
        self._waiting = 0  # records to pin that are not in the queue (it was full)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self._scanned = threading.Event()
        self.scan_error = ""

    # -- fed by the chain (under its lock: quick, never blocks on IPFS) --------------------------

    def on_block(self, block: dict[str, Any]) -> None:
        with self._lock:
            reorganised = block["index"] <= self._last_index
            self._last_index = block["index"]
        if reorganised:
            self._forget_dropped(block["index"])
        self._note(block, time.time(), pinned=())

    def _forget_dropped(self, index: int) -> None:
        """Forget the records of blocks from `index` on that the chain no longer holds (a reorganisation
        dropped their blocks). Runs under the chain's lock, with the new chain in place; `on_chain` is asked
        outside our own lock, which is never held while waiting for the chain's."""
        with self._lock:
            suspects = [record.cid for record in self._records.values() if record.block_index >= index]
        gone = [cid for cid in suspects if not self._on_chain(cid)]
        if not gone:
            return
        with self._lock:
            for cid in gone:
                self._records.pop(cid, None)
        log.info("%d record(s) left the chain in a reorganisation from block %d; no longer pinned here unless "
                 "mined again (pins already made stay): %s", len(gone), index, ", ".join(gone[:5]))

    def _on_chain(self, cid: str) -> bool:
        try:
            return bool(self.on_chain(cid))
        except Exception:  # keep a record rather than lose it to a failing predicate
            log.exception("on_chain(%s) failed", cid)
            return True

    def _note(self, block: dict[str, Any], seen_at: float, pinned: Iterable[str]) -> None:
        cids = record_cids(block)
        if not cids:
            return
        already = set(pinned)
        with self._lock:
            for cid in cids:
                record = self._records.get(cid)
                if record is not None:
                    record.block_index, record.block_timestamp = block["index"], block["timestamp"]
                    continue
                record = PinRecord(cid, block["index"], block["timestamp"], seen_at)
                self._records[cid] = record
                if self.mode == "none":
                    record.state, record.reason = SKIPPED, "this node pins no records (pin_records=none)"
                elif cid in already:
                    record.state, record.pinned_at = PINNED, None
                else:
                    self._enqueue(record, time.monotonic())
            self._wake.notify_all()

    def _enqueue(self, record: PinRecord, when: float) -> None:
        """Queue a record for an attempt at `when` (monotonic); caller holds the lock."""
        if record.in_queue:
            return
        if len(self._queue) >= self.queue_limit:
            self._waiting += 1
            record.next_try = when
            return
        record.in_queue = True
        record.next_try = when
        record.ticket = next(self._order)
        heapq.heappush(self._queue, (when, record.ticket, record.cid))

    def _refill(self) -> None:
        """Move records that waited for room into the queue, oldest block first; caller holds the lock."""
        if not self._waiting or len(self._queue) >= self.queue_limit // 2:
            return
        waiting = sorted((r for r in self._records.values() if not r.in_queue and r.state in (QUEUED, FAILED)
                          and r.next_try is not None), key=lambda r: r.block_index)
        self._waiting = 0
        for record in waiting:
            self._enqueue(record, record.next_try or 0.0)

    def reconsider(self) -> int:
        """Queue the records skipped because the node may not open them, if it now may (a consent grant
        arrived). Returns how many were queued."""
        with self._lock:
            skipped = [r for r in self._records.values() if r.state == SKIPPED and self.mode == "openable"]
        allowed = [r for r in skipped if self._may_open(r.cid)]
        with self._lock:
            for record in allowed:
                record.state, record.reason = QUEUED, ""
                self._enqueue(record, time.monotonic())
            self._wake.notify_all()
        return len(allowed)

    # -- life cycle --------------------------------------------------------------------------------

    def start(self, chain: Callable[[], list[dict[str, Any]]]) -> None:
        """Start the workers; the first one reads the chain and the daemon's pins, and queues what is missing."""
        if self._threads:
            return
        for number in range(self.workers):
            thread = threading.Thread(target=self._run, args=(chain if number == 0 else None,),
                                      name=f"pin-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self, timeout: float = 2.0) -> None:
        with self._lock:
            self._stopped = True
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def wait_scanned(self, timeout: float | None = None) -> bool:
        return self._scanned.wait(timeout)

    def _scan(self, chain: Callable[[], list[dict[str, Any]]]) -> None:
        """Rebuild the table from the chain: what the daemon holds pinned is pinned, the rest is queued."""
        pinned: set[str] = set()
        if self.mode != "none":
            try:
                pinned = self.daemon.pinned()
            except IpfsError as exc:  # each record's own attempt will find out, and retry
                self.scan_error = str(exc)
                log.warning("could not list this node's pins (%s); every record of the chain is queued", exc)
        now = time.time()
        blocks = chain()
        with self._lock:  # so a reorganisation that comes before any new block is seen as one
            self._last_index = max([self._last_index, *(block["index"] for block in blocks)])
        for block in blocks:
            self._note(block, now, pinned)
        with self._lock:
            for cid in pinned & self._records.keys():  # noted by on_block meanwhile, but pinned already
                record = self._records[cid]
                if record.state in (QUEUED, FAILED) and not record.attempts:
                    record.state = PINNED
        counts = self.summary()
        log.info("records on the chain: %d, pinned here: %d, to pin: %d (pin_records=%s)", counts["known"],
                 counts["pinned"], counts["missing"], self.mode)

    # -- the workers -------------------------------------------------------------------------------

    def _run(self, chain: Callable[[], list[dict[str, Any]]] | None) -> None:
        if chain is not None:
            try:
                self._scan(chain)
            except Exception:  # the workers must go on whatever the scan met
                log.exception("the start-up scan of the chain's records failed")
            finally:
                self._scanned.set()
        while True:
            record = self._next()
            if record is None:
                return
            self._attempt(record)

    def _next(self) -> PinRecord | None:
        """The next record due, marked fetching; None once stopped."""
        with self._lock:
            while not self._stopped:
                self._refill()
                if self._queue and self._queue[0][0] <= time.monotonic():
                    _, ticket, cid = heapq.heappop(self._queue)
                    record = self._records.get(cid)
                    if record is None or record.ticket != ticket:
                        continue  # it left the chain (or was noted again since)
                    record.in_queue = False
                    if record.state == PINNED or record.state == SKIPPED:
                        continue
                    record.state, record.next_try = FETCHING, None
                    record.attempts += 1
                    return record
                wait = self._queue[0][0] - time.monotonic() if self._queue else None
                self._wake.wait(wait)
            return None

    def _may_open(self, cid: str) -> bool:
        try:
            return bool(self.may_open(cid))
        except Exception:  # a predicate that fails allows nothing
            log.exception("may_open(%s) failed", cid)
            return False

    def _attempt(self, record: PinRecord) -> None:
        if self.mode == "openable" and not self._may_open(record.cid):
            with self._lock:
                record.state, record.reason = SKIPPED, "this node may not open it (pin_records=openable)"
                record.attempts -= 1
            return
        started = time.monotonic()
        try:
            self.daemon.pin_add(record.cid, self.timeout)
        except IpfsError as exc:
            self._failed(record, exc, permanent=isinstance(exc, IpfsRefused))
            return
        except Exception as exc:  # a bug must not stop the worker; the record is retried
            log.exception("pinning %s failed unexpectedly", record.cid)
            self._failed(record, exc, permanent=False)
            return
        with self._lock:
            record.state, record.reason, record.pinned_at = PINNED, "", time.time()
        log.debug("pinned %s (block %d) in %.2fs, attempt %d", record.cid, record.block_index,
                  time.monotonic() - started, record.attempts)

    def _failed(self, record: PinRecord, exc: BaseException, permanent: bool) -> None:
        kind = ("not found in time" if isinstance(exc, IpfsUnknownCid)
                else "this node's IPFS daemon is unreachable" if isinstance(exc, IpfsUnreachable)
                else type(exc).__name__)
        with self._lock:
            record.state, record.reason = FAILED, f"{kind}: {exc}"
            if self._records.get(record.cid) is not record:
                return  # it left the chain while we tried: no more attempts
            if permanent:
                record.next_try = None
            else:
                delay = min(self.retry_max, self.first_retry * 2 ** (record.attempts - 1))
                self._enqueue(record, time.monotonic() + delay * random.uniform(0.75, 1.0))
            self._wake.notify_all()
        if record.attempts == 1 or permanent:
            log.warning("could not pin %s (block %d), attempt %d%s: %s", record.cid, record.block_index,
                        record.attempts, "" if permanent else "; retrying with back-off", exc)

    # -- reading -----------------------------------------------------------------------------------

    def status(self, cid: str) -> dict[str, Any] | None:
        with self._lock:
            record = self._records.get(cid)
            return None if record is None else record.describe(time.monotonic())

    def summary(self) -> dict[str, Any]:
        """Records known (on the chain), pinned here, fetching, queued, failed, skipped, and missing (meant to
        be pinned here but not yet: queued + fetching + failed)."""
        counts = dict.fromkeys(STATES, 0)
        with self._lock:
            for record in self._records.values():
                counts[record.state] += 1
            known = len(self._records)
        return {"mode": self.mode, "known": known, **counts,
                "missing": counts[QUEUED] + counts[FETCHING] + counts[FAILED]}
