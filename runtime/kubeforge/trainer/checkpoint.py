"""Checkpoints on disk: all or nothing.

A checkpoint is a directory `step-N` holding

- DCP's files (`.metadata` and one `__R_0.distcp` per rank), written by `dcp.save` on every rank;
- `trainer_totals.json`, the trainer's running totals;
- the controller's app state (`app_state.json`, or `app_state.K.json` after the same step was
  saved again with a new app state), if the controller gave one;
- `COMPLETE`, written last by rank 0: JSON naming every other part with its size in bytes.

Every small part is written to a temporary file, fsynced, and renamed into place; the DCP files
are fsynced too, then the directory. Only then is `COMPLETE` written the same way. A checkpoint
counts only when `COMPLETE` is there and every part it names has the size it says: a save that
crashed part-way, or a part truncated since, makes the checkpoint incomplete, and resume takes
the newest complete one instead (`scan` says which it skipped, and why).

Saving the same step again (the controller's final /checkpoint right after an interval one) never
rewrites a part of the complete checkpoint in place: the new app state goes to a new file and a
new `COMPLETE` (renamed over the old) switches to it; a crash before that leaves the old one whole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger("kubeforge.trainer")

CHECKPOINT_PREFIX = "step-"
MARKER = "COMPLETE"  # written last: the checkpoint's parts and their sizes
APP_STATE_FILE = "app_state.json"  # the controller's own state (data position, ...), saved with the checkpoint
TOTALS_FILE = "trainer_totals.json"  # the trainer's running totals (rows by staleness), saved with the checkpoint
TMP_SUFFIX = ".tmp"


def step_of(path: Path) -> int | None:
    """N of a `step-N` directory; None for anything else."""
    suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a temporary file, fsynced, renamed over it, the directory fsynced."""
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_marker(path: Path) -> dict[str, Any]:
    """The checkpoint's COMPLETE marker; ValueError says why there is no usable one."""
    marker = path / MARKER
    if not marker.exists():
        raise ValueError(f"no {MARKER} marker: the save did not finish")
    try:
        content = json.loads(marker.read_text())
        parts = content["parts"]
        if not isinstance(parts, dict) or not all(isinstance(v, int) for v in parts.values()):
            raise TypeError("parts is not a map of name to size")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{MARKER} is unreadable ({type(e).__name__}: {e})") from None
    return content


def check(path: Path) -> str | None:
    """None if the checkpoint at `path` is complete, else why not."""
    try:
        content = read_marker(path)
    except ValueError as e:
        return str(e)
    for name, size in sorted(content["parts"].items()):
        part = path / name
        if not part.is_file():
            return f"part {name} is missing"
        actual = part.stat().st_size
        if actual != size:
            return f"part {name} is {actual} bytes, {MARKER} says {size} (truncated or rewritten)"
    if ".metadata" not in content["parts"]:
        return f"{MARKER} names no DCP .metadata"
    return None


def scan(directory: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(complete checkpoints oldest first, [(incomplete checkpoint, why)] oldest first)."""
    found = sorted((p for p in directory.glob(f"{CHECKPOINT_PREFIX}*") if step_of(p) is not None), key=step_of)
    complete, skipped = [], []
    for path in found:
        reason = check(path)
        if reason is None:
            complete.append(path)
        else:
            skipped.append((path, reason))
    return complete, skipped


def completed_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints whose every part is durable (see `check`), oldest first."""
    return scan(directory)[0]


def newest(directory: Path) -> Path | None:
    """The newest complete checkpoint, logging each newer one skipped and why."""
    complete, skipped = scan(directory)
    chosen = complete[-1] if complete else None
    for path, reason in skipped:
        if chosen is None or step_of(path) > step_of(chosen):
            log.warning("checkpoint %s skipped: %s", path, reason)
    if chosen is not None:
        log.info("newest complete checkpoint: %s", chosen)
    return chosen


def app_state_file(path: Path) -> Path | None:
    """The app state file of a complete checkpoint, if it has one."""
    try:
        name = read_marker(path).get("app_state")
    except ValueError:
        return None
    return path / name if name else None


def commit(path: Path, *, totals: dict[str, Any], app_state: dict[str, Any] | None) -> None:
    """Rank 0, once every rank's DCP files are written: the small parts, then COMPLETE, last.

    If `path` is already complete (the same step saved again), its DCP files stay; the app state,
    if given, goes to a new file, and the new COMPLETE switches to it.
    """
    try:
        previous = read_marker(path)
    except ValueError:
        previous = None
    if previous is not None:
        parts = dict(previous["parts"])
        old_app = previous.get("app_state")
    else:
        # The first commit: every file DCP wrote (already fsynced by DCP; again here, cheaply).
        parts, old_app = {}, None
        for item in sorted(path.iterdir()):
            if item.is_file() and item.name != MARKER and not item.name.endswith(TMP_SUFFIX):
                fsync_file(item)
                parts[item.name] = item.stat().st_size
    data = json.dumps({"staleness": totals}).encode()
    write_atomic(path / TOTALS_FILE, data)
    parts[TOTALS_FILE] = len(data)
    app_name = old_app
    if app_state is not None:
        app_name = _next_app_state_name(path, old_app)
        data = json.dumps(app_state).encode()
        write_atomic(path / app_name, data)
        parts.pop(old_app, None)
        parts[app_name] = len(data)
    marker = {"step": step_of(path), "parts": parts, "app_state": app_name}
    write_atomic(path / MARKER, json.dumps(marker, indent=1, sort_keys=True).encode())
    fsync_dir(path.parent)  # the step-N entry itself
    if old_app and old_app != app_name:
        (path / old_app).unlink(missing_ok=True)


def _next_app_state_name(path: Path, current: str | None) -> str:
    if current is None and not (path / APP_STATE_FILE).exists():
        return APP_STATE_FILE
    k = 1
    while (path / f"app_state.{k}.json").exists() or f"app_state.{k}.json" == current:
        k += 1
    return f"app_state.{k}.json"


def remove(path: Path) -> None:
    """Delete a checkpoint, its marker first: a crash part-way leaves an incomplete one, never a broken complete one."""
    try:
        (path / MARKER).unlink(missing_ok=True)
        fsync_dir(path)
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def prune(directory: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and incomplete ones older than the newest."""
    complete, skipped = scan(directory)
    if not complete:
        return
    newest_step = step_of(complete[-1])
    for old in complete[:-keep] if keep > 0 else []:
        remove(old)
    for path, _ in skipped:
        if step_of(path) < newest_step:
            remove(path)
