"""Human-readable summaries of a config: what ``moekit info`` prints."""

from __future__ import annotations

from moekit.config import ModelConfig, count_params


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _ranges(ids: list[int]) -> str:
    if not ids:
        return "none"
    out, start = [], ids[0]
    for a, b in zip(ids, ids[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)


def describe(cfg: ModelConfig, name: str = "") -> list[str]:
    """Lines describing architecture, layer layout and parameter counts."""
    total, active = count_params(cfg)
    norm = "RMSNorm" if cfg.norm == "rms" else "LayerNorm (with bias)"
    rope = f"RoPE theta {cfg.rope_theta:g}"
    if cfg.rope_scaling:
        rope += f", {cfg.rope_scaling.kind} scaling x{cfg.rope_scaling.factor:g}"
    attn = "MHA" if cfg.num_heads == cfg.num_kv_heads else "GQA"
    lines = [
        f"model:        {name or 'unnamed'}" + (f" (family {cfg.family})" if cfg.family else ""),
        f"decoder:      {cfg.num_layers} layers, width {cfg.hidden_size}, vocab {cfg.vocab_size}, "
        f"{'tied' if cfg.tie_word_embeddings else 'untied'} embeddings",
        f"attention:    {attn} {cfg.num_heads} query / {cfg.num_kv_heads} KV heads x {cfg.head_dim}"
        + (", q/k/v bias" if cfg.attention_bias else "") + f", {rope}, context {cfg.max_position_embeddings}",
        f"norm:         {norm}, eps {cfg.norm_eps:g}",
    ]
    m = cfg.moe
    dense = [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]
    moe = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    if m is not None:
        width = m.expert_width if isinstance(m.expert_width, int) else "per-layer widths"
        score = m.score_func + (" renormalised" if m.renormalize else " not renormalised")
        if m.renormalize and m.renormalize_eps:
            score += f" (+{m.renormalize_eps:g})"
        router = {"linear": "linear router", "mlp": "Linear-Tanh-Linear router"}[m.router]
        if m.router_noise:
            router += " with noise projection"
        lines.append(f"experts:      {m.num_experts} routed x {width}, top-{m.top_k}, {score}, {router}"
                     + (", float32 logits" if m.router_fp32 else ""))
        if m.shared_width:
            lines.append(f"shared:       width {m.shared_width}, {'sigmoid-gated' if m.shared_gate else 'ungated'}")
        scales = {m.scale(i) for i in moe}
        if scales != {1.0}:
            lines.append(f"output scale: {', '.join(f'{s:g}' for s in sorted(scales))} (x routed output)")
        lines.append(f"balance loss: {m.aux_loss}, coef {m.aux_loss_coef:g}")
    lines.append(f"layers:       MoE {_ranges(moe)}; dense {_ranges(dense)}"
                 + (f" (FFN width {cfg.intermediate_size})" if dense else ""))
    lines.append(f"parameters:   {_billions(total)} total, {_billions(active)} active per token "
                 f"({total:,} / {active:,})")
    return lines
