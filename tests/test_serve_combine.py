"""``POST /v1/adapters`` with ``combine``: the server builds a weighted combination of registered adapters, serves
it like the offline ``add_weighted_adapter`` result, and evicts / reloads it like any other adapter."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from deltatune.cli import build_parser  # noqa: E402
from deltatune.serve.app import BackgroundServer  # noqa: E402
from deltatune.serve.cli import build  # noqa: E402

PROMPT = "the cat sat on"


@pytest.fixture(scope="module")
def files(tmp_path_factory, minilm_path):
    """A tiny Llama (MiniLM's tokenizer) and LoRA, AsyLoRA, DoRA and prompt-tuning adapters for it, in folders."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("serve_combine")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id))
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    configs = {
        "lora": dt.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init="random"),
        "asy": dt.AsyLoraConfig(r=4, alpha=16, targets="all-linear", init="random"),
        "dora": dt.DoraConfig(r=2, targets=["q_proj", "o_proj"], init="random"),
        "prompt": dt.PromptTuningConfig(num_virtual_tokens=3),
    }
    for name, config in configs.items():
        torch.manual_seed(len(name))
        model = dt.wrap(LlamaForCausalLM.from_pretrained(root / "lm"), config, name)
        with torch.no_grad():
            for parameter in model.trainable_parameters():
                parameter.mul_(4 if name != "prompt" else 1)  # strong enough to change greedy tokens
        model.save(root / "lm_adapters" / name, adapter=name)
    return root


def offline_combined(files, prompt: str, max_tokens: int) -> list[int]:
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(files / "lm")
    model = dt.load(LlamaForCausalLM.from_pretrained(files / "lm").eval(), files / "lm_adapters" / "lora", name="lora")
    dt.load(model, files / "lm_adapters" / "asy", name="asy")
    model.add_weighted_adapter(["lora", "asy"], [1.0, -0.5], "mix", "cat")
    model.set_adapter("mix")
    encoded = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        out = model.eval().generate(**encoded, max_new_tokens=max_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
    tokens = out[0, encoded["input_ids"].shape[1]:].tolist()
    return tokens[: tokens.index(tokenizer.sep_token_id)] if tokenizer.sep_token_id in tokens else tokens


def test_post_combine_serves_the_combination_and_reloads_it(files) -> None:
    adapters = [f"{n}={files / 'lm_adapters' / n}" for n in ("lora", "asy", "dora", "prompt")]
    app, _ = build(build_parser().parse_args(["serve", "--model", str(files / "lm"), "--adapters", *adapters,
                                              "--max-loaded", "3"]))
    body = {"name": "mix", "combine": {"adapters": ["lora", "asy"], "weights": [1.0, -0.5], "type": "cat"}}
    want = offline_combined(files, PROMPT, 4)
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        created = client.post("/v1/adapters", json=body)
        assert created.status_code == 201 and created.json()["relative_error"] == 0.0
        ask = {"model": "mix", "prompt": PROMPT, "max_tokens": 4}
        assert client.post("/v1/completions", json=ask).json()["choices"][0]["token_ids"] == want
        for name in ("lora", "asy", "dora"):  # room for three: mix is evicted, then reloaded from its folder
            assert client.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 1}).status_code == 200
        assert "mix" not in client.get("/health").json()["loaded"]
        assert client.post("/v1/completions", json=ask).json()["choices"][0]["token_ids"] == want
        assert client.post("/v1/adapters", json=body).status_code == 409
        bad = client.post("/v1/adapters", json={"name": "p", "combine": {"adapters": ["lora", "prompt"]}})
        assert bad.status_code == 400 and "not a weight update" in bad.json()["error"]["message"]
        both = client.post("/v1/adapters", json={"name": "q", "path": "x", "combine": {"adapters": ["lora"]}})
        assert both.status_code == 400 and "either 'path'" in both.json()["error"]["message"]
        assert client.get("/health").json()["status"] == "ok"
