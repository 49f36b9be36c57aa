"""SIGTERM: drain within the grace period without taking locks; forked children die at once."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from conftest import RunFlow
from enginekit import make_engine, request
from storekit import manifests, results, verify_all

from metaflow_extensions.asynccheckpoint.plugins.shared import preemption
from uploader import CheckpointState, Engine

GRACE = 120.0  # far longer than any wait below: a drain in the wrong place shows as a hang


# -- the handler on its own, in a process of its own -----------------------------------

PRELUDE = """
import os, signal, sys
from metaflow_extensions.asynccheckpoint.plugins.shared import preemption

def say(msg):
    print(msg, flush=True)

restore = preemption.install(drain=lambda grace: say(f"drain {grace:g}"), grace=7,
                             cleanup=lambda: say("cleanup"), log=say)
"""


def run_script(body: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = PRELUDE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)


def test_default_disposition_drains_cleans_up_and_dies_by_sigterm(tmp_path: Path) -> None:
    out = run_script("""
        os.kill(os.getpid(), signal.SIGTERM)
        say("survived")
    """, tmp_path)
    assert out.returncode == -signal.SIGTERM, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("SIGTERM: committing pending checkpoints (up to 7s")
    assert lines[1:] == ["drain 7", "cleanup"]


def test_python_handler_is_called_after_the_drain_and_files_are_kept(tmp_path: Path) -> None:
    out = run_script("""
        restore()
        def previous(signum, frame):
            say("previous")
            raise SystemExit(7)
        signal.signal(signal.SIGTERM, previous)
        preemption.install(drain=lambda grace: say("drain"), grace=1,
                           cleanup=lambda: say("cleanup"), log=lambda m: None)
        os.kill(os.getpid(), signal.SIGTERM)
    """, tmp_path)
    # The previous handler may let the process go on: the staging files stay for it.
    assert out.returncode == 7, out.stderr
    assert out.stdout.splitlines() == ["drain", "previous"]


def test_an_ignored_sigterm_stays_ignored(tmp_path: Path) -> None:
    out = run_script("""
        restore()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        preemption.install(drain=lambda grace: say("drain"), grace=1,
                           cleanup=lambda: say("cleanup"), log=say)
        os.kill(os.getpid(), signal.SIGTERM)
        say("survived")
    """, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["survived"]


def test_restore_gives_back_the_previous_handler_but_not_over_a_newer_one(
        tmp_path: Path) -> None:
    out = run_script("""
        restore()
        say(repr(signal.getsignal(signal.SIGTERM)))
        restore = preemption.install(drain=print, grace=1, cleanup=print, log=print)
        def newer(signum, frame):
            pass
        signal.signal(signal.SIGTERM, newer)
        restore()
        say(signal.getsignal(signal.SIGTERM).__name__)
    """, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["<Handlers.SIG_DFL: 0>", "newer"]


def test_a_forked_child_gets_the_previous_disposition_back(tmp_path: Path) -> None:
    out = run_script("""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, repr(signal.getsignal(signal.SIGTERM)).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        say("child " + os.read(r, 1000).decode())
        say("parent " + type(signal.getsignal(signal.SIGTERM)).__name__)
    """, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["child <Handlers.SIG_DFL: 0>", "parent _Handler"]


def test_the_handler_run_in_a_forked_child_acts_as_the_previous_one(tmp_path: Path) -> None:
    # As when SIGTERM reaches a child before the at-fork hook has given the signal back.
    out = run_script("""
        handler = signal.getsignal(signal.SIGTERM)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, handler)
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        say(f"child signalled={os.WIFSIGNALED(status)} "
            f"sig={os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}")
    """, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"child signalled=True sig={int(signal.SIGTERM)}"]


# -- a forked worker of a process whose engine has uploads pending ----------------------


def _blocked_worker(conn: Connection, engine: Engine, source: str,
                    parent_handle_id: str) -> None:
    # Give this worker an upload of its own that never finishes (its gate is never
    # opened): a handler that drained here would wait out the whole grace period.
    saver = threading.Thread(target=engine.save, args=(request(Path(source), name="worker"),),
                             daemon=True)
    saver.start()
    backend = engine.backend
    assert backend.entered.wait(30)  # type: ignore[attr-defined]
    conn.send({"pending": [h.state.value for h in engine.handles],
               "parent_upload_seen": any(h.checkpoint_id == parent_handle_id
                                         for h in engine.handles)})
    conn.recv()  # never answered


def test_forked_worker_dies_at_once_while_the_parent_has_uploads_pending(
        tmp_path: Path) -> None:
    src, worker_src = tmp_path / "src", tmp_path / "worker_src"
    for d in (src, worker_src):
        d.mkdir()
        (d / "w.bin").write_bytes(b"w" * 4096)
    engine = make_engine(tmp_path, gated=True, copy_budget=0)
    logs: list[str] = []
    restore = preemption.install(drain=engine.drain_for_signal, grace=GRACE,
                                 cleanup=lambda: logs.append("cleanup"), log=logs.append)
    worker = None
    try:
        handle = engine.save(request(src))
        assert engine._backend.entered.wait(30)  # type: ignore[union-attr]
        ctx = multiprocessing.get_context("fork")
        here, there = ctx.Pipe()
        worker = ctx.Process(target=_blocked_worker,
                             args=(there, engine, str(worker_src), handle.checkpoint_id))
        worker.start()
        assert here.poll(60), "the worker never reported its upload pending"
        told = here.recv()
        assert told == {"pending": ["uploading"], "parent_upload_seen": False}
        assert handle.state is CheckpointState.UPLOADING

        t0 = time.monotonic()
        worker.terminate()
        worker.join(timeout=GRACE / 4)
        assert worker.exitcode == -signal.SIGTERM, (
            f"the worker was still alive {time.monotonic() - t0:.1f}s after SIGTERM")
        assert time.monotonic() - t0 < GRACE / 4
        assert logs == []  # the parent's handler never ran

        engine._backend.gate.set()  # type: ignore[union-attr]
        report = engine.drain(30)
        assert [h.state for h in report.handles] == [CheckpointState.COMMITTED]
    finally:
        if worker is not None and worker.exitcode is None:
            worker.kill()
            worker.join()
        restore()
        backend = engine._backend
        if backend is not None:
            backend.gate.set()  # type: ignore[attr-defined]
        engine.close()


# -- flows, run as users run them ------------------------------------------------------


@pytest.mark.flow
def test_forked_children_save_list_load_and_die_on_sigterm(run_flow: RunFlow,
                                                           datastore_root: Path) -> None:
    out = run_flow("fork_flow.py", env={"METAFLOW_CHECKPOINT_SIGTERM_GRACE": str(GRACE)},
                   timeout=2 * GRACE)
    text = out.stdout + out.stderr
    r = results(text)
    assert "saver_hung" not in r, "the forked child hung before it could save:\n" + text
    assert r["child_state"] == "committed", text
    assert r["child_listed"] == "True"
    assert r["child_loaded"].startswith("saved by ")
    assert r["saver_exitcode"] == "0"
    if r["parent_wait"] != "returned":  # the parent's upload was still going at the fork
        assert "of which this process is a fork; wait for it there" in r["parent_wait"]
    # The terminated helper died by SIGTERM at once, without draining anything.
    assert r["worker_ready"] == "True", text
    assert r["terminated_exitcode"] == str(-signal.SIGTERM), text
    assert float(r["terminated_seconds"]) < GRACE / 4
    assert "SIGTERM: committing pending checkpoints" not in text
    assert "preemption._Handler" in r["sigterm_disposition"]
    # The child's checkpoint is in the datastore, committed and intact, next to the parent's.
    committed = manifests(datastore_root)
    assert verify_all(datastore_root) == 3
    child = [(k, m) for k, m in committed if m.name == "child"]
    assert len(child) == 1 and child[0][0].manifest == r["child_key"]
    assert child[0][1].metadata == {"by": "child"}
    assert sorted(m.metadata.get("n", 1) for _, m in committed if m.name != "child") == [1, 2]


@pytest.mark.flow
def test_sigterm_while_the_engine_lock_is_held_still_commits_and_exits(
        run_flow: RunFlow, datastore_root: Path) -> None:
    # A handler that waited for the lock would hang the task for good: well past this.
    out = run_flow("sigterm_lock_flow.py", check=False, timeout=GRACE)
    text = out.stdout + out.stderr
    r = results(text)
    assert out.returncode != 0, text
    assert "survived" not in r
    assert "SIGTERM: committing pending checkpoints" in text
    assert [m.metadata for _, m in manifests(datastore_root)] == [
        {"why": "sigterm-under-lock"}], text
    assert verify_all(datastore_root) == 1
    # The process ended by SIGTERM, so nothing else removes its local files.
    assert not os.path.exists(r["staging"])
    assert not os.path.exists(r["snapshots"])
