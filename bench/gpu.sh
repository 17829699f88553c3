#!/usr/bin/env bash
# One command on a GPU machine for the GPU benchmarks, each with its baseline in the same run:
#   bench/gpu.sh [b1] [b6] [b9]      (default: all three; tables printed last)
#   b1: weight sync, Qwen3-0.6B and 1.7B sizes ($B1_MODELS), trainer GPUs x receiver GPUs in $B1_CASES (4 GPUs),
#       buckets of $B1_BUCKETS MiB, $B1_ROUNDS timed rounds; with $B1_TRACE (a directory), a torch profiler trace of the first case
#   b6: trainer step (GRPO) vs torchtitan's step, Qwen3-1.7B size, 1 then 2 GPUs
#   gaps: bench/profile_gaps.py, the trainer's functions against candidate fixes (not run by default)
#   b9: weight sync, Qwen3-8B size, FSDP2 over 2 trainer GPUs -> 2 receivers ($B9_CASES; 4 GPUs)
# The GPU image has torch but not torchtitan or pydantic: wheels from $WHEELS (runs/gpu-wheels, see
# bench/README.md) are installed to /tmp/site when they are missing. Results: $OUT (runs/bench/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-runs/bench/gpu}
WHEELS=${WHEELS:-runs/gpu-wheels}
GPUS=$(nvidia-smi -L | wc -l)
# Trainer GPUs x receiver GPUs. On 2 GPUs, 2x1 puts the receiver on trainer rank 1's GPU (shared).
if [ "$GPUS" -ge 4 ]; then B1=1x1,1x2,1x3,2x1,2x2 B9=2x2; else B1=1x1,2x1 B9=1x1,2x1; fi
B1_CASES=${B1_CASES:-$B1}
B9_CASES=${B9_CASES:-$B9}
mkdir -p "$OUT"
if ! python3 -c 'import torchtitan, pydantic' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(b1 b6 b9)
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, torchtitan; print("torch", torch.__version__, "nccl", ".".join(map(str, torch.cuda.nccl.version())), "torchtitan", torchtitan.__version__ if hasattr(torchtitan, "__version__") else "0.2.2")'
} | tee "$OUT/env.txt"
status=0
for step in "${steps[@]}"; do
  case $step in
    b1) cmd=(python3 bench/weight_sync_bench.py --models "${B1_MODELS:-qwen3-0.6b,qwen3-1.7b}" --cases "$B1_CASES"
             --bucket-mb "${B1_BUCKETS:-32,64,256,1024}" --rounds "${B1_ROUNDS:-4}" --out "$OUT/b1.json" ${B1_TRACE:+--trace "$B1_TRACE"}) ;;
    b6) cmd=(bash -c "for n in ${B6_GPUS:-1 2}; do python3 -m torch.distributed.run --nproc-per-node \$n bench/trainer_bench.py \
             --model qwen3-1.7b --seq 2048 --rows-per-rank 16 --micro 4 --order ${B6_ORDER:-kubeforge-first} --steps ${B6_STEPS:-4} \
             --out $OUT/b6-\$n.json ${B6_TRACE:+--trace $B6_TRACE} --activation-checkpointing ${B6_AC:-none} || exit; done") ;;
    b9) cmd=(python3 bench/weight_sync_bench.py --models qwen3-8b --cases "$B9_CASES" --bucket-mb 256,1024 --rounds 4
             --out "$OUT/b9.json") ;;
    gaps) cmd=(python3 -m torch.distributed.run --nproc-per-node 1 bench/profile_gaps.py --model qwen3-1.7b) ;;
    *) echo "unknown step $step: expected b1, b6 or b9" >&2; exit 2 ;;
  esac
  echo "== $step: ${cmd[*]}"
  # A step that hangs (a collective whose peer died) must not take the other steps' time: it runs
  # in a process group of its own, ended whole (its spawned ranks too) after STEP_TIMEOUT_S.
  setsid "${cmd[@]}" > "$OUT/$step.log" 2>&1 &
  pid=$!
  (sleep "${STEP_TIMEOUT_S:-240}"; kill -- "-$pid" 2>/dev/null) &
  watchdog=$!
  wait "$pid" || { status=1; echo "== $step FAILED"; grep -v -E '^frame #|Warning' "$OUT/$step.log" | tail -25; }
  kill "$watchdog" 2>/dev/null
done
for step in "${steps[@]}"; do
  echo "== $step"
  grep -A30 -E '^(model +TxR|side +GPUs|qwen3-)' "$OUT/$step.log" | grep -v -E '^\[|Warning|warn'
done
exit $status
