"""Configuration: CLI flags, environment-variable fallbacks of the same names, validation, and no key in logs."""

from __future__ import annotations

import pytest

from env_space.config import ServerConfig, parse_config


def test_defaults_listen_on_all_interfaces_port_7860():
    cfg = parse_config([], environ={})
    assert (cfg.host, cfg.port, cfg.max_sessions, cfg.session_timeout) == ("0.0.0.0", 7860, 512, 300.0)
    assert cfg.api_key is None and cfg.ui and cfg.default_task == "wordle"


def test_environment_fallbacks_and_flag_precedence():
    env = {"PORT": "9000", "DWS_API_KEY": "s3cret", "DWS_MAX_SESSIONS": "7", "DWS_SESSION_TIMEOUT": "0",
           "DWS_MAX_BODY_BYTES": "2048", "DWS_UI": "off", "DWS_DEFAULT_TASK": "letter", "DWS_HOST": "127.0.0.1"}
    cfg = parse_config([], environ=env)
    assert cfg == ServerConfig(host="127.0.0.1", port=9000, max_sessions=7, session_timeout=None,
                               api_key="s3cret", max_body_bytes=2048, default_task="letter", ui=False)
    cfg = parse_config(["--port", "9100", "--max-sessions", "9", "--ui", "true", "--api-key", ""], environ=env)
    assert (cfg.port, cfg.max_sessions, cfg.ui, cfg.api_key) == (9100, 9, True, None)


def test_the_key_never_appears_in_repr_or_startup_line():
    cfg = parse_config([], environ={"DWS_API_KEY": "s3cret-value"})
    assert "s3cret-value" not in repr(cfg) and "s3cret-value" not in cfg.describe()
    line = cfg.describe()
    assert "auth=on" in line and "7860" in line and "max_sessions=512" in line and "wordle" in line


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        ([], {"DWS_MAX_SESSIONS": "0"}, "DWS_MAX_SESSIONS"),
        ([], {"PORT": "http"}, "PORT"),
        ([], {"DWS_SESSION_TIMEOUT": "nan"}, "DWS_SESSION_TIMEOUT"),
        ([], {"DWS_UI": "maybe"}, "DWS_UI"),
        (["--max-body-bytes", "-1"], {}, "--max-body-bytes"),
        (["--default-task", "chess"], {}, "unknown task 'chess'"),
        (["--log-level", "loud"], {}, "unknown level"),
    ],
)
def test_bad_values_stop_startup_with_the_name(argv, env, needle, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(argv, environ=env)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_main_entry_point_refuses_bad_environment_before_serving(monkeypatch, capsys):
    from env_space.__main__ import main

    monkeypatch.setenv("DWS_MAX_SESSIONS", "lots")
    with pytest.raises(SystemExit) as e:
        main([])  # what `dws env` and `python -m env_space` call
    assert e.value.code == 2 and "DWS_MAX_SESSIONS='lots'" in capsys.readouterr().err
