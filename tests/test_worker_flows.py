"""The upload worker process under fire, in flows run as users run them (S3 datastore).

- Killed (SIGKILL, as the out-of-memory killer does) mid-upload: the checkpoint commits on a
  new worker and the task succeeds.
- Stopped (SIGSTOP; stuck I/O looks the same): killed after its deadline, replaced, and the
  checkpoint commits.
- The task SIGKILLed while its worker is mid-upload on a link that never answers: the
  worker goes with it, holding none of the task's output, so Metaflow's retry starts
  while that upload would still be stuck.
"""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import FLOWS
from faultproxy import FaultProxy
from flows.worker_flow import content
from test_s3_flows import SMALL_PARTS, committed, data_bytes
from workerkit import RunningFlow, alive, descriptors, gone_within, in_session, workers_of

pytestmark = [pytest.mark.flow, pytest.mark.s3]

PARTS = "partNumber="


def _start(tmp_path: Path, env: dict[str, str], mode: str, **extra: str) -> RunningFlow:
    return RunningFlow(FLOWS / "worker_flow.py",
                       {**env, **SMALL_PARTS, "WORKER_FLOW_MODE": mode, **extra}, tmp_path)


def _only_worker(task: int) -> int:
    found = workers_of(task)
    assert len(found) == 1, f"task {task} has upload workers {found}"
    return found[0]


def _check_commits(client: Any, seeds: list[int]) -> None:
    found = committed(client)
    assert sorted(m["metadata"]["seed"] for _, m in found) == sorted(seeds)
    for key, m in found:
        if m["metadata"]["seed"] < 0:
            continue
        weights = data_bytes(client, key, m, "weights.bin")
        assert weights == content(m["metadata"]["seed"])
        (entry,) = m["files"]
        assert entry["sha256"] == hashlib.sha256(weights).hexdigest()


def test_worker_killed_mid_upload_the_checkpoint_commits_and_the_task_succeeds(
        s3_env: dict[str, str], s3_server: Any, tmp_path: Path) -> None:
    with FaultProxy(s3_server.endpoint) as proxy:
        hold = proxy.hold(method="PUT", query_contains=PARTS)
        flow = _start(tmp_path, {**s3_env, "METAFLOW_S3_ENDPOINT_URL": proxy.endpoint}, "wait")
        try:
            task = int(flow.wait_for(r"TASKPID (\d+)").group(1))
            assert hold.wait_held(2, timeout=60)  # both parts sent, unanswered
            worker = _only_worker(task)
            os.kill(worker, signal.SIGKILL)
            hold.release()
            code, out = flow.finish()
        finally:
            hold.release()
            if flow.proc.poll() is None:
                flow.kill()
    assert code == 0, out
    assert f"upload worker process (pid {worker}) was killed by SIGKILL" in out, out
    assert "RESULT" not in out  # attempt 0 succeeded: no retry of the task was needed
    _check_commits(s3_server.client(), [1])


def test_worker_stopped_is_killed_after_its_deadline_and_the_checkpoint_commits(
        s3_env: dict[str, str], s3_server: Any, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    # A deadline of about three seconds for a 5 MiB part: the settings, not a sleep.
    flow = _start(tmp_path, s3_env, "gate", WORKER_FLOW_GATE=str(gate),
                  METAFLOW_CHECKPOINT_WORKER_TIMEOUT="3",
                  METAFLOW_CHECKPOINT_WORKER_MIN_RATE="1GiB")
    worker = -1
    try:
        task = int(flow.wait_for(r"TASKPID (\d+)").group(1))
        worker = _only_worker(task)  # started by the first save, idle now
        os.kill(worker, signal.SIGSTOP)
        with open(gate, "w"):  # the task reads to the end of it: the second save starts
            pass
        code, out = flow.finish()
    finally:
        if flow.proc.poll() is None:
            flow.kill()
    assert code == 0, out
    assert f"upload worker process (pid {worker}) left a request" in out, out
    assert not alive(worker)
    _check_commits(s3_server.client(), [1, 2])


def test_a_killed_task_leaves_no_worker_and_is_retried_while_its_upload_hangs(
        s3_env: dict[str, str], s3_server: Any, tmp_path: Path) -> None:
    with FaultProxy(s3_server.endpoint) as proxy:
        # The link never answers a part: a worker that kept working on the dead task's
        # upload, or that held the task's stdout and stderr, would keep the retry waiting.
        hold = proxy.hold(method="PUT", query_contains=PARTS)
        flow = _start(tmp_path, {**s3_env, "METAFLOW_S3_ENDPOINT_URL": proxy.endpoint}, "die")
        try:
            task = int(flow.wait_for(r"TASKPID (\d+)").group(1))
            assert hold.wait_held(1, timeout=60)
            worker = _only_worker(task)
            task_output = {os.readlink(f"/proc/{task}/fd/{fd}") for fd in (1, 2)}
            assert not task_output & descriptors(worker), "the worker holds the task's output"
            os.kill(task, signal.SIGKILL)
            assert gone_within(worker, 30), f"worker {worker} outlived its task {task}"
            flow.wait_for(r"RESULT attempt=1")  # the retry ran with the link still stuck
            code, out = flow.finish()
            assert in_session(flow.proc.pid) == []  # nothing of the run is left behind
        finally:
            hold.release()
            if flow.proc.poll() is None:
                flow.kill()
    assert code == 0, out
    _check_commits(s3_server.client(), [-1])
