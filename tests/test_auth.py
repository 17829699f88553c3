"""Who may call what (kubeforge.auth): the route table, the middleware every role server runs, the
token files a role starts from, and the trainer's limits on where a publish or an export goes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from kubeforge import auth
from kubeforge.auth import AuthError, Credentials, bearer
from kubeforge.contract import RoleContext
from kubeforge.launcher import local_environments
from kubeforge.serving import RoleServer
from kubeforge.trainer.api import export_dir, publish_targets
from kubeforge.validation import parse_job

TOKENS = {"job": "j" * 64, "controller": "c" * 64, "trainer": "t" * 64}


@pytest.mark.parametrize(
    ("role", "method", "path", "needed"),
    [
        ("trainer", "GET", "/healthz", None),
        ("trainer", "GET", "/readyz", None),
        ("generator", "GET", "/metrics", None),
        ("trainer", "POST", "/train", "controller"),
        ("trainer", "POST", "/evaluate", "controller"),
        ("trainer", "POST", "/checkpoint", "controller"),
        ("trainer", "GET", "/status", "controller"),
        ("trainer", "POST", "/weights/export", "controller"),
        ("trainer", "POST", "/weights/publish", "controller"),
        ("trainer", "GET", "/weights/names", "job"),
        ("generator", "POST", "/weights/init", "trainer"),
        ("generator", "POST", "/weights/update", "trainer"),
        ("generator", "GET", "/weights/info", "job"),
        ("generator", "POST", "/generate", "job"),
        ("generator", "POST", "/v1/completions", "job"),
        ("reward", "POST", "/score", "job"),
        ("reference", "POST", "/logprobs", "job"),
        ("controller", "GET", "/status", "job"),
        ("reward", "POST", "/anything-new", "job"),  # a route nobody listed is closed, not open
    ],
)
def test_each_route_needs_its_credential(role, method, path, needed):
    assert auth.required(role, method, path) == needed


def test_openai_routes_open_only_when_the_spec_says_so():
    assert auth.required("generator", "POST", "/v1/chat/completions", open_openai=True) is None
    assert auth.required("generator", "POST", "/generate", open_openai=True) == "job"
    assert auth.required("generator", "POST", "/weights/update", open_openai=True) == "trainer"
    assert auth.required("trainer", "POST", "/v1/anything", open_openai=True) == "job"


def test_each_role_holds_only_its_own_tokens(tmp_path: Path):
    for role, held in [("controller", {"job", "controller"}), ("trainer", {"job", "trainer"}),
                       ("generator", {"job"}), ("reward", {"job"}), ("reference", {"job"})]:  # fmt: skip
        directory = auth.write_token_dir(tmp_path / role, TOKENS, role)
        assert {p.name for p in directory.iterdir()} == held | {auth.DIGESTS_FILE}
        assert all(p.stat().st_mode & 0o077 == 0 for p in directory.iterdir())  # this user only
        credentials = Credentials.load(directory, role)
        assert set(credentials.tokens) == held
        assert all(credentials.accepts(name, TOKENS[name]) for name in auth.CREDENTIALS)
        with pytest.raises(AuthError, match="does not hold"):
            credentials.token("trainer" if role != "trainer" else "controller")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "job").unlink(), r"cannot read .*/job"),
        (lambda d: (d / "job").write_text(""), r"/job is empty"),
        (lambda d: (d / auth.DIGESTS_FILE).unlink(), r"cannot read .*digests.json"),
        (lambda d: (d / auth.DIGESTS_FILE).write_text("{"), r"digests.json is not JSON"),
        (lambda d: (d / auth.DIGESTS_FILE).write_text(json.dumps({"job": "x"})), r"lacks the digest of controller"),
        (lambda d: (d / "job").write_text("planted"), r"/job does not match its digest"),
    ],
    ids=["no-token", "empty-token", "no-digests", "bad-digests", "missing-digest", "token-not-the-jobs"],
)
def test_a_role_without_its_tokens_refuses_to_start(tmp_path: Path, damage, message):
    directory = auth.write_token_dir(tmp_path / "tokens", TOKENS, "reward")
    damage(directory)
    with pytest.raises(AuthError, match=message):
        Credentials.load(directory, "reward")


def test_no_token_is_in_any_roles_environment(minimal_job, tmp_path: Path):
    """Children inherit the environment: the math sandbox, vLLM's engine core. The tokens stay in files."""
    spec = parse_job(minimal_job).spec
    envs = local_environments("demo", spec, tmp_path / "run", tokens=TOKENS)
    for inst, env in envs.items():
        assert not any(token in value for value in env.values() for token in TOKENS.values()), inst
        ctx = RoleContext.from_env(env)
        assert set(ctx.credentials.tokens) == set(auth.held_by(inst.role))
    # Fail closed: without the directory the role does not start.
    env = dict(next(iter(envs.values())))
    env.pop("KUBEFORGE_TOKEN_DIR")
    with pytest.raises(RuntimeError, match="KUBEFORGE_TOKEN_DIR is not set"):
        RoleContext.from_env(env)


def _server(minimal_job, tmp_path: Path, role: str, **generator: object) -> TestClient:
    job = parse_job({**minimal_job, "spec": {**minimal_job["spec"], "roles": {"generator": generator}}})
    ctx = RoleContext(
        job="demo", namespace="team", role=role, replica=0, spec=job.spec, run_dir=tmp_path,
        credentials=Credentials.issue(role, TOKENS), http_host="127.0.0.1", http_port=0, weight_sync_addr="",
    )  # fmt: skip
    server = RoleServer(ctx)
    for method, path in [("POST", "/train"), ("GET", "/weights/names"), ("POST", "/weights/update"),
                         ("POST", "/v1/completions"), ("POST", "/generate")]:  # fmt: skip
        server.app.add_api_route(path, lambda: {"ran": True}, methods=[method])
    return TestClient(server.app)


@pytest.mark.parametrize(
    ("role", "method", "path", "token", "status"),
    [
        ("trainer", "POST", "/train", TOKENS["controller"], 200),
        ("trainer", "POST", "/train", TOKENS["job"], 401),  # any pod of the job: not enough to drive the trainer
        ("trainer", "POST", "/train", TOKENS["trainer"], 401),
        ("trainer", "POST", "/train", None, 401),
        ("trainer", "POST", "/train", "c" * 63, 401),
        ("trainer", "GET", "/weights/names", TOKENS["job"], 200),
        ("generator", "POST", "/generate", TOKENS["trainer"], 200),  # the job's routes: any of its tokens
        ("generator", "POST", "/generate", TOKENS["controller"], 200),
        ("trainer", "GET", "/healthz", None, 200),
        ("trainer", "GET", "/metrics", None, 200),
        ("generator", "POST", "/weights/update", TOKENS["trainer"], 200),
        ("generator", "POST", "/weights/update", TOKENS["job"], 401),  # weights only from the trainer
        ("generator", "POST", "/weights/update", TOKENS["controller"], 401),
        ("generator", "POST", "/generate", TOKENS["job"], 200),
        ("generator", "POST", "/generate", None, 401),
        ("generator", "POST", "/v1/completions", None, 401),
    ],
)
def test_the_role_server_checks_every_route(minimal_job, tmp_path, role, method, path, token, status):
    client = _server(minimal_job, tmp_path, role)
    headers = bearer(token) if token else {}
    answer = client.request(method, path, headers=headers, content=b"x" * 100)
    assert answer.status_code == status, answer.text
    if status == 401:
        assert "needs the " in answer.json()["detail"] and path in answer.json()["detail"]


def test_the_openai_routes_without_a_token_when_the_spec_opens_them(minimal_job, tmp_path):
    client = _server(minimal_job, tmp_path, "generator", openaiWithoutToken=True)
    assert client.post("/v1/completions").status_code == 200
    assert client.post("/generate").status_code == 401
    assert client.post("/weights/update").status_code == 401


def test_a_publish_goes_only_to_the_jobs_generators():
    job = ["http://g-0.svc:8000", "http://g-1.svc:8000"]
    assert publish_targets(None, job) == job
    assert publish_targets(["http://g-1.svc:8000/"], job) == ["http://g-1.svc:8000/"]
    with pytest.raises(HTTPException, match=r"http://evil:80 not among the job's generators"):
        publish_targets(["http://g-0.svc:8000", "http://evil:80"], job)
    with pytest.raises(HTTPException, match="a list of the job's generator URLs"):
        publish_targets("http://g-0.svc:8000", job)
    with pytest.raises(HTTPException, match="the job has none"):
        publish_targets(None, [])


def test_an_export_writes_only_under_the_run_or_checkpoint_directory(tmp_path: Path):
    run, checkpoints = tmp_path / "run", tmp_path / "ckpt"
    assert export_dir("exports/v3", run, checkpoints) == (run / "exports" / "v3").resolve()
    assert export_dir(str(checkpoints / "hf" / "step-4"), run, checkpoints) == (checkpoints / "hf" / "step-4").resolve()
    for outside in ["/etc/kubeforge", "../elsewhere", str(run / ".." / "x"), str(tmp_path)]:
        with pytest.raises(HTTPException, match="is outside the run directory"):
            export_dir(outside, run, checkpoints)
