"""Checkpoints are all or nothing: a save that stops part-way, or a part truncated since, never counts.

Real DCP files (one process, no process group) and the trainer's own commit; the role test
(tests/test_trainer.py) covers the same code under torchrun.
"""

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from kubeforge.trainer import checkpoint as ckpt
from kubeforge.trainer.engine import completed_checkpoints


def dcp_save(directory: Path, step: int) -> Path:
    path = directory / f"step-{step}"
    state = {"model": {"w": torch.full((64,), float(step))}, "trainer": {"step": torch.tensor(step)}}
    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return path


def save(directory: Path, step: int, app_state=None) -> Path:
    """What Trainer.save_checkpoint does on a single rank."""
    path = dcp_save(directory, step)
    ckpt.commit(path, totals={"0": step}, app_state=app_state)
    return path


def test_dcp_metadata_alone_is_not_a_checkpoint(tmp_path, caplog):
    good = save(tmp_path, 2, {"position": 2})
    dcp_save(tmp_path, 4)  # the trainer died after DCP, before the totals, app state and marker
    assert (tmp_path / "step-4" / ".metadata").exists()
    assert completed_checkpoints(tmp_path) == [good]
    with caplog.at_level(logging.INFO, logger="kubeforge.trainer"):
        assert ckpt.newest(tmp_path) == good
    assert "step-4 skipped: no COMPLETE marker: the save did not finish" in caplog.text


@pytest.mark.parametrize("crash_at", [ckpt.TOTALS_FILE, ckpt.APP_STATE_FILE, ckpt.MARKER])
def test_a_crash_between_the_parts_leaves_the_previous_checkpoint(tmp_path, monkeypatch, crash_at):
    good = save(tmp_path, 2, {"position": 2})
    path = dcp_save(tmp_path, 4)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == crash_at:
            raise OSError("killed")  # the temporary file is written, the rename never happens
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(OSError):
        ckpt.commit(path, totals={"0": 4}, app_state={"position": 4})
    assert ckpt.newest(tmp_path) == good
    assert json.loads(ckpt.app_state_file(good).read_text()) == {"position": 2}
    assert dict(ckpt.scan(tmp_path)[1]) == {path: "no COMPLETE marker: the save did not finish"}


def test_saving_the_same_step_again_never_breaks_the_complete_one(tmp_path, monkeypatch):
    path = save(tmp_path, 2, {"position": 1})
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == ckpt.MARKER:
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(OSError):
        ckpt.commit(path, totals={"0": 2}, app_state={"position": 2})  # crashes before its marker
    assert ckpt.check(path) is None
    assert json.loads(ckpt.app_state_file(path).read_text()) == {"position": 1}
    assert json.loads((path / ckpt.APP_STATE_FILE).read_text()) == {"position": 1}  # never rewritten in place

    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    ckpt.commit(path, totals={"0": 2}, app_state={"position": 2})
    assert ckpt.check(path) is None
    assert json.loads(ckpt.app_state_file(path).read_text()) == {"position": 2}
    ckpt.commit(path, totals={"0": 2}, app_state=None)  # no app state: the last one stays
    assert json.loads(ckpt.app_state_file(path).read_text()) == {"position": 2}
    assert not [p.name for p in path.iterdir() if p.name.endswith(ckpt.TMP_SUFFIX)]


@pytest.mark.parametrize("part", [".metadata", "__0_0.distcp", ckpt.TOTALS_FILE, ckpt.APP_STATE_FILE])
def test_a_truncated_part_makes_the_checkpoint_incomplete(tmp_path, caplog, part):
    good = save(tmp_path, 2, {"position": 2})
    newer = save(tmp_path, 4, {"position": 4})
    size = (newer / part).stat().st_size
    os.truncate(newer / part, size // 2)
    assert completed_checkpoints(tmp_path) == [good]
    with caplog.at_level(logging.WARNING, logger="kubeforge.trainer"):
        assert ckpt.newest(tmp_path) == good
    assert f"step-4 skipped: part {part} is {size // 2} bytes, COMPLETE says {size}" in caplog.text


def test_a_missing_part_or_a_torn_marker_makes_it_incomplete(tmp_path):
    path = save(tmp_path, 2, {"position": 2})
    (path / ckpt.TOTALS_FILE).unlink()
    assert ckpt.check(path) == f"part {ckpt.TOTALS_FILE} is missing"
    path = save(tmp_path, 4)
    (path / ckpt.MARKER).write_text('{"parts": {".meta')
    assert ckpt.check(path).startswith("COMPLETE is unreadable")
    assert completed_checkpoints(tmp_path) == []


def test_pruning_keeps_the_newest_complete_and_drops_older_leftovers(tmp_path):
    save(tmp_path, 2)
    dcp_save(tmp_path, 3)  # a crashed save, older than the newest complete one
    save(tmp_path, 4)
    save(tmp_path, 6)
    dcp_save(tmp_path, 8)  # a save in progress (or crashed) after the newest: left alone
    ckpt.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4", "step-6", "step-8"]
    assert [p.name for p in completed_checkpoints(tmp_path)] == ["step-4", "step-6"]
