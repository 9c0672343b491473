"""The house rules: one door into a node, one error tree mapped once, every route with its access rule, its
document and its request, and the one override of a library internal pinned."""
from __future__ import annotations

import ast
import inspect
import random
import re
from pathlib import Path

import pytest
import waitress.utilities
from flask import Flask

import app as app_module
import errors
import openapi
import server
from app import action_of, check_access_rules, create_app, status_for
from conftest import node_config
from policy import ROLE_ACTIONS, Action, may
from test_postman import COLLECTION, NOT_FOR_USERS, load, request_path, requests_in, shape

ROOT = Path(__file__).resolve().parent.parent
SELF_DESCRIBING = {"/openapi.json", "/docs"}  # the document does not list itself


def routes(flask_app: Flask) -> set[tuple[str, str]]:
    return {(method, rule.rule) for rule in flask_app.url_map.iter_rules() for method in rule.methods or ()
            if method not in ("HEAD", "OPTIONS")}


def test_every_route_has_an_access_rule_a_document_entry_and_a_postman_request(tmp_path: Path) -> None:
    flask_app = create_app(node_config(tmp_path))
    try:
        documented = {(method.upper(), shape(path)) for path, methods in openapi.PATHS.items() for method in methods}
        requested = {(item["request"]["method"], shape(request_path(item["request"])))
                     for name, item in requests_in(load(COLLECTION)["item"]) if not name.startswith("Errors/")}
        missing = []
        for method, path in sorted(routes(flask_app)):
            endpoint = flask_app.url_map.bind("").match(re.sub(r"<[^<>]*>", "x", path), method=method)[0]
            if action_of(flask_app.view_functions[endpoint]) is None:
                missing.append(f"{method} {path}: no @serves access rule")
            if path not in SELF_DESCRIBING and (method, shape(path)) not in documented:
                missing.append(f"{method} {path}: not in openapi.py")
            if path not in NOT_FOR_USERS and (method, shape(path)) not in requested:
                missing.append(f"{method} {path}: no request in postman_collection.json")
        assert not missing, "\n".join(missing)
    finally:
        flask_app.extensions["emr_node"].close()


def test_a_route_without_an_access_rule_stops_the_app_from_being_built() -> None:
    bare = Flask(__name__)
    bare.add_url_rule("/open", "open", lambda: "")
    with pytest.raises(RuntimeError, match="open"):
        check_access_rules(bare)


def test_every_role_of_the_policy_serves_health_and_only_the_patient_records() -> None:
    for role in ROLE_ACTIONS:
        assert may(role, Action.HEALTH) and may(role, Action.GOSSIP)
    assert [role for role in ROLE_ACTIONS if may(role, Action.RECORD)] == ["patient"]


def test_app_goes_through_node_only() -> None:
    source = (ROOT / "app.py").read_text()
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)} | {
        alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import) for alias in node.names}
    assert not imported & {"blockchain", "network", "mining"}
    assert not re.search(r"\.(network|blockchain)\.", source)


# -- the error tree --------------------------------------------------------------

def test_every_error_class_maps_to_a_status_other_than_500() -> None:
    tree = errors.all_errors()
    assert len(tree) > 20
    unmapped = [kind.__name__ for kind in tree if kind is not errors.NodeError and status_for(kind) == 500]
    assert not unmapped, f"error classes that would be answered 500: {unmapped}"


EXPECTED_STATUS = {errors.BadInput: 400, errors.PathRefused: 400, errors.InvalidTransaction: 400,
                   errors.IpfsRefused: 400, errors.WrongPasswordError: 400, errors.Unauthorized: 401,
                   errors.Forbidden: 403, errors.NotFound: 404, errors.IpfsUnknownCid: 404,
                   errors.OutputExistsError: 409, errors.Conflict: 409, errors.IpfsError: 502,
                   errors.IpfsUnreachable: 503, errors.IpfsTimeout: 504}


@pytest.mark.parametrize("seed", range(5))
def test_most_specific_class_wins_whatever_the_order_of_the_table(monkeypatch, seed: int) -> None:
    entries = list(app_module.ERROR_STATUS.items())
    random.Random(seed).shuffle(entries)
    monkeypatch.setattr(app_module, "ERROR_STATUS", dict(entries))
    assert {kind: status_for(kind) for kind in EXPECTED_STATUS} == EXPECTED_STATUS


def test_error_tree_knows_nothing_of_http() -> None:
    tree = ast.parse((ROOT / "errors.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "pathlib"}
    assert not [kind for kind in errors.all_errors() if hasattr(kind, "status") or hasattr(kind, "code")]


def test_an_unexpected_exception_is_a_500_that_names_no_internals(client, monkeypatch) -> None:
    monkeypatch.setattr(client.node, "chain_document", lambda: 1 / 0)
    response = client.get("/get_chain")
    assert response.status_code == 500 and "ZeroDivisionError" in response.get_json()["error"]


# -- the one override of waitress -------------------------------------------------

def test_waitress_error_to_response_keeps_the_signature_server_replaces() -> None:
    original = waitress.utilities.Error.to_response
    assert list(inspect.signature(original).parameters) == ["self", "ident"]
    status, headers, body = original(waitress.utilities.RequestEntityTooLarge("exceeds max_body of 10"), "x")
    assert status.startswith("413") and isinstance(headers, list) and isinstance(body, bytes)


def test_waitress_refusals_become_json_errors(monkeypatch) -> None:
    monkeypatch.setattr(waitress.utilities.Error, "to_response", waitress.utilities.Error.to_response)
    server.waitress_errors_as_json()
    status, headers, body = waitress.utilities.RequestEntityTooLarge("exceeds max_body of 10").to_response("x")
    assert status == "413 Request Entity Too Large" and ("Content-Type", "application/json") in headers
    assert b'"error": "the request body is larger than this node accepts' in body
