"""Consent on a signed network, on real node processes and a real Kubo: the patient records with a key of the
record's own, grants and revokes; a member opens with a grant and no password; every open and refusal is on
the chain; an emergency member breaks the glass only with a reason."""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_until
from identity import Identity
from scripts.cluster import Kubo, NodeProcess, write_sample_record

NETWORK = {"emergency_members": "healthcare_authority"}


def data_dir(node: NodeProcess) -> Path:
    return Path(node.args[node.args.index("--data-dir") + 1])


def identity_of(node: NodeProcess) -> Identity:
    return Identity.load(data_dir(node) / ".emr" / "identity.json")


def node_id(node: NodeProcess) -> str:
    return node.get("/identity").json()["node_id"]


def same_chain(*nodes: NodeProcess) -> list[dict[str, Any]] | None:
    chains = [node.chain() for node in nodes]
    return chains[0] if all(chain == chains[0] for chain in chains) else None


@pytest.fixture
def trio(signed_network, kubo: Kubo) -> tuple[NodeProcess, NodeProcess, NodeProcess]:
    patient, authority, provider = signed_network(network=NETWORK, ipfs_api=kubo.api_url)
    patient.post("/connect_node", {"nodes": [authority.url, provider.url]})
    wait_until(lambda: len(provider.get("/health").json()["peers"]) == 1)
    write_sample_record(data_dir(patient) / "MRI.pdf")
    return patient, authority, provider


def settle(trio: tuple[NodeProcess, ...]) -> list[dict[str, Any]]:
    """Mine what is pending on the patient's node and wait until every node holds the same chain."""
    wait_until(lambda: trio[0].get("/health").json()["pending"] >= max(n.get("/health").json()["pending"]
                                                                        for n in trio))
    assert trio[0].get("/mine_block").status_code == 200
    return wait_until(lambda: same_chain(*trio), timeout=15)


def publish(patient: NodeProcess, name: str = "MRI.pdf", ehr: str = "MRI") -> str:
    response = patient.post("/publish_record", {"file_path": name, "EHR_name": ehr, "user_id": "xxxxx"})
    assert response.status_code == 201, response.text
    return response.json()["IPFS Hash"]["Hash"]


def grant(patient: NodeProcess, record: str, member: str, **extra: Any) -> str:
    response = patient.post("/grant", {"record": record, "member": member, **extra})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_a_granted_provider_opens_the_record_and_gets_the_original_bytes(trio) -> None:
    patient, authority, provider = trio
    cid = publish(patient)
    settle(trio)
    grant(patient, cid, node_id(provider), purpose="follow-up")
    settle(trio)
    opened = provider.post("/open_record", {"record": "MRI", "purpose": "follow-up"})
    assert opened.status_code == 200, opened.text
    assert (data_dir(provider) / opened.json()["path"]).read_bytes() == (data_dir(patient) / "MRI.pdf").read_bytes()
    assert opened.json()["grant"]
    on_chain = [tx for block in settle(trio) for tx in block["transactions"]]
    assert not any("password" in str(tx) for tx in on_chain)
    assert all(key not in str(on_chain) for key in ("BEGIN", "PRIVATE"))


def test_no_grant_revoked_expired_or_removed_cannot_open_and_each_says_which(trio) -> None:
    patient, authority, provider = trio
    cid = publish(patient)
    settle(trio)
    refused = provider.post("/open_record", {"record": cid})
    assert refused.status_code == 403 and "no grant" in refused.json()["error"]
    grant_id = grant(patient, cid, node_id(provider))
    settle(trio)
    assert provider.post("/open_record", {"record": cid}).status_code == 200
    assert patient.post("/revoke", {"grant": grant_id}).status_code == 201
    settle(trio)
    revoked = provider.post("/open_record", {"record": cid})
    assert revoked.status_code == 403 and "revoked" in revoked.json()["error"]
    grant(patient, cid, node_id(provider), expires="2020-01-01 00:00:00.000000")
    settle(trio)
    expired = provider.post("/open_record", {"record": cid})
    assert expired.status_code == 403 and "expired" in expired.json()["error"]
    grant(patient, cid, node_id(provider))
    assert authority.post("/remove_member", {"node_id": node_id(provider)}).status_code == 201
    settle(trio)
    removed = provider.post("/open_record", {"record": cid})
    assert removed.status_code == 403 and "removed" in removed.json()["error"]


def test_a_grant_made_by_anyone_but_the_owner_is_refused_by_every_node(signed_network, kubo: Kubo) -> None:
    patient, other, authority = signed_network(("patient", "patient", "healthcare_authority"), ipfs_api=kubo.api_url)
    patient.post("/connect_node", {"nodes": [other.url, authority.url]})
    write_sample_record(data_dir(patient) / "MRI.pdf")
    cid = publish(patient)
    nodes = (patient, other, authority)
    settle(nodes)
    by_route = other.post("/grant", {"record": cid, "member": node_id(authority)})
    assert by_route.status_code == 403 and "owner" in by_route.json()["error"]
    thief = identity_of(other)
    forged = {"type": "grant", "id": uuid.uuid4().hex, "grantee": node_id(authority), "expires": "", "purpose": "",
              "records": [{"cid": cid, "key": _any_wrapped_key(patient, cid)}],
              "signer": thief.node_id}
    forged["signature"] = thief.sign(forged)
    for node in nodes:
        response = node.post("/receive_transaction", forged)
        assert response.status_code == 400 and "only its owner" in response.json()["error"]


def _any_wrapped_key(patient: NodeProcess, cid: str) -> dict[str, Any]:
    record = next(tx for block in patient.chain() for tx in block["transactions"] if tx.get("ipfs_hash") == cid)
    return next(iter(record["keys"].values()))


def test_a_wrapped_key_copied_into_another_grant_does_not_open(trio) -> None:
    patient, authority, provider = trio
    (data_dir(patient) / "XRay.pdf").write_bytes(b"%PDF-1.4 another scan")
    first, second = publish(patient), publish(patient, "XRay.pdf", "X-Ray")
    settle(trio)
    grant_id = grant(patient, first, node_id(provider))
    chain = settle(trio)
    copied = next(tx for block in chain for tx in block["transactions"] if tx["id"] == grant_id)["records"][0]["key"]
    owner = identity_of(patient)  # the owner's own key signs: only the wrapped key is out of place
    replays = [(second, provider), (first, authority)]
    misplaced_ids = []
    for record, grantee in replays:
        misplaced = {"type": "grant", "id": uuid.uuid4().hex, "grantee": node_id(grantee), "expires": "",
                     "purpose": "", "records": [{"cid": record, "key": copied}], "signer": owner.node_id}
        misplaced["signature"] = owner.sign(misplaced)
        assert patient.post("/receive_transaction", misplaced).status_code == 201
        misplaced_ids.append(misplaced["id"])
    settle(trio)
    for record, grantee in replays:
        response = grantee.post("/open_record", {"record": record, "purpose": "replay"})
        assert response.status_code == 403 and "does not open" in response.json()["error"], response.text
    assert provider.post("/open_record", {"record": first}).status_code == 200
    settle(trio)
    accesses = patient.get("/audit").json()["accesses"]  # newest first: the open, then the two refusals
    assert [(entry["member"], entry["record"], entry["outcome"], entry["grant"]) for entry in accesses] == [
        (node_id(provider), first, "opened", grant_id),
        (node_id(authority), first, "refused", misplaced_ids[1]),
        (node_id(provider), second, "refused", misplaced_ids[0])]
    assert all("does not open" in entry["reason"] and entry["purpose"] == "replay" for entry in accesses[1:])


def test_a_newer_grant_whose_key_does_not_open_leaves_an_older_valid_grant_in_force(trio) -> None:
    patient, authority, provider = trio
    (data_dir(patient) / "XRay.pdf").write_bytes(b"%PDF-1.4 another scan")
    first, second = publish(patient), publish(patient, "XRay.pdf", "X-Ray")
    settle(trio)
    older = grant(patient, first, node_id(provider))
    for_second = grant(patient, second, node_id(provider))
    chain = settle(trio)
    copied = next(tx for block in chain for tx in block["transactions"] if tx["id"] == for_second)["records"][0]["key"]
    owner = identity_of(patient)
    newer = {"type": "grant", "id": uuid.uuid4().hex, "grantee": node_id(provider), "expires": "", "purpose": "",
             "records": [{"cid": first, "key": copied}], "signer": owner.node_id}
    newer["signature"] = owner.sign(newer)
    assert patient.post("/receive_transaction", newer).status_code == 201
    settle(trio)
    opened = provider.post("/open_record", {"record": first})
    assert opened.status_code == 200, opened.text
    assert opened.json()["grant"] == older
    assert (data_dir(provider) / opened.json()["path"]).read_bytes() == (data_dir(patient) / "MRI.pdf").read_bytes()


def test_the_audit_lists_exactly_the_opens_and_refusals_in_order_on_every_node(trio) -> None:
    patient, authority, provider = trio
    cid = publish(patient)
    settle(trio)
    happened = []
    provider.post("/open_record", {"record": cid, "purpose": "curious"})
    happened.append((node_id(provider), "refused"))
    grant(patient, cid, node_id(provider))
    settle(trio)
    for purpose in ("review", "second opinion"):
        assert provider.post("/open_record", {"record": cid, "purpose": purpose}).status_code == 200
        happened.append((node_id(provider), "opened"))
    assert authority.post("/open_record", {"record": cid}).status_code == 403
    happened.append((node_id(authority), "refused"))
    settle(trio)
    owner = node_id(patient)
    answers = [node.get(f"/audit?owner={owner}").json() for node in trio]
    assert answers[0] == answers[1] == answers[2]
    seen = [(entry["member"], entry["outcome"]) for entry in answers[0]["accesses"]]
    assert seen == list(reversed(happened))  # newest first
    by_member = patient.get(f"/audit?member={node_id(provider)}").json()["accesses"]
    assert [entry["purpose"] for entry in by_member] == ["second opinion", "review", "curious"]


def test_break_glass_needs_a_reason_is_recorded_and_flagged_first(trio) -> None:
    patient, authority, provider = trio
    cid = publish(patient)
    settle(trio)
    grant(patient, cid, node_id(provider))
    settle(trio)
    assert provider.post("/open_record", {"record": cid}).status_code == 200
    without = authority.post("/open_record", {"record": cid, "emergency": True})
    assert without.status_code == 403 and "reason" in without.json()["error"]
    with_reason = authority.post("/open_record", {"record": cid, "emergency": True,
                                                  "reason": "unconscious in the emergency room"})
    assert with_reason.status_code == 200 and with_reason.json()["emergency"] is True
    assert (data_dir(authority) / with_reason.json()["path"]).read_bytes() == \
        (data_dir(patient) / "MRI.pdf").read_bytes()
    assert provider.post("/open_record", {"record": cid, "emergency": True, "reason": "curious"}).status_code == 403
    settle(trio)
    accesses = patient.get("/audit").json()["accesses"]
    assert [entry["emergency"] for entry in accesses[:3]] == [True, True, True]
    assert accesses[0]["member"] == node_id(provider) and accesses[0]["outcome"] == "refused"
    assert accesses[1]["reason"] == "unconscious in the emergency room" and accesses[1]["outcome"] == "opened"
    assert accesses[2]["outcome"] == "refused"
    assert [entry["emergency"] for entry in accesses[3:]] == [False]


def test_the_audit_of_a_record_by_name_lists_its_versions_accesses_in_the_order_they_happened(trio) -> None:
    patient, authority, provider = trio
    older = publish(patient)
    settle(trio)
    newer = publish(patient)  # the same file again: a new key, a new CID, the next version of "MRI"
    settle(trio)
    grant(patient, "MRI", node_id(provider))  # every version
    settle(trio)
    opened = [older, newer, older]
    for cid in opened:
        assert provider.post("/open_record", {"record": cid}).status_code == 200
    settle(trio)  # the three accesses in one block
    accesses = patient.get("/audit?record=MRI").json()["accesses"]
    assert [entry["record"] for entry in accesses] == list(reversed(opened))
