"""The OpenAI API as the official client sees it: chat and completions, streaming and not,
usage, n, logprobs, stop, batched prompts. A real server on loopback (tiny random llama)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pytest
from inferfleet.worker.tokenizer import Tokenizer
from server_helpers import ServerThread

IGNORE_EOS = {"ignore_eos": True}
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Write a haiku about GPUs."},
]


def chat_both(client: Any, **kw: Any) -> tuple[Any, str, list[Any]]:
    """The same chat request without and with streaming: (response, streamed text, chunks)."""
    resp = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, **kw)
    chunks = list(
        client.chat.completions.create(
            model="tiny-llama", messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **kw
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return resp, text, chunks


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 11, "top_p": 0.9}])
def test_chat_stream_equals_non_stream(server: ServerThread, sampling: dict[str, Any]) -> None:
    client = server.openai()
    resp, text, chunks = chat_both(client, max_tokens=24, extra_body=IGNORE_EOS, **sampling)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert text == choice.message.content and len(text) > 0
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [choice.finish_reason] == ["length"]
    # include_usage: every chunk carries usage null, the last one (no choices) the totals
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(last.usage, k) for k in counts] == [getattr(resp.usage, k) for k in counts]
    # the streamed request came second: its prompt's full blocks came from the prefix cache
    assert last.usage.prompt_tokens_details.cached_tokens > 0
    assert resp.usage.completion_tokens == 24
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.8, "seed": 5}])
def test_completion_stream_equals_non_stream(server: ServerThread, sampling: dict[str, Any]) -> None:
    client = server.openai()
    kw = {"model": "tiny-llama", "prompt": "The scheduler admits new requests while", "max_tokens": 20}
    resp = client.completions.create(**kw, extra_body=IGNORE_EOS, **sampling)
    chunks = list(client.completions.create(**kw, stream=True, extra_body=IGNORE_EOS, **sampling))
    assert "".join(c.choices[0].text for c in chunks) == resp.choices[0].text
    assert chunks[-1].choices[0].finish_reason == resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 20
    assert resp.object == "text_completion"


def test_usage_equals_engine_token_counts(server: ServerThread, tiny_llama: Path) -> None:
    tok = Tokenizer(tiny_llama)
    client = server.openai()
    before = server.metrics()
    chat = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=9, extra_body=IGNORE_EOS
    )
    prompt = "Readiness turns green only once the weights are loaded"
    comp = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=7, extra_body=IGNORE_EOS)
    after = server.metrics()
    assert chat.usage.prompt_tokens == len(tok.encode_chat(MESSAGES))
    assert comp.usage.prompt_tokens == len(tok.encode(prompt))
    assert (chat.usage.completion_tokens, comp.usage.completion_tokens) == (9, 7)
    for u in (chat.usage, comp.usage):
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    delta = {
        k: after[k] - before.get(k, 0)
        for k in ("inferfleet_prompt_tokens_total", "inferfleet_generation_tokens_total")
    }
    assert delta["inferfleet_prompt_tokens_total"] == chat.usage.prompt_tokens + comp.usage.prompt_tokens
    assert delta["inferfleet_generation_tokens_total"] == 9 + 7
    assert after['inferfleet_requests_total{finish_reason="length"}'] >= 2


def test_default_max_tokens_is_the_remaining_context(tiny_llama: Path) -> None:
    with ServerThread(tiny_llama, engine={"max_model_len": 40}) as s:
        r = s.openai().completions.create(model="tiny-llama", prompt="Hello there", extra_body=IGNORE_EOS)
        assert r.usage.prompt_tokens + r.usage.completion_tokens == 40
        assert r.choices[0].finish_reason == "length"
        assert s.openai().models.list().data[0].model_extra["max_model_len"] == 40


def test_max_completion_tokens_and_token_id_prompts(server: ServerThread) -> None:
    client = server.openai()
    r = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_completion_tokens=3, extra_body=IGNORE_EOS
    )
    assert r.usage.completion_tokens == 3
    r = client.completions.create(
        model="tiny-llama", prompt=[5, 6, 7, 8], max_tokens=4, extra_body=IGNORE_EOS
    )
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 4


def test_stop_strings_cut_the_text(server: ServerThread) -> None:
    client = server.openai()
    kw: dict[str, Any] = {"model": "tiny-llama", "prompt": "Hello!", "temperature": 0.0}
    full = client.completions.create(**kw, max_tokens=30, extra_body=IGNORE_EOS).choices[0].text
    stop = next(full[i : i + 3] for i in range(4, len(full) - 3) if full[i : i + 3].strip())
    cut = full[: full.index(stop)]
    r = client.completions.create(**kw, max_tokens=30, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    streamed = list(client.completions.create(**kw, max_tokens=30, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_n_choices_use_distinct_seeds(server: ServerThread) -> None:
    client = server.openai()
    kw: dict[str, Any] = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 12, "temperature": 1.0}
    r = client.chat.completions.create(n=3, seed=100, extra_body=IGNORE_EOS, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    single = [client.chat.completions.create(seed=100 + i, extra_body=IGNORE_EOS, **kw) for i in range(3)]
    singles = [s.choices[0].message.content for s in single]
    assert [c.message.content for c in r.choices] == singles
    assert len(set(singles)) > 1
    # the prompt is counted once, the completions of every choice
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (single[0].usage.prompt_tokens, 36)
    streamed: dict[int, str] = {}
    for c in client.chat.completions.create(n=3, seed=100, stream=True, extra_body=IGNORE_EOS, **kw):
        for ch in c.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + (ch.delta.content or "")
    assert [streamed[i] for i in range(3)] == singles


def test_batched_prompts(server: ServerThread) -> None:
    client = server.openai()
    prompts = ["An inference fleet", "Balloon pods hold a GPU node"]
    r = client.completions.create(
        model="tiny-llama", prompt=prompts, n=2, max_tokens=6, temperature=0.0, extra_body=IGNORE_EOS
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    singles = [
        client.completions.create(
            model="tiny-llama", prompt=p, max_tokens=6, temperature=0.0, extra_body=IGNORE_EOS
        )
        for p in prompts
    ]
    texts = [c.text for c in r.choices]
    assert texts == [singles[0].choices[0].text] * 2 + [singles[1].choices[0].text] * 2
    assert r.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert r.usage.completion_tokens == 24


def test_chat_logprobs(server: ServerThread) -> None:
    client = server.openai()
    kw: dict[str, Any] = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 8, "temperature": 0.0}
    r = client.chat.completions.create(logprobs=True, top_logprobs=3, extra_body=IGNORE_EOS, **kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert t.token == t.top_logprobs[0].token and t.logprob == pytest.approx(tops[0])  # greedy
        assert bytes(t.bytes).decode("utf-8", "backslashreplace") == t.token
    streamed = [
        t
        for c in client.chat.completions.create(
            logprobs=True, top_logprobs=3, stream=True, extra_body=IGNORE_EOS, **kw
        )
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]

    # the same tokens; values equal up to float32 rounding: the second request reads the first's
    # prompt from the prefix cache (a chunk of another shape), so the last bits may differ
    def flat(ts: list[Any]) -> list[tuple[str, list[int], float]]:
        return [(x.token, x.bytes, x.logprob) for t in ts for x in (t, *t.top_logprobs)]

    got, want = flat(streamed), flat(content)
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert [g[2] for g in got] == pytest.approx([w[2] for w in want], rel=1e-5, abs=1e-5)
    plain = client.chat.completions.create(**kw)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs(server: ServerThread) -> None:
    client = server.openai()
    r = client.completions.create(
        model="tiny-llama", prompt="Hello", max_tokens=6, logprobs=2, temperature=0.0, extra_body=IGNORE_EOS
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for tok, top in zip(lp.tokens, lp.top_logprobs):
        assert tok in top and 1 <= len(top) <= 3


def _special_token_bytes(server: ServerThread) -> set[bytes]:
    tok = server.server.tokenizer
    return {t.content.encode() for t in tok._tok.get_added_tokens_decoder().values()}


def test_logprobs_of_tokens_inside_a_character(server: ServerThread) -> None:
    """Sampled text from the random model is full of tokens that carry part of a multi-byte
    character. Their `bytes` are their own bytes (joined, they give the text, as OpenAI documents
    the field for), their `token` strings escape the partial bytes (so distinct tokens stay
    distinct), and completions' text_offset points into the text where each token starts."""
    client = server.openai()
    special = _special_token_bytes(server)
    kw: dict[str, Any] = {"model": "tiny-llama", "max_tokens": 40, "temperature": 1.0, "seed": 2}
    r = client.chat.completions.create(
        messages=[{"role": "user", "content": "héllo wörld ü 東京"}], logprobs=True, top_logprobs=2, **kw
    )
    content = r.choices[0].logprobs.content
    raws = [bytes(t.bytes) for t in content]
    partial = [b for b in raws if "\\x" in b.decode("utf-8", "backslashreplace")]  # not UTF-8 alone
    assert partial, "the sample has no partial token: pick another seed"
    assert (
        b"".join(b for b in raws if b not in special).decode("utf-8", "replace")
        == r.choices[0].message.content
    )
    for t, b in zip(content, raws):
        assert t.token == b.decode("utf-8", "backslashreplace")
        for alt in t.top_logprobs:
            assert alt.token == bytes(alt.bytes).decode("utf-8", "backslashreplace")

    c = client.completions.create(prompt="héllo wörld ü 東京", logprobs=3, **kw).choices[0]
    lp, text = c.logprobs, c.text
    assert any("\\x" in t for t in lp.tokens)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] <= len(text)
    whole = 0
    for t, offset, top, logprob in zip(lp.tokens, lp.text_offset, lp.top_logprobs, lp.token_logprobs):
        assert top[t] == logprob and len(top) >= 3  # distinct partial tokens: distinct keys
        if "\\x" not in t and t.encode() not in special:  # a whole token: found where its offset says
            assert text[offset : offset + len(t)] == t, (t, offset)
            whole += 1
    assert whole >= 5
    streamed = client.completions.create(prompt="héllo wörld ü 東京", logprobs=3, stream=True, **kw)
    chunks = [ch.choices[0].logprobs for ch in streamed if ch.choices and ch.choices[0].logprobs]
    assert [o for ch in chunks for o in ch.text_offset] == lp.text_offset
    assert [t for ch in chunks for t in ch.tokens] == lp.tokens


def test_content_parts_and_developer_role(server: ServerThread) -> None:
    client = server.openai()
    kw: dict[str, Any] = {
        "model": "tiny-llama",
        "max_tokens": 6,
        "temperature": 0.0,
        "extra_body": IGNORE_EOS,
    }
    plain = client.chat.completions.create(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one\ntwo"}], **kw
    )
    parts = client.chat.completions.create(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        ],
        **kw,
    )
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_async_client_and_models(server: ServerThread) -> None:
    async def main() -> tuple[str, list[str]]:
        client = server.async_openai()
        stream = await client.chat.completions.create(
            model="tiny-llama", messages=MESSAGES, max_tokens=5, stream=True, extra_body=IGNORE_EOS
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        models = await client.models.list()
        one = await client.models.retrieve(server.server.model_name)
        assert one.id == server.server.model_name and one.model_dump() == models.data[0].model_dump()
        with pytest.raises(openai.NotFoundError) as e:
            await client.models.retrieve("org/other-model")
        assert e.value.code == "model_not_found" and "org/other-model" in e.value.message
        await client.close()
        return text, [m.id for m in models.data]

    text, ids = asyncio.run(main())
    assert text and ids == [server.server.model_name]
    doc = server.get("/openapi.json").json()
    assert {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/models/{model}",
        "/health/ready",
    } <= set(doc["paths"])
