"""ledger.py's membership rules on an in-process chain: admissions that clash with a member, admissions that
replace one (a rotated key), and a node that may not mine because it is not (or no longer) a member."""
from __future__ import annotations

import uuid
from typing import Any

import pytest

from blockchain import Blockchain, hash_block, proof_of_work
from errors import InvalidTransaction, NotAMember
from identity import Identity, describe
from ledger import SignedRules, block_signing_hash
from members import Member, Members

AUTHORITY, PROVIDER, PATIENT = "healthcare_authority", "healthcare_provider", "patient"
DIFFICULTY = 2


@pytest.fixture(scope="module")
def keys() -> dict[str, Identity]:
    return {name: Identity.generate() for name in ("authority", "provider", "patient", "newcomer", "rotated")}


@pytest.fixture
def founding(keys: dict[str, Identity]) -> Members:
    return Members("emr-test", [Member(keys["authority"].public(), AUTHORITY, "http://127.0.0.1:5003"),
                                Member(keys["provider"].public(), PROVIDER, "http://127.0.0.1:5004"),
                                Member(keys["patient"].public(), PATIENT, "http://127.0.0.1:5002")])


def chain_of(founding: Members, identity: Identity) -> Blockchain:
    return Blockchain(DIFFICULTY, rules=SignedRules(founding, identity))


def signed(identity: Identity, tx: dict[str, Any]) -> dict[str, Any]:
    unsigned = {**tx, "id": uuid.uuid4().hex, "signer": identity.node_id}
    return {**unsigned, "signature": identity.sign(unsigned)}


def admission(authority: Identity, newcomer: Identity, role: str, url: str, **extra: Any) -> dict[str, Any]:
    member = {key: value for key, value in describe(newcomer, role, url).items() if key != "short_id"}
    return signed(authority, {"type": "admit", "member": member, **extra})


def removal(authority: Identity, node_id: str) -> dict[str, Any]:
    return signed(authority, {"type": "remove", "node_id": node_id})


def block_of(miner: Identity, previous: dict[str, Any], transactions: list[dict[str, Any]]) -> dict[str, Any]:
    block = {"index": previous["index"] + 1, "timestamp": previous["timestamp"], "transactions": transactions,
             "nonce": proof_of_work(previous["nonce"], DIFFICULTY), "previous_hash": hash_block(previous),
             "miner": miner.node_id}
    return {**block, "signature": miner.sign(block_signing_hash(block))}


def test_an_admission_taking_a_members_url_is_refused_and_mining_goes_on(keys, founding) -> None:
    chain = chain_of(founding, keys["authority"])
    clash = admission(keys["authority"], keys["newcomer"], PROVIDER, "http://127.0.0.1:5004")
    with pytest.raises(InvalidTransaction, match="with the url http://127.0.0.1:5004 of member"):
        chain.add_transaction(clash)
    assert chain.pending_count == 0
    assert chain.mine_block()["index"] == 2


def test_a_block_holding_a_clashing_admission_is_invalid_with_the_reason(keys, founding) -> None:
    chain = chain_of(founding, keys["patient"])
    clash = admission(keys["authority"], keys["newcomer"], PROVIDER, "http://127.0.0.1:5004")
    outcome, problem = chain.take_block(block_of(keys["authority"], chain.chain[-1], [clash]))
    assert outcome == "invalid" and "with the url http://127.0.0.1:5004 of member" in problem
    assert len(chain) == 1 and chain.mine_block()["index"] == 2


def test_two_pending_admissions_of_one_url_leave_the_second_out_of_the_block(keys, founding) -> None:
    chain = chain_of(founding, keys["authority"])
    first = admission(keys["authority"], keys["newcomer"], PROVIDER, "http://127.0.0.1:5010")
    second = admission(keys["authority"], keys["rotated"], PROVIDER, "http://127.0.0.1:5010")
    chain.add_transaction(first)
    chain.add_transaction(second)  # each is fine against the chain; together they clash
    block = chain.mine_block()
    assert [tx["id"] for tx in block["transactions"]] == [first["id"]]
    assert chain.chain_problem(chain.chain) is None and chain.pending_count == 0


def test_an_admission_replacing_a_member_takes_its_url_and_removes_it(keys, founding) -> None:
    chain = chain_of(founding, keys["authority"])
    old, new = keys["provider"], keys["rotated"]
    chain.add_transaction(admission(keys["authority"], new, PROVIDER, "http://127.0.0.1:5004",
                                    replaces=old.node_id))
    chain.mine_block()
    state = chain.state()
    assert new.node_id in state.members and old.node_id not in state.members and old.node_id in state.removed
    assert state.members.get(new.node_id).url == "http://127.0.0.1:5004"
    late = chain_of(founding, keys["patient"])
    assert late.replace_chain(chain.chain)[0]  # another node takes the same chain
    assert "a removed member" in late.take_block(block_of(old, late.chain[-1], []))[1]
    assert late.take_block(block_of(new, late.chain[-1], []))[0] == "appended"


def test_an_admission_cannot_replace_one_that_is_not_a_member(keys, founding) -> None:
    chain = chain_of(founding, keys["authority"])
    with pytest.raises(InvalidTransaction, match="replacing .*not a member"):
        chain.add_transaction(admission(keys["authority"], keys["rotated"], PROVIDER, "http://127.0.0.1:5004",
                                        replaces=keys["newcomer"].node_id))
    with pytest.raises(InvalidTransaction, match="'replaces' must be the node id"):
        chain.add_transaction(admission(keys["authority"], keys["rotated"], PROVIDER, "http://127.0.0.1:5004",
                                        replaces="someone"))


def test_a_url_freed_by_a_removal_may_be_admitted_after_it(keys, founding) -> None:
    chain = chain_of(founding, keys["authority"])
    chain.add_transaction(removal(keys["authority"], keys["provider"].node_id))
    chain.mine_block()
    chain.add_transaction(admission(keys["authority"], keys["rotated"], PROVIDER, "http://127.0.0.1:5004"))
    chain.mine_block()
    assert keys["rotated"].node_id in chain.state().members
    other = chain_of(founding, keys["patient"])  # a block that frees the url and gives it again, in that order
    freed = block_of(keys["authority"], other.chain[-1], [removal(keys["authority"], keys["provider"].node_id),
                                                          admission(keys["authority"], keys["newcomer"], PROVIDER,
                                                                    "http://127.0.0.1:5004")])
    assert other.take_block(freed) == ("appended", None)


def test_a_node_that_is_not_a_member_refuses_to_mine_and_changes_nothing(keys, founding) -> None:
    chain = chain_of(founding, keys["newcomer"])
    record = signed(keys["patient"], {"user_id": "xxxxx", "ipfs_hash": "QmbWxSqxhZms74885xceSaiHVvdjqiVWrATtYUrrUnVE1K",
                                      "EHR_name": "MRI"})
    chain.add_transaction(record)
    with pytest.raises(NotAMember, match=f"not a member of the network emr-test yet.*{keys['newcomer'].node_id}"):
        chain.mine_block()
    assert len(chain) == 1 and chain.pending == [record]


def test_a_removed_node_refuses_to_mine_and_says_it_was_removed(keys, founding) -> None:
    chain = chain_of(founding, keys["provider"])
    chain.take_block(block_of(keys["authority"], chain.chain[-1], [removal(keys["authority"],
                                                                           keys["provider"].node_id)]))
    assert len(chain) == 2
    with pytest.raises(NotAMember, match="was removed from the network emr-test"):
        chain.mine_block()
    assert len(chain) == 2


def test_an_authority_admits_its_own_new_key_in_place_of_the_old(keys, founding) -> None:
    chain = chain_of(founding, keys["authority"])
    chain.add_transaction(admission(keys["authority"], keys["rotated"], AUTHORITY, "http://127.0.0.1:5003",
                                    replaces=keys["authority"].node_id))
    chain.mine_block()
    assert chain.state().members.get(keys["rotated"].node_id).role == AUTHORITY
    with pytest.raises(NotAMember, match="was removed"):  # the node runs the old key until it restarts
        chain.mine_block()
    restarted = chain_of(founding, keys["rotated"])
    assert restarted.replace_chain(chain.chain)[0] and restarted.mine_block()["miner"] == keys["rotated"].node_id
