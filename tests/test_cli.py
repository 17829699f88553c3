"""The `kubeforge` command as a newcomer meets it."""

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def kubeforge(*args):
    return subprocess.run([sys.executable, "-m", "kubeforge.cli", *map(str, args)], capture_output=True, text=True)


def test_help_explains_what_it_is_and_lists_the_commands():
    out = kubeforge("--help").stdout
    assert "reinforcement-learning jobs" in out
    for command in ("validate", "crd", "run"):
        assert command in out
    assert "kubectl apply -f" in out
    run_help = kubeforge("run", "--help").stdout
    assert "--ready-timeout" in run_help and "Exit code: 0 succeeded, 1 failed, 130 interrupted" in run_help


def test_validate_accepts_an_example_and_summarises_it():
    result = kubeforge("validate", REPO / "apps/preflight/preflight.yaml")
    assert result.returncode == 0
    assert "valid RLJob 'preflight'" in result.stdout and "generator x2" in result.stdout


def test_validate_refuses_with_the_field_and_exit_1(tmp_path, minimal_job):
    minimal_job["spec"]["roles"] = {"generator": {"replicas": -1}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(minimal_job))
    result = kubeforge("validate", path)
    assert result.returncode == 1
    assert "spec.roles.generator.replicas: got -1" in result.stderr
    assert result.stdout == ""


def test_no_command_is_a_usage_error():
    result = kubeforge()
    assert result.returncode == 2 and "COMMAND" in result.stderr


def test_validate_refuses_checkpoints_that_would_die_with_a_pod_unless_asked_for_a_local_check(tmp_path, minimal_job):
    minimal_job["spec"]["checkpoint"] = {"storage": {"emptyDir": True}}
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(minimal_job))
    result = kubeforge("validate", path)
    assert result.returncode == 1
    assert "spec.checkpoint.storage.emptyDir: got True" in result.stderr and "--local" in result.stderr
    assert kubeforge("validate", "--local", path).returncode == 0
