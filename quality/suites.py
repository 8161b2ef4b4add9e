"""The platform entities' suites: users, projects, agents and tasks (seed 001, SubTasks 2.4.1 and 2.5.3).

Every entity gets the seed's common rules (id not null, valid timestamps, positive
version) plus id uniqueness and row-count bounds; each adds its own fields and enums.
Tables are looked up in the schema the run is given (``public`` by default).
"""

from __future__ import annotations

from collections.abc import Sequence

from prefect.logging import get_logger

from quality.profiling import table_columns
from quality.suite_spec import Rule, Severity, Suite
from tasks.db import connection

USER_ROLES = ["admin", "developer", "viewer", "guest"]
USER_STATUSES = ["active", "inactive", "suspended", "deleted"]
PROJECT_TYPES = ["web", "mobile", "api", "ml", "data"]
PROJECT_STATUSES = ["planning", "active", "paused", "completed", "archived"]
PROJECT_VISIBILITY = ["private", "team", "organization", "public"]
AGENT_TYPES = [
    "ProjectManagerAgent",
    "RequirementsAgent",
    "ArchitectAgent",
    "BackendAgent",
    "FrontendAgent",
    "DatabaseAgent",
    "DevOpsAgent",
    "TestingAgent",
    "DocumentationAgent",
]
AGENT_STATUSES = ["idle", "initializing", "running", "paused", "completed", "failed", "terminated"]
TASK_TYPES = ["epic", "story", "task", "subtask", "bug", "spike"]
TASK_STATUSES = ["todo", "in_progress", "review", "testing", "done", "cancelled"]
TASK_PRIORITIES = ["critical", "high", "medium", "low"]
TASK_COMPLEXITIES = ["XS", "S", "M", "L", "XL", "XXL"]
EMAIL_PATTERN = r"^[^\s@]+@[^\s@]+\.[^\s@]+$"
MAX_ROWS = 100_000_000


def common_rules() -> list[Rule]:
    """The seed's rules for every entity, plus id uniqueness and row-count bounds."""
    return [
        Rule(
            name="not_null_id",
            check="not_null",
            column="id",
            severity="critical",
            message="ID cannot be null",
        ),
        Rule(name="unique_id", check="unique", column="id", severity="critical", message="ID must be unique"),
        Rule(
            name="valid_timestamps",
            check="not_future",
            column="created_at",
            severity="high",
            message="created_at must be a real timestamp, not in the future",
        ),
        Rule(
            name="version_consistency",
            check="range",
            column="version",
            min=1,
            severity="medium",
            message="Version must be positive",
        ),
        Rule(name="row_count_bounds", check="row_count", min=1, max=MAX_ROWS, severity="low"),
    ]


def _in_set(name: str, column: str, values: Sequence[str], severity: Severity) -> Rule:
    return Rule(name=name, check="in_set", column=column, values=list(values), severity=severity)


def _exists(name: str, column: str, references: str) -> Rule:
    return Rule(name=name, check="foreign_key", column=column, references=references, severity="high")


USERS = Suite(
    name="users",
    table="users",
    timestamp_column="created_at",
    rules=[
        *common_rules(),
        Rule(
            name="valid_email",
            check="regex",
            column="email",
            pattern=EMAIL_PATTERN,
            severity="high",
            message="Invalid email format",
        ),
        Rule(name="username_length", check="regex", column="username", pattern=r"^.{3,30}$", severity="low"),
        _in_set("valid_role", "role", USER_ROLES, "medium"),
        _in_set("valid_user_status", "status", USER_STATUSES, "medium"),
    ],
)

PROJECTS = Suite(
    name="projects",
    table="projects",
    timestamp_column="created_at",
    rules=[
        *common_rules(),
        _in_set("valid_status", "status", PROJECT_STATUSES, "high"),
        _in_set("valid_project_type", "type", PROJECT_TYPES, "medium"),
        _in_set("valid_visibility", "visibility", PROJECT_VISIBILITY, "medium"),
        _exists("owner_exists", "owner_id", "users.id"),
    ],
)

AGENTS = Suite(
    name="agents",
    table="agents",
    timestamp_column="created_at",
    rules=[
        *common_rules(),
        Rule(
            name="valid_agent_type",
            check="regex",
            column="type",
            pattern="Agent$",
            severity="critical",
            message="Invalid agent type",
        ),
        _in_set("known_agent_type", "type", AGENT_TYPES, "medium"),
        _in_set("valid_agent_status", "status", AGENT_STATUSES, "medium"),
        Rule(name="temperature_range", check="range", column="temperature", min=0, max=1, severity="medium"),
        _exists("project_exists", "project_id", "projects.id"),
    ],
)

TASKS = Suite(
    name="tasks",
    table="tasks",
    timestamp_column="created_at",
    rules=[
        *common_rules(),
        _exists("project_exists", "project_id", "projects.id"),
        _in_set("valid_task_type", "type", TASK_TYPES, "medium"),
        _in_set("valid_task_status", "status", TASK_STATUSES, "medium"),
        _in_set("valid_priority", "priority", TASK_PRIORITIES, "medium"),
        _in_set("valid_complexity", "complexity", TASK_COMPLEXITIES, "low"),
        Rule(
            name="actual_hours_range", check="range", column="actual_hours", min=0, max=10_000, severity="low"
        ),
    ],
)

ENTITY_SUITES: dict[str, Suite] = {s.name: s for s in (USERS, PROJECTS, AGENTS, TASKS)}


def present_entity_suites(url: str, schema: str) -> list[Suite]:
    """The entity suites whose table exists in ``schema``, so the default scheduled run works on any
    database; the missing ones are logged, not fatal (name them explicitly to make them required)."""
    with connection(url) as conn:
        present = [s for s in ENTITY_SUITES.values() if table_columns(conn, *s.qualified_table(schema))]
    missing = sorted(set(ENTITY_SUITES) - {s.name for s in present})
    if missing:
        get_logger("flowyard.quality").warning(
            "no %s table(s) in schema %s; skipped (pass suites=[...] to require them)",
            ", ".join(missing),
            schema,
        )
    return present
