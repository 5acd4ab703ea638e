"""OpenAI response shapes (whole responses and SSE chunks) built from the step loop's results."""

from __future__ import annotations

import json
import time

from cluster.config import PolicySettings
from router_service.loop import AnswerDone
from router_service.state import StepRecord

# the settings each policy reads: the routing object shows those, and no other
POLICY_FIELDS: dict[str, tuple[str, ...]] = {
    "glimprouter": ("tau", "max_large_fraction", "fused_glimpse", "glimpse_in_step"),
    "large_only": (),
    "small_only": (),
    "random": ("large_fraction", "seed"),
    "forced_fraction": ("large_fraction", "seed", "fused_glimpse", "glimpse_in_step"),
}


def routing_summary(policy: PolicySettings, steps: list[StepRecord]) -> dict:
    """The ``routing`` extension object: the policy and the settings it reads, per step pool, entropy, tokens
    and times."""
    large = sum(1 for s in steps if s.pool == "large")
    return {
        "policy": policy.policy,
        **{name: getattr(policy, name) for name in POLICY_FIELDS[policy.policy]},
        "large_step_fraction": round(large / len(steps), 4) if steps else 0.0,
        "steps": [
            {
                "index": s.index,
                "pool": s.pool,
                "entropy": s.entropy,
                "tokens": s.output_tokens,
                "glimpse_ms": s.glimpse_ms,
                "glimpse_fused": s.glimpse_fused,
                "step_ms": s.step_ms,
            }
            for s in steps
        ],
    }


def usage(steps: list[StepRecord], answer: AnswerDone, prompt_tokens: int, glimpses: int) -> dict:
    """OpenAI usage plus ``per_pool``: engine-reported tokens of each pool. Glimpses are small-pool calls: their
    prompt tokens count in the small pool's ``prompt_tokens`` (and apart, as ``glimpse_prompt_tokens``); the
    glimpsed token itself is thrown away, so it is no completion token."""
    per_pool = {
        pool: {"steps": 0, "completion_tokens": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0}
        for pool in ("small", "large")
    }
    for s in steps:
        p = per_pool[s.pool]
        p["steps"] += 1
        p["completion_tokens"] += s.output_tokens
        p["prompt_tokens"] += s.prompt_tokens
        p["cached_prompt_tokens"] += s.cached_tokens
    per_pool[answer.pool]["completion_tokens"] += answer.output_tokens
    per_pool[answer.pool]["prompt_tokens"] += answer.prompt_tokens
    per_pool[answer.pool]["cached_prompt_tokens"] += answer.cached_tokens
    small = per_pool["small"]
    small["glimpses"] = glimpses
    small["glimpse_prompt_tokens"] = sum(s.glimpse_prompt_tokens for s in steps)  # in small's prompt_tokens too
    small["prompt_tokens"] += small["glimpse_prompt_tokens"]
    small["cached_prompt_tokens"] += sum(s.glimpse_cached_tokens for s in steps)
    reasoning = sum(s.output_tokens for s in steps)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": reasoning + answer.output_tokens,
        "total_tokens": prompt_tokens + reasoning + answer.output_tokens,
        "completion_tokens_details": {"reasoning_tokens": reasoning},
        "per_pool": per_pool,
    }


def reasoning_text(steps: list[StepRecord], delimiter: str) -> str:
    """All steps joined by the delimiter, as ``reasoning_content``."""
    return delimiter.join(s.text for s in steps)


def chat_completion(
    request_id: str, model: str, reasoning: str, answer: AnswerDone, usage_: dict, routing: dict
) -> dict:
    """A whole ``chat.completion``."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "finish_reason": answer.finish_reason or "stop",
                "logprobs": None,
                "message": {"role": "assistant", "content": answer.text, "reasoning_content": reasoning},
            }
        ],
        "usage": usage_,
        "routing": routing,
    }


def text_completion(
    request_id: str, model: str, reasoning: str, answer: AnswerDone, usage_: dict, routing: dict
) -> dict:
    """A whole ``text_completion``."""
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": answer.text,
                "reasoning_content": reasoning,
                "logprobs": None,
                "finish_reason": answer.finish_reason or "stop",
            }
        ],
        "usage": usage_,
        "routing": routing,
    }


class ChunkWriter:
    """Builds the SSE lines of one streamed response, in chat or text completion chunk format."""

    def __init__(self, request_id: str, model: str, chat: bool):
        self.request_id, self.model, self.chat = request_id, model, chat
        self.created = int(time.time())

    def _line(self, choices: list[dict], **extra) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        payload = {
            "id": self.request_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(payload)}\n\n"

    def delta(self, *, content: str | None = None, reasoning: str | None = None, role: str | None = None) -> str:
        """A chunk carrying new answer text or new reasoning text."""
        if not self.chat:
            return self._line(
                [{"index": 0, "text": content or "", "reasoning_content": reasoning, "finish_reason": None}]
            )
        delta = {
            k: v for k, v in (("role", role), ("content", content), ("reasoning_content", reasoning)) if v is not None
        }
        return self._line([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def finish(self, finish_reason: str, routing: dict) -> str:
        """The chunk with the finish reason, carrying the ``routing`` object."""
        if not self.chat:
            return self._line([{"index": 0, "text": "", "finish_reason": finish_reason}], routing=routing)
        return self._line(
            [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}], routing=routing
        )

    def usage(self, usage_: dict) -> str:
        """The final usage chunk (``stream_options.include_usage``)."""
        return self._line([], usage=usage_)

    @staticmethod
    def error(err: dict) -> str:
        """An error after the stream started (the status is already sent)."""
        return f"data: {json.dumps(err)}\n\n"

    @staticmethod
    def done() -> str:
        """The stream's end."""
        return "data: [DONE]\n\n"
