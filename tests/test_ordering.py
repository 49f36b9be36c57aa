"""Which checkpoint a retry resumes from must not depend on the clocks of the hosts."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from conftest import RunFlow
from storekit import manifests, results

from uploader import checkpoint_order

pytestmark = pytest.mark.flow

SKEW_S = 3600

# Metaflow starts every attempt as its own ``flow.py step ... --retry-count N`` process,
# so this puts attempt 1, and only it, on a host whose clock runs an hour behind.
SITECUSTOMIZE = textwrap.dedent(f"""\
    import sys
    import time

    if any(a == "--retry-count" and b == "1" for a, b in zip(sys.argv, sys.argv[1:])):
        _time, _time_ns = time.time, time.time_ns
        time.time = lambda: _time() - {SKEW_S}
        time.time_ns = lambda: _time_ns() - {SKEW_S} * 10**9
""")


def test_a_retry_whose_clock_runs_behind_is_still_the_latest(
        run_flow: RunFlow, datastore_root: Path, tmp_path: Path) -> None:
    site = tmp_path / "skewed-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = run_flow("skew_flow.py", env={"PYTHONPATH": str(site)})
    r = results(out.stdout + out.stderr)
    assert r["loaded_by_1"] == "0"
    # The clock really was behind where attempt 1 ran: its checkpoint id carries a
    # timestamp earlier than attempt 0's, so a sort on the ids would put it second.
    saved = {m.identity["attempt"]: checkpoint_order(k.checkpoint_id)
             for k, m in manifests(datastore_root)}
    assert sorted(saved) == [0, 1]
    assert saved[0][2] - saved[1][2] > (SKEW_S - 60) * 10**6
    assert r["loaded"] == "1", out.stdout + out.stderr
    assert r["listed"] == "1,0"
