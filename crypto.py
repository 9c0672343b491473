"""Encrypt and decrypt files in the AES Crypt stream format, version 2.

Files written here open in the desktop AES Crypt tools and in pyAesCrypt, and
theirs open here.  Layout: "AES", version 2, reserved 0, extensions ending in
0x0000, IV1, the session IV2 + key2 encrypted under a password-derived key,
HMAC of that, the body (AES-256-CBC under key2/IV2), the file size modulo 16,
HMAC of the body.

Format limits worth knowing: extensions (such as CREATED_BY) are not
authenticated, by design, and neither is the modulo byte m (the plaintext size
mod 16) in the trailer.  The padding m implies is authenticated, though, so
when m is not 0, bytes m..15 of the last block must be padding as a known
writer leaves it, or the file is refused as damaged: 16 - m repeated
(pyAesCrypt and this module), the same bytes of the block encrypted just before
(AES Crypt's own C, C++ and Java tools, which encrypt in place), or zeros in a
one-block file (AES Crypt's Java library).  What still cannot be detected:

- m changed to 0: the plaintext gains its padding (up to 15 bytes), since a
  plaintext whose size is a multiple of 16 may end in any bytes;
- 0 changed to m when the plaintext happens to end like padding for m (in a
  byte 0x01, say, for m = 15, or, in a 16-byte file, in zeros): it loses
  those bytes;
- in a file from AES Crypt's own tools, m raised: the plaintext gains up to 14
  bytes of the block before the last;
- in a file from pyAesCrypt or this module, m changed to m' when bytes m'..15
  of the ciphertext block before the last happen to equal what the last block
  holds there.  Raising m to 15 needs one such byte: 1 file in 256, which
  anyone holding the file can spot, can gain up to 14 padding bytes; other
  changes need two bytes or more (1 in 65,536 or rarer).

A wrong password and a damaged header look the same.
"""

from __future__ import annotations

import argparse
import ctypes
import getpass
import hashlib
import hmac
import os
import secrets
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Union

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from errors import (CryptoError, DamagedFileError, InvalidPasswordError, NotAesCryptError, OutputExistsError,
                    TruncatedFileError, WrongPasswordError)
from storage import written_atomically

__version__ = "0.1.0"

MAGIC = b"AES"
FORMAT_VERSION = 2
RESERVED_BYTE = 0
PREFIX_SIZE = len(MAGIC) + 2  # magic, version, reserved
CREATED_BY_ID = b"CREATED_BY"
CREATED_BY = f"emr-chain {__version__}".encode()
CONTAINER_SIZE = 128
EXTENSION_LENGTH_SIZE = 2
END_OF_EXTENSIONS = b"\x00\x00"
BLOCK_SIZE = 16  # AES, whatever the key size
IV_SIZE = 16
KEY_SIZE = 32
SESSION_SIZE = IV_SIZE + KEY_SIZE
HMAC_SIZE = hashlib.sha256().digest_size
TRAILER_SIZE = 1 + HMAC_SIZE
KDF_ROUNDS = 8192
MAX_PASSWORD_LENGTH = 1024
DEFAULT_CHUNK_SIZE = 1024 * 1024
BUFFERS_IN_TURN = 2  # one chunk being hashed in the helper thread, the next being filled
WRITEBACK_STEP = 4 * 1024 * 1024  # a syscall every few chunks; little left over for the fsync
SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writing the range out, do not wait
MODULO_MISMATCH = "file is damaged or was tampered with (its size byte disagrees with its padding)"
GENERATED_PASSWORD_BYTES = 32

AES_SUFFIX = ".aes"
PASSWORD_ENV = "EMR_PASSWORD"
PROGRESS_BAR_THRESHOLD = 8 * 1024 * 1024
PROGRESS_BAR_WIDTH = 30

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_WRONG_PASSWORD = 3
EXIT_BAD_FILE = 4
EXIT_OUTPUT_EXISTS = 5
EXIT_MISSING_INPUT = 6
EXIT_INTERRUPTED = 130

StrPath = Union[str, "os.PathLike[str]"]
Progress = Optional[Callable[[int, int], None]]


def default_output(src: Path, encrypting: bool) -> Optional[Path]:
    """FILE -> FILE.aes, FILE.aes -> FILE; None when a name to decrypt to cannot be derived."""
    if encrypting:
        return src.with_name(src.name + AES_SUFFIX)
    if src.name.lower().endswith(AES_SUFFIX) and len(src.name) > len(AES_SUFFIX):
        return src.with_name(src.name[:-len(AES_SUFFIX)])
    return None


def generate_password() -> str:
    """Return a strong random password (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)


def _encode_password(password: str, path: Path) -> bytes:
    """Encode as the format requires (UTF-16LE).

    The length limit counts UTF-16 code units, which is never fewer than the
    characters pyAesCrypt counts, so every password accepted here opens there.
    """
    try:
        encoded = password.encode("utf-16-le")
    except UnicodeEncodeError:
        raise InvalidPasswordError(path, "password is not valid Unicode text") from None
    if not encoded or len(encoded) // 2 > MAX_PASSWORD_LENGTH:
        raise InvalidPasswordError(path, f"password must be 1 to {MAX_PASSWORD_LENGTH} characters")
    return encoded


def _derive_key(password: bytes, iv1: bytes) -> bytes:
    digest = iv1 + bytes(KEY_SIZE - IV_SIZE)
    for _ in range(KDF_ROUNDS):
        digest = hashlib.sha256(digest + password).digest()
    return digest


def _hmac(key: bytes, data: bytes = b"") -> hmac.HMAC:
    return hmac.new(key, data, hashlib.sha256)


def _cbc(key: bytes, iv: bytes) -> Cipher:
    """AES-256-CBC without padding (the format pads itself), from OpenSSL through `cryptography`."""
    return Cipher(algorithms.AES(key), modes.CBC(iv))


def _encrypt_blocks(key: bytes, iv: bytes, data: bytes) -> bytes:
    encryptor = _cbc(key, iv).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def _decrypt_blocks(key: bytes, iv: bytes, data: bytes) -> bytes:
    decryptor = _cbc(key, iv).decryptor()
    return decryptor.update(data) + decryptor.finalize()


def _load_sync_file_range() -> Optional[Callable[[int, int, int, int], int]]:
    """libc's sync_file_range(2) on Linux; None elsewhere (Python's os module has no binding)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


class _EarlyWriteback:
    """Start writing an output file to disk while it is still being produced.

    Outputs are fsync'd once, before the rename, so that a crash cannot leave
    an empty file under the name.  Left alone, the kernel writes nothing before
    that fsync, which then writes the whole file while the caller waits (a
    quarter of the time of a 256 MiB file here).  sync_file_range with
    SYNC_FILE_RANGE_WRITE asks for each written stretch to go out now, without
    waiting (PostgreSQL's *_flush_after settings do the same), so the disk
    works while the CPU encrypts and the one fsync finds little left.  It is
    advisory: where it is missing or fails, that fsync does all the work.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._fd = out.fileno()
        self._started = 0

    def __call__(self, written: int) -> None:
        """Bytes up to offset `written` have been handed to the file."""
        if _sync_file_range is None or written - self._started < WRITEBACK_STEP:
            return
        _sync_file_range(self._fd, self._started, written - self._started, SYNC_FILE_RANGE_WRITE)
        self._started = written


def _usable_cpus() -> int:
    """CPUs this process may run on: its affinity where the OS tells it, else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _BackgroundHmac:
    """HMAC-SHA256 of a stream, computed in a helper thread one chunk behind the caller.

    hashlib releases the GIL while it hashes, so on a second core the HMAC, a
    third of the work per chunk, overlaps the reading, AES and writing of the
    next chunk.  A buffer handed to update() must stay unchanged until the next
    update() or digest() returns: callers fill BUFFERS_IN_TURN buffers in turn.
    A process confined to one CPU hashes inline instead: there the thread only
    adds switches (3 to 5% slower, measured on 256 MiB).
    """

    def __init__(self, key: bytes) -> None:
        self._mac = _hmac(key)
        self._pool = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="aes-crypt-hmac")
                      if _usable_cpus() > 1 else None)
        self._pending: Optional[Future[None]] = None

    def __enter__(self) -> _BackgroundHmac:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def update(self, data: memoryview) -> None:
        if self._pool is None:
            self._mac.update(data)
            return
        self._wait()
        self._pending = self._pool.submit(self._mac.update, data)

    def digest(self) -> bytes:
        self._wait()
        return self._mac.digest()

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size <= 0 or chunk_size % BLOCK_SIZE:
        raise ValueError(f"chunk_size must be a positive multiple of {BLOCK_SIZE}")


def _read_exact(stream: BinaryIO, size: int, path: Path) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise TruncatedFileError(path)
    return data


def _refuse_existing(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not overwrite:
        raise OutputExistsError(dst)


@contextmanager
def _atomic_output(dst: Path, overwrite: bool) -> Iterator[BinaryIO]:
    """A temp file beside dst, moved into place only if the block succeeds (owner-only, as mkstemp makes it)."""
    try:
        with written_atomically(dst, overwrite=overwrite) as out:
            yield out
    except FileExistsError:
        raise OutputExistsError(dst) from None


def _header(iv1: bytes, encrypted_session: bytes, session_mac: bytes) -> bytes:
    created_by = CREATED_BY_ID + b"\x00" + CREATED_BY
    return b"".join([
        MAGIC, bytes([FORMAT_VERSION, RESERVED_BYTE]),
        len(created_by).to_bytes(EXTENSION_LENGTH_SIZE, "big"), created_by,
        CONTAINER_SIZE.to_bytes(EXTENSION_LENGTH_SIZE, "big"), bytes(CONTAINER_SIZE),
        END_OF_EXTENSIONS, iv1, encrypted_session, session_mac,
    ])


def encrypt_file(src: StrPath, dst: StrPath, password: str, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, progress: Progress = None,
                 overwrite: bool = False) -> int:
    """Encrypt src into dst (AES Crypt v2) and return the number of bytes written.

    One pass: each chunk is read into one buffer, encrypted into one of two
    others, written, and hashed in a helper thread while the next chunk is
    read and encrypted; memory stays at a few chunks whatever the size.
    """
    src, dst = Path(src), Path(dst)
    _check_chunk_size(chunk_size)
    encoded = _encode_password(password, src)
    _refuse_existing(dst, overwrite)
    with open(src, "rb") as fin, _atomic_output(dst, overwrite) as out:
        total = os.fstat(fin.fileno()).st_size
        iv1, iv2, key2 = (secrets.token_bytes(n) for n in (IV_SIZE, IV_SIZE, KEY_SIZE))
        key = _derive_key(encoded, iv1)
        encrypted_session = _encrypt_blocks(key, iv1, iv2 + key2)
        written = out.write(_header(iv1, encrypted_session, _hmac(key, encrypted_session).digest()))
        encryptor, writeback = _cbc(key2, iv2).encryptor(), _EarlyWriteback(out)
        plain = bytearray(chunk_size)
        outputs = [bytearray(chunk_size + BLOCK_SIZE) for _ in range(BUFFERS_IN_TURN)]
        done = turn = 0
        with _BackgroundHmac(key2) as mac:
            while True:
                length = fin.readinto(plain)
                done += length
                last = length < chunk_size
                if last and length % BLOCK_SIZE:
                    # Like pyAesCrypt: n bytes of value n, and none at all when the
                    # size is already a multiple of 16 (the modulo byte records it).
                    pad = BLOCK_SIZE - length % BLOCK_SIZE
                    plain[length:length + pad] = bytes([pad]) * pad
                    length += pad
                output = outputs[turn % BUFFERS_IN_TURN]
                block = memoryview(output)[:encryptor.update_into(memoryview(plain)[:length], output)]
                mac.update(block)
                written += out.write(block)
                writeback(written)
                turn += 1
                if progress and length:
                    progress(done, total)
                if last:
                    break
            written += out.write(bytes([done % BLOCK_SIZE]) + mac.digest())
    return written


def _read_header(fin: BinaryIO, path: Path) -> tuple[bytes, bytes, bytes]:
    """Check magic, version and reserved byte, skip extensions; return (IV1, session, HMAC)."""
    prefix = fin.read(PREFIX_SIZE)
    if prefix[:len(MAGIC)] != MAGIC:
        raise NotAesCryptError(path)
    if len(prefix) < PREFIX_SIZE:
        raise TruncatedFileError(path)
    version, reserved = prefix[len(MAGIC):]
    if version != FORMAT_VERSION:
        raise NotAesCryptError(path, f"unsupported AES Crypt format version {version} "
                                     f"(only version {FORMAT_VERSION} is supported)")
    if reserved != RESERVED_BYTE:
        raise DamagedFileError(path)
    while True:
        length = int.from_bytes(_read_exact(fin, EXTENSION_LENGTH_SIZE, path), "big")
        if not length:
            break
        _read_exact(fin, length, path)
    return (_read_exact(fin, IV_SIZE, path), _read_exact(fin, SESSION_SIZE, path),
            _read_exact(fin, HMAC_SIZE, path))


def _plaintext_of_last_block(last: bytes, previous: bytes, modulo: int, one_block: bool,
                             path: Path) -> bytes:
    """The plaintext bytes of the last block, once its padding agrees with the modulo byte.

    `previous` is the ciphertext block encrypted just before the last one: the
    one before it in the body or, in a one-block body, the last block of the
    encrypted session key (what AES Crypt's C and C++ tools leave in their
    buffer).  See the module docstring for what this cannot catch.
    """
    if not modulo:
        return last
    padding, pad_length = last[modulo:], BLOCK_SIZE - modulo
    written_by_known_tools = [
        bytes([pad_length]) * pad_length,  # pyAesCrypt and this module
        previous[modulo:],  # AES Crypt's C, C++ and Java tools: they encrypt in place
    ]
    if one_block:
        written_by_known_tools.append(bytes(pad_length))  # AES Crypt's Java library: a zeroed buffer
    if padding not in written_by_known_tools:
        raise DamagedFileError(path, MODULO_MISMATCH)
    return last[:modulo]


def decrypt_file(src: StrPath, dst: StrPath, password: str, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, progress: Progress = None,
                 overwrite: bool = False) -> int:
    """Decrypt src into dst and return the number of plaintext bytes written.

    One pass over the file: each chunk is hashed (in a helper thread, as when
    encrypting) and decrypted into a temporary file beside dst, and the last
    plaintext block is held back until the trailer (modulo byte and HMAC) is
    read.  Only when the body HMAC matches and the modulo byte agrees with the
    padding is the last block written and the file renamed to dst; on any
    failure the temporary file is removed, so no plaintext ever appears under
    dst's name.  The bytes decrypted are the bytes authenticated, even if the
    file changes meanwhile.  A wrong password is found from the header alone,
    before any file is created.  progress receives bytes processed out of the
    body size.
    """
    src, dst = Path(src), Path(dst)
    _check_chunk_size(chunk_size)
    encoded = _encode_password(password, src)
    _refuse_existing(dst, overwrite)
    with open(src, "rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        iv1, encrypted_session, session_mac = _read_header(fin, src)
        key = _derive_key(encoded, iv1)
        if not hmac.compare_digest(_hmac(key, encrypted_session).digest(), session_mac):
            raise WrongPasswordError(src)
        session = _decrypt_blocks(key, iv1, encrypted_session)
        iv2, key2 = session[:IV_SIZE], session[IV_SIZE:]
        body_length = size - fin.tell() - TRAILER_SIZE
        if body_length < 0 or body_length % BLOCK_SIZE:
            raise TruncatedFileError(src)
        decryptor = _cbc(key2, iv2).decryptor()
        inputs = [bytearray(chunk_size) for _ in range(BUFFERS_IN_TURN)]
        plain = bytearray(chunk_size + BLOCK_SIZE)
        previous, last = encrypted_session[-BLOCK_SIZE:], b""
        written, remaining, turn = 0, body_length, 0
        with _atomic_output(dst, overwrite) as out, _BackgroundHmac(key2) as mac:
            writeback = _EarlyWriteback(out)
            while remaining:
                block = memoryview(inputs[turn % BUFFERS_IN_TURN])[:min(chunk_size, remaining)]
                if fin.readinto(block) != len(block):
                    raise TruncatedFileError(src)
                remaining -= len(block)
                mac.update(block)
                decrypted = memoryview(plain)[:decryptor.update_into(block, plain)]
                if remaining:
                    previous = bytes(block[-BLOCK_SIZE:])
                else:  # the last block is held back until the trailer is read
                    if len(block) > BLOCK_SIZE:
                        previous = bytes(block[-2 * BLOCK_SIZE:-BLOCK_SIZE])
                    last, decrypted = bytes(decrypted[-BLOCK_SIZE:]), decrypted[:-BLOCK_SIZE]
                written += out.write(decrypted)
                writeback(written)
                turn += 1
                if progress:
                    progress(body_length - remaining, body_length)
            trailer = _read_exact(fin, TRAILER_SIZE, src)
            modulo, body_mac = trailer[0], trailer[1:]
            if not hmac.compare_digest(mac.digest(), body_mac):
                raise DamagedFileError(src)
            if modulo >= BLOCK_SIZE or (not body_length and modulo):
                raise DamagedFileError(src)
            written += out.write(_plaintext_of_last_block(last, previous, modulo,
                                                          body_length == BLOCK_SIZE, src))
    return written


class _ProgressBar:
    """A one-line bar on stderr, drawn only for large files on a terminal."""

    def __init__(self, label: str, size: int) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() and size > PROGRESS_BAR_THRESHOLD
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or not total:
            return
        filled = done * PROGRESS_BAR_WIDTH // total
        bar = "#" * filled + "." * (PROGRESS_BAR_WIDTH - filled)
        sys.stderr.write(f"\r{self.label} [{bar}] {100 * done // total:3d}%")
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")


class _UsageError(Exception):
    pass


def _get_password(explicit: Optional[str], confirm: bool) -> str:
    """-p, then $EMR_PASSWORD, then an interactive prompt (twice when encrypting)."""
    if explicit is not None:
        return explicit
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    if not sys.stdin.isatty():
        raise _UsageError(f"no password: use -p, set {PASSWORD_ENV}, or run in a terminal")
    password = getpass.getpass("Password: ")
    if confirm and getpass.getpass("Repeat password: ") != password:
        raise _UsageError("passwords do not match")
    return password


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("file", help="input file")
    common.add_argument("-o", "--output", help="output file")
    common.add_argument("--force", action="store_true", help="replace an existing output file")
    common.add_argument("-p", "--password", help=f"password (visible to other users in the "
                        f"process list; prefer ${PASSWORD_ENV} or the prompt)")
    parser = argparse.ArgumentParser(description="AES Crypt (v2) file encryption for emr-chain.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("encrypt", parents=[common], help=f"write FILE{AES_SUFFIX}")
    commands.add_parser("decrypt", parents=[common], help=f"write FILE without {AES_SUFFIX}")
    commands.add_parser("keygen", help="print a strong random password")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "keygen":
        print(generate_password())
        return EXIT_OK
    src = Path(args.file)
    if not src.is_file():
        print(f"error: {src}: no such file", file=sys.stderr)
        return EXIT_MISSING_INPUT
    encrypting = args.command == "encrypt"
    dst = Path(args.output) if args.output else default_output(src, encrypting)
    if dst is None:
        raise _UsageError(f"{src}: name does not end in {AES_SUFFIX}; use -o to name the output")
    _refuse_existing(dst, args.force)
    password = _get_password(args.password, confirm=encrypting)
    bar = _ProgressBar("encrypting" if encrypting else "decrypting", src.stat().st_size)
    try:
        operation = encrypt_file if encrypting else decrypt_file
        operation(src, dst, password, progress=bar, overwrite=args.force)
    finally:
        bar.close()
    return EXIT_OK


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry point; returns the process exit code."""
    args = _build_parser().parse_args(argv)
    exit_codes = [(WrongPasswordError, EXIT_WRONG_PASSWORD), (OutputExistsError, EXIT_OUTPUT_EXISTS),
                  (InvalidPasswordError, EXIT_USAGE), (CryptoError, EXIT_BAD_FILE)]
    try:
        return _run(args)
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CryptoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return next(code for kind, code in exit_codes if isinstance(exc, kind))
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (KeyboardInterrupt, EOFError):
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
