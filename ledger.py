"""The signed network's rules: who is a member, what each member may write, and proof of who wrote it.

In signed mode (`--security signed`) every transaction carries its creator's node id (`signer`) and an Ed25519
signature over its canonical JSON (canonical.py, the `signature` field left out), and every block carries its
miner's id (`miner`) and a signature over the block's hash (the block without its signature). Every node checks
them wherever a write enters: a transaction added or gossiped, a block mined, received or synced, a saved chain
restored. Paper mode has none of this: blockchain.Blockchain runs without rules.

Who may write what comes from policy.py, the table the routes use too: a record only from a patient member,
an admission or a removal only from a healthcare authority, a block from any member. So a healthcare node that
is tricked into gossiping a record is refused by every honest node, not only by its own routes.

Membership is chain state. The founding members come from the members file the operators share (members.py),
whose fingerprint is in the genesis block, so nodes with different files refuse each other's chains at once; the
file never changes after. Later a healthcare authority admits or removes a member with a signed transaction, and
a node admitted so runs with the same founding file: until its chain holds its admission it writes nothing
(`SignedRules.own_problem`). A removed member's later writes are refused; what it wrote before stays valid. An
admission may name the member it replaces (`replaces`: a key rotated), who is removed by the same transaction, so
its URL and exchange key may pass to the new member; otherwise no two members share a node id, short id, URL or
exchange key. The state after each block is kept beside the chain (`LedgerState`, immutable), so a fork is
judged against the state at its fork point.
"""
from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from blockchain import (CONTROL_CHARACTER, MAX_TEXT_LENGTH, TIMESTAMP, TRANSACTION_ID, Block, Transaction,
                        check_transaction, hash_block, is_cid)
from canonical import canonical_json
from errors import BadInput, InvalidIdentity, InvalidTransaction
from identity import NODE_ID, SIGNATURE_SIZE, Identity, PublicIdentity, b64decode, short_id
from keywrap import WrappedKey
from members import Member, Members
from policy import Action, may

SIGNER = "signer"
SIGNATURE = "signature"
MINER = "miner"
TYPE = "type"
RECORD, ADMIT, REMOVE = "record", "admit", "remove"
GRANT, REVOKE, ACCESS = "grant", "revoke", "access"
# The action of policy.py each kind of transaction performs: its signer's role must be allowed it.
TYPE_ACTION: dict[str, Action] = {RECORD: Action.RECORD, ADMIT: Action.ADMIT, REMOVE: Action.ADMIT,
                                  GRANT: Action.GRANT, REVOKE: Action.GRANT, ACCESS: Action.FETCH}
REPLACES = "replaces"  # on an admission: the member it replaces (a rotated key), removed by the same transaction
TYPE_FIELDS: dict[str, frozenset[str]] = {
    ADMIT: frozenset({TYPE, "id", "member", SIGNER, SIGNATURE}),
    REMOVE: frozenset({TYPE, "id", "node_id", SIGNER, SIGNATURE}),
    GRANT: frozenset({TYPE, "id", "grantee", "records", "expires", "purpose", SIGNER, SIGNATURE}),
    REVOKE: frozenset({TYPE, "id", "grant", SIGNER, SIGNATURE}),
    ACCESS: frozenset({TYPE, "id", "record", "outcome", "grant", "reason", "purpose", "emergency", "at", SIGNER,
                       SIGNATURE}),
}
OPTIONAL_FIELDS: dict[str, frozenset[str]] = {ADMIT: frozenset({REPLACES})}
KEYS = "keys"  # on a record: its key wrapped for its owner (and the network's emergency members)
OPENED, REFUSED = "opened", "refused"
MAX_KEYS = 32
MAX_GRANT_RECORDS = 64
SIGNED_BLOCK_EXTRA = frozenset({MINER, SIGNATURE})
# Joining a long chain means checking a signature or two per block. From this many on, they are checked ahead in
# the mining processes (both cores); fewer cost less checked on the spot than handed over.
PARALLEL_SIGNATURES = 256
SIGNATURES_PER_TASK = 512
Verified = frozenset  # of (signature, signed bytes): checked ahead, not checked again
EMERGENCY_SETTING = "emergency_members"  # members file setting: node ids or roles that may break the glass
NETWORK_RULES = (EMERGENCY_SETTING,)  # settings of the members file that are rules of the network, not node flags

@dataclass(frozen=True)
class LedgerState:
    """Who is a member after some block: the members (with roles and keys) and the ids removed so far."""

    members: Members
    removed: frozenset[str] = field(default_factory=frozenset)

    def signer_problem(self, node_id: Any, action: Action, what: str) -> tuple[str | None, Member | None]:
        """Why `node_id` may not sign `what` (performing `action`), or (None, its member entry)."""
        if not isinstance(node_id, str) or not NODE_ID.fullmatch(node_id):
            return f"{what} has no signer's node id", None
        member = self.members.get(node_id)
        if member is None:
            reason = "a removed member" if node_id in self.removed else "not a member of this network"
            return f"{what} is signed by {short_id(node_id)}, {reason}", None
        if not may(member.role, action):
            return f"{what} is signed by {member.short_id}, a {member.role}, whose role may not make it", None
        return None, member


def transaction_kind(tx: Transaction) -> str:
    return tx.get(TYPE, RECORD) if isinstance(tx, dict) else RECORD


# -- consent: grants, revocations, accesses --------------------------------------------------

class Access(NamedTuple):
    """An access transaction as the index holds it: its block, itself, and its place among all the accesses on
    the chain (0 for the first), which orders accesses within a block too, for merging several lists."""

    block: int
    tx: Transaction
    order: int


class ConsentIndex:
    """Who owns which record, which grants and revocations exist, and every access, as the chain holds them.

    Kept beside the chain (the chain feeds it each block; `reset` on a reorganisation, then the blocks again), for
    the checks (a grant's records must be its signer's) and for the node: opening under a grant, the audit.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.records: dict[str, tuple[int, Transaction]] = {}  # cid -> its first record
        self.grants: dict[str, tuple[int, Transaction]] = {}  # grant id -> the grant
        self.revoked: dict[str, int] = {}  # grant id -> the block of its revocation
        self.grants_for: dict[tuple[str, str], list[str]] = {}  # (grantee, cid) -> grant ids, oldest first
        self.granted_by: dict[str, list[str]] = {}  # owner -> its grant ids, oldest first
        # Accesses, each list oldest first (the chain's order), so that a query can read it backwards and stop.
        self.accesses: dict[str, list[Access]] = {}  # owner -> accesses to its records
        self.emergencies: dict[str, list[Access]] = {}  # owner -> its break-glass accesses
        self.accesses_by: dict[tuple[str, str], list[Access]] = {}  # (owner, member) -> accesses
        self.accesses_of: dict[str, list[Access]] = {}  # cid -> accesses
        self.access_count = 0

    def add_block(self, block: Block) -> None:
        for tx in block["transactions"]:
            self.add(tx, block["index"])

    def add(self, tx: Transaction, index: int) -> None:
        kind = transaction_kind(tx)
        if kind == RECORD and SIGNER in tx:
            self.records.setdefault(tx["ipfs_hash"], (index, tx))
        elif kind == GRANT:
            self.grants[tx["id"]] = (index, tx)
            self.granted_by.setdefault(tx[SIGNER], []).append(tx["id"])
            for entry in tx["records"]:
                self.grants_for.setdefault((tx["grantee"], entry["cid"]), []).append(tx["id"])
        elif kind == REVOKE:
            self.revoked.setdefault(tx["grant"], index)
        elif kind == ACCESS and tx["record"] in self.records:
            owner = self.records[tx["record"]][1][SIGNER]
            entry = Access(index, tx, self.access_count)
            self.access_count += 1
            self.accesses.setdefault(owner, []).append(entry)
            if tx["emergency"]:
                self.emergencies.setdefault(owner, []).append(entry)
            self.accesses_by.setdefault((owner, tx[SIGNER]), []).append(entry)
            self.accesses_of.setdefault(tx["record"], []).append(entry)

    def view(self, before: int) -> "ChainView":
        return ChainView(self, before)


class ChainView:
    """The chain as a block at index `before` sees it: what the index holds from earlier blocks, and what the
    blocks being checked added since (noted in order)."""

    def __init__(self, index: ConsentIndex, before: int) -> None:
        self.index, self.before = index, before
        self.records: dict[str, Transaction] = {}
        self.grants: dict[str, Transaction] = {}
        self.revoked: set[str] = set()

    def record(self, cid: str) -> Transaction | None:
        if cid in self.records:
            return self.records[cid]
        found = self.index.records.get(cid)
        return found[1] if found and found[0] < self.before else None

    def grant(self, grant_id: str) -> Transaction | None:
        if grant_id in self.grants:
            return self.grants[grant_id]
        found = self.index.grants.get(grant_id)
        return found[1] if found and found[0] < self.before else None

    def is_revoked(self, grant_id: str) -> bool:
        return grant_id in self.revoked or self.index.revoked.get(grant_id, self.before) < self.before

    def note(self, tx: Transaction) -> None:
        kind = transaction_kind(tx)
        if kind == RECORD and SIGNER in tx:
            self.records.setdefault(tx["ipfs_hash"], tx)
        elif kind == GRANT:
            self.grants[tx["id"]] = tx
        elif kind == REVOKE:
            self.revoked.add(tx["grant"])


def _text_problem(tx: Transaction, field: str, required: bool = False) -> str | None:
    value = tx[field]
    if not isinstance(value, str) or len(value) > MAX_TEXT_LENGTH or CONTROL_CHARACTER.search(value) or \
            (required and not value.strip()):
        return f"'{field}' must be {'non-empty ' if required else ''}text of at most {MAX_TEXT_LENGTH} characters"
    return None


def _keys_problem(tx: Transaction) -> str | None:
    keys = tx[KEYS]
    if not isinstance(keys, dict) or not 0 < len(keys) <= MAX_KEYS:
        return f"'keys' must map 1 to {MAX_KEYS} member ids to wrapped keys"
    for node_id, wrapped in keys.items():
        if not NODE_ID.fullmatch(node_id):
            return "'keys' holds something that is not a member id"
        try:
            WrappedKey.from_json(wrapped)
        except BadInput as exc:
            return f"'keys' holds a malformed wrapped key: {exc}"
    return None


def _grant_shape(tx: Transaction) -> str | None:
    if not isinstance(tx["grantee"], str) or not NODE_ID.fullmatch(tx["grantee"]):
        return "'grantee' must be a member's node id"
    records = tx["records"]
    if not isinstance(records, list) or not 0 < len(records) <= MAX_GRANT_RECORDS:
        return f"'records' must list 1 to {MAX_GRANT_RECORDS} records"
    for entry in records:
        if not isinstance(entry, dict) or set(entry) != {"cid", "key"} or not isinstance(entry["cid"], str) or \
                not is_cid(entry["cid"]):
            return "each of 'records' must be {\"cid\": a record's CID, \"key\": its key wrapped for the grantee}"
        try:
            WrappedKey.from_json(entry["key"])
        except BadInput as exc:
            return f"a grant holds a malformed wrapped key: {exc}"
    if len({entry["cid"] for entry in records}) != len(records):
        return "a grant names a record twice"
    if tx["expires"] != "" and not (isinstance(tx["expires"], str) and TIMESTAMP.fullmatch(tx["expires"])):
        return "'expires' must be \"\" (never) or a time like 2027-01-31 23:59:59.000000"
    return _text_problem(tx, "purpose")


def _admit_shape(tx: Transaction) -> str | None:
    if REPLACES in tx and not (isinstance(tx[REPLACES], str) and NODE_ID.fullmatch(tx[REPLACES])):
        return f"'{REPLACES}' must be the node id of the member the admission replaces"
    return None


def _revoke_shape(tx: Transaction) -> str | None:
    if not isinstance(tx["grant"], str) or not TRANSACTION_ID.fullmatch(tx["grant"]):
        return "'grant' must be a grant's id"
    return None


def _access_shape(tx: Transaction) -> str | None:
    if not isinstance(tx["record"], str) or not is_cid(tx["record"]):
        return "'record' must be a record's CID"
    if tx["outcome"] not in (OPENED, REFUSED):
        return f"'outcome' must be {OPENED!r} or {REFUSED!r}"
    if tx["grant"] != "" and not (isinstance(tx["grant"], str) and TRANSACTION_ID.fullmatch(tx["grant"])):
        return "'grant' must be a grant's id, or \"\""
    if type(tx["emergency"]) is not bool:
        return "'emergency' must be true or false"
    if not isinstance(tx["at"], str) or not TIMESTAMP.fullmatch(tx["at"]):
        return "'at' must be a time like 2027-01-31 23:59:59.000000"
    return _text_problem(tx, "reason") or _text_problem(tx, "purpose")


TYPE_SHAPES = {ADMIT: _admit_shape, GRANT: _grant_shape, REVOKE: _revoke_shape, ACCESS: _access_shape}


def _consent_problem(kind: str, tx: Transaction, state: LedgerState, view: ChainView) -> str | None:
    """What a record, grant, revocation or access refers to must exist on the chain, and be its signer's to give."""
    if kind == RECORD:
        earlier = view.record(tx["ipfs_hash"])
        return None if earlier is None or earlier[SIGNER] == tx[SIGNER] else \
            f"record {tx['ipfs_hash']} is {short_id(earlier[SIGNER])}'s already: another member cannot own it"
    if kind == GRANT:
        if tx["grantee"] not in state.members:
            return f"a grant to {short_id(tx['grantee'])}, not a member of this network"
        for entry in tx["records"]:
            record = view.record(entry["cid"])
            if record is None:
                return f"a grant of record {entry['cid']}, which is not on the chain (mine it first)"
            if record[SIGNER] != tx[SIGNER]:
                return (f"a grant of record {entry['cid']} by {short_id(tx[SIGNER])}: only its owner, "
                        f"{short_id(record[SIGNER])}, may grant it")
        return None
    if kind == REVOKE:
        grant = view.grant(tx["grant"])
        if grant is None:
            return f"a revocation of grant {tx['grant']}, which is not on the chain"
        if grant[SIGNER] != tx[SIGNER]:
            return f"a revocation of grant {tx['grant']} by {short_id(tx[SIGNER])}: only its owner may revoke it"
        return f"grant {tx['grant']} is revoked already" if view.is_revoked(tx["grant"]) else None
    if view.record(tx["record"]) is None:
        return f"an access to record {tx['record']}, which is not on the chain"
    return None


def _admission_problem(tx: Transaction, state: LedgerState) -> str | None:
    """Why an admission cannot join the members of `state`: not a valid member, one already in or removed before,
    a member to replace that is not one, or a node id, short id, URL or exchange key a remaining member holds."""
    try:
        member = Member.from_dict(tx["member"])
    except InvalidIdentity as exc:
        return f"an admission names no valid member: {exc}"
    if member.node_id in state.members:
        return f"an admission of {member.short_id}, already a member"
    if member.node_id in state.removed:
        return f"an admission of {member.short_id}, removed before: a removed key stays out (rotate it)"
    members = state.members
    replaced = tx.get(REPLACES)
    if replaced is not None:
        if replaced not in members:
            why = "removed already" if replaced in state.removed else "not a member"
            return f"an admission of {member.short_id} replacing {short_id(replaced)}, {why}"
        members = members.without_member(replaced)
    clash = members.clash(member)
    if clash is not None:
        what, other = clash
        value = f" {member.url}" if what == "url" else ""
        return (f"an admission of {member.short_id} with the {what}{value} of member {other.short_id} ({other.role}): "
                f"no two members share one (a new key of that member: name it in '{REPLACES}'; another node: "
                f"remove that member first, or give the new one its own)")
    return None


def _unsigned(tx: Transaction) -> Transaction:
    return {key: value for key, value in tx.items() if key != SIGNATURE}


def _signed_by(identity: PublicIdentity, value: Any, signature: Any, verified: Verified) -> bool:
    """Whether `signature` is `identity`'s over canonical_json(value): looked up in `verified`, else checked."""
    if verified:
        try:
            if (signature, canonical_json(value)) in verified:
                return True
        except (ValueError, RecursionError):
            return False
    return identity.verify(value, signature)


def check_signatures(items: list[tuple[bytes, bytes, bytes]]) -> list[bool]:
    """Whether each (Ed25519 public key, message, signature) holds; run in a mining process."""
    return [PublicIdentity.verify_raw(key, message, signature) for key, message, signature in items]


def block_signing_hash(block: Block) -> str:
    """What a miner signs: the hash of the block without its signature (so the signature covers the nonce)."""
    return hash_block({key: value for key, value in block.items() if key != SIGNATURE})


class SignedRules:
    """The rules of one signed network, and this node's means of signing by them."""

    def __init__(self, founding: Members, identity: Identity | None = None,
                 executor: Callable[[], Executor | None] | None = None) -> None:
        self.founding = founding
        self.identity = identity
        self.executor = executor  # processes to check many signatures ahead on (the node's mining processes)
        self.initial = LedgerState(founding)
        self.index = ConsentIndex()

    def index_block(self, block: Block) -> None:
        self.index.add_block(block)

    def reset_index(self) -> None:
        self.index.reset()

    def view(self, before: int) -> ChainView:
        return self.index.view(before)

    def emergency_members(self, state: LedgerState) -> list[Member]:
        """The members a record's key is also wrapped for, for break-glass access: those the members file names
        in its `emergency_members` setting, by node id or by role."""
        named = {name.strip() for name in str(self.founding.settings.get(EMERGENCY_SETTING, "")).split(",")
                 if name.strip()}
        return [member for member in state.members if member.node_id in named or member.role in named]

    # -- what the chain looks like ---------------------------------------------------------

    def genesis_fields(self) -> dict[str, Any]:
        """What the genesis block of this network carries beyond the paper's: the founding members' fingerprint."""
        return {"network": self.founding.fingerprint}

    def block_keys(self) -> frozenset[str]:
        return SIGNED_BLOCK_EXTRA

    # -- checking ------------------------------------------------------------------------

    def transaction_problem(self, tx: Any, state: LedgerState, verified: Verified = frozenset(),
                            view: ChainView | None = None) -> str | None:
        """Why `tx` may not join the chain in `state` (shape, signer, role, signature, meaning), or None.

        `verified`: signatures already checked (prechecked), by what they signed. `view`: the chain the
        transaction would join, for what it refers to (a grant's records, a revocation's grant); without one
        (the chain's lookups), only the transaction itself is judged."""
        if not isinstance(tx, dict):
            return "a transaction must be a JSON object"
        kind = transaction_kind(tx)
        if kind not in TYPE_ACTION:
            return f"unknown transaction type {str(kind)[:MAX_TEXT_LENGTH]!r}"
        problem = self._shape_problem(kind, tx)
        if problem:
            return problem
        problem, member = state.signer_problem(tx.get(SIGNER), TYPE_ACTION[kind], f"a {kind} transaction")
        if problem:
            return problem
        if not _signed_by(member.identity, _unsigned(tx), tx.get(SIGNATURE), verified):
            return f"a {kind} transaction carries a bad signature (it is not {member.short_id}'s, or was changed)"
        return self._meaning_problem(kind, tx, state, view)

    def _shape_problem(self, kind: str, tx: Transaction) -> str | None:
        if kind == RECORD:
            try:
                clean = check_transaction({key: value for key, value in tx.items()
                                           if key not in (SIGNER, SIGNATURE, KEYS)})
            except InvalidTransaction as exc:
                return f"a record is malformed: {exc}"
            extra = {SIGNER: tx.get(SIGNER), SIGNATURE: tx.get(SIGNATURE)} | ({KEYS: tx[KEYS]} if KEYS in tx else {})
            if {**clean, **extra} != tx or "id" not in tx:
                return "a record has a field of the wrong form, no id, or no signer and signature"
            return _keys_problem(tx) if KEYS in tx else None
        optional = OPTIONAL_FIELDS.get(kind, frozenset())
        if not TYPE_FIELDS[kind] <= set(tx) <= TYPE_FIELDS[kind] | optional:
            return f"a {kind} transaction must have exactly {', '.join(sorted(TYPE_FIELDS[kind]))}" + (
                f" (and may have {', '.join(sorted(optional))})" if optional else "")
        if not isinstance(tx["id"], str) or not TRANSACTION_ID.fullmatch(tx["id"]):
            return "'id' must be 32 lowercase hex digits"
        return TYPE_SHAPES[kind](tx) if kind in TYPE_SHAPES else None

    @staticmethod
    def _meaning_problem(kind: str, tx: Transaction, state: LedgerState, view: ChainView | None) -> str | None:
        if kind in (GRANT, REVOKE, ACCESS, RECORD) and view is not None:
            return _consent_problem(kind, tx, state, view)
        if kind == ADMIT:
            return _admission_problem(tx, state)
        if kind == REMOVE:
            if tx["node_id"] not in state.members:
                return f"a removal of {short_id(str(tx['node_id']))}, not a member"
        return None

    def apply(self, tx: Transaction, state: LedgerState) -> LedgerState:
        """The state after a checked transaction."""
        kind = transaction_kind(tx)
        if kind == ADMIT:
            members, removed = state.members, state.removed
            if REPLACES in tx:
                members, removed = members.without_member(tx[REPLACES]), removed | {tx[REPLACES]}
            return LedgerState(members.with_member(Member.from_dict(tx["member"])), removed)
        if kind == REMOVE:
            return LedgerState(state.members.without_member(tx["node_id"]), state.removed | {tx["node_id"]})
        return state

    def block_problem(self, block: Block, state: LedgerState, verified: Verified = frozenset(),
                      view: ChainView | None = None) -> tuple[str | None, LedgerState]:
        """Why `block` may not follow a chain in `state` (miner, signature, then each transaction in order),
        or (None, the state after it). `view`: the chain before the block, noting what the block adds."""
        problem, member = state.signer_problem(block.get(MINER), Action.MINE, "the block")
        if problem:
            return problem, state
        if not _signed_by(member.identity, block_signing_hash(block), block.get(SIGNATURE), verified):
            return f"the block carries a bad signature (it is not {member.short_id}'s, or was changed)", state
        for tx in block["transactions"]:
            problem = self.transaction_problem(tx, state, verified, view)
            if problem:
                return problem, state
            state = self.apply(tx, state)
            if view is not None:
                view.note(tx)
        return None, state

    def prechecked(self, blocks: list[Block], state: LedgerState) -> Verified:
        """The signatures of `blocks` by members of `state`, checked ahead on the mining processes when there
        are many (a node joining a long chain): those that hold. The checks in order still decide; they only
        skip the costly part for these."""
        executor = self.executor() if self.executor else None
        items: list[tuple[bytes, bytes, bytes, str]] = []
        for block in blocks:
            signed = [(block.get(MINER), block_signing_hash(block), block.get(SIGNATURE))]
            signed += [(tx.get(SIGNER), _unsigned(tx), tx.get(SIGNATURE)) for tx in block.get("transactions", ())
                       if isinstance(tx, dict)]
            for signer, value, signature in signed:
                member = state.members.get(signer) if isinstance(signer, str) else None
                try:
                    raw = b64decode(signature, SIGNATURE_SIZE, "signature")
                    message = canonical_json(value)
                except (ValueError, RecursionError):
                    continue
                if member is not None:
                    items.append((member.identity.signing_public_key, message, raw, signature))
        if executor is None or len(items) < PARALLEL_SIGNATURES:
            return frozenset()
        chunks = [items[start:start + SIGNATURES_PER_TASK] for start in range(0, len(items), SIGNATURES_PER_TASK)]
        results = executor.map(check_signatures, [[item[:3] for item in chunk] for chunk in chunks])
        return frozenset((item[3], item[1]) for chunk, good in zip(chunks, results)
                         for item, ok in zip(chunk, good) if ok)

    # -- this node's own standing -------------------------------------------------------------

    def own_problem(self, state: LedgerState, action: Action, what: str) -> str | None:
        """Why this node may not `what` (performing `action`) in `state`: it is not a member yet (admitted
        members run with the founding file too, and write once their chain holds their admission), it was
        removed, or its role may not. None if it may."""
        me, network = self.node_id, state.members.network
        member = state.members.get(me)
        if member is None and me in state.removed:
            return (f"this node ({short_id(me)}) was removed from the network {network}, so it may not {what}; "
                    f"a healthcare authority may admit a new key of it (rotate it, then POST /admit_member with "
                    f"'{REPLACES}' or after the removal)")
        if member is None:
            return (f"this node ({short_id(me)}) is not a member of the network {network} yet, so it may not "
                    f"{what}: a healthcare authority must admit it (POST /admit_member with this node's GET "
                    f"/identity; its id is {me}); it may write once that admission is mined and this node has "
                    f"synced it from a member")
        if not may(member.role, action):
            return f"this node ({member.short_id}) is a {member.role} member, whose role may not {what}"
        return None

    def mining_problem(self, state: LedgerState) -> str | None:
        """Why this node may not mine a block on a chain in `state`, or None (the chain asks before mining)."""
        return self.own_problem(state, Action.MINE, "mine a block")

    def standing(self, state: LedgerState) -> dict[str, Any]:
        """This node's membership in `state`, for /identity and /health: member (true/false), status (member,
        applicant or removed) and a message saying what to do."""
        me = self.node_id
        if me in state.members:
            member = state.members.get(me)
            return {"member": True, "status": "member",
                    "message": f"a member ({member.role}) of the network {state.members.network}"}
        return {"member": False, "status": "removed" if me in state.removed else "applicant",
                "message": self.own_problem(state, Action.MINE, "write")}

    # -- signing, as this node --------------------------------------------------------------

    def sign_transaction(self, tx: Transaction) -> Transaction:
        """`tx` with this node as its signer, and its signature."""
        unsigned = {key: value for key, value in tx.items() if key != SIGNATURE}
        unsigned[SIGNER] = self._identity().node_id
        return {**unsigned, SIGNATURE: self._identity().sign(unsigned)}

    def sign_block(self, block: Block) -> Block:
        """`block`, mined, with this node as its miner (already in it) and its signature."""
        return {**block, SIGNATURE: self._identity().sign(block_signing_hash(block))}

    @property
    def node_id(self) -> str:
        return self._identity().node_id

    def _identity(self) -> Identity:
        if self.identity is None:
            raise RuntimeError("these rules check others' writes only: they were given no identity to sign with")
        return self.identity
