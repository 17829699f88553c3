"""The frozen reference model, built with the trainer's own code (so its logprobs are the trainer's)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh

from kubeforge.trainer import model as policy


def load_frozen(model_dir: Path, mesh: DeviceMesh, device: torch.device, param_dtype: torch.dtype) -> torch.nn.Module:
    """The HF checkpoint in `model_dir`, sharded over `mesh` as the policy is, in eval mode, without gradients."""
    args = policy.model_args_from_hf(policy.read_hf_config(model_dir))
    model = policy.build_model(args, mesh, device, param_dtype)
    policy.load_hf_weights(model, policy.state_dict_adapter(args), model_dir)
    model.requires_grad_(False)
    return model.eval()
