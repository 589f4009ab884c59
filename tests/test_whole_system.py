"""The whole system against an independent model of its guarantees: a stateful property test (hypothesis).

A small CRM on SQLite, driven through the library by random steps: CRM changes (subscribe with and without
consent, unsubscribe, pending, leave a list, delete, change an address or its letter case), files from MailUp
(opt-outs with documented and unknown codes, bounces, complaints, email changes, at times before and after the
CRM's changes, some from the future), an admin's files, the same file twice, diff and full exports, and time
moving on. The model keeps only what batchsync promises, worked out on its own:

- no address the provider opted out (ever: MailUp reports no re-subscriptions), that an admin opted out (until
  the CRM changes that address again), or that is suppressed, is in an export file as subscribed;
- after every import, each opt-out newer than the CRM's state of a contact on a list is in the CRM, and a
  consented re-subscription newer than every opt-out of the file stands;
- an address is never twice in one file;
- an address the provider has from us as subscribed that leaves a list, is deleted or changes away, and an
  admin's opt-out of one, goes out as unsubscribed in the next export;
- the same file twice changes nothing.

It runs with a fixed seed (derandomize), so that CI runs the same examples every time, and enough of them to
find each way an opt-out was lost before the provider's opt-outs had a table of their own: with that fix taken
out, or the carrying of opt-outs to a changed address, or the check of email changes against a file's earlier
rows, it fails (checked; 1,000 examples were needed for an opt-out the CRM had already made).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule
from sqlalchemy import delete, func, insert, select, update

from batchsync.clock import ManualClock
from batchsync.config import load_profile
from batchsync.db import crm
from batchsync.db.schema import activities, contacts, subscriptions
from batchsync.rules import email_key
from batchsync.sync import Sync

from .crmdata import UNSUB_HEADER, read_csv, write_csv
from .usercli import CHANGES_KIND, mailup_time, write_profile

ADDRESSES = ["ann@example.com", "ben@example.com", "cat@example.com", " Ann@Example.com "]  # contacts 1 to 4
TARGETS = [
    "ann@example.com",
    "Ann@Example.COM",
    "ben@example.com",
    "BEN@example.com",
    "cat@example.com",
    "dan@example.com",
]
LIST_IDS = {"newsletter": "1", "offers": "2", "events": "3"}
CODES = {  # MailUp's optout_type, as the model reads them; "77" is a code no one documented
    "2": "unsubscribe",
    "4": "unsubscribe",
    "21": "unsubscribe",
    "1024": "unsubscribe",
    "77": "unsubscribe",
    "8": "hard_bounce",
    "82": "hard_bounce",
    "16": "complaint",
    "161": "complaint",
    "512": "clean",
}
OPTED_OUT = ("unsubscribed", "cleaned")
FUTURE = -1  # minutes ago, for a row dated days ahead
pytestmark = pytest.mark.timeout(1800)
START = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)  # ahead of the files' own times
T0 = START - timedelta(days=30)


@dataclass(frozen=True)
class State:
    status: str
    at: datetime
    consent_at: datetime | None


@cache
def template() -> Path:
    """An initialised CRM with four contacts (two share an address), subscribed with consent to two lists."""
    folder = Path(tempfile.mkdtemp(prefix="batchsync-model-template-"))
    url = f"sqlite:///{folder / 'crm.sqlite'}"
    sync = Sync(load_profile(write_profile(folder, url, extra=CHANGES_KIND)))
    sync.init()
    with sync.engine.begin() as connection:
        ids = crm.list_ids(connection, LIST_IDS)
        for contact_id, email in enumerate(ADDRESSES, start=1):
            connection.execute(
                insert(contacts).values(
                    id=contact_id,
                    email=email,
                    email_key=email_key(email),
                    first_name=f"First{contact_id}",
                    last_name="Model",
                    custom={},
                    created_at=T0,
                    updated_at=T0,
                    deleted=False,
                )
            )
            for code in ("newsletter", "offers"):
                connection.execute(
                    insert(subscriptions).values(
                        contact_id=contact_id,
                        list_id=ids[code],
                        status="subscribed",
                        status_at=T0,
                        source="crm",
                        consent_by="form",
                        consent_at=T0,
                    )
                )
    sync.engine.dispose()
    return folder / "crm.sqlite"


rows = st.lists(
    st.tuples(
        st.sampled_from([*TARGETS[:5], "zed@example.com"]),  # mostly the CRM's addresses
        st.sampled_from(["1", "2", ""]),
        st.sampled_from(list(CODES)),
        st.one_of(st.integers(1, 3000), st.just(FUTURE)),
    ),
    min_size=1,
    max_size=4,
)
contact_ids = st.integers(1, 4)
crm_lists = st.sampled_from(["newsletter", "offers"])


class WholeSystem(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="batchsync-model-"))
        shutil.copyfile(template(), self.folder / "crm.sqlite")
        url = f"sqlite:///{self.folder / 'crm.sqlite'}"
        self.profile = load_profile(write_profile(self.folder, url, extra=CHANGES_KIND))
        self.clock = ManualClock(START)
        self.sync = Sync(self.profile, clock=self.clock)
        self.engine = self.sync.engine
        self.ids = {code: index for index, code in enumerate(LIST_IDS, start=1)}
        self.provider_optouts: dict[tuple[str, str], datetime] = {}  # (list, key) -> latest provider opt-out
        self.suppressed: set[str] = set()
        self.admin_block: set[tuple[str, str]] = set()  # (list, key) an admin opted out, until the CRM changes it
        self.at_provider: dict[tuple[str, str], str] = {}  # (list, key) -> what the provider has: "1" or "0"
        self.owed: set[tuple[str, str]] = set()  # (list, key) the next export must send as "0"
        self.last_file: bytes | None = None
        self.contents: set[bytes] = set()  # of the files applied: the same content again is a duplicate
        self.seen: set[Path] = set()
        self.files = 0

    def teardown(self) -> None:
        if hasattr(self, "engine"):
            self.engine.dispose()
            shutil.rmtree(self.folder, ignore_errors=True)

    # --- what the CRM holds, read back -------------------------------------------------------------------

    def live(self) -> dict[int, str]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(contacts.c.id, contacts.c.email_key).where(contacts.c.deleted.is_(False)))
            return {row[0]: row[1] for row in rows}

    def states(self) -> dict[tuple[int, str], State]:
        names = {index: code for code, index in self.ids.items()}
        s = subscriptions.c
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(s.contact_id, s.list_id, s.status, s.status_at, s.consent_at, s.consent_by)
            )
            return {
                (row[0], names[row[1]]): State(row[2], row[3], row[4] if row[5] else None)
                for row in rows
                if row[1] in names
            }

    def gone_from(self, code: str, key: str) -> bool:
        """No live contact with the address has a row on the list that goes out (pending does not at MailUp)."""
        live, states = self.live(), self.states()
        return not any(
            k == key and (cid, code) in states and states[(cid, code)].status != "pending" for cid, k in live.items()
        )

    def owe_tombstones(self, key: str) -> None:
        for code in LIST_IDS:
            if self.at_provider.get((code, key)) == "1" and self.gone_from(code, key):
                self.owed.add((code, key))

    def crm_changed(self, *keys: str) -> None:
        for key in keys:
            for code in LIST_IDS:
                self.admin_block.discard((code, key))

    # --- CRM steps ---------------------------------------------------------------------------------------

    def _set(self, contact: int, code: str, status: str, consent: bool = False) -> str | None:
        self.clock.advance(60)
        key = self.live().get(contact)
        if key is None:
            return None
        now = self.clock.now()
        values = {
            "status": status,
            "status_at": now,
            "source": "crm",
            "consent_by": "form" if consent else None,
            "consent_at": now if consent else None,
        }
        with self.engine.begin() as connection:
            s = subscriptions.c
            mine = (s.contact_id == contact) & (s.list_id == self.ids[code])
            if connection.execute(update(subscriptions).where(mine).values(**values)).rowcount == 0:
                connection.execute(insert(subscriptions).values(contact_id=contact, list_id=self.ids[code], **values))
        self.crm_changed(key)
        self.owed.discard((code, key))
        return key

    @rule(contact=contact_ids, code=crm_lists, consent=st.booleans())
    def crm_subscribe(self, contact: int, code: str, consent: bool) -> None:
        self._set(contact, code, "subscribed", consent)

    @rule(data=st.data(), consent=st.booleans())
    def crm_resubscribe_after_an_opt_out(self, data: st.DataObject, consent: bool) -> None:
        """A CRM user subscribes again someone whose subscription is opted out (by anyone): the step the
        guarantees are about, drawn more often than chance would."""
        live = self.live()
        opted_out = sorted(
            place for place, state in self.states().items() if state.status in OPTED_OUT and place[0] in live
        )
        if opted_out:
            contact, code = data.draw(st.sampled_from(opted_out))
            if code in ("newsletter", "offers"):
                self._set(contact, code, "subscribed", consent)

    @rule(contact=contact_ids, code=crm_lists)
    def crm_unsubscribe(self, contact: int, code: str) -> None:
        self._set(contact, code, "unsubscribed")

    @rule(contact=contact_ids, code=crm_lists)
    def crm_pending(self, contact: int, code: str) -> None:
        key = self._set(contact, code, "pending")
        if key is not None:
            self.owe_tombstones(key)

    @rule(contact=contact_ids, code=crm_lists)
    def crm_leave(self, contact: int, code: str) -> None:
        self.clock.advance(60)
        key = self.live().get(contact)
        if key is None:
            return
        with self.engine.begin() as connection:
            s = subscriptions.c
            connection.execute(delete(subscriptions).where(s.contact_id == contact, s.list_id == self.ids[code]))
        self.crm_changed(key)
        self.owe_tombstones(key)

    @rule(contact=contact_ids)
    def crm_delete(self, contact: int) -> None:
        self.clock.advance(60)
        key = self.live().get(contact)
        if key is None:
            return
        with self.engine.begin() as connection:
            connection.execute(update(contacts).where(contacts.c.id == contact).values(deleted=True))
        self.crm_changed(key)
        self.owe_tombstones(key)

    @rule(contact=contact_ids, email=st.sampled_from(TARGETS))
    def crm_change_email(self, contact: int, email: str) -> None:
        self.clock.advance(60)
        old = self.live().get(contact)
        if old is None:
            return
        with self.engine.begin() as connection:
            connection.execute(
                update(contacts)
                .where(contacts.c.id == contact)
                .values(email=email, email_key=email_key(email), updated_at=self.clock.now())
            )
        self.crm_changed(old, email_key(email))
        self.owe_tombstones(old)
        for code in LIST_IDS:
            self.owed.discard((code, email_key(email)))

    @rule(minutes=st.integers(1, 600))
    def time_moves_on(self, minutes: int) -> None:
        self.clock.advance(minutes * 60)

    # --- files ---------------------------------------------------------------------------------------------

    def _drop(self, folder: Path, kind: str, lines: list[list[str]]) -> bool:
        """Leave a file; False when its content was applied before (it is then a duplicate, and changes nothing)."""
        self.files += 1
        path = write_csv(folder / f"{kind}_{self.files}.csv", lines)
        self.last_file, self.last_place = path.read_bytes(), path.with_name(f"{kind}_again.csv")
        new = path.read_bytes() not in self.contents
        self.contents.add(path.read_bytes())
        return new

    def _duplicate(self) -> None:
        before = (self.states(), self.live(), self._activities())
        report = self.sync.import_files()
        assert [item.outcome for item in report.files] == ["duplicate"], report
        assert (self.states(), self.live(), self._activities()) == before

    def _opt_out_file(
        self, folder: Path, events: list[tuple[str, str, str, int]]
    ) -> list[tuple[str, str, str, datetime]]:
        """Write the rows; the valid ones as (key, list id, code, time)."""
        now, lines, valid = self.clock.now(), [UNSUB_HEADER], []
        for email, list_id, code, minutes in events:
            at = now + timedelta(days=3) if minutes == FUTURE else now - timedelta(minutes=minutes)
            lines.append([email, "", list_id, mailup_time(at), "1", code, ""])
            if minutes != FUTURE:
                valid.append((email_key(email), list_id, code, at.replace(microsecond=0)))
        return valid if self._drop(folder, "unsubscribers", lines) else None

    def _apply_opt_outs(self, valid: list[tuple[str, str, str, datetime]] | None, *, by_provider: bool) -> None:
        if valid is None:
            self._duplicate()
            return
        live, before = self.live(), self.states()
        latest: dict[tuple[int, str], datetime] = {}
        for key, list_id, code, at in valid:
            kind = CODES[code]
            names = [name for name, number in LIST_IDS.items() if number == list_id]
            targets = names if kind == "unsubscribe" and names else list(LIST_IDS)
            if kind != "unsubscribe":
                self.suppressed.add(key)
            for target in targets:
                if by_provider:
                    self.provider_optouts[(target, key)] = max(at, self.provider_optouts.get((target, key), at))
                    self.at_provider[(target, key)] = "0"
                    self.owed.discard((target, key))
                for contact, contact_key in live.items():
                    if contact_key == key:
                        latest[(contact, target)] = max(at, latest.get((contact, target), at))
        report = self.sync.import_files()
        assert [item.outcome for item in report.files] == ["applied"], report
        after = self.states()
        for (contact, code), at in latest.items():
            old = before.get((contact, code))
            stands = (
                old is not None
                and old.status in ("subscribed", "pending")
                and old.at > at
                and old.consent_at is not None
                and old.consent_at > at
            )
            new = after[(contact, code)]
            assert (new.status in OPTED_OUT) != stands, (contact, code, old, new, at)
            if not by_provider and not stands:
                key = live[contact]
                self.admin_block.add((code, key))
                if self.at_provider.get((code, key)) == "1":
                    self.owed.add((code, key))
        for place, state in before.items():
            if place not in latest:
                assert after.get(place) == state, (place, state, after.get(place))

    @rule(events=rows)
    def provider_file(self, events: list[tuple[str, str, str, int]]) -> None:
        valid = self._opt_out_file(self.folder / "provider" / "export", events)
        self._apply_opt_outs(valid, by_provider=True)

    @rule(events=rows)
    def admin_file(self, events: list[tuple[str, str, str, int]]) -> None:
        valid = self._opt_out_file(self.folder / "work" / "inbox", events)
        self._apply_opt_outs(valid, by_provider=False)

    @rule(changes=st.lists(st.tuples(st.sampled_from(TARGETS), st.sampled_from(TARGETS)), min_size=1, max_size=2))
    def provider_email_changes(self, changes: list[tuple[str, str]]) -> None:
        lines = [["old_email", "new_email"], *map(list, changes)]
        if not self._drop(self.folder / "provider" / "export", "changes", lines):
            self._duplicate()
            return
        owners = self.live()
        for old, new in changes:  # the model of the rules: row by row, against what earlier rows left
            old_key, new_key = email_key(old), email_key(new)
            for code in LIST_IDS:
                if (code, old_key) in self.provider_optouts:  # the provider's opt-outs follow the address
                    at = self.provider_optouts[(code, old_key)]
                    self.provider_optouts[(code, new_key)] = max(at, self.provider_optouts.get((code, new_key), at))
            moving = [cid for cid, key in owners.items() if key == old_key]
            taken = [cid for cid, key in owners.items() if key == new_key and cid not in moving]
            if moving and not taken:
                for cid in moving:
                    owners[cid] = new_key
                for code in LIST_IDS if old_key != new_key else ():  # the ledger's rows follow too
                    moved = self.at_provider.pop((code, old_key), None)
                    self.at_provider.pop((code, new_key), None)
                    if moved is not None:
                        self.at_provider[(code, new_key)] = moved
                    self.owed.discard((code, old_key))
                    self.owed.discard((code, new_key))  # the ledger's rows of the new address are replaced
                self.crm_changed(old_key, new_key)
        report = self.sync.import_files()
        assert [item.outcome for item in report.files] == ["applied"], report
        assert self.live() == owners

    @precondition(lambda self: self.last_file is not None)
    @rule()
    def the_same_file_again(self) -> None:
        assert self.last_file is not None
        self.last_place.write_bytes(self.last_file)
        self._duplicate()

    def _activities(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.scalar(select(func.count()).select_from(activities)) or 0)

    # --- exports -------------------------------------------------------------------------------------------

    @rule(mode=st.sampled_from(["diff", "full"]))
    def export(self, mode: str) -> None:
        self.clock.advance(1)
        result = self.sync.export(mode)  # type: ignore[arg-type]
        assert not result.stopped
        sent: dict[tuple[str, str], str] = {}
        names = {number: name for name, number in LIST_IDS.items()}
        for path in sorted((self.folder / "provider" / "import").glob("*/*.csv")):
            if path in self.seen:
                continue
            self.seen.add(path)
            lines = read_csv(path, delimiter="|")[1:]
            keys = [email_key(line[0]) for line in lines]
            assert len(keys) == len(set(keys)), f"an address twice in {path.name}"
            sent.update({(names[path.parent.name], email_key(line[0])): line[5] for line in lines})
        for (code, key), value in sent.items():
            if value == "1":
                assert (code, key) not in self.provider_optouts, (
                    "sent as subscribed after MailUp's opt-out",
                    code,
                    key,
                )
                assert key not in self.suppressed, ("a suppressed address sent as subscribed", code, key)
                assert (code, key) not in self.admin_block, ("sent as subscribed after an admin's opt-out", code, key)
        for code, key in self.owed:
            if self.gone_from(code, key) or (code, key) in self.admin_block:
                assert sent.get((code, key)) == "0", ("owed an opt-out or a tombstone", code, key, mode)
        self.owed.clear()
        self.at_provider.update(sent)


WholeSystem.TestCase.settings = settings(
    max_examples=1000,  # 300 did not find an opt-out forgotten because the CRM had made it first
    stateful_step_count=30,
    deadline=None,
    derandomize=True,  # a fixed seed: CI runs the same examples every time
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_no_opt_out_is_lost_whatever_happens = WholeSystem.TestCase
