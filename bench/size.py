"""Item 6: a big file (1 GiB by default) through encrypt_file, create_hash, get_file and decrypt_file.

Throughput of each, and the peak RSS (VmHWM, reset before each step) of the node process and
of Kubo separately; encryption side by side with pyAesCrypt (bench/bench_crypto.py's workers:
a fresh interpreter per operation, so its peak RSS is that operation's alone).
"""
from __future__ import annotations

import json
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import bench_crypto
from common import MB, MIB, Http, PeakWatch, kubo_pid, log

NODE_PEAK_GOAL = 150 * MB
CRYPTO_PEAK_GOAL = 100 * MB
GOAL_SIZE_MIB = 1024
# source, its .aes, the download, the decrypted copy and Kubo's blocks, plus room to spare
DISK_FACTOR = 6


def multipart_stream(path: Path, boundary: str) -> tuple[Iterator[bytes], int]:
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        yield head
        with open(path, "rb") as handle:
            while chunk := handle.read(MIB):
                yield chunk
        yield tail
    return chunks(), len(head) + path.stat().st_size + len(tail)


def run(ctx: Any) -> dict[str, Any]:
    args = ctx.args
    size = args.big_mib * MIB
    free = shutil.disk_usage(ctx.workdir).free
    if free < DISK_FACTOR * size + 2 * 1024 * MIB:
        return {"skipped": f"{free / 1e9:.1f} GB free on {ctx.workdir}, need {DISK_FACTOR * size / 1e9:.1f} GB + 2 GB",
                "goals": [{"item": "6", "name": "big file", "goal": "run", "measured": "skipped: not enough disk",
                           "met": False, "miss": "not measured"}]}
    log(f"item 6: a {args.big_mib} MiB file ({free / 1e9:.0f} GB free before); its own Kubo and node")
    kubo = ctx.cluster.kubo("big")
    node = ctx.cluster.node("big", kubo)
    api = Http(node.port, timeout=3600)
    pids = {"node": node.pid, "kubo": kubo_pid(kubo)}
    data_dir: Path = node.data_dir
    source = data_dir / "big.bin"
    password = secrets.token_urlsafe(16)
    steps: dict[str, dict[str, Any]] = {}
    disk_peak = [0]

    def step(name: str, method: str, path: str, body: Any = None, *, stream: bool = False,
             raw: tuple[Iterator[bytes], dict[str, str]] | None = None) -> Any:
        with PeakWatch({k: v for k, v in pids.items() if v}) as watch:
            started = time.perf_counter()
            if raw is not None:
                status, answer = api.request(method, path, raw[0], raw[1])  # type: ignore[arg-type]
                result = json.loads(answer) if status == 200 else answer
            elif stream:
                status, result = api.request(method, path, sink=True)
            else:
                status, result = 200, api.json(method, path, body)
            seconds = time.perf_counter() - started
        if status != 200:
            raise RuntimeError(f"{name} answered {status}: {str(result)[:300]}")
        steps[name] = {"seconds": seconds, "mb_per_s": size / MB / seconds,
                       "node_peak_rss_mb": (watch.peaks.get("node") or 0) / MB,
                       "kubo_peak_rss_mb": (watch.peaks.get("kubo") or 0) / MB, "peak_reset": watch.reset_ok}
        used = sum(f.stat().st_size for f in ctx.workdir.rglob("*") if f.is_file())
        disk_peak[0] = max(disk_peak[0], used)
        log(f"  {name}: {seconds:.1f} s, {size / MB / seconds:.0f} MB/s, node peak "
            f"{steps[name]['node_peak_rss_mb']:.0f} MB, Kubo peak {steps[name]['kubo_peak_rss_mb']:.0f} MB")
        return result

    crypto_runs: dict[str, list[dict[str, Any]]] = {}
    try:
        expected = bench_crypto.generate(source, size)
        step("encrypt_file", "POST", "/encrypt_file", {"file_path": source.name, "password": password})
        added = step("create_hash", "POST", "/create_hash", {"file_path": source.name + ".aes"})
        cid = added["IPFS Hash"]["Hash"]
        if args.big_upload:
            boundary = "bench" + secrets.token_hex(8)
            chunks, length = multipart_stream(data_dir / (source.name + ".aes"), boundary)
            uploaded = step("create_hash (upload)", "POST", "/create_hash",
                            raw=(chunks, {"Content-Type": f"multipart/form-data; boundary={boundary}",
                                          "Content-Length": str(length)}))
            if uploaded["IPFS Hash"]["Hash"] != cid:
                raise RuntimeError("the upload gave another CID than the file_path add")
        (data_dir / (source.name + ".aes")).unlink()
        fetched = step("get_file", "POST", "/get_file", {"ipfs_hash": cid})
        streamed = step("get_file (GET, streamed)", "GET", f"/get_file?ipfs_hash={cid}", stream=True)
        if streamed < size:
            raise RuntimeError(f"the streamed download has {streamed} bytes")
        step("decrypt_file", "POST", "/decrypt_file",
             {"file_path": fetched["path"], "password": password, "output_path": "big.out.bin"})
        (data_dir / fetched["path"]).unlink()
        if bench_crypto.sha256_of(data_dir / "big.out.bin") != expected:
            raise RuntimeError("the file that went through the node differs from the original")
        (data_dir / "big.out.bin").unlink()
        ctx.cluster.stop_node(node)
        ctx.cluster.stop_kubo(kubo)  # and its repo, with the file's blocks
        kubo = None

        log(f"  crypto side by side with pyAesCrypt, {args.crypto_rounds} round(s)")
        encrypted, decrypted = ctx.workdir / "crypto.aes", ctx.workdir / "crypto.out"
        names = [f"{impl}-{direction}" for impl in ("ours", "pyaescrypt") for direction in ("encrypt", "decrypt")]
        crypto_runs = {name: [] for name in names}
        crypto_runs["baseline"] = [bench_crypto.run_worker("baseline", source, decrypted, password)]
        for number in range(args.crypto_rounds):
            order = ["ours", "pyaescrypt"] if number % 2 == 0 else ["pyaescrypt", "ours"]
            for impl in order:
                crypto_runs[f"{impl}-encrypt"].append(bench_crypto.run_worker(f"{impl}-encrypt", source, encrypted, password))
                crypto_runs[f"{impl}-decrypt"].append(bench_crypto.run_worker(f"{impl}-decrypt", encrypted, decrypted, password))
                if bench_crypto.sha256_of(decrypted) != expected:
                    raise RuntimeError(f"{impl}: decrypted output differs from the source")
                encrypted.unlink()
                decrypted.unlink()
    finally:
        for leftover in (source, data_dir / (source.name + ".aes"), data_dir / "big.out.bin",
                         ctx.workdir / "crypto.aes", ctx.workdir / "crypto.out"):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(data_dir / "downloads", ignore_errors=True)
        if kubo is not None:
            ctx.cluster.stop_node(node)
            ctx.cluster.stop_kubo(kubo)
    crypto = {name: bench_crypto.summarize(runs, 0 if name == "baseline" else size)
              for name, runs in crypto_runs.items()}
    for summary in crypto.values():
        summary["peak_rss_mb_max"] = summary["peak_rss_mib_max"] * MIB / MB
    node_peak = max(s["node_peak_rss_mb"] for s in steps.values())
    kubo_peak = max(s["kubo_peak_rss_mb"] for s in steps.values())
    crypto_peak = max(crypto[n]["peak_rss_mb_max"] for n in ("ours-encrypt", "ours-decrypt"))
    scope = "" if args.big_mib >= GOAL_SIZE_MIB else f" (measured on {args.big_mib} MiB, not the goal's 1 GiB)"
    speed = crypto["ours-encrypt"]["median_mb_per_s"] / crypto["pyaescrypt-encrypt"]["median_mb_per_s"]
    upload = steps.get("create_hash (upload)")
    goals = []
    if upload is not None:
        flat = upload["node_peak_rss_mb"] < NODE_PEAK_GOAL / MB
        goals.append({"item": "6", "name": f"a {args.big_mib} MiB multipart upload streamed to Kubo: node peak RSS",
                      "goal": f"< {NODE_PEAK_GOAL / MB:.0f} MB (memory flat)",
                      "measured": f"{upload['node_peak_rss_mb']:.0f} MB, {upload['mb_per_s']:.0f} MB/s (create_hash "
                                  f"from a path: {steps['create_hash']['mb_per_s']:.0f} MB/s){scope}",
                      "met": flat, "miss": None if flat else
                      f"by {upload['node_peak_rss_mb'] - NODE_PEAK_GOAL / MB:.0f} MB"})
    goals += [
        {"item": "6", "name": f"node process peak RSS through every step, {args.big_mib} MiB file",
         "goal": f"< {NODE_PEAK_GOAL / MB:.0f} MB", "measured": f"{node_peak:.0f} MB (Kubo: {kubo_peak:.0f} MB){scope}",
         "met": node_peak < NODE_PEAK_GOAL / MB,
         "miss": None if node_peak < NODE_PEAK_GOAL / MB else f"by {node_peak - NODE_PEAK_GOAL / MB:.0f} MB"},
        {"item": "6", "name": f"crypto.py peak RSS (encrypt and decrypt in a fresh process), {args.big_mib} MiB",
         "goal": f"< {CRYPTO_PEAK_GOAL / MB:.0f} MB",
         "measured": f"{crypto_peak:.0f} MB (pyAesCrypt {max(crypto[n]['peak_rss_mb_max'] for n in ('pyaescrypt-encrypt', 'pyaescrypt-decrypt')):.0f} MB; "
                     f"interpreter + imports {crypto['baseline']['peak_rss_mb_max']:.0f} MB){scope}",
         "met": crypto_peak < CRYPTO_PEAK_GOAL / MB,
         "miss": None if crypto_peak < CRYPTO_PEAK_GOAL / MB else f"by {crypto_peak - CRYPTO_PEAK_GOAL / MB:.0f} MB"},
    ]
    return {"size_mib": args.big_mib, "size_bytes": size, "steps": steps, "crypto": crypto,
            "crypto_rounds": args.crypto_rounds, "encrypt_speed_vs_pyaescrypt": speed,
            "node_peak_rss_mb": node_peak, "kubo_peak_rss_mb": kubo_peak, "crypto_peak_rss_mb": crypto_peak,
            "disk_free_before_gb": free / 1e9, "bench_disk_peak_gb": disk_peak[0] / 1e9, "goals": goals,
            "notes": ["MB = 10^6 bytes, MB/s = file bytes / wall seconds of the request.",
                      "Peak RSS is VmHWM, reset (/proc/PID/clear_refs) before each step, so each step's peak is "
                      "its own. bench_disk_peak_gb: everything under the bench's work folder after each step, Kubo's "
                      "repos included.",
                      "Files are in the page cache (24 GiB of RAM here): these are CPU and copy speeds, "
                      "not disk speeds; encrypt_file and decrypt_file fsync what they write, get_file does not."]}
