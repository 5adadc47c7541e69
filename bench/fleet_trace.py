"""Arrival traces: a bursty Markov-modulated Poisson process (MMPP), and hand-made ones for tests.

The MMPP has four states; in each, arrivals are Poisson at the state's rate, and the state lasts
an exponential time with the state's mean, then jumps to a next state drawn from its row:

    state   rate (req/s)  mean stay   next (probability)
    idle    0             20 min      low .6, burst .4      <- bursts after idle: the cold-start case
    low     0.5           15 min      idle .4, busy .4, burst .2
    busy    4             10 min      low .7, burst .3
    burst   25            90 s        busy .5, low .3, idle .2

`burst_rate` sets the burst state's rate (the CLI runs 25 and 60 req/s: one or two warm replicas
absorb the first, the second needs the fleet to grow mid-burst). Lengths are W1's: prompt and output each uniform in [100, 1024] (bench/workloads.py w1). One
seeded `random.Random` draws everything, so a (seed, duration) pair is one fixed trace; each
request also carries its own routing draw, so every policy routes the same request with the same
number (common random numbers).
"""

from __future__ import annotations

import dataclasses
import random

from fleet_worker import Request


@dataclasses.dataclass(frozen=True)
class MmppState:
    name: str
    rate: float  # requests per second
    mean_stay_s: float
    next: tuple[tuple[str, float], ...]


STATES = (
    MmppState("idle", 0.0, 1200.0, (("low", 0.6), ("burst", 0.4))),
    MmppState("low", 0.5, 900.0, (("idle", 0.4), ("busy", 0.4), ("burst", 0.2))),
    MmppState("busy", 4.0, 600.0, (("low", 0.7), ("burst", 0.3))),
    MmppState("burst", 25.0, 90.0, (("busy", 0.5), ("low", 0.3), ("idle", 0.2))),
)
LENGTH_RANGE = (100, 1024)


@dataclasses.dataclass(frozen=True)
class Trace:
    requests: tuple[Request, ...]
    duration_s: float
    segments: tuple[tuple[float, float, str], ...]  # (start, end, state name)

    def fresh(self) -> list[Request]:
        """Unserved copies, one set per simulated policy."""
        return [Request(r.rid, r.t_arrive, r.prompt, r.out, r.u_route) for r in self.requests]


def mmpp(seed: int, duration_s: float, burst_rate: float | None = None, start: str = "low") -> Trace:
    """`burst_rate` replaces the burst state's rate; the state sequence has a stream of its own,
    so traces of one seed differ only in how hard the bursts are."""
    rng_states, rng_arrivals = random.Random(seed), random.Random(seed + 1_000_003)
    by_name = {s.name: s for s in STATES}
    if burst_rate is not None:
        by_name["burst"] = dataclasses.replace(by_name["burst"], rate=burst_rate)
    state = by_name[start]
    t = 0.0
    reqs: list[Request] = []
    segments: list[tuple[float, float, str]] = []
    while t < duration_s:
        end = min(duration_s, t + rng_states.expovariate(1.0 / state.mean_stay_s))
        segments.append((t, end, state.name))
        if state.rate > 0:
            a = t + rng_arrivals.expovariate(state.rate)
            while a < end:
                reqs.append(_request(rng_arrivals, len(reqs), a))
                a += rng_arrivals.expovariate(state.rate)
        t = end
        names, weights = zip(*state.next)
        state = by_name[rng_states.choices(names, weights)[0]]
    return Trace(tuple(reqs), duration_s, tuple(segments))


def poisson_bursts(
    seed: int, duration_s: float, bursts: list[tuple[float, float, float]], base_rate: float = 0.0
) -> Trace:
    """A hand-made trace: Poisson at `base_rate`, plus each (start, length_s, rate) burst."""
    rng = random.Random(seed)
    times: list[float] = []
    for start, end, rate in [(0.0, duration_s, base_rate)] + [(s, s + n, r) for s, n, r in bursts]:
        if rate <= 0:
            continue
        a = start + rng.expovariate(rate)
        while a < end:
            times.append(a)
            a += rng.expovariate(rate)
    reqs = [_request(rng, i, a) for i, a in enumerate(sorted(times))]
    return Trace(tuple(reqs), duration_s, ())


def fixed(arrivals: list[tuple[float, int, int]], duration_s: float) -> Trace:
    """Exact requests: (arrival time, prompt, output)."""
    reqs = [Request(i, t, p, o, 0.0) for i, (t, p, o) in enumerate(arrivals)]
    return Trace(tuple(reqs), duration_s, ())


def _request(rng: random.Random, rid: int, t: float) -> Request:
    lo, hi = LENGTH_RANGE
    return Request(rid, t, rng.randint(lo, hi), rng.randint(lo, hi), rng.random())
