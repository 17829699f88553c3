#!/usr/bin/env bash
# Obtain a Prometheus server binary from Debian's `prometheus` package, for the dashboard tests.
#
# Usage: bin="$(testbed/prometheus.sh | tail -n1)"   (progress on stderr; the binary's path is
#        the last stdout line)
#
# The package is downloaded and unpacked (`dpkg -x`) into the cache, never installed: no service
# started, nothing of the system's apt or dpkg state changed. apt works with package
# lists of its own under the cache, refreshed from the machine's sources, so the script behaves
# the same on a fresh CI machine whose lists are missing or stale. Idempotent: a cached binary
# that runs is reused.
#
#   KUBEFORGE_TESTBED_CACHE  cache root (default $HOME/.cache/kubeforge-testbed); the binary lands
#                            in <root>/prometheus/usr/bin/prometheus
set -euo pipefail

dir="${KUBEFORGE_TESTBED_CACHE:-$HOME/.cache/kubeforge-testbed}/prometheus"
bin="$dir/usr/bin/prometheus"
log() { printf '[prometheus] %s\n' "$*" >&2; }

if [[ -x "$bin" ]] && "$bin" --version >/dev/null 2>&1; then
  echo "$bin"
  exit 0
fi

for tool in apt-get dpkg; do
  command -v "$tool" >/dev/null || { log "needs $tool (a Debian or Ubuntu machine)"; exit 1; }
done

mkdir -p "$dir/apt/lists/partial" "$dir/apt/archives/partial" "$dir/debs"
apt_opts=(
  -o "Dir::State::Lists=$dir/apt/lists"
  -o "Dir::Cache=$dir/apt"
  -o "Dir::State::status=/dev/null"   # not the machine's installed set: we only download
  -o Debug::NoLocking=1               # our own lists: no need for (or clash with) the system's lock
)
# As root, apt downloads as the `_apt` user, which cannot write into a home directory.
[[ "$(id -u)" == 0 ]] && apt_opts+=(-o APT::Sandbox::User=root)

log "refreshing package lists into $dir/apt/lists"
apt-get "${apt_opts[@]}" -qq update >&2

log "downloading Debian's prometheus package"
(cd "$dir/debs" && rm -f prometheus_*.deb && apt-get "${apt_opts[@]}" -qq download prometheus >&2)
deb="$(ls "$dir"/debs/prometheus_*.deb)"

log "unpacking $(basename "$deb")"
dpkg -x "$deb" "$dir"
"$bin" --version >&2
echo "$bin"
