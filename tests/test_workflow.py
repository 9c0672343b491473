"""The encryption endpoints, and the paper's Fig. 3 workflow in-process on a real Kubo daemon."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

import pytest

from conftest import paper_transaction

PASSWORD = "shared with healthcare B"


@pytest.fixture
def record(client) -> bytes:
    data = os.urandom(63_795)
    (client.node.data_dir / "MRI.pdf").write_bytes(data)
    return data


def test_encrypt_then_decrypt_endpoints_restore_the_record(client, record: bytes) -> None:
    encrypted = client.post("/encrypt_file", json={"file_path": "MRI.pdf", "password": PASSWORD})
    assert encrypted.status_code == 200
    assert encrypted.get_json()["file_path"] == "MRI.pdf.aes"
    (client.node.data_dir / "MRI.pdf").rename(client.node.data_dir / "original.pdf")
    decrypted = client.post("/decrypt_file", json={"file_path": "MRI.pdf.aes", "password": PASSWORD})
    assert decrypted.status_code == 200
    assert decrypted.get_json() == {"message": "The file is decrypted", "file_path": "MRI.pdf", "size": 63_795}
    assert (client.node.data_dir / "MRI.pdf").read_bytes() == record


def test_wrong_password_is_a_400_that_names_no_password_and_writes_nothing(client, record: bytes) -> None:
    client.post("/encrypt_file", json={"file_path": "MRI.pdf", "password": PASSWORD})
    response = client.post("/decrypt_file", json={"file_path": "MRI.pdf.aes", "password": "guess",
                                                  "output_path": "guess.pdf"})
    assert response.status_code == 400
    message = response.get_json()["error"]
    assert "wrong password" in message and "guess" not in message.replace("guess.pdf", "")
    assert str(client.node.data_dir) not in message
    assert not (client.node.data_dir / "guess.pdf").exists()


def flip(offset_from_end: int) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[-offset_from_end] ^= 0x01
        path.write_bytes(bytes(data))
    return damage


def cut_in_the_body(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 100_001)  # not whole blocks: a cut, not a forgery


TRAILER = 33  # AES Crypt's trailer: the modulo byte, then the body's HMAC-SHA256
UNREADABLE = {  # damage to MRI.pdf.aes, password sent, what the error must say
    "wrong password": (None, "not the password", "wrong password"),
    "a flipped bit half way": (flip(1_500_000), PASSWORD, "tampered"),
    "a flipped bit in the last block": (flip(TRAILER + 1), PASSWORD, "tampered"),
    "a modulo byte that disagrees with the padding": (flip(TRAILER), PASSWORD, "damaged"),
    "a flipped bit in the body's HMAC": (flip(1), PASSWORD, "tampered"),
    "cut short in the body": (cut_in_the_body, PASSWORD, "truncated"),
}


def tree(folder: Path) -> dict[str, tuple[int, str] | None]:
    """Every name under `folder`, with each file's size and SHA-256: what was written anywhere in it."""
    return {str(path.relative_to(folder)): None if path.is_dir() else
            (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()) for path in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("output", [{}, {"output_path": "records/MRI.pdf"},
                                    {"output_path": "kept.pdf", "overwrite": True}],
                         ids=["beside", "in-a-folder", "over-an-existing-file"])
@pytest.mark.parametrize("case", UNREADABLE)
def test_an_unreadable_aes_file_is_a_400_and_leaves_no_plaintext_anywhere(
        client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, output: dict[str, object]) -> None:
    temp = tmp_path / "temp"  # where Python's temporary files go
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    data_dir = client.node.data_dir
    record = os.urandom(3 * 1024 * 1024 + 5)  # several chunks, and a last block with padding
    (data_dir / "MRI.pdf").write_bytes(record)
    assert client.post("/encrypt_file", json={"file_path": "MRI.pdf", "password": PASSWORD}).status_code == 200
    (data_dir / "MRI.pdf").unlink()
    (data_dir / "records").mkdir()
    (data_dir / "kept.pdf").write_bytes(b"the file the output would replace")
    damage, password, problem = UNREADABLE[case]
    if damage:
        damage(data_dir / "MRI.pdf.aes")
    before = tree(data_dir)
    response = client.post("/decrypt_file", json={"file_path": "MRI.pdf.aes", "password": password, **output})
    assert response.status_code == 400, response.get_data(as_text=True)
    message = response.get_json()["error"]
    assert "MRI.pdf.aes" in message and problem in message, message
    assert tree(data_dir) == before, "the decryption left or changed a file in the data directory"
    assert tree(temp) == {}, "the decryption left a temporary file"


def test_existing_output_is_a_409_unless_overwrite(client, record: bytes) -> None:
    body = {"file_path": "MRI.pdf", "password": PASSWORD}
    assert client.post("/encrypt_file", json=body).status_code == 200
    again = client.post("/encrypt_file", json=body)
    assert again.status_code == 409 and "overwrite" in again.get_json()["error"]
    assert client.post("/encrypt_file", json={**body, "overwrite": True}).status_code == 200


@pytest.mark.parametrize("body, named", [
    ({"password": PASSWORD}, "file_path"), ({"file_path": "MRI.pdf"}, "password"),
    ({"file_path": "MRI.pdf", "password": 12}, "password"),
    ({"file_path": "../MRI.pdf", "password": PASSWORD}, "file_path"),
    ({"file_path": "MRI.pdf", "password": PASSWORD, "output_path": "/tmp/x.aes"}, "output_path"),
    ({"file_path": "MRI.pdf", "password": PASSWORD, "overwrite": "yes"}, "overwrite"),
])
def test_bad_encrypt_request_is_a_400_naming_the_field(client, record: bytes, body, named) -> None:
    response = client.post("/encrypt_file", json=body)
    assert response.status_code == 400 and named in response.get_json()["error"]
    assert sorted(p.name for p in client.node.data_dir.iterdir() if p.is_file()) == ["MRI.pdf"]


def test_papers_workflow_from_patient_to_healthcare_provider(make_client, kubo) -> None:
    patient = make_client(ipfs_api=kubo.api_url)
    provider = make_client(ipfs_api=kubo.api_url, role="healthcare_provider")
    original = os.urandom(63_795)
    (patient.node.data_dir / "MRI.pdf").write_bytes(original)

    assert patient.post("/encrypt_file", json={"file_path": "MRI.pdf", "password": PASSWORD}).status_code == 200
    uploaded = patient.post("/create_hash", json={"file_path": "MRI.pdf.aes"}).get_json()["IPFS Hash"]
    added = patient.post("/add_transaction", json=paper_transaction(
        ipfs_hash=uploaded["Hash"], file_name=uploaded["Name"], file_size=uploaded["Size"]))
    assert added.get_json()["message"] == "This transaction will be added to Block 2"
    patient.get("/mine_block")

    provider.node.blockchain.replace_chain(patient.get("/get_chain").get_json()["chain"])
    info = provider.post("/get_file_hash", json={"name": "MRI.pdf.aes"}).get_json()["File info"]
    assert info == uploaded
    fetched = provider.post("/get_file", json={"ipfs_hash": info["Hash"]}).get_json()
    assert fetched["path"] == "downloads/MRI.pdf.aes"
    decrypted = provider.post("/decrypt_file", json={"file_path": fetched["path"], "password": PASSWORD})
    assert decrypted.status_code == 200
    assert (provider.node.data_dir / "downloads" / "MRI.pdf").read_bytes() == original
