"""The operator's signing key, from which every job's tokens are derived (kubeforge.auth.derive_tokens).

Derived tokens are why the operator needs no permission to read Secrets, in any mode: it creates
each job's `<job>-token-<uid>` Secret and never reads one back. A controller's progress report is
checked against the token computed again from the job's uid.

The key is a file. The chart mounts a Secret of the release's namespace into every replica, so
every replica and every restart derives the same tokens. An operator run by hand (development,
tests) may name a file that does not exist yet: a new key is made there, readable by this user
only. Replacing the key stops the progress reports of the jobs already running; their pods keep
working, because they check one another against their own Secret.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from pathlib import Path

from kubeforge import auth

log = logging.getLogger("kubeforge_operator.signing")


def default_key_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "kubeforge" / "operator-token-key"


class SigningKeyError(RuntimeError):
    """The key file cannot be read or made, or is too short."""


class Signer:
    """Derives a job's tokens from its uid."""

    def __init__(self, key: bytes):
        if len(key) < auth.MIN_KEY_BYTES:
            raise SigningKeyError(
                f"the token signing key has {len(key)} bytes; it needs at least {auth.MIN_KEY_BYTES} "
                "(the chart makes one of 64; `openssl rand -hex 32` makes one too)"
            )
        self._key = key

    @classmethod
    def from_file(cls, path: Path) -> Signer:
        """The key in `path` (surrounding whitespace ignored); a new one, written there, if the file is absent."""
        try:
            return cls(path.read_bytes().strip())
        except FileNotFoundError:
            pass
        except OSError as e:
            raise SigningKeyError(f"cannot read the token signing key {path}: {e.strerror}") from None
        key = secrets.token_hex(32)
        # Written whole under another name, then linked into place: a second operator starting beside
        # this one sees either no key or all of it, and `link` fails if that one made its key first.
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
            with os.fdopen(fd, "w") as f:
                f.write(key)
            try:
                os.link(temp, path)
            finally:
                os.unlink(temp)
        except FileExistsError:
            return cls.from_file(path)
        except OSError as e:
            raise SigningKeyError(
                f"no token signing key at {path}, and none can be made there ({e.strerror}); mount one "
                "(the chart does: tokenKey in its values) and pass --token-key-file"
            ) from None
        log.warning("made a new token signing key at %s: jobs started under another key cannot report progress", path)
        return cls(key.encode())

    def tokens(self, job_uid: str) -> dict[str, str]:
        return auth.derive_tokens(self._key, job_uid)

    def token(self, job_uid: str, name: str) -> str:
        return self.tokens(job_uid)[name]
