"""Profiles: the shipped ones load; every mistake is named with the file, the key and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchsync.cli import main
from batchsync.config import load_profile
from batchsync.errors import ConfigError

from .conftest import ROOT


@pytest.mark.parametrize("name", ["mailup", "demo"])
def test_shipped_profiles_load(name: str) -> None:
    profile = load_profile(ROOT / "profiles" / f"{name}.toml")
    assert profile.export.delimiter == "|"  # MailUp's documented separator
    assert profile.export.file_name == "{list_id}_{mailup_stamp}.csv"  # MailUp's accepted file names
    assert [c.header for c in profile.export.columns] == ["111", "1", "2", "idList", "ExternalGroupName", "optout"]
    assert profile.export.status_values["subscribed"] == "1"
    assert profile.export.status_values["unsubscribed"] == "0"
    assert profile.export.remote_dir == "import/{list_id}"


def _broken(tmp_path: Path, old: str, new: str) -> Path:
    text = (ROOT / "profiles" / "mailup.toml").read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / "broken.toml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


def test_a_misspelt_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    path = _broken(tmp_path, 'delimiter = "|"', 'delimter = "|"')
    with pytest.raises(ConfigError) as caught:
        load_profile(path)
    message = str(caught.value)
    assert str(path) in message
    assert "export.delimter: unknown key (did you mean 'delimiter'?)" in message


def test_a_wrong_type_and_a_missing_key_are_named(tmp_path: Path) -> None:
    path = _broken(tmp_path, "port = 21", 'port = "twenty-one"')
    path.write_text(path.read_text().replace('id = "1"\n', "", 1))
    with pytest.raises(ConfigError) as caught:
        load_profile(path)
    assert "transport.port: Input should be a valid integer (got 'twenty-one')" in str(caught.value)
    assert "lists.newsletter.id: required key is missing" in str(caught.value)


def test_an_inline_secret_is_refused(tmp_path: Path) -> None:
    path = _broken(tmp_path, 'password_env = "MAILUP_FTP_PASSWORD"', 'password = "hunter2"')
    with pytest.raises(ConfigError) as caught:
        load_profile(path)
    assert "transport.password: secrets are never written in a profile" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_the_cli_exits_2_on_a_misspelt_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _broken(tmp_path, "[policy]\nunsubscribe_all_lists", "[policy]\nunsubscribe_al_lists")
    assert main(["export", "--profile", str(path)]) == 2
    assert "policy.unsubscribe_al_lists: unknown key (did you mean 'unsubscribe_all_lists'?)" in capsys.readouterr().err


def test_a_missing_profile_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "--profile", str(tmp_path / "nope.toml")]) == 2
    assert "no such profile file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("profile", "old", "new", "said"),
    [  # an API acts on rows only: an opt-out said by absence, or in a zip, would never reach the provider
        ("mailchimp-api", '{ header = "Status", field = "status" },', "", "needs a status column"),
        ("mailchimp-api", "[export]\n", "[export]\nzip = true\n", "export.zip must be false"),
        ("acoustic-api", "opt_out_file = true", "opt_out_file = false", "export.opt_out_file = true"),
        ("flexmail-api", "\n[[callback]]", '\n[lists.offers]\nid = "offers"\n[[callback]]', "from the account"),
        ("acoustic-api", "\n[[inbound]]", '\n[lists.offers]\nid = "7654321"\n[[inbound]]', "columns.list_id"),
    ],
)  # fmt: skip
def test_an_api_profile_that_could_lose_opt_outs_is_refused(
    tmp_path: Path, profile: str, old: str, new: str, said: str
) -> None:
    text = (ROOT / "profiles" / f"{profile}.toml").read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / f"{profile}.toml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(ConfigError, match=said):
        load_profile(path)
