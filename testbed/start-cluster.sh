#!/usr/bin/env bash
# Start a throw-away Kubernetes control plane for tests, everything on 127.0.0.1:
#   etcd -> kube-apiserver -> kube-controller-manager, kube-scheduler -> kwok -> N fake GPU nodes
#
# Usage: start-cluster.sh WORKDIR [NODES]        (NODES defaults to 1; 0 is allowed)
#   KUBEFORGE_REAL_NODE=1 adds a real node (start-node.sh: kubelet, containerd, CNI, kube-proxy,
#   kube-router, CoreDNS, local-path-provisioner) in a network namespace of its own
#   (node-network.sh); kube-apiserver then binds the host end of that namespace's veth instead
#   of 127.0.0.1, so that pods can reach it, and the `kubernetes` Service gets its endpoint.
#   Binaries: $KUBEFORGE_TESTBED_BIN, else the dir printed by ./build.sh (built if needed).
#   Node shape: KUBEFORGE_NODE_GPUS (8), KUBEFORGE_NODE_CPU (32), KUBEFORGE_NODE_MEMORY (256Gi),
#               KUBEFORGE_NODE_PODS (110). Readiness timeout per step: KUBEFORGE_START_TIMEOUT (120 s).
#
# On success WORKDIR holds:
#   kubeconfig      admin kubeconfig (bearer token, CA = pki/ca.crt)
#   cluster.env     APISERVER_URL, TOKEN, KUBECONFIG, CA_FILE, ports, ... (shell-sourceable)
#   pids            "<name> <pid> <binary>" for every process this script started
#   logs/*.log      one log per component
# and the last stdout line is the kubeconfig path. Stop with: stop-cluster.sh WORKDIR
# (kills only the PIDs recorded in WORKDIR/pids). On any failure the script stops what it
# started, prints the failing component's log tail and exits non-zero.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
wd="${1:?usage: start-cluster.sh WORKDIR [NODES]}"
nodes="${2:-1}"
timeout="${KUBEFORGE_START_TIMEOUT:-120}"
mkdir -p "$wd"
wd="$(cd "$wd" && pwd)"

t0=$(date +%s)
log() { printf '[cluster %4ss] %s\n' "$(( $(date +%s) - t0 ))" "$*" >&2; }
fail() {
  local comp="$1"; shift
  printf '[cluster] ERROR: %s: %s\n' "$comp" "$*" >&2
  if [[ -f "$wd/logs/$comp.log" ]]; then
    printf '[cluster] --- last 40 lines of %s ---\n' "$wd/logs/$comp.log" >&2
    tail -n 40 "$wd/logs/$comp.log" >&2 || true
  fi
  "$here/stop-cluster.sh" "$wd" >&2 || true
  exit 1
}

if [[ -s "$wd/pids" ]]; then
  echo "[cluster] ERROR: $wd/pids exists; a cluster may be running there (run stop-cluster.sh $wd first)" >&2
  exit 1
fi

bin="${KUBEFORGE_TESTBED_BIN:-}"
if [[ -z "$bin" ]]; then
  bin="$("$here/build.sh" | tail -n 1)" || { echo "[cluster] ERROR: build.sh failed" >&2; exit 1; }
fi
for b in etcd kube-apiserver kube-controller-manager kube-scheduler kwok; do
  [[ -x "$bin/$b" ]] || { echo "[cluster] ERROR: $bin/$b missing" >&2; exit 1; }
done

rm -rf "$wd/etcd-data" "$wd/logs" "$wd/pki" "$wd/node"
mkdir -p "$wd/logs" "$wd/pki"
: > "$wd/pids"

real_node="${KUBEFORGE_REAL_NODE:-0}"
api_ip=127.0.0.1
if [[ "$real_node" == 1 ]]; then
  (( EUID == 0 )) || fail setup "KUBEFORGE_REAL_NODE=1 needs root (network namespace, containerd, kubelet)"
  "$here/node-network.sh" up "$wd" || fail setup "node-network.sh up failed"
  # shellcheck disable=SC1091
  source "$wd/node/network.env"
  api_ip="$HOST_IP"
fi

# ---- ports -------------------------------------------------------------------
read -r p_etcd p_peer p_api p_kcm p_sched < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(5):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)

# ---- credentials ---------------------------------------------------------------
pki="$wd/pki"
openssl_q() { openssl "$@" >/dev/null 2>&1; }
openssl_q req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=kubeforge-test-ca" \
  -keyout "$pki/ca.key" -out "$pki/ca.crt" || fail setup "openssl: CA"
openssl_q req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
  -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" || fail setup "openssl: apiserver CSR"
printf 'subjectAltName=IP:127.0.0.1,IP:%s,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.96.0.1\nextendedKeyUsage=serverAuth\n' "$api_ip" > "$pki/apiserver.ext"
openssl_q x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
  -days 3650 -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt" || fail setup "openssl: apiserver cert"
openssl_q genrsa -out "$pki/sa.key" 2048 || fail setup "openssl: SA key"
openssl_q rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" || fail setup "openssl: SA pub"
token="$(openssl rand -hex 24)"
printf '%s,kubeforge-admin,kubeforge-admin,"system:masters"\n' "$token" > "$pki/tokens.csv"
kubelet_client=()
if [[ "$real_node" == 1 ]]; then
  # The node's own identities: the Node authorizer and the default system:node-proxier binding
  # give kubelet and kube-proxy exactly their rights.
  NODE_TOKEN="$(openssl rand -hex 24)" PROXY_TOKEN="$(openssl rand -hex 24)"
  printf '%s,system:node:%s,%s,"system:nodes"\n' "$NODE_TOKEN" "$NODE_NAME" "$NODE_NAME" >> "$pki/tokens.csv"
  printf '%s,system:kube-proxy,system:kube-proxy\n' "$PROXY_TOKEN" >> "$pki/tokens.csv"
  # kube-apiserver's client certificate for kubelet's API (logs, exec, port-forward).
  openssl_q req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=kube-apiserver-kubelet-client" \
    -keyout "$pki/kubelet-client.key" -out "$pki/kubelet-client.csr" || fail setup "openssl: kubelet client CSR"
  printf 'extendedKeyUsage=clientAuth\n' > "$pki/kubelet-client.ext"
  openssl_q x509 -req -in "$pki/kubelet-client.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 3650 -extfile "$pki/kubelet-client.ext" -out "$pki/kubelet-client.crt" || fail setup "openssl: kubelet client cert"
  kubelet_client=(--kubelet-client-certificate="$pki/kubelet-client.crt" --kubelet-client-key="$pki/kubelet-client.key"
                  --kubelet-preferred-address-types=InternalIP
                  --endpoint-reconciler-type=lease)
else
  kubelet_client=(--endpoint-reconciler-type=none)
fi
chmod 600 "$pki"/*.key "$pki/tokens.csv"

api="https://$api_ip:$p_api"
kc="$wd/kubeconfig"
cat > "$kc" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kubeforge
  cluster:
    server: $api
    certificate-authority: $pki/ca.crt
users:
- name: kubeforge-admin
  user:
    token: $token
contexts:
- name: kubeforge
  context:
    cluster: kubeforge
    user: kubeforge-admin
current-context: kubeforge
EOF
chmod 600 "$kc"

launcher=()
# shellcheck source=lib.sh
source "$here/lib.sh"

# ---- etcd --------------------------------------------------------------------------
start etcd "$bin/etcd" \
  --name=kubeforge \
  --data-dir="$wd/etcd-data" \
  --listen-client-urls="http://127.0.0.1:$p_etcd" \
  --advertise-client-urls="http://127.0.0.1:$p_etcd" \
  --listen-peer-urls="http://127.0.0.1:$p_peer" \
  --initial-advertise-peer-urls="http://127.0.0.1:$p_peer" \
  --initial-cluster="kubeforge=http://127.0.0.1:$p_peer" \
  --initial-cluster-state=new \
  --unsafe-no-fsync=true \
  --quota-backend-bytes=2147483648 \
  --log-level=warn
etcd_healthy() { curl -sf --max-time 5 "http://127.0.0.1:$p_etcd/health" | grep -q '"health":"true"'; }
wait_for etcd "healthy" etcd_healthy

# ---- kube-apiserver ----------------------------------------------------------------
start kube-apiserver "$bin/kube-apiserver" \
  --etcd-servers="http://127.0.0.1:$p_etcd" \
  --bind-address="$api_ip" \
  --advertise-address="$api_ip" \
  --secure-port="$p_api" \
  --tls-cert-file="$pki/apiserver.crt" \
  --tls-private-key-file="$pki/apiserver.key" \
  --client-ca-file="$pki/ca.crt" \
  --token-auth-file="$pki/tokens.csv" \
  --requestheader-client-ca-file="$pki/ca.crt" \
  --requestheader-allowed-names=front-proxy-client \
  --requestheader-username-headers=X-Remote-User \
  --requestheader-group-headers=X-Remote-Group \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --authorization-mode=Node,RBAC \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$pki/sa.pub" \
  --service-account-signing-key-file="$pki/sa.key" \
  --service-cluster-ip-range=10.96.0.0/16 \
  "${kubelet_client[@]}" \
  --allow-privileged=true \
  --enable-priority-and-fairness=false \
  --profiling=false
wait_for kube-apiserver "ready (/readyz)" curl_api "$api/readyz"

# ---- kube-controller-manager and kube-scheduler ------------------------------------
start kube-controller-manager "$bin/kube-controller-manager" \
  --kubeconfig="$kc" \
  --authentication-kubeconfig="$kc" \
  --authorization-kubeconfig="$kc" \
  --bind-address=127.0.0.1 \
  --secure-port="$p_kcm" \
  --leader-elect=false \
  --service-account-private-key-file="$pki/sa.key" \
  --root-ca-file="$pki/ca.crt" \
  --cluster-signing-cert-file="$pki/ca.crt" \
  --cluster-signing-key-file="$pki/ca.key" \
  --use-service-account-credentials=false \
  --profiling=false
start kube-scheduler "$bin/kube-scheduler" \
  --kubeconfig="$kc" \
  --authentication-kubeconfig="$kc" \
  --authorization-kubeconfig="$kc" \
  --bind-address=127.0.0.1 \
  --secure-port="$p_sched" \
  --leader-elect=false \
  --profiling=false
healthz() { curl -sfk --max-time 5 "https://127.0.0.1:$1/healthz"; }
wait_for kube-controller-manager "healthy (/healthz)" healthz "$p_kcm"
wait_for kube-scheduler "healthy (/healthz)" healthz "$p_sched"

# ---- kwok ----------------------------------------------------------------------------
# No --node-port/--server-address: kwok serves nothing. Pod/node IPs below are only
# written into object statuses; nothing ever connects to them.
start kwok "$bin/kwok" \
  --kubeconfig="$kc" \
  --config="$here/kwok-stages.yaml" \
  --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
  --node-ip=10.255.0.1 \
  --cidr=10.244.0.0/16 \
  --node-lease-duration-seconds=40

# ---- fake GPU nodes ------------------------------------------------------------------
gpus="${KUBEFORGE_NODE_GPUS:-8}" cpu="${KUBEFORGE_NODE_CPU:-32}"
mem="${KUBEFORGE_NODE_MEMORY:-256Gi}" maxpods="${KUBEFORGE_NODE_PODS:-110}"
for (( i = 0; i < nodes; i++ )); do
  n="kwok-node-$i"
  res="{\"cpu\":\"$cpu\",\"memory\":\"$mem\",\"pods\":\"$maxpods\",\"nvidia.com/gpu\":\"$gpus\"}"
  body="{\"apiVersion\":\"v1\",\"kind\":\"Node\",\"metadata\":{\"name\":\"$n\",
    \"labels\":{\"type\":\"kwok\",\"kubernetes.io/hostname\":\"$n\",\"kubernetes.io/os\":\"linux\",\"kubernetes.io/arch\":\"amd64\",\"nvidia.com/gpu.present\":\"true\"},
    \"annotations\":{\"kwok.x-k8s.io/node\":\"fake\",\"node.alpha.kubernetes.io/ttl\":\"0\"}},
    \"spec\":{},
    \"status\":{\"capacity\":$res,\"allocatable\":$res}}"
  curl_api -X POST -H 'Content-Type: application/json' --data "$body" "$api/api/v1/nodes" >/dev/null \
    || fail kwok "cannot create node $n"
done
log "created $nodes node(s) with nvidia.com/gpu=$gpus"

nodes_ready() { # every node Ready=True and without the not-ready/unreachable taints
  curl_api "$api/api/v1/nodes" | python3 -c '
import json, sys
items = json.load(sys.stdin)["items"]
want = int(sys.argv[1])
ok = 0
for n in items:
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", []))
    tainted = any(t["key"].startswith("node.kubernetes.io/") for t in n.get("spec", {}).get("taints", []) or [])
    ok += ready and not tainted
sys.exit(0 if ok >= want else 1)' "$nodes"
}
wait_for kwok "$nodes node(s) Ready and untainted" nodes_ready
wait_for kube-controller-manager "default ServiceAccount exists" curl_api "$api/api/v1/namespaces/default/serviceaccounts/default"

if [[ "$real_node" == 1 ]]; then
  bin="$bin" api="$api" token="$token" pki="$pki" timeout="$timeout" NODE_TOKEN="$NODE_TOKEN" PROXY_TOKEN="$PROXY_TOKEN" \
    "$here/start-node.sh" "$wd" || fail setup "start-node.sh failed (logs in $wd/logs)"
fi

cat > "$wd/cluster.env" <<EOF
KUBECONFIG=$kc
APISERVER_URL=$api
TOKEN=$token
CA_FILE=$pki/ca.crt
ETCD_URL=http://127.0.0.1:$p_etcd
KCM_PORT=$p_kcm
SCHEDULER_PORT=$p_sched
BIN_DIR=$bin
NODES=$nodes
REAL_NODE=$( [[ "$real_node" == 1 ]] && echo "$NODE_NAME" )
EOF
log "cluster ready in $(( $(date +%s) - t0 ))s: $api (KUBECONFIG=$kc)"
printf '%s\n' "$kc"
