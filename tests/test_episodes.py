"""The episode ledger: every completion accounted for once, across checkpoints and resumes."""

from __future__ import annotations

import pytest
from kubeforge.episodes import Ledger, LedgerError, State


def test_episodes_move_forward_and_are_counted_once():
    ledger = Ledger()
    ids = ledger.open(0, 3)
    assert ids == [(0, 0), (0, 1), (0, 2)]
    ledger.move(ids, State.SCORED, versions=[4, 4, 5])
    ledger.move(ids, State.BUFFERED)
    ledger.move(ids[:2], State.TRAINED)
    ledger.move(ids[2:], State.DROPPED_STALE)
    counts = ledger.counts()
    assert counts == {
        "in_flight": 0,
        "scored": 0,
        "buffered": 0,
        "trained": 2,
        "dropped_stale": 1,
        "filtered": 0,
        "failed": 0,
    }
    assert ledger.version((0, 2)) == 5


def test_an_episode_cannot_be_opened_twice_or_go_back():
    ledger = Ledger()
    ids = ledger.open(7, 2)
    with pytest.raises(LedgerError, match=r"episode \(7, 0\) opened twice"):
        ledger.open(7, 1)
    with pytest.raises(LedgerError, match="in_flight -> trained is not allowed"):
        ledger.move(ids, State.TRAINED)
    ledger.move(ids, State.SCORED, versions=[1, 1])
    with pytest.raises(LedgerError, match="scored -> in_flight"):
        ledger.move(ids, State.IN_FLIGHT)
    with pytest.raises(LedgerError, match="never opened"):
        ledger.move([(8, 0)], State.SCORED)
    assert ledger.state(ids[0]) == State.SCORED  # a refused move changes nothing


def test_a_refused_move_leaves_every_episode_where_it_was():
    ledger = Ledger()
    done, fresh = ledger.open(0, 1), ledger.open(1, 1)
    ledger.move(done, State.SCORED, versions=[0])
    with pytest.raises(LedgerError):
        ledger.move(fresh + done, State.SCORED, versions=[0, 0])  # `done` is already scored
    assert ledger.state(fresh[0]) == State.IN_FLIGHT


def test_a_checkpoint_keeps_only_final_episodes_so_a_resume_generates_the_rest_again():
    ledger = Ledger()
    trained = ledger.open(0, 2)
    ledger.move(trained, State.SCORED, versions=[0, 0])
    ledger.move(trained, State.BUFFERED)
    ledger.move(trained, State.TRAINED)
    buffered = ledger.open(1, 2)
    ledger.move(buffered, State.SCORED, versions=[1, 1])
    ledger.move(buffered, State.BUFFERED)
    ledger.open(2, 2)
    resumed = Ledger.from_json(ledger.to_json(final_only=True))
    assert len(resumed) == 2 and resumed.counts()["trained"] == 2
    resumed.open(1, 2)  # generated again after a resume: no longer a duplicate
    resumed.open(2, 2)
    with pytest.raises(LedgerError, match="opened twice"):
        resumed.open(0, 2)  # trained before the checkpoint: never again


def test_the_ledger_survives_a_json_round_trip():
    ledger = Ledger()
    ids = ledger.open(3, 2)
    ledger.move(ids, State.SCORED, versions=[9, 10])
    restored = Ledger.from_json(ledger.to_json())
    assert restored.counts() == ledger.counts() and restored.version((3, 1)) == 10
    assert restored.positions() == {3: 2}
    with pytest.raises(LedgerError, match="twice"):
        Ledger.from_json({"runs": [[0, 1, 2, "trained", 1], [1, 1, -1, "trained", 1]]})


def test_the_saved_form_grows_with_batches_not_with_episodes():
    ledger = Ledger()
    for step in range(100):  # 100 steps of 16 prompts x 8 samples, each step one policy version
        ids = [e for p in range(16 * step, 16 * step + 16) for e in ledger.open(p, 8)]
        ledger.move(ids, State.SCORED, versions=[step] * len(ids))
        ledger.move(ids, State.BUFFERED)
        ledger.move(ids, State.TRAINED)
    odd = ledger.open(1600, 3)  # a batch still in flight, one sample already scored
    ledger.move(odd[:1], State.SCORED, versions=[100])
    saved = ledger.to_json()
    assert len(saved["runs"]) == 100 + 3
    restored = Ledger.from_json(saved)
    assert restored.episodes() == ledger.episodes() and len(restored) == 12_803
