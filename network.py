"""A node's peers: who they are, telling them what happens here, and agreeing on one chain.

- connect: `connect_node` on one node links both ways: the new peer is told
  about the caller (once; a node told by a peer does not tell back).
- gossip: a new transaction or a mined block is sent to every peer but the one
  it came from. Transactions carry an id and blocks an index, so a copy that
  comes round again is recognised and dropped: no echo loops, no duplicates.
- consensus: a block that does not follow our last one, a periodic sync and
  `replace_chain` fetch the peers' blocks from a little before our last one on
  (`GET /blocks?from=N`, in pages of bounded size, so a chain of any length can
  be joined) and apply the fork choice of blockchain.py.

Each peer has an outbox thread, so a peer that is down or slow costs that peer's
thread a bounded wait and a log line, never a request of ours. Everything a peer
answers is read under one deadline and a size cap (wire.py). A peer that
misbehaves (answers too much, too slowly, malformed or invalid) is skipped and
counted; after `max_peer_faults` faults in a row it is dropped. A peer that is
merely down is not counted: it catches up when it returns.
"""
from __future__ import annotations

import ipaddress
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from blockchain import GENESIS_INDEX, Block, Blockchain, Receipt, Transaction, hash_block
from config import LOOPBACK_HOSTS, WILDCARD_HOSTS, Config, split_list
from errors import BadInput, Busy, Conflict, InvalidBlock, PeerError, PeerMisbehaved, PeerRefused
from wire import Limits, PeerClient, PeerConnection

log = logging.getLogger("emr.network")

NODE_HEADER = "X-EMR-Node"  # the calling node's own URL, on node-to-node requests
OUTBOX_LIMIT = 10_000
TRANSACTION_PATH = "/receive_transaction"
TRANSACTIONS_PATH = "/receive_transactions"
GOSSIP_BATCH = 500  # transactions in one gossip request: well under max_body_bytes even at their largest
CLOSE = "close"
SYNC_THREADS = 8  # peers fetched at once in one sync
SYNCS_AT_ONCE = 2  # syncs running at once for requests (more are refused: Busy), and apart for the background
SYNC_ROUND_DEADLINES = 10  # one sync with one peer takes at most this many peer timeouts, however many pages

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
    netloc = url_netloc(host, port)
    return netloc, f"{parts.scheme}://{netloc}"


def url_netloc(host: str, port: int) -> str:
    """'127.0.0.1', 5002 -> '127.0.0.1:5002'; '::1', 5002 -> '[::1]:5002' (an IPv6 address in a URL is bracketed)."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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


@dataclass
class Peer:
    """One peer: where it is, its outbox, and how it has behaved lately."""

    netloc: str
    base_url: str
    outbox: "Outbox"
    faults: int = 0  # misbehaviours in a row; reset by a good answer
    last_error: str = ""
    seen_length: int | None = None
    refusal: str = ""  # the reorganisation of its we refuse, if any (logged once)

    def describe(self) -> dict[str, Any]:
        return {"peer": self.netloc, "url": self.base_url, "faults": self.faults, "last_error": self.last_error,
                "length": self.seen_length, "queued": self.outbox.queue.qsize()}


class Outbox:
    """Delivers one peer's messages in order, on its own thread."""

    def __init__(self, network: "Network", netloc: str, base_url: str) -> None:
        self.network, self.netloc, self.base_url = network, netloc, base_url
        self.queue: queue.Queue[tuple[str, Any] | None] = queue.Queue(OUTBOX_LIMIT)
        self.dropped = 0
        self.thread = threading.Thread(target=self._run, name=f"outbox-{netloc}", daemon=True)
        self.thread.start()

    def send(self, path: str, body: Any) -> None:
        try:
            self.queue.put_nowait((path, body))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:  # once per spell: a peer that cannot keep up must not flood the log too
                log.warning("outbox to %s is full; dropping messages until it drains (the peer catches up when "
                            "it syncs)", self.netloc)

    def close(self) -> None:
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            self.queue.get_nowait()
            self.queue.put_nowait(None)

    def _run(self) -> None:
        connection = self.network.client.connection(self.base_url)
        held: tuple[str, Any] | None = None
        while (item := held or self.queue.get()) is not None:
            held = None
            if self.dropped and self.queue.empty():
                log.warning("outbox to %s drained; %d messages were dropped", self.netloc, self.dropped)
                self.dropped = 0
            path, body = item
            if path == TRANSACTION_PATH:  # every transaction waiting behind this one goes in the same request
                batch = [body]
                while len(batch) < GOSSIP_BATCH and held is None:
                    try:
                        following = self.queue.get_nowait()
                    except queue.Empty:
                        break
                    if following is not None and following[0] == TRANSACTION_PATH:
                        batch.append(following[1])
                    else:
                        held = following or (CLOSE, None)
                path, body = TRANSACTIONS_PATH, {"transactions": batch}
            self._deliver(connection, path, body)
            if held is not None and held[0] == CLOSE:
                break
        connection.close()

    def _deliver(self, connection: PeerConnection, path: str, body: Any) -> None:
        try:
            status, answer = self.network.client.post_json(connection, path, body)
            if status >= 400:
                log.warning("peer %s answered %s to %s: %.200s", self.netloc, status, path,
                            answer.decode("utf-8", "replace"))
        except PeerMisbehaved as exc:
            self.network.fault(self.netloc, f"{path}: {exc}")
        except PeerError as exc:
            log.warning("peer %s unreachable for %s (%s); it catches up when it syncs", self.netloc, path, exc)


class Network:
    """The peers of one node, and everything it does with them."""

    def __init__(self, blockchain: Blockchain, config: Config) -> None:
        self.blockchain = blockchain
        self.own_url = config.own_url
        self.allowed = split_list(config.peer_allow)
        self.sync_interval = config.sync_interval
        self.startup_peers = config.peer_list
        self.max_peers = config.max_peers
        self.max_peer_faults = config.max_peer_faults
        self.max_sync_bytes = config.max_sync_bytes
        self.round_seconds = config.peer_timeout * SYNC_ROUND_DEADLINES
        headers = {NODE_HEADER: self.own_url}
        if config.api_key:
            headers["X-API-Key"] = config.api_key
        self.client = PeerClient(Limits(config.peer_timeout, config.max_peer_response_bytes, config.max_json_depth),
                                 headers)
        self._own_netlocs = self._netlocs_of_self(config)
        self._lock = threading.Lock()
        self._peers: dict[str, Peer] = {}
        self._banned: dict[str, float] = {}  # netloc -> until when (monotonic) it is not taken back
        self.ban_seconds = config.peer_ban_seconds
        self._background = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sync")
        self._request_slots = threading.BoundedSemaphore(SYNCS_AT_ONCE)
        self._background_slots = threading.BoundedSemaphore(SYNCS_AT_ONCE)
        self._stopped = threading.Event()
        self.on_peers_change: Callable[[], None] = lambda: None  # called after the peer list changed
        # Asked about each new peer's base URL before it is added; raises PeerRefused to keep it out (a signed
        # network: is it a member?). It may ask the peer, so it runs outside the lock.
        self.vet_peer: Callable[[str], None] | None = None
        blockchain.on_requeued = self._announce_again

    @staticmethod
    def _netlocs_of_self(config: Config) -> set[str]:
        own = {urlsplit(config.own_url).netloc, url_netloc(config.host, config.port)}
        if config.host in LOOPBACK_HOSTS + WILDCARD_HOSTS:
            own |= {url_netloc(name, config.port) for name in LOOPBACK_HOSTS}
        return own

    @property
    def peers(self) -> list[str]:
        with self._lock:
            return list(self._peers)

    @property
    def peer_urls(self) -> list[str]:
        with self._lock:
            return [peer.base_url for peer in self._peers.values()]

    def describe_peers(self) -> list[dict[str, Any]]:
        with self._lock:
            return [peer.describe() for peer in self._peers.values()]

    # -- peers ---------------------------------------------------------------

    def connect(self, urls: list[Any], announce: bool = True) -> tuple[list[str], list[str]]:
        """Add peers; returns (all peers, ignored entries). Refuses the whole list if any URL is refused.

        New peers are told about this node (announce) unless the request came from a node
        announcing itself: one connect_node links two nodes exactly once. Either way we
        sync with every new peer in the background.
        """
        if len(urls) > self.max_peers:
            raise BadInput(f"at most {self.max_peers} nodes at once (max_peers)")
        checked = [peer_netloc(url, self.allowed) for url in urls]
        if self.vet_peer:
            for netloc, base_url in checked:
                if netloc not in self._own_netlocs and netloc not in self._peers:
                    self.vet_peer(base_url)
        ignored, added = [], []
        with self._lock:
            fresh = {netloc for netloc, _ in checked if netloc not in self._peers and netloc not in self._own_netlocs
                     and netloc not in self._banned}
            if len(self._peers) + len(fresh) > self.max_peers:
                raise Conflict(f"this node has {len(self._peers)} peers and may have at most {self.max_peers} "
                               f"(max_peers); remove some with /remove_node first")
            now = time.monotonic()
            for netloc, base_url in checked:
                if netloc in self._own_netlocs:
                    ignored.append(f"{netloc} (this node)")
                elif self._banned.get(netloc, now) > now:
                    ignored.append(f"{netloc} (dropped for misbehaving; taken back in "
                                   f"{self._banned[netloc] - now:.0f}s, or at once after /remove_node)")
                elif netloc not in self._peers:
                    self._peers[netloc] = Peer(netloc, base_url, Outbox(self, netloc, base_url))
                    added.append(netloc)
        if added:
            self.on_peers_change()
        for netloc in added:
            log.info("connected to peer %s", netloc)
            if announce:
                self._peers[netloc].outbox.send("/connect_node", {"nodes": [self.own_url]})
            self._background.submit(self._quiet_sync, [netloc])
        return self.peers, ignored

    def remove(self, urls: list[Any]) -> tuple[list[str], list[str]]:
        """Forget peers; returns (peers left, entries that were not peers)."""
        netlocs = [peer_netloc(url, self.allowed)[0] for url in urls]
        unknown = []
        with self._lock:
            for netloc in netlocs:
                peer = self._peers.pop(netloc, None)
                if self._banned.pop(netloc, None) is not None:
                    continue  # an operator forgives a peer dropped for its faults: it may connect again
                if peer is None:
                    unknown.append(netloc)
                else:
                    peer.outbox.close()
            removed = len(netlocs) - len(unknown)
        if removed:
            self.on_peers_change()
            log.info("removed peer(s) %s", ", ".join(sorted(set(netlocs) - set(unknown))))
        return self.peers, unknown

    def announce(self) -> None:
        """Tell every peer about this node again (a node newly admitted to a signed network: its peers refused
        it as an outsider before)."""
        self._gossip("/connect_node", {"nodes": [self.own_url]})

    def fault(self, netloc: str, why: str) -> None:
        """Count a misbehaviour; drop the peer after max_peer_faults in a row."""
        with self._lock:
            peer = self._peers.get(netloc)
            if peer is None:
                return
            peer.faults += 1
            peer.last_error = why
            dropped = peer.faults >= self.max_peer_faults
            if dropped:
                del self._peers[netloc]
                peer.outbox.close()
                self._banned = {other: until for other, until in self._banned.items() if until > time.monotonic()}
                self._banned[netloc] = time.monotonic() + self.ban_seconds
        if dropped:
            log.warning("dropped peer %s after %d faults in a row (not taken back for %gs); the last: %s", netloc,
                        self.max_peer_faults, self.ban_seconds, why)
            self.on_peers_change()
        else:
            log.warning("peer %s misbehaved (%d in a row): %s", netloc, peer.faults, why)

    def _behaved(self, netloc: str, length: int | None, refusal: str = "") -> None:
        """A good answer: the fault count starts again. A refused reorganisation is no fault of the peer's,
        but an operator must see it: it is logged once (until it changes) and kept as the peer's last error."""
        with self._lock:
            peer = self._peers.get(netloc)
            if peer is None:
                return
            peer.faults, peer.seen_length = 0, length
            repeated = refusal == peer.refusal
            peer.refusal = refusal
            if refusal:
                peer.last_error = refusal
        if refusal and not repeated:
            log.warning("peer %s: %s", netloc, refusal)

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
            outboxes = [peer.outbox for netloc, peer in self._peers.items() if netloc != exclude]
        for box in outboxes:
            box.send(path, body)

    def _announce_again(self, transactions: list[Transaction]) -> None:
        """Transactions of blocks a reorganisation dropped are pending again here; peers whose chain dropped
        them too hold them pending only if someone says so."""
        for tx in transactions:
            self._gossip(TRANSACTION_PATH, tx)

    def add_transaction(self, tx: Transaction, sender: str | None = None) -> Receipt:
        receipt = self.blockchain.add_transaction(tx)
        if receipt.new:
            self._gossip(TRANSACTION_PATH, receipt.transaction, exclude=sender)
        return receipt

    def mine_block(self) -> Block:
        block = self.blockchain.mine_block()
        self._gossip("/receive_block", block)
        return block

    def receive_block(self, block: Any, sender: str | None) -> str:
        """Take a peer's block: "appended" (gossiped on), "known" or "behind" (sync with the sender);
        InvalidBlock naming what is wrong."""
        outcome, problem = self.blockchain.take_block(block)
        if outcome == "invalid":
            raise InvalidBlock(f"the block does not pass this node's checks: {problem}")
        if outcome == "appended":
            self._gossip("/receive_block", block, exclude=sender)
        elif outcome == "behind" and sender:
            self._background.submit(self._quiet_sync, [sender])
        return outcome

    # -- consensus -----------------------------------------------------------

    def sync(self, netlocs: list[str] | None = None, wait: bool = False) -> tuple[bool, dict[str, str]]:
        """Take the best valid blocks among the peers; returns (replaced, a verdict per peer).

        At most SYNCS_AT_ONCE syncs run at once for requests: one more is refused (Busy) rather than
        queued, so callers of replace_chain cannot tie up the node's threads behind a slow peer. The
        background's (wait=True) have slots of their own and wait their turn.
        """
        slots = self._background_slots if wait else self._request_slots
        if not slots.acquire(blocking=wait):
            raise Busy("syncs with the peers are already running; try again in a few seconds")
        try:
            netlocs = self.peers if netlocs is None else netlocs
            if not netlocs:
                return False, {}
            with ThreadPoolExecutor(max_workers=min(SYNC_THREADS, len(netlocs)),
                                    thread_name_prefix="sync-peer") as pool:
                verdicts = dict(zip(netlocs, pool.map(self._sync_with, netlocs)))
        finally:
            slots.release()
        replaced = any(adopted for adopted, _ in verdicts.values())
        return replaced, {netloc: why for netloc, (_, why) in verdicts.items()}

    def sync_with_url(self, base_url: str) -> tuple[bool, str]:
        """Take the blocks of a node that is not (yet) a peer, if valid and preferred: a signed node vetting a
        peer its chain does not know yet. Bounded like one peer's part of a sync."""
        return self._sync_with(urlsplit(base_url).netloc, base_url)

    def _sync_with(self, netloc: str, base_url: str | None = None) -> tuple[bool, str]:
        """Fetch one peer's blocks from a little before our last one on, and offer them to the chain."""
        with self._lock:
            peer = self._peers.get(netloc)
        base_url = peer.base_url if peer else base_url or f"http://{netloc}"
        ours = self.blockchain.chain
        start = max(GENESIS_INDEX + 1, len(ours) - self.blockchain.finality_depth + 1)
        try:
            # Most syncs find the peer's chain to be ours, or ours and more: ask from our last block first, and
            # go back as far as a reorganisation may reach only if the peer's differs there.
            last = len(ours)
            if last == GENESIS_INDEX:
                blocks, length = self._fetch_blocks(base_url, start, last)
            else:
                blocks, length = self._fetch_blocks(base_url, last, last)
                if blocks and blocks[0] == ours[-1]:
                    start = last
                elif start < last and length >= last:
                    blocks, length = self._fetch_blocks(base_url, start, last)
                else:
                    start = last
        except PeerMisbehaved as exc:
            self.fault(netloc, str(exc))
            return False, f"skipped: {exc}"
        except PeerError as exc:
            log.warning("peer %s skipped: %s", netloc, exc)
            return False, f"skipped: {exc}"
        if length < len(ours):
            self._behaved(netloc, length)
            return False, f"a chain of length {length} is not preferred over ours ({len(ours)})"
        if blocks and start <= len(ours) and blocks[0] != ours[start - 1] and \
                blocks[0].get("previous_hash") != hash_block(ours[start - 2]):
            why = (f"refused: its chain parted from ours before block {start}, deeper than the finality depth "
                   f"({self.blockchain.finality_depth}); an operator must decide which chain is right")
            self._behaved(netloc, length, why)
            return False, why
        adopted, why = self.blockchain.adopt(blocks) if blocks else (False, f"holds no block from {start} on")
        if why.startswith("invalid"):
            self.fault(netloc, why)
        else:
            self._behaved(netloc, length, why if why.startswith("refused") else "")
        if adopted:
            log.info("peer %s: %s", netloc, why)
        return adopted, why

    def _fetch_blocks(self, base_url: str, start: int, our_length: int) -> tuple[list[Block], int]:
        """A peer's blocks from index `start` on, page by page, within max_sync_bytes and a time budget."""
        blocks: list[Block] = []
        fetched_bytes, deadline = 0, time.monotonic() + self.round_seconds
        index = start
        while True:
            page, size = self.client.get_json(f"{base_url}/blocks?from={index}")
            if not isinstance(page, dict) or not isinstance(page.get("blocks"), list) or \
                    type(page.get("length")) is not int:
                raise PeerMisbehaved("did not answer /blocks with {\"blocks\": [...], \"length\": N}")
            length, got = page["length"], page["blocks"]
            if any(not isinstance(block, dict) or block.get("index") != index + number
                   for number, block in enumerate(got)):
                raise PeerMisbehaved(f"answered /blocks?from={index} with blocks out of order")
            if length < our_length:
                return [], length  # shorter than ours: never preferred, so nothing more is fetched
            blocks += got
            index += len(got)
            fetched_bytes += size
            if not got or index > length or fetched_bytes > self.max_sync_bytes or time.monotonic() > deadline:
                return blocks, length

    def _quiet_sync(self, netlocs: list[str] | None = None) -> None:
        try:
            self.sync(netlocs, wait=True)
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
            for peer in self._peers.values():
                peer.outbox.close()
        self._background.shutdown(wait=False, cancel_futures=True)
