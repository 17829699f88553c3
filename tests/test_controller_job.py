"""The controller's Job handle: progress reports reach whoever asked for them."""

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from kubeforge.contract import RoleContext
from kubeforge.controller import Job
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


def test_progress_is_pushed_coalesced_and_flushed(minimal_job, tmp_path: Path):
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ctx = RoleContext(
        job="demo", namespace="team", role="controller", replica=0, spec=parse_job(minimal_job).spec,
        run_dir=tmp_path, token="s3cret", http_host="127.0.0.1", http_port=0, weight_sync_addr="",
        progress_url=f"http://127.0.0.1:{server.server_port}/progress/team/demo",
    )  # fmt: skip

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
