"""Which node is the primary now, and which nodes must be rewound before they may start.

The state is a directory of tiny files, the same layout for both stacks, so that the Docker
entrypoint (POSIX sh, no JSON parser in the image) reads it with `cat` and `[ -e ]`:

    <dir>/primary          one line: the current primary's node name. Missing: INITIAL_PRIMARY.
    <dir>/rewind-<node>    present while <node> is fenced: it was a primary (or diverged from the
                           primary's timeline) and must go through pg_rewind before it may start,
                           and then only as a replica. Removed once it has been rewound.

Where it lives: the native stack keeps it in <basedir>/topology/; the Docker stack in the
`topology` named volume, mounted at /var/lib/stack in every database container. Either way it is
deleted together with the data (`make clean`), so a fresh stack always starts in the initial
topology. One file per fact and one writer per file at a time (an entrypoint only ever removes
its own rewind-<node>), so no locking is needed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterable, Mapping

NODES = ("primary", "replica1", "replica2")
INITIAL_PRIMARY = NODES[0]
PRIMARY_FILE = "primary"
REWIND_PREFIX = "rewind-"


@dataclasses.dataclass(frozen=True)
class Topology:
    primary: str = INITIAL_PRIMARY
    rewind: frozenset = frozenset()  # fenced nodes: pg_rewind before they may start

    @property
    def initial(self) -> bool:
        return self.primary == INITIAL_PRIMARY and not self.rewind

    @property
    def standbys(self) -> tuple[str, ...]:
        """Every node that is not the primary, in NODES order (fenced ones included)."""
        return tuple(n for n in NODES if n != self.primary)

    @classmethod
    def from_files(cls, files: Mapping[str, str] | Iterable[str]) -> "Topology":
        """From {file name: content} (or just names) of a state directory."""
        names = dict(files) if isinstance(files, Mapping) else dict.fromkeys(files, "")
        primary = (names.get(PRIMARY_FILE) or "").strip() or INITIAL_PRIMARY
        if primary not in NODES:
            raise ValueError(f"topology state names an unknown primary {primary!r}")
        rewind = frozenset(n[len(REWIND_PREFIX):] for n in names if n.startswith(REWIND_PREFIX)
                           and n[len(REWIND_PREFIX):] in NODES)
        return cls(primary, rewind)

    def describe(self) -> str:
        text = f"primary={self.primary}"
        if self.rewind:
            text += f", fenced (must rejoin): {' '.join(sorted(self.rewind))}"
        return text


class StateDir:
    """The state directory on this machine (the native stack's)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def read(self) -> Topology:
        if not self.path.is_dir():
            return Topology()
        files = {}
        for entry in self.path.iterdir():
            if entry.name == PRIMARY_FILE:
                files[entry.name] = entry.read_text()
            elif entry.name.startswith(REWIND_PREFIX):
                files[entry.name] = ""
        return Topology.from_files(files)

    def set_primary(self, node: str) -> None:
        _check(node)
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{PRIMARY_FILE}.{os.getpid()}"
        tmp.write_text(node + "\n")
        tmp.replace(self.path / PRIMARY_FILE)  # atomic: a reader sees the old or the new name

    def set_rewind(self, node: str, needed: bool) -> None:
        _check(node)
        mark = self.path / f"{REWIND_PREFIX}{node}"
        if needed:
            self.path.mkdir(parents=True, exist_ok=True)
            mark.touch()
        else:
            mark.unlink(missing_ok=True)


def _check(node: str) -> None:
    if node not in NODES:
        raise ValueError(f"unknown node {node!r}: use one of {', '.join(NODES)}")
