"""Engine behaviour on a tiny checkpoint: batching invariance, preemption, prefix caching,
sampling, stopping, abort, and typed errors for bad input."""

from __future__ import annotations

import itertools
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from inferfleet.worker import LLM, EngineConfig, LLMEngine, SamplingParams
from inferfleet.worker.errors import InvalidRequestError, UnsupportedModelError


def prompts_for(seed: int, n: int, lo: int = 1, hi: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 500) for _ in range(40)]
    out = [[rng.randrange(3, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n - 2)]
    out += [shared + [rng.randrange(3, 500) for _ in range(5)], shared + [7, 8]]
    return out


def engine(model: Path, **kw: object) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), device="cpu", dtype="float32", **kw))  # type: ignore[arg-type]


def generate(
    eng: LLMEngine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
) -> list[list[int]]:
    plist = params if isinstance(params, list) else [params] * len(prompts)
    ids = []
    for i, (p, sp) in enumerate(zip(prompts, plist)):
        rid = f"r{i}-{eng.stats.steps}"
        eng.add_request(rid, params=sp, prompt_token_ids=p)
        ids.append(rid)
    final = eng.generate_all(ids)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    eng.scheduler.check_invariants()
    return [final[r].token_ids for r in ids]


GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(tiny_llama: Path) -> list[list[int]]:
    """Each prompt on its own, big budget, no prefix cache: the reference every variant must equal."""
    eng = engine(tiny_llama, enable_prefix_caching=False)
    return [generate(eng, [p], GREEDY)[0] for p in prompts_for(0, 10)]


@pytest.mark.parametrize(
    "variant",
    [
        {"enable_prefix_caching": False},
        {"enable_prefix_caching": True},
        {"max_num_batched_tokens": 16, "max_num_seqs": 8},
        {"max_num_batched_tokens": 16, "max_num_seqs": 16, "enable_prefix_caching": True, "block_size": 4},
        {"max_num_seqs": 3},
    ],
    ids=["batched", "prefix-cache", "small-chunk", "small-chunk-block4", "max3seqs"],
)
def test_batched_equals_alone(tiny_llama: Path, alone: list[list[int]], variant: dict) -> None:
    eng = engine(tiny_llama, **variant)
    assert generate(eng, prompts_for(0, 10), GREEDY) == alone


@pytest.mark.parametrize("prefix", [False, True])
def test_preemption_under_tiny_kv_budget(tiny_llama: Path, alone: list[list[int]], prefix: bool) -> None:
    # 8 blocks of 16 = 128 token slots for 10 sequences of up to ~114 tokens: preemption is forced
    eng = engine(tiny_llama, num_kv_blocks=8, max_model_len=128, enable_prefix_caching=prefix)
    assert generate(eng, prompts_for(0, 10), GREEDY) == alone
    assert eng.stats.preemptions > 0


def test_prefix_cache_reuses_blocks_and_counts(tiny_llama: Path) -> None:
    eng = engine(tiny_llama, block_size=16)
    rng = random.Random(3)
    system = [rng.randrange(3, 500) for _ in range(50)]
    first = generate(eng, [system + [11, 12]], GREEDY)
    q0, h0 = eng.block_manager.prefix_queries, eng.block_manager.prefix_hits
    eng.add_request("b", params=GREEDY, prompt_token_ids=system + [13])
    out = eng.generate_all(["b"])["b"]
    assert out.num_cached_tokens == 48  # three full blocks of the 50 shared tokens
    assert eng.block_manager.prefix_hits - h0 == 48
    assert eng.block_manager.prefix_queries - q0 == 51
    # a fully cached prompt still computes its last token (logits are needed)
    eng.add_request("c", params=GREEDY, prompt_token_ids=system[:48])
    c = eng.generate_all(["c"])["c"]
    assert c.num_cached_tokens == 32
    assert first and len(c.token_ids) == 24


def test_seeded_sampling_is_independent_of_batch_neighbours(tiny_llama: Path) -> None:
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=42, ignore_eos=True)
    eng = engine(tiny_llama)
    target = [5, 6, 7, 8, 9]
    alone = generate(eng, [target], params)[0]
    noise = [SamplingParams(max_tokens=30, temperature=0.8, ignore_eos=True) for _ in range(5)]
    batch = generate(eng, [[1, 2, 3], *prompts_for(1, 4), target], [*noise, params])
    assert batch[-1] == alone
    other_seed = generate(
        eng, [target], SamplingParams(max_tokens=20, temperature=1.0, seed=43, ignore_eos=True)
    )[0]
    assert other_seed != alone


def test_sampling_filters(tiny_llama: Path) -> None:
    eng = engine(tiny_llama)
    p = [[4, 5, 6, 7]]
    greedy = generate(eng, p, GREEDY)[0]
    assert (
        generate(eng, p, SamplingParams(max_tokens=24, temperature=1.5, top_k=1, seed=1, ignore_eos=True))[0]
        == greedy
    )
    assert (
        generate(eng, p, SamplingParams(max_tokens=24, temperature=1.5, top_p=1e-6, seed=1, ignore_eos=True))[
            0
        ]
        == greedy
    )
    hot = generate(eng, p, SamplingParams(max_tokens=24, temperature=5.0, seed=1, ignore_eos=True))[0]
    assert hot != greedy


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Per-row reference for sampling.filter_batch: logits [V] (temperature-scaled); top-k, then
    top-p over what remains; filtered entries become -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already cover top_p
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, idx, drop), float("-inf"))
    return logits


def test_top_k_top_p_masks() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0, -1.0])
    assert torch.isfinite(apply_top_k_top_p(logits, 2, 1.0)).tolist() == [False, True, True, False, False]
    probs = torch.softmax(logits, -1)  # ~[0.09, 0.63, 0.23, 0.03, 0.01]
    kept = torch.isfinite(apply_top_k_top_p(logits, 0, 0.7)).tolist()
    assert kept == [False, True, True, False, False]
    assert probs[1] < 0.7 < probs[1] + probs[2]


def test_stop_token_ids_max_tokens_min_tokens_and_eos(tiny_llama: Path) -> None:
    eng = engine(tiny_llama)
    p = [[9, 10, 11]]
    base = generate(eng, p, GREEDY)[0]
    stop_tok = base[5]
    first = base.index(stop_tok)
    eng.add_request(
        "s",
        params=SamplingParams(max_tokens=24, stop_token_ids=[stop_tok], ignore_eos=True),
        prompt_token_ids=p[0],
    )
    out = eng.generate_all(["s"])["s"]
    assert out.finish_reason == "stop" and out.token_ids == base[: first + 1]
    eng.add_request("m", params=SamplingParams(max_tokens=7, ignore_eos=True), prompt_token_ids=p[0])
    out = eng.generate_all(["m"])["m"]
    assert out.finish_reason == "length" and len(out.token_ids) == 7
    # min_tokens bans the stop token until enough tokens exist
    eng.add_request(
        "n",
        params=SamplingParams(
            max_tokens=24, stop_token_ids=[stop_tok], min_tokens=first + 2, ignore_eos=True
        ),
        prompt_token_ids=p[0],
    )
    out = eng.generate_all(["n"])["n"]
    assert stop_tok not in out.token_ids[: first + 2]


def test_stop_strings_are_cut_and_matched_across_tokens(tiny_llama: Path) -> None:
    llm = LLM(model=str(tiny_llama), device="cpu", dtype="float32")
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    full = llm.generate(prompt_token_ids=[[20, 21, 22]], sampling_params=params)[0]
    text = full.text
    # a stop string that spans a token boundary: the tail of one token's text and the head of the next
    tok_texts = [llm.tokenizer.decode([t]) for t in full.token_ids]
    cut = None
    pos = 0
    for a, b in itertools.pairwise(tok_texts):
        pos += len(a)
        if len(a) >= 1 and len(b) >= 1 and "\ufffd" not in a + b and text[pos - 1 : pos + 1] == a[-1] + b[0]:
            cut = pos - 1
            break
    assert cut is not None, "no printable token boundary to test with"
    stop = text[cut : cut + 2]
    first = text.find(stop)
    out = llm.generate(
        prompt_token_ids=[[20, 21, 22]],
        sampling_params=SamplingParams(max_tokens=40, ignore_eos=True, stop=[stop]),
    )[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:first]
    assert stop not in out.text


def test_abort_frees_everything_at_any_point(tiny_llama: Path) -> None:
    eng = engine(tiny_llama, max_num_batched_tokens=16)
    for i, p in enumerate(prompts_for(2, 6)):
        eng.add_request(str(i), params=GREEDY, prompt_token_ids=p)
    eng.step()
    assert eng.abort("0") is not None  # running (mid-prefill)
    assert eng.abort("5") is not None  # still waiting
    assert eng.abort("nope") is None
    eng.step()
    eng.step()
    for rid in list(eng.requests):
        out = eng.abort(rid)
        assert out is not None and out.finished and out.finish_reason == "abort"
    assert not eng.has_unfinished_requests()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    eng.scheduler.check_invariants()
    assert eng.stats.finished["abort"] == 6


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"logprobs": 99}, "logprobs"),
        ({"min_tokens": 30, "max_tokens": 5}, "min_tokens"),
    ],
)
def test_bad_sampling_params_name_the_param(kwargs: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param


def test_bad_prompts_are_typed_errors_and_leave_engine_clean(tiny_llama: Path) -> None:
    llm = LLM(model=str(tiny_llama), device="cpu", dtype="float32", max_model_len=64)
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([""])
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(prompt_token_ids=[[5] * 64])
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(prompt_token_ids=[[5] * 60], sampling_params=SamplingParams(max_tokens=10))
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(prompt_token_ids=[[5, 100000]])
    assert e.value.param == "prompt"
    # a batch with one bad prompt queues nothing
    with pytest.raises(InvalidRequestError):
        llm.generate(prompt_token_ids=[[5, 6], []])
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate(prompt_token_ids=[[5, 6]], sampling_params=GREEDY)[0].finish_reason == "length"


def test_unsupported_architecture_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    d = tmp_path / "gpt2ish"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        EngineConfig(model=str(d), device="cpu")


def test_engine_config_rejects_bad_settings(tiny_llama: Path) -> None:
    for kw, param in [
        ({"dtype": "float64"}, "dtype"),
        ({"block_size": 12}, "block_size"),
        ({"max_model_len": 10**7}, "max_model_len"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
    ]:
        with pytest.raises(InvalidRequestError) as e:
            EngineConfig(model=str(tiny_llama), device="cpu", **kw)
        assert e.value.param == param


def test_batched_filters_equal_per_row_filters() -> None:
    from inferfleet.worker.sampling import filter_batch

    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    ks, ps = [0, 3, 10, 0, 49], [1.0, 1.0, 0.5, 0.2, 0.9]
    batch = filter_batch(logits, ks, ps)
    for i in range(5):
        row = apply_top_k_top_p(logits[i], ks[i], ps[i])
        assert torch.equal(torch.isfinite(batch[i]), torch.isfinite(row))
        assert torch.equal(batch[i][torch.isfinite(row)], row[torch.isfinite(row)])


def test_sampling_follows_the_distribution() -> None:
    """Exponential-race sampling: frequencies match softmax(logits / T) (chi-square, 99.9%)."""
    from inferfleet.worker.sampling import SampleRequest, sample

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    req = SampleRequest(SamplingParams(temperature=0.7), None, [])
    toks, _ = sample(logits, [req] * 4000, torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor(toks), minlength=4).double()
    expected = torch.softmax(logits[0] / 0.7, -1).double() * 4000
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27  # 3 degrees of freedom, p = 0.001


def test_logprobs_are_the_models_while_min_tokens_bans_tokens() -> None:
    """Below min_tokens EOS and stop ids are banned from the draw, not from the distribution the
    logprobs report: the chosen token's and the alternatives' logprobs are log_softmax of the
    model's logits, and a banned token that is the most likely still heads top_logprobs."""
    from inferfleet.worker.sampling import SampleRequest, sample_device

    logits = torch.tensor([[5.0, 1.0, 0.5, -1.0], [0.0, 2.0, 1.0, 3.0]])
    banned = SampleRequest(SamplingParams(temperature=0.0, logprobs=2), None, [0])
    plain = SampleRequest(SamplingParams(temperature=0.0, logprobs=2), None, [])
    tokens, (chosen, top_v, top_i) = sample_device(logits, [banned, plain])
    ref = torch.log_softmax(logits, -1)
    assert tokens.tolist() == [1, 3]  # token 0 banned from row 0's draw
    assert torch.allclose(chosen, ref[[0, 1], [1, 3]])
    assert top_i[0].tolist() == [0, 1] and torch.allclose(top_v[0], ref[0, [0, 1]])


def test_sampled_batches_skip_the_argmax_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose every row is drawn takes no argmax over its logits (a pass over [N, V] floats
    per step that the draw overwrites); a batch with a greedy row still gets each greedy row's
    first maximum, and the drawn rows come out the same either way."""
    from inferfleet.worker import sampling
    from inferfleet.worker.sampling import SampleRequest, sample_device

    calls: list[int] = []
    argmax = sampling.argmax_rows

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return argmax(x)

    monkeypatch.setattr(sampling, "argmax_rows", counted)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    drawn = [SampleRequest(SamplingParams(temperature=0.8, seed=s), None, []) for s in (1, 2, 3)]
    for r in drawn:
        r.generator = torch.Generator().manual_seed(r.params.seed)
    tokens, _ = sample_device(logits, drawn)
    assert calls == [] and bool(((tokens >= 0) & (tokens < 50)).all())
    again = [SampleRequest(SamplingParams(temperature=0.8, seed=s), None, []) for s in (1, 3)]
    for r in again:
        r.generator = torch.Generator().manual_seed(r.params.seed)
    greedy = SampleRequest(SamplingParams(temperature=0.0), None, [])
    mixed, _ = sample_device(logits, [again[0], greedy, again[1]])
    assert calls == [3]
    assert mixed[1].item() == int(logits[1].argmax())
    assert [mixed[0].item(), mixed[2].item()] == [tokens[0].item(), tokens[2].item()]


def test_sampling_16bit_logits_as_their_float32_widening() -> None:
    """A CUDA step hands sampling the model's 16-bit logits: greedy, seeded draws with and without
    top-k / top-p, banned tokens and logprobs give what the same logits widened to float32 give."""
    from inferfleet.worker.sampling import SampleRequest, sample_device

    logits = (torch.randn(5, 300, generator=torch.Generator().manual_seed(5)) * 3).to(torch.bfloat16)

    def requests() -> list[SampleRequest]:
        params = [
            SamplingParams(temperature=0.0, logprobs=3),
            SamplingParams(temperature=0.9, seed=11),
            SamplingParams(temperature=0.7, top_k=20, seed=12, logprobs=2),
            SamplingParams(temperature=1.3, top_p=0.8, seed=13),
            SamplingParams(temperature=0.0),
        ]
        out = [
            SampleRequest(p, torch.Generator().manual_seed(p.seed) if p.seed else None, []) for p in params
        ]
        out[4].banned_token_ids = [int(logits[4].float().argmax())]
        return out

    low, low_lp = sample_device(logits, requests())
    ref, ref_lp = sample_device(logits.float(), requests())
    assert low.tolist() == ref.tolist()
    assert low[4].item() != int(logits[4].float().argmax())  # the banned maximum is not drawn
    for a, b in zip(low_lp, ref_lp, strict=True):
        assert a.dtype == torch.float32 or a.dtype == torch.int64
        assert torch.equal(a, b)


def test_out_of_vocab_stop_token_ids_are_bad_input(tiny_llama: Path) -> None:
    eng = engine(tiny_llama)
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request(
            "x", params=SamplingParams(stop_token_ids=[10**6], min_tokens=1), prompt_token_ids=[1, 2]
        )
    assert e.value.param == "stop_token_ids"
    assert not eng.has_unfinished_requests()


def test_kv_pool_smaller_than_one_sequence_is_a_config_error(tiny_llama: Path) -> None:
    with pytest.raises(InvalidRequestError) as e:
        engine(tiny_llama, num_kv_blocks=2, max_model_len=256)
    assert e.value.param == "max_model_len"


def test_tiny_temperature_is_greedy(tiny_llama: Path) -> None:
    eng = engine(tiny_llama)
    p = [[3, 4, 5]]
    assert generate(eng, p, SamplingParams(max_tokens=8, temperature=1e-300, ignore_eos=True)) == generate(
        eng, p, SamplingParams(max_tokens=8, ignore_eos=True)
    )


def test_one_token_prefill_chunk_is_not_a_decode_step(tiny_llama: Path) -> None:
    """A budget of one token per sequence makes 1-token prefill chunks: they must not take the
    decode path (CUDA graphs return a logits row for every token, decode or not)."""
    from inferfleet.worker.runner import build_host_batch

    eng = engine(tiny_llama, max_num_batched_tokens=2, max_num_seqs=2)
    eng.add_request("a", params=GREEDY, prompt_token_ids=[5])
    eng.add_request("b", params=GREEDY, prompt_token_ids=[6, 7, 8])
    sched = eng.scheduler.schedule()
    assert [s.num_new_tokens for s in sched.scheduled] == [1, 1]
    hb = build_host_batch(sched, eng.block_manager.block_size)
    assert not hb.decode_only and hb.rows == [0]
    eng = engine(tiny_llama, max_num_batched_tokens=2, max_num_seqs=2)
    eng.add_request("a", params=GREEDY, prompt_token_ids=[5])
    eng.add_request("b", params=GREEDY, prompt_token_ids=[6, 7, 8])
    outs = eng.generate_all(["a", "b"])
    assert all(o.finish_reason == "length" for o in outs.values())


def test_stop_string_on_the_last_allowed_token_reports_stop(tiny_llama: Path) -> None:
    llm = LLM(model=str(tiny_llama), device="cpu", dtype="float32")
    prompt = [[20, 21, 22]]
    full = llm.generate(
        prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=30, ignore_eos=True)
    )[0]
    dec = llm.tokenizer.decode
    # a token whose text ends in a character that appears nowhere before it
    for j in range(3, 30):
        before, upto = dec(full.token_ids[:j]), dec(full.token_ids[: j + 1])
        ch = upto[-1:] if upto.startswith(before) else ""
        if ch and ch.isprintable() and ch != "\ufffd" and ch not in before:
            break
    else:
        pytest.skip("no suitable token in this random model's output")
    cut = llm.generate(
        prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=j + 1, ignore_eos=True, stop=[ch])
    )[0]
    assert len(cut.token_ids) == j + 1 and cut.finish_reason == "stop"


def test_min_tokens_holds_back_stop_strings(tiny_llama: Path) -> None:
    llm = LLM(model=str(tiny_llama), device="cpu", dtype="float32")
    full = llm.generate(
        prompt_token_ids=[[20, 21, 22]], sampling_params=SamplingParams(max_tokens=30, ignore_eos=True)
    )[0]
    first = next(c for c in full.text if c.isprintable() and c != "\ufffd")
    out = llm.generate(
        prompt_token_ids=[[20, 21, 22]],
        sampling_params=SamplingParams(max_tokens=30, min_tokens=20, ignore_eos=True, stop=[first]),
    )[0]
    assert len(out.token_ids) >= 20


def test_cached_tokens_never_exceed_the_prompt_after_preemption(tiny_llama: Path) -> None:
    eng = engine(tiny_llama, num_kv_blocks=8, max_model_len=128)
    ps = prompts_for(0, 10)
    outs = {}
    for i, p in enumerate(ps):
        eng.add_request(str(i), params=GREEDY, prompt_token_ids=p)
    outs = eng.generate_all([str(i) for i in range(len(ps))])
    assert eng.stats.preemptions > 0
    for i, p in enumerate(ps):
        assert outs[str(i)].num_cached_tokens <= len(p)


def test_a_blocked_admission_is_not_recounted_every_step(tiny_llama: Path) -> None:
    eng = engine(tiny_llama, num_kv_blocks=8, max_model_len=128, max_num_seqs=4)
    eng.add_request(
        "big", params=SamplingParams(max_tokens=60, ignore_eos=True), prompt_token_ids=list(range(3, 63))
    )
    eng.step()
    eng.add_request("next", params=GREEDY, prompt_token_ids=list(range(100, 167)))  # no shared prefix
    queries = eng.block_manager.prefix_queries
    for _ in range(5):
        eng.step()
    assert "next" in [s.request_id for s in eng.scheduler.waiting]
    assert eng.block_manager.prefix_queries == queries


def test_embed_takes_fed_ids_from_the_previous_step(tiny_llama: Path) -> None:
    """DecoderModel.embed's feed on the CPU path: where a token's feed row is >= 0 its id comes
    from the previous step's sampled ids, elsewhere from input_ids; the result is the embedding of
    the resolved ids and their first-layer norm. runner.feed_rows builds those rows from the
    engine's (token indices, source rows) feed."""
    from inferfleet.worker.runner import feed_rows

    model = engine(tiny_llama).runner.model
    ids = torch.tensor([5, -1, 9, -1])  # placeholders where the feed fills
    prev = torch.tensor([40, 41, 42])
    rows = torch.from_numpy(feed_rows(([1, 3], [2, 0], prev), 4))
    assert rows.tolist() == [-1, 2, -1, 0]
    residual, x = model.embed(ids, (rows, prev))
    want_residual, want_x = model.embed(torch.tensor([5, 42, 9, 40]))
    assert torch.equal(residual, want_residual) and torch.equal(x, want_x)
    assert torch.equal(residual, model.model.embed_tokens(torch.tensor([5, 42, 9, 40])))
    assert torch.equal(x, model.model.layers[0].input_layernorm(residual))


@pytest.mark.parametrize("n", [1, 7, 256])
def test_decode_graph_input_fields_are_16_byte_aligned(n: int) -> None:
    """DecodeGraphs' packed per-row inputs: every field starts 16-byte aligned whatever the batch
    (Triton compiles for aligned pointers; an odd max_num_seqs must not give other variants), the
    fields do not overlap, and the buffer holds them all (int32 words for the staging copy)."""
    pytest.importorskip("triton")
    from inferfleet.worker.cuda_graphs import _FIELDS, _fields, _step_bytes

    buf = torch.zeros(_step_bytes(n), dtype=torch.uint8)
    assert buf.numel() % 4 == 0
    views = _fields(buf, n)
    starts = [v.data_ptr() - buf.data_ptr() for v in views]
    assert all(s % 16 == 0 for s in starts)
    ends = [s + n * dt.itemsize for s, (_, dt) in zip(starts, _FIELDS)]
    assert all(e <= s for e, s in zip(ends, starts[1:])) and ends[-1] <= buf.numel()
    assert [v.numel() for v in views] == [n] * len(_FIELDS)


def test_decode_splits_short_contexts_take_one_tile_per_split() -> None:
    """A small decode batch splits its contexts to fill the SMs (16 for one row of 8 KV heads on
    132 SMs); when its longest context spans at most SHORT_CONTEXT_SPLITS key tiles it takes that
    many, where each split still holds one tile at most; the levels a batch size can take are the
    graphs captured for it."""
    pytest.importorskip("triton")
    from inferfleet.worker.cuda_graphs import SHORT_CONTEXT_SPLITS, decode_splits, split_levels

    assert SHORT_CONTEXT_SPLITS == 8
    assert decode_splits(1, 8, 132) == 16 and decode_splits(1, 8, 132, max_tiles=9) == 16
    for tiles in (1, 6, 8):  # W3's 128 + 256 tokens: 6 tiles of 64 keys
        s = decode_splits(1, 8, 132, max_tiles=tiles)
        assert s == 8 and -(-tiles // s) == -(-tiles // 16) == 1
    assert decode_splits(4, 8, 132) == 8 == decode_splits(4, 8, 132, max_tiles=2)  # never more
    assert decode_splits(64, 8, 132, max_tiles=1) == 1
    assert split_levels(1, 8, 132) == [8, 16] and split_levels(2, 8, 132) == [8, 16]
    assert split_levels(4, 8, 132) == [8] and split_levels(256, 8, 132) == [1]


def test_block_table_rows_are_padded_to_16_entries(tiny_llama: Path) -> None:
    """Block-table rows are padded to a multiple of 16 entries whatever the step's longest table:
    Triton specializes integer arguments that are 1 or multiples of 16, so any other row stride
    compiled another attention variant at the first step that had it."""
    from inferfleet.worker.layers.attention import table_width

    assert [table_width(n) for n in (0, 1, 15, 16, 17, 256, 257)] == [16, 16, 16, 16, 32, 256, 272]
    eng = engine(tiny_llama)
    meta = eng.runner._metadata([3, 1], [3, 40], [[5], [1, 2, 3]], torch.tensor([0, 1, 2, 3]))
    assert meta.block_tables.shape == (2, 16)
    assert meta.block_tables[1, :3].tolist() == [1, 2, 3] and meta.block_tables[1, 3:].eq(0).all()


def test_stop_string_in_a_last_token_that_begins_a_character_reports_stop(tiny_llama: Path) -> None:
    """A token holding a stop string and the first byte of a multi-byte character: the stop
    string is found only when the request ends (the text waits for the character to complete).
    On the last token max_tokens allows, the result is still "stop", with the text of a run that
    could go on."""
    llm = LLM(model=str(tiny_llama), device="cpu", dtype="float32", max_model_len=256)

    def params(max_tokens: int, seed: int, stop: str) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=1.5, seed=seed, stop=[stop])

    for seed in range(60):  # find such a token in this random model's output
        free = llm.generate(
            ["Hello"], SamplingParams(max_tokens=40, ignore_eos=True, temperature=1.5, seed=seed)
        )[0]
        for k, t in enumerate(free.token_ids):
            raw = llm.tokenizer.token_bytes(t)
            first = raw[:1].decode("ascii", "ignore")
            seen = llm.tokenizer.decode(free.token_ids[:k])
            if first.isalpha() and len(raw) == 2 and raw[1] >= 0xC2 and first not in seen:
                break
        else:
            continue
        break
    else:
        pytest.skip("no such token in this random model's output")
    longer = llm.generate(["Hello"], params(40, seed, first))[0]
    cut = llm.generate(["Hello"], params(k + 1, seed, first))[0]
    assert longer.finish_reason == "stop" and len(longer.token_ids) == k + 2  # it waited one token
    assert cut.finish_reason == "stop" and len(cut.token_ids) == k + 1 and cut.text == longer.text


def test_streamed_counts_and_aborted_outputs_hold_only_real_tokens(tiny_llama: Path) -> None:
    """Steps run one ahead (the next step's token is a placeholder until it resolves): a streamed
    output's num_output_tokens counts the tokens delivered so far, and an aborted request's
    token_ids are those tokens, never a placeholder."""
    eng = engine(tiny_llama)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    eng.add_request("a", prompt_token_ids=[5, 6, 7], params=params, stream=True)
    got: list[int] = []
    while len(got) < 6:
        for out in eng.step():
            got += out.new_token_ids
            assert out.num_output_tokens == len(got)
    aborted = eng.abort("a")
    assert aborted is not None and aborted.token_ids == got and aborted.num_output_tokens == len(got)


def test_warmup_fits_the_smallest_contexts(tiny_llama: Path) -> None:
    """Warm-up's own requests fit any context that can hold a prompt and one generated token."""
    for limit in (2, 3, 10):
        eng = engine(tiny_llama, max_model_len=limit)
        eng.warmup()
        assert eng.stats.steps == 0 and not eng.has_unfinished_requests()
        out = generate(eng, [[5]], SamplingParams(max_tokens=limit - 1, ignore_eos=True))[0]
        assert len(out) == limit - 1


def test_warmup_samples_one_row_alone(tiny_llama: Path) -> None:
    """Warm-up reaches a step that draws for exactly one row (on CUDA, the lm_head's float32
    one-row launch and the draw over it compile there, not inside the first batch to reach such
    a step), besides its batched greedy and sampled rows."""
    eng = engine(tiny_llama)
    execute = eng.runner.execute
    drawn: list[list[float]] = []

    def watch(out, feed=None):  # type: ignore[no-untyped-def]
        drawn.append([s.seq.params.temperature for s in out.scheduled if s.samples])
        return execute(out, feed)

    eng.runner.execute = watch  # type: ignore[method-assign]
    eng.warmup()
    assert [t for t in drawn if len(t) == 1 and t[0] > 0], drawn
    assert [t for t in drawn if len(t) == 2 and min(t) == 0 < max(t)], drawn
