"""Config: presets reproduce the published parameter counts; validation names the field; families round-trip."""

import pytest

import moekit
from moekit.config import ConfigError, MoEConfig
from moekit.families import FAMILIES, NameMap, detect_family
from moekit.models import MoEDecoder

# (total, active) in billions, as published (model cards; families.md section 5).
PUBLISHED = {
    "xverse-moe-a4.2b": (25.8, 4.2),
    "llama-moe-v1-3.5b-2_8": (6.7, 3.5),
    "llama-moe-v1-3.5b-4_16": (6.7, 3.5),
    "llama-moe-v1-3.0b-2_16": (6.7, 3.0),
    "mixtral-8x7b": (46.7, 12.9),
    "qwen2-moe": (14.3, 2.7),  # Qwen1.5-MoE-A2.7B
    "deepseek-moe-16b": (16.4, 2.8),
    "apus-xdan-4.0-moe": (113.66, 60.8),  # computed in families.md (the card's 136B total is wrong)
    "orion-moe-8x7b": (48.18, 13.75),  # computed in families.md; consistent with the 96.4 GB fp16 release
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_count_params_matches_published(name):
    total, active = moekit.count_params(moekit.preset(name))
    want_total, want_active = PUBLISHED[name]
    assert abs(total / 1e9 - want_total) <= 0.05
    assert abs(active / 1e9 - want_active) <= 0.05


def test_every_preset_has_a_count():
    assert set(moekit.PRESETS) == set(PUBLISHED)


def tiny(cfg):
    """Shrink a preset so it can be allocated, keeping its family features."""
    m = cfg.moe
    width = 8 if isinstance(m.expert_width, int) else tuple((8,) * m.num_experts for _ in range(3))
    scale = m.routed_scale if isinstance(m.routed_scale, float) else (2.0,) * 3
    moe = MoEConfig(**{**m.__dict__, "expert_width": width, "shared_width": 16 if m.shared_width else 0,
                       "routed_scale": scale, "first_dense_layers": min(m.first_dense_layers, 1)})
    return cfg.replace(vocab_size=50, hidden_size=32, num_layers=3, num_heads=4,
                       num_kv_heads=4 if cfg.num_kv_heads == cfg.num_heads else 2, head_dim=8,
                       intermediate_size=24 if cfg.intermediate_size else 0, moe=moe,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)


def test_count_params_equals_allocated_parameters():
    for name in moekit.PRESETS:
        cfg = tiny(moekit.preset(name))
        model = MoEDecoder(cfg)
        assert moekit.count_params(cfg)[0] == sum(p.numel() for p in model.parameters()), name


@pytest.mark.parametrize("name", sorted(moekit.PRESETS))
def test_family_translation_round_trips(name):
    cfg = moekit.preset(name)
    fam = FAMILIES[cfg.family]
    hf = fam.to_hf(cfg)
    assert detect_family(hf) is fam
    names = frozenset({"model.layers.0.input_layernorm.bias"}) if cfg.norm == "layer" else frozenset({"x"})
    assert fam.to_config(hf, names) == cfg
    small = tiny(cfg)
    assert fam.to_config(fam.to_hf(small), names) == small


@pytest.mark.parametrize("name", sorted(moekit.PRESETS))
def test_name_tables_are_bijective(name):
    cfg = tiny(moekit.preset(name))
    table = NameMap(FAMILIES[cfg.family].names(cfg))
    views = MoEDecoder(cfg).named_views()
    hf_names = {table.to_hf(n) for n in views}
    assert None not in hf_names and len(hf_names) == len(views)
    assert all(table.from_hf(table.to_hf(n)) == n for n in views)


@pytest.mark.parametrize("change, field", [
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(norm="batch"), "norm"),
    (dict(eos_token_id=10**6), "eos_token_id"),
    (dict(moe=MoEConfig(num_experts=4, top_k=5, expert_width=8)), "top_k"),
    (dict(moe=MoEConfig(num_experts=4, top_k=2, expert_width=0)), "expert_width"),
    (dict(moe=MoEConfig(num_experts=4, top_k=2, expert_width=((8,) * 4,))), "expert_width"),
    (dict(moe=MoEConfig(num_experts=4, top_k=2, expert_width=8, routed_scale=(1.0,))), "routed_scale"),
    (dict(moe=MoEConfig(num_experts=4, top_k=2, expert_width=8, first_dense_layers=28)), "first_dense_layers"),
])
def test_validation_names_the_field(change, field):
    with pytest.raises(ConfigError, match=rf"config field {field}="):
        moekit.preset("xverse-moe-a4.2b").replace(**change)


def test_layouts_refuse_what_they_cannot_express():
    cfg = moekit.preset("xverse-moe-a4.2b")
    with pytest.raises(ConfigError, match="mixtral layout cannot express"):
        FAMILIES["mixtral"].to_hf(cfg)
    with pytest.raises(ConfigError, match="llama layout cannot express"):
        FAMILIES["llama"].to_hf(cfg)
