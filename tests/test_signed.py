"""A signed network (--security signed): every write carries a member's signature, checked on every node wherever
it enters; outsiders and roles that may not write are refused by all; removal stops later writes only."""
from __future__ import annotations

import copy
import json
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from blockchain import Blockchain, hash_block, proof_of_work
from conftest import paper_transaction, wait_until
from identity import Identity, describe
from ledger import SignedRules, block_signing_hash
from members import load_members
from scripts.cluster import ROOT, Kubo, NodeProcess, free_port, write_sample_record
from scripts.hostile import HostilePeer, serving

PATIENT, AUTHORITY, PROVIDER = "patient", "healthcare_authority", "healthcare_provider"


def data_dir(node: NodeProcess) -> Path:
    return Path(node.args[node.args.index("--data-dir") + 1])


def members_file(node: NodeProcess) -> Path:
    return Path(node.args[node.args.index("--members-file") + 1])


def identity_of(node: NodeProcess) -> Identity:
    """A member's private identity, read from its own folder: what an attacker holds after stealing a machine."""
    return Identity.load(data_dir(node) / ".emr" / "identity.json")


def standing(node: NodeProcess) -> dict[str, Any]:
    """What the node says of its membership: {"member", "status", "message"}."""
    return node.get("/identity").json()["network"]


def signed(identity: Identity, tx: dict[str, Any]) -> dict[str, Any]:
    unsigned = {**tx, "signer": identity.node_id}
    return {**unsigned, "signature": identity.sign(unsigned)}


def record(identity: Identity, **fields: Any) -> dict[str, Any]:
    return signed(identity, {**paper_transaction(**fields), "id": uuid.uuid4().hex})


def mined_by(identity: Identity, chain: list[dict[str, Any]], transactions: list[dict[str, Any]]) -> dict[str, Any]:
    """A block with a valid (paper) proof of work on top of `chain`, signed by `identity`."""
    previous = chain[-1]
    block = {"index": previous["index"] + 1, "timestamp": previous["timestamp"], "transactions": transactions,
             "nonce": proof_of_work(previous["nonce"], 4), "previous_hash": hash_block(previous),
             "miner": identity.node_id}
    return {**block, "signature": identity.sign(block_signing_hash(block))}


@pytest.fixture
def trio(signed_network) -> tuple[NodeProcess, NodeProcess, NodeProcess]:
    patient, authority, provider = signed_network()
    assert patient.post("/connect_node", {"nodes": [authority.url, provider.url]}).status_code == 201
    wait_until(lambda: len(provider.get("/health").json()["peers"]) == 1)
    return patient, authority, provider


def all_chains_equal(*nodes: NodeProcess) -> list[dict[str, Any]] | None:
    chains = [node.chain() for node in nodes]
    return chains[0] if all(chain == chains[0] for chain in chains) else None


def test_a_record_is_signed_by_the_patient_node_and_checked_by_every_node(trio) -> None:
    patient, authority, provider = trio
    patient_id = patient.get("/identity").json()["node_id"]
    added = patient.post("/add_transaction", paper_transaction(user_id="Zoë Ñandú 脑", EHR_name="IRM"))
    assert added.status_code == 201
    block = patient.get("/mine_block").json()
    assert block["miner"] == patient_id and block["signature"]
    assert block["transactions"][0]["signer"] == patient_id
    chain = wait_until(lambda: all_chains_equal(patient, authority, provider), timeout=15)
    assert chain[-1]["transactions"][0]["user_id"] == "Zoë Ñandú 脑"
    assert all(node.get("/is_valid").json()["valid"] for node in trio)


def test_identity_is_kept_across_restarts_and_printed_offline(signed_network, tmp_path: Path) -> None:
    (node,) = signed_network((PATIENT,))
    before = node.get("/identity").json()
    node.stop()
    printed = subprocess.run([sys.executable, str(ROOT / "app.py"), "identity", "--data-dir",
                              node.args[node.args.index("--data-dir") + 1], "--port", str(node.port)],
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=ROOT)
    assert json.loads(printed.stdout)["node_id"] == before["node_id"]
    node.start()
    assert node.get("/identity").json()["node_id"] == before["node_id"]
    assert len(before["short_id"]) == 9 and before["node_id"].startswith(before["short_id"].replace("-", ""))


# -- outsiders -------------------------------------------------------------------------------

def test_an_outsider_cannot_write_through_any_route(trio) -> None:
    patient, authority, provider = trio
    outsider = Identity.generate()
    forged_record = record(outsider)
    forged_block = mined_by(outsider, patient.chain(), [])
    for node in trio:
        for path, body in (("/receive_transaction", forged_record),
                           ("/receive_transactions", {"transactions": [forged_record]}),
                           ("/receive_block", forged_block)):
            response = node.post(path, body)
            text = json.dumps(response.json())
            assert (response.status_code == 400 or "refused" in text) and "not a member" in text, (path, text)
        assert node.get("/health").json()["pending"] == 0 and len(node.chain()) == 1


def test_a_longer_chain_mined_by_an_outsider_is_not_taken_by_sync(trio) -> None:
    patient, authority, provider = trio
    outsider = Identity.generate()
    forged = patient.chain()
    for _ in range(3):
        forged.append(mined_by(outsider, forged, [record(outsider)]))
    # The hostile peer claims to be the authority: anyone can name a member's public identity, not sign as it.
    impersonated = authority.get("/identity").json()

    def answer(method: str, path: str) -> tuple[int, Any, float]:
        if path.startswith("/identity"):
            return 200, json.dumps(impersonated).encode(), 0.0
        return serving(forged)(method, path)

    peer = HostilePeer(answer)
    try:
        assert patient.post("/connect_node", {"nodes": [peer.url]}).status_code == 201
        body = patient.get("/replace_chain").json()
        assert body["replaced"] is False and "not a member" in body["peers"][peer.netloc]
        assert len(patient.chain()) == 1
    finally:
        peer.close()


def test_connect_node_refuses_a_peer_that_is_not_a_member(trio, signed_network) -> None:
    patient = trio[0]
    (stranger,) = signed_network((PATIENT,))  # a network of its own: its members file is another
    refused = patient.post("/connect_node", {"nodes": [stranger.url]})
    assert refused.status_code == 400 and "not a member" in refused.json()["error"]
    assert stranger.netloc not in patient.get("/health").json()["peers"]


# -- roles -------------------------------------------------------------------------------------

def test_a_healthcare_node_tricked_into_recording_is_refused_by_every_node(trio) -> None:
    patient, authority, provider = trio
    assert authority.post("/add_transaction", paper_transaction()).status_code == 403  # its own route first
    stolen = identity_of(authority)  # then its key, used directly: a hacked node
    forged = record(stolen, EHR_name="forged by the authority")
    for node in trio:
        response = node.post("/receive_transaction", forged)
        assert response.status_code == 400 and "may not make it" in response.json()["error"]
    forged_block = mined_by(stolen, patient.chain(), [forged])
    for node in trio:
        response = node.post("/receive_block", forged_block)
        assert response.status_code == 400
    assert all(len(node.chain()) == 1 for node in trio)


def test_a_tampered_transaction_in_a_signed_block_makes_the_chain_invalid(trio) -> None:
    patient = trio[0]
    patient.post("/add_transaction", paper_transaction())
    patient.get("/mine_block")
    patient.get("/mine_block")
    forged = copy.deepcopy(patient.chain())
    forged[1]["transactions"][0]["user_id"] = "mallory"
    miner = identity_of(patient)  # the miner's own key signs the blocks again: only the transaction's is wrong
    for position in range(1, len(forged)):  # relinked, every nonce kept: free with the paper's proof
        forged[position]["previous_hash"] = hash_block(forged[position - 1])
        unsigned = {key: value for key, value in forged[position].items() if key != "signature"}
        forged[position]["signature"] = miner.sign(block_signing_hash(unsigned))
    chain = Blockchain(rules=SignedRules(load_members(members_file(patient))))
    assert chain.chain_problem(patient.chain()) is None
    problem = chain.chain_problem(forged)
    assert problem.startswith("block 2: a record transaction carries a bad signature"), problem


# -- membership changes ---------------------------------------------------------------------------

def test_a_removed_members_later_writes_are_refused_and_its_earlier_ones_stay_valid(trio) -> None:
    patient, authority, provider = trio
    provider_id = provider.get("/identity").json()["node_id"]
    patient.post("/add_transaction", paper_transaction(EHR_name="before the removal"))
    assert provider.get("/mine_block").status_code == 200  # the provider mines a block while a member
    wait_until(lambda: all_chains_equal(*trio))
    removal = authority.post("/remove_member", {"node_id": provider_id})
    assert removal.status_code == 201
    authority.get("/mine_block")
    chain = wait_until(lambda: all_chains_equal(*trio))
    assert provider_id in patient.get("/members").json()["removed"]
    late = mined_by(identity_of(provider), chain, [])
    for node in (patient, authority):
        response = node.post("/receive_block", late)
        assert response.status_code == 400 and "a removed member" in response.json()["error"], response.text
    patient.post("/add_transaction", paper_transaction(EHR_name="after the removal"))
    wait_until(lambda: provider.get("/health").json()["pending"] == 1)
    refused = provider.get("/mine_block")  # its own node knows it was removed: it mines nothing
    assert refused.status_code == 403 and "was removed from the network emr-test" in refused.json()["error"]
    assert provider.chain() == chain and provider.get("/health").json()["pending"] == 1
    assert standing(provider)["status"] == "removed"
    assert patient.chain() == chain and authority.chain() == chain
    assert all(node.get("/is_valid").json()["valid"] for node in trio)
    assert chain[1]["miner"] == provider_id  # the block it mined before stays in every valid chain


def test_a_healthcare_authority_admits_a_new_patient_node_that_runs_with_the_founding_file(
        trio, spawn_node, tmp_path: Path) -> None:
    patient, authority, provider = trio
    newcomer = spawn_node(PATIENT, data_dir=tmp_path / "newcomer", security="signed",
                          members_file=members_file(patient))
    described = newcomer.get("/identity").json()
    assert described["network"]["status"] == "applicant" and described["node_id"] in described["network"]["message"]
    early = newcomer.post("/add_transaction", paper_transaction(EHR_name="before its admission"))
    assert early.status_code == 403 and "not a member of the network emr-test yet" in early.json()["error"]
    assert newcomer.get("/health").json()["pending"] == 0
    assert patient.post("/admit_member", {"member": described}).status_code == 403
    assert authority.post("/admit_member", {"member": described}).status_code == 201
    authority.get("/mine_block")
    wait_until(lambda: all_chains_equal(*trio))
    assert described["node_id"] in [member["node_id"] for member in patient.get("/members").json()["members"]]
    assert newcomer.post("/connect_node", {"nodes": [authority.url]}).status_code == 201
    wait_until(lambda: standing(newcomer)["member"], timeout=15)  # it took the chain that admits it
    added = newcomer.post("/add_transaction", paper_transaction(EHR_name="from the new member"))
    assert added.status_code == 201, added.text
    assert newcomer.get("/mine_block").status_code == 200
    chain = wait_until(lambda: all_chains_equal(newcomer, *trio), timeout=15)
    assert chain[-1]["transactions"][0]["EHR_name"] == "from the new member"


def test_a_new_provider_node_is_admitted_syncs_and_opens_a_granted_record_without_restarting_anyone(
        signed_network, spawn_node, kubo: Kubo, tmp_path: Path) -> None:
    patient, authority, provider = signed_network(ipfs_api=kubo.api_url)
    assert patient.post("/connect_node", {"nodes": [authority.url, provider.url]}).status_code == 201
    wait_until(lambda: len(provider.get("/health").json()["peers"]) == 1)
    pids = [node.pid for node in (patient, authority, provider)]
    write_sample_record(data_dir(patient) / "MRI.pdf")
    published = patient.post("/publish_record", {"file_path": "MRI.pdf", "EHR_name": "MRI", "user_id": "xxxxx"})
    assert published.status_code == 201, published.text
    assert patient.get("/mine_block").status_code == 200

    hospital = spawn_node(PROVIDER, data_dir=tmp_path / "hospital-c", security="signed", ipfs_api=kubo.api_url,
                          members_file=members_file(patient), sync_interval=1.0)  # the founding file, as it is
    described = hospital.get("/identity").json()
    assert hospital.get("/health").json()["membership"]["status"] == "applicant"
    message = described["network"]["message"]
    assert "not a member of the network emr-test yet" in message and described["node_id"] in message
    assert "healthcare authority must admit it" in message
    assert "not a member of the network emr-test yet" in hospital.log_path.read_text()
    # It may take the chain from a member; the members do not take it as a peer while it is an outsider.
    assert hospital.post("/connect_node", {"nodes": [authority.url]}).status_code == 201
    wait_until(lambda: hospital.chain() == patient.chain(), timeout=15)
    assert hospital.netloc not in authority.get("/health").json()["peers"]
    refused = hospital.get("/mine_block")
    assert refused.status_code == 403 and "not a member of the network emr-test yet" in refused.json()["error"]
    closed = hospital.post("/open_record", {"record": "MRI"})
    assert closed.status_code == 403 and "not a member" in closed.json()["error"]
    assert hospital.chain() == patient.chain()

    assert authority.post("/admit_member", {"member": described}).status_code == 201
    assert authority.get("/mine_block").status_code == 200
    wait_until(lambda: standing(hospital)["member"], timeout=15)  # its own background sync took the admission
    wait_until(lambda: hospital.netloc in authority.get("/health").json()["peers"])  # it told its peers again
    granted = patient.post("/grant", {"record": "MRI", "member": described["node_id"], "purpose": "second opinion"})
    assert granted.status_code == 201, granted.text
    assert patient.get("/mine_block").status_code == 200
    wait_until(lambda: hospital.chain() == patient.chain(), timeout=15)
    opened = hospital.post("/open_record", {"record": "MRI", "purpose": "second opinion"})
    assert opened.status_code == 200, opened.text
    assert (data_dir(hospital) / opened.json()["path"]).read_bytes() == (data_dir(patient) / "MRI.pdf").read_bytes()
    assert hospital.get("/mine_block").status_code == 200  # its access record, in a block every member takes
    wait_until(lambda: all_chains_equal(hospital, patient, authority, provider), timeout=15)
    assert [node.pid for node in (patient, authority, provider)] == pids


def test_an_admission_taking_a_members_url_is_refused_and_mining_goes_on(trio) -> None:
    patient, authority, provider = trio
    impostor = describe(Identity.generate(), PROVIDER, provider.url)  # another node claiming the provider's URL
    refused = authority.post("/admit_member", {"member": impostor})
    assert refused.status_code == 400 and f"with the url {provider.url} of member" in refused.json()["error"]
    gossiped = signed(identity_of(authority), {"type": "admit", "id": uuid.uuid4().hex, "member": {
        key: value for key, value in impostor.items() if key != "short_id"}})
    answer = patient.post("/receive_transaction", gossiped)
    assert answer.status_code == 400 and f"with the url {provider.url} of member" in answer.json()["error"]
    in_block = mined_by(identity_of(authority), patient.chain(), [gossiped])
    answer = provider.post("/receive_block", in_block)
    assert answer.status_code == 400 and f"with the url {provider.url} of member" in answer.json()["error"]
    assert all(node.get("/mine_block").status_code == 200 for node in trio)


def test_a_rotated_key_is_admitted_in_place_of_the_old_one_as_the_readme_says(trio) -> None:
    patient, authority, provider = trio
    old_id = provider.get("/identity").json()["node_id"]
    identity_file = data_dir(provider) / ".emr" / "identity.json"
    rotated = subprocess.run([sys.executable, str(ROOT / "identity.py"), "rotate", str(identity_file)],
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=ROOT)
    assert rotated.returncode == 0, rotated.stderr
    printed = subprocess.run([sys.executable, str(ROOT / "app.py"), "identity", "--data-dir", str(data_dir(provider)),
                              "--port", str(provider.port), "--role", PROVIDER],
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=ROOT)
    new = json.loads(printed.stdout)
    assert new["node_id"] != old_id and new["url"] == provider.url
    admitted = authority.post("/admit_member", {"member": new, "replaces": old_id})
    assert admitted.status_code == 201, admitted.text
    assert authority.get("/mine_block").status_code == 200
    wait_until(lambda: all_chains_equal(*trio))
    assert standing(provider)["status"] == "removed"  # still running with the old key, until it restarts
    provider.stop()
    provider.start()
    assert provider.get("/identity").json()["node_id"] == new["node_id"]
    assert provider.post("/connect_node", {"nodes": [patient.url, authority.url]}).status_code == 201
    wait_until(lambda: standing(provider)["member"], timeout=15)
    members = patient.get("/members").json()
    assert old_id in members["removed"]
    assert [m["url"] for m in members["members"] if m["node_id"] == new["node_id"]] == [provider.url]
    patient.post("/add_transaction", paper_transaction(EHR_name="after the rotation"))
    wait_until(lambda: provider.get("/health").json()["pending"] == 1)
    assert provider.get("/mine_block").status_code == 200  # the new key writes, and every node takes it
    chain = wait_until(lambda: all_chains_equal(*trio), timeout=15)
    assert chain[-1]["miner"] == new["node_id"]
    old_key = Identity.load(next(identity_file.parent.glob("identity.json.*.old")))
    answer = patient.post("/receive_block", mined_by(old_key, chain, []))
    assert answer.status_code == 400 and "a removed member" in answer.json()["error"]
    assert all(node.get("/is_valid").json()["valid"] for node in trio)


# -- persistence ----------------------------------------------------------------------------------

def test_a_persisted_chain_edited_by_hand_is_refused_at_restart(signed_network) -> None:
    (node,) = signed_network((PATIENT,), persist=True)
    node.post("/add_transaction", paper_transaction())
    node.get("/mine_block")
    node.get("/mine_block")
    node.stop()
    store = Path(node.args[node.args.index("--data-dir") + 1]) / ".emr" / "store.sqlite3"
    with sqlite3.connect(store) as conn:
        blocks = [json.loads(body) for (body,) in conn.execute("SELECT body FROM blocks ORDER BY block_index")]
        blocks[1]["transactions"][0]["user_id"] = "mallory"
        for position in range(2, len(blocks)):  # relinked, every nonce kept: free with the paper's proof
            blocks[position]["previous_hash"] = hash_block(blocks[position - 1])
        for block in blocks[1:]:
            conn.execute("UPDATE blocks SET body = ? WHERE block_index = ?", (json.dumps(block), block["index"]))
    result = subprocess.run([sys.executable, str(ROOT / "app.py"), *node.args, "--port", str(free_port())],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=ROOT)
    assert result.returncode != 0 and "bad signature" in result.stderr
