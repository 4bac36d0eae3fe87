"""``/v1/chat/completions`` and ``/v1/models`` with the real ``openai`` client against SmolLM2 served by
``deltatune serve`` (a uvicorn server on a free localhost port): plain, streamed, stop, max_tokens, sampling, usage,
and a mixed batch of base and adapter rows."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import deltatune as dt

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from deltatune.cli import build_parser  # noqa: E402
from deltatune.serve.app import BackgroundServer  # noqa: E402
from deltatune.serve.cli import build  # noqa: E402
from deltatune.train.models import load_model, load_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def lora_folder(smollm2, tmp_path_factory):
    """A random LoRA on SmolLM2's attention, strong enough to change its greedy answers."""
    model, _ = load_model(smollm2.path, "causal-lm")
    torch.manual_seed(0)
    wrapped = dt.wrap(model, dt.LoraConfig(r=4, alpha=64, targets=["q_proj", "v_proj"], init="random"), "lora")
    folder = tmp_path_factory.mktemp("chat-adapters") / "lora"
    wrapped.save(folder, adapter="lora")
    return folder


def test_chat_completions_with_the_openai_client(smollm2, lora_folder):
    app, _ = build(build_parser().parse_args(["serve", "--model", smollm2.path, "--adapters", f"lora={lora_folder}",
                                              "--max-wait-ms", "200"]))
    tok = load_tokenizer(smollm2.path)
    prompt = tok.apply_chat_template(FRANCE, tokenize=False, add_generation_prompt=True)
    with BackgroundServer(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        models = client.models.list()
        plain = client.chat.completions.create(model=smollm2.path, messages=FRANCE, max_tokens=10)
        stream = list(client.chat.completions.create(model="base", messages=FRANCE, max_tokens=10, stream=True))
        stopped = client.chat.completions.create(model=smollm2.path, messages=FRANCE, max_tokens=10, stop=["Paris"])
        short = client.chat.completions.create(model=smollm2.path, messages=FRANCE, max_tokens=3)
        sampled = [client.chat.completions.create(model=smollm2.path, messages=FRANCE, max_tokens=6, temperature=1.0,
                                                  seed=s) for s in (7, 7, 8)]
        with ThreadPoolExecutor(4) as pool:  # base and adapter rows in the same micro-batch
            mixed = list(pool.map(lambda m: client.chat.completions.create(model=m, messages=FRANCE, max_tokens=10),
                                  ["base", "lora", "base", "lora"]))
        health = httpx.get(f"{url}/health").json()
        bad = httpx.post(f"{url}/v1/chat/completions", json={"model": "nope", "messages": FRANCE})
    assert [m.id for m in models.data] == [smollm2.path, "lora"]
    answer = plain.choices[0]
    assert answer.message.role == "assistant" and answer.message.content == "The capital of France is Paris."
    assert answer.finish_reason == "stop" and plain.object == "chat.completion"
    assert plain.usage.prompt_tokens == len(tok(prompt)["input_ids"]) and plain.usage.completion_tokens == 7
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + 7
    assert len(stream) >= 3 and all(c.object == "chat.completion.chunk" for c in stream)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == answer.message.content
    assert stream[-1].choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == "The capital of France is " and stopped.choices[0].finish_reason == "stop"
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert short.choices[0].message.content == "The capital of"
    texts = [s.choices[0].message.content for s in sampled]
    assert texts[0] == texts[1] != texts[2]  # seeded sampling: same seed, same text
    assert [m.choices[0].message.content for m in mixed[::2]] == [answer.message.content] * 2
    assert mixed[1].choices[0].message.content == mixed[3].choices[0].message.content != answer.message.content
    assert health["mixed_batches"] >= 1
    assert bad.status_code == 404 and "no adapter named 'nope'" in json.loads(bad.text)["error"]["message"]
