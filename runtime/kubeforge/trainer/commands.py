"""How the trainer's ranks move in lockstep: rank 0 broadcasts each command, then every rank runs it.

Only global rank 0 hears the controller; a train step, a checkpoint or a weight gather is a
collective, so the other ranks must enter it too, in the same order. They sit in `receive`
until rank 0 says what comes next. The commands travel over a gloo group of their own (CPU
bytes on every backend) whose timeout is long: ranks may wait there for hours between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Between two commands the followers wait as long as the controller takes (rollouts, evaluation).
IDLE_TIMEOUT = timedelta(days=7)

STOP = "stop"


@dataclass
class Command:
    name: str
    args: dict[str, Any] = field(default_factory=dict)  # small, JSON-like
    payload: bytes = b""  # bulk data, e.g. an encoded batch


class CommandChannel:
    """Rank 0 sends, every other rank receives. Create it on every rank (it creates a group)."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)

    def send(self, command: Command) -> None:
        header = [(command.name, command.args, len(command.payload))]
        dist.broadcast_object_list(header, src=0, group=self.group)
        if command.payload:
            data = torch.frombuffer(bytearray(command.payload), dtype=torch.uint8)
            dist.broadcast(data, src=0, group=self.group)

    def receive(self) -> Command:
        header: list[Any] = [None]
        dist.broadcast_object_list(header, src=0, group=self.group)
        name, args, size = header[0]
        payload = b""
        if size:
            data = torch.empty(size, dtype=torch.uint8)
            dist.broadcast(data, src=0, group=self.group)
            payload = data.numpy().tobytes()
        return Command(name, args, payload)
