"""Per-request sampling settings, with OpenAI / vLLM semantics."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import EngineInputError

# As vLLM's default `max_logprobs`; OpenAI allows top_logprobs <= 20.
MAX_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick the next tokens of one request.

    n: completions per prompt (the offline `LLM` fans them out).
    max_tokens: new tokens at most (None: up to max_model_len).
    temperature: 0 means greedy.
    top_p / top_k / min_p: nucleus, top-k (<= 0: off), min-p (0: off) filters.
    seed: same seed -> same tokens, whatever else is in the batch.
    presence_penalty / frequency_penalty: OpenAI, over generated tokens.
    repetition_penalty: multiplicative (1: off), over prompt + generated tokens.
    stop_token_ids: extra tokens that end the request (returned in the output).
    ignore_eos: keep going past the model's EOS tokens.
    logprobs: None: none; k >= 0: the sampled token's logprob plus the top-k
        (raw model log-probabilities, before penalties/temperature, as vLLM).
    """

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def plain_greedy(self) -> bool:
        """The argmax alone decides the token: nothing reads the history or the probabilities on the host."""
        return self.greedy and not self.has_penalties and self.logprobs is None

    def validate(self) -> None:
        """Raise `EngineInputError` naming the first bad field."""
        checks = [
            (isinstance(self.n, int) and self.n >= 1, "n", "n must be an integer >= 1"),
            (
                self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
                "max_tokens",
                "max_tokens must be an integer >= 1",
            ),
            (0.0 <= self.temperature <= 100.0, "temperature", "temperature must be in [0, 100]"),
            (0.0 < self.top_p <= 1.0, "top_p", "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int), "top_k", "top_k must be an integer (<= 0: off)"),
            (0.0 <= self.min_p <= 1.0, "min_p", "min_p must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "frequency_penalty must be in [-2, 2]"),
            (0.0 < self.repetition_penalty <= 2.0, "repetition_penalty", "repetition_penalty must be in (0, 2]"),
            (
                self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
                "logprobs",
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}]",
            ),
            (
                self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
                "seed",
                "seed must be an integer in [0, 2**63)",
            ),
            (all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "stop_token_ids must be >= 0"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise EngineInputError(message, param=param)
