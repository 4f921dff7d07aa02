"""The dashboard's JSON views over job records on disk (the browser test renders them)."""

from __future__ import annotations

import pytest
from conftest import write_jobs

from ugro.errors import UgroError
from ugro.monitor import dashboard

NOW = 1767262800.0  # 2026-01-01T10:20:00Z


def test_job_view_has_the_record_the_curve_and_each_nodes_log_tail(tmp_path):
    write_jobs(tmp_path)
    view = dashboard.job_view(tmp_path, "bad", NOW)
    assert view["job"]["job_id"] == "bad_20260101_080000"
    assert view["job"]["status"] == "FAILED"
    assert len(view["curve"]["step"]) == 24
    assert set(view["logs"]) == {"lab0", "lab1"}
    assert {"node": "lab1", "rank": 2, "text": "step 20 | loss 2.0000"} in view["logs"]["lab1"]


def test_compare_view_lines_up_two_jobs_and_their_curves(tmp_path):
    write_jobs(tmp_path)
    view = dashboard.compare_view(tmp_path, ["exp_20260101_100000", "exp_20260101_090000"], NOW)
    assert view["jobs"] == ["exp_20260101_100000", "exp_20260101_090000"]
    assert set(view["curves"]) == set(view["jobs"])
    assert {r["key"] for r in view["rows"] if r["differs"]} >= {"status", "final_loss"}


def test_compare_view_needs_two_different_jobs(tmp_path):
    write_jobs(tmp_path)
    with pytest.raises(UgroError, match="two or more different jobs"):
        dashboard.compare_view(tmp_path, ["bad", "bad_20260101_080000"], NOW)
