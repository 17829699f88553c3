"""A tiny random Qwen3 model and a character-level tokenizer in HF format, built offline.

Tests and CPU examples need a policy that every role loads the way it would load a real
checkpoint: transformers, torchtitan (through its Qwen3 state-dict adapter) and vLLM. Nothing
is downloaded: the weights are random (seeded) and the tokenizer maps one character to one
token, so any text round-trips.

    python -m kubeforge.tiny_model OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, *CHAT_TOKENS]
CHARACTERS = string.digits + string.ascii_lowercase + string.ascii_uppercase + " +-*/=()[]{}<>.,:;!?'\"_#%&@\n"
VOCAB_SIZE = 128

# One turn per message, each closed by <eos>: enough for vLLM's chat endpoint and agentic rollouts.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# vLLM's CPU attention kernels take head sizes of 32 and up.
ARCHITECTURE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def vocabulary() -> dict[str, int]:
    """Token -> id: special tokens first, then one token per character, padded with reserved tokens."""
    tokens = SPECIAL_TOKENS + list(CHARACTERS)
    tokens += [f"<reserved_{i}>" for i in range(VOCAB_SIZE - len(tokens))]
    assert len(tokens) == VOCAB_SIZE and len(set(tokens)) == VOCAB_SIZE
    return {token: i for i, token in enumerate(tokens)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    tokenizer.decoder = decoders.Fuse()  # and back, with no separator
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=CHAT_TOKENS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=ARCHITECTURE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def build_config(tie_embeddings: bool = True) -> Qwen3Config:
    ids = vocabulary()
    return Qwen3Config(
        vocab_size=VOCAB_SIZE,
        tie_word_embeddings=tie_embeddings,  # as in the small Qwen3 checkpoints
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        dtype="float32",  # trainer and generator then hold bit-identical weights
        **ARCHITECTURE,
    )


def write_tiny_model(out_dir: str | Path, seed: int = 0, tie_embeddings: bool = True) -> Path:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(build_config(tie_embeddings))
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kubeforge.tiny_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory to write the model into (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    print(write_tiny_model(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
