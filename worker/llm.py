"""Offline batch API in vLLM's shape: LLM(model=...).generate(prompts, sampling_params)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from .config import EngineConfig, resolve_device
from .engine import LLMEngine
from .errors import InvalidRequestError
from .outputs import RequestOutput
from .sampling_params import SamplingParams

# an offline CUDA batch's token budget for steps with decodes (EngineConfig.decode_step_tokens). H100,
# Llama-3.1-8B shape, bf16 W1, longest_first (docs/benchmarks.md): fourteenth session, steps with
# prompt chunks launched between piecewise graphs, budgets of 320 / 384 / 512 / 640 / 768 / 1,024
# gave 8,795 / 8,879 / 8,924-8,970 / 8,786 / 8,819 / 8,724 out tok/s (fifo: 8,595-8,634); fifteenth
# session, those steps in whole graphs: 128 / 192 / 256 / 384 / 512 gave 8,841 / 9,036 /
# 9,182-9,265 / 9,196 / 9,155-9,185, and 256 / 512 alternated in one process 9,212 / 9,192 against
# 9,129 / 9,075
OFFLINE_DECODE_STEP_TOKENS = 256
# its budget for due prompts and the batch's first steps (EngineConfig.due_step_tokens), where that
# pays (Scheduler._due_fits). H100, W1, twenty-first session (docs/benchmarks.md): with no such
# check, one process, warm runs: off 9,966 / 9,970 out tok/s, 384 10,095, 512 10,056 / 10,059;
# gpu_bench.py, a process each: 384 10,137 / 10,113, 512 10,080 / 10,071. With the check's first
# form, 384: 10,040 against 9,944 off on one machine, 10,109-10,117 on cold caches. Its final form
# (14-35 of W1's ~1,023 steps differ, seeds 0-2): 10,064-10,106 (twenty-second session)
OFFLINE_DUE_STEP_TOKENS = 384


class LLM:
    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        device: str = "auto",
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        **kwargs: object,
    ) -> None:
        """Extra keyword arguments are EngineConfig's. An offline batch on CUDA defaults to the
        scheduler's offline settings (scheduler.py): admission longest_first, decode steps of
        OFFLINE_DECODE_STEP_TOKENS tokens and due steps of OFFLINE_DUE_STEP_TOKENS; admission="fifo"
        turns them off (decode_step_tokens=None the budgets alone, due_step_tokens=None the due one)."""
        if resolve_device(device).startswith("cuda"):
            kwargs.setdefault("admission", "longest_first")
            if kwargs["admission"] == "longest_first":  # the budgets pay with that order (scheduler.py)
                kwargs.setdefault("decode_step_tokens", OFFLINE_DECODE_STEP_TOKENS)
                if kwargs["decode_step_tokens"] is not None:
                    kwargs.setdefault("due_step_tokens", OFFLINE_DUE_STEP_TOKENS)
        config = EngineConfig(
            model=model,
            dtype=dtype,
            device=device,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            block_size=block_size,
            enable_prefix_caching=enable_prefix_caching,
            **kwargs,  # type: ignore[arg-type]
        )
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Sequence[str] | str | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the prompts' order.

        Every prompt is validated before any is queued, so a bad one leaves the engine untouched.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if (prompts is None) == (prompt_token_ids is None):
            raise InvalidRequestError("pass exactly one of prompts and prompt_token_ids", param="prompts")
        token_lists = (
            [(self.tokenizer.encode(p) if p else []) if isinstance(p, str) else p for p in prompts]
            if prompts is not None
            else [list(p) for p in prompt_token_ids or []]
        )
        if prompts is not None and not all(isinstance(p, str) for p in prompts):
            raise InvalidRequestError("prompts must be strings", param="prompts")
        n = len(token_lists)
        if sampling_params is None:
            params = [SamplingParams()] * n
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * n
        else:
            params = list(sampling_params)
            if len(params) != n:
                raise InvalidRequestError(
                    "sampling_params must be one or one per prompt", param="sampling_params"
                )
        for toks, p in zip(token_lists, params):
            self.engine.validate_prompt(toks, p)
        ids = [f"gen-{next(self._ids)}" for _ in range(n)]
        for rid, toks, p in zip(ids, token_lists, params):
            self.engine.enqueue(rid, toks, p, stream=False)
        final = self.engine.generate_all(ids)
        return [final[rid] for rid in ids]
