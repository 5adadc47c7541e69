"""The synchronous engine: add_request / step / abort. One step = schedule, run the model, sample,
detokenize, stop. The async server and the offline `LLM` both drive this class."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from .config import EngineConfig
from .errors import InvalidRequestError
from .kv_cache import BlockManager
from .outputs import RequestOutput
from .runner import ModelRunner
from .sampling import SampleRequest, TokenLogprobs, sample_device, to_host_async, unpack_logprobs
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .sequence import PLACEHOLDER, Sequence
from .tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Monotonic counters and the latest gauges (the server exports them as Prometheus metrics)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # finish_reason -> count
    steps: int = 0


@dataclass
class _Inflight:
    reqs: list[_Request]  # the sampling rows of a launched step, in row order
    positions: list[int]  # index of each row's placeholder in its sequence's token_ids
    tokens: torch.Tensor  # [N] sampled ids on the device (feeds the next step)
    tokens_host: torch.Tensor  # [N] the same, copied to the host asynchronously
    lp_host: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # chosen, top values, top ids
    event: torch.cuda.Event | None  # set when the host copies have landed (CUDA only)


@dataclass
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    sampler: SampleRequest
    stop_ids: frozenset[int]
    logprobs: list[TokenLogprobs] | None
    incremental: bool  # decode text every step (streaming, stop strings) or only at the end


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self.model_config = config.model_config
        t0 = time.perf_counter()
        self.tokenizer = tokenizer or Tokenizer(config.model)
        self.runner = ModelRunner(config)
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        assert config.max_num_batched_tokens is not None and config.max_model_len is not None
        self.max_model_len = config.max_model_len
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            decode_step_tokens=config.decode_step_tokens,
            longest_first=config.admission == "longest_first",
            due_step_tokens=config.due_step_tokens,
        )
        self.requests: dict[str, _Request] = {}
        self.stats = EngineStats()
        # noise for sampled requests without a seed of their own (one batched draw per step)
        self._noise = torch.Generator(device=self.runner.device).manual_seed(config.seed)
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids) or (
            frozenset({self.tokenizer.eos_token_id})
            if self.tokenizer.eos_token_id is not None
            else frozenset()
        )
        # observability hook: called with (request ids, logits [N, V]) before sampling each step;
        # it must not change them (a one-row decode graph has taken the greedy ids already)
        self.on_logits: Callable[[list[str], torch.Tensor], None] | None = None
        self._inflight: _Inflight | None = None  # the launched step whose tokens are not read yet
        # phase -> seconds (load_weights, engine_init; warmup and cuda_graphs after warmup())
        self.startup_seconds = dict(self.runner.timings)
        self.startup_seconds["engine_init"] = time.perf_counter() - t0
        for phase in ("load_weights", "engine_init"):
            log.info("startup phase %s: %.2fs", phase, self.startup_seconds[phase])

    def warmup(self) -> float:
        """Run two short requests end to end, one greedy and one sampled (and, on CUDA, capture
        graphs and compile the launches they do not hold) before reporting ready.

        Returns the seconds it took; also recorded in startup_seconds["warmup"].
        """
        t0 = time.perf_counter()
        self.runner.warmup()
        n = max(1, min(8, self.max_model_len - 2))  # a prompt and two tokens, or what fits
        gen = max(1, min(2, self.max_model_len - n))
        # a greedy request and a sampled one, batched: the sampling kernels compile now, not at the
        # first request with a temperature (bench/compile_watch.py)
        warm = {
            "__warmup__": SamplingParams(max_tokens=gen, ignore_eos=True),
            "__warmup_sampled__": SamplingParams(max_tokens=gen, ignore_eos=True, temperature=1.0, seed=0),
        }
        for rid, params in warm.items():
            self.add_request(rid, params=params, prompt_token_ids=[1] * n)
        self.generate_all(list(warm))
        # and the sampled one alone: a step that samples one row takes the lm_head's float32 one-row
        # launch and a draw over float32 logits, two more compiles (0.8 s on the H100) that a cold
        # cache otherwise paid inside the first batch that reached such a step (twenty-first session)
        self.add_request("__warmup_alone__", params=warm["__warmup_sampled__"], prompt_token_ids=[1] * n)
        self.generate_all(["__warmup_alone__"])
        self.drain_inflight()
        self.stats = EngineStats()  # warm-up traffic is not user traffic
        self.block_manager.prefix_queries = self.block_manager.prefix_hits = 0
        self.startup_seconds["warmup"] = time.perf_counter() - t0
        for phase in ("gemm_tuning", "cuda_graphs", "mixed_graphs"):
            if phase in self.runner.timings:
                self.startup_seconds[phase] = self.runner.timings[phase]
                log.info("startup phase %s: %.2fs", phase, self.startup_seconds[phase])
        log.info("startup phase warmup: %.2fs", self.startup_seconds["warmup"])
        return self.startup_seconds["warmup"]

    # -- requests ------------------------------------------------------------------------------

    def validate_prompt(
        self, prompt_token_ids: list[int], params: SamplingParams, param: str = "prompt"
    ) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty", param=param)
        vocab = self.model_config.vocab_size
        if any(
            (not isinstance(t, int)) or isinstance(t, bool) or t < 0 or t >= vocab for t in prompt_token_ids
        ):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", param=param)
        bad_stop = [t for t in params.stop_token_ids if not (0 <= t < vocab)]
        if bad_stop:
            raise InvalidRequestError(
                f"stop_token_ids must be token ids in [0, {vocab}), got {bad_stop[:4]}",
                param="stop_token_ids",
            )
        limit = self.max_model_len
        if n >= limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens, but the prompt has {n} tokens "
                "(at least one token must be left to generate).",
                param=param,
                code="context_length_exceeded",
            )
        if n + params.max_tokens > limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} for the completion). "
                "Please reduce the length of the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        arrival_time: float | None = None,
        stream: bool = True,
    ) -> Sequence:
        """Validate and queue a request. Raises InvalidRequestError naming the parameter."""
        params = params or SamplingParams()
        self._check_request_id(request_id)
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise InvalidRequestError("a prompt (string) or prompt_token_ids is required", param="prompt")
            prompt_token_ids = self.tokenizer.encode(prompt) if prompt else []
        else:
            prompt_token_ids = list(prompt_token_ids)
        self.validate_prompt(prompt_token_ids, params)
        return self.enqueue(request_id, prompt_token_ids, params, arrival_time, stream)

    def _check_request_id(self, request_id: str) -> None:
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")

    def enqueue(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        stream: bool = True,
    ) -> Sequence:
        """Queue a request whose prompt has passed validate_prompt (LLM.generate and the server
        validate first, once per prompt); the engine keeps (does not copy) `prompt_token_ids`, so
        the choices of one prompt may share it. Raises InvalidRequestError if the request id is in use."""
        self._check_request_id(request_id)
        seq = Sequence(request_id, prompt_token_ids, params)
        if arrival_time is not None:
            seq.arrival_time = arrival_time
        gen = None
        if not params.greedy and params.seed is not None:
            gen = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.eos_token_ids
        )
        banned = sorted(stop_ids) if params.min_tokens > 0 else []
        detok = IncrementalDetokenizer(
            self.tokenizer, prompt_token_ids, params.stop_strings, min_tokens=params.min_tokens
        )
        self.requests[request_id] = _Request(
            seq=seq,
            detok=detok,
            sampler=SampleRequest(params, gen, banned),
            stop_ids=stop_ids,
            logprobs=[] if params.logprobs is not None else None,
            incremental=stream or bool(params.stop_strings),
        )
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        """Drop a request at any point; its blocks return to the pool. None if it is unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.finish(req.seq, "abort")
        self._count_finish("abort")
        return self._output(req, [], "", [], finished=True)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def drain_inflight(self) -> list[RequestOutput]:
        """Read the step still running (if any); nothing new is launched."""
        step, self._inflight = self._inflight, None
        return self._resolve(step) if step is not None else []

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def kv_cache_usage(self) -> float:
        return self.block_manager.usage()

    # -- the step ------------------------------------------------------------------------------
    #
    # Steps are pipelined one deep so the host never leaves the GPU idle:
    #
    #   step() k:   schedule N ─ launch N (forward + sampling, no sync) ─ resolve N-1 ─ return outputs
    #   GPU:                      ├── N-1 still running ──┤├── N ─────────────────────────┤
    #
    # A sampled token is appended as a placeholder (-1) at launch and filled in at resolution, one
    # step() later. Step N schedules with the placeholders counted, and the rows whose last token is
    # a placeholder of step N-1 take it on the device from N-1's sampled tensor. A request found
    # finished when N-1 resolves (EOS, a stop string) has already been scheduled into N: its row in N
    # is discarded. Requests that reach max_tokens are known at launch (stop_pending) and are not
    # scheduled again. Blocks freed while a step is in flight are safe to hand out at once: every
    # later step runs after it on the same stream.

    def step(self) -> list[RequestOutput]:
        """Launch one batch and return the outputs of the previous one: an output for every request
        that finished, and for every streaming request that produced a token (offline requests
        report only their end)."""
        sched = self.scheduler.schedule()
        self.stats.preemptions += len(sched.preempted)
        launched = self._launch(sched) if not sched.is_empty else None
        outputs = self._resolve(self._inflight) if self._inflight is not None else []
        self._inflight = launched
        return outputs

    def _launch(self, sched: SchedulerOutput) -> _Inflight:
        prev = self._inflight
        feed = None
        if prev is not None:
            # decode rows whose input token is still a placeholder of the previous step
            dst: list[int] = []
            src: list[int] = []
            flat = 0
            for s in sched.scheduled:
                seq = s.seq
                if seq.pending_row >= 0 and seq.token_ids[seq.num_computed_tokens + s.num_new_tokens - 1] < 0:
                    dst.append(flat + s.num_new_tokens - 1)
                    src.append(seq.pending_row)
                flat += s.num_new_tokens
            if dst:
                feed = (dst, src, prev.tokens)
        step_logits = self.runner.execute(sched, feed)
        self.stats.steps += 1
        reqs = [self.requests[sched.scheduled[j].seq.request_id] for j in step_logits.rows]
        positions: list[int] = []
        tokens = torch.empty(0, dtype=torch.long)
        lp = None
        if reqs:
            if self.on_logits is not None:
                self.on_logits([r.seq.request_id for r in reqs], step_logits.logits.float())
            for r in reqs:  # min_tokens: EOS and stop ids are banned until enough tokens exist
                if r.sampler.banned_token_ids and r.seq.num_output_tokens >= r.seq.params.min_tokens:
                    r.sampler.banned_token_ids = []
            samplers = [r.sampler for r in reqs]
            tokens, lp = sample_device(step_logits.logits, samplers, self._noise, step_logits.greedy)
            for row, r in enumerate(reqs):
                seq = r.seq
                positions.append(len(seq.token_ids))
                seq.token_ids.append(PLACEHOLDER)
                seq.pending_row = row
                if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                    seq.stop_pending = True
        self.scheduler.advance(sched)
        return _Inflight(reqs, positions, *to_host_async(tokens, lp, self.runner.copy_out_stream))

    def _resolve(self, step: _Inflight) -> list[RequestOutput]:
        if step.event is not None:
            step.event.synchronize()
        outputs: list[RequestOutput] = []
        if not step.reqs:
            return outputs
        token_ids = step.tokens_host.tolist()
        logprobs = unpack_logprobs(step.lp_host, [r.sampler for r in step.reqs], token_ids)
        for r, pos, tok, lp in zip(step.reqs, step.positions, token_ids, logprobs):
            seq = r.seq
            if self.requests.get(seq.request_id) is not r:
                continue  # finished or aborted while this step ran
            seq.token_ids[pos] = tok
            if seq.pending_row >= 0 and pos == len(seq.token_ids) - 1:
                seq.pending_row = -1
            self.block_manager.register_full_blocks(seq)
            if not seq.has_first_token:
                seq.has_first_token = True
                self.stats.prompt_tokens += seq.num_prompt_tokens
            self.stats.generation_tokens += 1
            new_lp = [lp] if lp is not None else []
            if r.logprobs is not None:
                r.logprobs.extend(new_lp)
            reason = self._stop_reason(r, tok, pos + 1 - seq.num_prompt_tokens, pos + 1)
            if reason != "stop":  # a stop token itself never becomes text
                r.detok.add_tokens([tok], decode=r.incremental)
                if r.detok.stopped_by is not None:  # also on the last token max_tokens allowed
                    reason = "stop"
            if reason is not None:
                del seq.token_ids[pos + 1 :]  # placeholders of a step launched after this one
                r.detok.finish()
                if r.detok.stopped_by is not None:  # found only now: the stop string's token also
                    reason = "stop"  # began a character that max_tokens cut off (finish decodes it)
                self.scheduler.finish(seq, reason)
                del self.requests[seq.request_id]
                self._count_finish(reason)
            finished = reason is not None
            if finished or r.incremental:  # offline requests report only their end
                outputs.append(self._output(r, [tok], r.detok.take_delta(finished), new_lp, finished))
        return outputs

    def _stop_reason(self, r: _Request, tok: int, num_output: int, num_tokens: int) -> str | None:
        params = r.seq.params
        if num_output >= params.min_tokens and tok in r.stop_ids:
            return "stop"
        if num_output >= params.max_tokens or num_tokens >= self.max_model_len:
            return "length"
        return None

    def _count_finish(self, reason: str) -> None:
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    def _output(
        self, r: _Request, new_ids: list[int], new_text: str, new_lp: list[TokenLogprobs], finished: bool
    ) -> RequestOutput:
        seq = r.seq
        n = seq.num_resolved_output_tokens  # not the placeholder of a step still in flight
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            # totals only at the end: copying them on every streamed step would cost O(length)
            token_ids=seq.output_token_ids[:n] if finished else [],
            text=r.detok.released_text if finished else "",
            num_output_tokens=n,
            new_token_ids=new_ids,
            new_text=new_text,
            new_logprobs=new_lp,
            finished=finished,
            finish_reason=seq.finish_reason if finished else None,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=list(r.logprobs) if (finished and r.logprobs is not None) else None,
        )

    def generate_all(self, ids: Seq[str]) -> dict[str, RequestOutput]:
        """Step until the given requests finish; returns their final outputs."""
        pending = set(ids)
        final: dict[str, RequestOutput] = {}
        while pending:
            for o in self.step():
                if o.finished and o.request_id in pending:
                    final[o.request_id] = o
                    pending.discard(o.request_id)
        return final
