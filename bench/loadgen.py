"""A closed-loop HTTP load generator: CONNECTIONS keep-alive http.client connections, one thread each.

Run as its own process (bench/run.py starts it with subprocess), so it never shares a
GIL with the server it measures. Standard library only.

    python bench/loadgen.py SPEC.json OUT.json

SPEC: {"port", "method", "path", "body" (text; "{i}" becomes the request's sequence number),
       "connections", "seconds" (run until then) or "count" (send exactly that many),
       "start_at" (time.time() to begin; lets several generators start together),
       "collect_ids" (keep the "id" of every 201 answer), "timeout"}
OUT: requests, statuses, errors, elapsed, latencies (seconds, every request), ids, cpu_seconds.
"""
from __future__ import annotations

import http.client
import itertools
import json
import os
import sys
import threading
import time
from typing import Any


def run(spec: dict[str, Any]) -> dict[str, Any]:
    port, method, path = spec["port"], spec.get("method", "GET"), spec["path"]
    template = spec.get("body")
    connections = int(spec.get("connections", 32))
    seconds = spec.get("seconds")
    count = spec.get("count")
    collect_ids = bool(spec.get("collect_ids"))
    timeout = float(spec.get("timeout", 30))
    headers = {"Content-Type": "application/json"} if template is not None else {}
    sequence = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    ids: list[str] = []
    ready = threading.Barrier(connections + 1)
    deadline = [0.0]

    def body_for(number: int) -> bytes | None:
        if template is None:
            return None
        return template.replace("{i}", str(number)).encode()

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        mine: list[float] = []
        my_status: dict[str, int] = {}
        my_errors: dict[str, int] = {}
        my_ids: list[str] = []
        try:
            conn.connect()
        except OSError as exc:
            my_errors[type(exc).__name__] = my_errors.get(type(exc).__name__, 0) + 1
        ready.wait()
        while True:
            number = next(sequence)
            if count is not None and number >= count:
                break
            if seconds is not None and time.perf_counter() >= deadline[0]:
                break
            payload = body_for(number)
            started = time.perf_counter()
            try:
                conn.request(method, path, body=payload, headers=headers)
                response = conn.getresponse()
                data = response.read()
                mine.append(time.perf_counter() - started)
                key = str(response.status)
                my_status[key] = my_status.get(key, 0) + 1
                if collect_ids and response.status == 201:
                    my_ids.append(json.loads(data)["id"])
                if response.will_close:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                name = type(exc).__name__
                my_errors[name] = my_errors.get(name, 0) + 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.close()
        with lock:
            latencies.extend(mine)
            for key, value in my_status.items():
                statuses[key] = statuses.get(key, 0) + value
            for key, value in my_errors.items():
                errors[key] = errors.get(key, 0) + value
            ids.extend(my_ids)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    start_at = spec.get("start_at")
    if start_at:
        time.sleep(max(0.0, start_at - time.time()))
    cpu_before = os.times()
    began = time.perf_counter()
    if seconds is not None:
        deadline[0] = began + float(seconds)
    ready.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    cpu_after = os.times()
    return {"requests": len(latencies), "statuses": statuses, "errors": errors, "elapsed": elapsed,
            "latencies": latencies, "ids": ids, "connections": connections,
            "cpu_seconds": (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)}


def main(argv: list[str]) -> int:
    spec_path, out_path = argv[1], argv[2]
    with open(spec_path) as handle:
        spec = json.load(handle)
    result = run(spec)
    with open(out_path, "w") as handle:
        json.dump(result, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
