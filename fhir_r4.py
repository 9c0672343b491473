"""FHIR R4 views of a node's chain, read-only: DocumentReference (the records), and on a signed network Consent
(the grants) and AuditEvent (the opens and refusals). Plain Python, no Flask, no network.

`Node` gathers the chain's data into the plain entries below and calls `search`, `read` or `capability_statement`;
every resource is checked against the R4B models of `fhir.resources` (R4B's DocumentReference, Consent and
AuditEvent are R4's) before it leaves, and serialised by them. Failures are the errors of errors.py; app.py answers
them as an OperationOutcome (`operation_outcome`). (Not fhir.py: that name would hide the `fhir` package that
fhir.resources installs.)

What is mapped, and from where:
- DocumentReference, one per record version (a transaction with an `ipfs_hash`), id = the transaction's id:
  status current (the newest version of its user_id and EHR_name) or superseded; subject = `user_id` (a logical
  reference: an identifier, there is no Patient resource); description = `EHR_name`; date = the block's time;
  `content.attachment`: url `ipfs://CID`, title = the file's name on IPFS, size = Kubo's size figure (the DAG's,
  a few bytes above the file's), contentType application/octet-stream (the bytes are AES Crypt ciphertext, said
  by `content.format`); identifiers: the chain position (`block/position`) and the CID.
- AuditEvent (IHE Basic Audit Log Patterns, a patient record read): one per access transaction, id = its id.
- Consent, one per grant, id = the grant's id: active, or inactive once revoked or expired.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

from errors import BadInput, NotFound

FHIR_VERSION = "4.0.1"
MEDIA_TYPE = "application/fhir+json"
ID_PATTERN = re.compile(r"[A-Za-z0-9\-.]{1,64}")
MAX_UNSIGNED_INT = 2**31 - 1
SERVED = ("DocumentReference",)
SERVED_SIGNED = ("DocumentReference", "AuditEvent", "Consent")

# Identifier systems of this network's own values
SYSTEM = "urn:emr-chain"
USER_ID = f"{SYSTEM}:user-id"
NODE_ID = f"{SYSTEM}:node-id"
CID = f"{SYSTEM}:ipfs-cid"
POSITION = f"{SYSTEM}:chain-position"
TRANSACTION = f"{SYSTEM}:transaction-id"
FORMAT = f"{SYSTEM}:format"

DCM = "http://dicom.nema.org/resources/ontology/DCM"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
BALP_PATIENT_READ = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientRead"

COMMON_PARAMETERS = ("_id", "_format", "_count")
JSON_FORMATS = ("json", "application/json", "application/fhir+json")
PARAMETERS: dict[str, dict[str, str]] = {
    "DocumentReference": {
        "subject": "the user_id the record is about (also Patient/<user_id>)",
        "patient": "the same as subject",
        "subject:identifier": f"[{USER_ID}|]<user_id>",
        "patient:identifier": f"[{USER_ID}|]<user_id>",
        "description": "the record's EHR_name (starts with, any case)",
        "status": "current (the newest version) or superseded",
        "identifier": f"[{CID}|]<CID> or [{POSITION}|]<block>/<position>",
    },
    "AuditEvent": {
        "patient": "the user_id of the record accessed",
        "agent": "the node id of the member that opened or was refused",
        "entity": "the record accessed: DocumentReference/<id> or its CID",
        "outcome": "0 (opened) or 4 (refused)",
    },
    "Consent": {
        "patient": "the user_id of the records granted",
        "actor": "the node id of the member the grant is to",
        "status": "active or inactive (revoked or expired)",
        "data": "a record granted: DocumentReference/<id> (or just its id)",
    },
}
ISSUE_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
               409: "conflict", 413: "too-costly", 415: "not-supported", 421: "security"}


# -- what the node hands over --------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """One record version on the chain."""

    tx: Mapping[str, Any]
    block: int
    position: int
    timestamp: str
    current: bool = True
    replaces: str | None = None  # the id of the version before it
    signer: str | None = None    # "patient abcd-efgh", on a signed network


@dataclass(frozen=True)
class Access:
    """An access transaction (an open or a refusal), as node.audit describes it, with its own id."""

    id: str
    entry: Mapping[str, Any]       # node._describe_access's fields
    record_id: str | None          # the DocumentReference id of the record accessed
    member: str                    # "healthcare_provider abcd-efgh"
    observer: tuple[str, str]      # the node answering: (node id, "patient abcd-efgh")


@dataclass(frozen=True)
class Grant:
    """A grant as node._grant_status describes it, with when it was made (and revoked)."""

    status: Mapping[str, Any]
    timestamp: str
    revoked_at: str | None
    user_ids: Sequence[str]
    record_ids: Sequence[str]
    owner: str
    grantee: str


@dataclass
class Sources:
    """What a search reads; each is asked only for the resource type searched."""

    records: Any = None   # () -> list[Record]
    accesses: Any = None  # () -> list[Access]
    grants: Any = None    # () -> list[Grant]
    signed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# -- the R4B models ----------------------------------------------------------------------------

@lru_cache(maxsize=None)
def model(resource_type: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class  # imported on first use: pydantic models take a while
    return get_fhir_model_class(resource_type)


def validated(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource as its R4B model reads and writes it (a ValueError names what does not fit)."""
    return json.loads(model(resource["resourceType"]).model_validate(resource).model_dump_json())


def to_json(resource: dict[str, Any]) -> str:
    return json.dumps(resource, ensure_ascii=False, separators=(",", ":"))


# -- time ---------------------------------------------------------------------------------------

def instant(timestamp: str) -> str:
    """The chain's local time ('2020-09-02 23:33:07.304063') as a FHIR instant, in the node's time zone."""
    try:
        moment = datetime.fromisoformat(timestamp)
    except ValueError:
        moment = datetime.now()
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return moment.isoformat()


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


# -- resources ------------------------------------------------------------------------------

def _who(system: str, value: str, display: str | None = None) -> dict[str, Any]:
    reference: dict[str, Any] = {"identifier": {"system": system, "value": value}}
    if display:
        reference["display"] = display
    return reference


def document_reference(record: Record) -> dict[str, Any]:
    tx = record.tx
    attachment: dict[str, Any] = {"contentType": "application/octet-stream", "url": f"ipfs://{tx['ipfs_hash']}",
                                  "title": tx.get("file_name") or tx["EHR_name"],
                                  "creation": instant(record.timestamp)}
    size = str(tx.get("file_size", ""))
    if size.isdigit() and int(size) <= MAX_UNSIGNED_INT:
        attachment["size"] = int(size)
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference", "id": tx["id"],
        "masterIdentifier": {"system": CID, "value": tx["ipfs_hash"]},
        "identifier": [{"system": POSITION, "value": f"{record.block}/{record.position}"},
                       {"system": TRANSACTION, "value": tx["id"]}],
        "status": "current" if record.current else "superseded",
        "docStatus": "final",
        "subject": _who(USER_ID, tx["user_id"], tx["user_id"]),
        "date": instant(record.timestamp),
        "description": tx["EHR_name"],
        "content": [{"attachment": attachment,
                     "format": {"system": FORMAT, "code": "aescrypt-2",
                                "display": "AES Crypt stream format 2 (AES-256): open with the patient's password, "
                                           "or on a signed network with a consent grant (POST /open_record)"}}],
    }
    if record.signer and tx.get("signer"):
        resource["author"] = [_who(NODE_ID, tx["signer"], record.signer)]
    if record.replaces:
        resource["relatesTo"] = [{"code": "replaces", "target": {"reference": f"DocumentReference/{record.replaces}"}}]
    return resource


def audit_event(access: Access) -> dict[str, Any]:
    entry = access.entry
    opened = entry["outcome"] == "opened"
    reason = {"system": ACT_REASON, "code": "ETREAT", "display": "emergency treatment"} if entry["emergency"] \
        else {"system": ACT_REASON, "code": "TREAT", "display": "treatment"}
    purpose = {"coding": [reason], **({"text": entry["purpose"]} if entry["purpose"] else {})}
    entities: list[dict[str, Any]] = [
        {"what": {"reference": f"DocumentReference/{access.record_id}"} if access.record_id else
                 {"identifier": {"system": CID, "value": entry["record"]}},
         "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2",
                  "display": "System Object"},
         "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "3", "display": "Report"},
         "name": entry["EHR_name"], "description": f"ipfs://{entry['record']}"},
        {"what": _who(USER_ID, entry["user_id"], entry["user_id"]),
         "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1",
                  "display": "Person"},
         "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient"}},
    ]
    if entry.get("grant"):
        entities.append({"what": {"reference": f"Consent/{entry['grant']}"},
                         "type": {"system": "http://hl7.org/fhir/resource-types", "code": "Consent",
                                  "display": "Consent"}})
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent", "id": access.id,
        "meta": {"profile": [BALP_PATIENT_READ]},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
                 "display": "RESTful Operation"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "read", "display": "read"}],
        "action": "R",
        "recorded": instant(entry["at"]),
        "outcome": "0" if opened else "4",
        "purposeOfEvent": [purpose],
        "agent": [{"type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
                   "who": _who(NODE_ID, entry["member"], access.member), "requestor": True,
                   "purposeOfUse": [purpose]}],
        "source": {"observer": _who(NODE_ID, access.observer[0], access.observer[1]),
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4",
                             "display": "Application Server"}]},
        "entity": entities,
    }
    if entry["reason"]:
        resource["outcomeDesc"] = entry["reason"]
    return resource


def consent(grant: Grant) -> dict[str, Any]:
    status = grant.status
    end = [moment for moment in (status["expires"], grant.revoked_at) if moment]
    provision: dict[str, Any] = {
        "type": "permit",
        "actor": [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                        "code": "IRCP", "display": "information recipient"}]},
                   "reference": _who(NODE_ID, status["grantee"], grant.grantee)}],
        "action": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "access",
                                "display": "Access"}]}],
        "data": [{"meaning": "instance", "reference": {"reference": f"DocumentReference/{record_id}"}}
                 for record_id in grant.record_ids],
    }
    if end:
        provision["period"] = {"end": instant(min(end))}
    if status["purpose"]:
        provision["purpose"] = [{"display": status["purpose"]}]
    resource: dict[str, Any] = {
        "resourceType": "Consent", "id": status["grant"],
        "identifier": [{"system": TRANSACTION, "value": status["grant"]}],
        "status": "active" if status["status"] == "active" else "inactive",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy", "display": "Privacy Consent"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0", "display": "Patient Consent"}]}],
        "dateTime": instant(grant.timestamp),
        "performer": [_who(NODE_ID, status["owner"], grant.owner)],
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN",
                                   "display": "opt-in"}],
                       "text": f"emr-chain grant, {status['status']}"
                               + (f" (revoked in block {status['revoked_in_block']})"
                                  if status["revoked_in_block"] else "")},
        "provision": provision,
    }
    if len(set(grant.user_ids)) == 1:
        resource["patient"] = _who(USER_ID, grant.user_ids[0], grant.user_ids[0])
    return resource


def capability_statement(base: str, signed: bool, version: str, role: str) -> dict[str, Any]:
    resources = []
    for resource_type in (SERVED_SIGNED if signed else SERVED):
        resources.append({
            "type": resource_type,
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "searchParam": [{"name": name, "type": "token" if name in ("status", "outcome", "_id") or
                             name.endswith(":identifier") or name == "identifier" else
                             "string" if name == "description" else "reference", "documentation": documentation}
                            for name, documentation in PARAMETERS[resource_type].items() if ":" not in name],
        })
    return validated({
        "resourceType": "CapabilityStatement", "status": "active", "date": now(), "kind": "instance",
        "software": {"name": "emr-chain", "version": version},
        "implementation": {"description": f"emr-chain {role} node: read-only FHIR views of its chain",
                           "url": base},
        "fhirVersion": FHIR_VERSION, "format": ["json"],
        "rest": [{"mode": "server",
                  "documentation": "Read-only. Records are DocumentReferences whose attachment is ipfs://CID; the "
                                   "node serves those bytes (AES Crypt ciphertext) at GET /get_file?ipfs_hash=CID.",
                  "resource": resources}],
    })


def operation_outcome(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    return validated({"resourceType": "OperationOutcome",
                      "issue": [{"severity": "error" if status < 500 else "fatal",
                                 "code": code or ISSUE_CODES.get(status, "exception"), "diagnostics": message}]})


# -- search and read -------------------------------------------------------------------------

def served(sources: Sources) -> tuple[str, ...]:
    return SERVED_SIGNED if sources.signed else SERVED


def _resource_type(resource_type: str, sources: Sources) -> None:
    if resource_type not in served(sources):
        extra = "" if sources.signed or resource_type not in SERVED_SIGNED else \
            " (AuditEvent and Consent come from consent grants: a signed network's, --security signed)"
        raise NotFound(f"this server has no {resource_type} resources{extra}; it serves {', '.join(served(sources))}")


def _all(resource_type: str, sources: Sources) -> list[dict[str, Any]]:
    if resource_type == "DocumentReference":
        return [document_reference(record) for record in sources.records()]
    if resource_type == "AuditEvent":
        return [audit_event(access) for access in sources.accesses()]
    return [consent(grant) for grant in sources.grants()]


def read(resource_type: str, resource_id: str, sources: Sources) -> dict[str, Any]:
    _resource_type(resource_type, sources)
    if not ID_PATTERN.fullmatch(resource_id):
        raise BadInput(f"{resource_id!r} is not a FHIR id (1 to 64 of A-Z, a-z, 0-9, '-' and '.')")
    for resource in _all(resource_type, sources):
        if resource["id"] == resource_id:
            return validated(resource)
    raise NotFound(f"no {resource_type}/{resource_id} on this node's chain (a new record counts once it is mined)")


def search(resource_type: str, params: Iterable[tuple[str, str]], sources: Sources, base: str,
           query: str = "") -> dict[str, Any]:
    """A searchset Bundle of the resources every parameter matches (several values of one parameter: any)."""
    _resource_type(resource_type, sources)
    wanted: dict[str, list[str]] = {}
    for name, value in params:
        if name not in PARAMETERS[resource_type] and name not in COMMON_PARAMETERS:
            raise BadInput(f"unknown search parameter {name!r} for {resource_type}; this server knows "
                           f"{', '.join([*PARAMETERS[resource_type], *COMMON_PARAMETERS])}")
        wanted.setdefault(name, []).extend(part for part in value.split(",") if part != "" or name == "_format")
    for value in wanted.pop("_format", []):
        if value not in JSON_FORMATS:
            raise BadInput(f"'_format': this server speaks JSON only ({', '.join(JSON_FORMATS)}), not {value!r}")
    count = None
    for value in wanted.pop("_count", []):
        if not value.isdigit() or int(value) > 10_000:
            raise BadInput(f"'_count' must be a whole number up to 10000, not {value!r}")
        count = int(value)
    matches = [resource for resource in _all(resource_type, sources)
               if all(any(_matches(resource, name, value) for value in values) for name, values in wanted.items())]
    total = len(matches)
    if count is not None:
        matches = matches[:count]
    entries = [{"fullUrl": f"{base}/{resource_type}/{resource['id']}", "resource": validated(resource),
                "search": {"mode": "match"}} for resource in matches]
    bundle = {"resourceType": "Bundle", "type": "searchset", "total": total,
              "link": [{"relation": "self", "url": f"{base}/{resource_type}" + (f"?{query}" if query else "")}],
              "entry": entries}
    checked = validated({**bundle, "entry": []})  # the resources were checked one by one, as their own types
    checked["entry"] = entries
    return checked


def _token(value: str, system: str) -> str | None:
    """A token search value 'system|code' or 'code' -> the code, or None if it names another system."""
    if "|" in value:
        given, _, code = value.partition("|")
        return code if given in ("", system) else None
    return value


def _reference_id(value: str, prefix: str) -> str:
    return value.removeprefix(prefix)


def _matches(resource: dict[str, Any], name: str, value: str) -> bool:
    kind = resource["resourceType"]
    if name == "_id":
        return resource["id"] == value
    if kind == "DocumentReference":
        if name in ("subject", "patient"):
            return resource["subject"]["identifier"]["value"] == _reference_id(value, "Patient/")
        if name in ("subject:identifier", "patient:identifier"):
            return resource["subject"]["identifier"]["value"] == _token(value, USER_ID)
        if name == "description":
            return resource["description"].lower().startswith(value.lower())
        if name == "status":
            return resource["status"] == value
        if name == "identifier":
            identifiers = [resource["masterIdentifier"], *resource["identifier"]]
            if "|" in value:
                system, _, code = value.partition("|")
                return any(item["value"] == code and system in ("", item["system"]) for item in identifiers)
            return any(item["value"] == value for item in identifiers)
    if kind == "AuditEvent":
        if name == "patient":
            return any(entity["what"].get("identifier", {}).get("value") == _reference_id(value, "Patient/")
                       for entity in resource["entity"] if entity["type"]["code"] == "1")
        if name == "agent":
            return any(agent["who"]["identifier"]["value"] == value for agent in resource["agent"])
        if name == "entity":
            target = resource["entity"][0]
            return target["what"].get("reference") == value or \
                target.get("description") == f"ipfs://{value}" or \
                target["what"].get("reference") == f"DocumentReference/{value}"
        if name == "outcome":
            return resource["outcome"] == value
    if kind == "Consent":
        if name == "patient":
            return resource.get("patient", {}).get("identifier", {}).get("value") == _reference_id(value, "Patient/")
        if name == "actor":
            return any(actor["reference"]["identifier"]["value"] == value for actor in resource["provision"]["actor"])
        if name == "status":
            return resource["status"] == value
        if name == "data":
            wanted = value if value.startswith("DocumentReference/") else f"DocumentReference/{value}"
            return any(item["reference"]["reference"] == wanted for item in resource["provision"]["data"])
    return False
