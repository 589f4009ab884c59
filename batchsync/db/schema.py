"""The canonical CRM tables and batchsync's own ``bs_`` tables (docs/architecture.md, "Data"), in SQLAlchemy Core.

``create_all`` is idempotent: ``batchsync init`` may run any number of times. A profile may map CRM tables onto
the CRM's own tables or views (``db.mapping``); those are skipped here, never created or altered.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.schema import CreateTable

from batchsync.errors import DatabaseError, DatabaseUnavailable, first_line


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python, naive UTC in the database, on every backend alike."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; batchsync keeps time in aware UTC")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment: datetime = datetime.fromisoformat(value) if isinstance(value, str) else value
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


metadata = MetaData()
EMAIL = String(320)

contacts = Table(
    "contacts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("email", EMAIL, nullable=False),
    Column("email_key", EMAIL, nullable=False),
    Column("first_name", String(200)),
    Column("last_name", String(200)),
    Column("custom", JSON),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Index("ix_contacts_email_key", "email_key"),
)

lists = Table(
    "lists",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("code", String(100), nullable=False, unique=True),
    Column("name", String(200)),
)

groups = Table(
    "groups",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("list_id", Integer, ForeignKey("lists.id"), nullable=False),
    Column("code", String(100), nullable=False),
    Column("name", String(200)),
    UniqueConstraint("list_id", "code"),
)

subscriptions = Table(
    "subscriptions",
    metadata,
    Column("contact_id", Integer, ForeignKey("contacts.id"), primary_key=True),
    Column("list_id", Integer, ForeignKey("lists.id"), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("status_at", UtcDateTime, nullable=False),
    Column("source", String(16), nullable=False),
    Column("reason", String(100)),
    Column("consent_by", String(200)),
    Column("consent_at", UtcDateTime),
    Index("ix_subscriptions_list", "list_id", "contact_id"),
    Index("ix_subscriptions_status", "list_id", "status"),  # an import's safety stop counts the subscribed
)

group_members = Table(
    "group_members",
    metadata,
    Column("contact_id", Integer, ForeignKey("contacts.id"), primary_key=True),
    Column("group_id", Integer, ForeignKey("groups.id"), primary_key=True),
    Index("ix_group_members_group", "group_id", "contact_id"),
)

suppressions = Table(
    "suppressions",
    metadata,
    Column("email_key", EMAIL, primary_key=True),
    Column("email", EMAIL, nullable=False),
    Column("reason", String(100), nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("source", String(100), nullable=False),
)

activities = Table(
    "activities",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("contact_id", Integer, ForeignKey("contacts.id"), nullable=False),
    Column("kind", String(50), nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("detail", Text),
    Index("ix_activities_contact", "contact_id", "at"),
)

bs_runs = Table(
    "bs_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("profile", String(100), nullable=False),
    Column("kind", String(20), nullable=False),
    Column("slot", String(60)),  # a scheduled run's name, e.g. "nightly 2026-01-05T02:30+01:00"
    Column("started_at", UtcDateTime, nullable=False),
    Column("finished_at", UtcDateTime),
    Column("outcome", String(20), nullable=False),
    Column("counts", JSON),
    Column("files", JSON),
    Column("message", Text),
    Index("ix_bs_runs_profile", "profile", "started_at"),
)

bs_files = Table(
    "bs_files",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("profile", String(100), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("name", String(500), nullable=False),
    Column("origin", String(1000), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("outcome", String(20), nullable=False),
    Column("run_id", Integer),
    Column("at", UtcDateTime, nullable=False),
    Column("detail", Text),
    Column("kept", String(1000)),  # where the applied file was archived (a crash before the move is finished later)
    Index("ix_bs_files_hash", "profile", "sha256"),
    # The same content is applied at most once, whatever the locks: two processes past them (two hosts on one
    # SQLite file, an admin importing from another work folder) meet here, in the applying transaction.
    Index(
        "ux_bs_files_applied",
        "profile",
        "sha256",
        unique=True,
        sqlite_where=text("outcome = 'applied'"),
        postgresql_where=text("outcome = 'applied'"),
    ),
)

# The export ledger (``db.snapshots``): per profile and list, a snapshot of what the provider has from us, one
# row per address (key, address as sent, fingerprint, status, origin), written once per export as a new
# generation of compressed Arrow chunks while the file is made, and made current by one small commit once the
# upload is confirmed. What the provider reports between two exports goes into ``bs_ledger_notes``, read over the
# snapshot until the next generation takes it in.
bs_snapshots = Table(
    "bs_snapshots",
    metadata,
    Column("profile", String(100), primary_key=True),
    Column("list_code", String(100), primary_key=True),
    Column("generation", Integer, primary_key=True, autoincrement=False),
    Column("state", String(10), nullable=False),  # "pending" (written, not yet confirmed) or "current"
    Column("rows", BigInteger, nullable=False),
    Column("notes_upto", BigInteger, nullable=False),  # the notes it took in: ids up to this one
    Column("hasher", String(60), nullable=False),  # what made its fingerprints: others are not comparable
    Column("made_at", UtcDateTime, nullable=False),
)

bs_snapshot_chunks = Table(
    "bs_snapshot_chunks",
    metadata,
    Column("profile", String(100), primary_key=True),
    Column("list_code", String(100), primary_key=True),
    Column("generation", Integer, primary_key=True, autoincrement=False),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("first_key", EMAIL, nullable=False),  # the chunk's rows are sorted by key, from first_key to last_key
    Column("last_key", EMAIL, nullable=False),
    Column("rows", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),  # Arrow IPC, LZ4: db.snapshots.CHUNK_SCHEMA
)

bs_ledger_notes = Table(
    "bs_ledger_notes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("profile", String(100), nullable=False),
    Column("list_code", String(100), nullable=False),
    Column("email_key", EMAIL, nullable=False),
    # "status": the provider reported this status (applies where the snapshot has the address); "put": the
    # row as given (an address the provider changed takes its old row); "remove": no row any more.
    Column("kind", String(8), nullable=False),
    Column("email", EMAIL),
    Column("contact_id", Integer),
    Column("fingerprint", BigInteger),
    Column("status", String(16)),
    Column("origin", String(10)),
    Column("at", UtcDateTime, nullable=False),
    Index("ix_bs_ledger_notes_key", "profile", "list_code", "email_key"),
)

bs_changes = Table(
    "bs_changes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer),
    Column("contact_id", Integer, nullable=False),
    Column("list_code", String(100), nullable=False),
    Column("old_status", String(16)),
    Column("new_status", String(16), nullable=False),
    Column("rule", String(100), nullable=False),
    Column("source_file", String(500)),
    Column("source_line", Integer),
    Column("at", UtcDateTime, nullable=False),
    # Who made the change: "provider" (its report, not echoed back), "admin" (a file an admin dropped or named:
    # a CRM-side change, sent in the next export; a revert), "callback", or "crm".
    Column("origin", String(16)),
    # What an undo needs (batchsync revert), all nullable: rows written before these columns existed have NULL
    # here and are undone as far as the columns above allow. ``file_id`` is the applied file's bs_files row (a
    # name alone is not unique); ``event`` the inbound event (unsubscribe, hard_bounce, complaint, clean,
    # email_change) or "revert"; the subscription as it was before (``old_*``) and as the change left it
    # (``new_*``: a later change in the CRM itself leaves no bs_changes row, so the revert compares these with
    # the row as it is now). Consent is not here: applying a file never changes it.
    Column("file_id", Integer),
    Column("event", String(20)),
    Column("old_status_at", UtcDateTime),
    Column("old_source", String(16)),
    Column("old_reason", String(100)),
    Column("new_status_at", UtcDateTime),
    Column("new_reason", String(100)),
    # An email change is a row of its own: no list (``list_code`` ''), no status (``new_status`` ''), the
    # contact's address before and after.
    Column("old_email", EMAIL),
    Column("new_email", EMAIL),
    Column("reverts", Integer),  # a revert's row: the id of the bs_changes row it undid
    Index("ix_bs_changes_contact", "contact_id"),
    Index("ix_bs_changes_file", "file_id"),  # a revert reads one file's changes
)

# The provider's opt-outs, remembered for good: per profile, list and address, the latest opt-out the provider
# reported. No export, tombstone, list change, deletion or email change removes a row (an email change the
# provider reports copies it to the new address); only a re-subscription the provider itself reports clears it.
# Every export reads it: such an address is never sent as subscribed.
bs_provider_optouts = Table(
    "bs_provider_optouts",
    metadata,
    # The key in this order: an import looks up an address on every list at once (profile, address); an export
    # looks up one address on one list (all three). With the list second, PostgreSQL read the whole table for
    # each chunk of an import (= ANY over a generic plan): 10 s a chunk at 150k rows.
    Column("profile", String(100), primary_key=True),
    Column("email_key", EMAIL, primary_key=True),
    Column("list_code", String(100), primary_key=True),
    Column("email", EMAIL, nullable=False),
    Column("kind", String(20), nullable=False),  # unsubscribe | hard_bounce | complaint | clean
    Column("at", UtcDateTime, nullable=False),  # when the provider says it happened
    Column("reason", String(100)),
    Column("source", String(600), nullable=False),  # the file and line (or callback) that reported it
    Column("recorded_at", UtcDateTime, nullable=False),
    sqlite_with_rowid=False,
)


def make_engine(url: str) -> Engine:
    """An engine for a CRM URL; ``postgresql://`` means psycopg 3. SQLite gets WAL and foreign keys."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 60}, hide_parameters=True)
            if engine.url.database and engine.url.database != ":memory:":
                Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            # Keepalives: a run lock's session on a cut network is found dead in about a minute, not hours; a
            # server that does not answer at all is given up after connect_timeout.
            keepalives = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
            connect = {**keepalives, "connect_timeout": 15}
            # hide_parameters: an error's text never carries addresses (it reaches logs, status and /healthz).
            engine = create_engine(url, pool_pre_ping=True, connect_args=connect, hide_parameters=True)
    except (SQLAlchemyError, ImportError, ValueError, OSError) as exc:
        raise DatabaseError(f"cannot use database URL {_redact(url)}: {exc}") from None
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _redact(url: str) -> str:
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def missing_tables(engine: Engine, skip: Collection[str] = ()) -> list[str]:
    """What the database lacks: tables, columns of existing tables (``table.column``), and the unique indexes
    batchsync's guarantees rest on (``index name``). ``skip``: the CRM tables a profile maps onto its own
    (``db.mapping`` checks those)."""
    own = [table for name, table in metadata.tables.items() if name not in skip]
    try:
        found = inspect(engine)
        present = set(found.get_table_names())
        columns = {
            table.name: {c["name"] for c in found.get_columns(table.name)} for table in own if table.name in present
        }
        indexes = {
            table.name: {str(i["name"]) for i in found.get_indexes(table.name)}
            for table in own
            if table.name in present
        }
    except SQLAlchemyError as exc:
        raise database_error(exc, "cannot read the database") from None
    missing = [table.name for table in own if table.name not in present]
    for name, have in columns.items():
        missing += [f"{name}.{column.name}" for column in metadata.tables[name].columns if column.name not in have]
    for name, have in indexes.items():
        unique = [index.name for index in metadata.tables[name].indexes if index.unique]
        missing += [f"index {index}" for index in unique if index not in have]
    return missing


def create_all(engine: Engine, skip: Collection[str] = ()) -> None:
    """Create every table and index that is missing, and add the columns a newer batchsync put in its own
    tables; existing data is left as it is. ``skip``: the CRM tables a profile maps onto its own, never
    created or altered here."""
    own = [table for table in metadata.sorted_tables if table.name not in skip]
    try:
        if skip:
            _create_beside(engine, own, skip)
        else:
            metadata.create_all(engine)
        with engine.begin() as connection:
            for name in missing_tables(engine, skip):
                if "." in name and not name.startswith("index "):
                    table, column = name.split(".")
                    definition = _column_sql(metadata.tables[table].c[column], engine)
                    connection.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {definition}")
            _mark_files_applied_twice(connection)
            for index in (index for table in own for index in table.indexes):
                index.create(connection, checkfirst=True)  # create_all adds indexes to new tables only
    except SQLAlchemyError as exc:
        raise database_error(exc, "cannot create tables") from None


def database_error(exc: SQLAlchemyError, what: str) -> DatabaseError:
    """A driver's error as batchsync's: DatabaseUnavailable where the database cannot be reached (waiting may
    help), DatabaseError otherwise."""
    if isinstance(exc, OperationalError | InterfaceError):
        return DatabaseUnavailable(f"{what}: {first_line(exc)}")
    return DatabaseError(f"{what}: {exc}")


def _create_beside(engine: Engine, own: Sequence[Table], skip: Collection[str]) -> None:
    """Create the tables of ``own`` that are missing, without foreign keys to the tables a profile maps onto
    its own (those are elsewhere, or views, which no key can reference)."""
    with engine.begin() as connection:
        for table in own:
            keys = [key for key in table.foreign_key_constraints if key.referred_table.name not in skip]
            connection.execute(CreateTable(table, include_foreign_key_constraints=keys, if_not_exists=True))


def _mark_files_applied_twice(connection: Any) -> None:
    """Before the unique index on applied files exists, a version without it may have applied one content twice
    (two processes past the locks): the later entries become 'applied twice', so the history stays and the
    index can be made."""
    if "ux_bs_files_applied" in {index["name"] for index in inspect(connection).get_indexes("bs_files")}:
        return
    connection.exec_driver_sql(
        "UPDATE bs_files SET outcome = 'applied twice' WHERE outcome = 'applied' AND id NOT IN "
        "(SELECT MIN(id) FROM bs_files WHERE outcome = 'applied' GROUP BY profile, sha256)"
    )


def _column_sql(column: Column[Any], engine: Engine) -> str:
    """A column definition for ALTER TABLE: nullable, or NOT NULL with its constant default."""
    kind = column.type.compile(dialect=engine.dialect)
    if column.nullable:
        return f"{column.name} {kind}"
    default = getattr(column.default, "arg", None)
    if not isinstance(default, str):
        raise DatabaseError(f"cannot add column {column.table.name}.{column.name}: it has no default")
    return f"{column.name} {kind} NOT NULL DEFAULT '{default}'"
