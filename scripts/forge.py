#!/usr/bin/env python3
"""Forgeries for the signed demo: what an attacker would send, printed as JSON for curl.

    python scripts/forge.py outsider-block URL          a block with a valid proof of work on top of the chain at
                                                        URL, mined and signed by a fresh key that is no member's
    python scripts/forge.py record IDENTITY_FILE        a record signed with a member's stolen identity file
                                                        (a healthcare authority's, say: its role may not record)

The nodes must refuse both; scripts/signed_walkthrough.sh shows that they do.
"""
from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from urllib.request import Request, urlopen

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from blockchain import hash_block, proof_of_work  # noqa: E402
from identity import Identity  # noqa: E402
from ledger import block_signing_hash  # noqa: E402

PAPER_HASH = "QmbWxSqxhZms74885xceSaiHVvdjqiVWrATtYUrrUnVE1K"
DIFFICULTY = 4


def signed(identity: Identity, value: dict) -> dict:
    unsigned = {**value, "signer": identity.node_id}
    return {**unsigned, "signature": identity.sign(unsigned)}


def outsider_block(url: str) -> dict:
    with urlopen(Request(url.rstrip("/") + "/get_chain"), timeout=10) as answer:  # noqa: S310 (a node on loopback)
        last = json.load(answer)["chain"][-1]
    outsider = Identity.generate()
    block = {"index": last["index"] + 1, "timestamp": last["timestamp"], "nonce": proof_of_work(last["nonce"], DIFFICULTY),
             "previous_hash": hash_block(last), "miner": outsider.node_id,
             "transactions": [signed(outsider, {"user_id": "mallory", "ipfs_hash": PAPER_HASH, "EHR_name": "forged",
                                                "id": uuid.uuid4().hex})]}
    return {**block, "signature": outsider.sign(block_signing_hash(block))}


def stolen_record(identity_file: str) -> dict:
    thief = Identity.load(identity_file)
    return signed(thief, {"user_id": "xxxxx", "ipfs_hash": PAPER_HASH, "EHR_name": "forged by a healthcare node",
                          "id": uuid.uuid4().hex})


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("outsider-block", "record"):
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(outsider_block(argv[1]) if argv[0] == "outsider-block" else stolen_record(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
