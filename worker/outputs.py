"""What the engine returns for a request after a step (deltas) and at the end (totals)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .sampling import TokenLogprobs


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every generated token (on the final output; [] on streamed steps)
    text: str  # the whole text, stop strings cut out (on the final output; "" on streamed steps)
    new_token_ids: list[int] = field(default_factory=list)  # generated in this step
    new_text: str = ""  # released in this step
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_cached_tokens: int = 0
    num_output_tokens: int = 0  # generated so far (every output carries it)
    logprobs: list[TokenLogprobs] | None = None  # all of them, when asked for

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
