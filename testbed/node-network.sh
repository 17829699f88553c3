#!/usr/bin/env bash
# The real node's network: a network namespace of its own, joined to this machine by one veth pair.
#
# Usage: node-network.sh up WORKDIR      (before kube-apiserver starts: it binds the host end)
#        node-network.sh down WORKDIR    (after every node process has stopped)
#
# Why a namespace: kube-proxy, kube-router and the bridge CNI plugin rewrite iptables and
# add interfaces. In a namespace of its own all of that goes when the namespace is deleted, and
# nothing on this machine's own network changes but one veth end and one route. The node has no
# default route: its pods can reach each other, Services and the API server, and nothing else.
#
# The slot (KUBEFORGE_NODE_SLOT, 0..63; default: the first one no running cluster holds) picks
# the addresses, so that several clusters can each have a node at once:
#   host end  10.245.<slot>.1/30   kube-apiserver binds and advertises this
#   node end  10.245.<slot>.2/30   the node's InternalIP: kubelet, CoreDNS
#   pods      10.244.<slot>.0/24   the bridge CNI's range, routed from the host through the node
#
# `up` writes WORKDIR/node/network.env (shell-sourceable) for start-node.sh and the cluster
# scripts, and records the slot as taken in /run/kubeforge-testbed/slot-<slot> (which names the
# WORKDIR). A slot whose recorded WORKDIR no longer has a running cluster is reclaimed.
set -euo pipefail

action="${1:?usage: node-network.sh up|down WORKDIR}"
wd="${2:?usage: node-network.sh up|down WORKDIR}"
mkdir -p "$wd/node"
wd="$(cd "$wd" && pwd)"
env_file="$wd/node/network.env"
claims=/run/kubeforge-testbed

log() { printf '[node-network] %s\n' "$*" >&2; }
die() { printf '[node-network] ERROR: %s\n' "$*" >&2; exit 1; }

teardown() { # teardown SLOT: delete the namespace (with its veth end, bridge, rules) and the host end
  local slot="$1"
  ip netns delete "kubeforge-node-$slot" 2>/dev/null || true
  ip link delete "kfh$slot" 2>/dev/null || true
  rm -f "$claims/slot-$slot"
}

case "$action" in
up)
  for tool in ip nsenter iptables flock; do
    command -v "$tool" >/dev/null || die "needs '$tool' (testbed/node-packages.sh installs it)"
  done
  mkdir -p "$claims"
  exec 8> "$claims/.lock"
  flock 8   # one claim at a time, so that two clusters starting together never pick the same slot
  taken() { # taken SLOT: claimed by another cluster that still runs
    local owner
    [[ -f "$claims/slot-$1" ]] || return 1
    owner="$(cat "$claims/slot-$1")"
    [[ "$owner" != "$wd" && -s "$owner/pids" ]]
  }
  if [[ -n "${KUBEFORGE_NODE_SLOT:-}" ]]; then
    slot="$KUBEFORGE_NODE_SLOT"
    [[ "$slot" =~ ^[0-9]+$ ]] && (( slot < 64 )) || die "KUBEFORGE_NODE_SLOT must be 0..63, not '$slot'"
    taken "$slot" && die "slot $slot is taken by the cluster in $(cat "$claims/slot-$slot") (stop it with stop-cluster.sh, or leave KUBEFORGE_NODE_SLOT unset to take a free one)"
  else
    slot=0
    while taken "$slot"; do
      (( ++slot < 64 )) || die "all 64 node slots are taken by running clusters (see $claims)"
    done
  fi
  [[ -f "$claims/slot-$slot" ]] && log "reclaiming slot $slot from $(cat "$claims/slot-$slot") (no cluster runs there)"
  teardown "$slot"
  printf '%s\n' "$wd" > "$claims/slot-$slot"

  ns="kubeforge-node-$slot" host_if="kfh$slot" node_if="kfn$slot"
  host_ip="10.245.$slot.1" node_ip="10.245.$slot.2" pod_cidr="10.244.$slot.0/24"
  ip netns add "$ns"
  ip link add "$host_if" type veth peer name "$node_if"
  ip link set "$node_if" netns "$ns"
  ip addr add "$host_ip/30" dev "$host_if"
  ip link set "$host_if" up
  ip route add "$pod_cidr" via "$node_ip" dev "$host_if"
  in_ns() { nsenter --net="/var/run/netns/$ns" "$@"; }
  in_ns ip link set lo up
  in_ns ip addr add "$node_ip/30" dev "$node_if"
  in_ns ip link set "$node_if" up
  # Forwarding between the pods' bridge and the veth, inside the namespace only; bridged
  # pod-to-pod traffic through iptables, so that kube-router's policies see it.
  in_ns sysctl -qw net.ipv4.ip_forward=1
  in_ns sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null \
    || log "net.bridge.bridge-nf-call-iptables is not settable here: policies between pods on the bridge may not be enforced"
  cat > "$env_file" <<EOF
NODE_SLOT=$slot
NODE_NETNS=$ns
NODE_NAME=kubeforge-node-$slot
HOST_IP=$host_ip
NODE_IP=$node_ip
POD_CIDR=$pod_cidr
EOF
  log "namespace $ns: host $host_ip <-> node $node_ip, pods $pod_cidr"
  ;;
down)
  [[ -f "$env_file" ]] || exit 0
  # shellcheck disable=SC1090
  source "$env_file"
  owner="$(cat "$claims/slot-$NODE_SLOT" 2>/dev/null || true)"
  if [[ -n "$owner" && "$owner" != "$wd" ]]; then
    log "slot $NODE_SLOT now belongs to $owner; leaving it"
    exit 0
  fi
  teardown "$NODE_SLOT"
  log "namespace $NODE_NETNS deleted"
  ;;
*) die "unknown action '$action' (up or down)" ;;
esac
