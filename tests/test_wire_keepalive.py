"""A kept-alive connection to a peer delivers each message once (wire.PeerClient, as the outboxes use it)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from wire import Limits, PeerClient


class Counting(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as waitress answers nodes
    received: list[tuple[str, Any, int]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Counting.received.append((self.path, body, self.client_address[1]))
        answer = b'{"outcome": "appended"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    Counting.received = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Counting)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_each_message_on_a_kept_alive_connection_arrives_once(server: str) -> None:
    client = PeerClient(Limits(2.0, 1 << 20, 32), {})
    connection = client.connection(server)
    try:
        for number in range(5):
            status, answer = client.post_json(connection, "/receive_block", {"index": number})
            assert status == 200 and json.loads(answer) == {"outcome": "appended"}
    finally:
        connection.close()
    assert [body["index"] for _, body, _ in Counting.received] == [0, 1, 2, 3, 4]
    assert len({port for _, _, port in Counting.received}) == 1  # and all on one connection
