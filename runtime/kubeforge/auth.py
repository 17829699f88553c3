"""Who may call what: the job's three tokens, the credential each route needs, and the check.

Each credential is a token made once per job: random, by the launcher; on Kubernetes derived by the
operator from its signing key and the RLJob's uid (`derive_tokens`), and kept in the job's
`<job>-token-<uid>` Secret. Derived tokens let the operator check a controller's progress report
without reading any Secret:

- `job`: every role holds it. Peers call each other's data routes with it: /generate and vLLM's
  /v1/*, /score, /logprobs, /weights/info, the trainer's /weights/names, the controller's /status.
- `controller`: only the controller holds it. It drives the trainer (/train, /evaluate,
  /checkpoint, /status with the episode ledger, /weights/export, /weights/publish) and reports
  progress to the operator.
- `trainer`: only the trainer holds it. It changes what a generator serves (/weights/init,
  /weights/update).

A role checks a caller against the SHA-256 digests of all three (`digests.json`), never against a
token it holds only to check: a generator broken into cannot drive the trainer or push weights.
Comparisons are constant-time. Tokens live in files under KUBEFORGE_TOKEN_DIR (a Secret volume on
Kubernetes, a private directory per role locally), never in the environment, so no child process
(vLLM's engine core, the math reward's sandbox) inherits one. A role without its tokens refuses to
start: auth never turns itself off.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

JOB, CONTROLLER, TRAINER = "job", "controller", "trainer"
CREDENTIALS = (JOB, CONTROLLER, TRAINER)
WHO = {JOB: "the job token", CONTROLLER: "the controller's token", TRAINER: "the trainer's token"}
DIGESTS_FILE = "digests.json"
# A signing key shorter than a token would be the weakest link.
MIN_KEY_BYTES = 32
# Health, readiness and metrics answer anyone who can reach the pod (kubelet probes, Prometheus).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

# The routes that need more than the job token, by role: (method, path) -> credential.
ROUTES: dict[str, dict[tuple[str, str], str]] = {
    "trainer": {
        ("POST", "/train"): CONTROLLER,
        ("POST", "/evaluate"): CONTROLLER,
        ("POST", "/checkpoint"): CONTROLLER,
        ("GET", "/status"): CONTROLLER,  # carries the episode ledger
        ("POST", "/weights/export"): CONTROLLER,
        ("POST", "/weights/publish"): CONTROLLER,
    },
    "generator": {
        ("POST", "/weights/init"): TRAINER,
        ("POST", "/weights/update"): TRAINER,
    },
}


class AuthError(RuntimeError):
    """A role cannot authenticate: its tokens are missing or unreadable."""


def held_by(role: str) -> tuple[str, ...]:
    """The tokens a role's process holds (it checks the others by digest only)."""
    return (JOB, role) if role in (CONTROLLER, TRAINER) else (JOB,)


def new_tokens() -> dict[str, str]:
    """A fresh token per credential (256 bits each)."""
    return {name: secrets.token_hex(32) for name in CREDENTIALS}


def derive_tokens(key: bytes, job_uid: str) -> dict[str, str]:
    """The tokens of the job with `job_uid`: HMAC-SHA256 under the operator's signing key. Only the
    key's holder can compute them, and it computes them again whenever it needs one: the operator
    never reads a Secret to check a token. A new uid (a job re-created under the same name) gets new
    tokens, and the old ones open nothing."""
    if len(key) < MIN_KEY_BYTES:
        raise AuthError(f"the signing key has {len(key)} bytes; it needs at least {MIN_KEY_BYTES}")
    return {
        name: hmac.new(key, f"kubeforge/{name}/{job_uid}".encode(), hashlib.sha256).hexdigest() for name in CREDENTIALS
    }


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def digests(tokens: dict[str, str]) -> dict[str, str]:
    return {name: digest(tokens[name]) for name in CREDENTIALS}


def required(role: str, method: str, path: str, *, open_openai: bool = False) -> str | None:
    """The credential a request needs; None for the open routes."""
    if path in OPEN_PATHS:
        return None
    if open_openai and role == "generator" and path.startswith("/v1/"):
        return None  # spec.roles.generator.openaiWithoutToken
    return ROUTES.get(role, {}).get((method, path), JOB)


def write_token_dir(directory: Path, tokens: dict[str, str], role: str) -> Path:
    """A role's token directory (the launcher's stand-in for a Secret volume): the tokens the role
    holds and the digests, each readable by this user only."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    files = {name: tokens[name] for name in held_by(role)}
    files[DIGESTS_FILE] = json.dumps(digests(tokens))
    for name, content in files.items():
        path = directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(content)
    return directory


@dataclass(frozen=True)
class Credentials:
    """The tokens a role holds and the digests it checks callers against."""

    tokens: dict[str, str]
    digests: dict[str, str]

    @classmethod
    def load(cls, directory: Path, role: str) -> Credentials:
        """Read a role's token directory; refuse, naming the file, when anything is missing."""

        def read(name: str) -> str:
            path = directory / name
            try:
                text = path.read_text().strip()
            except OSError as e:
                raise AuthError(
                    f"{role}: cannot read {path} ({e.strerror}); a role needs the job's tokens to start "
                    "(the launcher writes them, the operator mounts the job's <job>-token-<uid> Secret)"
                ) from None
            if not text:
                raise AuthError(f"{role}: {path} is empty; a role needs the job's tokens to start")
            return text

        try:
            checked = json.loads(read(DIGESTS_FILE))
        except ValueError:
            raise AuthError(f"{role}: {directory / DIGESTS_FILE} is not JSON") from None
        missing = [name for name in CREDENTIALS if not isinstance(checked.get(name), str)]
        if missing:
            raise AuthError(f"{role}: {directory / DIGESTS_FILE} lacks the digest of {', '.join(missing)}")
        held = {name: read(name) for name in held_by(role)}
        for name, token in held.items():
            if not hmac.compare_digest(digest(token), checked[name]):
                raise AuthError(f"{role}: {directory / name} does not match its digest in {DIGESTS_FILE}")
        return cls(tokens=held, digests={name: checked[name] for name in CREDENTIALS})

    @classmethod
    def issue(cls, role: str, tokens: dict[str, str] | None = None) -> Credentials:
        """In-memory credentials for `role` (tests and single-process tools)."""
        tokens = tokens or new_tokens()
        return cls(tokens={name: tokens[name] for name in held_by(role)}, digests=digests(tokens))

    def token(self, name: str = JOB) -> str:
        """A token this role holds, to present to a peer."""
        try:
            return self.tokens[name]
        except KeyError:
            raise AuthError(f"this role does not hold the {name} token") from None

    def accepts(self, name: str, presented: str) -> bool:
        """Whether `presented` opens a route that needs credential `name`. The job token's routes
        open to any of the job's tokens: the controller and the trainer are members of the job too
        (the trainer's sender reads /weights/info with its own token)."""
        wanted = digest(presented)
        names = CREDENTIALS if name == JOB else (name,)
        return any(hmac.compare_digest(wanted, self.digests[n]) for n in names)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class TokenAuth:
    """ASGI middleware: every request but the open routes presents the credential its route needs
    (`required`), or is answered 401 before its body is read."""

    def __init__(
        self,
        app: Callable,
        credentials: Credentials,
        role: str,
        open_openai: bool = False,
    ):
        self.app = app
        self.credentials = credentials
        self.role = role
        self.open_openai = open_openai

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        needed = required(self.role, scope["method"], scope["path"], open_openai=self.open_openai)
        if needed is None or self._presented(scope["headers"], needed):
            return await self.app(scope, receive, send)
        detail = f"{scope['method']} {scope['path']} on the {self.role} needs {WHO[needed]} (Authorization: Bearer ...)"
        body = json.dumps({"detail": detail}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
            (b"connection", b"close"),  # the body was not read: the connection cannot be reused
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _presented(self, headers: Iterable[tuple[bytes, bytes]], needed: str) -> bool:
        for key, value in headers:
            if key == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and self.credentials.accepts(needed, token.strip())
        return False
