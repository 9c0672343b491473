"""Serving one node: `python app.py --port 5002 --role patient` ends up here.

waitress (real threads, runs on Windows too, the paper's platform) serves the app that app.create_app builds;
this module refuses unsafe addresses, sets the server up, handles stop signals, and starts the node's network
and mining processes.

Hostile clients. waitress reads requests on one I/O thread and hands complete ones to worker threads, which is
what keeps slow clients off the workers; three subclasses close what it leaves open (waitress==3.0.2 is pinned,
and tests/test_server.py fails if an internal used here changes):
- NodeParser asks the app's Gate (app.py) when a request head is complete; a refused request (401, 403, 413, 415,
  421) is completed there with its error, so its body is never read, and the connection closes after the answer.
  It also holds a chunked body to the endpoint's own limit.
- NodeChannel keeps the deadlines (a head must arrive whole within header_timeout of the connection being ready
  for it; a body must not pause longer than body_timeout: 408 and close), and after a refusal it closes gently
  (answer, then half-close and drop what the client still sends, for at most LINGER_SECONDS), so a client that
  is still sending can read the answer instead of a reset.
- NodeServer checks those deadlines every second (waitress's maintenance), and is accepted by poll() where the
  platform has it, so connection_limit can be well above 1024 sockets; on Windows select() takes 500 at most.
Downloads reach waitress as files (wsgi.file_wrapper, app.download_file), which its I/O thread sends at the
reader's pace: a reader that does not read holds a spooled file, never a worker thread. A large download is filled
from IPFS by its request's thread after the answer has begun (NodeTask runs app.AFTER_RESPONSE), and NodeChannel
waits for its bytes instead of polling for them.

Uploads stream. waitress reads a whole body (spooled to a temporary file past 512 KiB) before the app may see it;
for a multipart upload to create_hash that would mean copying the file twice before Kubo reads it. So when such a
request's head is accepted and one of `upload_streams` slots is free, NodeParser hands its body to a BodyPipe
instead, and the request goes at once to a thread of its own pool (UploadStreams), not one of the request threads:
the app parses the body as it arrives and passes the file on to Kubo. The pipe holds at most UPLOAD_PIPE_BYTES;
beyond, the I/O thread stops reading that socket until the app has taken some (so memory stays flat and a slow
Kubo slows the client down). A body that pauses longer than body_timeout, breaks off or grows past its limit
fails the app's read with the errors.py class that says so, and the connection is closed after the answer. With
every slot taken, an upload is read whole first, as any other request.
"""
from __future__ import annotations

import json
import logging
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from http import HTTPStatus
from typing import Any, Callable, Iterator, Mapping

import waitress.server
import waitress.utilities
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.buffers import ReadOnlyFileBasedBuffer
from waitress.parser import HTTPRequestParser
from waitress.task import ThreadedTaskDispatcher, WSGITask

from app import AFTER_RESPONSE, BODY_BOUNDED, TOO_LARGE, Gate, create_app, fhir_error, is_fhir_path, status_for
from config import LOOPBACK_HOSTS, Config, load_config
from errors import BadInput, NodeError, RequestTimeout, TooLarge
from node import Node, migrate_state, show_identity

log = logging.getLogger("emr.server")
SERVER_IDENT = "emr-chain"
WAITRESS_VERSION = "3.0.2"  # the version whose internals NodeParser, NodeChannel and NodeServer rely on
MAINTENANCE_SECONDS = 1     # how often deadlines are checked (waitress's cleanup_interval)
LINGER_SECONDS = 2.0        # after a refusal: how long to drop what the client still sends before closing
LINGER_BYTES = 4 * 1024 * 1024
SELECT_LIMIT = 500          # sockets CPython's select() takes on Windows (FD_SETSIZE 512, less our own)
DESCRIPTORS_PER_CONNECTION = 2  # a socket, and at times a spooled body or answer
RESERVED_DESCRIPTORS = 256
UPLOAD_PIPE_BYTES = 4 * 1024 * 1024  # bytes of a streamed upload held between the I/O thread and its thread
BODY_RECV_BYTES = 256 * 1024         # read at a time while a body arrives (waitress reads recv_bytes, 8 KiB:
                                     # 2048 reads and buffer appends for 16 MiB, 30 ms, against 7 ms)


def waitress_errors_as_json() -> None:
    """waitress answers a few requests itself, before the app sees them (a body over its size limit, a
    malformed request line), in plain text; make those {"error": ...} too, like every other answer.

    This replaces `waitress.utilities.Error.to_response`, whose signature tests/test_architecture.py pins.
    """
    def to_response(self: waitress.utilities.Error, ident: str | None = None) -> tuple[str, list, bytes]:
        lead = TOO_LARGE if self.code == 413 else self.reason.lower()
        body = json.dumps({"error": f"{lead} ({self.body})"}).encode()
        return f"{self.code} {self.reason}", [("Content-Type", "application/json")], body

    waitress.utilities.Error.to_response = to_response


# -- refusing at the head ----------------------------------------------------------

class Refusal(waitress.utilities.Error):
    """A NodeError as waitress's ErrorTask answers it: the status ERROR_STATUS gives it, {"error": ...} (under
    /fhir/ an OperationOutcome, as app.py answers there), and the CORS headers an allowed page needs to read it."""

    def __init__(self, error: NodeError, headers: list[tuple[str, str]] | None = None, path: str = "") -> None:
        super().__init__(str(error))
        self.error = error
        self.code = status_for(type(error))
        self.reason = HTTPStatus(self.code).phrase
        self.headers = headers or []
        self.path = path

    def to_response(self, ident: str | None = None) -> tuple[str, list, bytes]:
        if is_fhir_path(self.path):
            media_type, body = fhir_error(self.code, str(self.error))
        else:
            media_type, body = "application/json", json.dumps({"error": str(self.error)}).encode()
        return f"{self.code} {self.reason}", [("Content-Type", media_type), *self.headers], body


class WaitressHeaders(Mapping[str, str]):
    """waitress's header dict (CONTENT_TYPE: ...) read as Flask's request headers are (get("Content-Type")),
    without a copy: the Gate asks a few names of every request head."""

    __slots__ = ("raw",)

    def __init__(self, raw: dict[str, str]) -> None:
        self.raw = raw

    def __getitem__(self, name: str) -> str:
        return self.raw[name.upper().replace("-", "_")]

    def __iter__(self) -> Iterator[str]:
        return (key.replace("_", "-") for key in self.raw)

    def __len__(self) -> int:
        return len(self.raw)


class BodyPipe:
    """A request body on its way from the I/O thread to the thread serving the request, while it arrives.

    waitress's receivers (Content-Length or chunked) write into it as into their buffer (append); the app reads
    it as wsgi.input. At most `capacity` bytes are held: NodeChannel stops reading the socket while it is full,
    and `read` wakes the I/O thread when it makes room again. `end` marks the body whole (read then gives b""),
    `fail(error)` drops what is held and makes every read raise `error`.
    """

    def __init__(self, capacity: int, wake: Callable[[], None]) -> None:
        self.capacity = capacity
        self._wake = wake
        self._chunks: deque[bytes] = deque()
        self._held = 0
        self.received = 0
        self.ended = False
        self.error: NodeError | None = None
        self._cond = threading.Condition()

    # -- the I/O thread (waitress's receivers call append) --

    def append(self, data: bytes) -> None:
        with self._cond:
            if self.error is None:
                self._chunks.append(data)
                self._held += len(data)
                self.received += len(data)
                self._cond.notify()

    def __len__(self) -> int:  # waitress takes a chunked body's length from its buffer's
        return self.received

    def has_room(self) -> bool:
        return self._held < self.capacity

    def end(self) -> None:
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def fail(self, error: NodeError) -> None:
        """The body will not come whole (a pause past body_timeout, the client gone, past its limit, answered)."""
        with self._cond:
            if self.ended or self.error is not None:
                return
            self.error = error
            self._chunks.clear()
            self._held = 0
            self._cond.notify_all()

    @property
    def streaming(self) -> bool:
        return not self.ended and self.error is None

    # -- the request's thread --

    def read(self, size: int = -1) -> bytes:
        """The next piece as it came (up to `size` bytes; no copy when it fits), waiting for one if need be."""
        with self._cond:
            while not self._chunks and not self.ended and self.error is None:
                self._cond.wait()
            if self.error is not None:
                raise self.error
            if not self._chunks:
                return b""
            was_full = self._held >= self.capacity
            data = self._chunks.popleft()
            if 0 <= size < len(data):
                data, rest = data[:size], data[size:]
                self._chunks.appendleft(rest)
            self._held -= len(data)
        if was_full and self.has_room():
            self._wake()  # the I/O thread may read the socket again (NodeChannel.readable)
        return data

    # -- what waitress asks of a body buffer --

    def getfile(self) -> "BodyPipe":
        return self

    def close(self) -> None:
        self.fail(BadInput("the request was answered before its body was whole"))


class UploadStreams:
    """The slots for uploads streamed as they arrive (upload_streams), and the threads that serve them, apart
    from the request threads: a client that sends slowly holds one of these, never a request thread."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.free = count
        self._lock = threading.Lock()
        self.dispatcher = ThreadedTaskDispatcher()
        self.dispatcher.set_thread_count(count)

    def take(self) -> bool:
        with self._lock:
            if self.free <= 0:
                return False
            self.free -= 1
            return True

    def give(self) -> None:
        with self._lock:
            self.free += 1

    def shutdown(self) -> None:
        self.dispatcher.shutdown()


class NodeParser(HTTPRequestParser):
    """waitress's request parser, which asks the Gate when the head is complete (see the module's docstring)."""

    body_limit: int | None = None
    pipe: BodyPipe | None = None  # the body, streamed to the request's thread as it arrives

    def __init__(self, adj: Adjustments, gate: Gate, on_refused: Callable[[], None],
                 stream_body: Callable[["NodeParser"], BodyPipe | None] | None = None) -> None:
        super().__init__(adj)
        self.gate = gate
        self.on_refused = on_refused
        self.stream_body = stream_body

    @property
    def streaming(self) -> bool:
        return self.pipe is not None

    def received(self, data: bytes) -> int:
        if self.completed:
            return 0
        in_head = self.body_rcv is None
        consumed = super().received(data)
        if in_head and self.headers_finished and not self.empty and (
                self.error is None or isinstance(self.error, waitress.utilities.RequestEntityTooLarge)):
            self._check_head()  # before waitress's own size limit: a wrong key is a 401, whatever the size
            if self.pipe is not None:  # the rest of this read is the body's start
                return consumed + self.feed(data[consumed:])
        elif self.error is None and self.body_limit is not None and self.body_bytes_received > self.body_limit:
            self._refuse(TooLarge(f"{TOO_LARGE} ({self.body_limit} bytes)"), [])  # a chunked body, growing
        if self.error is not None:
            self.expect_continue = False  # never "100 Continue" to a refused request
            self.on_refused()
            return len(data)  # what follows a refused head (its body) is dropped, not read into the request
        return consumed

    def _check_head(self) -> None:
        path = "/" + self.path.lstrip("/") if self.path.startswith("/") else self.path  # as waitress's PATH_INFO
        headers = WaitressHeaders(self.headers)
        refusal = self.gate.refusal(self.command, path, headers)
        if refusal is not None:
            self._refuse(refusal, self.gate.cors_headers(headers), path)
        elif self.error is None:
            self.body_limit = self.gate.body_limit(self.command, path, headers)
            if self.body_rcv is not None and self.stream_body is not None and \
                    self.gate.is_upload(self.command, path, headers):
                pipe = self.stream_body(self)
                if pipe is not None:  # a slot was free: the request goes to its thread now, its body follows
                    self.body_rcv.buf = pipe
                    self.pipe = pipe
                    self.completed = True

    def feed(self, data: bytes) -> int:
        """Pass the next bytes of a streamed body on (I/O thread); how many of `data` belong to it."""
        pipe, receiver = self.pipe, self.body_rcv
        if not data or pipe is None or receiver is None or not pipe.streaming:
            return 0
        consumed = receiver.received(data)
        self.body_bytes_received += consumed
        if receiver.error is not None:
            pipe.fail(BadInput(f"the chunked body is malformed ({receiver.error.body})"))
        elif self.body_limit is not None and self.body_bytes_received > self.body_limit:
            pipe.fail(TooLarge(f"{TOO_LARGE} ({self.body_limit} bytes)"))
        elif receiver.completed:
            pipe.end()
        return consumed

    def _refuse(self, error: NodeError, headers: list[tuple[str, str]], path: str = "") -> None:
        self.error = Refusal(error, headers, path)
        self.completed = True
        log.info("%s %s %d, refused from its head (no body read): %s", getattr(self, "command", "-"),
                 getattr(self, "path", "-"), self.error.code, error)


# -- serving: work after the answer has begun, and streamed bodies -------------------------

class NodeTask(WSGITask):
    """waitress's task for one request, which tells the app what this server does for it (app.AFTER_RESPONSE,
    app.BODY_BOUNDED), runs the app's after-response work, and closes a connection whose streamed body was
    answered before it was whole (the rest of it cannot be read as the next request)."""

    def get_environment(self) -> dict[str, Any]:
        environ = super().get_environment()
        environ.setdefault(AFTER_RESPONSE, [])
        environ[BODY_BOUNDED] = True
        return environ

    def execute(self) -> None:
        jobs = self.get_environment()[AFTER_RESPONSE]
        try:
            super().execute()
        finally:
            for job in jobs:  # e.g. a download's fill from IPFS, while the I/O thread sends what has arrived
                try:
                    job(self.channel.server.pull_trigger)
                except Exception as exc:  # the answer has begun: all that is left is to end it short
                    log.warning("%s %s: the answer was cut short: %s", self.request.command, self.request.path, exc)

    def build_response_header(self) -> bytes:
        pipe = getattr(self.request, "pipe", None)
        if pipe is not None and not pipe.ended:
            self.set_close_on_finish()
            self.channel.refused = True  # close gently: the client may still be sending
        return super().build_response_header()


# -- deadlines and a gentle close ----------------------------------------------------

class NodeChannel(HTTPChannel):
    """One connection: waitress's channel with deadlines, a gentle close after a refusal, streamed upload bodies
    and downloads sent while they are still being filled."""

    task_class = NodeTask
    refused = False     # an answer refused a request: close after it, gently
    lingering = False   # answered and half-closed: dropping what the client still sends
    linger_until = 0.0
    lingered_bytes = 0
    upload: NodeParser | None = None  # the request whose body is being streamed to its thread

    def __init__(self, server: "NodeServer", sock: socket.socket, addr: Any, adj: Adjustments,
                 map: dict | None = None) -> None:
        self.ready_since = self.last_received = time.monotonic()
        super().__init__(server, sock, addr, adj, map)

    def parser_class(self, adj: Adjustments) -> NodeParser:  # waitress calls self.parser_class(self.adj)
        return NodeParser(adj, self.server.gate, self._refused, self._stream_body)

    def _refused(self) -> None:
        self.refused = True

    def _stream_body(self, parser: NodeParser) -> BodyPipe | None:
        """A pipe for this request's body if an upload slot is free (NodeParser, at the end of its head)."""
        streams = self.server.streams
        if streams is None or not streams.take():
            return None
        self.upload = parser
        return BodyPipe(UPLOAD_PIPE_BYTES, self.server.pull_trigger)

    def received(self, data: bytes) -> bool:
        self.last_received = time.monotonic()
        upload = self.upload
        if upload is not None and upload.pipe is not None:
            if upload.pipe.streaming:
                data = data[upload.feed(data):]
            if upload.pipe.error is not None or not data:
                return True  # all of it the body's; or the body broke: dropped, and closed after the answer
            self.upload = None  # whole: what follows is the next request
        return super().received(data)

    def readable(self) -> bool:
        if self.lingering:
            return True
        upload = self.upload
        if upload is not None and upload.pipe is not None and not upload.pipe.ended:
            if upload.pipe.error is not None:
                return False  # nothing more is taken in; the answer goes out, then a gentle close
            return upload.pipe.has_room() and not (self.will_close or self.close_when_flushed)
        return super().readable()

    def writable(self) -> bool:
        if self.lingering:
            return self.will_close
        download = self._download_ahead()
        if download is not None and not self.will_close:
            if download.broken():  # its transfer failed: end the answer short, by closing
                self.will_close = True
                return True
            if download.waiting():  # its next bytes are still on their way: fill() will wake us
                return False
        return super().writable()

    def _download_ahead(self) -> Any:
        """The download (app.download_file's) whose bytes are next to be sent, if any."""
        if not self.total_outbufs_len:
            return None
        for outbuf in self.outbufs:
            if len(outbuf):
                source = getattr(outbuf, "file", None) if isinstance(outbuf, ReadOnlyFileBasedBuffer) else None
                return source if hasattr(source, "waiting") else None
        return None

    def handle_read(self) -> None:
        if self.lingering:
            self._drop_read()
            return
        # waitress's handle_read, with larger reads while a body arrives (see BODY_RECV_BYTES)
        size = self.adj.recv_bytes
        body = self.upload if self.upload is not None else self.request
        receiver = getattr(body, "body_rcv", None)
        if receiver is not None:
            size = max(size, min(BODY_RECV_BYTES, getattr(receiver, "remain", BODY_RECV_BYTES)))
        try:
            data = self.recv(size)
        except OSError:
            if self.adj.log_socket_errors:
                self.logger.exception("Socket error")
            self.handle_close()
            return
        if data:
            self.last_activity = time.time()
            self.received(data)
        else:
            self.connected = False

    def send_continue(self) -> None:
        request = self.request
        super().send_continue()  # it marks the request incomplete, to wait for the body: a streamed one goes now
        if request is not None and request.pipe is not None:
            request.completed = True

    def service(self) -> None:
        request = self.requests[0] if self.requests else None
        try:
            super().service()
        finally:
            self.ready_since = time.monotonic()  # the client's clock for its next head starts now
            if request is not None and request.pipe is not None:
                request.pipe.fail(BadInput("the upload was answered before its body was whole"))
                self.server.streams.give()

    # -- deadlines (NodeServer.maintenance, on the I/O thread) --

    def check_deadlines(self, now: float, header_timeout: float, body_timeout: float) -> None:
        if self.lingering:
            if now >= self.linger_until:
                self.will_close = True
            return
        upload = self.upload
        if upload is not None and upload.pipe is not None and upload.pipe.streaming:
            if not upload.pipe.has_room():
                self.last_received = now  # the node is behind, not the client
            elif now - self.last_received > body_timeout:
                upload.pipe.fail(RequestTimeout(f"the request body stopped arriving for {body_timeout:g} s "
                                                f"(body_timeout)"))
                log.info("%s: 408, a streamed upload paused longer than body_timeout", self.addr[0] if self.addr
                         else "-")
            return
        if self.requests or self.total_outbufs_len or self.will_close or self.close_when_flushed:
            self.ready_since = now  # serving it, or sending it an answer: not the client's time
            return
        request = self.request
        if request is None or not request.headers_finished:
            if now - self.ready_since > header_timeout:
                if request is None:
                    self.will_close = True  # nothing of a request came: close, no answer
                else:
                    self.answer_late(f"the request head did not arrive whole within {header_timeout:g} s "
                                     f"(header_timeout)")
        elif not request.completed and now - self.last_received > body_timeout:
            self.answer_late(f"the request body stopped arriving for {body_timeout:g} s (body_timeout)")

    def answer_late(self, message: str) -> None:
        """408 and close, written from the I/O thread (no request of this channel is being served)."""
        with self.requests_lock:
            request, self.request = self.request, None
        if request is not None:
            request.close()
        status, headers, body = Refusal(RequestTimeout(message)).to_response()
        lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in headers),
                 f"Content-Length: {len(body)}", "Connection: close", f"Server: {self.adj.ident}",
                 f"Date: {waitress.utilities.build_http_date(time.time())}"]
        answer = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        with self.outbuf_lock:
            self.outbufs[-1].append(answer)
            self.total_outbufs_len += len(answer)
            self.current_outbuf_count += len(answer)
        self.refused = True
        self.close_when_flushed = True
        log.info("%s: 408, %s", self.addr[0] if self.addr else "-", message)

    # -- the gentle close --

    def _drop_read(self) -> None:
        try:
            data = self.recv(self.adj.recv_bytes)  # b"" once the client closed: recv closes the channel
        except OSError:
            self.handle_close()
            return
        self.lingered_bytes += len(data)
        if self.lingered_bytes > LINGER_BYTES:
            self.handle_close()

    def handle_close(self) -> None:
        """After a refusal, half-close instead: the answer is sent, the client sees the end of it, and what it
        still sends is dropped until it closes or LINGER_SECONDS pass. Closing at once with its body unread
        would reset the connection, and a client still sending would never read the answer."""
        upload = self.upload
        if upload is not None and upload.pipe is not None:  # the client went away in the middle of its upload
            upload.pipe.fail(BadInput(f"the client closed the connection after {upload.pipe.received} bytes of "
                                      f"its upload"))
        if self.refused and not self.lingering and self.socket is not None and not self.total_outbufs_len:
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            else:
                self.lingering = True
                self.will_close = self.close_when_flushed = False
                self.linger_until = time.monotonic() + LINGER_SECONDS
                return
        self.lingering = False
        super().handle_close()


class NodeServer(waitress.server.TcpWSGIServer):
    """waitress's TCP server with NodeChannel connections, their deadlines checked every second, and streamed
    uploads served by the threads of `streams`."""

    channel_class = NodeChannel

    def __init__(self, application: Any, gate: Gate, streams: UploadStreams | None = None, **kw: Any) -> None:
        self.gate = gate
        self.streams = streams
        super().__init__(application, **kw)

    def add_task(self, task: Any) -> None:
        requests = getattr(task, "requests", None)
        if self.streams is not None and requests and getattr(requests[0], "pipe", None) is not None:
            self.streams.dispatcher.add_task(task)
        else:
            super().add_task(task)

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # waitress: closes connections idle for channel_timeout (a reader that stopped)
        config, monotonic = self.gate.config, time.monotonic()
        for channel in list(self.active_channels.values()):
            if isinstance(channel, NodeChannel):
                channel.check_deadlines(monotonic, config.header_timeout, config.body_timeout)


def connection_limit(wanted: int) -> int:
    """`wanted`, or less where the platform cannot serve that many: select() without poll() (Windows), or a
    descriptor limit the process cannot raise far enough (raised here where it can)."""
    limit = wanted
    if not hasattr(select, "poll") and limit > SELECT_LIMIT:
        log.warning("connection_limit %d lowered to %d: this platform has no poll(), and select() takes no more",
                    limit, SELECT_LIMIT)
        limit = SELECT_LIMIT
    try:
        import resource
    except ImportError:  # Windows: no descriptor limit of this kind
        return limit
    needed = DESCRIPTORS_PER_CONNECTION * limit + RESERVED_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        fitted = max(1, (soft - RESERVED_DESCRIPTORS) // DESCRIPTORS_PER_CONNECTION)
        log.warning("connection_limit %d lowered to %d: the process may open only %d files (ulimit -n)",
                    limit, fitted, soft)
        limit = fitted
    return limit


def create_server(app: Any, gate: Gate, config: Config) -> Any:
    """What waitress.server.create_server does, with NodeServer for its TcpWSGIServer."""
    adj = Adjustments(host=config.host, port=config.port, threads=config.threads, ident=SERVER_IDENT,
                      # the Gate holds each endpoint to its own limit; this is waitress's backstop above them all
                      max_request_body_size=max(config.max_upload_bytes, config.max_body_bytes) + 1,
                      connection_limit=connection_limit(config.connection_limit),
                      cleanup_interval=MAINTENANCE_SECONDS, asyncore_use_poll=True)
    socket_map: dict[int, Any] = {}
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    streams = UploadStreams(config.upload_streams) if config.upload_streams > 0 else None
    servers = [NodeServer(app, gate, streams, map=socket_map, dispatcher=dispatcher, adj=adj, sockinfo=sockinfo)
               for sockinfo in adj.listen]
    if len(servers) == 1:
        return servers[0]
    multi = waitress.server.MultiSocketServer(socket_map, adj, [(s.effective_host, s.effective_port) for s in servers],
                                              dispatcher, servers[-1].log_info)
    multi.streams = streams  # type: ignore[attr-defined]  # for serve() to stop their threads
    return multi


def refuse_unsafe_address(config: Config) -> None:
    if config.host not in LOOPBACK_HOSTS and not config.api_key:
        raise SystemExit(f"error: refusing to listen on {config.host} without an API key; "
                         f"set --api-key (EMR_API_KEY) or listen on 127.0.0.1")


def block_signals(signals: set[signal.Signals], block: bool) -> None:
    if hasattr(signal, "pthread_sigmask"):  # POSIX; Windows delivers signals to the main thread anyway
        signal.pthread_sigmask(signal.SIG_BLOCK if block else signal.SIG_UNBLOCK, signals)


def serve(config: Config) -> None:
    """Serve one node with waitress until SIGINT or SIGTERM."""
    refuse_unsafe_address(config)
    app = create_app(config)
    node: Node = app.extensions["emr_node"]
    waitress_errors_as_json()
    # Threads started while the stop signals are blocked inherit the block, so SIGTERM and
    # SIGINT reach the main thread and interrupt its poll() at once, not a second later.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    block_signals(stop_signals, True)
    try:
        server = create_server(app, app.extensions["emr_gate"], config)
        node.start()
    finally:
        block_signals(stop_signals, False)
    for stop_signal in stop_signals:
        signal.signal(stop_signal, lambda *_: sys.exit(0))
    log.info("%s node on %s (chain of %d, IPFS API %s, data %s, up to %d connections)", config.role_name,
             config.own_url, len(node.chain()), config.ipfs_api, config.data_path, server.adj.connection_limit)
    try:
        server.run()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        if server.streams is not None:
            server.streams.shutdown()
        node.close()
        log.info("node on %s stopped", config.own_url)


# `python app.py COMMAND [flags]`: things an operator does to a node that is not running.
COMMANDS: dict[str, Callable[[Config], str]] = {"migrate-state": migrate_state, "identity": show_identity}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = COMMANDS.get(argv[0]) if argv else None
    config = load_config(argv[1:] if command else argv)
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [%(name)s :" + str(config.port) + "] %(message)s")
    try:
        if command:
            print(command(config))
        else:
            serve(config)
    except NodeError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
