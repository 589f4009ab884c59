"""What today's export and import engines produce, recorded per profile, so that an engine that replaces them can
be shown to produce the same.

One deterministic scenario per profile in ``profiles/`` (every one), on a SQLite CRM in a temporary folder, a
:class:`ManualClock` at fixed times and the local transport standing in for the provider's server:

1. ``full``: a seeded sample CRM (``write_sample_crm``, ``BATCHSYNC_SAMENESS_CONTACTS`` contacts, default
   100,000; the custom fields the profile exports or segments on that the sample lacks are filled in by contact
   id), then a full export; every file it produced is recorded.
2. ``provider_optouts``: the provider reports opt-outs (a file in the profile's own unsubscribe format, imported
   as the provider's), so that ``bs_provider_optouts`` holds rows; its result files and the CRM state after it.
3. Scripted CRM changes (plain SQL, as a CRM's users would make them; not recorded themselves, the diff shows
   them): names, a custom field, unsubscribes, re-subscriptions (with consent after the provider's opt-out, and
   without), deleted contacts, suppressions, group memberships added and removed, a list left and one joined,
   new contacts, second contacts with an existing address, invalid addresses, email changes (a new address,
   and a change of case only). A few thousand contacts at 100k.
4. ``diff``: a diff export; every file it produced.
5. ``import NAME``: each sample return file of the profile's provider in ``samples/<provider>/`` (and, for
   MailUp, an unsubscribers file made by ``write_unsubscribers_file`` from the seeded CRM's picks), with its
   addresses made the CRM's: the people of the small test CRM (alice@example.com...) become CRM contacts that no
   scripted change touched, and MailUp's ``name.N@domain`` become contact N's address; each file's rows are
   repeated for several groups of contacts (``REPLICAS``). The import's result and errors files, and the CRM
   state after it.

What is recorded:

- per file: its path under the provider's folder or the work folder, with the file name's stamp normalised
  (``{stamp}``, ``{mailup_stamp}``; the clock is fixed, so the real name is recorded too and compared), whether
  it starts with a byte order mark, its line ending, its header line, its number of data lines, the sha256 of
  its decoded data lines SORTED, and the first ``SAMPLE`` of those sorted lines (for reading a mismatch). A zip
  is recorded member by member. Row order is not compared: it may legitimately change between engines (a
  columnar engine may write rows grouped by key ranges, or an import may write its result rows in another
  order). The header, the column order, the quoting and the content of every line may not.
- per CRM state: for each table, its columns, its row count, the sha256 of its rows sorted (each row one JSON
  array, the values as SQLite stores them: times as its text, ``2026-01-05 09:00:00.000000``, booleans 0 and 1;
  JSON fields with their keys sorted) and the first ``SAMPLE`` sorted rows. Tables:
  ``contacts``, ``lists``, ``groups``, ``subscriptions``, ``group_members`` (ids of lists and groups shown as
  their codes), ``suppressions``, ``activities`` (without its autoincrement id), ``bs_provider_optouts``,
  ``bs_changes`` (without id, run id, file id and the id a revert row names) and ``bs_files`` (without id and
  run id). Not the export ledger (``bs_exported``, ``bs_pending``): it is internal and will change shape; nor
  ``bs_runs``.
- per step: the counts the engine reports (``ExportResult`` per list, ``FileOutcome`` per file).

The temporary folder's path is replaced by ``$TMP`` wherever it appears (``bs_files``, reason files).

    python -m tests.sameness --record                 # writes tests/sameness/<profile>.json (100k contacts)
    python -m tests.sameness --check -p mailup        # runs and compares, as tests/test_sameness.py does
    python -m tests.sameness --check --dump /tmp/a -p mailup  # and writes every sorted line (diff two engines)
"""

from __future__ import annotations

import argparse
import csv
import difflib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import JSON, Connection, Engine, Table, bindparam, delete, insert, select, update

from batchsync.clock import ManualClock
from batchsync.config import InboundConfig, Profile, load_profile
from batchsync.db.schema import (
    activities,
    bs_changes,
    bs_files,
    bs_provider_optouts,
    contacts,
    group_members,
    groups,
    lists,
    subscriptions,
    suppressions,
)
from batchsync.export import ExportResult
from batchsync.rules import email_key, email_problem
from batchsync.samples import write_sample_crm, write_unsubscribers_file
from batchsync.sync import ImportReport, Sync

Recording = dict[str, Any]

ROOT = Path(__file__).resolve().parents[1]
PROFILES_DIR = ROOT / "profiles"
SAMPLES_DIR = ROOT / "samples"
EXPECTED_DIR = Path(__file__).resolve().parent / "sameness"
CONTACTS_ENV = "BATCHSYNC_SAMENESS_CONTACTS"
DEFAULT_CONTACTS = 100_000
SEED = 20260201
SAMPLE = 30  # sorted lines (rows) kept per file (table) for reading a mismatch
REPLICAS = 40  # each sample file's rows, repeated for this many groups of CRM contacts
MAILUP_REPLICAS = 20  # MailUp's sample names contacts 1..2000 (name.N@domain): repeated for N + 2000 r
MAILUP_SAMPLE_CONTACTS = 2000  # the CRM samples/mailup/unsubscribers_sample.csv was made for (samples/README.md)

T_FULL = datetime(2026, 2, 1, 3, 0, tzinfo=UTC)  # a Sunday
T_OPTOUT = datetime(2026, 2, 1, 9, 0, tzinfo=UTC)  # the provider's opt-outs are imported
OPTED_OUT_AT = datetime(2026, 1, 31, 8, 0, tzinfo=UTC)  # ...and happened about then
T_CHANGE = datetime(2026, 2, 1, 12, 0, tzinfo=UTC)  # the CRM's users change things
T_DIFF = datetime(2026, 2, 2, 3, 0, tzinfo=UTC)
T_IMPORT = datetime(2026, 2, 2, 4, 0, tzinfo=UTC)  # the sample files, ten minutes apart

# The scripted changes pick contacts by id: contact_id % modulus == remainder.
PICK = {
    "name": (97, 1),
    "custom": (89, 2),
    "unsubscribe": (71, 4),
    "resubscribe": (73, 5),
    "delete": (211, 6),
    "suppress": (223, 7),
    "group_add": (101, 8),
    "group_remove": (103, 9),
    "email_change": (307, 10),
    "leave": (227, 11),
    "join": (229, 12),
    "duplicate_of": (997, 13),
    "invalid": (503, 14),
    "case_change": (311, 15),
    "optout": (401, 16),
}
NEW_CONTACTS, DUPLICATES, INVALID = 60, 20, 10
BROKEN = ["{u}@", "{u}.example.com", "{u}@@example.com", "{u} x@example.com", "@example.com", ""]
# The small CRM of tests/crmdata.py, whose addresses the sample files of samples/<provider>/ use.
PEOPLE = ("alice", "bob", "carol", "dave", "eve", "frank", "grace", "heidi", "ivan", "judy")
# Custom fields a profile may export or segments on that the sample CRM lacks: per field, the SQL of its value by
# contact id, and which contacts have it (the others lack the field).
ENRICH: dict[str, tuple[str, str]] = {
    "newsletter": ("CASE WHEN id % 3 = 0 THEN '0' ELSE '1' END", "1 = 1"),
    "country": ("CASE id % 4 WHEN 0 THEN 'Italy' WHEN 1 THEN 'France' ELSE 'ES' END", "id % 4 != 3"),
    "birthday": ("printf('19%02d-%02d-%02d', 50 + id % 50, 1 + id % 12, 1 + id % 28)", "id % 5 != 0"),
}
ADDRESS = re.compile(r"[^@\s,;|]+@[^@\s,;|]+\.[A-Za-z]+")
SAMPLE_CRM_ADDRESS = re.compile(r"([A-Za-z]+)\.(\d+)@.+")
STAMPS = ((re.compile(r"\d{8}T\d{6}Z"), "{stamp}"), (re.compile(r"(?<!\d)\d{18}(?!\d)"), "{mailup_stamp}"))


def profile_names() -> list[str]:
    """Every profile shipped in profiles/."""
    return sorted(path.stem for path in PROFILES_DIR.glob("*.toml"))


def contacts_wanted() -> int:
    return int(os.environ.get(CONTACTS_ENV, DEFAULT_CONTACTS))


def expected_path(name: str) -> Path:
    return EXPECTED_DIR / f"{name}.json"


def load_expected(name: str) -> Recording:
    recording: Recording = json.loads(expected_path(name).read_text(encoding="utf-8"))
    return recording


# ---------------------------------------------------------------------------------------------------------------
# The scenario


@dataclass
class Scenario:
    """One profile's scenario in ``root``; :meth:`run` returns its recording."""

    name: str
    root: Path
    contacts: int = DEFAULT_CONTACTS
    dump: Path | None = None  # also write every sorted line here
    log: Callable[[str], None] = lambda message: None
    steps: list[Recording] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.clock = ManualClock(T_FULL)
        self.profile = load_profile(
            PROFILES_DIR / f"{self.name}.toml",
            overrides={
                "database": {"url": f"sqlite:///{self.root / 'crm.sqlite'}"},
                "work.dir": str(self.root / "work"),
                "transport": {"kind": "local", "path": str(self.root / "provider")},
            },
        )
        self.sync = Sync(self.profile, clock=self.clock)
        self.engine: Engine = self.sync.engine
        self.codes = list(self.profile.lists)
        self.seen: dict[str, tuple[int, int, int]] = {}
        self.opted_out: list[int] = []  # the contacts the provider opted out (step provider_optouts)
        self.opted_out_list = 0
        self.tmp_names = sorted({str(self.root), str(self.root.resolve())}, key=len, reverse=True)
        self.started = time.perf_counter()

    def run(self) -> Recording:
        try:
            self._run()
        finally:
            self.engine.dispose()
        return {
            "profile": self.name,
            "contacts": self.contacts,
            "seed": SEED,
            "steps": self.steps,
        }

    def _run(self) -> None:
        self.sync.init()
        summary = write_sample_crm(self.engine, self.profile, contacts=self.contacts, seed=SEED)
        self._enrich()
        self._timed("seeded")
        self.seen = _tree(self.root)
        self._export("full")
        self._at(T_OPTOUT)
        optouts = self._provider_optouts()
        self._import("provider_optouts", optouts)
        self._at(T_CHANGE)
        self._change()
        self._timed("changed")
        self._at(T_DIFF)
        self._export("diff")
        self._at(T_IMPORT)
        for path in self._sample_files(summary.picks):
            self._import(f"import {path.name}", path)
            self.clock.advance(600)

    # -- steps

    def _export(self, mode: str) -> None:
        result = self.sync.export("full" if mode == "full" else "diff")
        step: Recording = {"step": mode, "counts": _export_counts(result), "files": self._new_files(mode)}
        self.steps.append(step)
        self._timed(mode)

    def _import(self, label: str, path: Path) -> None:
        report = self.sync.import_files([path], origin="provider")
        step: Recording = {"step": label, "counts": _import_counts(report), "files": self._new_files(label)}
        step["state"] = self._state(label)
        self.steps.append(step)
        self._timed(label)

    def _at(self, moment: datetime) -> None:
        self.clock.advance((moment - self.clock.now()).total_seconds())

    def _timed(self, what: str) -> None:
        self.log(f"{self.name}: {what} at {time.perf_counter() - self.started:.1f} s")

    # -- the seeded CRM, completed

    def _enrich(self) -> None:
        """Fill in the custom fields the profile exports or segments on that the sample CRM does not make (in SQL,
        as a CRM's own script would: SQLite writes its JSON without spaces)."""
        wanted = {column.field.removeprefix("custom.") for column in self.profile.export.columns}
        wanted |= {
            entry.segment.field.removeprefix("custom.") for entry in self.profile.lists.values() if entry.segment
        }
        with self.engine.begin() as connection:
            for name in sorted(wanted & set(ENRICH)):
                value, where = ENRICH[name]
                connection.exec_driver_sql(
                    f"UPDATE contacts SET custom = json_set(custom, '$.{name}', {value}) WHERE {where}"
                )

    # -- the provider's opt-outs

    def _provider_optouts(self) -> Path:
        """A file in the profile's own unsubscribe format, opting out subscribed contacts picked by id."""
        kind = _optout_kind(self.profile)
        code = kind.list_code or self.codes[0]
        with self.engine.connect() as connection:
            list_id = _list_ids(connection)[code]
            rows = connection.execute(
                select(contacts.c.id, contacts.c.email)
                .join(subscriptions, subscriptions.c.contact_id == contacts.c.id)
                .where(subscriptions.c.list_id == list_id, subscriptions.c.status == "subscribed")
                .where(contacts.c.deleted.is_(False), _picked(contacts.c.id, "optout"))
                .order_by(contacts.c.id)
            ).all()
        people = [(cid, str(email).strip()) for cid, email in rows if email_problem(str(email)) is None]
        self.opted_out = [cid for cid, _ in people]
        self.opted_out_list = list_id
        lines = [
            _optout_row(kind, self.profile, code, address, OPTED_OUT_AT + timedelta(seconds=cid % 3600))
            for cid, address in people
        ]
        name = kind.patterns[0].replace("*", "sameness", 1).replace("*", "")
        return _write_csv(self.root / "in" / name, kind, [_optout_header(kind), *lines])

    # -- the CRM's own changes

    def _change(self) -> None:
        now = T_CHANGE
        c, s = contacts.c, subscriptions.c
        with self.engine.begin() as connection:
            ids = _list_ids(connection)
            first = ids[self.codes[0]]
            last_id = int(connection.scalar(select(contacts.c.id).order_by(contacts.c.id.desc()).limit(1)) or 0)
            # names, and a custom field
            connection.execute(
                update(contacts).where(_picked(c.id, "name")).values(first_name=c.first_name + " Jr", updated_at=now)
            )
            changed = []
            for cid, custom in connection.execute(select(c.id, c.custom).where(_picked(c.id, "custom"))).all():
                new = dict(custom or {})
                new["city"] = "Torino"
                if "newsletter" in new:
                    new["newsletter"] = "0" if new["newsletter"] == "1" else "1"
                if "country" in new:
                    new["country"] = "Italy" if new["country"] != "Italy" else "France"
                changed.append({"cid": cid, "new_custom": new})
            if changed:
                statement = update(contacts).where(c.id == bindparam("cid")).values(custom=bindparam("new_custom"))
                connection.execute(statement.values(updated_at=now), changed)
            # unsubscribes and re-subscriptions on every list
            connection.execute(
                update(subscriptions)
                .where(_picked(s.contact_id, "unsubscribe"), s.status == "subscribed")
                .values(status="unsubscribed", status_at=now, source="crm", reason="crm")
            )
            connection.execute(
                update(subscriptions)
                .where(_picked(s.contact_id, "resubscribe"), s.status == "unsubscribed")
                .values(status="subscribed", status_at=now, source="crm", reason=None, consent_by="web-form")
                .values(consent_at=now)
            )
            # the provider's opt-outs: half re-subscribed in the CRM with consent given since, half without
            self._resubscribe_opted_out(connection, now)
            # deleted contacts, suppressions
            connection.execute(update(contacts).where(_picked(c.id, "delete")).values(deleted=True, updated_at=now))
            suppressed = set(connection.scalars(select(suppressions.c.email_key)))
            added: dict[str, dict[str, Any]] = {}
            for cid, email in connection.execute(select(c.id, c.email).where(_picked(c.id, "suppress"))).all():
                key = email_key(email)
                if email_problem(email) is None and key not in suppressed:
                    reason = "complaint" if cid % 2 else "admin"
                    added.setdefault(key, {"email_key": key, "email": email.strip(), "reason": reason})
            if added:
                rows = [{**row, "at": now, "source": "crm"} for row in added.values()]
                connection.execute(insert(suppressions), rows)
            # group memberships added and removed
            self._groups(connection, ids)
            # a list left, a list joined
            connection.execute(delete(subscriptions).where(_picked(s.contact_id, "leave"), s.list_id == first))
            on_first = select(s.contact_id).where(s.list_id == first)
            joining = connection.scalars(
                select(c.id).where(_picked(c.id, "join"), c.id.not_in(on_first)).order_by(c.id)
            ).all()
            if joining:
                connection.execute(
                    insert(subscriptions), [_subscription(cid, first, "subscribed", now) for cid in joining]
                )
            # new contacts, second contacts with an existing address, invalid addresses
            self._new_contacts(connection, ids, last_id, now)
            # email changes: a new address, a change of case only, an invalid address
            for what, make in (
                ("email_change", lambda cid, email: f"moved.{cid}@example.net"),
                ("case_change", lambda cid, email: email.strip().upper()),
                ("invalid", lambda cid, email: f"broken.{cid}@@example.com"),
            ):
                found = connection.execute(select(c.id, c.email).where(_picked(c.id, what))).all()
                values = [
                    {"cid": cid, "new_email": make(cid, email), "new_key": email_key(make(cid, email))}
                    for cid, email in found
                    if email_problem(email) is None
                ]
                if values:
                    statement = (
                        update(contacts)
                        .where(c.id == bindparam("cid"))
                        .values(email=bindparam("new_email"), email_key=bindparam("new_key"), updated_at=now)
                    )
                    connection.execute(statement, values)

    def _resubscribe_opted_out(self, connection: Connection, now: datetime) -> None:
        s = subscriptions.c
        with_consent = self.opted_out[0::2]
        without = self.opted_out[1::2]
        on_list = s.list_id == self.opted_out_list
        if with_consent:
            connection.execute(
                update(subscriptions)
                .where(s.contact_id.in_(with_consent), on_list)
                .values(status="subscribed", status_at=now, source="crm", reason=None)
                .values(consent_by="web-form", consent_at=now)
            )
        if without:
            connection.execute(
                update(subscriptions)
                .where(s.contact_id.in_(without), on_list)
                .values(status="subscribed", status_at=now, source="crm", reason=None)
            )
        moved = self.opted_out[:6:2] + self.opted_out[1:6:2]  # and a few of them change address
        for cid in moved:
            address = f"opted.out.moved.{cid}@example.org"
            connection.execute(
                update(contacts).where(contacts.c.id == cid).values(email=address, email_key=address, updated_at=now)
            )

    def _groups(self, connection: Connection, ids: dict[str, int]) -> None:
        g, s, m = groups.c, subscriptions.c, group_members.c
        for code in self.codes:
            codes = list(self.profile.lists[code].groups)
            if not codes:
                continue
            group_id = connection.scalar(select(g.id).where(g.list_id == ids[code], g.code == codes[0]))
            members = select(m.contact_id).where(m.group_id == group_id)
            adding = connection.scalars(
                select(s.contact_id)
                .where(s.list_id == ids[code], s.status == "subscribed", _picked(s.contact_id, "group_add"))
                .where(s.contact_id.not_in(members))
                .order_by(s.contact_id)
            ).all()
            if adding:
                connection.execute(insert(group_members), [{"contact_id": cid, "group_id": group_id} for cid in adding])
        connection.execute(delete(group_members).where(_picked(m.contact_id, "group_remove")))

    def _new_contacts(self, connection: Connection, ids: dict[str, int], last_id: int, now: datetime) -> None:
        c = contacts.c
        found = connection.execute(
            select(c.id, c.email).where(_picked(c.id, "duplicate_of"), c.deleted.is_(False)).order_by(c.id)
        ).all()
        originals = [(cid, email.strip()) for cid, email in found if email_problem(email) is None][:DUPLICATES]
        people: list[tuple[str, str]] = []  # (email, status)
        for index in range(NEW_CONTACTS):
            people.append((f"new.{index}@example.com", "subscribed" if index % 5 else "pending"))
        for index, (_, email) in enumerate(originals):
            variant = (email.upper(), f"  {email} ", email.capitalize(), f"{email.title()} ")[index % 4]
            people.append((variant, "unsubscribed" if index % 2 else "subscribed"))
        for index in range(INVALID):
            people.append((BROKEN[index % len(BROKEN)].format(u=f"new.invalid.{index}"), "subscribed"))
        rows, subs, members = [], [], []
        group_ids = dict(
            connection.execute(select(groups.c.code, groups.c.id).where(groups.c.list_id == ids[self.codes[0]])).all()
        )
        for offset, (email, status) in enumerate(people, start=1):
            cid = last_id + offset
            rows.append(
                {
                    "id": cid,
                    "email": email,
                    "email_key": email_key(email),
                    "first_name": f"New{offset}",
                    "last_name": "Contact",
                    "custom": {"customer_id": f"N{cid:08d}", "city": "Genova", "newsletter": "1", "country": "Italy"},
                    "created_at": now,
                    "updated_at": now,
                    "deleted": False,
                }
            )
            for position, code in enumerate(self.codes):
                if (offset + position) % 4 != 3:  # not on every list
                    subs.append(_subscription(cid, ids[code], status, now))
            if group_ids and offset % 3 == 0:
                members.append({"contact_id": cid, "group_id": group_ids[sorted(group_ids)[offset % len(group_ids)]]})
        connection.execute(insert(contacts), rows)
        connection.execute(insert(subscriptions), subs)
        if members:
            connection.execute(insert(group_members), members)

    # -- the sample return files

    def _sample_files(self, picks: list[tuple[str, str]]) -> list[Path]:
        """The return files of samples/<provider>/ (those an inbound pattern of the profile takes: not MailUp's
        import_newsletter_sample.csv, which shows an export), made to hit the CRM (see :class:`_Mapper`)."""
        folder = SAMPLES_DIR / self.profile.provider
        sources = sorted(path for path in folder.glob("*") if path.is_file() and self._inbound(path.name))
        made: list[Path] = []
        pool = self._pool()
        addresses = self._addresses()
        for index, source in enumerate(sources):
            mapper = _Mapper(pool, index, addresses, MAILUP_REPLICAS if self.profile.provider == "mailup" else REPLICAS)
            target = self.root / "in" / source.name
            if source.suffix == ".zip":
                _rewrite_zip(source, target, self.profile, mapper)
            else:
                kind = self._inbound(source.name)
                assert kind is not None
                _rewrite_csv(source, target, kind, mapper)
            made.append(target)
        if self.profile.provider == "mailup":  # and one made by the sample helpers from the seeded CRM's picks
            path = self.root / "in" / "unsubscribers_generated.csv"
            write_unsubscribers_file(path, picks, self.profile, seed=SEED)
            made.append(path)
        return made

    def _inbound(self, name: str) -> InboundConfig | None:
        return next((entry for entry in self.profile.inbound if entry.matches(name)), None)

    def _pool(self) -> list[str]:
        """Addresses of contacts no scripted change touched: valid, each address once in the CRM, live, not
        suppressed, subscribed on every list of the profile, never opted out by the provider; from the middle of
        the CRM on (MailUp's sample names the first ones)."""
        with self.engine.connect() as connection:
            everyone = connection.execute(select(contacts.c.id, contacts.c.email, contacts.c.deleted)).all()
            suppressed = set(connection.scalars(select(suppressions.c.email_key)))
            opted = set(connection.scalars(select(bs_provider_optouts.c.email_key)))
            subscribed: dict[int, int] = {}
            for cid in connection.scalars(
                select(subscriptions.c.contact_id).where(subscriptions.c.status == "subscribed")
            ):
                subscribed[cid] = subscribed.get(cid, 0) + 1
        owners: dict[str, int] = {}
        for _, email, _ in everyone:
            owners[email_key(email)] = owners.get(email_key(email), 0) + 1
        excluded = suppressed | opted
        pool: list[str] = []
        for cid, email, deleted in sorted(everyone):
            key = email_key(email)
            if cid <= self.contacts // 2 or deleted or cid > self.contacts or _touched(cid):
                continue
            single = email_problem(email) is None and owners[key] == 1 and key not in excluded
            if single and subscribed.get(cid, 0) == len(self.codes):
                pool.append(email.strip())
        if not pool:
            raise ValueError(f"{self.name}: no contact to map the sample files' people to; more contacts needed")
        return pool

    def _addresses(self) -> dict[int, str]:
        with self.engine.connect() as connection:
            return {cid: email for cid, email in connection.execute(select(contacts.c.id, contacts.c.email))}

    # -- what a step produced

    def _new_files(self, step: str) -> dict[str, Recording]:
        now = _tree(self.root)
        fresh = sorted(path for path, signature in now.items() if self.seen.get(path) != signature)
        self.seen = now
        found: dict[str, Recording] = {}
        for relative in fresh:
            if not _kept(relative):
                continue
            key = _normalised(relative)
            while key in found:
                key += "#"
            found[key] = self._file(self.root / relative, relative, f"{step}/{key}")
        return found

    def _file(self, path: Path, relative: str, label: str) -> Recording:
        if path.suffix == ".zip":
            members: dict[str, Recording] = {}
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    key = _normalised(info.filename)
                    content = self._content(archive.read(info), f"{label}!{key}")
                    members[key] = {"name": info.filename, **content}
            return {"name": relative, "members": members}
        return {"name": relative, **self._content(path.read_bytes(), label)}

    def _content(self, raw: bytes, label: str) -> Recording:
        text, encoding, bom = _decode(raw)
        newline = "\r\n" if "\r\n" in text else "\n"
        lines = text.split(newline)
        if lines and lines[-1] == "":
            lines.pop()
        lines = [self._untmp(line) for line in lines]
        header, data = (lines[0] if lines else None), sorted(lines[1:])
        self._dump(label, [] if header is None else [header], data)
        return {
            "encoding": encoding,
            "bom": bom,
            "newline": newline,
            "header": header,
            **_digest(data),
        }

    def _state(self, step: str) -> dict[str, Recording]:
        """Each table's rows as JSON lines, made by SQLite itself (100k contacts take a second, not ten)."""
        state: dict[str, Recording] = {}
        with self.engine.connect() as connection:
            for table, dropped in STATE_TABLES:
                names = [column.name for column in table.columns if column.name not in dropped]
                query = _state_query(table, dropped)
                rows = sorted(self._untmp(line) for (line,) in connection.exec_driver_sql(query))
                self._dump(f"{step}/{table.name}", [json.dumps(names)], rows)
                state[table.name] = {"columns": names, **_digest(rows)}
        return state

    def _untmp(self, text: str) -> str:
        for name in self.tmp_names:
            if name in text:
                text = text.replace(name, "$TMP")
        return text

    def _dump(self, label: str, header: list[str], lines: list[str]) -> None:
        if self.dump is None:
            return
        target = self.dump / self.name / (re.sub(r"[^\w.{}!#-]+", "_", label) + ".txt")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(line + "\n" for line in (*header, *lines)), encoding="utf-8")


# The CRM state: each table, less the columns an engine may legitimately number otherwise (autoincrement ids,
# the ids of runs and of bs_files rows).
STATE_TABLES: tuple[tuple[Table, frozenset[str]], ...] = (
    (contacts, frozenset()),
    (lists, frozenset()),
    (groups, frozenset({"id"})),
    (subscriptions, frozenset()),
    (group_members, frozenset()),
    (suppressions, frozenset()),
    (activities, frozenset({"id"})),
    (bs_provider_optouts, frozenset()),
    (bs_changes, frozenset({"id", "run_id", "file_id", "reverts"})),
    (bs_files, frozenset({"id", "run_id"})),
)


def _state_query(table: Table, dropped: frozenset[str]) -> str:
    """One JSON array per row of ``table``, less the ``dropped`` columns, as SQLite stores the values (times as
    its text, booleans 0 and 1); the ids of lists and groups as their codes, JSON objects with sorted keys."""
    cells = []
    for column in table.columns:
        name = column.name
        if name in dropped:
            continue
        if name == "list_id":
            cells.append("(SELECT code FROM lists WHERE lists.id = t.list_id)")
        elif name == "group_id":
            cells.append(
                "(SELECT l.code || '/' || g.code FROM \"groups\" AS g JOIN lists AS l ON l.id = g.list_id "
                "WHERE g.id = t.group_id)"
            )
        elif isinstance(column.type, JSON):
            value = "CASE WHEN type IN ('object', 'array') THEN json(value) ELSE value END"
            by_key = f"SELECT key, value, type FROM json_each(t.{name}) ORDER BY key"
            cells.append(
                f"CASE WHEN t.{name} IS NULL THEN NULL ELSE json((SELECT json_group_object(key, {value}) "
                f"FROM ({by_key}))) END"
            )
        else:
            cells.append(f"t.{name}")
    return f'SELECT json_array({", ".join(cells)}) FROM "{table.name}" AS t'


def _picked(column: Any, what: str) -> Any:
    modulus, remainder = PICK[what]
    return column % modulus == remainder


def _touched(cid: int) -> bool:
    return any(cid % modulus == remainder for modulus, remainder in PICK.values())


def _list_ids(connection: Connection) -> dict[str, int]:
    return {code: lid for lid, code in connection.execute(select(lists.c.id, lists.c.code))}


def _subscription(cid: int, list_id: int, status: str, now: datetime) -> dict[str, Any]:
    consent = status in ("subscribed", "pending")
    return {
        "contact_id": cid,
        "list_id": list_id,
        "status": status,
        "status_at": now,
        "source": "crm",
        "reason": None if consent else "crm",
        "consent_by": "web-form" if consent else None,
        "consent_at": now if consent else None,
    }


def _optout_kind(profile: Profile) -> InboundConfig:
    """The profile's inbound kind for plain unsubscribes."""
    for entry in profile.inbound:
        if entry.unzip:
            continue
        if entry.event == "unsubscribe" or any(code.event == "unsubscribe" for code in entry.codes.values()):
            return entry
    raise ValueError(f"profile {profile.name} has no inbound kind for unsubscribes")


def _optout_header(kind: InboundConfig) -> list[str]:
    c = kind.columns
    names = [c.email, c.list_id, c.at, c.reason, c.note, c.new_email]
    return list(dict.fromkeys(name for name in names if name is not None))


def _optout_row(kind: InboundConfig, profile: Profile, code: str, address: str, at: datetime) -> list[str]:
    c = kind.columns
    reason = next((key for key, entry in kind.codes.items() if entry.event == "unsubscribe"), "")
    values = {
        c.email: address,
        c.list_id: profile.lists[code].id,
        c.at: at.astimezone(ZoneInfo(kind.timezone)).strftime(kind.timestamp_formats[0]),
        c.reason: reason,
        c.note: "no longer interested",
        c.new_email: "",
    }
    return [values[name] for name in _optout_header(kind)]


def _write_csv(path: Path, kind: InboundConfig, rows: Sequence[Sequence[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=kind.delimiter, quotechar=kind.quote, lineterminator="\r\n").writerows(rows)
    path.write_bytes(buffer.getvalue().encode(kind.encoding))
    return path


@dataclass
class _Mapper:
    """The addresses of a sample file made the CRM's, for replica ``r``: a person of the small test CRM becomes a
    contact of the pool (a slice of its own per file and replica), ``name.N@domain`` (MailUp's sample CRM)
    becomes contact N + 2000 r, any other address gets the replica in its name."""

    pool: list[str]
    file_index: int
    addresses: dict[int, str]
    replicas: int

    def cell(self, cell: str, replica: int) -> str:
        address = cell.strip()
        if not ADDRESS.fullmatch(address):
            return cell
        local = _local(address)
        if local in PEOPLE:
            slot = (self.file_index * REPLICAS + replica) * len(PEOPLE) + PEOPLE.index(local)
            return self.pool[slot % len(self.pool)]
        found = SAMPLE_CRM_ADDRESS.fullmatch(address)
        if found:
            count = len(self.addresses)
            cid = (int(found.group(2)) - 1 + MAILUP_SAMPLE_CONTACTS * replica) % count + 1
            mapped = self.addresses.get(cid, "").strip()
            return mapped.title() if address != address.lower() else mapped
        user, _, domain = address.partition("@")
        return f"{user}.r{replica}@{domain}"


def _local(address: str) -> str:
    return address.strip().partition("@")[0].lower()


def _replicated(text: str, kind: InboundConfig, mapper: _Mapper) -> str:
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=kind.delimiter, quotechar=kind.quote))
    header, body = rows[0], rows[1:]
    out = io.StringIO()
    writer = csv.writer(out, delimiter=kind.delimiter, quotechar=kind.quote, lineterminator="\r\n")
    writer.writerow(header)
    for replica in range(mapper.replicas):
        writer.writerows([mapper.cell(cell, replica) for cell in row] for row in body)
    return out.getvalue()


def _rewrite_csv(source: Path, target: Path, kind: InboundConfig, mapper: _Mapper) -> None:
    encoding = "utf-8-sig" if kind.encoding in ("utf-8", "utf-8-sig") else kind.encoding
    text = source.read_bytes().decode(encoding)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(_replicated(text, kind, mapper).encode(kind.encoding))


def _rewrite_zip(source: Path, target: Path, profile: Profile, mapper: _Mapper) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as made:
        for info in original.infolist():
            name = info.filename.rsplit("/", 1)[-1]
            kind = next((entry for entry in profile.inbound if not entry.unzip and entry.matches(name)), None)
            data = original.read(info)
            if kind is not None:
                data = _replicated(data.decode("utf-8-sig"), kind, mapper).encode(kind.encoding)
            made.writestr(zipfile.ZipInfo(info.filename, info.date_time), data, zipfile.ZIP_DEFLATED)


def _export_counts(result: ExportResult) -> Recording:
    return {
        "mode": result.mode,
        "lists": {
            item.list_code: {
                "rows": item.rows,
                "tombstones": item.tombstones,
                "duplicates": item.duplicates,
                "invalid": item.invalid,
                "taken_off": item.taken_off,
                "uploaded": item.uploaded,
                "stopped": item.stopped,
            }
            for item in result.files
        },
    }


def _import_counts(report: ImportReport) -> Recording:
    return {
        "files": [
            {
                "name": item.name,
                "outcome": item.outcome,
                "origin": item.origin,
                "reason": item.reason,
                "rows": item.rows,
                "changed": item.changed,
                "unchanged": item.unchanged,
                "no_contact": item.no_contact,
                "rejected": item.rejected,
                "warnings": item.warnings,
                "bounced": sorted(item.bounced),
            }
            for item in report.files
        ],
        "refused": report.refused,
    }


def _tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under ``root`` by its relative path: size, modification time and inode (a file replaced or
    rewritten changes one of them)."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            info = path.stat()
            found[path.relative_to(root).as_posix()] = (info.st_size, info.st_mtime_ns, info.st_ino)
    return found


REPORT_SUFFIXES = (".duplicates.csv", ".skipped.csv", ".result.csv", ".errors.csv")


def _kept(relative: str) -> bool:
    """The files a step's record holds: everything uploaded (the provider's folder), the reports beside what was
    sent and of lists nothing was sent for, held and quarantined files, and an import's result and errors files.
    Not the copies of uploads in sent/, nor archived inputs, staging, the outbox or the lock."""
    top, _, rest = relative.partition("/")
    if top == "provider":
        return True
    if top != "work":
        return False
    folder = rest.partition("/")[0]
    if folder in ("reports", "held", "quarantine"):
        return True
    if folder in ("sent", "archive"):
        return relative.endswith(REPORT_SUFFIXES)
    return False


def _normalised(relative: str) -> str:
    for pattern, placeholder in STAMPS:
        relative = pattern.sub(placeholder, relative)
    return relative


def _decode(raw: bytes) -> tuple[str, str, bool]:
    """The text of a file, the encoding it was read in, and whether it starts with a byte order mark."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16"), "utf-16", True
    if raw.startswith(b"\xef\xbb\xbf"):
        return raw[3:].decode("utf-8"), "utf-8", True
    try:
        return raw.decode("utf-8"), "utf-8", False
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace"), "cp1252", False


def _digest(lines: list[str]) -> Recording:
    """Count, sha256 and the first SAMPLE of sorted lines."""
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return {"rows": len(lines), "sha256": digest.hexdigest(), "sample": lines[:SAMPLE]}


# ---------------------------------------------------------------------------------------------------------------
# Running and comparing


def run_profile(
    name: str,
    folder: Path | None = None,
    *,
    contacts: int | None = None,
    dump: Path | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> Recording:
    """The scenario of one profile, in ``folder`` (or a temporary folder, removed after)."""
    count = contacts if contacts is not None else contacts_wanted()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        return Scenario(name, folder, count, dump, log).run()
    with tempfile.TemporaryDirectory(prefix=f"sameness-{name}-") as made:
        return Scenario(name, Path(made), count, dump, log).run()


def compare(expected: Recording, actual: Recording) -> list[str]:
    """What differs between two recordings of one profile, each problem naming the profile, step, file or
    table, the counts and the sample lines that differ; empty when they are the same."""
    name = expected["profile"]
    problems: list[str] = []
    if expected["contacts"] != actual["contacts"] or expected["seed"] != actual["seed"]:
        problems.append(
            f"{name}: recorded with {expected['contacts']} contacts and seed {expected['seed']}, "
            f"run with {actual['contacts']} and {actual['seed']}"
        )
        return problems
    wanted = {step["step"]: step for step in expected["steps"]}
    got = {step["step"]: step for step in actual["steps"]}
    if list(wanted) != list(got):
        problems.append(f"{name}: steps {list(wanted)} expected, {list(got)} now")
    for label in (label for label in wanted if label in got):
        where = f"{name} / step {label!r}"
        before, now = wanted[label], got[label]
        if before["counts"] != now["counts"]:
            problems.append(f"{where}: counts differ:\n{_dict_diff(before['counts'], now['counts'])}")
        problems += _compare_files(where, before["files"], now["files"])
        if "state" in before or "state" in now:
            problems += _compare_tables(where, before.get("state", {}), now.get("state", {}))
    if problems:
        commit = expected.get("recorded_at", "the recorded commit")
        problems.append(
            f"{name}: to see every line that differs, run `python -m tests.sameness --check --dump DIR -p {name}` "
            f"on this code and on {commit} (two DIRs), then diff them"
        )
    return problems


def _compare_files(where: str, expected: dict[str, Recording], actual: dict[str, Recording]) -> list[str]:
    problems = []
    for key in sorted(set(expected) - set(actual)):
        problems.append(f"{where}: file {key} ({expected[key]['name']}) expected, not produced")
    for key in sorted(set(actual) - set(expected)):
        problems.append(f"{where}: file {key} ({actual[key]['name']}) produced, not expected")
    for key in sorted(set(expected) & set(actual)):
        before, now = expected[key], actual[key]
        if before["name"] != now["name"]:
            problems.append(f"{where}: file {key} named {before['name']} expected, {now['name']} now")
        if "members" in before or "members" in now:
            problems += _compare_files(f"{where} / zip {key}", before.get("members", {}), now.get("members", {}))
            continue
        problems += _compare_lines(f"{where} / file {key}", before, now, ("encoding", "bom", "newline", "header"))
    return problems


def _compare_tables(where: str, expected: dict[str, Recording], actual: dict[str, Recording]) -> list[str]:
    problems = []
    for table in sorted(set(expected) | set(actual)):
        if table not in actual or table not in expected:
            problems.append(f"{where}: table {table} {'not recorded now' if table in expected else 'not expected'}")
            continue
        problems += _compare_lines(f"{where} / table {table}", expected[table], actual[table], ("columns",))
    return problems


def _compare_lines(where: str, expected: Recording, actual: Recording, exact: Iterable[str]) -> list[str]:
    problems = [
        f"{where}: {key} {expected.get(key)!r} expected, {actual.get(key)!r} now"
        for key in exact
        if expected.get(key) != actual.get(key)
    ]
    if expected["rows"] != actual["rows"] or expected["sha256"] != actual["sha256"]:
        lines = "\n".join(
            "    " + line
            for line in difflib.unified_diff(expected["sample"], actual["sample"], "expected", "now", n=1, lineterm="")
        )
        same = " (the first sorted lines are the same: the difference is further on)" if not lines else ""
        problems.append(
            f"{where}: {expected['rows']} rows expected, {actual['rows']} now; the sha256 of the sorted lines "
            f"{'differs' if expected['sha256'] != actual['sha256'] else 'is the same'}{same}"
            + (f"\n  first {SAMPLE} sorted lines, - expected + now:\n{lines}" if lines else "")
        )
    return problems


def _dict_diff(expected: Any, actual: Any) -> str:
    before = json.dumps(expected, indent=1, sort_keys=True, ensure_ascii=False).splitlines()
    after = json.dumps(actual, indent=1, sort_keys=True, ensure_ascii=False).splitlines()
    return "\n".join("    " + line for line in difflib.unified_diff(before, after, "expected", "now", n=2, lineterm=""))


def git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "batchsync"], cwd=ROOT, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip() + (" (batchsync/ modified)" if dirty.stdout.strip() else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sameness", description=(__doc__ or "").split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--record", action="store_true", help="write tests/sameness/<profile>.json")
    action.add_argument("--check", action="store_true", help="run and compare with tests/sameness/<profile>.json")
    parser.add_argument("-p", "--profile", action="append", help="a profile (default: every one in profiles/)")
    parser.add_argument("--contacts", type=int, help=f"default: ${CONTACTS_ENV} or {DEFAULT_CONTACTS}")
    parser.add_argument("--dump", type=Path, help="also write every sorted line and row under this folder")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    names = args.profile or profile_names()
    failed = 0
    for name in names:
        started = time.perf_counter()
        folder = args.keep / name if args.keep else None
        if folder is not None and folder.exists():
            shutil.rmtree(folder)
        recording = run_profile(name, folder, contacts=args.contacts, dump=args.dump, log=_say)
        took = time.perf_counter() - started
        if args.record:
            recording = {"recorded_at": git_commit(), **recording}
            EXPECTED_DIR.mkdir(parents=True, exist_ok=True)
            text = json.dumps(recording, indent=1, ensure_ascii=False) + "\n"
            expected_path(name).write_text(text, encoding="utf-8")
            _say(f"{name}: recorded in {took:.1f} s -> {expected_path(name).relative_to(ROOT)}")
            continue
        problems = compare(load_expected(name), recording)
        failed += bool(problems)
        _say(f"{name}: {'DIFFERS' if problems else 'the same'} ({took:.1f} s)")
        for problem in problems:
            _say(problem)
    return 1 if failed else 0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
