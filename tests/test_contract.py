"""The environment contract: what every role process is told, whoever starts it."""

import pytest
from kubeforge import auth, contract
from kubeforge.contract import Endpoints, Instance, RoleContext
from kubeforge.validation import parse_job


def _job(minimal_job, **spec):
    minimal_job["spec"].update(spec)
    return parse_job(minimal_job)


TOKENS = {"job": "j0b", "controller": "c0ntroller", "trainer": "tr41ner"}


def _endpoints(spec):
    insts = contract.instances(spec)
    return Endpoints(
        http={i: f"http://{i.name}.svc:8000" for i in insts},
        trainer_master=("trainer-0.svc", 29500),
        weight_sync=("trainer-0.svc", 29600),
    )


def _env(job, inst, tmp_path):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(job.spec.model_dump_json(by_alias=True))
    return contract.role_env(
        job=job.name,
        namespace="ns",
        spec=job.spec,
        spec_path=str(spec_path),
        instance=inst,
        endpoints=_endpoints(job.spec),
        http_host="0.0.0.0",
        http_port=8000,
        run_dir=str(tmp_path),
        token_dir=str(auth.write_token_dir(tmp_path / "tokens", TOKENS, inst.role)),
        termination_log="/dev/termination-log",
    )


def test_instances_follow_the_spec(minimal_job):
    job = _job(
        minimal_job,
        roles={"trainer": {"nodes": 2}, "generator": {"replicas": 3}, "reference": {"enabled": True, "replicas": 2}},
    )
    names = [i.name for i in contract.instances(job.spec)]
    assert names == [
        "trainer-0",
        "trainer-1",
        "generator-0",
        "generator-1",
        "generator-2",
        "reward-0",
        "reference-0",
        "reference-1",
        "controller-0",
    ]


def test_colocated_reference_has_no_processes_of_its_own(minimal_job):
    job = _job(minimal_job, roles={"reference": {"enabled": True, "colocate": True}})
    assert not [i for i in contract.instances(job.spec) if i.role == "reference"]


def test_every_role_learns_identity_and_peers(minimal_job, tmp_path):
    job = _job(minimal_job, roles={"generator": {"replicas": 2}})
    env = _env(job, Instance("generator", 1), tmp_path)
    assert env["KUBEFORGE_JOB"] == "demo" and env["KUBEFORGE_ROLE"] == "generator" and env["KUBEFORGE_REPLICA"] == "1"
    assert env["KUBEFORGE_GENERATOR_URLS"] == "http://generator-0.svc:8000,http://generator-1.svc:8000"
    assert env["KUBEFORGE_TRAINER_URLS"] == "http://trainer-0.svc:8000"
    assert env["KUBEFORGE_CONTROLLER_URLS"] == "http://controller-0.svc:8000"
    assert env["KUBEFORGE_WEIGHT_SYNC_ADDR"] == "trainer-0.svc:29600"
    assert "KUBEFORGE_REFERENCE_URLS" not in env
    assert not [k for k in env if k.startswith("PET_")]


def test_trainer_nodes_get_torchrun_static_rendezvous(minimal_job, tmp_path):
    job = _job(minimal_job, roles={"trainer": {"nodes": 2, "gpusPerNode": 8}})
    env = _env(job, Instance("trainer", 1), tmp_path)
    assert {k: v for k, v in env.items() if k.startswith("PET_")} == {
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "8",
        "PET_NODE_RANK": "1",
        "PET_MASTER_ADDR": "trainer-0.svc",
        "PET_MASTER_PORT": "29500",
        "PET_RDZV_BACKEND": "static",
        "PET_MAX_RESTARTS": "0",
    }


def test_user_env_is_passed_and_cannot_shadow_the_contract(minimal_job, tmp_path):
    job = _job(minimal_job, env={"NCCL_DEBUG": "INFO", "SHARED": "job"}, roles={"reward": {"env": {"SHARED": "role"}}})
    env = _env(job, Instance("reward", 0), tmp_path)
    assert env["NCCL_DEBUG"] == "INFO" and env["SHARED"] == "role"


def test_role_reads_back_what_it_was_given(minimal_job, tmp_path):
    job = _job(minimal_job, steps=7, roles={"generator": {"replicas": 2}})
    ctx = RoleContext.from_env(_env(job, Instance("generator", 1), tmp_path))
    assert (ctx.job, ctx.role, ctx.replica, ctx.http_port, ctx.token) == ("demo", "generator", 1, 8000, "j0b")
    assert ctx.spec == job.spec and ctx.spec.steps == 7
    assert ctx.peers["generator"] == ["http://generator-0.svc:8000", "http://generator-1.svc:8000"]


def test_a_process_outside_the_contract_is_told_how_to_start(monkeypatch):
    with pytest.raises(RuntimeError, match="kubeforge run"):
        RoleContext.from_env({})


def test_role_commands():
    assert contract.role_command("trainer") == ["python", "-m", "torch.distributed.run", "-m", "kubeforge.trainer"]
    assert contract.role_command("reward") == ["python", "-m", "kubeforge.rewards"]
