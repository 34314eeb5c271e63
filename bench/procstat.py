"""CPU accounting from /proc for the scaling benchmarks: a process tree's CPU, the machine's.

Linux only; every function answers None (or an empty list) where /proc cannot tell. On a
2-core machine shared with the load generator, PostgreSQL and other people's test runs, the
CPU a process got says more about a figure than the figure alone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds the process has used so far (not its children)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def descendants(pid: int) -> list[int]:
    """Every live process below pid (children, grandchildren, ...)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def wait_for_children(pid: int, count: int, timeout: float = 60) -> list[int]:
    """Wait until pid has `count` child processes (uvicorn --workers N); return their pids."""
    deadline = time.monotonic() + timeout
    children: list[int] = []
    while time.monotonic() < deadline:
        children = [c for c in descendants(pid) if _parent(c) == pid]
        if len(children) >= count:
            return children
        time.sleep(0.1)
    raise RuntimeError(f"process {pid} has {len(children)} children after {timeout} s, not {count}")


def _parent(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


@dataclass(frozen=True)
class MachineCpu:
    """A snapshot of /proc/stat's `cpu` line: busy and total jiffies over all cores."""

    busy: int
    total: int

    @classmethod
    def now(cls) -> MachineCpu | None:
        try:
            line = Path("/proc/stat").read_text().splitlines()[0]
        except OSError:
            return None
        values = [int(v) for v in line.split()[1:]]
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        total = sum(values[:8])
        return cls(total - idle, total)

    def busy_since(self, earlier: MachineCpu | None) -> float | None:
        """Share of all cores busy (with anything, anyone's) between the two snapshots."""
        if earlier is None or self.total <= earlier.total:
            return None
        return (self.busy - earlier.busy) / (self.total - earlier.total)


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def postgres_pids(database: str) -> tuple[list[int], list[int]]:
    """PostgreSQL's processes on this machine: (backends serving `database`, its shared
    background processes: WAL writer, checkpointer, background writer, autovacuum, ...).

    Backends of other databases (other people's tests) are in neither list. A backend's
    process title is `postgres: [cluster: ]user database host(port) state`.
    """
    ours: list[int] = []
    shared: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        title = _cmdline(int(entry.name))
        if not title.startswith("postgres:"):
            continue
        words = title.split()
        client = [i for i, w in enumerate(words) if "(" in w or w == "[local]"]
        if not client:
            shared.append(int(entry.name))
        elif words[client[0] - 1] == database:  # the word before the client's address
            ours.append(int(entry.name))
    return ours, shared


class CpuWatch:
    """CPU per group of processes between start() and stop(), in cores, with the machine's.

    Groups are named functions listing pids, asked at both ends: a pid seen only at the end
    counts all its CPU (it started in between); one gone by the end is lost, which is why
    the long-lived processes (servers, pooled database connections) are what is watched.
    """

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self.before: dict[str, dict[int, float]] = {}
        self.machine: MachineCpu | None = None
        self.started = 0.0

    def _sample(self) -> dict[str, dict[int, float]]:
        sample: dict[str, dict[int, float]] = {}
        for name, pids in self.groups.items():
            cpu = {pid: process_cpu(pid) for pid in pids()}
            sample[name] = {pid: value for pid, value in cpu.items() if value is not None}
        return sample

    def start(self) -> None:
        self.before = self._sample()
        self.machine = MachineCpu.now()
        self.started = time.monotonic()

    def stop(self) -> dict[str, float]:
        """Cores per group; `machine`: cores busy in all; `rest`: machine minus the groups."""
        seconds = time.monotonic() - self.started
        machine = MachineCpu.now()
        after = self._sample()
        cores: dict[str, float] = {}
        for name, sample in after.items():
            before = self.before.get(name, {})
            used = sum(value - before.get(pid, 0.0) for pid, value in sample.items())
            cores[name] = round(used / seconds, 3) if seconds else 0.0
        busy = machine.busy_since(self.machine) if machine else None
        if busy is not None:
            cores["machine"] = round(busy * (os.cpu_count() or 1), 3)
            cores["rest"] = round(cores["machine"] - sum(cores[name] for name in after), 3)
        return cores
