"""Hostile clients against real node processes: slow heads, slow bodies, bodies refused before they are read,
slow readers of downloads, many connections, cross-site requests. The attacker is the test's own sockets.

And the waitress internals server.py relies on, pinned (waitress==3.0.2): these fail first if an upgrade moves them.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import socket
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import requests
import waitress.buffers
import waitress.channel
import waitress.parser
import waitress.server
import waitress.task
import waitress.wasyncore
from waitress.adjustments import Adjustments
from waitress.buffers import ReadOnlyFileBasedBuffer

import server
from app import create_app
from conftest import closes, node_config, read_answer, paper_transaction, wait_until
from scripts.cluster import ROOT, free_port

KEY = "correct-horse-battery-staple-0123456789"
MIB = 1024 * 1024
HEALTH_TIMEOUT = 2.0  # what a user would still call answering; the 100 ms target is measured in bench/attack.py


# -- raw sockets: the attacker --------------------------------------------------------------

def connect(node: Any, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", node.port))
    return sock


def timed_health(node: Any, **kwargs: Any) -> float:
    started = time.perf_counter()
    response = requests.get(node.url + "/health", timeout=HEALTH_TIMEOUT, **kwargs)
    assert response.status_code == 200
    return time.perf_counter() - started


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def tree_size(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


# -- slow heads and slow bodies ----------------------------------------------------------------

def test_110_sockets_trickling_heads_do_not_lock_out_health_and_are_cut_off(spawn_node) -> None:
    node = spawn_node(header_timeout=3)
    attackers = [connect(node) for _ in range(120)]
    stop = threading.Event()

    def trickle() -> None:
        for sock in attackers:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        number = 0
        while not stop.wait(0.3):
            number += 1
            for sock in attackers:
                try:
                    sock.send(b"X-Slow-%d: y\r\n" % number)
                except OSError:
                    pass

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        time.sleep(0.5)
        answered = [timed_health(node) for _ in range(10)]
        print(f"/health while 120 sockets trickle heads: max {max(answered) * 1000:.1f} ms over {len(answered)} calls")
        # past the deadline every trickling socket is answered 408 and closed
        started = time.monotonic()
        assert all(closes(sock, 8.0) for sock in attackers)
        print(f"all 120 cut off within {time.monotonic() - started + 0.5:.1f} s of their first byte (header_timeout 3)")
    finally:
        stop.set()
        trickler.join()
        for sock in attackers:
            sock.close()
    assert timed_health(node) < HEALTH_TIMEOUT


def test_a_slow_head_gets_a_408_naming_the_setting(spawn_node) -> None:
    node = spawn_node(header_timeout=1)
    sock = connect(node)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    status, _, body = read_answer(sock, timeout=6)
    assert status == 408 and "header_timeout" in json.loads(body)["error"]
    assert closes(sock, 6)
    idle = connect(node)  # a connection that sends nothing is closed, without an answer
    assert closes(idle, 6)


def test_slow_bodies_are_cut_off_and_never_hold_a_worker(spawn_node) -> None:
    node = spawn_node(body_timeout=2, threads=2)
    stalled = []
    for _ in range(10):  # more stalled bodies than worker threads
        sock = connect(node)
        sock.sendall(b"POST /add_transaction HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"user_id\": ")
        stalled.append(sock)
    time.sleep(0.3)
    assert timed_health(node) < HEALTH_TIMEOUT
    assert node.post("/add_transaction", paper_transaction(), timeout=HEALTH_TIMEOUT).status_code == 201
    status, _, body = read_answer(stalled[0], timeout=8)
    assert status == 408 and "body_timeout" in json.loads(body)["error"]
    assert all(closes(sock, 8) for sock in stalled)
    assert len(node.chain()) == 1 and requests.get(node.url + "/health").json()["pending"] == 1


def test_more_than_1024_connections_are_served_with_poll(spawn_node) -> None:
    node = spawn_node(connection_limit=1500)
    idle = []
    try:
        for _ in range(1100):
            sock = connect(node)
            sock.sendall(b"GET /health HTTP/1.1\r\n")
            idle.append(sock)
        time.sleep(0.5)
        assert timed_health(node) < HEALTH_TIMEOUT
        assert node.process.poll() is None
    finally:
        for sock in idle:
            sock.close()


# -- refused at the head, before the body is read ---------------------------------------------------

def test_a_keyed_node_refuses_a_300_mb_post_with_401_before_the_body_is_sent(spawn_node, tmp_path: Path) -> None:
    data_dir = tmp_path / "keyed"
    node = spawn_node(api_key=KEY, data_dir=data_dir)
    requests.get(node.url + "/health")
    rss_before, disk_before = rss_bytes(node.pid), tree_size(data_dir)
    sock = connect(node)
    sock.sendall(b"POST /add_transaction HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % (300 * MIB) + b"{" + b" " * 65535)
    started = time.perf_counter()
    status, headers, body = read_answer(sock)
    print(f"401 after {(time.perf_counter() - started) * 1000:.1f} ms, 64 KiB of 300 MiB sent")
    assert status == 401 and "API key" in json.loads(body)["error"]
    assert headers["connection"] == "close" and closes(sock, 5)
    assert rss_bytes(node.pid) < rss_before + 10 * MIB
    assert tree_size(data_dir) == disk_before and not list((data_dir / ".emr" / "uploads").iterdir())
    assert requests.get(node.url + "/health", headers={"X-API-Key": KEY}).json()["pending"] == 0


def test_a_client_that_expects_100_continue_gets_the_refusal_instead(spawn_node) -> None:
    node = spawn_node(api_key=KEY)
    sock = connect(node)
    sock.sendall(b"POST /add_transaction HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % (300 * MIB))
    status, _, _ = read_answer(sock)
    assert status == 401


def test_a_10_mb_json_body_is_refused_413_without_being_read(spawn_node) -> None:
    node = spawn_node()
    sock = connect(node)
    sock.sendall(b"POST /add_transaction HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n{\"user_id\": \"" % (10 * MIB))
    status, _, body = read_answer(sock)
    assert status == 413 and "larger" in json.loads(body)["error"] and str(MIB) in json.loads(body)["error"]
    assert closes(sock, 5)
    # the same size is fine as an upload, where max_upload_bytes applies: refused for what it is, not its size
    upload = connect(node)
    upload.sendall(b"POST /create_hash HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                   b"boundary=x\r\nContent-Length: %d\r\n\r\n" % (10 * MIB))
    upload.sendall(b"--x\r\n" + b"y" * 1000)
    upload.settimeout(0.5)
    with pytest.raises(socket.timeout):
        upload.recv(1)  # no answer yet: the node waits for the rest of the upload
    upload.close()


def test_a_chunked_json_body_is_cut_off_at_max_body_bytes(spawn_node) -> None:
    node = spawn_node(max_body_bytes=4096)
    sock = connect(node)
    sock.sendall(b"POST /add_transaction HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    for _ in range(4):
        sock.sendall(b"800\r\n" + b" " * 2048 + b"\r\n")
    status, _, body = read_answer(sock)
    assert status == 413 and "4096" in json.loads(body)["error"]


def test_cross_site_requests_over_the_wire(spawn_node) -> None:
    node = spawn_node(allowed_origins="http://records.example")
    tx = json.dumps(paper_transaction())
    for headers in ({"Content-Type": "text/plain", "Origin": "http://evil.example"},
                    {"Content-Type": "text/plain"},
                    {"Content-Type": "application/json", "Origin": "http://evil.example"},
                    {"Content-Type": "application/json", "Host": "rebind.evil.example:%d" % node.port}):
        response = requests.post(node.url + "/add_transaction", data=tx, headers=headers, timeout=10)
        assert response.status_code in (403, 415, 421), headers
        assert "Access-Control-Allow-Origin" not in response.headers
    rebound = requests.get(node.url + "/get_chain", headers={"Host": "rebind.evil.example"}, timeout=10)
    assert rebound.status_code == 421 and "allowed_hosts" in rebound.json()["error"]
    assert requests.get(node.url + "/health").json()["pending"] == 0
    preflight = requests.options(node.url + "/add_transaction", timeout=10, headers={
        "Origin": "http://records.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 204 and preflight.headers["Access-Control-Allow-Origin"] == "http://records.example"
    allowed = requests.post(node.url + "/add_transaction", data=tx, timeout=10,
                            headers={"Content-Type": "application/json", "Origin": "http://records.example"})
    assert allowed.status_code == 201 and allowed.headers["Access-Control-Allow-Origin"] == "http://records.example"
    assert "Origin" in allowed.headers["Vary"]
    refused = requests.post(node.url + "/add_transaction", data=tx, timeout=10,  # refused at the head: CORS too
                            headers={"Content-Type": "text/plain", "Origin": "http://records.example"})
    assert refused.status_code == 415 and refused.headers["Access-Control-Allow-Origin"] == "http://records.example"


def test_health_over_the_wire_leaks_nothing_without_the_key(spawn_node) -> None:
    node = spawn_node(api_key=KEY, ipfs_api="http://127.0.0.1:5999")
    public = requests.get(node.url + "/health", timeout=10)
    assert public.json() == {"status": "ok", "role": "patient"} and "5999" not in public.text
    assert requests.get(node.url + "/health", headers={"X-API-Key": KEY}).json()["ipfs_api"].endswith(":5999")


@pytest.mark.process
@pytest.mark.parametrize("key, named", [(" ", "blank"), ("short", "at least 16"), ("has a space-0123456789",
                                                                                 "whitespace")])
def test_a_blank_or_short_key_stops_the_start_with_a_clear_message(key, named) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "--port", str(free_port())],
                            env={**os.environ, "EMR_API_KEY": key}, capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert result.returncode != 0 and named in result.stderr and "EMR_API_KEY" in result.stderr
    assert "Traceback" not in result.stderr


# -- slow readers of downloads ------------------------------------------------------------------

@pytest.fixture
def big_file_node(spawn_node, kubo, tmp_path: Path):
    data_dir = tmp_path / "reader"
    data_dir.mkdir()
    content = os.urandom(40 * MIB)
    (data_dir / "big.bin").write_bytes(content)
    node = spawn_node(ipfs_api=kubo.api_url, data_dir=data_dir, max_spool_bytes=20 * 40 * MIB)
    cid = node.post("/create_hash", {"file_path": "big.bin"}, timeout=120).json()["IPFS Hash"]["Hash"]
    return node, cid, hashlib.sha256(content).hexdigest(), data_dir


def test_18_clients_not_reading_a_large_download_hold_no_worker(big_file_node) -> None:
    node, cid, digest, data_dir = big_file_node
    readers = []
    for _ in range(18):  # more than the node's 16 worker threads
        sock = connect(node, receive_buffer=64 * 1024)
        sock.sendall(f"GET /get_file?ipfs_hash={cid} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        readers.append(sock)
    # Copying 18 x 40 MiB from Kubo takes the workers a few seconds; after that none may be left waiting for
    # a reader (before, each stayed blocked until its client read or 120 s passed)
    wait_until(lambda: requests.get(node.url + "/health", timeout=30).status_code == 200, timeout=60)
    answered = [timed_health(node) for _ in range(5)]
    added = node.post("/add_transaction", paper_transaction(), timeout=HEALTH_TIMEOUT)
    print(f"/health while 18 clients do not read 40 MiB downloads: max {max(answered) * 1000:.1f} ms")
    assert added.status_code == 201
    assert not list((data_dir / ".emr" / "uploads").iterdir())  # the spooled copies are not even listed
    for sock in readers:  # now read them: every download whole and the same
        received = hashlib.sha256()
        status, headers, _ = read_answer(sock, timeout=60, digest=received)
        assert status == 200 and int(headers["content-length"]) == 40 * MIB
        assert received.hexdigest() == digest
        sock.close()


def test_downloads_beyond_the_spool_budget_get_a_503_and_the_budget_comes_back(spawn_node, kubo,
                                                                                tmp_path: Path) -> None:
    data_dir = tmp_path / "budget"
    data_dir.mkdir()
    (data_dir / "big.bin").write_bytes(os.urandom(8 * MIB))
    node = spawn_node(ipfs_api=kubo.api_url, data_dir=data_dir, max_spool_bytes=20 * MIB)
    cid = node.post("/create_hash", {"file_path": "big.bin"}, timeout=60).json()["IPFS Hash"]["Hash"]
    holders = []
    for _ in range(2):
        sock = connect(node, receive_buffer=64 * 1024)
        sock.sendall(f"GET /get_file?ipfs_hash={cid} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        holders.append(sock)
    time.sleep(1)
    refused = requests.get(node.url + f"/get_file?ipfs_hash={cid}", timeout=10)
    assert refused.status_code == 503 and "max_spool_bytes" in refused.json()["error"]
    for sock in holders:
        sock.close()  # readers that give up: their spooled files go, and the budget comes back
    wait_until(lambda: requests.get(node.url + f"/get_file?ipfs_hash={cid}", timeout=10).status_code == 200,
               timeout=150)  # waitress notices an abandoned reader when it next writes to it
    assert not list((data_dir / ".emr" / "uploads").iterdir())


# -- the waitress internals server.py relies on -------------------------------------------------------

def test_waitress_is_the_version_server_py_was_written_against() -> None:
    assert metadata.version("waitress") == server.WAITRESS_VERSION
    assert f"waitress=={server.WAITRESS_VERSION}" in (ROOT / "requirements.txt").read_text()


def test_waitress_internals_server_py_relies_on_are_still_there() -> None:
    channel = inspect.getsource(waitress.channel.HTTPChannel)
    assert "self.parser_class(self.adj)" in channel and "self.server.add_task(self)" in channel
    assert "self.request.expect_continue" in channel and "close_when_flushed" in channel
    for name in ("requests_lock", "outbuf_lock", "outbufs", "total_outbufs_len", "current_outbuf_count",
                 "will_close", "close_when_flushed", "requests", "request", "last_activity"):
        assert name in channel, name
    for method in ("received", "service", "handle_read", "handle_close", "readable", "writable", "handle_write"):
        assert callable(getattr(waitress.channel.HTTPChannel, method)), method
    parser = inspect.getsource(waitress.parser.HTTPRequestParser.received)
    for name in ("self.headers_finished = True", "self.body_rcv", "self.body_bytes_received", "self.completed",
                 "RequestEntityTooLarge"):
        assert name in parser, name
    base = inspect.getsource(waitress.server.BaseWSGIServer)
    assert "self.maintenance(now)" in base and "self.adj.cleanup_interval" in base
    assert "self.channel_class(self, conn, addr, self.adj, map=self._map)" in base
    assert "active_channels" in base and "connection_limit" in base
    assert list(inspect.signature(waitress.server.BaseWSGIServer.__init__).parameters)[:8] == [
        "self", "application", "map", "_start", "_sock", "dispatcher", "adj", "sockinfo"]
    assert list(inspect.signature(waitress.server.MultiSocketServer.__init__).parameters) == [
        "self", "map", "adj", "effective_listen", "dispatcher", "log_info"]
    assert "e.to_response(ident)" in inspect.getsource(waitress.task.ErrorTask.execute)
    assert "isinstance(app_iter, ReadOnlyFileBasedBuffer)" in inspect.getsource(waitress.task.WSGITask.execute)
    assert "wsgi.file_wrapper" in inspect.getsource(waitress.task.WSGITask.get_environment)
    assert 'use_poll and hasattr(select, "poll")' in inspect.getsource(waitress.wasyncore.loop)
    for name in ("connection_limit", "cleanup_interval", "asyncore_use_poll", "max_request_body_size"):
        assert name in dict(Adjustments._params), name


def test_waitress_internals_of_streamed_uploads_and_downloads_are_still_there() -> None:
    """NodeParser streams a body by putting a BodyPipe where waitress's receiver keeps its buffer; NodeChannel
    re-implements handle_read (larger reads) and undoes send_continue's wait; NodeTask adds to waitress's
    environ and runs work after execute; NodeChannel.writable waits on a download's file behind waitress's
    ReadOnlyFileBasedBuffer, which waitress reads with get() and moves past with skip()."""
    import waitress.receiver
    for receiver in (waitress.receiver.FixedStreamReceiver, waitress.receiver.ChunkedReceiver):
        source = inspect.getsource(receiver)
        assert "self.buf.append(" in source and "def getfile(self):\n        return self.buf.getfile()" in source
    assert "self.remain" in inspect.getsource(waitress.receiver.FixedStreamReceiver)
    parser = inspect.getsource(waitress.parser.HTTPRequestParser)
    assert "self.body_rcv = FixedStreamReceiver(cl, buf)" in parser and "self.body_rcv = ChunkedReceiver(buf)" in parser
    assert "return body_rcv.getfile()" in parser and "body_rcv.getbuf().close()" in parser
    channel = waitress.channel.HTTPChannel
    read = inspect.getsource(channel.handle_read)
    assert "data = self.recv(self.adj.recv_bytes)" in read and "self.received(data)" in read
    assert "self.connected = False" in read and "self.last_activity = time.time()" in read
    assert "self.request.completed = False" in inspect.getsource(channel.send_continue)
    assert "len(self.requests) > self.adj.channel_request_lookahead" in inspect.getsource(channel.readable)
    flush = inspect.getsource(channel._flush_some)
    assert "outbuf.get(self.sendbuf_len)" in flush and "outbuf.skip(num_sent, True)" in flush
    assert "self.outbufs.append(data)" in inspect.getsource(channel.write_soon)
    task = waitress.task.WSGITask
    assert "self.channel.write_soon(app_iter)" in inspect.getsource(task.execute)
    environment = inspect.getsource(task.get_environment)
    assert "return environ" in environment and "self.environ = environ" in environment
    assert '"wsgi.input": request.get_body_stream()' in environment
    assert "rh = self.build_response_header()" in inspect.getsource(waitress.task.Task.write)
    buffers = inspect.getsource(ReadOnlyFileBasedBuffer)
    assert "self.file = file" in buffers and "res = file.read(numbytes)" in buffers and "file.seek(read_pos)" in buffers
    assert "self.file.seek(numbytes, 1)" in inspect.getsource(waitress.buffers.FileBasedBuffer.skip)
    assert list(inspect.signature(waitress.server.BaseWSGIServer.add_task).parameters) == ["self", "task"]
    for method in ("add_task", "set_thread_count", "shutdown"):
        assert callable(getattr(waitress.task.ThreadedTaskDispatcher, method)), method


@pytest.fixture
def gate(tmp_path: Path):
    app = create_app(node_config(tmp_path, api_key=KEY, max_body_bytes=1000))
    yield app.extensions["emr_gate"]
    app.extensions["emr_node"].close()


def parse(gate, *chunks: bytes) -> tuple[server.NodeParser, list[int], list[bool]]:
    """Feed reads to a parser as waitress's channel does (what one call leaves goes to the next); the bytes
    each read consumed, and whether the parser reported a refusal."""
    refused: list[bool] = []
    parser = server.NodeParser(Adjustments(), gate, lambda: refused.append(True))
    consumed = []
    for chunk in chunks:
        taken = 0
        while taken < len(chunk) and not parser.completed:
            taken += parser.received(chunk[taken:])
        consumed.append(taken)
    return parser, consumed, refused


def test_the_parser_refuses_at_the_head_and_drops_the_rest(gate) -> None:
    head = b"POST /add_transaction HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 314572800\r\n\r\n"
    parser, consumed, refused = parse(gate, head + b"x" * 5000)
    assert parser.completed and refused and consumed == [len(head) + 5000] and not parser.expect_continue
    status, headers, body = parser.error.to_response("emr-chain")
    assert status == "401 Unauthorized" and ("Content-Type", "application/json") in headers
    assert "API key" in json.loads(body)["error"]
    assert parser.body_rcv is None or len(parser.body_rcv) == 0  # not a byte of the body kept


def test_the_parser_lets_a_good_request_through_and_limits_a_chunked_body(gate) -> None:
    good = (b"POST //add_transaction HTTP/1.1\r\nHost: localhost\r\nX-API-Key: %s\r\nContent-Type: application/json"
            b"\r\nContent-Length: 2\r\n\r\n{}" % KEY.encode())
    parser, _, refused = parse(gate, good)
    assert parser.completed and parser.error is None and not refused and parser.body_limit == 1000
    chunked = (b"POST /add_transaction HTTP/1.1\r\nX-API-Key: %s\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" % KEY.encode())
    parser, _, refused = parse(gate, chunked, b"400\r\n" + b" " * 1024 + b"\r\n")
    assert parser.completed and refused and parser.error.code == 413


def test_the_parser_refuses_before_waitresss_own_size_limit(gate) -> None:
    parser = server.NodeParser(Adjustments(max_request_body_size=100), gate, lambda: None)
    parser.received(b"POST /add_transaction HTTP/1.1\r\nContent-Length: 5000\r\n\r\n")
    assert parser.error.code == 401  # the key first, whatever the size


def test_the_app_hands_waitress_a_file_for_a_download(monkeypatch, make_client) -> None:
    """waitress sends a ReadOnlyFileBasedBuffer from its I/O thread, without a worker: the app must return one."""
    from werkzeug.test import EnvironBuilder
    client = make_client()
    monkeypatch.setattr(client.node.ipfs, "open", lambda cid: (3, iter([b"abc"])))
    environ = EnvironBuilder(path="/get_file", query_string={"ipfs_hash": paper_transaction()["ipfs_hash"]}
                             ).get_environ()
    environ["wsgi.file_wrapper"] = ReadOnlyFileBasedBuffer
    answer = client.application(environ, lambda status, headers, exc_info=None: None)
    assert isinstance(answer, ReadOnlyFileBasedBuffer) and answer.prepare() == 3 and answer.get(3) == b"abc"
    assert client.node._spool_budget.used == 3
    answer.close()  # what waitress does once it is sent, or the reader is gone
    assert client.node._spool_budget.used == 0


# -- the connection limit, where the platform limits it ---------------------------------------------

class FakeResource:
    RLIMIT_NOFILE, RLIM_INFINITY = 7, -1

    def __init__(self, soft: int, hard: int, settable: bool) -> None:
        self.limits, self.settable = (soft, hard), settable

    def getrlimit(self, which: int) -> tuple[int, int]:
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        if not self.settable or limits[0] > self.limits[1]:
            raise ValueError("not allowed")
        self.limits = limits


def test_the_descriptor_limit_is_raised_to_fit_the_connection_limit(monkeypatch) -> None:
    fake = FakeResource(1024, 1_048_576, settable=True)
    monkeypatch.setitem(sys.modules, "resource", fake)
    assert server.connection_limit(1000) == 1000 and fake.limits[0] >= 2 * 1000
    fixed = FakeResource(512, 512, settable=False)
    monkeypatch.setitem(sys.modules, "resource", fixed)
    assert server.connection_limit(1000) == (512 - server.RESERVED_DESCRIPTORS) // 2


def test_without_poll_the_connection_limit_fits_select(monkeypatch) -> None:
    monkeypatch.delattr(server.select, "poll")
    monkeypatch.setitem(sys.modules, "resource", None)  # as on Windows: no such module
    assert server.connection_limit(1000) == server.SELECT_LIMIT
    assert server.connection_limit(100) == 100


def test_the_server_is_built_of_node_classes_on_every_listen_address(tmp_path: Path) -> None:
    app = create_app(node_config(tmp_path, host="localhost", port=free_port()))
    built = server.create_server(app, app.extensions["emr_gate"], app.extensions["emr_node"].config)
    try:
        listeners = [built] if isinstance(built, server.NodeServer) else [
            channel for channel in built.map.values() if isinstance(channel, waitress.server.BaseWSGIServer)]
        assert listeners and all(isinstance(listener, server.NodeServer) for listener in listeners)
        assert all(listener.channel_class is server.NodeChannel for listener in listeners)
        assert built.adj.asyncore_use_poll and built.adj.connection_limit == 1000
        assert all(listener.streams is built.streams for listener in listeners) and built.streams.count == 4
    finally:
        built.task_dispatcher.shutdown()
        built.streams.shutdown()
        built.close()
        app.extensions["emr_node"].close()
