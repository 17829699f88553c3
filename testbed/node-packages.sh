#!/usr/bin/env bash
# Install what the real node runs that is not built from Go modules: Debian's containerd and
# runc (the container runtime kubelet talks CRI to), the CNI plugins (bridge, host-local,
# loopback, portmap), iptables, ipset and conntrack (kube-proxy and kube-router program them),
# and busybox-static (the provisioner's helper image). Debian's, because containerd 1.6 speaks
# CRI v1, which kubelet 1.35 needs, and runc 1.1 runs on this kernel's cgroup v1; building
# either from Go modules would add minutes to every cold run for nothing the tests use.
#
# Idempotent: installs only what is missing (testbed/apt-install.sh). Needs root and apt.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" node-packages \
  containerd runc containernetworking-plugins iptables ipset conntrack busybox-static
