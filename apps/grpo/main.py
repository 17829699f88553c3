"""GRPO: the RL loop, as a researcher reads it.

Each step: take the next prompts of the data stream, generate `groupSize` completions per
prompt on the generators, score them with the reward role, normalise rewards within each group
(the advantages), train one step on the trainer, publish the new weights to the generators.
Every `evalEvery` steps, greedy completions of the held-out split give the held-out reward.

spec.mode sync runs those stages one after the other. spec.mode async generates the next
batches while the trainer trains, at most spec.maxStaleness policy versions behind it: the
producer below waits until the trainer is close enough, and a sample that is still too old
when its batch reaches the trainer is dropped, never trained on. With maxStaleness 0 the two
modes are the same loop.

Every completion is an episode in a ledger (kubeforge.episodes). The ledger, the data-stream
position and the step are saved with each checkpoint; a restarted controller or trainer resumes
from there (and the generators get the trainer's restored weights before generating again).

    python -m apps.grpo.main --config apps/grpo/tiny.yaml     # or: kubeforge run apps/grpo/tiny.yaml
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from kubeforge.advantages import group_advantages, informative_groups
from kubeforge.algorithm import Algorithm
from kubeforge.batch import TrainBatch
from kubeforge.cli import run_app
from kubeforge.controller import Job
from kubeforge.controller.generators import GeneratorPool
from kubeforge.episodes import EpisodeId, Ledger, State
from kubeforge.evaluation import summarize
from kubeforge.losses import LOSSES
from kubeforge.reference.client import ReferenceClient
from kubeforge.report import plot_reward_curve
from kubeforge.rewards import RewardClient
from kubeforge.trainer.client import TrainerClient
from transformers import AutoTokenizer

from apps.grpo.gsm8k import GSM8KTask
from apps.grpo.task import CopyTask, Example, Task

log = logging.getLogger("apps.grpo")


# Steps between held-out evaluations when spec.algorithm.evalEvery is unset: the apps share the
# key but not its default (apps/sft: 50), so each keeps its own.
EVAL_EVERY = 10


@dataclass
class Rollouts:
    """One step's samples, grouped by prompt (`group_size` consecutive rows per prompt)."""

    examples: list[Example]  # one per row
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    policy_versions: list[int]
    completions: list[str]

    def select(self, rows: Sequence[int]) -> Rollouts:
        return Rollouts(*([getattr(self, f.name)[i] for i in rows] for f in fields(self)))


@dataclass
class Batch:
    """A step's worth of scored rollouts on its way to the trainer."""

    episodes: list[EpisodeId]  # one per row
    rollouts: Rollouts
    rewards: list[float]
    components: dict[str, list[float]]
    advantages: list[float]
    end_position: int  # the stream position after this batch's prompts
    seconds: dict[str, float] = field(default_factory=dict)


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
    """The generators, seen as one policy: prompts are split across live replicas and sampled concurrently."""

    def __init__(self, generators: GeneratorPool | None, tokenizer: Any):
        self.generators, self.tokenizer = generators, tokenizer

    def encode(self, example: Example) -> list[int]:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": example.prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )

    async def rollouts(
        self, examples: list[Example], *, n: int, max_tokens: int, temperature: float, seed: int
    ) -> Rollouts:
        prompts = [self.encode(e) for e in examples]
        shares = await self.generators.generate(prompts, n=n, max_tokens=max_tokens, temperature=temperature, seed=seed)
        out = Rollouts([], [], [], [], [], [])
        for start, generation in shares:
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
    """A supervised batch (prompt -> answer + <eos>), trained with the `sft` loss (cross-entropy on
    the answer) whatever the job's RL loss; logprobs and advantages are placeholders it ignores."""
    eos = policy.tokenizer.eos_token_id
    answers = [policy.tokenizer(e.answer, add_special_tokens=False)["input_ids"] + [eos] for e in examples]
    return TrainBatch.from_sequences(
        prompts=[policy.encode(e) for e in examples],
        responses=answers,
        logprobs=[[0.0] * len(a) for a in answers],
        advantages=[1.0] * len(examples),
        policy_versions=[version] * len(examples),
        info={"warmup": True, "loss": "sft"},
    )


def score_items(rollouts: Rollouts) -> list[dict[str, str]]:
    return [
        {"prompt": e.prompt, "completion": c, "answer": e.answer}
        for e, c in zip(rollouts.examples, rollouts.completions, strict=True)
    ]


class GRPO:
    """The loop's state: what a checkpoint saves and a resume restores."""

    def __init__(
        self, job: Job, cfg: Algorithm, task: Task, policy: Policy, rewards: RewardClient, trainer: TrainerClient
    ):
        self.job, self.cfg, self.task = job, cfg, task
        self.eval_every = cfg.eval_every or EVAL_EVERY
        self.policy, self.rewards, self.trainer = policy, rewards, trainer
        reference = job.spec.roles.reference
        # Colocated, the trainer computes them itself; otherwise the reference replicas do.
        wanted = reference.enabled and not reference.colocate
        self.reference = ReferenceClient(job.urls("reference"), token=job.ctx.token) if wanted else None
        self.max_tokens = cfg.max_new_tokens or task.max_new_tokens
        self.staleness = job.spec.staleness_bound
        self.ledger = Ledger()
        self.step = 0  # RL steps trained
        self.position = 0  # the next prompt position of the data stream to generate
        self.trained_position = 0  # the stream position every trained batch lies below
        self.warmup_done = 0  # supervised warm-up steps trained
        self.trainer_version = 0  # the trainer's policy version, after its last train step
        self.policy_version = 0  # the trainer's, after the last publish
        self.published_step = 0  # the RL step whose weights the generators hold
        self.history: list[dict[str, Any]] = []
        self._published = asyncio.Condition()
        self._last_step_end = time.perf_counter()
        self._evals: set[asyncio.Task[None]] = set()

    # -- checkpoint and resume ---------------------------------------------------------------

    def app_state(self) -> dict[str, Any]:
        """The loop's state as of the last trained batch; episodes not yet trained are left out and
        generated again on resume (the buffer's rule: regenerate, never restore half-done work).

        Every train batch carries it (info["app_state"], state as if that batch is trained): the
        trainer saves it with whatever checkpoint that step writes, so a checkpoint and the
        controller's state always match."""
        return {
            "step": self.step,
            "position": self.trained_position,
            "warmup_done": self.warmup_done,
            "ledger": self.ledger.to_json(final_only=True),
            "seed": self.cfg.seed,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.position = self.trained_position = int(state["position"])
        self.warmup_done = int(state["warmup_done"])
        self.ledger = Ledger.from_json(state["ledger"])

    async def checkpoint(self) -> None:
        saved = await self.trainer.checkpoint(self.app_state())
        log.info("checkpoint at step %d: %s", self.step, saved["path"])

    # -- stages ------------------------------------------------------------------------------

    async def evaluate(self) -> dict[str, Any]:
        """Mean reward (and each component) on the held-out split, and pass@k of its first component."""
        version, n = self.policy_version, self.cfg.eval_samples
        temperature = 0.0 if n == 1 else self.cfg.temperature
        rollouts = await self.policy.rollouts(
            self.task.held_out, n=n, max_tokens=self.max_tokens, temperature=temperature, seed=0
        )
        scores = await self.rewards.score(self.task.name, score_items(rollouts))
        means = {f"eval_{name}": sum(v) / len(v) for name, v in scores["components"].items()}
        correctness = next(iter(scores["components"].values()))
        per_prompt = [correctness[i : i + n] for i in range(0, len(correctness), n)]
        passes = summarize(per_prompt, ks={1, n}, threshold=1.0)
        return {
            "eval_reward": sum(scores["rewards"]) / len(scores["rewards"]),
            "eval_policy_version": version,
            **means,
            **{f"eval_pass@{k}": passes[f"pass@{k}"] for k in sorted({1, n})},
        }

    async def warmup(self) -> dict[str, Any]:
        """Supervised warm-up (the steps not done yet) so that RL starts from a policy with some
        reward; logged as step 0."""
        size = self.cfg.prompts_per_step * self.cfg.group_size
        for i in range(self.warmup_done, self.cfg.warmup_steps):
            examples = [self.task.at(i * size + k, stream="warmup") for k in range(size)]
            self.warmup_done = i + 1
            batch = warmup_batch(self.policy, examples, version=self.trainer_version)
            batch.info["app_state"] = self.app_state()
            trained = await self.trainer.train(batch)
            self.trainer_version = trained["policy_version"]
        await self.publish()
        row = {"step": 0, "warmup_steps": self.cfg.warmup_steps, "warmup_loss": trained["loss"],
               "policy_version": self.policy_version, **await self.evaluate()}  # fmt: skip
        log.info("after %d warm-up steps: held-out reward %.3f", self.cfg.warmup_steps, row["eval_reward"])
        return row

    async def publish(self) -> float:
        """Send the trainer's weights to the generators; the seconds it took."""
        started = time.perf_counter()
        published = await self.policy.generators.publish()
        async with self._published:
            self.policy_version = published["policy_version"]
            self.published_step = self.step
            self._published.notify_all()
        return time.perf_counter() - started

    async def produce(self, step: int) -> Batch:
        """Generate and score the batch that RL step `step` trains on."""
        cfg = self.cfg
        # Async: start once the trainer is at most `staleness` steps from the version this batch
        # is trained against; sync (staleness 0): once the previous step's weights are out.
        async with self._published:
            await self._published.wait_for(lambda: self.published_step >= step - 1 - self.staleness)
        start = self.position
        self.position += cfg.prompts_per_step
        examples = [self.task.at(p) for p in range(start, self.position)]
        episodes = [e for p in range(start, self.position) for e in self.ledger.open(p, cfg.group_size)]
        t0 = time.perf_counter()
        rollouts = await self.policy.rollouts(examples, n=cfg.group_size, max_tokens=self.max_tokens,
                                              temperature=cfg.temperature, seed=cfg.seed * 100_003 + start)  # fmt: skip
        t1 = time.perf_counter()
        scores = await self.rewards.score(self.task.name, score_items(rollouts))
        t2 = time.perf_counter()
        self.ledger.move(episodes, State.SCORED, versions=rollouts.policy_versions)
        self.ledger.move(episodes, State.BUFFERED)
        return Batch(
            episodes=episodes,
            rollouts=rollouts,
            rewards=scores["rewards"],
            components=scores["components"],
            advantages=group_advantages(
                scores["rewards"], cfg.group_size, scale_by_std=LOSSES[cfg.loss].scale_advantages_by_std
            ),
            end_position=self.position,
            seconds={"generate_seconds": t1 - t0, "reward_seconds": t2 - t1},
        )

    async def train(self, batch: Batch) -> dict[str, Any]:
        """Train RL step `self.step + 1` on `batch` (its too-stale rows dropped) and publish."""
        versions = batch.rollouts.policy_versions
        staleness = self.policy_version - min(versions)  # versions behind the weights it trains
        oldest = self.policy_version - self.staleness
        rows = range(len(batch.episodes))
        fresh = [i for i in rows if versions[i] >= oldest]
        stale = [batch.episodes[i] for i in rows if versions[i] < oldest]
        if stale:
            log.warning("dropping %d samples older than policy version %d", len(stale), oldest)
            self.ledger.move(stale, State.DROPPED_STALE)
        filtered = []
        if self.cfg.dynamic_sampling:
            informative = informative_groups(batch.rewards, self.cfg.group_size)
            filtered = [batch.episodes[i] for i in fresh if not informative[i // self.cfg.group_size]]
            fresh = [i for i in fresh if informative[i // self.cfg.group_size]]
            self.ledger.move(filtered, State.FILTERED)
        # The state as if this step is done: what the step's checkpoint saves (see app_state).
        self.ledger.move([batch.episodes[i] for i in fresh], State.TRAINED)
        self.step += 1
        self.trained_position = batch.end_position
        t0 = time.perf_counter()
        trained = {"loss": None, "grad_norm": None, "ratio_mean": None}
        if fresh:
            rollouts = batch.rollouts.select(fresh)
            train_batch = build_batch(rollouts, [batch.advantages[i] for i in fresh], self.step)
            if self.reference is not None:  # the KL penalty's reference log-probs, from its own replicas
                train_batch = await self.reference.fill(train_batch)
            train_batch.info["app_state"] = self.app_state()
            trained = await self.trainer.train(train_batch)
            self.trainer_version = trained["policy_version"]
        t1 = time.perf_counter()
        sync_seconds = await self.publish()
        now = time.perf_counter()
        step_seconds, self._last_step_end = now - self._last_step_end, now
        n = len(batch.rewards)
        return {
            "step": self.step,
            "policy_version": self.policy_version,
            "reward_mean": sum(batch.rewards) / n,
            **{f"{name}_mean": sum(v) / n for name, v in batch.components.items()},
            "loss": trained["loss"],
            "grad_norm": trained["grad_norm"],
            "ratio_mean": trained["ratio_mean"],
            **({"kl": trained["kl"]} if "kl" in trained else {}),
            **batch.seconds,
            "train_seconds": t1 - t0,
            "sync_seconds": sync_seconds,
            "step_seconds": step_seconds,  # since the previous step ended: what async overlapping shortens
            "staleness_max": staleness,
            "dropped_stale": len(stale),
            "filtered": len(filtered),
            "episodes": self.ledger.counts(),
            "sample": f"{batch.rollouts.examples[0].prompt!r} -> {batch.rollouts.completions[0]!r}",
        }

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, metrics: Any) -> None:
        """RL steps `self.step + 1 .. spec.steps`: a producer runs ahead by up to `staleness` batches."""
        steps = self.job.spec.steps
        queue: asyncio.Queue[Batch] = asyncio.Queue()

        async def producer() -> None:
            for step in range(self.step + 1, steps + 1):
                await queue.put(await self.produce(step))

        producing = asyncio.create_task(producer())
        self._last_step_end = time.perf_counter()
        try:
            while self.step < steps:
                getting = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({getting, producing}, return_when=asyncio.FIRST_COMPLETED)
                if producing in done and producing.exception() is not None:  # its error is the job's
                    getting.cancel()
                    raise producing.exception()
                batch = await getting  # (a producer done with every batch has put this one already)
                row = await self.train(batch)
                row["buffer_depth"] = queue.qsize()
                self.record(metrics, row)
                if self.step % self.eval_every == 0 or self.step == steps:
                    await self.start_eval(metrics, self.step)
            await asyncio.gather(*self._evals)
        finally:
            producing.cancel()

    async def start_eval(self, metrics: Any, step: int) -> None:
        """Held-out evaluation: inline in sync mode, alongside training in async mode."""

        async def evaluate() -> None:
            self.record(metrics, {"step": step, **await self.evaluate()})

        if not self.staleness:
            return await evaluate()
        task = asyncio.create_task(evaluate())
        self._evals.add(task)
        task.add_done_callback(self._evals.discard)

    def record(self, metrics: Any, row: dict[str, Any]) -> None:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        self.history.append(row)
        log_step(row)
        self.job.record(row)  # metrics and progress (docs/metrics.md)


async def main(job: Job) -> None:
    cfg = job.spec.algorithm
    # spec.dataset.path names GSM8K-style files; without it the job runs the synthetic copy task.
    task = GSM8KTask.from_spec(job.spec, seed=cfg.seed) if job.spec.dataset.path else CopyTask(seed=cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(job.spec.model.tokenizer or job.spec.model.path)
    trainer = job.trainer_client()
    # The generator set is read again before each use: it follows spec edits (replicas scaled up or down).
    policy = Policy(GeneratorPool(lambda: job.urls("generator"), trainer, token=job.ctx.token), tokenizer)
    rewards = RewardClient(job.urls("reward"), token=job.ctx.token)
    loop = GRPO(job, cfg, task, policy, rewards, trainer)
    started = time.monotonic()

    status = await trainer.status()
    loop.trainer_version = status["policy_version"]
    saved = status.get("app_state")
    if saved:
        loop.restore(saved)
        log.info("resuming at step %d (warm-up steps done %d, stream position %d, episodes %s)", loop.step,
                 loop.warmup_done, loop.position, loop.ledger.counts())  # fmt: skip
    loop.history = job.begin_metrics(loop.step if saved else None)  # later steps are done again
    await loop.publish()  # a restarted trainer's weights may be older than the generators' own
    with job.metrics_path.open("a") as metrics:
        if not saved:
            loop.record(metrics, {"step": 0, **await loop.evaluate()})
        if loop.warmup_done < cfg.warmup_steps:
            loop.record(metrics, await loop.warmup())
        if not saved:
            await loop.checkpoint()  # a first checkpoint that holds the loop's state
        await loop.run(metrics)
    await loop.checkpoint()
    write_summary(job, cfg, loop.history, time.monotonic() - started)
    (job.run_dir / "episodes.json").write_text(json.dumps(loop.ledger.to_json()))
    await policy.generators.close()


def log_step(row: dict[str, Any]) -> None:
    if "reward_mean" not in row:
        if "eval_reward" in row:
            log.info("step %d: held-out reward %.3f (policy v%d)", row["step"], row["eval_reward"],
                     row["eval_policy_version"])  # fmt: skip
        return
    log.info(
        "step %d v%d: reward %.3f | generate %.2fs reward %.2fs train %.2fs sync %.2fs | %s",
        row["step"], row["policy_version"], row["reward_mean"], row["generate_seconds"],
        row["reward_seconds"], row["train_seconds"], row["sync_seconds"], row["sample"],
    )  # fmt: skip


def write_summary(job: Job, cfg: Algorithm, history: list[dict[str, Any]], seconds: float) -> None:
    """A table of held-out rewards (before, after warm-up, after RL) and the reward curve."""
    evals = [r for r in history if "eval_reward" in r]
    columns = {"before": evals[0]} if evals and evals[0]["step"] == 0 else {}
    if cfg.warmup_steps and len(evals) > 1 and evals[1]["step"] == 0:
        columns["after warm-up"] = evals[1]
    if evals:
        columns[f"after {evals[-1]['step']} steps"] = evals[-1]
    if columns:
        print_summary(columns, seconds)
    plot_reward_curve(history, job.run_dir / "reward.png")


def print_summary(columns: dict[str, dict[str, float]], seconds: float) -> None:
    """A table of held-out rewards: one column per stage (before, after warm-up, after RL)."""
    keys = [k for k in next(iter(columns.values())) if k.startswith("eval_") and k != "eval_policy_version"]
    lines = [f"{'held-out':<16}" + "".join(f"{name:>16}" for name in columns)]
    lines += [f"{k[5:]:<16}" + "".join(f"{c.get(k, float('nan')):>16.3f}" for c in columns.values()) for k in keys]
    lines.append(f"wall time {seconds:.0f} s")
    log.info("summary:\n%s", "\n".join(lines))


def cli(argv: list[str] | None = None) -> int:
    return run_app(argv, description=__doc__.splitlines()[0], example="apps/grpo/tiny.yaml")


if __name__ == "__main__":
    sys.exit(cli())
