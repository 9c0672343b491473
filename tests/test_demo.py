"""The demo's curl walkthrough (scripts/walkthrough.sh), on node processes and Kubo daemons of the test's own.

`make demo` runs the same script against the paper's fixed ports; here every port is free and loopback.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import wait_until
from scripts.cluster import (ROOT, Kubo, NodeProcess, free_port, private_network, write_sample_record,
                             write_swarm_key)

WALKTHROUGH = ROOT / "scripts" / "walkthrough.sh"
ROLES = ("patient", "healthcare_authority", "healthcare_provider")


def run_walkthrough(nodes: list[NodeProcess], data_dirs: list[Path]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATIENT": nodes[0].url, "AUTHORITY": nodes[1].url, "PROVIDER": nodes[2].url,
           "PATIENT_DATA": str(data_dirs[0]), "PROVIDER_DATA": str(data_dirs[2])}
    return subprocess.run(["bash", str(WALKTHROUGH)], env=env, capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)


def start_roles(spawn_node, tmp_path: Path, apis: list[str]) -> tuple[list[NodeProcess], list[Path]]:
    data_dirs = [tmp_path / role for role in ROLES]
    nodes = [spawn_node(role, data_dir=data_dir, ipfs_api=api) for role, data_dir, api in zip(ROLES, data_dirs, apis)]
    write_sample_record(data_dirs[0] / "MRI.pdf")
    return nodes, data_dirs


def test_walkthrough_runs_the_papers_workflow_with_one_shared_kubo(spawn_node, kubo: Kubo, tmp_path: Path) -> None:
    nodes, data_dirs = start_roles(spawn_node, tmp_path, [kubo.api_url] * 3)
    result = run_walkthrough(nodes, data_dirs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    for step in ("connect_node", "encrypt_file", "create_hash", "add_transaction", "mine_block", "get_chain",
                 "get_file_hash", "get_file", "decrypt_file"):
        assert f"/{step}" in result.stdout
    assert '"password": "(shared secret)"' in result.stdout  # the secret itself is never printed
    assert (data_dirs[2] / "downloads" / "MRI.pdf").read_bytes() == (data_dirs[0] / "MRI.pdf").read_bytes()
    assert kubo.swarm_peer_addresses() == []


def test_walkthrough_fetches_through_a_private_loopback_ipfs_network(spawn_node, tmp_path: Path) -> None:
    key = write_swarm_key(tmp_path / "swarm.key")
    ports = [(free_port(), free_port(), free_port()) for _ in ROLES]
    daemons = private_network([tmp_path / f"kubo-{role}" for role in ROLES], ports, key)
    try:
        wait_until(lambda: all(len(daemon.swarm_peer_addresses()) == 2 for daemon in daemons), timeout=30)
        nodes, data_dirs = start_roles(spawn_node, tmp_path, [daemon.api_url for daemon in daemons])
        result = run_walkthrough(nodes, data_dirs)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr
        assert (data_dirs[2] / "downloads" / "MRI.pdf").read_bytes() == (data_dirs[0] / "MRI.pdf").read_bytes()
        for daemon in daemons:
            addresses = daemon.swarm_peer_addresses()
            assert addresses and all(address.startswith("/ip4/127.0.0.1/") for address in addresses)
    finally:
        for daemon in daemons:
            daemon.stop()


SIGNED_WALKTHROUGH = ROOT / "scripts" / "signed_walkthrough.sh"


def test_signed_walkthrough_grants_opens_revokes_audits_and_refuses_both_forgeries(signed_network, kubo: Kubo) -> None:
    nodes = signed_network(ROLES, ipfs_api=kubo.api_url)
    data_dirs = [Path(node.args[node.args.index("--data-dir") + 1]) for node in nodes]
    write_sample_record(data_dirs[0] / "MRI.pdf")
    env = {**os.environ, "PATIENT": nodes[0].url, "AUTHORITY": nodes[1].url, "PROVIDER": nodes[2].url,
           "PATIENT_DATA": str(data_dirs[0]), "PROVIDER_DATA": str(data_dirs[2]),
           "AUTHORITY_DATA": str(data_dirs[1]), "PY": sys.executable}
    result = subprocess.run(["bash", str(SIGNED_WALKTHROUGH)], env=env, capture_output=True, text=True, timeout=180,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    for node in nodes:
        assert f"is {node.get('/identity').json()['short_id']}" in result.stdout
    assert (data_dirs[2] / "downloads" / "MRI.pdf").read_bytes() == (data_dirs[0] / "MRI.pdf").read_bytes()
    assert "password" not in result.stdout.replace("no password", "")
    assert result.stdout.count("not a member of this network") == 3
    assert result.stdout.count("whose role may not make it") == 3
