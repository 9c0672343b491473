"""Record keys wrapped for members with HPKE (RFC 9180), so that a grant on the chain opens one record for one member.

A patient's node encrypts each record with a fresh record key (`new_record_key`, an AES Crypt password) and
grants a member access by wrapping that key for the member's X25519 public key (`wrap_key`); the member's node
opens it with its private key (`unwrap_key`). Plain Python, no Flask and no chain: the grant transaction that
carries a wrapped key, and the signature on it, are the node's business.

Construction
------------
HPKE base mode (RFC 9180 section 5.1.1) used single-shot (section 6.1), one suite and no other:
DHKEM(X25519, HKDF-SHA256) = KEM 0x0020, HKDF-SHA256 = KDF 0x0001, AES-256-GCM = AEAD 0x0002, as
pycryptodome's `Crypto.Protocol.HPKE` implements it::

    enc, ct = SealBase(pkR = the grantee's X25519 public key,
                       info = binding(purpose, cid, grantee), aad = "", pt = record_key_bytes(record key))

    binding = lp("emr-chain keywrap") || 0x01 || lp(purpose) || lp(cid) || lp(grantee)
    lp(x)   = the length of x's UTF-8 bytes as 2 bytes big-endian, then those bytes

0x01 is the version of this layout. Each field is 1 to 255 UTF-8 bytes of printable text with no surrounding
spaces, so `info` is at most 791 bytes and no two different (purpose, cid, grantee) give the same `info`.

What is bound, where, and why
-----------------------------
Everything is bound through `info`, nothing through the AEAD's associated data (aad is empty). RFC 9180
section 8.1: an application that uses the single-shot API should put its auxiliary authenticated information
in `info`, and not use both `info` and `aad`. `info` enters the key schedule (section 5.1), so a different
purpose, CID or grantee gives a different AEAD key and nonce, and opening fails at the GCM tag; with one
message per context that is as strong as aad, and one place means no code path can forget the other one.

- the CID: the signed grant says "record X for member M"; binding X makes the wrapped key open only as the
  key of X, so a wrapped key copied into a grant for another record (by a buggy client, or by anyone who gets
  grants signed or assembles them) fails on the member's node instead of being taken as that record's key.
  The CID is bound as the text the transaction states: CIDv0 and CIDv1 of the same content are different
  bindings, so the node must use the record transaction's own string.
- the grantee (the member's id on the chain): the grantee's public key already enters the KEM (the KEM context
  is enc || pkR), so no other member's private key opens it; binding the id as well means a key wrapped for
  a member under one identity does not open under another that shares or later reuses the same key pair.
- the purpose: domain separation between ordinary grants (`RECORD_KEY_PURPOSE`) and break-glass wraps for
  emergency members (`BREAK_GLASS_PURPOSE`), so neither can be passed off as the other; the unwrapping side
  states the purpose it expects, it is not read from the wrapped key.
- the label and version: separation from any other use of HPKE with the same member keys, and room to change
  the layout.

What the wrapping does not protect
----------------------------------
- A grantee who unwrapped a key once keeps it (and whatever it decrypted). A revocation on the chain can stop
  new grants and stop nodes from serving, but cannot take a key back: to really revoke, re-encrypt the record
  under a new key (hence a new CID) and wrap that for the members who keep access.
- No forward secrecy towards the recipient (RFC 9180 section 9.7.4): the chain is public and permanent, so
  whoever steals a member's private key later opens every key ever wrapped for it. Rotating the member's key
  protects only grants made after the rotation.
- No sender authentication: base mode lets anyone wrap a key for a member. That a grant comes from the
  patient is what the transaction's signature says, and the node must check it.
- Replaying the very same wrapped key with the same CID and grantee opens, as it should; duplicate grants are
  for the chain to notice. Metadata is public: who was granted which record, and when; the length of `ct` shows
  the record key's length (59 bytes for every generated key).
- Bad randomness when wrapping breaks confidentiality (section 9.7.5); pycryptodome draws the ephemeral key
  from the operating system's generator.

The record key: one representation
----------------------------------
The record key is the AES Crypt password text, from `crypto.generate_password` (43 URL-safe base64 characters
encoding 32 random bytes, 256 bits). What is wrapped is that text's UTF-8 bytes (`record_key_bytes`; ASCII for
every generated key), never the 32 random bytes behind it, so unwrapping gives back exactly the password the
record was encrypted with, whatever made it; `record_key_text` turns unwrapped bytes back into that password.

Wire format
-----------
`WrappedKey.to_json()`: {"version": 1, "kem": 32, "kdf": 1, "aead": 2, "enc": "<base64>", "ct": "<base64>"}
with enc the 32-byte ephemeral X25519 public key and ct the AES-256-GCM ciphertext of the record key followed
by its 16-byte tag, in standard base64 with padding (RFC 4648 section 4). `WrappedKey.from_json` takes only
that: canonical base64, those exact fields and values, the right lengths; anything else is a BadInput naming
the field. The CID and the grantee are not in it: they are the grant transaction's own fields, which the
member's node passes to `unwrap_key`; a copy here would invite checking a wrapped key against itself.

Errors
------
A malformed argument or wrapped key is a `BadInput` naming the field. A wrapped key that does not open (wrong
private key, another CID, grantee or purpose, altered enc or ct) is a `KeyUnwrapError` (errors.py: a Forbidden,
403), whose message names the record and the grantee and never a key. A key of the wrong type is a TypeError.

Against pycryptodome's API
--------------------------
pycryptodome imports raw X25519 keys (`Crypto.Protocol.DH`) and exports a raw public key, but a private key
only as its `seed` attribute: the helpers below hide that. It has no DeriveKeyPair (RFC 9180 section 7.1.3),
which `derive_keypair` adds on HMAC-SHA256 (LabeledExtract and LabeledExpand, section 4; DeriveKeyPair for
X25519, section 7.1.3); it is not needed to wrap, but gives deterministic member keys from a seed and lets the
tests check the RFC's key pairs. Its sender always draws its own ephemeral key, so the RFC's sealing vectors
are checked in the tests by substituting that draw. Nothing that wrapping needs is missing.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Any, Mapping, Union

from Crypto.Protocol import HPKE
from Crypto.Protocol.DH import import_x25519_private_key, import_x25519_public_key
from Crypto.PublicKey import ECC
from Crypto.PublicKey.ECC import EccKey

import crypto
from errors import BadInput, KeyUnwrapError

KEM_ID = 0x0020   # DHKEM(X25519, HKDF-SHA256)
KDF_ID = 0x0001   # HKDF-SHA256
AEAD_ID = 0x0002  # AES-256-GCM
VERSION = 1       # of the wire format and of the `info` layout
LABEL = b"emr-chain keywrap"

RECORD_KEY_PURPOSE = "emr-chain record key"
BREAK_GLASS_PURPOSE = "emr-chain break-glass record key"

X25519_KEY_SIZE = 32
TAG_SIZE = 16
MAX_FIELD_BYTES = 255
MAX_RECORD_KEY_BYTES = 4096  # an AES Crypt password is at most 1024 UTF-16 units, at most 4096 UTF-8 bytes
CURVE = "Curve25519"

PrivateKey = Union[EccKey, bytes]
PublicKey = Union[EccKey, bytes]

_WIRE_FIELDS = ("version", "kem", "kdf", "aead", "enc", "ct")
_KEM_SUITE_ID = b"KEM" + struct.pack(">H", KEM_ID)


# -- the record key ------------------------------------------------------------------

def new_record_key() -> str:
    """A fresh record key: a random 256-bit AES Crypt password (43 URL-safe characters), as text."""
    return crypto.generate_password()


def record_key_bytes(record_key: str) -> bytes:
    """What is wrapped for a record key: its UTF-8 bytes (the one representation rule, see the module doc)."""
    if not isinstance(record_key, str):
        raise TypeError(f"a record key is the password text (str), not {type(record_key).__name__}")
    try:
        raw = record_key.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput("record_key: not valid Unicode text") from None
    _check_record_key(raw)
    return raw


def record_key_text(raw: bytes) -> str:
    """The password text back from unwrapped bytes."""
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput("record_key: the unwrapped bytes are not UTF-8 text, so not a record key of this rule") from None


def _check_record_key(raw: bytes) -> None:
    if not 1 <= len(raw) <= MAX_RECORD_KEY_BYTES:
        raise BadInput(f"record_key: must be 1 to {MAX_RECORD_KEY_BYTES} bytes, got {len(raw)}")


# -- X25519 keys as raw bytes ------------------------------------------------------------

def generate_keypair() -> tuple[bytes, bytes]:
    """A new member key pair as raw RFC 7748 bytes: (private, public), 32 bytes each."""
    key = ECC.generate(curve=CURVE)
    return key.seed, key.public_key().export_key(format="raw")


def public_key_from_private(private: PrivateKey) -> bytes:
    """The raw 32-byte public key of a raw private key or a pycryptodome X25519 private key."""
    return _private_key(private).public_key().export_key(format="raw")


def private_key_bytes(private: EccKey) -> bytes:
    """The raw 32 bytes of a pycryptodome X25519 private key (its export_key has no raw format for private keys)."""
    return _private_key(private).seed


def derive_keypair(ikm: bytes) -> tuple[bytes, bytes]:
    """RFC 9180 section 7.1.3 DeriveKeyPair for DHKEM(X25519, HKDF-SHA256): (private, public) from a seed.

    The seed should have at least 32 bytes of entropy (the RFC's SHOULD); the same seed always gives the same pair.
    """
    if not isinstance(ikm, (bytes, bytearray)):
        raise TypeError("ikm must be bytes")
    dkp_prk = _labeled_extract(b"", b"dkp_prk", bytes(ikm), _KEM_SUITE_ID)
    sk = _labeled_expand(dkp_prk, b"sk", b"", X25519_KEY_SIZE, _KEM_SUITE_ID)
    return sk, public_key_from_private(sk)


def _labeled_extract(salt: bytes, label: bytes, ikm: bytes, suite_id: bytes) -> bytes:
    """RFC 9180 section 4: HKDF-Extract (RFC 5869) over "HPKE-v1" || suite_id || label || ikm."""
    return hmac.new(salt or bytes(hashlib.sha256().digest_size), b"HPKE-v1" + suite_id + label + ikm,
                    hashlib.sha256).digest()


def _labeled_expand(prk: bytes, label: bytes, info: bytes, length: int, suite_id: bytes) -> bytes:
    """RFC 9180 section 4: HKDF-Expand (RFC 5869) with info I2OSP(L, 2) || "HPKE-v1" || suite_id || label || info."""
    labeled_info = struct.pack(">H", length) + b"HPKE-v1" + suite_id + label + info
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + labeled_info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _private_key(key: PrivateKey) -> EccKey:
    if isinstance(key, (bytes, bytearray)):
        if len(key) != X25519_KEY_SIZE:
            raise BadInput(f"recipient_private: an X25519 private key is {X25519_KEY_SIZE} bytes, got {len(key)}")
        return import_x25519_private_key(bytes(key))
    if isinstance(key, EccKey) and key.curve == CURVE and key.has_private():
        return key
    raise TypeError("recipient_private must be 32 raw bytes or a pycryptodome X25519 private key")


def _public_key(key: PublicKey) -> EccKey:
    if isinstance(key, (bytes, bytearray)):
        if len(key) != X25519_KEY_SIZE:
            raise BadInput(f"recipient_public: an X25519 public key is {X25519_KEY_SIZE} bytes, got {len(key)}")
        try:
            return import_x25519_public_key(bytes(key))
        except ValueError:
            raise BadInput("recipient_public: not a usable X25519 public key (a point of small order)") from None
    if isinstance(key, EccKey) and key.curve == CURVE:
        return key.public_key()
    raise TypeError("recipient_public must be 32 raw bytes or a pycryptodome X25519 key")


# -- the binding ---------------------------------------------------------------------------

def binding(*, purpose: str, cid: str, grantee: str) -> bytes:
    """The HPKE `info` that binds a wrapped key: lp(LABEL) || VERSION || lp(purpose) || lp(cid) || lp(grantee)."""
    return (_lp(LABEL) + bytes([VERSION]) + _lp(_field("purpose", purpose)) + _lp(_field("cid", cid))
            + _lp(_field("grantee", grantee)))


def _lp(value: bytes) -> bytes:
    return struct.pack(">H", len(value)) + value


def _field(name: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise BadInput(f"{name}: must be a string, got {type(value).__name__}")
    if not value or value != value.strip() or not value.isprintable():
        raise BadInput(f"{name}: must be non-empty printable text with no surrounding spaces, got {value!r}")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(f"{name}: not valid Unicode text") from None
    if len(raw) > MAX_FIELD_BYTES:
        raise BadInput(f"{name}: at most {MAX_FIELD_BYTES} UTF-8 bytes, got {len(raw)}")
    return raw


# -- the wrapped key -------------------------------------------------------------------------

@dataclass(frozen=True)
class WrappedKey:
    """A record key sealed for one member: HPKE's encapsulated key and the AEAD ciphertext (with its tag)."""

    enc: bytes
    ct: bytes

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "kem": KEM_ID, "kdf": KDF_ID, "aead": AEAD_ID,
                "enc": base64.b64encode(self.enc).decode("ascii"), "ct": base64.b64encode(self.ct).decode("ascii")}

    @classmethod
    def from_json(cls, data: Any) -> WrappedKey:
        """Parse the wire form strictly; a BadInput names the first field that is wrong."""
        if not isinstance(data, Mapping):
            raise BadInput(f"wrapped key: must be a JSON object, got {type(data).__name__}")
        missing = [name for name in _WIRE_FIELDS if name not in data]
        unknown = sorted(str(name) for name in data if name not in _WIRE_FIELDS)
        if missing or unknown:
            raise BadInput(f"wrapped key: fields must be exactly {', '.join(_WIRE_FIELDS)}"
                           + (f"; missing {', '.join(missing)}" if missing else "")
                           + (f"; unknown {', '.join(unknown)}" if unknown else ""))
        for name, expected in (("version", VERSION), ("kem", KEM_ID), ("kdf", KDF_ID), ("aead", AEAD_ID)):
            value = data[name]
            if type(value) is not int or value != expected:  # not isinstance: True is an int, and not a suite id
                raise BadInput(f"wrapped key: '{name}' must be {expected} (the only "
                               f"{'version' if name == 'version' else 'suite'} this node knows), got {value!r}")
        enc = _base64_field("enc", data["enc"])
        ct = _base64_field("ct", data["ct"])
        if len(enc) != X25519_KEY_SIZE:
            raise BadInput(f"wrapped key: 'enc' must be {X25519_KEY_SIZE} bytes, got {len(enc)}")
        if not TAG_SIZE < len(ct) <= TAG_SIZE + MAX_RECORD_KEY_BYTES:
            raise BadInput(f"wrapped key: 'ct' must be {TAG_SIZE + 1} to {TAG_SIZE + MAX_RECORD_KEY_BYTES} bytes, "
                           f"got {len(ct)}")
        return cls(enc, ct)


def _base64_field(name: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise BadInput(f"wrapped key: '{name}' must be a base64 string, got {type(value).__name__}")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise BadInput(f"wrapped key: '{name}' is not standard base64 with padding") from None
    if base64.b64encode(raw).decode("ascii") != value:  # one encoding per value: no stray bits in the padding
        raise BadInput(f"wrapped key: '{name}' is not canonical base64")
    return raw


# -- wrap and unwrap ---------------------------------------------------------------------------

def wrap_key(record_key: bytes, recipient_public: PublicKey, *, cid: str, grantee: str,
             purpose: str = RECORD_KEY_PURPOSE) -> WrappedKey:
    """Seal `record_key` (bytes: `record_key_bytes(password)`) for the grantee's X25519 public key, bound to
    the record's CID, the grantee's id and the purpose. A fresh ephemeral key each call."""
    if not isinstance(record_key, (bytes, bytearray)):
        raise TypeError("record_key must be bytes: use record_key_bytes(password) for a password")
    _check_record_key(record_key)
    info = binding(purpose=purpose, cid=cid, grantee=grantee)
    sender = _sender_context(_public_key(recipient_public), info)
    return WrappedKey(sender.enc, sender.seal(bytes(record_key)))


def unwrap_key(wrapped: WrappedKey | Mapping[str, Any], recipient_private: PrivateKey, *, cid: str, grantee: str,
               purpose: str = RECORD_KEY_PURPOSE) -> bytes:
    """Open a wrapped record key with the grantee's private key, for this CID, grantee and purpose.

    Raises KeyUnwrapError if it does not open (wrapped for another record, grantee, purpose or key, or altered),
    BadInput if the wrapped key or a field is malformed."""
    if not isinstance(wrapped, WrappedKey):
        wrapped = WrappedKey.from_json(wrapped)
    info = binding(purpose=purpose, cid=cid, grantee=grantee)
    private = _private_key(recipient_private)
    try:
        receiver = _receiver_context(private, wrapped.enc, info)
    except HPKE.DeserializeError:
        raise KeyUnwrapError(cid, grantee, "'enc' is not a usable X25519 public key (altered or forged)") from None
    try:
        return receiver.unseal(wrapped.ct)
    except ValueError:
        raise KeyUnwrapError(cid, grantee) from None


def _sender_context(recipient: EccKey, info: bytes) -> HPKE.HPKE_Cipher:
    """SetupBaseS(pkR, info) for this module's suite: the curve of the key fixes KEM and KDF, AES-256-GCM the rest."""
    return HPKE.new(receiver_key=recipient, aead_id=HPKE.AEAD.AES256_GCM, info=info)


def _receiver_context(private: EccKey, enc: bytes, info: bytes) -> HPKE.HPKE_Cipher:
    """SetupBaseR(enc, skR, info) for this module's suite."""
    return HPKE.new(receiver_key=private, aead_id=HPKE.AEAD.AES256_GCM, enc=enc, info=info)
