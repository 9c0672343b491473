"""The encryption endpoints, and the paper's Fig. 3 workflow in-process on a real Kubo daemon."""
from __future__ import annotations

import os

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
