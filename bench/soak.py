"""Item 10: emr-chain across lab hosts (network namespaces, a node and a Kubo on each; scripts/lab_cluster.py).

Soak: every host records at a steady rate (its own application, bench/soak_agent.py, inside the host) and mines
now and then, while one host after another is cut off for a while and healed. Reported: acknowledged against
committed transactions (goal: none lost, none twice), the time until every host holds one chain after each heal
(median and max), and the pin lag: from a record's block being mined to the record being pinned on every host.

Scale: the same deployment on 3 and on 6 hosts, quiet: gossip requests per transaction and per block, the
background sync's requests per second, pins per record, chain bytes per node and in all. Counted from the
nodes' own request logs (--log-level DEBUG writes one line per request).

    sudo .venv/bin/python bench/soak.py [--seconds 150] [--hosts 3] [--scale-hosts 3,6] [--json out.json]
    .venv/bin/python bench/run.py --items soak --out /tmp/soak-results      # as item 10 of the benchmark

Needs root (network namespaces); without it the item is skipped and says why.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for folder in (str(ROOT), str(BENCH)):
    if folder not in sys.path:
        sys.path.insert(0, folder)

from common import log, summarize  # noqa: E402
from scripts.lab import NODE_PORT, Lab, LabError, available  # noqa: E402
from scripts.lab_cluster import LabCluster  # noqa: E402

AGENT = BENCH / "soak_agent.py"
REQUEST_LINE = re.compile(r"\[emr\.app :\d+\] (GET|POST) (\S+) (\d{3}) ")
CONVERGE_GOAL_SECONDS = 30.0
SOAK_SETTINGS = {"log_level": "DEBUG", "sync_interval": 5.0, "pin_retry_max": 10.0, "peer_timeout": 2.0}


# -- reading what the lab wrote -------------------------------------------------------------------

def request_counts(path: Path) -> collections.Counter:
    """Requests a node answered 2xx, by 'METHOD /path', from its log."""
    counts: collections.Counter = collections.Counter()
    if path.exists():
        with open(path, errors="replace") as lines:
            for line in lines:
                match = REQUEST_LINE.search(line)
                if match and match.group(3).startswith("2"):
                    counts[f"{match.group(1)} {match.group(2)}"] += 1
    return counts


def lab_counts(cluster: LabCluster) -> collections.Counter:
    total: collections.Counter = collections.Counter()
    for host in cluster.hosts:
        total += request_counts(cluster.nodes[host].log_path)
    return total


def gossip(counts: collections.Counter) -> dict[str, int]:
    return {"transaction_requests": counts["POST /receive_transactions"] + counts["POST /receive_transaction"],
            "block_requests": counts["POST /receive_block"], "sync_requests": counts["GET /blocks"]}


def difference(after: collections.Counter, before: collections.Counter) -> collections.Counter:
    return collections.Counter({key: after[key] - before[key] for key in after})


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def epoch(stamp: str | None) -> float | None:
    """A node's ISO UTC time ('...Z') or a block's local timestamp, as seconds since the epoch."""
    if not stamp:
        return None
    if stamp.endswith("Z"):
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return datetime.fromisoformat(stamp).timestamp()


def converged_after(start: float, heads: dict[int, list[dict[str, Any]]], horizon: float) -> float | None:
    """Seconds from `start` until every host's last seen head is the same block, or None before `horizon`."""
    events = sorted((entry["t"], host, entry["hash"]) for host, entries in heads.items() for entry in entries
                    if start <= entry["t"] <= horizon)
    latest: dict[int, str] = {}
    for stamp, host, head in events:
        latest[host] = head
        if len(latest) == len(heads) and len(set(latest.values())) == 1:
            return stamp - start
    return None


def collect(cluster: LabCluster, cids: list[str], workdir: Path) -> dict[int, dict[str, Any]]:
    """Each host's pin status of every record, its /health and its chain, gathered inside the host."""
    found = {}
    for host in cluster.hosts:
        spec = workdir / f"collect-h{host}.json"
        out = workdir / f"collected-h{host}.json"
        spec.write_text(json.dumps({"address": cluster.lab.address(host), "port": NODE_PORT, "key": cluster.api_key,
                                    "cids": cids, "out": str(out)}))
        result = cluster.lab.run(host, [sys.executable, str(AGENT), "collect", str(spec)], timeout=300)
        if result.returncode != 0:
            raise LabError(f"collect on host {host}: {result.stderr[-2000:]}")
        found[host] = json.loads(out.read_text())
    return found


def wait_all_pinned(cluster: LabCluster, cids: list[str], workdir: Path, timeout: float = 120.0) -> dict[int, Any]:
    """Collect until every host has every record pinned (or the time is up); the last collection."""
    deadline = time.monotonic() + timeout
    while True:
        collected = collect(cluster, cids, workdir)
        if all((pin or {}).get("state") == "pinned" for found in collected.values() for pin in found["pins"].values()) \
                or time.monotonic() > deadline:
            return collected
        time.sleep(1.0)


def pin_lags(chain: list[dict[str, Any]], collected: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """From each record's block (mined) to its pin on every host; records some host never pinned are counted."""
    lags, unpinned = [], []
    for block in chain[1:]:
        mined = epoch(block["timestamp"])
        for tx in block["transactions"]:
            pins = [collected[host]["pins"].get(tx["ipfs_hash"]) for host in collected]
            if not all(pin and pin["state"] == "pinned" for pin in pins):
                unpinned.append(tx["ipfs_hash"])
                continue
            times = [epoch(pin["pinned_at"]) for pin in pins]
            if None in times or mined is None:
                continue
            lags.append(max(0.0, max(times) - mined))  # pinned before this block: an earlier fork's copy
    return {"seconds": summarize(lags), "records": len(lags) + len(unpinned), "not_pinned_everywhere": len(unpinned)}


def settle(cluster: LabCluster, timeout: float = 120.0) -> float:
    """What an operator does at the end: mine wherever transactions wait, until every host holds one chain and
    nothing is pending. Returns the seconds it took."""
    started = time.monotonic()

    def done() -> bool:
        pending = {host: cluster.get(host, "/health").json()["pending"] for host in cluster.hosts}
        for host, count in pending.items():
            if count:
                cluster.mine(host)
        return not any(pending.values()) and len(set(cluster.heads().values())) == 1

    cluster.wait(done, timeout, "the hosts did not settle on one chain with nothing pending", interval=1.0)
    return time.monotonic() - started


# -- the soak ---------------------------------------------------------------------------------------

def soak(hosts: int, seconds: float, rate: float, mine_every: float, partition_every: float,
         partition_seconds: float, workdir: Path) -> dict[str, Any]:
    with Lab(hosts=hosts, workdir=workdir / f"soak-{hosts}") as lab:
        cluster = LabCluster(lab, {host: "patient" for host in range(1, hosts + 1)}, settings=SOAK_SETTINGS,
                             say=log).start()
        stop = lab.workdir / "stop"
        outs = {host: lab.workdir / f"agent-h{host}.jsonl" for host in cluster.hosts}
        for host in cluster.hosts:
            spec = lab.workdir / f"agent-h{host}.json"
            spec.write_text(json.dumps({
                "address": lab.address(host), "port": NODE_PORT, "key": cluster.api_key, "host": host,
                "data_dir": str(cluster.data_dir(host)), "seconds": seconds, "rate": rate / hosts,
                "mine_every": mine_every, "poll": 0.25, "seed": host, "min_bytes": 2_000, "max_bytes": 64_000,
                "stop": str(stop), "out": str(outs[host])}))
            with open(lab.workdir / f"agent-h{host}.log", "wb") as agent_log:
                lab.popen(host, [sys.executable, str(AGENT), "drive", str(spec)], stdout=agent_log,
                          stderr=subprocess.STDOUT)
        began = time.time()
        log(f"item 10: soak on {hosts} hosts for {seconds:.0f} s: {rate:g} records/s in all, mining every "
            f"~{mine_every:g} s on each host, a host cut off for {partition_seconds:g} s every {partition_every:g} s")
        partitions: list[dict[str, Any]] = []
        victim = 0
        while True:
            cut_at = began + partition_every * (len(partitions) + 1) - partition_seconds
            if cut_at + partition_seconds > began + seconds - 5:
                break
            time.sleep(max(0.0, cut_at - time.time()))
            host = cluster.hosts[victim % hosts]
            victim += 1
            lab.partition(host)
            cut = time.time()
            time.sleep(partition_seconds)
            lab.heal(host)
            partitions.append({"host": host, "cut": cut, "healed": time.time()})
            log(f"  host {host} cut off {partitions[-1]['healed'] - cut:.1f} s, healed")
        time.sleep(max(0.0, began + seconds - time.time()))
        stop.write_text("stop")
        time.sleep(1.0)
        settle_seconds = settle(cluster)
        log(f"  settled in {settle_seconds:.1f} s; collecting")
        lines = {host: read_lines(outs[host]) for host in cluster.hosts}
        acked = {entry["id"]: entry["cid"] for entries in lines.values() for entry in entries if entry["kind"] == "ack"}
        nacked = [entry for entries in lines.values() for entry in entries if entry["kind"] == "nack"]
        heads = {host: [entry for entry in entries if entry["kind"] == "head"] for host, entries in lines.items()}
        chain = cluster.chain(1)
        committed = collections.Counter(tx["id"] for block in chain for tx in block["transactions"])
        cids = sorted({tx["ipfs_hash"] for block in chain for tx in block["transactions"]} | set(acked.values()))
        collected = wait_all_pinned(cluster, cids, lab.workdir, timeout=60)
        chains_equal = len({json.dumps(collected[host]["chain"]) for host in cluster.hosts}) == 1
        end = time.time()
        for number, partition in enumerate(partitions):
            horizon = partitions[number + 1]["cut"] if number + 1 < len(partitions) else end
            partition["converged_s"] = converged_after(partition["healed"], heads, horizon)
            partition["cut"] -= began
            partition["healed"] -= began
        converge = [p["converged_s"] for p in partitions if p["converged_s"] is not None]
        counts = lab_counts(cluster)
        mined = sum(1 for entries in lines.values() for entry in entries if entry["kind"] == "mine")
        return {
            "hosts": hosts, "seconds": seconds, "rate_per_s": rate, "mine_every_s": mine_every,
            "partition_every_s": partition_every, "partition_s": partition_seconds,
            "acknowledged": len(acked), "not_acknowledged": len(nacked),
            "not_acknowledged_errors": collections.Counter(e["error"].split(":")[0] for e in nacked).most_common(5),
            "committed": sum(committed.values()), "lost": len(set(acked) - set(committed)),
            "duplicated": sum(1 for count in committed.values() if count > 1),
            "committed_not_acknowledged": len(set(committed) - set(acked)),
            "chain_length": len(chain), "blocks_mined": mined, "forked_away": mined - (len(chain) - 1),
            "chains_equal": chains_equal, "settle_s": settle_seconds,
            "partitions": partitions, "converge_s": summarize(converge),
            "heals_not_converged_before_next_cut": len(partitions) - len(converge),
            "pin_lag": pin_lags(chain, collected),
            "records_missing": {host: collected[host]["health"]["records"]["missing"] for host in cluster.hosts},
            "gossip": gossip(counts),
        }


# -- what grows with the number of hosts ------------------------------------------------------------

def scale(hosts: int, transactions: int, blocks: int, idle_seconds: float, workdir: Path) -> dict[str, Any]:
    with Lab(hosts=hosts, workdir=workdir / f"scale-{hosts}") as lab:
        cluster = LabCluster(lab, {host: "patient" for host in range(1, hosts + 1)}, settings=SOAK_SETTINGS,
                             say=log).start()
        log(f"item 10: scale on {hosts} hosts: {transactions} records one at a time, {blocks} blocks, "
            f"{idle_seconds:g} s idle")
        time.sleep(1.0)
        before = lab_counts(cluster)
        cids = []
        for number in range(transactions):
            cid, _ = cluster.add_record(1 + number % hosts, os.urandom(16_000), f"scale-{number}.bin")
            cids.append(cid)
            time.sleep(0.3)
        cluster.wait(lambda: all(cluster.get(host, "/health").json()["pending"] == transactions
                                 for host in cluster.hosts), 60, "gossip did not reach every host")
        time.sleep(1.0)
        after_tx = lab_counts(cluster)
        for number in range(blocks):
            cluster.mine(1 + number % hosts)
            cluster.wait_converged(timeout=60)
        time.sleep(1.0)
        after_blocks = lab_counts(cluster)
        idle_start = time.monotonic()
        time.sleep(idle_seconds)
        after_idle = lab_counts(cluster)
        idle = time.monotonic() - idle_start
        collected = wait_all_pinned(cluster, cids, lab.workdir)
        chain = collected[1]["chain"]
        tx_phase, block_phase = gossip(difference(after_tx, before)), gossip(difference(after_blocks, after_tx))
        pins = sum(1 for host in collected for cid in cids if (collected[host]["pins"].get(cid) or {}).get("state")
                   == "pinned")
        return {
            "hosts": hosts, "transactions": transactions, "blocks": blocks,
            "gossip_requests_per_transaction": tx_phase["transaction_requests"] / transactions,
            "expected_per_transaction": (hosts - 1) ** 2,
            "gossip_requests_per_block": block_phase["block_requests"] / blocks,
            "sync_requests_per_block": block_phase["sync_requests"] / blocks,
            "idle_sync_requests_per_s": gossip(difference(after_idle, after_blocks))["sync_requests"] / idle,
            "pins_per_record": pins / len(cids),
            "pin_lag": pin_lags(chain, collected),
            "chain_blocks": len(chain), "chain_bytes_per_node": collected[1]["chain_bytes"],
            "chain_bytes_all_nodes": sum(collected[host]["chain_bytes"] for host in collected),
            "chain_bytes_per_transaction": collected[1]["chain_bytes"] / max(1, transactions),
        }


# -- as item 10 of bench/run.py, and on its own ------------------------------------------------------

def goals(soaked: dict[str, Any] | None, scaled: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    if soaked:
        s = soaked
        rows.append({"item": "10", "name": f"nothing lost across {len(s['partitions'])} partitions, {s['hosts']} hosts, "
                                          f"{s['seconds']:.0f} s",
                     "goal": "0 lost, 0 duplicated",
                     "measured": f"{s['acknowledged'] - s['lost']} of {s['acknowledged']} acknowledged committed, "
                                 f"{s['duplicated']} twice; chains equal: {s['chains_equal']}",
                     "met": s["lost"] == 0 and s["duplicated"] == 0 and s["chains_equal"],
                     "miss": f"{s['lost']} lost, {s['duplicated']} duplicated" if s["lost"] or s["duplicated"]
                     else None if s["chains_equal"] else "chains differ"})
        c = s["converge_s"]
        rows.append({"item": "10", "name": "one chain again after each heal",
                     "goal": f"every heal, within {CONVERGE_GOAL_SECONDS:g} s",
                     "measured": f"median {c.get('median', math.nan):.1f} s, max {c.get('max', math.nan):.1f} s over "
                                 f"{c['n']} of {len(s['partitions'])} heals",
                     "met": c["n"] == len(s["partitions"]) and c["n"] > 0 and c["max"] <= CONVERGE_GOAL_SECONDS,
                     "miss": None})
        lag = s["pin_lag"]["seconds"]
        rows.append({"item": "10", "name": "pin lag: block mined to pinned on every host (under partitions)",
                     "goal": "reported",
                     "measured": f"median {lag.get('median', math.nan):.1f} s, p95 {lag.get('p95', math.nan):.1f} s, "
                                 f"max {lag.get('max', math.nan):.1f} s over {lag['n']} records; "
                                 f"{s['pin_lag']['not_pinned_everywhere']} not pinned everywhere",
                     "met": None, "miss": None})
    for r in scaled:
        rows.append({"item": "10", "name": f"what grows with hosts: {r['hosts']} hosts", "goal": "reported",
                     "measured": f"{r['gossip_requests_per_transaction']:.1f} gossip requests a transaction "
                                 f"((N-1)^2 = {r['expected_per_transaction']}), "
                                 f"{r['gossip_requests_per_block']:.1f} a block, "
                                 f"{r['idle_sync_requests_per_s']:.2f} sync requests/s idle, "
                                 f"{r['pins_per_record']:.0f} pins a record, chain "
                                 f"{r['chain_bytes_per_node'] / 1000:.1f} kB a node "
                                 f"({r['chain_bytes_all_nodes'] / 1000:.1f} kB in all)",
                     "met": None, "miss": None})
    return rows


def measure(hosts: int, seconds: float, rate: float, mine_every: float, partition_every: float,
            partition_seconds: float, scale_hosts: list[int], scale_transactions: int, workdir: Path) -> dict[str, Any]:
    ok, reason = available()
    if not ok:
        return {"skipped": f"needs network namespaces: {reason}", "goals": []}
    result: dict[str, Any] = {"scale": [], "errors": {}}
    if seconds > 0:
        try:
            result["soak"] = soak(hosts, seconds, rate, mine_every, partition_every, partition_seconds, workdir)
        except (LabError, subprocess.SubprocessError, OSError) as exc:
            result["errors"]["soak"] = f"{type(exc).__name__}: {exc}"
            log(f"item 10: the soak failed: {result['errors']['soak']}")
    for n in scale_hosts:
        try:
            result["scale"].append(scale(n, scale_transactions, 5, 10.0, workdir))
        except (LabError, subprocess.SubprocessError, OSError) as exc:
            result["errors"][f"scale-{n}"] = f"{type(exc).__name__}: {exc}"
            log(f"item 10: scale on {n} hosts failed: {result['errors'][f'scale-{n}']}")
    result["goals"] = goals(result.get("soak"), result["scale"])
    if result["errors"]:
        raise SoakFailed(result)
    return result


class SoakFailed(RuntimeError):
    """Some part of item 10 failed; `.result` holds what was measured, and what failed."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__("; ".join(f"{part}: {why}" for part, why in result["errors"].items()))
        self.result = result


def run(ctx: Any) -> dict[str, Any]:
    """Item 10 for bench/run.py: what was measured, also when a part failed (then a goal row says which)."""
    args = ctx.args
    try:
        return measure(args.soak_hosts, args.soak_seconds, args.soak_rate, args.soak_mine_every,
                       args.soak_partition_every, args.soak_partition_seconds, args.scale_hosts,
                       args.scale_transactions, ctx.workdir)
    except SoakFailed as failed:
        result = failed.result
        result["goals"].append({"item": "10", "name": "every part of item 10 ran", "goal": "no part failed",
                                "measured": str(failed), "met": False, "miss": str(failed)})
        return result


def add_arguments(group: Any) -> None:
    group.add_argument("--soak-hosts", type=int, default=3, help="lab hosts in the soak (default 3)")
    group.add_argument("--soak-seconds", type=float, default=150.0, help="length of the soak (default 150; 0: none)")
    group.add_argument("--soak-rate", type=float, default=3.0, help="records a second, all hosts together (default 3)")
    group.add_argument("--soak-mine-every", type=float, default=4.0, help="seconds between mines on each host "
                                                                          "(default 4)")
    group.add_argument("--soak-partition-every", type=float, default=35.0,
                       help="seconds between partitions (default 35)")
    group.add_argument("--soak-partition-seconds", type=float, default=12.0,
                       help="how long a host stays cut off (default 12)")
    group.add_argument("--scale-hosts", type=lambda text: [int(n) for n in text.split(",") if n],
                       default=[3, 6], help="lab sizes for the growth figures (default 3,6)")
    group.add_argument("--scale-transactions", type=int, default=20, help="records per lab size (default 20)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--keep", action="store_true", help="keep the lab's files (node logs, agent logs, repos)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="emr-soak-"))
    try:
        result = measure(args.soak_hosts, args.soak_seconds, args.soak_rate, args.soak_mine_every,
                         args.soak_partition_every, args.soak_partition_seconds, args.scale_hosts,
                         args.scale_transactions, workdir)
    except SoakFailed as failed:
        result = failed.result
    if args.keep:
        log(f"files kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(result, indent=1, default=str)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    for row in result.get("goals", []):
        print(f"{row['name']}: {row['measured']} (goal: {row['goal']}; met: {row['met']})")
    ok = all(row["met"] is not False for row in result.get("goals", [])) and not result.get("errors")
    return 0 if ok and "skipped" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
