"""The chain itself (blockchain.py), as plain Python."""
from __future__ import annotations

import copy
import hashlib
import json

import pytest

from blockchain import (PAPER_GENESIS_TIMESTAMP, Blockchain, InvalidTransaction, check_transaction, hash_block,
                        paper_proof_ok, proof_of_work)
from conftest import PAPER_HASH, paper_transaction
from mining import Miner

PAPER_BLOCK_2_PREVIOUS_HASH = "03bee3d22f9c590f051f15f6efe33f282cfeac3fd90957779f04ddf29c2c879d"


def mined_chain(blocks: int = 3, **settings) -> Blockchain:
    chain = Blockchain(**settings)
    for number in range(blocks):
        chain.add_transaction(paper_transaction(EHR_name=f"record {number}"))
        chain.mine_block()
    return chain


def test_genesis_is_the_papers_block() -> None:
    genesis = Blockchain().chain[0]
    assert genesis == {"index": 1, "timestamp": PAPER_GENESIS_TIMESTAMP, "nonce": 1, "previous_hash": "0",
                       "transactions": []}


def test_block_hash_is_sha256_of_sorted_json() -> None:
    genesis = Blockchain().chain[0]
    assert hash_block(genesis) == hashlib.sha256(json.dumps(genesis, sort_keys=True).encode()).hexdigest()
    assert hash_block(genesis) == PAPER_BLOCK_2_PREVIOUS_HASH


def test_proof_of_work_after_genesis_is_the_papers_533() -> None:
    assert proof_of_work(1, 4) == 533
    assert not any(paper_proof_ok(n, 1, 4) for n in range(1, 533))


def test_mined_block_links_to_previous_hash() -> None:
    chain = Blockchain()
    chain.add_transaction(paper_transaction())
    block = chain.mine_block()
    assert block["index"] == 2
    assert block["nonce"] == 533
    assert block["previous_hash"] == PAPER_BLOCK_2_PREVIOUS_HASH
    assert set(block) == {"index", "timestamp", "nonce", "previous_hash", "transactions"}
    second = chain.mine_block()
    assert second["previous_hash"] == hash_block(block)


def test_mining_empties_the_pending_list_into_the_block() -> None:
    chain = Blockchain()
    chain.add_transaction(paper_transaction())
    chain.add_transaction(paper_transaction(EHR_name="X-Ray"))
    block = chain.mine_block()
    assert [tx["EHR_name"] for tx in block["transactions"]] == ["MRI", "X-Ray"]
    assert chain.pending == []


def test_difficulty_is_configurable() -> None:
    block = mined_chain(1, difficulty=2).chain[1]
    digest = hashlib.sha256(str(block["nonce"] ** 2 - 1).encode()).hexdigest()
    assert digest.startswith("00")
    assert block["nonce"] == proof_of_work(1, 2)


def test_parallel_search_finds_the_same_smallest_nonce() -> None:
    miner = Miner(workers=2)
    try:
        for previous in (1, 533, 45293):
            assert miner.proof_of_work(previous, 4) == proof_of_work(previous, 4)
    finally:
        miner.close()


def test_chain_of_mined_blocks_is_valid() -> None:
    chain = mined_chain()
    assert chain.chain_problem(chain.chain) is None


@pytest.mark.parametrize("tamper", [
    lambda c: c[1]["transactions"][0].update(ipfs_hash="QmYUtDrtcA8SG6kMe3TaChhbRnpcso5o74iZxR6qLweiPh"),
    lambda c: c[1].update(nonce=c[1]["nonce"] + 1),
    lambda c: c[2].update(previous_hash="0" * 64),
    lambda c: c[2].update(index=7),
    lambda c: c[0].update(timestamp="2021-01-01 00:00:00.000000"),
    lambda c: c.pop(1),
    lambda c: c[1].update(extra="field"),
    lambda c: c[1]["transactions"].append(copy.deepcopy(c[1]["transactions"][0])),
    lambda c: c[1]["transactions"][0].pop("EHR_name"),
    lambda c: c[1].update(timestamp="yesterday"),
], ids=["transaction", "nonce", "link", "index", "genesis", "gap", "extra-field", "duplicate-tx",
        "missing-field", "timestamp"])
def test_tampered_chain_is_invalid(tamper) -> None:
    chain = mined_chain()
    copy_of_chain = copy.deepcopy(chain.chain)
    tamper(copy_of_chain)
    assert chain.chain_problem(copy_of_chain) is not None



def test_paper_proof_cannot_see_a_change_in_the_newest_block_but_content_proof_can() -> None:
    paper, content = mined_chain(2), mined_chain(2, pow_mode="content")
    for chain in (paper, content):
        forged = copy.deepcopy(chain.chain)
        forged[-1]["transactions"][0]["user_id"] = "mallory"
        chain.forged = forged
    assert paper.chain_problem(paper.forged) is None
    assert content.chain_problem(content.forged) is not None


def test_content_proof_blocks_hash_below_the_difficulty() -> None:
    chain = mined_chain(2, pow_mode="content")
    assert all(hash_block(block).startswith("0000") for block in chain.chain[1:])
    assert chain.chain_problem(chain.chain) is None


@pytest.mark.parametrize("tx, field", [
    ({"ipfs_hash": PAPER_HASH, "EHR_name": "MRI"}, "user_id"),
    ({"user_id": "", "ipfs_hash": PAPER_HASH, "EHR_name": "MRI"}, "user_id"),
    ({"user_id": 5, "ipfs_hash": PAPER_HASH, "EHR_name": "MRI"}, "user_id"),
    ({"user_id": "x", "ipfs_hash": "not-a-cid", "EHR_name": "MRI"}, "ipfs_hash"),
    ({"user_id": "x", "ipfs_hash": PAPER_HASH, "EHR_name": "M" * 1000}, "EHR_name"),
    ({"user_id": "x", "ipfs_hash": PAPER_HASH, "EHR_name": "MRI", "file_size": "-1"}, "file_size"),
    ({"user_id": "x", "ipfs_hash": PAPER_HASH, "EHR_name": "MRI", "file_name": "../etc"}, "file_name"),
    ({"user_id": "x", "ipfs_hash": PAPER_HASH, "EHR_name": "MRI", "colour": "red"}, "colour"),
    ({"user_id": "x", "ipfs_hash": PAPER_HASH, "EHR_name": "MRI", "file_size": "12\n"}, "file_size"),
    ({"user_id": "x", "ipfs_hash": PAPER_HASH, "EHR_name": "MRI", "id": "0" * 32 + "\n"}, "id"),
    ({"user_id": "x", "ipfs_hash": PAPER_HASH + "\n", "EHR_name": "MRI"}, "ipfs_hash"),
])
def test_malformed_transaction_is_refused_naming_the_field(tx, field) -> None:
    chain = Blockchain()
    with pytest.raises(InvalidTransaction, match=field):
        chain.add_transaction(tx)
    assert chain.pending == []


def test_optional_file_fields_are_recorded() -> None:
    tx = check_transaction(paper_transaction(file_name="MRI.pdf.aes", file_size=63809))
    assert tx["file_name"] == "MRI.pdf.aes" and tx["file_size"] == "63809"


def test_transaction_with_a_known_id_is_not_added_twice() -> None:
    chain = Blockchain()
    first = chain.add_transaction(paper_transaction())
    again = chain.add_transaction(first.transaction)
    assert first.new and not again.new
    chain.mine_block()
    after_mining = chain.add_transaction(first.transaction)
    assert not after_mining.new and after_mining.index == 2
    assert chain.pending == []


def test_longer_valid_chain_replaces_ours_and_keeps_unmined_transactions_pending() -> None:
    ours, theirs = Blockchain(), mined_chain(3)
    shared = theirs.chain[1]["transactions"][0]
    ours.add_transaction(shared)
    local_only = ours.add_transaction(paper_transaction(EHR_name="local")).transaction
    replaced, _ = ours.replace_chain(theirs.chain)
    assert replaced
    assert ours.chain == theirs.chain
    assert ours.pending == [local_only]


def test_blocks_dropped_by_a_replacement_go_back_to_pending() -> None:
    ours, theirs = mined_chain(1), mined_chain(2)
    dropped = ours.chain[1]["transactions"][0]
    assert ours.replace_chain(theirs.chain)[0]
    assert dropped in ours.pending
    ours.mine_block()
    ids = [tx["id"] for block in ours.chain for tx in block["transactions"]]
    assert len(ids) == len(set(ids)) == 3


def test_invalid_longer_chain_is_refused() -> None:
    ours, theirs = mined_chain(1), mined_chain(3)
    forged = copy.deepcopy(theirs.chain)
    forged[2]["nonce"] += 1
    replaced, why = ours.replace_chain(forged)
    assert not replaced and why.startswith("invalid")
    assert len(ours.chain) == 2


def test_shorter_chain_is_refused() -> None:
    ours, theirs = mined_chain(3), mined_chain(1)
    assert not ours.replace_chain(theirs.chain)[0]
    assert len(ours.chain) == 4


def test_chains_of_equal_length_settle_on_the_lower_last_hash() -> None:
    first, second = mined_chain(1), mined_chain(1)
    a, b = first.chain, second.chain
    winner = min((a, b), key=lambda c: hash_block(c[-1]))
    first.replace_chain(b)
    second.replace_chain(a)
    assert first.chain == second.chain == winner


def test_chain_from_another_genesis_is_refused() -> None:
    other = mined_chain(3, genesis_timestamp="2024-01-01 00:00:00.000000")
    assert not Blockchain().replace_chain(other.chain)[0]


def test_announced_block_is_appended_only_if_it_follows() -> None:
    source, follower = mined_chain(2), Blockchain()
    assert follower.receive_block(source.chain[2]) == "behind"
    assert follower.receive_block(source.chain[1]) == "appended"
    assert follower.receive_block(source.chain[1]) == "known"
    forged = copy.deepcopy(source.chain[2])
    forged["nonce"] += 1
    assert follower.receive_block(forged) == "invalid"
    assert follower.receive_block(source.chain[2]) == "appended"
    assert follower.chain == source.chain


def test_records_are_found_by_file_name_and_by_ehr_name_newest_first() -> None:
    chain = Blockchain()
    chain.add_transaction(paper_transaction(file_name="MRI.pdf.aes"))
    chain.mine_block()
    chain.add_transaction(paper_transaction(ipfs_hash="QmYUtDrtcA8SG6kMe3TaChhbRnpcso5o74iZxR6qLweiPh"))
    chain.mine_block()
    by_file = chain.find_records("MRI.pdf.aes")
    by_name = chain.find_records("mri")
    assert [index for index, _ in by_file] == [3, 2] == [index for index, _ in by_name]
    assert chain.find_records("X-Ray") == []
