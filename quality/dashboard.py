"""The seed's data-quality dashboard as Prefect artifacts and files.

- markdown artifact ``quality-dashboard``: overall score; per entity its score,
  violations, anomalies and trend; recommendations; the score-trend chart embedded as a
  PNG data URI so it shows in the Prefect UI without a file server; the same chart as the
  image artifact ``quality-score-trend``;
- table artifacts: every rule's result (``quality-rules``) and each table's profile
  (``quality-profile-<suite>``);
- files in the output directory: ``score_trend.png``, ``dashboard.md`` and GX Data Docs.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from prefect.artifacts import (  # noqa: E402
    create_image_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from quality.anomalies import Anomaly, Trend  # noqa: E402
from quality.history import ScorePoint  # noqa: E402
from quality.profiling import TableProfile  # noqa: E402
from quality.recommendations import Recommendation  # noqa: E402
from quality.runner import SuiteResult  # noqa: E402
from tasks.file_replace import replace_file  # noqa: E402

_ARROWS = {"up": "↑ up", "down": "↓ down", "stable": "→ stable"}


@dataclass
class QualityReport:
    overall_score: float
    results: list[SuiteResult]
    trends: list[Trend] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)
    recommendations: list[Recommendation] = field(default_factory=list)
    profiles: dict[str, TableProfile] = field(default_factory=dict)

    def trend(self, suite: str) -> Trend | None:
        return next((t for t in self.trends if t.suite == suite), None)


SINGLE_RUN_PAD = dt.timedelta(minutes=30)
"""Half the time axis around a lone run (or runs recorded at one instant)."""
SPAN_PAD = 0.05
"""Share of the runs' time span added on each side, so end points are not on the frame."""


def time_limits(history: dict[str, list[ScorePoint]]) -> tuple[dt.datetime, dt.datetime] | None:
    """The chart's x range: the runs' span plus a margin, or an hour around a single run.

    Left to itself matplotlib widens a zero-width date range to four years, which squeezes
    the first run of a new deployment into an unreadable dot.
    """
    times = [p.checked_at for points in history.values() for p in points]
    if not times:
        return None
    first, last = min(times), max(times)
    pad = (last - first) * SPAN_PAD if last > first else SINGLE_RUN_PAD
    return first - pad, last + pad


def draw_score_chart(history: dict[str, list[ScorePoint]]) -> Figure:
    """A line chart of each suite's score over its recorded runs, scores on a fixed 0-100 axis."""
    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=100)
    for suite, points in sorted(history.items()):
        if points:
            times = [p.checked_at for p in points]
            # matplotlib's stubs type x as numbers; its date converter takes datetimes.
            ax.plot(times, [p.score for p in points], marker="o", label=suite)  # type: ignore[arg-type]
    ax.set_title("Data-quality score per run")
    ax.set_ylabel("score (0-100)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    limits = time_limits(history)
    if limits:
        ax.set_xlim(*limits)  # type: ignore[arg-type]  # datetimes, as for plot() above
        locator = mdates.AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    if ax.lines:
        ax.legend(loc="lower left", fontsize="small")
    return fig


def score_chart(history: dict[str, list[ScorePoint]], path: Path) -> bytes:
    """The score chart as PNG bytes, also written to ``path``."""
    fig = draw_score_chart(history)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    replace_file(path, buffer.getvalue())
    return buffer.getvalue()


def render_markdown(report: QualityReport, chart_png: bytes | None = None) -> str:
    lines = [f"# Data quality: {report.overall_score:.2f} / 100", ""]
    lines += [
        "| Entity | Rows | Score | Violations | Anomalies | Trend | Change |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in report.results:
        trend = report.trend(r.suite)
        change = f"{trend.change:+.2f}" if trend and trend.change is not None else "–"
        anomalies = sum(1 for a in report.anomalies if a.suite == r.suite)
        direction = _ARROWS[trend.direction] if trend else _ARROWS["stable"]
        lines.append(
            f"| {r.suite} ({r.target}{', ' + r.window if r.window else ''}) | {r.row_count} | {r.score:.2f} "
            f"| {len(r.violations)} | {anomalies} | {direction} | {change} |"
        )
    violations = [(r, v) for r in report.results for v in r.violations]
    if violations:
        lines += [
            "",
            "## Violations",
            "",
            "| Entity | Rule | Severity | Unexpected | % | Sample |",
            "|---|---|---|---:|---:|---|",
        ]
        for r, v in violations:
            sample = ", ".join(str(s) for s in v.sample[:5]) if not v.error else f"error: {v.error}"
            lines.append(
                f"| {r.suite} | {v.rule} | {v.severity} | {v.unexpected_count} | {v.unexpected_percent:.2f} | {_cell(sample)} |"
            )
    if report.anomalies:
        lines += [
            "",
            "## Anomalies",
            "",
            "| Entity | Field | Type | Severity | Count | Sample |",
            "|---|---|---|---|---:|---|",
        ]
        for a in report.anomalies:
            lines.append(
                f"| {a.suite} | {_cell(a.field)} | {a.type} | {a.severity} | {a.count} | {_cell(', '.join(map(str, a.sample[:5])))} |"
            )
    lines += ["", "## Recommendations", ""]
    lines += [
        f"- **{x.priority}** {x.title}: {x.description}. {x.action}." for x in report.recommendations
    ] or ["- none"]
    if chart_png:
        lines += ["", "## Score trend", "", f"![score trend]({data_uri(chart_png)})"]
    return "\n".join(lines) + "\n"


def data_uri(png: bytes) -> str:
    """The PNG inline, so the Prefect UI shows it with no file server (Prefect renders data URIs)."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:200]


def _key(text: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def rule_rows(results: list[SuiteResult]) -> list[dict[str, object]]:
    return [
        {
            "suite": r.suite,
            "rule": v.rule,
            "check": v.check,
            "column": v.column or "",
            "severity": v.severity,
            "success": v.success,
            "unexpected_count": v.unexpected_count,
            "unexpected_percent": round(v.unexpected_percent, 4),
            "sample": ", ".join(str(s) for s in v.sample[:5]),
            "error": v.error or "",
        }
        for r in results
        for v in r.rules
    ]


def publish(report: QualityReport, history: dict[str, list[ScorePoint]], output_dir: Path) -> dict[str, str]:
    """Create the Prefect artifacts and write chart and markdown to ``output_dir``; returns the file paths."""
    chart_path = output_dir / "score_trend.png"
    chart = score_chart(history, chart_path)
    markdown = render_markdown(report, chart)
    replace_file(output_dir / "dashboard.md", markdown.encode())
    create_markdown_artifact(markdown, key="quality-dashboard", description="Data-quality dashboard")
    create_image_artifact(data_uri(chart), key="quality-score-trend", description="Score per suite over runs")
    create_table_artifact(rule_rows(report.results), key="quality-rules", description="Result of every rule")
    for suite, profile in report.profiles.items():
        create_table_artifact(
            profile.rows(), key=_key(f"quality-profile-{suite}"), description=f"Profile of {profile.target}"
        )
    return {"chart": str(chart_path), "dashboard": str(output_dir / "dashboard.md")}
