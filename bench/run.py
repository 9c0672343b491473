"""Measure emr-chain against the goals its issues set (#6 first, then #11 to #15) and write bench/results/
(results.json, results.md, latency.png).

    .venv/bin/python bench/run.py            # everything (under 20 minutes on 2 cores)
    .venv/bin/python bench/run.py --quick    # a smoke run of every item with small sizes (a few minutes)
    .venv/bin/python bench/run.py --items 1,2 --runs 50

It starts its own Kubo daemons (loopback-only repos, through scripts/cluster.py's Kubo) and node
processes on free 127.0.0.1 ports, and stops them all at the end. Items:
  1 fig5      latency of every function on the paper's 62.3 KB record (Fig. 5 again)
  2 overhead  create_hash and get_file against Kubo's own RPC
  3 load      add_transaction under 32 connections, beside /health and Flask's dev server
  4 pow       the node's proof of work against the paper's plain loop
  5 scale     get_file_hash among 100,000 records; get_chain and replace_chain up to 10,000 blocks
  6 size      a 1 GiB file through encryption, IPFS and back; throughput and peak memory
  7 attack    add_transaction and /health while hostile peers, slow heads and slow readers attack (bench/attack.py)
  8 crypto    crypto.py beside pyAesCrypt: speed on 256 MiB, peak memory on 1 GiB (bench/bench_crypto.py)
  9 signing   what signing costs: add_transaction, adopting a long chain, syncing on top of it (bench/signing.py)
 10 soak      across lab hosts (needs root): transactions with periodic partitions, and what grows with the
              number of hosts, on 3 and 6 (bench/soak.py)
 11 consent   opening a record with a grant vs the paper's password; the audit with 100,000 accesses
 12 persist   --persist with 100,000 records: add_transaction and a restart, on node processes (bench/persist.py)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, Cluster, Http, kubo_version, log  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BENCH_MAX_PEERS = 10_000
ITEMS = {"1": "fig5", "2": "overhead", "3": "load", "4": "pow", "5": "scale", "6": "size", "7": "attack", "8": "crypto",
         "9": "signing", "10": "soak", "11": "consent", "12": "persist"}
QUICK = {"runs": 8, "overhead_rounds": 10, "overhead_mib": 4, "load_seconds": 3.0, "load_rounds": 1, "pow_rounds": 2, "mine_blocks": 10,
         "files": 10_000, "lookups": 100, "scans": 10, "chain_sizes": [100, 300, 1000], "chain_gets": 3,
         "replace_nodes": 1, "big_mib": 64, "crypto_rounds": 1, "attack_seconds": 3.0, "attack_rounds": 1,
         "crypto_speed_mib": 32, "crypto_speed_rounds": 2, "crypto_memory_mib": 64,
         "sign_blocks": 1000, "sign_rounds": 1, "sign_load_seconds": 3.0,
         "consent_runs": 8, "audit_records": 2000, "audit_queries": 20,
         "soak_seconds": 40.0, "soak_partition_every": 18.0, "soak_partition_seconds": 6.0, "scale_hosts": [3],
         "scale_transactions": 5,
         "persist_records": 10_000, "persist_rounds": 8, "persist_restarts": 1}


@dataclass
class Context:
    args: argparse.Namespace
    workdir: Path
    cluster: Cluster
    wrk: bool
    kubo: Any = None
    fig5_node: Any = None
    connect_node: Any = None
    sample_cid: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--quick", action="store_true", help="small sizes and few runs: a smoke test of every item")
    parser.add_argument("--items", default=",".join(ITEMS), help="items to run, by number or name (default all)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for results.json, results.md, latency.png")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (node logs, Kubo repos)")
    g = parser.add_argument_group("1, 2: latency and overhead")
    g.add_argument("--runs", type=int, default=40, help="runs of the Fig. 5 workflow (default 40)")
    g.add_argument("--overhead-rounds", type=int, default=50, help="interleaved rounds node vs Kubo (default 50)")
    g.add_argument("--overhead-mib", type=int, default=16, help="a second, larger size for item 2 in MiB "
                                                               "(default 16; 0: none)")
    g = parser.add_argument_group("3: load")
    g.add_argument("--connections", type=int, default=32, help="concurrent keep-alive connections (default 32)")
    g.add_argument("--load-procs", type=int, default=1, help="load generator processes sharing them (default 1)")
    g.add_argument("--load-seconds", type=float, default=8.0, help="seconds per load run (default 8)")
    g.add_argument("--load-rounds", type=int, default=3, help="rounds of the four load runs (default 3)")
    g.add_argument("--no-wrk", action="store_true", help="use bench/loadgen.py even if wrk is on PATH")
    g.add_argument("--no-load-quiet", dest="load_quiet", action="store_false",
                   help="skip the third server (the waitress node at --log-level WARNING)")
    g = parser.add_argument_group("4: proof of work")
    g.add_argument("--pow-difficulty", type=int, default=5, help="difficulty for hashes/s (default 5)")
    g.add_argument("--pow-rounds", type=int, default=6, help="previous nonces searched (default 6)")
    g.add_argument("--rewrite-blocks", type=int, default=100,
                   help="how deep the measured rewrite of history reaches (default 100, the finality depth)")
    g.add_argument("--mine-blocks", type=int, default=40, help="consecutive difficulty-4 blocks per mining_workers "
                                                              "setting (default 40)")
    g = parser.add_argument_group("5: scale")
    g.add_argument("--files", type=int, default=100_000, help="records for the get_file_hash lookup (default 100000)")
    g.add_argument("--lookups", type=int, default=300, help="get_file_hash calls timed (default 300)")
    g.add_argument("--scans", type=int, default=40, help="linear scans timed (default 40)")
    g.add_argument("--chain-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 3000, 10_000],
                   help="chain lengths for get_chain and replace_chain (default 1000,3000,10000)")
    g.add_argument("--chain-tx", type=int, default=1, help="transactions per block of those chains (default 1)")
    g.add_argument("--chain-gets", type=int, default=5, help="get_chain calls per length (default 5)")
    g.add_argument("--replace-nodes", type=int, default=2, help="fresh nodes adopting each length (default 2)")
    g = parser.add_argument_group("6: size")
    g.add_argument("--big-mib", type=int, default=1024, help="size of the big file in MiB (default 1024)")
    g.add_argument("--crypto-rounds", type=int, default=2, help="crypto.py vs pyAesCrypt rounds (default 2)")
    g.add_argument("--no-big-upload", dest="big_upload", action="store_false",
                   help="skip the multipart upload of the big file to create_hash")
    import attack
    attack.add_arguments(parser.add_argument_group("7: hostile clients"))
    g = parser.add_argument_group("8: crypto")
    g.add_argument("--crypto-speed-mib", type=int, default=256, help="file for the speed rounds in MiB (default 256)")
    g.add_argument("--crypto-speed-rounds", type=int, default=8, help="interleaved speed rounds (default 8)")
    g.add_argument("--crypto-memory-mib", type=int, default=1024, help="file for the peak-memory round in MiB "
                                                                       "(default 1024)")
    import signing
    signing.add_arguments(parser.add_argument_group("9: signing"))
    import soak
    soak.add_arguments(parser.add_argument_group("10: across lab hosts"))
    import consent
    consent.add_arguments(parser.add_argument_group("11: consent"))
    g = parser.add_argument_group("12: --persist")
    g.add_argument("--persist-records", type=int, default=100_000, help="records in the persisted chain "
                                                                        "(default 100000)")
    g.add_argument("--persist-rounds", type=int, default=40, help="interleaved rounds of 25 add_transaction calls "
                                                                  "per node (default 40)")
    g.add_argument("--persist-restarts", type=int, default=3, help="restarts timed (default 3)")
    args = parser.parse_args(argv)
    if args.quick:  # the quick sizes, unless a flag says otherwise
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    chosen = []
    for item in args.items.split(","):
        item = item.strip()
        name = ITEMS.get(item, item)
        if name not in ITEMS.values():
            parser.error(f"unknown item {item!r}; choose from {', '.join(f'{k} {v}' for k, v in ITEMS.items())}")
        chosen.append(name)
    args.item_names = [name for name in ITEMS.values() if name in chosen]
    return args


def machine_info(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        git = f"{commit}{' + uncommitted changes' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        git = "unknown"
    memory = None
    try:
        memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(["bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
            "quick": args.quick, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "machine": platform.machine(), "python": platform.python_version(), "memory_bytes": memory,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()], "git": git,
            "packages": {p: version(p) for p in ("Flask", "waitress", "Werkzeug", "requests", "ipfshttpclient",
                                                 "pycryptodome", "pyAesCrypt", "matplotlib")}}


def setup(ctx: Context) -> None:
    """The shared Kubo, the Fig. 5 node, a node for connect_node, and the sample record's CID."""
    from common import write_sample_record
    log("starting Kubo and the nodes")
    ctx.kubo = ctx.cluster.kubo("main")
    ctx.fig5_node = ctx.cluster.node("fig5", ctx.kubo)
    # connect_node is timed to a new peer each run: more runs than max_peers (32) would be refused (409)
    ctx.connect_node = ctx.cluster.node("connect", ctx.kubo, max_peers=BENCH_MAX_PEERS)
    write_sample_record(ctx.fig5_node.data_dir / "MRI.pdf")
    api = Http(ctx.fig5_node.port)
    api.json("POST", "/encrypt_file", {"file_path": "MRI.pdf", "password": "bench-setup", "output_path": "MRI.pdf.aes",
                                       "overwrite": True})
    ctx.sample_cid = api.json("POST", "/create_hash", {"file_path": "MRI.pdf.aes"})["IPFS Hash"]["Hash"]


def run_item(name: str, ctx: Context) -> dict[str, Any]:
    if name == "fig5":
        import latency
        return latency.fig5(ctx)
    if name == "overhead":
        import latency
        return latency.overhead(ctx)
    if name == "load":
        import load
        return load.run(ctx)
    if name == "pow":
        import proof
        return proof.run(ctx)
    if name == "scale":
        import scale
        return scale.run(ctx)
    if name == "size":
        import size
        return size.run(ctx)
    if name == "attack":
        import attack
        return attack.run(ctx)
    if name == "crypto":
        import bench_crypto
        return bench_crypto.run(ctx)
    if name == "signing":
        import signing
        return signing.run(ctx)
    if name == "soak":
        import soak
        return soak.run(ctx)
    if name == "consent":
        import consent
        return consent.run(ctx)
    if name == "persist":
        import persist
        return persist.run(ctx)
    raise ValueError(name)


def save(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = (RESULTS / "tmp" / f"run-{stamp}-{os.getpid()}").resolve()
    workdir.mkdir(parents=True)
    wrk = not args.no_wrk and shutil.which("wrk") is not None
    ctx = Context(args, workdir, Cluster(workdir), wrk)
    results: dict[str, Any] = {"meta": machine_info(args, argv), "options": {k: v for k, v in vars(args).items()
                                                                            if k != "out"},
                               "items": {}, "goals": [], "errors": {}, "item_seconds": {}}
    log(f"free disk {shutil.disk_usage(workdir).free / 1e9:.0f} GB in {workdir}; items: {', '.join(args.item_names)}")
    try:
        setup(ctx)
        results["meta"]["kubo_version"] = kubo_version(ctx.kubo)
        for name in args.item_names:
            started = time.perf_counter()
            load_before = [round(x, 2) for x in os.getloadavg()]
            try:
                results["items"][name] = run_item(name, ctx)
                results["goals"] += results["items"][name].get("goals", [])
            except Exception as exc:
                log(f"item {name} failed: {type(exc).__name__}: {exc}")
                results["errors"][name] = f"{type(exc).__name__}: {exc}"
                results.setdefault("tracebacks", {})[name] = traceback.format_exc()
            results["item_seconds"][name] = time.perf_counter() - started
            results.setdefault("item_loadavg", {})[name] = {"before": load_before,
                                                           "after": [round(x, 2) for x in os.getloadavg()]}
            log(f"item {name} took {results['item_seconds'][name]:.0f} s")
            results["wall_seconds"] = time.perf_counter() - began
            save(results, args.out)
    finally:
        ctx.cluster.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
            try:
                workdir.parent.rmdir()  # bench/results/tmp, if nothing else is in it
            except OSError:
                pass
    results["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_seconds"] = time.perf_counter() - began
    import report
    report.write(results, args.out)
    save(results, args.out)
    met = sum(1 for goal in results["goals"] if goal["met"])
    judged = sum(1 for goal in results["goals"] if goal["met"] is not None)  # the others are reported only
    log(f"done in {results['wall_seconds'] / 60:.1f} min: {met}/{judged} goals met; "
        f"{len(results['errors'])} item(s) failed; results in {args.out}")
    print((args.out / "results.md").read_text())
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
