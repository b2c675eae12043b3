"""A soak: closed-loop users for a long time, half of them through the original API (each turn
stored in the history) and half through OpenAI's completions (nothing stored), while every
process of the service is watched for growth.

Every `sample_every_s` it records each process's resident memory, the history database's size
(the file and its WAL) and the turns stored in it. The report compares the end with the end of
the warm-up: a process whose memory keeps growing under a steady load leaks; a database that
grows faster than its stored turns keeps what it should not; and the time to first token of the
last window against the first says whether the service slows down as it runs.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.processes import ProcessSample, sample_tree
from loadtests.users import Answer, Users, Workload, percentile

STORED_TURNS = "SELECT count(*) FROM messages WHERE role = 'assistant'"


@dataclass
class SoakSample:
    at_s: float
    processes: list[ProcessSample]
    database_bytes: int
    stored_turns: int


@dataclass
class SoakReport:
    warmup_s: float
    samples: list[SoakSample] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    started: float = 0.0

    @property
    def errors(self) -> list[str]:
        return [a.error or f"HTTP {a.status}" for a in self.answers if not a.ok]

    def baseline(self) -> SoakSample:
        """The first sample at or after the warm-up."""
        return next(s for s in self.samples if s.at_s >= self.warmup_s)

    def memory_growth(self) -> list[tuple[str, int, int, float]]:
        """(process, RSS at the warm-up's end, RSS at the end, growth) for every process alive
        at both, most grown first."""
        first = {(p.pid, p.name): p for p in self.baseline().processes}
        rows = []
        for process in self.samples[-1].processes:
            start = first.get((process.pid, process.name))
            if start is not None:
                label = f"{process.kind} {process.name} ({process.pid})"
                rows.append((label, start.rss_bytes, process.rss_bytes, process.rss_bytes / start.rss_bytes - 1))
        return sorted(rows, key=lambda row: row[3], reverse=True)

    def ttft_p95_s(self, start_s: float, end_s: float) -> float:
        return percentile(
            [t for a in self.answers if a.ok and start_s <= a.sent - self.started < end_s and (t := a.ttft_s) is not None], 95
        )

    def database_bytes_per_turn(self) -> tuple[float, float]:
        """The database's growth per stored turn over the first half after the warm-up, and over
        the second."""
        baseline, last = self.baseline(), self.samples[-1]
        middle = min(self.samples, key=lambda s: abs(s.at_s - (baseline.at_s + last.at_s) / 2))

        def per_turn(a: SoakSample, b: SoakSample) -> float:
            return (b.database_bytes - a.database_bytes) / max(1, b.stored_turns - a.stored_turns)

        return per_turn(baseline, middle), per_turn(middle, last)

    def render(self, window_s: float) -> str:
        end_s = self.samples[-1].at_s
        baseline = self.baseline()
        first_half, second_half = self.database_bytes_per_turn()
        lines = [
            f"soak: {len(self.answers)} answers in {end_s / 60:.1f} min, {len(self.errors)} failed"
            + (f" (first: {self.errors[0]})" if self.errors else ""),
            f"TTFT p95: {self.ttft_p95_s(self.warmup_s, self.warmup_s + window_s) * 1e3:.0f} ms in the first "
            f"{window_s / 60:g} min after the warm-up, {self.ttft_p95_s(end_s - window_s, end_s) * 1e3:.0f} ms in the last",
            f"history: {baseline.stored_turns} -> {self.samples[-1].stored_turns} stored turns, database "
            f"{baseline.database_bytes / 2**20:.1f} -> {self.samples[-1].database_bytes / 2**20:.1f} MiB; "
            f"{first_half:.0f} then {second_half:.0f} bytes per stored turn",
            f"memory (RSS) at {baseline.at_s / 60:.1f} min and at {end_s / 60:.1f} min:",
        ]
        for label, start, end, growth in self.memory_growth():
            lines.append(f"  {label:<60} {start / 2**20:8.1f} -> {end / 2**20:8.1f} MiB  {growth:+6.1%}")
        return "\n".join(lines)


def _database_state(path: Path) -> tuple[int, int]:
    """(bytes of the database with its WAL, stored turns), read beside the running service
    (none yet while the history replica has not created it)."""
    if not path.exists():
        return 0, 0
    size = sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
        (turns,) = db.execute(STORED_TURNS).fetchone()
    return size, turns


async def soak(
    url: str,
    root_pid: int,
    database: Path,
    model: str,
    users: int,
    duration_s: float,
    warmup_s: float,
    sample_every_s: float = 30.0,
    max_tokens: int = 256,
) -> SoakReport:
    """`users` closed-loop users (half stored, half not) for `duration_s` against the service
    whose processes are under `root_pid` and whose history is `database`."""
    report = SoakReport(warmup_s=warmup_s, started=time.perf_counter())
    stored, stateless = (
        Users(url, Workload("original", model, max_tokens)),
        Users(url, Workload("completions", model, max_tokens)),
    )

    async def watch() -> None:
        while True:
            at_s = time.perf_counter() - report.started
            size, turns = await asyncio.to_thread(_database_state, database)
            report.samples.append(SoakSample(at_s, await asyncio.to_thread(sample_tree, root_pid), size, turns))
            if at_s >= duration_s:
                return
            await asyncio.sleep(min(sample_every_s, duration_s - at_s))

    runs = await asyncio.gather(
        stored.run(users - users // 2, duration_s, ramp_s=min(warmup_s, 10)),
        stateless.run(users // 2, duration_s, ramp_s=min(warmup_s, 10)),
        watch(),
    )
    report.answers = [*runs[0], *runs[1]]
    return report
