"""Settings: security defaults (SPEC §7) are enforced when the settings are built, not left to the caller."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from app.settings import LOOPBACK_HOSTS, Settings, default_data_dir, generate_token

GOOD_TOKEN = "Zq3v-8mW.kP_2rT~9sLd0bXeYfHjNcGu4A"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own GRADWATCH_* variables must not leak into what the tests build."""
    for name in list(os.environ):
        if name.upper().startswith("GRADWATCH_"):
            monkeypatch.delenv(name)


def make(tmp_path: Path, **kwargs: Any) -> Settings:
    return Settings(data_dir=tmp_path, _env_file=None, **kwargs)


def errors_for(exc: pytest.ExceptionInfo[ValidationError]) -> dict[str, str]:
    return {".".join(str(part) for part in err["loc"]): err["msg"] for err in exc.value.errors()}


# --- defaults -------------------------------------------------------------------------------------------------------


def test_defaults_bind_loopback_without_token(tmp_path: Path) -> None:
    settings = make(tmp_path)
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.is_loopback
    assert settings.token is None
    assert settings.token_value() is None
    assert settings.allowed_hosts == []
    assert (settings.cpu_run_limit, settings.gpu_run_limit) == (4, 2)
    assert settings.max_artifact_bytes == 1 << 30


def test_default_data_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "gradwatch"
    # Read when the settings are built, not frozen at import time.
    assert Settings(_env_file=None).data_dir == tmp_path / "xdg" / "gradwatch"


@pytest.mark.parametrize("xdg", [None, "", "relative/dir"])
def test_default_data_dir_falls_back_to_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, xdg: str | None) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    if xdg is None:
        monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_DATA_HOME", xdg)  # a relative value is invalid per the XDG spec and ignored
    assert default_data_dir() == tmp_path / ".local" / "share" / "gradwatch"


def test_data_dir_expands_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Settings(data_dir=Path("~/runs"), _env_file=None).data_dir == tmp_path / "runs"


def test_reads_prefixed_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRADWATCH_TOKEN", GOOD_TOKEN)
    monkeypatch.setenv("GRADWATCH_HOST", "0.0.0.0")
    monkeypatch.setenv("GRADWATCH_PORT", "9000")
    monkeypatch.setenv("GRADWATCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GRADWATCH_ALLOWED_HOSTS", '["Dash.Example.org"]')
    monkeypatch.setenv("GRADWATCH_CPU_RUN_LIMIT", "6")
    settings = Settings(_env_file=None)
    assert settings.token_value() == GOOD_TOKEN
    assert settings.host == "0.0.0.0"
    assert settings.port == 9000
    assert settings.data_dir == tmp_path / "data"
    assert settings.allowed_hosts == ["dash.example.org"]
    assert settings.cpu_run_limit == 6


# --- tokens ---------------------------------------------------------------------------------------------------------


def test_generated_token_is_long_random_and_accepted(tmp_path: Path) -> None:
    first, second = generate_token(), generate_token()
    assert first != second
    assert len(first) >= 32
    assert make(tmp_path, token=first).token_value() == first


def test_token_of_exactly_32_characters_is_accepted(tmp_path: Path) -> None:
    token = GOOD_TOKEN[:32]
    assert make(tmp_path, token=token).token_value() == token


PLACEHOLDER = "looks like a placeholder"
REPEATED = "is one short sequence repeated"
SHORT = "is shorter than 32 characters"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("changethis", PLACEHOLDER),
        ("changeme", PLACEHOLDER),
        ("secret", PLACEHOLDER),
        ("password", PLACEHOLDER),
        ("token", PLACEHOLDER),
        ("example", PLACEHOLDER),
        ("placeholder", PLACEHOLDER),
        ("ChangeMe", PLACEHOLDER),
        ("CHANGEME-" + GOOD_TOKEN, PLACEHOLDER),  # a template value padded to length
        (GOOD_TOKEN + "-changethis", PLACEHOLDER),
        ("my-PlaceHolder-" + GOOD_TOKEN, PLACEHOLDER),
        ("x" * 40, REPEATED),  # one repeated character
        ("0" * 64, REPEATED),
        ("abc" * 15, REPEATED),  # one short unit repeated
        ("secret" * 8, REPEATED),
        (GOOD_TOKEN[:31], SHORT),  # one short of the minimum
        ("", SHORT),
    ],
)
def test_weak_tokens_are_refused_naming_the_field(tmp_path: Path, token: str, reason: str) -> None:
    with pytest.raises(ValidationError) as exc:
        make(tmp_path, token=token)
    errors = errors_for(exc)
    assert list(errors) == ["token"]
    assert f"token {reason}" in errors["token"]
    assert "--token generate" in errors["token"]
    # A refused token is still something a user typed as a secret: it must not be echoed into logs.
    assert "input_value" not in str(exc.value)
    if len(token) > 12:
        assert token not in str(exc.value)


@pytest.mark.parametrize("token", [GOOD_TOKEN + " x", GOOD_TOKEN + ";", GOOD_TOKEN + "+/=", "é" + GOOD_TOKEN])
def test_tokens_that_would_not_survive_urls_cookies_or_headers_are_refused(tmp_path: Path, token: str) -> None:
    with pytest.raises(ValidationError) as exc:
        make(tmp_path, token=token)
    assert list(errors_for(exc)) == ["token"]


def test_token_is_hidden_in_repr(tmp_path: Path) -> None:
    settings = make(tmp_path, token=GOOD_TOKEN)
    assert GOOD_TOKEN not in repr(settings)
    assert GOOD_TOKEN not in str(settings)
    assert settings.token_value() == GOOD_TOKEN


# --- bind address ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "10.0.0.1", "myhost.lan", "[::]"])
def test_binding_off_loopback_without_token_is_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(ValidationError) as exc:
        make(tmp_path, host=host)
    errors = errors_for(exc)
    assert list(errors) == ["token"]
    assert "token is required" in errors["token"]
    assert "--token generate" in errors["token"]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5"])
def test_binding_off_loopback_with_token_is_accepted(tmp_path: Path, host: str) -> None:
    settings = make(tmp_path, host=host, token=GOOD_TOKEN)
    assert not settings.is_loopback
    assert settings.token_value() == GOOD_TOKEN


@pytest.mark.parametrize(
    ("host", "normalized"), [("127.0.0.1", "127.0.0.1"), ("localhost", "localhost"), ("::1", "::1"),
                             ("[::1]", "::1"), ("LocalHost", "localhost"), ("localhost.", "localhost")],
)
def test_loopback_needs_no_token(tmp_path: Path, host: str, normalized: str) -> None:
    settings = make(tmp_path, host=host)
    assert settings.host == normalized
    assert settings.host in LOOPBACK_HOSTS
    assert settings.is_loopback


@pytest.mark.parametrize("host", ["", "http://localhost", "localhost:8000", "*", "a b"])
def test_malformed_host_is_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(ValidationError) as exc:
        make(tmp_path, host=host)
    assert "host" in errors_for(exc)


# --- allowed_hosts --------------------------------------------------------------------------------------------------


def test_allowed_hosts_are_normalized(tmp_path: Path) -> None:
    settings = make(tmp_path, allowed_hosts=["Dash.Example.org.", "[FE80::1]", "dash.example.org"])
    assert settings.allowed_hosts == ["dash.example.org", "fe80::1"]


def test_allowed_hosts_accept_a_comma_separated_string(tmp_path: Path) -> None:
    assert make(tmp_path, allowed_hosts="a.example, b.example").allowed_hosts == ["a.example", "b.example"]


@pytest.mark.parametrize("entry", ["dash.example.org:443", "https://dash.example.org", "*.example.org", ""])
def test_allowed_hosts_entries_that_could_never_match_are_refused(tmp_path: Path, entry: str) -> None:
    with pytest.raises(ValidationError) as exc:
        make(tmp_path, allowed_hosts=[entry])
    assert "allowed_hosts.0" in errors_for(exc)


# --- bounds ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", -1),
        ("port", 65536),
        ("cpu_run_limit", 0),
        ("cpu_run_limit", 65),
        ("gpu_run_limit", 0),
        ("gpu_run_limit", 65),
        ("reattach_grace_s", -0.1),
        ("reattach_grace_s", 600.5),
        ("reattach_grace_s", math.nan),
        ("reattach_grace_s", math.inf),
        ("worker_orphan_timeout_s", 0.5),
        ("worker_orphan_timeout_s", 86401),
        ("worker_orphan_timeout_s", math.nan),
        ("max_artifact_bytes", 0),
        ("max_body_bytes", (256 << 10) - 1),
        ("max_body_bytes", (1 << 30) + 1),
        ("header_timeout_s", 0.4),
        ("header_timeout_s", 301),
        ("header_timeout_s", math.inf),
        ("max_header_bytes", (4 << 10) - 1),
        ("max_header_bytes", (1 << 20) + 1),
        ("max_connections", 3),
        ("max_connections", 16385),
        ("ws_ping_interval_s", 0.4),
        ("ws_ping_interval_s", math.nan),
        ("ws_ping_timeout_s", 0.4),
        ("ws_ping_timeout_s", 3601),
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(tmp_path: Path, field: str, value: float) -> None:
    with pytest.raises(ValidationError) as exc:
        make(tmp_path, **{field: value})
    assert list(errors_for(exc)) == [field]


@pytest.mark.parametrize(
    ("field", "value"),
    [("port", 0), ("port", 65535), ("cpu_run_limit", 64), ("gpu_run_limit", 1), ("reattach_grace_s", 0),
     ("reattach_grace_s", 600), ("worker_orphan_timeout_s", 1), ("worker_orphan_timeout_s", 86400)],
)
def test_bounds_are_inclusive(tmp_path: Path, field: str, value: float) -> None:
    assert getattr(make(tmp_path, **{field: value}), field) == value


def test_edge_limits_default_to_bounds_well_above_legitimate_use_and_read_the_environment(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The defaults documented in docs/security.md. The body limit must never meet a legitimate body: the largest
    are a 64-run sweep of a full config and a script's run with its largest (64 KiB) free-form config."""
    from trainer.config import RunConfig

    settings = make(tmp_path)
    assert (settings.max_body_bytes, settings.header_timeout_s, settings.max_header_bytes) == (1 << 20, 10.0, 64 << 10)
    assert (settings.max_connections, settings.ws_ping_interval_s, settings.ws_ping_timeout_s) == (512, 20.0, 20.0)
    sweep = {"base": RunConfig().model_dump(mode="json"),
             "vary": {"train.seed": list(range(8)), "gan.lr_g": [1e-4 * (i + 1) for i in range(8)]}}
    script = {"name": "n" * 200, "config": {"pad": "x" * (64 << 10)}, "source": {"argv": ["a" * 500] * 64}}
    assert max(len(json.dumps(sweep)), len(json.dumps(script))) * 8 < settings.max_body_bytes
    monkeypatch.setenv("GRADWATCH_MAX_CONNECTIONS", "64")
    monkeypatch.setenv("GRADWATCH_HEADER_TIMEOUT_S", "2.5")
    assert (make(tmp_path).max_connections, make(tmp_path).header_timeout_s) == (64, 2.5)


def test_unknown_fields_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        make(tmp_path, tokn=GOOD_TOKEN)


def test_settings_are_frozen(tmp_path: Path) -> None:
    """Assignment would bypass the validators (a token could be cleared on a public bind), so it is refused."""
    settings = make(tmp_path, host="0.0.0.0", token=GOOD_TOKEN)
    with pytest.raises(ValidationError):
        settings.token = None  # type: ignore[misc]


# --- the worker module --------------------------------------------------------------------------------------------

_PROBE = """
import json, os, sys
with open(os.environ["PROBE_OUT"], "w") as fh:
    json.dump({"argv": sys.argv[1:], "token": len(sys.stdin.readline().strip()), "main": __name__,
               "env_token": "GRADWATCH_RUN_TOKEN" in os.environ}, fh)
"""


def test_worker_module_defaults_to_app_worker_and_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert make(tmp_path).worker_module == "app.worker"
    monkeypatch.setenv("GRADWATCH_WORKER_MODULE", "bench.synthetic_worker")
    assert make(tmp_path).worker_module == "bench.synthetic_worker"


def test_worker_nice_defaults_to_10_and_must_be_a_niceness(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert make(tmp_path).worker_nice == 10
    monkeypatch.setenv("GRADWATCH_WORKER_NICE", "0")
    assert make(tmp_path).worker_nice == 0
    for bad in (-1, 20, 2.5):
        with pytest.raises(ValidationError) as exc:
            make(tmp_path, worker_nice=bad)
        assert list(errors_for(exc)) == ["worker_nice"]


@pytest.mark.parametrize("module", ["", "app/worker.py", "-c", "app..worker", "app.worker ", ".worker", "1app",
                                    "app.worker;rm", "app.worker\n"])
def test_worker_module_must_be_a_dotted_module_name(tmp_path: Path, module: str) -> None:
    """It becomes ``python -m MODULE``: a path or an interpreter option there must be refused at start."""
    with pytest.raises(ValidationError) as exc:
        make(tmp_path, worker_module=module)
    assert list(errors_for(exc)) == ["worker_module"]


def test_the_manager_launches_the_configured_worker_module_with_the_worker_arguments(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A real launch: the probe module records what it was started with, which app.worker's parser must accept."""
    from app import worker
    from app.hub import Hub
    from app.manager import RunManager
    from app.store import Store
    from trainer.config import RunConfig

    (tmp_path / "probe_dir").mkdir()
    (tmp_path / "probe_dir" / "gw_probe_worker.py").write_text(_PROBE)
    out = tmp_path / "probe.json"
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "probe_dir"))
    monkeypatch.setenv("PROBE_OUT", str(out))
    settings = make(tmp_path / "data", worker_module="gw_probe_worker", worker_nice=3)

    async def launch() -> str:
        store = Store(settings.data_dir / "gradwatch.db")
        store.start()
        manager = RunManager(settings, store, Hub(store), server_url=lambda: "ws://127.0.0.1:9")
        try:
            await manager.start()
            run = await manager.submit(RunConfig.model_validate({"train": {"device": "cpu"}}))
            deadline = time.monotonic() + 30
            while run.id in manager.active and time.monotonic() < deadline:  # the probe exits at once
                await asyncio.sleep(0.05)
            return run.id
        finally:
            await manager.shutdown()
            store.close()

    run_id = asyncio.run(launch())
    probe = json.loads(out.read_text())
    assert probe["main"] == "__main__" and probe["token"] >= 32 and not probe["env_token"]
    args = worker._parse(probe["argv"])  # the same arguments app.worker takes
    assert args.run_id == run_id
    assert args.server == "ws://127.0.0.1:9"
    assert args.config.is_file() and args.work_dir.is_dir()
    assert args.nice == 3 and args.token_stdin
