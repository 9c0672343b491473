"""One emr-chain node: its chain, its peers, its IPFS daemon and its data directory.

`Node` is the only door into a node. The Flask routes in app.py each call one
public method here and shape its answer; a notebook or a test can call the same
methods. Nothing here knows HTTP: failures are the errors of errors.py.
"""
from __future__ import annotations

import functools
import heapq
import json
import logging
import os
import queue
import re
import tempfile
import threading
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

import crypto
import fhir_r4 as fhir
from blockchain import (MAX_TEXT_LENGTH, TIMESTAMP, TIMESTAMP_FORMAT, TRANSACTION_ID, Block, Blockchain, Receipt,
                        Transaction, check_transaction, hash_block, is_cid)
from config import Config
from errors import (BadInput, Busy, Conflict, Forbidden, InvalidIdentity, IpfsError, KeyUnwrapError, NodeError,
                    NotAMember, NotFound, PathRefused, PeerError, PeerRefused, StateDamaged)
from identity import NODE_ID, Identity, PublicIdentity, describe, load_or_create, short_id
from keywrap import (BREAK_GLASS_PURPOSE, RECORD_KEY_PURPOSE, new_record_key, record_key_bytes, record_key_text,
                     unwrap_key, wrap_key)
from ledger import (ACCESS, ADMIT, GRANT, KEYS, NETWORK_RULES, OPENED, REFUSED, REMOVE, REPLACES, REVOKE, Access,
                    LedgerState, SignedRules)
from members import Member, Members, load_members
from ipfs_client import IpfsClient
from mining import Miner
from network import NODE_HEADER, Network, peer_netloc
from openapi import VERSION as API_VERSION
from pinning import Pinner
from policy import Action, may
from storage import MAX_NAME_BYTES, confine_path, safe_file_name, written_atomically
from store import LEGACY_STATE_FILE, STORE_FILE, Store, legacy_state_file, migrate_legacy_state

__all__ = ["NODE_HEADER", "Node"]

log = logging.getLogger("emr.node")

UPLOADS_FOLDER = "uploads"
IDENTITY_FILE = "identity.json"
SIGNED = "signed"
IDENTITY_EXTRAS = ("security", "network")  # what identity_info adds to a member's description
ALL_VERSIONS, NEWEST_VERSION = "all", "newest"
AUDIT_LIMIT = 100
MAX_AUDIT_LIMIT = 1000
SOLO_NETWORK = "solo"  # a signed node started without a members file founds a network of one: solo-<its id>
SOLO_NAME_CHARACTERS = 8
IMPORTED_SUFFIX = ".imported"
PRIVATE_FOLDER_MODE = 0o700
SIZE_CACHE_ENTRIES = 100_000
MAX_GOSSIP_BATCH = 1000
CONNECT_EXAMPLE = '["http://127.0.0.1:5003"]'
BLOCK_INDEX = re.compile(r"[0-9]{1,18}")
PUBLISH_CHUNK_BYTES = 1024 * 1024
PLACEHOLDER_CID = "QmbWxSqxhZms74885xceSaiHVvdjqiVWrATtYUrrUnVE1K"  # checks a record's other fields before it has one


@dataclass
class NamedUpload:
    """A file object ipfshttpclient adds under `name` (it takes the basename of `.name`)."""

    stream: IO[bytes]
    name: str

    def read(self, size: int = -1) -> bytes:
        return self.stream.read(size)


def network_fingerprint(config: Config, rules: SignedRules | None = None) -> dict[str, str]:
    """The settings a saved chain belongs to: a store made under others is refused."""
    fingerprint = {"genesis_timestamp": config.genesis_timestamp, "difficulty": str(config.difficulty),
                   "pow_mode": config.pow_mode, "security": config.security}
    if rules:
        fingerprint["members"] = rules.founding.fingerprint
    return fingerprint


def node_identity(config: Config) -> Identity:
    """This node's identity, made at its first start and kept (0600) in its own folder."""
    return load_or_create(config.state_path / IDENTITY_FILE, config.identity_passphrase or None)


def founding_members(config: Config, identity: Identity) -> Members:
    """The founding members of this node's signed network: the shared members file, or this node alone.

    A node the file does not list starts too, with the same file (it is the network's founding, and changing it
    would make another network): it is admitted later by a signed transaction, and writes nothing until its chain
    holds that admission (Node.identity_info and its log say so)."""
    own = Member(identity.public(), config.role_name, config.own_url)
    if not config.members_file:
        return Members(f"{SOLO_NETWORK}-{identity.node_id[:SOLO_NAME_CHARACTERS]}", [own])
    members = load_members(config.members_file)
    listed = members.get(identity.node_id)
    if listed is not None and listed.role != config.role_name:
        raise StateDamaged(f"{config.members_file} lists this node ({identity.short_id}) as a {listed.role}, but it "
                           f"is started as a {config.role_name}")
    rules = {name: members.settings[name] for name in NETWORK_RULES if name in members.settings}
    problems = members.settings_problems({"security": config.security, "pow_mode": config.pow_mode,
                                         "difficulty": config.difficulty, **rules})
    if problems:
        raise StateDamaged(f"{config.members_file} sets the network's settings otherwise: {'; '.join(problems)}")
    return members


def show_identity(config: Config) -> str:
    """`python app.py identity`: this node's identity as GET /identity gives it (made now if it has none)."""
    config.state_path.mkdir(parents=True, exist_ok=True)
    return json.dumps(describe(node_identity(config), config.role_name, config.own_url), indent=1)


def migrate_state(config: Config) -> str:
    """Import the state.json an older --persist wrote into the node's store, and move the file aside."""
    legacy = legacy_state_file(config.data_path)
    if legacy is None:
        raise NotFound(f"there is no {LEGACY_STATE_FILE} to import in {config.data_path}")
    config.state_path.mkdir(parents=True, exist_ok=True)
    store_path = config.state_path / STORE_FILE
    blocks = migrate_legacy_state(legacy, store_path, network_fingerprint(config))
    legacy.rename(legacy.with_name(legacy.name + IMPORTED_SUFFIX))
    return f"imported {blocks} blocks from {legacy} into {store_path}; the old file is now {legacy.name}{IMPORTED_SUFFIX}"


class Node:
    def __init__(self, config: Config, ipfs: IpfsClient | None = None) -> None:
        self.config = config
        self.data_dir = config.data_path
        self.downloads = config.downloads_path
        self.state_dir = config.state_path
        self.uploads = self.state_dir / UPLOADS_FOLDER
        for folder in (self.data_dir, self.downloads, self.state_dir, self.uploads):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a file where the folder should be, or no permission
                raise StateDamaged(f"{folder} cannot be this node's folder ({exc.strerror}). Nothing was changed: "
                                   f"move what is in the way aside, or give the node another data directory.") \
                    from None
        self.state_dir.chmod(PRIVATE_FOLDER_MODE)
        self.identity = node_identity(config)
        self.miner = Miner(config.mining_workers or os.cpu_count() or 1)
        self.rules = SignedRules(founding_members(config, self.identity), self.identity, self.miner.executor) \
            if config.security == SIGNED else None
        self.blockchain = Blockchain(config.difficulty, config.genesis_timestamp, config.pow_mode,
                                     self.miner.proof_of_work, finality_depth=config.finality_depth,
                                     max_pending=config.max_pending, rules=self.rules)
        self.network = Network(self.blockchain, config)
        if self.rules:
            self.network.vet_peer = self._vet_peer
        self.ipfs = ipfs or IpfsClient(config.ipfs_api, config.ipfs_timeout, config.ipfs_lookup_timeout)
        self._sizes: dict[str, str] = {}
        self._document: tuple[tuple[int, str] | None, bytes] = (None, b"")
        self._document_lock = threading.Lock()
        self.pinner = Pinner(self.ipfs, config.pin_records, self.may_open, timeout=config.pin_timeout,
                             workers=config.pin_workers, retry_max=config.pin_retry_max,
                             on_chain=lambda cid: self.blockchain.record_for_cid(cid) is not None)
        self._member = False  # (signed) whether this node is a member after our last block: logged as it changes
        self.blockchain.on_block = self._on_block
        self.store: Store | None = None
        if config.persist:
            self._restore()
        if self.rules:
            self._member = self.identity.node_id in self.blockchain.state().members
            if not self._member:
                log.warning("%s", self.rules.standing(self.blockchain.state())["message"])

    # -- the chain -----------------------------------------------------------

    def chain(self) -> list[Block]:
        return self.blockchain.chain

    def chain_document(self) -> bytes:
        """{"chain": ..., "length": ...} as JSON text (sorted keys, compact, as Flask writes it), made once per
        state of the chain: many clients asking for a long chain at once share one copy instead of one each."""
        chain = self.blockchain.chain
        key = (len(chain), hash_block(chain[-1]))
        with self._document_lock:
            if self._document[0] != key:
                self._document = (key, (json.dumps({"chain": chain, "length": len(chain)}, sort_keys=True,
                                                   separators=(",", ":")) + "\n").encode())
            return self._document[1]

    def chain_problem(self) -> str | None:
        """Why this node's own chain is not valid, or None if it is."""
        return self.blockchain.chain_problem(self.blockchain.chain)

    def add_transaction(self, fields: Any) -> Receipt:
        """Record a transaction a client sent; it is gossiped to every peer. On a signed network this node
        signs it: the record's owner is the member that signed it, `user_id` a label inside it."""
        if self.rules:
            tx = check_transaction(fields)
            self._require_standing(Action.RECORD, "record a transaction")
            tx.setdefault("id", uuid.uuid4().hex)
            return self.network.add_transaction(self.rules.sign_transaction(tx))
        return self.network.add_transaction(fields)

    def receive_transaction(self, tx: Any, from_node: str | None = None) -> Receipt:
        """A transaction a peer gossiped (it carries the id its first node gave it)."""
        if not isinstance(tx, dict) or "id" not in tx:
            raise BadInput("'id' is required on a transaction from another node")
        return self.network.add_transaction(tx, sender=self.network.sender_netloc(from_node))

    def receive_transactions(self, body: Any, from_node: str | None = None) -> dict[str, Any]:
        """A batch of transactions a peer gossiped: each is taken or refused on its own."""
        batch = body.get("transactions") if isinstance(body, dict) else None
        if not isinstance(batch, list) or not 0 < len(batch) <= MAX_GOSSIP_BATCH or \
                not all(isinstance(tx, dict) for tx in batch):
            raise BadInput(f"'transactions' must be a list of 1 to {MAX_GOSSIP_BATCH} transaction objects")
        sender, counts, refused = self.network.sender_netloc(from_node), {"new": 0, "known": 0}, []
        for tx in batch:
            try:
                if "id" not in tx:
                    raise BadInput("'id' is required on a transaction from another node")
                counts["new" if self.network.add_transaction(tx, sender=sender).new else "known"] += 1
            except BadInput as exc:
                refused.append({"id": tx.get("id"), "error": str(exc)})
        return {**counts, "refused": refused}

    def mine_block(self) -> Block:
        return self.network.mine_block()

    def blocks(self, from_index: Any) -> dict[str, Any]:
        """A page of our blocks from `from_index` on (about sync_page_bytes of them), for a peer's sync."""
        if isinstance(from_index, str) and BLOCK_INDEX.fullmatch(from_index):
            from_index = int(from_index)
        if type(from_index) is not int or from_index < 1:
            raise BadInput("'from' must be a block index: a whole number from 1")
        return {"from": from_index, "length": len(self.blockchain),
                "blocks": self.blockchain.blocks_from(from_index, self.config.sync_page_bytes)}

    def receive_block(self, block: Any, from_node: str | None = None) -> str:
        """A block a peer mined: "appended", "known" or "behind" (then we sync with that peer)."""
        return self.network.receive_block(block, self.network.sender_netloc(from_node))

    # -- peers ---------------------------------------------------------------

    def connect(self, urls: Any, from_node: str | None = None) -> tuple[list[str], list[str]]:
        """Add peers: (every peer, ignored entries). A node announcing itself is not told back."""
        if not isinstance(urls, list) or not urls:
            raise BadInput(f"'nodes' must be a non-empty list of node URLs, e.g. {CONNECT_EXAMPLE}")
        return self.network.connect(urls, announce=self.network.sender_netloc(from_node) is None)

    def _vet_peer(self, base_url: str) -> None:
        """On a signed network, a peer must be a member: ask it who it is, check the answer against the chain.

        One our chain does not know may have been admitted in blocks we do not hold yet (this node is new, or
        was down): its chain is taken first if it is valid and preferred, as any peer's would be, and the
        peer judged again."""
        try:
            answer, _ = self.network.client.get_json(base_url + "/identity")
            claimed = PublicIdentity.from_dict(answer)
        except (PeerError, InvalidIdentity) as exc:
            raise PeerRefused(f"{base_url} did not say who it is ({exc}); on a signed network a peer must be a "
                              f"member") from None
        state = self.blockchain.state()
        member = state.members.get(claimed.node_id)
        if member is None and claimed.node_id not in state.removed:
            self.network.sync_with_url(base_url)
            state = self.blockchain.state()
            member = state.members.get(claimed.node_id)
        if member is None or member.identity != claimed:
            why = "a removed member" if claimed.node_id in state.removed else "not a member of this network"
            raise PeerRefused(f"{base_url} is {claimed.short_id}, {why} ({state.members.network}); a healthcare "
                              f"authority admits members with /admit_member")

    # -- membership (signed networks) --------------------------------------------

    def identity_info(self) -> dict[str, Any]:
        """Who this node is: its id (and a short form to read aloud), role, URL and public keys, and its network."""
        info = {**describe(self.identity, self.config.role_name, self.config.own_url),
                "security": self.config.security}
        if self.rules:
            info["network"] = {"name": self.rules.founding.network, "fingerprint": self.rules.founding.fingerprint,
                               **self.rules.standing(self.blockchain.state())}
        return info

    def members(self) -> dict[str, Any]:
        """The network's members now (after our last block), and the ids removed so far."""
        state = self._signed_state()
        return {"network": state.members.network, "founding_fingerprint": self.rules.founding.fingerprint,
                "members": [{**member.to_dict(), "short_id": member.short_id} for member in state.members],
                "removed": sorted(state.removed)}

    def admit_member(self, member: Any, replaces: Any = None) -> Receipt:
        """A transaction admitting a member (as GET /identity describes it), signed by this node. `replaces`: the
        node id of a member it replaces (the same node with a rotated key), removed by the same transaction, so
        the new one may take its URL and exchange key."""
        self._signed_state()
        if isinstance(member, dict):  # GET /identity's answer as it is: what it says of its network is not the member
            member = {key: value for key, value in member.items() if key not in IDENTITY_EXTRAS}
        try:
            entry = Member.from_dict(member).to_dict()
        except InvalidIdentity as exc:
            raise BadInput(f"'member': {exc}") from None
        if replaces is not None and not (isinstance(replaces, str) and NODE_ID.fullmatch(replaces)):
            raise BadInput(f"'{REPLACES}' must be the node id of the member the new one replaces (52 characters of "
                           f"lowercase base32), or left out")
        return self._membership_change({"type": ADMIT, "member": entry,
                                        **({REPLACES: replaces} if replaces is not None else {})})

    def remove_member(self, node_id: Any) -> Receipt:
        """A transaction removing a member, signed by this node. What it wrote before stays valid."""
        self._signed_state()
        if not isinstance(node_id, str) or not NODE_ID.fullmatch(node_id):
            raise BadInput("'node_id' must be a member's node id: 52 characters of lowercase base32")
        return self._membership_change({"type": REMOVE, "node_id": node_id})

    def _membership_change(self, fields: dict[str, Any]) -> Receipt:
        if not may(self.config.role_name, Action.ADMIT):
            raise Forbidden(f"a {self.config.role_name} node may not change the members: only a healthcare "
                            f"authority may")
        self._require_standing(Action.ADMIT, "change the members")
        return self.network.add_transaction(self.rules.sign_transaction({**fields, "id": uuid.uuid4().hex}))

    def _signed_state(self) -> LedgerState:
        if not self.rules:
            raise NotFound("this node runs the paper's open network (--security paper): it has no members")
        return self.blockchain.state()

    def _require_standing(self, action: Action, what: str) -> LedgerState:
        """The state now, if this node may sign `what` in it; NotAMember saying why not (not admitted yet,
        removed) and what to ask for, before anything is signed, sent or stored."""
        state = self._signed_state()
        problem = self.rules.own_problem(state, action, what)
        if problem:
            raise NotAMember(problem)
        return state

    def remove_peers(self, urls: Any) -> tuple[list[str], list[str]]:
        """Forget peers: (peers left, entries that were not peers)."""
        if not isinstance(urls, list) or not urls:
            raise BadInput(f"'nodes' must be a non-empty list of node URLs, e.g. {CONNECT_EXAMPLE}")
        return self.network.remove(urls)

    def peers(self) -> list[dict[str, Any]]:
        """Every peer with how it behaved lately: faults in a row, the last error, the length it had."""
        return self.network.describe_peers()

    def sync(self) -> tuple[bool, list[Block], dict[str, str]]:
        """Adopt the best valid chain among the peers: (replaced, our chain now, a verdict per peer)."""
        replaced, report = self.network.sync()
        return replaced, self.blockchain.chain, report

    def health(self) -> dict[str, Any]:
        report = {"status": "ok", "port": self.config.port, "role": self.config.role_name,
                  "length": len(self.blockchain), "pending": self.blockchain.pending_count,
                  "peers": self.network.peers, "ipfs_api": self.config.ipfs_api, "records": self.pinner.summary()}
        if self.rules:
            report["membership"] = self.rules.standing(self.blockchain.state())
        return report

    # -- records kept by the chain (pinning.py) ------------------------------

    def may_open(self, cid: str) -> bool:
        """Whether this node may open the record `cid` now (pin_records=openable pins only those): on the
        paper's network every record; on a signed one its own records, those a valid grant to it covers, and
        those it holds a break-glass key to."""
        if not self.rules:
            return True
        found = self.rules.index.records.get(cid)
        if found is None:
            return False
        me, record = self.identity.node_id, found[1]
        if me in record.get(KEYS, {}):
            return True
        index = self.rules.index
        return any(grant_id not in index.revoked and not (index.grants[grant_id][1]["expires"]
                                                          and index.grants[grant_id][1]["expires"] < _now())
                   for grant_id in index.grants_for.get((me, cid), []))

    def _on_block(self, block: Block) -> None:
        """Each block that joins the chain: its records are queued for pinning, and a grant to this node makes
        the records it skipped (pin_records=openable) worth another look."""
        self.pinner.on_block(block)
        if not self.rules:
            return
        if any(tx.get("type") == GRANT and tx.get("grantee") == self.identity.node_id
               for tx in block["transactions"]):
            self.pinner.reconsider()
        state = self.blockchain.state()
        member = self.identity.node_id in state.members
        if member != self._member:
            self._member = member
            if member:  # the peers that refused this node as an outsider take it now
                log.warning("this node (%s) is now %s, admitted in block %d: it may write", self.identity.short_id,
                            self.rules.standing(state)["message"], block["index"])
                self.network.announce()
            else:
                log.warning("block %d: %s", block["index"], self.rules.standing(state)["message"])

    def record_status(self, cid: Any, ask_peers: Any = True) -> dict[str, Any]:
        """Where a record of the chain is held: this node's own copy (pinned, fetching, failed and why) and which
        IPFS peers provide it, from the daemon's content routing and, since routing is off in a private network,
        from the peers' own answers (`ask_peers`)."""
        cid = _checked_cid(cid, "cid")
        if isinstance(ask_peers, str):
            if ask_peers.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise BadInput("'peers' must be true or false")
            ask_peers = ask_peers.lower() in ("true", "1", "yes")
        record = self.blockchain.record_for_cid(cid)
        pin = self.pinner.status(cid)
        if record is None and pin is None:
            raise NotFound(f"no record with the IPFS hash {cid} on this node's chain (pending transactions are "
                           f"not pinned until mined)")
        try:
            own_id: str | None = self.ipfs.peer_id()
            swarm = set(self.ipfs.swarm_peers())
            routing: list[str] | str = self.ipfs.find_providers(cid) or "unknown"
        except IpfsError as exc:
            own_id, swarm, routing = None, set(), f"unknown: {exc}"
        nodes = self._peer_copies(cid, swarm) if ask_peers else []
        holders = sorted({entry["ipfs_peer_id"] for entry in nodes if entry["state"] == "pinned"
                          and entry.get("ipfs_peer_id")} | ({own_id} if own_id and pin and pin["state"] == "pinned"
                                                             else set()))
        return {"cid": cid, "on_chain": record is not None, "file_name": record.get("file_name") if record else None,
                "mode": self.pinner.mode, "pin": pin, "ipfs_peer_id": own_id,
                "providers": {"routing": routing, "nodes": nodes, "pinned_copies": len(holders), "peer_ids": holders}}

    def _peer_copies(self, cid: str, swarm: set[str]) -> list[dict[str, Any]]:
        """Each peer node's own answer for the record, asked at once, each within the peer timeout."""
        urls = self.network.peer_urls

        def ask(url: str) -> dict[str, Any]:
            try:
                answer, _ = self.network.client.get_json(f"{url}/records/{cid}?peers=false")
                pin = answer.get("pin") or {}
                peer_id = answer.get("ipfs_peer_id")
                return {"node": url, "state": str(pin.get("state") or "unknown"), "ipfs_peer_id": peer_id,
                        "connected": peer_id in swarm, "pinned_at": pin.get("pinned_at")}
            except (NodeError, AttributeError) as exc:
                return {"node": url, "state": "unknown", "ipfs_peer_id": None, "connected": False,
                        "pinned_at": None, "error": str(exc)}

        if not urls:
            return []
        with ThreadPoolExecutor(max_workers=min(8, len(urls)), thread_name_prefix="records") as pool:
            return list(pool.map(ask, urls))

    # -- the web page's needs (app.py serves static/) --------------------------

    def user_file(self, path: Any) -> tuple[str, int, IO[bytes]]:
        """(name, size, the open file) of a file of the data directory, for a browser to download: a decrypted
        record in downloads/, say. Never the node's own folder (its store, identity and spooled uploads)."""
        target = self._user_path(path, "path")
        if not target.is_file():
            raise NotFound(f"no file at '{path}' in the node's data directory")
        stream = open(target, "rb")
        return target.name, os.fstat(stream.fileno()).st_size, stream

    def network_view(self) -> dict[str, Any]:
        """This node and each peer: who it says it is (role, id), its chain length now and how far behind the
        longest it is, asked of every peer at once within the peer timeout. A peer's answers are its own claims;
        on a signed network `member` says whether its id is a member's."""
        state = self.blockchain.state() if self.rules else None
        me = {"url": self.config.own_url, "self": True, "reachable": True, "role": self.config.role_name,
              "node_id": self.identity.node_id, "short_id": self.identity.short_id, "length": len(self.blockchain),
              "pending": self.blockchain.pending_count, "faults": 0, "error": "",
              "member": (self.identity.node_id in state.members) if state else None}

        def ask(peer: dict[str, Any]) -> dict[str, Any]:
            entry = {"url": peer["url"], "self": False, "reachable": False, "role": None, "node_id": None,
                     "short_id": None, "length": peer.get("length"), "pending": None, "faults": peer["faults"],
                     "error": peer.get("last_error") or "", "member": None}
            try:
                identity, _ = self.network.client.get_json(peer["url"] + "/identity")
                health, _ = self.network.client.get_json(peer["url"] + "/health")
                node_id = identity.get("node_id")
                entry.update(reachable=True, error="", role=str(identity.get("role")),
                             node_id=node_id if isinstance(node_id, str) else None,
                             short_id=str(identity.get("short_id") or ""),
                             length=int(health["length"]), pending=int(health.get("pending", 0)))
                if state is not None:
                    entry["member"] = node_id in state.members
            except (NodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
                entry["error"] = str(exc) or type(exc).__name__
            return entry

        known = self.network.describe_peers()
        if known:
            with ThreadPoolExecutor(max_workers=min(8, len(known)), thread_name_prefix="network-view") as pool:
                peers = list(pool.map(ask, known))
        else:
            peers = []
        longest = max([me["length"], *(peer["length"] for peer in peers if isinstance(peer["length"], int))])
        for entry in [me, *peers]:
            entry["behind"] = longest - entry["length"] if isinstance(entry["length"], int) else None
        return {"longest": longest, "nodes": [me, *peers]}

    # -- FHIR (fhir_r4.py: read-only views of the chain) -----------------------

    def fhir_metadata(self, base: str) -> dict[str, Any]:
        return fhir.capability_statement(base, self.rules is not None, API_VERSION, self.config.role_name)

    def fhir_search(self, resource_type: str, params: Iterable[tuple[str, str]], base: str,
                    query: str = "") -> dict[str, Any]:
        return fhir.search(resource_type, params, self._fhir_sources(), base, query)

    def fhir_read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        return fhir.read(resource_type, resource_id, self._fhir_sources())

    def _fhir_sources(self) -> fhir.Sources:
        return fhir.Sources(records=self._fhir_records, accesses=self._fhir_accesses, grants=self._fhir_grants,
                            signed=self.rules is not None)

    def _member_label(self, node_id: str, state: LedgerState | None = None) -> str:
        state = state or self.blockchain.state()
        member = state.members.get(node_id)
        return f"{member.role} {member.short_id}" if member else f"former member {short_id(node_id)}"

    def _fhir_records(self) -> list[fhir.Record]:
        """Every record version on the chain, oldest first; the newest of each user_id and EHR_name is current."""
        found, previous = [], {}
        for block in self.blockchain.chain[1:]:
            for position, tx in enumerate(block["transactions"]):
                if not ("ipfs_hash" in tx and "EHR_name" in tx and "user_id" in tx and tx.get("id")):
                    continue
                key = (tx["user_id"], str(tx["EHR_name"]).lower())
                found.append((block, position, tx, previous.get(key)))
                previous[key] = tx["id"]
        newest = set(previous.values())
        state = self.blockchain.state() if self.rules else None
        return [fhir.Record(tx, block["index"], position, block["timestamp"], tx["id"] in newest, before,
                            self._member_label(tx["signer"], state) if state and tx.get("signer") else None)
                for block, position, tx, before in found]

    def _fhir_accesses(self) -> list[fhir.Access]:
        index, state = self.rules.index, self.blockchain.state()
        observer = (self.identity.node_id, self._member_label(self.identity.node_id, state))
        entries = sorted((entry for accesses in index.accesses.values() for entry in accesses),
                         key=lambda entry: entry[0])
        return [fhir.Access(entry[1]["id"], self._describe_access(entry),
                            index.records[entry[1]["record"]][1].get("id"),
                            self._member_label(entry[1]["signer"], state), observer) for entry in entries]

    def _fhir_grants(self) -> list[fhir.Grant]:
        index, state, chain = self.rules.index, self.blockchain.state(), self.blockchain.chain
        grants = []
        for grant_id, (block, tx) in sorted(index.grants.items(), key=lambda item: item[1][0]):
            status = self._grant_status(grant_id)
            records = [index.records[cid][1] for cid in status["records"] if cid in index.records]
            revoked = status["revoked_in_block"]
            grants.append(fhir.Grant(status, chain[block - 1]["timestamp"],
                                     chain[revoked - 1]["timestamp"] if revoked and revoked <= len(chain) else None,
                                     [record["user_id"] for record in records], [record["id"] for record in records],
                                     self._member_label(status["owner"], state),
                                     self._member_label(status["grantee"], state)))
        return grants

    # -- life cycle ----------------------------------------------------------

    def start(self) -> None:
        """Connect to the configured peers, keep syncing, and start the mining processes in the background."""
        self.pinner.start(lambda: self.blockchain.chain)  # before the first sync, so no block is missed
        self.network.start()
        threading.Thread(target=self.miner.warm_up, name="mining-warm-up", daemon=True).start()

    def close(self) -> None:
        self.pinner.close()
        self.network.stop()
        self.miner.close()
        if self.store is not None:
            self.store.close()

    # -- persistence ---------------------------------------------------------

    def _restore(self) -> None:
        """Open the store (creating it on the first start), load and check what it holds, and journal every
        later change to it before the change is made."""
        legacy = legacy_state_file(self.data_dir)
        store_path = self.state_dir / STORE_FILE
        if legacy and not store_path.exists():
            raise StateDamaged(
                f"{legacy} holds state in an older format. Nothing was changed. Import it with "
                f"'python app.py migrate-state --data-dir {self.config.data_dir or self.data_dir}' (the same "
                f"network settings as this node), or move it aside to start with an empty chain.")
        self.store = Store(store_path, network_fingerprint(self.config, self.rules))
        saved = self.store.load()
        try:
            if saved.chain:
                self.blockchain.restore(saved.chain, saved.pending)
            else:
                self.store.append_block(self.blockchain.chain[0])
            peers = [peer_netloc(url, self.network.allowed)[1] for url in saved.peers]
        except (ValueError, NodeError) as exc:
            self.store.close()
            raise StateDamaged(
                f"the saved state {store_path} cannot be used ({type(exc).__name__}: {exc}). It may be damaged, "
                f"or from a network with other settings (genesis, difficulty, proof of work). Nothing was changed: "
                f"move the file aside to start with an empty chain, or restore it from a backup.") from None
        self.blockchain.journal = self.store
        self.network.on_peers_change = lambda: self.store.set_peers(self.network.peer_urls)
        if peers:
            self.network.connect(peers, announce=False)
        log.info("restored a chain of %d blocks, %d pending transactions and %d peers from %s",
                 len(self.blockchain), self.blockchain.pending_count, len(peers), store_path)

    # -- consent (signed networks) ----------------------------------------------

    def publish_record(self, file_path: Any, ehr_name: Any, user_id: Any, password: Any = None) -> dict[str, Any]:
        """Encrypt a file of the data directory, add it to IPFS and record it, in one call.

        On a signed network the key is a fresh random one, wrapped for this node (its owner) and the network's
        emergency members, never stored or sent in the clear; on the paper's network it is the `password` the
        patient shares. The .aes file opens in any AES Crypt tool for whoever is given the key."""
        self._publish_checks(ehr_name, user_id, password)
        source = self._existing(file_path)
        return self._publish(source, source.name, ehr_name, user_id, password)

    def publish_upload(self, stream: IO[bytes], filename: str, ehr_name: Any, user_id: Any,
                       password: Any = None) -> dict[str, Any]:
        """publish_record for a file sent in the request (a browser's upload): its plaintext is spooled into this
        node's private folder (owner-only, under the state directory no request can name) and deleted when done,
        whether the publishing succeeded or not; nothing of it is left in the data directory."""
        self._publish_checks(ehr_name, user_id, password)
        name = safe_file_name(filename, "record")
        plain = self.uploads / f".publish-{uuid.uuid4().hex}.plain"
        try:
            try:
                with os.fdopen(os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
                    while chunk := stream.read(PUBLISH_CHUNK_BYTES):
                        out.write(chunk)
            except OSError as exc:  # the disk is full, or the uploads folder is gone
                raise Busy(f"the node cannot hold the upload in its private folder now ({exc.strerror or exc}); "
                           f"try again later") from None
            return self._publish(plain, name, ehr_name, user_id, password)
        finally:
            plain.unlink(missing_ok=True)

    def _publish_checks(self, ehr_name: Any, user_id: Any, password: Any) -> None:
        """Refuse a publish whose fields are wrong before any file is read, encrypted or added to IPFS."""
        check_transaction({"user_id": user_id, "ipfs_hash": PLACEHOLDER_CID, "EHR_name": ehr_name})
        if self.rules:
            self._require_standing(Action.RECORD, "record a transaction")
            if password not in (None, ""):
                raise BadInput("'password': on a signed network a record is encrypted with a key of its own, wrapped "
                               "for its owner and the members it is granted to; send no password")
        elif not isinstance(password, str) or not password:
            raise BadInput("'password' is required on the paper's network: the record is encrypted (AES Crypt) with "
                           "the password the patient shares")

    def _publish(self, source: Path, name: str, ehr_name: Any, user_id: Any, password: Any) -> dict[str, Any]:
        state = self._signed_state() if self.rules else None
        record_key = new_record_key() if self.rules else password
        encrypted = self.uploads / f".publish-{uuid.uuid4().hex}{crypto.AES_SUFFIX}"
        try:
            try:
                crypto.encrypt_file(source, encrypted, record_key)
            except crypto.CryptoError as exc:  # name the file as the user did, not by its spooled path
                raise type(exc)(name, exc.reason) from None
            with open(encrypted, "rb") as stream:
                added = self.ipfs.add_file(NamedUpload(stream, safe_file_name(name + crypto.AES_SUFFIX,
                                                                              "record.aes")))
        finally:
            encrypted.unlink(missing_ok=True)
        tx = check_transaction({"user_id": user_id, "ipfs_hash": added["Hash"], "EHR_name": ehr_name,
                                "file_name": added["Name"], "file_size": added["Size"]})
        if state is None:
            receipt = self.network.add_transaction({**tx, "id": uuid.uuid4().hex})
            how = "encrypted with the password you gave (AES Crypt)"
        else:
            cid, me = added["Hash"], self.identity.node_id
            secret = record_key_bytes(record_key)
            keys = {me: wrap_key(secret, self.identity.public().exchange_public_key, cid=cid, grantee=me).to_json()}
            for member in self.rules.emergency_members(state):
                if member.node_id != me:
                    keys[member.node_id] = wrap_key(secret, member.identity.exchange_public_key, cid=cid,
                                                    grantee=member.node_id, purpose=BREAK_GLASS_PURPOSE).to_json()
            receipt = self.network.add_transaction(self.rules.sign_transaction({**tx, "id": uuid.uuid4().hex,
                                                                                "keys": keys}))
            how = "encrypted with a key of its own"
        return {"message": f"The record is {how}, on IPFS, and will be in Block {receipt.index}",
                "IPFS Hash": added, "index": receipt.index, "id": receipt.transaction["id"]}

    def grant(self, record: Any, member: Any, expires: Any = "", purpose: Any = "",
              versions: Any = ALL_VERSIONS) -> Receipt:
        """A grant of one record (a CID), or of every version of one (a name), to a member: each record's key
        wrapped for the member, bound to the record and the member; signed by this node, the records' owner."""
        state = self._require_standing(Action.GRANT, "grant access")
        grantee = state.members.get(member) if isinstance(member, str) else None
        if grantee is None:
            raise BadInput(f"'member' must be the node id of a member of this network (GET /members)")
        me = self.identity.node_id
        entries = []
        for tx in self._own_records(record, versions):
            secret = unwrap_key(tx[KEYS][me], self.identity.exchange_private_key, cid=tx["ipfs_hash"], grantee=me)
            entries.append({"cid": tx["ipfs_hash"], "key": wrap_key(
                secret, grantee.identity.exchange_public_key, cid=tx["ipfs_hash"], grantee=grantee.node_id).to_json()})
        return self.network.add_transaction(self.rules.sign_transaction(
            {"type": GRANT, "id": uuid.uuid4().hex, "grantee": grantee.node_id, "records": entries,
             "expires": expires or "", "purpose": purpose or ""}))

    def revoke(self, grant_id: Any) -> Receipt:
        """A revocation of one of this node's grants: from the block that holds it, no honest node opens a record
        under that grant. It cannot take back a copy already decrypted."""
        self._require_standing(Action.GRANT, "revoke a grant")
        if not isinstance(grant_id, str) or not TRANSACTION_ID.fullmatch(grant_id):
            raise BadInput("'grant' must be a grant's id (GET /grants)")
        return self.network.add_transaction(self.rules.sign_transaction(
            {"type": REVOKE, "id": uuid.uuid4().hex, "grant": grant_id}))

    def grants(self) -> dict[str, Any]:
        """The grants this node made, and those made to it, each with its status now."""
        self._signed_state()
        index, me = self.rules.index, self.identity.node_id
        made = [self._grant_status(grant_id) for grant_id in reversed(index.granted_by.get(me, []))]
        received = [self._grant_status(grant_id) for grant_id in reversed(
            sorted({gid for (grantee, _), ids in index.grants_for.items() if grantee == me for gid in ids},
                   key=lambda gid: index.grants[gid][0]))]
        return {"made": made, "received": received}

    def _grant_status(self, grant_id: str) -> dict[str, Any]:
        block, tx = self.rules.index.grants[grant_id]
        revoked = self.rules.index.revoked.get(grant_id)
        status = "revoked" if revoked is not None else \
            "expired" if tx["expires"] and tx["expires"] < _now() else "active"
        return {"grant": grant_id, "block": block, "owner": tx["signer"], "grantee": tx["grantee"],
                "records": [entry["cid"] for entry in tx["records"]], "expires": tx["expires"],
                "purpose": tx["purpose"], "status": status, "revoked_in_block": revoked}

    def open_record(self, record: Any, purpose: Any = "", emergency: Any = False, reason: Any = "") -> dict[str, Any]:
        """Fetch a record from IPFS and decrypt it into the downloads folder with the key a valid grant wraps for
        this node (or, for its owner, its own; for an emergency member with a stated reason, its break-glass
        copy). No password in any request. Every open and every refusal is recorded on the chain."""
        self._require_standing(Action.FETCH, "open records")
        if not isinstance(emergency, bool):
            raise BadInput("'emergency' must be true or false")
        for field, value in (("purpose", purpose), ("reason", reason)):
            if not isinstance(value, str) or len(value) > MAX_TEXT_LENGTH:
                raise BadInput(f"'{field}' must be text of at most {MAX_TEXT_LENGTH} characters")
        tx = self._record(record)
        cid, me = tx["ipfs_hash"], self.identity.node_id
        key_purpose = RECORD_KEY_PURPOSE
        if emergency:
            if not reason.strip():
                self._refuse(cid, "", purpose, True, "a break-glass open needs a stated reason")
            if me not in tx.get(KEYS, {}) or tx["signer"] == me:
                self._refuse(cid, "", purpose, True, f"this node is not one of the network's emergency members for "
                                                     f"record {cid}")
            keys, key_purpose = [("", tx[KEYS][me])], BREAK_GLASS_PURPOSE
        elif tx["signer"] == me and me in tx.get(KEYS, {}):
            keys = [("", tx[KEYS][me])]
        else:
            keys = self._valid_grants(cid, purpose)
        grant_id, secret = self._unwrapped(cid, keys, key_purpose, purpose, emergency)
        path, size = self._fetch_and_decrypt(tx, record_key_text(secret))
        self._log_access(cid, OPENED, grant_id, reason if emergency else "", purpose, emergency)
        return {"message": "The record is decrypted into your downloads folder", "path": path, "size": size,
                "record": cid, "grant": grant_id or None, "emergency": emergency}

    def _valid_grants(self, cid: str, purpose: str) -> list[tuple[str, Any]]:
        """(grant id, the key it wraps for this node) of every valid grant of `cid` to this node, newest first;
        if there is none, the refusal is recorded and Forbidden says why (of the newest grant, if any)."""
        index, me = self.rules.index, self.identity.node_id
        valid, refusals = [], []  # refusals: (grant, why it does not hold), newest first
        for grant_id in reversed(index.grants_for.get((me, cid), [])):
            _, grant = index.grants[grant_id]
            if grant_id in index.revoked:
                refusals.append((grant_id, f"grant {grant_id} was revoked in block {index.revoked[grant_id]}"))
            elif grant["expires"] and grant["expires"] < _now():
                refusals.append((grant_id, f"grant {grant_id} expired at {grant['expires']}"))
            else:
                valid.append((grant_id, next(entry["key"] for entry in grant["records"] if entry["cid"] == cid)))
        if valid:
            return valid
        grant_id, why = refusals[0] if refusals else ("", f"no grant of record {cid} to this node "
                                                          f"({self.identity.short_id})")
        self._refuse(cid, grant_id, purpose, False, why)
        raise AssertionError("unreachable: _refuse raises")

    def _unwrapped(self, cid: str, keys: list[tuple[str, Any]], key_purpose: str, purpose: str,
                   emergency: bool) -> tuple[str, bytes]:
        """(grant id, record key) of the first of `keys` (grant id, wrapped key; newest first) that opens for this
        record and this node: a newer grant whose key does not open (copied from another grant) does not hide an
        older one that does. If none opens, the refusal is recorded under the newest and its KeyUnwrapError
        raised."""
        me, failed = self.identity.node_id, []
        for grant_id, wrapped in keys:
            try:
                return grant_id, unwrap_key(wrapped, self.identity.exchange_private_key, cid=cid, grantee=me,
                                            purpose=key_purpose)
            except KeyUnwrapError as exc:
                failed.append((grant_id, exc))
        grant_id, error = failed[0]
        self._log_access(cid, REFUSED, grant_id, str(error), purpose, emergency)
        raise error

    def _refuse(self, cid: str, grant_id: str, purpose: str, emergency: bool, why: str) -> None:
        self._log_access(cid, REFUSED, grant_id, why, purpose, emergency)
        raise Forbidden(why)

    def _log_access(self, cid: str, outcome: str, grant_id: str, reason: str, purpose: str, emergency: bool) -> None:
        """An access transaction, signed by this node: who opened (or was refused) which record, when, why."""
        tx = {"type": ACCESS, "id": uuid.uuid4().hex, "record": cid, "outcome": outcome, "grant": grant_id,
              "reason": reason[:MAX_TEXT_LENGTH], "purpose": purpose, "emergency": emergency, "at": _now()}
        try:
            self.network.add_transaction(self.rules.sign_transaction(tx))
        except NodeError as exc:  # the open or refusal stands; the log line says the record of it failed
            log.warning("access to %s (%s) could not be recorded: %s", cid, outcome, exc)

    def _fetch_and_decrypt(self, tx: Transaction, password: str) -> tuple[str, int]:
        name = tx.get("file_name") or f"{tx['EHR_name']}{crypto.AES_SUFFIX}"
        plain = safe_file_name(name[:-len(crypto.AES_SUFFIX)] if name.lower().endswith(crypto.AES_SUFFIX) else name,
                               tx["ipfs_hash"])
        fetched = self.uploads / f".open-{uuid.uuid4().hex}{crypto.AES_SUFFIX}"
        try:
            _, chunks = self.ipfs.open(tx["ipfs_hash"])
            with written_atomically(fetched, durable=False) as out:
                for chunk in chunks:
                    out.write(chunk)
            target = self.downloads / plain
            size = crypto.decrypt_file(fetched, target, password, overwrite=True)
        finally:
            fetched.unlink(missing_ok=True)
        return self._relative(target), size

    def _record(self, record: Any) -> Transaction:
        """A signed record by its CID, or the newest by its name."""
        if not isinstance(record, str) or not record.strip():
            raise BadInput("'record' must be a record's CID or its name")
        found = self.rules.index.records.get(record.strip())
        if found:
            return found[1]
        matches = [tx for _, tx in self.blockchain.find_records(record) if tx["ipfs_hash"] in self.rules.index.records]
        if not matches:
            raise NotFound(f"no record {record!r} on the chain (a new one counts once it is mined)")
        return matches[0]

    def _own_records(self, record: Any, versions: Any) -> list[Transaction]:
        """This node's records by a CID, or by a name: every version, or the newest (versions)."""
        if versions not in (ALL_VERSIONS, NEWEST_VERSION):
            raise BadInput(f"'versions' must be {ALL_VERSIONS!r} or {NEWEST_VERSION!r}")
        if not isinstance(record, str) or not record.strip():
            raise BadInput("'record' must be a record's CID or its name")
        me, index = self.identity.node_id, self.rules.index
        found = index.records.get(record.strip())
        candidates = [found[1]] if found else [tx for _, tx in self.blockchain.find_records(record)]
        own = [tx for tx in candidates if tx.get("signer") == me and me in tx.get(KEYS, {})]
        if not own:
            owner = candidates[0].get("signer") if candidates else None
            if owner and owner != me:
                raise Forbidden(f"record {record!r} is {short_id(owner)}'s: only its owner may grant it")
            if owner == me:
                raise Conflict(f"record {record!r} was recorded the paper's way, with a password and no key of its "
                               f"own: share the password, or publish the file again with /publish_record")
            raise NotFound(f"no record {record!r} of this node's on the chain (one counts once it is mined)")
        return own if versions == ALL_VERSIONS else own[:1]

    def audit(self, owner: Any = None, user_id: Any = None, record: Any = None, member: Any = None,
              since: Any = None, until: Any = None, limit: Any = None) -> dict[str, Any]:
        """Who accessed the records of `owner` (this node by default): every open and refusal on the chain,
        emergency accesses first, then the others, newest first; filtered by user_id, record, member or time."""
        self._signed_state()
        owner = owner or self.identity.node_id
        limit = AUDIT_LIMIT if limit in (None, "") else limit
        if isinstance(limit, str) and limit.isdigit():
            limit = int(limit)
        if type(limit) is not int or not 0 < limit <= MAX_AUDIT_LIMIT:
            raise BadInput(f"'limit' must be a whole number from 1 to {MAX_AUDIT_LIMIT}")
        for name, value in (("owner", owner), ("member", member)):
            if value is not None and (not isinstance(value, str) or not NODE_ID.fullmatch(value)):
                raise BadInput(f"'{name}' must be a member's node id")
        for name, value in (("since", since), ("until", until)):
            if value is not None and (not isinstance(value, str) or not TIMESTAMP.fullmatch(value)):
                raise BadInput(f"'{name}' must be a time like 2027-01-31 23:59:59.000000")
        index = self.rules.index
        cids = None
        if record is not None:
            cids = {tx["ipfs_hash"] for tx in [self._record(record)]} if record in index.records else \
                {tx["ipfs_hash"] for _, tx in self.blockchain.find_records(str(record))}
        sources = [index.accesses_by.get((owner, member), [])] if member else \
            [index.accesses_of.get(cid, []) for cid in cids] if cids is not None else [index.accesses.get(owner, [])]
        newest_first = heapq.merge(*map(reversed, sources), key=_access_order, reverse=True)

        def keep(entry: Access) -> bool:
            tx = entry.tx
            record_tx = index.records[tx["record"]][1]
            return (record_tx["signer"] == owner and (cids is None or tx["record"] in cids)
                    and (member is None or tx["signer"] == member)
                    and (user_id is None or record_tx["user_id"] == user_id)
                    and (since is None or tx["at"] >= since) and (until is None or tx["at"] <= until))

        emergency = [self._describe_access(entry) for entry in
                     _newest(reversed(index.emergencies.get(owner, [])), keep, limit)]
        others = [self._describe_access(entry) for entry in
                  _newest((entry for entry in newest_first if not entry.tx["emergency"]), keep, limit - len(emergency))]
        return {"owner": owner, "accesses": emergency + others, "count": len(emergency) + len(others)}

    def _describe_access(self, entry: Access) -> dict[str, Any]:
        block, tx = entry.block, entry.tx
        record_tx = self.rules.index.records[tx["record"]][1]
        return {"block": block, "at": tx["at"], "member": tx["signer"], "member_short_id": short_id(tx["signer"]),
                "record": tx["record"], "EHR_name": record_tx["EHR_name"], "user_id": record_tx["user_id"],
                "outcome": tx["outcome"], "grant": tx["grant"] or None, "reason": tx["reason"],
                "purpose": tx["purpose"], "emergency": tx["emergency"]}

    # -- IPFS ----------------------------------------------------------------

    def create_hash(self, file_path: Any) -> dict[str, str]:
        return self.ipfs.add_file(self._existing(file_path))

    def create_hash_from_upload(self, chunks: Iterable[bytes], filename: str) -> dict[str, str]:
        """Add an uploaded file to IPFS as its bytes arrive (`chunks`), under a safe form of its name.

        Nothing is written here: the bytes go on to Kubo as they come, and an upload that breaks off (or that
        `chunks` finds malformed, raising) breaks the add off too, so nothing is added.
        """
        return self.ipfs.add_stream(chunks, safe_file_name(filename, "upload"))

    def file_info(self, name: Any) -> dict[str, Any]:
        """The newest mined record matching `name` and every version of it, newest first."""
        matches = self.blockchain.find_records(name)
        if not matches:
            pending = self.blockchain.pending_count
            hint = f"; {pending} pending transaction(s) are not searched until mined" if pending else ""
            raise NotFound(f"no record named '{name}' on the chain{hint}")
        versions = [{**self._describe(tx, name), "block_index": index, "EHR_name": tx["EHR_name"],
                     "user_id": tx["user_id"]} for index, tx in matches]
        newest = dict(versions[0])
        if newest["Size"] is None:
            newest["Size"] = self._ipfs_size(newest["Hash"])
            versions[0]["Size"] = newest["Size"]
        return {"File info": {key: newest[key] for key in ("Hash", "Name", "Size")}, "versions": versions}

    @staticmethod
    def _describe(tx: Transaction, asked: str) -> dict[str, Any]:
        return {"Hash": tx["ipfs_hash"], "Name": tx.get("file_name") or asked, "Size": tx.get("file_size")}

    def _ipfs_size(self, cid: str) -> str | None:
        """Kubo's size figure for a CID (the one its add reports), or None if IPFS cannot tell now.

        A CID names fixed content, so its size is remembered once known.
        """
        if cid not in self._sizes:
            try:
                size = str(self.ipfs.stat(cid)["CumulativeSize"])
            except IpfsError:
                return None
            if len(self._sizes) >= SIZE_CACHE_ENTRIES:
                self._sizes.clear()
            self._sizes[cid] = size
        return self._sizes[cid]

    def _download_name(self, cid: str) -> str:
        record = self.blockchain.record_for_cid(cid)
        return safe_file_name(record.get("file_name", "") if record else "", cid)

    def get_file(self, cid: Any) -> tuple[str, int]:
        """Fetch a file from IPFS into the downloads folder; returns (path within data dir, size)."""
        cid = _checked_cid(cid)
        destination = self.downloads / self._download_name(cid)
        size, chunks = self.ipfs.open(cid)
        write_download(destination, size, chunks)
        return self._relative(destination), size

    def stream_file(self, cid: Any) -> tuple[str, int, "SpooledDownload"]:
        """(download name, size, the download) of an IPFS file, for sending it back as an attachment.

        The download holds the file for one client while it is sent: `fill()` copies it from Kubo, and the
        server reads it at the client's pace. A file up to SPOOL_IN_MEMORY_BYTES is filled here, at once; a
        larger one is left for the caller to fill, which the server does once the answer has begun, so the
        bytes go out as they arrive (app.download_file). So a slow reader holds a spool, never a thread, and
        the bytes held at once for readers are bounded (max_spool_bytes): Busy beyond. Close it when sent.
        """
        cid = _checked_cid(cid)
        size, chunks = self.ipfs.open(cid)
        budget = self._spool_budget
        if not budget.reserve(size):
            chunks.close()
            if size > budget.limit:
                raise Busy(f"the file has {size} bytes, more than this node holds for downloads at once "
                           f"({budget.limit} bytes, max_spool_bytes); fetch it with POST /get_file instead")
            raise Busy(f"the node is holding {budget.used} bytes of downloads for clients still reading them and "
                       f"this file has {size}; its limit is {budget.limit} bytes (max_spool_bytes): try again later")
        try:
            # Made now, while the client can still be told (503), not half way through the answer.
            spill = tempfile.TemporaryFile(dir=self.uploads) if size > SPOOL_IN_MEMORY_BYTES else None
        except OSError as exc:  # the disk is full, or the uploads folder is gone
            chunks.close()
            budget.release(size)
            raise Busy(f"the node cannot hold the download in {self.uploads} now ({exc.strerror or exc}); "
                       f"try again later") from None
        download = SpooledDownload(size, chunks, spill, functools.partial(budget.release, size), self._spool_memory)
        if spill is None:
            try:
                download.fill()
            except BaseException:
                download.close()
                raise
        return self._download_name(cid), size, download

    @functools.cached_property
    def _spool_budget(self) -> "SpoolBudget":
        return SpoolBudget(self.config.max_spool_bytes)

    @functools.cached_property
    def _spool_memory(self) -> "SpoolBudget":
        return SpoolBudget(SPOOL_MEMORY_BYTES)

    # -- encryption ----------------------------------------------------------

    def encrypt_file(self, file_path: Any, password: str, output_path: Any = None,
                     overwrite: bool = False) -> tuple[str, int]:
        source = self._existing(file_path)
        target = self._crypt_target(source, output_path, encrypting=True)
        return self._crypt(crypto.encrypt_file, source, target, password, overwrite)

    def decrypt_file(self, file_path: Any, password: str, output_path: Any = None,
                     overwrite: bool = False) -> tuple[str, int]:
        source = self._existing(file_path)
        target = self._crypt_target(source, output_path, encrypting=False)
        return self._crypt(crypto.decrypt_file, source, target, password, overwrite)

    def _crypt_target(self, source: Path, output_path: Any, encrypting: bool) -> Path:
        if output_path:
            target = self._user_path(output_path, "output_path")
        else:
            target = crypto.default_output(source, encrypting)
            if target is None:
                raise BadInput(f"'file_path' does not end in {crypto.AES_SUFFIX}: "
                               f"give 'output_path' for the decrypted file")
        if len(os.fsencode(target.name)) > MAX_NAME_BYTES:
            raise PathRefused(f"the output's name would be longer than {MAX_NAME_BYTES} bytes; give a shorter "
                              f"'output_path'")
        if target == self.data_dir or target.is_dir():
            raise PathRefused("'output_path' names a folder; name the file to write")
        return target

    def _user_path(self, user_path: Any, field: str = "file_path") -> Path:
        """A path a request named: inside the data directory, outside the node's own files."""
        return confine_path(self.data_dir, user_path, field, private=self.state_dir)

    def _existing(self, file_path: Any) -> Path:
        path = self._user_path(file_path)
        if not path.is_file():
            raise NotFound(f"no file at '{file_path}' in the node's data directory")
        return path

    def _crypt(self, operation: Any, source: Path, target: Path, password: str, overwrite: bool) -> tuple[str, int]:
        if target == source:
            raise BadInput("the output would overwrite the input")
        if target.exists() and not overwrite:
            raise Conflict(f"'{self._relative(target)}' already exists; "
                           f"send \"overwrite\": true to replace it")
        try:
            size = operation(source, target, password, overwrite=overwrite)
        except crypto.CryptoError as exc:  # name the file as the user did, not by its path on this machine
            raise type(exc)(self._relative(exc.path), exc.reason) from None
        except (IsADirectoryError, NotADirectoryError, FileNotFoundError) as exc:
            raise PathRefused(f"'{self._relative(target)}' cannot be written: a folder is in the way "
                              f"({exc.strerror})") from None
        return self._relative(target), size

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.data_dir).as_posix()


SPOOL_IN_MEMORY_BYTES = 1024 * 1024  # a download this small is filled at once, in memory; larger ones as sent
# Bytes of large downloads arrived and not yet sent, held in memory by the whole node; beyond, each download puts
# what arrives in its file. (A per-download window of 2 MiB made even a fast reader's download spill 2 to 8 MiB of
# 16 MiB, and pay a write and a read for each of those bytes.)
SPOOL_MEMORY_BYTES = 32 * 1024 * 1024
SPOOL_READ_BYTES = 1024 * 1024  # read from a download's file at a time (the server sends a socket's worth of it)


class SpoolBudget:
    """Bytes of downloads held at once for clients still reading them, shared by the request threads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, size: int) -> bool:
        with self._lock:
            if self.used + size > self.limit:
                return False
            self.used += size
            return True

    def release(self, size: int) -> None:
        with self._lock:
            self.used -= size


class SpooledDownload:
    """A download held for one client while it is sent: filled from IPFS by one thread (`fill`) while another
    (waitress's I/O thread) reads it at the client's pace as a file (read, seek, tell: it is sent as a
    wsgi.file_wrapper of `size` bytes).

    The bytes are a run of segments in arrival order. A piece is kept in memory as it came while `memory` (the
    node's budget for such pieces, SPOOL_MEMORY_BYTES, shared by its downloads) has room for it; else it goes
    to `spill`, a temporary file that disappears when closed, and later ones to memory again once readers have
    taken enough. `read` never waits: it gives what has arrived (b"" if nothing yet), as a view of the piece where it can
    (no copy), and `waiting()` tells the server to wait for `fill`'s wake-up rather than ask again. The bytes
    count against the node's SpoolBudget until the download is closed, by whichever thread finishes with it.
    """

    def __init__(self, size: int, chunks: Iterator[bytes], spill: IO[bytes] | None, release: Any,
                 memory: SpoolBudget | None = None) -> None:
        self.size = size
        self._memory = memory  # (a download without a spill file is small, and held in memory whole)
        self._in_memory = 0  # bytes of this download counted against `memory`
        self._chunks = chunks
        self._spill = spill
        self._spilled = 0  # bytes written to the spill file
        self._release = release
        self._lock = threading.Lock()
        self._file_lock = threading.Lock()  # a read and a close of the spill file never overlap
        # segments: [offset in the download, bytes (in memory) or None (in the file), length, offset in the file]
        self._segments: deque[list[Any]] = deque()
        self._cache: tuple[int, bytes] = (0, b"")  # the last piece read from the file, and where it starts
        self._arrived = 0
        self._position = 0
        self.filled = False  # fill() ended: with every byte, or failed
        self.failed = False
        self.closed = False
        self._fill_started = False

    # -- the filling thread ----------------------------------------------------

    def fill(self, wake: Callable[[], None] | None = None) -> None:
        """Copy the file from IPFS, calling `wake` (the server's) as pieces arrive. What the transfer raises is
        raised again: the reader gets what arrived and no more, so the answer is cut short."""
        chunks = self._chunks
        with self._lock:
            if self.closed:  # closed before it was filled (a HEAD request, say): close() let go of the transfer
                return
            self._fill_started = True
        try:
            for chunk in chunks:
                if self.closed:  # the reader is gone
                    break
                self._append(chunk)
                if wake is not None:
                    wake()
        except BaseException:
            self.failed = True
            raise
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # (closing it part read drops its connection to Kubo)
            self.filled = True
            if wake is not None:
                wake()

    def _append(self, chunk: bytes) -> None:
        with self._lock:
            if self._spill is None or self._memory is None or self._memory.reserve(len(chunk)):
                self._segments.append([self._arrived, chunk, len(chunk), 0])
                self._arrived += len(chunk)
                if self._spill is not None and self._memory is not None:
                    self._in_memory += len(chunk)
                return
            file_offset = self._spilled
            self._spilled += len(chunk)
        with self._file_lock:  # the reader reads only what has arrived: no segment covers this piece yet
            if self.closed:
                return
            assert self._spill is not None
            if hasattr(os, "pwrite"):
                os.pwrite(self._spill.fileno(), chunk, file_offset)
            else:
                self._spill.seek(file_offset)
                self._spill.write(chunk)
                self._spill.flush()
        with self._lock:
            self._segments.append([self._arrived, None, len(chunk), file_offset])
            self._arrived += len(chunk)

    # -- the reading thread ----------------------------------------------------

    def read(self, size: int = -1) -> bytes | memoryview:
        """Up to `size` bytes of what has arrived, from the position on (which moves past them, as a file's)."""
        with self._lock:
            position = self._position
            if position >= self._arrived or self.closed:
                return b""
            segments = self._segments
            while segments[0][0] + segments[0][2] <= position:  # sent: let it go
                gone = segments.popleft()
                if gone[1] is not None and self._in_memory:
                    self._in_memory -= gone[2]
                    self._memory.release(gone[2])  # type: ignore[union-attr]
            start, data, length, file_offset = segments[0]
            offset = position - start
            count = length - offset if size < 0 else min(size, length - offset)
            if data is not None:
                self._position += count
                return memoryview(data)[offset:offset + count]
            cached_at, cached = self._cache
            if not cached_at <= position < cached_at + len(cached):
                with self._file_lock:
                    if self.closed:
                        return b""
                    want = min(length - offset, SPOOL_READ_BYTES)
                    assert self._spill is not None
                    if hasattr(os, "pread"):
                        cached = os.pread(self._spill.fileno(), want, file_offset + offset)
                    else:
                        self._spill.seek(file_offset + offset)
                        cached = self._spill.read(want)
                cached_at = position
                self._cache = (cached_at, cached)
            piece = memoryview(cached)[position - cached_at:position - cached_at + count]
            self._position += len(piece)
            return piece

    def seek(self, offset: int, whence: int = 0) -> int:
        with self._lock:
            self._position = offset if whence == 0 else self._position + offset if whence == 1 else self.size + offset
            return self._position

    def tell(self) -> int:
        return self._position

    def seekable(self) -> bool:
        return True

    def waiting(self) -> bool:
        """Nothing to send now, and more to come: wait for fill's wake-up."""
        return not self.filled and self._position >= self._arrived

    def broken(self) -> bool:
        """The transfer failed and what arrived of it is sent: the answer ends here, short."""
        return self.filled and self.failed and self._position >= self._arrived

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._segments.clear()
            self._cache = (0, b"")
            unread = not self._fill_started
            if self._in_memory:
                self._memory.release(self._in_memory)  # type: ignore[union-attr]
                self._in_memory = 0
        if unread:  # never filled: let go of the transfer (and its connection to Kubo) now
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
            self.filled = True
        try:
            if self._spill is not None:
                with self._file_lock:
                    if self._spilled:
                        close_later(self._spill)  # freeing what it holds is no work for the I/O thread
                    else:
                        self._spill.close()
        finally:
            self._release()

    def __enter__(self) -> "SpooledDownload":
        return self

    def __del__(self) -> None:  # a download dropped without being sent still gives its bytes back
        self.close()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_download(destination: Path, size: int, chunks: Iterable[bytes]) -> None:
    """Write a download of `size` bytes beside `destination` (owner-only) and rename it into place only once it
    is whole, as storage.written_atomically does. Not fsync'd: a download lost to a power cut is fetched again.

    Replacing a file costs more than writing a new one, and two of those costs are kept off the request
    (measured on ext4: 10 of 45 ms for 16 MiB, 0.19 of 0.31 ms for 64 KB). The new file's blocks are reserved
    before it is written (posix_fallocate), so the rename does not first allocate them and start flushing them
    (ext4's auto_da_alloc, meant for files written without fsync); and the file it replaces is held open across
    the rename and let go by a thread of its own (close_later), so its blocks are freed there, not inside the
    rename. Neither changes what a reader of the path sees: the old file whole, then the new one whole.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=destination.parent, prefix=".part-")
    try:
        try:
            if size > 0 and hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError:  # a filesystem without it: the blocks are taken as written
                    pass
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        replaced = None
        if os.name == "posix":  # (Windows cannot rename over an open file)
            try:
                replaced = os.open(destination, os.O_RDONLY)
            except OSError:
                pass
        try:
            os.replace(temp_name, destination)
        finally:
            if replaced is not None:
                close_later(replaced)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


_to_close: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
_closer_lock = threading.Lock()
_closer: threading.Thread | None = None


def close_later(handle: Any) -> None:
    """Close a file descriptor (or file) on the closer thread: the last close of a large unlinked file frees its
    blocks, which takes milliseconds a request, or the server's I/O thread, should not wait for."""
    global _closer
    if _closer is None:
        with _closer_lock:
            if _closer is None:
                _closer = threading.Thread(target=_close_queued, name="closer", daemon=True)
                _closer.start()
    _to_close.put(handle)


def _close_queued() -> None:
    while True:
        handle = _to_close.get()
        try:
            if isinstance(handle, int):
                os.close(handle)
            else:
                handle.close()
        except OSError:
            pass


def _checked_cid(cid: Any, field: str = "ipfs_hash") -> str:
    if not isinstance(cid, str) or not cid.strip():
        raise BadInput(f"'{field}' must be a non-empty string")
    if not is_cid(cid.strip()):
        raise BadInput(f"'{field}' is not an IPFS CID (expected Qm... or b...)")
    return cid.strip()


def _now() -> str:
    """The time as the chain writes it (str(datetime.now())): comparable as text with grants' expiry."""
    return datetime.now().strftime(TIMESTAMP_FORMAT)


def _access_order(entry: Access) -> int:
    return entry.order


def _newest(newest_first: Iterable[Access], keep: Callable[[Access], bool], limit: int) -> list[Access]:
    """The first `limit` of `newest_first` that `keep` accepts, read lazily: an answer costs the accesses it holds
    and those it skips, never the length of the whole trail."""
    return list(islice(filter(keep, newest_first), max(limit, 0)))
