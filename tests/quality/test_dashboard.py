"""The score-trend chart's axes: readable for a first run and for a long history."""

from __future__ import annotations

import datetime as dt

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import pytest

from quality.anomalies import Anomaly
from quality.dashboard import QualityReport, draw_score_chart, render_markdown, score_chart
from quality.history import ScorePoint

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def _points(*offsets_and_scores: tuple[dt.timedelta, float]) -> list[ScorePoint]:
    return [ScorePoint(f"run-{i}", T0 + d, s, 0) for i, (d, s) in enumerate(offsets_and_scores)]


def _x_limits(history: dict[str, list[ScorePoint]]) -> tuple[dt.datetime, dt.datetime]:
    fig = draw_score_chart(history)
    try:
        low, high = fig.axes[0].get_xlim()
        assert fig.axes[0].get_ylim() == (-2, 102)
    finally:
        plt.close(fig)
    return mdates.num2date(low), mdates.num2date(high)


def test_a_single_run_gets_an_hour_around_it_not_years():
    low, high = _x_limits({"users": _points((dt.timedelta(0), 88.0))})
    assert (low, high) == (T0 - dt.timedelta(minutes=30), T0 + dt.timedelta(minutes=30))


def test_runs_at_one_instant_count_as_a_single_run():
    same = {"users": _points((dt.timedelta(0), 88.0)), "tasks": _points((dt.timedelta(0), 70.0))}
    assert _x_limits(same) == (T0 - dt.timedelta(minutes=30), T0 + dt.timedelta(minutes=30))


def test_many_runs_span_their_range_plus_five_percent():
    hourly = _points(*[(dt.timedelta(hours=h), 90.0 - h) for h in range(20)])
    minutes = _points((dt.timedelta(minutes=5), 50.0), (dt.timedelta(minutes=7), 55.0))
    low, high = _x_limits({"users": hourly, "agents": minutes})
    span = dt.timedelta(hours=19)
    assert low == pytest.approx(T0 - span * 0.05, abs=dt.timedelta(milliseconds=1))
    assert high == pytest.approx(T0 + span * 1.05, abs=dt.timedelta(milliseconds=1))


def test_png_is_written_even_without_history(tmp_path):
    png = score_chart({"users": []}, tmp_path / "chart" / "score_trend.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "chart" / "score_trend.png").read_bytes() == png


def test_an_anomaly_on_a_column_named_with_a_pipe_keeps_its_table_row():
    """Profiles cover every column, named however the table names them: a column "in|out" split
    its anomaly row into one cell too many and shifted the type, severity and count columns."""
    anomaly = Anomaly("m", "in|out", "outlier", "high", 2, [500, -300])
    markdown = render_markdown(QualityReport(overall_score=100.0, results=[], anomalies=[anomaly]))
    assert "| m | in\\|out | outlier | high | 2 | 500, -300 |" in markdown.splitlines()
