# Shared by start-cluster.sh and start-node.sh (sourced, not run). Expects: $wd (the cluster's work
# dir), $timeout (seconds per wait), $pki and $token (for curl_api), and functions log and fail.
# `launcher` (an array, default empty) prefixes every started command: start-node.sh sets it to
# nsenter into the node's network namespace.

# start NAME EXE [ARGS...]: run EXE in the background, its output in logs/NAME.log, and record
# "NAME PID BINARY" in pids (stop-cluster.sh checks BINARY against /proc/PID/exe; nsenter execs
# EXE, so the pid is EXE's own either way).
start() {
  local name="$1" exe="$2"; shift 2
  "${launcher[@]}" "$exe" "$@" > "$wd/logs/$name.log" 2>&1 < /dev/null &
  local pid=$!
  printf '%s %s %s\n' "$name" "$pid" "$(readlink -f "$exe")" >> "$wd/pids"
  log "$name started (pid $pid)"
}

# alive NAME: the recorded process still runs.
alive() {
  local pid; pid=$(awk -v n="$1" '$1==n{print $2}' "$wd/pids" | tail -n 1)
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

# wait_for NAME DESCRIPTION COMMAND...: poll COMMAND until it succeeds (NAME must stay alive).
wait_for() {
  local name="$1" what="$2"; shift 2
  local deadline=$(( $(date +%s) + timeout ))
  until "$@" >/dev/null 2>&1; do
    alive "$name" || fail "$name" "exited while waiting for $what"
    (( $(date +%s) < deadline )) || fail "$name" "timed out after ${timeout}s waiting for $what"
    sleep 0.5
  done
  log "$name: $what"
}

curl_api() { curl -sf --max-time 10 --cacert "$pki/ca.crt" -H "Authorization: Bearer $token" "$@"; }
