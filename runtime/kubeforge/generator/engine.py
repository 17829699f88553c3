"""Building the generator's vLLM engine (AsyncLLM) from the job spec.

The engine's settings are vLLM's own command-line flags, parsed by vLLM's own parser (the one
`vllm serve` uses), so that the OpenAI serving classes get the arguments they expect and every
vLLM option is available. kubeforge fills in what the spec decides (model, tokenizer, tensor
parallel, the weight-transfer backend); the role's environment variable GENERATOR_VLLM_ARGS
appends more flags (e.g. "--max-model-len 4096 --dtype bfloat16"), and later flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
from pathlib import Path

from kubeforge.contract import RoleContext

# Extra vLLM flags for the generator, set in spec.roles.generator.env. (Not KUBEFORGE_*: the
# schema keeps that prefix for kubeforge's own variables; not VLLM_*: vLLM warns about unknown ones.)
ENGINE_ARGS_ENV = "GENERATOR_VLLM_ARGS"
# The served model's name on the OpenAI endpoint, besides the model path.
SERVED_MODEL_NAME = "policy"
# On CPU, vLLM reserves gpu_memory_utilization (default 0.92) of host memory for its KV cache,
# which fails on shared machines; a fixed KV cache size in GiB is the sane default there.
CPU_KV_CACHE_GIB = "1"


def engine_argv(ctx: RoleContext, environ: dict[str, str] | None = None) -> list[str]:
    """vLLM command-line flags for this generator replica."""
    env = os.environ if environ is None else environ
    spec = ctx.spec
    generator = spec.roles.generator
    argv = [
        "--model", spec.model.path,
        "--served-model-name", SERVED_MODEL_NAME, spec.model.path,
        "--tensor-parallel-size", str(generator.tensor_parallel),
        "--seed", "0",
        # Our weight-transfer backend, loaded into every vLLM worker by the extension class.
        "--worker-extension-cls", "kubeforge.generator.transfer.KubeforgeWorkerExtension",
        "--weight-transfer-config", '{"backend": "kubeforge"}',
        # Logprobs of the distribution actually sampled from (after temperature, top-k/top-p),
        # not of the raw logits: the behaviour policy the trainer's importance ratios need.
        "--logprobs-mode", "processed_logprobs",
    ]  # fmt: skip
    if not generator.gpus:
        # A chunked prefill samples a token it then discards, and vLLM rewinds the request's seeded
        # generator with set_offset, which CPU generators lack: the engine core dies ("CPU Generator
        # does not use offset") once prompts outgrow --max-num-batched-tokens. Each prompt is
        # prefilled whole instead; validation refuses --enable-chunked-prefill on CPU.
        argv += ["--no-enable-chunked-prefill"]
    if spec.model.tokenizer:
        argv += ["--tokenizer", spec.model.tokenizer]
    argv += shlex.split(env.get(ENGINE_ARGS_ENV, ""))
    return argv


def check_model_dir(path: str) -> None:
    """Fail at once, in one line, when model.path holds no HF checkpoint (vLLM's own error comes late and long)."""
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path {path!r} holds no config.json: the generator needs an HF checkpoint directory "
            "(config.json, *.safetensors, tokenizer files), e.g. one written by `python -m kubeforge.tiny_model DIR`"
        )


def parse_engine_args(argv: list[str]) -> argparse.Namespace:
    """Parse `argv` with vLLM's own server parser: the namespace its serving classes expect."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="kubeforge.generator"))
    args = parser.parse_args(argv)
    validate_parsed_serve_args(args)
    return args


def prepare_environment(ctx: RoleContext) -> None:
    """Environment vLLM reads at import or start-up; call before importing vLLM."""
    if not ctx.spec.roles.generator.gpus:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)


async def start_engine(args: argparse.Namespace, stat_loggers: list | None = None):
    """Start vLLM's AsyncLLM (engine core in its own process) from parsed server arguments."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args = AsyncEngineArgs.from_cli_args(args)
    usage = UsageContext.OPENAI_API_SERVER
    vllm_config = engine_args.create_engine_config(usage_context=usage)
    # Built in a thread: start-up takes tens of seconds, and the role must keep answering
    # /healthz and /readyz meanwhile. AsyncLLM starts its asyncio tasks on first use, in our loop.
    return await asyncio.to_thread(
        AsyncLLM.from_vllm_config,
        vllm_config=vllm_config,
        usage_context=usage,
        stat_loggers=stat_loggers,
        enable_log_requests=engine_args.enable_log_requests,
        disable_log_stats=engine_args.disable_log_stats,
    )
