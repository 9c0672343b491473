#!/usr/bin/env python3
"""Item 12: --persist with 100,000 records, measured on node processes (HTTP), and the SQLite store on its own.

As bench/run.py's item 12 (`run`):
- a chain of 100,000 records (1,000 a block, mined by the project's own Blockchain at the nodes' default
  difficulty, so a node accepts it) is written into a node's store; that node, a node with an empty store and
  a node without --persist take add_transaction over HTTP in interleaved rounds (the order rotates);
- the node with 100,000 records is restarted a few times, timed from its process start to its first answer,
  interleaved with the start of a node with no state; the parts of a restore (opening the store with its
  integrity check, loading it, checking the chain, indexing it) are timed in this process with the same code;
- for context, the colleague's Store-level measurements below (add_pending with and without records, load(),
  a raw fsync, a state.json rewrite, add_pending from threads).

Standalone, the Store alone: add_pending with 100,000 records stored vs an empty store, and load().

    python bench/persist.py --out FILE.json [--records 100000] [--rounds 40] [--per-round 25]

Both stores take add_pending in interleaved rounds (the order alternates), so a busy
machine slows both alike; after each round the round's transactions are mined into a
block, as a node would. load() is timed on a freshly opened store; opening includes the
integrity check. The node's own chain validation comes on top of that (item 12 times it).
For context the run also times a raw fsync, one rewrite of the same state as state.json
(what --persist did on every change), and add_pending from several threads.
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

from common import MB, ROOT, Http, interleaved, log, ratio, summarize

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from blockchain import PAPER_GENESIS_TIMESTAMP, Blockchain, hash_block, make_genesis  # noqa: E402
from storage import write_json_atomically  # noqa: E402
from store import STORE_FILE, Store  # noqa: E402

ITEM = "store"
BENCH_ITEM = "12"
NODE_PER_BLOCK = 1_000  # records a block in the node-level chain (mined for real: 100 blocks for 100,000)
NODE_ROUNDS = 40
NODE_PER_ROUND = 25
RESTARTS = 3
RESTART_GOAL_S = 10.0
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


# -- item 12: node processes --------------------------------------------------------

def node_transaction(number: int, cid: str) -> dict[str, Any]:
    return {"user_id": f"patient-{number % 997}", "ipfs_hash": cid, "EHR_name": f"record-{number}",
            "file_name": f"record-{number}.pdf.aes", "file_size": str(63_884 + number % 500)}


def build_node_store(data_dir: Path, records: int, cid: str) -> dict[str, Any]:
    """A node's store holding a valid chain of `records` records, as the node would have written it."""
    from config import Config
    from mining import Miner
    from node import network_fingerprint
    config = Config(data_dir=str(data_dir), persist=True)
    miner = Miner(2)
    started = time.perf_counter()
    try:
        chain = Blockchain(config.difficulty, config.genesis_timestamp, config.pow_mode, miner.proof_of_work,
                           max_pending=max(NODE_PER_BLOCK, 10_000))
        for number in range(records):
            chain.add_transaction(node_transaction(number, cid))
            if (number + 1) % NODE_PER_BLOCK == 0 or number + 1 == records:
                chain.mine_block()
    finally:
        miner.close()
    mined = time.perf_counter() - started
    blocks = chain.chain
    config.state_path.mkdir(parents=True, exist_ok=True)
    with Store(config.state_path / STORE_FILE, network_fingerprint(config)) as store:
        store.append_block(blocks[0])
        store.replace_chain(1, blocks[1:], [])
    return {"records": records, "blocks": len(blocks), "mine_s": mined,
            "store_bytes": (config.state_path / STORE_FILE).stat().st_size, "difficulty": config.difficulty,
            "path": config.state_path / STORE_FILE, "fingerprint": network_fingerprint(config)}


def restore_parts(path: Path, fingerprint: dict[str, str], runs: int) -> dict[str, Any]:
    """What a node does on a restart with --persist, step by step, with the node's own code (in this process)."""
    from config import Config
    config = Config()
    parts: dict[str, list[float]] = {"open (integrity check)": [], "load()": [], "chain validation": [],
                                     "indexes": []}
    for _ in range(runs):
        started = time.perf_counter()
        store = Store(path, fingerprint)
        opened = time.perf_counter()
        saved = store.load()
        loaded = time.perf_counter()
        store.close()
        chain = Blockchain(config.difficulty, config.genesis_timestamp, config.pow_mode)
        problem = chain.chain_problem(saved.chain)
        checked = time.perf_counter()
        if problem:
            raise RuntimeError(f"the built chain does not pass the node's checks: {problem}")
        chain.restore(saved.chain, saved.pending)  # checks again, then indexes
        restored = time.perf_counter()
        parts["open (integrity check)"].append(opened - started)
        parts["load()"].append(loaded - opened)
        parts["chain validation"].append(checked - loaded)
        parts["indexes"].append(max(0.0, (restored - checked) - (checked - loaded)))
    return {name: statistics.median(values) for name, values in parts.items()}


def timed_restart(ctx: Any, node: Any) -> float:
    """Stop a node process and start it again; seconds from the new process's start to its first /health."""
    ctx.cluster.stop_node(node)
    ctx.cluster.nodes.append(node)  # stop_node forgot it; it is ours to stop at the end again
    started = time.perf_counter()
    node.start()  # returns once /health answers 200 (polled every 0.1 s)
    return time.perf_counter() - started


def add_transaction_rounds(apis: dict[str, Http], rounds: int, per_round: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in apis}
    for number, name in interleaved(list(apis), rounds):
        api = apis[name]
        for k in range(per_round):
            tx = node_transaction(10_000_000 + number * per_round + k, PAPER_HASH)
            tx["EHR_name"] = f"{name}-{number}-{k}"
            started = time.perf_counter()
            api.json("POST", "/add_transaction", tx, expect=(201,))
            samples[name].append(time.perf_counter() - started)
    return samples


def run(ctx: Any) -> dict[str, Any]:
    """Item 12 of bench/run.py."""
    args = ctx.args
    records, rounds = args.persist_records, args.persist_rounds
    cid = ctx.sample_cid or PAPER_HASH
    big_dir = ctx.workdir / "nodes" / "persist-big"  # where ctx.cluster.node puts a node of that name
    log(f"item 12: a chain of {records:,} records ({NODE_PER_BLOCK:,} a block, mined at the nodes' difficulty) "
        f"into a node's store")
    built = build_node_store(big_dir, records, cid)
    log(f"  mined {built['blocks'] - 1} blocks in {built['mine_s']:.1f} s; store {built['store_bytes'] / MB:.1f} MB; "
        f"starting the nodes")
    started = time.perf_counter()
    big = ctx.cluster.node("persist-big", ctx.kubo, persist=True)
    first_start = time.perf_counter() - started
    empty = ctx.cluster.node("persist-empty", ctx.kubo, persist=True)
    memory = ctx.cluster.node("persist-none", ctx.kubo)
    health = Http(big.port).json("GET", "/health")
    if health["length"] != built["blocks"]:
        raise RuntimeError(f"the node restored {health['length']} blocks, not {built['blocks']}")
    log(f"  add_transaction: {rounds} interleaved rounds of {NODE_PER_ROUND} on each node")
    apis = {"with records": Http(big.port), "empty": Http(empty.port), "no --persist": Http(memory.port)}
    for api in apis.values():  # warm-up
        add_transaction_rounds({"x": api}, 1, 3)
    samples = add_transaction_rounds(apis, rounds, NODE_PER_ROUND)
    latency = {name: summarize(values, MS) for name, values in samples.items()}
    log(f"  restarts: {args.persist_restarts} of the node with {records:,} records, beside a node with no state")
    restarts: dict[str, list[float]] = {"with records": [], "no state": []}
    for _ in range(args.persist_restarts):
        restarts["with records"].append(timed_restart(ctx, big))
        restarts["no state"].append(timed_restart(ctx, memory))
    if Http(big.port).json("GET", "/health")["length"] != built["blocks"]:
        raise RuntimeError("the restarted node lost blocks")
    parts = restore_parts(built["path"], built["fingerprint"], max(1, args.persist_restarts))
    for node in (big, empty, memory):
        ctx.cluster.stop_node(node)

    log("  the store alone (context)")
    store_alone = store_context(ctx.workdir / "store-alone", min(records, RECORDS), max(10, rounds // 2))

    ratio_big = ratio(latency["with records"]["median"], latency["empty"]["median"])
    met_latency = ratio_big <= RATIO_GOAL and latency["with records"]["median"] <= MEDIAN_GOAL_MS
    restart_s = statistics.median(restarts["with records"])
    bare_s = statistics.median(restarts["no state"])
    biggest = max(parts, key=parts.get)
    part_text = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in parts.items())
    restore_total = sum(parts.values())
    goals = [
        {"item": BENCH_ITEM,
         "name": f"add_transaction on a --persist node holding {records:,} records (HTTP, sequential), against one "
                 f"with an empty store",
         "goal": f"within {RATIO_GOAL:g}x of the empty store's and median <= {MEDIAN_GOAL_MS:g} ms",
         "measured": f"{latency['with records']['median']:.2f} vs {latency['empty']['median']:.2f} ms median "
                     f"({ratio_big:.2f}x; p95 {latency['with records']['p95']:.2f} vs {latency['empty']['p95']:.2f}); "
                     f"without --persist {latency['no --persist']['median']:.2f} ms; "
                     f"{latency['with records']['n']} calls each",
         "met": bool(met_latency),
         "miss": None if met_latency else
         f"{'ratio' if ratio_big > RATIO_GOAL else 'median'} over the goal; a commit with fsync costs "
         f"{store_alone['fsync_ms']['median']:.2f} ms here (raw fsync median)"},
        {"item": BENCH_ITEM,
         "name": f"restart of a --persist node holding {records:,} records ({built['blocks']:,} blocks), from process "
                 f"start to its first answer",
         "goal": f"< {RESTART_GOAL_S:g} s",
         "measured": f"{restart_s:.2f} s median of {len(restarts['with records'])} (a node with no state: "
                     f"{bare_s:.2f} s); the restore's parts, timed with the node's code in the bench process: "
                     f"{part_text}" + (f"; {biggest} is the largest" if parts[biggest] > restore_total / 2 else ""),
         "met": restart_s < RESTART_GOAL_S,
         "miss": None if restart_s < RESTART_GOAL_S else f"by {restart_s - RESTART_GOAL_S:.1f} s; {biggest} takes "
                                                         f"{parts[biggest]:.1f} s"},
    ]
    return {"records": records, "built": {k: v for k, v in built.items() if k not in ("path", "fingerprint")},
            "first_start_s": first_start, "add_transaction_ms": latency, "rounds": rounds,
            "per_round": NODE_PER_ROUND, "restarts_s": restarts, "restore_parts_s": parts,
            "store_alone": store_alone, "goals": goals,
            "notes": [f"The chain is mined by blockchain.Blockchain at difficulty {built['difficulty']} (the nodes' "
                      f"default), {NODE_PER_BLOCK:,} records a block, and written with store.Store as a node writes "
                      f"it, so the node checks it on start as any restored chain.",
                      "add_transaction: one keep-alive connection per node, sequential calls, the three nodes "
                      "interleaved round by round (the order rotates); each call is journaled (committed with "
                      "fsync) before it is acknowledged on the --persist nodes.",
                      "Restart: from starting the process to the first 200 from /health (polled every 0.1 s). The "
                      "restore's parts are timed in the bench process with the node's own code (store.Store, "
                      "Blockchain.chain_problem and restore), on the same file."]}


def store_context(folder: Path, records: int, rounds: int) -> dict[str, Any]:
    """The colleague's Store-level measurements (see main), for context in item 12."""
    folder.mkdir(parents=True, exist_ok=True)
    big_path, empty_path = folder / "big.sqlite3", folder / "empty.sqlite3"
    big_maker, build_s = build(big_path, records)
    empty_maker, _ = build(empty_path, 0)
    with Store(big_path, NETWORK) as big, Store(empty_path, NETWORK) as empty:
        seconds = add_pending_rounds({"big": (big, big_maker), "empty": (empty, empty_maker)}, rounds, PER_ROUND)
    loading = time_load(big_path)
    return {"records": records, "build_s": build_s,
            "add_pending_ms": {"with_records": summarize(seconds["big"], MS), "empty": summarize(seconds["empty"], MS)},
            "load": loading, "fsync_ms": time_fsync(folder)}


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
