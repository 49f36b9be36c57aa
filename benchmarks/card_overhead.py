"""What the checkpoint card adds to the end of a task, against show_card=False.

Runs ``tests/flows/card_flow.py`` (a step that saves a few checkpoints, the last with
``wait=True``) with the card and without it, on a private local datastore, and reports:

- the card's own end-of-task work (``CheckpointCard.finish``: stop the refresher, set
  the final components), timed inside the task;
- the gap from the end of the step's code to the start of the next step, whose
  difference between the two settings is everything the card costs at the end,
  including Metaflow's own rendering of the final card.

    python benchmarks/card_overhead.py [--repeat 5] [--train-seconds 0]

``--train-seconds N`` keeps the step saving for N seconds first, so the card refreshes
live while it runs.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

FLOW = Path(__file__).resolve().parent.parent / "tests" / "flows" / "card_flow.py"
_RESULT = re.compile(r"RESULT (\w+)=(.*)$")


def run_once(show_card: bool, train_seconds: float) -> tuple[float, float | None]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("METAFLOW_")}
        env.update({
            "METAFLOW_DEFAULT_DATASTORE": "local", "METAFLOW_DEFAULT_METADATA": "local",
            # The datastore in the working directory, where Metaflow also puts local cards.
            "METAFLOW_DATASTORE_SYSROOT_LOCAL": tmp,
            "USERNAME": os.environ.get("USERNAME", "bench"),
            "CARD_FLOW_SHOW_CARD": "1" if show_card else "0",
            "CARD_FLOW_TIME_FINISH": "1", "CARD_FLOW_TRAIN_SECONDS": str(train_seconds),
        })
        out = subprocess.run([sys.executable, str(FLOW), "--no-pylint", "run"], cwd=tmp,
                             env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise SystemExit(out.stdout + out.stderr)
        r: dict[str, str] = {}
        for line in (out.stdout + out.stderr).splitlines():
            m = _RESULT.search(line)
            if m:
                r.setdefault(m.group(1), m.group(2).strip())
        gap = float(r["end_start"]) - float(r["body_end"])
        finish = float(r["card_finish_s"]) if "card_finish_s" in r else None
        return gap, finish


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--train-seconds", type=float, default=0.0)
    args = ap.parse_args()
    gaps: dict[bool, list[float]] = {True: [], False: []}
    finishes: list[float] = []
    for _ in range(args.repeat):
        for show in (False, True):  # interleaved, so drift hits both alike
            gap, finish = run_once(show, args.train_seconds)
            gaps[show].append(gap)
            if show and finish is not None:
                finishes.append(finish)
    off, on = statistics.median(gaps[False]), statistics.median(gaps[True])
    print(f"step end -> next step start, median of {args.repeat}: "
          f"show_card=False {off:.3f} s, show_card=True {on:.3f} s, "
          f"difference {on - off:+.3f} s")
    print(f"CheckpointCard.finish: median {statistics.median(finishes) * 1e3:.2f} ms, "
          f"max {max(finishes) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
