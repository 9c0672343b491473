"""The part of bench/soak.py that runs inside a lab host, beside that host's node: standard library only.

    python soak_agent.py drive SPEC.json      record at a steady rate, mine now and then, watch the chain's head
    python soak_agent.py collect SPEC.json  each record's pin status on this host's node, and its chain

It talks to its own host's node only (at the host's lab address, which answers even while the host is cut off),
as a hospital's own application would, and writes JSON lines to SPEC["out"]:
  {"kind": "ack", "t", "id", "cid", "status"}   a transaction the node acknowledged (201 or 200)
  {"kind": "nack", "t", "id", "error"}          one it did not (no answer, or an error status)
  {"kind": "mine", "t", "index"}                a block this host mined
  {"kind": "head", "t", "length", "hash"}       the node's last block, every SPEC["poll"] seconds
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import sys
import time
import uuid
from typing import Any


class Node:
    def __init__(self, host: str, port: int, key: str, timeout: float = 10.0) -> None:
        self.host, self.port, self.key, self.timeout = host, port, key, timeout
        self.conn: http.client.HTTPConnection | None = None

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"X-API-Key": self.key}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, data, headers)
                response = self.conn.getresponse()
                raw = response.read()
                if response.will_close:
                    self.close()
                return response.status, json.loads(raw) if raw else None
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def block_hash(block: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(block, sort_keys=True).encode()).hexdigest()


def drive(spec: dict[str, Any]) -> None:
    node = Node(spec["address"], spec["port"], spec["key"])
    out = open(spec["out"], "a", buffering=1)
    rng = random.Random(spec["seed"])
    records = os.path.join(spec["data_dir"], "soak")
    os.makedirs(records, exist_ok=True)

    def write(kind: str, **fields: Any) -> None:
        out.write(json.dumps({"kind": kind, "t": time.time(), **fields}) + "\n")

    start = time.time()
    end = start + spec["seconds"]
    rate, mine_every, poll = spec["rate"], spec["mine_every"], spec["poll"]
    next_tx = start + (rng.expovariate(rate) if rate else float("inf"))
    next_mine = start + rng.uniform(0, mine_every)
    next_poll = start
    pending, number = 0, 0
    while time.time() < end and not os.path.exists(spec["stop"]):
        now = time.time()
        try:
            if now >= next_poll:
                next_poll = now + poll
                status, health = node.call("GET", "/health")
                if status == 200:
                    pending = health["pending"]
                    status, page = node.call("GET", f"/blocks?from={health['length']}")
                    if status == 200 and page["blocks"]:
                        write("head", length=page["length"], hash=block_hash(page["blocks"][-1]))
            if now >= next_tx:
                next_tx += rng.expovariate(rate)  # a steady rate on average (Poisson arrivals)
                number += 1
                name = f"soak/rec-{spec['host']}-{number}.bin"
                with open(os.path.join(spec["data_dir"], name), "wb") as file:
                    file.write(os.urandom(rng.randint(spec["min_bytes"], spec["max_bytes"])))
                tx_id = uuid.uuid4().hex
                try:
                    status, added = node.call("POST", "/create_hash", {"file_path": name})
                    if status != 200:
                        write("nack", id=tx_id, error=f"create_hash {status}: {added}")
                    else:
                        cid = added["IPFS Hash"]["Hash"]
                        status, answer = node.call("POST", "/add_transaction", {
                            "user_id": f"patient-{spec['host']}-{number % 50}", "ipfs_hash": cid, "id": tx_id,
                            "EHR_name": f"record-{spec['host']}-{number}", "file_name": os.path.basename(name)})
                        if status in (200, 201):
                            write("ack", id=tx_id, cid=cid, status=status)
                            pending += 1
                        else:
                            write("nack", id=tx_id, error=f"add_transaction {status}: {answer}")
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    write("nack", id=tx_id, error=f"{type(exc).__name__}: {exc}")
            if now >= next_mine:
                next_mine = now + mine_every * rng.uniform(0.8, 1.2)
                if pending:
                    status, block = node.call("GET", "/mine_block")
                    if status == 200:
                        write("mine", index=block["index"], transactions=len(block["transactions"]))
        except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as exc:
            write("error", error=f"{type(exc).__name__}: {exc}")
            time.sleep(0.2)
        time.sleep(max(0.0, min(next_poll, next_tx, next_mine) - time.time()))
    out.close()


def collect(spec: dict[str, Any]) -> None:
    node = Node(spec["address"], spec["port"], spec["key"], timeout=30)
    result: dict[str, Any] = {"pins": {}}
    for cid in spec["cids"]:
        status, answer = node.call("GET", f"/records/{cid}?peers=false")
        result["pins"][cid] = answer.get("pin") if status == 200 and answer else None
    status, result["health"] = node.call("GET", "/health")
    status, chain = node.call("GET", "/get_chain")
    result["chain"] = chain["chain"]
    result["chain_bytes"] = len(json.dumps(chain, sort_keys=True, separators=(",", ":")))
    with open(spec["out"], "w") as out:
        json.dump(result, out)


if __name__ == "__main__":
    mode, spec_file = sys.argv[1], sys.argv[2]  # the spec is a JSON file
    with open(spec_file) as spec_in:
        {"drive": drive, "collect": collect}[mode](json.load(spec_in))
