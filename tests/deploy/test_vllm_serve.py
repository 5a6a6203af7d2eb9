"""mole/vllm_serve.py: the launcher a deployed vLLM worker runs (compose's stock vLLM image, Modal):
the command ``mole up`` builds on a GPU, listening on every interface, and the token as API key."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
from support import VLLM_WORKERS, production_on_vllm, vllm_env

from mole import vllm_serve
from mole.vllm_serve import LISTEN_HOST, server_command
from mole.vllm_worker import VLLM_SERVER, vllm_args
from shared.errors import ConfigError
from shared.mapping import MoleMapping, load_mapping


@pytest.fixture
def on_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, MoleMapping]:
    path = production_on_vllm(tmp_path, ranks={"desktop": 24})
    for name, value in vllm_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    return path, load_mapping(path)


def _value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


@pytest.mark.parametrize("worker_id", VLLM_WORKERS)
def test_the_command_is_mole_ups_on_a_gpu_listening_on_every_interface(
    on_vllm: tuple[Path, MoleMapping], worker_id: str
) -> None:
    _, mapping = on_vllm
    worker = mapping.worker(worker_id)
    command = server_command(mapping, worker_id, python="python3")
    assert command[:3] == ["python3", "-m", VLLM_SERVER]
    expected = vllm_args(mapping, worker, cpu=False)
    expected[expected.index("--host") + 1] = LISTEN_HOST
    assert command[3:] == expected  # only the host differs: the port is the worker URL's
    assert (_value(command, "--host"), _value(command, "--port")) == ("0.0.0.0", "8000")
    assert "--dtype" not in command  # the checkpoint's dtype (bfloat16), not the CPU's float32
    # the image budget of the mapping (max_pixels), as mole's workers resize
    assert json.loads(_value(command, "--mm-processor-kwargs")) == {
        "size": {"shortest_edge": 65536, "longest_edge": worker.max_pixels}
    }
    assert _value(server_command(mapping, worker_id, port=9000), "--port") == "9000"


def test_a_dynamic_worker_serves_its_adapters_as_lora_modules(on_vllm: tuple[Path, MoleMapping]) -> None:
    path, mapping = on_vllm
    command = server_command(mapping, "dynamic-0")
    assert "--enable-lora" in command
    assert (_value(command, "--max-loras"), _value(command, "--max-lora-rank")) == (
        "4",
        "32",
    )  # rank 24 -> 32
    modules = command[command.index("--lora-modules") + 1 :]
    vol = path.parent / "vol"
    assert modules == [f"{n}={vol}/loras/{n}/adapter" for n in ("calendar", "claim", "login", "desktop")]
    assert _value(command, "--served-model-name") == "Qwen3-VL-8B-Instruct"  # serve_base_as
    merged = server_command(mapping, "merged-claim")
    assert _value(merged, "--served-model-name") == "claim" and "--enable-lora" not in merged


def test_a_worker_the_mapping_keeps_on_hf_is_refused(on_vllm: tuple[Path, MoleMapping]) -> None:
    with pytest.raises(ConfigError, match='"merged-calendar" has "engine": "hf"'):
        server_command(on_vllm[1], "merged-calendar")


def test_main_prints_or_execs_the_server_with_the_token_as_api_key(
    on_vllm: tuple[Path, MoleMapping],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, mapping = on_vllm
    args = ["--config", str(path), "--worker-id", "dynamic-0"]
    assert vllm_serve.main([*args, "--print"]) == 0
    assert shlex.split(capsys.readouterr().out) == server_command(mapping, "dynamic-0")

    monkeypatch.delenv("MOLE_WORKER_TOKEN", raising=False)
    monkeypatch.delenv("MOLE_WORKER_TOKEN_FILE", raising=False)
    assert vllm_serve.main(args) == 2  # never serves without the token
    assert "no worker token" in capsys.readouterr().err

    token_file = tmp_path / "worker_token"
    token_file.write_text("s3cret-token\n")
    monkeypatch.setenv("MOLE_WORKER_TOKEN_FILE", str(token_file))  # compose's secret file
    execs: list[tuple[str, list[str], dict[str, str]]] = []

    def execve(path: str, argv: list[str], env: dict[str, str]) -> Any:  # the process replacement, caught
        execs.append((path, argv, env))

    monkeypatch.setattr(vllm_serve.os, "execve", execve)
    assert vllm_serve.main(args) == 0
    ((binary, argv, env),) = execs
    assert binary == argv[0] and argv == server_command(mapping, "dynamic-0")
    assert env["VLLM_API_KEY"] == "s3cret-token" and not any("s3cret" in a for a in argv)
    assert "VLLM_CPU_KVCACHE_SPACE" not in env  # GPU settings: none of mole up's CPU ones


def test_main_names_the_mapping_problem(
    tmp_path: Path, on_vllm: tuple[Path, MoleMapping], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = on_vllm
    (tmp_path / "vol/loras/login/adapter/adapter_config.json").write_text(
        json.dumps({"r": 16, "use_dora": True})
    )
    assert vllm_serve.main(["--config", str(path), "--worker-id", "dynamic-0", "--print"]) == 2
    assert 'adapter "login" is a DoRA adapter' in capsys.readouterr().err
    assert vllm_serve.main(["--config", str(path), "--worker-id", "nope", "--print"]) == 2
    assert 'worker "nope" is not defined' in capsys.readouterr().err
