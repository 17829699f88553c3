"""The generator role: a real vLLM engine on a tiny model, started as the launcher starts it.

One generator process serves every test in this module (engine start-up is the slow part).
The tests run in file order: generation at policy version 0 first, then weight updates.

Run as a script, this file is the trainer-side sender process of the weight-update test:
    python tests/test_generator.py send MODEL_DIR OUT_DIR ADDR URL TOKEN VERSION
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]

# The generator serves float32 so that its logprobs can be held to transformers' within float32
# rounding: measured here, the largest difference is 5e-7 (original weights) and 1e-6 (after an
# update); the tolerance leaves 10x room for other CPUs' summation orders.
LOGPROB_TOLERANCE = 1e-5
# At most 8 sequences at once: long requests run in waves, so an update lands mid-way (see below).
ENGINE_ARGS = "--dtype float32 --max-model-len 256 --max-num-seqs 8 --enforce-eager"
PROMPTS = [[1, 20, 15, 21, 4], [1, 33, 34, 35], [1, 9]]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}:{{ message['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


# ---------------------------------------------------------------------------------------------
# A tiny Llama and its tokenizer, built offline


def build_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama (vocab 64, hidden 128, tied embeddings) in float32, one token per character."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    tokens = specials + list("0123456789abcdefghijklmnopqrstuvwxyz+-*/=()., ?!:")
    tokens += [f"<extra_{i}>" for i in range(64 - len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        # Tied, as in small Llama and Qwen checkpoints: the LM head is the embedding.
        tie_word_embeddings=True,
        dtype="float32",
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_hf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> list[float]:
    """transformers' log-probability of each completion token (sampled at `temperature`) after what precedes it."""
    import torch

    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1] / temperature, dim=-1)
    return logp.gather(1, torch.tensor(completion)[:, None])[:, 0].tolist()


def max_logprob_error(model, generation, prompts, temperature: float = 1.0) -> float:
    worst = 0.0
    for (ids, lps), prompt_index in zip(generation.samples(), generation.prompt_index, strict=True):
        ref = hf_logprobs(model, prompts[prompt_index], ids, temperature)
        worst = max(worst, max(abs(a - b) for a, b in zip(lps, ref, strict=True)))
    return worst


# ---------------------------------------------------------------------------------------------
# The generator process, started with the environment contract as the launcher would


class GeneratorProcess:
    def __init__(self, root: Path, model: Path, engine_args: str = ENGINE_ARGS):
        from kubeforge.launcher import local_environments
        from kubeforge.spec import RLJobSpec

        self.model = model
        from kubeforge import auth

        tokens = auth.new_tokens()
        self.job_token, self.trainer_token = tokens["job"], tokens["trainer"]
        self.headers = auth.bearer(self.job_token)  # what any peer of the job presents
        run_dir = root / "run"
        spec = RLJobSpec.model_validate(
            {"model": {"path": str(model)}, "roles": {"generator": {"env": {"GENERATOR_VLLM_ARGS": engine_args}}}}
        )
        (env,) = local_environments("gen-test", spec, run_dir, roles=["generator"], tokens=tokens).values()
        self.port = int(env["KUBEFORGE_HTTP_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.sync_addr = env["KUBEFORGE_WEIGHT_SYNC_ADDR"]
        self.log_path = run_dir / "generator-0.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubeforge.generator"],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends the engine's processes too
        )

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"generator exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError(f"generator not ready after {timeout} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def generator(tmp_path_factory, tiny_model):
    process = GeneratorProcess(tmp_path_factory.mktemp("generator"), tiny_model)
    try:
        process.wait_ready()
        yield process
    finally:
        code = process.stop()
        assert code == 0, f"generator exited with {code}:\n{process.tail()}"


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    return load_hf(tiny_model)


def generate(generator: GeneratorProcess, prompts=PROMPTS, **kwargs):
    from kubeforge.generator.wire import GeneratorClient

    async def call():
        async with GeneratorClient(generator.url, token=generator.job_token) as client:
            return await client.generate(prompts, **kwargs)

    return asyncio.run(call())


def weights_info(generator: GeneratorProcess) -> dict:
    return httpx.get(f"{generator.url}/weights/info", headers=generator.headers, timeout=30).json()


def metric(generator: GeneratorProcess, name: str) -> float:
    for line in httpx.get(f"{generator.url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0  # not set yet


# ---------------------------------------------------------------------------------------------
# Policy version 0: the weights from disk


def test_generate_returns_n_samples_per_prompt_with_logprobs_at_version_0(generator, hf_model):
    import torch

    generated = "kubeforge_generator_generated_tokens_total"
    tokens_before = metric(generator, generated)
    started = time.perf_counter()
    result = generate(generator, n=4, max_tokens=24, temperature=1.0, seed=7, ignore_eos=True)
    seconds = time.perf_counter() - started
    deadline = time.monotonic() + 5  # the stat logger records each engine step as the outputs go out
    while metric(generator, generated) - tokens_before < 12 * 24 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(generator, generated) - tokens_before == 12 * 24

    assert len(result) == len(PROMPTS) * 4
    assert result.prompt_index == [0] * 4 + [1] * 4 + [2] * 4
    assert result.policy_version == 0 and result.policy_versions == [[0, 0]] * 12
    assert result.finish_reasons == ["length"] * 12
    assert result.token_ids.dtype == torch.int32 and result.logprobs.dtype == torch.float32
    assert result.offsets.tolist() == list(range(0, 12 * 24 + 1, 24))
    assert len({tuple(ids) for ids, _ in result.samples()}) > 1  # n samples, not n copies

    error = max_logprob_error(hf_model, result, PROMPTS)
    print(f"\n12 x 24 tokens in {seconds:.2f} s; max |vLLM - transformers| logprob = {error:.2e}")
    assert error < LOGPROB_TOLERANCE

    # At another temperature the logprobs are those of the tempered distribution actually sampled from.
    tempered = generate(generator, n=2, max_tokens=12, temperature=0.7, seed=7, ignore_eos=True)
    error = max_logprob_error(hf_model, tempered, PROMPTS, temperature=0.7)
    print(f"at temperature 0.7: max |vLLM - transformers| logprob = {error:.2e}")
    assert error < LOGPROB_TOLERANCE


def test_generate_is_reproducible_with_a_seed_and_stops_at_stop_tokens(generator):
    first = generate(generator, prompts=PROMPTS[:1], n=2, max_tokens=16, seed=3)
    again = generate(generator, prompts=PROMPTS[:1], n=2, max_tokens=16, seed=3)
    assert first.samples() == again.samples()

    stop = first.samples()[0][0][3]  # a token the seeded sample is known to produce
    stopped = generate(generator, prompts=PROMPTS[:1], n=2, max_tokens=16, seed=3, stop_token_ids=[stop])
    ids, _ = stopped.samples()[0]
    assert ids[-1] == stop and len(ids) <= 4 and stopped.finish_reasons[0] == "stop"


def test_bad_requests_are_refused_with_400_and_the_engine_survives(generator):
    for body in (
        {"prompt_token_ids": [[1, 999]], "max_tokens": 4},  # outside the vocabulary (64)
        {"prompt_token_ids": [[]], "max_tokens": 4},
        {"prompt_token_ids": [[1, 2]], "n": 0},
    ):
        response = httpx.post(f"{generator.url}/generate", json=body, headers=generator.headers, timeout=60)
        assert response.status_code in (400, 422), (body, response.text)
    assert len(generate(generator, prompts=PROMPTS[:1], max_tokens=2)) == 1


def test_openai_completions_and_chat_answer_from_the_same_engine(generator):
    completion = httpx.post(
        f"{generator.url}/v1/completions",
        json={"model": "policy", "prompt": "12+3=", "max_tokens": 5, "temperature": 0},
        headers=generator.headers,
        timeout=120,
    )
    assert completion.status_code == 200, completion.text
    body = completion.json()
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] >= 1
    assert isinstance(body["choices"][0]["text"], str)
    assert completion.headers["x-kubeforge-policy-version"] == "0"

    chat = httpx.post(
        f"{generator.url}/v1/chat/completions",
        json={"model": "policy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        headers=generator.headers,
        timeout=120,
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["role"] == "assistant"
    models = httpx.get(f"{generator.url}/v1/models", headers=generator.headers).json()["data"]
    assert "policy" in [m["id"] for m in models]


def test_weight_routes_need_the_trainers_token_and_a_group(generator):
    body = {"version": 1, "params": [["w", "float32", [2]]], "bucket_bytes": 1024}
    for headers in ({}, generator.headers):  # no token, or the job token any pod of the job holds
        response = httpx.post(f"{generator.url}/weights/update", json=body, headers=headers, timeout=30)
        assert response.status_code == 401
    assert httpx.post(f"{generator.url}/v1/completions", json={}, timeout=30).status_code == 401
    # With the trainer's token but before /weights/init: refused before anything is paused or unloaded.
    headers = {"Authorization": f"Bearer {generator.trainer_token}"}
    response = httpx.post(f"{generator.url}/weights/update", json=body, headers=headers, timeout=30)
    assert response.status_code == 409 and "/weights/init" in response.text
    assert weights_info(generator)["policy_version"] == 0
    assert httpx.get(f"{generator.url}/readyz").status_code == 200


def test_seeded_prompts_longer_than_a_steps_token_budget_keep_the_cpu_engine_alive(tmp_path, tiny_model):
    """Issue 16, item 2: 8 prompts of 40 tokens x 4 samples, each request seeded, against a token
    budget of 64 per engine step. With chunked prefill (vLLM's CPU default) a prompt is split across
    steps, vLLM rewinds its seeded generator with set_offset, which CPU generators lack, and the
    engine core dies. The generator turns chunked prefill off on CPU: each prompt is prefilled whole."""
    args = "--dtype float32 --max-model-len 64 --max-num-batched-tokens 64 --max-num-seqs 16 --enforce-eager"
    process = GeneratorProcess(tmp_path, tiny_model, engine_args=args)
    prompts = [[1] + [4 + (7 * p + i) % 60 for i in range(39)] for p in range(8)]
    try:
        process.wait_ready()
        first = generate(process, prompts=prompts, n=4, max_tokens=8, seed=7, ignore_eos=True)
        again = generate(process, prompts=prompts, n=4, max_tokens=8, seed=7, ignore_eos=True)
        assert len(first) == 8 * 4  # samples
        assert [ids for ids, _ in first.samples()] == [ids for ids, _ in again.samples()]  # seeded: reproducible
        assert httpx.get(f"{process.url}/healthz", timeout=10).status_code == 200
    finally:
        code = process.stop()
    assert code == 0, process.tail()


# ---------------------------------------------------------------------------------------------
# Weight updates from a trainer-side sender


def test_weight_update_from_a_sender_process_serves_the_new_policy(generator, hf_model, tmp_path):
    import torch

    prompt = PROMPTS[0]
    before = generate(generator, prompts=[prompt], n=2, max_tokens=20, seed=11, ignore_eos=True)

    new_weights = tmp_path / "new"
    sender = subprocess.run(
        [sys.executable, __file__, "send", str(generator.model), str(new_weights), generator.sync_addr]
        + [generator.url, generator.trainer_token, "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert sender.returncode == 0, sender.stdout + sender.stderr + generator.tail()
    stats = json.loads(sender.stdout.strip().splitlines()[-1])
    print(f"\nweight update: {stats}")
    assert stats["generators"][0]["policy_version"] == 1
    assert weights_info(generator)["policy_version"] == 1

    after = generate(generator, prompts=[prompt], n=2, max_tokens=20, seed=11, ignore_eos=True)
    assert after.policy_version == 1 and after.policy_versions == [[1, 1]] * 2

    new_model = load_hf(new_weights)
    error_new = max_logprob_error(new_model, after, [prompt])
    print(f"max |vLLM - transformers(new weights)| logprob = {error_new:.2e}")
    assert error_new < LOGPROB_TOLERANCE

    # The same tokens scored by the old weights: far off, so the engine really serves new ones.
    error_old = max_logprob_error(hf_model, after, [prompt])
    print(f"max |vLLM - transformers(old weights)| logprob = {error_old:.2e}")
    assert error_old > 100 * LOGPROB_TOLERANCE
    assert not torch.equal(before.logprobs, after.logprobs)

    assert metric(generator, "kubeforge_generator_policy_version") == 1
    assert metric(generator, "kubeforge_generator_weight_update_seconds_count") == 1
    assert metric(generator, "kubeforge_generator_weight_update_bytes_total") == stats["bytes"]


def test_a_new_formation_updates_while_requests_are_in_flight(generator, hf_model):
    """A trainer that comes back re-forms the group; requests in flight are kept, not dropped."""
    from kubeforge.weight_sync import WeightSender

    served = weights_info(generator)["policy_version"]
    sender = WeightSender(generator.sync_addr, bucket_bytes=1 << 16, token=generator.trainer_token, timeout_s=120)
    try:
        assert sender.connect([generator.url]) == 2
        # The original weights, as policy version 2, this time with the tied LM head spelt out.
        state = list(hf_model.state_dict().items())
        assert "lm_head.weight" in dict(state)

        async def generate_while_updating():
            from kubeforge.generator.wire import GeneratorClient

            async with GeneratorClient(generator.url, token=generator.job_token) as client:
                # 48 samples x 240 tokens: six waves of 8 sequences, long enough to update mid-way.
                request = asyncio.create_task(client.generate(PROMPTS, n=16, max_tokens=240, seed=5, ignore_eos=True))
                # Update once the engine holds the requests. Its scheduler's count can reach the
                # metrics late on a starved CPU (outputs arrive in bursts), so also go after 0.5 s:
                # the request takes several seconds, the update lands inside it either way.
                sent = time.monotonic()
                while metric(generator, "kubeforge_generator_queue_depth") == 0 and time.monotonic() - sent < 0.5:
                    await asyncio.sleep(0.05)
                assert not request.done(), "generation ended before the update could start"
                stats = await asyncio.to_thread(sender.send, state, 2)
                return await request, stats

        result, stats = asyncio.run(generate_while_updating())
    finally:
        sender.close()

    assert stats.generators[0]["policy_version"] == 2 and weights_info(generator)["policy_version"] == 2
    assert len(result) == 48 and result.finish_reasons == ["length"] * 48
    assert result.policy_version == served  # the oldest weights that sampled any token of the answer
    # Each sample names the weights it started and ended on. Which samples straddle the update
    # depends on timing (on a starved machine the last tokens may all be sampled before the
    # pause), so only the bounds are fixed.
    assert all(served <= first <= last <= 2 for first, last in result.policy_versions)

    after = generate(generator, n=2, max_tokens=16, seed=1, ignore_eos=True)
    assert after.policy_version == 2
    assert max_logprob_error(hf_model, after, PROMPTS) < LOGPROB_TOLERANCE  # back on the original weights


# ---------------------------------------------------------------------------------------------
# The sender process (a stand-in for the trainer's rank 0)


def send_perturbed(model_dir: str, out_dir: str, addr: str, url: str, token: str, version: str) -> None:
    """Perturb the model's weights, save them (the test's reference only), send them as `version`."""
    import torch
    from kubeforge.weight_sync import ParamSpec, WeightSender

    model = load_hf(Path(model_dir))
    torch.manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out_dir)

    # The tied LM head is the embedding: send it once, the generator feeds both from it.
    named = [(name, t) for name, t in model.state_dict().items() if name != "lm_head.weight"]
    params = [ParamSpec.of(name, t) for name, t in named]
    sender = WeightSender(addr, bucket_bytes=200_000, token=token, timeout_s=120)  # several buckets
    sender.connect([url])
    stats = sender.send(iter(named), int(version), params=params)
    sender.close()
    print(json.dumps(stats.__dict__))


if __name__ == "__main__":
    if sys.argv[1:2] == ["send"]:
        send_perturbed(*sys.argv[2:8])


def test_a_late_replica_serves_only_once_it_has_the_trainers_weights():
    """No engine needed: the readiness rule of a replica that starts after the trainer sent weights."""
    from fastapi import HTTPException
    from kubeforge.auth import Credentials
    from kubeforge.contract import RoleContext
    from kubeforge.generator.service import Generator
    from kubeforge.serving import RoleServer
    from kubeforge.spec import RLJobSpec

    ctx = RoleContext(
        job="late",
        namespace="local",
        role="generator",
        replica=3,
        spec=RLJobSpec.model_validate({"model": {"path": "/m"}}),
        run_dir=Path("."),
        credentials=Credentials.issue("generator"),
        http_host="127.0.0.1",
        http_port=1,
        weight_sync_addr="",
    )
    server = RoleServer(ctx)
    generator = Generator(server, engine=None, engine_args=None)
    generator.wait_for_weights(4)  # what hold_for_current_weights does when the trainer's store says 4
    assert not server.ready
    with pytest.raises(HTTPException) as refused:
        generator._check_usable()
    assert refused.value.status_code == 503 and "policy version 4" in refused.value.detail
    generator._set_version(4)  # the trainer's update landed
    assert server.ready
    generator._check_usable()
