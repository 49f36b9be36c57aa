"""What checkpointing adds to a PyTorch training loop, over a WAN, as a Metaflow flow.

``flows/train_overhead_flow.py`` trains a model (``torch==2.13.0``, CPU, one thread) and
every ``--every`` steps ``torch.save``-s its model and optimizer state (new bytes each
time: every step changes the weights). It runs four ways in the same run, on the S3
datastore pointed at the in-memory endpoint with the WAN profile (``memserver.py``: 30 ms
per request, 100 MB/s per connection):

* ours: this package's ``@checkpoint``, ``current.checkpoint.save()`` after each
  ``torch.save`` into ``current.checkpoint.directory``, in this interpreter;
* metaflow-checkpoint 0.2.14: the same flow in a separate virtual environment (created by
  this script with ``python -m venv`` and ``pip install metaflow-checkpoint==0.2.14
  torch==2.13.0 metaflow boto3``, kept under ``~/.cache`` so later runs reuse it);
* and for each, the baseline: the same loop writing the same ``torch.save`` files to a
  temporary directory without checkpointing them.

The figure is the training loop's wall time with checkpointing over the baseline's, minus
one: what the library adds to training. Runs alternate; figures are medians.

    python benchmarks/train_overhead.py [--width 2048] [--layers 4] [--batch 128]
        [--steps 36] [--every 12] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from benchkit import BUCKET, CREDS, REGION, s3_client  # noqa: E402
from benchrows import Row  # noqa: E402
from memserver import WAN_BANDWIDTH_MBPS, WAN_DELAY_MS, MemServer  # noqa: E402

FLOW = os.path.join(HERE, "flows", "train_overhead_flow.py")
LEGACY = "metaflow-checkpoint==0.2.14"
TORCH = "torch==2.13.0"
GOAL = 0.035  # ours adds at most 3.5% to the loop
_LINE = re.compile(r"TRAIN_LOOP ([\d.]+) SAVES (\d+) BYTES (\d+) SAVE_CALLS ([\d.]+) "
                   r"THREAD_CPU ([\d.]+)")


def venv_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    return os.path.join(cache, "metaflow-async-checkpoint-bench",
                        f"metaflow-checkpoint-0.2.14-torch-2.13.0-{tag}")


def legacy_python(log: Callable[[str], None]) -> tuple[str | None, str]:
    """The interpreter of a venv holding metaflow-checkpoint 0.2.14, made once and cached;
    (None, why) when it cannot be made."""
    root = venv_dir()
    python = os.path.join(root, "bin", "python")
    ready = os.path.join(root, ".ready")
    if os.path.exists(ready) and os.access(python, os.X_OK):
        return python, ""
    log(f"  creating {root} (pip install {LEGACY} {TORCH} metaflow boto3; once)")
    shutil.rmtree(root, ignore_errors=True)
    steps = [[sys.executable, "-m", "venv", root],
             [python, "-m", "pip", "install", "-q", LEGACY, TORCH, "metaflow", "boto3"]]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return None, f"could not install {LEGACY} in a venv: {' / '.join(tail)}"
    with open(ready, "w") as f:
        f.write("ok\n")
    return python, ""


def run_flow(python: str, checkpoint: bool, params: list[str], env: dict[str, str],
             cwd: str) -> tuple[float, int, int, float, float, float]:
    """One run: (loop seconds, saves, bytes per save, seconds in save() calls, run wall,
    CPU-seconds of the loop's thread)."""
    run_env = dict(env, TRAIN_BENCH_CHECKPOINT="1" if checkpoint else "0",
                   PATH=os.path.dirname(python) + os.pathsep + env.get("PATH", ""))
    cmd = [python, FLOW, "--no-pylint", "run", *params]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=run_env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    m = _LINE.search(done.stdout + done.stderr)
    if done.returncode != 0 or m is None:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                           f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return float(m[1]), int(m[2]), int(m[3]), float(m[4]), wall, float(m[5])


def _why(e: Exception) -> str:
    """The error line of a failed run's output (the last line naming an error)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if "Error" in ln or "Exception" in ln]
    return (named or lines or ["?"])[-1][-300:]


def measure(*, width: int, layers: int, steps: int, every: int, repeat: int, batch: int = 64,
            tmpdir: str | None = None, log: Callable[[str], None] = print) -> list[Row]:
    med = statistics.median
    legacy, why = legacy_python(log)
    contenders = {"ours": sys.executable}
    if legacy is not None:
        contenders["metaflow-checkpoint 0.2.14"] = legacy
    params = ["--steps", str(steps), "--every", str(every), "--width", str(width),
              "--layers", str(layers), "--batch", str(batch)]
    profile = f"WAN: {WAN_DELAY_MS:g} ms per request, {WAN_BANDWIDTH_MBPS:g} MB/s per connection"
    loops: dict[tuple[str, bool], list[float]] = {}
    cpus: dict[tuple[str, bool], list[float]] = {}
    failed: dict[str, str] = {}  # contenders whose runs failed twice: why
    info: dict[str, tuple[int, int]] = {}
    in_saves: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix="train-") as tmp, \
            MemServer(delay_ms=WAN_DELAY_MS, bandwidth_mbps=WAN_BANDWIDTH_MBPS) as srv:
        s3_client(srv.url).create_bucket(Bucket=BUCKET)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("METAFLOW_", "AWS_"))}
        env.update(METAFLOW_DEFAULT_DATASTORE="s3", METAFLOW_DEFAULT_METADATA="local",
                   METAFLOW_DATASTORE_SYSROOT_S3=f"s3://{BUCKET}/metaflow",
                   METAFLOW_S3_ENDPOINT_URL=srv.url, AWS_ACCESS_KEY_ID=CREDS["aws_access_key_id"],
                   AWS_SECRET_ACCESS_KEY=CREDS["aws_secret_access_key"],
                   AWS_DEFAULT_REGION=REGION, USERNAME="bench")
        for rnd in range(repeat):
            for name, python in list(contenders.items()):
                if name in failed:
                    continue
                order = (False, True) if rnd % 2 == 0 else (True, False)
                for ckpt in order:
                    cwd = os.path.join(tmp, name.split()[0])
                    os.makedirs(cwd, exist_ok=True)
                    try:
                        got = run_flow(python, ckpt, params, env, cwd)
                    except RuntimeError as e:  # once more: a flaky run is not the figure
                        log(f"  round {rnd + 1} {name}: the run failed, once more "
                            f"({_why(e)})")
                        try:
                            got = run_flow(python, ckpt, params, env, cwd)
                        except RuntimeError as again:
                            if name == "ours":
                                raise
                            failed[name] = _why(again)
                            break
                    loop, saves, size, in_save, wall, cpu = got
                    loops.setdefault((name, ckpt), []).append(loop)
                    cpus.setdefault((name, ckpt), []).append(cpu)
                    if ckpt:
                        info[name] = (saves, size)
                        in_saves.setdefault(name, []).append(in_save)
                    log(f"  round {rnd + 1} {name:<27} {'checkpoint' if ckpt else 'baseline':<10}"
                        f" loop {loop:6.2f} s, {saves} saves of {size / 2**20:.0f} MiB"
                        + (f", {in_save:.2f} s in save()" if ckpt else "")
                        + f", loop thread CPU {cpu:.2f} s, run {wall:.1f} s")
    rows = []
    for name in contenders:
        if name in failed or (name, False) not in loops or (name, True) not in loops:
            rows.append(Row(f"training overhead over a WAN, {name}: did not finish", 0.0, "",
                            "-", None, "report", None,
                            note=f"a run failed twice: {failed.get(name, 'no runs')}"))
            continue
        base, ours = loops[(name, False)], loops[(name, True)]
        added = med(ours) / med(base) - 1
        saves, size = info[name]
        in_save = med(in_saves[name])
        judged = name == "ours"
        rows.append(Row(
            f"training overhead over a WAN, {name}", 100 * added, "% of the loop",
            "same loop, torch.save only (s)", med(base),
            f"<= {100 * GOAL:.1f}%" if judged else "report",
            added <= GOAL if judged else None, med(ours) / med(base),
            note=(f"{saves} saves of {size / 2**20:.0f} MiB in a {med(base):.1f} s loop; "
                  f"{in_save:.2f} s inside save() calls (median); {profile}; ratio = loop time "
                  "over the baseline's"),
            samples=ours, baseline_samples=base))
        base_cpu, ours_cpu = cpus[(name, False)], cpus[(name, True)]
        rows.append(Row(
            f"training thread's CPU added, {name}", 100 * (med(ours_cpu) / med(base_cpu) - 1),
            "% of the loop's CPU", "same loop, torch.save only (CPU-s)", med(base_cpu),
            "report", None, med(ours_cpu) / med(base_cpu),
            note=("CPU time of the loop's own thread: what the library does on it, without "
                  "the machine's other work; the wall-time row adds the CPU the upload and "
                  "the endpoint take from the training on a shared machine"),
            samples=ours_cpu, baseline_samples=base_cpu))
    if legacy is None:
        rows.append(Row("training overhead over a WAN, metaflow-checkpoint 0.2.14: skipped",
                        0.0, "", "-", None, "report", None, note=why))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=36)
    ap.add_argument("--every", type=int, default=12)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    for r in measure(width=args.width, layers=args.layers, steps=args.steps, batch=args.batch,
                     every=args.every, repeat=args.repeat, tmpdir=args.dir):
        print(f"{r.benchmark}: {r.value:.1f}{r.unit} ({r.note}), target {r.target}")


if __name__ == "__main__":
    main()
