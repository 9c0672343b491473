"""Tests for crypto.py: AES Crypt v2 format, tamper handling, pyAesCrypt interop, CLI."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import crypto
import storage
from crypto import (
    CryptoError,
    DamagedFileError,
    InvalidPasswordError,
    NotAesCryptError,
    OutputExistsError,
    TruncatedFileError,
    WrongPasswordError,
    decrypt_file,
    encrypt_file,
    generate_password,
)

ROOT = Path(__file__).resolve().parent.parent
CRYPTO_PY = ROOT / "crypto.py"

PASSWORD = "correct horse battery staple"
UNICODE_PASSWORD = "пароль-密码-🔑"
MRI_REPORT_SIZE = 63_795  # the paper's 62.3 KB MRI report
MIB = 1024 * 1024

# Layout written by AES Crypt v2 tools, counted from the spec, not from crypto.py:
# "AES" 2 0 | 2+26 CREATED_BY "emr-chain 0.1.0" | 2+128 container | 0x0000
EXTENSIONS_END = 5 + (2 + len(b"CREATED_BY\x00emr-chain ") + len(crypto.__version__)) + (2 + 128) + 2
IV1_AT = EXTENSIONS_END
SESSION_AT = IV1_AT + 16
HEADER_HMAC_AT = SESSION_AT + 48
BODY_AT = HEADER_HMAC_AT + 32
TRAILER = 1 + 32

SMALL_SIZE = 1000  # body 1008 bytes, modulo byte 8
SMALL_BODY = 1008


def make_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


@pytest.fixture
def encrypted(tmp_path):
    """A 1000-byte plaintext and its encryption; returns (plaintext, path to .aes)."""
    data = make_file(tmp_path / "record.bin", SMALL_SIZE)
    encrypt_file(tmp_path / "record.bin", tmp_path / "record.bin.aes", PASSWORD)
    (tmp_path / "record.bin").unlink()
    return data, tmp_path / "record.bin.aes"


@pytest.fixture
def pyaescrypt():
    import pyAesCrypt  # a test dependency in requirements.txt: interoperability must be proven, not skipped
    return pyAesCrypt


def assert_only(directory: Path, *names: str) -> None:
    """No plaintext, no leftover temporary file: the folder holds exactly these names."""
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, MRI_REPORT_SIZE, 5 * MIB])
def test_round_trip_restores_exact_bytes(tmp_path, size):
    data = make_file(tmp_path / "in", size)
    written = encrypt_file(tmp_path / "in", tmp_path / "in.aes", PASSWORD)
    assert written == (tmp_path / "in.aes").stat().st_size
    assert written == BODY_AT + -(-size // 16) * 16 + TRAILER
    assert decrypt_file(tmp_path / "in.aes", tmp_path / "out", PASSWORD) == size
    assert (tmp_path / "out").read_bytes() == data


@pytest.mark.parametrize("cpus", [1, 2])
def test_round_trip_with_the_hmac_inline_or_in_a_helper_thread(tmp_path, monkeypatch, cpus):
    """One CPU: the HMAC is computed inline; more: in a helper thread, one chunk behind. Same files."""
    monkeypatch.setattr(crypto, "_usable_cpus", lambda: cpus)
    data = make_file(tmp_path / "in", 3 * MIB + 5)
    encrypt_file(tmp_path / "in", tmp_path / "in.aes", PASSWORD, chunk_size=64 * 1024)
    assert decrypt_file(tmp_path / "in.aes", tmp_path / "out", PASSWORD, chunk_size=48 * 1024) == len(data)
    assert (tmp_path / "out").read_bytes() == data
    raw = bytearray((tmp_path / "in.aes").read_bytes())
    raw[BODY_AT + 2 * MIB] ^= 0x01
    (tmp_path / "in.aes").write_bytes(raw)
    with pytest.raises(DamagedFileError):
        decrypt_file(tmp_path / "in.aes", tmp_path / "again", PASSWORD, chunk_size=48 * 1024)
    assert_only(tmp_path, "in", "in.aes", "out")


@pytest.mark.parametrize("size", [0, 16, 31, 32, 33, 64, 100])
def test_round_trip_across_chunk_boundaries(tmp_path, size):
    data = make_file(tmp_path / "in", size)
    encrypt_file(str(tmp_path / "in"), str(tmp_path / "in.aes"), PASSWORD, chunk_size=32)
    decrypt_file(str(tmp_path / "in.aes"), str(tmp_path / "out"), PASSWORD, chunk_size=16)
    assert (tmp_path / "out").read_bytes() == data


def test_header_is_aes_crypt_v2_with_created_by_and_container(encrypted):
    raw = encrypted[1].read_bytes()
    assert raw[:5] == b"AES\x02\x00"
    created_by = b"CREATED_BY\x00emr-chain " + crypto.__version__.encode()
    assert raw[5:7] == len(created_by).to_bytes(2, "big")
    assert raw[7:7 + len(created_by)] == created_by
    container = 7 + len(created_by)
    assert raw[container:container + 2 + 128 + 2] == b"\x00\x80" + bytes(128) + b"\x00\x00"
    assert raw[-TRAILER] == SMALL_SIZE % 16


def _open_independently(raw: bytes, password: str) -> bytes:
    """Decrypt per the spec with hashlib/pycryptodome only, keeping the padding bytes."""
    import hashlib
    from Crypto.Cipher import AES

    iv1 = raw[IV1_AT:SESSION_AT]
    key = iv1 + bytes(16)
    for _ in range(8192):
        key = hashlib.sha256(key + password.encode("utf-16-le")).digest()
    session = AES.new(key, AES.MODE_CBC, iv1).decrypt(raw[SESSION_AT:HEADER_HMAC_AT])
    return AES.new(session[16:], AES.MODE_CBC, session[:16]).decrypt(raw[BODY_AT:-TRAILER])


@pytest.mark.parametrize("size", [1, 15, 17, 31, 32])
def test_last_block_is_padded_like_pyaescrypt(tmp_path, size):
    data = make_file(tmp_path / "in", size)
    encrypt_file(tmp_path / "in", tmp_path / "in.aes", PASSWORD)
    pad = (16 - size % 16) % 16
    assert _open_independently((tmp_path / "in.aes").read_bytes(), PASSWORD) == data + bytes([pad]) * pad


def test_same_plaintext_encrypts_differently_each_time(tmp_path):
    make_file(tmp_path / "in", 64)
    encrypt_file(tmp_path / "in", tmp_path / "a.aes", PASSWORD)
    encrypt_file(tmp_path / "in", tmp_path / "b.aes", PASSWORD)
    assert (tmp_path / "a.aes").read_bytes()[IV1_AT:] != (tmp_path / "b.aes").read_bytes()[IV1_AT:]


def test_encrypted_file_does_not_contain_the_plaintext(tmp_path):
    (tmp_path / "in").write_bytes(b"PATIENT: Jane Doe, MRI brain, no abnormality. " * 20)
    encrypt_file(tmp_path / "in", tmp_path / "in.aes", PASSWORD)
    assert b"Jane Doe" not in (tmp_path / "in.aes").read_bytes()


def test_progress_reports_growing_counts_up_to_the_total(tmp_path):
    make_file(tmp_path / "in", 100_000)
    calls = []
    encrypt_file(tmp_path / "in", tmp_path / "in.aes", PASSWORD, chunk_size=16_384,
                 progress=lambda done, total: calls.append((done, total)))
    assert len(calls) > 3 and calls[-1] == (100_000, 100_000)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    calls.clear()
    decrypt_file(tmp_path / "in.aes", tmp_path / "out", PASSWORD, chunk_size=16_384,
                 progress=lambda done, total: calls.append((done, total)))
    assert calls[-1][0] == calls[-1][1] > 0
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
def test_output_is_flushed_to_disk_once_before_it_takes_its_name(tmp_path, monkeypatch, direction):
    """Durability stays: one fsync, of the temporary file, before the rename (so no empty file after a crash)."""
    make_file(tmp_path / "in", 9 * MIB)
    encrypt_file(tmp_path / "in", tmp_path / "in.aes", PASSWORD)
    encrypting = direction == "encrypt"
    src, dst = (tmp_path / "in", tmp_path / "copy.aes") if encrypting else (tmp_path / "in.aes", tmp_path / "out")
    real_fsync, synced = os.fsync, []

    def recording_fsync(fd):
        synced.append(dst.exists())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    (encrypt_file if encrypting else decrypt_file)(src, dst, PASSWORD)
    assert synced == [False] and dst.exists()


def test_chunk_size_not_a_multiple_of_16_is_rejected(tmp_path):
    make_file(tmp_path / "in", 10)
    with pytest.raises(ValueError):
        encrypt_file(tmp_path / "in", tmp_path / "in.aes", PASSWORD, chunk_size=1000)
    assert_only(tmp_path, "in")


# ---------------------------------------------------------------- passwords

def test_wrong_password_is_refused_without_output(encrypted):
    with pytest.raises(WrongPasswordError, match="record.bin.aes: wrong password"):
        decrypt_file(encrypted[1], encrypted[1].parent / "out", "not the password")
    assert_only(encrypted[1].parent, "record.bin.aes")


def test_unicode_password_round_trips_and_a_similar_one_fails(tmp_path):
    data = make_file(tmp_path / "in", 5000)
    encrypt_file(tmp_path / "in", tmp_path / "in.aes", UNICODE_PASSWORD)
    with pytest.raises(WrongPasswordError):
        decrypt_file(tmp_path / "in.aes", tmp_path / "out", "пароль-密码-🔐")
    decrypt_file(tmp_path / "in.aes", tmp_path / "out", UNICODE_PASSWORD)
    assert (tmp_path / "out").read_bytes() == data


@pytest.mark.parametrize("password", ["", "x" * 1025, "🔑" * 513])
def test_empty_or_too_long_password_is_refused(tmp_path, password):
    make_file(tmp_path / "in", 10)
    with pytest.raises(InvalidPasswordError) as info:
        encrypt_file(tmp_path / "in", tmp_path / "in.aes", password)
    if password:
        assert password not in str(info.value)
    assert_only(tmp_path, "in")


def test_password_of_maximum_length_round_trips(tmp_path):
    data = make_file(tmp_path / "in", 100)
    encrypt_file(tmp_path / "in", tmp_path / "in.aes", "p" * 1024)
    decrypt_file(tmp_path / "in.aes", tmp_path / "out", "p" * 1024)
    assert (tmp_path / "out").read_bytes() == data


def test_generated_passwords_are_long_and_distinct():
    first, second = generate_password(), generate_password()
    assert len(first) >= 32 and first != second


# ---------------------------------------------------------------- tampering

FLIPS = {
    "magic": (0, NotAesCryptError),
    "version": (3, NotAesCryptError),
    "reserved": (4, DamagedFileError),
    "extension-length": (5, TruncatedFileError),
    "end-of-extensions": (EXTENSIONS_END - 2, TruncatedFileError),
    "iv1": (IV1_AT + 7, WrongPasswordError),
    "session-key-first": (SESSION_AT, WrongPasswordError),
    "session-key-last": (HEADER_HMAC_AT - 1, WrongPasswordError),
    "header-hmac-first": (HEADER_HMAC_AT, WrongPasswordError),
    "header-hmac-last": (BODY_AT - 1, WrongPasswordError),
    "body-first": (BODY_AT, DamagedFileError),
    "body-middle": (BODY_AT + SMALL_BODY // 2, DamagedFileError),
    "body-last-block": (BODY_AT + SMALL_BODY - 1, DamagedFileError),
    "modulo": (BODY_AT + SMALL_BODY, DamagedFileError),
    "final-hmac-first": (BODY_AT + SMALL_BODY + 1, DamagedFileError),
    "final-hmac-last": (BODY_AT + SMALL_BODY + 32, DamagedFileError),
}


@pytest.mark.parametrize("where", FLIPS)
def test_flipped_byte_is_refused_without_plaintext(encrypted, where):
    position, expected = FLIPS[where]
    raw = bytearray(encrypted[1].read_bytes())
    assert len(raw) == BODY_AT + SMALL_BODY + TRAILER
    raw[position] ^= 0xFF
    encrypted[1].write_bytes(raw)
    with pytest.raises(expected) as info:
        decrypt_file(encrypted[1], encrypted[1].parent / "out", PASSWORD)
    assert type(info.value) is expected and "record.bin.aes" in str(info.value)
    assert_only(encrypted[1].parent, "record.bin.aes")


def test_damaged_body_leaves_no_plaintext_though_decryption_wrote_some(tmp_path):
    """One pass writes plaintext beside the target before the HMAC is known; a failure removes it."""
    make_file(tmp_path / "in", 3 * MIB)
    encrypt_file(tmp_path / "in", tmp_path / "in.aes", PASSWORD)
    raw = bytearray((tmp_path / "in.aes").read_bytes())
    raw[-TRAILER - 1] ^= 0x01  # the last ciphertext byte: found only at the very end
    (tmp_path / "in.aes").write_bytes(raw)
    (tmp_path / "out").mkdir()
    seen_meanwhile = []

    def look(done, total):
        seen_meanwhile.extend(p.name for p in (tmp_path / "out").iterdir())

    with pytest.raises(DamagedFileError):
        decrypt_file(tmp_path / "in.aes", tmp_path / "out" / "record.pdf", PASSWORD,
                     chunk_size=64 * 1024, progress=look)
    assert any(name.startswith(".part-") for name in seen_meanwhile)
    assert_only(tmp_path / "out")


def test_wrong_password_creates_no_file_at_all(encrypted, monkeypatch):
    """The header HMAC settles the password before any output file is created."""
    created = []

    def record_mkstemp(*args, **kwargs):
        created.append(kwargs)
        raise AssertionError("an output file was created for a wrong password")

    monkeypatch.setattr(storage.tempfile, "mkstemp", record_mkstemp)
    with pytest.raises(WrongPasswordError):
        decrypt_file(encrypted[1], encrypted[1].parent / "out", "not the password")
    assert created == []


def test_file_changed_during_decryption_leaves_no_plaintext(tmp_path):
    make_file(tmp_path / "in", 256 * 1024)
    encrypt_file(tmp_path / "in", tmp_path / "in.aes", PASSWORD)
    (tmp_path / "in").unlink()

    def tamper_ahead(done, total):
        if done == 16_384:  # after the first chunk: change bytes not read yet
            with open(tmp_path / "in.aes", "r+b") as f:
                f.seek(BODY_AT + 100_000)
                f.write(b"\x00\x01")

    with pytest.raises(DamagedFileError):
        decrypt_file(tmp_path / "in.aes", tmp_path / "out", PASSWORD, chunk_size=16_384,
                     progress=tamper_ahead)
    assert_only(tmp_path, "in.aes")


def test_what_is_written_is_what_was_authenticated(tmp_path):
    """A change to bytes already read and checked cannot reach the output: one pass, one reading."""
    data = make_file(tmp_path / "in", 256 * 1024)
    encrypt_file(tmp_path / "in", tmp_path / "in.aes", PASSWORD)

    def tamper_behind(done, total):
        if done == 2 * 16_384:
            with open(tmp_path / "in.aes", "r+b") as f:
                f.seek(BODY_AT + 10)
                f.write(b"\x00\x01")

    decrypt_file(tmp_path / "in.aes", tmp_path / "out", PASSWORD, chunk_size=16_384,
                 progress=tamper_behind)
    assert (tmp_path / "out").read_bytes() == data


class _CountingFileIO(io.FileIO):
    """A raw file that counts the bytes read through it (every buffered read ends here)."""

    bytes_read = 0

    def readinto(self, buffer):
        count = super().readinto(buffer)
        type(self).bytes_read += count or 0
        return count


def test_decrypting_reads_the_file_once(tmp_path, monkeypatch):
    make_file(tmp_path / "in", 4 * MIB + 5)
    encrypt_file(tmp_path / "in", tmp_path / "in.aes", PASSWORD)
    size = (tmp_path / "in.aes").stat().st_size

    def counting_open(path, mode="r", *args, **kwargs):
        if Path(path) == tmp_path / "in.aes":
            assert mode == "rb"
            return io.BufferedReader(_CountingFileIO(path, "rb"))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(_CountingFileIO, "bytes_read", 0)
    monkeypatch.setattr(crypto, "open", counting_open, raising=False)
    decrypt_file(tmp_path / "in.aes", tmp_path / "out", PASSWORD, chunk_size=256 * 1024)
    assert size <= _CountingFileIO.bytes_read <= size + io.DEFAULT_BUFFER_SIZE


def test_created_by_text_is_not_authenticated_as_the_spec_allows(encrypted):
    data, path = encrypted
    path.write_bytes(path.read_bytes().replace(b"emr-chain", b"other-app"))
    decrypt_file(path, path.parent / "out", PASSWORD)
    assert (path.parent / "out").read_bytes() == data


def _last_two_blocks(raw: bytes) -> tuple[bytes, bytes]:
    """The ciphertext block before the last, and the last one."""
    body_end = len(raw) - TRAILER
    return raw[body_end - 32:body_end - 16], raw[body_end - 16:body_end]


@pytest.fixture
def encrypted_unambiguous(tmp_path):
    """Like `encrypted`, minus the case crypto.py's docstring owns up to.

    A changed modulo byte m' passes when bytes m'..15 of the ciphertext block
    before the last equal those of the last plaintext block (the padding AES
    Crypt's own tools leave); about 1 encryption in 256 allows that for
    m' = 15.  Those are encrypted again, so that every m' must be refused.
    """
    data = make_file(tmp_path / "record.bin", SMALL_SIZE)
    pad = 16 - SMALL_SIZE % 16
    last_plain = data[-(16 - pad):] + bytes([pad]) * pad
    while True:
        encrypt_file(tmp_path / "record.bin", tmp_path / "record.bin.aes", PASSWORD, overwrite=True)
        previous, _ = _last_two_blocks((tmp_path / "record.bin.aes").read_bytes())
        if all(previous[m:] != last_plain[m:] for m in range(1, 16)):
            break
    (tmp_path / "record.bin").unlink()
    return data, tmp_path / "record.bin.aes"


@pytest.mark.parametrize("modulo", [m for m in range(1, 16) if m != SMALL_SIZE % 16])
def test_modulo_byte_changed_to_another_value_is_refused_without_plaintext(encrypted_unambiguous, modulo):
    _, path = encrypted_unambiguous
    raw = bytearray(path.read_bytes())
    raw[-TRAILER] = modulo
    path.write_bytes(raw)
    with pytest.raises(DamagedFileError, match="record.bin.aes: .*size byte disagrees with its padding"):
        decrypt_file(path, path.parent / "out", PASSWORD)
    assert_only(path.parent, "record.bin.aes")


@pytest.mark.parametrize("size", [17, SMALL_SIZE, MRI_REPORT_SIZE])  # 7 or more padding bytes: no 1-in-256 case
def test_modulo_byte_changed_on_a_pyaescrypt_file_is_refused(tmp_path, pyaescrypt, size):
    make_file(tmp_path / "in", size)
    pyaescrypt.encryptFile(str(tmp_path / "in"), str(tmp_path / "in.aes"), PASSWORD)
    raw = bytearray((tmp_path / "in.aes").read_bytes())
    raw[-TRAILER] = size % 16 + 1  # one byte of pyAesCrypt's padding passed off as data
    (tmp_path / "in.aes").write_bytes(raw)
    with pytest.raises(DamagedFileError):
        decrypt_file(tmp_path / "in.aes", tmp_path / "out", PASSWORD)
    assert_only(tmp_path, "in", "in.aes")


def test_modulo_byte_changed_to_0_lengthens_the_plaintext_a_format_limit(encrypted):
    """What cannot be caught: a size that is a multiple of 16 lets the plaintext end in anything."""
    data, path = encrypted
    raw = bytearray(path.read_bytes())
    raw[-TRAILER] = 0
    path.write_bytes(raw)
    decrypt_file(path, path.parent / "out", PASSWORD)
    pad = 16 - SMALL_SIZE % 16
    assert (path.parent / "out").read_bytes() == data + bytes([pad]) * pad


def _write_like_aes_crypt_tools(path: Path, data: bytes, password: str, tool: str) -> None:
    """Encrypt as AES Crypt's own tools do, from their published sources (not from crypto.py).

    They encrypt block by block in place: each read of up to 16 bytes lands in
    the buffer still holding the ciphertext block before, so a short last read
    leaves that block's bytes as padding.  Before the first block the buffer
    holds, in the C and C++ tools ("c"), the last block of the encrypted
    session key; in the Java library ("java"), zeros.
    """
    import hashlib
    import hmac
    from Crypto.Cipher import AES

    iv1, iv2, key2 = os.urandom(16), os.urandom(16), os.urandom(32)
    key = iv1 + bytes(16)
    for _ in range(8192):
        key = hashlib.sha256(key + password.encode("utf-16-le")).digest()
    session = AES.new(key, AES.MODE_CBC, iv1).encrypt(iv2 + key2)
    block_cipher = AES.new(key2, AES.MODE_ECB)
    buffer = bytearray(session[-16:] if tool == "c" else bytes(16))
    chain, body = iv2, bytearray()
    for start in range(0, len(data), 16):
        piece = data[start:start + 16]
        buffer[:len(piece)] = piece
        buffer = bytearray(block_cipher.encrypt(bytes(a ^ b for a, b in zip(buffer, chain))))
        chain = bytes(buffer)
        body += buffer
    header = b"AES\x02\x00" + b"\x00\x00" + iv1 + session + hmac.new(key, session, hashlib.sha256).digest()
    trailer = bytes([len(data) % 16]) + hmac.new(key2, bytes(body), hashlib.sha256).digest()
    path.write_bytes(header + bytes(body) + trailer)


@pytest.mark.parametrize("tool", ["c", "java"])
@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1000, MRI_REPORT_SIZE])
def test_we_open_what_aes_crypt_tools_write(tmp_path, tool, size):
    data = os.urandom(size)
    _write_like_aes_crypt_tools(tmp_path / "in.aes", data, PASSWORD, tool)
    assert decrypt_file(tmp_path / "in.aes", tmp_path / "out", PASSWORD) == size
    assert (tmp_path / "out").read_bytes() == data


@pytest.mark.parametrize("tool", ["c", "java"])
def test_lowered_modulo_byte_on_an_aes_crypt_tools_file_is_refused(tmp_path, tool):
    _write_like_aes_crypt_tools(tmp_path / "in.aes", os.urandom(SMALL_SIZE), PASSWORD, tool)
    raw = bytearray((tmp_path / "in.aes").read_bytes())
    raw[-TRAILER] = SMALL_SIZE % 16 - 3  # claims three of the plaintext bytes were padding
    (tmp_path / "in.aes").write_bytes(raw)
    with pytest.raises(DamagedFileError):
        decrypt_file(tmp_path / "in.aes", tmp_path / "out", PASSWORD)
    assert_only(tmp_path, "in.aes")


def test_raised_modulo_byte_on_an_aes_crypt_tools_file_is_a_format_limit(tmp_path):
    """What cannot be caught: those tools' padding is the block before, so more of it passes as data."""
    data = os.urandom(SMALL_SIZE)
    _write_like_aes_crypt_tools(tmp_path / "in.aes", data, PASSWORD, "c")
    raw = bytearray((tmp_path / "in.aes").read_bytes())
    modulo = SMALL_SIZE % 16
    raw[-TRAILER] = modulo + 3
    (tmp_path / "in.aes").write_bytes(raw)
    decrypt_file(tmp_path / "in.aes", tmp_path / "out", PASSWORD)
    previous, _ = _last_two_blocks(bytes(raw))
    assert (tmp_path / "out").read_bytes() == data + previous[modulo:modulo + 3]


@pytest.mark.parametrize("keep", [3, 4, 6, 100, IV1_AT + 5, SESSION_AT + 20, HEADER_HMAC_AT + 3,
                                  BODY_AT, BODY_AT + 200, BODY_AT + SMALL_BODY,
                                  BODY_AT + SMALL_BODY + TRAILER - 1])
def test_truncated_file_is_refused_without_plaintext(encrypted, keep):
    encrypted[1].write_bytes(encrypted[1].read_bytes()[:keep])
    with pytest.raises(TruncatedFileError, match="record.bin.aes: file is truncated"):
        decrypt_file(encrypted[1], encrypted[1].parent / "out", PASSWORD)
    assert_only(encrypted[1].parent, "record.bin.aes")


def test_file_cut_at_a_block_boundary_is_refused_as_damaged(encrypted):
    encrypted[1].write_bytes(encrypted[1].read_bytes()[:-16])
    with pytest.raises(DamagedFileError):
        decrypt_file(encrypted[1], encrypted[1].parent / "out", PASSWORD)
    assert_only(encrypted[1].parent, "record.bin.aes")


@pytest.mark.parametrize("content", [b"", b"AE", b"%PDF-1.7\n" + bytes(500), b"PK\x03\x04" * 100])
def test_non_aes_file_is_refused(tmp_path, content):
    (tmp_path / "x.aes").write_bytes(content)
    with pytest.raises(NotAesCryptError, match="x.aes: not an AES Crypt file"):
        decrypt_file(tmp_path / "x.aes", tmp_path / "out", PASSWORD)
    assert_only(tmp_path, "x.aes")


@pytest.mark.parametrize("version", [0, 1, 3])
def test_other_format_versions_are_refused_by_name(encrypted, version):
    raw = bytearray(encrypted[1].read_bytes())
    raw[3] = version
    encrypted[1].write_bytes(raw)
    with pytest.raises(NotAesCryptError, match=f"unsupported AES Crypt format version {version}"):
        decrypt_file(encrypted[1], encrypted[1].parent / "out", PASSWORD)


def test_all_errors_share_the_crypto_error_base():
    for kind in (WrongPasswordError, DamagedFileError, TruncatedFileError, NotAesCryptError,
                 OutputExistsError, InvalidPasswordError):
        assert issubclass(kind, CryptoError)


# ---------------------------------------------------------------- existing output

def test_existing_output_is_refused_and_left_untouched(tmp_path, encrypted):
    make_file(tmp_path / "plain", 10)
    (tmp_path / "taken").write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="taken"):
        encrypt_file(tmp_path / "plain", tmp_path / "taken", PASSWORD)
    with pytest.raises(OutputExistsError, match="taken"):
        decrypt_file(encrypted[1], tmp_path / "taken", PASSWORD)
    assert (tmp_path / "taken").read_bytes() == b"keep me"
    assert_only(tmp_path, "plain", "taken", "record.bin.aes")


def test_overwrite_replaces_existing_output(encrypted):
    data, path = encrypted
    (path.parent / "out").write_bytes(b"old")
    decrypt_file(path, path.parent / "out", PASSWORD, overwrite=True)
    assert (path.parent / "out").read_bytes() == data


def test_missing_input_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        encrypt_file(tmp_path / "absent", tmp_path / "absent.aes", PASSWORD)
    assert_only(tmp_path)


# ---------------------------------------------------------------- pyAesCrypt interop

INTEROP_SIZES = [0, 1, 16, 17, MRI_REPORT_SIZE, 200_003]


@pytest.mark.parametrize("size", INTEROP_SIZES)
def test_pyaescrypt_opens_what_we_write(tmp_path, pyaescrypt, size):
    data = make_file(tmp_path / "in", size)
    encrypt_file(tmp_path / "in", tmp_path / "in.aes", UNICODE_PASSWORD, chunk_size=64 * 1024)
    pyaescrypt.decryptFile(str(tmp_path / "in.aes"), str(tmp_path / "out"), UNICODE_PASSWORD)
    assert (tmp_path / "out").read_bytes() == data
    out = io.BytesIO()
    with open(tmp_path / "in.aes", "rb") as fin:
        pyaescrypt.decryptStream(fin, out, UNICODE_PASSWORD, 1024)
    assert out.getvalue() == data


@pytest.mark.parametrize("size", INTEROP_SIZES)
def test_we_open_what_pyaescrypt_writes(tmp_path, pyaescrypt, size):
    data = make_file(tmp_path / "in", size)
    pyaescrypt.encryptFile(str(tmp_path / "in"), str(tmp_path / "file.aes"), UNICODE_PASSWORD)
    decrypt_file(tmp_path / "file.aes", tmp_path / "from_file", UNICODE_PASSWORD)
    assert (tmp_path / "from_file").read_bytes() == data
    stream = io.BytesIO()
    pyaescrypt.encryptStream(io.BytesIO(data), stream, PASSWORD, 4096)
    (tmp_path / "stream.aes").write_bytes(stream.getvalue())
    decrypt_file(tmp_path / "stream.aes", tmp_path / "from_stream", PASSWORD, chunk_size=48)
    assert (tmp_path / "from_stream").read_bytes() == data


def test_pyaescrypt_refuses_our_file_under_a_wrong_password(encrypted, pyaescrypt):
    with open(encrypted[1], "rb") as fin, pytest.raises(ValueError, match="Wrong password"):
        pyaescrypt.decryptStream(fin, io.BytesIO(), "nope")


def test_maximum_length_password_interoperates(tmp_path, pyaescrypt):
    data = make_file(tmp_path / "in", 50)
    encrypt_file(tmp_path / "in", tmp_path / "in.aes", "k" * 1024)
    pyaescrypt.decryptFile(str(tmp_path / "in.aes"), str(tmp_path / "out"), "k" * 1024)
    assert (tmp_path / "out").read_bytes() == data


# ---------------------------------------------------------------- CLI

def run_cli(cwd: Path, *args: str, password=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "EMR_PASSWORD"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if password is not None:
        env["EMR_PASSWORD"] = password
    return subprocess.run([sys.executable, str(CRYPTO_PY), *args], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def assert_cli_error(result, code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.fixture
def cli_dir(tmp_path):
    """A folder with MRI.pdf and MRI.pdf.aes (encrypted under PASSWORD); returns (dir, plaintext)."""
    data = make_file(tmp_path / "MRI.pdf", MRI_REPORT_SIZE)
    encrypt_file(tmp_path / "MRI.pdf", tmp_path / "MRI.pdf.aes", PASSWORD)
    return tmp_path, data


def test_cli_encrypt_then_decrypt_writes_expected_names(tmp_path):
    data = make_file(tmp_path / "MRI.pdf", MRI_REPORT_SIZE)
    result = run_cli(tmp_path, "encrypt", "MRI.pdf", password=PASSWORD)
    assert result.returncode == 0 and result.stderr == ""
    (tmp_path / "MRI.pdf").unlink()
    result = run_cli(tmp_path, "decrypt", "MRI.pdf.aes", "-p", PASSWORD)
    assert result.returncode == 0 and result.stderr == ""
    assert (tmp_path / "MRI.pdf").read_bytes() == data
    assert_only(tmp_path, "MRI.pdf", "MRI.pdf.aes")


def test_cli_output_option_names_the_result(cli_dir):
    tmp_path, data = cli_dir
    assert run_cli(tmp_path, "encrypt", "MRI.pdf", "-o", "copy.bin", password=PASSWORD).returncode == 0
    assert run_cli(tmp_path, "decrypt", "copy.bin", "-o", "back.pdf", password=PASSWORD).returncode == 0
    assert (tmp_path / "back.pdf").read_bytes() == data


def test_cli_decrypt_without_aes_suffix_requires_output_option(cli_dir):
    tmp_path, _ = cli_dir
    (tmp_path / "MRI.pdf.aes").rename(tmp_path / "MRI.enc")
    assert_cli_error(run_cli(tmp_path, "decrypt", "MRI.enc", password=PASSWORD), 2, "MRI.enc", "-o")


def test_cli_wrong_password_exits_3_without_revealing_it(cli_dir):
    tmp_path, _ = cli_dir
    (tmp_path / "MRI.pdf").unlink()
    result = run_cli(tmp_path, "decrypt", "MRI.pdf.aes", "-p", "hunter2-guess")
    assert_cli_error(result, 3, "MRI.pdf.aes", "wrong password")
    assert "hunter2-guess" not in result.stderr + result.stdout
    assert_only(tmp_path, "MRI.pdf.aes")


def test_cli_damaged_file_exits_4(cli_dir):
    tmp_path, _ = cli_dir
    raw = bytearray((tmp_path / "MRI.pdf.aes").read_bytes())
    raw[BODY_AT + 1000] ^= 0x01
    (tmp_path / "MRI.pdf.aes").write_bytes(raw)
    result = run_cli(tmp_path, "decrypt", "MRI.pdf.aes", "-o", "out.pdf", password=PASSWORD)
    assert_cli_error(result, 4, "MRI.pdf.aes", "damaged")
    assert not (tmp_path / "out.pdf").exists()


def test_cli_truncated_file_exits_4(cli_dir):
    tmp_path, _ = cli_dir
    (tmp_path / "MRI.pdf.aes").write_bytes((tmp_path / "MRI.pdf.aes").read_bytes()[:-5])
    result = run_cli(tmp_path, "decrypt", "MRI.pdf.aes", "-o", "out.pdf", password=PASSWORD)
    assert_cli_error(result, 4, "MRI.pdf.aes", "truncated")


def test_cli_non_aes_file_exits_4(tmp_path):
    (tmp_path / "notes.txt.aes").write_text("just text\n")
    result = run_cli(tmp_path, "decrypt", "notes.txt.aes", password=PASSWORD)
    assert_cli_error(result, 4, "notes.txt.aes", "not an AES Crypt file")
    assert_only(tmp_path, "notes.txt.aes")


def test_cli_missing_input_exits_6(tmp_path):
    assert_cli_error(run_cli(tmp_path, "encrypt", "absent.pdf", password=PASSWORD), 6, "absent.pdf")


def test_cli_existing_output_exits_5_and_force_replaces_it(cli_dir):
    tmp_path, data = cli_dir
    (tmp_path / "MRI.pdf").write_bytes(b"stale")
    result = run_cli(tmp_path, "decrypt", "MRI.pdf.aes", password=PASSWORD)
    assert_cli_error(result, 5, "MRI.pdf", "--force")
    assert (tmp_path / "MRI.pdf").read_bytes() == b"stale"
    assert run_cli(tmp_path, "decrypt", "MRI.pdf.aes", "--force", password=PASSWORD).returncode == 0
    assert (tmp_path / "MRI.pdf").read_bytes() == data


def test_cli_without_any_password_source_fails_cleanly(cli_dir):
    tmp_path, _ = cli_dir
    (tmp_path / "MRI.pdf.aes").unlink()
    assert_cli_error(run_cli(tmp_path, "encrypt", "MRI.pdf"), 2, "EMR_PASSWORD")
    assert_only(tmp_path, "MRI.pdf")


def test_cli_keygen_prints_a_fresh_strong_password(tmp_path):
    first, second = run_cli(tmp_path, "keygen"), run_cli(tmp_path, "keygen")
    assert first.returncode == second.returncode == 0
    assert len(first.stdout.strip()) >= 32 and first.stdout != second.stdout


def test_cli_without_command_is_a_usage_error(tmp_path):
    assert run_cli(tmp_path).returncode == 2
