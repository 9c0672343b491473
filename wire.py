"""What crosses the wire between nodes and from clients, bounded in every dimension.

A hostile peer or client decides how many bytes it sends, how slowly, how deeply
it nests and how many tiny values it packs in; the node decides how much of that
it takes. `parse_json` refuses, before building any object, JSON whose parse would
cost more than a small multiple of its size, nest too deeply, or carry numbers
longer than any the protocol uses. `PeerClient` reads a peer's answer under one
deadline for the whole exchange (not per read, so a peer dripping a byte a
second cannot hold us) and a size cap.
"""
from __future__ import annotations

import http.client
import json
import heapq
import itertools
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable
from urllib.parse import urlsplit

from errors import BadInput, PeerError, PeerMisbehaved

# A JSON value costs a Python object of about 50 to 70 bytes. Requiring at least this many bytes of text per
# value keeps a parse within a few times the bytes received: real blocks and transactions carry 20 or more.
MIN_BYTES_PER_VALUE = 12
SMALL_DOCUMENT_VALUES = 1024
DEPTH_PREFIX_BRACKETS = 4096  # deep nesting shows in its first brackets: judged before the cost of the whole  # any document may hold this many values whatever its size: its parse is small anyway
MAX_INTEGER_DIGITS = 19  # what fits in 63 bits; no nonce, index or size of the protocol is longer
READ_CHUNK_BYTES = 64 * 1024
POST_ANSWER_BYTES = 64 * 1024  # gossip and announcements are answered with a line of JSON
STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
BRACKET = re.compile(r"[\[\]{}]")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise ValueError(f"a number longer than {MAX_INTEGER_DIGITS} digits")
    return int(text)


def _no_float(text: str) -> Any:
    raise ValueError(f"a fractional number ({text[:20]}); the protocol has whole numbers only")


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def shape_problem(text: str, max_depth: int) -> str | None:
    """Why parsing `text` could cost too much (too many values for its size, too deep), or None.

    Works on the text with its strings blanked out, with str.count and one regex, so a refusal costs
    about one pass over the bytes and builds no objects.
    """
    skeleton = STRING.sub('""', text)
    problem = _depth_problem(itertools.islice(BRACKET.finditer(skeleton), DEPTH_PREFIX_BRACKETS), max_depth)
    if problem:
        return problem
    values = skeleton.count(",") + skeleton.count(":") + skeleton.count("[") + skeleton.count("{") + 1
    if values > SMALL_DOCUMENT_VALUES and values * MIN_BYTES_PER_VALUE > len(text):
        return f"it packs {values} values into {len(text)} bytes"
    return _depth_problem(BRACKET.finditer(skeleton), max_depth)


def _depth_problem(brackets: Iterable[re.Match[str]], max_depth: int) -> str | None:
    depth = 0
    for bracket in brackets:
        depth += 1 if bracket.group() in "[{" else -1
        if depth > max_depth:
            return f"it is nested deeper than {max_depth} levels"
    return None


def parse_json(data: bytes | bytearray | str, max_depth: int, what: str = "the request body") -> Any:
    """JSON text into Python values, or BadInput naming what is wrong; never more than a few times its size."""
    try:
        text = data if isinstance(data, str) else data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{what} is not UTF-8 text") from None
    problem = shape_problem(text, max_depth)
    if problem:
        raise BadInput(f"{what} is refused: {problem}")
    try:
        return json.loads(text, parse_int=_bounded_int, parse_float=_no_float, parse_constant=_no_constant)
    except RecursionError:
        raise BadInput(f"{what} is nested too deeply") from None
    except ValueError as exc:
        raise BadInput(f"{what} is not valid JSON ({exc})") from None


@dataclass(frozen=True)
class Limits:
    """What a node takes from one peer answer."""

    deadline: float  # seconds for the whole exchange: connect, send, headers, body
    max_bytes: int
    max_depth: int


class Watch:
    """One exchange's deadline: when it passes, the watchdog cuts the socket and marks the watch expired."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline = sock, deadline
        self.expired = False
        self.done = False

    def expire(self) -> None:
        self.expired = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Watchdog:
    """One thread for every deadline of a client (a timer thread per exchange cost more than the exchange)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Watch]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, seconds: float) -> Watch:
        watch = Watch(sock, time.monotonic() + seconds)
        with self._wake:
            heapq.heappush(self._heap, (watch.deadline, next(self._order), watch))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="peer-deadlines", daemon=True)
                self._thread.start()
            self._wake.notify()
        return watch

    def _run(self) -> None:
        with self._wake:
            while True:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._wake.wait()
                    continue
                deadline, _, watch = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._wake.wait(wait)
                    continue
                heapq.heappop(self._heap)
                watch.expire()


class PeerConnection:
    """A kept-alive connection to one peer, for one thread at a time (an outbox sends its messages on one)."""

    def __init__(self, client: "PeerClient", base_url: str) -> None:
        self.client = client
        self.parts = urlsplit(base_url)
        self.http: http.client.HTTPConnection | None = None

    def open(self) -> http.client.HTTPConnection:
        if self.http is None:
            kind = http.client.HTTPSConnection if self.parts.scheme == "https" else http.client.HTTPConnection
            self.http = kind(self.parts.hostname, self.parts.port, timeout=self.client.limits.deadline)
        return self.http

    def close(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None


class PeerClient:
    """HTTP to other nodes, each exchange under one deadline and a size cap.

    http.client, not requests: the watchdog must be able to cut the socket when the deadline passes,
    whatever the exchange is doing (waiting for headers, reading a trickle), and no proxy settings apply.
    """

    def __init__(self, limits: Limits, headers: dict[str, str]) -> None:
        self.limits = limits
        self.headers = headers
        self.watchdog = Watchdog()

    def connection(self, base_url: str) -> PeerConnection:
        return PeerConnection(self, base_url)

    def get_json(self, url: str) -> tuple[Any, int]:
        """(the JSON value a GET answered, its size in bytes)."""
        parts = urlsplit(url)
        connection = self.connection(f"{parts.scheme}://{parts.netloc}")
        try:
            status, body = self._exchange(connection, "GET", _target(parts), None, self.limits.max_bytes)
        finally:
            connection.close()
        if status != 200:
            raise PeerError(f"answered HTTP {status}")
        try:
            return parse_json(body, self.limits.max_depth, "its answer"), len(body)
        except BadInput as exc:
            raise PeerMisbehaved(str(exc)) from None

    def post_json(self, connection: PeerConnection, path: str, body: Any) -> tuple[int, bytearray]:
        """POST a JSON body on a kept-alive connection; (status, the answer: a short acknowledgement, so at most
        POST_ANSWER_BYTES). A connection the peer closed meanwhile is opened again once: gossip is idempotent."""
        data = json.dumps(body).encode()
        limit = min(self.limits.max_bytes, POST_ANSWER_BYTES)
        try:
            return self._exchange(connection, "POST", path, data, limit)
        except PeerMisbehaved:
            raise
        except PeerError:
            return self._exchange(connection, "POST", path, data, limit)

    def _exchange(self, connection: PeerConnection, method: str, target: str, body: bytes | None,
                  max_bytes: int) -> tuple[int, bytearray]:
        headers = dict(self.headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        watch: Watch | None = None
        try:
            conn = connection.open()
            if conn.sock is None:
                conn.connect()
            watch = self.watchdog.watch(conn.sock, self.limits.deadline)
            conn.request(method, target, body, headers)
            response = conn.getresponse()
            declared = response.getheader("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise PeerMisbehaved(f"answer of {declared} bytes is larger than {max_bytes}")
            received = bytearray()
            while chunk := response.read1(READ_CHUNK_BYTES):
                received += chunk
                if len(received) > max_bytes:
                    raise PeerMisbehaved(f"answer larger than {max_bytes} bytes")
            if watch.expired:  # the watchdog cut the socket: what arrived is not the whole answer
                raise PeerMisbehaved(f"did not answer within {self.limits.deadline:g}s")
            # read1 does not mark a response read to its Content-Length as closed (read does): left open, the
            # connection sends the next request and then refuses to read its answer (ResponseNotReady), and
            # post_json sends that request again on a new connection: every gossip message but a connection's
            # first would arrive twice.
            response.close()
            if response.will_close:
                connection.close()
            return response.status, received
        except PeerMisbehaved:
            connection.close()
            raise
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            if watch is not None and watch.expired:
                raise PeerMisbehaved(f"did not answer within {self.limits.deadline:g}s") from None
            raise PeerError(f"unreachable ({type(exc).__name__})") from None
        finally:
            if watch is not None:
                watch.done = True


def _target(parts: Any) -> str:
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
