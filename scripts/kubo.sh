#!/usr/bin/env bash
# Install, configure, start and stop the Kubo (IPFS) daemons emr-chain uses.
#
#   scripts/kubo.sh install            put an ipfs binary where the project finds it
#   scripts/kubo.sh start [NAME]       init (once) and start the daemon NAME (default "main")
#   scripts/kubo.sh stop [NAME|--all]  stop it (or every daemon the project started)
#   scripts/kubo.sh status [NAME]      say whether it runs, with its API address and peers
#   scripts/kubo.sh bin                print the path of the ipfs binary
#
# Every repo this script creates is loopback-only (../shared/kubo-loopback.md): test profile,
# AutoConf off, no bootstrap peers, no mDNS, no NAT port mapping, no relays, routing none,
# telemetry off, and API, gateway and swarm on 127.0.0.1. Inside a lab host (scripts/lab.py, a
# network namespace with no route out) the swarm, and if asked API and gateway, may bind that
# host's lab address instead (../shared/lab-network.md); any address outside 127.0.0.0/8 and
# 198.18.0.0/15 is refused.
#
# Settings (environment):
#   IPFS_API_PORT (5001), IPFS_GATEWAY_PORT (8080), IPFS_SWARM_PORT (4001)
#   KUBO_REPO     repo folder (default .state/kubo/NAME)
#   KUBO_SWARM_KEY  path of a swarm.key: makes the repo part of that private network
#   KUBO_PEERS    space-separated "PEERID@PORT" (on 127.0.0.1) or "PEERID@ADDR:PORT" of peers to keep connected
#   KUBO_BIND     address the swarm listens on (127.0.0.1; a lab host's 198.18.x.y)
#   KUBO_API_BIND address API and gateway listen on (127.0.0.1)
#   KUBO_VERSION (v0.43.1), KUBO_TOOLS (.tools), KUBO_START_TIMEOUT (60 seconds)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KUBO_VERSION=${KUBO_VERSION:-v0.43.1}
# The oldest Kubo that knows every setting configure_loopback writes: AutoConf, Ipns.DelegatedPublishers and the
# telemetry plugin came in v0.37.0, and an older one refuses `ipfs config AutoConf.Enabled` as an unknown key.
MIN_KUBO_VERSION=0.37.0
KUBO_LIBP2P_VERSION=${KUBO_LIBP2P_VERSION:-v0.50.0}
TOOLS=${KUBO_TOOLS:-$ROOT/.tools}
STATE=${KUBO_STATE:-$ROOT/.state/kubo}
API_PORT=${IPFS_API_PORT:-5001}
GATEWAY_PORT=${IPFS_GATEWAY_PORT:-8080}
SWARM_PORT=${IPFS_SWARM_PORT:-4001}
START_TIMEOUT=${KUBO_START_TIMEOUT:-60}
SWARM_BIND=${KUBO_BIND:-127.0.0.1}
API_BIND=${KUBO_API_BIND:-127.0.0.1}
export IPFS_TELEMETRY=off

say() { echo "kubo: $*" >&2; }
die() { say "error: $*"; exit 1; }

# The only addresses a repo may listen on or peer with: loopback, or the lab's benchmarking
# block 198.18.0.0/15 (RFC 2544), which exists here only inside lab namespaces.
allowed_address() {
  local octet='(0|[1-9][0-9]?|1[0-9]{2}|2[0-4][0-9]|25[0-5])'
  [[ $1 =~ ^$octet\.$octet\.$octet\.$octet$ ]] || return 1
  [ "${BASH_REMATCH[1]}" = 127 ] || { [ "${BASH_REMATCH[1]}" = 198 ] && [[ ${BASH_REMATCH[2]} =~ ^1[89]$ ]]; }
}
allowed_address "$SWARM_BIND" || die "KUBO_BIND=$SWARM_BIND is neither loopback (127.0.0.0/8) nor a lab address (198.18.0.0/15)"
allowed_address "$API_BIND" || die "KUBO_API_BIND=$API_BIND is neither loopback (127.0.0.0/8) nor a lab address (198.18.0.0/15)"

# Whether Kubo version $1 ("0.43.1", "0.44.0-rc1") is at least $2.
version_at_least() {
  local have want i
  IFS=. read -r -a have <<<"${1%%-*}"
  IFS=. read -r -a want <<<"$2"
  for i in 0 1 2; do
    [[ ${have[i]:-0} =~ ^[0-9]+$ ]] || return 1
    if ((10#${have[i]:-0} != 10#${want[i]:-0})); then ((10#${have[i]:-0} > 10#${want[i]:-0})); return; fi
  done
}

# An ipfs already on PATH first (the operator's own Kubo) if it is new enough for configure_loopback, else the
# one `install` put into the tools folder.
find_ipfs() {
  local on_path version
  if on_path=$(command -v ipfs 2>/dev/null); then
    version=$("$on_path" version -n 2>/dev/null || true)
    if version_at_least "$version" "$MIN_KUBO_VERSION"; then echo "$on_path"; return 0; fi
    say "not using $on_path (Kubo ${version:-of unknown version}): the loopback configuration this script writes needs Kubo v$MIN_KUBO_VERSION or newer (AutoConf, Ipns.DelegatedPublishers); $KUBO_VERSION is the tested one"
  fi
  if [ -x "$TOOLS/bin/ipfs" ]; then echo "$TOOLS/bin/ipfs"; return 0; fi
  return 1
}

build_from_go_proxy() {
  command -v go >/dev/null || return 1
  say "building Kubo $KUBO_VERSION from the Go module proxy (several minutes on 2 cores, once)"
  local build="$TOOLS/kubo-build"
  mkdir -p "$build"
  (
    cd "$build"
    export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
    [ -f go.mod ] || go mod init local/kubobuild >/dev/null
    # `go install pkg@version` refuses Kubo (its go.mod has exclude and replace directives),
    # so build it as a tool of a scratch module. Kubo v0.43.1 replaces go-libp2p by a fork
    # (github.com/lidel/go-libp2p) that the module proxy does not serve; that fork exists only
    # to need quic-go v0.62 and webtransport-go v0.13, which go-libp2p v0.50.0 needs too.
    # Without a newer go-libp2p, v0.49.0 is chosen and fails to compile (webtransport.Dialer).
    go get "github.com/libp2p/go-libp2p@$KUBO_LIBP2P_VERSION"
    go get -tool "github.com/ipfs/kubo/cmd/ipfs@$KUBO_VERSION"
    GOBIN="$TOOLS/bin" go install -trimpath -tags nofuse -ldflags='-s -w' github.com/ipfs/kubo/cmd/ipfs
  )
}

download_release() {
  command -v curl >/dev/null || return 1
  local arch os url tmp
  case "$(uname -m)" in x86_64|amd64) arch=amd64 ;; aarch64|arm64) arch=arm64 ;; *) return 1 ;; esac
  os=$(uname -s | tr '[:upper:]' '[:lower:]')
  url="https://dist.ipfs.tech/kubo/$KUBO_VERSION/kubo_${KUBO_VERSION}_${os}-${arch}.tar.gz"
  say "downloading the official release $url"
  tmp=$(mktemp -d)
  curl -fsSL --max-time 300 "$url" -o "$tmp/kubo.tar.gz" || { rm -rf "$tmp"; return 1; }
  tar -xzf "$tmp/kubo.tar.gz" -C "$tmp"
  mkdir -p "$TOOLS/bin" && mv "$tmp/kubo/ipfs" "$TOOLS/bin/ipfs"
  rm -rf "$tmp"
}

cmd_install() {
  local bin
  if bin=$(find_ipfs); then say "using $bin ($("$bin" version); the project tests $KUBO_VERSION)"; return 0; fi
  build_from_go_proxy || download_release || die "could not install Kubo: no usable ipfs on PATH, no Go toolchain that reaches the module proxy, no download of the release"
  bin=$(find_ipfs) || die "Kubo was built but $TOOLS/bin/ipfs is missing"
  say "installed $bin ($("$bin" version))"
}

ipfs_bin() { find_ipfs || die "Kubo is not installed: run 'scripts/kubo.sh install' (or 'make kubo')"; }

repo_for() { echo "${KUBO_REPO:-$STATE/$1}"; }

configure_loopback() {
  local ipfs=$1
  c() { "$ipfs" config --json "$1" "$2"; }
  c Addresses.API "\"/ip4/$API_BIND/tcp/$API_PORT\""
  c Addresses.Gateway "\"/ip4/$API_BIND/tcp/$GATEWAY_PORT\""
  c Addresses.Swarm "[\"/ip4/$SWARM_BIND/tcp/$SWARM_PORT\"]"
  c Addresses.Announce '[]'
  c Addresses.NoAnnounce '["/ip4/0.0.0.0/ipcidr/0", "/ip6/::/ipcidr/0"]'
  c Addresses.AppendAnnounce '[]'
  c AutoConf.Enabled false
  c Bootstrap '[]'
  c DNS.Resolvers '{}'
  c Routing.DelegatedRouters '[]'
  c Ipns.DelegatedPublishers '[]'
  c Routing.Type '"none"'
  c Discovery.MDNS.Enabled false
  c Swarm.DisableNatPortMap true
  c Swarm.RelayClient.Enabled false
  c Swarm.RelayService.Enabled false
  c Swarm.EnableHolePunching false
  c AutoNAT.ServiceMode '"disabled"'
  c AutoTLS.Enabled false
  c HTTPRetrieval.Enabled false
  c Version.SwarmCheckEnabled false
  c Swarm.Transports.Network.QUIC false
  c Swarm.Transports.Network.WebTransport false
  c Swarm.Transports.Network.WebRTCDirect false
  c Swarm.Transports.Network.Websocket false
  c Plugins.Plugins.telemetry.Disabled true
}

peer_address() {
  # "ID@PORT" -> 127.0.0.1:PORT, "ID@ADDR:PORT" -> ADDR:PORT
  local where=${1#*@}
  case $where in *:*) echo "$where" ;; *) echo "127.0.0.1:$where" ;; esac
}

check_peers() {
  local entry address
  for entry in ${KUBO_PEERS:-}; do
    address=$(peer_address "$entry")
    [[ ${address##*:} =~ ^[0-9]+$ ]] || die "KUBO_PEERS entry $entry has no port"
    allowed_address "${address%:*}" || die "KUBO_PEERS entry $entry is neither loopback (127.0.0.0/8) nor a lab address (198.18.0.0/15)"
  done
}

peering_json() {
  # "ID@PORT ID@ADDR:PORT" -> Peering.Peers JSON, an address without ADDR on 127.0.0.1
  local out="" entry id address
  for entry in ${KUBO_PEERS:-}; do
    id=${entry%@*}; address=$(peer_address "$entry")
    out="$out${out:+,}{\"ID\":\"$id\",\"Addrs\":[\"/ip4/${address%:*}/tcp/${address##*:}\"]}"
  done
  echo "[$out]"
}

cmd_init() {
  local name=${1:-main} ipfs repo
  ipfs=$(ipfs_bin); repo=$(repo_for "$name")
  check_peers
  export IPFS_PATH="$repo"
  if [ ! -f "$repo/config" ]; then
    mkdir -p "$repo"
    "$ipfs" init --profile=test,announce-off >/dev/null
  fi
  # Reapplied on every start: ports may change between runs, and a repo must never keep
  # a setting that reaches beyond the loopback range.
  configure_loopback "$ipfs"
  "$ipfs" config --json Peering.Peers "$(peering_json)"
  if [ -n "${KUBO_SWARM_KEY:-}" ]; then cp "$KUBO_SWARM_KEY" "$repo/swarm.key"; else rm -f "$repo/swarm.key"; fi
  echo "$repo"
}

api_answers() { curl -fsS -X POST --max-time 2 "http://$API_BIND:$1/api/v0/version" >/dev/null 2>&1; }

# Running, and not a zombie (a daemon orphaned by an earlier shell may wait a while to be reaped).
process_runs() { local state; state=$(ps -o stat= -p "$1" 2>/dev/null) && [ -n "$state" ] && [ "${state#Z}" = "$state" ]; }
pid_alive() { [ -f "$1/daemon.pid" ] && process_runs "$(cat "$1/daemon.pid")"; }

cmd_start() {
  local name=${1:-main} ipfs repo
  ipfs=$(ipfs_bin)
  repo=$(cmd_init "$name")
  export IPFS_PATH="$repo"
  if pid_alive "$repo"; then say "$name already runs (pid $(cat "$repo/daemon.pid"))"; echo "http://$API_BIND:$API_PORT"; return 0; fi
  if api_answers "$API_PORT"; then die "port $API_PORT already answers as an IPFS API, but not for repo $repo; stop that daemon or set IPFS_API_PORT"; fi
  if [ -n "${KUBO_SWARM_KEY:-}" ]; then export LIBP2P_FORCE_PNET=1; fi
  nohup "$ipfs" daemon --migrate=false >"$repo/daemon.log" 2>&1 </dev/null &
  echo $! >"$repo/daemon.pid"
  local waited=0
  until api_answers "$API_PORT"; do
    if ! pid_alive "$repo"; then tail -20 "$repo/daemon.log" >&2; die "daemon $name exited during start (log: $repo/daemon.log)"; fi
    [ "$waited" -ge $((START_TIMEOUT * 10)) ] && die "daemon $name did not answer on $API_BIND:$API_PORT within ${START_TIMEOUT}s (log: $repo/daemon.log)"
    sleep 0.1; waited=$((waited + 1))
  done
  say "$name runs: API http://$API_BIND:$API_PORT, gateway $API_BIND:$GATEWAY_PORT, swarm $SWARM_BIND:$SWARM_PORT, repo $repo"
  echo "http://$API_BIND:$API_PORT"
}

stop_repo() {
  local repo=$1 pid
  [ -f "$repo/daemon.pid" ] || return 0
  pid=$(cat "$repo/daemon.pid")
  if process_runs "$pid"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do process_runs "$pid" || break; sleep 0.1; done
    process_runs "$pid" && kill -9 "$pid" 2>/dev/null
    say "stopped $(basename "$repo") (pid $pid)"
  fi
  rm -f "$repo/daemon.pid"
}

cmd_stop() {
  if [ "${1:-}" = "--all" ]; then
    local repo
    for repo in "$STATE"/*/; do [ -d "$repo" ] && stop_repo "${repo%/}"; done
    return 0
  fi
  stop_repo "$(repo_for "${1:-main}")"
}

cmd_status() {
  local name=${1:-main} repo ipfs
  repo=$(repo_for "$name")
  if pid_alive "$repo"; then
    ipfs=$(ipfs_bin)
    echo "$name: running (pid $(cat "$repo/daemon.pid")), API http://$API_BIND:$API_PORT, repo $repo"
    echo "swarm peers:"; IPFS_PATH="$repo" "$ipfs" swarm peers || true
  else
    echo "$name: not running (repo $repo)"; return 3
  fi
}

case "${1:-}" in
  install) cmd_install ;;
  init) shift; cmd_init "$@" ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  status) shift; cmd_status "$@" ;;
  bin) ipfs_bin ;;
  *) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
