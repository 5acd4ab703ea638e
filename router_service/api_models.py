"""Request models of the OpenAI-compatible API, with GlimpRouter's extension fields."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.config import PolicyName, PriorityClass


class APIModel(BaseModel):
    """Unknown fields are rejected, as everywhere in the config tree."""

    model_config = ConfigDict(extra="forbid")


class TextPart(APIModel):
    """A text content part."""

    type: Literal["text"]
    text: str


class ChatMessage(APIModel):
    """One chat message."""

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        """The content as one string."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(APIModel):
    """OpenAI's stream options."""

    include_usage: bool = False


class RoutingOverrides(APIModel):
    """Extension fields: the request's routing policy and step loop limits (None: the tenant's or router's)."""

    policy: PolicyName | None = Field(
        None, description="glimprouter, large_only, small_only, random or forced_fraction (benchmarks)."
    )
    tau: float | None = Field(None, ge=0, le=10, description="Entropy threshold in nats.")
    large_fraction: float | None = Field(
        None, ge=0, le=1, description="'random' and 'forced_fraction': large fraction."
    )
    fused_glimpse: bool | None = Field(None, description="Take each glimpse after a small step from that step's call.")
    glimpse_in_step: bool | None = Field(
        None, description="Take each glimpse from the first token of a small step call."
    )
    token_budget: int | None = Field(None, ge=1, le=1_000_000, description="Most output tokens of all steps.")
    step_max_tokens: int | None = Field(None, ge=1, le=32_768, description="Most tokens of one step.")
    final_max_tokens: int | None = Field(
        None,
        ge=1,
        le=32_768,
        description="Most tokens of the final answer alone (within max_completion_tokens, when that is given too).",
    )
    cap_last_step: bool | None = Field(
        None,
        description="Cap each step at what is left of token_budget (a serving "
        "variant; the reference keeps the step that crosses the budget whole).",
    )
    stop_on_eos: bool | None = Field(
        None,
        description="End thinking after a step that ends with EOS (a serving "
        "variant; the reference writes the next step).",
    )
    max_large_fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        description="glimprouter: large-step budget, the share of steps the router sends to the large pool.",
    )
    priority: PriorityClass | None = Field(
        None, description="interactive, standard or batch: at most the key's own class (its default)."
    )


class SamplingFields(RoutingOverrides):
    """OpenAI sampling fields shared by both endpoints."""

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Most completion tokens, reasoning and "
        "answer together (chat: the deprecated name of max_completion_tokens).",
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    n: int = Field(1, ge=1, le=1, description="Only one choice is supported.")
    user: str | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Most completion tokens, reasoning and answer together, as for OpenAI's reasoning models.",
    )

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages[-1].role != "user" or not messages[-1].text().strip():
            raise ValueError("the last message must be a non-empty user message")
        return messages

    def chat(self) -> list[dict]:
        """Messages as chat-template dicts."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def completion_limit(self) -> int | None:
        """The most completion tokens (reasoning and answer): ``max_completion_tokens``, else ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: the prompt is sent as one user message."""

    prompt: str = Field(min_length=1)

    def chat(self) -> list[dict]:
        """The prompt as a one-message chat."""
        return [{"role": "user", "content": self.prompt}]

    def completion_limit(self) -> int | None:
        """The most completion tokens (reasoning and answer)."""
        return self.max_tokens


def openapi_body(model: type[BaseModel]) -> dict:
    """``openapi_extra`` of a route whose JSON body is ``model`` (read by hand, so FastAPI cannot see it),
    with the model's definitions inlined."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}
