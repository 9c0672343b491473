"""The REST API of one emr-chain node, with the request and response shapes of the paper's Fig. 4.

Each route reads its request, calls one method of `Node` and shapes one response; the access rule it
follows stands beside it (`@serves`). `create_app(config)` builds an isolated node (tests use it
in-process); `python app.py --port 5002 --role patient` serves one (see server.py).
"""
from __future__ import annotations

import functools
import hmac
import io
import ipaddress
import logging
import socket
import tempfile
import time
from typing import IO, Any, Callable, Iterator, Mapping
from urllib.parse import quote, urlsplit

from flask import Blueprint, Flask, Request, Response, current_app, g, jsonify, request, send_file
from werkzeug.exceptions import HTTPException
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Epilogue, Field, File, MultipartDecoder, NeedData, Preamble
from werkzeug.wsgi import wrap_file

import errors
import fhir_r4 as fhir
import openapi as openapi_spec
import page
from config import LOOPBACK_HOSTS, WILDCARD_HOSTS, Config, setting_names
from errors import (BadInput, CrossOriginRefused, Forbidden, MisdirectedRequest, NodeError, TooLarge, Unauthorized,
                    UnsupportedMediaType)
from ipfs_client import IpfsClient
from node import NODE_HEADER, Node
from policy import Action, may, needs_key
from wire import parse_json

log = logging.getLogger("emr.app")
api = Blueprint("api", __name__)

MINED_MESSAGE = "Congratulations, you just mined a block!"
CONNECTED_MESSAGE = "All the nodes are now connected. The Blockchain now contains the following nodes:"
RETRIEVED_MESSAGE = "The File has Retrieved at Your Local Directory"
UPLOAD_ENDPOINT = "create_hash"
UPLOAD_FIELD = "file"
TOO_LARGE = "the request body is larger than this node accepts"
ACCESS_ATTRIBUTE = "emr_action"
JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
# What each endpoint that takes a body accepts; every other POST takes JSON only. Browsers may send text/plain,
# form and multipart bodies to any site without asking it first (no CORS preflight), so a JSON endpoint that
# took them would be open to any web page the user visits.
PUBLISH_ENDPOINT = "publish_record"  # the one-go publish takes a browser's upload too
BODY_TYPES: dict[str, tuple[str, ...]] = {UPLOAD_ENDPOINT: (JSON_TYPE, MULTIPART_TYPE),
                                          PUBLISH_ENDPOINT: (JSON_TYPE, MULTIPART_TYPE)}
UPLOAD_ENDPOINTS = frozenset({UPLOAD_ENDPOINT, PUBLISH_ENDPOINT})  # held to max_upload_bytes when multipart
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
DOWNLOAD_CHUNK_BYTES = 256 * 1024
UPLOAD_READ_BYTES = 1024 * 1024  # read from an upload's body at a time
# Set by server.py's NodeTask in every request it serves. AFTER_RESPONSE: a list for work to run in the request's
# thread once the answer has begun (a large download is filled from IPFS while it is sent). BODY_BOUNDED: the
# server ends wsgi.input where the body ends and holds it to the endpoint's limit (a refusal is an errors.py
# class raised from read), so the app reads it directly rather than through Werkzeug's LimitedStream, which
# would copy every read and turn those refusals into its own ClientDisconnected.
AFTER_RESPONSE = "emr.after_response"
BODY_BOUNDED = "emr.body_bounded"
UPLOAD_HEAD_BYTES = 64 * 1024    # an upload's bytes around its file (preamble, part headers, epilogue) at most
CORS_REQUEST_HEADERS = "Authorization, Content-Type, X-API-Key"
CORS_EXPOSED_HEADERS = "Content-Disposition"
CORS_MAX_AGE_SECONDS = 600
ROUTE_CACHE_ENTRIES = 1024
ROUTE_CACHE_PATH_LENGTH = 128


class NodeRequest(Request):
    """Uploads are spooled to the node's own data directory, not the system temp folder."""

    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None, content_length: int | None = None) -> Any:
        return tempfile.TemporaryFile(dir=current_node().uploads)


def current_node() -> Node:
    return current_app.extensions["emr_node"]


def serves(action: Action) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The access rule of a route: which action of policy.py it performs."""
    def mark(view: Callable[..., Any]) -> Callable[..., Any]:
        setattr(view, ACCESS_ATTRIBUTE, action)
        return view
    return mark


def action_of(view: Callable[..., Any]) -> Action | None:
    return getattr(view, ACCESS_ATTRIBUTE, None)


# -- request helpers -----------------------------------------------------------

CRYPT_FIELDS = ("file_path", "password", "output_path", "overwrite")
PUBLISH_FIELDS = ("file_path", "EHR_name", "user_id", "password")


def json_body(*fields: str) -> dict[str, Any]:
    """The request's JSON object (its Content-Type was checked before: Gate.refusal), or BadInput saying what is
    wrong.

    With `fields`, any other key is refused, so a misspelt optional field is not silently ignored.
    """
    raw = request.get_data(cache=True)
    if not raw.strip():
        raise BadInput("the request body is empty; send a JSON object")
    body = parse_json(raw, current_node().config.max_json_depth)
    if not isinstance(body, dict):
        raise BadInput("the request body must be a JSON object, e.g. {\"name\": \"MRI.pdf.aes\"}")
    if fields:
        refuse_unknown(body, fields)
    return body


def refuse_unknown(received: Any, fields: tuple[str, ...]) -> None:
    # Werkzeug names a multipart part whose name it cannot read None.
    unknown = sorted(repr(key) if isinstance(key, str) else "(a part without a readable name)"
                     for key in set(received) - set(fields))
    if unknown:
        raise BadInput(f"unknown field(s): {', '.join(unknown)}; expected {', '.join(fields)}")


def text_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        raise BadInput(f"'{name}' is required")
    if not isinstance(value, str) or not value.strip():
        raise BadInput(f"'{name}' must be a non-empty string")
    return value


def flag_field(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise BadInput(f"'{name}' must be true or false")
    return value


class MultipartUpload:
    """The one file of a multipart/form-data upload, parsed as its body is read: nothing of it is held but the
    piece being passed on (request.files would first copy the whole file into a temporary file).

    `open()` reads up to the start of the file's bytes and refuses, before any of them is passed on, a body
    whose first part is not a file in the 'file' field; `chunks()` then yields the file's bytes as they are
    read, and raises BadInput if the body turns out malformed, truncated or with another part after the file,
    so whatever consumed the bytes (an add to IPFS) is broken off and records nothing.

    Werkzeug's streaming parser reads the preamble, the part heads and what follows the file. The file's bytes
    themselves are scanned here for the delimiter (a line break, "--" and the boundary, then "--" or a line
    break: Werkzeug's rule), and passed on as views of the pieces read: Werkzeug's parser copied each byte
    four times, and took 7 ms of CPU for 16 MiB where this takes 2.
    """

    def __init__(self, stream: IO[bytes], content_type: str) -> None:
        boundary = parse_options_header(content_type)[1].get("boundary", "")
        if not boundary:
            raise BadInput("a multipart upload needs a boundary in its Content-Type, as curl -F and Postman send")
        try:
            self.boundary = boundary.encode("latin-1")
        except UnicodeEncodeError:
            raise BadInput("the multipart boundary holds characters a boundary cannot have") from None
        self.decoder = MultipartDecoder(self.boundary)
        self.dash = b"--" + self.boundary
        self.stream = stream
        self.filename = ""

    def _read(self) -> bytes:
        return self.stream.read(UPLOAD_READ_BYTES)

    def _next(self) -> Any:
        """The decoder's next event, reading as it needs (never more than UPLOAD_HEAD_BYTES around the file)."""
        while True:
            try:
                event = self.decoder.next_event()
            except ValueError as exc:  # Werkzeug: the body ended before its closing boundary, or a bad part head
                raise BadInput(f"the upload is not a whole multipart/form-data body ({exc})") from None
            if not isinstance(event, NeedData):
                return event
            if len(self.decoder.buffer) > UPLOAD_HEAD_BYTES:
                raise BadInput(f"the upload holds more than {UPLOAD_HEAD_BYTES} bytes outside its file "
                               f"(preamble, part headers, epilogue); send the file alone in the "
                               f"'{UPLOAD_FIELD}' field")
            self.decoder.receive_data(self._read() or None)

    def open(self) -> str:
        """Read up to the file's bytes; its file name."""
        event = self._next()
        if isinstance(event, Preamble):
            event = self._next()
        self._refuse_other_part(event, first=True)
        self.filename = event.filename
        return self.filename

    def _refuse_other_part(self, event: Any, first: bool) -> None:
        if isinstance(event, Epilogue):
            if first:
                raise BadInput(f"a multipart upload needs the file in the '{UPLOAD_FIELD}' field")
            return
        if isinstance(event, (Field, File)):
            refuse_unknown([event.name], (UPLOAD_FIELD,))
            if not first:
                raise BadInput(f"the upload holds more than one file; send one file in the '{UPLOAD_FIELD}' field")
            if isinstance(event, Field) or not event.filename:
                raise BadInput(f"a multipart upload needs the file in the '{UPLOAD_FIELD}' field")

    def chunks(self) -> Iterator[bytes | memoryview]:
        """The file's bytes as they are read; then the rest of the body is checked before the end is reached."""
        buffer = bytes(self.decoder.buffer)  # what the decoder read past the part's head: the blank line's end
        skip = 2 if buffer.startswith(b"\r\n") else 1 if buffer[:1] in (b"\r", b"\n") else 0
        buffer = buffer[skip:]
        keep = len(self.dash) + 1  # a delimiter's start may end a piece: held back until the next one
        at_start = True  # buffer[0] is the file's first byte (Werkzeug ends an empty file there too)
        while True:
            found, hold = self._delimiter(buffer, at_start)
            if found is not None:
                cut, at = found
                if cut:
                    yield memoryview(buffer)[:cut]
                self._after_file(buffer[at:])
                return
            hold = max(0, len(buffer) - keep) if hold is None else hold
            if hold:
                yield memoryview(buffer)[:hold]
                at_start = False
            elif len(buffer) > UPLOAD_HEAD_BYTES + keep:
                raise BadInput("the upload's closing boundary is not followed by a line break")
            piece = self._read()
            if not piece:
                raise BadInput("the upload is not a whole multipart/form-data body (it ends inside the file, "
                               "before the closing boundary)")
            buffer = buffer[hold:] + piece

    def _delimiter(self, buffer: bytes, at_start: bool) -> tuple[tuple[int, int] | None, int | None]:
        """((end of the file's bytes, start of "--boundary"), None) if the delimiter is in `buffer`; else (None,
        where to hold back from, if a delimiter may start there but what follows it has not arrived yet)."""
        dash = self.dash
        index = buffer.find(dash)
        while index >= 0:
            if index >= 2 and buffer[index - 2:index] == b"\r\n":
                cut = index - 2
            elif index >= 1 and buffer[index - 1] in b"\r\n":
                cut = index - 1
            elif index == 0 and at_start:  # right after the part's head: its blank line is the line break
                cut = 0
            else:
                cut = -1  # not at the start of a line: the file's own bytes
            if cut >= 0:
                after = index + len(dash)
                rest = buffer[after:after + 2]
                if rest == b"--":
                    return (cut, index), None
                blank = after
                while blank < len(buffer) and buffer[blank] in b" \t":
                    blank += 1
                if blank >= len(buffer) or (rest == b"-" and len(buffer) == after + 1):
                    return None, cut  # undecided until more arrives
                if buffer[blank] in b"\r\n":
                    return (cut, index), None
            index = buffer.find(dash, index + 1)
        return None, None

    def _after_file(self, rest: bytes) -> None:
        """After the file: only the closing boundary and an epilogue may follow (Werkzeug's parser checks)."""
        self.decoder = MultipartDecoder(self.boundary)
        self.decoder.receive_data(rest)
        while True:
            event = self._next()
            if not isinstance(event, Preamble):
                self._refuse_other_part(event, first=False)
            if isinstance(event, Epilogue):
                return


def from_node() -> str | None:
    """The URL a calling node says it has, on node-to-node requests."""
    return request.headers.get(NODE_HEADER)


# -- the paper's endpoints -----------------------------------------------------

@api.get("/get_chain")
@serves(Action.READ)
def get_chain() -> Any:
    # One copy of the document for every client, handed to waitress as a file (a view of those bytes, not a copy)
    # that its I/O thread sends piece by piece.
    document = current_node().chain_document()
    return Response(wrap_file(request.environ, io.BytesIO(document), DOWNLOAD_CHUNK_BYTES),
                    mimetype="application/json", headers={"Content-Length": str(len(document))},
                    direct_passthrough=True)


@api.get("/mine_block")
@serves(Action.MINE)
def mine_block() -> Any:
    return jsonify(message=MINED_MESSAGE, **current_node().mine_block())


@api.post("/add_transaction")
@serves(Action.RECORD)
def add_transaction() -> Any:
    receipt = current_node().add_transaction(json_body())
    if receipt.new:
        return jsonify(message=f"This transaction will be added to Block {receipt.index}",
                       index=receipt.index, id=receipt.transaction["id"]), 201
    return jsonify(message=f"This transaction is already recorded, for Block {receipt.index}",
                   index=receipt.index, id=receipt.transaction["id"]), 200


@api.get("/is_valid")
@serves(Action.READ)
def is_valid() -> Any:
    problem = current_node().chain_problem()
    if problem is None:
        return jsonify(message="All good. The Blockchain is valid.", valid=True)
    return jsonify(message=f"Houston, we have a problem. The Blockchain is not valid: {problem}", valid=False)


@api.post("/connect_node")
@serves(Action.CONNECT)
def connect_node() -> Any:
    peers, ignored = current_node().connect(json_body("nodes").get("nodes"), from_node())
    response = {"message": CONNECTED_MESSAGE, "total_nodes": peers}
    if ignored:
        response["ignored"] = ignored
    return jsonify(response), 201


@api.post("/remove_node")
@serves(Action.CONNECT)
def remove_node() -> Any:
    peers, unknown = current_node().remove_peers(json_body("nodes").get("nodes"))
    response = {"message": "The nodes were removed. The Blockchain now contains the following nodes:",
                "total_nodes": peers}
    if unknown:
        response["not_peers"] = unknown
    return jsonify(response)


@api.get("/peers")
@serves(Action.READ)
def peers() -> Any:
    found = current_node().peers()
    return jsonify(peers=found, count=len(found))


@api.get("/replace_chain")
@serves(Action.READ)
def replace_chain() -> Any:
    replaced, chain, peers = current_node().sync()
    message = ("The nodes had different chains so the chain was replaced by the longest one." if replaced
               else "All good. The chain is the largest one.")
    return jsonify(message=message, replaced=replaced, chain=chain, length=len(chain), peers=peers)


@api.post("/create_hash")
@serves(Action.RECORD)
def create_hash() -> Any:
    node = current_node()
    if request.mimetype == MULTIPART_TYPE:
        # Streamed: the file's bytes go on to IPFS as they are parsed, without a temporary copy of the file.
        body = request.environ["wsgi.input"] if request.environ.get(BODY_BOUNDED) else request.stream
        upload = MultipartUpload(body, request.content_type or "")
        name = upload.open()
        result = node.create_hash_from_upload(upload.chunks(), name)
    else:
        result = node.create_hash(text_field(json_body("file_path"), "file_path"))
    return jsonify({"IPFS Hash": result})


@api.post("/get_file_hash")
@serves(Action.READ)
def get_file_hash() -> Any:
    return jsonify(current_node().file_info(text_field(json_body("name"), "name")))


@api.post("/get_file")
@serves(Action.FETCH)
def get_file() -> Any:
    path, size = current_node().get_file(text_field(json_body("ipfs_hash"), "ipfs_hash"))
    return jsonify(message=RETRIEVED_MESSAGE, path=path, size=size)


@api.get("/get_file")
@serves(Action.FETCH)
def download_file() -> Any:
    # A file, not an iterator: waitress sends a wsgi.file_wrapper from its own I/O thread, so a client that
    # reads slowly holds a spooled download (bounded by max_spool_bytes), never a worker thread. A large one is
    # filled from IPFS after the answer has begun (AFTER_RESPONSE), so its bytes go out as they arrive; a server
    # that cannot do that gets it whole.
    name, size, spooled = current_node().stream_file(request.args.get("ipfs_hash", ""))
    if request.method == "HEAD":  # the headers only: nothing will read or close the download
        spooled.close()
    elif not spooled.filled:
        after = request.environ.get(AFTER_RESPONSE)
        if after is not None:
            after.append(spooled.fill)
        else:
            try:
                spooled.fill()
            except BaseException:
                spooled.close()
                raise
    fallback = name.encode("ascii", "replace").decode().replace("?", "_").replace('"', "_")
    headers = {"Content-Disposition": f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name)}",
               "Content-Length": str(size)}
    return Response(wrap_file(request.environ, spooled, DOWNLOAD_CHUNK_BYTES), mimetype="application/octet-stream",
                    headers=headers, direct_passthrough=True)


@api.get("/records/<cid>")
@serves(Action.READ)
def record_status(cid: str) -> Any:
    return jsonify(current_node().record_status(cid, request.args.get("peers", "true")))


def crypt_request(operation: Callable[..., tuple[str, int]], message: str) -> Any:
    """encrypt_file and decrypt_file take the same fields and answer alike."""
    body = json_body(*CRYPT_FIELDS)
    path, size = operation(text_field(body, "file_path"), text_field(body, "password"), body.get("output_path"),
                           flag_field(body, "overwrite"))
    return jsonify(message=message, file_path=path, size=size)


@api.post("/encrypt_file")
@serves(Action.RECORD)
def encrypt_file() -> Any:
    return crypt_request(current_node().encrypt_file, "The file is encrypted (AES-256, AES Crypt format)")


@api.post("/decrypt_file")
@serves(Action.FETCH)
def decrypt_file() -> Any:
    return crypt_request(current_node().decrypt_file, "The file is decrypted")


# -- node to node and operations -----------------------------------------------

@api.post("/receive_transaction")
@serves(Action.GOSSIP)
def receive_transaction() -> Any:
    receipt = current_node().receive_transaction(json_body(), from_node())
    return jsonify(index=receipt.index, new=receipt.new), 201 if receipt.new else 200


@api.get("/blocks")
@serves(Action.GOSSIP)
def blocks() -> Any:
    return jsonify(current_node().blocks(request.args.get("from", "1")))


@api.post("/receive_transactions")
@serves(Action.GOSSIP)
def receive_transactions() -> Any:
    return jsonify(current_node().receive_transactions(json_body("transactions"), from_node()))


@api.post("/receive_block")
@serves(Action.GOSSIP)
def receive_block() -> Any:
    return jsonify(outcome=current_node().receive_block(json_body(), from_node()))


@api.get("/health")
@serves(Action.HEALTH)
def health() -> Any:
    report = current_node().health()
    if not current_gate().key_given(request.headers):  # a monitor without the key learns only that it is up
        report = {key: report[key] for key in PUBLIC_HEALTH}
    return jsonify(report)


@api.get("/identity")
@serves(Action.DESCRIBE)
def identity() -> Any:
    return jsonify(current_node().identity_info())


@api.get("/members")
@serves(Action.READ)
def members() -> Any:
    return jsonify(current_node().members())


def receipt_answer(receipt: Any, what: str) -> Any:
    """A signed transaction this node made (an admission, a grant...): where it will be, and its id."""
    status = 201 if receipt.new else 200
    return jsonify(message=f"The {what} will be in Block {receipt.index}", index=receipt.index,
                   id=receipt.transaction["id"]), status


@api.post("/admit_member")
@serves(Action.ADMIT)
def admit_member() -> Any:
    body = json_body("member", "replaces")
    return receipt_answer(current_node().admit_member(body.get("member"), body.get("replaces")), "admission")


@api.post("/remove_member")
@serves(Action.ADMIT)
def remove_member() -> Any:
    return receipt_answer(current_node().remove_member(json_body("node_id").get("node_id")), "removal")


@api.post("/publish_record")
@serves(Action.RECORD)
def publish_record() -> Any:
    node = current_node()
    if request.mimetype == MULTIPART_TYPE:
        refuse_unknown(list(request.form) + list(request.files), (UPLOAD_FIELD,) + PUBLISH_FIELDS[1:])
        upload = request.files.get(UPLOAD_FIELD)
        if upload is None or not upload.filename:
            raise BadInput(f"a multipart upload needs the file in the '{UPLOAD_FIELD}' field")
        try:
            result = node.publish_upload(upload.stream, upload.filename, request.form.get("EHR_name"),
                                         request.form.get("user_id"), request.form.get("password"))
        finally:
            upload.close()
    else:
        body = json_body(*PUBLISH_FIELDS)
        result = node.publish_record(text_field(body, "file_path"), body.get("EHR_name"), body.get("user_id"),
                                     body.get("password"))
    return jsonify(result), 201


@api.post("/grant")
@serves(Action.GRANT)
def grant() -> Any:
    body = json_body("record", "member", "expires", "purpose", "versions")
    receipt = current_node().grant(body.get("record"), body.get("member"), body.get("expires", ""),
                                   body.get("purpose", ""), body.get("versions", "all"))
    return receipt_answer(receipt, "grant")


@api.post("/revoke")
@serves(Action.GRANT)
def revoke() -> Any:
    return receipt_answer(current_node().revoke(json_body("grant").get("grant")), "revocation")


@api.get("/grants")
@serves(Action.READ)
def grants() -> Any:
    return jsonify(current_node().grants())


@api.post("/open_record")
@serves(Action.FETCH)
def open_record() -> Any:
    body = json_body("record", "purpose", "emergency", "reason")
    return jsonify(current_node().open_record(body.get("record"), body.get("purpose", ""),
                                              body.get("emergency", False), body.get("reason", "")))


@api.get("/audit")
@serves(Action.READ)
def audit() -> Any:
    fields = ("owner", "user_id", "record", "member", "since", "until", "limit")
    refuse_unknown(request.args, fields)
    return jsonify(current_node().audit(**{name: request.args.get(name) for name in fields}))


# -- the web page and what it needs ---------------------------------------------

def attachment(name: str, size: int, stream: Any) -> Response:
    """A file sent as a download, by the server's I/O thread at the reader's pace (see download_file)."""
    fallback = name.encode("ascii", "replace").decode().replace("?", "_").replace('"', "_")
    headers = {"Content-Disposition": f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name)}",
               "Content-Length": str(size)}
    return Response(wrap_file(request.environ, stream, DOWNLOAD_CHUNK_BYTES), mimetype="application/octet-stream",
                    headers=headers, direct_passthrough=True)


@api.get("/files")
@serves(Action.FETCH)
def user_file() -> Any:
    refuse_unknown(request.args, ("path",))
    return attachment(*current_node().user_file(request.args.get("path", "")))


@api.get("/network")
@serves(Action.READ)
def network_view() -> Any:
    return jsonify(current_node().network_view())


def page_file(name: str) -> Response:
    path, media_type = page.asset(name)
    response = send_file(path, mimetype=media_type, conditional=True, etag=True, max_age=0)
    response.headers.update(page.HEADERS)
    return response


@api.get("/")
@serves(Action.PAGE)
def index_page() -> Any:
    return page_file(page.INDEX)


@api.get("/static/<path:filename>")
@serves(Action.PAGE)
def static_file(filename: str) -> Any:
    return page_file(filename)


# -- FHIR R4, read-only (fhir_r4.py) -------------------------------------------------

FHIR_ROOT = "/fhir"


def is_fhir_path(path: str) -> bool:
    """Under /fhir/ every answer is FHIR's, its errors too, whoever refuses (the server, the Gate, Flask, a view)."""
    return path == FHIR_ROOT or path.startswith(FHIR_ROOT + "/")


def fhir_error(status: int, message: str) -> tuple[str, bytes]:
    """An error as a FHIR client reads one: (application/fhir+json, an OperationOutcome carrying the message)."""
    return fhir.MEDIA_TYPE, fhir.to_json(fhir.operation_outcome(status, message)).encode()


def fhir_view(view: Callable[..., Any]) -> Callable[..., Any]:
    """A FHIR route answers application/fhir+json, and its errors as an OperationOutcome (with the status
    ERROR_STATUS gives them), as FHIR servers do."""
    @functools.wraps(view)
    def answer(*args: Any, **kwargs: Any) -> Response:
        try:
            resource = view(*args, **kwargs)
        except NodeError as exc:
            status = status_for(type(exc))
            media_type, body = fhir_error(status, str(exc))
            return Response(body, status=status, mimetype=media_type)
        return Response(fhir.to_json(resource), status=200, mimetype=fhir.MEDIA_TYPE)
    return answer


def fhir_base() -> str:
    return request.host_url.rstrip("/") + "/fhir"


@api.get("/fhir/metadata")
@serves(Action.READ)
@fhir_view
def fhir_metadata() -> Any:
    return current_node().fhir_metadata(fhir_base())


@api.get("/fhir/<resource_type>")
@serves(Action.READ)
@fhir_view
def fhir_search(resource_type: str) -> Any:
    return current_node().fhir_search(resource_type, request.args.items(multi=True), fhir_base(),
                                      request.query_string.decode("utf-8", "replace"))


@api.get("/fhir/<resource_type>/<resource_id>")
@serves(Action.READ)
@fhir_view
def fhir_read(resource_type: str, resource_id: str) -> Any:
    return current_node().fhir_read(resource_type, resource_id)


@api.get("/openapi.json")
@serves(Action.DESCRIBE)
def openapi() -> Any:
    return jsonify(openapi_spec.SPEC)


@api.get("/docs")
@serves(Action.DESCRIBE)
def docs() -> Any:
    return Response(openapi_spec.docs_page(), mimetype="text/html")


# -- access, limits and errors -------------------------------------------------

PUBLIC_HEALTH = ("status", "role")  # what /health tells a caller without the key, on a node with one


class Gate:
    """What a node decides from a request's head (method, path, headers) alone, before any of its body is read.

    One answer, asked in two places: by the server when a request head is complete (server.py: waitress's parser
    asks `refusal` and `body_limit`, and a refused body is never read), and by Flask before every view
    (`check_access`: the test client, and a second line behind the server). In order: the Host must be one this
    node answers to (DNS rebinding), a web page of another origin must be allowed (CSRF), then the route's access
    rule (API key, role), the body's media type and its size.
    """

    def __init__(self, app: Flask, config: Config) -> None:
        self.config = config
        self.url_map = app.url_map
        self.view_functions = app.view_functions
        self.any_host = "*" in config.host_list
        self.hosts = answered_hosts(config)
        self.ip_literals = config.host in WILDCARD_HOSTS  # every address of the machine: any IP literal is ours
        self.own_origins = {origin_of(config.own_url)}
        self.origins = set(config.origin_list)
        # Asked twice a request (at the head and by Flask) and for body_limit: the routing of usual paths is
        # remembered (not of long ones, which a client could send to fill the memory).
        self._cached_route = functools.lru_cache(maxsize=ROUTE_CACHE_ENTRIES)(self._route)

    # -- the questions --------------------------------------------------------

    def refusal(self, method: str, path: str, headers: Mapping[str, str]) -> NodeError | None:
        """Why this request is refused from its head alone, or None to go on (and read the body)."""
        host = headers.get("Host")
        if host is not None and not self.answers_to(host):
            return MisdirectedRequest(
                f"this node does not answer to the host {host!r} (a page on a domain that points at this machine "
                f"may not read it); an operator who serves it under that name adds it to "
                f"{setting_names('allowed_hosts')}")
        origin = headers.get("Origin")
        if origin is not None and not self.own_origin(origin, host) and not self.allowed_origin(origin):
            return CrossOriginRefused(
                f"a web page from {origin} may not call this node; an operator who trusts that page adds its origin "
                f"to {setting_names('allowed_origins')}")
        if self.preflight(method, headers):
            return None  # a browser asking first, without the key: answered by check_access
        endpoint, action = self.route(method, path)
        if action is not None:
            if needs_key(action) and not self.key_given(headers):
                return Unauthorized("this node needs an API key: send 'Authorization: Bearer <key>' or "
                                    "'X-API-Key: <key>'")
            if not may(self.config.role_name, action):
                return Forbidden(f"a {self.config.role_name} node does not serve {short(endpoint)}")
            accepted = accepted_types(endpoint, method)
            given = media_type(headers)
            if accepted and given not in accepted:
                return UnsupportedMediaType(
                    f"{short(endpoint)} takes a body of type {' or '.join(accepted)}, not "
                    f"{given or 'a body without a Content-Type'}; send 'Content-Type: {accepted[0]}'")
        limit = self.body_limit(method, path, headers)
        length = content_length(headers)
        if length is not None and length > limit:
            return TooLarge(f"{TOO_LARGE} ({limit} bytes)")
        return None

    def body_limit(self, method: str, path: str, headers: Mapping[str, str]) -> int:
        """The largest body this request may have: max_upload_bytes for a file upload, else max_body_bytes."""
        endpoint, _ = self.route(method, path)
        if short(endpoint) in UPLOAD_ENDPOINTS and media_type(headers) == MULTIPART_TYPE:
            return self.config.max_upload_bytes
        return self.config.max_body_bytes

    def is_upload(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        """A multipart upload to create_hash: the server may stream its body to the app as it arrives (publish_record
        takes an upload too, but reads it whole as a form)."""
        endpoint, _ = self.route(method, path)
        return short(endpoint) == UPLOAD_ENDPOINT and media_type(headers) == MULTIPART_TYPE

    def key_given(self, headers: Mapping[str, str]) -> bool:
        """Whether the request carries this node's API key (always, on a node without one)."""
        key = self.config.api_key
        if not key:
            return True
        scheme, _, token = headers.get("Authorization", "").partition(" ")
        given = headers.get("X-API-Key") or (token if scheme.lower() == "bearer" else "")
        return hmac.compare_digest(given.strip().encode(), key.encode())

    # -- hosts and origins ----------------------------------------------------

    def answers_to(self, host_header: str) -> bool:
        if self.any_host:
            return True
        name = host_name(host_header)
        if name in self.hosts:
            return True
        return self.ip_literals and is_ip_literal(name)

    def own_origin(self, origin: str, host_header: str | None) -> bool:
        """A page this node served itself (same host and port as the request names), or of its public_url."""
        normalized = origin.strip().lower().rstrip("/")
        if normalized in self.own_origins:
            return True
        parts = urlsplit(normalized)
        return host_header is not None and parts.scheme in ("http", "https") and parts.netloc == host_header.lower()

    def allowed_origin(self, origin: str) -> bool:
        return origin.strip().lower().rstrip("/") in self.origins

    def cors_headers(self, headers: Mapping[str, str]) -> list[tuple[str, str]]:
        """CORS headers for an answer to this request: the origin itself (never '*') when it is allowed."""
        if not self.origins:
            return []
        answer = [("Vary", "Origin")]
        origin = headers.get("Origin")
        if origin is not None and self.allowed_origin(origin):
            answer += [("Access-Control-Allow-Origin", origin.strip()),
                       ("Access-Control-Expose-Headers", CORS_EXPOSED_HEADERS)]
        return answer

    @staticmethod
    def preflight(method: str, headers: Mapping[str, str]) -> bool:
        return method == "OPTIONS" and "Origin" in headers and "Access-Control-Request-Method" in headers

    def preflight_headers(self, path: str, headers: Mapping[str, str]) -> list[tuple[str, str]] | None:
        """The answer to a browser's preflight for an allowed origin; None for a path this node does not have."""
        methods = sorted(set(self.url_map.bind("localhost").allowed_methods(path)) - {"OPTIONS", "HEAD"})
        if not methods or not self.allowed_origin(headers.get("Origin", "")):
            return None
        return self.cors_headers(headers) + [("Access-Control-Allow-Methods", ", ".join(methods)),
                                             ("Access-Control-Allow-Headers", CORS_REQUEST_HEADERS),
                                             ("Access-Control-Max-Age", str(CORS_MAX_AGE_SECONDS))]

    # -- routes -----------------------------------------------------------------

    def route(self, method: str, path: str) -> tuple[str | None, Action | None]:
        """(endpoint, action) of the view that would serve this request, or (None, None)."""
        if len(path) > ROUTE_CACHE_PATH_LENGTH:
            return self._route(method, path)
        return self._cached_route(method, path)

    def _route(self, method: str, path: str) -> tuple[str | None, Action | None]:
        try:
            endpoint, _ = self.url_map.bind("localhost").match(path, method)
        except HTTPException:  # no such route or method (Flask answers 404 or 405), or a redirect
            return None, None
        view = self.view_functions.get(endpoint)
        return endpoint, action_of(view) if view else None


def answered_hosts(config: Config) -> set[str]:
    """The names and addresses this node answers to in a Host header (besides allowed_hosts' '*')."""
    hosts = {config.host.lower().strip("[]")}
    if config.host in LOOPBACK_HOSTS or config.host in WILDCARD_HOSTS:
        hosts.update(LOOPBACK_HOSTS)
    if config.host in WILDCARD_HOSTS:
        hosts.add(socket.gethostname().lower())
    public = urlsplit(config.own_url).hostname
    if public:
        hosts.add(public.lower())
    hosts.update(host_name(host) for host in config.host_list)
    return hosts


def host_name(host_header: str) -> str:
    """'Example.org:5002' -> 'example.org'; '[::1]:5002' -> '::1'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def origin_of(url: str) -> str:
    parts = urlsplit(url.lower())
    return f"{parts.scheme}://{parts.netloc}"


def short(endpoint: str | None) -> str:
    return (endpoint or "").removeprefix("api.")


def accepted_types(endpoint: str | None, method: str) -> tuple[str, ...]:
    if method not in BODY_METHODS:
        return ()
    return BODY_TYPES.get(short(endpoint), (JSON_TYPE,))


def media_type(headers: Mapping[str, str]) -> str:
    return parse_options_header(headers.get("Content-Type", ""))[0].lower()


def content_length(headers: Mapping[str, str]) -> int | None:
    try:
        return int(headers.get("Content-Length", ""))
    except ValueError:
        return None


def current_gate() -> Gate:
    return current_app.extensions["emr_gate"]


def check_access() -> Response | None:
    """Flask's turn to ask the gate (the server asked already, at the end of the request head)."""
    g.started = time.perf_counter()
    gate = current_gate()
    request.max_content_length = gate.body_limit(request.method, request.path, request.headers)
    refused = gate.refusal(request.method, request.path, request.headers)
    if refused is not None:
        raise refused
    if gate.preflight(request.method, request.headers):
        answer = gate.preflight_headers(request.path, request.headers)
        if answer is not None:
            return Response(status=204, headers=answer)
    return None


def add_cors_headers(response: Response) -> Response:
    for name, value in current_gate().cors_headers(request.headers):
        if name == "Vary":
            response.vary.add(value)
        elif name not in response.headers:
            response.headers[name] = value
    return response


# The one place errors become HTTP statuses. The most specific class of the error wins, whatever the order here.
ERROR_STATUS: dict[type[NodeError], int] = {
    errors.BadInput: 400,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.RequestTimeout: 408,
    errors.TooLarge: 413,
    errors.UnsupportedMediaType: 415,
    errors.MisdirectedRequest: 421,
    errors.Conflict: 409,
    errors.CryptoError: 400,
    errors.StateDamaged: 503,
    errors.Busy: 503,
    errors.PeerError: 502,
    errors.IpfsError: 502,
    errors.IpfsUnreachable: 503,
    errors.IpfsTimeout: 504,
}


def status_for(kind: type[BaseException]) -> int:
    """The status of the nearest class in `kind`'s ancestry that the table names (500 if none)."""
    for ancestor in kind.__mro__:
        if ancestor in ERROR_STATUS:
            return ERROR_STATUS[ancestor]
    return 500


def error(message: str, status: int) -> tuple[Response, int]:
    """{"error": message}; under /fhir/ an OperationOutcome carrying it, which is what FHIR clients read."""
    if is_fhir_path(request.path):
        media_type, body = fhir_error(status, message)
        return Response(body, mimetype=media_type), status
    return jsonify(error=message), status


def handle_error(exc: Exception) -> tuple[Response, int]:
    if isinstance(exc, HTTPException):
        response, status = error(_http_message(exc), exc.code or 500)
        if status == 405 and getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response, status
    status = status_for(type(exc))
    if status == 500:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error(f"internal error ({type(exc).__name__}); the node's log has the details", 500)
    return error(str(exc), status)


def _http_message(exc: HTTPException) -> str:
    if exc.code == 404:
        return f"no such endpoint: {request.path}"
    if exc.code == 405:
        allowed = ", ".join(sorted(m for m in (exc.valid_methods or []) if m not in ("HEAD", "OPTIONS")))
        return f"{request.method} is not allowed on {request.path}; use {allowed}"
    if exc.code == 413:
        return f"{TOO_LARGE} ({request.max_content_length} bytes)"
    return exc.description or exc.name


def log_request(response: Response) -> Response:
    """Refusals and faults at INFO and WARNING; every other request only at DEBUG (a line per request
    cost a third of the server's time under load)."""
    level = logging.WARNING if response.status_code >= 500 else logging.INFO if response.status_code >= 400 \
        else logging.DEBUG
    if log.isEnabledFor(level):
        started = g.get("started")
        elapsed = f"{(time.perf_counter() - started) * 1000:.1f}ms" if started else "-"
        log.log(level, "%s %s %s %s", request.method, request.path, response.status_code, elapsed)
    return response


def check_access_rules(app: Flask) -> None:
    """Refuse to build an app with a route that does not say who may call it."""
    unruled = sorted(name for name, view in app.view_functions.items() if action_of(view) is None)
    if unruled:
        raise RuntimeError(f"routes without an access rule (@serves): {', '.join(unruled)}")


def create_app(config: Config | None = None, ipfs: IpfsClient | None = None) -> Flask:
    """An isolated node: its own chain, peers and data directory."""
    config = config or Config()
    app = Flask(__name__, static_folder=None)
    app.request_class = NodeRequest
    app.register_blueprint(api)
    check_access_rules(app)
    app.extensions["emr_node"] = Node(config, ipfs)
    app.extensions["emr_gate"] = Gate(app, config)
    app.before_request(check_access)
    app.register_error_handler(Exception, handle_error)
    app.after_request(add_cors_headers)
    app.after_request(log_request)
    return app


if __name__ == "__main__":
    import server

    server.main()
