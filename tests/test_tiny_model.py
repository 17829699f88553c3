"""The tiny model loads in transformers and maps through torchtitan's adapter without a change.

Measured on CPU in float32 (tied and untied, seeds 0-2, weights scaled x8 so that logits span
about +-5.5): transformers and torchtitan logits are bit-identical (max abs difference 0.0).
The tests allow 1e-5. In bfloat16 the two differ by up to 0.095, about as much as bfloat16
differs from float32 (0.11) on the same inputs.
"""

import os

import pytest
import torch
import torch.distributed as dist
from kubeforge.launcher import allocate_ports
from kubeforge.tiny_model import CHARACTERS, VOCAB_SIZE, main, write_tiny_model
from kubeforge.trainer import model as policy
from safetensors.torch import load_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torchtitan.models.qwen3 import Qwen3Model
from torchtitan.models.qwen3.model.state_dict_adapter import Qwen3StateDictAdapter
from transformers import AutoModelForCausalLM, AutoTokenizer

LOGIT_TOLERANCE = 1e-5


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny(request, tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), seed=1, tie_embeddings=request.param)


def tokens(batch=3, length=40, seed=0):
    return torch.randint(0, VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_the_files_a_loader_expects_are_there(tmp_path):
    main([str(tmp_path / "m"), "--seed", "5"])
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= names


def test_transformers_loads_it_and_text_round_trips(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.vocab_size == len(tokenizer) == VOCAB_SIZE
    assert sum(p.numel() for p in model.parameters()) < 200_000
    text = "12 + 30 = 42\nAnswer: {x_y}!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tokenizer.decode(ids) == text  # one token per character
    assert set(CHARACTERS) <= set(tokenizer.get_vocab())
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+1"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|user|>1+1<eos><|assistant|>"
    assert tokenizer.convert_ids_to_tokens(tokenizer(chat, add_special_tokens=False)["input_ids"])[0] == "<|user|>"


def test_seeds_make_different_models(tmp_path):
    a = load_file(write_tiny_model(tmp_path / "a", seed=0) / "model.safetensors")
    b = load_file(write_tiny_model(tmp_path / "b", seed=1) / "model.safetensors")
    again = load_file(write_tiny_model(tmp_path / "c", seed=0) / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(a[name], b[name]) and torch.equal(a[name], again[name])


def test_the_adapter_round_trip_is_exact_and_the_logits_agree(tiny):
    hf_state = load_file(tiny / "model.safetensors")
    args = policy.model_args_from_hf(policy.read_hf_config(tiny))
    adapter = Qwen3StateDictAdapter(args, None)
    titan_state = adapter.from_hf(dict(hf_state))
    back = adapter.to_hf(titan_state)
    assert sorted(back) == sorted(hf_state)
    assert all(torch.equal(back[name], hf_state[name]) for name in hf_state)

    titan = Qwen3Model(args)
    with torch.no_grad():
        titan.init_weights()  # the RoPE cache; every weight is then overwritten
    titan.load_state_dict(titan_state, strict=True)
    hf = AutoModelForCausalLM.from_pretrained(tiny)
    x = tokens()
    with torch.no_grad():
        expected, got = hf(x).logits, titan(x)
    torch.testing.assert_close(got, expected, atol=LOGIT_TOLERANCE, rtol=0)


def test_unsupported_configs_are_refused_by_name(tiny):
    config = policy.read_hf_config(tiny)
    with pytest.raises(policy.UnsupportedModel, match="model_type: got 'mistral'"):
        policy.model_args_from_hf({**config, "model_type": "mistral"})
    with pytest.raises(policy.UnsupportedModel, match="attention_bias"):
        policy.model_args_from_hf({**config, "attention_bias": True})


def free_port() -> int:
    # Below the ephemeral range, as the launcher picks them: a bind(0) port can be handed to another
    # socket before the store listens on it, and the ranks then crash talking to a stranger.
    return allocate_ports(["store"], None)["store"]


def loaded_policy(model_dir, mesh, param_dtype: torch.dtype, activation_checkpointing: str = "none"):
    """The trainer's sharded policy with `model_dir`'s weights, its adapter, and the checkpoint's tensors."""
    args = policy.model_args_from_hf(policy.read_hf_config(model_dir))
    adapter = Qwen3StateDictAdapter(args, None)
    model = policy.build_model(args, mesh, torch.device("cpu"), param_dtype, activation_checkpointing)
    policy.load_hf_weights(model, adapter, model_dir)
    return model, adapter, load_file(model_dir / "model.safetensors")


@pytest.fixture(scope="module")
def one_rank_group():
    """A one-process gloo group: FSDP2 and DTensors for real, without torchrun."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,), mesh_dim_names=("fsdp",))
    dist.destroy_process_group()


def test_the_sharded_policy_loads_and_yields_the_hf_weights(tiny, one_rank_group):
    """What the trainer publishes: every checkpoint tensor under its HF name, unchanged."""
    model, adapter, hf_state = loaded_policy(tiny, one_rank_group, torch.float32)
    names = policy.hf_weight_names(model, adapter, torch.float32)
    # Copies: a yielded tensor may be FSDP's unsharded storage, freed when the iterator moves on.
    weights = [(name, t.clone()) for name, t in policy.iter_hf_weights(model, adapter, torch.float32)]
    assert [w["name"] for w in names] == [name for name, _ in weights]
    assert sorted(name for name, _ in weights) == sorted(hf_state)
    for (name, tensor), spec in zip(weights, names, strict=True):
        assert torch.equal(tensor, hf_state[name]), name
        assert spec == {"name": name, "dtype": "float32", "shape": list(hf_state[name].shape)}
    for name, tensor in policy.iter_hf_weights(model, adapter, torch.bfloat16):
        assert torch.equal(tensor.to(torch.bfloat16), hf_state[name].to(torch.bfloat16)), name

    # token_logprobs: aligned with the input (position t holds log p(token t | tokens before t))
    x = tokens()
    hf = AutoModelForCausalLM.from_pretrained(tiny)
    with torch.no_grad():
        expected = hf(x).logits[:, :-1].log_softmax(-1).gather(-1, x[:, 1:, None]).squeeze(-1)
        got = policy.token_logprobs(model, x)
    assert got.shape == x.shape and torch.all(got[:, 0] == 0)
    torch.testing.assert_close(got[:, 1:], expected, atol=LOGIT_TOLERANCE, rtol=0)
    with torch.no_grad():
        hot = policy.token_logprobs(model, x, temperature=0.5)
        expected_hot = (hf(x).logits[:, :-1] / 0.5).log_softmax(-1).gather(-1, x[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(hot[:, 1:], expected_hot, atol=LOGIT_TOLERANCE, rtol=0)


def test_a_policy_trained_in_bf16_publishes_its_fp32_masters_in_fp32(tiny, one_rank_group):
    """FSDP gathers in its compute dtype (bf16): an fp32 publish must still carry the masters' values, not bf16's."""
    model, adapter, hf_state = loaded_policy(tiny, one_rank_group, torch.bfloat16)
    for dtype in (torch.float32, torch.bfloat16):
        for name, tensor in policy.iter_hf_weights(model, adapter, dtype):
            assert torch.equal(tensor.to(dtype), hf_state[name].to(dtype)), name


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_changes_no_gradient_and_no_weight_name(tiny, one_rank_group, mode):
    plain, adapter, hf_state = loaded_policy(tiny, one_rank_group, torch.float32)
    checkpointed, _, _ = loaded_policy(tiny, one_rank_group, torch.float32, mode)
    assert any(isinstance(m, CheckpointWrapper) for m in checkpointed.modules())  # it is applied
    assert policy.hf_weight_names(checkpointed, adapter, torch.float32) == policy.hf_weight_names(
        plain, adapter, torch.float32
    )
    for name, tensor in policy.iter_hf_weights(checkpointed, adapter, torch.float32):
        assert torch.equal(tensor, hf_state[name]), name
    # The checkpoint's keys (DCP, resume) are the plain model's.
    assert get_model_state_dict(checkpointed).keys() == get_model_state_dict(plain).keys()

    x = tokens()
    for model in (plain, checkpointed):
        policy.token_logprobs(model, x).sum().backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        torch.testing.assert_close(q.grad.full_tensor(), p.grad.full_tensor(), atol=1e-6, rtol=0, msg=name)


def _publish_on_two_ranks(rank: int, port: int, model_dir, param_dtype: torch.dtype) -> None:
    """One of two gloo ranks: gather through FSDP2's unshard path and check every weight on rank 0."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("fsdp",))
        model, adapter, hf_state = loaded_policy(model_dir, mesh, param_dtype)
        names = [w["name"] for w in policy.hf_weight_names(model, adapter, torch.float32)]
        for dtype in (torch.float32, torch.bfloat16):
            seen = []
            for name, tensor in policy.iter_hf_weights(model, adapter, dtype):
                assert torch.equal(tensor.to(dtype), hf_state[name].to(dtype)), (rank, name, dtype)
                seen.append(name)
            assert seen == names
        # Neither rank tears gloo down while the other may still be in a collective: a rank that
        # finished first and exited has aborted its peer ('terminate called without an active exception').
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-compute"])
def test_two_ranks_gather_every_weight_through_fsdp_unshard(tiny, param_dtype):
    """On several ranks publish gathers block by block; bf16 compute still publishes the fp32 masters in fp32."""
    torch.multiprocessing.start_processes(
        _publish_on_two_ranks, args=(free_port(), tiny, param_dtype), nprocs=2, start_method="spawn"
    )
