"""Files shipped inside the package: the embedded default model (recipes/embedded builds it)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "default"


def default_model_path() -> Path:
    """The folder of the embedded default model (XVERSE-MoE layout: config.json, safetensors, tokenizer).

    A tiny bilingual model trained by recipes/embedded/build.py (docs/default-model.md); used
    by ``moekit generate`` / ``moekit chat`` when no ``--model`` is given.
    """
    path = Path(__file__).resolve().parent / DEFAULT_MODEL
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the embedded default model is missing from {path}; "
                                "rebuild it with: python recipes/embedded/build.py")
    return path
