#!/usr/bin/env bash
# Build the test control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kwok), the real node's services (kubelet, kube-proxy, CoreDNS,
# kube-router, local-path-provisioner, and the sandbox "pause" binary from its C source
# in the kubernetes module) and helm (for the chart's tests) from Go modules into a
# content-addressed cache dir:
#
#   ${KUBEFORGE_TESTBED_CACHE:-$HOME/.cache/kubeforge-testbed}/<hash>/bin
#
# <hash> = first 16 hex chars of sha256 over versions.env, the wrapper
# go.mod/go.sum files, coredns/main.go, the Go version and RECIPE below. When <hash>/COMPLETE exists (written
# last) and every binary is there, nothing is built. Binaries already built by
# an interrupted run are kept and only the missing ones are built.
#
# Progress goes to stderr; the bin dir path is the LAST line on stdout.
# Exit status is non-zero (with a message naming the piece) if anything fails.
#
# Environment:
#   KUBEFORGE_TESTBED_CACHE  cache root (default $HOME/.cache/kubeforge-testbed)
#   KUBEFORGE_GOTOOLCHAIN    GOTOOLCHAIN to use (default: local)
#   GOPROXY/GOMODCACHE/GOCACHE are honoured as usual by `go`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
: "${K8S:?versions.env must set K8S}" "${ETCD:?versions.env must set ETCD}" "${KWOK:?versions.env must set KWOK}"
: "${HELM:?versions.env must set HELM}"

export CGO_ENABLED=0
export GOTOOLCHAIN="${KUBEFORGE_GOTOOLCHAIN:-local}"
export GOFLAGS="-mod=readonly -buildvcs=false"

BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok helm
          kubelet kube-proxy coredns kube-router local-path-provisioner pause)
WRAPPERS=(k8s etcd kwok helm coredns kube-router local-path-provisioner)
# Bump RECIPE when changing how binaries are built here (flags, packages): it is part of
# the cache key, so old binaries are not reused.
RECIPE=1

t_start=$(date +%s)
log() { printf '[testbed %4ss] %s\n' "$(( $(date +%s) - t_start ))" "$*" >&2; }
die() { printf '[testbed] ERROR: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "'go' not found in PATH (need Go >= 1.26)"
goversion="$(go env GOVERSION)" || die "'go env GOVERSION' failed"

hash="$(
  cd "$here"
  { cat versions.env coredns/main.go
    for w in "${WRAPPERS[@]}"; do cat "$w/go.mod" "$w/go.sum"; done
    printf 'go=%s\nrecipe=%s\n' "$goversion" "$RECIPE"; } | sha256sum | cut -c1-16
)" || die "cannot hash versions.env and go.mod/go.sum files"

root="${KUBEFORGE_TESTBED_CACHE:-$HOME/.cache/kubeforge-testbed}/$hash"
bin="$root/bin"

complete() {
  [[ -f "$root/COMPLETE" ]] || return 1
  local b
  for b in "${BINARIES[@]}"; do [[ -x "$bin/$b" ]] || return 1; done
}

if complete; then
  log "up to date: $bin (K8S=$K8S ETCD=$ETCD KWOK=$KWOK HELM=$HELM, $goversion)"
  printf '%s\n' "$bin"
  exit 0
fi

mkdir -p "$bin"
# Serialise concurrent runs for the same hash.
exec 9>"$root/.lock"
if ! flock -n 9; then
  log "another build holds $root/.lock; waiting"
  flock 9
fi
if complete; then
  log "up to date (built by a concurrent run): $bin"
  printf '%s\n' "$bin"
  exit 0
fi

log "building into $bin (K8S=$K8S ETCD=$ETCD KWOK=$KWOK HELM=$HELM, $goversion, GOTOOLCHAIN=$GOTOOLCHAIN)"

# build <name> <wrapper dir> <package> [extra -X flags...]
build() {
  local name="$1" dir="$2" pkg="$3"; shift 3
  if [[ -x "$bin/$name" ]]; then
    log "$name: already built, skipping"
    return 0
  fi
  local t0 rc=0 tmp="$bin/.$name.tmp.$$"
  t0=$(date +%s)
  log "$name: building $pkg ..."
  (cd "$here/$dir" && go build -trimpath -ldflags="-s -w $*" -o "$tmp" "$pkg") >&2 || rc=$?
  if (( rc != 0 )); then
    rm -f "$tmp"
    die "building $name ($pkg in $here/$dir) failed with exit status $rc; see the go output above"
  fi
  mv -f "$tmp" "$bin/$name"
  log "$name: done in $(( $(date +%s) - t0 ))s ($(du -h "$bin/$name" | cut -f1))"
}

# Kubernetes version stamping, as hack/lib/version.sh does. The minor must be exact:
# it feeds the compatibility/emulation-version logic.
k8s_minor="${K8S#v1.}"; k8s_minor="${k8s_minor%%.*}"
k8s_x=()
for p in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  k8s_x+=("-X $p.gitVersion=$K8S" "-X $p.gitMajor=1" "-X $p.gitMinor=$k8s_minor" "-X $p.gitTreeState=clean")
done

build etcd                    etcd go.etcd.io/etcd/server/v3
build kube-apiserver          k8s  k8s.io/kubernetes/cmd/kube-apiserver          "${k8s_x[@]}"
build kube-controller-manager k8s  k8s.io/kubernetes/cmd/kube-controller-manager "${k8s_x[@]}"
build kube-scheduler          k8s  k8s.io/kubernetes/cmd/kube-scheduler          "${k8s_x[@]}"
build kwok                    kwok sigs.k8s.io/kwok/cmd/kwok

# helm's version stamps, as its Makefile sets them: its own version (unstamped it says v3.22,
# "unreleased"), and the Kubernetes version it assumes offline (`helm template`, `helm lint`)
# from the client-go it is built with.
helm_k8s="$(cd "$here/helm" && go list -m -f '{{.Version}}' k8s.io/client-go)" || die "cannot read helm's client-go version"
helm_k8s_minor="${helm_k8s#v0.}"; helm_k8s_minor="${helm_k8s_minor%%.*}"
helm_x=("-X helm.sh/helm/v3/internal/version.version=$HELM" "-X helm.sh/helm/v3/internal/version.metadata="
        "-X helm.sh/helm/v3/internal/version.gitTreeState=clean")
for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  helm_x+=("-X $p.k8sVersionMajor=1" "-X $p.k8sVersionMinor=$helm_k8s_minor")
done
build helm                    helm helm.sh/helm/v3/cmd/helm                      "${helm_x[@]}"

# The real node (start-node.sh).
build kubelet                 k8s  k8s.io/kubernetes/cmd/kubelet                 "${k8s_x[@]}"
build kube-proxy              k8s  k8s.io/kubernetes/cmd/kube-proxy              "${k8s_x[@]}"
build coredns                 coredns .
build kube-router             kube-router github.com/cloudnativelabs/kube-router/v2/cmd/kube-router
build local-path-provisioner  local-path-provisioner github.com/rancher/local-path-provisioner

# The sandbox ("pause") binary every pod's first container runs, from its C source in the
# kubernetes module, compiled the way build/pause/Makefile does (static, -Os).
if [[ ! -x "$bin/pause" ]]; then
  command -v cc >/dev/null 2>&1 || die "pause: needs a C compiler (cc)"
  src="$(cd "$here/k8s" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c"
  [[ -f "$src" ]] || die "pause: $src not found in the kubernetes module"
  pause_tag="$(sed -n 's/^TAG ?= //p' "${src%/linux/pause.c}/Makefile")"
  cc -Os -Wall -Werror -static -DVERSION="v$pause_tag-kubeforge" -o "$bin/.pause.tmp" "$src" \
    || die "pause: compiling $src failed"
  mv -f "$bin/.pause.tmp" "$bin/pause"
  printf '%s\n' "$pause_tag" > "$bin/pause.version"
  log "pause: built v$pause_tag from $src"
fi

# Sanity check: every binary runs and reports a version.
for b in "${BINARIES[@]}"; do
  case $b in
    helm) v=version ;;   # helm's is a subcommand
    pause) v=-v ;;
    *) v=--version ;;
  esac
  "$bin/$b" "$v" >/dev/null 2>&1 || die "$b was built but '$b $v' fails"
done

cp -f "$here/versions.env" "$root/versions.env"
(cd "$bin" && sha256sum "${BINARIES[@]}") > "$root/SHA256SUMS"
printf 'built=%s\ngo=%s\nhash=%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$goversion" "$hash" > "$root/COMPLETE.tmp"
mv -f "$root/COMPLETE.tmp" "$root/COMPLETE"
log "all done in $(( $(date +%s) - t_start ))s: $bin"
printf '%s\n' "$bin"
