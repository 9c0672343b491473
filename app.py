"""The REST API of one emr-chain node, with the request and response shapes of the paper's Fig. 4.

`create_app(config)` builds an isolated node (tests use it in-process);
`python app.py --port 5002 --role patient` serves one with waitress.
"""
from __future__ import annotations

import hmac
import json
import logging
import signal
import sys
import tempfile
import threading
import time
from typing import Any
from urllib.parse import quote

from flask import Blueprint, Flask, Request, Response, current_app, g, jsonify, request, stream_with_context
from werkzeug.exceptions import HTTPException

import crypto
import openapi as openapi_spec
from blockchain import InvalidTransaction
from config import ALWAYS_SERVED, ROLE_ENDPOINTS, Config, load_config
from ipfs_client import IpfsClient, IpfsError
from network import NODE_HEADER, PeerRefused
from node import BadInput, Conflict, Node, NotFound, StateDamaged
from storage import PathRefused

log = logging.getLogger("emr.app")
api = Blueprint("api", __name__)

MINED_MESSAGE = "Congratulations, you just mined a block!"
CONNECTED_MESSAGE = "All the nodes are now connected. The Blockchain now contains the following nodes:"
RETRIEVED_MESSAGE = "The File has Retrieved at Your Local Directory"
UPLOAD_ENDPOINT = "create_hash"
UPLOAD_FIELD = "file"
TOO_LARGE = "the request body is larger than this node accepts"


class NodeRequest(Request):
    """Uploads are spooled to the node's own data directory, not the system temp folder."""

    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None, content_length: int | None = None) -> Any:
        return tempfile.TemporaryFile(dir=current_node().uploads)


def current_node() -> Node:
    return current_app.extensions["emr_node"]


# -- request helpers -----------------------------------------------------------

CRYPT_FIELDS = ("file_path", "password", "output_path", "overwrite")


def json_body(*fields: str) -> dict[str, Any]:
    """The request's JSON object, whatever its Content-Type, or BadInput saying what is wrong.

    With `fields`, any other key is refused, so a misspelt optional field is not silently ignored.
    """
    raw = request.get_data(cache=True)
    if not raw.strip():
        raise BadInput("the request body is empty; send a JSON object")
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadInput("the request body is not UTF-8 text") from None
    except RecursionError:
        raise BadInput("the JSON body is nested too deeply") from None
    except ValueError as exc:
        raise BadInput(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise BadInput("the request body must be a JSON object, e.g. {\"name\": \"MRI.pdf.aes\"}")
    if _depth(body) > current_node().config.max_json_depth:
        raise BadInput(f"the JSON body is nested deeper than {current_node().config.max_json_depth} levels")
    if fields:
        refuse_unknown(body, fields)
    return body


def refuse_unknown(received: Any, fields: tuple[str, ...]) -> None:
    # Werkzeug names a multipart part whose name it cannot read None.
    unknown = sorted(repr(key) if isinstance(key, str) else "(a part without a readable name)"
                     for key in set(received) - set(fields))
    if unknown:
        raise BadInput(f"unknown field(s): {', '.join(unknown)}; expected {', '.join(fields)}")


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, level + 1) for child in children)
    return deepest


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


def sender() -> str | None:
    return current_node().network.sender_netloc(request.headers.get(NODE_HEADER))


# -- the paper's endpoints -----------------------------------------------------

@api.get("/get_chain")
def get_chain() -> Any:
    chain = current_node().blockchain.chain
    return jsonify(chain=chain, length=len(chain))


@api.get("/mine_block")
def mine_block() -> Any:
    block = current_node().network.mine_block()
    return jsonify(message=MINED_MESSAGE, **block)


@api.post("/add_transaction")
def add_transaction() -> Any:
    receipt = current_node().network.add_transaction(json_body())
    if receipt.new:
        return jsonify(message=f"This transaction will be added to Block {receipt.index}",
                       index=receipt.index, id=receipt.transaction["id"]), 201
    return jsonify(message=f"This transaction is already recorded, for Block {receipt.index}",
                   index=receipt.index, id=receipt.transaction["id"]), 200


@api.get("/is_valid")
def is_valid() -> Any:
    problem = current_node().blockchain.chain_problem(current_node().blockchain.chain)
    if problem is None:
        return jsonify(message="All good. The Blockchain is valid.", valid=True)
    return jsonify(message=f"Houston, we have a problem. The Blockchain is not valid: {problem}", valid=False)


@api.post("/connect_node")
def connect_node() -> Any:
    nodes = json_body("nodes").get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise BadInput("'nodes' must be a non-empty list of node URLs, e.g. [\"http://127.0.0.1:5003\"]")
    peers, ignored = current_node().network.connect(nodes, announce=sender() is None)
    response = {"message": CONNECTED_MESSAGE, "total_nodes": peers}
    if ignored:
        response["ignored"] = ignored
    return jsonify(response), 201


@api.get("/replace_chain")
def replace_chain() -> Any:
    node = current_node()
    replaced, peers = node.network.sync()
    chain = node.blockchain.chain
    message = ("The nodes had different chains so the chain was replaced by the longest one." if replaced
               else "All good. The chain is the largest one.")
    return jsonify(message=message, replaced=replaced, chain=chain, length=len(chain), peers=peers)


@api.post("/create_hash")
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
def get_file_hash() -> Any:
    return jsonify(current_node().file_info(text_field(json_body("name"), "name")))


@api.post("/get_file")
def get_file() -> Any:
    path, size = current_node().get_file(text_field(json_body("ipfs_hash"), "ipfs_hash"))
    return jsonify(message=RETRIEVED_MESSAGE, path=path, size=size)


@api.get("/get_file")
def download_file() -> Any:
    name, size, chunks = current_node().stream_file(request.args.get("ipfs_hash", ""))
    fallback = name.encode("ascii", "replace").decode().replace("?", "_").replace('"', "_")
    headers = {"Content-Disposition": f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name)}",
               "Content-Length": str(size)}
    return Response(stream_with_context(chunks), mimetype="application/octet-stream", headers=headers)


def crypt_request(operation: Any, message: str) -> Any:
    """encrypt_file and decrypt_file take the same fields and answer alike."""
    body = json_body(*CRYPT_FIELDS)
    path, size = operation(text_field(body, "file_path"), text_field(body, "password"), body.get("output_path"),
                           flag_field(body, "overwrite"))
    return jsonify(message=message, file_path=path, size=size)


@api.post("/encrypt_file")
def encrypt_file() -> Any:
    return crypt_request(current_node().encrypt_file, "The file is encrypted (AES-256, AES Crypt format)")


@api.post("/decrypt_file")
def decrypt_file() -> Any:
    return crypt_request(current_node().decrypt_file, "The file is decrypted")


# -- node to node and operations -----------------------------------------------

@api.post("/receive_transaction")
def receive_transaction() -> Any:
    body = json_body()
    if "id" not in body:
        raise BadInput("'id' is required on a transaction from another node")
    receipt = current_node().network.add_transaction(body, sender=sender())
    return jsonify(index=receipt.index, new=receipt.new), 201 if receipt.new else 200


@api.post("/receive_block")
def receive_block() -> Any:
    outcome = current_node().network.receive_block(json_body(), sender())
    if outcome == "invalid":
        raise BadInput("the block does not pass this node's checks (shape, index, link, proof of work)")
    return jsonify(outcome=outcome)


@api.get("/health")
def health() -> Any:
    node = current_node()
    return jsonify(status="ok", port=node.config.port, role=node.config.role_name, length=len(node.blockchain),
                   pending=node.blockchain.pending_count, peers=node.network.peers, ipfs_api=node.config.ipfs_api)


@api.get("/openapi.json")
def openapi() -> Any:
    return jsonify(openapi_spec.SPEC)


@api.get("/docs")
def docs() -> Any:
    return Response(openapi_spec.docs_page(), mimetype="text/html")


# -- access, limits and errors -------------------------------------------------

@api.before_request
def check_access() -> Any:
    node, endpoint = current_node(), (request.endpoint or "").removeprefix("api.")
    g.started = time.perf_counter()
    upload = endpoint == UPLOAD_ENDPOINT and request.mimetype == "multipart/form-data"
    request.max_content_length = node.config.max_upload_bytes if upload else node.config.max_body_bytes
    if node.config.api_key and endpoint != "health" and not _key_matches(node.config.api_key):
        return error("this node needs an API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'", 401)
    allowed = ROLE_ENDPOINTS.get(node.config.role_name)
    if allowed is not None and endpoint not in allowed and endpoint not in ALWAYS_SERVED:
        return error(f"a {node.config.role_name} node does not serve {endpoint}", 403)
    return None


def _key_matches(key: str) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    given = request.headers.get("X-API-Key") or (token if scheme.lower() == "bearer" else "")
    return hmac.compare_digest(given.strip().encode(), key.encode())


def error(message: str, status: int) -> tuple[Response, int]:
    return jsonify(error=message), status


ERROR_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (crypto.OutputExistsError, 409), (crypto.CryptoError, 400),
    (BadInput, 400), (PathRefused, 400), (PeerRefused, 400), (InvalidTransaction, 400),
    (NotFound, 404), (Conflict, 409),
)


def handle_error(exc: Exception) -> tuple[Response, int]:
    if isinstance(exc, HTTPException):
        response, status = error(_http_message(exc), exc.code or 500)
        if status == 405 and getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response, status
    if isinstance(exc, IpfsError):
        return error(exc.message, exc.status)
    for kind, status in ERROR_STATUS:
        if isinstance(exc, kind):
            return error(str(exc), status)
    log.exception("unexpected error in %s %s", request.method, request.path)
    return error(f"internal error ({type(exc).__name__}); the node's log has the details", 500)


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


def create_app(config: Config | None = None, ipfs: IpfsClient | None = None) -> Flask:
    """An isolated node: its own chain, peers and data directory."""
    config = config or Config()
    app = Flask(__name__, static_folder=None)
    app.request_class = NodeRequest
    app.extensions["emr_node"] = Node(config, ipfs)
    app.register_blueprint(api)
    app.register_error_handler(Exception, handle_error)
    app.after_request(log_request)
    return app


# -- serving -------------------------------------------------------------------

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _waitress_errors_as_json() -> None:
    """waitress answers a few requests itself, before the app sees them (a body over its size limit, a
    malformed request line), in plain text; make those {"error": ...} too, like every other answer."""
    import waitress.utilities

    def to_response(self: waitress.utilities.Error, ident: str | None = None) -> tuple[str, list, bytes]:
        lead = TOO_LARGE if self.code == 413 else self.reason.lower()
        body = json.dumps({"error": f"{lead} ({self.body})"}).encode()
        return f"{self.code} {self.reason}", [("Content-Type", "application/json")], body

    waitress.utilities.Error.to_response = to_response


def serve(config: Config) -> None:
    """Serve one node with waitress until SIGINT or SIGTERM."""
    import waitress.server

    if config.host not in LOOPBACK_HOSTS and not config.api_key:
        raise SystemExit(f"error: refusing to listen on {config.host} without an API key; "
                         f"set --api-key (EMR_API_KEY) or listen on 127.0.0.1")
    app = create_app(config)
    node: Node = app.extensions["emr_node"]
    _waitress_errors_as_json()
    # Threads started while the stop signals are blocked inherit the block, so SIGTERM and
    # SIGINT reach the main thread and interrupt its select() at once, not a second later.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        server = waitress.server.create_server(
            app, host=config.host, port=config.port, threads=config.threads, ident="emr-chain",
            max_request_body_size=config.max_upload_bytes)
        node.network.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
    for stop_signal in stop_signals:
        signal.signal(stop_signal, lambda *_: sys.exit(0))
    threading.Thread(target=node.blockchain.start_mining_workers, name="mining-warm-up", daemon=True).start()
    log.info("%s node on %s (chain of %d, IPFS API %s, data %s)", config.role_name, config.own_url,
             len(node.blockchain), config.ipfs_api, config.data_path)
    try:
        server.run()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        node.close()
        log.info("node on %s stopped", config.own_url)


def main(argv: list[str] | None = None) -> None:
    config = load_config(argv)
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [%(name)s :" + str(config.port) + "] %(message)s")
    try:
        serve(config)
    except StateDamaged as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
