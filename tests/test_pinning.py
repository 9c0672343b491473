"""Records kept by the chain (pinning.py): every record a block names is pinned in the node's own daemon, in the
background, with retries; a node that was down catches up; GET /records/<cid> and /health report it.

The Pinner tests use a daemon stand-in (no Kubo, in the fast tier); the last ones use real Kubo daemons."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from blockchain import Blockchain
from conftest import PAPER_HASH, paper_transaction, wait_until
from errors import IpfsRefused, IpfsUnknownCid, IpfsUnreachable
from ipfs_client import IpfsClient
from pinning import Pinner, record_cids
from scripts.cluster import Kubo, free_port, private_network, write_sample_record, write_swarm_key

CIDS = ["QmSKQGGnHKgc53Ri71KFLbkAvEjXD9aZUAJT54DUBs4vjJ", "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn",
        PAPER_HASH, "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o", "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"]


class FakeDaemon:
    """Stands in for Kubo: pins what it is asked to, failing each CID a set number of times first."""

    def __init__(self, pinned: set[str] | None = None, failures: dict[str, int] | None = None,
                 error: Callable[[str], Exception] = lambda cid: IpfsUnknownCid(f"pin of {cid}: not found")) -> None:
        self.pins = set(pinned or ())
        self.failures = dict(failures or {})
        self.error = error
        self.calls: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.down = False
        self.lock = threading.Lock()

    def pin_add(self, cid: str, timeout: float) -> None:
        self.gate.wait(10)
        with self.lock:
            self.calls.append(cid)
            if self.down:
                raise IpfsUnreachable("the IPFS daemon is not reachable")
            if self.failures.get(cid, 0) > 0:
                self.failures[cid] -= 1
                raise self.error(cid)
            self.pins.add(cid)

    def pinned(self) -> set[str]:
        if self.down:
            raise IpfsUnreachable("the IPFS daemon is not reachable")
        return set(self.pins)


def block(index: int, *cids: str, extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"index": index, "timestamp": "2026-01-01 00:00:00.000000", "nonce": 1, "previous_hash": "x",
            "transactions": [paper_transaction(ipfs_hash=cid, id=f"{index:016x}{n:016x}") for n, cid in
                             enumerate(cids)] + (extra or [])}


@pytest.fixture
def make_pinner() -> Any:
    made: list[Pinner] = []

    def make(daemon: FakeDaemon, chain: list[dict[str, Any]] | None = None, **settings: Any) -> Pinner:
        settings = {"first_retry": 0.01, "retry_max": 0.05, **settings}
        pinner = Pinner(daemon, **settings)
        pinner.start(lambda: list(chain or []))
        assert pinner.wait_scanned(5)
        made.append(pinner)
        return pinner

    yield make
    for pinner in made:
        pinner.close()


def settled(pinner: Pinner, **expected: int) -> dict[str, Any]:
    return wait_until(lambda: (lambda s: s if all(s[k] == v for k, v in expected.items()) else None)(
        pinner.summary()), timeout=10)


def test_every_record_of_an_accepted_block_gets_pinned_and_reported(make_pinner) -> None:
    daemon = FakeDaemon()
    pinner = make_pinner(daemon)
    pinner.on_block(block(2, CIDS[0], CIDS[1]))
    pinner.on_block(block(3, CIDS[2]))
    summary = settled(pinner, pinned=3)
    assert summary == {"mode": "all", "known": 3, "pinned": 3, "fetching": 0, "queued": 0, "failed": 0,
                       "skipped": 0, "missing": 0}
    assert daemon.pins == set(CIDS[:3]) and sorted(daemon.calls) == sorted(CIDS[:3])
    status = pinner.status(CIDS[2])
    assert status["state"] == "pinned" and status["block_index"] == 3 and status["attempts"] == 1
    assert status["pinned_at"].endswith("Z") and status["lag_ms"] >= 0 and status["reason"] == ""
    assert pinner.status(CIDS[4]) is None


def test_block_acceptance_never_waits_for_ipfs(make_pinner) -> None:
    """on_block runs under the chain's lock: it must return while every pin is stuck in the daemon."""
    daemon = FakeDaemon()
    daemon.gate.clear()  # every pin_add hangs until released
    pinner = make_pinner(daemon)
    chain = Blockchain(difficulty=1)
    chain.on_block = pinner.on_block
    def record_and_mine() -> None:
        for cid in CIDS:
            chain.add_transaction(paper_transaction(ipfs_hash=cid))
        chain.mine_block()

    mined = threading.Thread(target=record_and_mine)
    mined.start()
    mined.join(5)
    assert not mined.is_alive(), "mining waited for the IPFS daemon"
    assert len(chain) == 2
    assert wait_until(lambda: pinner.summary()["fetching"] == 2)  # two workers, both stuck
    assert pinner.summary()["queued"] == 3
    daemon.gate.set()
    settled(pinner, pinned=5)


def test_a_failed_pin_says_why_and_is_retried_with_back_off_until_it_holds(make_pinner) -> None:
    daemon = FakeDaemon(failures={CIDS[0]: 3})
    pinner = make_pinner(daemon, first_retry=0.2, retry_max=0.4, workers=1)
    pinner.on_block(block(2, CIDS[0]))
    failed = wait_until(lambda: (lambda s: s if s["state"] == "failed" else None)(pinner.status(CIDS[0])))
    assert failed["reason"].startswith("not found in time") and failed["retry_in_ms"] is not None
    assert pinner.summary()["missing"] == 1
    started = time.monotonic()
    settled(pinner, pinned=1)
    # Three failures: waits of about 0.2, 0.4 and 0.4 s (each 75-100% of its back-off) before the fourth try.
    assert time.monotonic() - started >= 0.5
    assert daemon.calls == [CIDS[0]] * 4 and pinner.status(CIDS[0])["attempts"] == 4


def test_a_cid_the_daemon_refuses_is_not_retried(make_pinner) -> None:
    daemon = FakeDaemon(failures={CIDS[0]: 99}, error=lambda cid: IpfsRefused("Kubo refused it: invalid path"))
    pinner = make_pinner(daemon)
    pinner.on_block(block(2, CIDS[0], CIDS[1]))
    settled(pinner, pinned=1, failed=1)
    time.sleep(0.2)
    assert daemon.calls.count(CIDS[0]) == 1
    assert "Kubo refused it" in pinner.status(CIDS[0])["reason"]


def test_a_node_that_was_down_catches_up_on_the_pins_it_missed(make_pinner) -> None:
    """At start the chain is read and Kubo asked what it holds: what is pinned already is not fetched again."""
    chain = [block(1), block(2, CIDS[0], CIDS[1]), block(3, CIDS[2]), block(4, CIDS[3])]
    daemon = FakeDaemon(pinned={CIDS[0], CIDS[2]})
    pinner = make_pinner(daemon, chain)
    settled(pinner, known=4, pinned=4)
    assert sorted(daemon.calls) == sorted([CIDS[1], CIDS[3]])
    assert pinner.status(CIDS[0])["pinned_at"] is None  # found pinned, not pinned now
    assert pinner.status(CIDS[1])["block_index"] == 2


def test_a_daemon_down_at_start_costs_retries_not_records(make_pinner) -> None:
    daemon = FakeDaemon(pinned={CIDS[0]})
    daemon.down = True
    pinner = make_pinner(daemon, [block(1), block(2, CIDS[0], CIDS[1])])
    assert "not reachable" in pinner.scan_error
    wait_until(lambda: pinner.summary()["failed"] == 2)
    assert "IPFS daemon is unreachable" in pinner.status(CIDS[1])["reason"]
    daemon.down = False
    settled(pinner, pinned=2)


def test_pin_records_none_and_openable(make_pinner) -> None:
    nothing = FakeDaemon()
    none = make_pinner(nothing, [block(2, CIDS[0])], mode="none")
    assert none.summary()["skipped"] == 1 and none.summary()["missing"] == 0
    assert "pin_records=none" in none.status(CIDS[0])["reason"]

    allowed = {CIDS[1]}
    daemon = FakeDaemon()
    openable = make_pinner(daemon, mode="openable", may_open=lambda cid: cid in allowed)
    openable.on_block(block(2, CIDS[1], CIDS[2]))
    settled(openable, pinned=1, skipped=1)
    assert daemon.pins == {CIDS[1]} and "may not open" in openable.status(CIDS[2])["reason"]
    allowed.add(CIDS[2])  # a consent grant arrives
    assert openable.reconsider() == 1
    settled(openable, pinned=2)
    assert not nothing.calls


def test_only_transactions_that_record_a_cid_are_pinned() -> None:
    other = {"id": "f" * 32, "kind": "grant", "member": "abcd"}
    assert record_cids(block(2, CIDS[0], CIDS[0], extra=[other, "not a transaction"])) == [CIDS[0]]


def test_a_full_queue_holds_records_back_without_losing_any(make_pinner) -> None:
    daemon = FakeDaemon(failures={cid: 1 for cid in CIDS})
    pinner = make_pinner(daemon, queue_limit=2, workers=1)
    for index, cid in enumerate(CIDS, start=2):
        pinner.on_block(block(index, cid))
    settled(pinner, pinned=len(CIDS))
    assert sorted(set(daemon.calls)) == sorted(CIDS)


def reorganised(pinner: Pinner, ours_records: list[str], theirs_records: list[str],
                 **before: int) -> tuple[Blockchain, Blockchain]:
    """Our chain mines one block per record of `ours_records`, a peer's one per record of `theirs_records` (more
    blocks, so ours gives way); once the Pinner's summary shows `before`, ours takes the peer's. The Pinner
    follows our chain, as a node's does."""
    ours, theirs = Blockchain(difficulty=1), Blockchain(difficulty=1)
    pinner.on_chain = lambda cid: ours.record_for_cid(cid) is not None
    ours.on_block = pinner.on_block
    for cid in ours_records:
        ours.add_transaction(paper_transaction(ipfs_hash=cid))
        ours.mine_block()
    settled(pinner, known=len(ours_records), **before)
    for cid in theirs_records:
        theirs.add_transaction(paper_transaction(ipfs_hash=cid))
        theirs.mine_block()
    replaced, why = ours.replace_chain(theirs.chain)
    assert replaced, why
    return ours, theirs


def test_records_of_blocks_taken_in_a_reorganisation_are_pinned_and_dropped_ones_are_known_again_once_re_mined(
        make_pinner) -> None:
    daemon = FakeDaemon()
    pinner = make_pinner(daemon)
    ours, _ = reorganised(pinner, [CIDS[0]], CIDS[1:3], pinned=1)
    summary = settled(pinner, pinned=2)
    # The dropped block's record is pending again, not on the chain: not known, as GET /records answers 404 for
    # a pending record. Its pin in Kubo stays (the node never unpins).
    assert summary["known"] == 2 and pinner.status(CIDS[0]) is None
    assert {cid: pinner.status(cid)["block_index"] for cid in CIDS[1:3]} == {CIDS[1]: 2, CIDS[2]: 3}
    assert CIDS[0] in daemon.pins and [tx["ipfs_hash"] for tx in ours.pending] == [CIDS[0]]
    ours.mine_block()  # its transaction, mined again: the record is back, at its new block
    settled(pinner, known=3, pinned=3)
    assert pinner.status(CIDS[0])["block_index"] == 4


def test_a_record_no_longer_on_the_chain_is_not_retried(make_pinner) -> None:
    daemon = FakeDaemon(failures={CIDS[0]: 10_000})  # nobody can provide it
    pinner = make_pinner(daemon, first_retry=0.02, retry_max=0.02)
    ours, _ = reorganised(pinner, [CIDS[0]], CIDS[1:3], failed=1)
    settled(pinner, known=2, pinned=2, failed=0, missing=0)
    calls = daemon.calls.count(CIDS[0])
    time.sleep(0.3)  # some fifteen back-offs
    assert daemon.calls.count(CIDS[0]) <= calls + 1  # at most the attempt under way when it left the chain
    assert pinner.status(CIDS[0]) is None and pinner.summary()["known"] == 2


def test_a_reorganisation_right_after_a_restart_forgets_the_records_it_dropped(make_pinner) -> None:
    """A node restarted from --persist reads its chain at start; the first block it then takes may already be
    a reorganisation's."""
    on_chain = {CIDS[0], CIDS[1]}
    pinner = make_pinner(FakeDaemon(), [block(1), block(2, CIDS[0]), block(3, CIDS[1])],
                         on_chain=lambda cid: cid in on_chain)
    settled(pinner, known=2, pinned=2)
    on_chain.discard(CIDS[1])  # a peer's chain replaced our block 3 with one of its own
    on_chain.add(CIDS[2])
    pinner.on_block(block(3, CIDS[2]))
    settled(pinner, known=2, pinned=2)
    assert pinner.status(CIDS[1]) is None and pinner.status(CIDS[2])["block_index"] == 3


def test_a_record_that_stays_on_the_chain_through_a_reorganisation_keeps_its_pin(make_pinner) -> None:
    """The same record in both chains (one transaction, gossiped, mined on both sides): pinned once, never
    forgotten."""
    daemon = FakeDaemon()
    pinner = make_pinner(daemon)
    ours, theirs = Blockchain(difficulty=1), Blockchain(difficulty=1)
    pinner.on_chain = lambda cid: ours.record_for_cid(cid) is not None
    ours.on_block = pinner.on_block
    tx = paper_transaction(ipfs_hash=CIDS[0])
    for chain in (ours, theirs):
        chain.add_transaction(tx)
        chain.mine_block()
    theirs.add_transaction(paper_transaction(ipfs_hash=CIDS[1]))
    theirs.mine_block()
    settled(pinner, pinned=1)
    assert ours.replace_chain(theirs.chain)[0] and ours.chain[1] == theirs.chain[1] != ours.genesis
    settled(pinner, known=2, pinned=2)
    assert daemon.calls.count(CIDS[0]) == 1


# -- the node's endpoints, in-process (no Kubo) ---------------------------------------------------

def test_health_and_records_endpoint_without_a_daemon(client) -> None:
    client.post("/add_transaction", json=paper_transaction())
    assert client.get(f"/records/{PAPER_HASH}").status_code == 404  # pending only: not a record of the chain yet
    client.get("/mine_block")
    health = client.get("/health").get_json()
    assert health["records"] == {"mode": "all", "known": 1, "pinned": 0, "fetching": 0, "queued": 1, "failed": 0,
                                 "skipped": 0, "missing": 1}
    answer = client.get(f"/records/{PAPER_HASH}")
    assert answer.status_code == 200, answer.get_json()
    body = answer.get_json()
    assert body["cid"] == PAPER_HASH and body["on_chain"] and body["pin"]["state"] == "queued"
    assert body["pin"]["block_index"] == 2 and body["ipfs_peer_id"] is None
    assert body["providers"]["routing"].startswith("unknown") and body["providers"]["nodes"] == []
    assert client.get("/records/QmNotACid").status_code == 400
    assert "'cid'" in client.get("/records/QmNotACid").get_json()["error"]
    assert client.get(f"/records/{CIDS[0]}").status_code == 404
    assert client.get(f"/records/{PAPER_HASH}?peers=maybe").status_code == 400


def test_a_record_whose_block_a_reorganisation_dropped_leaves_the_health_count_until_mined_again(
        make_client) -> None:
    ours, theirs = make_client(), make_client()
    ours.post("/add_transaction", json=paper_transaction(ipfs_hash=CIDS[0]))
    ours.get("/mine_block")
    for cid in CIDS[1:3]:
        theirs.post("/add_transaction", json=paper_transaction(ipfs_hash=cid))
        theirs.get("/mine_block")
    assert ours.get("/health").get_json()["records"]["known"] == 1
    replaced, why = ours.node.blockchain.replace_chain(theirs.get("/get_chain").get_json()["chain"])
    assert replaced, why
    health = ours.get("/health").get_json()
    assert health["records"]["known"] == 2 and health["pending"] == 1
    assert ours.get(f"/records/{CIDS[0]}").status_code == 404  # pending again, like any record not yet mined
    ours.get("/mine_block")
    assert ours.get("/health").get_json()["records"]["known"] == 3
    assert ours.get(f"/records/{CIDS[0]}").get_json()["pin"]["block_index"] == 4


def test_pin_settings_are_checked() -> None:
    from config import Config, load_config
    assert load_config(["--pin-records", "openable"], {}).pin_records == "openable"
    assert load_config([], {"EMR_PIN_TIMEOUT": "5"}).pin_timeout == 5.0
    with pytest.raises(ValueError, match="pin_timeout"):
        Config(pin_timeout=0)
    with pytest.raises(SystemExit):
        load_config(["--pin-records", "some"], {})


# -- real Kubo daemons --------------------------------------------------------------------------

def test_the_ipfs_adapter_pins_lists_and_times_out(kubo: Kubo, tmp_path: Path) -> None:
    client = IpfsClient(kubo.api_url, lookup_timeout=1)
    (tmp_path / "r.bin").write_bytes(os.urandom(5000))
    cid = kubo.ipfs("add", "-Q", "--pin=false", str(tmp_path / "r.bin")).strip()
    assert cid not in client.pinned()
    client.pin_add(cid, timeout=5)
    assert cid in client.pinned()
    started = time.monotonic()
    with pytest.raises(IpfsUnknownCid, match="within 1s"):
        client.pin_add(PAPER_HASH, timeout=1)  # nobody on this machine has the paper's file
    assert time.monotonic() - started < 5
    assert client.find_providers(cid) == []  # routing is off: "unknown", not "nobody"
    assert client.swarm_peers() == []


def test_a_record_added_on_one_daemon_is_pinned_by_a_node_on_another_and_outlives_it(make_client,
                                                                                     tmp_path: Path) -> None:
    """Two daemons in a private network over loopback: a node on the second pins a record the first holds,
    and serves it after the first is gone."""
    ports = [(free_port(), free_port(), free_port()) for _ in range(2)]
    daemons = private_network([tmp_path / "a", tmp_path / "b"], ports, write_swarm_key(tmp_path / "swarm.key"))
    try:
        origin, own = daemons
        data = os.urandom(300_000)
        (tmp_path / "MRI.pdf.aes").write_bytes(data)
        cid = origin.ipfs("add", "-Q", str(tmp_path / "MRI.pdf.aes")).strip()
        client = make_client(ipfs_api=own.api_url, ipfs_lookup_timeout=2.0)
        client.node.start()
        client.post("/add_transaction", json=paper_transaction(ipfs_hash=cid, file_name="MRI.pdf.aes"))
        client.get("/mine_block")
        status = wait_until(lambda: (lambda b: b if b["pin"]["state"] == "pinned" else None)(
            client.get(f"/records/{cid}").get_json()), timeout=30)
        assert status["ipfs_peer_id"] == own.peer_id() and status["providers"]["pinned_copies"] == 1
        assert status["pin"]["lag_ms"] < 30_000
        assert client.get("/health").get_json()["records"]["pinned"] == 1
        origin.stop()
        fetched = client.post("/get_file", json={"ipfs_hash": cid})
        assert fetched.status_code == 200, fetched.get_json()
        assert (client.node.data_dir / fetched.get_json()["path"]).read_bytes() == data
    finally:
        for daemon in daemons:
            daemon.stop()


def test_on_a_signed_network_openable_pins_a_record_only_once_a_grant_lets_the_node_open_it(
        signed_network, tmp_path: Path) -> None:
    """pin_records=openable on a signed network: a provider with its own Kubo does not keep a record it has no
    grant for; the block that grants it one makes its node pin it, and it opens the record after the patient's
    daemon is gone."""
    ports = [(free_port(), free_port(), free_port()) for _ in range(2)]
    daemons = private_network([tmp_path / "a", tmp_path / "b"], ports, write_swarm_key(tmp_path / "swarm.key"))
    try:
        patients, own = daemons
        patient, provider = signed_network(("patient", "healthcare_provider"), ipfs_api=patients.api_url,
                                           pin_records="openable", ipfs_lookup_timeout=5.0)
        provider.stop()  # the provider's node runs on a daemon of its own
        provider.args[provider.args.index("--ipfs-api") + 1] = own.api_url
        provider.start()
        assert patient.post("/connect_node", {"nodes": [provider.url]}).status_code == 201
        wait_until(lambda: len(provider.get("/health").json()["peers"]) == 1)
        patient_dir = Path(patient.args[patient.args.index("--data-dir") + 1])
        write_sample_record(patient_dir / "MRI.pdf")
        published = patient.post("/publish_record", {"file_path": "MRI.pdf", "EHR_name": "MRI", "user_id": "xxxxx"})
        assert published.status_code == 201, published.text
        cid = published.json()["IPFS Hash"]["Hash"]
        assert patient.get("/mine_block").status_code == 200

        def pin_state(state: str) -> dict[str, Any] | None:
            answer = provider.get(f"/records/{cid}?peers=false")
            return answer.json() if answer.status_code == 200 and answer.json()["pin"]["state"] == state else None

        skipped = wait_until(lambda: pin_state("skipped"), timeout=15)["pin"]
        assert "may not open" in skipped["reason"] and skipped["attempts"] == 0
        time.sleep(1)  # had it been queued, a pin of a file this small would be done by now
        assert cid not in own.rpc("pin/ls", type="recursive")["Keys"]
        assert provider.get("/health").json()["records"]["skipped"] == 1

        member = provider.get("/identity").json()["node_id"]
        granted = patient.post("/grant", {"record": cid, "member": member, "purpose": "follow-up"})
        assert granted.status_code == 201, granted.text
        assert patient.get("/mine_block").status_code == 200
        pinned = wait_until(lambda: pin_state("pinned"), timeout=30)["pin"]
        assert pinned["attempts"] == 1 and cid in own.rpc("pin/ls", type="recursive")["Keys"]
        assert provider.get("/health").json()["records"]["pinned"] == 1

        patients.stop()  # the copy its node pinned is what the provider opens
        opened = provider.post("/open_record", {"record": "MRI", "purpose": "follow-up"})
        assert opened.status_code == 200, opened.text
        provider_dir = Path(provider.args[provider.args.index("--data-dir") + 1])
        assert (provider_dir / opened.json()["path"]).read_bytes() == (patient_dir / "MRI.pdf").read_bytes()
    finally:
        for daemon in daemons:
            daemon.stop()
