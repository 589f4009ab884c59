"""Applying an inbound file a batch of rows at a time, under the sync rules, on the reconcile's open transaction.

A batch is read at once (``eventframe``), its contacts, subscriptions and the provider's remembered opt-outs are
fetched at once, the rules decide every row at once (``vrules``: the set form of ``rules``, checked against it),
and statuses, audit rows, activities, suppressions, the provider's opt-outs, the ledger's notes and the result
file are written with one bulk statement each. :class:`FileImport` holds what a file's batches share: what its
earlier rows changed (a second opt-out of a subscription is weighed against the first), what it opted out (the
safety stop), its writers and counts::

    state = FileImport(profile, connection, staged, run_id, now, file_id, list_ids, header, writers, tally)
    for events, rejected in batches:
        state.apply(events, rejected)

The file's origin decides who must be told. A provider's report (``provider``, ``callback``) is remembered for
good in ``bs_provider_optouts`` and noted in the export ledger, so it is never echoed back; an admin's file is a
CRM-side change, sent in the next export. Every change is audited with its origin.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import polars as pl
from sqlalchemy import Connection

from batchsync import contactmap, signups, vrules
from batchsync.collect import REPORTED, StagedFile
from batchsync.config import Profile
from batchsync.contactmap import EmailChanges
from batchsync.db import driver, frames, ledger, sets
from batchsync.db.optouts import ProviderOptOuts
from batchsync.eventframe import value
from batchsync.formats.csvfile import ErrorsWriter, ReportWriter
from batchsync.formats.csvframe import cell, write_frame
from batchsync.handlers import HANDLERS, Part, result
from batchsync.rules import OPT_OUT_KINDS
from batchsync.setdecide import PLACE, Decisions, audit_constants, decide
from batchsync.signups import create_signed_up
from batchsync.tally import Tally

OPT_OUTS = sorted(OPT_OUT_KINDS)
BOUNCED = 1000  # hard-bounced addresses listed in a file's outcome
NOTES = 20_000  # the ledger's notes of the provider's statuses, per call


@dataclass
class Writers:
    results: ReportWriter
    errors: ErrorsWriter


class FileImport:
    """One inbound file being applied: the state its batches share, and the batch's steps."""

    def __init__(
        self,
        profile: Profile,
        connection: Connection,
        staged: StagedFile,
        run_id: int | None,
        now: datetime,
        file_id: int | None,
        list_ids: dict[str, int],
        header: list[str],
        writers: Writers,
        tally: Tally,
    ) -> None:
        self.profile, self.connection, self.run_id, self.now = profile, connection, run_id, now
        self.file_id = file_id  # the file's bs_files row: its changes name it, so that it can be reverted
        self.source, self.origin = staged.name, staged.origin
        # A provider's callback is the provider's report, audited as a callback; its statuses are the provider's.
        self.reported = staged.origin in REPORTED
        self.status_source = "provider" if self.reported else staged.origin
        self.list_ids, self.writers, self.tally = list_ids, writers, tally
        self.email_column = staged.kind.columns.email
        self.position = {name: index for index, name in enumerate(header)}
        self.touched = pl.DataFrame(schema={"contact_id": pl.Int64, "list_id": pl.Int64})  # changed by this file
        self.opted_out = pl.DataFrame(schema={"list_code": pl.String, "email_key": pl.String})  # for the stop
        self.changes, self.cleared = EmailChanges(), _cleared({})
        self.created = pl.DataFrame(schema=signups.CREATED)  # the batch's sign-ups made contacts
        driver.tune_for_bulk(connection)  # PostgreSQL, this transaction: no JIT, hashes and sorts held in memory

    def finish(self) -> None:
        """Drop the temporary tables the batches used, so that a pooled connection does not keep their rows."""
        sets.drop_staging(self.connection)

    def opted_out_counts(self) -> dict[str, int]:
        """Per list, the addresses the file took off it (subscribed or pending before): the safety stop's count."""
        counts = self.opted_out.group_by("list_code", maintain_order=True).len()
        return dict(zip(counts["list_code"].to_list(), counts["len"].to_list(), strict=True))

    def value(self, column: str) -> pl.Expr:
        return value(pl.col(column))

    def apply(self, events: pl.DataFrame, rejected: pl.DataFrame) -> None:
        """Apply one batch: its events (``eventframe``), and the rows it could not read."""
        self._count(events, rejected)
        keys = frames.among(self.connection, "bs_import_keys", _keys(events))
        found = sets.contact_ids(self.connection, keys)
        self.created = create_signed_up(self, events, found)
        if not self.created.is_empty():
            found = sets.contact_ids(self.connection, keys)
        rows, self.changes = contactmap.reach(self._lists(events), found, self._emails)
        self.cleared = self._reports(rows, keys)
        part = self._handle(rows)
        decided = decide(self, part)
        self._write(rows, part, decided)
        self._report(rows, rejected, part, decided)

    def _count(self, events: pl.DataFrame, rejected: pl.DataFrame) -> None:
        tally = self.tally
        tally.rows += events.height + rejected.height
        tally.rejected += rejected.height
        tally.warnings += int(events["warning"].is_not_null().sum())
        bounced = events.filter(pl.col("kind") == "hard_bounce")["email"].head(BOUNCED - len(tally.bounced))
        tally.bounced += bounced.to_list()

    def _lists(self, events: pl.DataFrame) -> pl.DataFrame:
        """The lists each row reaches: by the policy (``lists``), and as the provider reported it (``reported``:
        not the lists the policy adds, which the provider does not know of)."""
        kind = pl.when(pl.col("kind").is_in(OPT_OUTS)).then(pl.col("kind")).otherwise(pl.lit("unsubscribe"))
        lists, every = list(self.profile.lists), self.profile.policy.unsubscribe_all_lists
        return events.with_columns(
            lists=vrules.target_lists(kind, pl.col("list_code"), lists, every),
            reported=vrules.target_lists(kind, pl.col("list_code"), lists, False),
        )

    def _emails(self, contacts: list[int]) -> dict[int, str]:
        return sets.contact_emails(self.connection, pl.Series(contacts, dtype=pl.Int64))

    def soft_bounce_counts(self, rows: pl.DataFrame) -> pl.DataFrame:
        contacts = rows["contacts"].explode().drop_nulls()
        return sets.activity_counts(self.connection, contacts, "soft_bounce")

    def _handle(self, rows: pl.DataFrame) -> Part:
        """Each kind's rows to its handler; a row without a contact is no_contact, but a subscribe."""
        part = Part()
        lonely = rows.filter((pl.col("contacts").list.len() == 0) & (pl.col("kind") != "subscribe"))
        part.results.append(result(lonely, "no_contact", pl.lit("no CRM contact with this email")))
        created = rows.join(self.created, on="line", how="semi")
        said = pl.format("contact {} created: {}", pl.col("contacts").list.first(), pl.lit(signups.RULE))
        part.results.append(result(created, "applied", said))
        rows = rows.join(self.created, on="line", how="anti")
        reached = rows.filter((pl.col("contacts").list.len() > 0) | (pl.col("kind") == "subscribe"))
        for handler in dict.fromkeys(HANDLERS.values()):
            kinds = [kind for kind, known in HANDLERS.items() if known is handler]
            mine = reached.filter(pl.col("kind").is_in(kinds))
            if not mine.is_empty():
                part.add(handler(self, mine))
        return part

    # --- the provider's remembered opt-outs -------------------------------------------------------------

    def _reports(self, rows: pl.DataFrame, keys: frames.Among) -> pl.DataFrame:
        """The provider's own opt-outs, for the lists its report covers: remembered for good (the latest per list
        and address); a subscribe it reports clears older ones; an email change it reports carries them to the
        new address. Returns the lists each subscribe cleared."""
        if not self.reported:
            return _cleared({})
        if rows.filter(pl.col("kind").is_in(("subscribe", "email_change"))).is_empty():
            opt_outs = rows.filter(pl.col("kind").is_in(OPT_OUTS)).explode("reported")
            where = pl.format("{}:{}", pl.lit(self.source), pl.col("line")).alias("source")
            code = pl.col("reported").alias("list_code")
            reports = opt_outs.select(code, "email_key", "email", "kind", "at", "reason", where)
            stored = sets.stored_times(self.connection, self.profile.name, keys)
            sets.save_latest(self.connection, self.profile.name, sets.latest(reports, stored), self.now)
            return _cleared({})
        return self._reports_in_order(rows)

    def _reports_in_order(self, rows: pl.DataFrame) -> pl.DataFrame:
        """One row at a time, where the batch's subscribes and email changes make the order matter."""
        wanted = set(rows["email_key"].to_list()) | set(rows["new_key"].drop_nulls().to_list())
        reports = ProviderOptOuts(self.connection, self.profile.name, wanted)
        cleared: dict[int, list[str]] = {}
        kinds = [*OPT_OUTS, "subscribe", "email_change"]
        for row in rows.filter(pl.col("kind").is_in(kinds)).iter_rows(named=True):
            line, key, at = row["line"], row["email_key"], row["at"]
            if row["kind"] == "email_change":
                reports.carry(key, row["new_key"], row["new_email"])
            elif row["kind"] == "subscribe":
                cleared[line] = [code for code in row["reported"] if reports.forget(code, key, at)]
            else:
                for code in row["reported"]:
                    where = f"{self.source}:{line}"
                    reports.remember(code, key, row["email"], row["kind"], at, row["reason"], where)
        reports.save(self.now)
        return _cleared(cleared)

    # --- writes ---------------------------------------------------------------------------------------------

    def _write(self, rows: pl.DataFrame, part: Part, decided: Decisions) -> None:
        """The batch's writes, in the order the import always made them."""
        changed = self.changes.frame()
        if not changed.is_empty():
            moved = changed.unique("contact_id", keep="last", maintain_order=True)
            addresses = moved.select(
                "contact_id", pl.col("new_email").alias("email"), pl.col("new_key").alias("email_key")
            )
            sets.change_emails(self.connection, addresses, self.now)
            if self.reported:  # the provider has the new address: the ledger's rows follow
                ledger.rename_exported_many(self.connection, self.profile.name, self.changes.renamed)
        if part.fields:
            sets.update_fields(self.connection, part.fields, self.now)
        sets.set_statuses(self.connection, decided.statuses.filter(pl.col("existing")).drop("existing"), existing=True)
        sets.set_statuses(
            self.connection, decided.statuses.filter(~pl.col("existing")).drop("existing"), existing=False
        )
        sets.suppress(self.connection, self._suppressions(rows, part))
        sets.add_activities(self.connection, self._activities(rows, part))
        sets.record_changes(self.connection, self._audits(rows, decided))
        if self.reported:
            echoes = self._echoes(rows)
            for start in range(0, echoes.height, NOTES):  # the ledger takes dicts: a slice of them at a time
                notes = echoes.slice(start, NOTES).to_dicts()
                ledger.note_provider_status(self.connection, self.profile.name, notes)

    def _suppressions(self, rows: pl.DataFrame, part: Part) -> pl.DataFrame:
        """The addresses the batch's hard bounces, complaints and cleans suppress (the first row of each)."""
        hard = self.profile.policy.hard_bounce_suppresses
        noted = rows.filter(vrules.suppresses(pl.col("kind"), hard)).select(
            "line", "email_key", "email", pl.col("kind").alias("reason"), "at"
        )
        entries = pl.concat([noted, *part.suppress]).sort("line", maintain_order=True)
        entries = entries.unique("email_key", keep="first", maintain_order=True)
        source = pl.lit(f"{self.origin}:{self.profile.name}").alias("source")
        return entries.select("email_key", "email", "reason", "at", source).sort("email_key")

    def _activities(self, rows: pl.DataFrame, part: Part) -> pl.DataFrame:
        if not part.activities:
            return pl.DataFrame()
        every = pl.concat(part.activities).sort("line", "rank", maintain_order=True)
        detail = pl.format("{}; {} {}:{}", pl.col("detail"), pl.lit(self.origin), pl.lit(self.source), pl.col("line"))
        return every.select("contact_id", "kind", "at", detail.alias("detail"))

    def _echoes(self, rows: pl.DataFrame) -> pl.DataFrame:
        """What the provider now has, per list and address it reported: the ledger notes it, so that the next
        export does not echo it back (the row's last report stands)."""
        reported = rows.filter(pl.col("kind").is_in(OPT_OUTS)).explode("reported")
        status = vrules.opt_out_status(pl.col("kind")).alias("status")
        echoes = reported.select(pl.col("reported").alias("list_code"), "email_key", status)
        last = echoes.unique(["list_code", "email_key"], keep="last", maintain_order=True)
        return last.sort("list_code", "email_key")  # in the ledger's key order (see frames.update)

    def _audits(self, rows: pl.DataFrame, decided: Decisions) -> pl.DataFrame:
        """The batch's audit rows in the order it made the changes: the rules' decisions, and each address an
        email change moved (a row of its own: no list, no status; the addresses before and after)."""
        changed = self.changes.frame()
        moved = changed.select(
            "line",
            "rank",
            pl.lit(0, dtype=pl.Int64).alias("place"),
            *audit_constants(self),
            "contact_id",
            pl.lit("").alias("list_code"),
            pl.lit("").alias("new_status"),
            pl.lit("email change").alias("rule"),
            pl.col("line").alias("source_line"),
            pl.lit("email_change").alias("event"),
            "old_email",
            "new_email",
        )
        every = pl.concat([decided.audits, moved], how="diagonal_relaxed")
        return every.sort(PLACE, maintain_order=True).drop(PLACE) if not every.is_empty() else every

    # --- the result and errors files ---------------------------------------------------------------------------

    def _report(self, rows: pl.DataFrame, rejected: pl.DataFrame, part: Part, decided: Decisions) -> None:
        """Every row's result, in line order; the rejected rows also to the errors file, in the input's columns."""
        done = pl.concat([*part.results, decided.results]).join(
            rows.select("line", "email", "kind", "warning"), on="line", how="left"
        )
        warned = pl.format("warning: {}; {}", pl.col("warning"), pl.col("detail"))
        done = done.with_columns(detail=pl.when(pl.col("warning").is_not_null()).then(warned).otherwise("detail"))
        refused = self.changes.refused
        rows_refused = rows.filter(pl.col("line").is_in(list(refused)))
        said = pl.col("line").replace_strict(refused, default=None, return_dtype=pl.String)
        email_cell = self.position.get(self.email_column, -1)
        unread = rejected.select(
            "line",
            (pl.col(cell(email_cell)).fill_null("") if email_cell >= 0 else pl.lit("")).alias("email"),
            pl.lit("").alias("lists"),
            pl.lit("").alias("kind"),
            pl.lit("rejected").alias("label"),
            pl.col("reason").alias("detail"),
        )
        refusals = rows_refused.select(
            "line", "email", pl.lit("").alias("lists"), "kind", pl.lit("rejected").alias("label"), said.alias("detail")
        )
        columns = ["line", "email", "lists", "kind", "label", "detail"]
        every = pl.concat([done.select(columns), unread, refusals]).sort("line")
        write_frame(self.writers.results, every)
        self._tally(done, len(refused))
        errors = pl.concat([rejected, rows_refused.select(*rejected.columns[:-1], said.alias("reason"))])
        self._errors(errors.sort("line"))

    def _tally(self, done: pl.DataFrame, refused: int) -> None:
        labels = done["label"].value_counts()
        count = dict(zip(labels["label"].to_list(), labels["count"].to_list(), strict=True))
        self.tally.changed += count.get("applied", 0)
        self.tally.no_contact += count.get("no_contact", 0)
        self.tally.unchanged += sum(n for label, n in count.items() if label not in ("applied", "no_contact"))
        self.tally.rejected += refused

    def _errors(self, errors: pl.DataFrame) -> None:
        width = len(self.position)
        for row in errors.iter_rows(named=True):
            cells = [row[cell(index)] for index in range(min(row["width"], width))]
            raw = [text if text is not None else "" for text in cells] + [""] * max(0, row["width"] - width)
            self.writers.errors.write(raw, row["line"], row["reason"])


def _keys(events: pl.DataFrame) -> pl.DataFrame:
    """The batch's address keys, old and new: the contacts and reports to fetch."""
    keys = pl.concat([events["email_key"], events["new_key"].drop_nulls()]).unique()
    return keys.alias("email_key").to_frame()


def _cleared(cleared: dict[int, list[str]]) -> pl.DataFrame:
    """The lists each subscribe row of the batch cleared of the provider's opt-outs."""
    schema: dict[str, Any] = {"line": pl.Int64, "cleared": pl.List(pl.String)}
    return pl.DataFrame({"line": list(cleared), "cleared": list(cleared.values())}, schema=schema)
