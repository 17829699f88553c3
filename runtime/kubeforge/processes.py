"""Every process a local job starts, found and stopped however the job ends.

Process groups alone do not reach them all: torchrun starts each worker in a session of its
own (torch.distributed.elastic's SubprocessHandler passes start_new_session=True), so killpg()
on the trainer role's group misses the workers, and a worker that outlives torchrun is
reparented to init with nothing left to stop it (issue 16: one kept 9 GB and a core after
Ctrl-C). A cgroup would hold every descendant, but making one needs a delegated cgroup v2
subtree, which plain shells, CI runners and most containers do not have. What works on any
Linux machine, unprivileged:

- A tag. The launcher puts `KUBEFORGE_PROCESS_TAG=<launch>/<instance>` in each role's
  environment; every descendant inherits it (torchrun, vLLM and multiprocessing pass the
  environment on), and /proc/PID/environ keeps it whatever the process's parent, group or
  session later is. `find` takes every process carrying the tag, and their descendants by
  parent pid (a child started with a cleaned environment, while its parent lives).
- Parent-death signals (`die_with_parent`): roles die with the launcher, torchrun's workers
  with torchrun, even when nothing is left to look for them.
- A watchdog (`Watchdog`): a small process of its own that stops everything carrying the
  launch's tag once the launcher is gone, however it went, SIGKILL included.

A process is known by its pid and start time, so a pid reused meanwhile is never signalled.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

TAG_ENV = "KUBEFORGE_PROCESS_TAG"
KILL_WAIT_SECONDS = 5.0  # after SIGKILL: the kernel frees a big process's memory before it is gone
_POLL_SECONDS = 0.1
_PR_SET_PDEATHSIG = 1

# Looked up once, here: die_with_parent also runs between fork and exec (preexec_fn), where
# loading a library could deadlock on a lock another thread of the parent held at the fork.
_prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None) if sys.platform == "linux" else None


@dataclass(frozen=True)
class Process:
    pid: int
    start: int  # clock ticks after boot (/proc/PID/stat field 22): tells a reused pid apart


def tag(launch: str, instance: str) -> str:
    """The value of TAG_ENV for the processes of `instance` (e.g. trainer-0) in launch `launch`."""
    return f"{launch}/{instance}"


def die_with_parent(sig: signal.Signals) -> None:
    """Have the kernel send `sig` to this process when its parent dies.

    Linux ties this to the thread that forked us, not the whole parent process: call it only in
    children of a parent's main thread (the launcher's and torchrun's spawn from theirs). It is
    kept across exec, but not passed to children. A no-op off Linux.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(sig))


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of `pid`, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def _tag_of(pid: int) -> str | None:
    """TAG_ENV as `pid` was started with, or None (none, gone, or not ours to read)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = TAG_ENV.encode() + b"="
    for item in environ.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode(errors="replace")
    return None


def find(launch: str, instances: Collection[str] | None = None) -> dict[Process, str]:
    """Live processes of `launch` (of `instances` only, if given), each with its instance's name:
    those carrying its tag and their descendants, in whatever session or group. Never this process."""
    live: dict[int, tuple[int, int]] = {}  # pid -> (parent pid, start time)
    owner: dict[int, str] = {}
    try:
        entries = list(os.scandir("/proc"))
    except FileNotFoundError:
        return {}  # not Linux: process groups and a normal exit's stop() are all there is
    for entry in entries:
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        stat = _stat(pid)
        if stat is None or stat[0] in "ZXx":  # dead: nothing to stop
            continue
        live[pid] = stat[1], stat[2]
        found = _tag_of(pid)
        if found is not None:
            found_launch, _, instance = found.partition("/")
            if found_launch == launch and (instances is None or instance in instances):
                owner[pid] = instance
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (parent, _) in live.items():
        children[parent].append(pid)
    stack = list(owner)
    while stack:
        pid = stack.pop()
        for child in children.get(pid, ()):
            if child not in owner:
                owner[child] = owner[pid]
                stack.append(child)
    owner.pop(os.getpid(), None)
    return {Process(pid, live[pid][1]): instance for pid, instance in owner.items()}


def alive(processes: Iterable[Process]) -> set[Process]:
    """Those of `processes` still running: not gone, not a zombie, not a reused pid."""
    running = set()
    for process in processes:
        stat = _stat(process.pid)
        if stat is not None and stat[0] not in "ZXx" and stat[2] == process.start:
            running.add(process)
    return running


def send(processes: Iterable[Process], sig: signal.Signals) -> None:
    for process in alive(processes):  # checked just before: a pid reused meanwhile is left alone
        try:
            os.kill(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def wait_gone(processes: Iterable[Process], timeout: float) -> set[Process]:
    """Wait up to `timeout` seconds for `processes` to end; return those still running."""
    deadline = time.monotonic() + timeout
    left = alive(processes)
    while left and time.monotonic() < deadline:
        time.sleep(_POLL_SECONDS)
        left = alive(left)
    return left


def kill(processes: Iterable[Process]) -> set[Process]:
    """SIGKILL `processes` and wait until they are gone; return any the kernel has not freed in
    KILL_WAIT_SECONDS (stuck in an uninterruptible wait)."""
    processes = set(processes)
    send(processes, signal.SIGKILL)
    return wait_gone(processes, KILL_WAIT_SECONDS)


@dataclass
class Stopped:
    found: dict[Process, str]  # every process found, with its instance's name
    killed: set[Process]  # outlived the grace: ended by SIGKILL
    stuck: set[Process]  # outlived SIGKILL too (an uninterruptible wait)

    def names(self, processes: Iterable[Process]) -> str:
        """The instances `processes` belong to, for a message."""
        return ", ".join(sorted({self.found[p] for p in processes if p in self.found}))


def terminate(launch: str, grace: float, instances: Collection[str] | None = None) -> Stopped:
    """SIGTERM every process of `launch` (of `instances`), SIGKILL what outlives `grace` seconds,
    and return once none is left (or KILL_WAIT_SECONDS after SIGKILL)."""
    found = find(launch, instances)
    send(found, signal.SIGTERM)
    killed = wait_gone(found, grace)
    # Found again too: what a process started since; the first look keeps what was orphaned since.
    stuck = kill(killed | find(launch, instances).keys())
    return Stopped(found, killed, stuck)


class Watchdog:
    """A process of its own that stops every process of `launch` once the launcher is gone.

    Its stdin is the read end of a pipe whose write end only the launcher holds: the kernel
    closes it when the launcher exits for any reason, SIGKILL included, and the watchdog then
    terminates whatever still carries the launch's tag. On a normal exit the launcher has
    stopped everything already, and the watchdog finds nothing. It runs in a session of its own,
    so a Ctrl-C at the terminal or a signal to the launcher's group does not end it first.
    """

    def __init__(self, launch: str, grace: float) -> None:
        read, self._write = os.pipe()  # not inheritable: no role holds the launcher's end open
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kubeforge.processes", launch, str(grace)],
                stdin=read,
                start_new_session=True,
            )
        finally:
            os.close(read)

    def close(self, timeout: float = KILL_WAIT_SECONDS) -> None:
        """The launcher is done: let the watchdog make sure of it, and exit."""
        if self._write >= 0:
            os.close(self._write)
            self._write = -1
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass  # still stopping something: it finishes on its own


def _watch(launch: str, grace: float) -> None:
    while os.read(0, 4096):  # b"" once the launcher's end is closed: it exited or died
        pass
    stopped = terminate(launch, grace)
    if stopped.found:
        try:
            print(
                f"[kubeforge] the launcher is gone; stopped {len(stopped.found)} processes of "
                f"{stopped.names(stopped.found)}",
                file=sys.stderr,
            )
        except OSError:
            pass  # the terminal went with the launcher


if __name__ == "__main__":
    _watch(sys.argv[1], float(sys.argv[2]))
