"""The Postman collection: its structure, and a newman run of it against three real node processes and Kubo.

`make newman` installs newman into .tools/npm; the run test fails (it does not skip) without it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from app import create_app
from conftest import node_config
from scripts.cluster import ROOT, Kubo, NodeProcess, write_sample_record

COLLECTION = ROOT / "postman_collection.json"
ENVIRONMENT = ROOT / "postman_environment.json"
NEWMAN = ROOT / ".tools" / "npm" / "node_modules" / ".bin" / "newman"
SCHEMA = "https://schema.getpostman.com/json/collection/v2.1.0/collection.json"
ROLES = {"patient": "patient_url", "healthcare_authority": "authority_url", "healthcare_provider": "provider_url"}
PAPER_PORTS = {"patient_url": 5002, "authority_url": 5003, "provider_url": 5004}
# Served by every node, but not for a Postman user: node-to-node gossip and the API's own description.
NOT_FOR_USERS = {"/receive_block", "/receive_transaction", "/receive_transactions", "/blocks", "/openapi.json", "/docs", "/static/<path:filename>"}
# The workflow folders in run order, by the step of the paper's Fig. 3 each begins with.
WORKFLOW_STEPS = ("0.", "3.", "4.", "5.", "6.", "7.", "8.")
PAPER_EXTRAS = ["Checks", "Errors"]
SIGNED_FOLDERS = ["Signed network", "Consent"]  # run against nodes of a signed network (--security signed)
SIGNED_NETWORK = {"emergency_members": "healthcare_authority"}  # its members file's settings: break-glass in Consent
PAPER_FOLDERS = [item["name"] for item in json.loads(COLLECTION.read_text())["item"]
                 if item["name"] not in SIGNED_FOLDERS]
NEWMAN_SECONDS = 120
SAMPLE_SIZE = 63_795


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def requests_in(items: list[dict[str, Any]], folder: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(folder/name, item) for every request item, depth first, in run order."""
    for item in items:
        name = f"{folder}/{item['name']}" if folder else item["name"]
        if "item" in item:
            yield from requests_in(item["item"], name)
        else:
            yield name, item


def shape(path: str) -> str:
    """A path with its parameters blanked, to compare a Flask rule ('/records/<cid>'), an OpenAPI path
    ('/records/{cid}') and a Postman request ('/records/{{ipfs_hash}}')."""
    return re.sub(r"\{\{[^{}]*\}\}|\{[^{}]*\}|<[^<>]*>", "{}", path)


def request_path(request: dict[str, Any]) -> str:
    url = request["url"]
    path = url["path"] if isinstance(url, dict) and "path" in url else \
        (url["raw"] if isinstance(url, dict) else url).split("}}", 1)[-1].split("?", 1)[0].strip("/").split("/")
    return "/" + "/".join(path)


# -- structure, no nodes -------------------------------------------------------------------

def test_collection_is_v2_1_and_every_request_has_tests() -> None:
    collection = load(COLLECTION)
    assert collection["info"]["schema"] == SCHEMA
    assert collection["info"]["name"]
    items = list(requests_in(collection["item"]))
    assert len(items) >= 20
    for name, item in items:
        request = item["request"]
        assert request["method"] in ("GET", "POST"), name
        assert request_path(request).startswith("/"), name
        assert request["url"]["raw"].startswith("{{") and request["url"]["host"][0] in (
            "{{patient_url}}", "{{authority_url}}", "{{provider_url}}"), f"{name}: use a role's base URL variable"
        tests = ["\n".join(event["script"]["exec"]) for event in item.get("event", []) if event["listen"] == "test"]
        assert tests and "pm.test(" in "".join(tests), f"{name} has no pm.test"
        assert "pm.response.to.have.status(" in "".join(tests), f"{name} does not check the status code"
        if request.get("body", {}).get("mode") == "raw" and request["body"].get("options", {}).get("raw", {}).get(
                "language") == "json":
            json.loads(request["body"]["raw"])  # a JSON example body must be JSON (variables are inside strings)
    names = [name for name, _ in items]
    assert len(set(names)) == len(names), "request names must be unique (setNextRequest goes by name or id)"


def test_folders_follow_the_papers_workflow_then_checks_errors_and_the_signed_network() -> None:
    folders = [item["name"] for item in load(COLLECTION)["item"]]
    assert [name.split(" ", 1)[0] for name in folders[:len(WORKFLOW_STEPS)]] == list(WORKFLOW_STEPS)
    assert folders[len(WORKFLOW_STEPS):] == PAPER_EXTRAS + SIGNED_FOLDERS


def test_every_endpoint_of_the_api_has_a_request(tmp_path: Path) -> None:
    """A new endpoint needs a request (outside the Errors folder) in the collection."""
    app = create_app(node_config(tmp_path))
    try:
        routes = {(method, shape(rule.rule)) for rule in app.url_map.iter_rules() for method in rule.methods or ()
                  if method not in ("HEAD", "OPTIONS") and rule.rule not in NOT_FOR_USERS}
    finally:
        app.extensions["emr_node"].close()
    covered = {(item["request"]["method"], shape(request_path(item["request"])))
               for name, item in requests_in(load(COLLECTION)["item"]) if not name.startswith("Errors/")}
    missing = sorted(routes - covered)
    assert not missing, f"endpoints without a request in postman_collection.json: {missing}"


def test_environment_and_collection_variables_name_the_three_roles() -> None:
    environment = load(ENVIRONMENT)
    assert environment["_postman_variable_scope"] == "environment"
    values = {value["key"]: value["value"] for value in environment["values"] if value.get("enabled", True)}
    defaults = {var["key"]: var["value"] for var in load(COLLECTION)["variable"]}
    for key, port in PAPER_PORTS.items():
        assert values[key] == defaults[key] == f"http://127.0.0.1:{port}"
    for key in ("password", "record", "record_size", "ipfs_hash"):
        assert key in defaults
    assert defaults["record"] == "MRI.pdf" and defaults["record_size"] == str(SAMPLE_SIZE)


# -- a newman run ---------------------------------------------------------------------------

def run_newman(urls: dict[str, str], report: Path, folders: list[str]) -> subprocess.CompletedProcess[str]:
    command = [str(NEWMAN), "run", str(COLLECTION), "-e", str(ENVIRONMENT),
               *(arg for key, url in urls.items() for arg in ("--env-var", f"{key}={url}")),
               *(arg for folder in folders for arg in ("--folder", folder)),
               "--reporters", "cli,json", "--reporter-json-export", str(report),
               "--timeout-request", "60000", "--color", "off", "--disable-unicode", "--bail"]
    # Every request goes to 127.0.0.1: no proxy may be in the way.
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()} | {"FORCE_COLOR": "0"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=NEWMAN_SECONDS,
                          stdin=subprocess.DEVNULL)


def check_run(result: subprocess.CompletedProcess[str], report_path: Path, folders: list[str]) -> dict[str, Any]:
    """The run's stats, after asserting that newman passed and every request asserted something."""
    output = f"newman output:\n{result.stdout[-12000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, output
    assert report_path.is_file(), output
    run = load(report_path)["run"]
    stats = run["stats"]
    assert stats["requests"]["failed"] == 0 and stats["assertions"]["failed"] == 0, output
    assert not run["failures"], output
    assert stats["assertions"]["total"] >= stats["requests"]["total"], output
    for execution in run["executions"]:
        assert execution.get("assertions"), f"{execution['item']['name']} asserted nothing\n{output}"
    executed = {execution["item"]["name"] for execution in run["executions"]}
    expected = {item["name"] for name, item in requests_in(load(COLLECTION)["item"])
                if name.split("/", 1)[0] in folders}
    assert executed == expected, f"not run: {sorted(expected - executed)}\n{output}"
    return stats


def mined_block(report_path: Path) -> int:
    for execution in load(report_path)["run"]["executions"]:
        if execution["item"]["name"] == "Patient mines the block":
            return json.loads(bytes(execution["response"]["stream"]["data"]))["index"]
    raise AssertionError("no mine_block in the report")


def test_newman_runs_the_collection_twice_against_the_three_roles(spawn_node, kubo: Kubo, tmp_path: Path) -> None:
    if not NEWMAN.is_file():
        pytest.fail(f"newman is not installed at {NEWMAN.relative_to(ROOT)}: run `make newman`")
    data_dirs = {role: tmp_path / role for role in ROLES}
    nodes: dict[str, NodeProcess] = {role: spawn_node(role, data_dir=data_dirs[role], ipfs_api=kubo.api_url)
                                     for role in ROLES}
    write_sample_record(data_dirs["patient"] / "MRI.pdf")
    urls = {key: nodes[role].url for role, key in ROLES.items()}

    check_run(run_newman(urls, tmp_path / "first.json", PAPER_FOLDERS), tmp_path / "first.json", PAPER_FOLDERS)
    decrypted = data_dirs["healthcare_provider"] / "downloads" / "MRI.pdf"
    assert decrypted.read_bytes() == (data_dirs["patient"] / "MRI.pdf").read_bytes()

    # The same collection again on the same nodes: a new encryption, a new hash, the next block.
    check_run(run_newman(urls, tmp_path / "second.json", PAPER_FOLDERS), tmp_path / "second.json", PAPER_FOLDERS)
    assert mined_block(tmp_path / "second.json") == mined_block(tmp_path / "first.json") + 1
    assert decrypted.read_bytes() == (data_dirs["patient"] / "MRI.pdf").read_bytes()


def test_newman_runs_the_signed_and_consent_folders_twice_against_a_signed_network(signed_network, kubo: Kubo,
                                                                        tmp_path: Path) -> None:
    if not NEWMAN.is_file():
        pytest.fail(f"newman is not installed at {NEWMAN.relative_to(ROOT)}: run `make newman`")
    nodes = dict(zip(ROLES, signed_network(tuple(ROLES), network=SIGNED_NETWORK, ipfs_api=kubo.api_url)))
    nodes["patient"].post("/connect_node", {"nodes": [nodes[role].url for role in ROLES if role != "patient"]})
    patient_data = Path(nodes["patient"].args[nodes["patient"].args.index("--data-dir") + 1])
    write_sample_record(patient_data / "MRI.pdf")
    urls = {key: nodes[role].url for role, key in ROLES.items()}
    for run in ("first", "second"):
        check_run(run_newman(urls, tmp_path / f"{run}.json", SIGNED_FOLDERS), tmp_path / f"{run}.json",
                  SIGNED_FOLDERS)
