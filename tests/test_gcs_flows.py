"""Flows on Metaflow's gs datastore, run as users run them, against the GCS emulator: what
only GCS has (a missing bucket, the settings its factory reads). The seed example, a retried
foreach and retention run on every store in tests/test_store_flows.py and
tests/test_retention_flows.py, the command line in tests/test_cli.py."""

from __future__ import annotations

import pytest
from conftest import RunFlow

pytestmark = [pytest.mark.flow, pytest.mark.gcs]


def test_a_missing_bucket_fails_the_task_and_says_what_to_check(
        run_flow: RunFlow, gcs_env: dict[str, str]) -> None:
    env = {**gcs_env, "METAFLOW_DATASTORE_SYSROOT_GS": "gs://no-such-bucket-x/metaflow"}
    out = run_flow("foreach_flow.py", env=env, check=False)
    assert out.returncode != 0
    assert "no-such-bucket-x" in out.stdout + out.stderr


def test_gs_factory_reads_metaflow_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import metaflow  # noqa: F401  the extension's modules import through it

    from metaflow_extensions.asynccheckpoint.plugins.shared.exceptions import (
        CheckpointConfigException,
    )
    from metaflow_extensions.asynccheckpoint.plugins.shared.gs_storage import (
        emulator_endpoint,
        split_gs_url,
    )

    assert split_gs_url("gs://bucket/a/b/") == ("bucket", "a/b")
    assert split_gs_url("gs://bucket") == ("bucket", "")
    with pytest.raises(CheckpointConfigException, match="METAFLOW_DATASTORE_SYSROOT_GS"):
        split_gs_url("s3://bucket/x")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:9023")
    assert emulator_endpoint() == "http://127.0.0.1:9023"
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    assert emulator_endpoint() is None
