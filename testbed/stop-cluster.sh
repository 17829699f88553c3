#!/usr/bin/env bash
# Stop a cluster started by start-cluster.sh WORKDIR. Kills only the processes listed in
# WORKDIR/pids, and only while the PID still runs the recorded binary (guards against PID
# reuse). Order: newest first (kwok, scheduler, KCM, apiserver, etcd last); each gets SIGTERM
# and up to KUBEFORGE_STOP_GRACE seconds (default 10), then SIGKILL.
# Leaves WORKDIR (logs, etcd data, kubeconfig) in place; deletes WORKDIR/pids.
set -uo pipefail
wd="${1:?usage: stop-cluster.sh WORKDIR}"
grace="${KUBEFORGE_STOP_GRACE:-10}"
pidfile="$wd/pids"
[[ -f "$pidfile" ]] || exit 0
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The real node first (its pods, services, mounts and network), while the API server still runs.
[[ -d "$wd/node" ]] && "$here/stop-node.sh" "$wd"

ours() { [[ -d "/proc/$1" && "$(readlink "/proc/$1/exe" 2>/dev/null)" == "$2" ]]; }

mapfile -t lines < <(tac "$pidfile")
for line in "${lines[@]}"; do
  read -r name pid exe <<<"$line"
  [[ -n "${pid:-}" ]] && ours "$pid" "$exe" || continue
  t0=$(date +%s%N)
  kill -TERM "$pid" 2>/dev/null || continue
  for (( i = 0; i < grace * 10; i++ )); do ours "$pid" "$exe" || break; sleep 0.1; done
  if ours "$pid" "$exe"; then
    echo "[cluster] $name (pid $pid) still running ${grace}s after SIGTERM; sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null
  fi
  echo "[cluster] stopped $name (pid $pid) in $(( ($(date +%s%N) - t0) / 1000000 )) ms" >&2
done
rm -f "$pidfile"
exit 0
