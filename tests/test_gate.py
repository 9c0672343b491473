"""Browser safety and the head-time gate, in-process: media types, Host, Origin and CORS, /health without the key,
and the API key's own checks. The same gate refuses at the server before a body is read: tests/test_server.py."""
from __future__ import annotations

import pytest
from werkzeug.datastructures import Headers

from app import Gate
from config import Config, load_config
from conftest import node_config, paper_transaction
from errors import CrossOriginRefused, MisdirectedRequest, TooLarge, Unauthorized, UnsupportedMediaType
from scripts.cluster import node_args

KEY = "correct-horse-battery-staple-0123456789"
EVIL = "http://evil.example"
TRUSTED = "http://records.example:8443"
TX = b'{"user_id": "xxxxx", "ipfs_hash": "QmbWxSqxhZms74885xceSaiHVvdjqiVWrATtYUrrUnVE1K", "EHR_name": "MRI"}'


def state(client) -> tuple:
    return list(client.node.blockchain.pending), list(client.node.network.peers)


# -- media types ----------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None,
                                          "multipart/form-data; boundary=x", "application/jsonx"])
def test_json_endpoint_takes_only_json_and_says_so(client, content_type) -> None:
    before = state(client)
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/add_transaction", data=TX, headers=headers)
    assert response.status_code == 415, response.get_json()
    assert "application/json" in response.get_json()["error"] and "add_transaction" in response.get_json()["error"]
    assert state(client) == before


def test_json_with_a_charset_is_json(client) -> None:
    response = client.post("/add_transaction", data=TX, headers={"Content-Type": "application/json; charset=utf-8"})
    assert response.status_code == 201


def test_upload_endpoint_takes_json_or_multipart_only(client) -> None:
    response = client.post("/create_hash", data=b"file_path=MRI.pdf",
                           content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415
    assert "application/json or multipart/form-data" in response.get_json()["error"]


def test_text_plain_json_from_a_foreign_page_changes_nothing(client) -> None:
    """What a web page can send any site without asking first (no CORS preflight): a 'simple' request."""
    before = state(client)
    for path, body in (("/add_transaction", TX), ("/connect_node", b'{"nodes": ["http://127.0.0.1:5003"]}')):
        response = client.post(path, data=body, headers={"Content-Type": "text/plain", "Origin": EVIL})
        assert response.status_code in (403, 415)
        assert "Access-Control-Allow-Origin" not in response.headers
    assert state(client) == before


# -- Host: DNS rebinding ----------------------------------------------------------------

@pytest.mark.parametrize("host", ["rebind.evil.example", "rebind.evil.example:5002", "localhost.evil.example",
                                  "127.0.0.1.nip.io:5002"])
def test_a_host_this_node_does_not_answer_to_is_refused_naming_it_and_the_setting(client, host) -> None:
    response = client.get("/get_chain", headers={"Host": host})
    assert response.status_code == 421
    message = response.get_json()["error"]
    assert host in message and "allowed_hosts" in message
    assert client.post("/add_transaction", json=paper_transaction(), headers={"Host": host}).status_code == 421
    assert client.get("/health", headers={"Host": host}).status_code == 421
    assert client.node.blockchain.pending == []


@pytest.mark.parametrize("host", ["localhost", "localhost:5002", "127.0.0.1:5002", "[::1]:5002", "LocalHost"])
def test_the_loopback_names_are_answered_on_loopback(client, host) -> None:
    assert client.get("/get_chain", headers={"Host": host}).status_code == 200


def test_allowed_hosts_and_public_url_add_names(make_client) -> None:
    node = make_client(allowed_hosts="emr.internal, other.internal", public_url="http://node-a.lan:5002")
    for host in ("emr.internal:5002", "other.internal", "node-a.lan:5002"):
        assert node.get("/get_chain", headers={"Host": host}).status_code == 200, host
    assert node.get("/get_chain", headers={"Host": "evil.example"}).status_code == 421
    assert make_client(allowed_hosts="*").get("/get_chain", headers={"Host": "any.example"}).status_code == 200


def test_a_node_on_every_address_answers_to_ip_literals_but_not_to_foreign_names(tmp_path) -> None:
    from flask import Flask
    gate = Gate(Flask(__name__), node_config(tmp_path, host="0.0.0.0", api_key=KEY))
    assert gate.answers_to("192.0.2.7:5002") and gate.answers_to("[2001:db8::1]:5002") and gate.answers_to("localhost")
    assert not gate.answers_to("evil.example:5002")


# -- Origin: cross-site requests ------------------------------------------------------------

def test_a_page_of_another_origin_is_refused_403_naming_it_and_the_setting(client) -> None:
    before = state(client)
    response = client.post("/add_transaction", json=paper_transaction(), headers={"Origin": EVIL})
    assert response.status_code == 403
    assert EVIL in response.get_json()["error"] and "allowed_origins" in response.get_json()["error"]
    assert client.get("/get_chain", headers={"Origin": "null"}).status_code == 403
    assert client.post("/connect_node", json={"nodes": ["http://127.0.0.1:5003"]},
                       headers={"Origin": EVIL}).status_code == 403
    assert state(client) == before


def test_the_nodes_own_pages_and_clients_without_an_origin_are_served(client) -> None:
    assert client.post("/add_transaction", json=paper_transaction(),
                       headers={"Origin": "http://localhost", "Host": "localhost"}).status_code == 201
    assert client.get("/get_chain", headers={"Origin": "http://127.0.0.1:5002", "Host": "127.0.0.1:5002"}) \
        .status_code == 200
    assert client.post("/add_transaction", json=paper_transaction(EHR_name="curl")).status_code == 201  # no Origin


def test_an_allowed_origin_gets_cors_headers_never_a_star(make_client) -> None:
    node = make_client(allowed_origins=f"{TRUSTED}, https://other.example")
    response = node.get("/get_chain", headers={"Origin": TRUSTED})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == TRUSTED
    assert "Origin" in response.headers["Vary"]
    refused = node.post("/add_transaction", data=TX, headers={"Origin": TRUSTED, "Content-Type": "text/plain"})
    assert refused.status_code == 415 and refused.headers["Access-Control-Allow-Origin"] == TRUSTED  # readable
    other = node.get("/get_chain", headers={"Origin": EVIL})
    assert other.status_code == 403 and "Access-Control-Allow-Origin" not in other.headers
    assert "Origin" in other.headers["Vary"]


def test_an_allowed_origin_gets_a_preflight_with_the_methods_and_headers(make_client) -> None:
    node = make_client(allowed_origins=TRUSTED, api_key=KEY)
    asked = {"Origin": TRUSTED, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "content-type, x-api-key"}
    response = node.options("/add_transaction", headers=asked)  # a preflight carries no key
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == TRUSTED
    assert response.headers["Access-Control-Allow-Methods"] == "POST"
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "content-type" in allowed and "x-api-key" in allowed and "authorization" in allowed
    assert "Origin" in response.headers["Vary"] and int(response.headers["Access-Control-Max-Age"]) > 0
    assert node.options("/get_file", headers=asked).headers["Access-Control-Allow-Methods"] == "GET, POST"
    assert node.options("/add_transaction", headers={**asked, "Origin": EVIL}).status_code == 403
    # the request itself still needs the key
    actual = node.post("/add_transaction", json=paper_transaction(), headers={"Origin": TRUSTED})
    assert actual.status_code == 401 and actual.headers["Access-Control-Allow-Origin"] == TRUSTED
    done = node.post("/add_transaction", json=paper_transaction(), headers={"Origin": TRUSTED, "X-API-Key": KEY})
    assert done.status_code == 201 and done.headers["Access-Control-Allow-Origin"] == TRUSTED


@pytest.mark.parametrize("origins", ["*", "evil.example", "http://a.example/path"])
def test_allowed_origins_are_origins_and_never_a_star(tmp_path, origins) -> None:
    with pytest.raises(ValueError, match="allowed_origins"):
        node_config(tmp_path, allowed_origins=origins)


# -- /health and the key --------------------------------------------------------------------

def test_health_without_the_key_tells_only_that_the_node_is_up(make_client) -> None:
    node = make_client(api_key=KEY, peers="")
    node.node.network.connect(["http://127.0.0.1:9"], announce=False)
    public = node.get("/health")
    assert public.status_code == 200 and public.get_json() == {"status": "ok", "role": "patient"}
    assert "127.0.0.1:9" not in public.get_data(as_text=True) and "ipfs" not in public.get_data(as_text=True)
    full = node.get("/health", headers={"X-API-Key": KEY}).get_json()
    assert full["peers"] == ["127.0.0.1:9"] and "ipfs_api" in full and "pending" in full


def test_health_on_a_keyless_node_tells_everything(client) -> None:
    assert {"status", "port", "role", "length", "pending", "peers", "ipfs_api"} <= set(client.get("/health").get_json())


@pytest.mark.parametrize("key, named", [(" ", "blank"), ("\t\n", "blank"), ("short-key", "at least 16"),
                                        ("a key with spaces in it", "whitespace"),
                                        ("correct-horse-battery-staple\n", "whitespace")])
def test_a_blank_short_or_spaced_api_key_stops_the_start(tmp_path, key, named) -> None:
    with pytest.raises(ValueError, match=named):
        node_config(tmp_path, api_key=key)
    with pytest.raises(SystemExit, match=f"EMR_API_KEY.*{named}"):
        load_config([], {"EMR_API_KEY": key})


def test_a_good_key_and_no_key_are_accepted() -> None:
    assert Config(api_key=KEY).api_key == KEY and Config().api_key == ""


def test_a_key_that_starts_with_a_dash_reaches_a_node_started_by_the_scripts() -> None:
    key = "-" + KEY  # secrets.token_urlsafe starts one key in 64 this way
    assert load_config(node_args("patient", api_key=key, port=5002), {}).api_key == key


# -- the gate itself: one answer for the server and for Flask ------------------------------------

def gate_of(client) -> Gate:
    return client.application.extensions["emr_gate"]


def test_the_gate_answers_from_the_head_alone(make_client) -> None:
    gate = gate_of(make_client(api_key=KEY, max_body_bytes=1000, max_upload_bytes=10_000))
    keyed = Headers({"Host": "127.0.0.1:5002", "X-API-Key": KEY, "Content-Type": "application/json"})
    assert gate.refusal("POST", "/add_transaction", keyed) is None
    assert isinstance(gate.refusal("POST", "/add_transaction", Headers({"Content-Length": "300000000"})),
                      Unauthorized)
    assert isinstance(gate.refusal("POST", "/add_transaction", Headers({**keyed, "Content-Length": "1001"})),
                      TooLarge)
    assert isinstance(gate.refusal("POST", "/add_transaction", Headers({**keyed, "Content-Type": "text/plain"})),
                      UnsupportedMediaType)
    assert isinstance(gate.refusal("GET", "/health", Headers({"Host": "evil.example"})), MisdirectedRequest)
    assert isinstance(gate.refusal("GET", "/health", Headers({"Origin": EVIL})), CrossOriginRefused)
    assert gate.refusal("GET", "/health", Headers()) is None
    upload = Headers({**keyed, "Content-Type": "multipart/form-data; boundary=x", "Content-Length": "9000"})
    assert gate.refusal("POST", "/create_hash", upload) is None
    assert gate.body_limit("POST", "/create_hash", upload) == 10_000
    assert gate.body_limit("POST", "/create_hash", keyed) == 1000
    assert gate.body_limit("POST", "/add_transaction", upload) == 1000
    assert isinstance(gate.refusal("GET", "/no_such_route", Headers({"Content-Length": "5000"})), TooLarge)
    assert gate.refusal("GET", "/no_such_route", Headers()) is None  # Flask answers 404


def test_an_upload_larger_than_a_json_body_is_refused_on_any_other_endpoint(make_client) -> None:
    node = make_client(max_body_bytes=1000, max_upload_bytes=10_000)
    response = node.post("/add_transaction", data=b"x" * 5000, content_type="multipart/form-data; boundary=x")
    assert response.status_code in (413, 415)
    assert node.post("/add_transaction", data=b" " * 5000, content_type="application/json").status_code == 413
