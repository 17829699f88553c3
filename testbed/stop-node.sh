#!/usr/bin/env bash
# Stop the real node of WORKDIR (start-node.sh) and leave nothing of it behind: its pods are
# deleted through the API first, so that kubelet tears their sandboxes down the normal way
# (CNI, volumes); then its services stop (from WORKDIR/pids, newest first); then whatever is
# left is removed by force: every process in the node's cgroups, containerd's shims for its
# socket, every mount under the node's directories. Kernel tunables kubelet changed are put
# back, and the node's network namespace is deleted. Called by stop-cluster.sh.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
wd="$(cd "${1:?usage: stop-node.sh WORKDIR}" && pwd)"
node_dir="$wd/node"
[[ -f "$node_dir/network.env" ]] || exit 0
# shellcheck disable=SC1091
source "$node_dir/network.env"
grace="${KUBEFORGE_STOP_GRACE:-10}"
log() { printf '[node] %s\n' "$*" >&2; }
sock="$node_dir/containerd.sock"
NODE_SERVICES=(local-path-provisioner coredns kube-router kube-proxy kubelet containerd)

# 1. Pods off the node while kubelet still runs (bounded: a wedged pod must not stall the stop).
if [[ -f "$wd/cluster.env" ]] && grep -q '^kubelet ' "$wd/pids" 2>/dev/null; then
  # shellcheck disable=SC1091
  source "$wd/cluster.env"
  api_() { curl -s --max-time 10 --cacert "$CA_FILE" -H "Authorization: Bearer $TOKEN" "$@"; }
  api_ -X DELETE "$APISERVER_URL/api/v1/pods?fieldSelector=spec.nodeName=$NODE_NAME" >/dev/null 2>&1 || true
  for ns in $(api_ "$APISERVER_URL/api/v1/pods?fieldSelector=spec.nodeName=$NODE_NAME" \
      | python3 -c 'import json,sys; print(" ".join(sorted({p["metadata"]["namespace"] for p in json.load(sys.stdin).get("items", [])})))' 2>/dev/null); do
    api_ -X DELETE -H 'Content-Type: application/json' --data '{"gracePeriodSeconds":0}' \
      "$APISERVER_URL/api/v1/namespaces/$ns/pods?fieldSelector=spec.nodeName=$NODE_NAME" >/dev/null 2>&1 || true
  done
  for (( i = 0; i < 60; i++ )); do
    [[ -z "$(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null)" ]] && break
    sleep 0.5
  done
fi

# 2. The node's services, newest first, by the pids recorded at start.
ours() { [[ -d "/proc/$1" && "$(readlink "/proc/$1/exe" 2>/dev/null)" == "$2" ]]; }
for name in "${NODE_SERVICES[@]}"; do
  line="$(awk -v n="$name" '$1==n' "$wd/pids" 2>/dev/null | tail -n1)"
  [[ -n "$line" ]] || continue
  read -r _ pid exe <<<"$line"
  if ours "$pid" "$exe"; then
    kill -TERM "$pid" 2>/dev/null
    for (( i = 0; i < grace * 10; i++ )); do ours "$pid" "$exe" || break; sleep 0.1; done
    ours "$pid" "$exe" && { log "$name (pid $pid) ignored SIGTERM for ${grace}s; SIGKILL"; kill -KILL "$pid"; }
    log "stopped $name (pid $pid)"
  fi
  sed -i "/^$name /d" "$wd/pids"
done

# 3. Whatever survived: processes in the node's cgroups (containers), shims of this containerd.
if [[ -f "$node_dir/cgroup-root" ]]; then
  cg="$(cat "$node_dir/cgroup-root")"
  for (( round = 0; round < 20; round++ )); do
    pids="$(find "/sys/fs/cgroup/pids$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u)"
    [[ -z "$pids" ]] && break
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null
    sleep 0.2
  done
  for d in /sys/fs/cgroup/*"$cg"; do
    [[ -d "$d" ]] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
fi
for p in /proc/[0-9]*; do
  if tr '\0' ' ' 2>/dev/null < "$p/cmdline" | grep -q -- "containerd-shim.*-address $sock"; then
    kill -KILL "${p#/proc/}" 2>/dev/null && log "killed leftover shim ${p#/proc/}"
  fi
done

# 4. Mounts (volumes, rootfs, pod network namespaces), deepest first.
mapfile -t mounts < <(awk -v a="$node_dir/" '{ if (index($5, a) == 1) print $5 }' /proc/self/mountinfo | sort -r)
for m in "${mounts[@]}"; do umount -l "$m" 2>/dev/null || true; done
(( ${#mounts[@]} )) && log "unmounted ${#mounts[@]} mount(s) under $node_dir"

# 5. Kernel tunables, and the network.
if [[ -f "$node_dir/sysctl.orig" ]]; then
  while read -r key value; do echo "$value" > "/proc/sys/$key" 2>/dev/null || true; done < "$node_dir/sysctl.orig"
  rm -f "$node_dir/sysctl.orig"
fi
"$here/node-network.sh" down "$wd"
exit 0
