#!/usr/bin/env bash
# Install the Debian packages named on the command line that are not installed yet.
#
# Usage: apt-install.sh TAG PACKAGE...   (TAG prefixes the log lines, e.g. node-packages)
#
# What the testbed's real node (testbed/node-packages.sh) and the image builds (images/build.sh:
# docker.io, debootstrap) take from Debian instead of building it. Idempotent: nothing runs when
# everything is there, and `apt-get update` only when something is missing. Needs root and apt.
set -euo pipefail
tag="${1:?usage: apt-install.sh TAG PACKAGE...}"
shift
missing=()
for p in "$@"; do
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
(( ${#missing[@]} == 0 )) && exit 0
command -v apt-get >/dev/null || { echo "[$tag] ERROR: needs apt-get to install: ${missing[*]}" >&2; exit 1; }
(( EUID == 0 )) || { echo "[$tag] ERROR: run as root to install: ${missing[*]}" >&2; exit 1; }
echo "[$tag] installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >&2
apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
