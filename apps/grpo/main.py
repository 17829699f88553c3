"""GRPO: the RL loop, as a researcher reads it.

Each step: sample prompts, generate `groupSize` completions per prompt on the generators, score
them with the reward role, normalise rewards within each group (the advantages), train one step
on the trainer, publish the new weights to the generators. Every `evalEvery` steps, greedy
completions of the held-out split give the held-out reward.

    python -m apps.grpo.main --config apps/grpo/tiny.yaml     # or: kubeforge run apps/grpo/tiny.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import httpx
import torch
from kubeforge.batch import CONTENT_TYPE, TrainBatch
from kubeforge.controller import Job
from kubeforge.generator.wire import GeneratorClient
from kubeforge.rewards import RewardClient
from transformers import AutoTokenizer

from apps.grpo.task import CopyTask, Example

log = logging.getLogger("apps.grpo")


@dataclass(frozen=True)
class Config:
    """spec.algorithm keys the loop reads (camelCase in YAML); the trainer reads its own (lr, ...)."""

    seed: int = 0
    prompts_per_step: int = 16
    group_size: int = 8
    temperature: float = 1.0  # the trainer reads the same key: its logprobs must match the sampling
    eval_every: int = 10
    warmup_steps: int = 0  # supervised steps on the train split before RL (see `warmup_batch`)
    max_new_tokens: int = 0  # 0: the answer's length + 2 (room to stop or overrun)

    @classmethod
    def from_algorithm(cls, algorithm: dict[str, Any]) -> Config:
        values = {}
        for f in fields(cls):
            head, *rest = f.name.split("_")
            key = head + "".join(part.title() for part in rest)
            if key in algorithm:
                kind = type(f.default)
                try:
                    values[f.name] = kind(algorithm[key])
                except (TypeError, ValueError):
                    got = algorithm[key]
                    raise ValueError(f"spec.algorithm.{key}: got {got!r}; expected {kind.__name__}") from None
        return cls(**values)


@dataclass
class Rollouts:
    """One step's samples, grouped by prompt (`group_size` consecutive rows per prompt)."""

    examples: list[Example]  # one per row
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    policy_versions: list[int]
    completions: list[str]


def group_advantages(rewards: Sequence[float], group_size: int, eps: float = 1e-6) -> list[float]:
    """GRPO advantages: each reward minus its group's mean, over the group's std.

    A group whose samples all scored the same has no signal: its advantages are 0.
    """
    r = torch.tensor(rewards, dtype=torch.float32).view(-1, group_size)
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r)
    return ((r - r.mean(dim=1, keepdim=True)) / (std + eps)).flatten().tolist()


def build_batch(rollouts: Rollouts, advantages: Sequence[float], step: int) -> TrainBatch:
    """The trainer's batch; each row keeps the policy version that sampled it (staleness check)."""
    return TrainBatch.from_sequences(
        prompts=rollouts.prompt_ids,
        responses=rollouts.completion_ids,
        logprobs=rollouts.logprobs,
        advantages=advantages,
        policy_versions=rollouts.policy_versions,
        info={"step": step},
    )


class Policy:
    """The generators, seen as one policy: prompts are split across replicas and sampled concurrently."""

    def __init__(self, generators: list[GeneratorClient], tokenizer: Any):
        self.generators, self.tokenizer = generators, tokenizer

    def encode(self, example: Example) -> list[int]:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": example.prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )

    async def rollouts(
        self, examples: list[Example], *, n: int, max_tokens: int, temperature: float, seed: int
    ) -> Rollouts:
        prompts = [self.encode(e) for e in examples]
        share = -(-len(prompts) // len(self.generators))  # ceil: one contiguous share per replica
        chunks = [(g, i) for g, i in zip(self.generators, range(0, len(prompts), share), strict=False)]
        generations = await asyncio.gather(
            *(
                g.generate(prompts[i : i + share], n=n, max_tokens=max_tokens, temperature=temperature, seed=seed + i)
                for g, i in chunks
            )  # fmt: skip
        )
        out = Rollouts([], [], [], [], [], [])
        for (_, start), generation in zip(chunks, generations, strict=True):
            for k, (ids, lps) in enumerate(generation.samples()):
                p = start + generation.prompt_index[k]
                out.examples.append(examples[p])
                out.prompt_ids.append(prompts[p])
                out.completion_ids.append(ids)
                out.logprobs.append(lps)
                out.policy_versions.append(generation.policy_versions[k][0])
                out.completions.append(self.decode(ids))
        return out

    def decode(self, ids: list[int]) -> str:
        """The completion's text up to <eos>; a token that is not one character (the tiny tokenizer's
        reserved fillers) becomes U+FFFD, so that its name's letters earn no reward."""
        text = []
        for token in self.tokenizer.convert_ids_to_tokens(ids):
            if token == self.tokenizer.eos_token:
                break
            text.append(token if len(token) == 1 else "\ufffd")
        return "".join(text)


def warmup_batch(policy: Policy, examples: list[Example], version: int) -> TrainBatch:
    """A supervised batch (prompt -> answer + <eos>) for the trainer's GRPO loss.

    With behaviour log-probabilities of 0 (as if the answer had been sampled with probability 1)
    the ratio is r = p(token) <= 1 < 1 + clipEpsHigh, so with advantage 1 the unclipped term
    -r * A is taken: the loss is -p(token), whose gradient p * grad(log p) is the SFT gradient
    weighted by each token's probability. Adam normalises each parameter's step, so the small
    scale at the start (p ~ 1/vocab) does not slow it down.
    """
    eos = policy.tokenizer.eos_token_id
    answers = [policy.tokenizer(e.answer, add_special_tokens=False)["input_ids"] + [eos] for e in examples]
    return TrainBatch.from_sequences(
        prompts=[policy.encode(e) for e in examples],
        responses=answers,
        logprobs=[[0.0] * len(a) for a in answers],
        advantages=[1.0] * len(examples),
        policy_versions=[version] * len(examples),
        info={"warmup": True},
    )


def score_items(rollouts: Rollouts) -> list[dict[str, str]]:
    return [
        {"prompt": e.prompt, "completion": c, "answer": e.answer}
        for e, c in zip(rollouts.examples, rollouts.completions, strict=True)
    ]


async def evaluate(policy: Policy, rewards: RewardClient, task: CopyTask, max_tokens: int) -> dict[str, float]:
    """Mean reward (and each component) of greedy completions on the held-out split."""
    rollouts = await policy.rollouts(task.held_out, n=1, max_tokens=max_tokens, temperature=0.0, seed=0)
    scores = await rewards.score(task.name, score_items(rollouts))
    means = {f"eval_{name}": sum(v) / len(v) for name, v in scores["components"].items()}
    return {"eval_reward": sum(scores["rewards"]) / len(scores["rewards"]), **means}


class Trainer:
    """The trainer's HTTP API (global rank 0)."""

    def __init__(self, url: str, token: str):
        self.http = httpx.AsyncClient(base_url=url, timeout=600.0, headers={"Authorization": f"Bearer {token}"})

    async def _post(self, path: str, **kwargs: Any) -> dict[str, Any]:
        reply = await self.http.post(path, **kwargs)
        if reply.status_code != 200:
            raise RuntimeError(f"trainer {path}: HTTP {reply.status_code} {reply.text[:500]}")
        return reply.json()

    async def train(self, batch: TrainBatch) -> dict[str, Any]:
        return await self._post("/train", content=batch.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def publish(self) -> dict[str, Any]:
        return await self._post("/weights/publish", json={})

    async def checkpoint(self, app_state: dict[str, Any]) -> dict[str, Any]:
        return await self._post("/checkpoint", json={"app_state": app_state})


async def main(job: Job) -> None:
    cfg = Config.from_algorithm(job.spec.algorithm or {})
    task = CopyTask(seed=cfg.seed)
    max_tokens = cfg.max_new_tokens or task.length + 2
    tokenizer = AutoTokenizer.from_pretrained(job.spec.model.tokenizer or job.spec.model.path)
    policy = Policy([GeneratorClient(u, token=job.ctx.token) for u in job.urls("generator")], tokenizer)
    rewards = RewardClient(job.urls("reward"), token=job.ctx.token)
    trainer = Trainer(job.urls("trainer")[0], job.ctx.token)
    metrics_path = job.run_dir / "metrics.jsonl"
    started = time.monotonic()

    history = [{"step": 0, **await evaluate(policy, rewards, task, max_tokens)}]
    log.info("step 0: held-out reward %.3f", history[0]["eval_reward"])
    with metrics_path.open("w") as metrics:
        metrics.write(json.dumps(history[0]) + "\n")
        if cfg.warmup_steps:
            history.append(await warmup(cfg, task, policy, rewards, trainer, max_tokens))
            metrics.write(json.dumps(history[-1]) + "\n")
        for step in range(1, job.spec.steps + 1):
            row = await grpo_step(step, cfg, task, policy, rewards, trainer, max_tokens)
            if step % cfg.eval_every == 0 or step == job.spec.steps:
                row.update(await evaluate(policy, rewards, task, max_tokens))
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            history.append(row)
            log_step(row)
            job.report(step, policy_version=row["policy_version"], reward_mean=row["reward_mean"],
                       weight_sync_seconds=row["sync_seconds"])  # fmt: skip
    await trainer.checkpoint({"step": job.spec.steps, "seed": cfg.seed})
    columns = {"before": history[0]}
    if cfg.warmup_steps:
        columns["after warm-up"] = history[1]
    columns[f"after {job.spec.steps} steps"] = history[-1]
    print_summary(columns, time.monotonic() - started)
    plot(history, job.run_dir / "reward.png")


async def warmup(cfg: Config, task: CopyTask, policy: Policy, rewards: RewardClient, trainer: Trainer,
                 max_tokens: int) -> dict[str, Any]:  # fmt: skip
    """Supervised warm-up so that RL starts from a policy with some reward; logged as step 0."""
    size = cfg.prompts_per_step * cfg.group_size
    for i in range(cfg.warmup_steps):
        trained = await trainer.train(warmup_batch(policy, task.sample(size), version=i))
    published = await trainer.publish()
    held_out = await evaluate(policy, rewards, task, max_tokens)
    row = {"step": 0, "warmup_steps": cfg.warmup_steps, "warmup_loss": trained["loss"],
           "policy_version": published["policy_version"], **held_out}  # fmt: skip
    log.info("after %d warm-up steps: held-out reward %.3f", cfg.warmup_steps, row["eval_reward"])
    return row


async def grpo_step(step: int, cfg: Config, task: CopyTask, policy: Policy, rewards: RewardClient,
                    trainer: Trainer, max_tokens: int) -> dict[str, Any]:  # fmt: skip
    t0 = time.perf_counter()
    examples = task.sample(cfg.prompts_per_step)
    rollouts = await policy.rollouts(
        examples, n=cfg.group_size, max_tokens=max_tokens, temperature=cfg.temperature, seed=cfg.seed * 100_003 + step
    )
    t1 = time.perf_counter()
    scores = await rewards.score(task.name, score_items(rollouts))
    t2 = time.perf_counter()
    advantages = group_advantages(scores["rewards"], cfg.group_size)
    trained = await trainer.train(build_batch(rollouts, advantages, step))
    t3 = time.perf_counter()
    published = await trainer.publish()
    t4 = time.perf_counter()
    n = len(scores["rewards"])
    return {
        "step": step,
        "policy_version": published["policy_version"],
        "reward_mean": sum(scores["rewards"]) / n,
        **{f"{name}_mean": sum(v) / n for name, v in scores["components"].items()},
        "loss": trained["loss"],
        "grad_norm": trained["grad_norm"],
        "ratio_mean": trained["ratio_mean"],
        "generate_seconds": t1 - t0,
        "reward_seconds": t2 - t1,
        "train_seconds": t3 - t2,
        "sync_seconds": t4 - t3,
        "sample": f"{rollouts.examples[0].prompt!r} -> {rollouts.completions[0]!r}",
    }


def log_step(row: dict[str, Any]) -> None:
    held_out = f" held-out {row['eval_reward']:.3f}" if "eval_reward" in row else ""
    log.info(
        "step %d v%d: reward %.3f%s | generate %.2fs reward %.2fs train %.2fs sync %.2fs | %s",
        row["step"], row["policy_version"], row["reward_mean"], held_out, row["generate_seconds"],
        row["reward_seconds"], row["train_seconds"], row["sync_seconds"], row["sample"],
    )  # fmt: skip


def print_summary(columns: dict[str, dict[str, float]], seconds: float) -> None:
    """A table of held-out rewards: one column per stage (before, after warm-up, after RL)."""
    keys = [k for k in next(iter(columns.values())) if k.startswith("eval_")]
    lines = [f"{'held-out':<16}" + "".join(f"{name:>16}" for name in columns)]
    lines += [f"{k[5:]:<16}" + "".join(f"{c[k]:>16.3f}" for c in columns.values()) for k in keys]
    lines.append(f"wall time {seconds:.0f} s")
    log.info("summary:\n%s", "\n".join(lines))


def plot(history: list[dict[str, Any]], path: Any) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no reward curve (metrics.jsonl has the numbers)")
        return
    train = [r for r in history if "reward_mean" in r]
    evals = [r for r in history if "eval_reward" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train], [r["reward_mean"] for r in train], label="train reward")
    ax.plot([r["step"] for r in evals], [r["eval_reward"] for r in evals], "o-", label="held-out reward")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    log.info("reward curve in %s", path)


def cli(argv: list[str] | None = None) -> int:
    """`python -m apps.grpo.main --config FILE [kubeforge run options]`: `kubeforge run FILE` (validation,
    then the local launcher); this module's `main(job)` then runs inside the controller role."""
    from kubeforge.cli import main as kubeforge_main

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the RLJob YAML, e.g. apps/grpo/tiny.yaml")
    args, rest = parser.parse_known_args(argv)
    return kubeforge_main(["run", args.config, *rest])


if __name__ == "__main__":
    sys.exit(cli())
