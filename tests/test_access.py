"""Access rules: what each role's node serves, the API key, and where a node agrees to listen."""
from __future__ import annotations

import subprocess
import sys

import pytest

from policy import ROLE_ACTIONS
from conftest import paper_transaction
from scripts.cluster import ROOT, free_port

KEY = "correct-horse-battery-staple-0123456789"


def test_healthcare_authority_reads_but_cannot_add_records(make_client) -> None:
    authority = make_client(role="healthcare_authority")
    refused = authority.post("/add_transaction", json=paper_transaction())
    assert refused.status_code == 403
    assert "healthcare_authority" in refused.get_json()["error"] and "add_transaction" in refused.get_json()["error"]
    assert authority.node.blockchain.pending == []
    for path in ("/create_hash", "/encrypt_file"):
        assert authority.post(path, json={"file_path": "MRI.pdf"}).status_code == 403
    assert authority.get("/get_chain").status_code == 200
    assert authority.post("/get_file_hash", json={"name": "MRI"}).status_code == 404  # served: nothing found
    assert authority.post("/decrypt_file", json={"file_path": "x.aes", "password": "p"}).status_code == 404


def test_patient_node_serves_every_endpoint_of_the_workflow(client) -> None:
    assert client.post("/add_transaction", json=paper_transaction()).status_code == 201
    assert client.get("/mine_block").status_code == 200


def test_operator_defined_role_has_its_own_row_or_serves_everything(make_client) -> None:
    assert "patient" in ROLE_ACTIONS and "healthcare_authority" in ROLE_ACTIONS
    insurer = make_client(role="insurer")
    assert insurer.post("/add_transaction", json=paper_transaction()).status_code == 201


def test_gossip_reaches_a_node_whose_role_cannot_add_records(make_client) -> None:
    authority = make_client(role="healthcare_authority")
    tx = {**paper_transaction(), "id": "0" * 32}
    assert authority.post("/receive_transaction", json=tx).status_code == 201
    assert authority.node.blockchain.pending[0]["id"] == "0" * 32


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}])
def test_api_key_opens_every_endpoint(make_client, headers) -> None:
    node = make_client(api_key=KEY)
    assert node.get("/get_chain", headers=headers).status_code == 200
    assert node.post("/add_transaction", json=paper_transaction(), headers=headers).status_code == 201


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": KEY}])
def test_missing_or_wrong_api_key_is_a_401_and_changes_nothing(make_client, headers) -> None:
    node = make_client(api_key=KEY)
    for response in (node.get("/get_chain", headers=headers),
                     node.post("/add_transaction", json=paper_transaction(), headers=headers),
                     node.post("/receive_block", json={}, headers=headers)):
        assert response.status_code == 401
        assert "API key" in response.get_json()["error"] and KEY not in response.get_data(as_text=True)
    assert node.node.blockchain.pending == []


def test_health_needs_no_api_key(make_client) -> None:
    assert make_client(api_key=KEY).get("/health").status_code == 200


def test_nodes_of_a_keyed_network_talk_to_each_other(spawn_node) -> None:
    from conftest import wait_until
    headers = {"X-API-Key": KEY}
    patient, authority = spawn_node(api_key=KEY), spawn_node("healthcare_authority", api_key=KEY)
    assert patient.post("/connect_node", {"nodes": [authority.url]}, headers=headers).status_code == 201
    patient.post("/add_transaction", paper_transaction(), headers=headers)
    patient.get("/mine_block", headers=headers)
    wait_until(lambda: authority.get("/get_chain", headers=headers).json()["length"] == 2)
    assert KEY not in authority.log_path.read_text() + patient.log_path.read_text()


@pytest.mark.process
def test_node_refuses_a_non_loopback_address_without_a_key() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), "--host", "0.0.0.0", "--port", str(free_port())],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode != 0 and "API key" in result.stderr
