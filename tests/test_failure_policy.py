"""kubeforge.failure_policy: what a failure policy decides (a table), and the launcher and the
operator applying the same decisions to the same failures, to the same status."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubeforge import contract
from kubeforge.contract import Instance
from kubeforge.failure_policy import Counters, Failure, Observed, plan_failure
from kubeforge.launcher import Launcher, LaunchError, Options, Role
from kubeforge.spec import FailurePolicy, RLJob
from test_operator_reconcile_stuck import FakeCluster, _body, _pass

T0, T1, G0, G1, R0, C0 = (
    Instance("trainer", 0),
    Instance("trainer", 1),
    Instance("generator", 0),
    Instance("generator", 1),
    Instance("reward", 0),
    Instance("controller", 0),
)
EVERY = (T0, T1, G0, G1, R0, C0)
GROUP = (T0, T1, C0)
KILLED = 137  # SIGKILL, as a container reports it
BOOM = {"error": "RuntimeError: boom"}
TRANSIENT = {"error": "weight update stopped half-way", "transient": True}


def failed(inst: Instance, exit_code: int = KILLED, reason: str = "Error", words: dict[str, Any] | None = None):
    return Failure(inst, inst.name, exit_code, reason, words or {})


def policy(max_restarts: int = 3, rules: list[dict[str, Any]] | None = None) -> FailurePolicy:
    return FailurePolicy.model_validate({"maxRestarts": max_restarts, **({"rules": rules} if rules else {})})


# Expected: (fails, victims, restarts, restartsByRole, restartsByInstance, message)
CASES = [
    (
        "a killed generator is restarted alone",
        policy(), [failed(G1)], Counters(),
        (False, (G1,), 1, {"generator": 1}, {"generator-1": 1},
         "generator-1 failed (exit code 137, Error); restarting generator-1 (1 of 3)"),
    ),
    (
        "a killed trainer restarts the group; only the trainer's role counts a failure",
        policy(), [failed(T1)], Counters(),
        (False, GROUP, 1, {"trainer": 1}, {"trainer-0": 1, "trainer-1": 1, "controller-0": 1},
         "trainer-1 failed (exit code 137, Error); "
         "restarting trainer group and controller from the last checkpoint (1 of 3)"),
    ),
    (
        "a killed controller restarts the group",
        policy(), [failed(C0)], Counters(),
        (False, GROUP, 1, {"controller": 1}, {"trainer-0": 1, "trainer-1": 1, "controller-0": 1},
         "controller-0 failed (exit code 137, Error); "
         "restarting trainer group and controller from the last checkpoint (1 of 3)"),
    ),
    (
        "failures seen together are one restart; each failure counts for its role",
        policy(), [failed(T0), failed(T1), failed(G0)], Counters(),
        (False, (T0, T1, G0, C0), 1, {"trainer": 2, "generator": 1},
         {"trainer-0": 1, "trainer-1": 1, "generator-0": 1, "controller-0": 1},
         "trainer-0 failed (exit code 137, Error); "
         "restarting trainer group and controller from the last checkpoint, generator-0 (1 of 3)"),
    ),
    (
        "counters add to what status holds",
        policy(), [failed(G0)], Counters(2, {"generator": 1, "trainer": 1}, {"generator-0": 1, "trainer-0": 1}),
        (False, (G0,), 3, {"generator": 2, "trainer": 1}, {"generator-0": 2, "trainer-0": 1},
         "generator-0 failed (exit code 137, Error); restarting generator-0 (3 of 3)"),
    ),
    (
        "a role's own error fails the job",
        policy(), [failed(G0, 1, words=BOOM)], Counters(),
        (True, (), 0, {}, {}, "generator-0 failed (exit code 1, Error): RuntimeError: boom; failurePolicy: FailJob"),
    ),
    (
        "a transient error is restarted as a kill is",
        policy(), [failed(G0, contract.EXIT_TRANSIENT, words=TRANSIENT)], Counters(),
        (False, (G0,), 1, {"generator": 1}, {"generator-0": 1},
         "generator-0 failed (exit code 75, Error): weight update stopped half-way; restarting generator-0 (1 of 3)"),
    ),
    (
        "OOMKilled fails the job by default",
        policy(), [failed(R0, reason="OOMKilled")], Counters(),
        (True, (), 0, {}, {}, "reward-0 failed (exit code 137, OOMKilled); failurePolicy: FailJob"),
    ),
    (
        "a rule naming the reason restarts an OOMKilled role",
        policy(rules=[{"role": "reward", "action": "RestartPod", "onReasons": ["OOMKilled"]}]),
        [failed(R0, reason="OOMKilled")], Counters(),
        (False, (R0,), 1, {"reward": 1}, {"reward-0": 1},
         "reward-0 failed (exit code 137, OOMKilled); restarting reward-0 (1 of 3)"),
    ),
    (
        "the first matching rule wins: an exit code named for FailJob",
        policy(rules=[{"role": "generator", "action": "FailJob", "onExitCodes": [3]},
                      {"role": "generator", "action": "RestartPod"}]),
        [failed(G0, 3)], Counters(),
        (True, (), 0, {}, {}, "generator-0 failed (exit code 3, Error); failurePolicy: FailJob"),
    ),
    (
        "a role no rule names fails the job",
        policy(rules=[{"role": "generator", "action": "RestartPod"}]), [failed(R0)], Counters(),
        (True, (), 0, {}, {}, "reward-0 failed (exit code 137, Error); failurePolicy: FailJob"),
    ),
    (
        "a generator restarted from a checkpoint restarts with the group",
        policy(rules=[{"role": "generator", "action": "RestartFromCheckpoint"}]), [failed(G1)], Counters(),
        (False, (T0, T1, G1, C0), 1, {"generator": 1},
         {"trainer-0": 1, "trainer-1": 1, "generator-1": 1, "controller-0": 1},
         "generator-1 failed (exit code 137, Error); "
         "restarting trainer group and controller from the last checkpoint, generator-1 (1 of 3)"),
    ),
    (
        "a spent budget fails the job and counts nothing",
        policy(), [failed(G0)], Counters(3, {"generator": 3}, {"generator-0": 3}),
        (True, (), 3, {"generator": 3}, {"generator-0": 3},
         "restart budget exhausted (3 of 3 used); generator-0 failed (exit code 137, Error)"),
    ),
    (
        "no budget at all",
        policy(0), [failed(G0)], Counters(),
        (True, (), 0, {}, {}, "restart budget exhausted (0 of 0 used); generator-0 failed (exit code 137, Error)"),
    ),
    (
        "FailJob is named before a spent budget, whichever failure came first",
        policy(), [failed(G1), failed(G0, 1, words=BOOM)], Counters(3),
        (True, (), 3, {}, {}, "generator-0 failed (exit code 1, Error): RuntimeError: boom; failurePolicy: FailJob"),
    ),
]  # fmt: skip


@pytest.mark.parametrize(("policy_", "failures", "counters", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan_failure(policy_: FailurePolicy, failures: list[Failure], counters: Counters, want: tuple) -> None:
    decision = plan_failure(policy_, Observed(failures, EVERY, counters))
    fails, victims, restarts, by_role, by_instance, message = want
    assert (decision.fail_job, decision.victims, decision.message) == (fails, victims, message)
    assert decision.counters == Counters(restarts, by_role, by_instance)
    assert decision.budget_spent == message.startswith("restart budget exhausted")


def test_a_failed_instance_that_is_no_longer_present_still_restarts() -> None:
    decision = plan_failure(policy(), Observed([failed(G1)], (T0, C0), Counters()))
    assert decision.victims == (G1,)


def test_nothing_failed_is_no_decision() -> None:
    with pytest.raises(ValueError, match="at least one failure"):
        plan_failure(policy(), Observed([], EVERY, Counters()))


# -- the launcher and the operator, one failure sequence ---------------------------------------

# Each step: the instances that fail together, with (exit code, last words).
Step = dict[Instance, tuple[int, dict[str, Any]]]
SEQUENCES = {
    "restarts until the budget is spent": [
        {G1: (KILLED, {})},
        {T0: (KILLED, {}), G0: (KILLED, {})},
        {C0: (contract.EXIT_TRANSIENT, TRANSIENT)},
        {R0: (KILLED, {})},
    ],
    "a restart, then a role's own error": [
        {T1: (KILLED, {})},
        {G0: (1, BOOM)},
    ],
}


@dataclass
class FakeProcess:
    """What the launcher reads of a role's process: alive (None) or its return code."""

    returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


class LauncherSide:
    """The launcher's recover, on roles without processes: its own `_restart` is replaced by one
    that starts fake ones, so only the decision and its bookkeeping run."""

    def __init__(self, job: RLJob, run_dir: Path):
        self.launcher = Launcher(job, Options(run_dir=run_dir, out=io.StringIO()))
        self.launcher.roles = [self._role(i) for i in contract.instances(job.spec)]
        self.launcher._restart = self._restart  # type: ignore[method-assign]
        self.restarted: list[str] = []

    def _role(self, inst: Instance) -> Role:
        logs = self.launcher.options.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{inst.name}.termination.json").unlink(missing_ok=True)  # as Launcher._spawn does
        return Role(inst, "http://127.0.0.1:1", FakeProcess(), logs / f"{inst.name}.log")  # type: ignore[arg-type]

    def _restart(self, victims: list[Role], failed: list[Role]) -> None:
        self.restarted = [r.name for r in victims]
        for victim in victims:
            self.launcher.roles[self.launcher.roles.index(victim)] = self._role(victim.instance)

    def fail(self, step: Step) -> dict[str, Any]:
        for role in self.launcher.roles:
            if role.instance in step:
                code, words = step[role.instance]
                role.process.returncode = -9 if code == KILLED else code  # killed: -N from Popen
                role.termination_log.write_text(json.dumps(words))
        try:
            self.launcher.recover(self.launcher._failed_roles())
        except LaunchError:
            self.launcher.status.phase = "Failed"  # what Launcher.run does with it
        return self.launcher.status.model_dump(by_alias=True)


class OperatorSide:
    """The reconciler against a fake API server; deleted pods are gone by the next pass."""

    def __init__(self, minimal_job: dict[str, Any]):
        self.job, self.cluster = minimal_job, FakeCluster()
        self.status: dict[str, Any] = {}
        self._converge()

    def _pass(self) -> None:
        self.status, _ = _pass(self.cluster, _body(self.job, status=self.status))

    def _converge(self) -> None:
        """Recreate what was deleted, and run every pod."""
        self.cluster.pods = [p for p in self.cluster.pods if p["metadata"]["name"] not in self.cluster.deleted]
        self.cluster.deleted.clear()
        self._pass()
        for pod in self.cluster.pods:
            pod["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
        self._pass()
        assert self.status["phase"] == "Running", self.status

    def fail(self, step: Step) -> dict[str, Any]:
        for pod in self.cluster.pods:
            labels = pod["metadata"]["labels"]
            inst = Instance(labels["kubeforge.dev/role"], int(labels["kubeforge.dev/replica"]))
            if inst in step:
                code, words = step[inst]
                terminated = {"exitCode": code, "reason": "Error", "message": json.dumps(words)}
                state = {"name": "role", "state": {"terminated": terminated}}
                pod["status"] = {"phase": "Failed", "containerStatuses": [state]}
        self._pass()
        after = self.status
        self.restarted = [name.removeprefix("demo-") for name in self.cluster.deleted]
        if after["phase"] != "Failed":
            self._converge()
        return after


@pytest.mark.parametrize("sequence", SEQUENCES.values(), ids=SEQUENCES.keys())
def test_the_launcher_and_the_operator_count_the_same_failures_the_same(
    sequence: list[Step], minimal_job: dict[str, Any], tmp_path: Path
) -> None:
    minimal_job["spec"]["roles"] = {"trainer": {"nodes": 2}, "generator": {"replicas": 2}}
    # Two trainer nodes share the checkpoint claim.
    minimal_job["spec"]["checkpoint"] = {"storage": {"claimName": "ckpt", "accessMode": "ReadWriteMany"}}
    minimal_job["spec"]["failurePolicy"] = {"maxRestarts": 3}
    launcher = LauncherSide(RLJob.model_validate(minimal_job), tmp_path / "run")
    operator = OperatorSide(minimal_job)
    for step in sequence:
        local, cluster = launcher.fail(step), operator.fail(step)
        assert local["phase"] == cluster["phase"], (step, local, cluster)
        for key in ("restarts", "restartsByRole", "restartsByInstance"):
            assert local[key] == cluster.get(key, {}), (step, key, local, cluster)
        if cluster["phase"] == "Restarting":
            assert sorted(launcher.restarted) == sorted(operator.restarted)
            assert local["message"] == cluster["message"].replace("demo-", "")
    assert cluster["phase"] == "Failed"
