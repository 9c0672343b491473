"""Item 3: add_transaction under 32 concurrent connections, beside /health and beside Flask's dev server.

The load comes from bench/loadgen.py in separate processes (never the server's own).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common import DevServer, Http, cpu_seconds, interleaved, log, quantile, summarize

LOADGEN = Path(__file__).resolve().parent / "loadgen.py"
RATE_GOAL = 0.70
PAPER_CID = "QmbWxSqxhZms74885xceSaiHVvdjqiVWrATtYUrrUnVE1K"
TX_BODY = json.dumps({"user_id": "xxxxx", "ipfs_hash": PAPER_CID, "EHR_name": "MRI"})


def generate_load(ctx: Any, port: int, path: str, *, method: str = "GET", body: str | None = None,
                  seconds: float | None = None, count: int | None = None, collect_ids: bool = False,
                  tag: str = "load") -> dict[str, Any]:
    """Run the load generator(s) against one server; merged result with latency percentiles in ms.

    With `wrk` on PATH and no ids to collect, wrk runs instead (same connections and duration).
    """
    connections, procs = ctx.args.connections, max(1, ctx.args.load_procs)
    if ctx.wrk and seconds is not None and count is None:
        return _wrk(ctx, port, path, method, body, seconds, connections)
    scratch = ctx.workdir / "load"
    scratch.mkdir(parents=True, exist_ok=True)
    start_at = time.time() + 1.0  # every generator connects first, then all start together
    launched = []
    for number in range(procs):
        share = connections // procs + (1 if number < connections % procs else 0)
        share_count = None if count is None else count // procs + (1 if number < count % procs else 0)
        spec = {"port": port, "method": method, "path": path, "body": body, "connections": share,
                "seconds": seconds, "count": share_count, "start_at": start_at, "collect_ids": collect_ids,
                "timeout": 60}
        if share_count is not None and body is not None and "{i}" in body:
            spec["body"] = body.replace("{i}", f"{number}-{{i}}")  # unique numbers across generators
        spec_path, out_path = scratch / f"{tag}-{number}.spec.json", scratch / f"{tag}-{number}.out.json"
        spec_path.write_text(json.dumps(spec))
        launched.append((subprocess.Popen([sys.executable, str(LOADGEN), str(spec_path), str(out_path)]),
                         out_path))
    parts = []
    limit = (seconds or 0) + 600
    for process, out_path in launched:
        try:
            process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise RuntimeError("the load generator did not finish in time")
        if process.returncode:
            raise RuntimeError(f"the load generator failed ({process.returncode})")
        parts.append(json.loads(out_path.read_text()))
        out_path.unlink()
    latencies = sorted(value for part in parts for value in part["latencies"])
    elapsed = max(part["elapsed"] for part in parts)
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for part in parts:
        statuses.update(part["statuses"])
        errors.update(part["errors"])
    requests = len(latencies)
    return {"tool": "bench/loadgen.py", "generators": procs, "connections": connections, "elapsed_s": elapsed,
            "requests": requests, "rate": requests / elapsed if elapsed else 0.0,
            "statuses": dict(statuses), "errors": dict(errors),
            "latency_ms": {"median": quantile(latencies, 0.5) * 1000, "p95": quantile(latencies, 0.95) * 1000,
                           "p99": quantile(latencies, 0.99) * 1000, "max": latencies[-1] * 1000 if latencies else None},
            "client_cpu_s": sum(part["cpu_seconds"] for part in parts),
            "ok": sum(count for status, count in statuses.items() if status.startswith("2")),
            "ids": [i for part in parts for i in part["ids"]]}


def _wrk(ctx: Any, port: int, path: str, method: str, body: str | None, seconds: float,
         connections: int) -> dict[str, Any]:
    script = ctx.workdir / "load" / "wrk.lua"
    script.parent.mkdir(parents=True, exist_ok=True)
    lines = [f'wrk.method = "{method}"']
    if body is not None:
        lines += [f"wrk.body = {json.dumps(body)}", 'wrk.headers["Content-Type"] = "application/json"']
    lines += ["done = function(summary, latency, requests)",
              '  io.write(string.format("BENCH %d %d %d %f %f %f %f\\n", summary.requests, summary.duration,',
              "    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status"
              " + summary.errors.timeout,",
              "    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))",
              "end"]
    script.write_text("\n".join(lines) + "\n")
    threads = min(connections, 2)
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s", "-s", str(script),
                          f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, timeout=seconds + 120)
    line = next(l for l in out.stdout.splitlines() if l.startswith("BENCH "))
    requests, duration_us, errors, p50, p95, p99, top = line.split()[1:]
    elapsed = int(duration_us) / 1e6
    return {"tool": "wrk", "connections": connections, "elapsed_s": elapsed, "requests": int(requests),
            "rate": int(requests) / elapsed, "statuses": {}, "errors": {"wrk": int(errors)} if int(errors) else {},
            "latency_ms": {"median": float(p50) / 1000, "p95": float(p95) / 1000, "p99": float(p99) / 1000,
                           "max": float(top) / 1000}, "client_cpu_s": None,
            "ok": int(requests) - int(errors), "ids": []}


def mine_all(api: Http) -> tuple[int, float]:
    """Mine until nothing is pending; (blocks, seconds)."""
    started, blocks = time.perf_counter(), 0
    while api.json("GET", "/health")["pending"]:
        api.json("GET", "/mine_block")
        blocks += 1
    return blocks, time.perf_counter() - started


def health_latency(api: Http, calls: int) -> dict[str, Any]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        api.json("GET", "/health")
        samples.append(time.perf_counter() - started)
    return summarize(samples, 1000)


def run(ctx: Any) -> dict[str, Any]:
    args = ctx.args
    log("item 3: starting the waitress node and the Flask dev server for the load test")
    servers = {"waitress": ctx.cluster.node("load-waitress", ctx.kubo),
               "flask-dev": ctx.cluster.dev_server("load-flask-dev", ctx.kubo)}
    if args.load_quiet:  # the same node without its per-request INFO log line: what that line costs
        servers["waitress-log-warning"] = ctx.cluster.node("load-waitress-quiet", ctx.kubo, log_level="WARNING")
    apis = {name: Http(server.port) for name, server in servers.items()}
    targets = {"health": ("GET", "/health", None), "add_transaction": ("POST", "/add_transaction", TX_BODY)}
    configs = [f"{server}/{target}" for server in servers for target in targets]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    acknowledged: dict[str, list[str]] = {name: [] for name in servers}
    acknowledged_count: dict[str, int] = {name: 0 for name in servers}
    losses: dict[str, int] = {name: 0 for name in servers}
    health_with_pending: list[dict[str, Any]] = []
    mining: list[dict[str, Any]] = []
    log(f"item 3: {args.load_rounds} rounds x {len(configs)} runs of {args.load_seconds:g} s, "
        f"{args.connections} connections")
    for round_number, config in interleaved(configs, args.load_rounds):
        server_name, target = config.split("/")
        method, path, body = targets[target]
        server = servers[server_name]
        cpu_before = cpu_seconds(server.pid)
        result = generate_load(ctx, server.port, path, method=method, body=body, seconds=args.load_seconds,
                               collect_ids=target == "add_transaction", tag=config.replace("/", "-"))
        cpu_after = cpu_seconds(server.pid)
        ids = result.pop("ids")
        result["round"] = round_number
        result["server_cpu_s"] = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
        bad = sum(count for status, count in result["statuses"].items() if not status.startswith("2"))
        result["failed"] = bad + sum(result["errors"].values())
        losses[server_name] += result["failed"]
        if target == "add_transaction":
            acknowledged[server_name].extend(ids)
            acknowledged_count[server_name] += result["ok"]
            pending = apis[server_name].json("GET", "/health")["pending"]
            if server_name == "waitress":  # /health copies the pending list: how much that costs
                health_with_pending.append({"pending": pending, **health_latency(apis[server_name], 100)})
            blocks, seconds = mine_all(apis[server_name])
            mining.append({"server": server_name, "transactions": pending, "blocks": blocks, "seconds": seconds})
            if server_name == "waitress":
                health_with_pending.append({"pending": 0, **health_latency(apis[server_name], 100)})
        runs[config].append(result)
        log(f"  {config}: {result['rate']:.0f} req/s, p99 {result['latency_ms']['p99']:.1f} ms, "
            f"failed {result['failed']}")

    checks = {}
    for server_name, api in apis.items():
        chain = api.json("GET", "/get_chain")["chain"]
        seen = Counter(tx["id"] for block in chain for tx in block["transactions"])
        ids = acknowledged[server_name]
        if ids or not ctx.wrk:  # every acknowledged id, looked up one by one
            missing = sum(1 for i in ids if seen[i] == 0)
            repeated = sum(1 for i in ids if seen[i] > 1)
            once = sum(1 for i in ids if seen[i] == 1)
            count = len(ids)
        else:  # wrk does not show answers: count instead (every load transaction is distinct by id)
            count = acknowledged_count[server_name]
            once = sum(1 for n in seen.values() if n == 1)
            missing = max(0, count - sum(seen.values()))
            repeated = sum(1 for n in seen.values() if n > 1)
        checks[server_name] = {"acknowledged": count, "distinct_acknowledged": len(set(ids)) if ids else None,
                               "in_chain_once": once, "missing": missing,
                               "repeated": repeated, "transactions_in_chain": sum(seen.values()),
                               "failed_requests": losses[server_name]}

    def rates(config: str) -> list[float]:
        return [r["rate"] for r in runs[config]]

    summary = {config: {"rate_median": summarize(rates(config))["median"], "rate": summarize(rates(config)),
                        "p99_ms_median": summarize(r["latency_ms"]["p99"] for r in runs[config])["median"],
                        "median_ms_median": summarize(r["latency_ms"]["median"] for r in runs[config])["median"],
                        "server_cpu_ms_per_request": summarize(
                            1000 * r["server_cpu_s"] / r["requests"] for r in runs[config]
                            if r["server_cpu_s"] is not None and r["requests"])["median"],
                        "client_cpu_share": summarize(
                            r["client_cpu_s"] / r["elapsed_s"] for r in runs[config]
                            if r["client_cpu_s"] is not None)["median"]}
               for config in configs}
    goals = []
    for server_name in servers:
        per_round = [a["rate"] / h["rate"] for a, h in zip(runs[f"{server_name}/add_transaction"],
                                                           runs[f"{server_name}/health"])]
        share = summarize(per_round)["median"]
        summary[f"{server_name}/add_transaction share of health"] = {"per_round": per_round, "median": share}
        if server_name == "waitress":
            met = share >= RATE_GOAL
            goals.append({"item": "3", "name": "add_transaction rate vs GET /health (waitress, 32 connections)",
                          "goal": f">= {RATE_GOAL:.0%} of /health's requests/s",
                          "measured": f"{share:.0%} ({summary['waitress/add_transaction']['rate_median']:.0f} vs "
                                      f"{summary['waitress/health']['rate_median']:.0f} req/s; add_transaction p99 "
                                      f"{summary['waitress/add_transaction']['p99_ms_median']:.1f} ms)",
                          "met": met, "miss": None if met else f"by {RATE_GOAL - share:.0%} points"})
    for server_name, check in checks.items():
        met = check["missing"] == 0 and check["repeated"] == 0 and check["failed_requests"] == 0
        goals.append({"item": "3", "name": f"no request lost ({server_name})",
                      "goal": "every 201-acknowledged transaction in the chain exactly once; no failed request",
                      "measured": f"{check['in_chain_once']}/{check['acknowledged']} exactly once, "
                                  f"{check['missing']} missing, {check['repeated']} repeated, "
                                  f"{check['failed_requests']} failed requests",
                      "met": met, "miss": None if met else "transactions lost, repeated or requests failed"})
    wait_vs_dev = summary["waitress/add_transaction"]["rate_median"] / summary["flask-dev/add_transaction"]["rate_median"]
    quiet = {}
    if "waitress-log-warning" in servers:
        for target in targets:
            loud = summary[f"waitress/{target}"]
            silent = summary[f"waitress-log-warning/{target}"]
            quiet[target] = {"rate_gain": silent["rate_median"] / loud["rate_median"] - 1,
                             "cpu_ms_saved_per_request": (loud["server_cpu_ms_per_request"] or 0)
                             - (silent["server_cpu_ms_per_request"] or 0)}
    for server in servers.values():
        if isinstance(server, DevServer):
            ctx.cluster.stop_process(server.process)
        else:
            ctx.cluster.stop_node(server)
    return {"seconds_per_run": args.load_seconds, "rounds": args.load_rounds, "connections": args.connections,
            "tool": "wrk" if ctx.wrk else f"bench/loadgen.py ({args.load_procs} process(es), http.client keep-alive)",
            "runs": runs, "summary": summary, "no_loss_checks": checks, "mining_after_load": mining,
            "health_latency_vs_pending": health_with_pending,
            "waitress_vs_flask_dev_add_transaction": wait_vs_dev, "log_warning_vs_info": quiet, "goals": goals,
            "notes": ["Closed loop: each connection sends its next request when the answer arrives.",
                      "After each add_transaction run the node mines until nothing is pending, so every /health run "
                      "starts with an empty pending list.",
                      "waitress-log-warning: the same node started with --log-level WARNING, so it does not write "
                      "its INFO line per request (app.py log_request)."]}


__all__ = ["run", "generate_load", "mine_all"]
