"""The one adapter between emr-chain and a Kubo (IPFS) daemon's RPC API.

Built on ipfshttpclient, the client the paper's stack used. Its `connect()`
refuses daemons newer than 0.8, so `ipfshttpclient.Client` is constructed
directly; tests/test_ipfs.py pins every call used here against Kubo v0.43.
Every failure becomes an `IpfsError` whose message says what to do.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, BinaryIO, Iterator
from urllib.parse import urlsplit

import ipfshttpclient
from ipfshttpclient import exceptions as ipfs_errors

STREAM_CHUNK_BYTES = 1024 * 1024
CONNECT_TIMEOUT_SECONDS = 3.0
START_HINT = "start it with 'make kubo-start' (scripts/kubo.sh start) or point EMR_IPFS_API at a running daemon"


class IpfsError(Exception):
    """An IPFS operation failed. `status` is the HTTP status the node should answer with."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def api_multiaddr(api_url: str) -> str:
    """"http://127.0.0.1:5001" -> "/ip4/127.0.0.1/tcp/5001/http" (a multiaddr passes through)."""
    if api_url.startswith("/"):
        return api_url
    parts = urlsplit(api_url)
    if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
        raise ValueError(f"IPFS API address must look like http://127.0.0.1:5001, not {api_url!r}")
    family = "ip6" if ":" in parts.hostname else "ip4" if parts.hostname[0].isdigit() else "dns"
    return f"/{family}/{parts.hostname}/tcp/{parts.port}/{parts.scheme}"


class IpfsClient:
    def __init__(self, api_url: str = "http://127.0.0.1:5001", timeout: float = 120.0,
                 lookup_timeout: float = 5.0) -> None:
        self.api_url = api_url
        self.lookup_timeout = lookup_timeout
        self._address = api_multiaddr(api_url)
        self._timeout = (CONNECT_TIMEOUT_SECONDS, timeout)
        self._local = threading.local()

    @property
    def _client(self) -> ipfshttpclient.Client:
        """This thread's client, keeping its connection to the daemon open between calls.

        Without a session ipfshttpclient opens a connection, and re-reads the proxy settings, on
        every call: that tripled the cost of a small add or cat.
        """
        client = getattr(self._local, "client", None)
        if client is None:
            client = ipfshttpclient.Client(self._address, timeout=self._timeout, chunk_size=STREAM_CHUNK_BYTES,
                                           session=True)
            # ipfshttpclient 0.7.0 has no switch for this: the daemon is local, never behind a proxy.
            client._client._session.trust_env = False
            self._local.client = client
        return client

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except ipfs_errors.ConnectionError as exc:
            raise IpfsError(f"the IPFS daemon is not reachable at {self.api_url}; {START_HINT}", 503) from exc
        except ipfs_errors.ProtocolError as exc:
            raise IpfsError(f"the IPFS API at {self.api_url} broke off or answered something unexpected during "
                            f"{what}; if the daemon stopped, {START_HINT}", 503) from exc
        except ipfs_errors.TimeoutError as exc:
            raise IpfsError(f"the IPFS daemon at {self.api_url} did not answer {what} in time", 504) from exc
        except ipfs_errors.ErrorResponse as exc:
            raise self._classify(what, str(exc)) from exc
        except ipfs_errors.Error as exc:
            raise IpfsError(f"IPFS {what} failed: {exc}", 502) from exc

    def _classify(self, what: str, message: str) -> IpfsError:
        lowered = message.lower()
        if "context deadline exceeded" in lowered or "not found" in lowered or "block was not found locally" in lowered:
            return IpfsError(f"{what}: no IPFS node reachable from {self.api_url} had it within "
                             f"{self.lookup_timeout:g}s ({message})", 404)
        if "invalid" in lowered or "decode" in lowered or "unsupported" in lowered:
            return IpfsError(f"{what}: Kubo refused it: {message}", 400)
        return IpfsError(f"IPFS {what} failed: {message}", 502)

    # -- the daemon ----------------------------------------------------------

    def version(self) -> str:
        return self._call("version", self._client.version)["Version"]

    def peer_id(self) -> str:
        return self._call("id", self._client.id)["ID"]

    # -- content -------------------------------------------------------------

    def add_file(self, source: Path | BinaryIO) -> dict[str, str]:
        """Add one file, streamed; Kubo's own {"Hash", "Name", "Size"} (Size as a string).

        `source` is a path, or an object with read() and a `name` to add it under.
        """
        result = self._call("add", self._client.add, str(source) if isinstance(source, Path) else source)
        return {"Hash": result["Hash"], "Name": result["Name"], "Size": result["Size"]}

    def stat(self, cid: str) -> dict[str, int]:
        """Sizes of a CID: Size (file bytes) and CumulativeSize (what Kubo's add reports as Size).

        Bounded by the lookup timeout: a CID no reachable node has fails with 404.
        """
        result = self._call(f"lookup of {cid}", self._client.files.stat, f"/ipfs/{cid}",
                            opts={"timeout": f"{self.lookup_timeout:g}s"})
        return {"Size": int(result["Size"]), "CumulativeSize": int(result["CumulativeSize"]),
                "Type": result.get("Type", "")}

    def open(self, cid: str) -> tuple[int, Iterator[bytes]]:
        """(size in bytes, the bytes streamed in STREAM_CHUNK_BYTES pieces) of a file.

        Looked up first, within the lookup timeout, so an unknown CID fails fast with 404
        instead of holding a transfer open.
        """
        stat = self.stat(cid)
        if stat["Type"] not in ("file", ""):
            raise IpfsError(f"{cid} is a directory, not a file", 400)
        chunks = self._call(f"cat of {cid}", self._client.cat, cid, stream=True)
        return stat["Size"], self._rechunked(f"cat of {cid}", iter(chunks))

    def _rechunked(self, what: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """Kubo's stream arrives in pieces of a few KiB; pass it on in large ones, and its faults as IpfsError."""
        buffer = bytearray()
        while (chunk := self._call(what, next, chunks, None)) is not None:
            buffer += chunk
            if len(buffer) >= STREAM_CHUNK_BYTES:
                yield bytes(buffer)
                buffer.clear()
        if buffer:
            yield bytes(buffer)
