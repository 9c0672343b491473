#!/usr/bin/env bash
# The paper's Fig. 3 on a signed network (--security signed), with a grant instead of a shared password, with curl
# against running nodes (SECURITY=signed make demo calls it): who each node is; the patient records with a key of
# the record's own, grants Healthcare B, B opens it, the patient revokes, B is refused, the patient reads who
# accessed the record; then two forgeries every node refuses.
#
#   PATIENT=... AUTHORITY=... PROVIDER=... PATIENT_DATA=data/node-5002 PROVIDER_DATA=data/node-5004 \
#   AUTHORITY_DATA=data/node-5003 scripts/signed_walkthrough.sh
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PY:-python3}
AUTHORITY_DATA=${AUTHORITY_DATA:-data/node-5003}
PATIENT_DATA=${PATIENT_DATA:-data/node-5002}
PROVIDER_DATA=${PROVIDER_DATA:-data/node-5004}
RECORD=${RECORD:-MRI.pdf}
# shellcheck source=scripts/walkthrough_lib.sh
. "$HERE/walkthrough_lib.sh"

heading "Each node is a member with a key: its id is the fingerprint of its signing key (read its first characters aloud)"
for node in "$PATIENT" "$AUTHORITY" "$PROVIDER"; do
  call GET "$node/identity"
  printf '  => %s is %s (%s)\n' "$node" "$(field '["short_id"]')" "$(field '["role"]')"
done

PROVIDER_ID=$(curl -sS "${AUTH[@]}" "$PROVIDER/identity" | python3 -c 'import json, sys; print(json.load(sys.stdin)["node_id"])')

heading "The members, as every node's chain says (founded by the shared members file)"
call GET "$AUTHORITY/members"

heading "Connecting peers: only members may be peers"
call POST "$PATIENT/connect_node" "{\"nodes\": [\"$AUTHORITY\", \"$PROVIDER\"]}" 201

heading "Steps 1-5: the patient encrypts $RECORD with a key of its own, adds it to IPFS and records it, in one call"
call POST "$PATIENT/publish_record" "{\"file_path\": \"$RECORD\", \"EHR_name\": \"MRI\", \"user_id\": \"xxxxx\"}" 201
CID=$(field '["IPFS Hash"]["Hash"]')
printf '  => no password: the key is on the chain only wrapped for the patient'"'"'s own node\n'
call GET "$PATIENT/mine_block"
printf '  => block %s, mined and signed by %s\n' "$(field '["index"]')" "$(field '["miner"][:9]')"

heading "Healthcare B has no grant yet: refused, and the refusal is on record"
call GET "$PROVIDER/replace_chain"
call POST "$PROVIDER/open_record" "{\"record\": \"$CID\", \"purpose\": \"follow-up\"}" 403

heading "The patient grants Healthcare B the record: its key wrapped for B's public key, bound to this record and B"
call POST "$PATIENT/grant" "{\"record\": \"$CID\", \"member\": \"$PROVIDER_ID\", \"purpose\": \"follow-up\"}" 201
GRANT=$(field '["id"]')
call GET "$PATIENT/mine_block"

heading "Steps 6-8: Healthcare B finds the record, fetches it from IPFS and decrypts it with the grant: no password"
call GET "$PROVIDER/replace_chain"
call POST "$PROVIDER/open_record" "{\"record\": \"MRI\", \"purpose\": \"follow-up\"}"
OPENED=$(field '["path"]')
cmp "$PATIENT_DATA/$RECORD" "$PROVIDER_DATA/$OPENED" || fail "the opened record differs from the original"
printf '  => %s == %s, byte for byte\n' "$PATIENT_DATA/$RECORD" "$PROVIDER_DATA/$OPENED"

heading "The patient revokes the grant; from that block on Healthcare B is refused"
call POST "$PATIENT/revoke" "{\"grant\": \"$GRANT\"}" 201
call GET "$PATIENT/mine_block"
call GET "$PROVIDER/replace_chain"
call POST "$PROVIDER/open_record" "{\"record\": \"$CID\", \"purpose\": \"follow-up\"}" 403
printf '  => (what B decrypted before stays with B: a revocation cannot take a copy back)\n'

heading "The patient reads who accessed the record: every open and refusal, signed by who did it, newest first"
call GET "$PROVIDER/mine_block"
call GET "$PATIENT/replace_chain"
call GET "$PATIENT/audit?record=$CID"
[ "$(field '["count"]')" = 3 ] || fail "the audit trail does not hold the three accesses"

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
printf '\n%sThe signed network held: a grant opened the record with no password, its revocation closed it, every\n' "$GREEN"
printf 'access is on the chain, and forgeries were refused by every node.%s\n' "$PLAIN"
