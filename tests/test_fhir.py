"""The read-only FHIR R4 endpoints: every resource a node serves parses with fhir.resources' R4B models as the type
it declares; a real FHIR client (fhirclient, R4) reads a patient's DocumentReferences from a running node and follows
the attachment (ipfs://CID -> GET /get_file?ipfs_hash=CID) to the record's bytes; errors are OperationOutcomes."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
import requests
from fhir.resources.R4B import get_fhir_model_class
from fhirclient import client as fhir_client
from fhirclient.models.documentreference import DocumentReference as R4DocumentReference

import crypto
from conftest import wait_until
from scripts.cluster import Kubo, NodeProcess

CID_A = "QmbWxSqxhZms74885xceSaiHVvdjqiVWrATtYUrrUnVE1K"
CID_B = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"
FHIR_JSON = "application/fhir+json"


def parsed(resource: dict[str, Any], expected: str | None = None) -> Any:
    """The resource read by the R4B model of the type it declares (and, in a Bundle, each entry by its own)."""
    if expected:
        assert resource["resourceType"] == expected
    model = get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    for entry in resource.get("entry", []):
        parsed(entry["resource"])
    return model


def fhir_get(client: Any, path: str, status: int = 200) -> dict[str, Any]:
    response = client.get(path)
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == FHIR_JSON
    return response.get_json()


@pytest.fixture
def records(client) -> Any:
    """A paper node with two versions of xxxxx's MRI and one record of yyyyy, mined."""
    for user, cid, name in (("xxxxx", CID_A, "MRI"), ("yyyyy", CID_B, "X-ray"), ("xxxxx", CID_B, "MRI")):
        assert client.post("/add_transaction", json={"user_id": user, "ipfs_hash": cid, "EHR_name": name,
                                                     "file_name": f"{name}.pdf.aes", "file_size": "64116"}
                           ).status_code == 201
        assert client.get("/mine_block").status_code == 200
    return client


def test_a_patients_document_references_are_a_searchset_of_every_version(records) -> None:
    bundle = fhir_get(records, "/fhir/DocumentReference?subject=xxxxx")
    parsed(bundle, "Bundle")
    assert bundle["type"] == "searchset" and bundle["total"] == 2
    newest, older = (entry["resource"] for entry in reversed(bundle["entry"]))
    assert newest["status"] == "current" and older["status"] == "superseded"
    assert newest["relatesTo"] == [{"code": "replaces", "target": {"reference": f"DocumentReference/{older['id']}"}}]
    assert newest["subject"]["identifier"] == {"system": "urn:emr-chain:user-id", "value": "xxxxx"}
    assert newest["description"] == "MRI"
    attachment = newest["content"][0]["attachment"]
    assert attachment == {"contentType": "application/octet-stream", "url": f"ipfs://{CID_B}",
                          "title": "MRI.pdf.aes", "size": 64116, "creation": attachment["creation"]}
    assert {"system": "urn:emr-chain:chain-position", "value": "4/0"} in newest["identifier"]
    chain = records.get("/get_chain").get_json()["chain"]
    assert newest["date"].startswith(chain[3]["timestamp"][:19].replace(" ", "T"))
    for entry in bundle["entry"]:
        assert entry["fullUrl"].endswith(f"/fhir/DocumentReference/{entry['resource']['id']}")


@pytest.mark.parametrize("query, total", [
    ("patient=Patient/xxxxx", 2), ("subject:identifier=urn:emr-chain:user-id|yyyyy", 1), ("status=current", 2),
    ("description=x-r", 1), (f"identifier={CID_A}", 1), ("identifier=urn:emr-chain:chain-position|3/0", 1),
    ("subject=xxxxx,yyyyy", 3), ("subject=nobody", 0), ("", 3), ("subject=xxxxx&_count=1", 2),
])
def test_document_reference_search_parameters(records, query, total) -> None:
    bundle = fhir_get(records, f"/fhir/DocumentReference?{query}")
    parsed(bundle, "Bundle")
    assert bundle["total"] == total
    assert len(bundle["entry"]) == (1 if "_count=1" in query else total)


def test_a_document_reference_is_read_by_its_id(records) -> None:
    first = fhir_get(records, "/fhir/DocumentReference?subject=yyyyy")["entry"][0]["resource"]
    document = fhir_get(records, f"/fhir/DocumentReference/{first['id']}")
    parsed(document, "DocumentReference")
    assert document == first
    # What a hospital's R4 client reads: fhirclient's own (R4) model takes it as it is, strictly.
    assert R4DocumentReference(document, strict=True).content[0].attachment.url == f"ipfs://{CID_B}"


@pytest.mark.parametrize("path, status, says", [
    ("/fhir/DocumentReference?colour=blue", 400, "unknown search parameter 'colour'"),
    ("/fhir/DocumentReference?_format=xml", 400, "JSON only"),
    ("/fhir/DocumentReference?_count=lots", 400, "'_count'"),
    ("/fhir/DocumentReference/not!an!id", 400, "is not a FHIR id"),
    ("/fhir/DocumentReference/" + "a" * 65, 400, "is not a FHIR id"),
    ("/fhir/DocumentReference/0123456789abcdef0123456789abcdef", 404, "no DocumentReference/0123"),
    ("/fhir/Patient?name=x", 404, "no Patient resources"),
    ("/fhir/Consent", 404, "signed network"),
    ("/fhir/AuditEvent/abc", 404, "signed network"),
])
def test_errors_are_operation_outcomes(records, path, status, says) -> None:
    outcome = fhir_get(records, path, status)
    parsed(outcome, "OperationOutcome")
    (issue,) = outcome["issue"]
    assert issue["severity"] == "error" and says in issue["diagnostics"]
    assert issue["code"] == ("not-found" if status == 404 else "invalid")


def test_the_capability_statement_says_what_the_node_serves(records, make_client) -> None:
    paper = fhir_get(records, "/fhir/metadata")
    parsed(paper, "CapabilityStatement")
    assert paper["fhirVersion"] == "4.0.1" and paper["format"] == ["json"] and paper["kind"] == "instance"
    assert [resource["type"] for resource in paper["rest"][0]["resource"]] == ["DocumentReference"]
    assert {"read", "search-type"} == {i["code"] for i in paper["rest"][0]["resource"][0]["interaction"]}
    signed = fhir_get(make_client(security="signed"), "/fhir/metadata")
    parsed(signed, "CapabilityStatement")
    assert [resource["type"] for resource in signed["rest"][0]["resource"]] == ["DocumentReference", "AuditEvent",
                                                                                "Consent"]
    empty = fhir_get(make_client(security="signed"), "/fhir/Consent")
    parsed(empty, "Bundle")
    assert empty["total"] == 0


KEY = "correct-horse-battery-staple-0123456789"


def test_fhir_needs_the_key_like_the_rest_of_the_api(make_client) -> None:
    node = make_client(api_key=KEY)
    assert node.get("/fhir/metadata").status_code == 401
    assert node.get("/fhir/metadata", headers={"X-API-Key": KEY}).status_code == 200


def assert_outcome(status: int, content_type: str, body: dict[str, Any], code: str, says: str) -> None:
    """An error a FHIR client can read: application/fhir+json, one OperationOutcome issue with its code and the
    node's own message."""
    assert content_type.split(";")[0] == FHIR_JSON, (status, body)
    parsed(body, "OperationOutcome")
    (issue,) = body["issue"]
    assert issue["severity"] == "error" and issue["code"] == code and says in issue["diagnostics"]


@pytest.mark.parametrize("method, path, headers, status, code, says", [
    ("GET", "/fhir/metadata", {}, 401, "login", "needs an API key"),
    ("GET", "/fhir/metadata", {"X-API-Key": KEY, "Origin": "http://elsewhere.example"}, 403, "forbidden",
     "may not call this node"),
    ("GET", "/fhir/DocumentReference/abc/_history", {"X-API-Key": KEY}, 404, "not-found", "no such endpoint"),
    ("POST", "/fhir/metadata", {"X-API-Key": KEY}, 405, "not-supported", "POST is not allowed on /fhir/metadata"),
])
def test_refusals_before_a_fhir_view_are_operation_outcomes_too(make_client, method, path, headers, status, code,
                                                                 says) -> None:
    node = make_client(api_key=KEY)
    response = node.open(path, method=method, headers=headers)
    assert response.status_code == status
    assert_outcome(status, response.headers["Content-Type"], response.get_json(force=True), code, says)
    if status == 405:
        assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}
    plain = node.open(path.replace("/fhir", "/fhirx"), method=method, headers=headers)
    assert plain.mimetype == "application/json" and "error" in plain.get_json()  # elsewhere errors stay {"error"}


@pytest.mark.process
def test_a_running_node_refuses_a_fhir_request_from_its_head_with_an_operation_outcome(spawn_node) -> None:
    node = spawn_node(api_key=KEY)
    for headers, status, code, says in (({}, 401, "login", "needs an API key"),
                                        ({"X-API-Key": KEY, "Host": "elsewhere.example"}, 421, "security",
                                         "does not answer to the host")):
        response = requests.get(node.url + "/fhir/metadata", headers=headers, timeout=10)
        assert response.status_code == status
        assert_outcome(status, response.headers["Content-Type"], response.json(), code, says)
    outside = requests.get(node.url + "/get_chain", timeout=10)
    assert outside.status_code == 401 and outside.headers["Content-Type"] == "application/json"
    assert "API key" in outside.json()["error"]


# -- a real FHIR client against a running node -------------------------------------------------

def data_dir(node: NodeProcess) -> Path:
    return Path(node.args[node.args.index("--data-dir") + 1])


def fhir_client_for(node: NodeProcess) -> Any:
    smart = fhir_client.FHIRClient(settings={"app_id": "emr-chain-test", "api_base": node.url + "/fhir/"})
    smart.server.session.trust_env = False  # every request goes to 127.0.0.1: no proxy may be in the way
    return smart


def test_fhirclient_reads_a_patients_documents_and_follows_the_attachment_to_the_bytes(spawn_node, kubo: Kubo,
                                                                                       tmp_path: Path) -> None:
    patient = spawn_node("patient", ipfs_api=kubo.api_url)
    original = os.urandom(200_000)
    published = requests.post(patient.url + "/publish_record", timeout=60,
                              files={"file": ("MRI.pdf", io.BytesIO(original))},
                              data={"EHR_name": "MRI", "user_id": "patient-42", "password": "shared secret"})
    assert published.status_code == 201, published.text
    assert patient.get("/mine_block").status_code == 200

    smart = fhir_client_for(patient)
    smart.server.get_capability()
    assert smart.server.capabilityStatement.fhirVersion == "4.0.1"
    from fhirclient.models.documentreference import DocumentReference
    found = list(DocumentReference.where(struct={"subject": "patient-42"}).perform_resources_iter(smart.server))
    assert len(found) == 1
    (document,) = found
    assert document.status == "current" and document.description == "MRI"
    assert document.subject.identifier.value == "patient-42"
    url = document.content[0].attachment.url
    assert url == "ipfs://" + published.json()["IPFS Hash"]["Hash"]
    assert document.content[0].attachment.title == "MRI.pdf.aes"
    encrypted = smart.server.request_data("../get_file?ipfs_hash=" + url.removeprefix("ipfs://"))
    assert encrypted[:3] == b"AES"
    (tmp_path / "fetched.aes").write_bytes(encrypted)
    crypto.decrypt_file(tmp_path / "fetched.aes", tmp_path / "fetched", "shared secret")
    assert (tmp_path / "fetched").read_bytes() == original
    read = DocumentReference.read(document.id, smart.server)
    assert read.as_json() == document.as_json()
    assert not list((data_dir(patient) / ".emr" / "uploads").iterdir())


# -- consent on a signed network: Consent and AuditEvent -----------------------------------------

def test_grants_are_consents_and_accesses_are_audit_events_on_a_signed_network(signed_network, kubo: Kubo) -> None:
    patient, authority, provider = signed_network(network={"emergency_members": "healthcare_authority"},
                                                  ipfs_api=kubo.api_url)
    trio = (patient, authority, provider)
    patient.post("/connect_node", {"nodes": [authority.url, provider.url]})
    wait_until(lambda: len(provider.get("/health").json()["peers"]) == 1)

    def settle() -> None:
        wait_until(lambda: patient.get("/health").json()["pending"] >= max(n.get("/health").json()["pending"]
                                                                           for n in trio))
        assert patient.get("/mine_block").status_code == 200
        wait_until(lambda: len({len(node.chain()) for node in trio}) == 1, timeout=15)

    (data_dir(patient) / "MRI.pdf").write_bytes(os.urandom(5000))
    cid = patient.post("/publish_record", {"file_path": "MRI.pdf", "EHR_name": "MRI", "user_id": "xxxxx"}
                       ).json()["IPFS Hash"]["Hash"]
    settle()
    provider_id = provider.get("/identity").json()["node_id"]
    assert provider.post("/open_record", {"record": cid}).status_code == 403
    grant_id = patient.post("/grant", {"record": cid, "member": provider_id, "purpose": "follow-up"}).json()["id"]
    settle()
    assert provider.post("/open_record", {"record": cid, "purpose": "follow-up"}).status_code == 200
    assert authority.post("/open_record", {"record": cid, "emergency": True, "reason": "unconscious"}
                          ).status_code == 200
    active = requests.get(patient.url + f"/fhir/Consent/{grant_id}", timeout=10).json()
    assert patient.post("/revoke", {"grant": grant_id}).status_code == 201
    settle()
    settle()  # the accesses the others recorded

    document = requests.get(patient.url + "/fhir/DocumentReference?subject=xxxxx", timeout=10).json()
    parsed(document, "Bundle")
    record = document["entry"][0]["resource"]
    assert record["author"][0]["display"].startswith("patient ")

    parsed(active, "Consent")
    assert active["status"] == "active"
    consents = requests.get(patient.url + f"/fhir/Consent?actor={provider_id}", timeout=10)
    assert consents.headers["Content-Type"].startswith(FHIR_JSON)
    bundle = consents.json()
    parsed(bundle, "Bundle")
    (consent,) = (entry["resource"] for entry in bundle["entry"])
    assert consent["id"] == grant_id and consent["status"] == "inactive"
    assert consent["patient"]["identifier"]["value"] == "xxxxx"
    assert consent["provision"]["data"] == [{"meaning": "instance",
                                             "reference": {"reference": f"DocumentReference/{record['id']}"}}]
    assert consent["provision"]["period"]["end"] and "revoked in block" in consent["policyRule"]["text"]

    audit = requests.get(patient.url + "/fhir/AuditEvent?patient=xxxxx", timeout=10).json()
    parsed(audit, "Bundle")
    events = [entry["resource"] for entry in audit["entry"]]
    assert [event["outcome"] for event in events] == ["4", "0", "0"]
    refused, opened, emergency = events
    assert opened["entity"][0]["what"] == {"reference": f"DocumentReference/{record['id']}"}
    assert {"what": {"reference": f"Consent/{grant_id}"}}.items() <= opened["entity"][2].items()
    assert opened["agent"][0]["who"]["identifier"]["value"] == provider_id and opened["action"] == "R"
    assert "no grant" in refused["outcomeDesc"]
    assert emergency["purposeOfEvent"][0]["coding"][0]["code"] == "ETREAT"
    assert emergency["agent"][0]["who"]["display"].startswith("healthcare_authority ")
    assert opened["meta"]["profile"] == [
        "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientRead"]
    one = requests.get(patient.url + f"/fhir/AuditEvent/{emergency['id']}", timeout=10).json()
    parsed(one, "AuditEvent")
    assert one == emergency
    only_refusals = requests.get(patient.url + "/fhir/AuditEvent?outcome=4", timeout=10).json()
    assert [entry["resource"]["id"] for entry in only_refusals["entry"]] == [refused["id"]]
