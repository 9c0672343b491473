"""A property-based API fuzzer (schemathesis) against /openapi.json: no 5xx, every response as documented."""
from __future__ import annotations

import os

import pytest
import schemathesis
from schemathesis import GenerationMode, checks
from hypothesis import HealthCheck, given, settings

import openapi
from scripts.cluster import Kubo

EXAMPLES_PER_OPERATION = 30
# A refused request may also be too large (413): a negative array of many big objects outgrows max_body_bytes.
REFUSED_STATUSES = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]


@pytest.fixture
def fuzzed_app(make_client, kubo: Kubo):
    """A patient node on a real Kubo, with a record on the chain and files in its data directory."""
    client = make_client(ipfs_api=kubo.api_url, ipfs_lookup_timeout=0.3, difficulty=2, peer_timeout=0.3)
    (client.node.data_dir / "MRI.pdf").write_bytes(os.urandom(2048))
    uploaded = client.post("/create_hash", json={"file_path": "MRI.pdf"}).get_json()["IPFS Hash"]
    client.post("/add_transaction", json={"user_id": "xxxxx", "ipfs_hash": uploaded["Hash"], "EHR_name": "MRI"})
    client.get("/mine_block")
    return client.application


@pytest.fixture
def fuzz_schema(fuzzed_app):
    config = schemathesis.Config.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": REFUSED_STATUSES}}})
    return schemathesis.openapi.from_wsgi("/openapi.json", fuzzed_app, config=config)


CASES = [(method.upper(), path, mode) for path, methods in openapi.PATHS.items() for method, operation in methods.items()
         for mode in GenerationMode
         if mode is GenerationMode.POSITIVE or "requestBody" in operation or "parameters" in operation]


@pytest.mark.parametrize("method, path, mode", CASES, ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES])
def test_every_generated_request_gets_a_documented_answer_and_never_a_5xx(fuzz_schema, method, path, mode) -> None:
    """Positive mode sends requests the document allows, negative mode requests it forbids (those must get a 4xx)."""
    operation = fuzz_schema[path][method]

    # schemathesis' own pytest plugin does not run under pytest 9 yet, so the Hypothesis test is built here.
    @given(case=operation.as_strategy(mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        # A document cannot say that a path must stay inside the data directory or that a CID must exist on
        # IPFS, so schema-valid requests may rightly be refused. Nor can a file's bytes be schema-invalid, so a
        # "negative" multipart upload may hold a perfectly good file. Every other check runs.
        excluded = [checks.positive_data_acceptance]
        if case.media_type == "multipart/form-data":
            excluded.append(checks.negative_data_rejection)
        case.call_and_validate(excluded_checks=excluded)

    check()


def test_document_lists_every_route_of_the_app(client) -> None:
    routes = {(openapi.route_path(rule.rule), method) for rule in client.application.url_map.iter_rules()
              for method in rule.methods - {"HEAD", "OPTIONS"}} - {("/openapi.json", "GET"), ("/docs", "GET")}
    documented = {(path, method.upper()) for path, methods in openapi.PATHS.items() for method in methods}
    assert routes == documented


def test_docs_page_lists_every_endpoint(client) -> None:
    page = client.get("/docs").get_data(as_text=True)
    for path in openapi.PATHS:
        assert path in page
    assert client.get("/openapi.json").get_json()["openapi"].startswith("3.")
