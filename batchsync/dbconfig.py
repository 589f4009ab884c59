"""A profile's ``[database]``: where the CRM is, and, for a CRM of one's own, where its tables are.

``schema`` and ``[database.tables]`` point batchsync at existing tables or views with the canonical columns
(README, "A CRM of one's own")::

    [database]
    url_env = "CRM_URL"
    schema = "newsletter_api"                 # every CRM table is a relation of its canonical name here...
    [database.tables]
    activities = "activity_feed"              # ...but this one, in that schema,
    suppressions = "crm.do_not_mail_view"     # and this one, in another

A CRM table the profile names this way is *mapped*: it is the CRM's own, batchsync never creates or alters it.
The others are batchsync's canonical tables in the connection's default schema, as without a mapping; so are
batchsync's own ``bs_`` tables, always (put them elsewhere with the role's or the URL's ``search_path``).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The canonical CRM tables (db/schema.py), in the order they are documented.
CRM_TABLES = ("contacts", "lists", "groups", "subscriptions", "group_members", "suppressions", "activities")
# An identifier as PostgreSQL reads it unquoted (at most 63 bytes: a longer one is silently cut), so that a
# name in a profile means what it says; batchsync still quotes every name it writes into SQL.
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
NAME_RULE = "letters, digits and _, not starting with a digit, at most 63 characters"


class FrozenModel(BaseModel):
    """The base of every part of a profile: read-only, no unknown keys, no type coercion."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


def _identifier(value: str, what: str) -> str:
    if not IDENTIFIER.fullmatch(value):
        raise ValueError(f"expected {what} ({NAME_RULE})")
    return value


class CrmTableNames(FrozenModel):
    """``[database.tables]``: per canonical CRM table, the table or view that stands for it, ``"name"`` (in
    ``database.schema``, or the default schema without one) or ``"schema.name"``."""

    contacts: str | None = None
    lists: str | None = None
    groups: str | None = None
    subscriptions: str | None = None
    group_members: str | None = None
    suppressions: str | None = None
    activities: str | None = None

    @field_validator("*")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None:
            parts = value.split(".")
            if len(parts) > 2 or not all(IDENTIFIER.fullmatch(part) for part in parts):
                raise ValueError(f"expected 'name' or 'schema.name', each part an identifier ({NAME_RULE})")
        return value


class DatabaseConfig(FrozenModel):
    """``[database]``: the CRM's URL (or the variable holding it), and where its CRM tables are when they are the CRM's
    own."""

    url: str | None = None
    url_env: str | None = None
    # "schema" is the key; the attribute is named otherwise, as pydantic's models have a ``schema`` of their own.
    crm_schema: str | None = Field(None, alias="schema")
    tables: CrmTableNames = CrmTableNames()

    @field_validator("crm_schema")
    @classmethod
    def _schema(cls, value: str | None) -> str | None:
        return None if value is None else _identifier(value, "a schema name")

    @model_validator(mode="after")
    def _one_source(self) -> DatabaseConfig:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give exactly one of 'url' or 'url_env'")
        if self.url and "@" in self.url and ":" in self.url.split("://", 1)[-1].split("@", 1)[0]:
            raise ValueError("the URL holds a password: put the URL in an environment variable (url_env)")
        return self

    @model_validator(mode="after")
    def _distinct_tables(self) -> DatabaseConfig:
        places = self.locations()
        # In the default schema, batchsync's own tables and the canonical tables it creates are taken.
        seen: dict[tuple[str | None, str], str] = {
            (None, name): f"batchsync's own {name}" for name in CRM_TABLES if name not in places
        }
        for canonical, place in places.items():
            own = place[0] is None and place[1].startswith("bs_")
            taken = seen.get(place) or ("batchsync's own tables" if own else None)
            if taken is not None:
                raise ValueError(f"the CRM table {canonical} would be {_shown(place)}, as {taken}: name it apart")
            seen[place] = f"the CRM table {canonical}"
        return self

    def locations(self) -> dict[str, tuple[str | None, str]]:
        """(schema, name) of each mapped CRM table, by canonical name; a table not in it is batchsync's own
        canonical table in the default schema. A schema of None: the default schema (the search path)."""
        found: dict[str, tuple[str | None, str]] = {}
        for canonical in CRM_TABLES:
            given: str | None = getattr(self.tables, canonical)
            if given is not None:
                schema, _, name = given.rpartition(".")
                found[canonical] = (schema or self.crm_schema, name)
            elif self.crm_schema is not None:
                found[canonical] = (self.crm_schema, canonical)
        return found


def _shown(place: tuple[str | None, str]) -> str:
    return f"{place[0]}.{place[1]}" if place[0] else place[1]
