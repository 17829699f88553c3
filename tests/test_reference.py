"""The reference model over real HTTP with the tiny Qwen3: as its own replica (POST /logprobs, the
controller's ReferenceClient) and colocated in the trainer; with the trainer's KL penalty, its
per-batch loss override and its staleness guard.

Tolerances, measured on CPU float32: the replica's logprobs equal transformers' and the trainer's
own to within REFERENCE_TOLERANCE (both run the same torchtitan code on the same weights).
"""

import asyncio
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from kubeforge.batch import CONTENT_TYPE, BatchError
from kubeforge.reference.client import ReferenceClient, ReferenceError, decode_logprobs
from kubeforge.spec import RLJobSpec
from kubeforge.trainer.engine import Trainer
from test_trainer import AUTH, BAD, GOOD, TOKENS, RoleProcess, make_batch, response_logprobs, role_envs, small_batch

REFERENCE_TOLERANCE = 1e-5
KL_COEF = 0.1


def start(process: RoleProcess):
    try:
        process.wait_ready()
    except BaseException:
        if process.process.poll() is None:
            process.stop()
        raise
    return process


def checker(policy_version: int, reference=None, **spec_fields) -> Trainer:
    """A Trainer with only what `check` reads (no process group, no model): the refusals, fast."""
    spec = RLJobSpec.model_validate({"model": {"path": "/m"}, **spec_fields})
    trainer = Trainer.__new__(Trainer)
    trainer.ctx = SimpleNamespace(spec=spec)
    trainer.settings = spec.algorithm
    trainer.hf_config = {"vocab_size": 128}
    trainer.model = SimpleNamespace(model_args=SimpleNamespace(max_seq_len=64))
    trainer.policy_version, trainer.staleness_bound, trainer.reference = policy_version, spec.staleness_bound, reference
    return trainer


@pytest.mark.parametrize(
    "spec_fields, versions, refused",
    [
        ({}, [7, 7, 7, 7, 7], None),  # sync: the current version only
        (
            {},
            [7, 7, 6, 7, 7],
            "row 2 was sampled by policy version 6, 1 behind the trainer's 7; this job allows at most 0",
        ),
        ({"mode": "async"}, [6, 7, 6, 7, 7], None),  # async: maxStaleness 1 by default
        ({"mode": "async"}, [6, 5, 6, 7, 7], "row 1 was sampled by policy version 5, 2 behind"),
        ({"mode": "async", "maxStaleness": 3}, [4, 5, 6, 7, 7], None),
    ],
)
def test_the_trainer_refuses_rows_older_than_the_staleness_bound(spec_fields, versions, refused):
    batch = small_batch(policy_versions=torch.tensor(versions))  # the trainer is at version 7
    if refused is None:
        checker(7, **spec_fields).check(batch)
    else:
        with pytest.raises(BatchError, match=f"policy_versions: {refused}"):
            checker(7, **spec_fields).check(batch)


def test_the_trainer_refuses_an_unknown_loss_and_a_penalty_without_a_reference():
    batch = small_batch(policy_versions=torch.tensor([0] * 5), info={"loss": "ppo"})
    with pytest.raises(BatchError, match="info.loss: got 'ppo'; expected one of 'grpo', 'dr_grpo'"):
        checker(0).check(batch)
    penalised = checker(0, algorithm={"klCoef": 0.1})
    with pytest.raises(BatchError, match="ref_logprobs: missing, and klCoef is 0.1"):
        penalised.check(small_batch(policy_versions=torch.tensor([0] * 5)))
    penalised.check(small_batch(policy_versions=torch.tensor([0] * 5), info={"loss": "sft"}))  # no KL in SFT
    penalised.check(small_batch(policy_versions=torch.tensor([0] * 5), ref_logprobs=torch.zeros(5, 6)))


def test_packed_rows_need_a_token_level_loss():
    """A packed row holds several sequences: per-sequence averages (grpo, dr_grpo, gspo) would count it as one."""
    positions = torch.arange(6).repeat(5, 1)
    positions[:, 5] = 0  # a second sequence starts at position 5 of every row

    def packed(loss):
        return small_batch(policy_versions=torch.tensor([0] * 5), position_ids=positions, info={"loss": loss})

    for loss in ("grpo", "dr_grpo", "gspo"):
        with pytest.raises(BatchError, match=f"position_ids: packed rows need a token-level loss .*'{loss}' is not"):
            checker(0).check(packed(loss))
    for loss in ("dapo", "cispo", "sft"):
        checker(0).check(packed(loss))


@pytest.fixture(scope="module")
def replica_job(tmp_path_factory, tiny_model):
    """A reference replica and a trainer (one rank) that takes its logprobs from the batch."""
    tmp = tmp_path_factory.mktemp("replica-job")
    roles = {"trainer": {"procsPerNode": 1}, "reference": {"enabled": True}}
    envs = role_envs(tmp, tiny_model, roles=roles, algorithm={"lr": 0.01, "klCoef": KL_COEF, "loss": "dapo"})
    processes = {}
    try:
        for name in ("reference-0", "trainer-0"):
            processes[name] = RoleProcess(name.split("-")[0], envs[name], tmp / f"{name}.log")
        for process in processes.values():
            start(process)
        yield processes["reference-0"], processes["trainer-0"]
    finally:
        for process in processes.values():
            if process.process.poll() is None:
                process.stop()


@pytest.fixture(scope="module")
def colocated_trainer(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("colocated")
    roles = {"trainer": {"procsPerNode": 1}, "reference": {"enabled": True, "colocate": True}}
    envs = role_envs(tmp, tiny_model, roles=roles, algorithm={"lr": 0.01, "klCoef": KL_COEF})
    assert "reference-0" not in envs  # colocated: no replicas of its own
    process = RoleProcess("trainer", envs["trainer-0"], tmp / "trainer.log")
    start(process)
    yield process
    if process.process.poll() is None:
        process.stop()


def reference_logprobs(url: str, batch, token: str = TOKENS["job"]):
    async def call():
        async with ReferenceClient([url], token=token) as client:
            return await client.logprobs(batch)

    return asyncio.run(call())


def train(trainer: RoleProcess, batch) -> dict:
    reply = trainer.http.post("/train", content=batch.encode(), headers={**AUTH, "Content-Type": CONTENT_TYPE})
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.mark.slow
def test_the_replica_scores_as_transformers_and_the_trainer_do(replica_job, tiny_model):
    reference, trainer = replica_job
    batch = make_batch(tiny_model, version=0)  # behaviour logprobs: transformers on the initial weights
    values = reference_logprobs(reference.url, batch)
    assert values.shape == batch.input_ids.shape and values.dtype == torch.float32
    assert (values[~batch.response_mask] == 0).all()
    expected = response_logprobs(tiny_model, [GOOD, BAD])
    rows = [GOOD if row % 2 == 0 else BAD for row in range(batch.rows)]
    got = values.sum(-1).tolist()
    assert got == pytest.approx([expected[r] for r in rows], abs=REFERENCE_TOLERANCE)

    # The trainer's own logprobs of the initial weights: with the replica's as behaviour and as
    # reference, the ratio is 1 and the KL 0 (the trainer takes ref_logprobs from the batch).
    batch.behaviour_logprobs = values.clone()
    batch.ref_logprobs = values
    step = train(trainer, batch)
    assert step["ratio_mean"] == pytest.approx(1.0, abs=REFERENCE_TOLERANCE)
    assert step["kl"] == pytest.approx(0.0, abs=REFERENCE_TOLERANCE**2)
    assert step["loss_variant"] == "dapo" and step["policy_version"] == 1


@pytest.mark.slow
def test_the_replica_refuses_what_the_trainer_refuses(replica_job, tiny_model):
    reference, trainer = replica_job
    batch = make_batch(tiny_model, version=1)
    assert httpx.post(f"{reference.url}/logprobs", content=batch.encode()).status_code == 401  # no token
    with pytest.raises(ReferenceError, match="401"):
        reference_logprobs(reference.url, batch, token="wrong")
    batch.input_ids[0, 0] = 1000  # outside the vocabulary (128)
    refused = reference.http.post("/logprobs", content=batch.encode())  # RoleProcess presents the job token
    assert refused.status_code == 400 and "vocabulary" in refused.text
    assert reference.http.post("/logprobs", content=b"junk").status_code == 400
    # klCoef > 0, no colocated reference: a batch without ref_logprobs is refused, naming them.
    refused = trainer.http.post("/train", content=make_batch(tiny_model, version=1).encode(), headers=AUTH)
    assert refused.status_code == 400 and "ref_logprobs: missing" in refused.text


@pytest.mark.slow
def test_the_client_fills_a_batch_for_the_trainer(replica_job, tiny_model):
    reference, trainer = replica_job

    async def fill():
        async with ReferenceClient([reference.url], token=TOKENS["job"]) as client:
            return await client.fill(make_batch(tiny_model, version=1))

    batch = asyncio.run(fill())
    step = train(trainer, batch)
    # one update since the initial weights: the policy has moved away from the reference
    assert step["kl"] > 0 and step["policy_version"] == 2
    raw = reference.http.post("/logprobs", content=batch.encode())
    assert torch.equal(decode_logprobs(raw.content), batch.ref_logprobs)


@pytest.mark.slow
def test_colocated_kl_is_zero_at_first_then_grows(colocated_trainer, tiny_model):
    kls = [train(colocated_trainer, make_batch(tiny_model, version=version))["kl"] for version in range(3)]
    assert kls[0] == pytest.approx(0.0, abs=1e-12)  # the same weights, the same code: identical logprobs
    assert 0 < kls[1] < kls[2]


@pytest.mark.slow
def test_a_stale_batch_is_refused_and_nothing_is_trained(colocated_trainer, tiny_model):
    status = colocated_trainer.http.get("/status", headers=AUTH).json()
    assert status["policy_version"] == 3 and status["staleness"] == {"0": 18}  # 3 on-policy steps of 6 rows
    stale = make_batch(tiny_model, version=3)
    stale.policy_versions[4] = 2  # one row a version behind: a sync job allows none
    refused = colocated_trainer.http.post("/train", content=stale.encode(), headers=AUTH)
    assert refused.status_code == 400, refused.text
    assert "policy_versions: row 4 was sampled by policy version 2, 1 behind the trainer's 3" in refused.text
    assert colocated_trainer.http.get("/status", headers=AUTH).json() == status


@pytest.mark.slow
def test_a_batch_may_name_its_own_loss(colocated_trainer, tiny_model, tmp_path):
    exported = colocated_trainer.http.post("/weights/export", json={"dir": f"exports/{tmp_path.name}"}, headers=AUTH)
    logprobs = response_logprobs(Path(exported.json()["path"]), [GOOD, BAD])
    batch = make_batch(tiny_model, version=3)
    batch.info["loss"] = "sft"
    step = train(colocated_trainer, batch)
    # supervised: the mean negative log-likelihood of the answers; advantages, behaviour and KL play no part
    assert step["loss_variant"] == "sft" and "kl" not in step
    assert step["loss"] == pytest.approx(-(logprobs[GOOD] + logprobs[BAD]) / 2, abs=1e-5)
    batch.info["loss"] = "ppo"
    refused = colocated_trainer.http.post("/train", content=batch.encode(), headers=AUTH)
    assert refused.status_code == 400 and "info.loss: got 'ppo'; expected one of 'grpo'" in refused.text
