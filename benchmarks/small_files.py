"""``save()`` of 10,000 files of 100 bytes: in a task, beside the engine alone.

- task-level: ``benchmarks/flows/small_files_flow.py`` run with ``python flow.py run``
  (local datastore): ``current.checkpoint.save()`` timed in the step, per file;
- engine-level: :meth:`Engine.save` on a local backend in this process, the same files;
- the floor, in each: one ``os.link`` per file, timed in the same process and round.

The machine may be shared: each figure comes with its ``os.link`` floor from the same
round, and ``ratio`` is save over link.

    python benchmarks/small_files.py [--files 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchkit import committed, local_engine, request
from benchrows import Row, median

FLOW = Path(__file__).resolve().parent / "flows" / "small_files_flow.py"
_RESULT = re.compile(r"RESULT save_us=([\d.]+) link_us=([\d.]+)")
GOAL_US = 25.0


def task_level(files: int, repeat: int) -> list[tuple[float, float]]:
    """(save, link) microseconds per file, per round, measured in a task."""
    with tempfile.TemporaryDirectory(prefix="small-files-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("METAFLOW_")}
        env.update({
            "METAFLOW_DEFAULT_DATASTORE": "local", "METAFLOW_DEFAULT_METADATA": "local",
            "METAFLOW_DATASTORE_SYSROOT_LOCAL": tmp,
            "USERNAME": os.environ.get("USERNAME", "bench"),
            "SMALL_FILES": str(files), "SMALL_REPEAT": str(repeat),
        })
        out = subprocess.run([sys.executable, str(FLOW), "--no-pylint", "run"], cwd=tmp,
                             env=env, capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise SystemExit(out.stdout + out.stderr)
        return [(float(m.group(1)), float(m.group(2)))
                for line in (out.stdout + out.stderr).splitlines()
                if (m := _RESULT.search(line))]


def engine_level(files: int, repeat: int, tmpdir: str | None) -> list[tuple[float, float]]:
    """(save, link) microseconds per file, per round, on the engine alone."""
    out = []
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix="small-files-engine-") as tmp:
        staging = os.path.join(tmp, "staging")
        os.makedirs(staging)
        engine = local_engine(tmp, max_pending=2)
        engine.backend  # noqa: B018  the uploader starts with the task, before any save
        try:
            for _ in range(repeat):
                for i in range(files):
                    p = os.path.join(staging, f"f{i:05d}.bin")
                    if os.path.exists(p):
                        os.unlink(p)
                    with open(p, "wb") as f:
                        f.write(os.urandom(100))
                links = os.path.join(tmp, "links")
                os.makedirs(links)
                t0 = time.perf_counter()
                for n in sorted(os.listdir(staging)):
                    os.link(os.path.join(staging, n), os.path.join(links, n))
                link_s = time.perf_counter() - t0
                shutil.rmtree(links)
                t0 = time.perf_counter()
                h = engine.save(request(staging))
                save_s = time.perf_counter() - t0
                committed(h)
                out.append((save_s / files * 1e6, link_s / files * 1e6))
        finally:
            engine.close()
    return out


def measure(files: int, repeat: int, *, tmpdir: str | None = None,
            log: Callable[[str], None] = print) -> list[Row]:
    rows = []
    for where, got in (("engine alone", engine_level(files, repeat, tmpdir)),
                       ("in a task", task_level(files, repeat))):
        save = [s for s, _ in got]
        link = [x for _, x in got]
        log(f"  {where}: save() {median(save):.1f} us/file, os.link {median(link):.1f} us/file")
        rows.append(Row(
            f"save() blocking per file, {files:,} files of 100 B, {where}", median(save),
            "us", "os.link per file (same round)", median(link), f"<= {GOAL_US:.0f} us",
            met=median(save) <= GOAL_US, ratio=median(save) / median(link),
            note="ratio = save / os.link", samples=save, baseline_samples=link))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    for r in measure(args.files, args.repeat):
        print(f"{r.benchmark}: {r.value:.1f} us (os.link {r.baseline:.1f} us; "
              f"target {r.target})")


if __name__ == "__main__":
    main()
