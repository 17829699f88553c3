"""kubeforge.processes: a job's processes are found and stopped wherever they went (issue 16).

Each test builds the situation from plain Python processes: a "role" carrying the launch's
tag that starts a child in a session of its own (as torchrun starts its workers), the child
deaf to SIGTERM (as a worker busy in a long step), and its parent then gone.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from kubeforge import processes

DEAF = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
DEAF_SLEEPER = DEAF + "import time; print('ready', flush=True); time.sleep(600)"

# Starts argv[1] in a session of its own with environment `env`, prints its pid once it is up,
# then does `then`.
PARENT = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen(
        [sys.executable, "-c", sys.argv[1]], env={env}, start_new_session=True, stdout=subprocess.PIPE
    )
    child.stdout.readline()
    print(child.pid, flush=True)
    {then}
""")

# A stand-in for the launcher: its watchdog, and one role (argv[1]) tagged as generator-0.
LAUNCHER = textwrap.dedent("""
    import os, subprocess, sys, time
    from kubeforge import processes
    watchdog = processes.Watchdog("launch-d", 0.5)
    print(watchdog.process.pid, flush=True)
    env = {**os.environ, processes.TAG_ENV: processes.tag("launch-d", "generator-0")}
    role = subprocess.Popen(
        [sys.executable, "-c", sys.argv[1]], env=env, start_new_session=True, stdout=subprocess.PIPE
    )
    role.stdout.readline()
    print(role.pid, flush=True)
    time.sleep(600)
""")


@pytest.fixture
def spawned():
    """Start Python processes (code, env, new session); whatever they left is killed at the end."""
    started: list[subprocess.Popen] = []
    pids: list[int] = []

    def spawn(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        started.append(process)
        return process

    def child_of(process: subprocess.Popen) -> int:
        """The pid the process printed: its child's, once that is up."""
        pid = int(process.stdout.readline())
        pids.append(pid)
        return pid

    yield spawn, child_of
    for pid in pids + [p.pid for p in started]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for process in started:
        process.wait()


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZXx"
    except OSError:
        return False


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not running(pid)


def tagged(launch: str, instance: str) -> dict[str, str]:
    return {**os.environ, processes.TAG_ENV: processes.tag(launch, instance)}


def test_an_orphan_in_a_session_of_its_own_is_found_and_killed_though_deaf_to_sigterm(spawned):
    spawn, child_of = spawned
    role = spawn(PARENT.format(env=None, then="pass"), DEAF_SLEEPER, env=tagged("launch-a", "trainer-0"))
    orphan = child_of(role)
    role.wait()  # the role is gone: its child now belongs to init, in a session of its own
    other = spawn(PARENT.format(env=None, then="time.sleep(600)"), DEAF_SLEEPER, env=tagged("launch-b", "trainer-0"))
    other_launch = child_of(other)
    assert os.getsid(orphan) == orphan and running(orphan)

    found = processes.find("launch-a")
    assert {p.pid: name for p, name in found.items()} == {orphan: "trainer-0"}
    assert processes.find("launch-a", ["generator-0"]) == {}

    started = time.monotonic()
    processes.terminate("launch-a", grace=0.5)
    assert not running(orphan)
    assert time.monotonic() - started < 5
    assert running(other_launch), "another launch's processes are not this one's to stop"


def test_a_child_started_with_a_clean_environment_is_found_by_its_parent(spawned):
    spawn, child_of = spawned
    # The child gets no environment at all, so no tag: only its parent links it to the job.
    role = spawn(PARENT.format(env={}, then="time.sleep(600)"), DEAF_SLEEPER, env=tagged("launch-c", "reward-0"))
    child = child_of(role)
    assert {p.pid: name for p, name in processes.find("launch-c").items()} == {role.pid: "reward-0", child: "reward-0"}


def test_a_worker_dies_with_its_parent(spawned):
    spawn, child_of = spawned
    worker = "from kubeforge import processes; processes.die_with_parent(processes.signal.SIGKILL); " + DEAF_SLEEPER
    torchrun = spawn(PARENT.format(env=None, then="time.sleep(600)"), worker)
    pid = child_of(torchrun)
    torchrun.kill()
    assert gone_within(pid, 5)


def test_the_watchdog_stops_the_job_when_the_launcher_is_killed(spawned):
    spawn, child_of = spawned
    stand_in = spawn(LAUNCHER, DEAF_SLEEPER)
    watchdog = child_of(stand_in)
    worker = child_of(stand_in)
    stand_in.kill()
    assert gone_within(worker, 10)
    assert gone_within(watchdog, 5)
