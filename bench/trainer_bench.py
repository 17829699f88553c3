"""B6: kubeforge's trainer step (GRPO) against torchtitan's own training step, same model, batch and card.

Run under torchrun, one rank per GPU:

    torchrun --nproc-per-node 1 bench/trainer_bench.py --model qwen3-1.7b --seq 2048 --rows-per-rank 16 --micro 4

kubeforge: the trainer engine itself, `kubeforge.trainer.engine.Trainer`, built from a RoleContext
the way the role builds it (its own process group set-up, the HF checkpoint read from disk: rank 0
first writes random weights in HF safetensors), then `Trainer.train(batch)` on a GRPO batch: what
every rank runs for POST /train. Not timed: HTTP and the command channel's broadcast of the batch.

torchtitan: `torchtitan.train.Trainer.train_step` and `forward_backward_step`, torchtitan 0.2.2's
own functions, called on a namespace holding what they read (its cross-entropy loss, its
OptimizersContainer with its default fused AdamW, its clip_grad_norm_), on the same model built
by the same FSDP2 wrapping (`kubeforge.trainer.model.build_model`), the same micro-batches.

Both count every position of every row as a token (full-length rows: the GRPO rows' responses
run to the end, so kubeforge's truncation keeps them whole). FLOP/s: torchtitan's own FLOP count
per token (`get_nparams_and_flops`) against a bf16 matrix product timed in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torchtitan.components.loss import cross_entropy_loss
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.distributed import utils as titan_dist
from torchtitan.models.qwen3 import Qwen3Model
from torchtitan.models.qwen3.model.state_dict_adapter import Qwen3StateDictAdapter
from torchtitan.train import Trainer as TitanTrainer

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent / "runtime"), str(BENCH)]

from kubeforge.auth import Credentials  # noqa: E402
from kubeforge.batch import TrainBatch  # noqa: E402
from kubeforge.contract import RoleContext  # noqa: E402
from kubeforge.spec import RLJobSpec  # noqa: E402
from kubeforge.trainer import engine  # noqa: E402
from kubeforge.trainer import model as policy  # noqa: E402
from weight_sync_bench import QWEN3  # noqa: E402

LR, BETAS, EPS, WEIGHT_DECAY, MAX_NORM = 1e-6, (0.9, 0.999), 1e-8, 0.0, 1.0


def write_checkpoint(config: dict[str, Any], out: Path, device: torch.device) -> None:
    """An HF checkpoint (config.json + model.safetensors) of `config` with torchtitan's random init."""
    args = policy.model_args_from_hf(config)
    with torch.device(device):
        model = Qwen3Model(args).to(policy.hf_dtype(config))
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    state = Qwen3StateDictAdapter(args, None).to_hf(dict(model.named_parameters()))
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config))


def grpo_batch(rows: int, seq: int, vocab: int, seed: int) -> TrainBatch:
    """A GRPO batch as the controller sends it: prompt then response to the end of the row."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(seq // 8, seq // 4, (rows, 1), generator=g)
    mask = torch.arange(seq).unsqueeze(0) >= prompt
    logprobs = torch.where(mask, -torch.rand(rows, seq, generator=g) - torch.log(torch.tensor(float(vocab))), 0.0)
    return TrainBatch(
        input_ids=torch.randint(0, vocab, (rows, seq), generator=g),
        response_mask=mask,
        behaviour_logprobs=logprobs,
        advantages=torch.randn(rows, generator=g),
        policy_versions=torch.zeros(rows, dtype=torch.long),
    )


def timed(
    step: Callable[[], None], device: torch.device, warmup: int, steps: int, trace: Path | None = None
) -> list[float]:
    """Seconds of each step after the warm-up; with `trace`, one more step profiled there (not timed)."""
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if trace is not None:
        profile_step(step, device, trace)
    return times


def profile_step(step: Callable[[], None], device: torch.device, out: Path) -> None:
    """One step under torch.profiler: where its host and its device time go, as two tables in `out`."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"profiled step: {wall * 1e3:.1f} ms wall\n"
        + averages.table(sort_by="self_cpu_time_total", row_limit=30)
        + "\n"
        + averages.table(sort_by="self_device_time_total", row_limit=30)
    )


def kubeforge_side(ctx: RoleContext, batch: TrainBatch, args: argparse.Namespace) -> tuple[list[float], Any]:
    trainer = engine.Trainer(ctx, torch.device(ctx_device()))

    def step() -> None:
        batch.policy_versions.fill_(trainer.policy_version)  # sync mode: every row from the current policy
        trainer.train(batch)

    times = timed(step, trainer.device, args.warmup, args.steps, trace_path(args, "kubeforge"))
    return times, trainer.model.model_args.get_nparams_and_flops(trainer.model, args.seq)[1]


def torchtitan_side(config: dict[str, Any], batch: TrainBatch, device: torch.device, args: argparse.Namespace):
    world = dist.get_world_size()
    model_args = policy.model_args_from_hf(config)
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("fsdp",))
    param_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = policy.build_model(model_args, mesh, device, param_dtype, args.activation_checkpointing)
    optimizers = OptimizersContainer(
        [model],
        torch.optim.AdamW,
        {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY}
        | {"fused": device.type == "cuda", "foreach": device.type != "cuda"},  # torchtitan's default: fused
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizers.optimizers[0], lambda _: 1.0)
    titan = SimpleNamespace(
        model_parts=[model],
        model_args=model_args,
        tokenizer=None,
        device=device,
        loss_fn=cross_entropy_loss,
        optimizers=optimizers,
        lr_schedulers=SimpleNamespace(schedulers=[scheduler], step=scheduler.step),
        gradient_accumulation_steps=-(-args.rows_per_rank // args.micro),
        parallel_dims=SimpleNamespace(
            pp_enabled=False,
            cp_enabled=False,
            dp_enabled=world > 1,
            dp_cp_enabled=world > 1,
            ep_enabled=False,
            get_mesh=lambda _name: mesh,
            get_optional_mesh=lambda _name: None,
        ),
        train_context=titan_dist.get_train_context(False),
        maybe_enable_amp=titan_dist.maybe_enable_amp(SimpleNamespace(fsdp_enabled=True), "bfloat16", device.type),
        checkpointer=SimpleNamespace(maybe_wait_for_staging=lambda: None),
        metrics_processor=SimpleNamespace(should_log=lambda _step: False),
        step=1,
        job_config=SimpleNamespace(training=SimpleNamespace(max_norm=MAX_NORM)),
    )
    titan.forward_backward_step = partial(TitanTrainer.forward_backward_step, titan)
    titan.post_dataloading_process = partial(TitanTrainer.post_dataloading_process, titan)
    rank = dist.get_rank()
    mine = batch.input_ids[rank::world]

    def micro_batches() -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        for start in range(0, len(mine), args.micro):
            rows = mine[start : start + args.micro]
            yield {"input": rows}, torch.roll(rows, -1, dims=1)  # next-token labels, as a text data set gives

    step = partial(TitanTrainer.train_step, titan)
    return timed(lambda: step(micro_batches()), device, args.warmup, args.steps, trace_path(args, "torchtitan"))


def trace_path(args: argparse.Namespace, side: str) -> Path | None:
    """Where this rank writes its profile of one more `side` step (every rank runs it), if --trace asked."""
    if not args.trace:
        return None
    return Path(args.trace) / f"{side}-{dist.get_world_size()}gpu-rank{dist.get_rank()}.txt"


def ctx_device() -> str:
    return f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu"


def matmul_tflops(device: torch.device, n: int = 8192) -> float:
    """bf16 matrix-product ceiling of this card, measured now: median of 10 after 3 warm-ups."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3-1.7b", choices=list(QWEN3))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rows-per-rank", type=int, default=16)
    parser.add_argument("--micro", type=int, default=4, help="rows per forward/backward pass")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--order", choices=["kubeforge-first", "torchtitan-first"], default="kubeforge-first")
    parser.add_argument("--workdir", default="runs/bench/trainer")
    parser.add_argument("--out", default="runs/bench/trainer.json")
    parser.add_argument("--trace", default="", help="directory: profile one more step of each side there")
    parser.add_argument(
        "--activation-checkpointing", choices=["none", "full", "selective"], default="none",
        help="both sides: torchtitan's apply_ac in this mode, as the trainer's spec.algorithm.activationCheckpointing",
    )  # fmt: skip
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    world = int(os.environ["WORLD_SIZE"])
    workdir = Path(args.workdir).resolve()
    config = QWEN3[args.model]
    spec = RLJobSpec.model_validate(
        {
            "model": {"path": str(workdir / args.model)},
            "roles": {"trainer": {"gpusPerNode": world if cuda else 0, "procsPerNode": world}},
            "algorithm": {
                "microBatchSize": args.micro,
                "lr": LR,
                "maxGradNorm": MAX_NORM,
                "activationCheckpointing": args.activation_checkpointing,
            },  # fmt: skip
        }
    )
    ctx = RoleContext(
        job="bench", namespace="bench", role="trainer", replica=0, spec=spec, run_dir=workdir / "run",
        credentials=Credentials.issue("trainer"), http_host="127.0.0.1", http_port=0, weight_sync_addr="",
    )  # fmt: skip
    device = engine.init_process_group(ctx)  # the role's own: NCCL on GPUs, gloo on CPU
    rank = dist.get_rank()
    if rank == 0 and not (workdir / args.model / "config.json").exists():
        write_checkpoint(config, workdir / args.model, device)
    dist.barrier()
    batch = grpo_batch(args.rows_per_rank * world, args.seq, config["vocab_size"], seed=0)
    tokens = batch.rows * args.seq

    sides: dict[str, Callable[[], list[float]]] = {}
    flops_per_token = 0

    def kubeforge() -> list[float]:
        nonlocal flops_per_token
        times, flops_per_token = kubeforge_side(ctx, batch, args)
        return times

    sides["kubeforge"] = kubeforge
    sides["torchtitan"] = lambda: torchtitan_side(config, batch, device, args)
    order = list(sides) if args.order == "kubeforge-first" else list(reversed(sides))
    results: dict[str, list[float]] = {}
    peak_gib: dict[str, float] = {}
    for name in order:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        results[name] = sides[name]()
        peak_gib[name] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
        release(device)
    peak = matmul_tflops(device) if cuda else float("nan")
    if rank == 0:
        kf, tt = (statistics.median(results[n]) for n in ("kubeforge", "torchtitan"))
        rows = {
            name: {
                "step_s": statistics.median(results[name]),
                "steps_s": results[name],
                "tokens_per_s": tokens / statistics.median(results[name]),
                "tflops_per_gpu": flops_per_token * tokens / statistics.median(results[name]) / world / 1e12,
                "peak_gib": peak_gib[name],  # rank 0's allocated peak: weights, optimizer state, activations
            }
            for name in results
        }
        summary = {
            "model": args.model, "gpus": world, "seq": args.seq, "rows": batch.rows, "micro": args.micro,
            "tokens_per_step": tokens, "order": args.order, "activation_checkpointing": args.activation_checkpointing,
            "matmul_tflops": peak, "ratio": tt / kf, **rows,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
        }  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1))
        print(f"activation checkpointing: {args.activation_checkpointing}")
        print("side        GPUs  tokens/step  step s  tokens/s   TFLOP/s/GPU  of matmul probe  peak GiB")
        for name, row in rows.items():
            print(
                f"{name:<11} {world:>4} {tokens:>12} {row['step_s']:>7.3f} {row['tokens_per_s']:>9.0f} "
                f"{row['tflops_per_gpu']:>12.1f} {row['tflops_per_gpu'] / peak:>16.2f} {row['peak_gib']:>9.1f}"
            )
        print(f"kubeforge / torchtitan tokens/s: {tt / kf:.3f} (goal >= 0.95); matmul probe {peak:.0f} TFLOP/s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
