"""Model folders with real Qwen2.5 shapes for GPU benchmarks with random weights (``load_format: dummy``).

No weights can reach the GPU machine, so each folder holds a config with the real model's shape and a
word-level tokenizer over the full Qwen vocabulary: id ``i`` is the word ``w<i>``, so every id the
random model samples decodes to a word that encodes back to the same id, and a step's text costs the
same tokens when the router renders it into the next prompt as it did when the engine wrote it (as with
a real model). There is no newline in any word, so steps run to their token limit. The tokenizer has a
folder of its own (``model.tokenizer`` in the config): next to a Qwen2 ``config.json``, transformers would
replace it by its byte-level Qwen2 tokenizer.

    python -m loadtests.gpu_models DIR   # writes DIR/tokenizer, DIR/qwen2.5-1.5b, -14b and -32b
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VOCAB = 151936
SPECIALS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<think>": 151646,
    "</think>": 151647,
}
WORDS = ["user", "assistant", "system"]  # the chat template's role names, at the first ids
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if not loop.last or m['role'] != 'assistant' %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BASE = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "initializer_range": 0.02,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "use_sliding_window": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": VOCAB,
}
SHAPES = {  # the published Qwen2.5 configs' shapes
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_window_layers=28,
        tie_word_embeddings=True,
    ),
    "qwen2.5-14b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        max_window_layers=48,
        tie_word_embeddings=False,
    ),
    "qwen2.5-32b": dict(
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        max_window_layers=64,
        tie_word_embeddings=False,
    ),
}


def word(i: int) -> str:
    """The text of token id ``i`` (not a special token)."""
    return WORDS[i] if i < len(WORDS) else f"w{i}"


def tokenizer_json() -> dict:
    """A WordLevel tokenizer: whitespace-split words, each one id; specials matched first."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    specials = set(SPECIALS.values())
    vocab = {"\u2581" + word(i): i for i in range(VOCAB) if i not in specials}
    vocab.update(SPECIALS)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="\u2581w0"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return json.loads(tok.to_str())


def build_tokenizer(root: Path) -> Path:
    """Write (once) the tokenizer folder under ``root``."""
    path = root / "tokenizer"
    if not (path / "tokenizer.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        (path / "tokenizer.json").write_text(json.dumps(tokenizer_json()))
        (path / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "TokenizersBackend",
                    "eos_token": "<|im_end|>",
                    "pad_token": "<|endoftext|>",
                    "model_max_length": 32768,
                    "chat_template": CHAT_TEMPLATE,
                    "additional_special_tokens": list(SPECIALS),
                }
            )
        )
    return path


def build_model(root: Path, name: str) -> Path:
    """Write (once) the config folder of shape ``name`` under ``root``."""
    path = root / name
    if not (path / "config.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": BASE["eos_token_id"]}))
        (path / "config.json").write_text(json.dumps({**BASE, **SHAPES[name]}))
    return path


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "models")
    print(build_tokenizer(root))
    for name in SHAPES:
        print(build_model(root, name))


if __name__ == "__main__":
    main()
