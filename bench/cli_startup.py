"""Benchmark: what a Python process of flowyard spends before it does any work, in one run.

Every ``flowyard`` command, agent, flow run and Prefect server is a new Python process, and
the test suite starts thousands of them. Two things set their start-up cost, each measured
here against its baseline:

1. Bytecode: each case runs with the installed ``.pyc`` files (``make install`` compiles
   them) and without any (``PYTHONPYCACHEPREFIX`` pointing at an empty directory, so Python
   compiles every source it imports, as it did where ``PYTHONDONTWRITEBYTECODE`` is set and
   the install wrote none).
2. The CLI's groups: a usage error of ``flowyard queue`` imports the ``queue`` group alone;
   the baseline imports every group, as each command did before the groups loaded on demand.

The figure is CPU seconds (user + system) of the child, the median of ``--repeats`` runs.
Usage::

    .venv/bin/python -m bench.cli_startup [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

EVERY_GROUP = (
    "import importlib, deployments.cli as cli\n"
    "for module, _ in cli.SUBCOMMANDS:\n"
    "    importlib.import_module(f'deployments.{module}')\n"
)

CASES: dict[str, list[str]] = {
    "flowyard queu (usage error, one group)": ["-m", "deployments.cli", "queu"],
    "every CLI group imported (before)": ["-c", EVERY_GROUP],
    "import prefect": ["-c", "import prefect"],
    "import prefect.flows + great_expectations": ["-c", "import prefect.flows, great_expectations"],
}


def child_cpu_seconds(args: list[str], env: dict[str, str]) -> float:
    """CPU seconds of one ``python args`` run (its exit code is not checked: a usage error
    exits 2 by design)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def median_cpu(args: list[str], env: dict[str, str], repeats: int) -> float:
    return statistics.median(child_cpu_seconds(args, env) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    compiled = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryDirectory() as empty:
        uncompiled = {**compiled, "PYTHONPYCACHEPREFIX": empty}
        print(f"{'case':<44} {'no .pyc':>9} {'.pyc':>9} {'ratio':>7}   (CPU s, median of {repeats})")
        results = {}
        for name, args in CASES.items():
            cold, warm = results[name] = median_cpu(args, uncompiled, repeats), median_cpu(args, compiled, repeats)
            print(f"{name:<44} {cold:>9.2f} {warm:>9.2f} {cold / warm:>6.1f}x")
    one = results["flowyard queu (usage error, one group)"][1]
    every_cold, every_warm = results["every CLI group imported (before)"]
    print(f"\nCLI usage error, one group against every group (both with .pyc): {every_warm / one:.1f}x less CPU")
    print(f"CLI usage error now against before both changes (every group, no .pyc): {every_cold / one:.1f}x less CPU")


if __name__ == "__main__":
    main()
