"""members.py: the founding members file that operators share, its checks, and the Members it loads into."""
from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any, Callable

import pytest

import members as members_module
from errors import Conflict, DuplicateMember, InvalidIdentity, MembersFileError, NotFound, UnknownMember
from identity import Identity, PublicIdentity, describe, fingerprint, short_id
from members import Member, Members, build_members, load_members, write_members

SETTINGS = {"security": "signed", "pow_mode": "content", "difficulty": 4}


@pytest.fixture(scope="module")
def nodes() -> dict[str, Identity]:
    return {role: Identity.generate() for role in ("patient", "healthcare_authority", "healthcare_provider")}


@pytest.fixture(scope="module")
def descriptions(nodes: dict[str, Identity]) -> list[dict[str, Any]]:
    return [describe(node, role, f"http://127.0.0.1:{5002 + n}") for n, (role, node) in enumerate(nodes.items())]


@pytest.fixture
def members_file(tmp_path: Path, descriptions: list[dict[str, Any]]) -> Path:
    path = tmp_path / "members.json"
    write_members(path, build_members("st-mary-pilot", descriptions, SETTINGS))
    return path


def test_built_from_describe_outputs_written_and_loaded_back(members_file: Path, nodes, descriptions) -> None:
    members = load_members(members_file)
    assert members.network == "st-mary-pilot" and dict(members.settings) == SETTINGS
    assert [m.role for m in members] == ["patient", "healthcare_authority", "healthcare_provider"]
    for role, node in nodes.items():
        member = members.require(node.node_id)
        assert member.role == role and member.identity == node.public() and node.node_id in members
        assert member.verify({"a": 1}, node.sign({"a": 1}))
    assert members.by_role("patient")[0].url == "http://127.0.0.1:5002"
    assert stat.S_IMODE(members_file.stat().st_mode) == 0o644  # nothing secret: share it
    data = json.loads(members_file.read_text())
    assert list(data) == ["format", "version", "network", "settings", "members"]
    assert list(data["members"][0]) == ["node_id", "role", "signing_public_key", "exchange_public_key", "url"]
    assert load_members(members_file) == members and members.to_dict() == data


def test_lookups(members_file: Path, nodes) -> None:
    members = load_members(members_file)
    stranger = Identity.generate()
    assert members.get(stranger.node_id) is None and stranger.node_id not in members
    with pytest.raises(UnknownMember, match=f"{stranger.short_id} is not a member of the network st-mary-pilot"):
        members.require(stranger.node_id)
    assert isinstance(UnknownMember("x"), NotFound)
    assert len(members) == 3 and members.node_ids == tuple(node.node_id for node in nodes.values())


def test_the_fingerprint_names_the_whole_content(members_file: Path, descriptions) -> None:
    members = load_members(members_file)
    assert len(members.fingerprint) == 52 and members.short_fingerprint == short_id(members.fingerprint)
    assert build_members("st-mary-pilot", descriptions, SETTINGS).fingerprint == members.fingerprint
    assert build_members("st-mary-pilot", descriptions, {**SETTINGS, "difficulty": 5}).fingerprint != members.fingerprint
    assert build_members("st-mary-pilo", descriptions, SETTINGS).fingerprint != members.fingerprint
    assert build_members("st-mary-pilot", descriptions[:2], SETTINGS).fingerprint != members.fingerprint
    moved = [{**descriptions[0], "url": "http://127.0.0.1:6000"}, *descriptions[1:]]
    assert build_members("st-mary-pilot", moved, SETTINGS).fingerprint != members.fingerprint


def test_settings_problems_name_each_difference(members_file: Path) -> None:
    members = load_members(members_file)
    assert members.settings_problems({**SETTINGS, "other": 1}) == []
    assert members.settings_problems({"security": "paper", "pow_mode": "content", "difficulty": 4}) == [
        "security: the members file says 'signed', this node 'paper'"]
    assert members.settings_problems({"security": "signed", "pow_mode": "content"}) == [
        "difficulty: the members file sets 4; this node has no such setting"]
    assert Members("n", settings={"strict": True}).settings_problems({"strict": 1}) == [
        "strict: the members file says True, this node 1"]


def test_members_are_immutable_and_copied_with_a_change(members_file: Path, nodes) -> None:
    members = load_members(members_file)
    newcomer = Member(Identity.generate().public(), "healthcare_provider", "http://127.0.0.1:5010")
    grown = members.with_member(newcomer)
    assert newcomer.node_id in grown and newcomer.node_id not in members and len(members) == 3
    assert grown.settings == members.settings and grown.network == members.network
    shrunk = grown.without_member(nodes["patient"].node_id)
    assert nodes["patient"].node_id not in shrunk and nodes["patient"].node_id in grown
    with pytest.raises(UnknownMember):
        members.without_member(newcomer.node_id)
    with pytest.raises(DuplicateMember, match="listed twice") as caught:
        grown.with_member(newcomer)
    assert isinstance(caught.value, Conflict)
    with pytest.raises(TypeError):
        members.settings["security"] = "paper"  # type: ignore[index]
    with pytest.raises(AttributeError):
        newcomer.role = "patient"  # type: ignore[misc]


def test_a_rotated_key_is_a_new_member(members_file: Path, nodes) -> None:
    members = load_members(members_file)
    old = members.require(nodes["healthcare_provider"].node_id)
    rotated = Member(Identity.generate().public(), old.role, old.url)
    after = members.without_member(old.node_id).with_member(rotated)
    assert old.node_id not in after and after.require(rotated.node_id).url == old.url


# -- validation ------------------------------------------------------------------------------

def test_entry_checks_name_the_member_and_field(descriptions) -> None:
    cases: list[tuple[Callable[[dict[str, Any]], Any], str]] = [
        (lambda d: d.update(role="doctor"), r"description 2 \(.{9}\): 'role' 'doctor' is not one of .*use "
                                            r"'healthcare_provider'"),
        (lambda d: d.update(role="nurse"), "'role' 'nurse' is not one of patient, healthcare_authority"),
        (lambda d: d.pop("role"), "'role' is required"),
        (lambda d: d.update(node_id="b" * 52), "not the fingerprint of its signing key"),
        (lambda d: d.update(short_id="aaaa-aaaa"), "'short_id' 'aaaa-aaaa' does not match"),
        (lambda d: d.update(url="ftp://host/"), "not an http:// or https:// URL"),
        (lambda d: d.update(url="http://exa mple"), "without spaces"),
        (lambda d: d.update(url=5002), "'url' must be an http"),
        (lambda d: d.update(roles="patient"), r"unknown field\(s\): roles"),
        (lambda d: d.update(signing_public_key=d["exchange_public_key"]), "not the fingerprint"),
    ]
    for change, problem in cases:
        changed = [dict(d) for d in descriptions]
        change(changed[1])
        with pytest.raises(InvalidIdentity, match=problem):
            build_members("net", changed)


def test_duplicates_are_refused(descriptions, nodes) -> None:
    with pytest.raises(DuplicateMember, match="is listed twice"):
        build_members("net", [descriptions[0], descriptions[1], descriptions[0]])
    same_url = [descriptions[0], {**descriptions[1], "url": descriptions[0]["url"]}]
    with pytest.raises(DuplicateMember, match="have the same url"):
        build_members("net", same_url)
    patient = nodes["patient"].public()
    copied_exchange = PublicIdentity.from_keys(Identity.generate().public().signing_public_key,
                                               patient.exchange_public_key)
    with pytest.raises(DuplicateMember, match="have the same exchange key"):
        Members("net", [Member(patient, "patient"), Member(copied_exchange, "healthcare_authority")])


def test_two_members_with_one_short_id_are_refused(nodes) -> None:
    first = nodes["patient"].public()
    twin = object.__new__(PublicIdentity)  # a made-up identity whose id shares the first 8 characters
    fake = Identity.generate().public()
    object.__setattr__(twin, "node_id", first.node_id[:8] + fake.node_id[8:])
    object.__setattr__(twin, "signing_public_key", fake.signing_public_key)
    object.__setattr__(twin, "exchange_public_key", fake.exchange_public_key)
    with pytest.raises(DuplicateMember, match=f"share the short id {first.short_id}"):
        Members("net", [Member(first, "patient"), Member(twin, "healthcare_provider")])


@pytest.mark.parametrize("network", ["", "-lead", "a b", "x" * 65, "é", None])
def test_network_names(network: Any) -> None:
    with pytest.raises(InvalidIdentity, match="'network' must be"):
        Members(network)


@pytest.mark.parametrize("settings, problem", [
    ({"Security": "signed"}, "a name is lowercase"),
    ({"difficulty": 4.0}, "must be a string, an integer or true/false"),
    ({"list": [1]}, "must be a string"),
    ({"big": 2**60}, "outside"),
    ({"long": "x" * 300}, "longer than 256"),
])
def test_settings_checks(settings: dict[str, Any], problem: str) -> None:
    with pytest.raises(InvalidIdentity, match=problem):
        Members("net", settings=settings)


def rewrite(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return apply


FILE_PROBLEMS: dict[str, tuple[Callable[[Path], Any], str]] = {
    "not JSON": (lambda p: p.write_text("network: x\n"), "cannot be parsed"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:100]), "cannot be parsed"),
    "not UTF-8": (lambda p: p.write_bytes(b"\xff\xfe{}"), "not UTF-8"),
    "a key twice": (lambda p: p.write_text(p.read_text().replace('"network":', '"network": "x", "network":', 1)),
                    "'network' appears twice"),
    "an identity file": (lambda p: p.write_text('{"format": "emr-chain identity", "version": 1}'),
                         "not an emr-chain members file"),
    "newer version": (rewrite(lambda d: d.update(version=2)), "format version 2.*upgrade"),
    "misspelled field": (rewrite(lambda d: d.update(setings=d.pop("settings"))), r"unknown field\(s\): setings"),
    "no members": (rewrite(lambda d: d.update(members=[])), "'members' must be a non-empty list"),
    "network missing": (rewrite(lambda d: d.pop("network")), "'network' is required"),
    "settings a list": (rewrite(lambda d: d.update(settings=[])), "'settings' must be a JSON object"),
    "key edited": (rewrite(lambda d: d["members"][2].update(signing_public_key=d["members"][0]["signing_public_key"])),
                   r"member 3 \(.{4}-.{4}\): 'node_id' .* is not the fingerprint of its signing key"),
    "id edited": (rewrite(lambda d: d["members"][0].update(node_id="a" * 52)), "member 1 .*not the fingerprint"),
    "member duplicated": (rewrite(lambda d: d["members"].append(d["members"][0])), "listed twice"),
    "role alias": (rewrite(lambda d: d["members"][1].update(role="authority")),
                   "member 2 .*use 'healthcare_authority'"),
    "float setting": (lambda p: p.write_text(p.read_text().replace('"difficulty": 4', '"difficulty": 4.0')),
                      "not an integer"),
}


@pytest.mark.parametrize("problem", FILE_PROBLEMS)
def test_a_bad_members_file_is_refused_naming_the_file_and_entry(members_file: Path, problem: str) -> None:
    change, message = FILE_PROBLEMS[problem]
    change(members_file)
    before = members_file.read_bytes()
    with pytest.raises(MembersFileError, match=message) as caught:
        load_members(members_file)
    assert str(caught.value).startswith(f"members file {members_file}: ")
    assert members_file.read_bytes() == before


def test_a_missing_members_file(tmp_path: Path) -> None:
    with pytest.raises(MembersFileError, match="does not exist: get the network's members file from its operators"):
        load_members(tmp_path / "members.json")
    with pytest.raises(MembersFileError, match="is a directory"):
        load_members(tmp_path)


def test_write_never_replaces_unless_told(members_file: Path, descriptions) -> None:
    before = members_file.read_bytes()
    other = build_members("other", descriptions[:1])
    with pytest.raises(FileExistsError):
        write_members(members_file, other)
    assert members_file.read_bytes() == before
    write_members(members_file, other, overwrite=True)
    assert load_members(members_file) == other


def test_a_member_without_url(nodes) -> None:
    member = Member.from_dict(describe(nodes["patient"], "patient"))  # "url": null
    assert member.url is None and "url" not in member.to_dict()
    assert Member.from_dict(member.to_dict()) == member
    assert member.node_id == fingerprint(member.identity.signing_public_key)


# -- command line --------------------------------------------------------------------------

def test_command_line_builds_and_shows(tmp_path: Path, descriptions, nodes, capsys) -> None:
    sources = []
    for n, description in enumerate(descriptions):
        sources.append(tmp_path / f"node{n}.json")
        sources[-1].write_text(json.dumps(description))
    output = tmp_path / "members.json"
    assert members_module.main(["build", "--network", "pilot", "--setting", "security=signed", "--setting",
                                "difficulty=4", "--setting", "strict=true", "-o", str(output),
                                *map(str, sources)]) == 0
    members = load_members(output)
    assert dict(members.settings) == {"security": "signed", "difficulty": 4, "strict": True}
    assert members.short_fingerprint in capsys.readouterr().out
    assert members_module.main(["build", "--network", "pilot", "-o", str(output), str(sources[0])]) == 1
    assert "use --force" in capsys.readouterr().err
    assert members_module.main(["show", str(output)]) == 0
    shown = capsys.readouterr().out
    assert members.fingerprint in shown and all(node.short_id in shown for node in nodes.values())
    sources[0].write_text(json.dumps({**descriptions[0], "role": "nurse"}))
    assert members_module.main(["build", "--network", "pilot", "-o", str(tmp_path / "x.json"), str(sources[0])]) == 1
    assert "description 1" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
