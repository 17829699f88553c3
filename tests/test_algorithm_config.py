"""spec.algorithm: one typed section, read by every role; a misspelt key fails validation with a suggestion."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from kubeforge import weight_sync
from kubeforge.algorithm import Algorithm, RewardWeight
from kubeforge.crd import crd_manifest
from kubeforge.losses import LOSSES
from kubeforge.validation import SpecError, parse_spec


def refusal(algorithm: dict) -> list[str]:
    """The problems `kubeforge validate` and the operator (both through parse_spec) report."""
    with pytest.raises(SpecError) as refused:
        parse_spec({"model": {"path": "/m"}, "algorithm": algorithm})
    return refused.value.problems


@pytest.mark.parametrize(
    ("algorithm", "message"),
    [
        ({"lrr": 1e-5}, "spec.algorithm.lrr: unknown field; did you mean 'lr'?"),
        ({"groupsize": 4}, "spec.algorithm.groupsize: unknown field; did you mean 'groupSize'?"),
        ({"warmUpSteps": 2}, "spec.algorithm.warmUpSteps: unknown field; did you mean 'warmupSteps'?"),
        ({"klCoeff": 0.1}, "spec.algorithm.klCoeff: unknown field; did you mean 'klCoef'?"),
        ({"temprature": 0.7}, "spec.algorithm.temprature: unknown field; did you mean 'temperature'?"),
        ({"evalEvry": 5}, "spec.algorithm.evalEvry: unknown field; did you mean 'evalEvery'?"),
        ({"rewards": [{"name": "math", "wieght": 1}]},
         "spec.algorithm.rewards[0].wieght: unknown field; did you mean 'weight'?"),
        ({"xyzzy": 1}, "spec.algorithm.xyzzy: unknown field; expected one of: loss, "),
    ],
)  # fmt: skip
def test_an_unknown_key_is_refused_with_a_suggestion(algorithm, message):
    (problem,) = refusal(algorithm)
    assert problem.startswith(message)


@pytest.mark.parametrize(
    ("algorithm", "message"),
    [
        ({"groupSize": "many"}, "spec.algorithm.groupSize: got 'many'; expected a valid integer"),
        ({"lr": "fast"}, "spec.algorithm.lr: got 'fast'; expected a valid number"),
        ({"tisCap": -1}, "spec.algorithm.tisCap: got -1; expected a value greater than or equal to 0"),
        ({"clipEpsHigh": "wide"}, "spec.algorithm.clipEpsHigh: got 'wide'; expected a valid number"),
        ({"temperature": -0.5}, "spec.algorithm.temperature: got -0.5; expected a value greater than or equal to 0"),
        ({"lrDecay": "step"}, "spec.algorithm.lrDecay: got 'step'; expected 'constant', 'linear' or 'cosine'"),
        ({"activationCheckpointing": "some"}, "spec.algorithm.activationCheckpointing: got 'some'; expected 'none'"),
        ({"heldOutFraction": 1.5}, "spec.algorithm.heldOutFraction: got 1.5; expected a value less than 1"),
        ({"evalSize": 0}, "spec.algorithm.evalSize: got 0; expected a value greater than or equal to 1"),
        ({"evalEvery": 0}, "spec.algorithm.evalEvery: got 0; expected a value greater than or equal to 1"),
        ({"dynamicSampling": "often"}, "spec.algorithm.dynamicSampling: got 'often'; expected a valid boolean"),
        ({"betas": [0.9]}, "spec.algorithm.betas[1]: required field is missing"),
        ({"rewards": [{"weight": 1}]}, "spec.algorithm.rewards[0].name: required field is missing"),
        ({"rewards": []}, "spec.algorithm.rewards: got []; List should have at least 1 item"),
    ],
)  # fmt: skip
def test_a_wrong_type_or_range_names_the_field(algorithm, message):
    (problem,) = refusal(algorithm)
    assert problem.startswith(message)


def test_every_problem_is_reported_at_once():
    problems = refusal({"lrr": 1, "groupSize": 0})
    assert [p.split(":")[0] for p in problems] == ["spec.algorithm.groupSize", "spec.algorithm.lrr"]


def test_defaults_are_declared_once_here():
    a = parse_spec({"model": {"path": "/m"}}).algorithm
    assert (a.loss, a.clip_eps_low, a.clip_eps_high, a.kl_coef, a.kl_estimator, a.tis_cap) == (
        "grpo",
        None,
        None,
        0,
        "k3",
        0,
    )
    assert (a.lr, a.betas, a.lr_warmup_steps, a.lr_decay, a.warmup_steps, a.temperature) == (
        1e-6,
        (0.9, 0.999),
        0,
        "constant",
        0,
        1.0,
    )
    assert (a.micro_batch_size, a.activation_checkpointing, a.seed, a.eval_every) == (0, "none", 0, None)
    assert (a.prompts_per_step, a.group_size, a.max_new_tokens, a.eval_samples, a.dynamic_sampling) == (
        16,
        8,
        0,
        1,
        False,
    )
    assert (a.held_out_fraction, a.eval_size) == (0.05, None)
    assert (a.max_length, a.rows_per_step, a.pack, a.eval_max_examples, a.export_every) == (2048, 8, True, 0, 0)
    assert a.rewards == [RewardWeight(name="correctness", weight=1.0)]
    # The weight-sync library keeps its own constant for callers outside a job; the two must agree.
    assert a.weight_sync_bucket_bytes == weight_sync.DEFAULT_BUCKET_BYTES
    assert a == Algorithm()


def test_keys_are_camel_case_and_typed_and_every_one_is_described():
    a = Algorithm.model_validate({"groupSize": "4", "clipEpsHigh": 0.28, "rewards": [{"name": "math"}]})
    assert (a.group_size, a.clip_eps_high, a.rewards[0].weight) == (4, 0.28, 1.0)
    undescribed = [name for name, field in Algorithm.model_fields.items() if not field.description]
    assert undescribed == []
    # The loss's description lists the registry the trainer checks it against (kubeforge.losses.check_settings).
    assert all(name in Algorithm.model_fields["loss"].description for name in LOSSES)


def test_the_section_round_trips_through_the_yaml_the_roles_read():
    spec = parse_spec({"model": {"path": "/m"}, "algorithm": {"loss": "dapo", "betas": [0.8, 0.9], "evalEvery": 3}})
    again = parse_spec(yaml.safe_load(yaml.safe_dump(spec.to_yaml_dict())))
    assert again.algorithm == spec.algorithm and again.algorithm.betas == (0.8, 0.9)


def test_the_crd_types_the_keys_and_leaves_unknown_ones_to_the_operator():
    spec = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    algorithm = spec["properties"]["algorithm"]
    assert set(algorithm["properties"]) == {field.alias for field in Algorithm.model_fields.values()}
    assert algorithm["properties"]["groupSize"]["type"] == "integer"
    assert algorithm["properties"]["lrDecay"]["enum"] == ["constant", "linear", "cosine"]
    assert algorithm["properties"]["betas"] == {
        "type": "array", "description": "AdamW's betas.", "items": {"type": "number"}, "maxItems": 2, "minItems": 2,
    }  # fmt: skip
    # Kept, not pruned by the API server: the operator's parse_spec refuses them with a suggestion.
    assert algorithm["x-kubernetes-preserve-unknown-fields"] is True
    assert algorithm["properties"]["rewards"]["items"]["x-kubernetes-preserve-unknown-fields"] is True


def test_kubeforge_validate_refuses_a_misspelt_key(tmp_path, minimal_job):
    minimal_job["spec"]["algorithm"] = {"groupSzie": 4}
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(minimal_job))
    result = subprocess.run(
        [sys.executable, "-m", "kubeforge.cli", "validate", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "spec.algorithm.groupSzie: unknown field; did you mean 'groupSize'?" in result.stderr
