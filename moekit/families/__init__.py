"""Checkpoint families: recognise a config.json and pick its translator and name table."""

from __future__ import annotations

from moekit.config import ConfigError
from moekit.families import deepseek, llama, llama_moe, mixtral, orion, qwen2_moe, xverse
from moekit.families.base import Family, NameMap

FAMILIES: dict[str, Family] = {f.name: f for f in (
    mixtral.FAMILY, orion.FAMILY, xverse.FAMILY, llama_moe.FAMILY, qwen2_moe.FAMILY, deepseek.FAMILY, llama.FAMILY)}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def detect_family(hf: dict) -> Family:
    """The family a config.json belongs to, by ``model_type`` then ``architectures``."""
    mt, archs = hf.get("model_type"), hf.get("architectures") or []
    for fam in FAMILIES.values():
        if mt in fam.model_types:
            return fam
    for fam in FAMILIES.values():
        if any(a in fam.architectures for a in archs):
            return fam
    raise ConfigError(f"config.json model_type={mt!r} architectures={archs} is not a family moekit reads "
                      f"({', '.join(FAMILIES)})")


__all__ = ["FAMILIES", "Family", "NameMap", "detect_family", "get_family"]
