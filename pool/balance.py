"""How a read picks among the replicas that are up.

A balancer returns the index of the preferred candidate; the pool tries the others in order
after it when the preferred one has no free connection and no room for a new one.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from .endpoint import Endpoint

Balancer = Callable[[Sequence[Endpoint]], int]


class RoundRobin:
    """Each read goes to the next replica in turn: even load, no state to inspect."""

    __slots__ = ("next",)

    def __init__(self) -> None:
        self.next = 0  # process mode's fast path reads and advances it inline (modes.py)

    def __call__(self, candidates: Sequence[Endpoint]) -> int:
        i = self.next
        self.next = i + 1
        return i % len(candidates)


def pick_random(candidates: Sequence[Endpoint]) -> int:
    """A uniformly random replica: no shared counter, good across many processes."""
    return random.randrange(len(candidates))


class LeastBusy:
    """The replica with the fewest connections in use; ties go round-robin.

    Adapts to replicas of unequal speed: a slow one holds its connections longer.
    """

    __slots__ = ("_tie",)

    def __init__(self) -> None:
        self._tie = RoundRobin()

    def __call__(self, candidates: Sequence[Endpoint]) -> int:
        n = len(candidates)
        start = self._tie(candidates)
        best, best_busy = start, candidates[start].in_use
        for k in range(1, n):
            i = (start + k) % n
            busy = candidates[i].in_use
            if busy < best_busy:
                best, best_busy = i, busy
        return best


def make_balancer(policy: str) -> Balancer:
    if policy == "round_robin":
        return RoundRobin()
    if policy == "random":
        return pick_random
    if policy == "least_busy":
        return LeastBusy()
    raise ValueError(f"unknown balance policy {policy!r}")
