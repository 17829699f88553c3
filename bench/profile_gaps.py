"""Where B1 and B6 lose time: the trainer's own functions against candidate replacements, one GPU, one run.

Not a benchmark of the runtime (B1 and B6 are): each candidate here is a change proposed for
kubeforge/trainer/model.py or engine.py, timed beside the code it would replace, on the same
model and inputs, so that the proposal carries a measured effect. Items 1 to 3's candidates became the runtime's
code on 2026-11-27 (docs/benchmarks.md, B1 and B6): since then their rows time the runtime against
the stand-alone candidate it was built from, and the optimizer row "as the engine builds it" is
the CPU default (the engine takes fused=True on CUDA).

    python3 -m torch.distributed.run --nproc-per-node 1 bench/profile_gaps.py --model qwen3-1.7b

1. token log-probabilities, forward + backward on one micro-batch: `policy.token_logprobs`
   (gather - logsumexp on fp32 logits) vs the same values from F.cross_entropy(reduction="none")
   vs torchtitan's cross_entropy_loss (the B6 baseline's loss).
2. the optimizer step: torch.optim.AdamW as the engine builds it (foreach) vs fused=True
   (torchtitan's default).
3. the publish gather: `policy.iter_hf_weights` (one FSDP full_tensor() per parameter, fp32
   masters cast to bf16 afterwards) vs FSDP2's own unshard per FSDP module (one all-gather per
   block, already in the bf16 param dtype), each tensor copied into a bucket-sized buffer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torchtitan.components.loss import cross_entropy_loss
from torchtitan.models.qwen3.model.state_dict_adapter import Qwen3StateDictAdapter

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent / "runtime"), str(BENCH)]

from kubeforge.trainer import model as policy  # noqa: E402
from weight_sync_bench import QWEN3  # noqa: E402


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeat: int = 5) -> float:
    times = []
    for i in range(warmup + repeat):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def cross_entropy_logprobs(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Candidate for policy.token_logprobs (temperature 1): the same values through the fused log-softmax."""
    logits = model(input_ids)[:, :-1]
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return F.pad(-nll.view(targets.shape), (1, 0))


def unshard_gather(model: torch.nn.Module, buffer: torch.Tensor) -> int:
    """Candidate for iter_hf_weights' gather: FSDP2 unshard per FSDP module, bf16 already; returns bytes."""
    used = 0
    for module in [*model.layers.values(), model]:
        module.unshard()
        own = module.parameters() if module is not model else [model.tok_embeddings.weight, model.norm.weight]
        for param in own:
            flat = param.detach().reshape(-1)
            if used + flat.numel() > buffer.numel():
                used = 0  # a new bucket
            buffer[used : used + flat.numel()].copy_(flat)
            used += flat.numel()
        module.reshard()
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3-1.7b", choices=list(QWEN3))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=4)
    args = parser.parse_args()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    config = QWEN3[args.model]
    model_args = policy.model_args_from_hf(config)
    mesh = init_device_mesh("cuda", (dist.get_world_size(),), mesh_dim_names=("fsdp",))
    model = policy.build_model(model_args, mesh, device, torch.bfloat16)
    adapter = Qwen3StateDictAdapter(model_args, None)
    ids = torch.randint(0, config["vocab_size"], (args.micro, args.seq), device=device)
    rows = []

    current = policy.token_logprobs(model, ids)
    candidate = cross_entropy_logprobs(model, ids)
    diff = float((current - candidate).abs().max())
    losses = {
        "logprobs fwd+bwd: policy.token_logprobs": lambda: policy.token_logprobs(model, ids).sum(),
        "logprobs fwd+bwd: F.cross_entropy(none)": lambda: cross_entropy_logprobs(model, ids).sum(),
        "torchtitan cross_entropy_loss fwd+bwd": lambda: cross_entropy_loss(model(ids), torch.roll(ids, -1, 1)),
    }
    for name, loss in losses.items():
        rows.append((name, median_ms(lambda loss=loss: loss().backward(), device)))

    for name, kwargs in (("AdamW as the engine builds it", {}), ("AdamW fused=True", {"fused": True})):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, **kwargs)
        rows.append((f"optimizer step: {name}", median_ms(optimizer.step, device)))
        del optimizer

    dtype = policy.hf_dtype(config)
    buffer = torch.empty(1 << 29, dtype=torch.bfloat16, device=device)  # 1 GiB: the embedding (0.6 GB) fits

    def current_gather() -> None:
        used = 0
        for _, tensor in policy.iter_hf_weights(model, adapter, dtype):
            flat = tensor.reshape(-1)
            used = 0 if used + flat.numel() > buffer.numel() else used
            buffer[used : used + flat.numel()].copy_(flat)
            used += flat.numel()

    rows.append(("publish gather+pack: iter_hf_weights", median_ms(current_gather, device)))
    candidate_gather = median_ms(lambda: unshard_gather(model, buffer), device)
    rows.append(("publish gather+pack: unshard per FSDP module", candidate_gather))
    card = torch.cuda.get_device_name(device)
    print(f"{args.model}, micro-batch {args.micro} x {args.seq}, {card}, torch {torch.__version__}")
    print(f"max |token_logprobs - cross_entropy candidate| = {diff:.2e}")
    for name, ms in rows:
        print(f"{name:<48} {ms:>9.1f} ms")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
