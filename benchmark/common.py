"""Helpers shared by the benchmark scripts."""

import statistics

Runs = tuple[str, list[float]]


def compare(header: str, first: Runs, second: Runs, fmt: str) -> tuple[float, float]:
    """Print header, then each (label, runs) with its median and every run formatted with fmt (e.g.
    ',.0f'); return the two medians."""
    print(header)
    medians = []
    for label, runs in (first, second):
        medians.append(statistics.median(runs))
        print(f"{label} {medians[-1]:{fmt}}   runs: {', '.join(f'{x:{fmt}}' for x in runs)}")
    return medians[0], medians[1]
