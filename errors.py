"""Every error an emr-chain node raises on purpose, as one tree with no HTTP in it.

The message of each is for a person: it names the field, the file or the peer,
and what to do. app.py maps the tree to HTTP statuses in one table, the most
specific class winning (its nearest ancestor in the table, in method resolution
order); the command line maps it to exit codes. Anything else that escapes is a
bug, and only that is a 500.

A class with two parents names first what the failure means to a client
(NotFound, BadInput, Conflict) and second where it came from (IPFS, encryption).
"""
from __future__ import annotations

from pathlib import Path


class NodeError(Exception):
    """The root: every error below is something a user or an operator can act on."""


# -- the request ----------------------------------------------------------------

class BadInput(NodeError, ValueError):
    """A request value of the wrong form; the message names the field."""


class InvalidTransaction(BadInput):
    """A transaction does not have the required shape; the message names the field."""


class InvalidBlock(BadInput):
    """A block does not pass this node's checks; the message says which."""


class PathRefused(BadInput):
    """A user-supplied path or name that the node will not touch; the message says why."""


class PeerRefused(BadInput):
    """A peer address the operator did not allow, or not a node URL at all."""


class TooLarge(BadInput):
    """The request body is larger than the endpoint accepts; the message gives the limit."""


class UnsupportedMediaType(BadInput):
    """The request body is of a type the endpoint does not take; the message names the types it does."""


class MisdirectedRequest(NodeError):
    """The request names a host (Host header) this node does not answer to: a DNS-rebinding page, or a
    name the operator has not listed; the message names the host and the setting."""


class RequestTimeout(NodeError):
    """A client took too long to send its request (head or body); the message names the setting."""


class NotFound(NodeError):
    """Nothing matches the request."""


class Conflict(NodeError):
    """The request would overwrite or contradict something; the message says how to proceed."""


class Forbidden(NodeError):
    """This node, or this member, may not do what was asked; the message says who and what."""


class CrossOriginRefused(Forbidden):
    """A web page of another origin asked; the message names the origin and the setting that would allow it."""


class Unauthorized(NodeError):
    """The request lacks the network's API key, or carries a wrong one."""


class Busy(NodeError):
    """The node is at a limit it keeps to stay healthy (pending transactions, peers); try again later."""


# -- the node's own state -----------------------------------------------------------

class StateDamaged(NodeError):
    """The saved state cannot be loaded; the node must not start as if it were empty."""


# -- other nodes --------------------------------------------------------------------

class PeerError(NodeError):
    """A peer could not be reached, or answered something unusable."""


class PeerMisbehaved(PeerError):
    """A peer answered too much, too slowly, malformed or invalid: counted against it, and after repeated
    faults it is dropped."""


# -- IPFS ---------------------------------------------------------------------------

class IpfsError(NodeError):
    """An IPFS operation failed in a way not covered below."""


class IpfsUnreachable(IpfsError):
    """The daemon is not running where the node expects it, or broke off."""


class IpfsTimeout(IpfsError):
    """The daemon did not answer in time."""


class IpfsUnknownCid(NotFound, IpfsError):
    """No IPFS node reachable from the daemon had the content within the lookup timeout."""


class IpfsRefused(BadInput, IpfsError):
    """Kubo refused the request as malformed (a CID it cannot parse, a directory where a file is expected)."""


# -- encryption ---------------------------------------------------------------------

class CryptoError(NodeError):
    """An encryption or decryption failed; the message names the file, never the password."""

    reason = "encryption failed"

    def __init__(self, path: str | Path, reason: str | None = None) -> None:
        self.path = Path(path)
        self.reason = reason or self.reason
        super().__init__(f"{self.path}: {self.reason}")


class WrongPasswordError(CryptoError):
    reason = ("wrong password, or the file header is damaged "
              "(the AES Crypt format cannot tell these apart)")


class DamagedFileError(CryptoError):
    reason = "file is damaged or was tampered with"


class TruncatedFileError(CryptoError):
    reason = "file is truncated"


class NotAesCryptError(CryptoError):
    reason = "not an AES Crypt file"


class OutputExistsError(Conflict, CryptoError):
    reason = "output file already exists (use overwrite/--force to replace it)"


class InvalidPasswordError(CryptoError, ValueError):
    reason = "the password is empty or too long"


# -- identities and membership ---------------------------------------------------------

class IdentityError(StateDamaged):
    """This node's identity file cannot be used; the message names the file and what to do.

    The node must not start, and must never create a new identity over the file: its id is its membership.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"identity file {self.path}: {reason}")


class IdentityPassphraseError(IdentityError):
    """The identity file's passphrase is wrong, missing, or given for a file that has none."""


class IdentityExists(Conflict, IdentityError):
    """A file is already where an identity was to be written; nothing was written."""


class InvalidIdentity(BadInput):
    """A public identity, a member entry or a members list of the wrong form (the message names the entry and
    field), or a node id that is not the fingerprint of its signing key."""


class UnknownMember(NotFound):
    """No member of the network has this node id."""


class DuplicateMember(Conflict):
    """A member with this node id (or short id, or key) is already in the list."""


class NotAMember(Forbidden):
    """This node is not (or no longer) a member of its signed network, so it may not write (sign a transaction,
    mine a block); the message says which, and what to ask a healthcare authority for."""


class MembersFileError(StateDamaged):
    """The members file cannot be used; the message names the file, the entry and what to do."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"members file {self.path}: {reason}")


# -- record keys wrapped for members (keywrap.py) -----------------------------------

class KeyUnwrapError(Forbidden):
    """A wrapped record key does not open for this record and this member; the message names both, never a key.

    Under Forbidden (403) and not CryptoError: to a client it means this member holds no usable grant for this
    record, the same answer as a policy refusal, not a bad request. It is not a CryptoError because a
    CryptoError is a file operation that failed: it is built as (path, reason), and node.py rebuilds caught ones
    as `type(exc)(relative path, exc.reason)`, which has no meaning for a key that sits in a grant transaction.
    """

    reason = ("it was wrapped for another record, another grantee or another key, or it was altered "
              "(HPKE cannot tell these apart)")

    def __init__(self, cid: str, grantee: str, reason: str | None = None) -> None:
        self.cid = cid
        self.grantee = grantee
        self.reason = reason or self.reason
        super().__init__(f"record {cid}, grantee {grantee!r}: the wrapped key does not open: {self.reason}")


def all_errors(root: type[NodeError] = NodeError) -> list[type[NodeError]]:
    """Every class of the tree, root first (for the test that each maps to a status)."""
    found, stack = [], [root]
    while stack:
        kind = stack.pop()
        if kind not in found:
            found.append(kind)
            stack.extend(kind.__subclasses__())
    return found
