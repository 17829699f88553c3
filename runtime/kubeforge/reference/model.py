"""The frozen reference model, built with the trainer's own code (so its logprobs are the trainer's)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh
from torchtitan.models.qwen3 import Qwen3Model
from torchtitan.models.qwen3.model.state_dict_adapter import Qwen3StateDictAdapter

from kubeforge.trainer import model as policy


def load_frozen(model_dir: Path, mesh: DeviceMesh, device: torch.device, param_dtype: torch.dtype) -> Qwen3Model:
    """The HF checkpoint in `model_dir`, sharded over `mesh` as the policy is, in eval mode, without gradients."""
    args = policy.model_args_from_hf(policy.read_hf_config(model_dir))
    model = policy.build_model(args, mesh, device, param_dtype)
    policy.load_hf_weights(model, Qwen3StateDictAdapter(args, None), model_dir)
    model.requires_grad_(False)
    return model.eval()
