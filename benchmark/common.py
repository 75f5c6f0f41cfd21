"""Helpers shared by the benchmark scripts."""

import statistics


def median_line(label: str, runs: list[float], fmt: str) -> tuple[float, str]:
    """The median of runs and a report line giving it and every run, formatted with fmt (e.g. ',.0f')."""
    median = statistics.median(runs)
    return median, f"{label} {median:{fmt}}   runs: {', '.join(f'{x:{fmt}}' for x in runs)}"
