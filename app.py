"""The REST API of one emr-chain node, with the request and response shapes of the paper's Fig. 4.

Each route reads its request, calls one method of `Node` and shapes one response; the access rule it
follows stands beside it (`@serves`). `create_app(config)` builds an isolated node (tests use it
in-process); `python app.py --port 5002 --role patient` serves one (see server.py).
"""
from __future__ import annotations

import hmac
import logging
import tempfile
import time
from typing import Any, Callable
from urllib.parse import quote

from flask import Blueprint, Flask, Request, Response, current_app, g, jsonify, request, stream_with_context
from werkzeug.exceptions import HTTPException

import errors
import openapi as openapi_spec
from config import Config
from errors import BadInput, Forbidden, NodeError, Unauthorized
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


def json_body(*fields: str) -> dict[str, Any]:
    """The request's JSON object, whatever its Content-Type, or BadInput saying what is wrong.

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


def from_node() -> str | None:
    """The URL a calling node says it has, on node-to-node requests."""
    return request.headers.get(NODE_HEADER)


# -- the paper's endpoints -----------------------------------------------------

@api.get("/get_chain")
@serves(Action.READ)
def get_chain() -> Any:
    chain = current_node().chain()
    return jsonify(chain=chain, length=len(chain))


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
    if request.mimetype == "multipart/form-data":
        refuse_unknown(list(request.form) + list(request.files), (UPLOAD_FIELD,))
        upload = request.files.get(UPLOAD_FIELD)
        if upload is None or not upload.filename:
            raise BadInput(f"a multipart upload needs the file in the '{UPLOAD_FIELD}' field")
        result = node.create_hash_from_upload(upload.stream, upload.filename)
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
    name, size, chunks = current_node().stream_file(request.args.get("ipfs_hash", ""))
    fallback = name.encode("ascii", "replace").decode().replace("?", "_").replace('"', "_")
    headers = {"Content-Disposition": f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name)}",
               "Content-Length": str(size)}
    return Response(stream_with_context(chunks), mimetype="application/octet-stream", headers=headers)


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


@api.post("/receive_block")
@serves(Action.GOSSIP)
def receive_block() -> Any:
    return jsonify(outcome=current_node().receive_block(json_body(), from_node()))


@api.get("/health")
@serves(Action.HEALTH)
def health() -> Any:
    return jsonify(current_node().health())


@api.get("/openapi.json")
@serves(Action.DESCRIBE)
def openapi() -> Any:
    return jsonify(openapi_spec.SPEC)


@api.get("/docs")
@serves(Action.DESCRIBE)
def docs() -> Any:
    return Response(openapi_spec.docs_page(), mimetype="text/html")


# -- access, limits and errors -------------------------------------------------

@api.before_request
def check_access() -> None:
    node = current_node()
    g.started = time.perf_counter()
    upload = request.endpoint == f"api.{UPLOAD_ENDPOINT}" and request.mimetype == "multipart/form-data"
    request.max_content_length = node.config.max_upload_bytes if upload else node.config.max_body_bytes
    action = action_of(current_app.view_functions[request.endpoint]) if request.endpoint else None
    if action is None:
        return  # no such route: Flask answers 404 or 405
    if node.config.api_key and needs_key(action) and not _key_matches(node.config.api_key):
        raise Unauthorized("this node needs an API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    if not may(node.config.role_name, action):
        raise Forbidden(f"a {node.config.role_name} node does not serve {request.endpoint.removeprefix('api.')}")


def _key_matches(key: str) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    given = request.headers.get("X-API-Key") or (token if scheme.lower() == "bearer" else "")
    return hmac.compare_digest(given.strip().encode(), key.encode())


# The one place errors become HTTP statuses. The most specific class of the error wins, whatever the order here.
ERROR_STATUS: dict[type[NodeError], int] = {
    errors.BadInput: 400,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
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
    app.register_error_handler(Exception, handle_error)
    app.after_request(log_request)
    return app


if __name__ == "__main__":
    import server

    server.main()
