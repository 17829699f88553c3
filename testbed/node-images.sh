#!/usr/bin/env bash
# Put images into the real node's containerd (the k8s.io namespace kubelet uses).
#
# Usage: node-images.sh WORKDIR [ARCHIVE.tar ...]
#   With no archive: the testbed's own images, built here on first use into <cache>/images:
#     the sandbox image (the pause binary build.sh compiles) and a busybox (Debian's
#     busybox-static) for local-path-provisioner's helper pods. Their refs go to
#     WORKDIR/node/{pause,busybox}.ref.
#   Each ARCHIVE is a docker-archive (`docker save`, make images). An archive already imported,
#   same path, size and mtime, is skipped: containerd's store outlives the cluster.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
wd="$(cd "${1:?usage: node-images.sh WORKDIR [ARCHIVE.tar ...]}" && pwd)"; shift
# shellcheck disable=SC1091
source "$wd/node/network.env"
cache="${KUBEFORGE_TESTBED_CACHE:-$HOME/.cache/kubeforge-testbed}"
sock="$wd/node/containerd.sock"
stamps="$cache/containerd-$NODE_SLOT/kubeforge-imported"
mkdir -p "$cache/images" "$stamps"
log() { printf '[node-images] %s\n' "$*" >&2; }

import() { # import ARCHIVE: unless this very file was imported before
  local tar="$1" key t0
  [[ -f "$tar" ]] || { log "ERROR: $tar not found"; return 1; }
  key="$(printf '%s %s' "$(readlink -f "$tar")" "$(stat -c '%s %Y' "$tar")" | sha256sum | cut -c1-32)"
  if [[ -f "$stamps/$key" ]]; then
    log "$(cat "$stamps/$key"): already imported"
    return 0
  fi
  ensure_space "$tar"
  t0=$(date +%s)
  ctr --address "$sock" -n k8s.io images import "$tar" >&2 \
    || { log "ERROR: ctr images import $tar failed"; return 1; }
  python3 -c 'import json, sys, tarfile; print(" ".join(json.load(tarfile.open(sys.argv[1]).extractfile("manifest.json"))[0]["RepoTags"]))' \
    "$tar" > "$stamps/$key"
  log "$(cat "$stamps/$key"): imported in $(( $(date +%s) - t0 ))s ($(du -h "$tar" | cut -f1))"
  drop_other_tags "$(cat "$stamps/$key")"
}

# ensure_space ARCHIVE: room to import it. containerd keeps each layer twice (the blob and its unpacked
# snapshot), so an import needs about twice the archive, plus a margin. Short of it, the stores of node
# slots no running cluster holds go first (each is a whole runtime image, left by a cluster on another
# slot); then, still short, a clear error instead of containerd's "no space left on device" mid-unpack.
ensure_space() {
  local need have dir slot claim
  need=$(( $(stat -c %s "$1") * 2 / 1048576 + 2048 ))  # MiB
  have=$(( $(df --output=avail -k "$cache" | tail -n 1) / 1024 ))
  (( have >= need )) && return 0
  for dir in "$cache"/containerd-*; do
    slot="${dir##*/containerd-}"
    [[ -d "$dir" && "$slot" =~ ^[0-9]+$ && "$slot" != "$NODE_SLOT" ]] || continue
    claim="/run/kubeforge-testbed/slot-$slot"
    if [[ -f "$claim" && -s "$(cat "$claim")/pids" ]]; then continue; fi  # a running cluster's node uses it
    log "$(du -sh "$dir" 2>/dev/null | cut -f1) in $dir (slot $slot, no cluster runs there): removed to make room"
    rm -rf "$dir" 2>/dev/null || true
  done
  have=$(( $(df --output=avail -k "$cache" | tail -n 1) / 1024 ))
  (( have >= need )) || {
    log "ERROR: importing $1 needs about ${need} MiB free under $cache, and $have MiB are; free some disk space (old clones, caches) and run again"
    return 1
  }
}

# drop_other_tags REF...: remove the node's other tags of each REF's repository. The runtime
# image is GBs; kept across clusters, every rebuild under a new tag would fill the disk.
# containerd's garbage collector then frees their content and snapshots.
drop_other_tags() {
  local ref repo old
  for ref in "$@"; do
    ref="$(normalize "$ref")" repo="${ref%:*}"
    for old in $(ctr --address "$sock" -n k8s.io images ls -q | grep -F "$repo:" | grep -vxF "$ref"); do
      ctr --address "$sock" -n k8s.io images rm "$old" > /dev/null && log "$old: removed (superseded by $ref)"
    done
  done
}
normalize() { # docker.io/ prefix, as containerd names images
  case "$1" in
    */*/*|*.*/*) printf '%s' "$1" ;;
    */*) printf 'docker.io/%s' "$1" ;;
    *) printf 'docker.io/library/%s' "$1" ;;
  esac
}

if (( $# == 0 )); then
  bin="${bin:-$("$here/build.sh" | tail -n 1)}"
  pause_ref="docker.io/kubeforge-testbed/pause:$(cat "$bin/pause.version")"
  pause_tar="$cache/images/pause-$(sha256sum "$bin/pause" | cut -c1-16).tar"
  [[ -f "$pause_tar" ]] || python3 "$here/image_archive.py" "$pause_tar" "$pause_ref" '["/pause"]' 65535:65535 "$bin/pause=/pause"
  busybox="$(command -v busybox)"
  busybox_ref="docker.io/kubeforge-testbed/busybox:$(dpkg-query -W -f '${Version}' busybox-static | tr -c 'A-Za-z0-9_.\n-' '_')"
  busybox_tar="$cache/images/busybox-$(sha256sum "$busybox" | cut -c1-16).tar"
  if [[ ! -f "$busybox_tar" ]]; then
    links=()
    for applet in sh mkdir rm chmod ls cat; do links+=("@busybox=/bin/$applet"); done
    python3 "$here/image_archive.py" "$busybox_tar" "$busybox_ref" '["/bin/sh"]' 0:0 "$busybox=/bin/busybox" "${links[@]}"
  fi
  printf '%s\n' "$pause_ref" > "$wd/node/pause.ref"
  printf '%s\n' "$busybox_ref" > "$wd/node/busybox.ref"
  set -- "$pause_tar" "$busybox_tar"
fi
for tar in "$@"; do import "$tar"; done
