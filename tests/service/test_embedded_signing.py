"""The embedded stack's serving signing key: generated once, kept in the data dir (0600), added to
a data dir from before it existed, and handed to the serving app through its environment only."""

from __future__ import annotations

import json
import stat

from service.embedded import embedded_settings, serving_key_env
from workers.signing import KEY_ENV, PREVIOUS_KEY_ENV


def test_key_is_generated_once_and_kept(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    first = embedded_settings(data_dir=tmp_path)
    key = first.serve_signing_key.get_secret_value()
    assert len(key) >= 32
    assert embedded_settings(data_dir=tmp_path).serve_signing_key.get_secret_value() == key
    path = tmp_path / "secrets.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert serving_key_env(first) == {KEY_ENV: key}  # no previous key unless one is set


def test_a_data_dir_from_before_gets_a_key_and_keeps_its_secrets(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    (tmp_path / "secrets.json").write_text(json.dumps({"admin_token": "adm", "internal_secret": "int"}))
    s = embedded_settings(data_dir=tmp_path)
    assert (s.admin_token.get_secret_value(), s.internal_secret.get_secret_value()) == ("adm", "int")
    stored = json.loads((tmp_path / "secrets.json").read_text())
    assert stored["serve_signing_key"] == s.serve_signing_key.get_secret_value()
    assert stat.S_IMODE((tmp_path / "secrets.json").stat().st_mode) == 0o600


def test_keys_from_the_environment_win_and_rotate(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "new-key")
    monkeypatch.setenv(PREVIOUS_KEY_ENV, "old-key")
    s = embedded_settings(data_dir=tmp_path)
    assert serving_key_env(s) == {KEY_ENV: "new-key", PREVIOUS_KEY_ENV: "old-key"}
