#!/usr/bin/env bash
# Start a real node in the cluster of WORKDIR: containerd + runc, bridge CNI, kubelet, kube-proxy,
# kube-router (NetworkPolicy), CoreDNS and local-path-provisioner (PVCs), all in the node's network
# namespace (node-network.sh). Called by start-cluster.sh when KUBEFORGE_REAL_NODE=1, after the
# control plane is up; every process goes into WORKDIR/pids, so stop-cluster.sh stops them.
#
# Usage: start-node.sh WORKDIR
#   Needs: WORKDIR/cluster.env-to-be values in the environment (see start-cluster.sh), the binaries
#   of build.sh in $bin, and Debian's containerd, runc, CNI plugins, iptables, ipset, conntrack and
#   busybox-static (node-packages.sh).
#
# The node:
#   name kubeforge-node-<slot>, labels kubeforge.dev/node=real, taint kubeforge.dev/real-node=true:NoSchedule
#   (pods that should run for real tolerate it; KWOK-node tests never land here by accident)
#   images: containerd's content lives in <cache>/containerd-<slot> and survives the cluster, so
#   an image imported once (node-images.sh) is there next time
#   DNS: CoreDNS on the node's address, port 53: <svc>.<ns>.svc.cluster.local and pod hostnames
#   Services: kube-proxy, iptables mode
#   NetworkPolicy: kube-router's firewall only (no routing, no service proxy)
#   PVCs: StorageClass local-path (the default class), directories under WORKDIR/node/volumes
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
wd="$(cd "${1:?usage: start-node.sh WORKDIR}" && pwd)"
node_dir="$wd/node"
# shellcheck disable=SC1091
source "$node_dir/network.env"
: "${bin:?start-node.sh needs \$bin (the build.sh bin dir)}" "${api:?}" "${token:?}" "${pki:?}" "${timeout:?}"
: "${NODE_TOKEN:?}" "${PROXY_TOKEN:?}"
cache="${KUBEFORGE_TESTBED_CACHE:-$HOME/.cache/kubeforge-testbed}"

t0=$(date +%s)
log() { printf '[node %4ss] %s\n' "$(( $(date +%s) - t0 ))" "$*" >&2; }
fail() { printf '[node] ERROR: %s: %s\n' "$1" "$2" >&2; [[ -f "$wd/logs/$1.log" ]] && tail -n 40 "$wd/logs/$1.log" >&2; exit 1; }
in_node() { nsenter --net="/var/run/netns/$NODE_NETNS" "$@"; }

for b in kubelet kube-proxy coredns kube-router local-path-provisioner pause; do
  [[ -x "$bin/$b" ]] || fail setup "$bin/$b missing (run build.sh)"
done
for tool in containerd containerd-shim-runc-v2 runc ctr iptables ipset conntrack busybox; do
  command -v "$tool" >/dev/null || fail setup "'$tool' not found (run testbed/node-packages.sh)"
done
cni_bin=/usr/lib/cni
[[ -x "$cni_bin/bridge" && -x "$cni_bin/host-local" && -x "$cni_bin/loopback" ]] \
  || fail setup "CNI plugins missing in $cni_bin (run testbed/node-packages.sh)"

mkdir -p "$node_dir"/{cni,kubelet,pod-logs,volumes,containerd-state} "$cache/containerd-$NODE_SLOT"
sock="$node_dir/containerd.sock"
# A unix socket path has at most 107 bytes.
(( ${#sock} < 100 )) || fail setup "WORKDIR is too deep for a unix socket path ($sock)"

launcher=(nsenter --net="/var/run/netns/$NODE_NETNS")
# shellcheck source=lib.sh
source "$here/lib.sh"
apply_json() { # apply_json PATH BODY: create (409 = exists is fine)
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 --cacert "$pki/ca.crt" -H "Authorization: Bearer $token" \
    -X POST -H 'Content-Type: application/json' --data "$2" "$api$1")
  [[ "$code" == 201 || "$code" == 409 ]] || fail setup "POST $1 answered $code"
}
kubeconfig() { # kubeconfig FILE TOKEN
  cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: kubeforge, cluster: {server: "$api", certificate-authority: "$pki/ca.crt"}}]
users: [{name: u, user: {token: "$2"}}]
contexts: [{name: kubeforge, context: {cluster: kubeforge, user: u}}]
current-context: kubeforge
EOF
  chmod 600 "$1"
}
kubeconfig "$node_dir/kubelet.kubeconfig" "$NODE_TOKEN"
kubeconfig "$node_dir/kube-proxy.kubeconfig" "$PROXY_TOKEN"
admin_kc="$wd/kubeconfig"

# ---- containerd ----------------------------------------------------------------------------
pause_ref="docker.io/kubeforge-testbed/pause:$(cat "$bin/pause.version")"
cat > "$node_dir/cni/10-kubeforge.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "kubeforge", "plugins": [
  {"type": "bridge", "bridge": "kfbr0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": "$node_dir/cni-ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}
]}
EOF
cat > "$node_dir/containerd.toml" <<EOF
version = 2
root = "$cache/containerd-$NODE_SLOT"
state = "$node_dir/containerd-state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$node_dir/containerd-opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause_ref"
  # Pod network namespaces under the state dir, so that stop-node.sh finds every one of them.
  netns_mounts_under_state_dir = true
  # kubelet asks for negative OOM scores (-998 for sandboxes), which need CAP_SYS_RESOURCE; this
  # machine's root lacks it, and runc then fails every sandbox. Cap them at containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$cni_bin"
    conf_dir = "$node_dir/cni"
EOF
start containerd "$(command -v containerd)" --config "$node_dir/containerd.toml" --log-level warn
ctr_() { ctr --address "$sock" -n k8s.io "$@"; }
wait_for containerd "serving" ctr_ version

# The images every node needs, built here (node-images.sh imports only what it lacks).
"$here/node-images.sh" "$wd" >&2 || fail containerd "importing the testbed images failed"

# ---- kubelet -------------------------------------------------------------------------------
# cgroup v1 hierarchy for the node's pods, so that stop-node.sh finds every process of every pod.
cgroup_root="/kubeforge-node-$NODE_SLOT"
for d in /sys/fs/cgroup/*/; do
  [[ -d "$d" && ! -L "${d%/}" ]] && mkdir -p "$d${cgroup_root#/}" 2>/dev/null || true
done
printf '%s\n' "$cgroup_root" > "$node_dir/cgroup-root"
cat > "$node_dir/resolv.conf" <<EOF
# The node's pods get CoreDNS (clusterDNS); nothing outside the cluster is resolvable.
nameserver $NODE_IP
EOF
# kubelet sets these kernel tunables as every node does (protectKernelDefaults would refuse to
# start instead); stop-node.sh puts back the values this machine had.
: > "$node_dir/sysctl.orig"
for key in vm/overcommit_memory kernel/panic kernel/panic_on_oops; do
  printf '%s %s\n' "$key" "$(cat "/proc/sys/$key")" >> "$node_dir/sysctl.orig"
done
cat > "$node_dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine has cgroup v1, which kubelet 1.35 refuses unless told otherwise.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: $cgroup_root
containerRuntimeEndpoint: unix://$sock
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
clusterDNS: [$NODE_IP]
clusterDomain: cluster.local
resolvConf: $node_dir/resolv.conf
podLogsDir: $node_dir/pod-logs
failSwapOn: false
# A test node on a shared 2-core machine: never evict, never garbage-collect the imported images
# (nothing could pull them back).
evictionHard: {memory.available: "1Mi", nodefs.available: "0%", imagefs.available: "0%", nodefs.inodesFree: "0%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
registerWithTaints:
- {key: kubeforge.dev/real-node, value: "true", effect: NoSchedule}
nodeStatusReportFrequency: 10s
# ConfigMap volumes (a job's spec and peers, rewritten on a spec edit) reach running pods within about
# this period: 10 s here, so tests wait less; a minute by default.
syncFrequency: 10s
EOF
start kubelet "$bin/kubelet" \
  --config="$node_dir/kubelet.yaml" \
  --kubeconfig="$node_dir/kubelet.kubeconfig" \
  --root-dir="$node_dir/kubelet" \
  --cert-dir="$node_dir/kubelet/pki" \
  --hostname-override="$NODE_NAME" \
  --node-ip="$NODE_IP" \
  --node-labels="kubeforge.dev/node=real" \
  --v=1
node_ready() {
  curl_api "$api/api/v1/nodes/$NODE_NAME" | python3 -c '
import json, sys
n = json.load(sys.stdin)
sys.exit(0 if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", [])) else 1)'
}
wait_for kubelet "node $NODE_NAME Ready" node_ready

# ---- kube-proxy ------------------------------------------------------------------------------
cat > "$node_dir/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $node_dir/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Leave the kernel's conntrack table sizes alone: they are not the node's to change.
conntrack: {maxPerCore: 0, min: 0}
EOF
start kube-proxy "$bin/kube-proxy" --config="$node_dir/kube-proxy.yaml" --v=1
in_node_curl() { in_node curl -sf --max-time 5 "$@"; }
wait_for kube-proxy "healthy" in_node_curl http://127.0.0.1:10256/healthz

# ---- kube-router: NetworkPolicy ----------------------------------------------------------------
start kube-router "$bin/kube-router" \
  --kubeconfig="$admin_kc" \
  --hostname-override="$NODE_NAME" \
  --run-firewall=true --run-router=false --run-service-proxy=false --enable-cni=false \
  --metrics-port=0 --health-port=20244 \
  --v=1
wait_for kube-router "healthy" in_node_curl http://127.0.0.1:20244/healthz

# ---- CoreDNS -------------------------------------------------------------------------------------
cat > "$node_dir/Corefile" <<EOF
.:53 {
    bind $NODE_IP
    errors
    health 127.0.0.1:8080
    ready 127.0.0.1:8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $admin_kc
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 5
}
EOF
start coredns "$bin/coredns" -conf "$node_dir/Corefile"
wait_for coredns "ready" in_node_curl http://127.0.0.1:8181/ready

# ---- local-path-provisioner: PVCs ----------------------------------------------------------------
busybox_ref="$(cat "$node_dir/busybox.ref")"
apply_json /api/v1/namespaces '{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"local-path-storage"}}'
config="$(python3 - "$node_dir/volumes" "$busybox_ref" <<'PY'
import json, sys
volumes, image = sys.argv[1], sys.argv[2]
helper = f"""apiVersion: v1
kind: Pod
metadata:
  name: helper-pod
spec:
  tolerations: [{{operator: Exists}}]
  containers:
  - name: helper-pod
    image: {image}
    imagePullPolicy: Never
"""
print(json.dumps({
    "apiVersion": "v1", "kind": "ConfigMap",
    "metadata": {"name": "local-path-config", "namespace": "local-path-storage"},
    "data": {
        "config.json": json.dumps({"nodePathMap": [{"node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": [volumes]}]}),
        # 0777: pods run as any non-root user (Pod Security "restricted"); fsGroup does not apply
        # to host directories.
        "setup": '#!/bin/sh\nset -eu\nmkdir -m 0777 -p "$VOL_DIR"\n',
        "teardown": '#!/bin/sh\nset -eu\nrm -rf "$VOL_DIR"\n',
        "helperPod.yaml": helper,
    },
}))
PY
)"
apply_json /api/v1/namespaces/local-path-storage/configmaps "$config"
apply_json /apis/storage.k8s.io/v1/storageclasses '{"apiVersion":"storage.k8s.io/v1","kind":"StorageClass",
  "metadata":{"name":"local-path","annotations":{"storageclass.kubernetes.io/is-default-class":"true"}},
  "provisioner":"rancher.io/local-path","volumeBindingMode":"WaitForFirstConsumer","reclaimPolicy":"Delete"}'
printf '{"nodePathMap":[{"node":"DEFAULT_PATH_FOR_NON_LISTED_NODES","paths":["%s"]}]}\n' "$node_dir/volumes" > "$node_dir/local-path.json"
start local-path-provisioner "$bin/local-path-provisioner" start \
  --config="$node_dir/local-path.json" \
  --kubeconfig="$admin_kc" \
  --namespace=local-path-storage \
  --helper-image="$busybox_ref" \
  --configmap-name=local-path-config \
  --service-account-name=default
sleep 1
alive local-path-provisioner || fail local-path-provisioner "exited at start"

log "node $NODE_NAME ready in $(( $(date +%s) - t0 ))s"
