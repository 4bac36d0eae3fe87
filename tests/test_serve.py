"""`deltatune serve`: a real uvicorn server on a free localhost port, talked to with httpx; answers must equal the
offline model run row by row."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import deltatune as dt

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from deltatune.cli import build_parser  # noqa: E402
from deltatune.serve.app import BackgroundServer, free_port  # noqa: E402
from deltatune.serve.cli import build  # noqa: E402
from deltatune.serve.registry import AdapterRegistry, Forbidden, ServeError  # noqa: E402

KEY = "s3cret-key"
PROMPTS = ["the cat sat on", "hello world", "a quick brown fox jumps", "serving many adapters", "one two three"]


def _quiet():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@pytest.fixture(scope="module")
def files(tmp_path_factory, minilm_path):
    """A tiny causal LM and a tiny classifier (MiniLM's tokenizer), and adapters for each, saved to folders."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    _quiet()
    root = tmp_path_factory.mktemp("serve")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    vocab = len(tokenizer)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id))
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    cls = BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4, num_labels=2))
    cls.save_pretrained(root / "cls")
    tokenizer.save_pretrained(root / "cls")
    lm_adapters = {
        "lora": dt.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init="random"),
        "dora": dt.DoraConfig(r=2, targets=["q_proj", "o_proj"], init="random"),
        "mora": dt.MoraConfig(r=2, targets=["v_proj", "down_proj"], init="random"),
        "asy": dt.AsyLoraConfig(r=4, alpha=16, targets="all-linear", init="random"),
        "prompt": dt.PromptTuningConfig(num_virtual_tokens=3),
        "prefix": dt.PrefixTuningConfig(num_virtual_tokens=2, encoder_hidden_size=16),
    }
    for name, config in lm_adapters.items():
        torch.manual_seed(len(name))
        model = dt.wrap(LlamaForCausalLM.from_pretrained(root / "lm"), config, name)
        with torch.no_grad():
            for parameter in model.trainable_parameters():
                parameter.mul_(4 if name != "prompt" else 1)  # strong enough to change greedy tokens
        model.save(root / "lm_adapters" / name, adapter=name)
    cls_adapters = {
        "lora": dt.LoraConfig(r=4, targets=["query", "value"], init="random", modules_to_save=["classifier"]),
        "houlsby": dt.HoulsbyConfig(bottleneck=4, init="random"),
    }
    for name, config in cls_adapters.items():
        model = dt.wrap(BertForSequenceClassification.from_pretrained(root / "cls"), config, name)
        with torch.no_grad():
            for parameter in model.trainable_parameters():
                parameter.add_(0.3 * torch.randn_like(parameter))
        model.save(root / "cls_adapters" / name, adapter=name)
    return root


def serve_args(files, model, *extra):
    return build_parser().parse_args(["serve", "--model", str(files / model), *extra])


def offline_generate(files, adapter, prompt, max_tokens):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(files / "lm")
    model = LlamaForCausalLM.from_pretrained(files / "lm").eval()
    if adapter is not None:
        model = dt.load(model, files / "lm_adapters" / adapter).eval()
    encoded = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    tokens = out[0, encoded["input_ids"].shape[1]:].tolist()
    return tokens[: tokens.index(tokenizer.sep_token_id)] if tokenizer.sep_token_id in tokens else tokens


async def gather_posts(url, path, bodies, headers=None):
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(client.post(path, json=b, headers=headers) for b in bodies))


def test_concurrent_completions_for_different_adapters_match_offline(files):
    app, _ = build(serve_args(files, "lm", "--adapters", str(files / "lm_adapters"), "--max-wait-ms", "150"))
    names = ["lora", "dora", None, "mora", "asy", "prompt", "prefix", "lora", "dora", None, "mora", "prefix"]
    bodies = [{"model": n, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 3 + i % 4} for i, n in enumerate(names)]
    with BackgroundServer(app) as url:
        responses = asyncio.run(gather_posts(url, "/v1/completions", bodies))
        health = httpx.get(f"{url}/health").json()
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]
    assert health["mixed_batches"] >= 1 and health["max_batch_adapters"] >= 3, health
    seen_different = set()
    for body, response in zip(bodies, responses):
        data = response.json()
        assert data["object"] == "text_completion" and data["model"] == body["model"]
        choice = data["choices"][0]
        expected = offline_generate(files, body["model"], body["prompt"], body["max_tokens"])
        assert choice["token_ids"] == expected, body
        assert data["usage"]["completion_tokens"] == len(expected)
        seen_different.add(tuple(expected))
    assert len(seen_different) >= 5  # the adapters really change the answers


def test_concurrent_classification_matches_offline(files):
    from transformers import AutoTokenizer, BertForSequenceClassification

    app, _ = build(serve_args(files, "cls", "--adapters", f"l={files / 'cls_adapters' / 'lora'}",
                              str(files / "cls_adapters" / "houlsby"), "--max-wait-ms", "150"))
    names = ["l", "houlsby", None, "l", "houlsby", None]
    bodies = [{"model": n, "input": [PROMPTS[i % 5], PROMPTS[(i + 2) % 5]]} for i, n in enumerate(names)]
    with BackgroundServer(app) as url:
        responses = asyncio.run(gather_posts(url, "/v1/classify", bodies))
        health = httpx.get(f"{url}/health").json()
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert health["mixed_batches"] >= 1
    tokenizer = AutoTokenizer.from_pretrained(files / "cls")
    folders = {"l": "lora", "houlsby": "houlsby"}
    for body, response in zip(bodies, responses):
        model = BertForSequenceClassification.from_pretrained(files / "cls").eval()
        if body["model"]:
            model = dt.load(model, files / "cls_adapters" / folders[body["model"]]).eval()
        for text, result in zip(body["input"], response.json()["data"]):
            with torch.no_grad():
                probs = model(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0]
            assert (torch.tensor(result["probs"]) - probs).abs().max().item() <= 1e-5, body
            assert result["index"] == int(probs.argmax())


def test_bad_requests_get_4xx_and_the_server_keeps_serving(files):
    app, _ = build(serve_args(files, "lm", "--adapters", str(files / "lm_adapters"), "--max-length", "12",
                              "--max-tokens", "8"))
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        cases = [
            (client.post("/v1/completions", json={"model": "nope", "prompt": "hi"}), 404, "no adapter named 'nope'"),
            (client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400,
             "invalid request"),
            (client.post("/v1/completions", json={"prompt": "word " * 40}), 400, "at most 12"),
            (client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 0}), 400, "max_tokens must be between"),
            (client.post("/v1/completions", json={"prompt": "hi", "temperature": 2.5, "max_tokens": 2}), 400, "temperature must be"),
            (client.post("/v1/completions", json={"prompt": "hi", "temperature": 1, "top_p": 0, "max_tokens": 2}), 400, "top_p must be"),
            (client.post("/v1/completions", json={"prompt": "hi", "stop": ["a"] * 5, "max_tokens": 2}), 400, "at most 4"),
            (client.post("/v1/completions", json={"prompt": "hi", "stop": "", "max_tokens": 2}), 400, "non-empty"),
            (client.post("/v1/completions", json={"model": "nope", "prompt": "hi", "stream": True}), 404, "nope"),
            (client.post("/v1/completions", json={"model": "lora"}), 400, "prompt"),
            (client.post("/v1/completions", json={"prompt": []}), 400, "empty"),
            (client.post("/v1/classify", json={"input": "hi"}), 400, "use /v1/completions"),
            (client.delete("/v1/adapters/ghost"), 404, "no adapter named 'ghost'"),
        ]
        for response, status, message in cases:
            assert response.status_code == status, response.text
            assert message in response.json()["error"]["message"], response.text
        ok = client.post("/v1/completions", json={"model": "lora", "prompt": "hi there", "max_tokens": 2})
        assert ok.status_code == 200 and len(ok.json()["choices"][0]["token_ids"]) <= 2
        assert client.get("/health").json()["status"] == "ok"


def test_adapter_endpoints_key_folders_and_lru_hot_swap(files, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "only_bin").mkdir()
    (allowed / "only_bin" / "adapter_config.json").write_text((files / "lm_adapters/lora/adapter_config.json").read_text())
    (allowed / "only_bin" / "adapter_model.bin").write_bytes(b"pickle bytes that must never be loaded")
    (allowed / "corrupt").mkdir()
    (allowed / "corrupt" / "adapter_config.json").write_text((files / "lm_adapters/lora/adapter_config.json").read_text())
    (allowed / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    (allowed / "escape").symlink_to(files / "lm_adapters" / "dora")
    os.environ["DT_TEST_KEY"] = KEY
    app, _ = build(serve_args(files, "lm", "--adapters", f"lora={files / 'lm_adapters' / 'lora'}", "--allow-dir",
                              str(allowed), "--max-loaded", "2", "--api-key-env", "DT_TEST_KEY"))
    auth = {"Authorization": f"Bearer {KEY}"}
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        body = {"name": "m", "path": str(files / "lm_adapters" / "mora")}
        assert client.post("/v1/adapters", json=body).status_code == 401
        assert client.post("/v1/adapters", json=body, headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.delete("/v1/adapters/lora").status_code == 401
        denied = client.post("/v1/adapters", json=body, headers=auth)  # mora's folder is not an allowed one
        assert denied.status_code == 403 and "outside the allowed folders" in denied.json()["error"]["message"]
        escape = client.post("/v1/adapters", json={"name": "e", "path": str(allowed / "escape")}, headers=auth)
        assert escape.status_code == 403  # a symlink out of an allowed folder is followed, then refused
        only_bin = client.post("/v1/adapters", json={"name": "b", "path": str(allowed / "only_bin")}, headers=auth)
        assert only_bin.status_code == 400 and "only reads safetensors" in only_bin.json()["error"]["message"]
        corrupt = client.post("/v1/adapters", json={"name": "c", "path": str(allowed / "corrupt")}, headers=auth)
        assert corrupt.status_code == 400 and "safetensors" in corrupt.json()["error"]["message"]
        bad_name = client.post("/v1/adapters", json={"name": "a.b", "path": str(allowed)}, headers=auth)
        assert bad_name.status_code == 400
        for name in ("mora", "asy"):  # copy real adapters into the allowed folder and load them at run time
            target = allowed / name
            target.mkdir()
            for f in (files / "lm_adapters" / name).iterdir():
                (target / f.name).write_bytes(f.read_bytes())
            assert client.post("/v1/adapters", json={"name": name, "path": str(target)}, headers=auth).status_code == 201
        assert client.post("/v1/adapters", json={"name": "asy", "path": str(allowed / "asy")},
                           headers=auth).status_code == 409
        listed = {a["name"]: a for a in client.get("/v1/adapters").json()["data"]}
        assert set(listed) == {"lora", "mora", "asy"} and listed["asy"]["method"] == "asylora"
        for name in ("lora", "mora", "asy", "lora"):  # three adapters, room for two: least recently used go
            response = client.post("/v1/completions", json={"model": name, "prompt": PROMPTS[0], "max_tokens": 3})
            assert response.json()["choices"][0]["token_ids"] == offline_generate(files, name, PROMPTS[0], 3), name
        health = client.get("/health").json()
        assert health["adapter_evictions"] >= 2 and len(health["loaded"]) <= 2
        assert client.delete("/v1/adapters/mora", headers=auth).status_code == 200
        assert client.post("/v1/completions", json={"model": "mora", "prompt": "hi"}).status_code == 404
        assert client.get("/health").json()["status"] == "ok"


def test_registry_scan_lru_and_limits(files, tmp_path):
    from transformers import LlamaForCausalLM

    registry = AdapterRegistry(LlamaForCausalLM.from_pretrained(files / "lm"), [files / "lm_adapters"], max_loaded=2)
    assert registry.scan(files / "lm_adapters") == ["asy", "dora", "lora", "mora", "prefix", "prompt"]
    assert registry.loaded == {} and registry.model is None  # lazy
    registry.ensure(["lora", "dora"])
    registry.ensure(["lora"])  # lora is now the most recently used
    registry.ensure(["mora"])
    assert list(registry.loaded) == ["lora", "mora"] and sorted(registry.model.configs) == ["lora", "mora"]
    with pytest.raises(ServeError, match="at most 2 may be loaded"):
        registry.ensure(["lora", "mora", "asy"])
    with pytest.raises(Forbidden):
        registry.add("x", tmp_path)
    registry.ensure(["prompt", "prefix"])  # a causal LM: prompt and prefix rows share mixed batches
    assert registry.batchable("prompt") and registry.batchable("prefix") and registry.batchable("lora")


def test_cli_serve_command_answers_over_http(files):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "deltatune", "serve", "--model", str(files / "lm"), "--adapters",
               str(files / "lm_adapters"), "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        response = httpx.post(f"{url}/v1/completions", json={"model": "dora", "prompt": PROMPTS[1], "max_tokens": 4},
                              timeout=60)
        assert response.json()["choices"][0]["token_ids"] == offline_generate(files, "dora", PROMPTS[1], 4)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert Path(files / "lm").is_dir()


def sse(response) -> tuple[dict[int, str], dict[int, str], int]:
    """(text per prompt index, finish reason per index, number of events) of a streamed completion."""
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for event in events[:-1]:
        for choice in json.loads(event[6:])["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if choice["finish_reason"]:
                finish[choice["index"]] = choice["finish_reason"]
    return texts, finish, len(events) - 1


def test_sampling_stop_strings_and_streaming(files):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(files / "lm")
    app, _ = build(serve_args(files, "lm", "--adapters", str(files / "lm_adapters"), "--max-wait-ms", "100"))
    greedy = [{"model": n, "prompt": PROMPTS[i], "max_tokens": 8} for i, n in enumerate(["lora", "prompt", None, "dora"])]
    sampled = {"model": "asy", "prompt": PROMPTS[4], "max_tokens": 10, "temperature": 1.0, "seed": 1234}
    nucleus = {"model": "lora", "prompt": PROMPTS[3], "max_tokens": 10, "temperature": 0.8, "top_p": 0.5, "seed": 5}
    with BackgroundServer(app) as url:
        plain = asyncio.run(gather_posts(url, "/v1/completions", [*greedy, sampled]))
        streamed = asyncio.run(gather_posts(url, "/v1/completions", [{**b, "stream": True} for b in [*greedy, sampled]]))
        other_seed = {**sampled, "seed": 99}
        again = asyncio.run(gather_posts(url, "/v1/completions", [other_seed, greedy[2], sampled]))  # another batch
        two = httpx.post(f"{url}/v1/completions", json={**sampled, "prompt": [PROMPTS[4], PROMPTS[4]]}, timeout=60).json()
        nucleus_runs = [httpx.post(f"{url}/v1/completions", json=b, timeout=60) for b in (nucleus, nucleus, {**nucleus, "stream": True})]
        text = plain[0].json()["choices"][0]["text"]
        k = next(k for k in range(1, len(text) - 2) if text[k:k + 2].strip() and text.find(text[k:k + 2]) == k)
        stop_body = {**greedy[0], "stop": [text[k:k + 2], "never-seen"]}
        stopped = httpx.post(f"{url}/v1/completions", json=stop_body, timeout=60).json()["choices"][0]
        stopped_stream = httpx.post(f"{url}/v1/completions", json={**stop_body, "stream": True}, timeout=60)
    assert all(r.status_code == 200 for r in [*plain, *again]), [r.text for r in [*plain, *again]]
    for body, response, stream in zip(greedy, plain, streamed):  # greedy: the offline model's answer, streamed alike
        choice = response.json()["choices"][0]
        expected = offline_generate(files, body["model"], body["prompt"], body["max_tokens"])
        assert choice["token_ids"] == expected and choice["text"] == tokenizer.decode(expected, skip_special_tokens=True)
        texts, finish, _ = sse(stream)
        assert texts == {0: choice["text"]} and finish == {0: choice["finish_reason"]}, body
    sample = plain[-1].json()["choices"][0]
    assert again[2].json()["choices"][0] == sample  # same seed, other batch: same tokens
    assert again[0].json()["choices"][0]["token_ids"] != sample["token_ids"]  # another seed: another sample
    assert sample["token_ids"] != offline_generate(files, "asy", PROMPTS[4], 10)  # it really sampled
    texts, finish, events = sse(streamed[-1])
    assert texts == {0: sample["text"]} and finish == {0: sample["finish_reason"]} and events >= 2
    assert two["choices"][0]["text"] == sample["text"] != two["choices"][1]["text"]  # prompt k samples with seed + k
    first = nucleus_runs[0].json()["choices"][0]
    assert nucleus_runs[1].json()["choices"][0] == first and sse(nucleus_runs[2])[0] == {0: first["text"]}
    assert stopped["text"] == text[:k] and stopped["finish_reason"] == "stop"
    assert sse(stopped_stream)[:2] == ({0: text[:k]}, {0: "stop"})


def test_nucleus_sampling_draws_only_from_the_nucleus():
    from deltatune.serve.decoding import nucleus_sample

    logits = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]).log()
    draws = [nucleus_sample(logits, 1.0, 0.75, torch.Generator().manual_seed(s)) for s in range(2000)]
    assert set(draws) == {0, 1} and abs(draws.count(0) / 2000 - 0.625) < 0.04
    assert {nucleus_sample(logits, 1.0, 0.4, torch.Generator().manual_seed(s)) for s in range(50)} == {0}
    assert nucleus_sample(logits, 1.0, 1.0, torch.Generator().manual_seed(3)) == nucleus_sample(
        logits, 1.0, 1.0, torch.Generator().manual_seed(3))
