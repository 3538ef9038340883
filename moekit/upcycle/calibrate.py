"""Calibration text: token windows, language-model loss, and per-neuron importance of a dense model.

Shape legend: W windows, T tokens per window, D model width, F dense FFN width, G text groups.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from moekit.errors import MoekitError
from moekit.kernels.reference import silu_mul
from moekit.models import MoEDecoder
from moekit.models.layers import MLP
from moekit.models.loss import window_nll


def calibration_windows(text_path: str | Path, tokenizer_dir: str | Path, seq_len: int = 256,
                        max_windows: int = 64) -> torch.Tensor:
    """Token windows [W, seq_len + 1] cut from a text file (consecutive, non-overlapping)."""
    from moekit.tokenizer import Tokenizer

    path = Path(text_path)
    if not path.is_file():
        raise MoekitError(f"calibration={str(path)!r}: no such text file")
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    ids = tok.encode(path.read_text(encoding="utf-8", errors="replace"))
    n = min(max_windows, (len(ids) - 1) // seq_len)
    if n < 1:
        raise MoekitError(f"calibration={str(path)!r}: {len(ids)} tokens cannot fill one window of {seq_len + 1}")
    return torch.tensor(ids[: n * seq_len + 1]).unfold(0, seq_len + 1, seq_len)[:n].clone()


@torch.no_grad()
def lm_loss(model: MoEDecoder, windows_WT: torch.Tensor, batch: int = 4, progress: bool = False,
            desc: str = "loss") -> float:
    """Mean next-token loss (nats, :func:`moekit.models.loss.window_nll`) over every window, in eval mode."""
    was = model.training
    model.eval()
    total, count = 0.0, 0.0
    for i in tqdm(range(0, len(windows_WT), batch), desc=desc, unit="batch", disable=not progress):
        nll, n = window_nll(model, windows_WT[i:i + batch])
        total, count = total + float(nll), count + float(n)
    model.train(was)
    return total / count


class _Probe(nn.Module):
    """Stands in for a dense FFN and keeps its intermediate activations a = silu(gate x) * up x."""

    def __init__(self, mlp: MLP):
        super().__init__()
        self.mlp, self.act_BTF = mlp, None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        a = silu_mul(F.linear(x_BTD, self.mlp.w13))
        self.act_BTF = a
        return F.linear(a, self.mlp.w2)


def neuron_importance(dense: MoEDecoder, windows_WT: torch.Tensor, progress: bool = False
                      ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(per layer [W, F] importance, [W, D] window features) of a dense model on calibration windows.

    Importance of neuron j on a window is LLaMA-MoE's "feature_change" score with the l1
    kernel: sum over the window's tokens of |a_j * dL/da_j|, the first-order change of the
    loss if the neuron were removed. A window's feature is the mean of its final hidden
    states (after the last norm), used to group the text.
    """
    probes = []
    for block in dense.layers:
        if not isinstance(block.ffn, MLP):
            raise MoekitError("importance needs a dense model (every layer a plain FFN)")
        probes.append(_Probe(block.ffn))
        block.ffn = probes[-1]
    was = dense.training
    dense.eval()
    scores: list[list[torch.Tensor]] = [[] for _ in probes]
    feats = []
    try:
        with torch.enable_grad():
            for x in tqdm(windows_WT, desc="neuron importance", unit="window", disable=not progress):
                s_L, f_D = _window_scores(dense, probes, x[None])
                for i, s in enumerate(s_L):
                    scores[i].append(s)
                feats.append(f_D)
    finally:
        for block, p in zip(dense.layers, probes):
            block.ffn = p.mlp
        dense.train(was)
    return [torch.stack(s) for s in scores], torch.stack(feats)


def _window_scores(dense: MoEDecoder, probes: list[_Probe], x_BT: torch.Tensor
                   ) -> tuple[list[torch.Tensor], torch.Tensor]:
    final: list[torch.Tensor] = []
    hooks = [dense.norm.register_forward_hook(lambda mod, args, out: final.append(out))]
    if not any(p.requires_grad for p in dense.parameters()):  # frozen weights: the graph needs one input
        hooks.append(dense.embed.register_forward_hook(lambda mod, args, out: out.requires_grad_()))
    try:
        nll, count = window_nll(dense, x_BT)
    finally:
        for h in hooks:
            h.remove()
    loss = nll / count
    grads = torch.autograd.grad(loss, [p.act_BTF for p in probes])
    out = [(p.act_BTF.detach() * g).abs().sum((0, 1)).double() for p, g in zip(probes, grads)]
    for p in probes:
        p.act_BTF = None
    return out, final[-1].detach().mean((0, 1)).double()
