"""The GRPO app: advantages and batch building (fast), and the example job end to end (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kubeforge.algorithm import Algorithm
from kubeforge.validation import SpecError, parse_spec

from apps.grpo.main import EVAL_EVERY, Rollouts, build_batch
from apps.grpo.task import CopyTask, Example

REPO = Path(__file__).resolve().parents[1]


def test_batch_rows_are_prompt_then_completion_with_versions():
    example = Example("ab", "ab")
    rollouts = Rollouts(
        examples=[example, example],
        prompt_ids=[[5, 17, 18, 2, 6], [5, 17, 18, 2, 6]],
        completion_ids=[[17, 18, 2], [19]],
        logprobs=[[-0.1, -0.2, -0.3], [-4.0]],
        policy_versions=[3, 2],
        completions=["ab", "c"],
    )
    batch = build_batch(rollouts, [1.0, -1.0], step=7)
    assert batch.input_ids.tolist() == [[5, 17, 18, 2, 6, 17, 18, 2], [5, 17, 18, 2, 6, 19, 0, 0]]
    assert batch.response_mask.tolist() == [[False] * 5 + [True] * 3, [False] * 5 + [True, False, False]]
    assert batch.behaviour_logprobs[0, 5:].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert batch.advantages.tolist() == [1.0, -1.0]
    assert batch.policy_versions.tolist() == [3, 2]
    assert batch.info == {"step": 7}
    assert type(batch).decode(batch.encode()).input_ids.equal(batch.input_ids)


def test_task_splits_are_disjoint_and_seeded():
    task = CopyTask(seed=3)
    held_out = {e.prompt for e in task.held_out}
    assert held_out.isdisjoint(e.prompt for e in task.train)
    assert len(held_out) == 32 and len(task.train) == 125 - 32
    assert [task.at(p).prompt for p in range(5)] == [CopyTask(seed=3).at(p).prompt for p in range(5)]
    assert [task.at(p).prompt for p in range(20)] != [CopyTask(seed=4).at(p).prompt for p in range(20)]
    assert task.at(0, stream="warmup") != task.at(0) or task.at(1, stream="warmup") != task.at(1)
    assert all(task.at(p).answer == task.at(p).prompt for p in range(20))


def test_config_reads_camel_case_algorithm_keys():
    cfg = Algorithm.model_validate({"groupSize": "4", "promptsPerStep": 2, "temperature": 0.7, "lr": 0.1})
    assert (cfg.group_size, cfg.prompts_per_step, cfg.temperature, cfg.eval_every) == (4, 2, 0.7, None)
    assert EVAL_EVERY == 10  # the app's own, for a job that leaves evalEvery unset


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_example_job_raises_the_held_out_reward(tmp_path):
    """`kubeforge run apps/grpo/tiny.yaml` end to end; the held-out reward must rise by a large margin."""
    model = REPO / "runs" / "models" / "tiny-qwen3"
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, "-m", "kubeforge.tiny_model", str(model)], check=True, cwd=REPO)
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "kubeforge.cli", "run", "apps/grpo/tiny.yaml", "--run-dir", str(run_dir), "--no-color"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1400,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_reward" in r]
    before, after = evals[0]["eval_correctness"], evals[-1]["eval_correctness"]
    print(f"held-out correctness {before:.3f} -> {after:.3f} in {time.monotonic() - started:.0f} s")
    assert after >= before + 0.4, evals
    warmed_up = evals[1]["eval_correctness"]  # step 0 again, after the supervised warm-up
    assert after >= warmed_up + 0.2, evals  # and RL itself, not only the warm-up, moved it
    last_step = [r for r in rows if "reward_mean" in r][-1]
    for key in ("generate_seconds", "reward_seconds", "train_seconds", "sync_seconds", "policy_version"):
        assert key in last_step
    assert (run_dir / "reward.png").read_bytes().startswith(b"\x89PNG")
    ledger = json.loads((run_dir / "episodes.json").read_text())
    assert ledger["counts"]["trained"] == 40 * 16 * 8  # steps x prompts x group: every episode trained once


def test_warmup_batch_is_the_answer_then_eos_trained_with_the_sft_loss(tmp_path):
    from kubeforge.tiny_model import write_tiny_model
    from transformers import AutoTokenizer

    from apps.grpo.main import Policy, warmup_batch

    tokenizer = AutoTokenizer.from_pretrained(write_tiny_model(tmp_path / "tiny", seed=0))
    policy = Policy([], tokenizer)
    batch = warmup_batch(policy, [Example("ab", "ab")], version=4)
    prompt = policy.encode(Example("ab", "ab"))
    eos = tokenizer.eos_token_id
    assert batch.input_ids[0].tolist() == [*prompt, *tokenizer("ab", add_special_tokens=False)["input_ids"], eos]
    assert batch.response_mask[0].tolist() == [False] * len(prompt) + [True] * 3
    assert batch.info["loss"] == "sft"  # cross-entropy on the answer, whatever the job's RL loss
    assert batch.policy_versions.tolist() == [4]
    assert policy.decode(batch.input_ids[0, len(prompt) :].tolist()) == "ab"  # stops at <eos>


def test_a_bad_algorithm_value_names_the_field():
    with pytest.raises(SpecError, match=r"spec.algorithm.groupSize: got 'many'; expected a valid integer"):
        parse_spec({"model": {"path": "/m"}, "algorithm": {"groupSize": "many"}})


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_reference_replica_gives_the_kl_penalty_its_logprobs(tmp_path, tiny_model):
    """GRPO with `roles.reference.enabled`: the app fetches ref_logprobs from the reference replica;
    the KL to the frozen initial policy starts at 0 and grows as the policy moves."""
    job = yaml.safe_load((REPO / "apps/grpo/tiny.yaml").read_text())
    spec = job["spec"]
    spec.update(steps=6)
    spec["model"]["path"] = str(tiny_model)
    spec["roles"]["reference"] = {"enabled": True}
    spec["algorithm"].update(warmupSteps=0, klCoef=0.05, evalEvery=100)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "kubeforge.cli", "run", str(path), "--run-dir", str(run_dir), "--no-color"],
        cwd=REPO, capture_output=True, text=True, timeout=850,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kl = [r["kl"] for r in rows if "reward_mean" in r]
    assert len(kl) == 6 and abs(kl[0]) < 1e-5 and kl[-1] > 1e-4, kl
