"""What clients and adapter owners expect (issue 13), against a live stack of real processes.

One stack for the module: a merged worker (calendar), the dynamic worker (every demo adapter, the
base model served as ``base-model``, a ``discover`` volume polled every 0.5 s) and a ``mole
coordinator`` process. The test clients are the official ``openai`` package and ``curl -N``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from support import REPO, coordinator_process, demo_mapping_copy, wait_for, worker_process

from mole import synthetic
from mole.supervisor import ServiceProcess
from shared.checkpoints import load_processor
from shared.images import encode_image_b64, image_to_data_url
from shared.modeling import render_prompt

BASE_NAME = "base-model"
WORKERS = ("merged-calendar", "dynamic-0")
WORKER_ENV = {"MOLE_DISCOVER_INTERVAL_S": "0.5", "MOLE_DEFAULT_MAX_NEW_TOKENS": "64"}


@dataclass
class Stack:
    assets: Path
    url: str
    volume: Path
    workers: dict[str, ServiceProcess]
    coordinator: ServiceProcess

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def stack(demo_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("clients")
    volume = root / "volume" / "loras"
    volume.mkdir(parents=True)
    path = demo_mapping_copy(
        demo_assets, root, dispatch={"probe_interval_s": 0.3, "retries": 1}, serve_base_as=BASE_NAME
    )
    doc = json.loads(path.read_text())
    doc["workers"] = [w for w in doc["workers"] if w["id"] in WORKERS]
    next(w for w in doc["workers"] if w["id"] == "dynamic-0")["discover"] = str(volume)
    doc["adapters"]["claim"]["hot"] = False
    path.write_text(json.dumps(doc, indent=2))
    workers = {wid: worker_process(path, wid, root, env=WORKER_ENV) for wid in WORKERS}
    coordinator = coordinator_process(path, root)
    stack = Stack(demo_assets, coordinator.url, volume, workers, coordinator)
    try:
        for service in workers.values():
            service.wait_ready(120)
        coordinator.wait_ready(120)
        wait_for(lambda: _all_up(stack.url), "every worker probed up")
        yield stack
    finally:
        coordinator.stop()
        for service in workers.values():
            service.stop()


def _all_up(url: str) -> bool:
    return all(w["state"] == "up" for w in httpx.get(f"{url}/workers").json()["workers"])


def _sample(kind: str, seed: int = 5) -> synthetic.Sample:
    return synthetic.make_samples(1, seed=seed, kinds=(kind,))[0]


def _messages(sample: synthetic.Sample, *earlier: dict[str, Any]) -> list[dict[str, Any]]:
    user = {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": image_to_data_url(sample.image)}},
            {"type": "text", "text": sample.prompt},
        ],
    }
    return [*earlier, user]


# ---- OpenAI chat completions --------------------------------------------------------------------


def test_streaming_returns_the_non_streaming_text_for_every_adapter(stack: Stack) -> None:
    client = stack.openai()
    for kind in synthetic.KINDS:
        messages = _messages(_sample(kind))
        whole = client.chat.completions.create(model=kind, messages=messages)  # type: ignore[arg-type]
        chunks = list(
            client.chat.completions.create(
                model=kind,
                messages=messages,  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(pieces) == whole.choices[0].message.content, kind
        assert len(pieces) >= 3, f"{kind}: the answer came in {len(pieces)} piece(s), not token by token"
        assert all(c.object == "chat.completion.chunk" and c.model == kind for c in chunks)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == [whole.choices[0].finish_reason] == ["stop"]
        assert chunks[-1].usage is not None and chunks[-1].usage == whole.usage
        assert whole.created > 1_700_000_000 and synthetic.EXPERT_FORMATS[kind].match(
            pieces[0] + "".join(pieces[1:])
        )


def test_curl_streams_server_sent_events(stack: Stack) -> None:
    body = {"model": "login", "messages": _messages(_sample("login")), "stream": True}
    out = subprocess.run(
        [
            "curl",
            "-sN",
            f"{stack.url}/v1/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            "@-",
        ],
        input=json.dumps(body),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    events = [line.removeprefix("data: ") for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert synthetic.EXPERT_FORMATS["login"].match(text), text


def test_usage_counts_every_prompt_token_the_worker_ran(stack: Stack) -> None:
    sample = _sample("calendar")
    reply = stack.openai().chat.completions.create(model="calendar", messages=_messages(sample))  # type: ignore[arg-type]
    processor = load_processor(stack.assets / "base")
    batch = processor(
        text=[render_prompt(processor, sample.prompt)], images=[sample.image], return_tensors="pt"
    )
    image_tokens = int((batch["input_ids"] == processor.image_token_id).sum())
    assert image_tokens > 0
    assert reply.usage is not None and reply.usage.prompt_tokens == batch["input_ids"].shape[1]
    assert reply.usage.completion_tokens >= 1


def test_history_system_prompt_stop_and_length(stack: Stack) -> None:
    client = stack.openai()
    sample = _sample("calendar")
    plain = client.chat.completions.create(model="calendar", messages=_messages(sample))  # type: ignore[arg-type]
    earlier = (
        {"role": "system", "content": "You read calendars."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi. Send a screenshot."},
    )
    chat = client.chat.completions.create(model="calendar", messages=_messages(sample, *earlier))  # type: ignore[arg-type]
    assert chat.usage is not None and plain.usage is not None
    assert chat.usage.prompt_tokens > plain.usage.prompt_tokens + 10  # the turns reached the model
    content = plain.choices[0].message.content or ""
    assert "=" in content
    stopped = client.chat.completions.create(model="calendar", messages=_messages(sample), stop=["="])  # type: ignore[arg-type]
    assert stopped.choices[0].message.content == content.split("=")[0].strip()
    assert stopped.choices[0].finish_reason == "stop"
    cut = client.chat.completions.create(model="calendar", messages=_messages(sample), max_tokens=2)  # type: ignore[arg-type]
    assert cut.choices[0].finish_reason == "length" and cut.usage is not None
    assert cut.usage.completion_tokens == 2
    classify = httpx.post(
        f"{stack.url}/classify",
        json={"image_b64": encode_image_b64(sample.image), "prompt": sample.prompt, "max_new_tokens": 2},
        timeout=60,
    ).json()
    assert classify["finish_reason"] == "length" and classify["completion_tokens"] == 2


def test_unsupported_parameters_are_refused_by_name(stack: Stack) -> None:
    client = stack.openai()
    messages = _messages(_sample("claim"))
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="claim",
            messages=messages,  # type: ignore[arg-type]
            frequency_penalty=0.5,
            logprobs=True,
        )
    assert "frequency_penalty" in str(err.value) and "logprobs" in str(err.value)
    neutral = client.chat.completions.create(model="claim", messages=messages, presence_penalty=0)  # type: ignore[arg-type]
    assert synthetic.EXPERT_FORMATS["claim"].match(neutral.choices[0].message.content or "")


def test_text_only_and_the_base_model_are_served(stack: Stack) -> None:
    client = stack.openai()
    models = [m.id for m in client.models.list().data]
    assert models[0] == "auto" and {BASE_NAME, *synthetic.KINDS} <= set(models)
    text_only = [{"role": "user", "content": "Say something."}]
    base = client.chat.completions.create(model=BASE_NAME, messages=text_only, max_tokens=5)  # type: ignore[arg-type]
    assert base.model == BASE_NAME and base.usage is not None and base.usage.completion_tokens <= 5
    expert = client.chat.completions.create(model="desktop", messages=text_only, max_tokens=5)  # type: ignore[arg-type]
    assert expert.model == "desktop"
    with pytest.raises(openai.BadRequestError, match="image_b64"):  # the router reads screenshots
        client.chat.completions.create(model="auto", messages=text_only)  # type: ignore[arg-type]


def test_a_client_leaving_mid_stream_frees_its_worker_slot(stack: Stack) -> None:
    body = {
        "model": BASE_NAME,
        "messages": [{"role": "user", "content": "a"}],  # the base model's answer runs to the limit
        "max_tokens": 1000,
        "stream": True,
    }

    def in_flight() -> int:
        workers = httpx.get(f"{stack.url}/workers").json()["workers"]
        return int(next(w for w in workers if w["id"] == "dynamic-0")["in_flight"])

    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        assert next(line for line in lines if line.startswith("data: "))
        assert in_flight() == 1
    wait_for(lambda: in_flight() == 0, "the slot of the stream whose client left", timeout=5)
    t0 = time.monotonic()
    follow = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={**body, "stream": False, "max_tokens": 3},
        timeout=60,
    )
    assert follow.status_code == 200 and time.monotonic() - t0 < 10
    # the worker saw its caller leave and stopped the row (tests/unit/test_decoding.py: at its next token)
    dynamic = next(w for w in stack.workers.values() if w.name == "dynamic-0")
    metrics = httpx.get(f"{dynamic.url}/metrics").text
    assert f'mole_worker_streams_abandoned_total{{adapter="{BASE_NAME}"}} 1.0' in metrics


# ---- adapters dropped on the volume ---------------------------------------------------------------


def test_an_adapter_copied_onto_the_volume_is_served_by_name(stack: Stack) -> None:
    shutil.copytree(stack.assets / "loras" / "login" / "adapter", stack.volume / "login-copy" / "adapter")
    t0 = time.monotonic()
    wait_for(
        lambda: "login-copy" in [m["id"] for m in httpx.get(f"{stack.url}/v1/models").json()["data"]],
        "the copied adapter in /v1/models",
        timeout=15,
    )
    picked_up_s = time.monotonic() - t0
    sample = _sample("login")
    body = {"image_b64": encode_image_b64(sample.image), "prompt": sample.prompt, "expert": "login-copy"}
    classify = httpx.post(f"{stack.url}/classify", json=body, timeout=60).json()
    assert classify["adapter"] == "login-copy" and classify["worker_id"] == "dynamic-0"
    assert synthetic.EXPERT_FORMATS["login"].match(classify["output"]), classify
    chat = stack.openai().chat.completions.create(model="login-copy", messages=_messages(sample))  # type: ignore[arg-type]
    assert chat.choices[0].message.content == classify["output"]
    workers = {w["id"]: w for w in httpx.get(f"{stack.url}/workers").json()["workers"]}
    assert "login-copy" in workers["dynamic-0"]["extra_adapters"]
    assert picked_up_s < 10, picked_up_s


# ---- the documented examples ----------------------------------------------------------------------

DOC_URL = "http://127.0.0.1:8700"  # the demo coordinator's URL, as the docs write it


def _doc_blocks(path: Path, section: str | None = None) -> list[tuple[str, str]]:
    """(language, code) of every fenced block of ``path`` (only under the ``## section`` heading)."""
    text = path.read_text()
    if section is not None:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```(\w+)\n(.*?)^```$", text, flags=re.M | re.S)


def _run_examples(stack: Stack, blocks: list[tuple[str, str]], cwd: Path) -> int:
    """Run every bash/python block with the live stack's URL; compare each with the example answer
    that follows it (JSON: the same top-level fields; text: the same first word). Returns how many
    ran."""
    ran = 0
    output = ""
    for lang, code in blocks:
        if lang in ("bash", "python"):
            code = (
                code.replace(DOC_URL, stack.url)
                .replace("/vol/loras", str(stack.volume))
                .replace("./invoice-lora", str(stack.assets / "loras" / "login" / "adapter"))
            )
            cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
            done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{code}\n{done.stdout}\n{done.stderr}"
            output = done.stdout
            ran += 1
        elif lang == "json":
            expected, got = json.loads(code), json.loads(output)
            assert set(got) == set(expected), f"documented fields {sorted(expected)}, answered {sorted(got)}"
        elif lang == "text":
            assert output.split()[0] == code.split()[0], f"documented:\n{code}\nanswered:\n{output}"
            if code.rstrip().endswith("data: [DONE]"):
                assert output.rstrip().endswith("data: [DONE]")
    return ran


def test_every_documented_example_runs(stack: Stack, tmp_path: Path) -> None:
    _sample("calendar").image.save(tmp_path / "screen.png")
    ran = _run_examples(stack, _doc_blocks(REPO / "docs" / "examples.md"), tmp_path)
    ran += _run_examples(stack, _doc_blocks(REPO / "README.md", "Examples"), tmp_path)
    assert ran >= 6
