"""`kubeforge run`: real role processes on this machine, started, watched and stopped."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from kubeforge import auth
from kubeforge.launcher import LaunchError, allocate_ports, plan_gpus
from kubeforge.validation import parse_job

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def minimal_job(minimal_job, tiny_model):
    """The roles load their model for real: give them the tiny one."""
    minimal_job["spec"]["model"]["path"] = str(tiny_model)
    return minimal_job


def write_job(tmp_path, minimal_job, app="apps.preflight.main", steps=3, **roles):
    minimal_job["spec"]["steps"] = steps
    minimal_job["spec"]["roles"] = {"controller": {"app": app}, **roles}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(minimal_job))
    return path


def kubeforge(*args, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "kubeforge.cli", *map(str, args), "--no-color"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_kubeforge(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "kubeforge.cli", *map(str, args), "--no-color"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def role_processes(run_dir: Path) -> dict[int, dict[str, str]]:
    """Live processes started for `run_dir`, found by their environment: pid -> environment."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
        if env.get("KUBEFORGE_RUN_DIR") == str(run_dir.resolve()) and state != "Z":
            found[int(entry.name)] = env
    return found


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def wait_for_phase(run_dir: Path, phase: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = json.loads((run_dir / "status.json").read_text())
            if status["phase"] == phase:
                return status
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"job never reached {phase}")


def test_job_runs_to_completion_and_stops_every_role(tmp_path, minimal_job):
    job = write_job(tmp_path, minimal_job, trainer={"procsPerNode": 2}, generator={"replicas": 2})
    run_dir = tmp_path / "run"
    result = kubeforge("run", job, "--run-dir", run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "all 5 roles ready" in out
    assert "step 3/3 (100%)" in out
    assert "rank 1 of 2 joined the trainer group" in out  # torchrun's second worker, through PET_*
    assert "[generator-1]" in out and "job demo succeeded" in out
    status = json.loads((run_dir / "status.json").read_text())
    assert status["phase"] == "Succeeded" and status["progress"]["step"] == 3
    assert status["roles"]["generator"]["total"] == 2
    assert sorted(p.name for p in (run_dir / "logs").glob("*.log")) == [
        "controller-0.log",
        "generator-0.log",
        "generator-1.log",
        "reward-0.log",
        "trainer-0.log",
    ]
    last_words = json.loads((run_dir / "logs" / "controller-0.termination.json").read_text())
    assert last_words["exitCode"] == 0 and last_words["progress"]["step"] == 3
    assert json.loads((run_dir / "spec.json").read_text())["steps"] == 3
    assert role_processes(run_dir) == {}


def test_an_app_that_raises_fails_the_job_with_its_last_lines(tmp_path, minimal_job):
    job = write_job(tmp_path, minimal_job, app="tests.apps.crash")
    run_dir = tmp_path / "run"
    result = kubeforge("run", job, "--run-dir", run_dir)
    assert result.returncode == 1
    assert "job demo failed: controller-0 exited with code 1 (RuntimeError: boom at step 1)" in result.stdout
    assert "RuntimeError: boom at step 1" in result.stdout.split("failed:")[-1]
    assert json.loads((run_dir / "status.json").read_text())["phase"] == "Failed"
    assert role_processes(run_dir) == {}


def test_a_killed_role_fails_the_job_fast_once_the_restart_budget_is_spent(tmp_path, minimal_job):
    minimal_job["spec"]["failurePolicy"] = {"maxRestarts": 0}  # tests/test_faults.py: restarts within budget
    job = write_job(tmp_path, minimal_job, app="tests.apps.slow", steps=1000)
    run_dir = tmp_path / "run"
    launcher = start_kubeforge("run", job, "--run-dir", run_dir)
    try:
        wait_for_phase(run_dir, "Running")
        generators = {pid: env for pid, env in role_processes(run_dir).items() if env["KUBEFORGE_ROLE"] == "generator"}
        # The role process itself, not vLLM's engine process that it spawned (same environment).
        ((pid, env),) = [(p, e) for p, e in generators.items() if parent(p) not in generators]
        metrics = httpx.get(f"http://127.0.0.1:{env['KUBEFORGE_HTTP_PORT']}/metrics").text
        assert 'kubeforge_role_ready{job="demo",namespace="local",replica="0",role="generator"} 1.0' in metrics
        os.kill(pid, signal.SIGKILL)
        out, _ = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    assert launcher.returncode == 1
    assert "restart budget spent (0, failurePolicy.maxRestarts)" in out
    assert "job demo failed: generator-0 was killed by signal SIGKILL" in out
    assert role_processes(run_dir) == {}


def test_ctrl_c_stops_every_role(tmp_path, minimal_job):
    job = write_job(tmp_path, minimal_job, app="tests.apps.slow", steps=1000)
    run_dir = tmp_path / "run"
    launcher = start_kubeforge("run", job, "--run-dir", run_dir)
    try:
        wait_for_phase(run_dir, "Running")
        assert len(role_processes(run_dir)) >= 5  # torchrun and its worker, generator, reward, controller
        launcher.send_signal(signal.SIGINT)
        out, _ = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    assert launcher.returncode == 130
    assert "interrupted; stopping every role" in out
    assert role_processes(run_dir) == {}


def test_ctrl_c_leaves_no_orphan_when_a_trainer_worker_ignores_sigterm(tmp_path, minimal_job):
    # Issue 16: Ctrl-C during a long train step on CPU; torchrun's worker, in a session of its
    # own, did not stop within the grace, the launcher killed torchrun, and the worker ran on.
    job = write_job(
        tmp_path, minimal_job, app="tests.apps.slow", steps=1000, generator={"replicas": 0}, reward={"replicas": 0}
    )
    run_dir = tmp_path / "run"
    launcher = start_kubeforge("run", job, "--run-dir", run_dir)
    try:
        wait_for_phase(run_dir, "Running")
        trainer = {pid: env for pid, env in role_processes(run_dir).items() if env["KUBEFORGE_ROLE"] == "trainer"}
        ((worker, _),) = [(pid, env) for pid, env in trainer.items() if "LOCAL_RANK" in env]
        assert os.getsid(worker) != os.getsid(parent(worker)), "torchrun starts its worker in a session of its own"
        # Deaf to SIGTERM, as a worker whose main thread sits in a long C call: only SIGKILL ends it.
        os.kill(worker, signal.SIGSTOP)
        launcher.send_signal(signal.SIGINT)
        out, _ = launcher.communicate(timeout=60)
        left = role_processes(run_dir)
    finally:
        launcher.kill()
        for pid in role_processes(run_dir):  # never leave a failed run's orphan on the machine
            os.kill(pid, signal.SIGKILL)
    assert launcher.returncode == 130
    assert "trainer-0 did not stop within 10 s; killed" in out
    assert left == {}


def test_a_role_that_is_not_ready_in_time_is_named(tmp_path, minimal_job):
    job = write_job(tmp_path, minimal_job)
    run_dir = tmp_path / "run"
    # torchrun alone takes longer than half a second to import torch and start its worker.
    result = kubeforge("run", job, "--run-dir", run_dir, "--ready-timeout", "0.5")
    assert result.returncode == 1
    assert "not ready after 0 s (--ready-timeout)" in result.stdout
    assert "trainer-0 at http://127.0.0.1:" in result.stdout
    assert role_processes(run_dir) == {}


def test_a_busy_port_is_refused_before_anything_starts(tmp_path, minimal_job):
    job = write_job(tmp_path, minimal_job)
    run_dir = tmp_path / "run"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        result = kubeforge("run", job, "--run-dir", run_dir, "--port-base", port)
    assert result.returncode == 1
    assert f"port {port} (trainer-0) already in use" in result.stdout
    assert not run_dir.exists()


def test_free_ports_come_from_below_the_ephemeral_range():
    # A role binds its port seconds after the launcher picks it; an ephemeral port could be
    # taken meanwhile by any bind(0) or outgoing connection (CI once saw a generator's
    # weight-sync port taken by one of vLLM's own sockets).
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    names = [f"role-{i}" for i in range(50)]
    ports = allocate_ports(names, None)
    assert list(ports) == names
    assert len(set(ports.values())) == len(names)
    assert all(1024 <= port < first_ephemeral for port in ports.values()), ports


def test_a_role_whose_port_is_taken_says_so(tmp_path, minimal_job):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(minimal_job["spec"]))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {
            **os.environ,
            "KUBEFORGE_JOB": "demo",
            "KUBEFORGE_ROLE": "reward",
            "KUBEFORGE_REPLICA": "0",
            "KUBEFORGE_SPEC": str(spec_path),
            "KUBEFORGE_HTTP_HOST": "127.0.0.1",
            "KUBEFORGE_HTTP_PORT": str(busy.getsockname()[1]),
            "KUBEFORGE_TOKEN_DIR": str(auth.write_token_dir(tmp_path / "tokens", auth.new_tokens(), "reward")),
        }
        result = subprocess.run(
            [sys.executable, "-m", "kubeforge.rewards"], env=env, capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 3
    assert "already in use (KUBEFORGE_HTTP_PORT)" in result.stdout


def test_an_invalid_file_is_refused_and_nothing_is_created(tmp_path, minimal_job):
    minimal_job["spec"]["steps"] = 0
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(minimal_job))
    result = kubeforge("run", job, "--run-dir", tmp_path / "run")
    assert result.returncode == 1
    assert "spec.steps: got 0" in result.stderr
    assert not (tmp_path / "run").exists()


def test_gpus_are_handed_out_in_start_order(minimal_job):
    minimal_job["spec"]["roles"] = {"trainer": {"gpusPerNode": 2}, "generator": {"replicas": 2, "gpus": 1}}
    plan = {i.name: devices for i, devices in plan_gpus(parse_job(minimal_job), available=4).items()}
    assert plan == {"trainer-0": "0,1", "generator-0": "2", "generator-1": "3", "reward-0": "", "controller-0": ""}
    with pytest.raises(LaunchError, match="needs 4 GPUs .* this machine has 2"):
        plan_gpus(parse_job(minimal_job), available=2)
