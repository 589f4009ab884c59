"""Reading an export file back with the profile that wrote it: the round trip that proves a profile's format
(tests/test_providers.py). batchsync itself never reads an export back.

    rows = read_export(profile, Path("sent/acme_newsletter_20260105T023000Z_full.csv.zip"))
    rows[0]  # {"email": "ada@example.com", "first_name": "Ada", "status": "subscribed", ...}

Values come back in CRM terms: the status through the inverse of ``status_values`` (several CRM statuses
sharing one provider value come back as the first of them), other values through the inverse of each
column's value map. Case transforms and date formats are one-way and come back as written.
"""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

from batchsync.config import Profile
from batchsync.engine.build import written_columns


def read_export(profile: Profile, path: Path) -> list[dict[str, str]]:
    """The file's rows as CRM values, by the profile's export columns; a header not the profile's is an error."""
    text = _text(profile, path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=profile.export.delimiter)
    header = next(reader)
    columns = {column.header: column for column in written_columns(profile)}
    if header != list(columns):
        raise ValueError(f"{path.name}: header {header} is not the profile's {list(columns)}")
    statuses: dict[str, str] = {}
    for status, value in profile.export.status_values.items():
        statuses.setdefault(value, status)
    rows = []
    for raw in reader:
        row: dict[str, str] = {}
        for (name, column), value in zip(columns.items(), raw, strict=True):
            if column.field == "status":
                row["status"] = statuses[value]
            else:
                reverse = {provider: crm_value for crm_value, provider in column.values.items()}
                row[column.field] = reverse.get(value, value)
            del name
        row.setdefault("status", "subscribed")
        rows.append(row)
    return rows


def _text(profile: Profile, path: Path) -> str:
    encoding = profile.export.encoding
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            [member] = archive.namelist()
            return archive.read(member).decode(encoding)
    return path.read_text(encoding=encoding)
