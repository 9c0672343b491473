"""The pieces that let uploads and downloads stream, in-process: the upload's multipart parser (against Werkzeug's
own), a download held while it is sent (SpooledDownload), and an upload body on its way to its thread (BodyPipe)."""
from __future__ import annotations

import io
import os
import random
import threading

import pytest
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from app import UPLOAD_HEAD_BYTES, MultipartUpload
from errors import BadInput, NodeError, RequestTimeout
from node import SpoolBudget, SpooledDownload
from server import BodyPipe

BOUNDARY = b"xyzB0und"
HEAD = b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; filename="f.bin"\r\n\r\n'
MIB = 1024 * 1024


class Trickle:
    """A body read in pieces of random sizes, as a socket gives them."""

    def __init__(self, data: bytes, rng: random.Random) -> None:
        self.data, self.rng, self.position = data, rng, 0

    def read(self, size: int = -1) -> bytes:
        take = self.rng.randint(1, 40) if self.rng.random() < 0.7 else self.rng.randint(1, max(1, size))
        piece = self.data[self.position:self.position + min(take, size)]
        self.position += len(piece)
        return piece


def werkzeug_parts(body: bytes) -> list[tuple[str, bytes]] | None:
    decoder = MultipartDecoder(BOUNDARY)
    decoder.receive_data(body)
    decoder.receive_data(None)
    parts: list[list] = []
    while True:
        try:
            event = decoder.next_event()
        except ValueError:
            return None
        if isinstance(event, (File, Field)):
            parts.append([event.name, bytearray()])
        elif isinstance(event, Data):
            parts[-1][1] += event.data
        elif isinstance(event, (Epilogue, NeedData)):
            return None if isinstance(event, NeedData) else [(name, bytes(data)) for name, data in parts]


def ours(body: bytes, rng: random.Random) -> list[tuple[str, bytes]] | str:
    upload = MultipartUpload(Trickle(body, rng), f"multipart/form-data; boundary={BOUNDARY.decode()}")
    try:
        upload.open()
        return [("file", b"".join(bytes(piece) for piece in upload.chunks()))]
    except BadInput as exc:
        return str(exc)


def test_the_upload_parser_reads_files_as_werkzeug_does_whatever_the_pieces() -> None:
    """Bodies built of the bytes that matter to a delimiter (line breaks, dashes, the boundary and near misses),
    read in random pieces: the file is Werkzeug's, and what Werkzeug would not take as one file is refused."""
    rng = random.Random(15)
    atoms = [b"\r\n", b"\n", b"\r", b"-", b"--", b"--" + BOUNDARY, b"--" + BOUNDARY + b"--", b"--" + BOUNDARY + b"-",
             b" ", b"\t", b"a", b"Q" * 50, BOUNDARY, b"--" + BOUNDARY[:4]]
    endings = [b"--" + BOUNDARY + b"--\r\n", b"--" + BOUNDARY + b"--", b"--" + BOUNDARY + b"-- \r\nepilogue",
               b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="x"\r\n\r\nv\r\n--' + BOUNDARY + b"--\r\n",
               b"--" + BOUNDARY + b"  \r\n", b""]
    compared = 0
    for _ in range(3000):
        data = b"".join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))
        body = HEAD + data + rng.choice([b"\r\n", b"\r\n", b"\n"]) + rng.choice(endings)
        expected, got = werkzeug_parts(body), ours(body, rng)
        if expected is not None and len(expected) == 1:
            assert got == expected, body
            compared += 1
        elif expected is not None:  # a second part after the file
            assert isinstance(got, str) and ("unknown field" in got or "more than one file" in got), body
        else:
            assert isinstance(got, str), body
    assert compared > 1000


@pytest.mark.parametrize("size", [0, 1, 64_102, 3 * MIB + 123])
def test_the_upload_parser_passes_a_file_on_whole_in_views_of_what_it_read(size: int) -> None:
    data = os.urandom(size)
    body = HEAD + data + b"\r\n--" + BOUNDARY + b"--\r\n"
    upload = MultipartUpload(io.BytesIO(body), f"multipart/form-data; boundary={BOUNDARY.decode()}")
    assert upload.open() == "f.bin"
    assert b"".join(bytes(piece) for piece in upload.chunks()) == data


@pytest.mark.parametrize("body, named", [
    (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--' + BOUNDARY + b"--\r\n",
     "unknown field(s): 'note'"),
    (HEAD + b"data without an end", "ends inside the file"),
    (HEAD + b"x\r\n--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; filename="g"\r\n\r\ny\r\n--'
     + BOUNDARY + b"--\r\n", "more than one file"),
    (b"x" * (UPLOAD_HEAD_BYTES + 10), "outside its file"),
    (HEAD.replace(b'; filename="f.bin"', b"") + b"x\r\n--" + BOUNDARY + b"--\r\n", "needs the file in the 'file'"),
], ids=["field-first", "truncated", "two-files", "huge-preamble", "no-filename"])
def test_the_upload_parser_refuses_what_is_not_one_file(body: bytes, named: str) -> None:
    upload = MultipartUpload(io.BytesIO(body), f"multipart/form-data; boundary={BOUNDARY.decode()}")
    with pytest.raises(BadInput, match=named.replace("(", r"\(").replace(")", r"\)")):
        upload.open()
        for _ in upload.chunks():
            pass


def test_an_upload_without_a_boundary_is_refused() -> None:
    with pytest.raises(BadInput, match="boundary"):
        MultipartUpload(io.BytesIO(b""), "multipart/form-data")


# -- a download held while it is sent -------------------------------------------------------------------------

class Budget:
    def __init__(self) -> None:
        self.released = 0

    def release(self) -> None:
        self.released += 1


def send_as_waitress(download: SpooledDownload, rng: random.Random, out: bytearray) -> None:
    """What waitress's I/O thread does with a wsgi.file_wrapper: read a socket's worth, seek back, skip what the
    socket took."""
    position = download.tell()
    piece = download.read(rng.choice([4096, 65536, 4 * MIB]))
    download.seek(position)
    taken = bytes(piece[:rng.randint(1, len(piece))]) if len(piece) else b""
    download.seek(len(taken), 1)
    out += taken


@pytest.mark.parametrize("reader", ["keeps up", "falls behind, then catches up"])
def test_a_download_is_sent_whole_while_it_arrives(tmp_path, reader: str) -> None:
    data = os.urandom(9 * MIB + 77)
    pieces = [data[i:i + 256 * 1024] for i in range(0, len(data), 256 * 1024)]
    budget, memory = Budget(), SpoolBudget(2 * MIB)  # the node's memory for unsent bytes: 2 MiB here
    download = SpooledDownload(len(data), iter(pieces), open(tmp_path / "spill", "w+b"), budget.release, memory)
    assert download.seek(0, 2) == len(data) and download.seek(0) == 0  # what waitress's prepare() does
    rng, sent = random.Random(7), bytearray()
    chunks = iter(pieces)
    download._chunks = chunks  # filled piece by piece below, as fill() would, with reads in between
    for number, piece in enumerate(chunks):
        download._append(piece)
        if reader == "keeps up" or not 4 <= number < 24:  # else the reader does not read for 5 MiB
            while len(sent) < download._arrived:
                send_as_waitress(download, rng, sent)
    download.filled = True
    while len(sent) < len(data):
        send_as_waitress(download, rng, sent)
    assert bytes(sent) == data and download.read(10) == b"" and not download.waiting()
    spilled = download._spilled
    assert (spilled == 0) if reader == "keeps up" else (0 < spilled < len(data) - 2 * MIB)
    assert memory.used <= 2 * MIB
    download.close()
    download.close()
    assert budget.released == 1 and memory.used == 0


def test_a_download_that_fails_half_way_ends_short_and_gives_its_bytes_back() -> None:
    budget = Budget()

    def broken():
        yield b"a" * 1000
        raise NodeError("Kubo went away")

    download = SpooledDownload(5000, broken(), None, budget.release)
    with pytest.raises(NodeError):
        download.fill()
    assert bytes(download.read()) == b"a" * 1000 and download.broken() and not download.waiting()
    download.close()
    assert budget.released == 1


def test_a_download_whose_reader_went_away_stops_filling(tmp_path) -> None:
    budget, pulled = Budget(), []

    def endless():
        while True:
            pulled.append(1)
            yield b"x" * 1024

    download = SpooledDownload(10**9, endless(), open(tmp_path / "spill", "w+b"), budget.release)
    wakes = []

    def reader_leaves() -> None:
        wakes.append(1)
        if len(wakes) == 5:
            download.close()  # waitress closes the wrapper when the client is gone

    download.fill(reader_leaves)
    assert len(pulled) <= 6 and download.filled and budget.released == 1


# -- an upload body on its way to its thread ---------------------------------------------------------------

def test_the_body_pipe_holds_a_bounded_amount_and_wakes_the_io_thread_when_it_has_room() -> None:
    wakes = []
    pipe = BodyPipe(100, lambda: wakes.append(1))
    pipe.append(b"a" * 60)
    pipe.append(b"b" * 60)
    assert not pipe.has_room() and len(pipe) == 120
    assert pipe.read(10) == b"a" * 10 and not wakes  # 110 held: still no room
    assert pipe.read() == b"a" * 50 and wakes == [1]  # one piece at a time, as it came
    assert pipe.read(1000) == b"b" * 60
    pipe.end()
    assert pipe.read() == b"" and not pipe.streaming


def test_a_read_waits_for_the_body_and_a_failure_reaches_it() -> None:
    pipe = BodyPipe(1000, lambda: None)
    got: list = []

    def read() -> None:
        try:
            got.append(pipe.read())
            got.append(pipe.read())
        except NodeError as exc:
            got.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    pipe.append(b"first")
    reader.join(0.2)
    assert got == [b"first"] and reader.is_alive()
    pipe.fail(RequestTimeout("stopped arriving"))
    reader.join(5)
    assert isinstance(got[1], RequestTimeout)
    pipe.append(b"dropped")
    with pytest.raises(RequestTimeout):
        pipe.read()
    pipe.end()  # a failed body stays failed
    assert pipe.error is not None
