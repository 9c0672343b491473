"""Every setting of an emr-chain node, in one place.

Each setting is a field of `Config` with a safe default, an environment
variable (`EMR_` + the name in capitals) and a command-line flag (`--` + the
name with dashes). A flag beats the environment, the environment beats the
default. `python app.py --help` lists them all.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from blockchain import DEFAULT_FINALITY_DEPTH, DEFAULT_MAX_PENDING, PAPER_GENESIS_TIMESTAMP
from policy import canonical_role

ENV_PREFIX = "EMR_"
MIB = 1024 * 1024
GIB = 1024 * MIB


STATE_FOLDER = ".emr"
DEFAULT_IPFS_API = "http://127.0.0.1:5001"
DEFAULT_IPFS_TIMEOUT = 120.0
DEFAULT_IPFS_LOOKUP_TIMEOUT = 5.0
# Names and addresses of this machine's loopback: a node may listen on them without an API key.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::")  # listening on every address, loopback included
MIN_API_KEY_LENGTH = 16


def _setting(default: Any, help: str, *, choices: Sequence[str] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class Config:
    """The settings of one node. Build it with `load_config`, or directly in tests."""

    host: str = _setting("127.0.0.1", "address the node listens on; a non-loopback address needs --api-key")
    port: int = _setting(5002, "port the node listens on (paper: 5002 patient, 5003 healthcare authority)")
    role: str = _setting("patient", "this node's role; see ROLE_ACTIONS in policy.py for what each may do")
    public_url: str = _setting("", "URL other nodes use to reach this one (default http://HOST:PORT)")
    data_dir: str = _setting("", "folder for this node's files (default data/node-PORT); file paths are confined to it")
    state_dir: str = _setting("", f"folder for the node's own files: its store, identity, spooled uploads "
                                  f"(default DATA_DIR/{STATE_FOLDER}); no request can read or write in it")
    difficulty: int = _setting(4, "leading zeros the proof of work needs (the paper uses 4)")
    security: str = _setting("paper", "'paper' (the paper's open network) or 'signed' (a permissioned one: every "
                                      "transaction and block signed by a member; the same on every node)",
                             choices=("paper", "signed"))
    members_file: str = _setting("", "signed mode: the members file the network's operators share (members.py "
                                     "build); without one a node founds a network of one, itself")
    identity_passphrase: str = _setting("", "passphrase protecting this node's identity file (prefer the "
                                            "variable: a flag shows in ps)")
    pow_mode: str = _setting("paper", "proof of work: 'paper' (nonce against previous nonce) or "
                                      "'content' (the block's own hash, so no transaction can change)",
                             choices=("paper", "content"))
    mining_workers: int = _setting(0, "processes that search for the nonce (0: one per CPU core)")
    genesis_timestamp: str = _setting(PAPER_GENESIS_TIMESTAMP, "genesis block timestamp; the same on every node of a network")
    ipfs_api: str = _setting(DEFAULT_IPFS_API, "Kubo RPC API address")
    ipfs_timeout: float = _setting(DEFAULT_IPFS_TIMEOUT, "seconds to wait for Kubo to answer an add or cat")
    ipfs_lookup_timeout: float = _setting(DEFAULT_IPFS_LOOKUP_TIMEOUT, "seconds to look for a CID before calling it unknown")
    peers: str = _setting("", "comma-separated node URLs to connect to at start")
    peer_allow: str = _setting("127.0.0.0/8,::1/128,localhost", "comma-separated networks and host names peers may be on")
    peer_timeout: float = _setting(3.0, "seconds to wait for another node")
    sync_interval: float = _setting(15.0, "seconds between background chain syncs with peers (0: off)")
    max_peer_response_bytes: int = _setting(16 * MIB, "largest answer taken from a peer; larger ones are cut off "
                                                       "and count as a fault of that peer")
    max_peers: int = _setting(32, "most peers a node keeps")
    max_peer_faults: int = _setting(5, "misbehaviours in a row (answers too large, too slow, malformed or "
                                       "invalid) after which a peer is dropped")
    peer_ban_seconds: float = _setting(600.0, "seconds a peer dropped for its faults is not taken back "
                                              "(/remove_node forgives it at once)")
    max_sync_bytes: int = _setting(32 * MIB, "most bytes of blocks taken from one peer in one sync round; a longer "
                                             "chain is taken in several rounds")
    sync_page_bytes: int = _setting(1 * MIB, "about how many bytes of blocks one answer to /blocks holds")
    finality_depth: int = _setting(DEFAULT_FINALITY_DEPTH, "blocks a reorganisation may drop; deeper ones are "
                                                           "refused and logged for an operator")
    max_pending: int = _setting(DEFAULT_MAX_PENDING, "most pending transactions a node holds; more are refused "
                                                     "with 503 until a block is mined")
    max_body_bytes: int = _setting(1 * MIB, "largest JSON request body")
    max_upload_bytes: int = _setting(2 * GIB, "largest file upload (multipart) to create_hash or publish_record")
    max_json_depth: int = _setting(32, "deepest nesting accepted in a JSON body")
    threads: int = _setting(16, "request threads of the WSGI server")
    api_key: str = _setting("", "when set, every endpoint but /health needs it (Bearer or X-API-Key)")
    persist: bool = _setting(False, "keep chain, pending transactions and peers in the data directory")
    # Hostile clients: what a client may hold of the node, and which web pages may call it.
    header_timeout: float = _setting(10.0, "seconds a client has to send a whole request head, from connecting "
                                           "(or from its previous answer); then the connection is closed")
    body_timeout: float = _setting(30.0, "longest pause, in seconds, while a request body is arriving; "
                                         "then the request is answered 408 and the connection closed")
    connection_limit: int = _setting(1000, "open connections served at once (more wait to be accepted); "
                                           "at most 500 where the platform has no poll(), as on Windows")
    upload_streams: int = _setting(4, "multipart uploads to create_hash passed on to IPFS as they arrive, at "
                                      "once, each on a thread of its own (not a request thread); more uploads "
                                      "are read whole first, as other requests (0: every one)")
    max_spool_bytes: int = _setting(4 * GIB, "bytes of GET /get_file downloads held in the data directory at "
                                             "once for clients still reading them; beyond it a download gets 503")
    allowed_hosts: str = _setting("", "comma-separated extra names this node answers to in the Host header "
                                      "(its listen address, public_url's host and, on loopback, 127.0.0.1, "
                                      "localhost and ::1 always); '*' turns the check off")
    allowed_origins: str = _setting("", "comma-separated web origins (scheme://host[:port]) whose pages may call "
                                        "this node (CORS); any other page's request is refused 403")
    # Records kept by the chain (pinning.py): copies of the records every block names, in this node's own Kubo.
    pin_records: str = _setting("all", "which records named on the chain this node pins in its own IPFS daemon, "
                                        "fetching them from the private IPFS network in the background: 'all', "
                                        "'openable' (those this node may open) or 'none'",
                                choices=("all", "openable", "none"))
    pin_timeout: float = _setting(60.0, "seconds one pin may take to fetch a record before it is tried again later")
    pin_workers: int = _setting(2, "records fetched and pinned at once")
    pin_retry_max: float = _setting(60.0, "longest wait, in seconds, between attempts to pin a record that failed "
                                          "(the wait doubles from 1 s up to this)")
    log_level: str = _setting("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self) -> str | None:
        """Why these settings cannot start a node (naming the setting), or None."""
        key = self.api_key
        if key:
            if not key.strip():
                return f"{setting_names('api_key')} is blank; leave it unset for a node without a key"
            if any(char.isspace() for char in key):
                return f"{setting_names('api_key')} contains whitespace; use a key without spaces or newlines"
            if len(key) < MIN_API_KEY_LENGTH:
                return (f"{setting_names('api_key')} is {len(key)} characters; it must have at least "
                        f"{MIN_API_KEY_LENGTH} (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        for name in ("header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                return f"{setting_names(name)} must be more than 0 seconds"
        if self.connection_limit < 1:
            return f"{setting_names('connection_limit')} must be at least 1"
        if not self.pin_timeout > 0 or self.pin_workers < 1 or not self.pin_retry_max > 0:
            return (f"{setting_names('pin_timeout')} and {setting_names('pin_retry_max')} must be more than 0 "
                    f"seconds, {setting_names('pin_workers')} at least 1")
        if self.upload_streams < 0:
            return f"{setting_names('upload_streams')} must not be negative"
        if self.max_spool_bytes < 0:
            return f"{setting_names('max_spool_bytes')} must not be negative"
        for origin in self.origin_list:
            if origin == "*" or "://" not in origin or origin.count("/") != 2:
                return (f"{setting_names('allowed_origins')}: {origin!r} is not an origin; list each one as "
                        f"scheme://host[:port] (there is no '*')")
        return None

    @property
    def host_list(self) -> list[str]:
        return [host.lower() for host in split_list(self.allowed_hosts)]

    @property
    def origin_list(self) -> list[str]:
        return [origin.lower().rstrip("/") for origin in split_list(self.allowed_origins)]

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir or f"data/node-{self.port}").resolve()

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).resolve() if self.state_dir else self.data_path / STATE_FOLDER

    @property
    def downloads_path(self) -> Path:
        return self.data_path / "downloads"

    @property
    def own_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def role_name(self) -> str:
        return canonical_role(self.role)

    @property
    def peer_list(self) -> list[str]:
        return split_list(self.peers)


def split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def setting_names(name: str) -> str:
    """How a person sets it: 'allowed_origins (EMR_ALLOWED_ORIGINS, --allowed-origins)'."""
    return f"{name} ({env_name(name)}, {flag_name(name)})"


def _convert(kind: type, raw: str) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    return kind(raw)


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="app.py", description="Run one emr-chain node (a Flask REST API over a proof-of-work chain and IPFS).",
        epilog=f"Every flag also reads an environment variable: {ENV_PREFIX}<NAME>, e.g. {env_name('port')}.")
    for f in dataclasses.fields(Config):
        kind = _TYPES[f.type]
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}; default {f.default!r}]"
        if kind is bool:
            parser.add_argument(flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(flag_name(f.name), dest=f.name, type=kind, default=None,
                                choices=f.metadata["choices"], help=help_text)
    return parser


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults, overridden by EMR_* environment variables, overridden by flags."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        raw = environ.get(env_name(f.name))
        if raw is not None:
            try:
                values[f.name] = _convert(_TYPES[f.type], raw)
            except ValueError as exc:
                raise SystemExit(f"error: {env_name(f.name)}={raw!r} is not a valid {f.type}: {exc}")
            choices = f.metadata["choices"]
            if choices and values[f.name] not in choices:
                raise SystemExit(f"error: {env_name(f.name)} must be one of {', '.join(choices)}")
    flags = build_parser().parse_args(argv)
    values.update({k: v for k, v in vars(flags).items() if v is not None})
    try:
        return Config(**values)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
