#!/usr/bin/env bash
# Install the Toxiproxy fault proxy the lab (scripts/lab.py) puts between hosts.
#
#   scripts/toxiproxy.sh install   put a toxiproxy-server binary where the project finds it
#   scripts/toxiproxy.sh bin       print the path of the toxiproxy-server binary
#   scripts/toxiproxy.sh version   print its version
#
# A toxiproxy-server on PATH is used as it is; else v2.5.0 is built from the Go module proxy
# into .tools/bin (like scripts/kubo.sh builds Kubo); else the official release is downloaded
# (machines with internet).
#
# Toxiproxy never dials out by itself: it listens on the control API address it is given and on
# each proxy's listen address, and connects to each proxy's upstream. scripts/lab.py starts it
# with `-host 127.0.0.1` (the API inside a lab host) and proxies that listen on that host's lab
# address (198.18.0.0/15) and forward to 127.0.0.1. Never start it with its default host
# ("localhost") or with 0.0.0.0.
#
# Settings (environment): TOXIPROXY_VERSION (v2.5.0), KUBO_TOOLS (.tools; shared with kubo.sh)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOXIPROXY_VERSION=${TOXIPROXY_VERSION:-v2.5.0}
TOOLS=${KUBO_TOOLS:-$ROOT/.tools}
MODULE=github.com/Shopify/toxiproxy/v2

say() { echo "toxiproxy: $*" >&2; }
die() { say "error: $*"; exit 1; }

find_server() {
  if [ -x "$TOOLS/bin/toxiproxy-server" ]; then echo "$TOOLS/bin/toxiproxy-server"; return 0; fi
  command -v toxiproxy-server 2>/dev/null && return 0
  return 1
}

build_from_go_proxy() {
  command -v go >/dev/null || return 1
  say "building Toxiproxy $TOXIPROXY_VERSION from the Go module proxy (about a minute, once)"
  local build="$TOOLS/toxiproxy-build"
  mkdir -p "$build" "$TOOLS/bin"
  (
    cd "$build"
    # GOMODCACHE and GOCACHE stay where Go keeps them, so a rebuild is quick.
    export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
    [ -f go.mod ] || go mod init local/toxiproxybuild >/dev/null
    go get "$MODULE@$TOXIPROXY_VERSION"
    # The release sets the version through the linker (toxiproxy.Version defaults to "git");
    # `go install` would name the binary "server", so build it under its release name.
    go build -trimpath -ldflags="-s -w -X $MODULE.Version=${TOXIPROXY_VERSION#v}" \
      -o "$TOOLS/bin/toxiproxy-server.tmp" "$MODULE/cmd/server"
    mv "$TOOLS/bin/toxiproxy-server.tmp" "$TOOLS/bin/toxiproxy-server"
  )
}

download_release() {
  command -v curl >/dev/null || return 1
  local arch os url tmp
  case "$(uname -m)" in x86_64|amd64) arch=amd64 ;; aarch64|arm64) arch=arm64 ;; *) return 1 ;; esac
  os=$(uname -s | tr '[:upper:]' '[:lower:]')
  url="https://github.com/Shopify/toxiproxy/releases/download/$TOXIPROXY_VERSION/toxiproxy-server-${os}-${arch}"
  say "downloading the official release $url"
  tmp=$(mktemp -d)
  curl -fsSL --max-time 300 "$url" -o "$tmp/toxiproxy-server" || { rm -rf "$tmp"; return 1; }
  chmod +x "$tmp/toxiproxy-server"
  mkdir -p "$TOOLS/bin" && mv "$tmp/toxiproxy-server" "$TOOLS/bin/toxiproxy-server"
  rm -rf "$tmp"
}

version_of() { "$1" -version 2>/dev/null; }

cmd_install() {
  local bin version
  if bin=$(find_server); then
    version=$(version_of "$bin") || die "$bin does not run ('$bin -version' failed)"
    say "using $bin ($version)"; return 0
  fi
  build_from_go_proxy || download_release || die "could not install Toxiproxy: no toxiproxy-server on PATH, no Go toolchain that reaches the module proxy, no download of the release"
  bin=$(find_server) || die "Toxiproxy was built but $TOOLS/bin/toxiproxy-server is missing"
  version=$(version_of "$bin") || die "$bin was installed but does not run"
  say "installed $bin ($version)"
}

server_bin() { find_server || die "Toxiproxy is not installed: run 'scripts/toxiproxy.sh install'"; }

case "${1:-}" in
  install) cmd_install ;;
  bin) server_bin ;;
  version) version_of "$(server_bin)" ;;
  *) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
