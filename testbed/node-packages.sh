#!/usr/bin/env bash
# Install what the real node runs that is not built from Go modules: Debian's containerd and
# runc (the container runtime kubelet talks CRI to), the CNI plugins (bridge, host-local,
# loopback, portmap), iptables, ipset and conntrack (kube-proxy and kube-router program them),
# and busybox-static (the provisioner's helper image). Debian's, because containerd 1.6 speaks
# CRI v1, which kubelet 1.35 needs, and runc 1.1 runs on this kernel's cgroup v1; building
# either from Go modules would add minutes to every cold run for nothing the tests use.
#
# Idempotent: installs only what is missing (apt-get update only then). Needs root and apt.
set -euo pipefail
packages=(containerd runc containernetworking-plugins iptables ipset conntrack busybox-static)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
(( ${#missing[@]} == 0 )) && exit 0
command -v apt-get >/dev/null || { echo "[node-packages] ERROR: needs apt-get to install: ${missing[*]}" >&2; exit 1; }
(( EUID == 0 )) || { echo "[node-packages] ERROR: run as root to install: ${missing[*]}" >&2; exit 1; }
echo "[node-packages] installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >&2
apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
