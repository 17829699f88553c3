"""The SFT app: data loading, chat-template loss masks, packing with document masks (fast), and the
job end to end on the tiny model (slow): the held-out loss falls, the HF export loads in transformers
and scores the held-out split exactly as the trainer did."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from kubeforge.algorithm import Algorithm
from kubeforge.batch import BatchError, TrainBatch
from kubeforge.validation import SpecError, parse_spec
from transformers import AutoModelForCausalLM, AutoTokenizer

from apps.sft.data import (
    DataError,
    Example,
    conversation,
    load_examples,
    pack,
    synthetic_rows,
    to_batch,
    tokenize,
    tokenize_split,
    write_synthetic,
)
from apps.sft.main import EVAL_EVERY

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def shown(tokenizer, example: Example) -> str:
    """The example's tokens with the trained ones in brackets."""
    tokens = tokenizer.convert_ids_to_tokens(example.input_ids)
    return "".join(f"[{t}]" if m else t for t, m in zip(tokens, example.mask, strict=True))


# -- loss masks --------------------------------------------------------------------------------------


def test_every_assistant_turn_and_its_end_of_turn_are_trained(tokenizer):
    row = {
        "messages": [
            {"role": "system", "content": "reverse"},
            {"role": "user", "content": "abc"},
            {"role": "assistant", "content": "cba"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "cba"},
        ]
    }
    example = tokenize(tokenizer, *conversation(row, 0), 0)
    assert shown(tokenizer, example) == (
        "<|system|>reverse<eos><|user|>abc<eos><|assistant|>[c][b][a][<eos>]<|user|>again<eos><|assistant|>[c][b][a][<eos>]"
    )
    assert example.input_ids == tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)


def test_prompt_completion_rows_train_only_the_completion(tokenizer):
    example = tokenize(tokenizer, *conversation({"prompt": "ab c", "completion": "c ba"}, 0), 0)
    assert shown(tokenizer, example) == "<|user|>ab c<eos><|assistant|>[c][ ][b][a][<eos>]"
    as_messages = {
        "prompt": [{"role": "user", "content": "ab c"}],
        "completion": [{"role": "assistant", "content": "c ba"}],
    }
    assert tokenize(tokenizer, *conversation(as_messages, 0), 0) == example


@pytest.mark.parametrize(
    "row, message",
    [
        ({"text": "hello"}, "row 3: expected a 'messages' column"),
        ({"messages": "hello"}, "row 3: messages must be a list"),
        ({"prompt": "a", "completion": [{"content": "b"}]}, "row 3: completion must be a string or a list"),
    ],
)
def test_a_bad_row_is_named(row, message):
    with pytest.raises(DataError, match=message):
        conversation(row, 3)


def test_long_examples_are_cut_and_examples_without_trained_tokens_dropped(tokenizer):
    rows = [{"prompt": "abcdefgh", "completion": "x"}, {"prompt": "ab", "completion": "ba"}]
    examples, cut = tokenize_split(rows, tokenizer, max_length=8)
    assert cut == 1 and len(examples) == 1  # the first one lost its completion
    assert shown(tokenizer, examples[0]) == "<|user|>ab<eos><|assistant|>[b][a][<eos>]"


# -- packing -----------------------------------------------------------------------------------------


def example(n: int, first: int) -> Example:
    return Example(list(range(first, first + n)), [False] + [True] * (n - 1))


def test_packing_keeps_whole_examples_in_order_within_the_length():
    examples = [example(n, 10 * i) for i, n in enumerate([5, 4, 3, 6, 2, 8])]
    rows = pack(examples, max_length=10)
    assert [[len(e.input_ids) for e in row] for row in rows] == [[5, 4], [3, 6], [2, 8]]
    assert [e for row in rows for e in row] == examples


def test_a_packed_batch_restarts_positions_at_each_example():
    rows = [[example(3, 10), example(2, 20)], [example(4, 30)]]
    batch = to_batch(rows, pad_id=0, policy_version=7, step=2)
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21], [30, 31, 32, 33, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch.response_mask.tolist() == [[False, True, True, False, True], [False, True, True, True, False]]
    assert batch.policy_versions.tolist() == [7, 7] and batch.info == {"loss": "sft", "step": 2}
    assert TrainBatch.decode(batch.encode()).position_ids.equal(batch.position_ids)


@pytest.mark.parametrize(
    "positions, message",
    [
        ([[1, 2, 3, 4, 5]], "every row must start at position 0"),
        ([[0, 1, 3, 4, 5]], "the previous one \\+ 1, or 0"),
        ([[0, 1, 2, 0, 1]], "set on a sequence's first token"),
    ],
)
def test_bad_position_ids_are_refused(positions, message):
    with pytest.raises(BatchError, match=message):
        TrainBatch(
            input_ids=torch.ones(1, 5, dtype=torch.int64),
            response_mask=torch.tensor([[False, False, False, True, True]]),
            behaviour_logprobs=torch.zeros(1, 5),
            advantages=torch.zeros(1),
            policy_versions=torch.zeros(1),
            position_ids=torch.tensor(positions),
        )


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama 3.1 (rope scaling "llama3" active within 64 positions), untied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # fmt: skip
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=500000.0, rope_scaling=scaling, tie_word_embeddings=False)  # fmt: skip
    out = tmp_path_factory.mktemp("llama") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.mark.parametrize("architecture", ["qwen3", "llama"])
def test_packed_rows_score_each_example_as_if_it_were_alone(architecture, request):
    """The trainer's torchtitan model (built from config.json's model_type) on one packed row, against
    transformers on each example alone."""
    from kubeforge.trainer import model as policy
    from safetensors.torch import load_file

    model_dir = request.getfixturevalue("tiny_model" if architecture == "qwen3" else "tiny_llama")
    args = policy.model_args_from_hf(policy.read_hf_config(model_dir))
    model = policy.ARCHITECTURES[architecture].model(args)
    with torch.no_grad():
        model.init_weights()
    model.load_state_dict(policy.state_dict_adapter(args).from_hf(load_file(model_dir / "model.safetensors")))
    policy.use_document_attention(model)
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    examples = [example(5, 10), example(3, 40), example(20, 60)]
    batch = to_batch([examples], pad_id=0, policy_version=0, step=0)
    with torch.no_grad():
        packed = policy.token_logprobs(model, batch.input_ids, position_ids=batch.position_ids)[0]
        unmasked = policy.token_logprobs(model, batch.input_ids)[0]
        start = 0
        for e in examples:
            ids = torch.tensor([e.input_ids])
            alone = reference(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            assert packed[start + 1 : start + len(e.input_ids)].tolist() == pytest.approx(alone.tolist(), abs=1e-5)
            start += len(e.input_ids)
    # Without the document mask the later examples see the earlier ones: different numbers.
    assert (unmasked[6:] - packed[6:]).abs().max() > 1e-2


def test_unsupported_checkpoints_name_the_config_field():
    from kubeforge.trainer.model import UnsupportedModel, model_args_from_hf

    llama = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
             "vocab_size": 128, "intermediate_size": 176}  # fmt: skip
    assert model_args_from_hf(llama).rope_scaling_args.scaling_factor == 1.0  # Llama 3: no scaling
    with pytest.raises(UnsupportedModel, match="tie_word_embeddings .*: got True"):
        model_args_from_hf({**llama, "tie_word_embeddings": True})
    with pytest.raises(UnsupportedModel, match="model_type: got 'mistral'; expected one of 'qwen3', 'llama'"):
        model_args_from_hf({**llama, "model_type": "mistral"})


# -- data files and settings -----------------------------------------------------------------------------


def test_examples_come_from_a_directory_or_slices_of_one_file(tmp_path, tokenizer):
    data = write_synthetic(tmp_path / "data", train=40, test=8)
    train, cut = load_examples(str(data), "train", tokenizer, max_length=128)
    assert len(train) == 40 and cut == 0 and len(load_examples(str(data), "test", tokenizer, 128)[0]) == 8
    words = [json.loads(line)["messages"][1]["content"] for line in (data / "train.jsonl").read_text().splitlines()]
    held_out = [json.loads(line)["messages"][1]["content"] for line in (data / "test.jsonl").read_text().splitlines()]
    assert set(words).isdisjoint(held_out)
    one_file = str(data / "train.jsonl")
    assert len(load_examples(one_file, "train[:75%]", tokenizer, 128)[0]) == 30
    assert load_examples(one_file, "train[75%:]", tokenizer, 128)[0] == train[30:]
    with pytest.raises(DataError, match="spec.dataset.path: not set"):
        load_examples(None, "train", tokenizer, 128)


def test_a_bad_algorithm_value_names_the_field():
    assert Algorithm.model_validate({"maxLength": "64", "lr": 0.1}).max_length == 64
    assert EVAL_EVERY == 50  # the app's own, for a job that leaves evalEvery unset
    with pytest.raises(
        SpecError, match=r"spec.algorithm.rowsPerStep: got 0; expected a value greater than or equal to 1"
    ):
        parse_spec({"model": {"path": "/m"}, "algorithm": {"rowsPerStep": 0}})


# -- the job ---------------------------------------------------------------------------------------------


def write_parquet(out: Path) -> Path:
    """The same task as prompt/completion rows in Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True)
    for name, count, seed in (("train", 2000, 0), ("test", 48, 1)):
        rows = [{"prompt": r["messages"][1]["content"], "completion": r["messages"][2]["content"]}
                for r in synthetic_rows(count, seed)]  # fmt: skip
        pq.write_table(pa.Table.from_pylist(rows), out / f"{name}.parquet")
    return out


def held_out_loss(model_dir: Path, data: Path, max_length: int) -> float:
    """Token-mean NLL of the held-out split's trained tokens, one example at a time, in transformers."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    examples, _ = load_examples(str(data), "test", tokenizer, max_length)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.input_ids])
            logprobs = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            mask = torch.tensor(e.mask[1:])
            total -= logprobs[mask].sum().item()
            tokens += int(mask.sum())
    return total / tokens


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_the_job_lowers_the_held_out_loss_and_exports_a_checkpoint_transformers_loads(fmt, tiny_model, tmp_path):
    data = write_synthetic(tmp_path / "data") if fmt == "jsonl" else write_parquet(tmp_path / "data")
    job = yaml.safe_load((REPO / "apps/sft/tiny.yaml").read_text())
    spec = job["spec"]
    spec["model"]["path"] = str(tiny_model)
    spec["dataset"]["path"] = str(data)
    spec["steps"] = 12
    spec["algorithm"].update(evalEvery=6, maxLength=128)
    if fmt == "jsonl":
        spec["roles"]["trainer"]["procsPerNode"] = 2  # packed rows sharded over two ranks
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "apps.sft.main", "--config", str(path), "--run-dir", str(run_dir), "--no-color"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=850,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    before, after = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    print(f"{fmt}: held-out loss {before:.3f} -> {after:.3f}")
    assert after < 0.6 * before, evals
    assert all(0 < r["packing"] <= 1 and r["examples"] > 4 for r in rows if "loss" in r)  # several examples per row

    exported = run_dir / "checkpoints" / "hf" / "step-12"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in exported.iterdir()}
    # transformers scores the held-out split on the export, unpacked, exactly as the trainer did packed.
    assert held_out_loss(exported, data, 128) == pytest.approx(after, rel=1e-4)
