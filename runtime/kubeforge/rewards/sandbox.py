"""The math reward's sandbox: sympy runs in child processes, a small pool of them per reward replica.

Parsing and simplifying a model's expression can take minutes or all memory (`9^{9^{9}}`), and a
thread cannot be stopped, so each comparison runs in a child process that is killed when it runs
past its timeout (the comparison is then False) and replaced on next use. A child has an
address-space limit, dies with the reward role (PR_SET_PDEATHSIG), and sees only the environment
variables Python and sympy read: never the job's token or any other credential of the role.

A replica keeps a pool of such children, so that K slow answers of one batch take about one
timeout, not K; a comparison also stops at its batch's deadline. The pool's size is the
environment variable REWARD_WORKERS (set it in `spec.roles.reward.env`); unset, it is this
process's CPU count (its affinity, and its cgroup's CPU quota: a pod's cpu limit), at most
DEFAULT_MAX_WORKERS. The reward role scores that many items of a batch at once
(kubeforge.rewards.scoring). Children start on demand, the most recently used first: a batch of
plain numbers never starts one.
"""

from __future__ import annotations

import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubeforge.processes import TAG_ENV

SYMPY_TIMEOUT_S = 5.0  # per comparison; generous because the reward host may be busy
SYMPY_MEMORY_BYTES = 2 << 30  # the child's address-space limit: a runaway power fails fast instead of swapping
WORKERS_ENV = "REWARD_WORKERS"
# Unset REWARD_WORKERS: at most this many children, each up to SYMPY_MEMORY_BYTES (8 x 2 GiB at worst).
DEFAULT_MAX_WORKERS = 8
# The child's environment: only these names and prefixes of the role's, what Python and sympy read.
# It runs sympy on model output, so no credential (HF_TOKEN, AWS_*, ...) may be there.
# TAG_ENV: the launcher finds every process of a job by it, orphans included (kubeforge.processes).
_CHILD_ENV = ("PATH", "HOME", "LANG", "TMPDIR", "LD_LIBRARY_PATH", TAG_ENV)
_CHILD_ENV_PREFIXES = ("LC_", "PYTHON", "SYMPY_")

# PR_SET_PDEATHSIG fires when the *thread* that started the child exits, not the process. Scoring
# threads come and go with each batch, so every child is started from this one long-lived thread.
_spawner = ThreadPoolExecutor(1, thread_name_prefix="sympy-spawner")


def cpu_count() -> int:
    """The CPUs this process may use: its CPU affinity, further bounded by a cgroup v2 CPU quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:  # a pod's cpu limit is a quota ("200000 100000": two CPUs), not an affinity
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, -(-int(quota) // int(period)))
    except (OSError, ValueError):  # no cgroup v2 here, or no limit
        pass
    return max(1, cpus)


def configured_workers(environ: Mapping[str, str] | None = None) -> int:
    """Sandbox children per replica (and items scored at once): REWARD_WORKERS, else the CPU count capped."""
    value = (os.environ if environ is None else environ).get(WORKERS_ENV, "").strip()
    if not value:
        return min(cpu_count(), DEFAULT_MAX_WORKERS)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(
            f"{WORKERS_ENV}={value!r}: expected a whole number >= 1 of sandbox workers per reward replica "
            f"(unset: the CPU count, at most {DEFAULT_MAX_WORKERS})"
        )
    return int(value)


def _serve(memory_bytes: int) -> None:
    """The child's loop: a JSON line [source, source] on stdin -> "1" or "0" on stdout, until stdin closes."""
    import resource
    import signal

    from kubeforge.processes import die_with_parent

    die_with_parent(signal.SIGTERM)  # when the reward role dies: a comparison stuck in sympy must not outlive it
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    import sympy
    from sympy.parsing.sympy_parser import implicit_multiplication, parse_expr, rationalize, standard_transformations

    replies, sys.stdout = sys.stdout, sys.stderr  # nothing sympy prints can corrupt the replies
    names: dict[str, Any] = {n: getattr(sympy, n) for n in ("Integer", "Float", "Rational", "Symbol", "Function")}
    names.update(sqrt=sympy.sqrt, pi=sympy.pi, oo=sympy.oo, log=sympy.log, exp=sympy.exp, sin=sympy.sin,
                 cos=sympy.cos, tan=sympy.tan, __builtins__={})  # fmt: skip
    transformations = (*standard_transformations, implicit_multiplication, rationalize)

    def equivalent(a: str, b: str) -> bool:
        x = parse_expr(a, global_dict=dict(names), transformations=transformations)
        y = parse_expr(b, global_dict=dict(names), transformations=transformations)
        return bool(x == y or sympy.simplify(x - y) == 0)

    replies.write("ready\n")
    replies.flush()
    for line in sys.stdin:
        try:
            result = equivalent(*json.loads(line))
        except Exception:  # whatever the model wrote, an unparseable answer is just wrong
            result = False
        replies.write("1\n" if result else "0\n")
        replies.flush()


class SympyWorker:
    """One child process that compares expressions; a comparison that runs past `timeout` is False,
    and the child is killed and replaced (threads cannot be stopped; processes can)."""

    def __init__(self, *, timeout: float = SYMPY_TIMEOUT_S, memory_bytes: int = SYMPY_MEMORY_BYTES,
                 start_timeout: float = 120.0):  # fmt: skip
        self.timeout, self.memory_bytes, self.start_timeout = timeout, memory_bytes, start_timeout
        self.restarts = 0
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        # A plain child process, not multiprocessing: that would re-import the host's __main__, and the
        # reward role is threaded (fork is unsafe). Unbuffered pipes, so select() sees every reply.
        env = {k: v for k, v in os.environ.items() if k in _CHILD_ENV or k.startswith(_CHILD_ENV_PREFIXES)}
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), *sys.path])
        code = f"from kubeforge.rewards.sandbox import _serve; _serve({self.memory_bytes})"
        process = _spawner.submit(
            subprocess.Popen, [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
            bufsize=0,
        ).result()  # fmt: skip
        if self._read(process, self.start_timeout) != b"ready":
            process.kill()
            process.wait()
            raise RuntimeError(
                f"math reward: the sympy worker ({sys.executable}) did not start within {self.start_timeout:.0f} s; "
                "its error is in this process's stderr"
            )
        self._process = process
        return process

    @staticmethod
    def _read(process: subprocess.Popen[bytes], timeout: float) -> bytes | None:
        """One reply line, or None when the child stays silent for `timeout` seconds or dies."""
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        line = process.stdout.readline() if ready else b""
        return line.strip() if line.endswith(b"\n") else None

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process.stdin.close()
            self._process.stdout.close()
        self._process = None

    def _running(self) -> subprocess.Popen[bytes]:
        return self._process if self._process and self._process.poll() is None else self._start()

    def start(self) -> None:
        """Start the child now unless it runs (otherwise the first comparison starts it)."""
        with self._lock:
            self._running()

    def equivalent(self, a: str, b: str, *, deadline: float | None = None) -> bool:
        """Whether sympy finds the two whitelisted sources equal within the timeout, and before `deadline`
        (a time.monotonic() value: the batch's; past it the answer is no longer wanted)."""
        with self._lock:
            if self._time_left(deadline) <= 0:
                return False  # too late to start anything
            process = self._running()
            timeout = self._time_left(deadline)  # starting the child took some of it
            if timeout <= 0:
                return False  # not begun: the child stays, warm for the next batch
            try:
                process.stdin.write(json.dumps([a, b]).encode() + b"\n")
                reply = self._read(process, timeout)
            except BrokenPipeError:  # the child died on an earlier input
                reply = None
            if reply is not None:
                return reply == b"1"
            # Too slow, killed by its memory limit, or cut off by the deadline: the child is killed, and the
            # input is at fault, not the service.
            self._stop()
            self.restarts += 1
            return False

    def _time_left(self, deadline: float | None) -> float:
        return self.timeout if deadline is None else min(self.timeout, deadline - time.monotonic())

    def close(self) -> None:
        with self._lock:
            self._stop()


class SympyPool:
    """`size` SympyWorkers; each comparison takes an idle one (waiting while all are busy)."""

    def __init__(self, size: int, **worker_options: Any):
        if size < 1:
            raise ValueError(f"a sympy pool needs at least 1 worker, got {size}")
        self.workers = [SympyWorker(**worker_options) for _ in range(size)]
        # Last in, first out: the warm child that just answered takes the next comparison, and the
        # others start only when comparisons overlap.
        self._idle: queue.LifoQueue[SympyWorker] = queue.LifoQueue()
        for worker in reversed(self.workers):
            self._idle.put(worker)

    @property
    def restarts(self) -> int:
        """Children killed so far for running past their timeout or deadline, or dying."""
        return sum(worker.restarts for worker in self.workers)

    def start(self) -> None:
        """Start every child now, all at once (each imports sympy: about a second of CPU)."""
        with ThreadPoolExecutor(len(self.workers)) as starting:
            list(starting.map(SympyWorker.start, self.workers))

    def equivalent(self, a: str, b: str, *, deadline: float | None = None) -> bool:
        """Whether sympy finds the two whitelisted sources equal, on the next idle worker, before `deadline`."""
        try:
            worker = self._idle.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except queue.Empty:  # every worker stayed busy until the deadline
            return False
        try:
            return worker.equivalent(a, b, deadline=deadline)
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        """Stop every child once the comparisons running on them end (a later one starts a child again)."""
        # Each worker is taken out first, so none is closed under a comparison and restarted by it after.
        workers = [self._idle.get() for _ in self.workers]
        for worker in workers:
            worker.close()
            self._idle.put(worker)


_pool: SympyPool | None = None
_pool_lock = threading.Lock()


def pool() -> SympyPool:
    """The process's pool, made on first use: most math answers are numbers and never need it."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = SympyPool(configured_workers())
        return _pool
