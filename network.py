"""A node's peers: who they are, telling them what happens here, and agreeing on one chain.

- connect: `connect_node` on one node links both ways: the new peer is told
  about the caller (once; a node told by a peer does not tell back).
- gossip: a new transaction or a mined block is sent to every peer but the one
  it came from. Transactions carry an id and blocks an index, so a copy that
  comes round again is recognised and dropped: no echo loops, no duplicates.
- consensus: a block that does not follow our last one, a periodic sync and
  `replace_chain` all fall back to the longest-valid-chain rule (blockchain.py).

Each peer has an outbox thread, so a peer that is down or slow costs that peer's
thread a bounded wait and a log line, never a request of ours.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable
from urllib.parse import urlsplit

import requests

from blockchain import Block, Blockchain, Receipt, Transaction
from config import LOOPBACK_HOSTS, WILDCARD_HOSTS, Config, split_list
from errors import PeerError, PeerRefused

log = logging.getLogger("emr.network")

NODE_HEADER = "X-EMR-Node"  # the calling node's own URL, on node-to-node requests
OUTBOX_LIMIT = 10_000
READ_CHUNK_BYTES = 64 * 1024

def peer_netloc(url: Any, allowed: list[str]) -> tuple[str, str]:
    """Check a peer URL against the allowed networks and names; return (netloc, base URL)."""
    if not isinstance(url, str) or not url.strip():
        raise PeerRefused("each node must be a non-empty string URL such as http://127.0.0.1:5003")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise PeerRefused(f"{url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise PeerRefused(f"{url!r} is not an http(s) URL")
    if not parts.hostname or port is None:
        raise PeerRefused(f"{url!r} needs a host and a port, e.g. http://127.0.0.1:5003")
    if parts.username or parts.password or parts.query or parts.fragment or parts.path not in ("", "/"):
        raise PeerRefused(f"{url!r} must be just scheme://host:port")
    host = parts.hostname
    if not _host_allowed(host, allowed):
        raise PeerRefused(f"{host} is not an allowed peer address (allowed: {', '.join(allowed)}; "
                          f"set EMR_PEER_ALLOW to change)")
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return netloc, f"{parts.scheme}://{netloc}"


def _host_allowed(host: str, allowed: list[str]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host.lower() in (entry.lower() for entry in allowed)
    for entry in allowed:
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


class Outbox:
    """Delivers one peer's messages in order, on its own thread."""

    def __init__(self, network: "Network", netloc: str, base_url: str) -> None:
        self.network, self.netloc, self.base_url = network, netloc, base_url
        self.queue: queue.Queue[tuple[str, Any] | None] = queue.Queue(OUTBOX_LIMIT)
        self.thread = threading.Thread(target=self._run, name=f"outbox-{netloc}", daemon=True)
        self.thread.start()

    def send(self, path: str, body: Any) -> None:
        try:
            self.queue.put_nowait((path, body))
        except queue.Full:
            log.warning("outbox to %s is full; dropped %s (the peer catches up when it syncs)", self.netloc, path)

    def close(self) -> None:
        self.queue.put(None)

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            path, body = item
            try:
                response = self.network.session.post(self.base_url + path, json=body, timeout=self.network.timeout,
                                                     headers=self.network.headers)
                if response.status_code >= 400:
                    log.warning("peer %s answered %s to %s: %.200s", self.netloc, response.status_code, path,
                                response.text)
            except requests.RequestException as exc:
                log.warning("peer %s unreachable for %s (%s); it catches up when it syncs",
                            self.netloc, path, type(exc).__name__)


class Network:
    """The peers of one node, and everything it does with them."""

    def __init__(self, blockchain: Blockchain, config: Config) -> None:
        self.blockchain = blockchain
        self.own_url = config.own_url
        self.allowed = split_list(config.peer_allow)
        self.timeout = config.peer_timeout
        self.max_response_bytes = config.max_peer_response_bytes
        self.sync_interval = config.sync_interval
        self.startup_peers = config.peer_list
        self.headers = {NODE_HEADER: self.own_url}
        if config.api_key:
            self.headers["X-API-Key"] = config.api_key
        self.session = requests.Session()
        self.session.trust_env = False  # peers are addresses the operator chose, never via a proxy
        self._own_netlocs = self._netlocs_of_self(config)
        self._lock = threading.Lock()
        self._peers: dict[str, Outbox] = {}
        self._background = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sync")
        self._stopped = threading.Event()
        self.version = 0  # grows when the peer list changes
        self.on_change: Callable[[], None] = lambda: None  # called after every change, before it is gossiped

    @staticmethod
    def _netlocs_of_self(config: Config) -> set[str]:
        own = {urlsplit(config.own_url).netloc, f"{config.host}:{config.port}"}
        if config.host in LOOPBACK_HOSTS + WILDCARD_HOSTS:
            own |= {f"{name}:{config.port}" for name in ("localhost", "127.0.0.1", "[::1]")}
        return own

    @property
    def peers(self) -> list[str]:
        with self._lock:
            return list(self._peers)

    @property
    def peer_urls(self) -> list[str]:
        with self._lock:
            return [box.base_url for box in self._peers.values()]

    # -- peers ---------------------------------------------------------------

    def connect(self, urls: list[Any], announce: bool = True) -> tuple[list[str], list[str]]:
        """Add peers; returns (all peers, ignored entries). Refuses the whole list if any URL is refused.

        New peers are told about this node (announce) unless the request came from a node
        announcing itself: one connect_node links two nodes exactly once. Either way we
        sync with every new peer in the background.
        """
        checked = [peer_netloc(url, self.allowed) for url in urls]
        ignored, added = [], []
        with self._lock:
            for netloc, base_url in checked:
                if netloc in self._own_netlocs:
                    ignored.append(f"{netloc} (this node)")
                elif netloc not in self._peers:
                    self._peers[netloc] = Outbox(self, netloc, base_url)
                    added.append(netloc)
            self.version += bool(added)
        if added:
            self.on_change()
        for netloc in added:
            log.info("connected to peer %s", netloc)
            if announce:
                self._peers[netloc].send("/connect_node", {"nodes": [self.own_url]})
            self._background.submit(self._quiet_sync, [netloc])
        return self.peers, ignored

    def sender_netloc(self, header_value: str | None) -> str | None:
        """The netloc of the node a request came from, if it said so and is allowed."""
        if not header_value:
            return None
        try:
            return peer_netloc(header_value, self.allowed)[0]
        except PeerRefused:
            return None

    # -- gossip --------------------------------------------------------------

    def _gossip(self, path: str, body: Any, exclude: str | None = None) -> None:
        with self._lock:
            outboxes = [box for netloc, box in self._peers.items() if netloc != exclude]
        for box in outboxes:
            box.send(path, body)

    def add_transaction(self, tx: Transaction, sender: str | None = None) -> Receipt:
        receipt = self.blockchain.add_transaction(tx)
        if receipt.new:
            self.on_change()
            self._gossip("/receive_transaction", receipt.transaction, exclude=sender)
        return receipt

    def mine_block(self) -> Block:
        block = self.blockchain.mine_block()
        self.on_change()
        self._gossip("/receive_block", block)
        return block

    def receive_block(self, block: Any, sender: str | None) -> str:
        outcome = self.blockchain.receive_block(block)
        if outcome == "appended":
            self.on_change()
            self._gossip("/receive_block", block, exclude=sender)
        elif outcome == "behind" and sender:
            self._background.submit(self._quiet_sync, [sender])
        return outcome

    # -- consensus -----------------------------------------------------------

    def fetch_chain(self, netloc: str) -> list[Block]:
        """A peer's chain, read with a timeout and a size cap; its claimed length is ignored."""
        with self._lock:
            box = self._peers.get(netloc)
        base_url = box.base_url if box else f"http://{netloc}"
        try:
            with self.session.get(base_url + "/get_chain", timeout=self.timeout, stream=True,
                                  headers=self.headers) as response:
                if response.status_code != 200:
                    raise PeerError(f"answered HTTP {response.status_code}")
                body = bytearray()
                for chunk in response.iter_content(READ_CHUNK_BYTES):
                    body += chunk
                    if len(body) > self.max_response_bytes:
                        raise PeerError(f"answer larger than {self.max_response_bytes} bytes")
            chain = json.loads(body)["chain"]
        except requests.RequestException as exc:
            raise PeerError(f"unreachable ({type(exc).__name__})") from None
        except (ValueError, KeyError, TypeError):
            raise PeerError("did not answer with a JSON chain") from None
        if not isinstance(chain, list):
            raise PeerError("did not answer with a JSON chain")
        return chain

    def sync(self, netlocs: list[str] | None = None) -> tuple[bool, dict[str, str]]:
        """Adopt the best valid chain among the peers; returns (replaced, a verdict per peer)."""
        netlocs = self.peers if netlocs is None else netlocs
        replaced, report = False, {}
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(netlocs)))) as pool:
            fetched = dict(zip(netlocs, pool.map(self._try_fetch, netlocs)))
        longest_first = sorted(fetched.items(), key=lambda item: len(item[1]) if isinstance(item[1], list) else 0,
                               reverse=True)
        for netloc, chain in longest_first:
            if isinstance(chain, str):
                report[netloc] = chain
                continue
            adopted, why = self.blockchain.replace_chain(chain)
            if adopted:
                self.on_change()
            replaced |= adopted
            report[netloc] = why
            if adopted or why.startswith("invalid"):
                log.log(logging.INFO if adopted else logging.WARNING, "peer %s: %s", netloc, why)
        return replaced, report

    def _try_fetch(self, netloc: str) -> list[Block] | str:
        try:
            return self.fetch_chain(netloc)
        except PeerError as exc:
            log.warning("peer %s skipped: %s", netloc, exc)
            return f"skipped: {exc}"

    def _quiet_sync(self, netlocs: list[str] | None = None) -> None:
        try:
            self.sync(netlocs)
        except Exception:  # a background sync must never kill its thread
            log.exception("background sync failed")

    # -- life cycle ----------------------------------------------------------

    def start(self) -> None:
        """Connect to the configured peers and keep syncing in the background."""
        if self.startup_peers:
            self.connect(self.startup_peers)
        if self.sync_interval > 0:
            threading.Thread(target=self._sync_loop, name="sync-loop", daemon=True).start()

    def _sync_loop(self) -> None:
        while not self._stopped.wait(self.sync_interval):
            if self.peers:
                self._quiet_sync()

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            for box in self._peers.values():
                box.close()
        self._background.shutdown(wait=False, cancel_futures=True)
