"""Generator benchmark: /generate throughput against the same vLLM engine used directly.

One run, one model (kubeforge.tiny_model), one workload, two measurements:

1. baseline: vLLM's AsyncLLM built in this process from the very engine arguments the generator
   role builds (kubeforge.generator.engine: engine_argv / parse_engine_args / start_engine, from
   the same environment contract), fed R concurrent "requests" of K prompts x n samples x T
   tokens, one engine request per prompt, all at once, as the role's Generator does;
2. service: the generator role as a real process (`python -m kubeforge.generator`, started with
   kubeforge.contract.role_env as tests/test_generator.py does), fed the same R concurrent
   requests through GeneratorClient /generate.

Both sample with logprobs=0, temperature 1, ignore_eos, max_tokens=T. Throughput is generated
tokens per second over --reps repetitions after --warmup ones; the ratio service / baseline is
the figure of issue 3 (goal >= 0.95).

    .venv/bin/python bench/generator_bench.py [--requests 4 --prompts 16 --n 8 --tokens 32 --reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from kubeforge import auth

REPO = Path(__file__).resolve().parents[1]
TOKENS = auth.new_tokens()  # the generator's job token answers /generate
ENGINE_ARGS = "--dtype float32 --max-model-len 256 --max-num-seqs 8 --enforce-eager"


def make_env(root: Path, model: Path, engine_args: str) -> tuple[dict[str, str], str]:
    """The generator role's environment contract (as the launcher sets it) and its base URL."""
    from kubeforge.launcher import local_environments
    from kubeforge.spec import RLJobSpec

    spec = RLJobSpec.model_validate(
        {"model": {"path": str(model)}, "roles": {"generator": {"env": {"GENERATOR_VLLM_ARGS": engine_args}}}}
    )
    (env,) = local_environments("gen-bench", spec, root / "run", roles=["generator"], tokens=TOKENS).values()
    return env, f"http://127.0.0.1:{env['KUBEFORGE_HTTP_PORT']}"


def workload(args) -> list[list[list[int]]]:
    """R requests of K prompts each; prompt lengths 4..19, ids in [4, 128) (tiny model vocab 128)."""
    import random

    rng = random.Random(0)
    return [
        [[rng.randrange(4, 128) for _ in range(4 + (r * args.prompts + k) % 16)] for k in range(args.prompts)]
        for r in range(args.requests)
    ]


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarize(times: list[float], tokens: int) -> dict:
    rates = [tokens / t for t in times]
    return {"tok_s": tokens * len(times) / sum(times), "best": max(rates), "worst": min(rates), "times": times}


# ---------------------------------------------------------------------------------------------
# 1. baseline: AsyncLLM in this process


async def run_baseline(env: dict[str, str], requests, args) -> dict:
    from kubeforge.contract import RoleContext
    from kubeforge.generator import engine as engine_setup

    ctx = RoleContext.from_env(env)
    engine_setup.prepare_environment(ctx)  # VLLM_CPU_KVCACHE_SPACE, before vLLM is imported
    engine_args = engine_setup.parse_engine_args(engine_setup.engine_argv(ctx, environ=env))
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    t0 = time.perf_counter()
    engine = await engine_setup.start_engine(engine_args)
    startup = time.perf_counter() - t0
    counter = iter(range(10**9))

    async def one_prompt(ids):
        params = SamplingParams(
            n=args.n, max_tokens=args.tokens, temperature=1.0, top_p=1.0, ignore_eos=True,
            logprobs=0, output_kind=RequestOutputKind.FINAL_ONLY,
        )  # fmt: skip
        (engine_input,) = await engine.renderer.render_cmpl_async([TokensPrompt(prompt_token_ids=ids)])
        final = None
        async for out in engine.generate(engine_input, params, f"base-{next(counter)}"):
            final = out
        assert all(c.logprobs is not None and len(c.logprobs) == len(c.token_ids) for c in final.outputs)
        return sum(len(c.token_ids) for c in final.outputs)

    async def one_request(prompts):
        return sum(await asyncio.gather(*(one_prompt(p) for p in prompts)))

    async def rep():
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one_request(r) for r in requests)))
        return time.perf_counter() - start, tokens

    try:
        for _ in range(args.warmup):
            await rep()
        times = []
        cpu0 = proc_cpu_s(os.getpid())
        for _ in range(args.reps):
            t, tokens = await rep()
            times.append(t)
        frontend_cpu = proc_cpu_s(os.getpid()) - cpu0
    finally:
        engine.shutdown()
    return {**summarize(times, tokens), "tokens": tokens, "startup_s": startup, "frontend_cpu_s": frontend_cpu}


# ---------------------------------------------------------------------------------------------
# 2. service: the generator role as a process, through GeneratorClient


def start_role(env: dict[str, str], root: Path):
    log_path = root / "generator-0.log"
    log = open(log_path, "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubeforge.generator"],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, log, log_path


def wait_ready(proc, url: str, log_path: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"generator exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"generator not ready after {timeout} s")


def stop_role(proc, log) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.close()
    return proc.returncode


async def run_service(url: str, requests, args, pid: int) -> dict:
    from kubeforge.generator.wire import GeneratorClient

    async with GeneratorClient(url, token=TOKENS["job"]) as client:

        async def one_request(prompts):
            gen = await client.generate(
                prompts, n=args.n, max_tokens=args.tokens, temperature=1.0, top_p=1.0, ignore_eos=True
            )
            assert len(gen) == len(prompts) * args.n and gen.logprobs.numel() == gen.token_ids.numel()
            return int(gen.token_ids.numel())

        async def rep():
            start = time.perf_counter()
            tokens = sum(await asyncio.gather(*(one_request(r) for r in requests)))
            return time.perf_counter() - start, tokens

        for _ in range(args.warmup):
            await rep()
        times = []
        cpu0, client0 = proc_cpu_s(pid), proc_cpu_s(os.getpid())
        for _ in range(args.reps):
            t, tokens = await rep()
            times.append(t)
        frontend_cpu, client_cpu = proc_cpu_s(pid) - cpu0, proc_cpu_s(os.getpid()) - client0
    return {**summarize(times, tokens), "tokens": tokens, "frontend_cpu_s": frontend_cpu, "client_cpu_s": client_cpu}


# ---------------------------------------------------------------------------------------------


def versions() -> str:
    import torch
    import vllm

    return f"python {platform.python_version()}, vllm {vllm.__version__}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4, help="concurrent /generate requests per repetition")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per request")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per sample (ignore_eos)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--engine-args", default=ENGINE_ARGS, help="GENERATOR_VLLM_ARGS for both")
    parser.add_argument("--order", choices=["baseline-first", "service-first"], default="baseline-first")
    args = parser.parse_args(argv)

    from kubeforge.tiny_model import write_tiny_model

    requests = workload(args)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="generator-bench-") as tmp:
        root = Path(tmp)
        model = write_tiny_model(root / "tiny")
        env, url = make_env(root, model, args.engine_args)
        results = {}

        def baseline():
            print("baseline: AsyncLLM in this process ...", flush=True)
            results["baseline"] = asyncio.run(run_baseline(env, requests, args))
            print(f"  {results['baseline']}", flush=True)

        def service():
            print("service: generator role process, GeneratorClient /generate ...", flush=True)
            proc, log, log_path = start_role(env, root)
            try:
                t0 = time.perf_counter()
                wait_ready(proc, url, log_path)
                startup = time.perf_counter() - t0
                results["service"] = {**asyncio.run(run_service(url, requests, args, proc.pid)), "startup_s": startup}
            finally:
                code = stop_role(proc, log)
            print(f"  {results['service']} (role exit {code})", flush=True)

        for step in (baseline, service) if args.order == "baseline-first" else (service, baseline):
            step()

    base, svc = results["baseline"], results["service"]
    assert base["tokens"] == svc["tokens"], (base["tokens"], svc["tokens"])
    ratio = svc["tok_s"] / base["tok_s"]
    load_after = os.getloadavg()
    rows = [
        ("baseline (AsyncLLM direct)", f"{base['tok_s']:.0f}", f"{base['worst']:.0f}-{base['best']:.0f}"),
        ("service (/generate)", f"{svc['tok_s']:.0f}", f"{svc['worst']:.0f}-{svc['best']:.0f}"),
    ]
    print()
    print("| run | tok/s (mean over reps) | range per rep |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"| **ratio service/baseline** | **{ratio:.3f}** | goal >= 0.95 |")
    print()
    print(
        f"settings: {args.requests} concurrent requests x {args.prompts} prompts x n={args.n} x {args.tokens} tokens "
        f"= {base['tokens']} tokens/rep; {args.warmup} warm-up + {args.reps} reps each; order {args.order}; "
        f"logprobs=0, temperature=1, ignore_eos; engine args: {args.engine_args}"
    )
    print(
        f"frontend CPU s over the timed reps (AsyncLLM's process, not the engine core): baseline "
        f"{base['frontend_cpu_s']:.1f}, service role {svc['frontend_cpu_s']:.1f} "
        f"(+ bench client {svc['client_cpu_s']:.1f})"
    )
    print(f"versions: {versions()}; cpus {os.cpu_count()}")
    print(f"loadavg before {tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in load_after)}")


if __name__ == "__main__":
    main()
