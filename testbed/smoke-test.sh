#!/usr/bin/env bash
# usage: smoke-test.sh WORKDIR -- smoke test of a cluster started by start-cluster.sh
# (uses kubectl from PATH; prints PASS/FAIL lines, exits non-zero on the first failure)
set -euo pipefail
export KUBECONFIG="$1/kubeconfig"
k() { kubectl "$@"; }
waitfor() { local d=$(( $(date +%s) + 30 )); until eval "$1"; do (( $(date +%s) < d )) || { echo "FAIL: $2"; exit 1; }; sleep 0.2; done; echo "PASS: $2"; }
ns=verify-$RANDOM; k create ns $ns >/dev/null
waitfor "k -n $ns get sa default >/dev/null 2>&1" "default SA in new namespace"
pod() { cat <<J | k -n $ns apply -f - >/dev/null
{"apiVersion":"v1","kind":"Pod","metadata":{"name":"$1","labels":$2${3:+,\"ownerReferences\":$3}},
 "spec":{"restartPolicy":"Never","containers":[{"name":"main","image":"fake/x","resources":{"limits":{"nvidia.com/gpu":1}}}]}}
J
}
phase() { k -n $ns get pod "$1" -o jsonpath='{.status.phase}' 2>/dev/null; }
pod gpu '{}'
waitfor '[ "$(phase gpu)" = Running ]' "GPU pod scheduled ($(k -n $ns get pod gpu -o jsonpath='{.spec.nodeName}')) and Running"
k -n $ns create configmap owner >/dev/null
uid=$(k -n $ns get cm owner -o jsonpath='{.metadata.uid}')
pod owned '{}' "[{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"name\":\"owner\",\"uid\":\"$uid\"}]"
waitfor '[ "$(phase owned)" = Running ]' "owned pod Running"
k -n $ns delete cm owner >/dev/null
waitfor '! k -n $ns get pod owned >/dev/null 2>&1' "owned pod garbage-collected after owner ConfigMap deletion"
pod failing '{"kwok.kubeforge.dev/fail":"true"}'
waitfor '[ "$(phase failing)" = Failed ]' "pod labelled kwok.kubeforge.dev/fail=true is Failed (exit $(k -n $ns get pod failing -o jsonpath='{.status.containerStatuses[0].state.terminated.exitCode}' 2>/dev/null))"
sleep 3; [ "$(phase gpu)" = Running ] && echo "PASS: unlabelled pod still Running after 3s (no auto-complete)"
waitfor '[ -z "$(k get nodes -o jsonpath="{.items[*].spec.taints}")" ] && ! k get nodes --no-headers | grep -vq " Ready "' "all nodes Ready, no taints"
k delete ns $ns --wait=true --timeout=60s >/dev/null && echo "PASS: namespace deleted"
