"""Every benchmark of the performance claims, in one run: a Markdown table and a PNG plot.

Each figure is a median over repeats, set against a baseline measured in the same run.
Writes ``results.md``, ``results.png`` and ``results.json`` to ``--out``
(``benchmarks/results`` by default, the figures the README quotes) and prints the table.
``--quick`` runs everything small (a smoke run: the numbers mean little), and writes to
``benchmarks/results-quick`` (not tracked) unless ``--out`` says otherwise, so it never
replaces the real figures; ``--only`` picks benchmarks by name.

    tox -e bench                      # the full run, about 18 minutes on 2 cores
    python benchmarks/suite.py --quick --only listing,small_save
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from benchrows import Row  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30


def _interference(quick: bool, tmp: str | None) -> list[Row]:
    import interference

    if quick:
        return interference.measure(64 * MiB, 1, ["thread", "process"], tmpdir=tmp,
                                    idle_s=0.3, tries=1)
    return interference.measure(512 * MiB, 5, ["thread", "process"], tmpdir=tmp)


def _unchanged_check(quick: bool, tmp: str | None) -> list[Row]:
    import unchanged_check

    return unchanged_check.measure((64 if quick else 512) * MiB, 1 if quick else 5,
                                   ["process", "thread"], tmpdir=tmp)


def _save_scaling(quick: bool, tmp: str | None) -> list[Row]:
    import save_scaling

    if quick:
        return save_scaling.measure([MiB, 16 * MiB], [1, 100], 1, tmpdir=tmp)
    return save_scaling.measure([MiB, 64 * MiB, GiB, 4 * GiB], [1, 100, 1000, 10000], 5,
                                tmpdir=tmp)


def _memory_peak(quick: bool, tmp: str | None) -> list[Row]:
    import memory_peak

    return memory_peak.measure(128 * MiB if quick else 4 * GiB, ["process", "thread"],
                               tmpdir=tmp)


def _teardown(quick: bool, tmp: str | None) -> list[Row]:
    import teardown

    return teardown.measure(1 if quick else 5)


def _small_save(quick: bool, tmp: str | None) -> list[Row]:
    import small_save

    return small_save.measure(3 if quick else 20, ["process", "thread"], tmpdir=tmp)


def _small_files(quick: bool, tmp: str | None) -> list[Row]:
    import small_files

    return small_files.measure(1000 if quick else 10000, 1 if quick else 5, tmpdir=tmp)


def _upload_throughput(quick: bool, tmp: str | None) -> list[Row]:
    import upload_throughput

    if quick:
        return upload_throughput.measure("memory", "64MiB", 1, tmpdir=tmp)
    rows = upload_throughput.measure("memory", "1GiB", 5, tmpdir=tmp)
    return rows + upload_throughput.measure("localbucket", "1GiB", 3, tmpdir=tmp)


def _load_throughput(quick: bool, tmp: str | None) -> list[Row]:
    import load_throughput

    return load_throughput.measure(64 * MiB if quick else GiB, 1 if quick else 3, tmpdir=tmp)


def _gcs_throughput(quick: bool, tmp: str | None) -> list[Row]:
    import gcs_throughput

    return gcs_throughput.measure(32 * MiB if quick else 256 * MiB, 1 if quick else 3,
                                  tmpdir=tmp)


def _listing(quick: bool, tmp: str | None) -> list[Row]:
    import listing

    if quick:
        return listing.measure(100, 20, 1, tmpdir=tmp)
    return [r for n in (10, 100, 1000, 10000)
            for r in listing.measure(n, 20, 3, tmpdir=tmp)]


def _azure_emulator(quick: bool, tmp: str | None) -> list[Row]:
    import azure_emulator

    return azure_emulator.measure(32 * MiB if quick else 256 * MiB, 1 if quick else 3,
                                  tmpdir=tmp)


def _wan(quick: bool, tmp: str | None) -> list[Row]:
    import wan

    if quick:
        return wan.measure(64 * MiB, 300, 4096, 1, loop_sample=30, tmpdir=tmp)
    return wan.measure(GiB, 10_000, 4096, 2, loop_sample=300, tmpdir=tmp)


def _train_overhead(quick: bool, tmp: str | None) -> list[Row]:
    import train_overhead

    if quick:
        return train_overhead.measure(width=256, layers=2, steps=6, every=3, repeat=1,
                                      tmpdir=tmp)
    # 192 MiB of model and Adam state saved every 12 steps (about 10 s here), 3 times a run.
    return train_overhead.measure(width=2048, layers=4, batch=128, steps=36, every=12,
                                  repeat=2, tmpdir=tmp)


BENCHMARKS: dict[str, Callable[[bool, str | None], list[Row]]] = {
    "interference": _interference,
    "unchanged_check": _unchanged_check,
    "save_scaling": _save_scaling,
    "memory_peak": _memory_peak,
    "teardown": _teardown,
    "small_save": _small_save,
    "upload_throughput": _upload_throughput,
    "load_throughput": _load_throughput,
    "listing": _listing,
    "gcs_throughput": _gcs_throughput,
    "azure_emulator": _azure_emulator,
    "small_files": _small_files,
    "wan": _wan,
    "train_overhead": _train_overhead,
}


def machine() -> dict[str, Any]:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f
                          if ln.startswith("model name")), model)
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "memory_gib": round(mem / GiB, 1),
            "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0 or 0.01 <= abs(x) < 10_000:
        return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"
    return f"{x:.2e}" if abs(x) < 0.01 else f"{x:,.0f}"


def markdown(rows: list[Row], info: dict[str, Any], elapsed: float) -> str:
    out = [
        "| benchmark | ours (median) | baseline, same run (median) | ratio | target | result |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        verdict = "reported" if r.met is None else ("met" if r.met else "**not met**")
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        base = r.baseline_name if r.baseline is None else f"{r.baseline_name}: {_num(r.baseline)}"
        note = f" ({r.note})" if r.note else ""
        out.append(f"| {r.benchmark}{note} | {_num(r.value)} {r.unit} | {base} | {ratio} | "
                   f"{r.target} | {verdict} |")
    prio = "at nice -20" if info.get("nice_minus_20") else "at normal priority"
    out += ["", f"Machine: {info['cpu']}, {info['cpus']} CPUs, {info['memory_gib']} GiB, "
                f"{info['os']}, Python {info['python']}; run {info['date']}, "
                f"{elapsed / 60:.1f} min, {prio}; load average "
                f"{info.get('load_before', 0):.1f} before, {info.get('load_after', 0):.1f} after."]
    return "\n".join(out) + "\n"


def plot(rows: list[Row], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    judged = [r for r in rows if r.ratio is not None and r.series == ""]
    scaled = {s: [r for r in rows if r.series == s] for s in ("size", "count")}
    listing = {s: [r for r in rows if r.series == s]
               for s in ("list(), engine", "list(), in a task", "task start")}
    fig, axes = plt.subplots(1, 4, figsize=(23, max(4.0, 0.38 * len(judged) + 1.5)),
                             gridspec_kw={"width_ratios": [2.2, 1, 1, 1]})
    ax = axes[0]
    colors = ["#2a9d4b" if r.met else "#c0392b" if r.met is False else "#7f8c8d" for r in judged]
    ys = range(len(judged))
    ax.barh(list(ys), [r.ratio or 0 for r in judged], color=colors)
    ax.set_yticks(list(ys), [r.benchmark[:70] for r in judged], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("ratio against the baseline of the same run (see table for its sense)")
    ax.set_title("green: target met, red: not met, grey: reported")
    for i, (label, unit) in enumerate((("size", "bytes in one file"), ("count", "files"))):
        rs = scaled[label]
        a = axes[i + 1]
        if rs:
            a.plot([r.x for r in rs], [r.value for r in rs], "o-", label="save() blocks")
            a.plot([r.x for r in rs], [r.baseline or 0 for r in rs], "s--",
                   label="shutil.copytree")
            a.set_xscale("log")
            a.set_yscale("log")
            a.set_xlabel(unit)
            a.set_ylabel(rs[0].unit)
            a.legend()
        a.set_title(f"save() vs {label}")
    a = axes[3]
    for label, rs in listing.items():
        if rs:
            a.plot([r.x for r in rs], [r.value for r in rs], "o-", label=label)
    serial = sorted({(r.x, r.baseline or 0) for rs in listing.values() for r in rs})
    if serial:
        a.plot([x for x, _ in serial], [b for _, b in serial], "s--",
               label="serial manifest reads")
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("checkpoints in the scope (20 ms per request)")
        a.set_ylabel("s")
        a.legend()
    a.set_title("listing and task start vs checkpoints")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None,
                    help="where to write (default: benchmarks/results, or "
                         "benchmarks/results-quick with --quick)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--only", default="", help=f"comma-separated: {', '.join(BENCHMARKS)}")
    ap.add_argument("--dir", default=None, help="where to put temporary files")
    args = ap.parse_args()
    if args.out is None:
        args.out = os.path.join(HERE, "results-quick" if args.quick else "results")
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}")
    os.makedirs(args.out, exist_ok=True)
    from benchkit import raise_priority

    info = machine()
    info["nice_minus_20"] = raise_priority()
    info["load_before"] = os.getloadavg()[0]
    rows: list[Row] = []
    failed = []
    t0 = time.perf_counter()
    for name in names:
        print(f"== {name}", flush=True)
        t1 = time.perf_counter()
        try:
            got = BENCHMARKS[name](args.quick, args.dir)
        except (Exception, SystemExit) as e:  # one broken benchmark must not hide the rest
            traceback.print_exc()
            failed.append(name)
            got = [Row(f"{name}: did not run", 0, "", "", None, "", False,
                       note=f"{type(e).__name__}: {e}")]
        rows += got
        print(f"   ({time.perf_counter() - t1:.0f} s)", flush=True)
    elapsed = time.perf_counter() - t0
    info["load_after"] = os.getloadavg()[0]
    table = markdown(rows, info, elapsed)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"machine": info, "quick": args.quick,
                   "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    plotted = plot(rows, os.path.join(args.out, "results.png"))
    print()
    print(table)
    print(f"written to {args.out}: results.md, results.json"
          + (", results.png" if plotted else " (no plot: matplotlib is not installed)"))
    if failed:
        sys.exit(f"benchmarks that did not run: {', '.join(failed)}")


if __name__ == "__main__":
    main()
