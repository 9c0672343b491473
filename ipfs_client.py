"""The one adapter between emr-chain and a Kubo (IPFS) daemon's RPC API.

Uploads are encoded by ipfshttpclient's streaming multipart encoder, the
library the paper's stack used. The calls themselves go through one keep-alive
`requests` session per thread, for two reasons: ipfshttpclient 0.7.0's own
client refuses daemons newer than 0.8 and has no switch to ignore proxy
settings (its httpx backend cannot be told at all), and a hot path such as
`cat` pays for each layer between the node and the daemon. tests/test_ipfs.py
pins every call used here against the Kubo version the project installs.

Every failure is one of the IpfsError classes of errors.py, whose message says
what to do; which class is decided here, what status it becomes is app.py's.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, BinaryIO, Iterator
from urllib.parse import urlsplit

import requests
from ipfshttpclient import multipart

from config import DEFAULT_IPFS_API, DEFAULT_IPFS_LOOKUP_TIMEOUT, DEFAULT_IPFS_TIMEOUT
from errors import IpfsError, IpfsRefused, IpfsTimeout, IpfsUnknownCid, IpfsUnreachable

STREAM_CHUNK_BYTES = 1024 * 1024
CONNECT_TIMEOUT_SECONDS = 3.0
CONTENT_LENGTH_HEADER = "X-Content-Length"  # Kubo's cat announces the file's size here
START_HINT = "start it with 'make kubo-start' (scripts/kubo.sh start) or point EMR_IPFS_API at a running daemon"
# Kubo answers every failure with HTTP 500 and {"Message", "Code": 0}: its message is all there is to go by.
UNKNOWN_CONTENT = ("context deadline exceeded", "not found", "could not find")
MALFORMED_REQUEST = ("invalid", "decode", "unsupported", "is a directory", "does not have enough components")


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
            message = str(response.json()["Message"])
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {response.status_code} {response.text[:200].strip()}"
        finally:
            response.close()
        lowered = message.lower()
        if any(sign in lowered for sign in UNKNOWN_CONTENT):
            return IpfsUnknownCid(f"{what}: no IPFS node reachable from {self.api_url} had it within "
                                  f"{self.lookup_timeout:g}s ({message})")
        if any(sign in lowered for sign in MALFORMED_REQUEST):
            return IpfsRefused(f"{what}: Kubo refused it: {message}")
        return IpfsError(f"IPFS {what} failed: {message}")

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
        response = self._post("add", "add", data=body, headers=headers)
        lines = [line for line in response.text.splitlines() if line.strip()]
        try:
            result = json.loads(lines[-1])
            return {"Hash": result["Hash"], "Name": result["Name"], "Size": result["Size"]}
        except (IndexError, ValueError, KeyError, TypeError):
            raise IpfsError(f"IPFS add: the daemon at {self.api_url} answered without a hash") from None

    def stat(self, cid: str) -> dict[str, Any]:
        """Sizes of a CID: Size (file bytes) and CumulativeSize (what Kubo's add reports as Size).

        Bounded by the lookup timeout: a CID no reachable node has raises IpfsUnknownCid.
        """
        result = self._json(f"lookup of {cid}", "files/stat",
                            params={"arg": f"/ipfs/{cid}", "timeout": f"{self.lookup_timeout:g}s"})
        return {"Size": int(result["Size"]), "CumulativeSize": int(result["CumulativeSize"]),
                "Type": result.get("Type", "")}

    def open(self, cid: str) -> tuple[int, Iterator[bytes]]:
        """(size in bytes, the bytes streamed in STREAM_CHUNK_BYTES pieces) of a file.

        Content this daemon holds is served at once (an offline cat, one call). Otherwise the CID is
        looked up first, within the lookup timeout, so an unknown CID fails fast instead of holding a
        transfer open.
        """
        what = f"cat of {cid}"
        try:
            response = self._post(what, "cat", stream=True, params={"arg": cid, "offline": "true"})
        except IpfsUnknownCid:
            if self.stat(cid)["Type"] not in ("file", ""):
                raise IpfsRefused(f"{cid} is a directory, not a file") from None
            response = self._post(what, "cat", stream=True, params={"arg": cid})
        try:
            size = int(response.headers[CONTENT_LENGTH_HEADER])
        except (KeyError, ValueError):
            response.close()
            raise IpfsError(f"IPFS {what}: the daemon did not say how large the file is") from None
        return size, self._checked(what, response, size)

    def _checked(self, what: str, response: requests.Response, size: int) -> Iterator[bytes]:
        """The body in large pieces; a transfer that ends short (Kubo reports failures in a trailer) raises."""
        received = 0
        try:
            chunks = response.iter_content(STREAM_CHUNK_BYTES)
            while True:
                try:
                    chunk = next(chunks, None)
                except requests.RequestException as exc:
                    raise IpfsUnreachable(f"the IPFS daemon at {self.api_url} broke off during {what}; "
                                          f"if it stopped, {START_HINT}") from exc
                if chunk is None:
                    break
                received += len(chunk)
                yield chunk
        finally:
            response.close()
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
