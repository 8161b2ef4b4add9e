"""The declarative migration file of an online (expand/contract) migration, validated before anything runs.

A file (YAML or JSON) names the migration and lists operations, each a mapping with exactly
one key, the operation type::

    name: add_status
    operations:
      - add_column: {table: orders, column: {name: status, type: text, nullable: false, default: "'new'"}}

SQL fragments (``type``, ``default``, ``up``, ``down``, ``check``) are SQL by nature and are
passed through; identifiers (tables, columns, index names) are validated names and always
quoted. A bad file raises one :class:`~tasks.errors.UserError` line naming the operation
index and type, the field and the problem.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from tasks.errors import UserError, parse_problem, read_user_file, validation_problem


def _no_nul(text: str) -> str:
    """PostgreSQL takes no NUL character in any text, SQL included: caught here, the file is
    refused at load instead of by the step that sends it, after the migration has started."""
    if "\x00" in text:
        raise ValueError("contains a NUL character (\\u0000), which PostgreSQL cannot take; remove it")
    return text


Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=50)]
"""Identifiers: letters, digits and underscores, short enough to leave room for shadow-name prefixes."""
SqlText = Annotated[str, StringConstraints(min_length=1, strip_whitespace=True), AfterValidator(_no_nul)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ForeignKey(_Strict):
    name: Name | None = None
    table: Name
    column: Name
    on_delete: Literal["NO ACTION", "RESTRICT", "CASCADE", "SET NULL", "SET DEFAULT"] = "NO ACTION"


class Check(_Strict):
    name: Name | None = None
    constraint: SqlText


class Unique(_Strict):
    name: Name | None = None


class Column(_Strict):
    name: Name
    type: SqlText
    nullable: bool = True
    default: SqlText | None = None
    primary_key: bool = False
    check: Check | None = None
    unique: Unique | None = None
    references: ForeignKey | None = None


class AddColumn(_Strict):
    table: Name
    column: Column
    up: SqlText | None = Field(default=None, description="Fills existing rows and old-version writes.")

    @model_validator(mode="after")
    def _not_null_needs_values(self) -> AddColumn:
        if self.column.primary_key:
            raise ValueError(
                "column.primary_key: cannot add a primary key column online; use create_index + raw_sql"
            )
        if not self.column.nullable and self.column.default is None and self.up is None:
            raise ValueError(
                "up: a NOT NULL column needs a default or an up expression to fill existing rows"
            )
        return self


class DropColumn(_Strict):
    table: Name
    column: Name
    down: SqlText | None = Field(default=None, description="Fills the column for new-version writes.")


class RenameColumn(_Strict):
    table: Name
    from_: Name = Field(alias="from")
    to: Name


class AlterColumn(_Strict):
    table: Name
    column: Name
    type: SqlText | None = None
    up: SqlText | None = None
    down: SqlText | None = None
    nullable: bool | None = None
    default: SqlText | None = None
    check: Check | None = None
    unique: Unique | None = None
    references: ForeignKey | None = None

    @model_validator(mode="after")
    def _something_to_do(self) -> AlterColumn:
        changes = (self.type, self.nullable, self.default, self.check, self.unique, self.references)
        if all(value is None for value in changes):
            raise ValueError(
                "alter_column changes nothing: give type, nullable, default, check, unique or references"
            )
        if self.type is not None and (self.up is None or self.down is None):
            raise ValueError(
                "up/down: a type change needs both up (old -> new) and down (new -> old) expressions"
            )
        return self

    @property
    def needs_shadow(self) -> bool:
        """A shadow column is needed unless the change is catalog-only (default, DROP NOT NULL)."""
        return (
            self.type is not None
            or self.nullable is False
            or self.check is not None
            or self.unique is not None
            or self.references is not None
        )


class CreateIndex(_Strict):
    name: Name
    table: Name
    columns: list[Name] = Field(min_length=1)
    unique: bool = False
    method: Literal["btree", "hash", "gin", "gist", "brin"] = "btree"


class DropIndex(_Strict):
    name: Name


class CreateTable(_Strict):
    name: Name
    columns: list[Column] = Field(min_length=1)


class DropTable(_Strict):
    name: Name


class RenameTable(_Strict):
    from_: Name = Field(alias="from")
    to: Name


class RawSql(_Strict):
    up: SqlText
    down: SqlText | None = None
    unsafe: bool = False


Operation = (
    AddColumn
    | DropColumn
    | RenameColumn
    | AlterColumn
    | CreateIndex
    | DropIndex
    | CreateTable
    | DropTable
    | RenameTable
    | RawSql
)

OPERATION_TYPES: dict[str, type[Operation]] = {
    "add_column": AddColumn,
    "drop_column": DropColumn,
    "rename_column": RenameColumn,
    "alter_column": AlterColumn,
    "create_index": CreateIndex,
    "drop_index": DropIndex,
    "create_table": CreateTable,
    "drop_table": DropTable,
    "rename_table": RenameTable,
    "raw_sql": RawSql,
}


class MigrationSpec(BaseModel):
    """A validated migration: its name and its operations, in order."""

    name: str
    operations: list[Operation]


def parse_spec(data: Any, source: str = "migration") -> MigrationSpec:
    """Validate raw data (from YAML/JSON) into a :class:`MigrationSpec`, one-line errors."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping with 'name' and 'operations'")
    unknown = sorted(set(data) - {"name", "operations"})
    if unknown:
        raise UserError(
            f"{source}: unknown top-level field(s) {', '.join(unknown)}; expected name and operations"
        )
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9_]{1,40}", name):
        raise UserError(
            f"{source}: field 'name' must be 1-40 lowercase letters, digits or underscores, got {data.get('name')!r}"
        ) from None
    raw_ops = data.get("operations")
    if not isinstance(raw_ops, list) or not raw_ops:
        raise UserError(f"{source}: field 'operations' must be a non-empty list of operations")
    return MigrationSpec.model_construct(
        name=name, operations=[_parse_operation(i, op, source) for i, op in enumerate(raw_ops)]
    )


def _parse_operation(index: int, raw: Any, source: str) -> Operation:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise UserError(
            f"{source}: operation {index}: must be a mapping with exactly one key, one of {', '.join(OPERATION_TYPES)}"
        )
    ((kind, body),) = raw.items()
    model = OPERATION_TYPES.get(kind)
    if model is None:
        raise UserError(
            f"{source}: operation {index}: unknown type {kind!r}; expected one of {', '.join(OPERATION_TYPES)}"
        )
    try:
        return model.model_validate(body if body is not None else {})
    except ValidationError as exc:
        field, message = validation_problem(exc)
        where = f"field '{field}': " if field else ""  # checks across fields name them in the message
        raise UserError(f"{source}: operation {index} ({kind}): {where}{message}") from None


def load_spec(path: str | Path) -> MigrationSpec:
    """Read and validate a migration file (``.yaml``, ``.yml`` or ``.json``)."""
    file = Path(path)
    text = read_user_file(file, "migration file", "pass the path of a .yaml or .json migration")
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        reason = parse_problem(exc)
        raise UserError(
            f"{file.name}: not valid {'JSON' if file.suffix == '.json' else 'YAML'}: {reason}"
        ) from None
    return parse_spec(data, file.name)
