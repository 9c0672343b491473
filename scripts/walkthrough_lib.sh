# Shared by the curl walkthroughs (scripts/walkthrough.sh, scripts/signed_walkthrough.sh): the nodes, and
# printing each request and response. Source it; it defines PATIENT, AUTHORITY, PROVIDER, heading, fail, call, field.
PATIENT=${PATIENT:-http://127.0.0.1:5002}
AUTHORITY=${AUTHORITY:-http://127.0.0.1:5003}
PROVIDER=${PROVIDER:-http://127.0.0.1:5004}
# Nodes started with --api-key (EMR_API_KEY) need it on every request: API_KEY=... (sent as X-API-Key, never printed)
AUTH=()
[ -n "${API_KEY:-}" ] && AUTH=(-H "X-API-Key: $API_KEY")

step=0
if [ -t 1 ]; then BOLD=$'\033[1m' RED=$'\033[31m' GREEN=$'\033[32m' PLAIN=$'\033[0m'; else BOLD= RED= GREEN= PLAIN=; fi
heading() { step=$((step + 1)); printf '\n%s== %d. %s%s\n' "$BOLD" "$step" "$*" "$PLAIN"; }
fail() { printf '%sFAILED: %s%s\n' "$RED" "$*" "$PLAIN" >&2; exit 1; }

# call METHOD URL [JSON] [EXPECTED_STATUS]: print the request and the response; keep the body in $BODY
call() {
  local method=$1 url=$2 data=${3:-} expected=${4:-200} out status
  printf '> %s %s\n' "$method" "$url"
  [ -n "$data" ] && printf '%s\n' "$data" | sed 's/"password": *"[^"]*"/"password": "(shared secret)"/; s/^/  /' | cut -c1-400
  out=$(mktemp)
  if [ -n "$data" ]; then
    status=$(curl -sS "${AUTH[@]}" -o "$out" -w '%{http_code}' -X "$method" -H 'Content-Type: application/json' --data "$data" "$url")
  else
    status=$(curl -sS "${AUTH[@]}" -o "$out" -w '%{http_code}' -X "$method" "$url")
  fi
  BODY=$(cat "$out"); rm -f "$out"
  printf '< %s\n' "$status"
  printf '%s' "$BODY" | python3 -m json.tool --no-ensure-ascii 2>/dev/null | head -60 | sed 's/^/  /' || printf '  %s\n' "$BODY"
  [ "$status" = "$expected" ] || fail "$method $url answered $status, expected $expected"
}

# field EXPR: a value from the last response body, e.g. field '["IPFS Hash"]["Hash"]'
field() { printf '%s' "$BODY" | python3 -c "import json, sys; print(json.load(sys.stdin)$1)"; }
