"""identity.py: a node's keys, its id, the file that keeps them, and signatures over canonical JSON."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable

import pytest
from Crypto.Protocol import HPKE
from Crypto.Util.asn1 import DerOctetString, DerSequence

import identity as identity_module
from errors import Conflict, IdentityError, IdentityExists, IdentityPassphraseError, InvalidIdentity, StateDamaged
from identity import (Identity, PublicIdentity, b64encode, change_passphrase, describe, fingerprint, load_or_create,
                      read_public, rotate, short_id)

PASSPHRASE = "correct horse battery staple"
# RFC 8032 section 7.1, TEST 1 and TEST 2: (secret key, public key, message, signature)
RFC8032 = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
]
# RFC 7748 section 6.1: Alice's X25519 private and public keys
RFC7748_PRIVATE = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
RFC7748_PUBLIC = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
# The id of RFC 8032 TEST 1's key: fixed here, because a node's id must never change with a new release.
RFC8032_TEST1_NODE_ID = "eh7ddx5bksrgcytl7bkai36se4nxx3klnk7elksyq57pi74xeg4q"
TRANSACTION = {"user_id": "xxxxx", "ipfs_hash": "QmbWxSqxhZms74885xceSaiHVvdjqiVWrATtYUrrUnVE1K", "EHR_name": "MRI",
               "id": "0123456789abcdef0123456789abcdef", "file_size": 63795,
               "consent": {"granted_to": ["provider-1"], "until_block": 120}}


@pytest.fixture(autouse=True)
def cheap_key_derivation(monkeypatch: pytest.MonkeyPatch) -> None:
    """scrypt at 2**10 instead of 2**17, so a test saves and loads in milliseconds (one test keeps the real cost)."""
    monkeypatch.setattr(identity_module, "SCRYPT_COST", 2**10)


@pytest.fixture(scope="module")
def node() -> Identity:
    return Identity.generate()


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Identity, Path]:
    path = tmp_path / "identity.json"
    made = Identity.generate()
    made.save(path, PASSPHRASE)
    return made, path


def rfc_identity(secret_hex: str) -> Identity:
    return Identity.from_seeds(bytes.fromhex(secret_hex), bytes.fromhex(RFC7748_PRIVATE))


def snapshot(path: Path) -> tuple[bytes, int, int]:
    status = path.lstat()
    return (path.read_bytes() if path.is_file() else b""), status.st_mode, status.st_mtime_ns


# -- known answers ---------------------------------------------------------------------

@pytest.mark.parametrize("secret, public, message, signature", RFC8032)
def test_rfc8032_vectors_sign_and_verify(secret, public, message, signature) -> None:
    node = rfc_identity(secret)
    assert node.public().signing_public_key.hex() == public
    assert node.sign_bytes(bytes.fromhex(message)).hex() == signature
    assert node.public().verify_bytes(bytes.fromhex(message), bytes.fromhex(signature))
    assert node.public().verify_bytes(bytes.fromhex(message), b64encode(bytes.fromhex(signature)))
    assert not node.public().verify_bytes(bytes.fromhex(message) + b"\x00", bytes.fromhex(signature))
    tampered = bytearray.fromhex(signature)
    tampered[10] ^= 1
    assert not node.public().verify_bytes(bytes.fromhex(message), bytes(tampered))


def test_rfc7748_exchange_public_key() -> None:
    assert rfc_identity(RFC8032[0][0]).public().exchange_public_key.hex() == RFC7748_PUBLIC


def test_node_id_is_base32_sha256_of_the_raw_signing_key_and_fixed_for_a_key() -> None:
    node = rfc_identity(RFC8032[0][0])
    expected = base64.b32encode(hashlib.sha256(bytes.fromhex(RFC8032[0][1])).digest()).decode().rstrip("=").lower()
    assert node.node_id == expected == RFC8032_TEST1_NODE_ID
    assert len(node.node_id) == 52 and re.fullmatch(r"[a-z2-7]{52}", node.node_id)
    assert node.short_id == "eh7d-dx5b" == f"{node.node_id[:4]}-{node.node_id[4:8]}"


# -- signatures ------------------------------------------------------------------------

def test_a_signature_verifies_and_any_change_breaks_it(node: Identity) -> None:
    signature = node.sign(TRANSACTION)
    assert re.fullmatch(r"[A-Za-z0-9_-]{86}", signature)
    assert node.public().verify(TRANSACTION, signature)
    changes: list[Callable[[dict[str, Any]], None]] = [
        lambda tx: tx.update(EHR_name="MRJ"),                       # one character
        lambda tx: tx.update(user_id="xxxxx "),                     # one trailing space
        lambda tx: tx.update(file_size=63796),                      # an integer by 1
        lambda tx: tx.update(file_size="63795"),                    # the same number as a string
        lambda tx: tx["consent"].update(until_block=121),           # a nested field
        lambda tx: tx["consent"]["granted_to"].append("x"),         # a nested list
        lambda tx: tx.update(extra=None),                           # a field added
        lambda tx: tx.pop("id"),                                    # a field removed
        lambda tx: tx.update(ehr_name=tx.pop("EHR_name")),          # a key renamed
    ]
    for change in changes:
        tampered = json.loads(json.dumps(TRANSACTION))
        change(tampered)
        assert not node.public().verify(tampered, signature), tampered


def test_another_nodes_signature_does_not_verify(node: Identity) -> None:
    assert not node.public().verify(TRANSACTION, Identity.generate().sign(TRANSACTION))


def test_the_json_text_received_does_not_change_what_was_signed(node: Identity) -> None:
    signature = node.sign(TRANSACTION)
    texts = [json.dumps(TRANSACTION), json.dumps(TRANSACTION, indent=4, ensure_ascii=True),
             json.dumps(dict(reversed(list(TRANSACTION.items()))), separators=(" , ", " : "))]
    for text in texts:
        assert node.public().verify(json.loads(text), signature)


def test_unicode_composed_and_decomposed_are_different_and_each_verifies(node: Identity) -> None:
    composed, decomposed = {"name": "José"}, {"name": "Jose\u0301"}
    composed_signature, decomposed_signature = node.sign(composed), node.sign(decomposed)
    assert node.public().verify(composed, composed_signature)
    assert node.public().verify(decomposed, decomposed_signature)
    assert not node.public().verify(decomposed, composed_signature)
    assert not node.public().verify(composed, decomposed_signature)
    # escaped or literal in the JSON text: one value, one signature
    assert node.public().verify(json.loads('{"name": "Jos\\u00e9"}'), composed_signature)
    assert node.public().verify(json.loads('{"name": "José"}'), composed_signature)


def test_the_same_value_signs_the_same_across_loads(saved: tuple[Identity, Path]) -> None:
    made, path = saved
    again = Identity.load(path, PASSPHRASE)
    assert again.sign(TRANSACTION) == made.sign(json.loads(json.dumps(TRANSACTION)))  # Ed25519 is deterministic


@pytest.mark.parametrize("signature", [None, 42, "", "abc", "=" * 86, "A" * 85, "A" * 87, "A" * 86 + "==",
                                       "+" * 86, "é" * 86])
def test_malformed_signatures_are_false_not_errors(node: Identity, signature: Any) -> None:
    assert node.public().verify(TRANSACTION, signature) is False


def test_a_signature_has_one_spelling(node: Identity) -> None:
    signature = node.sign(TRANSACTION)
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(signature[-1])
    respelled = signature[:-1] + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[last ^ 1]
    assert base64.urlsafe_b64decode(respelled + "==") == base64.urlsafe_b64decode(signature + "==")
    assert not node.public().verify(TRANSACTION, respelled)  # same bytes, other string: refused


def test_values_without_canonical_form_cannot_be_signed_and_never_verify(node: Identity) -> None:
    with pytest.raises(ValueError, match=r"\$\.size: 1\.5 is a float"):
        node.sign({"size": 1.5})
    signature = node.sign({"size": 1})
    assert node.public().verify({"size": 1}, signature)
    assert not node.public().verify({"size": 1.0}, signature)
    assert not node.public().verify({"size": "\ud800"}, signature)


def test_signing_a_block_hash(node: Identity) -> None:
    block_hash = hashlib.sha256(b"block").hexdigest()
    assert node.public().verify(block_hash, node.sign(block_hash))
    assert node.public().verify_bytes(bytes.fromhex(block_hash), node.sign_bytes(bytes.fromhex(block_hash)))
    assert not node.public().verify(block_hash[:-1] + "0", node.sign(block_hash))


# -- public identities -------------------------------------------------------------------

def test_public_identity_round_trips_through_json(node: Identity) -> None:
    data = json.loads(json.dumps(node.public().to_dict()))
    assert set(data) == {"node_id", "signing_public_key", "exchange_public_key"}
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{43}", data[key]) for key in ("signing_public_key", "exchange_public_key"))
    assert PublicIdentity.from_dict(data) == node.public()
    assert PublicIdentity.from_dict(data).verify(TRANSACTION, node.sign(TRANSACTION))


SMALL_ORDER_ED25519 = b64encode(bytes([1]) + bytes(31))  # the neutral point
SMALL_ORDER_ID = fingerprint(bytes([1]) + bytes(31))


@pytest.mark.parametrize("change, problem", [
    (lambda d: d.pop("node_id"), "'node_id' is required"),
    (lambda d: d.update(node_id=d["node_id"].upper()), "'node_id' must be 52 characters"),
    (lambda d: d.update(node_id="a" * 52), "not the fingerprint of its signing key"),
    (lambda d: d.update(signing_public_key=d["signing_public_key"] + "="), "base64url without padding"),
    (lambda d: d.update(signing_public_key=d["signing_public_key"][:-3]), "exactly 32 bytes"),
    (lambda d: d.update(exchange_public_key=base64.b64encode(bytes(range(32))).decode()), "exchange_public_key"),
    (lambda d: d.update(exchange_public_key=b64encode(bytes(32))), "not a usable X25519 public key"),
    (lambda d: d.update(short_id="zzzz-zzzz"), "'short_id' 'zzzz-zzzz' does not match"),
    (lambda d: d.update(signing_public_key=SMALL_ORDER_ED25519, short_id=short_id(SMALL_ORDER_ID),
                        node_id=SMALL_ORDER_ID), "small order"),
])
def test_a_bad_public_identity_is_refused_naming_the_field(node: Identity, change, problem: str) -> None:
    data = describe(node, "patient")
    change(data)
    with pytest.raises(InvalidIdentity, match=problem):
        PublicIdentity.from_dict(data)


def test_describe_lists_what_a_member_entry_needs(node: Identity) -> None:
    described = describe(node, "provider", "http://127.0.0.1:5004")
    assert described == {"node_id": node.node_id, "short_id": node.short_id, "role": "healthcare_provider",
                         "url": "http://127.0.0.1:5004", **{key: value for key, value in node.public().to_dict().items()
                                                            if key != "node_id"}}
    assert PublicIdentity.from_dict(described) == node.public()
    assert describe(node.public(), "patient")["url"] is None


def test_the_exchange_key_receives_hpke(node: Identity) -> None:
    sender = HPKE.new(receiver_key=node.public().exchange_key(), aead_id=HPKE.AEAD.AES256_GCM)
    sealed = sender.seal(b"record key")
    receiver = HPKE.new(receiver_key=node.exchange_private_key, aead_id=HPKE.AEAD.AES256_GCM, enc=sender.enc)
    assert receiver.unseal(sealed) == b"record key"


# -- the file ----------------------------------------------------------------------------

def test_the_file_is_the_owners_alone_and_a_restart_keeps_the_id(tmp_path: Path) -> None:
    path = tmp_path / "state" / "identity.json"
    first = load_or_create(path, PASSPHRASE)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["identity.json"]  # no temporary file left
    content = path.read_bytes()
    second = load_or_create(path, PASSPHRASE)
    assert second.node_id == first.node_id and second.public() == first.public()
    assert path.read_bytes() == content  # loading never rewrites
    assert second.sign(TRANSACTION) == first.sign(TRANSACTION)
    assert read_public(path) == first.public()  # without the passphrase


def test_the_file_without_passphrase_also_keeps_the_id(tmp_path: Path) -> None:
    path = tmp_path / "identity.json"
    assert load_or_create(path).node_id == load_or_create(path).node_id == Identity.load(path).node_id


def test_the_file_format(saved: tuple[Identity, Path]) -> None:
    made, path = saved
    data = json.loads(path.read_text())
    assert data["format"] == "emr-chain identity" and data["version"] == 1 and data["protected"] is True
    assert data["node_id"] == made.node_id
    assert data["signing_public_key"] == b64encode(made.public().signing_public_key)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", data["created"])
    for field in ("signing_private_key", "exchange_private_key"):
        assert data[field].startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----\n")


def private_seeds(made: Identity) -> list[bytes]:
    return [made._signing_key.seed, made._exchange_key.seed]


def spellings(raw: bytes) -> list[bytes]:
    return [raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw).rstrip(b"="),
            base64.urlsafe_b64encode(raw).rstrip(b"="), base64.b32encode(raw).rstrip(b"=")]


def pem_bodies(path: Path) -> bytes:
    data = json.loads(path.read_text())
    return b"".join(base64.b64decode("".join(data[f].splitlines()[1:-1]))
                    for f in ("signing_private_key", "exchange_private_key"))


def test_the_passphrase_protects_the_private_keys(saved: tuple[Identity, Path], tmp_path: Path) -> None:
    made, path = saved
    content = path.read_bytes() + pem_bodies(path)
    for seed in private_seeds(made):
        assert not any(spelling in content for spelling in spellings(seed))
    # the check would see them: a file saved without a passphrase holds them, in its PKCS#8 DER
    plain = tmp_path / "plain.json"
    made.save(plain)
    assert all(seed in pem_bodies(plain) for seed in private_seeds(made))


def test_wrong_missing_and_unexpected_passphrases_are_refused_and_change_nothing(saved, tmp_path: Path) -> None:
    made, path = saved
    before = snapshot(path)
    for passphrase, problem in [("correct horse battery stapl", "wrong passphrase"),
                                (None, "protected by a passphrase and none was given: set EMR_IDENTITY_PASSPHRASE"),
                                ("", "empty passphrase")]:
        with pytest.raises(IdentityPassphraseError, match=problem) as caught:
            Identity.load(path, passphrase)
        assert str(path) in str(caught.value)
        with pytest.raises(IdentityPassphraseError):
            load_or_create(path, passphrase)
    assert snapshot(path) == before
    plain = tmp_path / "plain.json"
    made.save(plain)
    with pytest.raises(IdentityPassphraseError, match="not protected: unset EMR_IDENTITY_PASSPHRASE"):
        Identity.load(plain, PASSPHRASE)


def test_a_unicode_passphrase_in_either_normal_form(tmp_path: Path) -> None:
    path = tmp_path / "identity.json"
    made = Identity.generate()
    made.save(path, "pässwörd-密码-\u00e9")
    assert Identity.load(path, "pässwörd-密码-e\u0301").node_id == made.node_id


def test_the_real_key_derivation_cost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the module's own SCRYPT_COST
    path = tmp_path / "identity.json"
    made = load_or_create(path, PASSPHRASE)
    assert Identity.load(path, PASSPHRASE).node_id == made.node_id
    for field in ("signing_private_key", "exchange_private_key"):
        pem = json.loads(path.read_text())[field]
        der = base64.b64decode("".join(pem.splitlines()[1:-1]))
        algorithm = DerSequence().decode(DerSequence().decode(der)[0])
        kdf = DerSequence().decode(DerSequence().decode(DerSequence().decode(algorithm[1])[0])[1])
        assert len(DerOctetString().decode(kdf[0]).payload) >= 8  # the salt
        assert list(kdf[1:4]) == [2**17, 8, 1]  # N, r, p


def test_save_never_replaces_a_file(saved: tuple[Identity, Path]) -> None:
    _, path = saved
    before = snapshot(path)
    with pytest.raises(IdentityExists, match="already there; nothing was written") as caught:
        Identity.generate().save(path, PASSPHRASE)
    assert isinstance(caught.value, Conflict) and isinstance(caught.value, IdentityError)
    assert snapshot(path) == before
    assert len(list(path.parent.iterdir())) == 1


def other_identity_file(tmp_path: Path) -> dict[str, Any]:
    return json.loads(Identity.generate()._file_bytes(tmp_path / "other.json", PASSPHRASE))


def edit(change: Callable[[dict[str, Any], Path], Any]) -> Callable[[Path, Path], None]:
    def apply(path: Path, tmp_path: Path) -> None:
        data = json.loads(path.read_text())
        change(data, tmp_path)
        path.write_text(json.dumps(data))
    return apply


def flip_in_pem(data: dict[str, Any], field: str, line: int) -> None:
    """Change one base64 character of a PEM: line 1 is in the DER header, line -3 (the last full line) in the
    encrypted key. The short last line would not do: its third character may carry bits base64 discards."""
    lines = data[field].splitlines()
    lines[line] = lines[line][:2] + ("A" if lines[line][2] != "A" else "B") + lines[line][3:]
    data[field] = "\n".join(lines)


DAMAGES: dict[str, tuple[Callable[[Path, Path], None], type[IdentityError], str]] = {
    "empty": (lambda p, t: p.write_bytes(b""), IdentityError, "not an emr-chain identity file .it is not JSON"),
    "truncated": (lambda p, t: p.write_bytes(p.read_bytes()[:200]), IdentityError, "looks like JSON but does not parse"),
    "binary garbage": (lambda p, t: p.write_bytes(os.urandom(300)), IdentityError, "it is not JSON"),
    "a PEM key": (lambda p, t: p.write_text("-----BEGIN PRIVATE KEY-----\nMC4CAQAw\n-----END PRIVATE KEY-----\n"),
                  IdentityError, "not an emr-chain identity file"),
    "a members file": (lambda p, t: p.write_text('{"format": "emr-chain members", "network": "x", "members": []}'),
                       IdentityError, "JSON of another kind: a members file"),
    "a JSON list": (lambda p, t: p.write_text("[]"), IdentityError, "JSON of another kind"),
    "a newer version": (edit(lambda d, t: d.update(version=2)), IdentityError, "format version 2; .*upgrade"),
    "a field missing": (edit(lambda d, t: d.pop("exchange_private_key")), IdentityError,
                        "damaged: exchange_private_key missing"),
    "protected flag flipped": (edit(lambda d, t: d.update(protected=False)), IdentityPassphraseError,
                               "not protected"),
    "protected not a bool": (edit(lambda d, t: d.update(protected="yes")), IdentityError, "'protected' is not"),
    "node id edited": (edit(lambda d, t: d.update(node_id="a" * 52)), IdentityError,
                       "node id or public keys do not match its private keys"),
    "public key of another node": (edit(lambda d, t: d.update(
        {k: v for k, v in other_identity_file(t).items() if k in ("node_id", "signing_public_key")})), IdentityError,
        "do not match its private keys"),
    "private key of another node": (edit(lambda d, t: d.update(
        signing_private_key=other_identity_file(t)["signing_private_key"])), IdentityError,
        "do not match its private keys"),
    "keys swapped": (edit(lambda d, t: d.update(signing_private_key=d["exchange_private_key"])), IdentityError,
                     "'signing_private_key' is not a private Ed25519 key"),
    # AES-CBC has no integrity check: a changed ciphertext byte reads as a wrong passphrase, a damaged key or a
    # key that does not match the public one, depending on where it falls. Each is refused, naming the damage.
    "encrypted key damaged": (edit(lambda d, t: flip_in_pem(d, "exchange_private_key", -3)),
                              IdentityError, "damaged"),
    "key header damaged": (edit(lambda d, t: flip_in_pem(d, "signing_private_key", 1)), IdentityError,
                           "'signing_private_key' is damaged"),
    "key not a PEM": (edit(lambda d, t: d.update(signing_private_key="-----BEGIN ENCRYPTED PRIVATE KEY-----\nxx\n"
                                                                      "-----END ENCRYPTED PRIVATE KEY-----")),
                      IdentityError, "'signing_private_key' is damaged"),
    "too large": (lambda p, t: p.write_bytes(b" " * 70_000 + p.read_bytes()), IdentityError, "larger than"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_or_foreign_file_stops_with_a_clear_message_and_is_left_alone(saved, tmp_path, damage) -> None:
    _, path = saved
    change, kind, problem = DAMAGES[damage]
    change(path, tmp_path)
    os.chmod(path, 0o600)
    before = snapshot(path)
    for attempt in (lambda: Identity.load(path, PASSPHRASE), lambda: load_or_create(path, PASSPHRASE)):
        with pytest.raises(kind, match=problem) as caught:
            attempt()
        assert isinstance(caught.value, StateDamaged)
        assert str(caught.value).startswith(f"identity file {path}: ")
    assert snapshot(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["identity.json"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_a_file_others_may_read_or_change_is_refused(saved, mode: int) -> None:
    _, path = saved
    os.chmod(path, mode)
    before = snapshot(path)
    with pytest.raises(IdentityError, match=rf"other users may read or change it \(mode 0{mode:o}\).*chmod 600 {path}"):
        load_or_create(path, PASSPHRASE)
    with pytest.raises(IdentityError, match="other users"):
        read_public(path)
    assert snapshot(path) == before


def test_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "identity.json"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(IdentityError, match="is not a regular file"):
        load_or_create(fifo, PASSPHRASE)


def test_nothing_is_created_over_a_directory_or_a_dangling_link(tmp_path: Path) -> None:
    directory = tmp_path / "identity.json"
    directory.mkdir()
    with pytest.raises(IdentityError, match="is a directory"):
        load_or_create(directory, PASSPHRASE)
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "gone.json")
    with pytest.raises(IdentityError, match="does not exist"):
        load_or_create(link, PASSPHRASE)
    assert not (tmp_path / "gone.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["identity.json",
                                                                                                   "link.json"]


# -- passphrase change and rotation -------------------------------------------------------

def test_changing_the_passphrase_keeps_the_id(saved: tuple[Identity, Path]) -> None:
    made, path = saved
    created = json.loads(path.read_text())["created"]
    change_passphrase(path, PASSPHRASE, "a new one")
    assert json.loads(path.read_text())["created"] == created
    with pytest.raises(IdentityPassphraseError, match="wrong passphrase"):
        Identity.load(path, PASSPHRASE)
    assert Identity.load(path, "a new one").node_id == made.node_id
    change_passphrase(path, "a new one", None)
    assert Identity.load(path).node_id == made.node_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(list(path.parent.iterdir())) == 1


def test_rotation_makes_a_new_identity_and_keeps_the_old_file(saved: tuple[Identity, Path]) -> None:
    made, path = saved
    old_content = path.read_bytes()
    rotation = rotate(path, PASSPHRASE)
    assert rotation.old.node_id == made.node_id != rotation.new.node_id
    assert Identity.load(path, PASSPHRASE).node_id == rotation.new.node_id
    assert re.fullmatch(r"identity\.json\.\d{8}T\d{6}Z\.old", rotation.kept_at.name)
    assert rotation.kept_at.read_bytes() == old_content and stat.S_IMODE(rotation.kept_at.stat().st_mode) == 0o600
    assert Identity.load(rotation.kept_at, PASSPHRASE).node_id == made.node_id
    # the old key can sign the membership change that names the new one
    change = {"rotate_to": rotation.new.public().to_dict()}
    assert made.public().verify(change, rotation.old.sign(change))
    second = rotate(path, PASSPHRASE)  # within the same second: a name of its own
    assert second.kept_at != rotation.kept_at and second.old.node_id == rotation.new.node_id
    assert len(list(path.parent.iterdir())) == 3


def test_rotation_with_a_wrong_passphrase_changes_nothing(saved: tuple[Identity, Path]) -> None:
    _, path = saved
    before = snapshot(path)
    with pytest.raises(IdentityPassphraseError):
        rotate(path, "wrong")
    assert snapshot(path) == before and len(list(path.parent.iterdir())) == 1


# -- command line ------------------------------------------------------------------------

def test_command_line_shows_and_changes_the_passphrase(saved, monkeypatch, capsys) -> None:
    made, path = saved
    assert identity_module.main(["show", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["node_id"] == made.node_id
    monkeypatch.setenv("EMR_IDENTITY_PASSPHRASE", PASSPHRASE)
    monkeypatch.setenv("EMR_IDENTITY_NEW_PASSPHRASE", "another")
    assert identity_module.main(["passphrase", str(path)]) == 0
    assert made.short_id in capsys.readouterr().out
    assert Identity.load(path, "another").node_id == made.node_id
    assert identity_module.main(["passphrase", str(path)]) == 1  # the old passphrase no longer opens it
    assert "wrong passphrase" in capsys.readouterr().err
