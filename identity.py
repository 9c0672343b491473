"""A node's identity: the keys that make it a member of a permissioned network, and the file that keeps them.

An identity is two key pairs:
- an Ed25519 signing key (RFC 8032, pure Ed25519, no context): it signs transactions and blocks, and its
  public key names the node;
- an X25519 exchange key (RFC 7748): others wrap record keys to it (HPKE, later).

The node id is the fingerprint of the signing public key: SHA-256 of its raw 32 bytes, in lowercase
RFC 4648 base32 without padding (52 characters, [a-z2-7]). The short id is its first 8 characters as
"abcd-efgh", to read aloud; it is for conversation, never for checking (compare whole ids). Rotating the
signing key therefore changes the node id: the membership side records the change.

Public keys travel as base64url without padding of their raw 32 bytes (43 characters), signatures as
base64url of their raw 64 bytes (86 characters). Decoding is strict: one string per key or signature.

A signature covers canonical.canonical_json(value) (see canonical.py): whatever JSON text carried the
value, the same value verifies.

The identity file (0600, written atomically, never over an existing file) is JSON:
    {"format": "emr-chain identity", "version": 1, "node_id": ..., "created": "...Z",
     "signing_public_key": base64url, "exchange_public_key": base64url, "protected": true,
     "signing_private_key": PKCS#8 PEM, "exchange_private_key": PKCS#8 PEM}
With a passphrase the private keys are PKCS#8 "ENCRYPTED PRIVATE KEY"s (PBES2: scrypt N=2**17, r=8, p=1,
then AES-256-GCM, which also detects a wrong passphrase; OpenSSL 3.0 reads neither GCM here nor scrypt above
32 MiB, so use this module to open them); without one, plain PKCS#8, kept safe by the file mode alone.
The passphrase is taken as UTF-8 of its NFC form.
The public keys and id are in clear, so a file's id can be shown without its passphrase, and a load checks
that they match the private keys.

Command line (no passphrase on the command line: EMR_IDENTITY_PASSPHRASE, else asked):
    python identity.py show PATH         # the public identity, without the passphrase
    python identity.py passphrase PATH   # set, change or remove the passphrase (EMR_IDENTITY_NEW_PASSPHRASE)
"""
from __future__ import annotations

import argparse
import base64
import binascii
import getpass
import hashlib
import json
import logging
import os
import re
import stat
import sys
import unicodedata
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, NamedTuple

try:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey as OpenSslEd25519Private
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey as OpenSslEd25519
except ImportError:  # pycryptodome signs and verifies alone, more slowly
    OpenSslEd25519 = OpenSslEd25519Private = None  # type: ignore[assignment,misc]

from Crypto import IncorrectPassphraseError, KdfLimitError, PassphraseRequiredError
from Crypto.Protocol import DH
from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa

from canonical import canonical_json
from errors import IdentityError, IdentityExists, IdentityPassphraseError, InvalidIdentity
from policy import canonical_role

log = logging.getLogger(__name__)

FORMAT = "emr-chain identity"
VERSION = 1
PASSPHRASE_ENV = "EMR_IDENTITY_PASSPHRASE"
NEW_PASSPHRASE_ENV = "EMR_IDENTITY_NEW_PASSPHRASE"
PROTECTION = "scryptAndAES256-GCM"
SCRYPT_COST = 2**17  # OWASP's scrypt minimum (128 MiB, r=8, p=1): about 0.25 s for each of the two keys
MAX_FILE_SIZE = 64 * 1024
KEY_SIZE = 32
SIGNATURE_SIZE = 64
NODE_ID = re.compile(r"^[a-z2-7]{52}$")
FILE_FIELDS = frozenset({"format", "version", "node_id", "created", "signing_public_key",
                         "exchange_public_key", "protected", "signing_private_key", "exchange_private_key"})
PUBLIC_FIELDS = ("node_id", "signing_public_key", "exchange_public_key")
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")


# -- encodings --------------------------------------------------------------------------

def b64encode(raw: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64decode(text: Any, size: int, what: str) -> bytes:
    """Strict base64url without padding of exactly `size` bytes; ValueError naming `what` otherwise.

    Only the one string b64encode gives is accepted (no padding, no other alphabet, no stray bits), so a
    key or a signature cannot be re-spelled into a different string that decodes the same.
    """
    if not isinstance(text, str) or not _B64URL.fullmatch(text):
        raise ValueError(f"{what} must be base64url without padding (A-Z a-z 0-9 - _)")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64url") from None
    if len(raw) != size or b64encode(raw) != text:
        raise ValueError(f"{what} must encode exactly {size} bytes")
    return raw


def fingerprint(signing_public_key: bytes) -> str:
    """The node id of a raw Ed25519 public key: lowercase base32 of its SHA-256, no padding (52 chars)."""
    digest = hashlib.sha256(signing_public_key).digest()
    return base64.b32encode(digest).decode("ascii").rstrip("=").lower()


def short_id(node_id: str) -> str:
    """"abcd-efgh": the first 8 characters of a node id, to read aloud (never enough to check one)."""
    return f"{node_id[:4]}-{node_id[4:8]}"


# -- public identities --------------------------------------------------------------------

@dataclass(frozen=True)
class PublicIdentity:
    """What others know of a node: its id and its two public keys (raw 32 bytes each).

    Build one with from_keys or from_dict: both check that the node id is the signing key's fingerprint
    and that the keys are usable points.
    """

    node_id: str
    signing_public_key: bytes
    exchange_public_key: bytes

    @classmethod
    def from_keys(cls, signing_public_key: bytes, exchange_public_key: bytes) -> PublicIdentity:
        public = cls(fingerprint(signing_public_key), bytes(signing_public_key), bytes(exchange_public_key))
        public._check_keys()
        return public

    @classmethod
    def from_dict(cls, data: Any) -> PublicIdentity:
        """From {"node_id", "signing_public_key", "exchange_public_key"} (base64url); other keys are ignored.

        Raises InvalidIdentity naming the field.
        """
        if not isinstance(data, dict):
            raise InvalidIdentity("an identity must be a JSON object")
        for field in PUBLIC_FIELDS:
            if field not in data:
                raise InvalidIdentity(f"'{field}' is required")
        node_id = data["node_id"]
        if not isinstance(node_id, str) or not NODE_ID.fullmatch(node_id):
            raise InvalidIdentity("'node_id' must be 52 characters of lowercase base32 (a-z, 2-7)")
        try:
            signing = b64decode(data["signing_public_key"], KEY_SIZE, "'signing_public_key'")
            exchange = b64decode(data["exchange_public_key"], KEY_SIZE, "'exchange_public_key'")
        except ValueError as exc:
            raise InvalidIdentity(str(exc)) from None
        if fingerprint(signing) != node_id:
            raise InvalidIdentity(f"'node_id' {short_id(node_id)} is not the fingerprint of its signing key "
                                  f"(that would be {short_id(fingerprint(signing))}): the id or the key was "
                                  "altered or mixed up with another node's")
        if "short_id" in data and data["short_id"] != short_id(node_id):
            raise InvalidIdentity(f"'short_id' {data['short_id']!r} does not match the node id "
                                  f"({short_id(node_id)})")
        public = cls(node_id, signing, exchange)
        public._check_keys()
        return public

    def to_dict(self) -> dict[str, str]:
        return {"node_id": self.node_id, "signing_public_key": b64encode(self.signing_public_key),
                "exchange_public_key": b64encode(self.exchange_public_key)}

    @property
    def short_id(self) -> str:
        return short_id(self.node_id)

    def verify(self, value: Any, signature: Any) -> bool:
        """Whether `signature` (base64url) is this node's signature over canonical_json(value).

        False for a malformed signature and for a value that has no canonical form (nobody can have
        signed it); never raises for what a peer sends.
        """
        try:
            message = canonical_json(value)
        except (ValueError, RecursionError):
            return False
        return self.verify_bytes(message, signature)

    def verify_bytes(self, message: bytes, signature: Any) -> bool:
        """Whether `signature` (base64url, or the raw 64 bytes) is this node's Ed25519 signature of `message`."""
        try:
            raw = signature if isinstance(signature, bytes) else b64decode(signature, SIGNATURE_SIZE, "signature")
        except (ValueError, TypeError):
            return False
        if len(raw) != SIGNATURE_SIZE:
            return False
        return self._verifier(raw, message)

    @staticmethod
    def verify_raw(signing_public_key: bytes, message: bytes, signature: bytes) -> bool:
        """Whether `signature` (raw 64 bytes) by the raw Ed25519 key holds over `message` (no identity checks:
        for keys that are already a member's)."""
        if OpenSslEd25519 is not None:
            try:
                OpenSslEd25519.from_public_bytes(signing_public_key).verify(signature, message)
            except (InvalidSignature, ValueError):
                return False
            return True
        try:
            eddsa.new(eddsa.import_public_key(signing_public_key), "rfc8032").verify(message, signature)
        except ValueError:
            return False
        return True

    def exchange_key(self) -> ECC.EccKey:
        """The X25519 public key, for HPKE (Crypto.Protocol.HPKE.new(receiver_key=...))."""
        return DH.import_x25519_public_key(self.exchange_public_key)

    @cached_property
    def _verifier(self) -> Callable[[bytes, bytes], bool]:
        """(signature, message) -> valid. OpenSSL's Ed25519 (through `cryptography`) verifies about three times
        faster than pycryptodome's, which matters when a node checks every signature of a long chain it joins;
        pycryptodome's stands in where `cryptography` is missing. Both follow RFC 8032."""
        if OpenSslEd25519 is not None:
            key = OpenSslEd25519.from_public_bytes(self.signing_public_key)

            def verify(raw: bytes, message: bytes) -> bool:
                try:
                    key.verify(raw, message)
                except InvalidSignature:
                    return False
                return True
            return verify
        verifier = eddsa.new(eddsa.import_public_key(self.signing_public_key), "rfc8032")

        def verify_slowly(raw: bytes, message: bytes) -> bool:
            try:
                verifier.verify(message, raw)
            except ValueError:
                return False
            return True
        return verify_slowly

    def _check_keys(self) -> None:
        """Refuse keys that are not points, or are points of small order (they would let anyone forge
        signatures that verify, or leak nothing but let a key exchange land on a known secret)."""
        if len(self.signing_public_key) != KEY_SIZE or len(self.exchange_public_key) != KEY_SIZE:
            raise InvalidIdentity(f"public keys must be {KEY_SIZE} bytes")
        try:
            point = eddsa.import_public_key(self.signing_public_key).pointQ
        except ValueError:
            raise InvalidIdentity("'signing_public_key' is not an Ed25519 public key") from None
        if (point * 8).is_point_at_infinity():
            raise InvalidIdentity("'signing_public_key' is a point of small order, not a real key")
        try:
            DH.import_x25519_public_key(self.exchange_public_key)
        except ValueError:
            raise InvalidIdentity("'exchange_public_key' is not a usable X25519 public key") from None

    def __repr__(self) -> str:
        return f"PublicIdentity({self.short_id})"


# -- identities ---------------------------------------------------------------------------

class Identity:
    """A node's private keys: Ed25519 to sign, X25519 to receive wrapped keys."""

    def __init__(self, signing_key: ECC.EccKey, exchange_key: ECC.EccKey) -> None:
        if signing_key.curve != "Ed25519" or not signing_key.has_private():
            raise ValueError("the signing key must be a private Ed25519 key")
        if exchange_key.curve != "Curve25519" or not exchange_key.has_private():
            raise ValueError("the exchange key must be a private X25519 key")
        self._signing_key = signing_key
        self._exchange_key = exchange_key
        # OpenSSL's Ed25519 (through `cryptography`) signs about five times faster than pycryptodome's, which a
        # node signing every record it adds feels under load; both give the same signature (RFC 8032 is
        # deterministic).
        self._sign = OpenSslEd25519Private.from_private_bytes(signing_key.seed).sign \
            if OpenSslEd25519Private is not None else eddsa.new(signing_key, "rfc8032").sign
        self._public = PublicIdentity.from_keys(signing_key.public_key().export_key(format="raw"),
                                                exchange_key.public_key().export_key(format="raw"))

    @classmethod
    def generate(cls) -> Identity:
        return cls(ECC.generate(curve="Ed25519"), ECC.generate(curve="X25519"))

    @classmethod
    def from_seeds(cls, signing_seed: bytes, exchange_seed: bytes) -> Identity:
        """From the raw 32-byte private keys of RFC 8032 and RFC 7748 (for test vectors)."""
        return cls(eddsa.import_private_key(signing_seed), DH.import_x25519_private_key(exchange_seed))

    @property
    def node_id(self) -> str:
        return self._public.node_id

    @property
    def short_id(self) -> str:
        return self._public.short_id

    def public(self) -> PublicIdentity:
        return self._public

    @property
    def exchange_private_key(self) -> ECC.EccKey:
        """The X25519 private key, for HPKE (Crypto.Protocol.HPKE.new(receiver_key=..., enc=...))."""
        return self._exchange_key

    def sign(self, value: Any) -> str:
        """The base64url Ed25519 signature of canonical_json(value); ValueError if value has no canonical form."""
        return b64encode(self._sign(canonical_json(value)))

    def sign_bytes(self, message: bytes) -> bytes:
        """The raw 64-byte Ed25519 signature of `message`."""
        return self._sign(message)

    def verify(self, value: Any, signature: Any) -> bool:
        return self._public.verify(value, signature)

    # -- the file --------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], passphrase: str | None = None) -> None:
        """Write the identity to a new file at `path` (0600, complete or not at all).

        Raises IdentityExists if anything is at `path` already, even if it appeared meanwhile: an identity
        file is never replaced by save (see change_passphrase and rotate).
        """
        path = Path(path)
        data = self._file_bytes(path, passphrase)
        if not _write_new(path, data):
            raise IdentityExists(path, "a file is already there; nothing was written (an identity is never "
                                       "written over another: move it away first, or use rotate)")

    @classmethod
    def load(cls, path: str | os.PathLike[str], passphrase: str | None = None) -> Identity:
        """Read an identity file; IdentityError (naming the file and what to do) if it cannot be used.

        Refused: a missing file, one that others may read or write, one that is not an emr-chain identity,
        one that is damaged or whose public keys or id do not match its private keys, and a wrong, missing
        or unexpected passphrase. The file is only read.
        """
        path = Path(path)
        data = _read_identity_file(path)
        protected = data["protected"]
        secret = _passphrase_bytes(path, passphrase)
        if protected and passphrase is None:
            raise IdentityPassphraseError(path, "its private keys are protected by a passphrase and none was "
                                                f"given: set {PASSPHRASE_ENV}")
        if not protected and passphrase is not None:
            raise IdentityPassphraseError(path, "a passphrase was given but the file's private keys are not "
                                                f"protected: unset {PASSPHRASE_ENV} to use it as it is, or "
                                                f"protect it with `python identity.py passphrase {path}`")
        keys = []
        for field, curve in (("signing_private_key", "Ed25519"), ("exchange_private_key", "Curve25519")):
            pem = data[field]
            if not isinstance(pem, str) or ("ENCRYPTED" in pem) != protected:
                raise IdentityError(path, f"'{field}' is damaged (expected a {'protected ' if protected else ''}"
                                          "PKCS#8 key): restore the file from a backup")
            try:
                key = ECC.import_key(pem, secret)
            except IncorrectPassphraseError:
                raise IdentityPassphraseError(path, "wrong passphrase (or the encrypted keys are damaged: "
                                                    f"check {PASSPHRASE_ENV}, else restore the file from a "
                                                    "backup)") from None
            except PassphraseRequiredError:
                raise IdentityError(path, f"'{field}' is encrypted although the file says it is not: "
                                          "restore the file from a backup") from None
            except KdfLimitError:
                raise IdentityError(path, f"'{field}' asks for an unreasonable key derivation cost: this is not "
                                          "a file emr-chain wrote; restore yours from a backup") from None
            except (ValueError, IndexError, TypeError):
                raise IdentityError(path, f"'{field}' is damaged: restore the file from a backup") from None
            if key.curve != curve or not key.has_private():
                raise IdentityError(path, f"'{field}' is not a private {curve} key: restore the file from a backup")
            keys.append(key)
        identity = cls(*keys)
        stored = (data["node_id"], data["signing_public_key"], data["exchange_public_key"])
        if stored != tuple(identity.public().to_dict()[field] for field in PUBLIC_FIELDS):
            raise IdentityError(path, "its node id or public keys do not match its private keys: the file was "
                                      "edited or damaged; restore it from a backup")
        return identity

    def _file_bytes(self, path: Path, passphrase: str | None, created: str | None = None) -> bytes:
        secret = _passphrase_bytes(path, passphrase)
        protection = {"passphrase": secret, "protection": PROTECTION,
                      "prot_params": {"iteration_count": SCRYPT_COST}} if passphrase is not None else {}
        data = {"format": FORMAT, "version": VERSION, "node_id": self.node_id,
                "created": created or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                **self._public.to_dict(),
                "protected": passphrase is not None,
                "signing_private_key": self._signing_key.export_key(format="PEM", **protection),
                "exchange_private_key": self._exchange_key.export_key(format="PEM", **protection)}
        return (json.dumps(data, indent=2) + "\n").encode("utf-8")

    def __repr__(self) -> str:
        return f"Identity({self.short_id})"


def read_public(path: str | os.PathLike[str]) -> PublicIdentity:
    """The public identity stored in an identity file, without its passphrase (to show or share it).

    Its keys are checked against the id, not against the private keys (Identity.load does that).
    """
    path = Path(path)
    data = _read_identity_file(path)
    try:
        return PublicIdentity.from_dict(data)
    except InvalidIdentity as exc:
        raise IdentityError(path, f"{exc}: restore the file from a backup") from None


def load_or_create(path: str | os.PathLike[str], passphrase: str | None = None) -> Identity:
    """The node's identity: loaded from `path`, or made and saved there if nothing is at `path`.

    Anything at `path` (a damaged file, a broken link) is loaded or refused, never replaced.
    """
    path = Path(path)
    if os.path.lexists(path):
        return Identity.load(path, passphrase)
    identity = Identity.generate()
    try:
        identity.save(path, passphrase)
    except IdentityExists:  # another process made one meanwhile: that one is the node's
        return Identity.load(path, passphrase)
    log.info("created a new identity %s at %s", identity.short_id, path)
    return identity


def change_passphrase(path: str | os.PathLike[str], old: str | None, new: str | None) -> Identity:
    """Re-write the identity file at `path` under a new passphrase (None: unprotected). Same keys, same id."""
    path = Path(path)
    identity = Identity.load(path, old)
    data = identity._file_bytes(path, new, created=_read_identity_file(path)["created"])
    with _temporary_beside(path, data) as temp:
        os.replace(temp, path)
    _sync_directory(path.parent)
    return identity


class Rotation(NamedTuple):
    old: Identity  # still able to sign, e.g. the membership change that names the new one
    new: Identity
    kept_at: Path  # where the old file now is


def rotate(path: str | os.PathLike[str], passphrase: str | None = None) -> Rotation:
    """Give the node new keys (and so a new id): the old file is kept as PATH.YYYYMMDDTHHMMSSZ.old.

    The old identity must load (so the passphrase is checked, and it can sign the membership change);
    the new one is saved under the same passphrase. A crash part way leaves the old identity at `path`
    (and perhaps a copy of it kept aside), never no identity.
    """
    path = Path(path)
    old = Identity.load(path, passphrase)
    new = Identity.generate()
    data = new._file_bytes(path, passphrase)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    with _temporary_beside(path, data) as temp:
        for attempt in range(100):
            kept_at = path.with_name(f"{path.name}.{stamp}{f'-{attempt}' if attempt else ''}.old")
            try:
                os.link(path, kept_at)
                break
            except FileExistsError:
                continue
        else:
            raise IdentityExists(path, "too many old identities kept with this time stamp; try again")
        os.replace(temp, path)
    _sync_directory(path.parent)
    log.info("rotated identity %s -> %s; the old one is kept at %s", old.short_id, new.short_id, kept_at)
    return Rotation(old, new, kept_at)


def describe(identity: Identity | PublicIdentity, role: str, url: str | None = None) -> dict[str, Any]:
    """What a node says of itself (GET /identity, `python app.py identity`); members.py reads it back."""
    public = identity.public() if isinstance(identity, Identity) else identity
    return {"node_id": public.node_id, "short_id": public.short_id, "role": canonical_role(role), "url": url,
            "signing_public_key": b64encode(public.signing_public_key),
            "exchange_public_key": b64encode(public.exchange_public_key)}


# -- files --------------------------------------------------------------------------------

def _read_identity_file(path: Path) -> dict[str, Any]:
    """The parsed identity file, its shape checked; IdentityError otherwise. Reads only."""
    try:  # non-blocking, so a FIFO at the path cannot hang the node; no effect on a regular file
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as handle:
            status = os.fstat(handle.fileno())
            if stat.S_ISDIR(status.st_mode):
                raise IsADirectoryError
            if not stat.S_ISREG(status.st_mode):
                raise IdentityError(path, "is not a regular file")
            if os.name == "posix" and status.st_mode & 0o077:
                raise IdentityError(path, f"other users may read or change it (mode {status.st_mode & 0o777:04o}); "
                                          f"if nobody else had access, make it the owner's alone: chmod 600 {path}"
                                          "; otherwise treat its keys as known to others and rotate them")
            raw = handle.read(MAX_FILE_SIZE + 1)
    except FileNotFoundError:
        raise IdentityError(path, "does not exist (a node creates its identity on first start; if it had one, "
                                  "restore the file from a backup)") from None
    except IsADirectoryError:
        raise IdentityError(path, "is a directory, not an identity file") from None
    except PermissionError:
        raise IdentityError(path, "cannot be read by this user: run the node as the file's owner") from None
    except OSError as exc:
        raise IdentityError(path, f"cannot be read ({exc.strerror})") from None
    if len(raw) > MAX_FILE_SIZE:
        raise IdentityError(path, f"is larger than {MAX_FILE_SIZE} bytes: not an emr-chain identity file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        if data is not None:
            hint = "it is JSON of another kind: a members file, or another program's?"
        elif raw.lstrip().startswith(b"{"):
            hint = "it looks like JSON but does not parse: damaged?"
        else:
            hint = "it is not JSON"
        raise IdentityError(path, f"is not an emr-chain identity file ({hint}); point the node at its identity "
                                  "file, or restore it from a backup")
    if data.get("version") != VERSION:
        raise IdentityError(path, f"has format version {data.get('version')!r}; this emr-chain reads version "
                                  f"{VERSION} (upgrade emr-chain, or restore the file from a backup)")
    missing = FILE_FIELDS - set(data)
    if missing:
        raise IdentityError(path, f"is damaged: {', '.join(sorted(missing))} missing; restore it from a backup")
    if not isinstance(data["protected"], bool):
        raise IdentityError(path, "is damaged: 'protected' is not true or false; restore it from a backup")
    return data


def _passphrase_bytes(path: Path, passphrase: str | None) -> bytes | None:
    """The passphrase as the key derivation takes it: UTF-8 of its NFC form (so "é" typed composed or
    decomposed is one passphrase; pycryptodome alone would take Latin-1 and refuse most scripts)."""
    if passphrase is None:
        return None
    if not isinstance(passphrase, str) or not passphrase:
        raise IdentityPassphraseError(path, "an empty passphrase protects nothing: give none, or a real one")
    return unicodedata.normalize("NFC", passphrase).encode("utf-8")


class _temporary_beside:
    """A complete, flushed, owner-only temporary file beside `path`, removed on exit unless renamed away."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path, self.data = path, data

    def __enter__(self) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.temp = tempfile.mkstemp(dir=self.path.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(self.data)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            Path(self.temp).unlink(missing_ok=True)
            raise
        return self.temp

    def __exit__(self, *exc: Any) -> None:
        Path(self.temp).unlink(missing_ok=True)


def _write_new(path: Path, data: bytes) -> bool:
    """Put `data` at `path` as a new file, complete or not at all; False if anything is there already.

    A hard link is atomic and never replaces (storage.written_atomically(overwrite=False) checks, then
    renames, so a file appearing between the two would be replaced).
    """
    with _temporary_beside(path, data) as temp:
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: the check-then-rename of storage
            if os.path.lexists(path):
                return False
            os.replace(temp, path)
    _sync_directory(path.parent)
    return True


def _sync_directory(directory: Path) -> None:
    """Make a rename in `directory` survive a crash (POSIX; elsewhere the rename is what it is)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- command line -------------------------------------------------------------------------

def _passphrase(variable: str, prompt: str, confirm: bool = False) -> str | None:
    """From the environment, else asked on a terminal; "" (or nothing asked) means none."""
    if variable in os.environ:
        return os.environ[variable] or None
    if not sys.stdin.isatty():
        return None
    first = getpass.getpass(prompt)
    if confirm and first and getpass.getpass("again: ") != first:
        raise SystemExit("the two passphrases differ; nothing was changed")
    return first or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="identity.py",
                                     description="Show an identity file, change its passphrase, or rotate its keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="the public identity (no passphrase needed)")
    show.add_argument("path", type=Path)
    change = commands.add_parser("passphrase", help=f"set, change or remove the passphrase (old: {PASSPHRASE_ENV}, "
                                                    f"new: {NEW_PASSPHRASE_ENV}; empty = none)")
    change.add_argument("path", type=Path)
    turn = commands.add_parser("rotate", help="a new identity (a new id) in place; the old file is kept beside it, "
                                              "for a healthcare authority to admit the new id and remove the old")
    turn.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "show":
            public = read_public(args.path)
            print(json.dumps({"node_id": public.node_id, "short_id": public.short_id,
                              "signing_public_key": b64encode(public.signing_public_key),
                              "exchange_public_key": b64encode(public.exchange_public_key)}, indent=2))
        elif args.command == "rotate":
            protected = _read_identity_file(args.path)["protected"]
            rotation = rotate(args.path, _passphrase(PASSPHRASE_ENV, "passphrase: ") if protected else None)
            print(f"{args.path}: new identity {rotation.new.short_id} ({rotation.new.node_id}); the old one, "
                  f"{rotation.old.short_id}, is kept at {rotation.kept_at}")
        else:
            protected = _read_identity_file(args.path)["protected"]
            old = _passphrase(PASSPHRASE_ENV, "current passphrase: ") if protected else None
            new = _passphrase(NEW_PASSPHRASE_ENV, "new passphrase (empty for none): ", confirm=True)
            identity = change_passphrase(args.path, old, new)
            print(f"{args.path}: identity {identity.short_id} is now "
                  f"{'protected by the new passphrase' if new else 'without a passphrase'}")
    except IdentityError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
