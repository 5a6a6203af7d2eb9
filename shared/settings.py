"""The one place that reads ``MOLE_*`` environment variables.

Build :class:`Settings` once at an entry point (CLI, Modal app, test fixture) and pass it down.
Secrets are ``SecretStr`` or hidden from ``repr``; nothing here prints them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Secrets no production service may run with: the placeholders docker/.env.example ships
# ("change-me-api-key", "change-me-worker-token", "hf_change_me") and their like, by prefix.
PLACEHOLDER_SECRET_PREFIXES = ("change-me", "change_me", "changeme", "hf_change_me", "placeholder")
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _read_secret_file(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


def _token(value: SecretStr | None, file: Path | None, name: str) -> SecretStr | None:
    """A token given as ``MOLE_<NAME>`` or read from ``MOLE_<NAME>_FILE`` (not both; not empty)."""
    if file is None:
        return value
    if value is not None:
        raise ValueError(f"set MOLE_{name.upper()} or MOLE_{name.upper()}_FILE, not both")
    token = _read_secret_file(file, f"{name}_file")
    if not token:
        raise ValueError(f"{name}_file: {file} is empty")
    return SecretStr(token)


def _split_keys(text: str) -> list[str]:
    """Keys from ``a,b``, one per line, or a JSON list; blanks and ``#`` comment lines dropped."""
    text = text.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError("api keys: invalid JSON list") from None
        if not isinstance(parsed, list):
            raise ValueError("api keys: expected a JSON list of strings")
        return [str(k).strip() for k in parsed if str(k).strip()]
    keys: list[str] = []
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        keys.extend(k.strip() for k in line.split(",") if k.strip())
    return keys


class Settings(BaseSettings):
    """Service settings from ``MOLE_*`` env vars (or keyword arguments in tests).

    Contract: in ``env="production"`` at least one API key is configured; ``worker_token`` holds
    the token from ``MOLE_WORKER_TOKEN`` or the contents of ``MOLE_WORKER_TOKEN_FILE``.
    """

    model_config = SettingsConfigDict(env_prefix="MOLE_", extra="ignore", env_ignore_empty=True)

    # auth
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)  # MOLE_API_KEYS=a,b
    api_keys_file: Path | None = None  # file with more API keys, one per line or comma-separated
    worker_token: SecretStr | None = None  # shared secret workers require from the coordinator
    worker_token_file: Path | None = None  # file holding the worker token (docker/Modal secrets)
    metrics_token: SecretStr | None = None  # bearer token for GET /metrics (Prometheus); see metrics_tokens()
    metrics_token_file: Path | None = None  # file holding the metrics token
    # model placement
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1"...
    dtype: str = "auto"  # "auto" (bfloat16 on cuda, float32 on cpu), "float32", "bfloat16", "float16"
    torch_threads: int | None = Field(default=None, ge=1)  # torch.set_num_threads on CPU; None: torch default
    vllm_python: str = ".venv-vllm/bin/python"  # mole up: the python of vLLM's env (make install-vllm)
    # input limits
    max_image_bytes: int = Field(default=8_000_000, ge=1)  # decoded image bytes
    max_image_pixels: int = Field(default=16_000_000, ge=1)  # width * height, checked before decoding
    max_prompt_chars: int = Field(default=4096, ge=1)  # prompt length in characters
    max_new_tokens_cap: int = Field(default=1024, ge=1)  # longest answer unless the adapter sets its own cap
    default_max_new_tokens: int | None = Field(
        default=None, ge=1
    )  # when neither request nor adapter sets it; None: the cap
    max_body_bytes: int = Field(default=12_000_000, ge=1)  # HTTP request body size
    max_request_pixels: int = Field(
        default=64_000_000, ge=1
    )  # decoded pixels of one request (all its images)
    max_pixels_in_flight: int = Field(default=128_000_000, ge=1)  # decoded pixels held at once; more: 429
    # HTTP server (every server mole starts; see shared/server.py)
    max_header_bytes: int = Field(default=65536, ge=1024)  # request line + headers of one request; more: 431
    max_headers: int = Field(default=100, ge=8)  # header fields of one request; more: 431
    header_timeout_s: float = Field(default=10.0, gt=0)  # headers must arrive within this of the first byte
    body_timeout_s: float = Field(default=60.0, gt=0)  # a body must arrive within this of its headers
    max_connections: int = Field(default=1024, ge=1)  # open connections per server; more are closed
    # batching and admission
    max_batch_size: int = Field(default=8, ge=1)  # requests per forward on a worker
    max_wait_ms: float = Field(default=5.0, ge=0)  # batch fill-up wait, only while requests overlap
    max_queue: int = Field(default=64, ge=1)  # queued requests before answering 429
    max_waiting: int = Field(default=256, ge=1)  # coordinator: requests waiting for a worker slot
    discover_interval_s: float = Field(default=2.0, ge=0)  # dynamic workers look for new adapters; 0: never
    # timeouts
    request_timeout_s: float = Field(default=60.0, gt=0)  # end-to-end budget of one request
    drain_timeout_s: float = Field(default=20.0, ge=0)  # graceful shutdown waits this long for in-flight
    # logging and environment
    log_json: bool = False  # JSON lines instead of plain text
    log_level: str = "INFO"  # root log level
    env: Literal["development", "production"] = "development"  # production refuses unsafe defaults

    _file_keys: frozenset[str] = PrivateAttr(default_factory=frozenset)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return _split_keys(value)
        if isinstance(value, list | tuple | set | frozenset):
            return [str(k).strip() for k in value if str(k).strip()]
        return value

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        if value not in _DTYPES:
            raise ValueError(f"must be one of {', '.join(_DTYPES)}")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in _LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
        return level

    @model_validator(mode="after")
    def _load_files_and_check(self) -> Settings:
        if self.api_keys_file is not None:
            self._file_keys = frozenset(_split_keys(_read_secret_file(self.api_keys_file, "api_keys_file")))
        self.worker_token = _token(self.worker_token, self.worker_token_file, "worker_token")
        self.metrics_token = _token(self.metrics_token, self.metrics_token_file, "metrics_token")
        if not self.max_image_pixels <= self.max_request_pixels <= self.max_pixels_in_flight:
            raise ValueError(
                f"pixel limits must satisfy max_image_pixels ({self.max_image_pixels}) <= max_request_pixels "
                f"({self.max_request_pixels}) <= max_pixels_in_flight ({self.max_pixels_in_flight})"
            )
        if self.default_max_new_tokens is not None and self.default_max_new_tokens > self.max_new_tokens_cap:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) exceeds "
                f"max_new_tokens_cap ({self.max_new_tokens_cap})"
            )
        if self.env == "production" and not self.api_key_set():
            raise ValueError("env=production requires API keys: set MOLE_API_KEYS (or MOLE_API_KEYS_FILE)")
        if self.env == "production":
            self._refuse_placeholders()
        return self

    def _refuse_placeholders(self) -> None:
        """Production refuses the example placeholders (never echoing a secret, only where it came from)."""
        found = []
        if any(_is_placeholder(k) for k in self.api_key_set()):
            found.append("an API key (MOLE_API_KEYS / MOLE_API_KEYS_FILE)")
        token = self.worker_token_value()
        if token is not None and _is_placeholder(token):
            found.append("the worker token (MOLE_WORKER_TOKEN / MOLE_WORKER_TOKEN_FILE)")
        if found:
            raise ValueError(
                f"env=production refuses placeholder secrets: {' and '.join(found)} is still the "
                '.env.example value; generate one: python -c "import secrets; print(secrets.token_urlsafe(32))"'
            )

    def api_key_set(self) -> frozenset[str]:
        """All accepted API keys (``api_keys`` plus ``api_keys_file``); empty means auth is off."""
        return frozenset(self.api_keys) | self._file_keys

    def metrics_tokens(self, service_credentials: frozenset[str]) -> frozenset[str]:
        """Bearer tokens ``GET /metrics`` accepts: the metrics token, plus the service's own
        credentials (API keys, worker token) when ``service_credentials`` is not empty. Empty (open)
        only when neither a metrics token nor service credentials are configured."""
        own = (
            frozenset([self.metrics_token.get_secret_value()])
            if self.metrics_token is not None
            else frozenset()
        )
        return own | service_credentials

    def worker_token_value(self) -> str | None:
        """The plain worker token, or None when workers run without one."""
        return self.worker_token.get_secret_value() if self.worker_token is not None else None


def _is_placeholder(secret: str) -> bool:
    return secret.strip().lower().startswith(PLACEHOLDER_SECRET_PREFIXES)


def settings_error_line(exc: Exception) -> str:
    """A settings ``ValidationError`` as one line: ``field: reason; ...`` (no input values echoed)."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    parts = []
    for err in errors(include_input=False):
        field = "_".join(str(p) for p in err.get("loc", ())).upper()
        message = str(err.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"MOLE_{field}: {message}" if field else message)
    return "; ".join(parts)


def resolve_device_dtype(settings: Settings) -> tuple[str, str]:
    """Concrete ``(device, dtype)``: "auto" device is cuda when available else cpu; "auto" dtype is
    bfloat16 on cuda and float32 elsewhere. Imports torch only when a value is "auto"."""
    device, dtype = settings.device, settings.dtype
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype
