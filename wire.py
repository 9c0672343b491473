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
import itertools
import re
import socket
import threading
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


class PeerClient:
    """HTTP to other nodes, each exchange under one deadline and a size cap.

    http.client, not requests: a watchdog must be able to cut the socket when the deadline passes,
    whatever the exchange is doing (waiting for headers, reading a trickle), and no proxy settings apply.
    """

    def __init__(self, limits: Limits, headers: dict[str, str]) -> None:
        self.limits = limits
        self.headers = headers

    def get_json(self, url: str) -> tuple[Any, int]:
        """(the JSON value a GET answered, its size in bytes)."""
        status, body = self._exchange("GET", url, None)
        if status != 200:
            raise PeerError(f"answered HTTP {status}")
        try:
            return parse_json(body, self.limits.max_depth, "its answer"), len(body)
        except BadInput as exc:
            raise PeerMisbehaved(str(exc)) from None

    def post_json(self, url: str, body: Any) -> tuple[int, bytearray]:
        """POST a JSON body; (status, at most max_bytes of the answer)."""
        return self._exchange("POST", url, json.dumps(body).encode())

    def _exchange(self, method: str, url: str, body: bytes | None) -> tuple[int, bytearray]:
        parts = urlsplit(url)
        connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(parts.hostname, parts.port, timeout=self.limits.deadline)
        expired = threading.Event()
        opened: list[socket.socket] = []  # http.client drops its reference when an answer ends in "close"

        def cut() -> None:
            expired.set()
            for sock in opened:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(self.limits.deadline, cut)
        watchdog.daemon = True
        watchdog.start()
        try:
            headers = dict(self.headers)
            if body is not None:
                headers["Content-Type"] = "application/json"
            connection.connect()
            opened.append(connection.sock)
            if expired.is_set():
                cut()
            connection.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body, headers)
            response = connection.getresponse()
            declared = response.getheader("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.limits.max_bytes:
                raise PeerMisbehaved(f"answer of {declared} bytes is larger than {self.limits.max_bytes}")
            received = bytearray()
            while chunk := response.read1(READ_CHUNK_BYTES):
                received += chunk
                if len(received) > self.limits.max_bytes:
                    raise PeerMisbehaved(f"answer larger than {self.limits.max_bytes} bytes")
            if expired.is_set():  # the watchdog cut the socket: what arrived is not the whole answer
                raise PeerMisbehaved(f"did not answer within {self.limits.deadline:g}s")
            return response.status, received
        except (OSError, http.client.HTTPException) as exc:
            if expired.is_set():
                raise PeerMisbehaved(f"did not answer within {self.limits.deadline:g}s") from None
            raise PeerError(f"unreachable ({type(exc).__name__})") from None
        finally:
            watchdog.cancel()
            connection.close()
