"""Server settings: one validated object, read from ``GRADWATCH_*`` environment variables or passed by the CLI.

Launching a run is running code on the host (SPEC §7), so the settings refuse unsafe combinations up front instead
of warning about them later: a token that looks like a placeholder or is too short to resist guessing, and a bind
address off loopback with no token at all.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# Addresses that listen on every interface. A browser can still be pointed at them (the "0.0.0.0 day" class of
# attacks), so they are never treated as a legitimate Host header name by themselves.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})

MIN_TOKEN_LENGTH = 32
# Exact values people copy from examples, compared case-insensitively.
_PLACEHOLDER_TOKENS = frozenset({"changethis", "changeme", "secret", "password", "token", "example", "placeholder"})
# Fragments that betray a template value even when padded to the minimum length ("changeme-changeme-...").
_PLACEHOLDER_FRAGMENTS = ("changeme", "changethis", "placeholder")
# RFC 3986 unreserved characters: the token travels unchanged as a URL query value (`/?token=...`), a cookie value
# and an RFC 6750 Bearer credential, and these are the characters that need no quoting in any of the three.
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~-]+")
_HOSTNAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
# A dotted Python module name (``app.worker``): the worker command is ``python -m <it>``, so anything else (a path,
# an option such as ``-c``, spaces) would either fail only when the first run launches or change what runs.
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")

_HOW_TO_GET_A_TOKEN = (
    "start with `--token generate` to get a random one printed at start, or set GRADWATCH_TOKEN to the output of "
    "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
)


def default_data_dir() -> Path:
    """Where the SQLite store and the run folders live when no data directory is given.

    Follows the XDG base directory spec, which says a relative ``$XDG_DATA_HOME`` is invalid and must be ignored.
    """
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "gradwatch"


def generate_token() -> str:
    """A fresh access token: 32 random bytes, URL-safe base64 (43 characters), the way Jupyter makes its own."""
    return secrets.token_urlsafe(32)


def normalize_host(value: str) -> str:
    """The canonical spelling of a host name or IP literal: lower case, no IPv6 brackets, no trailing dot.

    Raises ``ValueError`` for anything that is not a bare host (a port, a scheme, a path, a wildcard pattern):
    such an entry would silently never match a Host header, which is worse than refusing it.
    """
    host = value.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host.removesuffix(".")
    if not host:
        raise ValueError("must not be empty")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r} is not a host name or IP address (leave out the port and scheme)") from None
        return host
    if not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{value!r} is not a host name or IP address (leave out the port and scheme)")
    return host


def _placeholder_reason(token: str) -> str | None:
    """Why ``token`` is unfit to guard the host, or ``None`` when it is fit."""
    lowered = token.lower()
    if lowered in _PLACEHOLDER_TOKENS or any(fragment in lowered for fragment in _PLACEHOLDER_FRAGMENTS):
        return "looks like a placeholder value"
    # A string equal to a non-trivial rotation of itself is one unit repeated: "xxxx...", "abcabc...", "secretsecret".
    # This covers the single repeated character and the padded placeholder at once; a random token never is.
    if token and token in (token + token)[1:-1]:
        return "is one short sequence repeated, not a random value"
    if len(token) < MIN_TOKEN_LENGTH:
        return f"is shorter than {MIN_TOKEN_LENGTH} characters"
    if not _TOKEN_CHARS.fullmatch(token):
        return "may only use letters, digits and '-', '.', '_', '~' (it travels in URLs, cookies and headers)"
    return None


class Settings(BaseSettings):
    """Everything the server needs to start; built once and never changed while it runs (hence frozen)."""

    # hide_input_in_errors: a refused token must not be echoed into logs or tracebacks by the validation error.
    model_config = SettingsConfigDict(env_prefix="GRADWATCH_", frozen=True, hide_input_in_errors=True)

    # A factory, not a value computed at import, so $XDG_DATA_HOME is read when the settings are built.
    data_dir: Path = Field(default_factory=default_data_dir)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535, description="0 picks a free port (used by tests)")
    # validate_default: the "off loopback needs a token" rule must also run when no token is given at all. BaseSettings
    # already validates defaults; said here too because this rule depends on it.
    token: SecretStr | None = Field(default=None, validate_default=True)
    # Validated per entry so an error names the offending one (allowed_hosts.2).
    allowed_hosts: list[Annotated[str, AfterValidator(normalize_host)]] = Field(
        default_factory=list,
        description="extra Host header names accepted, e.g. a reverse proxy's public name; "
        'in the environment a JSON list: GRADWATCH_ALLOWED_HOSTS=\'["dash.example.org"]\'',
    )
    cpu_run_limit: int = Field(default=4, ge=1, le=64, description="concurrent CPU runs (a twin pair and two more)")
    gpu_run_limit: int = Field(default=2, ge=1, le=64, description="concurrent runs per GPU")
    max_queued_runs: int = Field(
        default=1000, ge=1, le=100_000,
        description="runs that may wait for a slot at once; a submit or sweep beyond it is refused with a 429",
    )
    reattach_grace_s: float = Field(
        default=20.0, ge=0, le=600, allow_inf_nan=False,
        description="after a restart, how long a still-alive worker has to reconnect before its run is interrupted",
    )
    shutdown_grace_s: float = Field(
        default=30.0, ge=1, le=3600, allow_inf_nan=False,
        description="on a graceful shutdown, how long each worker has to write its final checkpoint and exit "
        "before it is killed (the run then says it has no final checkpoint)",
    )
    client_grace_s: float = Field(
        default=30.0, ge=0.1, le=86400, allow_inf_nan=False,
        description="how long a script's run (the Python client) may be without its connection before it becomes "
        "interrupted; the script may still come back later and continue it",
    )
    worker_orphan_timeout_s: float = Field(
        default=120.0, ge=1, le=86400, allow_inf_nan=False,
        description="a worker that cannot reach its server for this long stops itself",
    )
    max_artifact_bytes: int = Field(default=1 << 30, ge=1, description="largest sample or checkpoint file accepted")
    worker_nice: int = Field(
        default=10, ge=0, le=19,
        description="niceness each worker adds to its training thread (0: none): on a busy CPU the server "
        "still streams within a tenth of a second, and an idle CPU trains at full speed either way",
    )
    # The edge limits (app/limits.py, docs/security.md). Off loopback they bound what a peer can hold before its
    # token is checked, which happens only once its request headers are complete.
    max_body_bytes: int = Field(
        default=1 << 20, ge=256 << 10, le=1 << 30,
        description="largest HTTP request body accepted (413 beyond); the largest legitimate one, a script's "
        "run with its 64 KiB config or a 64-run sweep, is a small fraction of the 1 MiB default",
    )
    header_timeout_s: float = Field(
        default=10.0, ge=0.5, le=300, allow_inf_nan=False,
        description="a connection whose request headers are not complete this long after it opened (or after "
        "the request's first byte) is closed: half-sent requests cannot hold connections",
    )
    max_header_bytes: int = Field(
        default=64 << 10, ge=4 << 10, le=1 << 20,
        description="largest request line and headers accepted (431 beyond)",
    )
    max_connections: int = Field(
        default=512, ge=4, le=16384,
        description="open connections, HTTP and websockets together; a connection past it gets a 503 and is "
        "closed (each dashboard tab holds one websocket, each running worker one)",
    )
    ws_ping_interval_s: float = Field(
        default=20.0, ge=0.5, le=3600, allow_inf_nan=False,
        description="how often the server pings each websocket peer",
    )
    ws_ping_timeout_s: float = Field(
        default=20.0, ge=0.5, le=3600, allow_inf_nan=False,
        description="a websocket peer that has not answered a ping within this is closed (1011) and its "
        "connection freed",
    )
    # Where runs train (docs/deploy.md): "local" starts each worker as a process beside the server, within
    # cpu_run_limit and gpu_run_limit; "ray" hands each run to a Ray cluster as an actor asking for what the run
    # needs, and Ray decides where and when it starts.
    backend: Literal["local", "ray"] = Field(
        default="local", description="where runs train: 'local' processes, or actors on a Ray cluster ('ray')",
    )
    ray_address: str | None = Field(
        default=None, max_length=500,
        description="the Ray cluster to join (e.g. 'ray-head:6379'); none: $RAY_ADDRESS, else the cluster this "
        "machine is a node of ('auto'). The server never starts a Ray of its own",
    )
    public_url: str | None = Field(
        default=None, max_length=500,
        description="the http(s) URL at which workers on other machines reach this server (its websocket and "
        "resume downloads), e.g. 'http://10.0.0.5:8000'; its host is accepted in Host headers. Needed by the Ray "
        "backend as soon as a node is not this machine",
    )
    ray_join_timeout_s: float = Field(
        default=60.0, ge=1, le=3600, allow_inf_nan=False,
        description="how long `gradwatch serve` waits for the Ray cluster to answer before refusing to start (Ray "
        "itself retries an address where nothing answers for minutes)",
    )
    ray_cpus_per_run: float = Field(
        default=1.0, gt=0, le=256, allow_inf_nan=False,
        description="CPUs each run asks Ray for (its torch threads too); a CUDA run asks for 1/gpu_run_limit of a "
        "GPU besides",
    )
    worker_module: str = Field(
        default="app.worker",
        description="the module each run's worker process runs as `python -m MODULE`, with app.worker's arguments; "
        "the benchmarks swap in bench.synthetic_worker to load the server without training",
    )

    @field_validator("data_dir")
    @classmethod
    def _expand_data_dir(cls, value: Path) -> Path:
        # A quoted "~/runs" in an env file or compose file is not expanded by any shell.
        return value.expanduser()

    @field_validator("host")
    @classmethod
    def _normalize_bind_host(cls, value: str) -> str:
        return normalize_host(value)

    @field_validator("worker_module")
    @classmethod
    def _check_worker_module(cls, value: str) -> str:
        if not _MODULE_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a dotted Python module name such as 'app.worker'")
        return value

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment \
                or parts.username or parts.password or parts.path not in ("", "/"):
            raise ValueError(f"{value!r} is not an http(s) URL of the server such as 'http://10.0.0.5:8000' (no "
                             "path, query or credentials)")
        normalize_host(parts.hostname)  # a name a Host header can carry
        return f"{parts.scheme}://{parts.netloc}"

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_allowed_hosts(cls, value: Any) -> Any:
        # Lets a CLI flag pass "a.example,b.example" as one string; the environment variable is a JSON list.
        if isinstance(value, str):
            return [part for part in value.split(",") if part.strip()]
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _dedupe_allowed_hosts(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @field_validator("token")
    @classmethod
    def _check_token(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None:
            host = info.data.get("host")  # absent only when the host itself was invalid and already reported
            if host is not None and host not in LOOPBACK_HOSTS:
                raise ValueError(
                    f"token is required when binding to {host!r}: any address but loopback "
                    f"({', '.join(sorted(LOOPBACK_HOSTS))}) lets other machines reach the dashboard, and launching "
                    f"a run executes code on this host; {_HOW_TO_GET_A_TOKEN}"
                )
            return None
        reason = _placeholder_reason(value.get_secret_value())
        if reason is not None:
            raise ValueError(f"token {reason}; {_HOW_TO_GET_A_TOKEN}")
        return value

    @property
    def is_loopback(self) -> bool:
        """True when only this machine can connect, the one case where no token is required."""
        return self.host in LOOPBACK_HOSTS

    @property
    def public_host(self) -> str | None:
        """The host name of ``public_url``: remote workers send it as their Host header, so it is allowed."""
        if self.public_url is None:
            return None
        hostname = urlsplit(self.public_url).hostname
        return normalize_host(hostname) if hostname else None

    def token_value(self) -> str | None:
        """The token in clear, for comparisons and for printing the start-up URL; ``None`` when none is set."""
        return self.token.get_secret_value() if self.token is not None else None
