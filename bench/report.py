"""results.md (Markdown tables, ready for the README) and latency.png (Fig. 5 again) from results.json."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from common import log


def _ms(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    try:
        return f"{value:.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def _latency_rows(table: dict[str, dict[str, Any]], names: list[str] | None = None) -> list[str]:
    rows = ["| function | median ms | p95 ms | mean ms | min ms | max ms | IQR ms | runs |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names or list(table):
        s = table[name]
        rows.append(f"| {name} | {_ms(s['median'])} | {_ms(s['p95'])} | {_ms(s['mean'])} | {_ms(s['min'])} | "
                    f"{_ms(s['max'])} | {_ms(s['q1'])}-{_ms(s['q3'])} | {s['n']} |")
    return rows


def goals_table(goals: list[dict[str, Any]]) -> list[str]:
    rows = ["| item | what | goal | measured | met |", "|---|---|---|---|---|"]
    for goal in goals:
        verdict = ("reported" if goal["met"] is None else "met" if goal["met"]
                   else f"**not met** ({goal.get('miss') or 'missed'})")
        rows.append(f"| {goal['item']} | {goal['name']} | {goal['goal']} | {goal['measured']} | {verdict} |")
    return rows


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    items = results["items"]
    out = ["# emr-chain benchmark", "",
           f"`{meta['command']}` on {meta['date']}: {meta['cpu_count']} CPUs, {meta['platform']}, Python {meta['python']}, "
           f"Kubo {meta['kubo_version']}, commit {meta['git']}. Wall time {results['wall_seconds'] / 60:.1f} min"
           f"{' (quick mode: small sizes, few runs)' if meta['quick'] else ''}. Load average at start "
           f"{meta['loadavg_start']}, at end {meta.get('loadavg_end', '-')}.", "",
           "Both sides of every comparison run in the same process set, interleaved round by round, so ratios hold "
           "on a busy machine. Latencies are client wall time over a keep-alive connection; MB = 10^6 bytes.", "",
           "## Goals", ""]
    out += goals_table(results["goals"])
    if results.get("item_seconds"):
        out += ["", "| item | seconds | load average (1 min) before -> after |", "|---|---:|---|"]
        for name, seconds in results["item_seconds"].items():
            load = results.get("item_loadavg", {}).get(name, {})
            out.append(f"| {name} | {seconds:.0f} | {load.get('before', ['-'])[0]} -> {load.get('after', ['-'])[0]} |")
    if results.get("errors"):
        out += ["", "Items that failed to run:", ""] + [f"- item {k}: {v}" for k, v in results["errors"].items()]

    if "fig5" in items:
        r = items["fig5"]
        out += ["", f"## 1. Latency per function (Fig. 5 again), {r['file_bytes']:,}-byte record, {r['runs']} runs", "",
                "![latency per function](latency.png)", ""]
        out += _latency_rows(r["latency_ms"])
        first = r["first_call_ms"]
        out += ["", f"First (warm-up) run, not counted: mine_block {_ms(first.get('mine_block'), 0)} ms (starts the "
                    f"mining processes), create_hash {_ms(first.get('create_hash'), 1)} ms.",
                "", *[f"- {n}" for n in r["notes"]]]
    if "overhead" in items:
        r = items["overhead"]
        for size in r["sizes"]:
            out += ["", f"## 2. Node overhead over Kubo's RPC, {size['file_bytes']:,} bytes ({size['label']}), "
                        f"{size['rounds']} interleaved rounds", ""]
            out += _latency_rows(size["latency_ms"])
            out += ["", "| node call | direct RPC | overhead (ratio of medians) | paired overhead, median (IQR) | "
                        "added ms | node CPU ms a call | Kubo CPU ms a call (its own call) |",
                    "|---|---|---:|---:|---:|---:|---:|"]
            for c in size["comparisons"]:
                p = c["paired_overhead"]
                node_cpu, direct_cpu = c.get("cpu_ms", {}), c.get("direct_cpu_ms", {})
                out.append(f"| {c['node']} | {c['direct']} | {c['overhead']:+.0%} | {p['median']:+.0%} "
                           f"({p['q1']:+.0%}..{p['q3']:+.0%}) | {c['added_ms']:.2f} | {_ms(node_cpu.get('node'), 1)} | "
                           f"{_ms(node_cpu.get('kubo'), 1)} ({_ms(direct_cpu.get('kubo'), 1)}) |")
            if "GET /health (floor)" in size["latency_ms"]:
                floor = size["latency_ms"]["GET /health (floor)"]["median"]
                out += ["", f"Floor of a download (Kubo's cat + GET /health): "
                            f"{size['latency_ms']['kubo cat (RPC)']['median'] + floor:.2f} ms."]
        b = r.get("breakdown", {})
        if "latency_ms" in b:
            out += ["", "Where the time goes (the node's own modules, timed in the bench process):", ""]
            out += ["| step | median ms | p95 ms |", "|---|---:|---:|"]
            out += [f"| {name} | {_ms(s['median'])} | {_ms(s['p95'])} |" for name, s in b["latency_ms"].items()]
        elif b:
            out += ["", f"(breakdown not measured: {b.get('error')})"]
    if "load" in items:
        r = items["load"]
        out += ["", f"## 3. Load: {r['connections']} connections, {r['rounds']} x {r['seconds_per_run']:g} s per "
                    f"configuration ({r['tool']})", "",
                "| server / endpoint | req/s median (min-max) | median ms | p99 ms | server CPU ms/request | "
                "load generator CPU share | failed |", "|---|---:|---:|---:|---:|---:|---:|"]
        for config, s in r["summary"].items():
            if "rate" not in s:
                continue
            failed = sum(run["failed"] for run in r["runs"][config])
            out.append(f"| {config} | {s['rate']['median']:.0f} ({s['rate']['min']:.0f}-{s['rate']['max']:.0f}) | "
                       f"{_ms(s['median_ms_median'], 1)} | {_ms(s['p99_ms_median'], 1)} | "
                       f"{_ms(s['server_cpu_ms_per_request'], 2)} | {_ms(s['client_cpu_share'], 2)} | {failed} |")
        share_w = r["summary"].get("waitress/add_transaction share of health", {})
        share_d = r["summary"].get("flask-dev/add_transaction share of health", {})
        out += ["", f"add_transaction as a share of /health: waitress {share_w.get('median', 0):.0%}, Flask dev server "
                    f"{share_d.get('median', 0):.0%}; waitress / dev server for add_transaction: "
                    f"{r['waitress_vs_flask_dev_add_transaction']:.2f}x."
                    + "".join(f" Without the per-request INFO log line, {target} runs {q['rate_gain']:+.0%} faster "
                              f"({q['cpu_ms_saved_per_request']:.2f} ms less server CPU a request)."
                              for target, q in r.get("log_warning_vs_info", {}).items()), "",
                "| server | acknowledged (201) | in chain exactly once | missing | repeated | failed requests |",
                "|---|---:|---:|---:|---:|---:|"]
        for name, c in r["no_loss_checks"].items():
            out.append(f"| {name} | {c['acknowledged']} | {c['in_chain_once']} | {c['missing']} | {c['repeated']} | "
                       f"{c['failed_requests']} |")
        if r.get("health_latency_vs_pending"):
            out += ["", "GET /health, 100 sequential calls, with the pending transactions a load run left vs after "
                        "mining them:", "", "| pending | median ms | p95 ms |", "|---:|---:|---:|"]
            out += [f"| {h['pending']} | {_ms(h['median'])} | {_ms(h['p95'])} |" for h in r["health_latency_vs_pending"]]
    if "pow" in items:
        r = items["pow"]
        out += ["", f"## 4. Proof of work, difficulty {r['difficulty']} (process pool start {r['pool_start_s']:.2f} s, "
                    "not counted)", "",
                "| previous nonce | nonce | node s (2 processes) | plain loop s | node, 1 process s | speedup | "
                "pool CPU s | same nonce |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for row in r["rounds"]:
            out.append(f"| {row['previous_nonce']} | {row['node_nonce']} | {row['node_s']:.2f} | {row['plain_s']:.2f} | "
                       f"{row['node-1-process_s']:.2f} | {row['speedup']:.2f} | {row['node_pool_cpu_s']:.2f} | "
                       f"{'yes' if row['same_nonce'] else 'NO'} |")
        out += ["", "| search | M hashes/s |", "|---|---:|"]
        out += [f"| {name} | {rate / 1e6:.2f} |" for name, rate in r["hashes_per_s"].items()]
        rates = r["hashes_per_s"]
        out += ["", f"Of the {r['speedup']:.2f}x: the node's search loop alone (1 process) is "
                    f"{rates['node search, 1 process'] / rates['paper plain loop']:.2f}x the paper's loop, and its 2 "
                    f"processes are {rates['node (mining_workers=2)'] / rates['node search, 1 process']:.2f}x its 1."]
        out += ["", "mine_block at difficulty 4, consecutive blocks (in-process):", ""]
        out += _latency_rows(r["mine_block_difficulty_4_ms"])
    if "scale" in items:
        r = items["scale"]
        f = r["files"]
        out += ["", "## 5. Scale", "", f"{f['files']:,} records added in {f['build']['post_s']:.1f} s "
                    f"({f['build']['post_rate']:.0f}/s over 32 connections), mined into {f['build']['blocks']} blocks in "
                    f"{f['build']['mine_s']:.1f} s; that chain's get_chain: {f['get_chain_bytes'] / 1e6:.1f} MB in "
                    f"{f['get_chain_s'] * 1000:.0f} ms.", "",
                "| lookup | median ms | p95 ms | min ms | max ms | n |", "|---|---:|---:|---:|---:|---:|"]
        for name, s in ((f"get_file_hash, {f['files']:,} files (node, HTTP)", f["lookup_ms"]),
                        (f"get_file_hash, {f.get('small_files', 0):,} files (node, HTTP), interleaved",
                         f.get("lookup_small_ms", {"n": 0})),
                        (f"linear scan of the {f['files']:,}-file chain (in-process)", f["linear_scan_ms"])):
            if not s.get("n"):
                continue
            out.append(f"| {name} | {_ms(s['median'])} | {_ms(s['p95'])} | {_ms(s['min'])} | {_ms(s['max'])} | {s['n']} |")
        c = r["chains"]
        out += ["", f"Chains at difficulty 1, {c['transactions_per_block']} transaction(s) a block:", "",
                "| blocks | build s | get_chain median ms (p95) | get_chain MB | replace_chain median ms (max) | "
                "replace_chain MB | replace_chain again ms |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for row in c["sizes"]:
            out.append(f"| {row['blocks']:,} | {row['build_s']:.1f} | {row['get_chain']['median']:.1f} "
                       f"({row['get_chain']['p95']:.1f}) | {row['get_chain_bytes'] / 1e6:.2f} | "
                       f"{row['replace_chain']['median']:.0f} ({row['replace_chain']['max']:.0f}) | "
                       f"{row['replace_chain_bytes'] / 1e6:.2f} | {row['replace_chain_again']['median']:.0f} |")
        out += ["", "| growth, smallest to largest chain | time ratio | bytes ratio | fitted exponent (1 = linear) | "
                    "ms per 1,000 blocks |", "|---|---:|---:|---:|---:|"]
        out += [f"| {name} | {g['time_ratio']:.1f} | {g['bytes_ratio']:.1f} | {g['exponent']:.2f} | "
                f"{g['ms_per_1000_blocks']:.1f} |" for name, g in c["growth"].items()]
        out += ["", *[f"- {n}" for n in r["notes"]]]
    if "persist" in items:
        r = items["persist"]
        b = r["built"]
        out += ["", f"## 12. --persist with {r['records']:,} records", "",
                f"Chain: {b['blocks']:,} blocks ({b['records']:,} records) mined at difficulty {b['difficulty']} in "
                f"{b['mine_s']:.1f} s, a store of {b['store_bytes'] / 1e6:.1f} MB; the node's first start on it took "
                f"{r['first_start_s']:.2f} s.", "",
                f"add_transaction over HTTP, {r['rounds']} interleaved rounds of {r['per_round']} calls per node:", ""]
        out += _latency_rows(r["add_transaction_ms"])
        out += ["", "| restart | median s | runs (s) |", "|---|---:|---|"]
        for name, values in r["restarts_s"].items():
            ordered = sorted(values)
            out.append(f"| {name} | {ordered[len(ordered) // 2]:.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
        out += ["", "A restore, step by step (the node's own code, in the bench process, median):", "",
                "| step | s |", "|---|---:|"]
        out += [f"| {name} | {seconds:.3f} |" for name, seconds in r["restore_parts_s"].items()]
        a = r["store_alone"]
        out += ["", f"The store alone ({a['records']:,} records, built in {a['build_s']:.1f} s): add_pending "
                    f"{a['add_pending_ms']['with_records']['median']:.2f} ms median with the records vs "
                    f"{a['add_pending_ms']['empty']['median']:.2f} ms empty; open + load() "
                    f"{a['load']['total_s']:.2f} s; a raw fsync {a['fsync_ms']['median']:.2f} ms.", "",
                *[f"- {n}" for n in r["notes"]]]
    if "size" in items:
        r = items["size"]
        if "skipped" in r:
            out += ["", f"## 6. Size: skipped ({r['skipped']})"]
        else:
            out += ["", f"## 6. Size: a {r['size_mib']} MiB file", "",
                    "| step | seconds | MB/s | node peak RSS MB | Kubo peak RSS MB |", "|---|---:|---:|---:|---:|"]
            for name, s in r["steps"].items():
                out.append(f"| {name} | {s['seconds']:.1f} | {s['mb_per_s']:.0f} | {s['node_peak_rss_mb']:.0f} | "
                           f"{s['kubo_peak_rss_mb']:.0f} |")
            out += ["", f"Encryption alone, a fresh process per operation, {r['crypto_rounds']} round(s) "
                        f"(bench/bench_crypto.py workers):", "",
                    "| operation | median s | MB/s | peak RSS MB |", "|---|---:|---:|---:|"]
            for name, s in r["crypto"].items():
                speed = f"{s['median_mb_per_s']:.0f}" if s.get("median_mb_per_s") else "-"
                out.append(f"| {name} | {s['median_s']:.2f} | {speed} | {s['peak_rss_mb_max']:.0f} |")
            out += ["", f"crypto.py encrypts at {r['encrypt_speed_vs_pyaescrypt']:.2f}x pyAesCrypt's speed.", "",
                    *[f"- {n}" for n in r["notes"]]]
    if "soak" in items:
        out += soak_section(items["soak"])
    return "\n".join(out) + "\n"


def soak_section(r: dict[str, Any]) -> list[str]:
    if "skipped" in r:
        return ["", f"## 10. Across lab hosts: skipped ({r['skipped']})"]
    out = ["", "## 10. Across lab hosts (network namespaces, a node and a Kubo on each)"]
    s = r.get("soak")
    if s:
        c, lag = s["converge_s"], s["pin_lag"]["seconds"]
        out += ["", f"Soak: {s['hosts']} hosts, {s['seconds']:.0f} s, {s['rate_per_s']:g} records/s in all (each "
                    f"added to IPFS and recorded by its host's own client), mining every ~{s['mine_every_s']:g} s on "
                    f"each host, a host cut off for {s['partition_s']:g} s every {s['partition_every_s']:g} s.", "",
                "| acknowledged | committed | lost | twice | chain | blocks mined (forked away) | heals | "
                "converged after heal, median / max s | pin lag median / p95 / max s |",
                "|---:|---:|---:|---:|---:|---:|---:|---|---|",
                f"| {s['acknowledged']} | {s['committed']} | {s['lost']} | {s['duplicated']} | {s['chain_length']} | "
                f"{s['blocks_mined']} ({s['forked_away']}) | {len(s['partitions'])} | "
                f"{_ms(c.get('median'), 1)} / {_ms(c.get('max'), 1)} | "
                f"{_ms(lag.get('median'), 1)} / {_ms(lag.get('p95'), 1)} / {_ms(lag.get('max'), 1)} |"]
    if r.get("scale"):
        out += ["", "What grows with the number of hosts (quiet network, requests counted in the nodes' logs):", "",
                "| hosts | gossip requests a transaction ((N-1)^2) | a block | sync requests/s idle | "
                "pins a record | pin lag median / max s | chain bytes a node | in all |",
                "|---:|---:|---:|---:|---:|---|---:|---:|"]
        for row in r["scale"]:
            lag = row["pin_lag"]["seconds"]
            out.append(f"| {row['hosts']} | {row['gossip_requests_per_transaction']:.1f} "
                       f"({row['expected_per_transaction']}) | {row['gossip_requests_per_block']:.1f} | "
                       f"{row['idle_sync_requests_per_s']:.2f} | {row['pins_per_record']:.0f} | "
                       f"{_ms(lag.get('median'), 2)} / {_ms(lag.get('max'), 2)} | {row['chain_bytes_per_node']:,} | "
                       f"{row['chain_bytes_all_nodes']:,} |")
    return out


def chart(results: dict[str, Any], path: Path) -> str | None:
    """Fig. 5 again: a bar per function (median), whisker to p95. Returns why not, if it cannot."""
    fig5 = results["items"].get("fig5")
    if not fig5:
        return "item 1 was not run"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    table = fig5["latency_ms"]
    names = [name for name in ("create_hash", "add_transaction", "mine_block", "connect_node", "get_chain",
                               "get_file_hash", "get_file", "encrypt_file", "decrypt_file") if name in table]
    medians = [table[n]["median"] for n in names]
    upper = [max(0.0, table[n]["p95"] - table[n]["median"]) for n in names]
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=120)
    colors = ["#4472c4" if n not in ("encrypt_file", "decrypt_file") else "#a5a5a5" for n in names]
    bars = ax.bar(names, medians, color=colors, yerr=[[0] * len(names), upper], capsize=4, ecolor="#333333")
    for bar, value, name in zip(bars, medians, names):
        ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, max(value, table[name]["p95"])),
                    textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    ax.margins(y=0.15)
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms (log scale)")
    ax.set_xlabel("function")
    ax.set_title(f"Latency per function, {fig5['file_bytes']:,}-byte MRI report (62.3 KB), {fig5['runs']} runs\n"
                 "bar: median, whisker: p95; grey: encryption steps the paper ran outside the node", fontsize=10)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def write(results: dict[str, Any], directory: Path) -> None:
    why_not = chart(results, directory / "latency.png")
    if why_not:
        log(f"latency.png not written: {why_not}")
        results.setdefault("meta", {})["chart"] = f"not written: {why_not}"
    (directory / "results.md").write_text(markdown(results))
