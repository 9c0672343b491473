#!/usr/bin/env python3
"""The SQLite store on its own: add_pending with 100,000 records stored vs an empty store, and load().

    python bench/store.py --out FILE.json [--records 100000] [--rounds 40] [--per-round 25]

Both stores take add_pending in interleaved rounds (the order alternates), so a busy
machine slows both alike; after each round the round's transactions are mined into a
block, as a node would. load() is timed on a freshly opened store; opening includes the
integrity check. The node's own chain validation comes on top of that and is not
measured here. For context the run also times a raw fsync, one rewrite of the same state
as state.json (what --persist did on every change), and add_pending from several threads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from common import MB, ROOT, log, ratio, summarize

# The project's folder first: this file's own name would otherwise shadow the project's store.py.
sys.path.insert(0, str(ROOT))
from blockchain import PAPER_GENESIS_TIMESTAMP, hash_block, make_genesis  # noqa: E402
from storage import write_json_atomically  # noqa: E402
from store import Store  # noqa: E402

ITEM = "store"
NETWORK = {"genesis": PAPER_GENESIS_TIMESTAMP, "difficulty": "4", "pow_mode": "paper", "security": "paper"}
PAPER_HASH = "QmbWxSqxhZms74885xceSaiHVvdjqiVWrATtYUrrUnVE1K"
RECORDS = 100_000
PER_BLOCK = 5
BUILD_BATCH = 1_000  # blocks per commit while building the big store
ROUNDS = 40
PER_ROUND = 25
LOAD_RUNS = 3
FSYNC_RUNS = 200
THREADS = 8
PER_THREAD = 250
RATIO_GOAL = 2.0
MEDIAN_GOAL_MS = 3.0
LOAD_GOAL_S = 10.0
MS = 1000.0


def transaction(number: int) -> dict[str, Any]:
    """Like the node's: the paper's three fields, the record's name and size, and the id the node gives."""
    return {"user_id": f"patient-{number % 997}", "ipfs_hash": PAPER_HASH, "EHR_name": f"record-{number}",
            "id": uuid.uuid4().hex, "file_name": f"record-{number}.pdf.aes", "file_size": str(63_884 + number % 500)}


class ChainMaker:
    """Blocks shaped like mined ones: real previous_hash links, rising timestamps, plausible nonces."""

    def __init__(self) -> None:
        self.last = make_genesis(PAPER_GENESIS_TIMESTAMP)
        self.clock = datetime.fromisoformat(PAPER_GENESIS_TIMESTAMP)
        self.numbered = 0

    def next(self, transactions: list[dict[str, Any]]) -> dict[str, Any]:
        self.clock += timedelta(seconds=1)
        block = {"index": self.last["index"] + 1, "timestamp": str(self.clock), "nonce": 40_000 + self.numbered,
                 "previous_hash": hash_block(self.last), "transactions": transactions}
        self.last = block
        return block

    def filled(self) -> dict[str, Any]:
        transactions = [transaction(self.numbered + k) for k in range(PER_BLOCK)]
        self.numbered += PER_BLOCK
        return self.next(transactions)


def build(path: Path, records: int) -> tuple[ChainMaker, float]:
    maker = ChainMaker()
    started = time.perf_counter()
    with Store(path, NETWORK) as store:
        store.append_block(maker.last)
        blocks = records // PER_BLOCK
        for start in range(0, blocks, BUILD_BATCH):
            batch = [maker.filled() for _ in range(min(BUILD_BATCH, blocks - start))]
            store.replace_chain(batch[0]["index"] - 1, batch, [])
    return maker, time.perf_counter() - started


def add_pending_rounds(stores: dict[str, tuple[Store, ChainMaker]], rounds: int,
                       per_round: int) -> dict[str, list[float]]:
    """add_pending latencies per store, in interleaved rounds; each round ends with a mined block."""
    seconds: dict[str, list[float]] = {name: [] for name in stores}
    names = list(stores)
    for number in range(rounds):
        for name in names if number % 2 == 0 else reversed(names):
            store, maker = stores[name]
            added = []
            for k in range(per_round):
                tx = transaction(number * per_round + k)
                started = time.perf_counter()
                store.add_pending(tx)
                seconds[name].append(time.perf_counter() - started)
                added.append(tx)
            store.append_block(maker.next(added))
    return seconds


def time_load(path: Path) -> dict[str, Any]:
    opens, loads, records = [], [], 0
    for _ in range(LOAD_RUNS):
        started = time.perf_counter()
        store = Store(path, NETWORK)
        opened = time.perf_counter()
        state = store.load()
        loaded = time.perf_counter()
        store.close()
        opens.append(opened - started)
        loads.append(loaded - opened)
        records = sum(len(block["transactions"]) for block in state.chain)
    totals = [o + l for o, l in zip(opens, loads)]
    return {"runs": LOAD_RUNS, "records": records, "open_s": statistics.median(opens),
            "load_s": statistics.median(loads), "total_s": statistics.median(totals), "totals_s": totals}


def time_fsync(folder: Path) -> dict[str, Any]:
    """The disk's own cost of one durable write: the floor under every commit."""
    seconds = []
    with open(folder / "fsync-probe", "wb") as handle:
        for _ in range(FSYNC_RUNS):
            handle.write(b"x" * 512)
            started = time.perf_counter()
            handle.flush()
            os.fsync(handle.fileno())
            seconds.append(time.perf_counter() - started)
    return summarize(seconds, MS)


def time_state_json(folder: Path, path: Path) -> dict[str, Any]:
    """One rewrite of the same state as state.json: what every change cost with the old --persist."""
    with Store(path, NETWORK) as store:
        state = store.load()
    data = {"chain": state.chain, "pending": state.pending, "peers": state.peers}
    seconds = []
    for _ in range(LOAD_RUNS):
        started = time.perf_counter()
        write_json_atomically(folder / "state.json", data)
        seconds.append(time.perf_counter() - started)
    return {"runs": LOAD_RUNS, "median_ms": statistics.median(seconds) * MS,
            "bytes": (folder / "state.json").stat().st_size}


def concurrent_add_pending(path: Path) -> dict[str, Any]:
    """add_pending from several threads on one store: commits per second, for judging group commit."""
    seconds: list[float] = []
    with Store(path, NETWORK) as store:
        def work(offset: int) -> None:
            for k in range(PER_THREAD):
                tx = transaction(offset + k)
                started = time.perf_counter()
                store.add_pending(tx)
                seconds.append(time.perf_counter() - started)

        threads = [threading.Thread(target=work, args=(n * PER_THREAD,)) for n in range(THREADS)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
    return {"threads": THREADS, "calls": len(seconds), "per_second": len(seconds) / wall,
            "latency_ms": summarize(seconds, MS)}


def machine() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit,
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version, "cpus": os.cpu_count(),
            "platform": platform.platform(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where to write the results (JSON)")
    parser.add_argument("--records", type=int, default=RECORDS, help="transactions in the big store")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--per-round", type=int, default=PER_ROUND, help="add_pending calls per store per round")
    parser.add_argument("--work-dir", type=Path, help="where to put the stores (default: a temporary folder)")
    args = parser.parse_args(argv)
    meta = machine()
    with tempfile.TemporaryDirectory(prefix="emr-store-bench-", dir=args.work_dir) as work:
        folder = Path(work)
        big_path, empty_path = folder / "big.sqlite3", folder / "empty.sqlite3"
        log(f"building a store of {args.records:,} records ({args.records // PER_BLOCK:,} blocks)")
        big_maker, build_s = build(big_path, args.records)
        empty_maker, _ = build(empty_path, 0)
        log(f"built in {build_s:.1f} s; {args.rounds} interleaved rounds of {args.per_round} add_pending each")
        with Store(big_path, NETWORK) as big, Store(empty_path, NETWORK) as empty:
            seconds = add_pending_rounds({"big": (big, big_maker), "empty": (empty, empty_maker)},
                                         args.rounds, args.per_round)
        big_ms, empty_ms = summarize(seconds["big"], MS), summarize(seconds["empty"], MS)
        log("timing open + load()")
        loading = time_load(big_path)
        loading["file_bytes"] = big_path.stat().st_size
        log("context: fsync, state.json rewrite, threads")
        details = {"build_s": build_s, "add_pending_ms": {"with_records": big_ms, "empty": empty_ms},
                   "load": loading, "fsync_ms": time_fsync(folder),
                   "state_json_rewrite": time_state_json(folder, big_path),
                   "concurrent_add_pending": concurrent_add_pending(empty_path)}
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    median_ratio = ratio(big_ms["median"], empty_ms["median"])
    goals = [
        {"item": ITEM,
         "what": f"add_pending with {args.records:,} records within {RATIO_GOAL:g}x of an empty store's "
                 f"and <= {MEDIAN_GOAL_MS:g} ms median",
         "goal": f"median ratio <= {RATIO_GOAL:g} and median <= {MEDIAN_GOAL_MS:g} ms",
         "measured": f"{big_ms['median']:.3f} vs {empty_ms['median']:.3f} ms median ({median_ratio:.2f}x); "
                     f"p95 {big_ms['p95']:.3f} vs {empty_ms['p95']:.3f} ms; {big_ms['n']} calls each",
         "met": bool(median_ratio <= RATIO_GOAL and big_ms["median"] <= MEDIAN_GOAL_MS)},
        {"item": ITEM,
         "what": f"load {args.records:,} records < {LOAD_GOAL_S:g} s (the node's chain validation comes on top)",
         "goal": f"open + load() < {LOAD_GOAL_S:g} s",
         "measured": f"{loading['total_s']:.2f} s median of {LOAD_RUNS} for {loading['records']:,} records "
                     f"(open with integrity check {loading['open_s']:.2f} s, load() {loading['load_s']:.2f} s; "
                     f"{loading['file_bytes'] / MB:.1f} MB)",
         "met": bool(loading["total_s"] < LOAD_GOAL_S)},
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "goals": goals, "details": details}, indent=1) + "\n")
    for goal in goals:
        log(f"{'met' if goal['met'] else 'NOT MET'}: {goal['what']}: {goal['measured']}")
    return 0 if all(goal["met"] for goal in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
