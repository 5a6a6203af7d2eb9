"""``mole worker`` / ``mole coordinator`` answer a configuration error with one line and a non-zero
exit code, as ``mole check-config`` does, instead of a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mole.cli import main


def _mapping(tmp_path: Path, **router: str) -> Path:
    doc = {
        "base_model": str(tmp_path),
        "router": {"adapter": str(tmp_path), "labels": {"0": "a"}, **router},
        "adapters": {"a": {"label": "0", "lora": str(tmp_path)}},
        "workers": [{"id": "w", "url": "http://127.0.0.1:9", "mode": "dynamic", "adapters": ["a"]}],
    }
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["worker", "--worker-id", "nope"], 'worker "nope" is not defined'),
        (["coordinator"], "missing-router"),
    ],
)
def test_config_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    mapping = _mapping(tmp_path, adapter=str(tmp_path / "missing-router"))
    assert main([*argv, "--config", str(mapping)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"mole {argv[0]}: ")


def test_a_missing_mapping_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "--config", str(tmp_path / "none.json"), "--worker-id", "w"]) == 2
    err = capsys.readouterr().err.strip()
    assert "mapping file not found" in err and len(err.splitlines()) == 1


def test_bad_settings_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOLE_ENV", "production")
    monkeypatch.setenv("MOLE_API_KEYS", "change-me-api-key")
    assert main(["coordinator", "--config", str(_mapping(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "placeholder" in err and "change-me-api-key" not in err, err
    monkeypatch.setenv("MOLE_ENV", "staging")
    assert main(["worker", "--config", str(_mapping(tmp_path)), "--worker-id", "w"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mole worker: settings: MOLE_ENV:"), err
