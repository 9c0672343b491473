"""The paper's proof-of-work chain of medical-record transactions, in plain Python.

A block is a dict with exactly index, timestamp, nonce, previous_hash and
transactions. A transaction records where an encrypted record lives on IPFS:
{"user_id", "ipfs_hash", "EHR_name"}, plus an "id" the node gives it and,
when known, the record's "file_name" and "file_size".

Two proofs of work are offered:
- "paper": the nonce n is the smallest positive integer for which
  sha256(str(n**2 - previous_nonce**2)) starts with DIFFICULTY zeros. It does
  not cover the block's content, and it depends only on the previous nonce:
  anyone can edit old transactions, keep every nonce and recompute the hash
  links for free. The fork choice below is what protects history in this mode.
- "content": the block's own hash must start with DIFFICULTY zeros, so no
  transaction of any block can change without mining that block and every
  block after it again.

Fork choice (the same in every mode): a chain that differs from ours anywhere
but in its last block is adopted only if it is strictly longer; at equal
length only a fork of the last block may win (the lower hash, so nodes that
mined at the same moment converge). A reorganisation that would drop more
than `finality_depth` of our blocks is refused: blocks that deep are final.

`Blockchain` is thread-safe: every accepted transaction ends up in exactly
one block, and concurrent mining never produces two blocks with one index.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import threading
import uuid
from datetime import datetime, timedelta
from itertools import count
from typing import Any, Callable, Iterable, NamedTuple, Protocol

from errors import Busy, InvalidTransaction, NotAMember

log = logging.getLogger("emr.chain")

Block = dict[str, Any]
Transaction = dict[str, Any]

GENESIS_INDEX = 1
GENESIS_NONCE = 1
GENESIS_PREVIOUS_HASH = "0"
PAPER_GENESIS_TIMESTAMP = "2020-09-02 23:31:41.258101"  # the paper's own genesis block (Fig. 4d)
BLOCK_KEYS = frozenset({"index", "timestamp", "nonce", "previous_hash", "transactions"})
SIGNATURE_FIELD = "signature"  # signed mode's blocks carry one (ledger.py); it is not covered by the content proof
TRANSACTION_KEYS = ("user_id", "ipfs_hash", "EHR_name")
OPTIONAL_TRANSACTION_KEYS = ("id", "file_name", "file_size")
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
MAX_TEXT_LENGTH = 256
MAX_TRANSACTIONS_PER_BLOCK = 10_000
MAX_INTEGER = 2**63 - 1  # nonces and indexes: far beyond any real chain, and always printable
DEFAULT_FINALITY_DEPTH = 100
DEFAULT_MAX_PENDING = 10_000
MAX_CLOCK_SKEW = timedelta(minutes=5)  # how far ahead of our clock a peer's block may be stamped
# Nonces searched per call of search_nonces (and per task of a mining process): large enough that
# a hand-off costs little, small enough that the first hit is not overshot by much.
NONCES_PER_TASK = 20_000

CID_V0 = re.compile(r"^Qm[1-9A-HJ-NP-Za-km-z]{44}$")
BASE58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
SHA2_256_PREFIX = b"\x12\x20"  # multihash: sha2-256, 32 bytes
CID_V0_BYTES = 34
MAX_VARINT_BITS = 63
CID_V1_BASE32 = re.compile(r"^b[a-z2-7]{58,}$")
TRANSACTION_ID = re.compile(r"^[0-9a-f]{32}$")
FILE_SIZE = re.compile(r"^[0-9]{1,19}$")
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f]")
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{6}$")  # str(datetime.now()), as the paper's


class Receipt(NamedTuple):
    index: int  # the block the transaction is in, or will be in once mined
    transaction: Transaction  # as recorded, with its id
    new: bool  # False if the id was already known: nothing was added


def hash_block(block: Block) -> str:
    """SHA-256 of the block's canonical JSON, as the next block's previous_hash."""
    return hashlib.sha256(json.dumps(block, sort_keys=True).encode()).hexdigest()


def _base58_decode(text: str) -> bytes:
    number = 0
    for char in text:
        number = number * 58 + BASE58_ALPHABET.index(char)
    leading = len(text) - len(text.lstrip(BASE58_ALPHABET[0]))
    return bytes(leading) + number.to_bytes((number.bit_length() + 7) // 8, "big")


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """(value, next position) of the unsigned varint at `at`; raises IndexError or ValueError if malformed."""
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > MAX_VARINT_BITS:
            raise ValueError("varint too long")


def is_cid(value: str) -> bool:
    """A well-formed CIDv0 (Qm..., base58btc sha2-256) or CIDv1 in Kubo's default base32 text form.

    The text is decoded and its multihash checked (the digest as long as it says), so a string that only
    looks like a CID is refused here as bad input rather than by Kubo.
    """
    if CID_V0.fullmatch(value):
        decoded = _base58_decode(value)
        return len(decoded) == CID_V0_BYTES and decoded.startswith(SHA2_256_PREFIX)
    if not CID_V1_BASE32.fullmatch(value):
        return False
    body = value[1:].upper()
    try:
        data = base64.b32decode(body + "=" * (-len(body) % 8))
        version, at = _varint(data, 0)
        _, at = _varint(data, at)  # the content codec
        _, at = _varint(data, at)  # the hash function
        length, at = _varint(data, at)
    except (ValueError, IndexError, binascii.Error):
        return False
    return version == 1 and length == len(data) - at and length > 0


def paper_proof_ok(nonce: int, previous_nonce: int, difficulty: int) -> bool:
    digest = hashlib.sha256(str(nonce**2 - previous_nonce**2).encode()).hexdigest()
    return digest.startswith("0" * difficulty)


def content_proof_ok(block: Block, difficulty: int) -> bool:
    """The block's hash (without a miner's signature, which signed mode adds after the search) has the zeros."""
    unsigned = {key: value for key, value in block.items() if key != SIGNATURE_FIELD} if SIGNATURE_FIELD in block \
        else block
    return hash_block(unsigned).startswith("0" * difficulty)


def content_template(block: Block) -> tuple[bytes, bytes]:
    """The block's canonical JSON split around its nonce, so a search only formats the number."""
    marker = "\x00nonce\x00"
    text = json.dumps({**block, "nonce": marker}, sort_keys=True)
    before, after = text.split(json.dumps(marker))
    return before.encode(), after.encode()


def search_nonces(start: int, stop: int, difficulty: int, previous_nonce: int | None,
                  template: tuple[bytes, bytes] | None) -> int | None:
    """The smallest nonce in [start, stop) that passes, or None. Runs in mining processes."""
    zeros = "0" * difficulty
    sha256 = hashlib.sha256
    if template is None:
        square = previous_nonce**2
        for nonce in range(start, stop):
            if sha256(str(nonce * nonce - square).encode()).hexdigest().startswith(zeros):
                return nonce
        return None
    before, after = template
    for nonce in range(start, stop):
        if sha256(before + str(nonce).encode() + after).hexdigest().startswith(zeros):
            return nonce
    return None


def proof_of_work(previous_nonce: int, difficulty: int, *, block: Block | None = None) -> int:
    """The smallest positive nonce that passes the proof, searched in this process.

    Paper proof when `block` is None, else the content proof over `block`.
    (mining.Miner finds the same nonce on several processes.)
    """
    template = content_template(block) if block is not None else None
    for start in count(1, NONCES_PER_TASK):
        found = search_nonces(start, start + NONCES_PER_TASK, difficulty, previous_nonce, template)
        if found is not None:
            return found
    raise AssertionError("unreachable: count() never ends")


# How a Blockchain finds a nonce: (previous nonce, difficulty, block for the content proof or None) -> nonce.
NonceSearch = Callable[..., int]


class Rules(Protocol):
    """What a network adds to the chain's own checks (ledger.SignedRules: members, signatures, roles).

    A state is whatever the rules track (who is a member); the chain keeps the state after each block, so
    blocks that fork from an earlier one are judged against the state there.
    """

    initial: Any

    def genesis_fields(self) -> dict[str, Any]: ...

    def block_keys(self) -> frozenset[str]: ...

    def transaction_problem(self, tx: Any, state: Any, verified: Any = ..., view: Any = ...) -> str | None: ...

    def apply(self, tx: Transaction, state: Any) -> Any: ...

    def block_problem(self, block: Block, state: Any, verified: Any = ..., view: Any = ...) -> tuple[str | None, Any]: ...

    def prechecked(self, blocks: list[Block], state: Any) -> Any: ...

    def mining_problem(self, state: Any) -> str | None: ...

    def index_block(self, block: Block) -> None: ...

    def reset_index(self) -> None: ...

    def view(self, before: int) -> Any: ...

    def sign_block(self, block: Block) -> Block: ...

    @property
    def node_id(self) -> str: ...


class Journal(Protocol):
    """Where a Blockchain writes each change before making it (store.Store is one): a change whose
    write fails is not made, so what the chain holds is always what the journal holds."""

    def add_pending(self, tx: Transaction) -> None: ...

    def append_block(self, block: Block) -> None: ...

    def replace_chain(self, keep: int, blocks: list[Block], pending: list[Transaction]) -> None: ...


def make_genesis(timestamp: str, extra: dict[str, Any] | None = None) -> Block:
    """The first block: the paper's, plus what a signed network binds into it (its members' fingerprint)."""
    return {"index": GENESIS_INDEX, "timestamp": timestamp, "nonce": GENESIS_NONCE,
            "previous_hash": GENESIS_PREVIOUS_HASH, "transactions": [], **(extra or {})}


def check_transaction(tx: Any) -> Transaction:
    """Return the transaction with only known fields; raise InvalidTransaction naming what is wrong."""
    if not isinstance(tx, dict):
        raise InvalidTransaction("a transaction must be a JSON object")
    unknown = set(tx) - set(TRANSACTION_KEYS) - set(OPTIONAL_TRANSACTION_KEYS)
    if unknown:
        raise InvalidTransaction(f"unknown field(s): {', '.join(sorted(unknown))}")
    for key in TRANSACTION_KEYS + ("file_name",):
        if key not in tx:
            if key == "file_name":
                continue
            raise InvalidTransaction(f"'{key}' is required")
        value = tx[key]
        if not isinstance(value, str):
            raise InvalidTransaction(f"'{key}' must be a string")
        if not value.strip():
            raise InvalidTransaction(f"'{key}' must not be empty")
        if len(value) > MAX_TEXT_LENGTH:
            raise InvalidTransaction(f"'{key}' is longer than {MAX_TEXT_LENGTH} characters")
        if CONTROL_CHARACTER.search(value):
            raise InvalidTransaction(f"'{key}' contains control characters")
    if not is_cid(tx["ipfs_hash"]):
        raise InvalidTransaction("'ipfs_hash' is not an IPFS CID (expected Qm... or b...)")
    if "/" in tx.get("file_name", "") or "\\" in tx.get("file_name", ""):
        raise InvalidTransaction("'file_name' must be a plain file name, without folders")
    if "file_size" in tx:
        size = tx["file_size"]
        if isinstance(size, bool) or not isinstance(size, (int, str)) or not FILE_SIZE.fullmatch(str(size)):
            raise InvalidTransaction("'file_size' must be a non-negative whole number")
    if "id" in tx and not (isinstance(tx["id"], str) and TRANSACTION_ID.fullmatch(tx["id"])):
        raise InvalidTransaction("'id' must be 32 lowercase hex digits")
    clean = {key: tx[key] for key in TRANSACTION_KEYS + OPTIONAL_TRANSACTION_KEYS if key in tx}
    if "file_size" in clean:
        clean["file_size"] = str(clean["file_size"])
    return clean


def _record_keys(name: str) -> set[str]:
    """Lookup keys of a name: itself and its stem ("MRI.pdf.aes" -> "mri.pdf.aes", "mri")."""
    folded = name.casefold()
    return {folded, folded.split(".", 1)[0]} if folded else set()


class Blockchain:
    """One node's chain and pending transactions."""

    def __init__(self, difficulty: int = 4, genesis_timestamp: str = PAPER_GENESIS_TIMESTAMP,
                 pow_mode: str = "paper", search: NonceSearch = proof_of_work, *,
                 finality_depth: int = DEFAULT_FINALITY_DEPTH, max_pending: int = DEFAULT_MAX_PENDING,
                 rules: Rules | None = None) -> None:
        if pow_mode not in ("paper", "content"):
            raise ValueError("pow_mode must be 'paper' or 'content'")
        self.difficulty = difficulty
        self.pow_mode = pow_mode
        self.finality_depth = finality_depth
        self.max_pending = max_pending
        self.journal: Journal | None = None  # set by a node that persists its state
        # Called with each block that joins the chain (mined, received, or taken from a peer), under the chain's
        # lock and in chain order: keep it quick (a node queues the block's records for pinning, say).
        self.on_block: Callable[[Block], None] = lambda block: None
        # Called with the transactions of dropped blocks that went back to pending after a reorganisation (under
        # the lock): the node tells its peers again, or they would wait for this node to mine them.
        self.on_requeued: Callable[[list[Transaction]], None] = lambda transactions: None
        self.rules = rules
        self.genesis = make_genesis(genesis_timestamp, rules.genesis_fields() if rules else None)
        self.search = search
        self._lock = threading.RLock()
        self._mine_lock = threading.Lock()
        self._chain: list[Block] = [self.genesis]
        self._states: list[Any] = [rules.initial if rules else None]  # the rules' state after each block
        self._pending: dict[str, Transaction] = {}
        self._tx_block: dict[str, int] = {}
        self._records: dict[str, list[tuple[int, Transaction]]] = {}
        self._newest_by_cid: dict[str, Transaction] = {}

    # -- reading -------------------------------------------------------------

    @property
    def chain(self) -> list[Block]:
        with self._lock:
            return list(self._chain)

    @property
    def pending(self) -> list[Transaction]:
        with self._lock:
            return list(self._pending.values())

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def __len__(self) -> int:
        with self._lock:
            return len(self._chain)

    def state(self) -> Any:
        """The rules' state after our last block (a signed network: who is a member), or None without rules."""
        with self._lock:
            return self._states[-1]

    def find_records(self, name: str) -> list[tuple[int, Transaction]]:
        """Mined records whose file name or EHR_name matches `name`, newest first.

        "MRI.pdf.aes" finds a record named "MRI" and "MRI" finds "MRI.pdf.aes";
        case does not matter.
        """
        with self._lock:
            found: dict[str, tuple[int, Transaction]] = {}
            for key in _record_keys(name):
                for index, tx in self._records.get(key, ()):
                    found[tx["id"]] = (index, tx)
        return sorted(found.values(), key=lambda item: item[0], reverse=True)

    def record_for_cid(self, cid: str) -> Transaction | None:
        """The newest mined record of this IPFS hash, if any."""
        with self._lock:
            return self._newest_by_cid.get(cid)

    def find_transaction(self, tx_id: str) -> int | None:
        """Block index holding the transaction, 0 if pending, None if unknown."""
        with self._lock:
            if tx_id in self._tx_block:
                return self._tx_block[tx_id]
            return 0 if tx_id in self._pending else None

    # -- validity ------------------------------------------------------------

    def proof_ok(self, block: Block, previous: Block) -> bool:
        if self.pow_mode == "content":
            return content_proof_ok(block, self.difficulty)
        return paper_proof_ok(block["nonce"], previous["nonce"], self.difficulty)

    def chain_problem(self, chain: Any) -> str | None:
        """Why `chain` is not a valid chain of this network, or None if it is."""
        return self._checked(chain)[0]

    def _checked(self, chain: Any) -> tuple[str | None, list[Any]]:
        """(why `chain` is not valid or None, the rules' state after each of its blocks)."""
        if not isinstance(chain, list) or not chain:
            return "the chain is not a non-empty list", []
        if chain[0] != self.genesis:
            return "the genesis block differs from this network's", []
        problem, states = self._blocks_problem(chain[1:], chain[0], GENESIS_INDEX + 1, self._states[0], set())
        return problem, [self._states[0], *states]

    def block_problem(self, block: Any, previous: Block) -> str | None:
        """Why `block` cannot follow `previous` by the chain's own checks (shape, index, link, time, proof of
        work), or None; the rules' checks come on top (_blocks_problem)."""
        problem = block_shape_problem(block, self.rules.block_keys() if self.rules else frozenset(),
                                      paper_transactions=self.rules is None)
        if problem:
            return problem
        if block["index"] != previous["index"] + 1:
            return f"index {block['index']} does not follow {previous['index']}"
        if block["previous_hash"] != hash_block(previous):
            return "previous_hash does not match the hash of the block before"
        if not _timestamp_follows(block["timestamp"], previous["timestamp"]):
            return "the timestamp is malformed, earlier than the block before, or in the future"
        if not self.proof_ok(block, previous):
            return "the nonce does not pass the proof of work"
        return None

    def _blocks_problem(self, blocks: list[Block], previous: Block, fork: int, state: Any,
                        earlier: set[str] | None = None) -> tuple[str | None, list[Any]]:
        """Why `blocks` cannot follow `previous` (block fork - 1, after which the rules' state is `state`), or
        None; and the state after each. Transaction ids may not repeat among them, nor ones of our blocks
        before `fork` (`earlier`: ids to check against instead, for a chain checked from its start)."""
        seen: set[str] = set()
        states: list[Any] = []
        verified = self.rules.prechecked(blocks, state) if self.rules else None
        view = self.rules.view(fork) if self.rules and earlier is None else \
            self.rules.view(GENESIS_INDEX + 1) if self.rules else None
        for block in blocks:
            problem = self.block_problem(block, previous)
            if not problem and self.rules:
                problem, state = self.rules.block_problem(block, state, verified, view)
            if problem:
                return f"block {block['index']}: {problem}", states
            ids = {tx["id"] for tx in block["transactions"]}
            repeated = ids & earlier if earlier is not None else \
                {tx_id for tx_id in ids if self._tx_block.get(tx_id, fork) < fork}
            if ids & seen or repeated:
                return f"block {block['index']}: repeats a transaction of an earlier block", states
            seen |= ids
            states.append(state)
            previous = block
        return None, states

    # -- changing ------------------------------------------------------------

    def add_transaction(self, tx: Transaction) -> Receipt:
        """Queue a transaction for the next block.

        A transaction whose id is already known is not added again (receipt.new is
        False), so retries and gossip are safe. With rules, it must pass them in the
        state after our last block (a signed network: its signer, role and signature).
        """
        checked_in = None
        if self.rules:
            if not isinstance(tx, dict) or not isinstance(tx.get("id"), str):
                raise InvalidTransaction("a transaction must be a JSON object with its 'id'")
            clean = tx
            if self.find_transaction(clean["id"]) is None:
                # Checked before taking the lock (a signature takes a while; others should not wait for it),
                # against the state after our last block; again under the lock only if that state changed.
                checked_in = self._states[-1]
                problem = self.rules.transaction_problem(clean, checked_in, view=self.rules.view(len(self._chain) + 1))
                if problem:
                    raise InvalidTransaction(problem)
        else:
            clean = check_transaction(tx)
            clean.setdefault("id", uuid.uuid4().hex)
        with self._lock:
            where = self.find_transaction(clean["id"])
            if where is None:
                if self.rules and self._states[-1] is not checked_in:
                    problem = self.rules.transaction_problem(clean, self._states[-1],
                                                             view=self.rules.view(len(self._chain) + 1))
                    if problem:
                        raise InvalidTransaction(problem)
                if len(self._pending) >= self.max_pending:
                    raise Busy(f"this node already holds {self.max_pending} pending transactions (max_pending); "
                               f"mine a block, or try again later")
                if self.journal:
                    self.journal.add_pending(clean)
                self._pending[clean["id"]] = clean
            return Receipt(where or len(self._chain) + 1, clean, where is None)

    def mine_block(self) -> Block:
        """Mine the pending transactions into a new block and append it.

        With rules, the block holds the pending transactions that are still valid in order (a signer
        removed since drops out), names this node as its miner and carries its signature; a node the rules
        do not let mine (not, or no longer, a member) gets NotAMember, and nothing changes.
        """
        with self._mine_lock:
            while True:
                with self._lock:
                    previous, state = self._chain[-1], self._states[-1]
                    problem = self.rules.mining_problem(state) if self.rules else None
                    if problem:
                        raise NotAMember(problem)
                    transactions, state = self._still_valid(list(self._pending.values()), state)
                block = {"index": previous["index"] + 1, "timestamp": _now_after(previous["timestamp"]),
                         "nonce": 0, "previous_hash": hash_block(previous), "transactions": transactions}
                if self.rules:
                    block["miner"] = self.rules.node_id
                block["nonce"] = self._search(block, previous)
                if self.rules:
                    block = self.rules.sign_block(block)
                with self._lock:
                    if self._chain[-1] is not previous:
                        continue  # a peer's block arrived meanwhile: mine on top of it
                    self._append(block, state)
                    return block

    def _still_valid(self, pending: list[Transaction], state: Any) -> tuple[list[Transaction], Any]:
        """The pending transactions for a block (at most MAX_TRANSACTIONS_PER_BLOCK), and the rules' state after
        them. Caller holds the lock; those the rules no longer accept leave the pending list."""
        if not self.rules:
            return pending[:MAX_TRANSACTIONS_PER_BLOCK], state
        taken, view = [], self.rules.view(len(self._chain) + 1)
        for tx in pending:
            if len(taken) == MAX_TRANSACTIONS_PER_BLOCK:
                break
            problem = self.rules.transaction_problem(tx, state, view=view)
            if problem:
                self._pending.pop(tx["id"], None)
                log.warning("pending transaction %s dropped: %s", tx["id"], problem)
                continue
            taken.append(tx)
            state = self.rules.apply(tx, state)
            view.note(tx)
        return taken, state

    def _search(self, block: Block, previous: Block) -> int:
        if self.pow_mode == "content":
            return self.search(previous["nonce"], self.difficulty, block=block)
        return self.search(previous["nonce"], self.difficulty)

    def _append(self, block: Block, state: Any) -> None:
        """Append a checked block, after which the rules' state is `state`; caller holds the lock."""
        if self.journal:
            self.journal.append_block(block)
        self._chain.append(block)
        self._states.append(state)
        self._index_block(block)
        for tx in block["transactions"]:
            self._pending.pop(tx["id"], None)
        self.on_block(block)

    def _index_block(self, block: Block) -> None:
        if self.rules:
            self.rules.index_block(block)
        for tx in block["transactions"]:
            self._tx_block[tx["id"]] = block["index"]
            if "ipfs_hash" not in tx:
                continue  # not a record (a signed network's membership change)
            self._newest_by_cid[tx["ipfs_hash"]] = tx
            for key in _record_keys(tx["EHR_name"]) | _record_keys(tx.get("file_name", "")):
                self._records.setdefault(key, []).append((block["index"], tx))

    def receive_block(self, block: Any) -> str:
        """Take a block a peer announced.

        Returns "appended", "known" (we have it), "invalid", or "behind" (it does not
        follow our last block: the caller should sync with that peer).
        """
        return self.take_block(block)[0]

    def take_block(self, block: Any) -> tuple[str, str | None]:
        """receive_block's outcome, and for an invalid block what is wrong with it."""
        problem = block_shape_problem(block, self.rules.block_keys() if self.rules else frozenset(),
                                      paper_transactions=self.rules is None)
        if problem:
            return "invalid", problem
        with self._lock:
            last = self._chain[-1]
            if block["index"] <= last["index"]:
                return ("known" if self._chain[block["index"] - 1] == block else "behind"), None
            if block["index"] > last["index"] + 1 or block["previous_hash"] != hash_block(last):
                return "behind", None  # it extends blocks we do not hold: a fork, or we missed some
            problem, states = self._blocks_problem([block], last, block["index"], self._states[-1])
            if problem:
                return "invalid", problem
            self._append(block, states[0])
            return "appended", None

    def blocks_from(self, index: int, max_bytes: int) -> list[Block]:
        """Our blocks from `index` on, as many as fit in about `max_bytes` of JSON (at least one)."""
        with self._lock:
            chain = self._chain
        page, size = [], 0
        for block in chain[max(index, GENESIS_INDEX) - 1:]:
            size += len(json.dumps(block))
            if page and size > max_bytes:
                break
            page.append(block)
        return page

    def replace_chain(self, candidate: Any) -> tuple[bool, str]:
        """Adopt a whole chain a peer holds, if the fork choice prefers it and it is valid.

        Returns (replaced, why). Only the blocks after the last one we share are checked:
        our own are valid already.
        """
        if not isinstance(candidate, list) or not candidate or not isinstance(candidate[-1], dict):
            return False, "invalid: the chain is not a non-empty list of blocks"
        if candidate[0] != self.genesis:
            return False, "invalid: the genesis block differs from this network's"
        ours = self.chain
        shared = 1
        while shared < min(len(ours), len(candidate)) and candidate[shared] == ours[shared]:
            shared += 1
        if shared == len(candidate):
            return False, f"a chain of length {len(candidate)} is not preferred over ours ({len(ours)})"
        return self.adopt(candidate[shared:])

    def adopt(self, blocks: list[Any]) -> tuple[bool, str]:
        """Take a peer's blocks from some index on, in place of ours from there, if the fork choice prefers
        them and they are valid on top of the block of ours before them.

        Returns (replaced, why); `why` starts with "invalid" when the blocks themselves are wrong, and
        with "refused" when they are a reorganisation deeper than the finality depth. Transactions of our
        pending list or of our dropped blocks that the new blocks do not hold stay pending: nothing is
        lost or duplicated.
        """
        for block in blocks:
            problem = block_shape_problem(block, self.rules.block_keys() if self.rules else frozenset(),
                                          paper_transactions=self.rules is None)
            if problem:
                return False, f"invalid: {problem}"
        while True:
            ours = self.chain
            skip = 0
            while skip < len(blocks) and blocks[skip]["index"] <= len(ours) and \
                    ours[blocks[skip]["index"] - 1] == blocks[skip]:
                skip += 1
            new = blocks[skip:]
            if not new:
                return False, f"no block that we do not hold already (ours: {len(ours)})"
            fork = new[0]["index"]
            if fork < GENESIS_INDEX + 1 or fork > len(ours) + 1:
                return False, f"invalid: the blocks start at index {fork}, which does not follow any block of ours"
            verdict = self._fork_verdict(ours, fork, new)
            if verdict:
                return False, verdict
            with self._lock:
                state = self._states[fork - 2]
            problem, states = self._blocks_problem(new, ours[fork - 2], fork, state)
            if problem:
                return False, f"invalid: {problem}"
            with self._lock:
                if self._chain != ours:
                    continue  # we mined or took a block meanwhile: judge the fork again against that
                dropped = self._chain[fork - 1:]
                if dropped:
                    self._reorganise(fork, new, states)
                else:
                    for block, after in zip(new, states):
                        self._append(block, after)
                return True, f"adopted a chain of length {fork - 1 + len(new)}" + (
                    f", dropping our last {len(dropped)} block(s)" if dropped else "")

    def _fork_verdict(self, ours: list[Block], fork: int, new: list[Block]) -> str | None:
        """Why `new` (differing from `ours` from index `fork` on) is not preferred, or None if it is."""
        length, dropped = fork - 1 + len(new), len(ours) - (fork - 1)
        if length < len(ours) or (length == len(ours) and (
                dropped != 1 or hash_block(new[-1]) >= hash_block(ours[-1]))):
            return f"a chain of length {length} is not preferred over ours ({len(ours)})"
        if dropped > self.finality_depth:
            return (f"refused: it would drop our last {dropped} blocks, deeper than the finality depth "
                    f"({self.finality_depth}); blocks that deep are final here")
        return None

    def _reorganise(self, fork: int, new: list[Block], states: list[Any]) -> None:
        """Replace our blocks from index `fork` on by `new`; transactions of the dropped blocks that `new`
        does not hold go back to pending, after ours. Caller holds the lock."""
        in_new = {tx["id"] for block in new for tx in block["transactions"]}
        dropped = [tx for block in self._chain[fork - 1:] for tx in block["transactions"]]
        pending: dict[str, Transaction] = {}
        for tx in dropped + list(self._pending.values()):
            if tx["id"] not in in_new and self._tx_block.get(tx["id"], fork) >= fork:
                pending.setdefault(tx["id"], tx)
        if self.journal:
            self.journal.replace_chain(fork - 1, new, list(pending.values()))
        self._load(self._chain[:fork - 1] + new, self._states[:fork - 1] + states)
        self._pending = pending
        requeued = [tx for tx in dropped if tx["id"] in pending]
        if requeued:
            self.on_requeued(requeued)
        for block in new:
            self.on_block(block)

    def _load(self, chain: list[Block], states: list[Any]) -> None:
        """Make a checked chain ours, with the rules' state after each block and its indexes; caller holds
        the lock."""
        self._chain, self._states = list(chain), list(states)
        self._tx_block, self._records, self._newest_by_cid, self._pending = {}, {}, {}, {}
        if self.rules:
            self.rules.reset_index()
        for block in self._chain:
            self._index_block(block)

    def restore(self, chain: list[Block], pending: Iterable[Transaction]) -> None:
        """Load a saved state; raises ValueError naming the problem if it is not valid."""
        problem, states = self._checked(chain)
        if problem:
            raise ValueError(problem)
        with self._lock:
            self._load(chain, states)
            for tx in pending:
                self.add_transaction(tx)


def block_shape_problem(block: Any, extra_keys: frozenset[str] = frozenset(), *,
                        paper_transactions: bool = True) -> str | None:
    """What is wrong with a block on its own (fields, types, transactions), or None.

    `extra_keys`: what a network's rules add to every block (a signed one: its miner and signature).
    paper_transactions=False leaves the transactions' form to the rules (signed ones have more fields)."""
    if not isinstance(block, dict) or set(block) != BLOCK_KEYS | extra_keys:
        return f"a block must have exactly {', '.join(sorted(BLOCK_KEYS | extra_keys))}"
    if type(block["index"]) is not int or block["index"] < GENESIS_INDEX:
        return "the index is not a positive integer"
    if type(block["nonce"]) is not int or block["nonce"] < 1:
        return "the nonce is not a positive integer"
    if block["nonce"] > MAX_INTEGER or block["index"] > MAX_INTEGER:
        return f"the index or nonce is larger than {MAX_INTEGER}"
    if not isinstance(block["previous_hash"], str) or not isinstance(block["timestamp"], str):
        return "previous_hash and timestamp must be strings"
    transactions = block["transactions"]
    if not isinstance(transactions, list) or len(transactions) > MAX_TRANSACTIONS_PER_BLOCK:
        return "transactions is not a list of acceptable length"
    for tx in transactions:
        if not paper_transactions:
            if not isinstance(tx, dict) or not isinstance(tx.get("id"), str):
                return "a transaction is not an object with an id"
            continue
        try:
            clean = check_transaction(tx)
        except InvalidTransaction as exc:
            return f"a transaction is malformed: {exc}"
        if clean != tx or "id" not in tx:
            return "a transaction has a field of the wrong form or no id"
    if len({tx["id"] for tx in transactions}) != len(transactions):
        return "a transaction appears twice"
    return None


def _timestamp_follows(timestamp: str, previous: str) -> bool:
    """Well formed, not before the previous block's, and not in the future beyond clock skew."""
    if not TIMESTAMP.fullmatch(timestamp) or not TIMESTAMP.fullmatch(previous):
        return False
    try:  # fromisoformat reads exactly this form, several times faster than strptime
        stamp = datetime.fromisoformat(timestamp)
        return datetime.fromisoformat(previous) <= stamp <= datetime.now() + MAX_CLOCK_SKEW
    except ValueError:
        return False


def _now_after(previous: str) -> str:
    """str(datetime.now()), as in the paper, never earlier than the previous block's."""
    now = datetime.now()
    try:
        now = max(now, datetime.fromisoformat(previous))
    except ValueError:
        pass
    return now.strftime(TIMESTAMP_FORMAT)
