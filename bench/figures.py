"""Where the benchmark scripts keep their figures, and how they compute and write them.

Each script writes one JSON file under ``bench/results/``; the README quotes
those files, so they are tracked, and a rerun on another machine shows up as
a diff.
"""

from __future__ import annotations

import json
import os
import resource

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def percentile(values: list, q: float) -> float:
    """The ``q`` quantile (0 to 1) of ``values``: the value at rank ``int(q * n)`` of
    them sorted (the largest for ``q`` near 1); NaN for no values. Every benchmark's
    quantiles are this one's, so that their p50s and p99s compare."""
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (all threads) or of ``pid``."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def default_path(name: str) -> str:
    """``bench/results/<name>.json``."""
    return os.path.join(RESULTS_DIR, f"{name}.json")


def write(results: object, path: str) -> None:
    """Write ``results`` as indented JSON to ``path`` and say where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(f"\nfigures written to {os.path.relpath(path)}")


def report(results: object, print_table, path: str) -> int:
    """The end of every benchmark: the table on stdout, the figures to ``path``; exit 0."""
    print_table(results)
    write(results, path)
    return 0
