"""The episode ledger: where every sampled completion is, so that none is lost or counted twice.

An episode is one completion of one prompt: prompt `position` in the data stream, `sample`
index within its group. It moves forward through

    in_flight -> scored -> buffered -> trained
                                    \\-> dropped_stale      (older than maxStaleness allows)
                                    \\-> filtered           (its group has no signal: dynamic sampling)
    any non-final state -> failed                       (generation or scoring gave up)

and never backwards: a retried generation keeps its episode in flight, it does not open a new
one. The ledger is saved with each checkpoint and restored on resume; episodes not yet final at
that moment are left out of it (`to_json(final_only=True)`) and their prompts generated again,
so a restart neither loses nor duplicates an episode.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import Any


class State(StrEnum):
    IN_FLIGHT = "in_flight"
    SCORED = "scored"
    BUFFERED = "buffered"
    TRAINED = "trained"
    DROPPED_STALE = "dropped_stale"
    FILTERED = "filtered"
    FAILED = "failed"


FINAL = frozenset({State.TRAINED, State.DROPPED_STALE, State.FILTERED, State.FAILED})
_NEXT = {
    State.IN_FLIGHT: {State.SCORED, State.FAILED},
    State.SCORED: {State.BUFFERED, State.FAILED},
    State.BUFFERED: {State.TRAINED, State.DROPPED_STALE, State.FILTERED, State.FAILED},
}

EpisodeId = tuple[int, int]  # (prompt position, sample index)


class LedgerError(RuntimeError):
    """An episode was opened twice, or moved in a way its state does not allow: a bookkeeping bug."""


class Ledger:
    def __init__(self) -> None:
        self._state: dict[EpisodeId, State] = {}
        self._version: dict[EpisodeId, int] = {}

    # -- transitions --------------------------------------------------------------------------

    def open(self, position: int, samples: int) -> list[EpisodeId]:
        """Open `samples` episodes of the prompt at `position`, in flight."""
        ids = [(position, s) for s in range(samples)]
        for episode in ids:
            if episode in self._state:
                raise LedgerError(f"episode {episode} opened twice (it is {self._state[episode]})")
            self._state[episode] = State.IN_FLIGHT
        return ids

    def move(self, ids: Iterable[EpisodeId], state: State, *, versions: Sequence[int] | None = None) -> None:
        """Move `ids` to `state`; `versions` records the policy version that sampled each."""
        ids = list(ids)
        for episode in ids:
            current = self._state.get(episode)
            if current is None:
                raise LedgerError(f"episode {episode} was never opened")
            if state not in _NEXT.get(current, set()):
                raise LedgerError(f"episode {episode}: {current} -> {state} is not allowed")
        for i, episode in enumerate(ids):
            self._state[episode] = state
            if versions is not None:
                self._version[episode] = int(versions[i])

    # -- reading ------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Episodes in each state (every state listed, zeros included)."""
        found = Counter(self._state.values())
        return {state.value: found.get(state, 0) for state in State}

    def state(self, episode: EpisodeId) -> State | None:
        return self._state.get(episode)

    def version(self, episode: EpisodeId) -> int | None:
        return self._version.get(episode)

    def positions(self) -> dict[int, int]:
        """Episodes per prompt position."""
        return dict(sorted(Counter(position for position, _ in self._state).items()))

    def __len__(self) -> int:
        return len(self._state)

    # -- persistence --------------------------------------------------------------------------

    def to_json(self, *, final_only: bool = False) -> dict[str, Any]:
        """Compact JSON: runs of consecutive prompt positions whose samples 0..n-1 all share a state
        and a policy version, as [first position, last position, n, state, version or -1]. A run is
        typically one step's batch, so the size grows with steps, not with episodes.

        `final_only` leaves out episodes not yet final, which a resume generates again: the form a
        checkpoint saves."""
        kept = sorted((e, state) for e, state in self._state.items() if not final_only or state in FINAL)
        by_position: dict[int, list[tuple[int, State, int]]] = {}
        for (p, s), state in kept:
            by_position.setdefault(p, []).append((s, state, self._version.get((p, s), -1)))
        runs: list[list[Any]] = []
        for p, samples in by_position.items():
            if [s for s, _, _ in samples] == list(range(len(samples))) and len({x[1:] for x in samples}) == 1:
                n, (_, state, version) = len(samples), samples[0]
                last = runs[-1] if runs else None
                if last and last[1] == p - 1 and last[2:] == [n, state.value, version]:
                    last[1] = p
                    continue
                runs.append([p, p, n, state.value, version])
            else:  # a position whose samples differ: one run per sample, as [p, p, -s - 1, ...]
                runs += [[p, p, -s - 1, state.value, version] for s, state, version in samples]
        found = Counter(state for _, state in kept)
        return {"runs": runs, "counts": {state.value: found.get(state, 0) for state in State}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ledger:
        ledger = cls()
        for first, last, n, state, version in data.get("runs", []):
            samples = range(n) if n > 0 else [-n - 1]
            for episode in ((p, s) for p in range(int(first), int(last) + 1) for s in samples):
                if episode in ledger._state:
                    raise LedgerError(f"saved ledger lists episode {episode} twice")
                ledger._state[episode] = State(state)
                if version >= 0:
                    ledger._version[episode] = int(version)
        return ledger

    def episodes(self) -> list[tuple[int, int, State, int | None]]:
        """Every episode as (position, sample, state, policy version), in order."""
        return [(p, s, state, self._version.get((p, s))) for (p, s), state in sorted(self._state.items())]

    def exactness_problems(self, positions: int, group: int) -> list[str]:
        """What keeps this ledger from being exact for a finished run over stream positions
        0..positions-1 with `group` samples each: every episode there once and trained, none
        else. Empty when exact (an episode listed twice is refused already by from_json)."""
        want = {(p, s) for p in range(positions) for s in range(group)}
        have = set(self._state)
        problems = []
        if missing := sorted(want - have):
            problems.append(f"{len(missing)} episode(s) missing, first {missing[0]}")
        if extra := sorted(have - want):
            problems.append(f"{len(extra)} episode(s) beyond the run, first {extra[0]}")
        if untrained := sorted(e for e in want & have if self._state[e] is not State.TRAINED):
            e = untrained[0]
            problems.append(f"{len(untrained)} episode(s) not trained, first {e} ({self._state[e].value})")
        return problems
