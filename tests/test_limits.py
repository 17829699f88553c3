"""Bounds on every input (kubeforge/limits.py): 413 or 400 naming the limit, and the role keeps serving."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from kubeforge import limits
from kubeforge.auth import Credentials, bearer
from kubeforge.batch import BatchError
from kubeforge.contract import RoleContext
from kubeforge.generator.service import GenerateRequest, check_limits
from kubeforge.serving import RoleServer
from kubeforge.validation import parse_job
from pydantic import BaseModel

MAX_MODEL_LEN = 2048


class Body(BaseModel):
    text: str


@pytest.fixture
def client(minimal_job, tmp_path: Path) -> TestClient:
    credentials = Credentials.issue("reward")
    ctx = RoleContext(
        job="limits", namespace="team", role="reward", replica=0, spec=parse_job(minimal_job).spec,
        run_dir=tmp_path, credentials=credentials, http_host="127.0.0.1", http_port=0, weight_sync_addr="",
    )  # fmt: skip
    server = RoleServer(ctx)

    @server.app.post("/echo")
    async def echo(body: Body) -> dict:
        return {"length": len(body.text)}

    @server.app.post("/train")
    async def train(body: Body) -> dict:
        return {"length": len(body.text)}

    return TestClient(server.app, headers=bearer(credentials.token()))


def test_a_body_over_the_limit_is_413_and_the_role_keeps_serving(client, monkeypatch):
    monkeypatch.setattr(limits, "MAX_BODY_BYTES", 1000)
    monkeypatch.setattr(limits, "MAX_BATCH_BODY_BYTES", 5000)
    big = {"text": "x" * 2000}
    refused = client.post("/echo", json=big)
    assert refused.status_code == 413
    assert "takes at most 1000 (MAX_BODY_BYTES in kubeforge/limits.py)" in refused.json()["detail"]
    # Without a Content-Length (chunked): read up to the limit, then refused.
    chunked = client.post("/echo", content=iter([b'{"text": "', b"x" * 600, b"x" * 600, b'"}']))
    assert chunked.status_code == 413 and "(MAX_BODY_BYTES" in chunked.json()["detail"]
    assert client.post("/train", json=big).json() == {"length": 2000}  # batch routes take more
    assert client.post("/echo", json={"text": "ok"}).json() == {"length": 2}
    chunked = client.post("/echo", content=iter([b'{"text": ', b'"ok"}']), headers={"content-type": "application/json"})
    assert chunked.json() == {"length": 2}
    assert client.get("/healthz").status_code == 200


def refusal(**fields) -> str:
    request = GenerateRequest.model_validate({"prompt_token_ids": [[1, 2]], **fields})
    with pytest.raises(HTTPException) as refused:
        check_limits(request, MAX_MODEL_LEN)
    assert refused.value.status_code == 400
    return refused.value.detail


def test_generate_requests_are_bounded():
    assert "at most 4096 per request (MAX_PROMPTS)" in refusal(prompt_token_ids=[[1]] * 100_000)
    assert "n is 1000000; at most 16384 samples per prompt (MAX_N)" in refusal(n=10**6)
    assert "(MAX_SAMPLES)" in refusal(prompt_token_ids=[[1]] * 8, n=16384)
    assert "max_tokens is 4096; the model's length (max_model_len) is 2048" in refusal(max_tokens=4096)
    assert "must be int64" in refusal(seed=2**80)
    assert "must be int64" in refusal(seed=2**63 - 1, prompt_token_ids=[[1], [2]])  # seed + 1 overflows
    assert "(MAX_STOP_TOKEN_IDS)" in refusal(stop_token_ids=[1] * 2000)
    ok = GenerateRequest.model_validate(
        {"prompt_token_ids": [[1]] * 4096, "n": 16, "max_tokens": MAX_MODEL_LEN, "seed": 2**63 - 4096}
    )
    check_limits(ok, MAX_MODEL_LEN)


def test_train_batches_are_bounded_in_rows():
    limits.check_rows(limits.MAX_TRAIN_ROWS)
    with pytest.raises(BatchError, match=r"16385 rows; at most 16384 per batch \(MAX_TRAIN_ROWS\)"):
        limits.check_rows(limits.MAX_TRAIN_ROWS + 1)
