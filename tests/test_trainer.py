"""The trainer: its batch wire form, then the role for real (torchrun, 2 CPU ranks, gloo, FSDP2,
the tiny Qwen3, HTTP), then (slow) the role with a real vLLM generator, sample -> train -> publish.

One trainer is started for the role tests (start-up dominates: torch and torchtitan import in
every rank); they drive it in order, the way a controller would.
"""

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
import torch.distributed.checkpoint as dcp
from kubeforge import auth, contract
from kubeforge.algorithm import Algorithm
from kubeforge.batch import CONTENT_TYPE, BatchError, TrainBatch
from kubeforge.launcher import allocate_ports, local_environments
from kubeforge.losses import policy_loss
from kubeforge.spec import RLJobSpec
from kubeforge.tiny_model import write_tiny_model
from kubeforge.trainer.engine import Trainer
from kubeforge.trainer.model import model_args_from_hf
from kubeforge.validation import SpecError, parse_spec
from safetensors.torch import load_file
from torchtitan.models.qwen3.model.state_dict_adapter import Qwen3StateDictAdapter
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENS = auth.new_tokens()
AUTH = auth.bearer(TOKENS["controller"])  # the controller drives the trainer
JOB_AUTH = auth.bearer(TOKENS["job"])  # what any pod of the job presents (RoleProcess's default)
PROMPT = "<|user|>1+1<eos><|assistant|>"
GOOD, BAD = "2", "7"  # the response the advantages reward, and the one they punish


def free_ports(n):
    # Below the ephemeral range, as the launcher picks them (see tests/test_tiny_model.py).
    return list(allocate_ports([str(i) for i in range(n)], None).values())


def role_envs(tmp: Path, model_dir: Path, roles: dict, **spec_fields) -> dict[str, dict[str, str]]:
    """The environments the launcher would give each instance of a job (instance name -> environment)."""
    spec = RLJobSpec.model_validate({"model": {"path": str(model_dir)}, "roles": roles, **spec_fields})
    envs = local_environments("test", spec, tmp / "run", roles=roles, tokens=TOKENS)
    return {inst.name: {**os.environ, **env, "PYTHONUNBUFFERED": "1"} for inst, env in envs.items()}


class RoleProcess:
    def __init__(self, role: str, env: dict[str, str], log: Path):
        self.env = env
        self.url = f"http://127.0.0.1:{env['KUBEFORGE_HTTP_PORT']}"
        self.log = log
        self.process = subprocess.Popen(
            contract.role_command(role, python=sys.executable),
            env=env,
            cwd=REPO,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.http = httpx.Client(base_url=self.url, timeout=120, headers=JOB_AUTH)

    def wait_ready(self, timeout=300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.url} exited with {self.process.returncode}:\n{self.output()}")
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{self.url} not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def stop(self, timeout=60) -> int:
        os.killpg(self.process.pid, signal.SIGTERM)  # as the launcher or the kubelet does
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
            self.http.close()


def response_logprobs(model_dir: Path, responses: list[str]) -> dict[str, float]:
    """log p(response | PROMPT) under the HF model in `model_dir`: the reference for every check."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    out = {}
    for text in responses:
        ids = prompt + tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        out[text] = sum(logp[t - 1, ids[t]].item() for t in range(len(prompt), len(ids)))
    return out


def reference_grad_norm(model_dir: Path, batch: TrainBatch) -> float:
    """The whole batch's gradient norm in one process with transformers: what 2 sharded ranks must match."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    logits = model(batch.input_ids).logits[:, :-1]
    logprobs = logits.log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    logprobs = torch.nn.functional.pad(logprobs, (1, 0))
    loss, _ = policy_loss(logprobs, batch.behaviour_logprobs, batch.advantages, batch.response_mask)
    loss.backward()
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


def make_batch(model_dir: Path, version: int, rows: int = 6) -> TrainBatch:
    """Half the rows answer GOOD (advantage +1), half BAD (-1); behaviour logprobs from transformers."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    behaviour = response_logprobs(model_dir, [GOOD, BAD])
    answers = [GOOD if row % 2 == 0 else BAD for row in range(rows)]
    return TrainBatch.from_sequences(
        prompts=[tokenizer(PROMPT, add_special_tokens=False)["input_ids"]] * rows,
        responses=[tokenizer(answer, add_special_tokens=False)["input_ids"] for answer in answers],
        logprobs=[[behaviour[answer]] for answer in answers],
        advantages=[1.0 if answer == GOOD else -1.0 for answer in answers],
        policy_versions=[version] * rows,
        pad_id=tokenizer.pad_token_id,
        info={"test": True},
    )


# -- the batch, its wire form, the settings, the sharding: no processes needed ----------------------


def small_batch(rows=5, length=6, **overrides) -> TrainBatch:
    mask = torch.zeros(rows, length, dtype=torch.bool)
    for row in range(rows):
        mask[row, 2 : 3 + row % 3] = True  # responses of 1 to 3 tokens
    fields = dict(
        input_ids=torch.arange(rows * length).reshape(rows, length) % 100,
        response_mask=mask,
        behaviour_logprobs=torch.where(mask, -1.5, 0.0),
        advantages=torch.linspace(-1, 1, rows),
        policy_versions=torch.tensor([7] * rows),
    )
    return TrainBatch(**{**fields, **overrides})


def test_a_batch_survives_the_wire():
    batch = small_batch(ref_logprobs=torch.full((5, 6), -2.0), info={"step": 3, "rollouts": ["a", "b"]})
    data = batch.encode()
    assert isinstance(data, bytes)
    back = TrainBatch.decode(data)
    for name, value in batch.tensors().items():
        assert torch.equal(getattr(back, name), value) and getattr(back, name).dtype == value.dtype, name
    assert back.info == {"step": 3, "rollouts": ["a", "b"]}
    assert back.num_tokens == batch.num_tokens == 9 and back.rows == 5
    assert TrainBatch.decode(small_batch().encode()).ref_logprobs is None
    per_token = small_batch(advantages=torch.ones(5, 6))
    assert TrainBatch.decode(per_token.encode()).advantages.shape == (5, 6)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: b"not a batch", "not a safetensors batch"),
        (lambda: small_batch(response_mask=torch.zeros(5, 6, dtype=torch.bool)).encode(), "no response tokens"),
        (lambda: small_batch(advantages=torch.ones(4)), r"advantages: got shape \(4,\)"),
        (lambda: small_batch(response_mask=torch.ones(5, 6, dtype=torch.bool)), "position 0 is set"),
        (lambda: small_batch(advantages=torch.tensor([1.0, float("nan"), 0, 0, 0])), "advantages: not all finite"),
    ],
)
def test_bad_batches_say_what_is_wrong(make, message):
    with pytest.raises(BatchError, match=message):
        data = make()
        TrainBatch.decode(data)


def test_a_wire_batch_with_a_wrong_dtype_is_refused():
    from safetensors.torch import save

    tensors = small_batch().tensors()
    tensors["input_ids"] = tensors["input_ids"].to(torch.int32)
    data = save(tensors, metadata={"kubeforge.batch": json.dumps({"format": "kubeforge.batch/v1"})})
    with pytest.raises(BatchError, match="input_ids: got dtype torch.int32; expected torch.int64"):
        TrainBatch.decode(data)


def test_a_batch_from_sampled_sequences():
    batch = TrainBatch.from_sequences(
        prompts=[[1, 5, 6], [1, 7]],
        responses=[[8, 9], [10, 11, 12]],
        logprobs=[[-0.5, -1.0], [-0.1, -0.2, -0.3]],
        advantages=[1.0, -1.0],
        policy_versions=[4, 5],
        pad_id=0,
    )
    assert batch.input_ids.tolist() == [[1, 5, 6, 8, 9], [1, 7, 10, 11, 12]]
    assert batch.response_mask.tolist() == [[False, False, False, True, True], [False, False, True, True, True]]
    assert batch.behaviour_logprobs[1, 2:].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    with pytest.raises(BatchError, match="row 0: 2 response tokens but 1 logprobs"):
        TrainBatch.from_sequences([[1]], [[2, 3]], [[-1.0]], [0.0], [0])


def test_settings_come_from_the_algorithm_section():
    settings = Algorithm.model_validate({"lr": 3e-6, "clipEpsHigh": 0.28, "microBatchSize": 4, "groupSize": 8})
    assert (settings.lr, settings.clip_eps_high, settings.micro_batch_size) == (3e-6, 0.28, 4)
    assert settings.clip_eps_low is None and settings.betas == (0.9, 0.999)  # None: the loss variant's default
    with pytest.raises(SpecError, match="spec.algorithm.lr: got 'fast'; expected a valid number"):
        parse_spec({"model": {"path": "/m"}, "algorithm": {"lr": "fast"}})


def test_the_learning_rate_warms_up_then_holds_or_decays():
    def rates(**keys) -> list[float]:
        settings = Algorithm.model_validate({"lr": 1.0, "lrWarmupSteps": 2, **keys})
        return [settings.lr_at(step, rl_steps=6) for step in range(9)]

    assert rates() == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1, 1])
    # Decay from the end of warm-up to lr * lrMinFactor, reached one step after the job's last
    # (torchtitan's shape: the last step still learns); a job extended on resume keeps the final rate.
    assert rates(lrDecay="linear", lrMinFactor=0.1) == pytest.approx([0.5, 1, 1, 0.775, 0.55, 0.325, 0.1, 0.1, 0.1])
    assert rates(lrDecay="cosine")[2:7] == pytest.approx(
        [1, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 - math.cos(math.pi / 4)), 0]
    )
    # GRPO's supervised warm-up steps (warmupSteps) are trainer steps: the decay spans them too.
    assert rates(lrDecay="linear", warmupSteps=2)[6:] == pytest.approx([2 / 6, 1 / 6, 0])
    with pytest.raises(SpecError, match="spec.algorithm.lrDecay: got 'step'"):
        parse_spec({"model": {"path": "/m"}, "algorithm": {"lrDecay": "step"}})


@pytest.mark.parametrize("world_size, micro_batch_size", [(2, 0), (2, 2), (3, 1), (8, 0)])
def test_every_row_is_trained_once_and_every_rank_runs_as_many_passes(world_size, micro_batch_size):
    batch = small_batch(rows=5)
    settings = Algorithm(micro_batch_size=micro_batch_size)
    passes, seen = [], []
    for rank in range(world_size):
        shard = SimpleNamespace(rank=rank, world_size=world_size, settings=settings, device=torch.device("cpu"))
        micros = list(Trainer._micro_batches(shard, batch))
        passes.append(len(micros))
        for micro in micros:
            for row in range(micro.rows):
                if micro.response_mask[row].any():  # rows without tokens are padding
                    seen.append(int(micro.input_ids[row, 0]))
            if micro.num_tokens:  # cut right after the last response token
                assert micro.response_mask[:, -1].any()
    assert len(set(passes)) == 1  # FSDP's collectives pair up across ranks
    assert sorted(seen) == sorted(int(i) for i in batch.input_ids[:, 0])


# -- the role -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=3)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tiny):
    tmp = tmp_path_factory.mktemp("trainer")
    envs = role_envs(
        tmp,
        tiny,
        roles={"trainer": {"procsPerNode": 2}},
        # 3 rows per rank: 2 passes; the learning rate decays linearly over the job's 20 steps;
        # activations are recomputed (the gradient is checked against a reference, and checkpoints
        # against the plain model's names).
        algorithm={
            "lr": 0.01,
            "lrDecay": "linear",
            "clipEpsHigh": 0.28,
            "microBatchSize": 2,
            "activationCheckpointing": "selective",
        },  # fmt: skip
        checkpoint={"interval": 2, "keep": 2},
        steps=20,
    )
    process = RoleProcess("trainer", envs["trainer-0"], tmp / "trainer.log")
    try:
        process.wait_ready()
        yield process
    finally:
        if process.process.poll() is None:
            process.stop()


def test_weight_names_are_the_checkpoint_names(trainer, tiny):
    names = trainer.http.get("/weights/names").json()
    hf = load_file(tiny / "model.safetensors")  # what transformers and vLLM load: lm_head tied, so absent
    assert names["policy_version"] == 0
    assert {w["name"]: (w["dtype"], tuple(w["shape"])) for w in names["weights"]} == {
        name: ("float32", tuple(t.shape)) for name, t in hf.items()
    }


def test_bad_requests_are_refused_before_any_rank_sees_them(trainer, tiny):
    assert trainer.http.post("/train", content=b"junk", headers=AUTH).status_code == 400
    batch = make_batch(tiny, version=0)
    assert trainer.http.post("/train", content=batch.encode()).status_code == 401  # the job token: not the controller
    batch.input_ids[0, 0] = 1000  # outside the vocabulary (128)
    refused = trainer.http.post("/train", content=batch.encode(), headers=AUTH)
    assert refused.status_code == 400 and "vocabulary" in refused.text
    assert trainer.http.post("/weights/publish", headers=AUTH).status_code == 400  # no generator in this job
    # A publish goes to the job's own generators only: the sender presents the trainer's token there.
    (nobody,) = free_ports(1)
    refused = trainer.http.post("/weights/publish", json={"generators": [f"http://127.0.0.1:{nobody}"]}, headers=AUTH)
    assert refused.status_code == 400 and "not among the job's generators" in refused.text
    assert trainer.http.get("/readyz").status_code == 200


def test_training_moves_the_policy_towards_the_advantaged_answer(trainer, tiny, tmp_path):
    """Three on-policy steps, as a sync GRPO loop runs them: sample from the current weights, train."""
    before = response_logprobs(tiny, [GOOD, BAD])
    policy, steps, expected_norms = tiny, [], []
    for version in range(3):
        batch = make_batch(policy, version=version)  # behaviour logprobs: transformers on `policy`
        expected_norms.append(reference_grad_norm(policy, batch))
        body = batch.encode()
        response = trainer.http.post("/train", content=body, headers={**AUTH, "Content-Type": CONTENT_TYPE})
        assert response.status_code == 200, response.text
        steps.append(response.json())
        # Exports land under the run directory (a relative dir is taken from it), nowhere else.
        where = {"dir": f"exports/{tmp_path.name}/v{version + 1}"}
        export = trainer.http.post("/weights/export", json=where, headers=AUTH)
        assert export.json()["policy_version"] == version + 1
        policy = Path(export.json()["path"])

    for step, expected_norm in zip(steps, expected_norms, strict=True):
        # Sharded over 2 ranks, the gradient is the whole batch's (its norm is computed before clipping).
        assert step["grad_norm"] == pytest.approx(expected_norm, rel=1e-4)
        # The trainer's logprobs equal transformers' on the exported weights: ratio 1, nothing clipped,
        # and +1 / -1 advantages on equal ratios cancel in the loss.
        assert step["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
        assert step["clip_fraction"] == 0.0
        assert step["loss"] == pytest.approx(0.0, abs=1e-5)
        assert step["tokens"] == 6 and step["samples"] == 6 and step["staleness_max"] == 0
        assert step["updated"] and step["step_seconds"] > 0
    assert [s["policy_version"] for s in steps] == [1, 2, 3]
    assert [s["lr"] for s in steps] == pytest.approx([0.01, 0.0095, 0.009])
    assert [s["checkpoint"] and Path(s["checkpoint"]).name for s in steps] == [None, "step-2", None]  # interval 2

    after = response_logprobs(policy, [GOOD, BAD])
    assert after[GOOD] > before[GOOD] + 0.5
    assert after[BAD] < before[BAD] - 0.5


def test_checkpoints_hold_model_optimizer_and_counters(trainer, tiny):
    saved = trainer.http.post("/checkpoint", json={"app_state": {"data_position": 42}}, headers=AUTH).json()
    assert saved["step"] == 3 and saved["policy_version"] == 3
    path = Path(saved["path"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["step-2", "step-3"]
    assert (path / "COMPLETE").is_file()  # written last: the checkpoint counts (trainer/checkpoint.py)
    status = trainer.http.get("/status", headers=AUTH).json()
    assert status["checkpoint"] == str(path) and status["app_state"] == {"data_position": 42}

    # Load it back without any process group, as a single process would, and map it to HF names:
    # the very weights the trainer exports now.
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    model = {k.removeprefix("model."): torch.empty(m.size) for k, m in metadata.items() if k.startswith("model.")}
    state = {"model": model, "trainer": {"step": torch.tensor(0), "policy_version": torch.tensor(0)}}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    assert int(state["trainer"]["step"]) == 3 and int(state["trainer"]["policy_version"]) == 3
    assert any(k.startswith("optimizer.state.") for k in metadata)

    exported = trainer.http.post("/weights/export", headers=AUTH).json()
    assert exported["path"].endswith("exports/policy-v3")
    hf = load_file(Path(exported["path"]) / "model.safetensors")
    args = model_args_from_hf(json.loads((tiny / "config.json").read_text()))
    from_checkpoint = Qwen3StateDictAdapter(args, None).to_hf(model)
    assert sorted(from_checkpoint) == sorted(hf)
    for name, tensor in hf.items():
        assert torch.equal(from_checkpoint[name], tensor), name
    initial = load_file(tiny / "model.safetensors")
    assert not torch.equal(hf["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])


def test_sigterm_stops_every_rank(trainer, tmp_path):
    trainer.stop()  # torchrun itself exits 1 on SIGTERM (its SignalException); the ranks exit cleanly
    out = trainer.output()
    assert "rank 1 of 2 joined the trainer group" in out
    assert "trainer-0 stopping on signal" in out and "trainer rank stopping on SIGTERM" in out
    assert out.count("Traceback") == out.count("SignalException: Process"), out
    last_words = json.loads(Path(trainer.env["KUBEFORGE_TERMINATION_LOG"]).read_text())
    assert last_words == {"role": "trainer-0", "exitCode": 0}


def test_a_restarted_trainer_resumes_from_its_last_checkpoint(trainer, tiny, tmp_path):
    assert trainer.process.poll() is not None  # the previous test stopped it
    again = RoleProcess("trainer", trainer.env, tmp_path / "restarted.log")
    try:
        again.wait_ready()
        status = again.http.get("/status", headers=AUTH).json()
        assert status["step"] == 3 and status["policy_version"] == 3
        assert status["app_state"] == {"data_position": 42}
        assert status["staleness"] == {"0": 18}  # the 3 steps' 6 rows each, on policy, kept
        assert Path(status["checkpoint"]).name == "step-3"
        # On policy against the checkpoint's weights (exported at v3 before the stop): ratio 1.
        exported_v3 = Path(trainer.env["KUBEFORGE_RUN_DIR"]) / "exports" / "policy-v3"
        step = again.http.post("/train", content=make_batch(exported_v3, version=3).encode(), headers=AUTH).json()
        assert step["step"] == 4 and step["policy_version"] == 4 and step["staleness_max"] == 0
        assert step["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
        assert step["lr"] == pytest.approx(0.0085)  # the schedule goes on from the checkpoint's step
        assert_a_non_finite_gradient_skips_the_update(again, exported_v3, tmp_path)
    finally:
        again.stop()
    assert "resumed from" in again.output()


def assert_a_non_finite_gradient_skips_the_update(trainer: RoleProcess, model_dir: Path, tmp_path: Path) -> None:
    """The fused optimizer skips the step on the device (found_inf): no weight moves, the version stays."""

    def export(name: str) -> dict[str, torch.Tensor]:
        where = {"dir": f"exports/{tmp_path.name}/{name}"}
        answer = trainer.http.post("/weights/export", json=where, headers=AUTH).json()
        return load_file(Path(answer["path"]) / "model.safetensors")

    def train(batch: TrainBatch) -> dict:
        return trainer.http.post("/train", content=batch.encode(), headers=AUTH).json()

    before = export("before")
    batch = make_batch(model_dir, version=4)
    batch.advantages[:] = 3e38  # finite, but the gradient's norm overflows
    step = train(batch)
    assert step["updated"] is False and step["policy_version"] == 4 and step["step"] == 5
    assert step["grad_norm"] is None  # JSON has no Infinity: null; the gauge holds the value
    after = export("after")
    assert all(torch.equal(before[name], after[name]) for name in before)
    # The optimizer state skipped it too: the next finite batch is an ordinary update, 4 -> 5.
    step = train(make_batch(model_dir, version=4))
    assert step["updated"] is True and step["policy_version"] == 5 and math.isfinite(step["grad_norm"])


# -- with a real generator: the loop GRPO runs ----------------------------------------------------

ENGINE_ARGS = "--dtype float32 --max-model-len 128 --max-num-seqs 32 --enforce-eager"
RATIO_TOLERANCE = 1e-4  # vLLM's and the trainer's float32 logprobs differ by summation order only


def sample(generator_url: str, prompt: list[int], seed: int):
    from kubeforge.generator.wire import GeneratorClient

    async def call():
        async with GeneratorClient(generator_url, token=TOKENS["job"]) as client:
            return await client.generate([prompt], n=8, max_tokens=6, seed=seed, ignore_eos=True)

    return asyncio.run(call())


def grpo_batch(generation, prompt: list[int], tokenizer) -> TrainBatch:
    """Reward digits in the answer; advantages normalised within the group, as GRPO does."""
    samples = generation.samples()
    rewards = torch.tensor([float(sum(tokenizer.decode([t]).isdigit() for t in ids)) for ids, _ in samples])
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    return TrainBatch.from_sequences(
        prompts=[prompt] * len(samples),
        responses=[ids for ids, _ in samples],
        logprobs=[lps for _, lps in samples],
        advantages=advantages.tolist(),
        policy_versions=[versions[0] for versions in generation.policy_versions],
    )


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])  # the tied LM head is not sent
def test_sample_train_publish_sample_with_a_real_generator(tied, tmp_path):
    """Generator (vLLM) samples, the trainer trains, publishes, and the generator serves its weights."""
    tiny = write_tiny_model(tmp_path / "tiny", seed=3, tie_embeddings=tied)
    envs = role_envs(
        tmp_path,
        tiny,
        roles={"trainer": {"procsPerNode": 2}, "generator": {"env": {"GENERATOR_VLLM_ARGS": ENGINE_ARGS}}},
        algorithm={"lr": 0.01},
    )
    trainer = RoleProcess("trainer", envs["trainer-0"], tmp_path / "trainer.log")
    generator = RoleProcess("generator", envs["generator-0"], tmp_path / "generator.log")
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    try:
        trainer.wait_ready()
        generator.wait_ready(timeout=600)
        for version in range(2):
            generation = sample(generator.url, prompt, seed=version)
            assert generation.policy_version == version
            step = trainer.http.post("/train", content=grpo_batch(generation, prompt, tokenizer).encode(), headers=AUTH)
            assert step.status_code == 200, step.text
            # The trainer scores vLLM's samples as vLLM did: it holds the weights the generator serves.
            assert step.json()["ratio_mean"] == pytest.approx(1.0, abs=RATIO_TOLERANCE), (version, step.json())
            published = trainer.http.post("/weights/publish", headers=AUTH)
            assert published.status_code == 200, published.text + generator.output()
            assert published.json()["policy_version"] == version + 1
            assert generator.http.get("/weights/info").json()["policy_version"] == version + 1
        assert "kubeforge_trainer_weight_sync_bytes_total" in trainer.http.get("/metrics").text
    finally:
        for role in (trainer, generator):
            if role.process.poll() is None:
                role.stop()
