"""Serving one node: `python app.py --port 5002 --role patient` ends up here.

waitress (real threads, runs on Windows too, the paper's platform) serves the app that app.create_app builds;
this module refuses unsafe addresses, sets the server up, handles stop signals, and starts the node's network
and mining processes.
"""
from __future__ import annotations

import json
import logging
import signal
import sys
from typing import Any, Callable

import waitress.server
import waitress.utilities

from app import TOO_LARGE, create_app
from config import LOOPBACK_HOSTS, Config, load_config
from errors import NodeError
from node import Node, migrate_state

log = logging.getLogger("emr.server")
SERVER_IDENT = "emr-chain"


def waitress_errors_as_json() -> None:
    """waitress answers a few requests itself, before the app sees them (a body over its size limit, a
    malformed request line), in plain text; make those {"error": ...} too, like every other answer.

    This replaces `waitress.utilities.Error.to_response`, whose signature tests/test_server.py pins.
    """
    def to_response(self: waitress.utilities.Error, ident: str | None = None) -> tuple[str, list, bytes]:
        lead = TOO_LARGE if self.code == 413 else self.reason.lower()
        body = json.dumps({"error": f"{lead} ({self.body})"}).encode()
        return f"{self.code} {self.reason}", [("Content-Type", "application/json")], body

    waitress.utilities.Error.to_response = to_response


def refuse_unsafe_address(config: Config) -> None:
    if config.host not in LOOPBACK_HOSTS and not config.api_key:
        raise SystemExit(f"error: refusing to listen on {config.host} without an API key; "
                         f"set --api-key (EMR_API_KEY) or listen on 127.0.0.1")


def serve(config: Config) -> None:
    """Serve one node with waitress until SIGINT or SIGTERM."""
    refuse_unsafe_address(config)
    app = create_app(config)
    node: Node = app.extensions["emr_node"]
    waitress_errors_as_json()
    # Threads started while the stop signals are blocked inherit the block, so SIGTERM and
    # SIGINT reach the main thread and interrupt its select() at once, not a second later.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        server: Any = waitress.server.create_server(
            app, host=config.host, port=config.port, threads=config.threads, ident=SERVER_IDENT,
            max_request_body_size=config.max_upload_bytes)
        node.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
    for stop_signal in stop_signals:
        signal.signal(stop_signal, lambda *_: sys.exit(0))
    log.info("%s node on %s (chain of %d, IPFS API %s, data %s)", config.role_name, config.own_url,
             len(node.chain()), config.ipfs_api, config.data_path)
    try:
        server.run()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        node.close()
        log.info("node on %s stopped", config.own_url)


# `python app.py COMMAND [flags]`: things an operator does to a node that is not running.
COMMANDS: dict[str, Callable[[Config], str]] = {"migrate-state": migrate_state}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = COMMANDS.get(argv[0]) if argv else None
    config = load_config(argv[1:] if command else argv)
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [%(name)s :" + str(config.port) + "] %(message)s")
    try:
        if command:
            print(command(config))
        else:
            serve(config)
    except NodeError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
