"""Issue 19, server classes 10-12: every file an adapter folder makes the server read is resolved and must lie in an
allowed folder; NUL bytes and over-long names/paths are 400s; bodies are bounded, inputs are length-checked before
tokenising, and tokenising runs off the event loop; OpenAI fields the server does not implement are 400s naming
the field."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltatune as dt

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from deltatune.serve.app import UNSUPPORTED, BackgroundServer, create_app  # noqa: E402
from deltatune.serve.engine import MAX_CHARS_PER_TOKEN, Engine  # noqa: E402
from deltatune.serve.registry import MAX_NAME, AdapterRegistry, Forbidden, ServeError  # noqa: E402

HYPO = settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def parts(tmp_path_factory, minilm_path):
    """A tiny BERT classifier and a tiny Llama (MiniLM's tokenizer), and one LoRA adapter folder for each."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("serve")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    cls = BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=1, num_attention_heads=2, num_labels=2)).eval()
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.sep_token_id)).eval()
    allowed = root / "allowed"
    for folder, model, targets in ((allowed / "cls_lora", cls, ["query"]), (allowed / "lm_lora", lm, ["q_proj"]),
                                   (root / "outside", cls, ["value"])):
        wrapped = dt.wrap(model, dt.LoraConfig(r=2, targets=targets, init="random"))
        wrapped.save(folder)
        wrapped.unload()
    return {"root": root, "allowed": allowed, "tokenizer": tokenizer, "cls": cls, "lm": lm}


def make_app(parts, kind: str = "cls", **options):
    base = parts[kind]
    registry = AdapterRegistry(base, [parts["allowed"]])
    registry.add("lora", parts["allowed"] / f"{kind}_lora")
    engine = Engine(base, parts["tokenizer"], registry, task="classify" if kind == "cls" else "complete", max_length=64,
                    max_tokens=4)
    return create_app(engine, **options), engine


# ---- class 10: files resolved, NUL bytes and long names refused --------------------------------------------------
@pytest.mark.parametrize("linked", ["config", "weights", "both"])
@pytest.mark.parametrize("target", ["outside_adapter", "etc_passwd"])
def test_symlinked_files_pointing_out_of_the_allowed_folder_are_refused(parts, tmp_path, linked, target):
    from deltatune.io import CONFIG_NAME, WEIGHTS_NAME

    folder = parts["allowed"] / f"links_{linked}_{target}"
    folder.mkdir(exist_ok=True)
    source = parts["root"] / "outside"
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        link = linked == "both" or name == (CONFIG_NAME if linked == "config" else WEIGHTS_NAME)
        outside = Path("/etc/passwd") if target == "etc_passwd" and name == CONFIG_NAME else source / name
        (folder / name).unlink(missing_ok=True)
        if link:
            os.symlink(outside, folder / name)
        else:
            (folder / name).write_bytes((source / name).read_bytes())
    app, engine = make_app(parts)
    with TestClient(app) as client:
        response = client.post("/v1/adapters", json={"name": "evil", "path": str(folder)})
    assert response.status_code == 403, response.text
    assert "link to a file outside the allowed folders" in response.json()["error"]["message"]
    assert "evil" not in engine.registry.sources


def test_a_link_swapped_in_after_registration_is_refused_at_load(parts, tmp_path):
    from deltatune.io import CONFIG_NAME, WEIGHTS_NAME

    folder = parts["allowed"] / "swapped"
    folder.mkdir(exist_ok=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (folder / name).write_bytes((parts["allowed"] / "cls_lora" / name).read_bytes())
    registry = AdapterRegistry(parts["cls"], [parts["allowed"]])
    registry.add("later", folder)
    (folder / WEIGHTS_NAME).unlink()
    os.symlink(parts["root"] / "outside" / WEIGHTS_NAME, folder / WEIGHTS_NAME)
    with pytest.raises(Forbidden, match="outside the allowed folders"):
        registry.ensure(["later"])


@HYPO
@given(prefix=st.text(max_size=20), suffix=st.text(max_size=20))
def test_nul_bytes_in_adapter_paths_are_400_not_500(parts, prefix, suffix):
    app, _ = make_app(parts)
    path = str(parts["allowed"]) + "/" + prefix + "\x00" + suffix
    with TestClient(app) as client:
        response = client.post("/v1/adapters", json={"name": "n", "path": path})
    assert response.status_code == 400, response.text
    assert "NUL byte" in response.json()["error"]["message"]


@HYPO
@given(length=st.integers(MAX_NAME + 1, 200_000))
def test_long_adapter_names_are_refused_and_never_echoed_in_full(parts, length):
    app, _ = make_app(parts)
    name = "a" * length
    with TestClient(app) as client:
        added = client.post("/v1/adapters", json={"name": name, "path": str(parts["allowed"] / "cls_lora")})
        unknown = client.post("/v1/classify", json={"model": name, "input": "hi"})
        health = client.get("/health")
    assert added.status_code == 400 and f"longer than {MAX_NAME} characters" in added.text
    assert unknown.status_code == 404
    assert len(added.text) < 1000 and len(unknown.text) < 1000
    assert name not in health.text


# ---- class 11: bounded bodies, length before tokenising, tokenising off the event loop ----------------------------
@pytest.mark.parametrize("size", [2**20 + 1, 5 * 2**20, 150 * 2**20])
def test_bodies_over_the_limit_are_413_before_parsing(parts, size):
    app, _ = make_app(parts, max_body=2**20)
    body = b'{"input": "' + b"a" * size + b'"}'
    with TestClient(app) as client:
        response = client.post("/v1/classify", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "request body is over 1,048,576 bytes" in response.text


def test_a_chunked_body_over_the_limit_is_refused(parts):
    app, _ = make_app(parts, max_body=2**16)

    def chunks():
        yield b'{"input": "'
        for _ in range(64):
            yield b"a" * 4096
        yield b'"}'

    with TestClient(app) as client:
        response = client.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
        ok = client.post("/v1/classify", json={"input": "a small input"})
    assert response.status_code in (400, 413) and ok.status_code == 200


@HYPO
@given(extra=st.integers(1, 5 * 2**20))
def test_overlong_inputs_are_refused_before_tokenising(parts, extra):
    _, engine = make_app(parts)
    calls = []
    engine.counter = lambda *a, **k: calls.append(1)
    with pytest.raises(ServeError, match="characters; this server accepts at most 64 tokens"):
        engine.check("classify", "lora", "a" * (64 * MAX_CHARS_PER_TOKEN + extra))
    assert calls == []


def test_slow_request_checks_do_not_stall_health(parts):
    app, engine = make_app(parts)
    real_check, threads = engine.check, []

    def slow_check(*args, **kwargs):
        threads.append(threading.current_thread().name)
        time.sleep(1.5)  # a long tokenisation
        return real_check(*args, **kwargs)

    engine.check = slow_check

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            slow = asyncio.create_task(client.post("/v1/classify", json={"input": "hello there"}))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            health = await client.get("/health")
            return health, time.monotonic() - started, await slow

    with BackgroundServer(app) as url:
        health, waited, slow = asyncio.run(scenario(url))
    assert health.status_code == 200 and waited < 0.5, waited
    assert slow.status_code == 200 and threads and all(t.startswith("deltatune-check") for t in threads)


# ---- class 12: OpenAI fields the server does not implement are 400s naming the field -------------------------------
ACTIVE = {"n": 2, "best_of": 3, "echo": True, "logprobs": 1, "suffix": "end", "presence_penalty": 0.5,
          "frequency_penalty": -1.0, "logit_bias": {"50": 10}}


@pytest.mark.parametrize("field", sorted(ACTIVE))
def test_unimplemented_openai_fields_are_400_naming_the_field(parts, field):
    assert set(ACTIVE) == set(UNSUPPORTED)
    app, _ = make_app(parts, "lm")
    with TestClient(app) as client:
        for stream in (False, True):
            response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, field: ACTIVE[field],
                                                            "stream": stream})
            assert response.status_code == 400, response.text
            assert f"'{field}'" in response.json()["error"]["message"] and "not supported" in response.text


@pytest.mark.parametrize("field", ["stream_options", "tools", "max_completion_tokens", "bogus"])
def test_unknown_fields_are_400_naming_the_field(parts, field):
    app, _ = make_app(parts, "lm")
    with TestClient(app) as client:
        completion = client.post("/v1/completions", json={"prompt": "hi", field: 1})
        classify = client.post("/v1/classify", json={"input": "hi", field: 1})
    for response in (completion, classify):
        assert response.status_code == 400 and field in response.json()["error"]["message"]


def test_openai_fields_at_their_inert_values_are_accepted(parts):
    app, _ = make_app(parts, "lm")
    inert = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None, "presence_penalty": 0,
             "frequency_penalty": 0, "logit_bias": {}, "user": "someone"}
    with TestClient(app) as client:
        plain = client.post("/v1/completions", json={"model": "lora", "prompt": "hi there", "max_tokens": 3})
        same = client.post("/v1/completions", json={"model": "lora", "prompt": "hi there", "max_tokens": 3, **inert})
    assert plain.status_code == 200 and same.status_code == 200, same.text
    assert same.json()["choices"][0]["token_ids"] == plain.json()["choices"][0]["token_ids"]
