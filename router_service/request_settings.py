"""A request's settings: its policy and step limits from the router's, its tenant's and its own fields, and the
check that its prompt and the most tokens it can take fit each pool's context (``router_service/service.py``
calls both before it admits a request)."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError

from cluster.config import ClusterConfig, PolicySettings, PoolRole, StepSettings
from router_service.api_models import RoutingOverrides
from router_service.errors import APIError, validation_error
from router_service.prompts import PromptRenderer
from router_service.tenancy import Tenant

# the policy fields a request may set for itself
POLICY_OVERRIDES = tuple(k for k in RoutingOverrides.model_fields if k in PolicySettings.model_fields)
STEP_OVERRIDES = ("cap_last_step", "stop_on_eos")  # the step-loop variants a request may ask for
CONTEXT_MARGIN_TOKENS = 16  # room for the answer's template tokens beyond the budget


def request_settings(base: StepSettings, tenant: Tenant, body) -> tuple[PolicySettings, StepSettings]:
    """A request's policy and step limits: the router's (``base``) < the tenant's < the request's fields. A request's
    ``seed`` seeds the policy's draws too. A completion limit (``max_completion_tokens``) bounds reasoning and
    answer together: without a ``token_budget`` the steps may take all of it but what is kept for the answer
    (``final_max_tokens``, at most half of the limit); the answer may take all the steps leave, or at most
    the request's ``final_max_tokens``."""
    overrides = {k: v for k in POLICY_OVERRIDES if (v := getattr(body, k)) is not None}
    if body.seed is not None:
        overrides["seed"] = body.seed
    try:  # each field is valid alone (the body's model); together they may not be
        policy = PolicySettings.model_validate({**tenant.settings.policy.model_dump(), **overrides})
    except ValidationError as exc:
        raise validation_error(exc) from None
    ceiling, completion_limit = tenant.settings.max_token_budget, body.completion_limit()
    answer = body.final_max_tokens or base.final_max_tokens
    default = min(base.token_budget, ceiling)
    if completion_limit is not None:
        default = min(default, max(1, completion_limit - min(answer, completion_limit // 2)))
        answer = body.final_max_tokens or completion_limit  # the answer may take what the steps leave
    budget = body.token_budget or default
    if budget > ceiling:
        raise APIError(
            400,
            f"token_budget {budget} exceeds this key's limit of {ceiling}",
            param="token_budget",
            code="budget_too_large",
        )
    if completion_limit is not None and budget > completion_limit:
        raise APIError(
            400,
            f"token_budget {budget} exceeds max_completion_tokens {completion_limit}",
            param="token_budget",
            code="budget_too_large",
        )
    steps = base.model_copy(
        update={
            "token_budget": budget,
            "step_max_tokens": body.step_max_tokens or base.step_max_tokens,
            "completion_limit": completion_limit,
            "final_max_tokens": min(answer, 32_768),
            **{k: v for k in STEP_OVERRIDES if (v := getattr(body, k)) is not None},
        }
    )
    return policy, steps


def check_context(
    cfg: ClusterConfig, renderers: Mapping[PoolRole, PromptRenderer], messages: list[dict], steps: StepSettings
) -> int:
    """The prompt's tokens; 400 if the prompt, the most tokens the steps can take and the answer cannot fit a
    pool's context."""
    prompt_tokens = 0
    most = steps.most_reasoning_tokens() + steps.final_max_tokens
    if steps.completion_limit is not None:
        most = min(most, steps.completion_limit)
    for role, pool in cfg.pools.items():
        try:
            n = len(renderers[role].step_prompt(messages, [], steps.delimiter))
        except Exception as exc:  # a template that cannot render these messages
            raise APIError(
                400, f"messages cannot be rendered by the {role} model's chat template: {exc}", param="messages"
            ) from None
        if n + most + CONTEXT_MARGIN_TOKENS > pool.engine.max_model_len:
            raise APIError(
                400,
                f"prompt ({n} tokens) plus token_budget and max_tokens exceed the {role} model's "
                f"context of {pool.engine.max_model_len} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        prompt_tokens = n
    return prompt_tokens
