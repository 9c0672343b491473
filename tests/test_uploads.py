"""Uploads and downloads through real node processes (waitress) and a real Kubo: an upload goes to Kubo as it
arrives and leaves nothing behind when it is cut off; every size comes back byte for byte, whichever way it went."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import closes, paper_transaction, read_answer, wait_until

MIB = 1024 * 1024
SIZES = {"empty": 0, "one-byte": 1, "64KB": 64_102, "few-MiB": 3 * MIB + 123}
BOUNDARY = "emrtestboundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def multipart_body(data: bytes, name: str = "scan.bin", field: str = "file") -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def upload_head(node: Any, length: int, extra: str = "") -> bytes:
    return (f"POST /create_hash HTTP/1.1\r\nHost: 127.0.0.1:{node.port}\r\nContent-Type: {MULTIPART}\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


def answer(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of one answer on a raw socket."""
    status, _, body = read_answer(sock, timeout)
    return status, json.loads(body)


def files_in(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


def streams_now(node: Any) -> bool:
    """Whether an upload would stream now (a slot is free): one whose first part is a stray field is answered at
    once when it streams, and only after its whole body when it is read whole first."""
    probe = socket.create_connection(("127.0.0.1", node.port))
    try:
        first = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n').encode()
        probe.sendall(upload_head(node, 10 * MIB) + first)
        try:
            status, body = answer(probe, timeout=3)
        except socket.timeout:
            return False
        return status == 400 and "'note'" in body["error"]  # (read whole first, it may time out: 408)
    finally:
        probe.close()


@pytest.fixture
def node_with(spawn_node, kubo, tmp_path: Path):
    def make(name: str = "node", **settings: Any) -> Any:
        data_dir = tmp_path / name
        data_dir.mkdir(exist_ok=True)
        node = spawn_node(ipfs_api=kubo.api_url, data_dir=data_dir, **settings)
        node.data_dir = data_dir
        return node
    return make


@pytest.mark.parametrize("streams", [4, 0], ids=["streamed", "read-whole-first"])
def test_every_size_goes_up_and_comes_back_byte_for_byte(node_with, kubo, tmp_path: Path, streams: int) -> None:
    node = node_with(upload_streams=streams)
    for name, size in SIZES.items():
        data = os.urandom(size)
        source = tmp_path / f"{name}.bin"
        source.write_bytes(data)
        uploaded = requests.post(node.url + "/create_hash", files={"file": (source.name, data)}, timeout=60)
        assert uploaded.status_code == 200, uploaded.text
        cid = uploaded.json()["IPFS Hash"]["Hash"]
        assert cid == kubo.ipfs("add", "--only-hash", "-Q", str(source)).strip(), name
        assert uploaded.json()["IPFS Hash"]["Name"] == source.name

        def chunks():  # a client that does not say the length: Transfer-Encoding: chunked
            body = multipart_body(data, source.name)
            for start in range(0, len(body), 100_000):
                yield body[start:start + 100_000]

        chunked = requests.post(node.url + "/create_hash", data=chunks(), headers={"Content-Type": MULTIPART},
                                timeout=60)
        assert chunked.status_code == 200 and chunked.json()["IPFS Hash"]["Hash"] == cid, chunked.text

        head = requests.head(node.url + f"/get_file?ipfs_hash={cid}", timeout=60)
        assert head.status_code == 200 and head.headers["Content-Length"] == str(size) and not head.content
        streamed = requests.get(node.url + f"/get_file?ipfs_hash={cid}", timeout=60)
        assert streamed.status_code == 200 and streamed.content == data, name
        fetched = node.post("/get_file", {"ipfs_hash": cid})
        assert fetched.status_code == 200 and fetched.json()["size"] == size
        assert (node.data_dir / fetched.json()["path"]).read_bytes() == data
        again = node.post("/get_file", {"ipfs_hash": cid})  # written over the last copy
        assert again.status_code == 200 and (node.data_dir / again.json()["path"]).read_bytes() == data
    assert not list((node.data_dir / ".emr" / "uploads").iterdir())


def test_an_upload_cut_off_half_way_records_nothing_and_leaves_no_file(node_with, kubo) -> None:
    node = node_with("cut", upload_streams=1)
    before, pins = files_in(node.data_dir), set(kubo.rpc("pin/ls", type="recursive")["Keys"])
    body = multipart_body(os.urandom(8 * MIB))
    sock = socket.create_connection(("127.0.0.1", node.port))
    sock.sendall(upload_head(node, len(body)))
    sock.sendall(body[:len(body) // 2])
    time.sleep(0.5)  # half of it has reached Kubo by now
    sock.close()
    wait_until(lambda: streams_now(node), timeout=20)  # the node noticed, and gave the upload's slot back
    health = node.get("/health").json()
    assert health["length"] == 1 and health["pending"] == 0
    assert files_in(node.data_dir) == before, "a partial file was left in the data directory"
    assert set(kubo.rpc("pin/ls", type="recursive")["Keys"]) == pins, "Kubo kept the partial file"
    whole = requests.post(node.url + "/create_hash", files={"file": ("after.bin", b"after the cut")}, timeout=30)
    assert whole.status_code == 200


def publish_body(data: bytes) -> bytes:
    """A browser's publish_record: the record's fields first, then the file (so half the body holds every field)."""
    fields = {"EHR_name": "MRI", "user_id": "xxxxx", "password": "patient's password"}
    return "".join(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
                   for name, value in fields.items()).encode() + multipart_body(data, "MRI.pdf")


def test_a_publish_record_upload_cut_off_half_way_records_nothing_and_leaves_no_file(
        node_with, kubo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    temp = tmp_path / "node-temp"  # the node's temporary folder (waitress spools large bodies there)
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    node = node_with("publish-cut")
    before, chain = files_in(node.data_dir), node.chain()
    pins = set(kubo.rpc("pin/ls", type="recursive")["Keys"])
    body = publish_body(os.urandom(8 * MIB))
    head = (f"POST /publish_record HTTP/1.1\r\nHost: 127.0.0.1:{node.port}\r\nContent-Type: {MULTIPART}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", node.port))
    sock.sendall(head + body[:len(body) // 2])
    time.sleep(0.5)  # half of it has reached the node by now
    sock.close()
    time.sleep(1)  # whatever the node makes of the half it got
    health = node.get("/health").json()
    assert health["pending"] == 0 and node.chain() == chain
    assert files_in(node.data_dir) == before, "a partial file was left in the data directory"
    assert files_in(temp) == [], "a partial file was left in the temporary folder"
    assert set(kubo.rpc("pin/ls", type="recursive")["Keys"]) == pins, "Kubo kept the partial file"

    whole = socket.create_connection(("127.0.0.1", node.port))  # the same upload, sent whole, is recorded once
    whole.sendall(head + body)
    status, result = answer(whole, timeout=60)
    whole.close()
    assert status == 201, result
    assert node.get("/health").json()["pending"] == 1
    assert set(kubo.rpc("pin/ls", type="recursive")["Keys"]) - pins == {result["IPFS Hash"]["Hash"]}
    assert files_in(node.data_dir) == before and files_in(temp) == []


def test_a_streamed_upload_that_stops_gets_a_408_and_gives_its_slot_back(node_with) -> None:
    node = node_with("stalled", upload_streams=1, body_timeout=1)
    sock = socket.create_connection(("127.0.0.1", node.port))
    body = multipart_body(os.urandom(MIB))
    sock.sendall(upload_head(node, len(body)) + body[:100_000])
    status, error = answer(sock, timeout=8)
    assert status == 408 and "body_timeout" in error["error"]
    assert closes(sock, 8)
    wait_until(lambda: streams_now(node), timeout=20)
    assert node.get("/health").json()["pending"] == 0


def test_slow_uploads_hold_upload_threads_never_request_threads(node_with) -> None:
    node = node_with("slow", upload_streams=2, threads=2)
    stalled = []
    for _ in range(4):  # two streamed (their own threads), two read whole first (no thread at all)
        sock = socket.create_connection(("127.0.0.1", node.port))
        sock.sendall(upload_head(node, 5 * MIB) + multipart_body(b"")[:120])
        stalled.append(sock)
    try:
        time.sleep(0.3)
        for _ in range(5):
            started = time.perf_counter()
            assert requests.get(node.url + "/health", timeout=2).status_code == 200
            assert node.post("/add_transaction", paper_transaction(), timeout=2).status_code == 201
            assert time.perf_counter() - started < 2
        assert not streams_now(node)  # both slots taken: a fifth upload would be read whole first
    finally:
        for sock in stalled:
            sock.close()
    wait_until(lambda: streams_now(node), timeout=20)


def test_an_upload_refused_by_its_first_part_is_answered_while_the_client_still_sends(node_with) -> None:
    node = node_with("early")
    sock = socket.create_connection(("127.0.0.1", node.port))
    sock.sendall(upload_head(node, 50 * MIB))
    sock.sendall(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="comment"\r\n\r\nx\r\n'.encode())
    status, error = answer(sock)
    assert status == 400 and "unknown field(s): 'comment'" in error["error"]
    assert closes(sock, 8)  # the rest of the body can never be read as a next request


def test_a_client_that_expects_100_continue_gets_it_and_its_upload_streams(node_with, kubo, tmp_path) -> None:
    node = node_with("continue")
    data = os.urandom(2 * MIB)
    (tmp_path / "scan.bin").write_bytes(data)
    body = multipart_body(data)
    sock = socket.create_connection(("127.0.0.1", node.port))
    sock.sendall(upload_head(node, len(body), "Expect: 100-continue\r\n"))
    sock.settimeout(5)
    assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue")
    sock.sendall(body)
    status, result = answer(sock)
    assert status == 200
    assert result["IPFS Hash"]["Hash"] == kubo.ipfs("add", "--only-hash", "-Q", str(tmp_path / "scan.bin")).strip()
