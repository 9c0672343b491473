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
whose fingerprint is in the genesis block, so nodes with different files refuse each other's chains at once.
Later a healthcare authority admits or removes a member with a signed transaction. A removed member's later
writes are refused; what it wrote before stays valid. The state after each block is kept beside the chain
(`LedgerState`, immutable), so a fork is judged against the state at its fork point.
"""
from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable

from blockchain import MAX_TEXT_LENGTH, TRANSACTION_ID, Block, Transaction, check_transaction, hash_block
from canonical import canonical_json
from errors import InvalidIdentity, InvalidTransaction
from identity import NODE_ID, SIGNATURE_SIZE, Identity, PublicIdentity, b64decode, short_id
from members import Member, Members
from policy import Action, may

SIGNER = "signer"
SIGNATURE = "signature"
MINER = "miner"
TYPE = "type"
RECORD, ADMIT, REMOVE = "record", "admit", "remove"
# The action of policy.py each kind of transaction performs: its signer's role must be allowed it.
TYPE_ACTION: dict[str, Action] = {RECORD: Action.RECORD, ADMIT: Action.ADMIT, REMOVE: Action.ADMIT}
TYPE_FIELDS: dict[str, frozenset[str]] = {
    ADMIT: frozenset({TYPE, "id", "member", SIGNER, SIGNATURE}),
    REMOVE: frozenset({TYPE, "id", "node_id", SIGNER, SIGNATURE}),
}
SIGNED_BLOCK_EXTRA = frozenset({MINER, SIGNATURE})
# Joining a long chain means checking a signature or two per block. From this many on, they are checked ahead in
# the mining processes (both cores); fewer cost less checked on the spot than handed over.
PARALLEL_SIGNATURES = 256
SIGNATURES_PER_TASK = 512
Verified = frozenset  # of (signature, signed bytes): checked ahead, not checked again

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

    # -- what the chain looks like ---------------------------------------------------------

    def genesis_fields(self) -> dict[str, Any]:
        """What the genesis block of this network carries beyond the paper's: the founding members' fingerprint."""
        return {"network": self.founding.fingerprint}

    def block_keys(self) -> frozenset[str]:
        return SIGNED_BLOCK_EXTRA

    # -- checking ------------------------------------------------------------------------

    def transaction_problem(self, tx: Any, state: LedgerState, verified: Verified = frozenset()) -> str | None:
        """Why `tx` may not join the chain in `state` (shape, signer, role, signature, meaning), or None.

        `verified`: signatures already checked (prechecked), by what they signed."""
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
        return self._meaning_problem(kind, tx, state)

    def _shape_problem(self, kind: str, tx: Transaction) -> str | None:
        if kind == RECORD:
            try:
                clean = check_transaction({key: value for key, value in tx.items() if key not in (SIGNER, SIGNATURE)})
            except InvalidTransaction as exc:
                return f"a record is malformed: {exc}"
            if {**clean, SIGNER: tx.get(SIGNER), SIGNATURE: tx.get(SIGNATURE)} != tx or "id" not in tx:
                return "a record has a field of the wrong form, no id, or no signer and signature"
            return None
        if set(tx) != TYPE_FIELDS[kind]:
            return f"a {kind} transaction must have exactly {', '.join(sorted(TYPE_FIELDS[kind]))}"
        if not isinstance(tx["id"], str) or not TRANSACTION_ID.fullmatch(tx["id"]):
            return "'id' must be 32 lowercase hex digits"
        return None

    @staticmethod
    def _meaning_problem(kind: str, tx: Transaction, state: LedgerState) -> str | None:
        if kind == ADMIT:
            try:
                member = Member.from_dict(tx["member"])
            except InvalidIdentity as exc:
                return f"an admission names no valid member: {exc}"
            if member.node_id in state.members:
                return f"an admission of {member.short_id}, already a member"
            if member.node_id in state.removed:
                return f"an admission of {member.short_id}, removed before: a removed key stays out (rotate it)"
        elif kind == REMOVE:
            if tx["node_id"] not in state.members:
                return f"a removal of {short_id(str(tx['node_id']))}, not a member"
        return None

    def apply(self, tx: Transaction, state: LedgerState) -> LedgerState:
        """The state after a checked transaction."""
        kind = transaction_kind(tx)
        if kind == ADMIT:
            return LedgerState(state.members.with_member(Member.from_dict(tx["member"])), state.removed)
        if kind == REMOVE:
            return LedgerState(state.members.without_member(tx["node_id"]), state.removed | {tx["node_id"]})
        return state

    def block_problem(self, block: Block, state: LedgerState,
                      verified: Verified = frozenset()) -> tuple[str | None, LedgerState]:
        """Why `block` may not follow a chain in `state` (miner, signature, then each transaction in order),
        or (None, the state after it)."""
        problem, member = state.signer_problem(block.get(MINER), Action.MINE, "the block")
        if problem:
            return problem, state
        if not _signed_by(member.identity, block_signing_hash(block), block.get(SIGNATURE), verified):
            return f"the block carries a bad signature (it is not {member.short_id}'s, or was changed)", state
        for tx in block["transactions"]:
            problem = self.transaction_problem(tx, state, verified)
            if problem:
                return problem, state
            state = self.apply(tx, state)
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
