"""kubeforge_operator.startup: when the startup clock runs, and when it fails the job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from kubeforge_operator import startup

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# (case, since (s after T0) or None, deadline, all ready, queued, now (s), expected since or None, expired)
CASES = [
    ("a start begins the clock", None, 60, False, False, 5, 5, False),
    ("within the deadline", 0, 60, False, False, 60, 0, False),
    ("past the deadline", 0, 60, False, False, 61, 0, True),
    ("every pod ready stops it", 0, 60, True, False, 500, None, False),
    ("ready late still counts as ready", 0, 60, True, False, 61, None, False),
    ("queued at a scheduling gate: not running", 0, 60, False, True, 500, None, False),
    ("no deadline: the clock runs, never expires", 0, None, False, False, 10**6, 0, False),
]


@pytest.mark.parametrize(
    ("since", "deadline", "all_ready", "queued", "now", "want_since", "expired"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_tick(
    since: float | None,
    deadline: int | None,
    all_ready: bool,
    queued: bool,
    now: float,
    want_since: float | None,
    expired: bool,
) -> None:
    clock = startup.tick(
        None if since is None else at(since), deadline, all_ready=all_ready, queued=queued, now=at(now)
    )
    assert clock == startup.Clock(None if want_since is None else at(want_since), expired)


def test_explain_names_each_pod_that_is_not_ready_and_why() -> None:
    message = startup.explain(
        600, 4, 6, [("grpo-generator-0", "ImagePullBackOff (image x:1): back-off"), ("grpo-trainer-1", "Pending")]
    )
    assert message == (
        "startupDeadlineSeconds (600 s) passed with 4 of 6 pods ready; "
        "not ready: grpo-generator-0 (ImagePullBackOff (image x:1): back-off); grpo-trainer-1 (Pending)"
    )
    many = startup.explain(60, 0, 9, [(f"grpo-generator-{i}", "") for i in range(9)])
    assert many.endswith("grpo-generator-3; and 5 more")
