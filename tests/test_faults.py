"""The example job survives losing each of its roles, and async training stays within its staleness bound.

Real processes, killed by signal while the job runs (slow tier). After each run the episode
ledger (RUN_DIR/episodes.json) must show every prompt of the data stream with exactly one group
of episodes, all trained: nothing lost, nothing counted twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def tiny_job(tmp_path: Path, model: Path, **changes: Any) -> Path:
    """apps/grpo/tiny.yaml on `model`, with `changes` merged into its spec."""
    job = yaml.safe_load((REPO / "apps/grpo/tiny.yaml").read_text())
    job["spec"]["model"]["path"] = str(model)
    for key, value in changes.items():
        target = job["spec"]
        *parents, last = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[last] = value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def role_process(run_dir: Path, role: str, replica: int = 0, **env: str) -> psutil.Process | None:
    """The live process of `role`-`replica` in this run (its environment says which it is)."""
    for process in psutil.process_iter():
        try:
            found = process.environ()
        except (psutil.Error, OSError):
            continue
        wanted = {"KUBEFORGE_RUN_DIR": str(run_dir), "KUBEFORGE_ROLE": role, "KUBEFORGE_REPLICA": str(replica), **env}
        if all(found.get(k) == v for k, v in wanted.items()):
            return process
    return None


def trained_steps(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines if '"reward_mean"' in line), default=0)


def run_job(job: Path, run_dir: Path, during: Callable[[], None] = lambda: None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "kubeforge.cli", "run", str(job), "--run-dir", str(run_dir), "--no-color"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    chaos = threading.Thread(target=during, daemon=True)
    chaos.start()
    out, _ = process.communicate(timeout=2200)
    chaos.join(timeout=5)
    return subprocess.CompletedProcess(command, process.returncode, out, "")


def check_ledger(run_dir: Path, steps: int, prompts: int, group: int) -> None:
    ledger = json.loads((run_dir / "episodes.json").read_text())
    episodes = [(p, s) for p, s, _, _ in ledger["episodes"]]
    assert len(episodes) == len(set(episodes)), "an episode is counted twice"
    assert {p for p, _ in episodes} == set(range(steps * prompts)), "a prompt of the stream is missing"
    assert sorted(episodes) == [(p, s) for p in range(steps * prompts) for s in range(group)]
    assert ledger["counts"]["trained"] == steps * prompts * group, ledger["counts"]
    assert ledger["counts"]["in_flight"] == ledger["counts"]["buffered"] == ledger["counts"]["failed"] == 0


def evals(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_reward" in r]


def test_the_job_survives_losing_a_generator_a_reward_the_trainer_and_the_controller(tmp_path, tiny_model):
    steps = 30
    job = tiny_job(
        tmp_path, tiny_model, steps=steps, **{"roles.generator.replicas": 2, "checkpoint.interval": 5,
                                                "failurePolicy.maxRestarts": 6}
    )  # fmt: skip
    run_dir = tmp_path / "run"
    killed: list[str] = []

    def kill_at(step: int, role: str, **env: str) -> None:
        while trained_steps(run_dir) < step:
            time.sleep(0.2)
        time.sleep(1.0)  # into the next step's generation
        deadline = time.monotonic() + 120
        while (process := role_process(run_dir, role, **env)) is None:
            assert time.monotonic() < deadline, f"no {role} process to kill"
            time.sleep(0.5)
        os.kill(process.pid, signal.SIGKILL)
        killed.append(role)

    def chaos() -> None:
        kill_at(3, "generator", replica="1")
        kill_at(8, "reward")
        kill_at(13, "trainer", LOCAL_RANK="0")  # a torchrun worker: rank 0 of the trainer group
        kill_at(21, "controller")

    result = run_job(job, run_dir, chaos)
    assert result.returncode == 0, result.stdout[-6000:]
    assert killed == ["generator", "reward", "trainer", "controller"]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["restarts"] == 4, status
    assert status["restartsByRole"] == {"generator": 1, "reward": 1, "trainer": 1, "controller": 1}
    check_ledger(run_dir, steps, prompts=16, group=8)

    # The restarted generator waited for the trainer's weights before serving anything.
    generator_log = (run_dir / "logs" / "generator-1.log").read_text()
    waited = generator_log.index("waiting for its weights before serving")
    assert "weights v" in generator_log[waited:]
    # Learning went on: the held-out reward rose as far as the undisturbed run's test asks.
    found = evals(run_dir)
    before, after = found[0]["eval_correctness"], found[-1]["eval_correctness"]
    assert after >= before + 0.4, found


def test_async_training_overlaps_and_never_trains_on_samples_beyond_max_staleness(tmp_path, tiny_model):
    steps = 20
    job = tiny_job(tmp_path, tiny_model, steps=steps, mode="async", maxStaleness=1)
    run_dir = tmp_path / "run"
    result = run_job(job, run_dir)
    assert result.returncode == 0, result.stdout[-6000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in trained] == list(range(1, steps + 1))
    assert max(r["staleness_max"] for r in trained) <= 1
    assert any(r["staleness_max"] == 1 for r in trained), "async never ran ahead of the trainer"
    check_ledger(run_dir, steps, prompts=16, group=8)
    found = evals(run_dir)
    assert found[-1]["eval_correctness"] >= found[0]["eval_correctness"] + 0.4, found
