"""The controller's Job handle: progress reports reach whoever asked for them; the metrics file
follows resumes."""

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from kubeforge.auth import Credentials
from kubeforge.contract import RoleContext
from kubeforge.controller import Job
from kubeforge.trainer.client import TrainerError
from kubeforge.validation import parse_job


class _Recorder(BaseHTTPRequestHandler):
    received: list[tuple[str, dict]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Recorder.received.append((self.headers["Authorization"], body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


TOKENS = {"job": "j0b", "controller": "s3cret", "trainer": "tr41n"}


def controller_context(minimal_job, run_dir: Path, progress_url: str = "") -> RoleContext:
    return RoleContext(
        job="demo", namespace="team", role="controller", replica=0, spec=parse_job(minimal_job).spec,
        run_dir=run_dir, credentials=Credentials.issue("controller", TOKENS), http_host="127.0.0.1", http_port=0,
        weight_sync_addr="", progress_url=progress_url,
    )  # fmt: skip


def test_progress_is_pushed_coalesced_and_flushed(minimal_job, tmp_path: Path):
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ctx = controller_context(minimal_job, tmp_path, f"http://127.0.0.1:{server.server_port}/progress/team/demo")

    async def loop() -> None:
        job = Job(ctx)
        job.report(1, policy_version=1, reward_mean=0.1)
        await asyncio.sleep(0.3)  # the first report is on the wire
        for step in range(2, 6):
            job.report(step, policy_version=step, reward_mean=step / 10)
        await job.flush()

    try:
        asyncio.run(loop())
    finally:
        server.shutdown()
    # The first report goes at once; the four that follow within its second collapse into the newest.
    assert [body["step"] for _, body in _Recorder.received] == [1, 5]
    assert _Recorder.received[-1] == ("Bearer s3cret", {"step": 5, "policyVersion": 5, "rewardMean": 0.5})


def test_a_resume_keeps_the_metrics_rows_up_to_its_checkpoint(minimal_job, tmp_path: Path):
    job = Job(controller_context(minimal_job, tmp_path))
    assert job.begin_metrics(None) == [] and job.metrics_path.read_text() == ""  # nothing there yet
    rows = [{"step": 0, "eval_reward": 0.1}, *({"step": s, "loss": 1 / s} for s in range(1, 8))]
    # The stopped run's file: its last line cut short by the stop.
    job.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo')

    kept = job.begin_metrics(5)  # the trainer resumed from its step-5 checkpoint
    assert kept == rows[:6]
    assert [json.loads(line) for line in job.metrics_path.read_text().splitlines()] == rows[:6]
    assert job.begin_metrics(None) == [] and job.metrics_path.read_text() == ""  # a fresh start: none of them


def test_progress_shows_the_newest_held_out_reward_even_when_evaluations_finish_late(minimal_job, tmp_path: Path):
    job = Job(controller_context(minimal_job, tmp_path))
    job.record({"step": 5, "policy_version": 5, "reward_mean": 0.2, "eval_reward": 0.4})
    job.record({"step": 10, "policy_version": 10, "reward_mean": 0.5})
    assert (job.progress.step, job.progress.held_out_reward, job.progress.held_out_step) == (10, 0.4, 5)
    job.record({"step": 10, "eval_reward": 0.9})  # the evaluation after step 10, done while step 11 ran
    job.record({"step": 11, "policy_version": 11, "reward_mean": 0.6})
    job.record({"step": 5, "eval_reward": 0.1})  # a stale one never replaces a newer one
    assert (job.progress.step, job.progress.held_out_reward, job.progress.held_out_step) == (11, 0.9, 10)


class _SlowTrainer(BaseHTTPRequestHandler):
    """A trainer whose step outlives the deadline: it answers after 3 s."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        time.sleep(3)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_a_trainer_call_past_the_step_deadline_fails_naming_it(minimal_job, tmp_path: Path):
    server = HTTPServer(("127.0.0.1", 0), _SlowTrainer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    minimal_job["spec"]["stepDeadlineSeconds"] = 1
    ctx = controller_context(minimal_job, tmp_path)
    ctx.peers["trainer"] = [f"http://127.0.0.1:{server.server_port}"]

    async def call() -> None:
        trainer = Job(ctx).trainer_client()
        try:
            await trainer.status()
        finally:
            await trainer.close()

    started = time.monotonic()
    try:
        with pytest.raises(TrainerError, match=r"no answer within 1 s \(spec.stepDeadlineSeconds\)"):
            asyncio.run(call())
        assert time.monotonic() - started < 2.5  # the deadline, not the trainer's answer
    finally:
        server.shutdown()
