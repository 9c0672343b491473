#!/usr/bin/env bash
# The paper's Fig. 3 workflow with curl, against running nodes (make up, or make demo which calls this).
# Every request and response is printed; the script stops at the first step that does not hold.
#
#   PATIENT=http://127.0.0.1:5002 AUTHORITY=http://127.0.0.1:5003 PROVIDER=http://127.0.0.1:5004 \
#   PATIENT_DATA=data/node-5002 PROVIDER_DATA=data/node-5004 scripts/walkthrough.sh
#
# The patient's data folder must hold MRI.pdf (make up and make demo put a sample there).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/walkthrough_lib.sh
. "$HERE/walkthrough_lib.sh"
PATIENT_DATA=${PATIENT_DATA:-data/node-5002}
PROVIDER_DATA=${PROVIDER_DATA:-data/node-5004}
RECORD=${RECORD:-MRI.pdf}
PASSWORD=${EMR_PASSWORD:-$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')}
SYNC_SECONDS=${SYNC_SECONDS:-15}
[ -f "$PATIENT_DATA/$RECORD" ] || fail "no $RECORD in the patient's data folder $PATIENT_DATA"

heading "Connecting peers (Fig. 4a): one connect_node on the patient's node links all three"
call POST "$PATIENT/connect_node" "{\"nodes\": [\"$AUTHORITY\", \"$PROVIDER\"]}" 201

heading "Steps 1-3: the patient received $RECORD from Healthcare A and encrypts it with AES-256"
call POST "$PATIENT/encrypt_file" "{\"file_path\": \"$RECORD\", \"password\": \"$PASSWORD\", \"overwrite\": true}"
ENCRYPTED=$(field '["file_path"]')

heading "Step 4: uploading the encrypted record to IPFS gives its hash (Fig. 4b)"
call POST "$PATIENT/create_hash" "{\"file_path\": \"$ENCRYPTED\"}"
HASH=$(field '["IPFS Hash"]["Hash"]'); NAME=$(field '["IPFS Hash"]["Name"]'); SIZE=$(field '["IPFS Hash"]["Size"]')

heading "Step 5: recording the hash on the blockchain (Fig. 4c), and mining it into a block"
call POST "$PATIENT/add_transaction" \
  "{\"user_id\": \"xxxxx\", \"ipfs_hash\": \"$HASH\", \"EHR_name\": \"MRI\", \"file_name\": \"$NAME\", \"file_size\": \"$SIZE\"}" 201
call GET "$PATIENT/mine_block"
BLOCK=$(field '["index"]')

heading "Step 6: Healthcare B (the provider's node) finds the record on its copy of the chain (Fig. 4d, 4e)"
for _ in $(seq $((SYNC_SECONDS * 10))); do
  length=$(curl -sS "${AUTH[@]}" "$PROVIDER/get_chain" | python3 -c 'import json, sys; print(json.load(sys.stdin)["length"])')
  [ "$length" -ge "$BLOCK" ] && break
  sleep 0.1
done
call GET "$PROVIDER/get_chain"
[ "$(field '["length"]')" -ge "$BLOCK" ] || fail "block $BLOCK did not reach the provider's node within ${SYNC_SECONDS}s"
call POST "$PROVIDER/get_file_hash" "{\"name\": \"$NAME\"}"
[ "$(field '["File info"]["Hash"]')" = "$HASH" ] || fail "get_file_hash found another hash"
call GET "$AUTHORITY/is_valid"
[ "$(field '["valid"]')" = "True" ] || fail "the authority's chain is not valid"

heading "Step 7: Healthcare B fetches the record from IPFS (Fig. 4f)"
call POST "$PROVIDER/get_file" "{\"ipfs_hash\": \"$HASH\"}"
FETCHED=$(field '["path"]')

heading "Step 8: the patient shares the password; Healthcare B decrypts the record"
call POST "$PROVIDER/decrypt_file" "{\"file_path\": \"$FETCHED\", \"password\": \"$PASSWORD\", \"overwrite\": true}"
DECRYPTED=$(field '["file_path"]')

heading "Check: Healthcare B's copy is the patient's record, byte for byte"
cmp "$PATIENT_DATA/$RECORD" "$PROVIDER_DATA/$DECRYPTED" || fail "the decrypted record differs from the original"
printf '%s (%s bytes) == %s\n' "$PATIENT_DATA/$RECORD" "$(wc -c <"$PATIENT_DATA/$RECORD")" "$PROVIDER_DATA/$DECRYPTED"
printf '\n%sThe whole workflow held: encrypted, uploaded, recorded, mined, found, fetched and decrypted.%s\n' "$GREEN" "$PLAIN"
