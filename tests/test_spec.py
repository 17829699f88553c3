"""The RLJob schema: defaults, examples, and precise messages for bad specs."""

import copy
from pathlib import Path

import pytest
import yaml
from kubeforge.spec import RLJob
from kubeforge.validation import SpecError, load_file, load_text, parse_job, parse_spec

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in REPO.glob("apps/**/*.yaml"))


def test_three_line_spec_gets_runnable_defaults(minimal_job):
    job = parse_job(minimal_job)
    spec = job.spec
    assert spec.steps == 100 and spec.mode == "sync" and spec.staleness_bound == 0
    assert spec.roles.trainer.world_size == 1 and spec.roles.generator.replicas == 1
    assert spec.roles.reference.enabled is False
    assert spec.failure_policy.action_for("generator") == "RestartPod"
    assert spec.failure_policy.action_for("trainer") == "RestartFromCheckpoint"


def test_async_mode_defaults_to_staleness_one(minimal_job):
    minimal_job["spec"]["mode"] = "async"
    assert parse_job(minimal_job).spec.staleness_bound == 1
    minimal_job["spec"]["maxStaleness"] = 3
    assert parse_job(minimal_job).spec.staleness_bound == 3


def test_quantities_accept_numbers_and_strings(minimal_job):
    minimal_job["spec"]["roles"] = {"trainer": {"cpu": 4, "memory": "16Gi"}, "generator": {"cpu": "500m"}}
    roles = parse_job(minimal_job).spec.roles
    assert (roles.trainer.cpu, roles.trainer.memory, roles.generator.cpu) == ("4", "16Gi", "500m")


def test_round_trip_through_yaml_keeps_the_spec(minimal_job):
    job = parse_job(minimal_job)
    again = parse_job(yaml.safe_load(yaml.safe_dump(job.to_yaml_dict())))
    assert again == job


def test_failure_rules_match_in_order(minimal_job):
    minimal_job["spec"]["failurePolicy"] = {
        "rules": [
            {"role": "generator", "action": "FailJob", "onReasons": ["OOMKilled"]},
            {"role": "generator", "action": "RestartPod"},
        ]
    }
    policy = parse_job(minimal_job).spec.failure_policy
    assert policy.action_for("generator", reason="OOMKilled") == "FailJob"
    assert policy.action_for("generator", exit_code=1) == "RestartPod"
    assert policy.action_for("trainer") == "FailJob"  # no rule: fail


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_examples_are_valid(path):
    assert isinstance(load_file(path), RLJob)


def _set(obj, dotted, value):
    keys = dotted.split(".")
    for key in keys[:-1]:
        obj = obj.setdefault(key, {})
    if value is _DELETE:
        del obj[keys[-1]]
    else:
        obj[keys[-1]] = value


_DELETE = object()

# (what to set, value, the field the message must name, a fragment it must contain)
BAD_SPECS = [
    ("apiVersion", "kubeforge.dev/v1", "apiVersion", "kubeforge.dev/v1alpha1"),
    ("kind", "Job", "kind", "'RLJob'"),
    ("metadata.name", "Demo_Job", "metadata.name", "lowercase letters"),
    ("metadata.name", "a" * 41, "metadata.name", "at most 40"),
    ("spec.model", _DELETE, "spec.model", "required field is missing"),
    ("spec.model.path", "hf://Qwen/Qwen3-1.7B", "spec.model.path", "never downloads"),
    ("spec.model.path", "", "spec.model.path", "at least 1"),
    ("spec.steps", 0, "spec.steps", "greater than or equal to 1"),
    ("spec.steps", "many", "spec.steps", "valid integer"),
    ("spec.mode", "eager", "spec.mode", "'sync' or 'async'"),
    ("spec.maxStaleness", 2, "spec", "needs mode: async"),
    ("spec.maxStaleness", -1, "spec.maxStaleness", "greater than or equal to 0"),
    ("spec.roles.genrator", {"replicas": 2}, "spec.roles.genrator", "did you mean 'generator'"),
    ("spec.roles.generator.replicas", -1, "spec.roles.generator.replicas", "greater than or equal to 0"),
    ("spec.roles.generator", {"gpus": 2, "tensorParallel": 4}, "spec.roles.generator", "must equal tensorParallel"),
    ("spec.roles.generator", {"tensorParallel": 2}, "spec.roles.generator", "needs gpus: 2"),
    (
        "spec.roles.trainer",
        {"nodes": 1, "gpusPerNode": 4, "procsPerNode": 2},
        "spec.roles.trainer",
        "one rank drives one GPU",
    ),
    ("spec.roles.trainer", {"nodes": 3, "tensorParallel": 2}, "spec.roles.trainer", "must divide the number of ranks"),
    ("spec.roles.trainer.cpu", "lots", "spec.roles.trainer.cpu", "Kubernetes quantity"),
    ("spec.roles.trainer.memory", "16GB", "spec.roles.trainer.memory", "Kubernetes quantity"),
    ("spec.roles.controller.app", "apps/grpo/main.py", "spec.roles.controller.app", "dotted Python module"),
    ("spec.roles.reward.env", {"KUBEFORGE_ROLE": "x"}, "spec.roles.reward.env", "reserved"),
    ("spec.env", {"1BAD": "x"}, "spec.env", "must match"),
    ("spec.scheduling.gang", "kueue", "spec.scheduling", "needs queue"),
    ("spec.scheduling.gang", "yes", "spec.scheduling.gang", "'capacity'"),
    ("spec.scheduling.nodeSelector", {"bad key!": "x"}, "spec.scheduling.nodeSelector", "not a valid label key"),
    (
        "spec.scheduling.tolerations",
        [{"operator": "Exists", "value": "x"}],
        "spec.scheduling.tolerations[0]",
        "takes no value",
    ),
    (
        "spec.scheduling.tolerations",
        [{"key": "gpu", "effect": "NoWay"}],
        "spec.scheduling.tolerations[0].effect",
        "'NoSchedule'",
    ),
    (
        "spec.failurePolicy.rules",
        [{"role": "trainer", "action": "RestartPod"}],
        "spec.failurePolicy.rules[0]",
        "cannot be restarted alone",
    ),
    (
        "spec.failurePolicy.rules",
        [{"role": "generator", "action": "Retry"}],
        "spec.failurePolicy.rules[0].action",
        "'RestartPod'",
    ),
    ("spec.failurePolicy.maxRestarts", -1, "spec.failurePolicy.maxRestarts", "greater than or equal to 0"),
    ("spec.checkpoint.interval", -5, "spec.checkpoint.interval", "greater than or equal to 0"),
    ("spec.activeDeadlineSeconds", 0, "spec.activeDeadlineSeconds", "greater than or equal to 1"),
    ("spec.ttlSecondsAfterFinished", -1, "spec.ttlSecondsAfterFinished", "greater than or equal to 0"),
    (
        "spec.volumes",
        [{"name": "m", "claimName": "models", "mountPath": "models"}],
        "spec.volumes[0].mountPath",
        "absolute path",
    ),
    (
        "spec.volumes",
        [{"name": "m", "claimName": "a", "mountPath": "/a"}, {"name": "m", "claimName": "b", "mountPath": "/b"}],
        "spec",
        "used twice",
    ),
    ("spec.suspend", "sometimes", "spec.suspend", "valid boolean"),
    ("spec.stepDeadlineSeconds", 0, "spec.stepDeadlineSeconds", "greater than or equal to 1"),
    (
        "spec.roles.generator.env",
        {"GENERATOR_VLLM_ARGS": "--max-model-len 512 --enable-chunked-prefill"},
        "spec",
        "--enable-chunked-prefill on a CPU generator",
    ),
    ("spec.env", {"GENERATOR_VLLM_ARGS": "--enable-chunked-prefill=true"}, "spec", "remove it"),
    (
        "spec.checkpoint.storage",
        {"emptyDir": True, "claimName": "ckpt"},
        "spec.checkpoint.storage",
        "choose one place",
    ),
    (
        "spec.checkpoint.storage",
        {"claimName": "ckpt", "storageClassName": "nfs"},
        "spec.checkpoint.storage",
        "applies only to the claim the operator creates",
    ),
    ("spec.checkpoint.storage.claimName", "My_Claim", "spec.checkpoint.storage.claimName", "Kubernetes object name"),
    ("spec.checkpoint.storage.accessMode", "ReadOnlyMany", "spec.checkpoint.storage.accessMode", "'ReadWriteOnce'"),
    ("spec.checkpoint.storage.whenDeleted", "Keep", "spec.checkpoint.storage.whenDeleted", "'Retain'"),
    ("spec.checkpoint.storage.size", "lots", "spec.checkpoint.storage.size", "Kubernetes quantity"),
    ("spec.dataset.shuffle", True, "spec.dataset.shuffle", "unknown field"),
]


@pytest.mark.parametrize(
    "where,value,field,fragment", BAD_SPECS, ids=[f"{w}={str(v)[:20]}" for w, v, _, _ in BAD_SPECS]
)
def test_bad_spec_is_refused_naming_the_field(minimal_job, where, value, field, fragment):
    _set(minimal_job, where, value)
    with pytest.raises(SpecError) as raised:
        parse_job(minimal_job, source="job.yaml")
    problems = raised.value.problems
    assert any(p.startswith(f"{field}:") and fragment in p for p in problems), problems
    assert str(raised.value).startswith("job.yaml: invalid RLJob")


def test_every_problem_is_reported_at_once(minimal_job):
    _set(minimal_job, "spec.steps", 0)
    _set(minimal_job, "spec.roles.generator.replicas", -1)
    _set(minimal_job, "spec.unknownThing", 1)
    with pytest.raises(SpecError) as raised:
        parse_job(minimal_job)
    assert len(raised.value.problems) == 3


def test_operator_path_validates_only_the_spec(minimal_job):
    spec = copy.deepcopy(minimal_job["spec"])
    spec["steps"] = -3
    with pytest.raises(SpecError) as raised:
        parse_spec(spec, source="default/demo")
    assert raised.value.problems[0].startswith("spec.steps:")


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("kind: [unclosed", "not valid YAML"),
        ("", "found 0"),
        ("a: 1\n---\nb: 2\n", "found 2"),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_unreadable_files_get_one_clear_line(text, fragment):
    with pytest.raises(SpecError) as raised:
        load_text(text, source="x.yaml")
    assert fragment in raised.value.problems[0]


def test_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError) as raised:
        load_file(tmp_path / "nope.yaml")
    assert "cannot read the file" in raised.value.problems[0]


def test_a_role_that_reported_its_own_error_or_ran_out_of_memory_fails_the_job(minimal_job):
    policy = parse_job(minimal_job).spec.failure_policy
    assert policy.action_for("generator", exit_code=137) == "RestartPod"  # killed: replace it
    assert policy.action_for("generator", exit_code=1, role_error=True) == "FailJob"  # it raised: it would again
    assert policy.action_for("trainer", exit_code=137, reason="OOMKilled") == "FailJob"
    rule = {"role": "generator", "action": "RestartPod", "onExitCodes": [1]}
    minimal_job["spec"]["failurePolicy"] = {"rules": [rule]}
    explicit = parse_job(minimal_job).spec.failure_policy
    assert explicit.action_for("generator", exit_code=1, role_error=True) == "RestartPod"  # named: the user's call


FAIL_JOB_RULES = [{"role": "trainer", "action": "FailJob"}, {"role": "controller", "action": "FailJob"}]
CHECKPOINTS_VOLUME = [{"name": "ckpt", "claimName": "team-ckpt", "mountPath": "/ckpt"}]

# (spec changes, the problem's field and a fragment of its fix; None: fine on Kubernetes)
KUBERNETES_CASES = [
    ({}, None),  # the default: a per-job claim
    ({"checkpoint": {"storage": {"claimName": "team-ckpt"}}}, None),
    # The default rules restart trainer and controller from a checkpoint: an emptyDir would lose it.
    (
        {"checkpoint": {"storage": {"emptyDir": True}}},
        ("spec.checkpoint.storage.emptyDir", "restarts controller, trainer from a checkpoint"),
    ),
    (
        {"checkpoint": {"storage": {"emptyDir": True}},
         "failurePolicy": {"rules": [{"role": "trainer", "action": "RestartFromCheckpoint"}]}},
        ("spec.checkpoint.storage.emptyDir", "set claimName to an existing claim"),
    ),
    ({"checkpoint": {"storage": {"emptyDir": True}}, "failurePolicy": {"rules": FAIL_JOB_RULES}}, None),
    # An absolute directory must be inside a writable volume.
    ({"checkpoint": {"dir": "/ckpt/run-1"}, "volumes": CHECKPOINTS_VOLUME}, None),
    ({"checkpoint": {"dir": "/ckpt", "storage": {"emptyDir": True}}, "volumes": CHECKPOINTS_VOLUME}, None),
    ({"checkpoint": {"dir": "/scratch/ckpt"}}, ("spec.checkpoint.dir", "make it relative")),
    ({"checkpoint": {"dir": "/ckptx"}, "volumes": CHECKPOINTS_VOLUME}, ("spec.checkpoint.dir", "make it relative")),
    (
        {"checkpoint": {"dir": "/ckpt"}, "volumes": [{**CHECKPOINTS_VOLUME[0], "readOnly": True}]},
        ("spec.checkpoint.dir", "set readOnly: false"),
    ),
    # A multi-node trainer's shards must land in one place.
    ({"roles": {"trainer": {"nodes": 2}}}, ("spec.checkpoint.storage.accessMode", "ReadWriteMany")),
    ({"roles": {"trainer": {"nodes": 2}}, "checkpoint": {"storage": {"accessMode": "ReadWriteMany"}}}, None),
    (
        {"roles": {"trainer": {"nodes": 2}}, "checkpoint": {"storage": {"emptyDir": True}},
         "failurePolicy": {"rules": FAIL_JOB_RULES}},
        ("spec.checkpoint.storage.emptyDir", "one shared place"),
    ),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "expected"), KUBERNETES_CASES)
def test_jobs_whose_checkpoints_would_not_outlive_their_pods_are_refused_on_kubernetes_only(
    minimal_job, changes, expected
):
    minimal_job["spec"].update(changes)
    job = parse_job(minimal_job)  # what `kubeforge run` reads: it keeps the run directory on local disk
    if expected is None:
        assert parse_spec(minimal_job["spec"]) == job.spec
        return
    field, fix = expected
    with pytest.raises(SpecError) as raised:
        parse_spec(minimal_job["spec"], source="team/demo")  # the operator's path
    (problem,) = raised.value.problems
    assert problem.startswith(f"{field}: got ") and fix in problem, problem


@pytest.mark.parametrize(
    ("last_words", "permanent", "default_action"),
    [
        ({}, False, "RestartPod"),  # killed: no last words
        ({"exitCode": 137}, False, "RestartPod"),
        ({"exitCode": 1, "error": "ValueError: bad"}, True, "FailJob"),  # it raised: it would again
        # A weight update that stopped half-way: a fresh process cures it (serving.TransientFailure).
        ({"exitCode": 75, "error": "TransientFailure: weight update to v3 failed", "transient": True}, False,
         "RestartPod"),
    ],
    ids=["killed", "signal", "own-error", "transient"],
)  # fmt: skip
def test_a_transient_failure_is_restarted_its_own_error_is_not(minimal_job, last_words, permanent, default_action):
    from kubeforge.contract import permanent_error

    assert permanent_error(last_words) is permanent
    policy = parse_job(minimal_job).spec.failure_policy
    code = last_words.get("exitCode", 137)
    assert policy.action_for("generator", exit_code=code, role_error=permanent_error(last_words)) == default_action
