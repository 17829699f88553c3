"""SFT: supervised fine-tuning, as a researcher reads it.

Load the train and held-out splits (local JSONL or Parquet, chat `messages` or `prompt`/`completion`
rows), render them with the tokenizer's chat template, mask the loss to the assistant turns, pack
several examples per row, and send each step's rows to the trainer with the `sft` loss (token-mean
negative log-likelihood of the masked tokens). Every `evalEvery` steps, and before the first and
after the last, the trainer's /evaluate gives the held-out loss (a forward pass, no update). The
weights are exported as an HF checkpoint (config, safetensors, tokenizer: what vLLM loads) into
CHECKPOINT_DIR/hf/step-N at the end and every `exportEvery` steps; DCP checkpoints (for resuming)
follow spec.checkpoint.

The job needs only a trainer and this controller: spec.roles.generator.replicas and
spec.roles.reward.replicas are 0.

    python -m apps.sft.main --config apps/sft/tiny.yaml     # or: kubeforge run apps/sft/tiny.yaml
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import time
from typing import Any

from kubeforge.algorithm import Algorithm
from kubeforge.cli import run_app
from kubeforge.controller import Job
from kubeforge.trainer.client import TrainerClient
from transformers import AutoTokenizer

from apps.sft.data import Example, epochs, load_examples, pack, to_batch

log = logging.getLogger("apps.sft")


# Steps between held-out evaluations when spec.algorithm.evalEvery is unset: the apps share the
# key but not its default (apps/grpo: 10), so each keeps its own.
EVAL_EVERY = 50


class SFT:
    """The loop's state: the step is all of it (the data stream is a function of the seed and the step)."""

    def __init__(self, job: Job, cfg: Algorithm, trainer: TrainerClient, pad_id: int):
        self.job, self.cfg, self.trainer, self.pad_id = job, cfg, trainer, pad_id
        self.step = 0
        self.policy_version = 0

    async def evaluate(self, held_out: list[Example]) -> dict[str, Any]:
        """Token-mean loss over every held-out trained token, in requests of rows_per_step rows."""
        rows = pack(held_out, self.cfg.max_length) if self.cfg.pack else [[e] for e in held_out]
        loss_sum, tokens = 0.0, 0
        for start in range(0, len(rows), self.cfg.rows_per_step):
            chunk = rows[start : start + self.cfg.rows_per_step]
            batch = to_batch(chunk, pad_id=self.pad_id, policy_version=self.policy_version, step=self.step)
            result = await self.trainer.evaluate(batch)
            loss_sum += result["loss"] * result["tokens"]
            tokens += result["tokens"]
        return {"step": self.step, "eval_loss": loss_sum / tokens, "eval_tokens": tokens}

    async def train(self, rows: list[list[Example]]) -> dict[str, Any]:
        batch = to_batch(rows, pad_id=self.pad_id, policy_version=self.policy_version, step=self.step + 1)
        started = time.perf_counter()
        trained = await self.trainer.train(batch)
        self.step = trained["step"]
        self.policy_version = trained["policy_version"]
        return {
            "step": self.step,
            "policy_version": self.policy_version,
            "loss": trained["loss"],
            "grad_norm": trained["grad_norm"],
            "tokens": trained["tokens"],
            "examples": sum(len(row) for row in rows),
            "packing": batch.input_ids.ne(self.pad_id).sum().item() / batch.input_ids.numel(),
            "train_seconds": time.perf_counter() - started,
        }

    async def export(self) -> str:
        """An HF checkpoint in CHECKPOINT_DIR/hf/step-N: on the checkpoint volume, where a pod's files outlive it."""
        out = self.job.run_dir / self.job.spec.checkpoint.dir / "hf" / f"step-{self.step}"
        exported = await self.trainer.export(str(out))
        log.info("step %d: HF checkpoint in %s", self.step, exported["path"])
        return exported["path"]


async def main(job: Job) -> None:
    cfg = job.spec.algorithm
    eval_every = cfg.eval_every or EVAL_EVERY
    dataset = job.spec.dataset
    tokenizer = AutoTokenizer.from_pretrained(job.spec.model.tokenizer or job.spec.model.path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train, cut = load_examples(dataset.path, dataset.split, tokenizer, cfg.max_length)
    held_out: list[Example] = []
    if dataset.eval_split:
        held_out, _ = load_examples(dataset.path, dataset.eval_split, tokenizer, cfg.max_length)
        held_out = held_out[: cfg.eval_max_examples or None]
    log.info("%d train examples (%d cut to %d tokens), %d held out", len(train), cut, cfg.max_length, len(held_out))

    trainer = job.trainer_client()
    loop = SFT(job, cfg, trainer, pad_id)
    status = await trainer.status()  # after a restart: the step of the checkpoint the trainer resumed from
    loop.step, loop.policy_version = status["step"], status["policy_version"]
    # The stream is deterministic: skip the rows the steps before a resume trained on.
    stream = epochs(train, cfg.max_length, packed=cfg.pack, seed=cfg.seed)
    stream = itertools.islice(stream, loop.step * cfg.rows_per_step, None)
    job.begin_metrics(loop.step or None)  # a resume does the steps after its checkpoint again
    steps = job.spec.steps
    with job.metrics_path.open("a") as metrics:

        def record(row: dict[str, Any]) -> None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            job.record(row)
            log.info("%s", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

        if held_out and loop.step == 0:
            record(await loop.evaluate(held_out))
        while loop.step < steps:
            record(await loop.train([next(stream) for _ in range(cfg.rows_per_step)]))
            interval = job.spec.checkpoint.interval
            if interval and loop.step % interval == 0:
                await trainer.checkpoint()
            if held_out and (loop.step % eval_every == 0 or loop.step == steps):
                record(await loop.evaluate(held_out))
            if cfg.export_every and loop.step % cfg.export_every == 0 and loop.step < steps:
                await loop.export()
    await trainer.checkpoint()
    await loop.export()
    await trainer.close()


def cli(argv: list[str] | None = None) -> int:
    return run_app(argv, description=__doc__.splitlines()[0], example="apps/sft/tiny.yaml")


if __name__ == "__main__":
    sys.exit(cli())
