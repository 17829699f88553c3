"""B5: async against sync training on the example job, as a fraction of the ideal overlap.

Runs apps/grpo/tiny.yaml twice in one invocation, same seed and steps: `mode: sync`, then
`mode: async` with maxStaleness 1. From the sync run's rows it takes the mean time of the
generation side (generate + reward) and of the training side (train + weight sync) per step; if
the two overlapped perfectly a step would take max of them instead of their sum, so

    ideal speedup    = (T_gen + T_train) / max(T_gen, T_train)
    achieved speedup = sync step time / async step time
    result           = achieved / ideal            (goal >= 0.9)

The first steps (start-up, compilation) are left out of every mean.

    python bench/async_bench.py [--steps 16] [--skip 3] [--model runs/models/tiny-qwen3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def run(mode: str, steps: int, model: Path, out: Path) -> list[dict[str, Any]]:
    job = yaml.safe_load((REPO / "apps/grpo/tiny.yaml").read_text())
    spec = job["spec"]
    spec.update(steps=steps, mode=mode)
    spec["model"]["path"] = str(model)
    spec["algorithm"]["evalEvery"] = 10_000  # evaluation only at the end: it is not what is measured
    if mode == "async":
        spec["maxStaleness"] = 1
    path = out / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(job))
    run_dir = out / mode
    print(f"running the example job in {mode} mode ({steps} steps)...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "kubeforge.cli", "run", str(path), "--run-dir", str(run_dir), "--no-color"],
        cwd=REPO, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward_mean" in r]


def mean(rows: list[dict[str, Any]], *keys: str) -> float:
    return statistics.mean(sum(r[k] for k in keys) for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of the means")
    parser.add_argument("--model", type=Path, default=REPO / "runs/models/tiny-qwen3")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        subprocess.run([sys.executable, "-m", "kubeforge.tiny_model", str(args.model)], check=True)
    with tempfile.TemporaryDirectory(prefix="kubeforge-async-bench-") as tmp:
        sync = run("sync", args.steps, args.model.resolve(), Path(tmp))[args.skip :]
        async_ = run("async", args.steps, args.model.resolve(), Path(tmp))[args.skip :]
    t_gen = mean(sync, "generate_seconds", "reward_seconds")
    t_train = mean(sync, "train_seconds", "sync_seconds")
    ideal = (t_gen + t_train) / max(t_gen, t_train)
    achieved = mean(sync, "step_seconds") / mean(async_, "step_seconds")
    print()
    print(f"{'':<28}{'seconds':>10}")
    print(f"{'T_gen (generate + reward)':<28}{t_gen:>10.3f}")
    print(f"{'T_train (train + sync)':<28}{t_train:>10.3f}")
    print(f"{'sync step':<28}{mean(sync, 'step_seconds'):>10.3f}")
    print(f"{'async step (maxStaleness 1)':<28}{mean(async_, 'step_seconds'):>10.3f}")
    print(f"ideal speedup {ideal:.2f}x, achieved {achieved:.2f}x: {achieved / ideal:.2f} of the ideal (goal 0.9)")
    print(f"async staleness max {max(r['staleness_max'] for r in async_)}")


if __name__ == "__main__":
    main()
