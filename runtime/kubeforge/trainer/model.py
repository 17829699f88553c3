"""The policy as torchtitan builds it: an HF checkpoint in, an FSDP2-sharded torchtitan model, HF names out.

The architecture follows config.json's model_type: `qwen3` (dense Qwen3: torchtitan's Qwen3Model)
or `llama` (Llama 3 / 3.1: torchtitan's llama3 Transformer). torchtitan supplies the model, its
HF <-> torchtitan state-dict adapter (for Llama it also permutes q/k between HF's rotate-half RoPE
layout and its own interleaved one) and the HF safetensors reader that loads each rank's shard
straight from the files. What is ours: reading the HF config into the model args (torchtitan 0.2.2
only knows its named flavours) and the
FSDP2 wrapping, because torchtitan's `apply_fsdp` puts the embedding and the output projection
in separate FSDP groups, which torch 2.13 refuses for tied embeddings (the small Qwen3s tie them).

Packed rows (several sequences in one row, `position_ids` restarting at 0) get a document-causal
mask: no token attends to another sequence's tokens, and RoPE positions restart with each one, so
each sequence's logprobs are the ones it would have alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torchtitan.config.job_config import ActivationCheckpoint
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.attention import ScaledDotProductAttentionWrapper
from torchtitan.models.llama3 import Transformer, TransformerModelArgs
from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list as llama3_op_sac_save_list
from torchtitan.models.llama3.model.args import RoPEScalingArgs
from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter
from torchtitan.models.qwen3 import Qwen3Model, Qwen3ModelArgs
from torchtitan.models.qwen3.infra.parallelize import _op_sac_save_list as qwen3_op_sac_save_list
from torchtitan.models.qwen3.model.state_dict_adapter import Qwen3StateDictAdapter

IGNORE_INDEX = -100  # cross_entropy's target for "no next token"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModel(ValueError):
    """The checkpoint is not one the trainer can build; the message says which config field."""


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text())


def hf_dtype(config: dict[str, Any]) -> torch.dtype:
    """The checkpoint's dtype: what the generator loaded, so what weights are published in."""
    return DTYPES[config.get("dtype") or config.get("torch_dtype") or "float32"]


def _eos(config: dict[str, Any]) -> dict[str, int]:
    eos = config.get("eos_token_id")
    return {"eos_id": eos} if isinstance(eos, int) else {}


def _refuse(config: dict[str, Any], architecture: str, fields: dict[str, Any]) -> None:
    for field, value in fields.items():
        if value:
            raise UnsupportedModel(f"{field}: got {value!r}; torchtitan's {architecture} supports only the default")


def _qwen3_args(config: dict[str, Any]) -> Qwen3ModelArgs:
    rope = config.get("rope_parameters") or {}
    _refuse(config, "Qwen3", {
        "attention_bias": config.get("attention_bias", False),
        "use_sliding_window": config.get("use_sliding_window", False),
        "rope_scaling": config.get("rope_scaling"),
        "rope_parameters.rope_type": rope.get("rope_type", "default") != "default",
    })  # fmt: skip
    return Qwen3ModelArgs(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        vocab_size=config["vocab_size"],
        head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        hidden_dim=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta") or config.get("rope_theta") or 10000.0,
        qk_norm=True,
        max_seq_len=config.get("max_position_embeddings", 4096),
        enable_weight_tying=config.get("tie_word_embeddings", False),
        **_eos(config),
    )


def _llama3_args(config: dict[str, Any]) -> TransformerModelArgs:
    """Llama 3 / 3.1 (dense, untied). torchtitan sizes the MLP as multiple_of x ceil(multiplier x 8 dim / 3):
    a multiple_of of 1 and a multiplier just above intermediate / that gives HF's intermediate_size."""
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    _refuse(config, "Llama 3", {
        "attention_bias": config.get("attention_bias", False),
        "mlp_bias": config.get("mlp_bias", False),
        "tie_word_embeddings (Llama 3.2 1B/3B)": config.get("tie_word_embeddings", False),
        "head_dim": config.get("head_dim", dim // heads) != dim // heads,
        "rope_scaling.rope_type": rope_type not in ("default", "llama3"),
    })  # fmt: skip
    # Llama 3.1's "llama3" scaling, or none: factor 1 leaves every frequency as it is.
    scaling = RoPEScalingArgs(
        scaling_factor=rope.get("factor", 1.0) if rope_type == "llama3" else 1.0,
        low_freq_factor=rope.get("low_freq_factor", 1.0),
        high_freq_factor=rope.get("high_freq_factor", 4.0),
        original_max_position_embeddings=rope.get("original_max_position_embeddings", 8192),
    )
    base_hidden = int(2 * 4 * dim / 3)
    return TransformerModelArgs(
        dim=dim,
        n_layers=config["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads,
        vocab_size=config["vocab_size"],
        multiple_of=1,
        ffn_dim_multiplier=(config["intermediate_size"] + 0.5) / base_hidden,
        norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=rope.get("rope_theta") or config.get("rope_theta") or 500000.0,
        rope_scaling_args=scaling,
        max_seq_len=config.get("max_position_embeddings", 8192),
        **_eos(config),
    )


@dataclass(frozen=True)
class Architecture:
    args: Callable[[dict[str, Any]], Any]  # HF config.json -> torchtitan model args
    model: type[torch.nn.Module]
    adapter: type[Qwen3StateDictAdapter] | type[Llama3StateDictAdapter]
    op_sac_save_list: set  # ops whose outputs selective activation checkpointing keeps (torchtitan's choice)


# By HF config.json model_type.
ARCHITECTURES = {
    "qwen3": Architecture(_qwen3_args, Qwen3Model, Qwen3StateDictAdapter, qwen3_op_sac_save_list),
    "llama": Architecture(_llama3_args, Transformer, Llama3StateDictAdapter, llama3_op_sac_save_list),
}
ModelArgs = Qwen3ModelArgs | TransformerModelArgs
Adapter = Qwen3StateDictAdapter | Llama3StateDictAdapter


def model_args_from_hf(config: dict[str, Any]) -> ModelArgs:
    """torchtitan's model args for an HF config.json (by its model_type); refuses what the model cannot express."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedModel(
            f"model_type: got {model_type!r}; expected one of {', '.join(map(repr, ARCHITECTURES))} "
            "(dense Qwen3, Llama 3)"
        )
    return ARCHITECTURES[model_type].args(config)


def _architecture(args: ModelArgs) -> Architecture:
    return ARCHITECTURES["qwen3" if isinstance(args, Qwen3ModelArgs) else "llama"]


def state_dict_adapter(args: ModelArgs) -> Adapter:
    """The HF <-> torchtitan mapping of the model `args` describe."""
    return _architecture(args).adapter(args, None)


# The attention mask of the packed forward pass in progress ([B, 1, T, T] bool), None for unpacked rows.
_DOCUMENT_MASK: ContextVar[torch.Tensor | None] = ContextVar("document_mask", default=None)


class DocumentAttention(ScaledDotProductAttentionWrapper):
    """torchtitan's SDPA attention, document-causal while a packed forward pass is in progress.

    torchtitan's own block-causal mask needs flex attention under torch.compile (it failed on the
    GPU machines and compiles for minutes on CPU) and splits documents at EOS tokens, which chat
    turns also end with. Its SDPA path hands the inner module no mask, so `packed_forward` passes
    one through a context variable; unpacked rows take torchtitan's path unchanged (flash on GPU).
    """

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        enable_gqa: bool = False,
        is_causal: bool = True,
    ) -> torch.Tensor:
        mask = _DOCUMENT_MASK.get()
        if mask is None:
            return super().forward(q, k, v, scale=scale, enable_gqa=enable_gqa, is_causal=is_causal)
        if q.shape[1] != k.shape[1]:  # grouped-query heads, repeated: the masked kernels take equal heads
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool: token t sees token s <= t of its own sequence (sequences start at position 0)."""
    documents = (position_ids == 0).cumsum(-1)
    same = documents[:, :, None] == documents[:, None, :]
    return (same & torch.ones_like(same[0]).tril())[:, None]


@contextmanager
def packed_forward(position_ids: torch.Tensor | None) -> Iterator[None]:
    """Within it, the model's forward passes use the document mask of `position_ids` (None: plain causal)."""
    token = _DOCUMENT_MASK.set(None if position_ids is None else document_mask(position_ids))
    try:
        yield
    finally:
        _DOCUMENT_MASK.reset(token)


def use_document_attention(model: torch.nn.Module) -> None:
    """Give every attention layer the document-aware inner attention (parameter-free: safe after sharding)."""
    for block in model.layers.values():
        block.attention.inner_attention = DocumentAttention()


def build_model(
    args: ModelArgs,
    mesh: DeviceMesh,
    device: torch.device,
    param_dtype: torch.dtype,
    activation_checkpointing: str = "none",
) -> torch.nn.Module:
    """The model on `device`, sharded over `mesh`, weights initialised at random (load them next).

    `activation_checkpointing` is torchtitan's mode: "full" recomputes each block's activations in
    the backward pass, "selective" keeps the outputs of the ops torchtitan lists per architecture
    (matmuls, attention) and recomputes the rest. Either wraps each block, as torchtitan does,
    before FSDP shards it.
    """
    architecture = _architecture(args)
    with torch.device("meta"):
        model = architecture.model(args)
    if activation_checkpointing != "none":
        config = ActivationCheckpoint(mode=activation_checkpointing, selective_ac_option="op")
        apply_ac(model, config, op_sac_save_list=architecture.op_sac_save_list)
    # One FSDP group per block, the rest (embedding, final norm, output, tied or not) in the root's.
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)  # also computes the RoPE cache, a buffer no checkpoint holds
    use_document_attention(model)
    return model


def load_hf_weights(model: torch.nn.Module, adapter: Adapter, model_dir: str | Path) -> None:
    """Read the HF safetensors into the sharded model: each rank reads only its own shard."""
    hf_state = adapter.to_hf(get_model_state_dict(model))
    dcp.load(hf_state, storage_reader=adapter.get_hf_storage_reader(str(model_dir)))
    set_model_state_dict(model, adapter.from_hf(hf_state), options=StateDictOptions(strict=True))


def hf_weight_names(model: torch.nn.Module, adapter: Adapter, dtype: torch.dtype) -> list[dict[str, Any]]:
    """The weights `iter_hf_weights` yields, in order: HF name, dtype and full shape. No communication."""
    # Meta tensors of the full shape: the adapter may reshape (Llama's q/k), which a shard cannot.
    return [
        {"name": hf_name, "dtype": str(dtype).removeprefix("torch."), "shape": list(value.shape)}
        for name, param in model.named_parameters()
        for hf_name, value in adapter.to_hf({_plain_name(name): torch.empty(param.shape, device="meta")}).items()
    ]


def _plain_name(name: str) -> str:
    """A parameter's name as checkpoints and the state-dict adapter know it: without the prefix
    activation checkpointing's wrapper adds to the blocks it wraps."""
    return name.replace(_CHECKPOINT_PREFIX, "")


def _fsdp_owner(name: str, fsdp: dict[str, FSDPModule]) -> FSDPModule | None:
    """The innermost FSDP module (by module prefix) whose parameter group holds parameter `name`."""
    prefix = name
    while prefix:
        prefix = prefix.rpartition(".")[0]
        if prefix in fsdp:
            return fsdp[prefix]
    return None


def _whole_on_this_rank(param: torch.Tensor) -> bool:
    """The parameter's local shard is all of it: a plain tensor, or a DTensor on a one-rank mesh."""
    return not isinstance(param, DTensor) or param.device_mesh.size() == 1


def iter_hf_weights(model: torch.nn.Module, adapter: Adapter, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) one parameter at a time, in `hf_weight_names`' order.

    Cast to `dtype`, a yielded tensor holds the weight as published in `dtype`; it may still be in
    a wider dtype (on one rank it is the fp32 master itself), so consumers cast as they copy:
    `WeightSender` packs with a casting copy, and a cast of its own per parameter would cost as
    much host time as the copy (docs/benchmarks.md, B1).

    Collective: every rank must run the loop to the end. On one rank nothing is gathered: each
    master is its own full value. On several, each FSDP module's parameters are gathered together
    by FSDP2's `unshard()`, in its mixed-precision param dtype (bf16 on GPU, the usual publish
    dtype): one all-gather per block instead of a `full_tensor()` per parameter of the fp32
    masters. The root's parameters (embedding, final norm, output) stay gathered throughout,
    since `named_parameters` lists them first and last; one block at a time is gathered besides.

    A yielded tensor is valid only until the next one is asked for: it may be a view of FSDP's
    unsharded storage, which `reshard()` frees, or the master itself. Copy what you keep and never
    write to it. `named_parameters` lists a tied weight once, under the embedding's name, as HF does.
    """
    masters = dict(model.named_parameters())  # the sharded parameters, before unshard swaps in full ones
    if all(_whole_on_this_rank(p) for p in masters.values()):
        # Outside autograd, to_local() hands back the local tensor as it is instead of going
        # through DTensor's autograd function: a host cost per parameter that a publish pays 300 times.
        with torch.no_grad():
            local = {name: m.to_local() if isinstance(m, DTensor) else m.detach() for name, m in masters.items()}
        for name, tensor in local.items():
            yield from adapter.to_hf({_plain_name(name): tensor}).items()
        return
    modules = dict(model.named_modules())
    fsdp = {prefix: module for prefix, module in modules.items() if isinstance(module, FSDPModule)}
    root, block = fsdp.get(""), None
    try:
        if root is not None:
            root.unshard()
        for name, master in masters.items():
            owner = _fsdp_owner(name, fsdp)
            if owner is not root and owner is not block:
                if block is not None:
                    block.reshard()
                block = owner
                block.unshard()
            prefix, _, leaf = name.rpartition(".")
            full = getattr(modules[prefix], leaf).detach()  # after unshard(), the module holds the full parameter
            if full.dtype not in (dtype, master.dtype) and isinstance(master, DTensor):
                # FSDP gathered in a narrower dtype than the one published (an fp32 or fp16
                # checkpoint trained in bf16): gather this one from the fp32 master instead.
                full = master.detach().full_tensor()
            yield from adapter.to_hf({_plain_name(name): full}).items()
    finally:
        for module in (block, root):
            if module is not None:
                module.reshard()


def token_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, temperature: float = 1.0, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, T] log-probability of each token given the ones before it; position 0 holds 0.

    Aligned with `input_ids` as the batch's behaviour logprobs are. Logits are divided by the
    sampling temperature so that the ratio compares like with like. With `position_ids` (packed
    rows) each sequence sees only itself; a sequence's first token gets a meaningless value.
    """
    with packed_forward(position_ids):
        logits = model(input_ids, positions=position_ids).flatten(0, 1).float()
    if temperature != 1.0:
        logits = logits / temperature
    # Each position's target is the next token; the last position has none. Padding the targets
    # rather than slicing the logits keeps the [B*T, V] tensor whole: the backward of a slice would
    # allocate a zero-filled copy of it. cross_entropy's fused log-softmax gives the same values as
    # gather - logsumexp (within 1e-6), faster, and keeps no [B, T, V] log-softmax for backward.
    targets = F.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX)
    nll = F.cross_entropy(logits, targets.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
    return F.pad(-nll.view(input_ids.shape)[:, :-1], (1, 0))
