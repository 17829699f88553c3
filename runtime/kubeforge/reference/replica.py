"""One reference replica's model: the job's initial weights, frozen, scored as the trainer scores them."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from kubeforge.batch import TrainBatch
from kubeforge.contract import RoleContext
from kubeforge.reference.model import load_frozen
from kubeforge.trainer import model as policy
from kubeforge.trainer.engine import check_tokens


class ReferenceModel:
    def __init__(self, ctx: RoleContext):
        spec = ctx.spec
        # The trainer's temperature (its logprobs and these must compare like with like) and micro-batch size.
        self.settings = spec.algorithm
        self.device = torch.device("cuda", 0) if spec.roles.reference.gpus > 0 else torch.device("cpu")
        # The trainer's FSDP build needs a process group: this replica is a group of one.
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        mesh = init_device_mesh(self.device.type, (1,))
        param_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32  # as the trainer computes
        self.model = load_frozen(Path(spec.model.path), mesh, self.device, param_dtype)
        self.vocab = policy.read_hf_config(spec.model.path)["vocab_size"]
        self._lock = threading.Lock()  # one forward at a time: requests come from several threads

    def check(self, batch: TrainBatch) -> None:
        check_tokens(batch, self.vocab, self.model.model_args.max_seq_len)

    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """[B, T] float32 on the CPU; 0 outside the response, as a batch holds logprobs."""
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        size = self.settings.micro_batch_size or batch.rows
        with self._lock, torch.no_grad():
            for start in range(0, batch.rows, size):
                micro = batch.select(slice(start, start + size))
                # Columns after the last response token change nothing (causal attention): cut them.
                used = micro.response_mask.any(0).nonzero()
                if not len(used):  # rows without response tokens: nothing to score
                    continue
                length = int(used.max()) + 1
                ids = micro.input_ids[:, :length].to(self.device)
                positions = None if micro.position_ids is None else micro.position_ids[:, :length].to(self.device)
                values = policy.token_logprobs(self.model, ids, self.settings.temperature, positions).float().cpu()
                out[start : start + micro.rows, :length] = torch.where(micro.response_mask[:, :length], values, 0.0)
        return out
