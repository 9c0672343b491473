"""The node's API as an OpenAPI 3 document (served at /openapi.json) and a plain HTML page of it (/docs).

The document is what the property-based API fuzzer (tests/test_fuzz.py) checks every response against,
so it lists every status an endpoint can answer with.
"""
from __future__ import annotations

import html
import json
import re
from typing import Any

from blockchain import CID_V0, CID_V1_BASE32, MAX_TEXT_LENGTH
from identity import NODE_ID

VERSION = "1.0.0"
TEXT_PATTERN = r"^[^\x00-\x1f]*[^\x00-\x1f\s][^\x00-\x1f]*$"  # printable, not only spaces
FILE_NAME_PATTERN = r"^[^\x00-\x1f/\\]*[^\x00-\x1f\s/\\][^\x00-\x1f/\\]*$"
CID_PATTERN = f"({CID_V0.pattern})|({CID_V1_BASE32.pattern})"
JSON = "application/json"
_node_id = {"type": "string", "pattern": NODE_ID.pattern}  # a member's id: 52 characters of base32 (identity.py)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _text(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_LENGTH, "pattern": TEXT_PATTERN,
            "description": description, **extra}


def _object(properties: dict[str, Any], required: list[str], *, closed: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
    if closed:
        schema["additionalProperties"] = False
    return schema


SCHEMAS: dict[str, Any] = {
    "Error": _object({"error": {"type": "string"}}, ["error"]),
    "Transaction": _object({
        "user_id": _text("who the record belongs to"),
        "ipfs_hash": _text("the record's IPFS CID", pattern=CID_PATTERN),
        "EHR_name": _text("the record's name, e.g. MRI"),
        "id": {"type": "string", "pattern": "^[0-9a-f]{32}$", "description": "given by the node"},
        "file_name": _text("the file's name on IPFS, e.g. MRI.pdf.aes", pattern=FILE_NAME_PATTERN),
        "file_size": {"type": "string", "pattern": "^[0-9]{1,19}$", "description": "Kubo's size figure"},
    }, ["user_id", "ipfs_hash", "EHR_name"]),
    "NewTransaction": _object({
        "user_id": _text("who the record belongs to", example="xxxxx"),
        "ipfs_hash": _text("the record's IPFS CID", pattern=CID_PATTERN,
                           example="QmbWxSqxhZms74885xceSaiHVvdjqiVWrATtYUrrUnVE1K"),
        "EHR_name": _text("the record's name", example="MRI"),
        "file_name": _text("the file's name, as create_hash reported it", example="MRI.pdf.aes",
                           pattern=FILE_NAME_PATTERN),
        "file_size": {"oneOf": [{"type": "string", "pattern": "^[0-9]{1,19}$"},
                                {"type": "integer", "minimum": 0, "maximum": 2**62}],
                      "description": "Kubo's size figure, as create_hash reported it"},
        "id": {"type": "string", "pattern": "^[0-9a-f]{32}$",
               "description": "optional; a retry with the same id is recognised, not added twice"},
    }, ["user_id", "ipfs_hash", "EHR_name"]),
    "Block": _object({
        "index": {"type": "integer", "minimum": 1},
        "timestamp": {"type": "string", "example": "2020-09-02 23:33:07.304063"},
        "nonce": {"type": "integer", "minimum": 1},
        "previous_hash": {"type": "string"},
        "transactions": {"type": "array", "items": _ref("Transaction")},
    }, ["index", "timestamp", "nonce", "previous_hash", "transactions"]),
    "FileInfo": _object({"Hash": {"type": "string"}, "Name": {"type": "string"},
                         "Size": {"type": ["string", "null"]}}, ["Hash", "Name", "Size"]),
}
SCHEMAS["Member"] = {"type": "object", "properties": {
    "node_id": _node_id, "short_id": {"type": "string"},
    "role": {"type": "string", "enum": ["patient", "healthcare_authority", "healthcare_provider"]},
    "signing_public_key": {"type": "string"}, "exchange_public_key": {"type": "string"},
    "url": {"type": ["string", "null"]}}, "required": ["node_id", "role", "signing_public_key", "exchange_public_key"]}
SCHEMAS["Grant"] = _object({
    "grant": {"type": "string"}, "block": {"type": "integer"}, "owner": {"type": "string"},
    "grantee": {"type": "string"}, "records": {"type": "array", "items": {"type": "string"}},
    "expires": {"type": "string"}, "purpose": {"type": "string"},
    "status": {"type": "string", "enum": ["active", "revoked", "expired"]},
    "revoked_in_block": {"type": ["integer", "null"]}},
    ["grant", "block", "owner", "grantee", "records", "expires", "purpose", "status", "revoked_in_block"])
SCHEMAS["Access"] = _object({
    "block": {"type": "integer"}, "at": {"type": "string"}, "member": {"type": "string"},
    "member_short_id": {"type": "string"}, "record": {"type": "string"}, "EHR_name": {"type": "string"},
    "user_id": {"type": "string"}, "outcome": {"type": "string", "enum": ["opened", "refused"]},
    "grant": {"type": ["string", "null"]}, "reason": {"type": "string"}, "purpose": {"type": "string"},
    "emergency": {"type": "boolean"}},
    ["block", "at", "member", "member_short_id", "record", "EHR_name", "user_id", "outcome", "grant", "reason",
     "purpose", "emergency"])
_count = {"type": "integer", "minimum": 0}
_pin_states = ["queued", "fetching", "pinned", "failed", "skipped"]
SCHEMAS["RecordsSummary"] = _object({
    "mode": {"type": "string", "enum": ["all", "openable", "none"]}, "known": _count, "pinned": _count,
    "fetching": _count, "queued": _count, "failed": _count, "skipped": _count, "missing": _count},
    ["mode", "known", "pinned", "fetching", "queued", "failed", "skipped", "missing"])
SCHEMAS["PinStatus"] = _object({
    "state": {"type": "string", "enum": _pin_states}, "reason": {"type": "string"}, "attempts": _count,
    "block_index": {"type": "integer"}, "block_timestamp": {"type": "string"},
    "seen_at": {"type": "string"}, "pinned_at": {"type": ["string", "null"]},
    "lag_ms": {"type": ["integer", "null"], "description": "from the block joining this chain to the pin"},
    "retry_in_ms": {"type": ["integer", "null"], "description": "until the next attempt, for a failed pin"}},
    ["state", "reason", "attempts", "block_index", "seen_at", "pinned_at"])
SCHEMAS["RecordStatus"] = _object({
    "cid": {"type": "string"}, "on_chain": {"type": "boolean"}, "file_name": {"type": ["string", "null"]},
    "mode": {"type": "string", "enum": ["all", "openable", "none"]},
    "pin": {"oneOf": [_ref("PinStatus"), {"type": "null"}]},
    "ipfs_peer_id": {"type": ["string", "null"]},
    "providers": _object({
        "routing": {"oneOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}],
                    "description": "providers IPFS content routing names, or 'unknown' (routing is off in a "
                                   "private network)"},
        "nodes": {"type": "array", "items": _object({
            "node": {"type": "string"}, "state": {"type": "string"}, "ipfs_peer_id": {"type": ["string", "null"]},
            "connected": {"type": "boolean"}, "pinned_at": {"type": ["string", "null"]},
            "error": {"type": "string"}}, ["node", "state", "ipfs_peer_id", "connected"])},
        "pinned_copies": _count,
        "peer_ids": {"type": "array", "items": {"type": "string"}}},
        ["routing", "nodes", "pinned_copies", "peer_ids"])},
    ["cid", "on_chain", "mode", "pin", "ipfs_peer_id", "providers"])
SCHEMAS["FileVersion"] = _object({**SCHEMAS["FileInfo"]["properties"], "block_index": {"type": "integer"},
                                  "EHR_name": {"type": "string"}, "user_id": {"type": "string"}},
                                 ["Hash", "Name", "Size", "block_index", "EHR_name", "user_id"])
SCHEMAS["MinedBlock"] = _object({**SCHEMAS["Block"]["properties"], "message": {"type": "string"}},
                                SCHEMAS["Block"]["required"] + ["message"])

ERRORS = {
    400: "bad input: the message names the field",
    401: "an API key is needed (only when the node has one)",
    403: "this node's role does not serve the endpoint, or a web page of another origin asked (allowed_origins)",
    404: "nothing found",
    408: "the request head or body came too slowly (header_timeout, body_timeout)",
    409: "a conflict: the output exists (send overwrite: true), or the node has as many peers as it may keep",
    413: "the body is larger than the endpoint accepts (max_body_bytes; max_upload_bytes for an upload)",
    415: "the body is not of a type the endpoint takes (application/json; multipart/form-data for an upload)",
    421: "the Host header names a host this node does not answer to (allowed_hosts)",
    502: "IPFS answered with an error",
    503: "the IPFS daemon is not reachable, or the node is at a limit it keeps (pending transactions, a sync "
         "running, max_spool_bytes); try again later",
    504: "the IPFS daemon did not answer in time",
}
# What any request may be answered, from its head alone (app.Gate), before its body is read.
HEAD_ERRORS = (400, 401, 403, 408, 413, 421)


def _responses(ok: dict[int, Any], *errors: int) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, schema in ok.items():
        responses[str(status)] = {"description": "success", "content": {JSON: {"schema": schema}}}
    for status in (*HEAD_ERRORS, *errors):
        responses[str(status)] = {"description": ERRORS[status], "content": {JSON: {"schema": _ref("Error")}}}
    return responses


def _json_body(schema: dict[str, Any], example: dict[str, Any] | None = None) -> dict[str, Any]:
    content: dict[str, Any] = {"schema": schema}
    if example:
        content["example"] = example
    return {"required": True, "content": {JSON: content}}


def _operation(summary: str, ok: dict[int, Any], *errors: int, body: dict[str, Any] | None = None,
               parameters: list[dict[str, Any]] | None = None, tag: str = "records") -> dict[str, Any]:
    if body:
        errors = (*errors, 415)
    operation: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": _responses(ok, *errors)}
    if body:
        operation["requestBody"] = body
    if parameters:
        operation["parameters"] = parameters
    return operation


FHIR_JSON = "application/fhir+json"
_fhir_resource = {"type": "object", "properties": {"resourceType": {"type": "string"}}, "required": ["resourceType"]}


def _page_operation(summary: str, media_types: list[str],
                    parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    responses = {str(status): {"description": ERRORS[status], "content": {JSON: {"schema": _ref("Error")}}}
                 for status in (*HEAD_ERRORS, 404)}
    responses["200"] = {"description": "the file", "content": {media: {"schema": {"type": "string"}}
                                                               for media in media_types}}
    responses["304"] = {"description": "not modified since the copy the browser holds (ETag)"}
    operation: dict[str, Any] = {"summary": summary, "tags": ["page"], "responses": responses}
    if parameters:
        operation["parameters"] = parameters
    return operation


_operation_outcome = {"type": "object", "required": ["resourceType", "issue"], "properties": {
    "resourceType": {"type": "string", "enum": ["OperationOutcome"]},
    "issue": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["severity", "code", "diagnostics"],
        "properties": {"severity": {"type": "string"}, "code": {"type": "string"},
                       "diagnostics": {"type": "string", "description": "the message an {\"error\"} would carry"}}}}}}


def _fhir_operation(summary: str, parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every error under /fhir/ is an OperationOutcome, whoever refuses; only a 408 for a head that never arrived
    whole (no path known yet) is {"error": ...}."""
    responses: dict[str, Any] = {"200": {"description": "a FHIR resource",
                                         "content": {FHIR_JSON: {"schema": _fhir_resource}}}}
    for status in (*HEAD_ERRORS, 404):
        content = {FHIR_JSON: {"schema": _operation_outcome}}
        if status == 408:
            content[JSON] = {"schema": _ref("Error")}
        responses[str(status)] = {"description": f"{ERRORS[status]}, as an OperationOutcome", "content": content}
    operation: dict[str, Any] = {"summary": summary, "tags": ["fhir"], "responses": responses}
    if parameters:
        operation["parameters"] = parameters
    return operation


_message = {"type": "string"}
_path_fields = {"file_path": _text("a path inside the node's data directory", maxLength=1024),
                "password": {"type": "string", "minLength": 1, "maxLength": 1024, "format": "password"},
                "output_path": _text("where to write, inside the data directory (optional)", maxLength=1024),
                "overwrite": {"type": "boolean", "default": False}}
_crypt_result = _object({"message": _message, "file_path": {"type": "string"}, "size": {"type": "integer"}},
                        ["message", "file_path", "size"])
_ipfs_errors = (404, 502, 503, 504)
_membership_receipt = _object({"message": {"type": "string"}, "index": {"type": "integer"}, "id": {"type": "string"}},
                              ["message", "index", "id"])
_standing = _object({"member": {"type": "boolean"}, "status": {"type": "string", "enum": ["member", "applicant",
                                                                                         "removed"]},
                     "message": _message}, ["member", "status", "message"])
_node_list = {"type": "array", "minItems": 1, "maxItems": 32, "items": {"type": "string", "format": "uri"}}

PATHS: dict[str, Any] = {
    "/get_chain": {"get": _operation("The whole chain (Fig. 4d)", {200: _object(
        {"chain": {"type": "array", "items": _ref("Block"), "minItems": 1}, "length": {"type": "integer"}},
        ["chain", "length"])}, tag="chain")},
    "/mine_block": {"get": _operation("Mine the pending transactions into a block", {200: _ref("MinedBlock")},
                                      tag="chain")},
    "/add_transaction": {"post": _operation(
        "Record an IPFS hash on the chain (Fig. 4c)",
        {201: _object({"message": _message, "index": {"type": "integer"}, "id": {"type": "string"}},
                      ["message", "index", "id"]),
         200: _object({"message": _message, "index": {"type": "integer"}, "id": {"type": "string"}},
                      ["message", "index", "id"])},
        503, body=_json_body(_ref("NewTransaction"), {"user_id": "xxxxx", "EHR_name": "MRI",
                                                      "ipfs_hash": "QmbWxSqxhZms74885xceSaiHVvdjqiVWrATtYUrrUnVE1K"}),
        tag="chain")},
    "/is_valid": {"get": _operation("Whether this node's chain is valid", {200: _object(
        {"message": _message, "valid": {"type": "boolean"}}, ["message", "valid"])}, tag="chain")},
    "/connect_node": {"post": _operation(
        "Connect peers; each new peer learns about this node too (Fig. 4a)",
        {201: _object({"message": _message, "total_nodes": {"type": "array", "items": {"type": "string"}},
                       "ignored": {"type": "array", "items": {"type": "string"}}}, ["message", "total_nodes"])},
        409, body=_json_body(_object({"nodes": _node_list}, ["nodes"]),
                             {"nodes": ["http://127.0.0.1:5003", "http://127.0.0.1:5004"]}),
        tag="network")},
    "/remove_node": {"post": _operation(
        "Forget peers (a misbehaving peer is also dropped by itself after repeated faults)",
        {200: _object({"message": _message, "total_nodes": {"type": "array", "items": {"type": "string"}},
                       "not_peers": {"type": "array", "items": {"type": "string"}}}, ["message", "total_nodes"])},
        body=_json_body(_object({"nodes": _node_list}, ["nodes"]), {"nodes": ["http://127.0.0.1:5004"]}),
        tag="network")},
    "/peers": {"get": _operation(
        "Every peer and how it behaved lately: faults in a row, the last error, the chain length it had",
        {200: _object({"count": {"type": "integer"}, "peers": {"type": "array", "items": _object({
            "peer": _message, "url": _message, "faults": {"type": "integer"}, "last_error": _message,
            "length": {"type": ["integer", "null"]}, "queued": {"type": "integer"}},
            ["peer", "url", "faults", "last_error", "length", "queued"])}}, ["count", "peers"])}, tag="network")},
    "/blocks": {"get": _operation(
        "Node to node: a page of blocks from index `from` on, for an incremental sync",
        {200: _object({"from": {"type": "integer"}, "length": {"type": "integer"},
                       "blocks": {"type": "array", "items": _ref("Block")}}, ["from", "length", "blocks"])},
        parameters=[{"name": "from", "in": "query", "required": False,
                     "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"}}], tag="network")},
    "/replace_chain": {"get": _operation(
        "Adopt the longest valid chain among the peers", {200: _object(
            {"message": _message, "replaced": {"type": "boolean"}, "length": {"type": "integer"},
             "chain": {"type": "array", "items": _ref("Block")},
             "peers": {"type": "object", "additionalProperties": {"type": "string"}}},
            ["message", "replaced", "chain", "length", "peers"])}, 503, tag="network")},
    "/create_hash": {"post": _operation(
        "Add a file to IPFS (Fig. 4b): a path in the data directory, or a multipart upload",
        {200: _object({"IPFS Hash": _ref("FileInfo")}, ["IPFS Hash"])}, *_ipfs_errors,
        body={"required": True, "content": {
            JSON: {"schema": _object({"file_path": _path_fields["file_path"]}, ["file_path"]),
                   "example": {"file_path": "MRI.pdf.aes"}},
            "multipart/form-data": {"schema": _object({"file": {"type": "string", "format": "binary"}},
                                                      ["file"])}}})},
    "/get_file_hash": {"post": _operation(
        "Find a record by file name or EHR_name (Fig. 4e): the newest, and every version",
        {200: _object({"File info": _ref("FileInfo"), "versions": {"type": "array", "items": _ref("FileVersion")}},
                      ["File info", "versions"])}, 404,
        body=_json_body(_object({"name": _text("file name or EHR_name")}, ["name"]), {"name": "MRI.pdf.aes"}))},
    "/get_file": {
        "post": _operation(
            "Fetch a file from IPFS into the node's downloads folder (Fig. 4f)",
            {200: _object({"message": _message, "path": {"type": "string"}, "size": {"type": "integer"}},
                          ["message", "path", "size"])}, *_ipfs_errors,
            body=_json_body(_object({"ipfs_hash": _text("the file's CID")}, ["ipfs_hash"]),
                            {"ipfs_hash": "QmbWxSqxhZms74885xceSaiHVvdjqiVWrATtYUrrUnVE1K"})),
        "get": {**_operation("Download a file from IPFS as an attachment", {}, *_ipfs_errors,
                             parameters=[{"name": "ipfs_hash", "in": "query", "required": True,
                                          "schema": _text("the file's CID")}]),
                "x-streamed": True},
    },
    "/encrypt_file": {"post": _operation(
        "Encrypt a file with AES-256 (AES Crypt format): FILE -> FILE.aes", {200: _crypt_result}, 404, 409,
        body=_json_body(_object(_path_fields, ["file_path", "password"]),
                        {"file_path": "MRI.pdf", "password": "shared secret"}), tag="encryption")},
    "/decrypt_file": {"post": _operation(
        "Decrypt an AES Crypt file: FILE.aes -> FILE", {200: _crypt_result}, 404, 409,
        body=_json_body(_object(_path_fields, ["file_path", "password"]),
                        {"file_path": "downloads/MRI.pdf.aes", "password": "shared secret"}), tag="encryption")},
    "/identity": {"get": _operation(
        "Who this node is: its id (a fingerprint of its signing key; short_id to read aloud), role, URL, public "
        "keys, its security mode and, on a signed network, the network and whether this node is a member of it "
        "(a node not admitted yet, or removed, says what to ask for)", {200: _object({
            "node_id": _node_id, "short_id": _message, "role": _message,
            "url": {"type": ["string", "null"]}, "signing_public_key": _message, "exchange_public_key": _message,
            "security": {"type": "string", "enum": ["paper", "signed"]},
            "network": _object({"name": _message, "fingerprint": _message, **_standing["properties"]},
                               ["name", "fingerprint", *_standing["required"]])},
            ["node_id", "short_id", "role", "signing_public_key", "exchange_public_key", "security"])},
        tag="membership")},
    "/members": {"get": _operation(
        "Signed network: the members now (after this node's last block) and the ids removed so far",
        {200: _object({"network": _message, "founding_fingerprint": _message,
                       "members": {"type": "array", "items": _ref("Member")},
                       "removed": {"type": "array", "items": _message}},
                      ["network", "founding_fingerprint", "members", "removed"])}, 404, tag="membership")},
    "/admit_member": {"post": _operation(
        "Signed network, healthcare authority: admit a member (as its GET /identity describes it) by a signed "
        "transaction; it may write once the transaction is mined. `replaces`: the member it replaces (the same "
        "node with a rotated key), removed by the same transaction, whose URL and exchange key it may take",
        {201: _membership_receipt, 200: _membership_receipt}, 404, 503,
        body=_json_body(_object({"member": _ref("Member"),
                                 "replaces": _node_id}, ["member"])),
        tag="membership")},
    "/remove_member": {"post": _operation(
        "Signed network, healthcare authority: remove a member by a signed transaction; its later writes are "
        "refused, its earlier ones stay valid",
        {201: _membership_receipt, 200: _membership_receipt}, 404, 503,
        body=_json_body(_object({"node_id": _node_id}, ["node_id"])),
        tag="membership")},
    "/publish_record": {"post": _operation(
        "Patient: encrypt a file, add it to IPFS and record it, in one call: a file of the data directory (JSON) or "
        "one sent in the request (multipart: file, EHR_name, user_id, password), e.g. from the node's page. On a "
        "signed network the key is a fresh random one, wrapped for this node and the network's emergency members "
        "only (send no password); on the paper's network it is the password the patient shares. An upload's "
        "plaintext is spooled in the node's private folder and deleted when done, whatever the outcome",
        {201: _object({"message": _message, "IPFS Hash": _ref("FileInfo"), "index": {"type": "integer"},
                       "id": {"type": "string"}}, ["message", "IPFS Hash", "index", "id"])}, 404, 502, 503, 504,
        body={"required": True, "content": {
            JSON: {"schema": _object({"file_path": _path_fields["file_path"], "EHR_name": _text("the record's name"),
                                      "user_id": _text("the paper's label for whom the record is about"),
                                      "password": _path_fields["password"]}, ["file_path", "EHR_name", "user_id"]),
                   "example": {"file_path": "MRI.pdf", "EHR_name": "MRI", "user_id": "xxxxx"}},
            "multipart/form-data": {"schema": _object({
                "file": {"type": "string", "format": "binary"}, "EHR_name": _text("the record's name"),
                "user_id": _text("the paper's label for whom the record is about"),
                "password": _path_fields["password"]}, ["file", "EHR_name", "user_id"])}}},
        tag="consent")},
    "/grant": {"post": _operation(
        "Signed network, the record's owner: grant a member one record (a CID) or every version of one (a name), "
        "with an optional expiry and purpose; the key travels wrapped for that member (HPKE)",
        {201: _membership_receipt, 200: _membership_receipt}, 404, 409, 503,
        body=_json_body(_object({
            "record": _text("the record's CID or name"), "member": _node_id,
            "expires": {"type": "string", "description": "\"\" (never) or a time like 2027-01-31 23:59:59.000000"},
            "purpose": {"type": "string", "maxLength": MAX_TEXT_LENGTH},
            "versions": {"type": "string", "enum": ["all", "newest"]}}, ["record", "member"])), tag="consent")},
    "/revoke": {"post": _operation(
        "Signed network, the grant's owner: revoke a grant; from the block that holds it, no honest node opens a "
        "record under it (a copy already decrypted cannot be taken back)",
        {201: _membership_receipt, 200: _membership_receipt}, 404, 503,
        body=_json_body(_object({"grant": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}, ["grant"])),
        tag="consent")},
    "/grants": {"get": _operation(
        "Signed network: the grants this node made and those made to it, with their status",
        {200: _object({"made": {"type": "array", "items": _ref("Grant")},
                       "received": {"type": "array", "items": _ref("Grant")}}, ["made", "received"])}, 404,
        tag="consent")},
    "/open_record": {"post": _operation(
        "Signed network: fetch a record and decrypt it into the downloads folder with the key a valid grant wraps "
        "for this node (no password); every open and refusal is recorded on the chain; an emergency member may "
        "break the glass with a stated reason",
        {200: _object({"message": _message, "path": _message, "size": {"type": "integer"}, "record": _message,
                       "grant": {"type": ["string", "null"]}, "emergency": {"type": "boolean"}},
                      ["message", "path", "size", "record", "grant", "emergency"])}, 404, 502, 503, 504,
        body=_json_body(_object({"record": _text("the record's CID or name"),
                                 "purpose": {"type": "string", "maxLength": MAX_TEXT_LENGTH},
                                 "emergency": {"type": "boolean"},
                                 "reason": {"type": "string", "maxLength": MAX_TEXT_LENGTH}}, ["record"])),
        tag="consent")},
    "/audit": {"get": _operation(
        "Signed network: who accessed the records of a member (this node by default): every open and refusal, "
        "emergency accesses first, then newest first",
        {200: _object({"owner": _message, "count": {"type": "integer"},
                       "accesses": {"type": "array", "items": _ref("Access")}}, ["owner", "count", "accesses"])},
        404, parameters=[{"name": name, "in": "query", "required": False, "schema": schema} for name, schema in (
            ("owner", _node_id), ("user_id", {"type": "string"}),
            ("record", {"type": "string"}), ("member", _node_id),
            ("since", {"type": "string"}), ("until", {"type": "string"}),
            ("limit", {"type": "string", "pattern": "^[0-9]{1,4}$"}))], tag="consent")},
    "/health": {"get": _operation(
        "Port, role, chain length, pending count, peers, and on a signed network whether this node is a member; "
        "on a node with an API key, only status and role without it", {200: _object(
            {"status": _message, "port": {"type": "integer"}, "role": _message, "length": {"type": "integer"},
             "pending": {"type": "integer"}, "peers": {"type": "array", "items": {"type": "string"}},
             "ipfs_api": _message, "records": _ref("RecordsSummary"), "membership": _standing},
            ["status", "role"])}, tag="operations")},
    "/records/{cid}": {"get": _operation(
        "Where a record of the chain is held: this node's own pinned copy (pinned, fetching, failed and why) and "
        "which peers hold one", {200: _ref("RecordStatus")}, 404,
        parameters=[{"name": "cid", "in": "path", "required": True,
                     "schema": {"type": "string", "pattern": CID_PATTERN}},
                    {"name": "peers", "in": "query", "required": False,
                     "schema": {"type": "string", "enum": ["true", "false"]},
                     "description": "also ask every peer node for its copy (default true)"}],
        tag="records")},
    "/files": {"get": {**_operation(
        "Download a file of the node's data directory as an attachment (a record decrypted into downloads/, say); "
        "never the node's own folder", {}, 404,
        parameters=[{"name": "path", "in": "query", "required": True,
                     "schema": _text("a path inside the data directory", maxLength=1024,
                                     example="downloads/MRI.pdf")}]),
        "x-streamed": True}},
    "/network": {"get": _operation(
        "This node and each peer: the role and id each says it has, its chain length now, how far behind the longest "
        "it is (peers asked at once, within the peer timeout); on a signed network whether each id is a member's",
        {200: _object({"longest": {"type": "integer"}, "nodes": {"type": "array", "items": _object({
            "url": _message, "self": {"type": "boolean"}, "reachable": {"type": "boolean"},
            "role": {"type": ["string", "null"]}, "node_id": {"type": ["string", "null"]},
            "short_id": {"type": ["string", "null"]}, "length": {"type": ["integer", "null"]},
            "pending": {"type": ["integer", "null"]}, "faults": {"type": "integer"}, "error": _message,
            "member": {"type": ["boolean", "null"]}, "behind": {"type": ["integer", "null"]}},
            ["url", "self", "reachable", "role", "node_id", "short_id", "length", "behind"])}},
            ["longest", "nodes"])}, tag="network")},
    "/": {"get": _page_operation("The node's web page for its role (static/index.html): chain, records, consent "
                                 "and network views over this same API; served without the API key, which the "
                                 "page asks for and sends as X-API-Key", ["text/html"])},
    "/static/{filename}": {"get": _page_operation(
        "A file of the web page (its script, stylesheet, icon); nothing it loads comes from elsewhere",
        ["text/javascript", "text/css", "image/svg+xml", "text/html", "image/png"],
        [{"name": "filename", "in": "path", "required": True,
          "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,63}\\.(html|js|css|svg|png)$"}}])},
    "/fhir/metadata": {"get": _fhir_operation("FHIR R4: the CapabilityStatement (what this node serves, read-only)")},
    "/fhir/{resource_type}": {"get": _fhir_operation(
        "FHIR R4 search: a searchset Bundle. DocumentReference (one per record version; subject=<user_id>, "
        "description, status, identifier); on a signed network also AuditEvent (the opens and refusals: patient, "
        "agent, entity, outcome) and Consent (the grants: patient, actor, status, data). An unknown parameter is "
        "a 400 OperationOutcome",
        [{"name": "resource_type", "in": "path", "required": True,
          "schema": {"type": "string", "pattern": "^[A-Za-z]{1,64}$", "example": "DocumentReference"}},
         {"name": "subject", "in": "query", "required": False, "schema": {"type": "string", "example": "xxxxx"}}])},
    "/fhir/{resource_type}/{resource_id}": {"get": _fhir_operation(
        "FHIR R4 read: one resource by its id (a transaction's id)",
        [{"name": "resource_type", "in": "path", "required": True,
          "schema": {"type": "string", "pattern": "^[A-Za-z]{1,64}$", "example": "DocumentReference"}},
         {"name": "resource_id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 200}}])},
    "/receive_transaction": {"post": _operation(
        "Node to node: a transaction gossiped by a peer",
        {201: _object({"index": {"type": "integer"}, "new": {"type": "boolean"}}, ["index", "new"]),
         200: _object({"index": {"type": "integer"}, "new": {"type": "boolean"}}, ["index", "new"])}, 503,
        body=_json_body(SCHEMAS["Transaction"] | {"required": ["user_id", "ipfs_hash", "EHR_name", "id"]}),
        tag="network")},
    "/receive_transactions": {"post": _operation(
        "Node to node: transactions gossiped by a peer, in one batch; each is taken or refused on its own",
        {200: _object({"new": {"type": "integer"}, "known": {"type": "integer"},
                       "refused": {"type": "array", "items": _object({"id": {"type": ["string", "null"]},
                                                                      "error": _message}, ["id", "error"])}},
                      ["new", "known", "refused"])}, 503,
        body=_json_body(_object({"transactions": {
            "type": "array", "minItems": 1, "maxItems": 1000,
            "items": {"type": "object", "description": "a Transaction with its id; one that is not is listed "
                                                       "under 'refused' and the others are still taken"}}},
            ["transactions"])), tag="network")},
    "/receive_block": {"post": _operation(
        "Node to node: a block a peer mined", {200: _object({"outcome": _message}, ["outcome"])},
        body=_json_body(_ref("Block")), tag="network")},
}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "emr-chain node", "version": VERSION,
             "description": "Encrypted medical records on IPFS, their hashes on a proof-of-work chain. "
                            "Request and response shapes follow Fig. 4 of the paper."},
    "paths": PATHS,
    "components": {"schemas": SCHEMAS, "securitySchemes": {
        "bearer": {"type": "http", "scheme": "bearer"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}},
    "security": [{}, {"bearer": []}, {"apiKey": []}],
}


def route_path(rule: str) -> str:
    """A Flask rule as an OpenAPI path: '/records/<cid>' -> '/records/{cid}'."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def docs_page() -> str:
    """The API as one self-contained HTML page (no scripts, nothing fetched from elsewhere)."""
    rows = []
    for path, methods in PATHS.items():
        for method, operation in methods.items():
            body = operation.get("requestBody", {}).get("content", {}).get(JSON, {})
            example = json.dumps(body.get("example"), indent=2) if body.get("example") else ""
            statuses = ", ".join(operation["responses"])
            rows.append(f"<h2><code>{method.upper()} {html.escape(path)}</code></h2><p>{html.escape(operation['summary'])}"
                        f"</p><p>Answers: {statuses}</p>" + (f"<pre>{html.escape(example)}</pre>" if example else ""))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>emr-chain API</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:auto}pre{background:#f4f4f4;padding:.5em}"
            "</style></head><body><h1>emr-chain node API</h1><p>Machine-readable: <a href='/openapi.json'>"
            "/openapi.json</a> (OpenAPI 3.1). Errors are <code>{\"error\": \"...\"}</code>; under /fhir/ an "
            "OperationOutcome.</p>"
            + "".join(rows) + "</body></html>")
