"""Benchmark crypto.py against pyAesCrypt: wall time, throughput and peak memory.

    python bench/bench_crypto.py --size-mib 1024 --out bench/results/crypto.json

Each operation runs in a fresh interpreter (this script's --worker mode), so the
peak RSS reported (ru_maxrss of that child) belongs to that operation alone.
Times are measured inside the child around the call, excluding interpreter start.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
MB = 1_000_000
GENERATE_CHUNK = 4 * MIB
HASH_CHUNK = 4 * MIB
GOAL = "crypto peak memory < 100 MB on a 1 GiB file"
GOAL_PEAK_BYTES = 100 * MB
GOAL_SIZE_MIB = 1024
PASSWORD_ENV = "BENCH_PASSWORD"
KIB = 1024

OPERATIONS = {  # name: (implementation, direction)
    "ours-encrypt": ("emr-chain crypto.py", "encrypt"),
    "ours-decrypt": ("emr-chain crypto.py", "decrypt"),
    "pyaescrypt-encrypt": ("pyAesCrypt", "encrypt"),
    "pyaescrypt-decrypt": ("pyAesCrypt", "decrypt"),
    "baseline": ("interpreter + imports only", "none"),
}


def worker(operation: str, src: str, dst: str) -> None:
    """Run one operation in this (fresh) process and print its time and peak RSS as JSON."""
    sys.path.insert(0, str(ROOT))
    import pyAesCrypt

    import crypto

    password = os.environ[PASSWORD_ENV]
    calls = {
        "ours-encrypt": lambda: crypto.encrypt_file(src, dst, password),
        "ours-decrypt": lambda: crypto.decrypt_file(src, dst, password),
        "pyaescrypt-encrypt": lambda: pyAesCrypt.encryptFile(src, dst, password),
        "pyaescrypt-decrypt": lambda: pyAesCrypt.decryptFile(src, dst, password),
        "baseline": lambda: None,
    }
    start = time.perf_counter()
    calls[operation]()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_kib": peak_rss_kib()}))


def peak_rss_kib() -> int:
    """This process's peak RSS. VmHWM, where there is one: ru_maxrss carries over the RSS of a large
    parent at fork across exec, so a worker started from a big process would look as big as it."""
    try:
        with open("/proc/self/status") as status:
            return int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS


def run_worker(operation: str, src: Path, dst: Path, password: str) -> dict:
    env = dict(os.environ, **{PASSWORD_ENV: password, "PYTHONDONTWRITEBYTECODE": "1"})
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", operation, str(src), str(dst)],
        env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"worker {operation} failed:\n{result.stderr}")
    return json.loads(result.stdout)


def generate(path: Path, size: int) -> str:
    """Write size random bytes in chunks (never all in memory); return their SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        remaining = size
        while remaining:
            chunk = os.urandom(min(GENERATE_CHUNK, remaining))
            digest.update(chunk)
            out.write(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def summarize(runs: list[dict], size: int) -> dict:
    seconds = [r["seconds"] for r in runs]
    peaks = [r["peak_rss_kib"] for r in runs]
    median = statistics.median(seconds)
    return {
        "seconds": seconds, "median_s": median, "min_s": min(seconds), "max_s": max(seconds),
        "median_mb_per_s": size / MB / median if median and size else None,
        "peak_rss_kib": peaks, "peak_rss_mib_median": statistics.median(peaks) / KIB,
        "peak_rss_mib_max": max(peaks) / KIB,
    }


def benchmark(size_mib: int, repeats: int, workdir: Path) -> dict:
    size = size_mib * MIB
    password = "bench-" + os.urandom(8).hex()
    source, encrypted, decrypted = workdir / "plain.bin", workdir / "plain.bin.aes", workdir / "out.bin"
    print(f"generating {size_mib} MiB in {workdir} ...", file=sys.stderr)
    expected = generate(source, size)
    runs: dict[str, list[dict]] = {name: [] for name in OPERATIONS}
    runs["baseline"].append(run_worker("baseline", source, decrypted, password))
    for repeat in range(repeats):
        order = ["ours", "pyaescrypt"] if repeat % 2 == 0 else ["pyaescrypt", "ours"]
        for impl in order:
            for direction, src, dst in (("encrypt", source, encrypted), ("decrypt", encrypted, decrypted)):
                name = f"{impl}-{direction}"
                runs[name].append(run_worker(name, src, dst, password))
                print(f"  run {repeat + 1}/{repeats} {name}: {runs[name][-1]['seconds']:.2f} s",
                      file=sys.stderr)
            if sha256_of(decrypted) != expected:
                raise SystemExit(f"{impl}: decrypted output differs from the source")
            encrypted.unlink()
            decrypted.unlink()
    results = {name: summarize(r, 0 if name == "baseline" else size) for name, r in runs.items()}
    ours_peak = max(results[n]["peak_rss_mib_max"] * MIB for n in ("ours-encrypt", "ours-decrypt"))
    return {
        "goal": GOAL,
        "goal_met": ours_peak < GOAL_PEAK_BYTES,
        "goal_evaluated_at_full_size": size_mib >= GOAL_SIZE_MIB,
        "ours_peak_rss_mb": ours_peak / MB,
        "size_mib": size_mib, "size_bytes": size, "repeats": repeats,
        "units": {"MB": "10^6 bytes", "MiB": "2^20 bytes", "time": "seconds inside the worker"},
        "cpu_count": os.cpu_count(),
        "platform": {"system": platform.platform(), "machine": platform.machine(),
                     "processor": platform.processor(), "python": platform.python_version()},
        "libraries": {name: metadata.version(name) for name in ("pycryptodome", "pyAesCrypt")},
        "operations": {name: {"implementation": impl, "direction": direction}
                       for name, (impl, direction) in OPERATIONS.items()},
        "results": results,
    }


def markdown(report: dict) -> str:
    lines = [f"AES Crypt v2, {report['size_mib']} MiB file, {report['repeats']} runs, "
             f"{report['cpu_count']} CPUs, Python {report['platform']['python']}", "",
             "| operation | median s | min-max s | MB/s (median) | peak RSS MiB (max) |",
             "|---|---|---|---|---|"]
    for name, r in report["results"].items():
        rate = f"{r['median_mb_per_s']:.0f}" if r["median_mb_per_s"] else "-"
        lines.append(f"| {name} | {r['median_s']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} | "
                     f"{rate} | {r['peak_rss_mib_max']:.1f} |")
    verdict = "met" if report["goal_met"] else "NOT met"
    scope = "" if report["goal_evaluated_at_full_size"] else " (measured below 1 GiB)"
    lines += ["", f"Goal: {report['goal']}: {verdict}{scope}, "
                  f"our peak {report['ours_peak_rss_mb']:.1f} MB."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=GOAL_SIZE_MIB)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--workdir", type=Path, help="folder for the temporary files")
    parser.add_argument("--worker", nargs=3, metavar=("OPERATION", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    if args.size_mib <= 0 or args.repeats <= 0:
        parser.error("--size-mib and --repeats must be positive")
    workdir = Path(tempfile.mkdtemp(prefix="bench-crypto-", dir=args.workdir))
    try:
        report = benchmark(args.size_mib, args.repeats, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
