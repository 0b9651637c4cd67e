# shellcheck shell=bash
# Helpers shared by scripts/services and scripts/test. Sourced, never run.
# The defaults themselves live in scripts/env.sh.

# Name of the calling script, for messages.
OUTBOX_SCRIPT="${OUTBOX_SCRIPT:-$(basename "$0")}"

# Progress goes to stderr so that stdout carries only what a command reports
# (`services status`, the output of the Kafka tools).
log() { printf '%s: %s\n' "$OUTBOX_SCRIPT" "$*" >&2; }

# die STEP MESSAGE...: report which step failed and exit non-zero.
die() {
  local step=$1
  shift
  printf '%s: FAILED [%s]: %s\n' "$OUTBOX_SCRIPT" "$step" "$*" >&2
  exit 1
}

# Run a command as root: directly when we are root, else through sudo.
as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die apt "need root (or sudo) to run: $*"
  fi
}

# True when the Debian package is installed.
pkg_installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# apt_install PACKAGE...: install the packages that are missing (none missing: no-op,
# no `apt-get update`). Fails with step "apt".
_APT_UPDATED=0
apt_install() {
  local missing=() p
  for p in "$@"; do
    pkg_installed "$p" || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  command -v apt-get >/dev/null 2>&1 \
    || die apt "apt-get not found: install ${missing[*]} with your package manager"
  log "apt: installing ${missing[*]}"
  if ((_APT_UPDATED == 0)); then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      || die apt "apt-get update failed"
    _APT_UPDATED=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    || die apt "apt-get install ${missing[*]} failed"
}

# port_open HOST PORT: true when something accepts TCP connections there.
port_open() {
  # shellcheck disable=SC2016 # $1/$2 expand in the inner bash
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# port_owner PORT: "name(pid)" of the listening process(es), when ss can tell.
port_owner() {
  local owner=""
  if command -v ss >/dev/null 2>&1; then
    owner=$(ss -Hltnp "sport = :$1" 2>/dev/null \
      | grep -o 'users:(([^)]*))' | sed -E 's/users:\(\("([^"]*)",pid=([0-9]+).*/\1(pid \2)/' \
      | sort -u | paste -sd, -)
  fi
  printf '%s' "${owner:-an unknown process}"
}
