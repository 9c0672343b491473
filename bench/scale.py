"""Item 5: get_file_hash among 100,000 records; get_chain and replace_chain as the chain grows."""
from __future__ import annotations

import json
import math
import random
import time
from typing import Any

from common import Http, log, summarize
from load import generate_load, mine_all

LOOKUP_GOAL_MS = 2.0
GROWTH_EXPONENT_GOAL = 1.2  # fitted log-log slope: 1 linear, 2 quadratic; 1.2 leaves room for noise
NODE_HEADER = "X-EMR-Node"


def scan(chain: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """A linear scan of the chain, as the paper's get_file_hash does: the newest record matching `name`."""
    folded = name.casefold()
    stem = folded.split(".", 1)[0]
    found = None
    for block in chain:
        for tx in block["transactions"]:
            if tx["EHR_name"].casefold() in (folded, stem) or tx.get("file_name", "").casefold() == folded:
                found = tx
    return found


def record_files(ctx: Any, node: Any, files: int, tag: str) -> dict[str, Any]:
    """POST `files` distinct records from the load generator, then mine them all."""
    body = json.dumps({"user_id": "patient-{i}", "ipfs_hash": ctx.sample_cid, "EHR_name": "record-{i}",
                       "file_name": "record-{i}.pdf.aes", "file_size": "63884"})
    started = time.perf_counter()
    posted = generate_load(ctx, node.port, "/add_transaction", method="POST", body=body, count=files, tag=tag)
    post_s = time.perf_counter() - started
    if posted["ok"] != files:
        raise RuntimeError(f"only {posted['ok']} of {files} add_transaction calls succeeded: {posted['statuses']} "
                           f"{posted['errors']}")
    blocks, mine_s = mine_all(Http(node.port))
    return {"post_s": post_s, "post_rate": files / post_s, "blocks": blocks, "mine_s": mine_s}


def chain_names(api: Http) -> tuple[list[dict[str, Any]], list[str], int, float]:
    started = time.perf_counter()
    status, raw = api.request("GET", "/get_chain")
    seconds = time.perf_counter() - started
    assert status == 200 and isinstance(raw, bytes)
    chain = json.loads(raw)["chain"]
    return chain, [tx["file_name"] for block in chain for tx in block["transactions"]], len(raw), seconds


def lookups(ctx: Any) -> dict[str, Any]:
    args = ctx.args
    files, small_files = args.files, max(1, args.files // 100)
    log(f"item 5: recording {files} files on one node and {small_files} on another "
        f"(add_transaction from {args.connections} connections)")
    node = ctx.cluster.node("scale-files", ctx.kubo, mining_workers=1)
    small = ctx.cluster.node("scale-files-small", ctx.kubo, mining_workers=1)
    api, small_api = Http(node.port), Http(small.port)
    build = record_files(ctx, node, files, "files")
    record_files(ctx, small, small_files, "files-small")
    log(f"  recorded in {build['post_s']:.1f} s ({build['post_rate']:.0f}/s), mined into {build['blocks']} blocks "
        f"in {build['mine_s']:.1f} s")
    chain, names, chain_bytes, chain_s = chain_names(api)
    _, small_names, _, _ = chain_names(small_api)
    if len(names) != files or len(small_names) != small_files:
        raise RuntimeError(f"the chains hold {len(names)} and {len(small_names)} records, not {files} and {small_files}")
    rng = random.Random(6)
    queries = rng.sample(names, min(args.lookups, len(names)))
    small_queries = [rng.choice(small_names) for _ in queries]
    node_ms, small_ms, scan_ms = [], [], []

    def lookup(client: Http, name: str, into: list[float]) -> None:
        started = time.perf_counter()
        info = client.json("POST", "/get_file_hash", {"name": name})
        into.append((time.perf_counter() - started) * 1000)
        if info["File info"]["Name"] != name:
            raise RuntimeError(f"get_file_hash({name}) answered {info['File info']}")

    for number, (name, small_name) in enumerate(zip(queries, small_queries)):
        # the same stack with 100x fewer records, interleaved: what the record count itself costs
        pair = [(api, name, node_ms), (small_api, small_name, small_ms)]
        for client, asked, into in (pair if number % 2 == 0 else pair[::-1]):
            lookup(client, asked, into)
        if number < args.scans:
            started = time.perf_counter()
            found = scan(chain, name)
            scan_ms.append((time.perf_counter() - started) * 1000)
            assert found is not None and found["file_name"] == name
    ctx.cluster.stop_node(node)
    ctx.cluster.stop_node(small)
    node_summary, small_summary, scan_summary = summarize(node_ms), summarize(small_ms), summarize(scan_ms)
    met = node_summary["median"] < LOOKUP_GOAL_MS
    goal = {"item": "5", "name": f"get_file_hash median latency with {files:,} recorded files",
            "goal": f"median < {LOOKUP_GOAL_MS:g} ms",
            "measured": f"{node_summary['median']:.2f} ms (p95 {node_summary['p95']:.2f}); with {small_files:,} files, "
                        f"interleaved: {small_summary['median']:.2f} ms; a linear scan of the chain in-process: "
                        f"{scan_summary['median']:.1f} ms",
            "met": met, "miss": None if met else f"by {node_summary['median'] - LOOKUP_GOAL_MS:.2f} ms"}
    return {"files": files, "small_files": small_files, "build": build, "get_chain_s": chain_s,
            "get_chain_bytes": chain_bytes, "lookup_ms": node_summary, "lookup_small_ms": small_summary,
            "linear_scan_ms": scan_summary, "speedup_over_scan": scan_summary["median"] / node_summary["median"],
            "goal": goal}


def fitted_exponent(sizes: list[float], values: list[float]) -> float:
    """Least-squares slope of log(value) on log(size): 1 is linear growth, 2 quadratic."""
    xs, ys = [math.log(s) for s in sizes], [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / spread if spread else math.nan


def long_chains(ctx: Any) -> dict[str, Any]:
    args = ctx.args
    sizes = sorted(args.chain_sizes)
    log(f"item 5: chains of {', '.join(map(str, sizes))} blocks (difficulty 1, {args.chain_tx} transaction(s) a block)")
    settings = {"difficulty": 1, "mining_workers": 1, "peer_timeout": 60}
    source = ctx.cluster.node("chain-source", ctx.kubo, **settings)
    api = Http(source.port)
    # Fresh nodes, one set per size, connected to the source now (while its chain is only the genesis
    # block) and without announcing themselves, so the source never gossips its blocks to them:
    # each stays at the genesis block until its replace_chain adopts the long chain.
    fresh: dict[int, list[Any]] = {}
    for size in sizes:
        fresh[size] = []
        for copy in range(args.replace_nodes):
            node = ctx.cluster.node(f"chain-fresh-{size}-{copy}", ctx.kubo, **settings)
            Http(node.port).json("POST", "/connect_node", {"nodes": [source.url]},
                                 headers={NODE_HEADER: f"http://127.0.0.1:{node.port}"})
            fresh[size].append(node)
    time.sleep(0.5)  # the connect's background sync with a one-block chain
    if api.json("GET", "/health")["peers"]:
        log("  warning: the source node learnt of the fresh nodes; they may receive its blocks by gossip")
    tx = {"user_id": "xxxxx", "ipfs_hash": ctx.sample_cid, "EHR_name": "MRI"}
    rows = []
    length = api.json("GET", "/health")["length"]
    for size in sizes:
        started = time.perf_counter()
        while length < size:
            for _ in range(args.chain_tx):
                api.json("POST", "/add_transaction", tx)
            length = api.json("GET", "/mine_block")["index"]
        build_s = time.perf_counter() - started
        get_times, get_bytes = [], 0
        for _ in range(args.chain_gets):
            started = time.perf_counter()
            status, raw = api.request("GET", "/get_chain")
            get_times.append(time.perf_counter() - started)
            assert status == 200 and isinstance(raw, bytes)
            get_bytes = len(raw)
        replace_times, replace_bytes, second_times, problems = [], 0, [], []
        for node in fresh[size]:
            fresh_api = Http(node.port)
            before = fresh_api.json("GET", "/health")["length"]
            started = time.perf_counter()
            status, raw = fresh_api.request("GET", "/replace_chain")
            replace_times.append(time.perf_counter() - started)
            assert isinstance(raw, bytes)
            answer = json.loads(raw) if status == 200 else {}
            replace_bytes = len(raw)
            if before != 1 or not answer.get("replaced") or answer.get("length") != size:
                problems.append(f"node {node.port}: length before {before}, status {status}, "
                                f"replaced {answer.get('replaced')}, length {answer.get('length')}, "
                                f"{str(answer.get('peers'))[:200]}")
            started = time.perf_counter()
            fresh_api.json("GET", "/replace_chain")
            second_times.append(time.perf_counter() - started)
            ctx.cluster.stop_node(node)
        row = {"blocks": size, "build_s": build_s, "get_chain": summarize(get_times, 1000), "get_chain_bytes": get_bytes,
               "replace_chain": summarize(replace_times, 1000), "replace_chain_bytes": replace_bytes,
               "replace_chain_again": summarize(second_times, 1000), "problems": problems}
        rows.append(row)
        log(f"  {size} blocks: built in {build_s:.1f} s, get_chain {row['get_chain']['median']:.0f} ms "
            f"({get_bytes / 1e6:.1f} MB), replace_chain {row['replace_chain']['median']:.0f} ms")
    ctx.cluster.stop_node(source)
    first, last = rows[0], rows[-1]
    growth = {}
    goals = []
    for what in ("get_chain", "replace_chain"):
        time_ratio = last[what]["median"] / first[what]["median"]
        bytes_ratio = last[f"{what}_bytes"] / first[f"{what}_bytes"]
        exponent = fitted_exponent([row["blocks"] for row in rows], [row[what]["median"] for row in rows])
        growth[what] = {"time_ratio": time_ratio, "bytes_ratio": bytes_ratio, "exponent": exponent,
                        "ms_per_1000_blocks": last[what]["median"] / last["blocks"] * 1000}
        problems = [p for row in rows for p in row["problems"]] if what == "replace_chain" else []
        ok = exponent <= GROWTH_EXPONENT_GOAL and not problems
        goals.append({"item": "5", "name": f"{what} from {first['blocks']:,} to {last['blocks']:,} blocks",
                      "goal": f"grows about linearly (fitted exponent <= {GROWTH_EXPONENT_GOAL}; 1 = linear)"
                              + ("; every fresh node adopts the chain" if what == "replace_chain" else ""),
                      "measured": f"exponent {exponent:.2f}: x{time_ratio:.1f} time ({first[what]['median']:.0f} -> "
                                  f"{last[what]['median']:.0f} ms), x{bytes_ratio:.1f} bytes "
                                  f"({first[f'{what}_bytes'] / 1e6:.2f} -> {last[f'{what}_bytes'] / 1e6:.2f} MB)",
                      "met": ok, "miss": None if ok else ("; ".join(problems) if problems else
                                                          f"exponent {exponent:.2f} > {GROWTH_EXPONENT_GOAL}")})
    return {"sizes": rows, "growth": growth, "goals": goals, "transactions_per_block": args.chain_tx}


def run(ctx: Any) -> dict[str, Any]:
    files = lookups(ctx)
    chains = long_chains(ctx)
    return {"files": {k: v for k, v in files.items() if k != "goal"}, "chains": chains,
            "goals": [files["goal"], *chains["goals"]],
            "notes": ["Records carry file_name and file_size (as scripts/walkthrough.sh records them), so "
                      "get_file_hash answers from the chain alone; a record without file_size also asks Kubo "
                      "for its size (see item 1).",
                      "replace_chain: a fresh node (genesis only), connected to the long chain's node before that "
                      "chain was built, adopts it with one GET /replace_chain; 'again' is the next call, which "
                      "finds nothing to replace."]}
