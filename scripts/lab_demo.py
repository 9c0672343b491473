#!/usr/bin/env python3
"""`make lab`: the paper's workflow across separate hosts, built as Linux network namespaces (scripts/lab.py).

    sudo .venv/bin/python scripts/lab_demo.py [--hosts 3] [--keep]

1. Builds N hosts (198.18.0.1..N) joined by a bridge and reaching nothing else; on each, a Kubo daemon of one
   private IPFS network and a node listening on the host's address with the network's API key, as a real
   deployment on separate machines would (README, "Deploying on separate machines").
2. Runs scripts/walkthrough.sh inside host 1 against the patient on host 1, the authority on host 2 and the
   provider on host N: encrypt, add to IPFS, record, mine; find, fetch, decrypt; compare bytes.
3. Shows that every host pinned the record in its own Kubo; deletes every unpinned block of the provider's Kubo
   (`ipfs repo gc`: its get_file had cached the record), kills the patient's host (node and Kubo), cuts the
   provider off from everyone and has it open the record again: only its pinned copy can serve it.
4. Tears everything down. Exit 0 only if every step held; 2 if this machine cannot build a lab (not root).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.cluster import write_sample_record  # noqa: E402
from scripts.lab import LAB_NETWORK, Lab, LabError, available  # noqa: E402
from scripts.lab_cluster import LabCluster  # noqa: E402

WALKTHROUGH = ROOT / "scripts" / "walkthrough.sh"


def say(text: str = "") -> None:
    print(text, flush=True)


def heading(text: str) -> None:
    say()
    say(f"=== {text}")


def demo(hosts: int, keep: bool) -> None:
    roles = {1: "patient", **{host: "healthcare_authority" for host in range(2, hosts)}, hosts: "healthcare_provider"}
    patient, authority, provider = 1, 2, hosts
    with Lab(hosts=hosts, keep_files=keep) as lab:
        heading(f"A lab of {hosts} hosts ({lab.prefix}): network namespaces on one bridge, no route beyond "
                f"{lab.address(1)}/24")
        cluster = LabCluster(lab, roles, say=say).start()
        for host in lab.hosts:
            kubo = cluster.kubos[host]
            say(f"  host {host}: {lab.address(host):<12} node {cluster.url(host)} ({roles[host]}), "
                f"Kubo {kubo.identity[:16]}... swarm /ip4/{lab.address(host)}/tcp/4001, routes: "
                f"{lab.routes(host).strip()}")
        say(f"  every node: --host 198.18.0.N --api-key (secret) --peer-allow {LAB_NETWORK}; every Kubo: one "
            f"swarm key, no bootstrap, routing none, Peering to the other hosts")

        heading(f"The paper's workflow across hosts: scripts/walkthrough.sh, run inside host {patient}")
        write_sample_record(cluster.data_dir(patient) / "MRI.pdf")
        env = {**os.environ, "PATIENT": cluster.url(patient), "AUTHORITY": cluster.url(authority),
               "PROVIDER": cluster.url(provider), "PATIENT_DATA": str(cluster.data_dir(patient)),
               "PROVIDER_DATA": str(cluster.data_dir(provider)), "API_KEY": cluster.api_key, "SYNC_SECONDS": "30"}
        result = lab.run(patient, ["bash", str(WALKTHROUGH)], env=env, capture_output=False, timeout=300)
        if result.returncode != 0:
            raise LabError(f"the walkthrough failed across hosts (exit {result.returncode})")

        heading("Every host keeps its own copy: the record is pinned in each host's Kubo")
        info = cluster.post(provider, "/get_file_hash", {"name": "MRI.pdf.aes"}).json()["File info"]
        cid = info["Hash"]
        started = time.monotonic()
        statuses = cluster.wait_pinned(cid, timeout=60)
        for host, status in statuses.items():
            say(f"  host {host}: {status['pin']['state']} (block {status['pin']['block_index']}, "
                f"{status['pin']['lag_ms']} ms after the block reached it), IPFS peer {status['ipfs_peer_id']}")
        where = cluster.record_status(provider, cid, peers=True)["providers"]
        say(f"  GET /records/{cid} on host {provider}: {where['pinned_copies']} pinned copies "
            f"(content routing: {where['routing']})")
        say(f"  all pinned {time.monotonic() - started:.1f} s after looking; /health on host {provider}: "
            f"{cluster.get(provider, '/health').json()['records']}")

        heading(f"The patient's host {patient} goes down (node and Kubo killed); host {provider}, cut off from "
                f"everyone, opens the record from the copy its node pinned")
        encrypted = (cluster.data_dir(patient) / "MRI.pdf.aes").read_bytes()
        kubo = cluster.kubos[provider]
        # The walkthrough's get_file left the record's blocks in the provider's Kubo whether pinned or not:
        # garbage collection deletes every block no pin holds, so what is left is the pinned copy.
        kubo.collect_garbage()
        if not kubo.is_pinned(cid) or kubo.local_bytes(cid) != encrypted:
            raise LabError(f"host {provider}'s Kubo does not hold the record pinned")
        say(f"  host {provider}: ipfs repo gc (deletes every block no pin holds): the record is still there, "
            f"pinned")
        cluster.kill_host(patient)
        gone = lab.connect(provider, lab.address(patient), 4001, timeout=2)
        say(f"  host {provider} -> {lab.address(patient)}:4001 (the patient's IPFS swarm): "
            f"{gone.error or 'connected?!'}")
        if gone.status is not None:
            raise LabError("the patient's Kubo still answers")
        original = (cluster.data_dir(patient) / "MRI.pdf").read_bytes()
        lab.partition(provider)  # so no other host's copy can serve it either
        try:
            fetched = cluster.post(provider, "/get_file", {"ipfs_hash": cid}).json()
        finally:
            lab.heal(provider)
        copy = cluster.data_dir(provider) / fetched["path"]
        if copy.read_bytes() != encrypted:
            raise LabError("the provider's copy differs from what the patient added")
        say(f"  host {provider} (partitioned): get_file -> {fetched['path']} ({fetched['size']} bytes), identical "
            f"to the patient's encrypted record")
        say(f"  the decrypted copy from the walkthrough ({len(original)} bytes) equals the patient's original: "
            f"{(cluster.data_dir(provider) / 'downloads' / 'MRI.pdf').read_bytes() == original}")
        heading("Tearing the lab down")
    say(f"lab: done; every namespace of {lab.prefix} is gone. The workflow held across {hosts} hosts.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=3, help="hosts in the lab, 3 or more (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the lab's files (logs, repos) afterwards")
    args = parser.parse_args(argv)
    if args.hosts < 3:
        parser.error("the workflow needs at least 3 hosts: patient, authority, provider")
    ok, reason = available()
    if not ok:
        print(f"lab: cannot build a lab on this machine: {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the lab is torn down
    try:
        demo(args.hosts, args.keep)
    except (LabError, subprocess.SubprocessError) as exc:
        print(f"lab: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
