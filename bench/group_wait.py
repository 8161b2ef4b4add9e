"""CPU of one poll while waiting for several agent groups to end, as the reaper does for a dead
worker's agents (every 50 ms for up to the grace period): one walk of the process table for all
groups (flowyard) against one walk per group (the baseline, ``group_members`` per group).

Usage: ``.venv/bin/python -m bench.group_wait [--groups 8] [--polls 200]``. The groups do not
exist, so every poll walks the whole table, as it does while agents are still ending.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import psutil

from tasks.process_group import any_left, group_members


def _per_group(pgids: Sequence[int]) -> bool:
    return any(group_members(pgid) for pgid in pgids)


def _one_walk(pgids: Sequence[int]) -> bool:
    return any_left(pgids, None)


def cpu_ms_per_poll(poll: Callable[[Sequence[int]], bool], pgids: Sequence[int], polls: int) -> float:
    start = time.process_time()
    for _ in range(polls):
        if poll(pgids):
            raise SystemExit(f"a process of group {pgids} exists; pick other group ids")
    return (time.process_time() - start) * 1000 / polls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--polls", type=int, default=200)
    args = parser.parse_args()
    pgids = [4_000_000 + n for n in range(args.groups)]  # above Linux's pid_max default: none exists
    print(f"{len(psutil.pids())} processes, {args.groups} groups, {args.polls} polls per round")
    for _ in range(2):  # alternating, so a slower minute of the machine shows in both
        baseline = cpu_ms_per_poll(_per_group, pgids, args.polls)
        flowyard = cpu_ms_per_poll(_one_walk, pgids, args.polls)
        print(
            f"per group {baseline:6.2f} ms  one walk {flowyard:6.2f} ms  CPU per poll: {baseline / flowyard:4.1f}x less"
        )


if __name__ == "__main__":
    main()
