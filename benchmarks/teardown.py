"""What @checkpoint adds to the end of a task with nothing pending, against a plain @step.

Runs ``benchmarks/flows/teardown_flow.py`` with and without ``@checkpoint`` on its middle
step (which, with it, saves once with ``wait=True``), on a private local datastore,
interleaved, and compares the gap from the end of the step's code to the start of the
next step: the task's teardown (ours: the drain, stopping the uploader) plus Metaflow's
own work, which is the same in both.

    python benchmarks/teardown.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchrows import Row

FLOW = Path(__file__).resolve().parent / "flows" / "teardown_flow.py"
_RESULT = re.compile(r"RESULT (\w+)=(.*)$")
GOAL_S = 0.1


def run_once(with_checkpoint: bool, card: bool = False) -> float:
    with tempfile.TemporaryDirectory(prefix="teardown-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("METAFLOW_")}
        env.update({
            "METAFLOW_DEFAULT_DATASTORE": "local", "METAFLOW_DEFAULT_METADATA": "local",
            "METAFLOW_DATASTORE_SYSROOT_LOCAL": tmp,
            "USERNAME": os.environ.get("USERNAME", "bench"),
            "TEARDOWN_CHECKPOINT": "1" if with_checkpoint else "0",
            "TEARDOWN_CARD": "1" if card else "0",
        })
        out = subprocess.run([sys.executable, str(FLOW), "--no-pylint", "run"], cwd=tmp,
                             env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise SystemExit(out.stdout + out.stderr)
        r: dict[str, float] = {}
        for line in (out.stdout + out.stderr).splitlines():
            if m := _RESULT.search(line):
                r.setdefault(m.group(1), float(m.group(2)))
        return r["end_start"] - r["body_end"]


def measure(repeat: int, *, log: Callable[[str], None] = print) -> list[Row]:
    kinds = {"plain": (False, False), "checkpoint": (True, False), "card": (True, True)}
    gaps: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeat):
        for kind, (with_checkpoint, card) in kinds.items():  # interleaved: drift hits all
            gaps[kind].append(run_once(with_checkpoint, card))
    med = {k: statistics.median(v) for k, v in gaps.items()}
    log(f"  step end -> next step start: plain {med['plain']:.3f} s, @checkpoint "
        f"{med['checkpoint']:.3f} s, @checkpoint with its card {med['card']:.3f} s")
    rows = []
    for kind, label in (("checkpoint", "@checkpoint(show_card=False)"),
                        ("card", "@checkpoint (default: with its card)")):
        more = med[kind] - med["plain"]
        rows.append(Row(f"task teardown with nothing pending, {label}", more, "s more",
                        "plain @step (gap s)", med["plain"], f"<= {GOAL_S} s more",
                        more <= GOAL_S, med[kind] / med["plain"],
                        note="local datastore; gap from the step's last line to the next "
                             "step's first", samples=gaps[kind], baseline_samples=gaps["plain"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    for r in measure(args.repeat):
        print(f"{r.benchmark}: {r.value:+.3f} s over {r.baseline:.3f} s (target {r.target})")


if __name__ == "__main__":
    main()
