"""One result row of the suite: a median, its baseline from the same run, and the target."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence


@dataclasses.dataclass
class Row:
    benchmark: str
    value: float  # the median of ours
    unit: str
    baseline_name: str
    baseline: float | None  # the baseline's median, measured in the same run
    target: str  # what the issue asks, in words
    met: bool | None  # None where the row is reported, not judged
    ratio: float | None = None  # value relative to baseline, in the sense the target states
    note: str = ""
    samples: Sequence[float] = ()
    baseline_samples: Sequence[float] = ()
    series: str = ""  # rows of one series are plotted against ``x`` (e.g. bytes, files)
    x: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    return f"{min(xs):.3g}-{max(xs):.3g}" if len(xs) > 1 else ""
