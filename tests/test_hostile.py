"""Hostile input: path escapes in every path field, oversized and odd bodies, uploads beyond the cap."""
from __future__ import annotations

import base64
import hashlib
import io
import os
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import paper_transaction, wait_until
from errors import IpfsRefused
from ipfs_client import IpfsClient

MIB = 1024 * 1024
ESCAPES = {
    "dot-dot": "../outside.txt",
    "nested-dot-dot": "downloads/../../outside.txt",
    "absolute": "/etc/passwd",
    "symlink-out": "link-out",
    "nul-byte": "MRI.pdf\x00.aes",
    "long-name": "a" * 300 + ".pdf",
    "long-path": "d/" * 600 + "x",
}
PATH_FIELDS = [
    ("/create_hash", {}, "file_path"),
    ("/encrypt_file", {"password": "p"}, "file_path"),
    ("/decrypt_file", {"password": "p"}, "file_path"),
    ("/encrypt_file", {"file_path": "MRI.pdf", "password": "p"}, "output_path"),
    ("/decrypt_file", {"file_path": "MRI.pdf.aes", "password": "p"}, "output_path"),
]


@pytest.fixture
def victim(client, tmp_path: Path):
    """A node with a record inside its data directory and a secret and a symlink pointing outside it."""
    (tmp_path / "outside.txt").write_text("not for the node")
    (client.node.data_dir / "link-out").symlink_to(tmp_path / "outside.txt")
    (client.node.data_dir / "MRI.pdf").write_bytes(os.urandom(1000))
    client.post("/encrypt_file", json={"file_path": "MRI.pdf", "password": "p"})
    return client


def listing(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


@pytest.mark.parametrize("escape", ESCAPES.values(), ids=ESCAPES.keys())
@pytest.mark.parametrize("path, body, field", PATH_FIELDS, ids=[f"{p}:{f}" for p, _, f in PATH_FIELDS])
def test_path_escape_is_refused_in_every_path_field(victim, tmp_path: Path, path, body, field, escape) -> None:
    before, outside = listing(victim.node.data_dir), listing(tmp_path)
    response = victim.post(path, json={**body, field: escape})
    assert response.status_code == 400, response.get_json()
    assert field in response.get_json()["error"]
    assert listing(victim.node.data_dir) == before and listing(tmp_path) == outside
    assert (tmp_path / "outside.txt").read_text() == "not for the node"


def test_recorded_file_name_cannot_steer_a_download_out_of_the_downloads_folder(ipfs_client) -> None:
    (ipfs_client.node.data_dir / "scan.bin").write_bytes(b"scan")
    uploaded = ipfs_client.post("/create_hash", json={"file_path": "scan.bin"}).get_json()["IPFS Hash"]
    refused = ipfs_client.post("/add_transaction", json=paper_transaction(ipfs_hash=uploaded["Hash"],
                                                                          file_name="../../escape.bin"))
    assert refused.status_code == 400 and "file_name" in refused.get_json()["error"]
    ipfs_client.post("/add_transaction", json=paper_transaction(ipfs_hash=uploaded["Hash"], file_name=".hidden"))
    ipfs_client.get("/mine_block")
    fetched = ipfs_client.post("/get_file", json={"ipfs_hash": uploaded["Hash"]}).get_json()
    assert fetched["path"] == "downloads/hidden"


@pytest.mark.parametrize("body, named", [
    (b'{"user_id": "' + b"x" * (2 * MIB) + b'"}', None),
    (b'{"a": ' * 40 + b"1" + b"}" * 40, "nested"),
    (b'{"user_id": 1' + b"0" * 5000 + b"}", "JSON"),
    (b"\xc3\x28\xa0\xa1", "UTF-8"),
    (b'{"user_id": "x", "user_id": "y", "ipfs_hash": "Qm", "EHR_name": "M"}', "ipfs_hash"),
], ids=["huge", "deep", "huge-number", "not-utf8", "duplicate-keys"])
def test_odd_bodies_are_refused_with_a_4xx_json_error(client, body, named) -> None:
    response = client.post("/add_transaction", data=body, content_type="application/json")
    assert 400 <= response.status_code < 500
    if named:
        assert named in response.get_json()["error"]
    else:
        assert response.status_code == 413 and "larger" in response.get_json()["error"]
    assert client.node.blockchain.pending == []


@pytest.mark.parametrize("field", ["x", "a\nb", 'quote"d'])
def test_upload_with_an_unexpected_form_field_is_a_400_naming_it(client, field) -> None:
    response = client.post("/create_hash", content_type="multipart/form-data",
                           data={field: "x", "file": (io.BytesIO(b"scan"), "scan.bin")})
    assert response.status_code == 400 and "unknown field" in response.get_json()["error"]


def test_connect_node_refuses_hosts_the_operator_did_not_allow(client) -> None:
    for url in ("http://192.168.1.10:5003", "http://example.org:5003", "file:///etc/passwd",
                "http://[::ffff:10.0.0.1]:5003", "http://127.0.0.1:5003@evil:80", "gopher://127.0.0.1:70"):
        response = client.post("/connect_node", json={"nodes": [url]})
        assert response.status_code == 400, url
    assert client.node.network.peers == []


def test_allowed_networks_are_a_setting(make_client) -> None:
    # Both addresses are loopback: tests never let a node reach beyond 127.0.0.0/8.
    node = make_client(peer_allow="127.0.0.2/32")
    assert node.post("/connect_node", json={"nodes": ["http://127.0.0.2:9"]}).status_code == 201
    assert node.post("/connect_node", json={"nodes": ["http://127.0.0.1:5003"]}).status_code == 400


@pytest.fixture
def capped_node(spawn_node, kubo, tmp_path: Path):
    return spawn_node(max_upload_bytes=MIB, ipfs_api=kubo.api_url, data_dir=tmp_path / "capped")


def test_upload_beyond_the_cap_is_refused_without_filling_the_disk(capped_node, tmp_path: Path) -> None:
    response = requests.post(capped_node.url + "/create_hash", files={"file": ("big.bin", b"x" * (5 * MIB))},
                             timeout=30)
    assert response.status_code == 413 and "larger" in response.json()["error"]
    assert listing(tmp_path / "capped" / ".emr" / "uploads") == []
    small = requests.post(capped_node.url + "/create_hash", files={"file": ("small.bin", b"x" * 1000)}, timeout=30)
    assert small.status_code == 200


def test_chunked_upload_without_a_length_is_cut_off_at_the_cap(capped_node, tmp_path: Path) -> None:
    boundary = "emrboundary"

    def body():
        yield f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n\r\n".encode()
        for _ in range(40):
            yield b"x" * 256 * 1024
        yield f"\r\n--{boundary}--\r\n".encode()

    response = requests.post(capped_node.url + "/create_hash", data=body(), timeout=30,
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413
    assert listing(tmp_path / "capped" / ".emr" / "uploads") == []
    assert capped_node.get("/health").status_code == 200


ODD_OUTPUTS = {
    "the node's store": (".emr/store.sqlite3", True),
    "the data directory itself": (".", True),
    "the downloads folder": ("downloads", True),
    "a name past 255 bytes": (None, False),
}


@pytest.mark.parametrize("case", ODD_OUTPUTS, ids=list(ODD_OUTPUTS))
def test_odd_output_paths_are_refused_and_write_nothing(spawn_node, tmp_path: Path, case: str) -> None:
    data_dir = tmp_path / "odd"
    node = spawn_node(data_dir=data_dir, persist=True)
    node.post("/add_transaction", paper_transaction())
    output, decrypting = ODD_OUTPUTS[case]
    name = "r" * 253 if output is None else "MRI.pdf"
    (data_dir / name).write_bytes(os.urandom(1000))
    assert node.post("/encrypt_file", {"file_path": name, "password": "p", "output_path": "MRI.pdf.aes"}
                     ).status_code == 200
    before, around = listing(data_dir), listing(tmp_path)
    store = (data_dir / ".emr" / "store.sqlite3").read_bytes()
    body = {"file_path": name, "password": "p"} if output is None else \
        {"file_path": "MRI.pdf.aes" if decrypting else name, "password": "p", "output_path": output, "overwrite": True}
    response = node.post("/decrypt_file" if decrypting else "/encrypt_file", body)
    assert 400 <= response.status_code < 500, response.text
    assert listing(data_dir) == before and listing(tmp_path) == around
    assert (data_dir / ".emr" / "store.sqlite3").read_bytes() == store
    node.stop()
    node.start()
    assert node.get("/health").json()["pending"] == 1


def test_a_lone_surrogate_in_a_path_is_a_400(spawn_node) -> None:
    node = spawn_node()
    response = requests.post(node.url + "/create_hash", data=b'{"file_path": "scan\\ud800.pdf"}', timeout=10,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "file_path" in response.json()["error"]


def test_a_string_shaped_like_a_cid_that_is_none_is_a_400_not_an_ipfs_fault(ipfs_client) -> None:
    response = ipfs_client.post("/get_file", json={"ipfs_hash": "b" + "a" * 60})
    assert response.status_code == 400 and "ipfs_hash" in response.get_json()["error"]


def cid_v1(codec: int, hash_function: int, digest: bytes) -> str:
    """A CIDv1 in base32, as Kubo writes them, of any codec, hash function and digest."""
    def varint(number: int) -> bytes:
        out = bytearray()
        while number >= 0x80:
            out.append(number & 0x7F | 0x80)
            number >>= 7
        return bytes(out + bytes([number]))
    data = varint(1) + varint(codec) + varint(hash_function) + varint(len(digest)) + digest
    return "b" + base64.b32encode(data).decode().lower().rstrip("=")


RAW, SHA2_256, IDENTITY = 0x55, 0x12, 0x00
KUBO_REFUSES = {  # well-formed CIDs that Kubo (boxo's verifcid) will not look up, whatever it holds
    "a hash function Kubo does not take": cid_v1(RAW, 0x9999, hashlib.sha256(b"scan").digest()),
    "a digest longer than Kubo allows": cid_v1(RAW, SHA2_256, bytes(129)),
    "an identity CID longer than Kubo allows": cid_v1(RAW, IDENTITY, b"a" * 129),
}


@pytest.mark.parametrize("cid", KUBO_REFUSES.values(), ids=KUBO_REFUSES.keys())
def test_a_cid_the_real_kubo_refuses_is_ipfs_refused_at_once_not_an_ipfs_fault(kubo, cid: str) -> None:
    daemon = IpfsClient(kubo.api_url, timeout=10, lookup_timeout=5)
    started = time.monotonic()
    for call in (lambda: daemon.open(cid), lambda: daemon.stat(cid), lambda: daemon.pin_add(cid, timeout=5)):
        with pytest.raises(IpfsRefused, match="Kubo refused it"):
            call()
    assert time.monotonic() - started < 5, "Kubo looked it up instead of refusing it"


@pytest.mark.parametrize("cid", KUBO_REFUSES.values(), ids=KUBO_REFUSES.keys())
def test_a_cid_kubo_refuses_is_a_400_for_a_download_and_a_record_not_retried(spawn_node, kubo, cid: str) -> None:
    node = spawn_node(ipfs_api=kubo.api_url)
    for response in (node.post("/get_file", {"ipfs_hash": cid}), node.get("/get_file", params={"ipfs_hash": cid})):
        assert response.status_code == 400, response.text
        assert cid in response.json()["error"] and "Kubo refused" in response.json()["error"]
    assert node.post("/add_transaction", paper_transaction(ipfs_hash=cid)).status_code == 201
    assert node.get("/mine_block").status_code == 200

    def failed_pin() -> dict[str, Any] | None:
        pin = node.get(f"/records/{cid}", params={"peers": "false"}).json()["pin"]
        return pin if pin and pin["state"] == "failed" else None
    pin = wait_until(failed_pin)
    assert "IpfsRefused" in pin["reason"] and pin["retry_in_ms"] is None, pin  # never fetchable: not retried
