"""A digest of a CRM row's inputs, computed inside the database, so that a diff export can find the changed
rows without sending every row through Python (DESIGN section 9)::

    digest = source_digest(salt, contacts.c.id, contacts.c.email, subscriptions.c.status)

The value has 48 bits, so that the sum over the few contacts sharing an email stays an exact integer on every
backend. PostgreSQL computes it from its own ``md5``; SQLite calls :func:`digest48`, registered on every
connection by ``schema.make_engine``, which combines CRC-32 and Adler-32 (zlib's C code): a change detector,
like a zip file's, three times cheaper than an MD5 per row, and a diff computes one for every CRM row. The two
never meet: a database only compares digests it computed itself.
"""

from __future__ import annotations

import zlib
from typing import Any

from sqlalchemy import ColumnElement, Text, cast, func, literal
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import BigInteger

SEPARATOR = "\x1f"


class _Digest(FunctionElement[int]):
    type = BigInteger()
    inherit_cache = True
    name = "bs_digest"


@compiles(_Digest)
def _digest_sqlite(element: _Digest, compiler: SQLCompiler, **kw: Any) -> str:
    return f"bs_digest({compiler.process(element.clauses, **kw)})"


@compiles(_Digest, "postgresql")
def _digest_postgresql(element: _Digest, compiler: SQLCompiler, **kw: Any) -> str:
    return f"('x' || substr(md5({compiler.process(element.clauses, **kw)}), 1, 12))::bit(48)::bigint"


def source_digest(salt: str, *columns: ColumnElement[Any]) -> ColumnElement[int]:
    """The digest of ``salt`` and the columns' values as text (NULL as empty)."""
    text: ColumnElement[str] = literal(salt, Text)
    for column in columns:
        text = text + SEPARATOR + func.coalesce(cast(column, Text), "")
    return _Digest(text)


def digest48(value: str | None) -> int | None:
    """SQLite's ``bs_digest``: the text's CRC-32 shifted 16 bits left, XOR its Adler-32: 48 bits."""
    if value is None:
        return None
    data = value.encode("utf-8")
    return (zlib.crc32(data) << 16) ^ zlib.adler32(data)
