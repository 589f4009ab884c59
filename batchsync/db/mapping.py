"""Where a profile's CRM tables are: the canonical tables of ``db.schema``, or the CRM's own tables and views
that ``[database] schema`` and ``[database.tables]`` name (``batchsync.dbconfig``).

The mechanism: a :class:`CrmTables` value holds one SQLAlchemy ``Table`` per canonical CRM table.

- Unmapped (the default), they are the module-level Tables of ``db.schema`` themselves: the same statements,
  the same compiled-statement cache entries, the same raw SQL text as before there was a mapping.
- Mapped, they are copies made by ``Table.to_metadata(MetaData(), schema=..., name=...)``, in a MetaData of
  their own that is never created: the canonical columns under the CRM's own relation name.

A profile's engine carries its CrmTables as an execution option (:func:`bind_crm_tables`); every connection it
opens has them, and every statement on a CRM table starts from ``crm_tables(connection)``: Core statements
use its Tables (SQLAlchemy quotes the names), raw SQL its :meth:`CrmTables.sql_name`, the same quoting. Each
profile has an engine of its own, so a daemon runs profiles with different mappings side by side; nothing
changes a module-level Table. ``schema_translate_map`` alone could not do it: it moves schemas, not names,
and a statement compiled by hand (``driver.temporary_table_as``) would not see it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Connection, Engine, MetaData, Table, inspect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.schema import SchemaConst

from batchsync.db import schema
from batchsync.dbconfig import CRM_TABLES, DatabaseConfig
from batchsync.errors import ConfigError, DatabaseError

OPTION = "batchsync_crm_tables"  # the execution option that carries a profile's CrmTables


@dataclass(frozen=True)
class CrmTables:
    """The Table that stands for each canonical CRM table, and which of them are the CRM's own (``mapped``)."""

    contacts: Table
    lists: Table
    groups: Table
    subscriptions: Table
    group_members: Table
    suppressions: Table
    activities: Table
    mapped: frozenset[str] = field(default_factory=frozenset)

    def table(self, name: str) -> Table:
        """The Table standing for the canonical table ``name``."""
        if name not in CRM_TABLES:
            raise KeyError(f"{name!r} is not a CRM table")
        return cast(Table, getattr(self, name))

    def sql_name(self, name: str, connection: Connection) -> str:
        """The canonical table ``name``'s relation as SQL text, quoted where needed exactly as Core quotes it."""
        return connection.dialect.identifier_preparer.format_table(self.table(name))

    def shown(self, name: str) -> str:
        """The relation's name for a person: ``schema.name``, or ``name``."""
        table = self.table(name)
        return f"{table.schema}.{table.name}" if table.schema else table.name


CANONICAL = CrmTables(
    contacts=schema.contacts,
    lists=schema.lists,
    groups=schema.groups,
    subscriptions=schema.subscriptions,
    group_members=schema.group_members,
    suppressions=schema.suppressions,
    activities=schema.activities,
)


def crm_tables_for(config: DatabaseConfig) -> CrmTables:
    """A profile's CRM tables: the canonical ones, or copies under the names its mapping gives."""
    places = config.locations()
    if not places:
        return CANONICAL
    own = MetaData()  # never created: the mapped relations are the CRM's
    tables: dict[str, Any] = {name: CANONICAL.table(name) for name in CRM_TABLES}
    for name, (where, relation) in places.items():
        # The canonical tables have no schema: RETAIN_SCHEMA keeps it so (the search path's first).
        target = SchemaConst.RETAIN_SCHEMA if where is None else where
        tables[name] = tables[name].to_metadata(own, schema=target, name=relation)
    return CrmTables(**tables, mapped=frozenset(places))


def bind_crm_tables(engine: Engine, config: DatabaseConfig) -> Engine:
    """The engine whose connections carry the profile's CRM tables; without a mapping, ``engine`` itself."""
    tables = crm_tables_for(config)
    if tables is CANONICAL:
        return engine
    if engine.dialect.name == "sqlite" and any(tables.table(name).schema for name in tables.mapped):
        raise ConfigError(
            "database.schema, and schema.name in database.tables, need PostgreSQL: on SQLite name tables alone"
        )
    return engine.execution_options(**{OPTION: tables})


def crm_tables(connection: Connection) -> CrmTables:
    """The CRM tables of the profile whose engine opened ``connection``."""
    return cast(CrmTables, connection.get_execution_options().get(OPTION, CANONICAL))


def crm_tables_of(engine: Engine) -> CrmTables:
    return cast(CrmTables, engine.get_execution_options().get(OPTION, CANONICAL))


@dataclass(frozen=True)
class MappedProblem:
    """A mapped CRM table that is not there, or lacks canonical columns."""

    canonical: str
    relation: str
    missing_columns: tuple[str, ...] = ()  # empty: the relation itself is missing

    def __str__(self) -> str:
        where = f"{self.relation} (the profile's {self.canonical} table)"
        if not self.missing_columns:
            return f"{where} does not exist"
        return f"{where} lacks the column{'s' if self.missing_columns[1:] else ''} {', '.join(self.missing_columns)}"


def mapped_problems(engine: Engine) -> list[MappedProblem]:
    """The profile's mapped tables or views that do not exist or lack a canonical column (batchsync reads or
    writes every one of them; what it means is in the README, "The CRM tables")."""
    tables = crm_tables_of(engine)
    problems: list[MappedProblem] = []
    if not tables.mapped:
        return problems  # nothing to check: no connection made for it
    try:
        found = inspect(engine)
        for name in (name for name in CRM_TABLES if name in tables.mapped):
            table = tables.table(name)
            if not found.has_table(table.name, schema=table.schema):  # tables and views alike
                problems.append(MappedProblem(name, tables.shown(name)))
                continue
            have = {column["name"] for column in found.get_columns(table.name, schema=table.schema)}
            lacking = tuple(column.name for column in table.columns if column.name not in have)
            if lacking:
                problems.append(MappedProblem(name, tables.shown(name), lacking))
    except SQLAlchemyError as exc:
        raise schema.database_error(exc, "cannot read the database") from None
    return problems


def missing_tables(engine: Engine) -> list[str]:
    """What the database lacks: batchsync's own tables, columns and indexes (``db.schema.missing_tables``), and
    the profile's mapped tables that are missing or lack columns."""
    skip: Collection[str] = crm_tables_of(engine).mapped
    return schema.missing_tables(engine, skip=skip) + [str(problem) for problem in mapped_problems(engine)]


def refuse_misfits(engine: Engine, advice: str = "") -> None:
    """Raise when a mapped table or view is missing or lacks columns: batchsync never makes or changes them."""
    problems = mapped_problems(engine)
    if problems:
        raise DatabaseError(
            "the CRM's own tables do not fit: "
            + "; ".join(str(problem) for problem in problems)
            + " (batchsync never creates or alters a table named by database.schema or database.tables: "
            + "fix the table or view, or the profile)"
            + advice
        )


def create_all(engine: Engine) -> None:
    """``batchsync init``: check the mapped tables first (nothing is created when one does not fit), then
    create batchsync's own tables and the canonical CRM tables the profile does not map."""
    refuse_misfits(engine)
    schema.create_all(engine, skip=crm_tables_of(engine).mapped)


def open_engine(url: str, config: DatabaseConfig) -> Engine:
    """An engine for a profile's CRM (``schema.make_engine``) carrying the profile's CRM tables."""
    return bind_crm_tables(schema.make_engine(url), config)
