"""The members file: who founded a permissioned network, with which role and keys, under which settings.

The operators of a network build one file from their nodes' `describe()` outputs and give every node the
same copy. It is JSON:

    {"format": "emr-chain members", "version": 1, "network": "st-mary-pilot",
     "settings": {"security": "signed", "pow_mode": "content", "difficulty": 4},
     "members": [{"node_id": ..., "role": "patient", "signing_public_key": ..., "exchange_public_key": ...,
                  "url": "http://127.0.0.1:5002"}, ...]}

- network: 1 to 64 of A-Z a-z 0-9 . _ - (starting with a letter or digit);
- settings (optional): what every node of the network must agree on, flat, each a string, an integer or
  true/false; `Members.settings_problems(actual)` lists where a node's own settings differ;
- members: at least one; node_id must be the fingerprint of signing_public_key (identity.py), role one of
  policy.ROLES (spelled out: "healthcare_provider", not "doctor"), keys base64url of their raw 32 bytes,
  url optional (http or https); no node id, short id, exchange key or url twice. A member entry may carry
  the "short_id" of describe(): it is checked, not stored. Unknown fields are refused (a misspelled field
  must not be ignored silently in a file that decides who may sign).

`Members.fingerprint` (and its short form) is SHA-256 of the canonical JSON of the whole content, in base32:
operators read it to each other to confirm they hold the same file.

These are the founding members. Members are immutable; later changes (admission, removal, key rotation by
signed transactions) make new ones with `with_member` / `without_member`.

Command line:
    python members.py build --network NAME [--setting security=signed ...] -o members.json DESCRIBE.json...
        (each DESCRIBE.json holds one describe() output, as GET /identity answers, or a list of them; - is stdin)
    python members.py show members.json
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Iterator, Mapping
from urllib.parse import urlsplit

from canonical import canonical_json, loads
from errors import DuplicateMember, InvalidIdentity, MembersFileError, UnknownMember
from identity import PUBLIC_FIELDS, PublicIdentity, short_id
from policy import ROLE_ALIASES, ROLES
from storage import written_atomically

FORMAT = "emr-chain members"
VERSION = 1
NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SETTING_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_SETTING_LENGTH = 256
MAX_URL_LENGTH = 2048
MAX_FILE_SIZE = 4 * 1024 * 1024
FILE_FIELDS = frozenset({"format", "version", "network", "settings", "members"})
MEMBER_FIELDS = frozenset(PUBLIC_FIELDS) | {"role", "url"}
ACCEPTED_MEMBER_FIELDS = MEMBER_FIELDS | {"short_id"}


@dataclass(frozen=True)
class Member:
    """One member: its public identity, its role (one of policy.ROLES) and, if known, its URL."""

    identity: PublicIdentity
    role: str
    url: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            hint = f": use {ROLE_ALIASES[self.role]!r}" if self.role in ROLE_ALIASES else ""
            raise InvalidIdentity(f"'role' {self.role!r} is not one of {', '.join(ROLES)}{hint}")
        if self.url is not None:
            _check_url(self.url)

    @classmethod
    def from_dict(cls, data: Any) -> Member:
        """From a members file entry or a describe() output; InvalidIdentity naming the field."""
        if not isinstance(data, dict):
            raise InvalidIdentity("a member must be a JSON object")
        unknown = set(data) - ACCEPTED_MEMBER_FIELDS
        if unknown:
            raise InvalidIdentity(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        if "role" not in data:
            raise InvalidIdentity("'role' is required")
        if not isinstance(data["role"], str):
            raise InvalidIdentity("'role' must be a string")
        return cls(PublicIdentity.from_dict(data), data["role"], data.get("url"))

    def to_dict(self) -> dict[str, Any]:
        entry = {"node_id": self.node_id, "role": self.role, **self.identity.to_dict()}
        if self.url is not None:
            entry["url"] = self.url
        return entry

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def short_id(self) -> str:
        return self.identity.short_id

    def verify(self, value: Any, signature: Any) -> bool:
        return self.identity.verify(value, signature)

    def __repr__(self) -> str:
        return f"Member({self.short_id}, {self.role})"


class Members:
    """The members of one network, in their order; immutable (with_member/without_member make new ones)."""

    def __init__(self, network: str, members: Iterable[Member] = (),
                 settings: Mapping[str, Any] | None = None) -> None:
        if not isinstance(network, str) or not NETWORK_NAME.fullmatch(network):
            raise InvalidIdentity("'network' must be 1 to 64 of A-Z a-z 0-9 . _ - (starting with a letter or "
                                  "digit)")
        self.network = network
        self.settings: Mapping[str, Any] = MappingProxyType(_checked_settings(settings or {}))
        self._members: tuple[Member, ...] = tuple(members)
        self._by_id: dict[str, Member] = {}
        self._held: dict[tuple[str, Any], Member] = {}  # (what, value) -> the member that holds it
        for member in self._members:
            if not isinstance(member, Member):
                raise TypeError(f"not a Member: {member!r}")
            for what, value in _identifying(member):
                if (what, value) in self._held:
                    raise DuplicateMember(_duplicate_message(what, member, self._held[what, value]))
                self._held[what, value] = member
            self._by_id[member.node_id] = member

    # -- lookups ---------------------------------------------------------------------

    def get(self, node_id: str) -> Member | None:
        return self._by_id.get(node_id)

    def require(self, node_id: str) -> Member:
        """The member with this id; UnknownMember otherwise."""
        member = self._by_id.get(node_id)
        if member is None:
            described = short_id(node_id) if isinstance(node_id, str) else repr(node_id)
            raise UnknownMember(f"{described} is not a member of the network {self.network}")
        return member

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._by_id

    def __iter__(self) -> Iterator[Member]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def clash(self, member: Member) -> tuple[str, Member] | None:
        """What of `member` one of these members holds already (its "node id", "short id", "exchange key" or
        "url"), and which member: no two members may share any of them. None if nothing clashes."""
        for what, value in _identifying(member):
            if (what, value) in self._held:
                return what, self._held[what, value]
        return None

    def by_role(self, role: str) -> tuple[Member, ...]:
        return tuple(member for member in self._members if member.role == role)

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(member.node_id for member in self._members)

    # -- changes ---------------------------------------------------------------------

    def with_member(self, member: Member) -> Members:
        """A copy with `member` added at the end; DuplicateMember if its id (short id, key, url) is taken."""
        return Members(self.network, (*self._members, member), self.settings)

    def without_member(self, node_id: str) -> Members:
        """A copy without the member `node_id`; UnknownMember if there is none."""
        self.require(node_id)
        return Members(self.network, (m for m in self._members if m.node_id != node_id), self.settings)

    # -- settings and fingerprint ------------------------------------------------------

    def settings_problems(self, actual: Mapping[str, Any]) -> list[str]:
        """Where a node's own settings differ from the file's (only the settings the file names)."""
        problems = []
        for name, expected in self.settings.items():
            if name not in actual:
                problems.append(f"{name}: the members file sets {expected!r}; this node has no such setting")
            elif actual[name] != expected or type(actual[name]) is not type(expected):
                problems.append(f"{name}: the members file says {expected!r}, this node {actual[name]!r}")
        return problems

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of the whole content, lowercase base32 (52 characters)."""
        digest = hashlib.sha256(canonical_json(self.to_dict())).digest()
        return base64.b32encode(digest).decode("ascii").rstrip("=").lower()

    @property
    def short_fingerprint(self) -> str:
        return short_id(self.fingerprint)

    # -- JSON ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": FORMAT, "version": VERSION, "network": self.network}
        if self.settings:
            data["settings"] = dict(self.settings)
        data["members"] = [member.to_dict() for member in self._members]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Members:
        """From a members file's content; InvalidIdentity or DuplicateMember naming the entry and field."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InvalidIdentity("not an emr-chain members file ('format' is not \"emr-chain members\")")
        if data.get("version") != VERSION:
            raise InvalidIdentity(f"format version {data.get('version')!r}; this emr-chain reads version {VERSION} "
                                  "(upgrade emr-chain)")
        unknown = set(data) - FILE_FIELDS
        if unknown:
            raise InvalidIdentity(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        for field in ("network", "members"):
            if field not in data:
                raise InvalidIdentity(f"'{field}' is required")
        settings = data.get("settings", {})
        if not isinstance(settings, dict):
            raise InvalidIdentity("'settings' must be a JSON object")
        entries = data["members"]
        if not isinstance(entries, list) or not entries:
            raise InvalidIdentity("'members' must be a non-empty list")
        return cls(data["network"], _parse_members(entries, "member"), settings)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Members) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"Members({self.network}, {len(self)} members, {self.short_fingerprint})"


def _parse_members(entries: Iterable[Any], label: str) -> list[Member]:
    """Members from their dict forms; InvalidIdentity naming the entry (`label` and position) and field."""
    members = []
    for position, entry in enumerate(entries, 1):
        try:
            members.append(Member.from_dict(entry))
        except InvalidIdentity as exc:
            raise InvalidIdentity(f"{label} {position}{_entry_name(entry)}: {exc}") from None
    return members


def build_members(network: str, descriptions: Iterable[Any], settings: Mapping[str, Any] | None = None) -> Members:
    """Members from several nodes' describe() outputs (GET /identity), in the order given.

    InvalidIdentity naming the description and field, or DuplicateMember.
    """
    members = _parse_members(descriptions, "description")
    if not members:
        raise InvalidIdentity("a network needs at least one member")
    return Members(network, members, settings)


def load_members(path: str | os.PathLike[str]) -> Members:
    """Read a members file; MembersFileError naming the file, the entry and what to do."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_FILE_SIZE + 1)
    except FileNotFoundError:
        raise MembersFileError(path, "does not exist: get the network's members file from its operators") from None
    except IsADirectoryError:
        raise MembersFileError(path, "is a directory, not a members file") from None
    except OSError as exc:
        raise MembersFileError(path, f"cannot be read ({exc.strerror})") from None
    if len(raw) > MAX_FILE_SIZE:
        raise MembersFileError(path, f"is larger than {MAX_FILE_SIZE} bytes: not a members file")
    try:
        data = loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise MembersFileError(path, "is not UTF-8 text: not a members file") from None
    except ValueError as exc:
        raise MembersFileError(path, f"cannot be parsed ({exc}): get an intact copy from the network's "
                                     "operators") from None
    try:
        return Members.from_dict(data)
    except (InvalidIdentity, DuplicateMember) as exc:
        raise MembersFileError(path, f"{exc}; correct it with the network's operators (every node must hold "
                                     "the same file)") from None


def write_members(path: str | os.PathLike[str], members: Members, *, overwrite: bool = False) -> None:
    """Write a members file (complete or not at all, readable by all: it holds nothing secret).

    FileExistsError if a file is there and overwrite is False.
    """
    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} already exists")
    with written_atomically(path, "w", overwrite=overwrite) as handle:
        if hasattr(os, "fchmod"):
            os.fchmod(handle.fileno(), 0o644)
        json.dump(members.to_dict(), handle, indent=2, ensure_ascii=False)
        handle.write("\n")


# -- helpers --------------------------------------------------------------------------------

def _checked_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    checked = {}
    for name, value in settings.items():
        if not isinstance(name, str) or not SETTING_NAME.fullmatch(name):
            raise InvalidIdentity(f"setting {name!r}: a name is lowercase letters, digits and _")
        if not isinstance(value, (str, int)):
            raise InvalidIdentity(f"setting {name!r}: the value must be a string, an integer or true/false")
        if isinstance(value, str) and len(value) > MAX_SETTING_LENGTH:
            raise InvalidIdentity(f"setting {name!r}: longer than {MAX_SETTING_LENGTH} characters")
        try:
            canonical_json(value)
        except ValueError as exc:
            raise InvalidIdentity(f"setting {name!r}: {exc}") from None
        checked[name] = value
    return checked


def _check_url(url: Any) -> None:
    if not isinstance(url, str) or len(url) > MAX_URL_LENGTH or any(not ch.isprintable() or ch.isspace() for ch in url):
        raise InvalidIdentity(f"'url' must be an http(s) URL of at most {MAX_URL_LENGTH} characters, without spaces")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidIdentity(f"'url' {url!r} is not an http:// or https:// URL with a host")


def _identifying(member: Member) -> Iterator[tuple[str, Any]]:
    """What tells a member apart, and may belong to one member only."""
    yield "node id", member.node_id
    yield "short id", member.short_id
    yield "exchange key", member.identity.exchange_public_key
    if member.url is not None:
        yield "url", member.url


def _duplicate_message(what: str, member: Member, other: Member) -> str:
    if what == "node id":
        return f"{member.short_id} ({member.node_id}) is listed twice"
    if what == "short id":
        return (f"{member.node_id} and {other.node_id} share the short id {member.short_id}; short ids are read "
                "aloud to tell members apart, so one of them must make a new identity")
    return f"{member.short_id} and {other.short_id} have the same {what}: one of them is a copy of the other"


def _entry_name(entry: Any) -> str:
    if isinstance(entry, dict) and isinstance(entry.get("node_id"), str):
        return f" ({short_id(entry['node_id'])})"
    return ""


# -- command line -----------------------------------------------------------------------------

def _read_descriptions(source: str) -> list[Any]:
    text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    data = json.loads(text)
    return data if isinstance(data, list) else [data]


def _setting(text: str) -> tuple[str, Any]:
    name, separator, value = text.partition("=")
    if not separator:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE")
    if value in ("true", "false"):
        return name, value == "true"
    if re.fullmatch(r"-?[0-9]{1,15}", value):
        return name, int(value)
    return name, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="members.py", description="Build or show a network's members file.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="a members file from the nodes' describe() outputs")
    build.add_argument("--network", required=True, help="the network's name")
    build.add_argument("--setting", type=_setting, action="append", default=[], metavar="NAME=VALUE",
                       help="a setting every node must share (repeat); true/false and integers are typed")
    build.add_argument("-o", "--output", type=Path, required=True)
    build.add_argument("--force", action="store_true", help="replace an existing output file")
    build.add_argument("descriptions", nargs="+", help="files with a describe() output or a list of them; - for stdin")
    show = commands.add_parser("show", help="a members file's network, fingerprint and members")
    show.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            descriptions = [entry for source in args.descriptions for entry in _read_descriptions(source)]
            members = build_members(args.network, descriptions, dict(args.setting))
            write_members(args.output, members, overwrite=args.force)
            print(f"{args.output}: {len(members)} members of {members.network}, fingerprint "
                  f"{members.short_fingerprint}")
        else:
            members = load_members(args.path)
            print(f"network {members.network}, fingerprint {members.fingerprint} ({members.short_fingerprint})")
            for name, value in members.settings.items():
                print(f"  setting {name} = {json.dumps(value)}")
            for member in members:
                print(f"  {member.short_id}  {member.role:<20}  {member.url or '-'}  {member.node_id}")
    except FileExistsError as exc:
        print(f"{exc}: nothing was written (use --force to replace it)", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # unreadable input, bad JSON; InvalidIdentity is a ValueError too
        print(exc, file=sys.stderr)
        return 1
    except (DuplicateMember, MembersFileError) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
