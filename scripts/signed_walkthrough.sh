#!/usr/bin/env bash
# The signed network (--security signed) with curl, against running nodes (SECURITY=signed make demo calls it
# after the paper's workflow): who each node is, who the members are, and two forgeries every node refuses.
#
#   PATIENT=... AUTHORITY=... PROVIDER=... AUTHORITY_DATA=data/node-5003 scripts/signed_walkthrough.sh
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PY:-python3}
AUTHORITY_DATA=${AUTHORITY_DATA:-data/node-5003}
# shellcheck source=scripts/walkthrough_lib.sh
. "$HERE/walkthrough_lib.sh"

heading "Each node is a member with a key: its id is the fingerprint of its signing key (read its first characters aloud)"
for node in "$PATIENT" "$AUTHORITY" "$PROVIDER"; do
  call GET "$node/identity"
  printf '  => %s is %s (%s)\n' "$node" "$(field '["short_id"]')" "$(field '["role"]')"
done

heading "The members, as every node's chain says (founded by the shared members file)"
call GET "$AUTHORITY/members"

heading "Every block and transaction on the chain names its signer and carries a signature"
call GET "$PROVIDER/get_chain"
printf '  => the last block was mined by %s\n' "$(field '["chain"][-1].get("miner", "(none)")[:9]')"

heading "An outsider mines a block with a valid proof of work but no member's key: every node refuses it"
FORGED=$("$PY" "$HERE/forge.py" outsider-block "$PATIENT")
for node in "$PATIENT" "$AUTHORITY" "$PROVIDER"; do
  call POST "$node/receive_block" "$FORGED" 400
done

heading "A healthcare node's key signs a record (its role may not make one): every node refuses it"
FORGED=$("$PY" "$HERE/forge.py" record "$AUTHORITY_DATA/.emr/identity.json")
for node in "$PATIENT" "$AUTHORITY" "$PROVIDER"; do
  call POST "$node/receive_transaction" "$FORGED" 400
done
call GET "$PROVIDER/is_valid"
[ "$(field '["valid"]')" = "True" ] || fail "the provider's chain is not valid"
printf '\n%sThe signed network held: members signed every write, and forgeries were refused by every node.%s\n' \
  "$GREEN" "$PLAIN"
