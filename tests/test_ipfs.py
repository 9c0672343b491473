"""Records on a real Kubo daemon: create_hash, get_file_hash, get_file, and the adapter's calls on Kubo v0.43."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PAPER_HASH, paper_transaction
from scripts.cluster import ROOT, Kubo, free_port
from errors import IpfsUnknownCid
from ipfs_client import IpfsClient

MIB = 1024 * 1024
SIZES = {"empty": 0, "one-byte": 1, "paper-mri-report": 63_795, "multi-chunk": 5 * MIB + 123}


def write(client, name: str, data: bytes) -> Path:
    path = client.node.data_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def record(client, name: str, data: bytes, ehr_name: str = "MRI") -> dict:
    write(client, name, data)
    uploaded = client.post("/create_hash", json={"file_path": name}).get_json()["IPFS Hash"]
    client.post("/add_transaction", json=paper_transaction(ipfs_hash=uploaded["Hash"], EHR_name=ehr_name,
                                                           file_name=uploaded["Name"], file_size=uploaded["Size"]))
    client.get("/mine_block")
    return uploaded


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_file_goes_up_and_comes_back_byte_for_byte(ipfs_client, kubo: Kubo, size: int) -> None:
    data = os.urandom(size)
    source = write(ipfs_client, "MRI.pdf.aes", data)
    response = ipfs_client.post("/create_hash", json={"file_path": "MRI.pdf.aes"})
    assert response.status_code == 200
    result = response.get_json()["IPFS Hash"]
    assert set(result) == {"Hash", "Name", "Size"} and result["Name"] == "MRI.pdf.aes"
    assert isinstance(result["Size"], str) and int(result["Size"]) >= size
    assert result["Hash"] == kubo.ipfs("add", "--only-hash", "-Q", str(source)).strip()
    assert result["Hash"].startswith("Qm")

    fetched = ipfs_client.post("/get_file", json={"ipfs_hash": result["Hash"]})
    assert fetched.status_code == 200
    body = fetched.get_json()
    assert body["message"] == "The File has Retrieved at Your Local Directory" and body["size"] == size
    assert (ipfs_client.node.data_dir / body["path"]).read_bytes() == data

    downloaded = ipfs_client.get(f"/get_file?ipfs_hash={result['Hash']}")
    assert downloaded.status_code == 200 and downloaded.data == data
    assert "attachment" in downloaded.headers["Content-Disposition"]


def test_name_with_spaces_and_non_ascii_letters_round_trips(ipfs_client) -> None:
    name = "Rapport IRM Zoë Ñandú 脑.pdf.aes"
    data = os.urandom(4096)
    uploaded = record(ipfs_client, name, data)
    assert uploaded["Name"] == name
    body = ipfs_client.post("/get_file", json={"ipfs_hash": uploaded["Hash"]}).get_json()
    assert body["path"] == f"downloads/{name}"
    disposition = ipfs_client.get(f"/get_file?ipfs_hash={uploaded['Hash']}").headers["Content-Disposition"]
    assert 'filename="Rapport IRM Zo_ _and_ _.pdf.aes"' in disposition and "filename*=UTF-8''Rapport%20IRM" in disposition
    assert (ipfs_client.node.data_dir / body["path"]).read_bytes() == data
    assert ipfs_client.post("/get_file_hash", json={"name": name}).get_json()["File info"]["Name"] == name


def test_multipart_upload_is_added_under_its_own_name(ipfs_client, kubo: Kubo, tmp_path: Path) -> None:
    data = os.urandom(70_000)
    response = ipfs_client.post("/create_hash", data={"file": (io.BytesIO(data), "X Ray.pdf.aes")},
                                content_type="multipart/form-data")
    assert response.status_code == 200
    result = response.get_json()["IPFS Hash"]
    (tmp_path / "same.bin").write_bytes(data)
    assert result["Name"] == "X Ray.pdf.aes"
    assert result["Hash"] == kubo.ipfs("add", "--only-hash", "-Q", str(tmp_path / "same.bin")).strip()
    assert list(ipfs_client.node.uploads.iterdir()) == []


def test_get_file_hash_finds_a_record_by_file_name_and_by_ehr_name(ipfs_client) -> None:
    uploaded = record(ipfs_client, "MRI.pdf.aes", os.urandom(63_795))
    for name in ("MRI.pdf.aes", "MRI", "mri"):
        response = ipfs_client.post("/get_file_hash", json={"name": name})
        assert response.status_code == 200, name
        assert response.get_json()["File info"] == uploaded


def test_get_file_hash_lists_every_version_newest_first(ipfs_client) -> None:
    first = record(ipfs_client, "MRI.pdf.aes", b"first scan")
    second = record(ipfs_client, "MRI.pdf.aes", b"second scan, a week later")
    body = ipfs_client.post("/get_file_hash", json={"name": "MRI"}).get_json()
    assert body["File info"] == second
    assert [(v["Hash"], v["block_index"]) for v in body["versions"]] == [(second["Hash"], 3), (first["Hash"], 2)]


def test_get_file_hash_asks_ipfs_for_the_size_of_a_paper_style_record(ipfs_client) -> None:
    write(ipfs_client, "MRI.pdf.aes", os.urandom(63_795))
    uploaded = ipfs_client.post("/create_hash", json={"file_path": "MRI.pdf.aes"}).get_json()["IPFS Hash"]
    ipfs_client.post("/add_transaction", json=paper_transaction(ipfs_hash=uploaded["Hash"]))
    ipfs_client.get("/mine_block")
    info = ipfs_client.post("/get_file_hash", json={"name": "MRI.pdf.aes"}).get_json()["File info"]
    assert info == uploaded


def test_get_file_hash_of_an_unknown_name_is_a_404(ipfs_client) -> None:
    response = ipfs_client.post("/get_file_hash", json={"name": "X-Ray"})
    assert response.status_code == 404 and "X-Ray" in response.get_json()["error"]


@pytest.mark.parametrize("file_path", ["../outside.txt", "/etc/passwd", "downloads/../../outside.txt",
                                       "escape-link", "a\x00b", "x" * 300, ""])
def test_path_outside_the_data_directory_is_refused_and_not_read(ipfs_client, tmp_path: Path, file_path) -> None:
    (tmp_path / "outside.txt").write_text("secret")
    (ipfs_client.node.data_dir / "escape-link").symlink_to(tmp_path / "outside.txt")
    response = ipfs_client.post("/create_hash", json={"file_path": file_path})
    assert response.status_code == 400
    assert "file_path" in response.get_json()["error"]


def test_missing_file_is_a_404(ipfs_client) -> None:
    response = ipfs_client.post("/create_hash", json={"file_path": "nothing-here.pdf.aes"})
    assert response.status_code == 404 and "nothing-here.pdf.aes" in response.get_json()["error"]


def test_malformed_hash_is_a_400(ipfs_client) -> None:
    for request in (lambda: ipfs_client.post("/get_file", json={"ipfs_hash": "QmNotAHash"}),
                    lambda: ipfs_client.get("/get_file?ipfs_hash=../../etc")):
        response = request()
        assert response.status_code == 400 and "ipfs_hash" in response.get_json()["error"]


def test_unknown_hash_is_a_404_after_a_bounded_wait(ipfs_client) -> None:
    response = ipfs_client.post("/get_file", json={"ipfs_hash": PAPER_HASH})
    assert response.status_code == 404
    assert PAPER_HASH in response.get_json()["error"]
    assert list(ipfs_client.node.downloads.iterdir()) == []


def test_daemon_down_is_a_503_that_says_where_and_how_and_the_chain_still_serves(client) -> None:
    write(client, "MRI.pdf.aes", b"scan")
    response = client.post("/create_hash", json={"file_path": "MRI.pdf.aes"})
    assert response.status_code == 503
    message = response.get_json()["error"]
    assert client.node.config.ipfs_api in message and "start it" in message
    assert client.post("/get_file", json={"ipfs_hash": PAPER_HASH}).status_code == 503
    assert client.get("/get_chain").status_code == 200
    assert client.post("/add_transaction", json=paper_transaction()).status_code == 201


def test_adapter_calls_work_against_this_kubo(kubo: Kubo, tmp_path: Path) -> None:
    """Every RPC call the adapter uses, on the Kubo version the project installs."""
    adapter = IpfsClient(kubo.api_url, lookup_timeout=2)
    assert adapter.version() == kubo.ipfs("version", "--number").strip()
    assert adapter.peer_id() == kubo.peer_id()
    path = tmp_path / "scan.bin"
    path.write_bytes(b"a" * 300_000)
    added = adapter.add_file(path)
    stat = adapter.stat(added["Hash"])
    assert stat["Size"] == 300_000 and str(stat["CumulativeSize"]) == added["Size"]
    size, chunks = adapter.open(added["Hash"])
    assert size == 300_000 and b"".join(chunks) == path.read_bytes()
    with pytest.raises(IpfsUnknownCid):
        adapter.stat(PAPER_HASH)


def test_repo_is_loopback_only_and_has_no_peers(kubo: Kubo) -> None:
    config = kubo.rpc("config/show")
    assert config["Bootstrap"] == [] and config["Routing"]["Type"] == "none"
    assert config["AutoConf"]["Enabled"] is False and config["Discovery"]["MDNS"]["Enabled"] is False
    assert config["Swarm"]["DisableNatPortMap"] is True
    assert config["Swarm"]["RelayClient"]["Enabled"] is False and config["Swarm"]["RelayService"]["Enabled"] is False
    for address in (config["Addresses"]["API"], config["Addresses"]["Gateway"], *config["Addresses"]["Swarm"]):
        assert address.startswith("/ip4/127.0.0.1/"), address
    assert kubo.swarm_peer_addresses() == []


def test_adapter_streams_an_add_and_survives_a_cat_left_half_read(kubo: Kubo, tmp_path: Path) -> None:
    """add_stream sends pieces as they come; a download iterator dropped half way (a client gone) frees its own
    connection, and the next call on the thread gets a fresh one; an error raised by the pieces breaks the add."""
    adapter = IpfsClient(kubo.api_url, lookup_timeout=2)
    data = os.urandom(3 * MIB + 5)
    (tmp_path / "scan.bin").write_bytes(data)
    pieces = (memoryview(data)[i:i + 100_000] for i in range(0, len(data), 100_000))
    added = adapter.add_stream(pieces, "scan.bin")
    assert added["Hash"] == kubo.ipfs("add", "--only-hash", "-Q", str(tmp_path / "scan.bin")).strip()
    assert added["Name"] == "scan.bin"
    size, chunks = adapter.open(added["Hash"])
    assert size == len(data) and len(next(chunks)) > 0
    chunks.close()  # left half read
    size, chunks = adapter.open(added["Hash"])
    assert b"".join(chunks) == data
    orphan_size, orphan = adapter.open(added["Hash"])  # still being read elsewhere while this thread goes on
    assert adapter.stat(added["Hash"])["Size"] == len(data)
    assert b"".join(orphan) == data

    def broken():
        yield b"x" * 1000
        raise ValueError("the upload is malformed")

    with pytest.raises(ValueError, match="malformed"):
        adapter.add_stream(broken(), "broken.bin")
    assert adapter.version()  # the thread's connections still work


@pytest.mark.process
def test_kubo_script_status_and_stop(tmp_path: Path) -> None:
    daemon = Kubo(tmp_path / "repo").start()
    try:
        assert "running" in daemon.script("status").stdout
    finally:
        daemon.stop()
    status = daemon.script("status", check=False)
    assert status.returncode != 0 and "not running" in status.stdout


def fake_ipfs(folder: Path, version: str) -> Path:
    """A stand-in `ipfs` that only tells its version: enough for scripts/kubo.sh to choose a binary."""
    folder.mkdir(parents=True, exist_ok=True)
    binary = folder / "ipfs"
    binary.write_text(f'#!/bin/sh\n[ "$1 $2" = "version -n" ] && echo {version} && exit 0\nexit 1\n')
    binary.chmod(0o755)
    return binary


def kubo_bin(tmp_path: Path, on_path: str | None, in_tools: bool) -> subprocess.CompletedProcess[str]:
    """`scripts/kubo.sh bin` with only an ipfs of version `on_path` on PATH and/or one in the tools folder."""
    tools = tmp_path / "tools"
    if in_tools:
        fake_ipfs(tools / "bin", "0.43.1")
    folders = [str(fake_ipfs(tmp_path / "path", on_path).parent)] if on_path else []
    env = {**os.environ, "PATH": os.pathsep.join([*folders, "/usr/bin", "/bin"]), "KUBO_TOOLS": str(tools)}
    return subprocess.run([str(ROOT / "scripts" / "kubo.sh"), "bin"], env=env, capture_output=True, text=True,
                          timeout=30)


@pytest.mark.process
@pytest.mark.parametrize("version", ["0.43.1", "0.37.0", "0.44.0-rc1", "1.0.0"])
def test_kubo_script_uses_an_ipfs_on_path_first_when_it_is_new_enough(tmp_path: Path, version: str) -> None:
    result = kubo_bin(tmp_path, version, in_tools=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "path" / "ipfs")


@pytest.mark.process
@pytest.mark.parametrize("version", ["0.36.0", "0.9.1", "not a version"])
def test_kubo_script_passes_over_an_ipfs_on_path_too_old_for_its_loopback_config(tmp_path: Path,
                                                                                 version: str) -> None:
    result = kubo_bin(tmp_path, version, in_tools=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "tools" / "bin" / "ipfs")
    assert "needs Kubo v0.37.0 or newer" in result.stderr and str(tmp_path / "path" / "ipfs") in result.stderr
    alone = kubo_bin(tmp_path / "alone", version, in_tools=False)
    assert alone.returncode != 0 and alone.stdout == ""
    assert "needs Kubo v0.37.0 or newer" in alone.stderr and "scripts/kubo.sh install" in alone.stderr


@pytest.mark.process
def test_kubo_script_uses_the_tools_ipfs_when_none_is_on_path(tmp_path: Path) -> None:
    result = kubo_bin(tmp_path, None, in_tools=True)
    assert result.returncode == 0 and result.stdout.strip() == str(tmp_path / "tools" / "bin" / "ipfs")
    assert result.stderr == ""


@pytest.mark.parametrize("backend", ["requests", "httpx"])
def test_adapter_ignores_proxy_settings_whichever_http_backend_ipfshttpclient_prefers(kubo: Kubo, tmp_path: Path,
                                                                                      backend: str) -> None:
    """The daemon is local: a proxy in the environment, or ipfshttpclient's httpx switch, must change nothing.

    ipfshttpclient falls back to requests without a word when httpx cannot be imported, so the program reports
    which backend ipfshttpclient chose: the httpx case must really run on httpx (pinned in requirements.txt).
    """
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "HTTP_PROXY": dead_proxy, "HTTPS_PROXY": dead_proxy, "ALL_PROXY": dead_proxy,
           "http_proxy": dead_proxy, "NO_PROXY": "", "no_proxy": "",
           "PY_IPFS_HTTP_CLIENT_PREFER_HTTPX": "yes" if backend == "httpx" else "no"}
    program = ("import sys; from pathlib import Path; from ipfs_client import IpfsClient\n"
               "import ipfshttpclient.http\n"
               f"client = IpfsClient({kubo.api_url!r})\n"
               "added = client.add_file(Path(sys.argv[1]))\n"
               "size, chunks = client.open(added['Hash'])\n"
               "sys.stdout.buffer.write(ipfshttpclient.http.ClientSync.__module__.encode() + b'\\n')\n"
               "sys.stdout.buffer.write(b''.join(chunks))\n")
    (tmp_path / "scan.bin").write_bytes(b"through no proxy")
    result = subprocess.run([sys.executable, "-c", program, str(tmp_path / "scan.bin")], env=env, cwd=ROOT,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    chosen_backend, content = result.stdout.split(b"\n", 1)
    assert chosen_backend.decode() == f"ipfshttpclient.http_{backend}"
    assert content == b"through no proxy"
