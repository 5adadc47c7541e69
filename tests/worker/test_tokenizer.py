"""Tokenizer, chat templates and incremental detokenization."""

from __future__ import annotations

from pathlib import Path

import pytest
from inferfleet.worker.errors import InvalidRequestError
from inferfleet.worker.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world! Café 東京 🙂🚀 done.",
    "naïve façade — Ünïcödé",
    "emoji only: 🧑‍🚀🏳️‍🌈",
    "plain ascii and numbers 12345",
]


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_never_emits_broken_utf8(tiny_llama: Path, text: str) -> None:
    tok = Tokenizer(tiny_llama)
    prompt = tok.encode("Prompt:")
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # byte-level pieces: multi-byte characters span tokens
    det = IncrementalDetokenizer(tok, prompt)
    pieces = []
    for t in ids:
        det.add_tokens([t])
        d = det.take_delta(finished=False)
        assert "\ufffd" not in d, f"broken UTF-8 emitted: {d!r}"
        pieces.append(d)
    det.finish()
    pieces.append(det.take_delta(finished=True))
    assert "".join(pieces) == text == tok.decode(ids)


def test_stop_string_split_across_tokens_is_held_back_then_cut(tiny_llama: Path) -> None:
    tok = Tokenizer(tiny_llama)
    text = "the operator watches the queue"
    ids = tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], stop=["watches"])
    streamed = ""
    for t in ids:
        det.add_tokens([t])
        streamed += det.take_delta(finished=False)
        assert "watch" not in streamed or det.stopped_by
        if det.stopped_by:
            break
    assert det.stopped_by == "watches"
    streamed += det.take_delta(finished=True)
    assert streamed == "the operator "


def test_chat_templates_render_for_every_family(tiny_models: dict[str, Path]) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    expected_markers = {
        "llama": "<|start_header_id|>assistant<|end_header_id|>",
        "qwen2": "<|im_start|>assistant\n",
        "qwen3": "<|im_start|>assistant\n",
        "mistral": "[INST] Hi there [/INST]",
    }
    for arch, d in tiny_models.items():
        tok = Tokenizer(d)
        rendered = tok.apply_chat_template(msgs)
        assert expected_markers[arch] in rendered
        assert "Be brief." in rendered
        ids = tok.encode_chat(msgs)
        assert tok.decode(ids, skip_special_tokens=False) == rendered
        specials = [
            t for t in ids if tok.id_to_token(t) and tok.id_to_token(t).startswith(("<|", "[INST", "<s"))
        ]
        assert specials, f"{arch}: special tokens must encode as single ids"


def test_chat_template_errors_are_bad_input(tiny_models: dict[str, Path]) -> None:
    tok = Tokenizer(tiny_models["mistral"])
    with pytest.raises(InvalidRequestError) as e:
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    assert e.value.param == "messages"


def test_matches_transformers_tokenizer(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    for d in tiny_models.values():
        ours = Tokenizer(d)
        theirs = AutoTokenizer.from_pretrained(str(d))
        for text in TEXTS:
            assert ours.encode(text) == theirs.encode(text)
        msgs = [{"role": "user", "content": "Hello"}]
        assert ours.apply_chat_template(msgs) == theirs.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True
        )


def test_partial_stop_suffix_matches_brute_force(tiny_llama: Path) -> None:
    import random

    tok = Tokenizer(tiny_llama)
    rng = random.Random(0)
    for _ in range(500):
        stops = [
            "".join(rng.choice("abc") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))
        ]
        det = IncrementalDetokenizer(tok, [], stop=stops)
        det.text = "".join(rng.choice("abcx") for _ in range(rng.randint(0, 12)))
        # a tail as long as a whole stop string would already have stopped the request
        brute = max(
            (
                k
                for k in range(1, min(det._hold, len(det.text)) + 1)
                if any(len(s) > k and s.startswith(det.text[-k:]) for s in stops)
            ),
            default=0,
        )
        assert det._partial_stop_suffix() == brute, (stops, det.text)


def test_stop_strings_give_one_text_streamed_or_not(tiny_llama: Path) -> None:
    """Whether the deltas are taken after every token (streaming) or only at the end, the text is
    the same and the deltas add up to it; a stop string never cuts text already released; and a
    stop string that never occurs changes nothing. Random texts, stop strings and min_tokens
    (a stop string completed before min_tokens stays text)."""
    import random

    tok = Tokenizer(tiny_llama)
    rng = random.Random(1)

    def run(ids: list[int], stops: list[str], min_tokens: int, streamed: bool) -> tuple[str, str, str | None]:
        det = IncrementalDetokenizer(tok, [], stop=stops, min_tokens=min_tokens)
        deltas = []
        for t in ids:
            det.add_tokens([t])
            if streamed:
                deltas.append(det.take_delta(finished=False))
            if det.stopped_by is not None:
                break
        det.finish()
        deltas.append(det.take_delta(finished=True))
        return "".join(deltas), det.text, det.stopped_by

    for _ in range(300):
        text = "".join(rng.choice(["ab", "a", "b", " ", "x", "é", "ba"]) for _ in range(rng.randint(1, 14)))
        ids = tok.encode(text, add_special_tokens=False)
        stops = [
            "".join(rng.choice("abx é") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
        ]
        min_tokens = rng.randint(0, len(ids))
        streamed = run(ids, stops, min_tokens, True)
        assert streamed[0] == streamed[1], (text, stops, min_tokens)  # nothing released was cut
        assert streamed == run(ids, stops, min_tokens, False), (text, stops, min_tokens)
        assert streamed == run(ids, [*stops, "zzzzzzzz"], min_tokens, True), (text, stops, min_tokens)


def test_long_texts_encode_without_holding_the_gil(tiny_llama: Path) -> None:
    """The server tokenizes in a worker thread; a long prompt must let the event loop's thread run
    meanwhile (HF tokenizers' encode holds the GIL for the whole call, encode_batch does not), and
    give the same ids as the short path."""
    import threading
    import time

    from inferfleet.worker import tokenizer as tk_mod

    tok = Tokenizer(tiny_llama)
    text = "Café 東京 queue " * 60_000  # ~1 M characters: a few hundred ms of Rust work
    assert len(text) > tk_mod._GIL_FREE_CHARS
    for special in (True, False):
        assert (
            tok.encode(text, add_special_tokens=special)
            == tok._tok.encode(text, add_special_tokens=special).ids
        )
    ticks = 0
    done = threading.Event()

    def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            time.sleep(0.002)
            ticks += 1

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        time.sleep(0.01)
        start = ticks
        t0 = time.perf_counter()
        tok.encode(text)
        took = time.perf_counter() - t0
        during = ticks - start
    finally:
        done.set()
        thread.join()
    # held for the whole call, the GIL would let the ticker run about once; here it runs throughout
    assert during >= min(10, took / 0.02), (during, took)


def test_token_bytes_join_into_the_text(tiny_models: dict[str, Path]) -> None:
    """Tokenizer.token_bytes: each token's own bytes (a piece of a multi-byte character alone),
    which joined give the decoded text, for every tiny family (byte-level BPE)."""
    for arch, path in tiny_models.items():
        tok = Tokenizer(path)
        for text in TEXTS:
            ids = tok.encode(text, add_special_tokens=False)
            raws = [tok.token_bytes(i) for i in ids]
            assert b"".join(raws).decode("utf-8") == tok.decode(ids) == text, arch
            partial = [r for r in raws if r.decode("utf-8", "replace") != r.decode("utf-8", "ignore")]
            assert partial or text.isascii(), arch  # multi-byte characters span tokens


def test_token_bytes_of_a_sentencepiece_vocabulary(tmp_path: Path) -> None:
    """Llama 2 / Mistral style: "▁" for spaces and <0xNN> byte-fallback pieces for characters the
    vocabulary lacks, each such piece one byte."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "h", "i", "▁h", "▁hi"]
    vocab = {p: i for i, p in enumerate(pieces)}
    hf = HFTokenizer(models.BPE(vocab, [("▁", "h"), ("▁h", "i")], unk_token="<unk>", byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    hf.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    hf.add_special_tokens(["<s>", "</s>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    ids = tok.encode("hi é hi", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in ids] == ["▁hi", "▁", "<0xC3>", "<0xA9>", "▁hi"]
    raws = [tok.token_bytes(i) for i in ids]
    assert raws == [b" hi", b" ", b"\xc3", b"\xa9", b" hi"]
    assert b"".join(raws).decode().removeprefix(" ") == tok.decode(ids) == "hi é hi"
    assert tok.token_bytes(vocab["</s>"]) == b"</s>"
