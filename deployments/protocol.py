"""What the router and the pools exchange: plain dataclasses, pickled by Ray."""

from __future__ import annotations

from dataclasses import dataclass, field

# A prompt is text (tokenized by the pool) or token ids (from the router's own tokenizer).
Prompt = str | list[int]


@dataclass(frozen=True)
class Glimpse:
    """The first token of a step and its top-k log-probabilities, sorted from most to least likely."""

    token_id: int
    token: str
    top_logprobs: list[float]
    top_tokens: list[str]
    prompt_tokens: int
    cached_tokens: int
    ms: float = 0.0  # fused glimpses: the pool's time for it (the prompt's tokenization included)
    prompt_ids: tuple[int, ...] = ()  # fused glimpses: the prompt it was taken on, the next small step's


@dataclass(frozen=True)
class NextGlimpse:
    """Asks a step call for the next step's glimpse (fused glimpse): its top-k, and the step delimiter the
    next step's prompt adds after this step's text."""

    top_k: int
    delimiter: str


@dataclass(frozen=True)
class StepSampling:
    """Sampling of one step or final answer."""

    max_tokens: int
    temperature: float
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class StepChunk:
    """One item of a step's stream: new text, and on the last item (``done``) the engine's counts."""

    text: str
    done: bool = False
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    output_token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    stopped_by: str | None = None
    next_glimpse: Glimpse | None = None  # the fused glimpse, when asked for and the step allows it
    glimpse: Glimpse | None = None  # on the first item of a step asked for its own glimpse (glimpse_in_step)

    @property
    def ended_by_eos(self) -> bool:
        """The model ended its output (EOS), as opposed to a stop string or the token limit."""
        return self.finish_reason == "stop" and not isinstance(self.stopped_by, str)
