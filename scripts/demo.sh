#!/usr/bin/env bash
# make demo: start Kubo and the three role nodes on the paper's ports, run the Fig. 3 workflow
# with curl (scripts/walkthrough.sh), then stop everything it started. Exit 0 only if every step held.
# PER_NODE_KUBO=1 gives every node its own Kubo daemon, joined as a private IPFS network.
# SECURITY=signed runs it on a signed network of the three role nodes (their identities and members file made
# first) with a grant instead of a shared password, then shows two forgeries every node refuses
# (scripts/signed_walkthrough.sh).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PY:-$ROOT/.venv/bin/python}
DATA=$ROOT/.state/demo

args=(up --clean --data-root "$DATA")
[ "${PER_NODE_KUBO:-0}" = 1 ] && args+=(--per-node-kubo)
SECURITY=${SECURITY:-paper}
args+=(--security "$SECURITY")
trap '"$PY" scripts/cluster.py down' EXIT
"$PY" scripts/cluster.py "${args[@]}"
if [ "$SECURITY" = signed ]; then
  PY="$PY" PATIENT_DATA=$DATA/node-5002 PROVIDER_DATA=$DATA/node-5004 AUTHORITY_DATA=$DATA/node-5003 \
    scripts/signed_walkthrough.sh
else
  PATIENT_DATA=$DATA/node-5002 PROVIDER_DATA=$DATA/node-5004 scripts/walkthrough.sh
fi
echo
"$PY" scripts/cluster.py peers   # IPFS never left the loopback range
