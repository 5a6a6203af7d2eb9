"""Settings parsing and safety, wire schema limits, and the one error-handler table."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from pydantic import ValidationError

from shared.errors import (
    AdapterNotFound,
    InvalidInput,
    MoleError,
    NoConfidentRoute,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    WorkerTimeout,
)
from shared.logging import JsonFormatter, configure_logging
from shared.schemas import (
    ClassifyBatchItem,
    ClassifyBatchRequest,
    ClassifyRequest,
    ClassifyResponse,
    InferRequest,
    LoadAdapterRequest,
)
from shared.settings import Settings, resolve_device_dtype


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("MOLE_"):
            monkeypatch.delenv(key)


# --- settings -------------------------------------------------------------------------------------


def test_api_keys_comma_separated_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOLE_API_KEYS", "a, b,,")
    settings = Settings()
    assert settings.api_keys == ["a", "b"]
    assert settings.api_key_set() == frozenset({"a", "b"})


def test_defaults_and_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().max_new_tokens_cap == 1024 and Settings().api_key_set() == frozenset()
    monkeypatch.setenv("MOLE_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("MOLE_TORCH_THREADS", "")  # empty counts as unset
    monkeypatch.setenv("MOLE_LOG_LEVEL", "debug")
    settings = Settings()
    assert (settings.max_batch_size, settings.torch_threads, settings.log_level) == (4, None, "DEBUG")


def test_api_keys_file_merged(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# comment\nfile-key-1\nfile-key-2, file-key-3\n")
    settings = Settings(api_keys=["env-key"], api_keys_file=keys)
    assert settings.api_key_set() == {"env-key", "file-key-1", "file-key-2", "file-key-3"}


def test_production_without_keys_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOLE_ENV", "production")
    with pytest.raises(ValidationError, match="MOLE_API_KEYS"):
        Settings()
    monkeypatch.setenv("MOLE_API_KEYS", "k1")
    assert Settings().env == "production"


def _env_example() -> dict[str, str]:
    path = Path(__file__).resolve().parents[2] / "docker" / ".env.example"
    lines = [line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and line[0] != "#"]
    return {k.strip(): v.strip() for k, v in lines}


@pytest.mark.parametrize("variable", ["MOLE_API_KEYS", "MOLE_WORKER_TOKEN"])
def test_production_refuses_the_env_example_placeholders(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str
) -> None:
    example = _env_example()
    monkeypatch.setenv("MOLE_ENV", "production")
    monkeypatch.setenv("MOLE_API_KEYS", "a-real-key-9f8e7d")
    monkeypatch.setenv(variable, example[variable])
    with pytest.raises(ValidationError, match="placeholder") as err:
        Settings()
    assert example[variable] not in str(err.value)  # the secret itself is never echoed
    monkeypatch.delenv(variable)  # the same placeholder from a secret file is refused too
    secret = tmp_path / "secret"
    secret.write_text(example[variable] + "\n")
    monkeypatch.setenv(f"{variable}_FILE", str(secret))
    if variable == "MOLE_API_KEYS":
        monkeypatch.setenv("MOLE_API_KEYS", "a-real-key-9f8e7d")
    with pytest.raises(ValidationError, match="placeholder"):
        Settings()
    monkeypatch.setenv("MOLE_ENV", "development")  # development keeps working with them
    assert Settings().env == "development"


def test_repr_hides_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOLE_API_KEYS", "supersecretkey")
    monkeypatch.setenv("MOLE_WORKER_TOKEN", "workertokenvalue")
    settings = Settings()
    for text in (repr(settings), str(settings)):
        assert "supersecretkey" not in text and "workertokenvalue" not in text
    assert settings.worker_token_value() == "workertokenvalue"


def test_worker_token_file_read_and_stripped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    token.write_text("  tok-123\n")
    monkeypatch.setenv("MOLE_WORKER_TOKEN_FILE", str(token))
    assert Settings().worker_token_value() == "tok-123"
    monkeypatch.setenv("MOLE_WORKER_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValidationError, match="worker_token_file"):
        Settings()


def test_invalid_values_refused() -> None:
    with pytest.raises(ValidationError, match="dtype"):
        Settings(dtype="int3")
    with pytest.raises(ValidationError, match="default_max_new_tokens"):
        Settings(default_max_new_tokens=300, max_new_tokens_cap=256)


def test_resolve_device_dtype_explicit_values_skip_torch() -> None:
    assert resolve_device_dtype(Settings(device="cpu")) == ("cpu", "float32")
    assert resolve_device_dtype(Settings(device="cuda:1")) == ("cuda:1", "bfloat16")
    assert resolve_device_dtype(Settings(device="cuda", dtype="float16")) == ("cuda", "float16")


def test_configure_logging_is_idempotent_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        configure_logging(Settings(log_json=True))
        configure_logging(Settings(log_json=True))
        # exactly one handler of ours, whether or not an earlier test configured logging already
        ours = [h for h in root.handlers if getattr(h, "_mole_handler", False)]
        assert len(ours) == 1 and isinstance(ours[0].formatter, JsonFormatter)
        record = logging.LogRecord("mole.test", logging.INFO, __file__, 1, "served %s", ("x",), None)
        record.request_id = "r1"
        line = json.loads(JsonFormatter().format(record))
        assert line["message"] == "served x" and line["request_id"] == "r1" and line["level"] == "INFO"
    finally:
        for h in root.handlers[:]:
            if h not in before:
                root.removeHandler(h)


# --- schemas --------------------------------------------------------------------------------------


def test_infer_request_limits() -> None:
    ok = InferRequest(image_b64="x", prompt="p", adapter="a", max_new_tokens=10, temperature=0, top_p=1)
    assert ok.seed is None
    for bad in (
        {"prompt": ""},
        {"prompt": "x" * 4097},
        {"adapter": ""},
        {"max_new_tokens": 0},
        {"max_new_tokens": 5000},
        {"temperature": -1},
        {"top_p": 0},
        {"unknown": 1},
    ):
        with pytest.raises(ValidationError):
            InferRequest.model_validate({"image_b64": "x", "prompt": "p", "adapter": "a", **bad})


def test_classify_request_expert_types() -> None:
    assert ClassifyRequest(image_b64="x", prompt="p", expert=2).expert == 2
    assert ClassifyRequest(image_b64="x", prompt="p", expert="2").expert == "2"
    assert ClassifyRequest(image_b64="x", prompt="p").prefer_merged is None
    with pytest.raises(ValidationError):
        ClassifyBatchRequest(items=[])


def test_batch_item_ok_xor_error() -> None:
    result = ClassifyResponse(
        request_id="r",
        adapter="a",
        label="0",
        confidence=None,
        routed_by="explicit",
        worker_id="w",
        mode="merged",
        output="o",
        routing_path=["w"],
        timings_ms={"total": 1.0},
    )
    assert ClassifyBatchItem(ok=True, result=result).error is None
    with pytest.raises(ValidationError):
        ClassifyBatchItem(ok=True)
    with pytest.raises(ValidationError):
        ClassifyBatchItem(ok=False, result=result)


def test_load_adapter_name_pattern() -> None:
    assert LoadAdapterRequest(name="calendar.v2", path="/p").name == "calendar.v2"
    for bad in ("../etc", "-x", "a b", ""):
        with pytest.raises(ValidationError):
            LoadAdapterRequest(name=bad, path="/p")


# --- error handlers -------------------------------------------------------------------------------


def make_client() -> TestClient:
    from shared.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    errors: dict[str, MoleError] = {
        "invalid": InvalidInput("prompt: too long", field="prompt"),
        "large": PayloadTooLarge("image_b64: too large", field="image_b64", limit_bytes=10),
        "adapter": AdapterNotFound('adapter "x" not held', adapters=["a", "b"]),
        "overloaded": Overloaded("queue full", retry_after=2.2),
        "not_ready": NotReady("loading"),
        "timeout": WorkerTimeout("worker w timed out"),
        "route": NoConfidentRoute("below threshold"),
    }

    @app.get("/raise/{name}")
    def raise_error(name: str) -> None:
        raise errors[name]

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internal detail /srv/file.py")

    @app.get("/http")
    def http() -> None:
        raise HTTPException(status_code=403, detail="forbidden here")

    @app.post("/classify")
    def classify(req: ClassifyRequest) -> dict[str, str]:
        return {"ok": "yes"}

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize(
    ("name", "status", "code"),
    [
        ("invalid", 400, "invalid_input"),
        ("large", 413, "payload_too_large"),
        ("adapter", 404, "adapter_not_found"),
        ("overloaded", 429, "overloaded"),
        ("not_ready", 503, "not_ready"),
        ("timeout", 504, "worker_timeout"),
        ("route", 422, "no_confident_route"),
    ],
)
def test_mole_errors_map_to_status_and_shape(name: str, status: int, code: str) -> None:
    resp = make_client().get(f"/raise/{name}")
    assert resp.status_code == status
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]


def test_details_and_retry_after() -> None:
    client = make_client()
    resp = client.get("/raise/overloaded")
    assert resp.headers["retry-after"] == "3"
    assert resp.json()["error"]["retry_after"] == 2.2
    assert client.get("/raise/adapter").json()["error"]["adapters"] == ["a", "b"]
    assert "retry-after" not in client.get("/raise/timeout").headers


def test_unhandled_error_is_opaque_500(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="shared.errors"):
        resp = make_client().get("/boom", headers={"X-Request-Id": "req-42"})
    assert resp.status_code == 500
    body = resp.json()
    assert body == {"error": {"code": "internal_error", "message": "internal error", "request_id": "req-42"}}
    assert "Traceback" not in resp.text and "secret internal detail" not in resp.text
    assert any(r.exc_info for r in caplog.records)  # the traceback goes to the log


def test_http_exception_keeps_status() -> None:
    client = make_client()
    resp = client.get("/http")
    assert resp.status_code == 403
    assert resp.json() == {"error": {"code": "http_403", "message": "forbidden here"}}
    resp = client.get("/no-such-route")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "http_404"


def test_validation_error_names_field_and_limit_without_echo() -> None:
    secret_prompt = "SECRET" * 1000
    resp = make_client().post("/classify", json={"image_b64": "x", "prompt": secret_prompt})
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["code"] == "invalid_request"
    assert "body.prompt" in error["message"] and "4096" in error["message"]
    assert error["errors"][0]["field"] == "body.prompt"
    assert error["errors"][0]["ctx"] == {"max_length": 4096}
    assert "SECRET" not in resp.text


def test_validation_error_on_bad_json_body() -> None:
    resp = make_client().post("/classify", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "invalid_request"
