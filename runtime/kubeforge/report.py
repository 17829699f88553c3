"""`kubeforge report RUN_DIR`: one PNG page of a run's metrics.jsonl, and the reward curve apps draw.

The controller app writes one JSON object per line to RUN_DIR/metrics.jsonl: training rows (those
with `reward_mean`: per-stage seconds, staleness, weight-sync seconds) and held-out rows (those with
`eval_reward`). Keys come and go between apps and versions, so every panel draws what the rows have
and says "no data" otherwise. Figures are drawn through `matplotlib.figure.Figure` (the Agg canvas),
never pyplot: no global backend switch and no figure registry inside a long-lived role process.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.png"
# The stages of one step, in the order they run; stacked bottom to top.
STAGES = (
    ("generate_seconds", "generate"),
    ("reward_seconds", "reward"),
    ("train_seconds", "train"),
    ("sync_seconds", "weight sync"),
)
PAGE_INCHES, PAGE_DPI = (12.0, 8.0), 100

Row = Mapping[str, Any]


class ReportError(ValueError):
    """A run directory or metrics file that cannot be reported on; the message says what to do."""


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of RUN_DIR/metrics.jsonl, in file order."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(
            f"{run_dir}: no such run directory; give the directory `kubeforge run` wrote "
            "(default runs/<job name>, or its --run-dir)"
        )
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ReportError(
            f"{path}: not found; the controller app writes it from the first step on: "
            "check that this is a run directory and that the job got past start-up (see its logs/)"
        )
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{number}: not a JSON object ({e.msg}); fix or delete that line") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ReportError(f"{path}:{number}: expected a JSON object with an integer 'step'; got {line[:80]!r}")
        rows.append(row)
    if not rows:
        raise ReportError(f"{path}: empty, no step recorded yet; report again once the job has logged a step")
    return rows


def _no_data(ax: Axes, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _series(rows: Sequence[Row], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of the rows that carry a number under `key`."""
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
    return [s for s, _ in points], [float(v) for _, v in points]


def _reward_panel(ax: Axes, rows: Sequence[Row]) -> None:
    train, evals = _series(rows, "reward_mean"), _series(rows, "eval_reward")
    if not train[0] and not evals[0]:
        return _no_data(ax, "reward")
    if train[0]:
        ax.plot(*train, label="train reward")
    if evals[0]:
        ax.plot(*evals, "o-", label="held-out reward")
    ax.set_title("reward")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.legend()


def _step_time_panel(ax: Axes, rows: Sequence[Row]) -> None:
    present = [(key, label) for key, label in STAGES if any(key in r for r in rows)]
    train = [r for r in rows if any(key in r for key, _ in present)]
    if not train:
        return _no_data(ax, "step time")
    steps = [r["step"] for r in train]
    # A stage missing from one row took no measured time in it: 0 keeps the stack aligned.
    seconds = [[float(r.get(key) or 0.0) for r in train] for key, _ in present]
    ax.stackplot(steps, *seconds, labels=[label for _, label in present])
    ax.set_title("step time by stage")
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    # Headroom above the tallest step for the legend, so that it hides no data.
    ax.set_ylim(0, 1.3 * max(map(sum, zip(*seconds, strict=True))) or 1.0)
    ax.legend(loc="upper center", ncols=len(present))


def _staleness_panel(ax: Axes, rows: Sequence[Row]) -> None:
    staleness = _series(rows, "staleness_max")
    if not staleness[0]:
        return _no_data(ax, "staleness")
    ax.step(*staleness, where="mid", label="oldest sample (versions behind)")
    dropped = sum(int(r.get("dropped_stale") or 0) for r in rows)
    ax.set_title(f"staleness ({dropped} samples dropped as too old)")
    ax.set_xlabel("step")
    ax.set_ylabel("policy versions")
    ax.legend(loc="upper left")


def _sync_panel(ax: Axes, rows: Sequence[Row]) -> None:
    sync = _series(rows, "sync_seconds")
    if not sync[0]:
        return _no_data(ax, "weight sync")
    ax.plot(*sync, ".-")
    ax.set_title("weight sync (trainer to generators)")
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)


def render(rows: Sequence[Row], title: str = "") -> Figure:
    """The report page: reward, step time by stage, staleness, weight-sync seconds."""
    fig = Figure(figsize=PAGE_INCHES, dpi=PAGE_DPI, layout="constrained")
    reward, stages, staleness, sync = fig.subplots(2, 2).flat
    _reward_panel(reward, rows)
    _step_time_panel(stages, rows)
    _staleness_panel(staleness, rows)
    _sync_panel(sync, rows)
    if title:
        fig.suptitle(title)
    return fig


def report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render RUN_DIR/metrics.jsonl into one PNG (default RUN_DIR/report.png); the path written."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    out = Path(out) if out else run_dir / REPORT_FILE
    if not out.parent.is_dir():
        raise ReportError(f"{out.parent}: no such directory for the report; create it or choose another -o")
    trained = [r for r in rows if "reward_mean" in r]
    title = f"{run_dir.resolve().name}: {len(trained)} training steps"
    if trained:
        title += f", last train reward {trained[-1]['reward_mean']:.3f}"
    render(rows, title).savefig(out, format="png")
    return out


def plot_reward_curve(history: Sequence[Row], path: str | Path) -> Path:
    """The reward curve an app writes at the end of a run: train and held-out reward against step.

    `history` holds the app's metrics rows (the lines of metrics.jsonl, as dicts).
    """
    fig = Figure(figsize=(6, 4), dpi=PAGE_DPI, layout="constrained")
    _reward_panel(fig.subplots(), history)
    path = Path(path)
    fig.savefig(path, format="png")
    log.info("reward curve in %s", path)
    return path
