"""What the node's page needs from the API, in-process: the one-go publish of an uploaded file (and that it leaves
no plaintext behind), downloads of files of the data directory, the network view, and the page itself (served
without the key, under a Content-Security-Policy, using documented endpoints only)."""
from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any

import pytest

import crypto
import openapi
from errors import IpfsUnreachable
from test_postman import shape

ROOT = Path(__file__).resolve().parent.parent
KEY = "correct-horse-battery-staple-0123456789"
UPLOAD_SPOOLED_BYTES = 600 * 1024  # more than Werkzeug keeps in memory (500 KiB): its own spool file is made too


def upload(client: Any, content: bytes = b"an MRI report", name: str = "MRI.pdf", **fields: Any) -> Any:
    form = {"file": (io.BytesIO(content), name), "EHR_name": "MRI", "user_id": "xxxxx", "password": "shared", **fields}
    return client.post("/publish_record", data={k: v for k, v in form.items() if v is not None},
                       content_type="multipart/form-data")


def leftovers(node: Any) -> list[str]:
    """Every file under the node's data directory, its private folder included (but its identity)."""
    return sorted(str(path.relative_to(node.data_dir)) for path in node.data_dir.rglob("*")
                  if path.is_file() and path.name != "identity.json")


class FakeIpfs:
    """Takes what is added, as Kubo would: its bytes are kept to compare."""

    def __init__(self) -> None:
        self.added: dict[str, bytes] = {}

    def add_file(self, stream: Any) -> dict[str, str]:
        data = stream.read()
        cid = "Qm" + "a" * 44
        self.added[cid] = data
        return {"Hash": cid, "Name": stream.name, "Size": str(len(data) + 14)}


# -- publishing an upload in one go ---------------------------------------------------------

def test_a_browser_upload_is_encrypted_with_the_password_added_and_recorded(client, monkeypatch) -> None:
    fake = FakeIpfs()
    monkeypatch.setattr(client.node, "ipfs", fake)
    content = os.urandom(UPLOAD_SPOOLED_BYTES)
    response = upload(client, content)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert body["IPFS Hash"]["Name"] == "MRI.pdf.aes" and "password" in body["message"]
    (pending,) = client.node.blockchain.pending
    assert pending["file_name"] == "MRI.pdf.aes" and pending["EHR_name"] == "MRI" and pending["user_id"] == "xxxxx"
    encrypted = client.node.data_dir / "check.aes"
    encrypted.write_bytes(fake.added[body["IPFS Hash"]["Hash"]])
    crypto.decrypt_file(encrypted, client.node.data_dir / "check", "shared")
    assert (client.node.data_dir / "check").read_bytes() == content
    encrypted.unlink()
    (client.node.data_dir / "check").unlink()
    assert leftovers(client.node) == []


@pytest.mark.parametrize("size", [10, UPLOAD_SPOOLED_BYTES])
def test_a_failed_publish_leaves_no_plaintext_and_no_partial_file(client, size) -> None:
    """No IPFS daemon: 503, and nothing of the upload anywhere in the data directory or the private folder."""
    response = upload(client, os.urandom(size))
    assert response.status_code == 503 and "IPFS" in response.get_json()["error"]
    assert leftovers(client.node) == [] and client.node.blockchain.pending == []


def test_a_publish_that_fails_while_encrypting_or_adding_leaves_nothing(client, monkeypatch) -> None:
    real_encrypt = crypto.encrypt_file

    def half_written(src: Any, dst: Any, password: str, **kwargs: Any) -> int:
        Path(dst).write_bytes(b"AES partial")
        raise OSError("disk pulled out")

    monkeypatch.setattr(crypto, "encrypt_file", half_written)
    with pytest.raises(OSError):
        client.node.publish_upload(io.BytesIO(b"x" * 4096), "MRI.pdf", "MRI", "xxxxx", "shared")
    assert leftovers(client.node) == []

    monkeypatch.setattr(crypto, "encrypt_file", real_encrypt)

    class Broken(FakeIpfs):
        def add_file(self, stream: Any) -> dict[str, str]:
            stream.read(10)
            raise IpfsUnreachable("the daemon broke off during add")

    monkeypatch.setattr(client.node, "ipfs", Broken())
    assert upload(client).status_code == 503
    assert leftovers(client.node) == [] and client.node.blockchain.pending == []


@pytest.mark.parametrize("fields, named", [
    ({"password": None}, "'password' is required"),
    ({"EHR_name": None}, "EHR_name"),
    ({"user_id": " "}, "user_id"),
    ({"colour": "blue"}, "'colour'"),
])
def test_a_publish_with_a_wrong_field_is_refused_before_anything_is_done(client, fields, named) -> None:
    response = upload(client, **fields)
    assert response.status_code == 400 and named in response.get_json()["error"]
    assert leftovers(client.node) == [] and client.node.blockchain.pending == []


def test_a_multipart_publish_without_the_file_is_refused(client) -> None:
    response = client.post("/publish_record", data={"EHR_name": "MRI", "user_id": "x", "password": "p"},
                           content_type="multipart/form-data")
    assert response.status_code == 400 and "'file'" in response.get_json()["error"]


def test_a_signed_node_refuses_a_password_it_would_not_use(make_client) -> None:
    signed = make_client(security="signed")
    response = upload(signed)
    assert response.status_code == 400 and "send no password" in response.get_json()["error"]
    assert leftovers(signed.node) == []


def test_the_paper_publish_from_a_file_of_the_data_directory_takes_the_password(client, monkeypatch) -> None:
    monkeypatch.setattr(client.node, "ipfs", FakeIpfs())
    (client.node.data_dir / "MRI.pdf").write_bytes(b"%PDF report")
    response = client.post("/publish_record", json={"file_path": "MRI.pdf", "EHR_name": "MRI", "user_id": "xxxxx",
                                                     "password": "shared"})
    assert response.status_code == 201, response.get_json()
    assert leftovers(client.node) == ["MRI.pdf"]


def test_publish_takes_an_upload_up_to_max_upload_bytes_and_json_up_to_max_body_bytes(make_client) -> None:
    node = make_client(max_body_bytes=1024, max_upload_bytes=64 * 1024)
    assert upload(node, os.urandom(8 * 1024)).status_code == 503  # past the gate: no IPFS here
    assert upload(node, os.urandom(80 * 1024)).status_code == 413
    big_json = {"file_path": "x" * 2000, "EHR_name": "MRI", "user_id": "x"}
    assert node.post("/publish_record", json=big_json).status_code == 413
    text = node.post("/publish_record", data="file_path=MRI.pdf", content_type="text/plain")
    assert text.status_code == 415 and "multipart/form-data" in text.get_json()["error"]


def test_only_a_patient_publishes(make_client) -> None:
    provider = make_client(role="healthcare_provider")
    refused = upload(provider)
    assert refused.status_code == 403 and "publish_record" in refused.get_json()["error"]


# -- files of the data directory ------------------------------------------------------------

def test_a_file_of_the_data_directory_downloads_as_an_attachment(client) -> None:
    (client.node.downloads / "MRI scan é.pdf").write_bytes(b"%PDF-1.4 decrypted")
    response = client.get("/files?path=downloads/MRI scan é.pdf")
    assert response.status_code == 200 and response.data == b"%PDF-1.4 decrypted"
    assert response.headers["Content-Length"] == "18"
    assert response.headers["Content-Disposition"].startswith("attachment;")
    assert "filename*=UTF-8''MRI%20scan%20%C3%A9.pdf" in response.headers["Content-Disposition"]


@pytest.mark.parametrize("path, status, named", [
    ("downloads/none.pdf", 404, "no file at 'downloads/none.pdf'"),
    (".emr/identity.json", 400, "the node's own files"),
    ("../outside", 400, "inside the node's data directory"),
    ("", 400, "'path'"),
    ("downloads", 404, "no file at 'downloads'"),
])
def test_files_are_confined_to_the_data_directory_and_a_missing_one_is_named(client, path, status, named) -> None:
    response = client.get("/files", query_string={"path": path})
    assert response.status_code == status and named in response.get_json()["error"]


def test_files_takes_only_the_path(client) -> None:
    response = client.get("/files?path=x&download=1")
    assert response.status_code == 400 and "'download'" in response.get_json()["error"]


# -- the network view -----------------------------------------------------------------------

def test_a_node_without_peers_sees_itself_up_to_date(client) -> None:
    view = client.get("/network").get_json()
    (me,) = view["nodes"]
    assert me["self"] and me["role"] == "patient" and me["node_id"] == client.node.identity.node_id
    assert me["length"] == view["longest"] == 1 and me["behind"] == 0


def test_the_network_view_asks_each_peer_and_says_who_is_behind(client, spawn_node) -> None:
    ahead = spawn_node("healthcare_provider", sync_interval=0)
    down_port = spawn_node("healthcare_authority")
    client.post("/connect_node", json={"nodes": [ahead.url, down_port.url]})
    ahead.post("/remove_node", {"nodes": [client.node.config.own_url]})
    for _ in range(2):
        assert ahead.get("/mine_block").status_code == 200
    down_port.stop()
    nodes = {node["url"]: node for node in client.get("/network").get_json()["nodes"]}
    assert nodes[ahead.url]["role"] == "healthcare_provider" and nodes[ahead.url]["behind"] == 0
    assert nodes[ahead.url]["length"] == 3 and nodes[ahead.url]["short_id"]
    me = next(node for node in nodes.values() if node["self"])
    assert me["behind"] == 2
    assert not nodes[down_port.url]["reachable"] and nodes[down_port.url]["error"]


# -- the page ---------------------------------------------------------------------------------

def test_the_page_is_served_without_the_key_under_a_content_security_policy(make_client) -> None:
    node = make_client(api_key=KEY)
    page = node.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    for asset in re.findall(r'(?:src|href)="([^"]+)"', page.get_data(as_text=True)):
        assert asset.startswith("/"), f"{asset}: everything the page loads comes from the node"
        if asset.startswith("/static/"):
            answer = node.get(asset)
            assert answer.status_code == 200 and "Content-Security-Policy" in answer.headers
    assert node.get("/identity").status_code == 401  # the data still needs the key
    assert node.get("/identity", headers={"X-API-Key": KEY}).status_code == 200


def test_a_page_file_that_does_not_exist_is_a_404_naming_it(client) -> None:
    for name in ("nope.js", "../app.py", "APP.JS", ".hidden.css"):
        response = client.get(f"/static/{name}")
        assert response.status_code == 404, name


def test_the_page_loads_nothing_from_elsewhere_and_has_no_inline_script_or_style() -> None:
    static = ROOT / "static"
    html = (static / "index.html").read_text()
    assert "<script>" not in html and "style=" not in html and "<style" not in html
    assert not re.search(r"\son[a-z]+=", html), "no inline event handlers (the CSP refuses them)"
    for path in static.iterdir():
        text = path.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9]", text.replace("http://www.w3.org/2000/svg", "")), path.name


def test_every_request_of_the_pages_script_is_a_documented_endpoint() -> None:
    script = (ROOT / "static" / "app.js").read_text()
    calls = set(re.findall(r'api\("(GET|POST)", "(/[^"?]*)"', script))
    calls |= {("POST", path) for path in re.findall(r'upload\("(/[^"]*)"', script)}
    calls |= {("GET", path) for path in re.findall(r'fetch\("(/[^"?]*)\?', script)}
    assert len(calls) >= 15
    documented = {(method.upper(), shape(path)) for path, methods in openapi.PATHS.items() for method in methods}
    assert {(method, shape(path)) for method, path in calls} <= documented
    assert "fetch(path" in script  # the one generic fetch is api()'s own
