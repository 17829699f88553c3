"""The local launcher (`kubeforge run`): every role of an RLJob as a local process.

It gives each process exactly the environment the operator gives a pod (kubeforge.contract),
with peers on 127.0.0.1 ports, streams each role's log with a prefix, waits for every /readyz,
shows the controller's progress, and stops every process it started when the job ends, when a
role fails for good, or on Ctrl-C. The exit code says how the job ended.

A role that dies is handled by spec.failurePolicy, decided by kubeforge.failure_policy as for the
operator's lost pods: RestartPod starts that process again alone; RestartFromCheckpoint starts the
trainer group and the controller again (they resume from the last checkpoint); FailJob, or a spent
restart budget, ends the job with the role's error. Roles found exited at one poll are one decision.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TextIO

import httpx

from kubeforge import auth, contract, processes
from kubeforge.contract import Endpoints, Instance
from kubeforge.failure_policy import Counters, Failure, Observed, plan_failure
from kubeforge.spec import Progress, RLJob, RLJobSpec, RLJobStatus, RoleCount

LOCALHOST = "127.0.0.1"
LOCAL_PORT_FLOOR = 20000  # below: well-known services' ports
LOG_TAIL_LINES = 30
STOP_GRACE_SECONDS = 10.0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class LaunchError(RuntimeError):
    """The job could not start or did not finish; the message says which role and why."""


@dataclass
class Options:
    run_dir: Path
    ready_timeout: float = 600.0
    port_base: int | None = None
    color: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)


@dataclass
class Role:
    """One started process and what the launcher keeps of it."""

    instance: Instance
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=LOG_TAIL_LINES))
    ready: bool = False

    @property
    def name(self) -> str:
        return self.instance.name

    @property
    def termination_log(self) -> Path:
        return self.log_path.parent / f"{self.name}.termination.json"

    def last_lines(self) -> str:
        lines = list(self.tail) or ["(no output)"]
        return "\n".join(f"    {line}" for line in lines)


_COLORS = ("36", "32", "35", "33", "34", "31")


def local_gpus() -> int:
    """GPUs this machine offers, without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def _die_with_launcher() -> None:
    """In the child before exec: get SIGTERM if the launcher dies, so no role outlives it."""
    processes.die_with_parent(signal.SIGTERM)


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


def _first_ephemeral_port() -> int:
    """The lowest port the OS hands out for bind(0) and outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; at or below the other systems' (49152)


def _free_port(taken: Collection[int]) -> int:
    """A free port below the ephemeral range, or from the OS when that range leaves too few.

    A role binds its port seconds after the launcher picks it. An ephemeral port could be
    handed meanwhile to another process's bind(0) (vLLM's and gloo's sockets do that), or to
    an outgoing connection, and the role would then find it taken, or a peer would talk to a
    stranger. Ports below the range are only ever bound on purpose.
    """
    first_ephemeral = _first_ephemeral_port()
    if first_ephemeral - LOCAL_PORT_FLOOR >= 1024:
        for _ in range(100):
            port = random.randrange(LOCAL_PORT_FLOOR, first_ephemeral)
            if port not in taken and _port_is_free(port):
                return port
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def allocate_ports(names: list[str], port_base: int | None) -> dict[str, int]:
    """A port per name: consecutive from `port_base` (each checked), or free ones (see `_free_port`)."""
    if port_base is None:
        ports: dict[str, int] = {}
        while len(ports) < len(names):
            port = _free_port(ports.values())
            if port not in ports.values():
                ports[names[len(ports)]] = port
        return ports
    ports = {name: port_base + i for i, name in enumerate(names)}
    busy = [f"{port} ({name})" for name, port in ports.items() if not _port_is_free(port)]
    if busy:
        raise LaunchError(
            f"port{'s' * (len(busy) > 1)} {', '.join(busy)} already in use on {LOCALHOST}; "
            f"choose another --port-base or leave it out to use free ports"
        )
    return ports


def plan_gpus(job: RLJob, available: int | None = None) -> dict[Instance, str]:
    """CUDA_VISIBLE_DEVICES for each instance: GPUs handed out in start-up order, none for CPU roles."""
    wanted = {inst: contract.gpus_for(job.spec, inst.role) for inst in contract.instances(job.spec)}
    total = sum(wanted.values())
    if total and available is None:
        available = local_gpus()
    if total > (available or 0):
        detail = ", ".join(f"{inst.name}: {n}" for inst, n in wanted.items() if n)
        raise LaunchError(f"the job needs {total} GPUs ({detail}) and this machine has {available}")
    plan, next_gpu = {}, 0
    for inst, n in wanted.items():
        plan[inst] = ",".join(str(g) for g in range(next_gpu, next_gpu + n))
        next_gpu += n
    return plan


def local_environments(
    job: str,
    spec: RLJobSpec,
    run_dir: Path,
    *,
    namespace: str = "local",
    roles: Collection[str] | None = None,
    port_base: int | None = None,
    tokens: dict[str, str] | None = None,
) -> dict[Instance, dict[str, str]]:
    """The environment contract of each instance (of `roles`, default all) with peers on this
    machine's loopback ports; writes RUN_DIR/spec.json and each role's token directory,
    RUN_DIR/tokens/ROLE (`tokens`, default fresh ones: kubeforge.auth). The launcher, and tests or
    benchmarks that start single roles, all build environments here."""
    chosen = [i for i in contract.instances(spec) if roles is None or i.role in roles]
    ports = allocate_ports([i.name for i in chosen] + ["trainer-master", "weight-sync"], port_base)
    endpoints = Endpoints(
        http={i: f"http://{LOCALHOST}:{ports[i.name]}" for i in chosen},
        trainer_master=(LOCALHOST, ports["trainer-master"]),
        weight_sync=(LOCALHOST, ports["weight-sync"]),
    )
    run_dir = run_dir.resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "spec.json"
    spec_path.write_text(spec.model_dump_json(by_alias=True, indent=2))
    tokens = tokens or auth.new_tokens()
    token_dirs = {
        role: str(auth.write_token_dir(run_dir / "tokens" / role, tokens, role)) for role in {i.role for i in chosen}
    }
    return {
        inst: contract.role_env(
            job=job,
            namespace=namespace,
            spec=spec,
            spec_path=str(spec_path),
            instance=inst,
            endpoints=endpoints,
            http_host=LOCALHOST,
            http_port=ports[inst.name],
            run_dir=str(run_dir),
            token_dir=token_dirs[inst.role],
            termination_log=str(run_dir / "logs" / f"{inst.name}.termination.json"),
        )
        for inst in chosen
    }


class Launcher:
    def __init__(self, job: RLJob, options: Options):
        self.job = job
        self.options = options
        self.roles: list[Role] = []
        self.status = RLJobStatus(phase="Pending")
        self._urls: dict[Instance, str] = {}
        self._envs: dict[Instance, dict[str, str]] = {}
        self._print_lock = threading.Lock()
        self._echo_roles = True
        self._threads: list[threading.Thread] = []
        # Tags every process this run starts (kubeforge.processes), so that stopping a role, or the
        # job, reaches what left its process group: torchrun's workers run in sessions of their own.
        self._launch = os.urandom(8).hex()
        self._watchdog: processes.Watchdog | None = None
        self._tokens = auth.new_tokens()  # the job token answers the controller's /status

    # -- output ------------------------------------------------------------------------------

    def say(self, message: str) -> None:
        self._emit("kubeforge", message, "1")

    def _emit(self, who: str, line: str, color: str) -> None:
        prefix = f"[{who}]"
        if self.options.color:
            prefix = f"\033[{color}m{prefix}\033[0m"
        with self._print_lock:
            print(f"{prefix} {line}", file=self.options.out, flush=True)

    def _pump(self, role: Role, stream: IO[bytes], color: str) -> None:
        with open(role.log_path, "ab") as log_file:
            for raw in iter(stream.readline, b""):
                log_file.write(raw)
                log_file.flush()
                line = raw.decode(errors="replace").rstrip("\n")
                role.tail.append(line)
                if self._echo_roles:
                    self._emit(role.name, line, color)

    # -- start -------------------------------------------------------------------------------

    def prepare(self) -> dict[Instance, dict[str, str]]:
        """Check what can be checked before starting anything; return each instance's environment."""
        spec = self.job.spec
        if importlib.util.find_spec("torch") is None:
            raise LaunchError("the trainer role needs torch: install kubeforge with the runtime extra (make env)")
        gpu_plan = plan_gpus(self.job)
        envs = local_environments(
            self.job.name, spec, self.options.run_dir, namespace=self.job.metadata.namespace or "local",
            port_base=self.options.port_base, tokens=self._tokens,
        )  # fmt: skip
        for inst, env in envs.items():
            env["CUDA_VISIBLE_DEVICES"] = gpu_plan[inst]
            env["PYTHONUNBUFFERED"] = "1"
        self._urls = {inst: f"http://{LOCALHOST}:{env[contract.HTTP_PORT]}" for inst, env in envs.items()}
        return envs

    def start(self, envs: dict[Instance, dict[str, str]]) -> None:
        self._envs = envs
        # First: from the first role on, something stops them all should the launcher be SIGKILLed.
        self._watchdog = processes.Watchdog(self._launch, STOP_GRACE_SECONDS)
        for inst in envs:
            self.roles.append(self._spawn(inst))
        run_dir = self.options.run_dir.resolve()
        self.say(
            f"started {len(self.roles)} processes for job {self.job.name}: "
            + ", ".join(r.name for r in self.roles)
            + f" (logs in {run_dir / 'logs'})"
        )
        self._set_phase("Starting")

    def _spawn(self, inst: Instance) -> Role:
        """Start `inst`'s process; its log file is appended to, so a restart keeps the earlier lines."""
        log_path = self.options.run_dir.resolve() / "logs" / f"{inst.name}.log"
        # Last words of an earlier process (or run) in this directory must not be read as this one's.
        log_path.with_name(f"{inst.name}.termination.json").unlink(missing_ok=True)
        # Apps live next to the spec's project; keep the user's working directory importable.
        pythonpath = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
        process = subprocess.Popen(
            contract.role_command(inst.role, python=sys.executable),
            env={
                **os.environ,
                **self._envs[inst],
                "PYTHONPATH": pythonpath,
                processes.TAG_ENV: processes.tag(self._launch, inst.name),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() reaches torchrun's workers too
            preexec_fn=_die_with_launcher,
        )
        role = Role(inst, self._urls[inst], process, log_path)
        color = _COLORS[list(self._envs).index(inst) % len(_COLORS)]
        thread = threading.Thread(target=self._pump, args=(role, process.stdout, color), daemon=True)
        thread.start()
        self._threads.append(thread)
        return role

    # -- failures ----------------------------------------------------------------------------

    def recover(self, failed: list[Role]) -> None:
        """Apply spec.failurePolicy to the roles found failed together, as kubeforge.failure_policy
        decides: restart its victims, or raise LaunchError."""
        policy = self.job.spec.failure_policy
        counters = Counters(self.status.restarts, self.status.restarts_by_role, self.status.restarts_by_instance)
        decision = plan_failure(
            policy, Observed([self._failure(r) for r in failed], [r.instance for r in self.roles], counters)
        )
        cause = next(r for r in failed if r.instance == decision.cause.instance)
        if decision.budget_spent:
            self.say(f"restart budget spent ({policy.max_restarts}, failurePolicy.maxRestarts)")
        if decision.fail_job:
            self._raise_exited(cause)
        victims = [r for r in self.roles if r.instance in decision.victims]
        how = "; ".join(f"{r.name} {self._how(r)}" for r in failed)
        action = "RestartFromCheckpoint" if decision.from_checkpoint else "RestartPod"
        self.say(f"{how}; {action}: restarting {', '.join(r.name for r in victims)}")
        self._restart(victims, failed)
        self.status.restarts = decision.counters.restarts
        self.status.restarts_by_role = dict(decision.counters.by_role)
        self.status.restarts_by_instance = dict(decision.counters.by_instance)
        self._set_phase("Restarting", decision.message)

    def _failure(self, role: Role) -> Failure:
        """An exited role as the failure policy reads it."""
        code = role.process.returncode
        # Exit codes as a container reports them: 128 + N for a process killed by signal N. A process
        # has no termination reason; "Error" is what the kubelet reports for any non-zero exit but OOM.
        exit_code = 128 - code if code < 0 else code
        return Failure(role.instance, role.name, exit_code, "Error", self._last_words(role))

    def _restart(self, victims: list[Role], failed: list[Role]) -> None:
        """Stop the victims still running, clear what the failed ones left, and start every victim again."""
        self._stop_roles(r for r in victims if r not in failed)
        for role in failed:
            # What the dead role left behind, in its group or not (torchrun's workers), must not hold
            # the ports or the memory its next process needs.
            _signal_group(role.process, signal.SIGKILL)
            processes.kill(processes.find(self._launch, [role.name]))
            role.process.wait()
        for role in victims:
            self.roles[self.roles.index(role)] = self._spawn(role.instance)

    def _how(self, role: Role) -> str:
        code = role.process.returncode
        if code is not None and code < 0:
            return f"was killed by signal {signal.Signals(-code).name}"
        return "exited before the job finished" if code == 0 else f"exited with code {code}"

    # -- watch -------------------------------------------------------------------------------

    def _failed_roles(self) -> list[Role]:
        """Every role that exited, but the controller finishing successfully; in start order."""
        return [
            role
            for role in self.roles
            if (code := role.process.poll()) is not None and not (role.instance.role == "controller" and code == 0)
        ]

    def _raise_exited(self, role: Role) -> None:
        how = self._how(role)
        error = self._last_words(role).get("error")
        if error:
            how += f" ({error})"
        raise LaunchError(f"{role.name} {how}; its last log lines:\n{role.last_lines()}")

    def wait_ready(self, client: httpx.Client) -> None:
        started = time.monotonic()
        deadline = started + self.options.ready_timeout
        answers: dict[str, str] = {}
        while not all(r.ready for r in self.roles):
            failed = self._failed_roles()
            if failed:
                self._raise_exited(failed[0])
            for role in self.roles:
                if role.ready:
                    continue
                if role.instance.role == "controller" and role.process.poll() == 0:
                    role.ready = True
                    continue
                try:
                    reply = client.get(f"{role.url}/readyz")
                    answers[role.name] = f"HTTP {reply.status_code} {reply.text.strip()[:200]}"
                    if reply.status_code == 200:
                        role.ready = True
                        self.say(f"{role.name} ready ({time.monotonic() - started:.1f} s)")
                except httpx.TransportError as e:
                    answers[role.name] = f"no answer ({type(e).__name__})"
            self._count_ready()
            if time.monotonic() > deadline:
                slow = [r for r in self.roles if not r.ready]
                details = "\n".join(
                    f"  {r.name} at {r.url}: last answer {answers.get(r.name, 'none')}; "
                    f"its last log lines:\n{r.last_lines()}"
                    for r in slow
                )
                raise LaunchError(
                    f"{len(slow)} role{'s' * (len(slow) > 1)} not ready after {self.options.ready_timeout:.0f} s "
                    f"(--ready-timeout):\n{details}"
                )
            time.sleep(0.25)
        self.say(f"all {len(self.roles)} roles ready in {time.monotonic() - started:.1f} s")
        self._set_phase("Running")

    def watch(self, client: httpx.Client) -> None:
        """Until the controller exits: show its progress, fail fast if any other role dies."""
        controller = next(r for r in self.roles if r.instance.role == "controller")
        started = time.monotonic()
        shown_step = -1
        while True:
            failed = self._failed_roles()
            if failed:
                self.recover(failed)
                controller = next(r for r in self.roles if r.instance.role == "controller")
                continue
            if self.status.phase == "Restarting" and all(r.process.poll() is None for r in self.roles):
                self._set_phase("Running")
            if controller.process.poll() == 0:
                final = self._last_words(controller).get("progress")
                if final is not None:
                    self.status.progress = Progress.model_validate(final)
                if self.status.progress.step != shown_step:
                    self.say(self._progress_line(self.job.spec.steps, time.monotonic() - started))
                self.say(f"controller finished after {time.monotonic() - started:.1f} s")
                return
            try:
                reply = client.get(f"{controller.url}/status")
                if reply.status_code == 200:
                    body = reply.json()
                    self.status.progress = Progress.model_validate(body["progress"])
                    if self.status.progress.step != shown_step:
                        shown_step = self.status.progress.step
                        self.say(self._progress_line(body["steps"], time.monotonic() - started))
                        self._write_status()
            except (httpx.TransportError, ValueError, KeyError):
                pass  # the controller may be busy or just exiting; the next poll tells
            time.sleep(0.5)

    def _last_words(self, role: Role) -> dict:
        """What the role wrote to its termination log when it exited (empty if nothing)."""
        try:
            return json.loads(role.termination_log.read_text())
        except (OSError, ValueError):
            return {}

    def _progress_line(self, steps: int, elapsed: float) -> str:
        p = self.status.progress
        parts = [f"step {p.step}/{steps} ({100 * p.step / max(steps, 1):.0f}%)", f"policy v{p.policy_version}"]
        if p.reward_mean is not None:
            parts.append(f"reward {p.reward_mean:.3f}")
        if p.weight_sync_seconds is not None:
            parts.append(f"weight sync {p.weight_sync_seconds:.2f} s")
        parts.append(f"{elapsed:.0f} s elapsed")
        if 0 < p.step < steps:
            parts.append(f"eta {elapsed / p.step * (steps - p.step):.0f} s")
        return " · ".join(parts)

    # -- stop --------------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM every process group started, the controller first; SIGKILL what outlives the grace."""
        alive = [r for r in reversed(self.roles) if r.process.poll() is None]
        if alive:
            # Shutdown chatter (torchrun prints a traceback on SIGTERM) goes to the log files only.
            self._echo_roles = False
            self.say(f"stopping {len(alive)} role{'s' * (len(alive) > 1)}")
        self._stop_roles(reversed(self.roles))
        for thread in self._threads:
            thread.join(timeout=2.0)
        self._count_ready()

    def _stop_roles(self, roles: Iterable[Role]) -> None:
        """SIGTERM every process of these roles: each role's process group and, by their tag, what
        they started in sessions of their own (torchrun's workers) or left behind; SIGKILL whatever
        outlives the grace, and return once none of them is left."""
        roles = list(roles)
        for role in roles:
            if role.process.poll() is None:
                _signal_group(role.process, signal.SIGTERM)
        stopped = processes.terminate(self._launch, STOP_GRACE_SECONDS, [r.name for r in roles])
        for role in roles:
            _signal_group(role.process, signal.SIGKILL)  # a group member that shed its tag and parent
            role.process.wait()
        if stopped.killed:
            count = f"{len(stopped.killed)} process{'es' * (len(stopped.killed) > 1)}"
            self.say(f"{stopped.names(stopped.killed)} did not stop within {STOP_GRACE_SECONDS:.0f} s; killed {count}")
        if stopped.stuck:
            self.say(f"processes {', '.join(str(p.pid) for p in stopped.stuck)} did not end even on SIGKILL")

    # -- status ------------------------------------------------------------------------------

    def _count_ready(self) -> None:
        counts: dict[str, RoleCount] = {}
        for role in self.roles:
            count = counts.setdefault(role.instance.role, RoleCount())
            count.total += 1
            count.ready += int(role.ready and role.process.poll() is None)
        self.status.roles = counts

    def _set_phase(self, phase: str, message: str = "") -> None:
        now = datetime.now(UTC).isoformat()
        self.status.phase = phase  # type: ignore[assignment]
        self.status.message = message
        if phase == "Starting":
            self.status.start_time = now
        if phase in ("Succeeded", "Failed"):
            self.status.completion_time = now
        self._write_status()

    def _write_status(self) -> None:
        path = self.options.run_dir / "status.json"
        if not path.parent.is_dir():
            return  # failed before anything started: leave no trace
        path.write_text(self.status.model_dump_json(by_alias=True, indent=2, exclude_none=True))

    def run(self) -> int:
        """Start, wait, watch, stop. Returns the process exit code."""
        try:
            return self._run()
        finally:
            if self._watchdog is not None:
                self._watchdog.close()

    def _run(self) -> int:
        try:
            self.start(self.prepare())
            with httpx.Client(timeout=5.0, headers=auth.bearer(self._tokens[auth.JOB])) as client:
                self.wait_ready(client)
                self.watch(client)
            self.stop()
            self._set_phase("Succeeded")
            self.say(f"job {self.job.name} succeeded; run directory {self.options.run_dir}")
            return 0
        except LaunchError as e:
            self.stop()
            self._set_phase("Failed", str(e).splitlines()[0])
            self.say(f"job {self.job.name} failed: {e}")
            return EXIT_FAILED
        except KeyboardInterrupt:
            self.say("interrupted; stopping every role")
            self.stop()
            self._set_phase("Failed", "interrupted")
            return EXIT_INTERRUPTED


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run(job: RLJob, options: Options) -> int:
    """Run `job` locally; SIGTERM to the launcher stops it like Ctrl-C does."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGINT too: a launcher started in the background by a shell inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler of its own.
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return Launcher(job, options).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
