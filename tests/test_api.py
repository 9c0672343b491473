"""The REST API of one node (in-process): Fig. 4's shapes, clear errors, nothing changed by bad input."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import PAPER_HASH, paper_transaction

PAPER_BLOCK_2_PREVIOUS_HASH = "03bee3d22f9c590f051f15f6efe33f282cfeac3fd90957779f04ddf29c2c879d"


def state(client) -> tuple:
    chain = client.get("/get_chain").get_json()
    return chain["length"], chain["chain"], client.node.blockchain.pending, client.node.network.peers


def test_get_chain_starts_with_the_papers_genesis(client) -> None:
    response = client.get("/get_chain")
    assert response.status_code == 200
    assert response.get_json() == {"chain": [{"index": 1, "nonce": 1, "previous_hash": "0",
                                              "timestamp": "2020-09-02 23:31:41.258101", "transactions": []}],
                                   "length": 1}


def test_add_transaction_answers_with_the_block_it_will_join(client) -> None:
    response = client.post("/add_transaction", json=paper_transaction())
    assert response.status_code == 201
    body = response.get_json()
    assert body["message"] == "This transaction will be added to Block 2"
    assert body["index"] == 2


def test_mine_block_returns_the_papers_block_2(client) -> None:
    client.post("/add_transaction", json=paper_transaction())
    response = client.get("/mine_block")
    assert response.status_code == 200
    body = response.get_json()
    assert body["message"] == "Congratulations, you just mined a block!"
    assert body["index"] == 2 and body["nonce"] == 533
    assert body["previous_hash"] == PAPER_BLOCK_2_PREVIOUS_HASH
    assert [(tx["user_id"], tx["ipfs_hash"], tx["EHR_name"]) for tx in body["transactions"]] == \
        [("xxxxx", PAPER_HASH, "MRI")]
    chain = client.get("/get_chain").get_json()
    assert chain["length"] == 2 and chain["chain"][1]["nonce"] == 533


def test_responses_have_sorted_keys_like_flask(client) -> None:
    text = client.get("/get_chain").get_data(as_text=True)
    assert text.index('"chain"') < text.index('"length"')
    assert text.index('"index"') < text.index('"nonce"') < text.index('"previous_hash"') < text.index('"timestamp"')


def test_is_valid_reports_a_valid_chain(client) -> None:
    client.get("/mine_block")
    body = client.get("/is_valid").get_json()
    assert body["valid"] is True and "valid" in body["message"]


def test_is_valid_reports_a_tampered_chain(client) -> None:
    client.post("/add_transaction", json=paper_transaction())
    client.get("/mine_block")
    client.get("/mine_block")
    client.node.blockchain._chain[1]["transactions"][0]["user_id"] = "mallory"
    body = client.get("/is_valid").get_json()
    assert body["valid"] is False and "not valid" in body["message"]


def test_connect_node_lists_peers_in_netloc_form_without_duplicates(client) -> None:
    response = client.post("/connect_node", json={"nodes": ["http://127.0.0.1:5003", "http://127.0.0.1:5004",
                                                            "http://127.0.0.1:5003/"]})
    assert response.status_code == 201
    body = response.get_json()
    assert body["message"] == ("All the nodes are now connected. "
                               "The Blockchain now contains the following nodes:")
    assert body["total_nodes"] == ["127.0.0.1:5003", "127.0.0.1:5004"]


def test_connect_node_skips_the_node_itself(client) -> None:
    body = client.post("/connect_node", json={"nodes": ["http://127.0.0.1:5002", "http://localhost:5002"]}).get_json()
    assert body["total_nodes"] == []
    assert len(body["ignored"]) == 2


def test_replace_chain_reports_unreachable_peers_and_keeps_the_chain(client) -> None:
    client.post("/connect_node", json={"nodes": ["http://127.0.0.1:9"]})
    response = client.get("/replace_chain")
    assert response.status_code == 200
    body = response.get_json()
    assert body["replaced"] is False and body["length"] == 1 and len(body["chain"]) == 1
    assert "unreachable" in body["peers"]["127.0.0.1:9"]


def test_health_names_port_role_length_and_pending(make_client) -> None:
    node = make_client(port=5003, role="healthcare_authority")
    body = node.get("/health").get_json()
    assert body["port"] == 5003 and body["role"] == "healthcare_authority"
    assert body["length"] == 1 and body["pending"] == 0


BAD_TRANSACTIONS = [
    (b"not json", "JSON"),
    (b"", "empty"),
    (b"[1, 2]", "object"),
    (b"\xff\xfe\x00", "UTF-8"),
    (b'{"ipfs_hash": "%s", "EHR_name": "MRI"}' % PAPER_HASH.encode(), "user_id"),
    (b'{"user_id": "", "ipfs_hash": "%s", "EHR_name": "MRI"}' % PAPER_HASH.encode(), "user_id"),
    (b'{"user_id": ["x"], "ipfs_hash": "%s", "EHR_name": "MRI"}' % PAPER_HASH.encode(), "user_id"),
    (b'{"user_id": "x", "ipfs_hash": "hello", "EHR_name": "MRI"}', "ipfs_hash"),
    (b'{"user_id": "x", "ipfs_hash": "%s", "EHR_name": "%s"}' % (PAPER_HASH.encode(), b"M" * 5000), "EHR_name"),
    (b'{"user_id": "x", "ipfs_hash": "%s", "EHR_name": null}' % PAPER_HASH.encode(), "EHR_name"),
    (b"[" * 100_000 + b"]" * 100_000, "nested"),
]


@pytest.mark.parametrize("body, named", BAD_TRANSACTIONS, ids=[named for _, named in BAD_TRANSACTIONS])
def test_bad_transaction_gets_a_400_naming_the_problem_and_changes_nothing(client, body, named) -> None:
    before = state(client)
    response = client.post("/add_transaction", data=body, content_type="application/json")
    assert response.status_code == 400
    assert named.lower() in response.get_json()["error"].lower()
    assert state(client) == before


@pytest.mark.parametrize("body, named", [
    ({}, "nodes"), ({"nodes": []}, "nodes"), ({"nodes": "http://127.0.0.1:5003"}, "nodes"),
    ({"nodes": ["ftp://127.0.0.1:5003"]}, "http"), ({"nodes": ["http://127.0.0.1"]}, "port"),
    ({"nodes": ["http://10.1.2.3:5003"]}, "allowed"), ({"nodes": ["http://127.0.0.1:5003", 7]}, "string"),
    ({"nodes": ["http://127.0.0.1:5003/path"]}, "scheme://host:port"),
])
def test_bad_connect_node_gets_a_400_and_adds_no_peer(client, body, named) -> None:
    response = client.post("/connect_node", json=body)
    assert response.status_code == 400
    assert named in response.get_json()["error"]
    assert client.node.network.peers == []


def test_unknown_route_is_a_json_404(client) -> None:
    response = client.get("/get_chains")
    assert response.status_code == 404 and "/get_chains" in response.get_json()["error"]


def test_wrong_method_is_a_json_405_saying_which_to_use(client) -> None:
    response = client.get("/add_transaction")
    assert response.status_code == 405 and "POST" in response.get_json()["error"]
    assert "POST" in response.headers["Allow"]
    response = client.post("/mine_block")
    assert response.status_code == 405 and "GET" in response.get_json()["error"]


def test_oversized_body_is_a_413(make_client) -> None:
    client = make_client(max_body_bytes=1024)
    response = client.post("/add_transaction", data=b'{"user_id": "' + b"x" * 4096 + b'"}',
                           content_type="application/json")
    assert response.status_code == 413 and "error" in response.get_json()


def test_concurrent_adds_and_mines_put_every_transaction_in_exactly_one_block(client) -> None:
    adders, per_adder, miners = 8, 40, 3
    acknowledged: list[str] = []
    lock = threading.Lock()

    def add(worker: int) -> None:
        for number in range(per_adder):
            response = client.post("/add_transaction", json=paper_transaction(EHR_name=f"w{worker}-{number}"))
            assert response.status_code == 201
            with lock:
                acknowledged.append(response.get_json()["id"])

    def mine(_: int) -> None:
        for _ in range(5):
            assert client.get("/mine_block").status_code == 200

    with ThreadPoolExecutor(adders + miners) as pool:
        futures = [pool.submit(add, n) for n in range(adders)] + [pool.submit(mine, n) for n in range(miners)]
        for future in futures:
            future.result()
    client.get("/mine_block")
    chain = client.get("/get_chain").get_json()["chain"]
    mined = [tx["id"] for block in chain for tx in block["transactions"]]
    assert sorted(mined) == sorted(acknowledged)
    assert len(acknowledged) == adders * per_adder
    assert [block["index"] for block in chain] == list(range(1, len(chain) + 1))
    assert client.get("/is_valid").get_json()["valid"]


def test_a_gossiped_batch_takes_each_transaction_on_its_own(client) -> None:
    good = [{**paper_transaction(EHR_name=f"batch {number}"), "id": f"{number:032x}"} for number in range(3)]
    bad = {**paper_transaction(ipfs_hash="not-a-cid"), "id": "f" * 32}
    response = client.post("/receive_transactions", json={"transactions": [good[0], bad, *good[1:], good[0]]})
    assert response.status_code == 200
    body = response.get_json()
    assert (body["new"], body["known"]) == (3, 1)
    assert body["refused"] == [{"id": "f" * 32, "error": "'ipfs_hash' is not an IPFS CID (expected Qm... or b...)"}]
    assert sorted(tx["id"] for tx in client.node.blockchain.pending) == [tx["id"] for tx in good]
