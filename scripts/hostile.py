"""Hostile peers for tests and benchmarks: small loopback HTTP servers that answer a node as an attacker would.

    peer = HostilePeer(drip(1.0))          # headers, then a byte a second, forever
    peer = HostilePeer(endless_body())     # an answer that never ends
    peer = HostilePeer(serving(chain))     # an honest-looking node serving a chain (forged, say)

An answer function takes (method, path) and returns (status, body, pause): the body as bytes or an iterator of
chunks, and the seconds to wait between chunks. Every server binds 127.0.0.1 only.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

from scripts.cluster import free_port

Answer = Callable[[str, str], tuple[int, Any, float]]
MIB = 1024 * 1024


class HostilePeer:
    """Answers every request with `answer(method, path)` and records what it was asked."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.asked: list[str] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one(self, method: str) -> None:
                if method == "POST":
                    self.rfile.read(int(self.headers.get("Content-Length", 0)))
                peer.asked.append(f"{method} {self.path}")
                status, body, pause = peer.answer(method, self.path)
                chunks = [body] if isinstance(body, bytes) else body
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Connection", "close")
                    if isinstance(body, bytes):
                        self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    for chunk in chunks:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        time.sleep(pause)
                except OSError:
                    pass  # the node hung up on us: that is the point

            def do_GET(self) -> None:
                self.handle_one("GET")

            def do_POST(self) -> None:
                self.handle_one("POST")

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name=f"hostile-{self.port}", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def endless(chunk: bytes) -> Iterator[bytes]:
    while True:
        yield chunk


def blocks_page(chain: list[dict[str, Any]], path: str, length: int | None = None) -> bytes:
    """What a node answers to GET /blocks?from=N, from `chain`."""
    start = int(path.split("from=", 1)[1]) if "from=" in path else 1
    return json.dumps({"from": start, "length": length or len(chain), "blocks": chain[start - 1:]}).encode()


def serving(chain: list[dict[str, Any]]) -> Answer:
    """A peer that serves `chain` as an honest node would, and accepts whatever it is sent."""
    def answer(method: str, path: str) -> tuple[int, Any, float]:
        if path.startswith("/blocks"):
            return 200, blocks_page(chain, path), 0.0
        if path.startswith("/get_chain"):
            return 200, json.dumps({"chain": chain, "length": len(chain)}).encode(), 0.0
        return 200, b'{"outcome": "appended"}', 0.0
    return answer


def drip(pause: float = 1.0) -> Answer:
    """Headers at once, then one byte every `pause` seconds, forever."""
    return lambda method, path: (200, endless(b" "), pause)


def endless_body(chunk_bytes: int = MIB) -> Answer:
    """An answer that never ends, as fast as the node reads it."""
    return lambda method, path: (200, endless(b"x" * chunk_bytes), 0.0)


def garbage() -> Answer:
    return lambda method, path: (200, b"\x00\xffnot json at all", 0.0)


def nested(depth: int = 200_000) -> Answer:
    """A /blocks answer nested `depth` deep."""
    page = b'{"from": 2, "length": 5, "blocks": ' + b"[" * depth + b"]" * depth + b"}"
    return lambda method, path: (200, page, 0.0)


def packed(values: int = 5 * MIB) -> Answer:
    """A /blocks answer of `values` empty objects: a few bytes each, far more memory each once parsed."""
    page = b'{"from": 2, "length": 9, "blocks": [' + b"{}," * values + b"{}]}"
    return lambda method, path: (200, page, 0.0)
