"""The one adapter between emr-chain and a Kubo (IPFS) daemon's RPC API.

Uploads are encoded by ipfshttpclient's streaming multipart encoder, the
library the paper's stack used. The calls themselves do not go through
ipfshttpclient's client: 0.7.0 refuses daemons newer than 0.8 and has no switch
to ignore proxy settings (its httpx backend cannot be told at all). Most calls
use one keep-alive `requests` session per thread. The hot paths (add, cat,
stat: every create_hash and get_file) use one keep-alive http.client
connection per thread instead, because each layer between the node and the
daemon costs on every call: through requests and urllib3 a 64 KB cat took
0.45 ms more (twice Kubo's own time for it) and a 16 MiB cat written to a file
14 ms more (bench/latency.py's breakdown measures both). tests/test_ipfs.py
pins every call used here against the Kubo version the project installs.

Every failure is one of the IpfsError classes of errors.py, whose message says
what to do; which class is decided here, what status it becomes is app.py's.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator
from urllib.parse import urlencode, urlsplit

import requests
from ipfshttpclient import multipart

from config import DEFAULT_IPFS_API, DEFAULT_IPFS_LOOKUP_TIMEOUT, DEFAULT_IPFS_TIMEOUT
from errors import IpfsError, IpfsRefused, IpfsTimeout, IpfsUnknownCid, IpfsUnreachable

STREAM_CHUNK_BYTES = 256 * 1024  # a download is passed on in pieces this large: smaller, the first leaves sooner
# http.client reads an answer through an 8 KiB buffer; Kubo sends a cat in 4 KiB chunks (4,096 for 16 MiB, each
# read with a line and a block): through 256 KiB, a 16 MiB cat took 10.6 ms of CPU instead of 12.9.
READ_BUFFER_BYTES = 256 * 1024
CONNECT_TIMEOUT_SECONDS = 3.0
CONTENT_LENGTH_HEADER = "X-Content-Length"  # Kubo's cat announces the file's size here
MAX_ERROR_BYTES = 64 * 1024  # what is read of a failure's answer: Kubo's {"Message": ...} is short
START_HINT = "start it with 'make kubo-start' (scripts/kubo.sh start) or point EMR_IPFS_API at a running daemon"
# Kubo answers every failure with HTTP 500 and {"Message", "Code": 0}: its message is all there is to go by.
UNKNOWN_CONTENT = ("context deadline exceeded", "not found", "could not find")
# The last three are boxo's verifcid, which Kubo asks before looking a CID up: a hash function it does not take
# ("potentially insecure hash functions not allowed"), a digest shorter or longer than it allows (an identity CID
# too long). Such a CID is well formed, so is_cid lets it by, and it can never be fetched: a client's error.
MALFORMED_REQUEST = ("invalid", "decode", "unsupported", "is a directory", "does not have enough components",
                     "insecure hash function", "digest too small", "digest too large")


class _Buffered:
    """A socket whose makefile() reads through READ_BUFFER_BYTES (what http.client's answers read through)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def makefile(self, mode: str) -> Any:
        return self.sock.makefile(mode, buffering=READ_BUFFER_BYTES)


class _LeanResponse(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(_Buffered(sock), *args, **kwargs)  # type: ignore[arg-type]


class _Lean:
    """A kept-alive connection to the daemon, and whether an answer on it is still being read."""

    __slots__ = ("conn", "busy", "orphaned")

    def __init__(self, conn: http.client.HTTPConnection) -> None:
        self.conn = conn
        self.busy = False
        self.orphaned = False  # its thread has moved on to another connection


def api_base_url(api_url: str) -> str:
    """"http://127.0.0.1:5001" or "/ip4/127.0.0.1/tcp/5001/http" -> "http://127.0.0.1:5001/api/v0/"."""
    if api_url.startswith("/"):
        parts = api_url.strip("/").split("/")
        if len(parts) < 4 or parts[0] not in ("ip4", "ip6", "dns", "dns4", "dns6") or parts[2] != "tcp":
            raise ValueError(f"IPFS API address must look like /ip4/127.0.0.1/tcp/5001, not {api_url!r}")
        host = f"[{parts[1]}]" if parts[0] == "ip6" else parts[1]
        scheme = parts[4] if len(parts) > 4 and parts[4] in ("http", "https") else "http"
        return f"{scheme}://{host}:{parts[3]}/api/v0/"
    parts = urlsplit(api_url)
    if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
        raise ValueError(f"IPFS API address must look like http://127.0.0.1:5001, not {api_url!r}")
    return f"{parts.scheme}://{parts.netloc}/api/v0/"


class IpfsClient:
    def __init__(self, api_url: str = DEFAULT_IPFS_API, timeout: float = DEFAULT_IPFS_TIMEOUT,
                 lookup_timeout: float = DEFAULT_IPFS_LOOKUP_TIMEOUT) -> None:
        self.api_url = api_url
        self.lookup_timeout = lookup_timeout
        self._base = api_base_url(api_url)
        self._timeout = (CONNECT_TIMEOUT_SECONDS, timeout)
        self._local = threading.local()
        parts = urlsplit(self._base)
        self._lean_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._lean_address = (parts.hostname or "", parts.port or 0)
        self._lean_path = parts.path

    @property
    def _session(self) -> requests.Session:
        """This thread's session, keeping its connection to the daemon open between calls."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # the daemon is the operator's, never behind a proxy
            self._local.session = session
        return session

    def _post(self, what: str, command: str, *, stream: bool = False, **kwargs: Any) -> requests.Response:
        """POST to one RPC command; its failures as IpfsError subclasses."""
        try:
            response = self._session.post(self._base + command, timeout=self._timeout, stream=stream, **kwargs)
        except requests.Timeout as exc:
            raise IpfsTimeout(f"the IPFS daemon at {self.api_url} did not answer {what} in time") from exc
        except requests.ConnectionError as exc:
            raise IpfsUnreachable(f"the IPFS daemon is not reachable at {self.api_url}, or broke off during "
                                  f"{what}; {START_HINT}") from exc
        except requests.RequestException as exc:
            raise IpfsError(f"IPFS {what} failed: {exc}") from exc
        if response.status_code != 200:
            raise self._failure(what, response)
        return response

    def _failure(self, what: str, response: requests.Response) -> IpfsError:
        try:
            body = response.content
        except (requests.RequestException, OSError):
            body = b""
        finally:
            response.close()
        return self._failure_of(what, response.status_code, body)

    def _failure_of(self, what: str, status: int, body: bytes) -> IpfsError:
        """The IpfsError for Kubo's answer `status` with `body` (JSON {"Message": ...} when it is Kubo's own)."""
        try:
            message = str(json.loads(body)["Message"])
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {status} {body[:200].decode('utf-8', 'replace').strip()}"
        lowered = message.lower()
        if any(sign in lowered for sign in UNKNOWN_CONTENT):
            return IpfsUnknownCid(f"{what}: no IPFS node reachable from {self.api_url} had it within "
                                  f"{self.lookup_timeout:g}s ({message})")
        if any(sign in lowered for sign in MALFORMED_REQUEST):
            return IpfsRefused(f"{what}: Kubo refused it: {message}")
        return IpfsError(f"IPFS {what} failed: {message}")

    # -- the hot paths: one kept-alive http.client connection per thread (see the module's docstring) --

    def _lean(self) -> "_Lean":
        """This thread's connection to the daemon; a new one if the last is still carrying an answer that an
        iterator (a download being filled) has not finished reading."""
        lean = getattr(self._local, "lean", None)
        if lean is None or lean.busy:
            if lean is not None:
                lean.orphaned = True  # whoever reads its answer closes it
            lean = _Lean(self._lean_class(*self._lean_address, timeout=CONNECT_TIMEOUT_SECONDS))
            lean.conn.response_class = _LeanResponse
            self._local.lean = lean
        return lean

    def _call(self, what: str, command: str, params: dict[str, str], body: Iterable[bytes] | None = None,
              headers: dict[str, str] | None = None) -> tuple[http.client.HTTPResponse, "_Lean"]:
        """POST to one RPC command on this thread's kept-alive connection: its answer (status 200, unread) and
        the connection, which must not carry another call until the answer is read to its end (or it is closed).

        A connection the daemon closed while idle is opened again once, for a call without a body (a body may
        be a stream that cannot be sent twice).
        """
        path = self._lean_path + command + ("?" + urlencode(params) if params else "")
        for attempt in (1, 2):
            lean = self._lean()
            conn = lean.conn
            reused = conn.sock is not None
            try:
                if not reused:
                    conn.connect()  # within CONNECT_TIMEOUT_SECONDS; then the daemon has the whole timeout
                    conn.sock.settimeout(self._timeout[1])
                if body is None:
                    conn.request("POST", path)
                else:
                    conn.request("POST", path, body=body, headers=headers or {}, encode_chunked=True)
                response = conn.getresponse()
            except socket.timeout as exc:
                conn.close()
                raise IpfsTimeout(f"the IPFS daemon at {self.api_url} did not answer {what} in time") from exc
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                conn.close()
                if reused and body is None and attempt == 1:
                    continue
                raise IpfsUnreachable(f"the IPFS daemon is not reachable at {self.api_url}, or broke off during "
                                      f"{what}; {START_HINT}") from exc
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise IpfsUnreachable(f"the IPFS daemon is not reachable at {self.api_url}, or broke off during "
                                      f"{what}; {START_HINT}") from exc
            except BaseException:  # the body's own error (an upload found malformed): the request is half sent
                conn.close()
                raise
            if response.status != 200:
                try:
                    answer = response.read(MAX_ERROR_BYTES)
                except (OSError, http.client.HTTPException):
                    answer = b""
                conn.close()
                raise self._failure_of(what, response.status, answer)
            return response, lean
        raise AssertionError("unreachable")

    def _call_json(self, what: str, command: str, params: dict[str, str], body: Iterable[bytes] | None = None,
                   headers: dict[str, str] | None = None) -> Any:
        """The last JSON line of a command's answer (add answers one line per file, then the result)."""
        response, lean = self._call(what, command, params, body, headers)
        try:
            text = response.read()
        except socket.timeout as exc:
            lean.conn.close()
            raise IpfsTimeout(f"the IPFS daemon at {self.api_url} did not answer {what} in time") from exc
        except (OSError, http.client.HTTPException) as exc:
            lean.conn.close()
            raise IpfsUnreachable(f"the IPFS daemon at {self.api_url} broke off during {what}; {START_HINT}") from exc
        lines = [line for line in text.splitlines() if line.strip()]
        try:
            return json.loads(lines[-1])
        except (IndexError, ValueError):
            raise IpfsError(f"IPFS {what}: the daemon at {self.api_url} answered something that is not JSON") from None

    def _json(self, what: str, command: str, **kwargs: Any) -> dict[str, Any]:
        response = self._post(what, command, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise IpfsError(f"IPFS {what}: the daemon at {self.api_url} answered something that is not JSON") from None

    # -- the daemon ----------------------------------------------------------

    def version(self) -> str:
        return self._json("version", "version")["Version"]

    def peer_id(self) -> str:
        return self._json("id", "id")["ID"]

    # -- content -------------------------------------------------------------

    def add_file(self, source: Path | BinaryIO) -> dict[str, str]:
        """Add one file, streamed; Kubo's own {"Hash", "Name", "Size"} (Size as a string).

        `source` is a path, or an object with read() and a `name` to add it under.
        """
        body, headers = multipart.stream_files(str(source) if isinstance(source, Path) else source,
                                               chunk_size=STREAM_CHUNK_BYTES)
        return self._added(body, headers)

    def add_stream(self, chunks: Iterable[bytes], name: str) -> dict[str, str]:
        """Add the bytes `chunks` yields as one file named `name`, sent to the daemon as they come.

        An exception `chunks` raises (an upload found malformed half way) breaks the add off: the daemon
        gets no complete request, records nothing, and the exception goes on to the caller.
        """
        stream = multipart.BytesFileStream(chunks, name=name, chunk_size=STREAM_CHUNK_BYTES)
        return self._added(stream.body(), stream.headers())

    def _added(self, body: Iterable[bytes], headers: dict[str, str]) -> dict[str, str]:
        result = self._call_json("add", "add", {}, body, headers)
        try:
            return {"Hash": result["Hash"], "Name": result["Name"], "Size": result["Size"]}
        except (KeyError, TypeError):
            raise IpfsError(f"IPFS add: the daemon at {self.api_url} answered without a hash") from None

    def stat(self, cid: str) -> dict[str, Any]:
        """Sizes of a CID: Size (file bytes) and CumulativeSize (what Kubo's add reports as Size).

        Bounded by the lookup timeout: a CID no reachable node has raises IpfsUnknownCid.
        """
        result = self._call_json(f"lookup of {cid}", "files/stat",
                                 {"arg": f"/ipfs/{cid}", "timeout": f"{self.lookup_timeout:g}s"})
        try:
            return {"Size": int(result["Size"]), "CumulativeSize": int(result["CumulativeSize"]),
                    "Type": result.get("Type", "")}
        except (KeyError, TypeError, ValueError):
            raise IpfsError(f"IPFS lookup of {cid}: the daemon at {self.api_url} answered without sizes") from None

    def open(self, cid: str) -> tuple[int, Iterator[bytes]]:
        """(size in bytes, the bytes streamed in pieces of at most STREAM_CHUNK_BYTES) of a file.

        Content this daemon holds is served at once (an offline cat, one call: its answer says the size).
        Otherwise the CID is looked up first, within the lookup timeout, so an unknown CID fails fast instead
        of holding a transfer open. Read the pieces to the end, or close the iterator.
        """
        what = f"cat of {cid}"
        try:
            response, lean = self._call(what, "cat", {"arg": cid, "offline": "true"})
        except IpfsUnknownCid:
            if self.stat(cid)["Type"] not in ("file", ""):
                raise IpfsRefused(f"{cid} is a directory, not a file") from None
            response, lean = self._call(what, "cat", {"arg": cid})
        try:
            size = int(response.getheader(CONTENT_LENGTH_HEADER, ""))
        except ValueError:
            lean.conn.close()
            raise IpfsError(f"IPFS {what}: the daemon did not say how large the file is") from None
        lean.busy = True
        return size, self._checked(what, response, size, lean)

    def _checked(self, what: str, response: http.client.HTTPResponse, size: int, lean: "_Lean") -> Iterator[bytes]:
        """The body in large pieces; a transfer that ends short (Kubo reports failures in a trailer) raises.

        It may be read to its end on another thread than the one that opened it (or closed unread by the
        garbage collector): it frees its own connection, never the reading thread's.
        """
        received = 0
        finished = False
        try:
            while True:
                try:
                    chunk = response.read(STREAM_CHUNK_BYTES)
                except socket.timeout as exc:
                    raise IpfsTimeout(f"the IPFS daemon at {self.api_url} stopped sending {what}") from exc
                except (OSError, http.client.HTTPException) as exc:
                    raise IpfsUnreachable(f"the IPFS daemon at {self.api_url} broke off during {what}; "
                                          f"if it stopped, {START_HINT}") from exc
                if not chunk:
                    break
                received += len(chunk)
                yield chunk
            finished = True
        finally:
            if not finished or lean.orphaned:  # part read, its connection cannot carry another call
                lean.conn.close()
            lean.busy = False
        if received != size:
            raise IpfsError(f"IPFS {what} ended after {received} of {size} bytes")

    # -- pins and providers (pinning.py) ---------------------------------------------------

    def pin_add(self, cid: str, timeout: float) -> None:
        """Pin a CID recursively, fetching what this daemon lacks from its swarm, within `timeout` seconds.

        IpfsUnknownCid if no reachable IPFS node gave the whole DAG in time. Keep `timeout` below the
        node's ipfs_timeout: Kubo says nothing until the pin is done.
        """
        try:
            self._json(f"pin of {cid}", "pin/add", params={"arg": cid, "recursive": "true",
                                                           "timeout": f"{timeout:g}s"})
        except IpfsUnknownCid:
            raise IpfsUnknownCid(f"pin of {cid}: no IPFS node reachable from {self.api_url} gave all of it "
                                 f"within {timeout:g}s") from None

    def pinned(self) -> set[str]:
        """The CIDs this daemon holds under a recursive pin (what `ipfs add` and pin_add make)."""
        response = self._post("pin list", "pin/ls", params={"type": "recursive", "stream": "true"})
        found = set()
        try:
            for line in response.text.splitlines():
                if line.strip():
                    found.add(json.loads(line)["Cid"])
        except (ValueError, KeyError, TypeError):
            raise IpfsError(f"IPFS pin list: the daemon at {self.api_url} answered something unexpected") from None
        return found

    def find_providers(self, cid: str, limit: int = 20) -> list[str]:
        """Peer IDs the daemon's content routing names as providers of a CID, within the lookup timeout.

        With Routing.Type "none" (every repo this project makes) the answer is always empty: an empty list
        means "routing does not know", not "nobody has it".
        """
        response = self._post(f"provider lookup of {cid}", "routing/findprovs",
                              params={"arg": cid, "num-providers": str(limit),
                                      "timeout": f"{self.lookup_timeout:g}s"})
        providers: list[str] = []
        for line in response.text.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            for response_peer in (event.get("Responses") or []) if isinstance(event, dict) else []:
                if isinstance(response_peer, dict) and response_peer.get("ID") not in providers:
                    providers.append(response_peer["ID"])
        return providers

    def swarm_peers(self) -> list[str]:
        """Peer IDs this daemon is connected to now."""
        peers = self._json("swarm peers", "swarm/peers").get("Peers") or []
        return [peer["Peer"] for peer in peers if isinstance(peer, dict) and "Peer" in peer]
