"""Pure pieces of the server, without a server: admission arithmetic, the schema validator,
request parsing, SSE framing, and the torch-free import contract of protocol/metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from inferfleet.worker import protocol, responses, schemas
from inferfleet.worker.admission import AdmissionControl
from inferfleet.worker.metrics import CONTRACT_NAMES, EngineSnapshot, ServerMetrics
from inferfleet.worker.openapi import openapi_document
from inferfleet.worker.protocol import ApiError
from inferfleet.worker.tokenizer import Tokenizer


def test_admission_counts_requests_and_tokens() -> None:
    ctl = AdmissionControl(max_requests=3, max_tokens=100)
    a = ctl.try_reserve([40, 40])
    assert a is not None and (ctl.requests, ctl.tokens) == (2, 80)
    assert ctl.try_reserve([30]) is None  # tokens: 80 + 30 > 100
    b = ctl.try_reserve([20])
    assert b is not None and ctl.try_reserve([1]) is None  # requests: 3 of 3
    a.release_part(0)
    a.release_part(0)  # idempotent
    assert (ctl.requests, ctl.tokens) == (2, 60)
    a.release()
    b.release()
    assert (ctl.requests, ctl.tokens) == (0, 0)


def test_admission_never_starves_a_big_request_and_resizes_exactly() -> None:
    ctl = AdmissionControl(max_requests=4, max_tokens=100)
    big = ctl.try_reserve([500])  # alone in an empty queue: admitted whatever its size
    assert big is not None
    assert ctl.try_reserve([1]) is None
    big.release()
    t = ctl.try_reserve([10])
    assert t is not None and t.resize([90]) and ctl.tokens == 90
    other = ctl.try_reserve([5])
    assert other is not None
    assert not t.resize([99]) and ctl.tokens == 95  # would exceed with another one waiting
    assert t.resize([10]) and ctl.tokens == 15
    t.release()
    other.release()
    assert (ctl.requests, ctl.tokens) == (0, 0)


@pytest.mark.parametrize(
    ("value", "param"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
        ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 17}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "seed": 1.0}, "seed"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 0.0}, "top_p"),
        ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 2}}, "logit_bias"),
    ],
)
def test_validator_names_the_param(value: dict, param: str) -> None:
    with pytest.raises(schemas.SchemaError) as e:
        schemas.validate(value, schemas.CHAT_REQUEST)
    assert e.value.param == param


def test_validator_accepts_nulls_and_neutral_values() -> None:
    body = {
        "messages": [{"role": "user", "content": "x", "name": None}],
        "max_tokens": None,
        "temperature": None,
        "stop": None,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "user": "u",
        "stream_options": None,
    }
    schemas.validate(body, schemas.CHAT_REQUEST)
    req = protocol.parse_chat(body)
    assert req.sampling.temperature == 1.0 and req.sampling.max_tokens is None and req.n == 1


def test_message_names_reach_the_chat_template(tiny_llama: Path) -> None:
    """messages[].name is kept for the template (one that renders it shows it in the prompt);
    messages without one have no name key, as before."""
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "name": "Alice", "content": "hi"},
        ]
    }
    schemas.validate(body, schemas.CHAT_REQUEST)
    msgs = protocol.parse_chat(body).messages
    assert msgs == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi", "name": "Alice"},
    ]
    tok = Tokenizer(tiny_llama)
    tok.chat_template = "{% for m in messages %}{{ m.role }}{% if m.name %} ({{ m.name }}){% endif %}: {{ m.content }}\n{% endfor %}"
    assert (
        tok.apply_chat_template(msgs, add_generation_prompt=False) == "system: be brief\nuser (Alice): hi\n"
    )


def test_vocabulary_bounds_token_ids() -> None:
    schema = schemas.for_model(schemas.COMPLETION_REQUEST, vocab_size=100)
    schemas.validate({"prompt": [0, 99]}, schema)
    with pytest.raises(schemas.SchemaError) as e:
        schemas.validate({"prompt": "x", "stop_token_ids": [100]}, schema)
    assert e.value.param == "stop_token_ids[0]"
    assert "x-token-id" not in json.dumps(openapi_document("m", schema, schema))


def test_parse_completion_forms_and_seeds() -> None:
    assert protocol.parse_completion({"prompt": "a"}).prompts == ["a"]
    assert protocol.parse_completion({"prompt": [1, 2]}).prompts == [[1, 2]]
    assert protocol.parse_completion({"prompt": [[1], [2, 3]]}).prompts == [[1], [2, 3]]
    req = protocol.parse_completion({"prompt": ["a", "b"], "n": 2, "seed": -1, "logprobs": 0})
    assert (req.num_choices, req.sampling.logprobs) == (4, 0)
    p0, p1 = req.sampling.params(8, 0), req.sampling.params(8, 1)
    assert p0.seed == 2**63 - 1 and p1.seed == 0  # negative seeds map into the engine's range
    with pytest.raises(ApiError) as e:
        protocol.parse_chat(
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2, "min_tokens": 3}
        )
    assert e.value.param == "min_tokens"


def test_parse_json_body_rejects_what_json_does_not_allow() -> None:
    for raw in (b"", b"  ", b"{", b"[]", b'{"a": NaN}', b'{"a": -Infinity}', b"\xff", b"[" * 100000):
        with pytest.raises(ApiError) as e:
            protocol.parse_json_body(raw)
        assert e.value.status == 400 and e.value.code == "invalid_json"
    assert protocol.parse_json_body(b'{"a": 1e400}') == {"a": float("inf")}  # then a range error


def test_sse_framing() -> None:
    assert responses.sse({"a": 1}) == b'data: {"a": 1}\n\n'
    assert responses.sse({"error": {}}, event="error") == b'event: error\ndata: {"error": {}}\n\n'
    assert responses.SSE_DONE == b"data: [DONE]\n\n"
    with pytest.raises(ValueError):
        responses.sse({"x": float("nan")})  # never invalid JSON on the wire


def test_metrics_registry_is_per_server() -> None:
    a = ServerMetrics(lambda: EngineSnapshot(num_running=3), lambda: True, lambda: {"total": 1.5})
    b = ServerMetrics(lambda: EngineSnapshot(), lambda: False, lambda: {})
    a.ttft.observe(0.1)
    text_a, text_b = a.render()[0].decode(), b.render()[0].decode()
    assert "inferfleet_requests_running 3.0" in text_a and "inferfleet_requests_running 0.0" in text_b
    assert "inferfleet_time_to_first_token_seconds_count 1.0" in text_a
    assert "inferfleet_time_to_first_token_seconds_count 0.0" in text_b
    assert 'inferfleet_startup_seconds{phase="total"} 1.5' in text_a
    for name in CONTRACT_NAMES:
        assert name.removesuffix("_total") in text_a, name


def test_protocol_and_metrics_import_without_torch() -> None:
    code = (
        "import sys; import inferfleet.worker.protocol, inferfleet.worker.metrics, "
        "inferfleet.worker.schemas, inferfleet.worker.admission, inferfleet.worker.openapi, "
        "inferfleet.worker.responses; "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "assert 'prometheus_client' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
