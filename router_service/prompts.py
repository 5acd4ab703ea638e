"""The per-step prompt layout of glimprouter-algorithm.md, rendered with each pool's chat template."""

from __future__ import annotations

from pathlib import Path

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def thinking_so_far(steps: list[str], delimiter: str) -> str:
    """The open assistant turn before the next step: ``<think>`` + steps joined + delimiter."""
    return THINK_OPEN + (delimiter.join(steps) + delimiter if steps else "")


def final_thinking(steps: list[str], delimiter: str) -> str:
    """The assistant turn the final answer continues: thinking cut at the first ``</think>``, then closed."""
    thinking = delimiter.join(steps).split(THINK_CLOSE, 1)[0]
    return THINK_OPEN + thinking + "\n" + THINK_CLOSE + "\n\n"


class PromptRenderer:
    """Renders step and final-answer prompts to token ids with one model's tokenizer and chat template."""

    def __init__(self, model_dir: str | Path, chat_template: str | None = None):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if chat_template:
            self.tokenizer.chat_template = chat_template

    def _render(self, messages: list[dict], assistant: str | None) -> list[int]:
        if assistant is None:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        else:
            ids = self.tokenizer.apply_chat_template(
                [*messages, {"role": "assistant", "content": assistant}],
                add_generation_prompt=False,
                continue_final_message=True,
                tokenize=True,
            )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def step_prompt(self, messages: list[dict], steps: list[str], delimiter: str) -> list[int]:
        """Step 0: the chat with the generation prompt; step k > 0: the open thinking turn."""
        return self._render(messages, thinking_so_far(steps, delimiter) if steps else None)

    def final_prompt(self, messages: list[dict], steps: list[str], delimiter: str) -> list[int]:
        """The final answer's prompt: closed thinking, the assistant turn left open."""
        return self._render(messages, final_thinking(steps, delimiter))
