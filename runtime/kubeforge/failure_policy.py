"""What to do when roles of a job fail: one pure decision, applied by the launcher and the operator.

In JobSet's shape: `plan_failure(policy, observed) -> Decision`. The caller gathers what it sees
(the failed processes or pods, what is still there, the counters in status); the decision says
whether the job fails, which instances to restart, the new counters and the message. The launcher
(`kubeforge.launcher.Launcher.recover`) stops and starts processes, the operator
(`kubeforge_operator.reconcile.Reconciler._handle_failures`) deletes pods; neither decides.

Which failure gets which action is `FailurePolicy.action_for` (kubeforge.spec): the first rule for
the role, a role that reported its own error or was OOMKilled matched only by a rule naming its
exit code or reason. Here: a FailJob fails the job at once; otherwise a spent budget
(`maxRestarts`) fails it; otherwise RestartPod restarts the failed instance alone and
RestartFromCheckpoint restarts the checkpoint group (the trainers and the controller, which hold
the training state and resume from the last checkpoint) together with the failed instances.

The counting rule, the same on both sides. A decision covers every failure observed at once (one
reconcile pass, one poll of the launcher's processes) and counts:

- `restarts`: one per decision that restarts, however many instances failed or restart. This is
  the budget `maxRestarts` is spent from, and, as JobSet's `restarts`, it counts restarts of the
  job: one lost node that takes a trainer and the controller with it is one restart, not two, and
  the same failures seen in one pass or in one poll cost the same.
- `restartsByRole`: one per failed instance of that role: the cause. A controller restarted only
  because its trainer failed is not a controller failure; no role is listed that never failed.
- `restartsByInstance`: one per instance started again: every victim, the failed one and those
  restarted with it. It is how many times that pod was replaced (the CRD's "restarts of each
  pod"), and the operator's pod incarnation (the restart-generation label) needs every replacement
  to count.

Before this module the launcher counted a restart per failed role and listed only the failed
role by instance, while the operator counted one per pass and every victim by instance (and put
a 0 under a role that had only been restarted along).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubeforge.contract import Instance, permanent_error
from kubeforge.spec import FailureAction, FailurePolicy

# The roles that hold the training state: RestartFromCheckpoint restarts them together, from the
# last checkpoint (FailureRule refuses RestartPod for them for the same reason).
CHECKPOINT_GROUP = ("trainer", "controller")


@dataclass(frozen=True)
class Failure:
    """One instance that failed, as its launcher or operator saw it."""

    instance: Instance
    name: str  # what messages call it: the process ("trainer-0") or the pod ("grpo-trainer-0")
    exit_code: int | None  # as a container reports it: 128 + N for a process killed by signal N
    reason: str | None = None  # the container's termination reason: Error, OOMKilled, ...
    last_words: dict[str, Any] = field(default_factory=dict)  # its termination log, parsed

    @property
    def reported_error(self) -> bool:
        """The role exited saying what went wrong (it raised): restarting would repeat it."""
        return permanent_error(self.last_words)

    def describe(self) -> str:
        """E.g. "grpo-trainer-0 failed (exit code 3, Error): CUDA out of memory"."""
        detail = ", ".join(part for part in (_exit(self.exit_code), self.reason or "") if part)
        text = f"{self.name} failed" + (f" ({detail})" if detail else "")
        error = self.last_words.get("error")
        return text + (f": {error}" if error else "")


def _exit(code: int | None) -> str:
    return f"exit code {code}" if code is not None else ""


@dataclass(frozen=True)
class Counters:
    """status.restarts, status.restartsByRole and status.restartsByInstance (see the counting rule)."""

    restarts: int = 0
    by_role: Mapping[str, int] = field(default_factory=dict)
    by_instance: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Observed:
    """What the caller sees at once."""

    failures: Sequence[Failure]  # every instance found failed, in the order found
    present: Sequence[Instance]  # every instance with a process or a pod not already going, failed or not
    counters: Counters


@dataclass(frozen=True)
class Decision:
    fail_job: bool
    cause: Failure  # the failure the message names
    action: FailureAction  # the cause's action; FailJob when a rule says so
    message: str
    victims: tuple[Instance, ...] = ()  # to stop and start again, in `present`'s order; none when the job fails
    counters: Counters = field(default_factory=Counters)  # after the decision; unchanged when the job fails
    budget_spent: bool = False  # the job fails because maxRestarts restarts were used
    from_checkpoint: bool = False  # the checkpoint group is among the victims


def plan_failure(policy: FailurePolicy, observed: Observed) -> Decision:
    """Apply `policy` to the failures observed at once. Pure: the caller applies the decision."""
    if not observed.failures:
        raise ValueError("plan_failure needs at least one failure")
    actions = [
        (f, policy.action_for(f.instance.role, f.exit_code, f.reason, role_error=f.reported_error))
        for f in observed.failures
    ]
    before = observed.counters
    fatal = next((f for f, action in actions if action == "FailJob"), None)
    if fatal is not None:
        return Decision(True, fatal, "FailJob", f"{fatal.describe()}; failurePolicy: FailJob", counters=before)
    cause, action = actions[0]
    used = before.restarts
    if used >= policy.max_restarts:
        message = f"restart budget exhausted ({used} of {policy.max_restarts} used); {cause.describe()}"
        return Decision(True, cause, action, message, counters=before, budget_spent=True)

    failed = [f.instance for f in observed.failures]
    from_checkpoint = any(a == "RestartFromCheckpoint" for _, a in actions)
    # Every failed instance restarts, whatever its action (a RestartFromCheckpoint rule may name a
    # generator): one left out would be found failed again, and spend the budget on nothing.
    victims = tuple(
        i
        for i in dict.fromkeys([*observed.present, *failed])
        if i in failed or (from_checkpoint and i.role in CHECKPOINT_GROUP)
    )
    by_role, by_instance = dict(before.by_role), dict(before.by_instance)
    for f in observed.failures:
        by_role[f.instance.role] = by_role.get(f.instance.role, 0) + 1
    for i in victims:
        by_instance[i.name] = by_instance.get(i.name, 0) + 1
    alone = [i.name for i in victims if not (from_checkpoint and i.role in CHECKPOINT_GROUP)]
    what = ", ".join(["trainer group and controller from the last checkpoint"] * from_checkpoint + alone)
    return Decision(
        False,
        cause,
        action,
        f"{cause.describe()}; restarting {what} ({used + 1} of {policy.max_restarts})",
        victims=victims,
        counters=Counters(used + 1, by_role, by_instance),
        from_checkpoint=from_checkpoint,
    )
