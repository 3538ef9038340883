"""What an upcycling run may choose, and the checks that turn bad choices into clear errors."""

from __future__ import annotations

from dataclasses import dataclass, fields

from moekit.errors import MoekitError

METHODS = ("random", "cluster", "importance", "copy")
GATES = ("mlp", "linear")
GATE_INITS = ("zero", "random", "centroids")
LAYOUTS = ("auto", "llama_moe", "mixtral", "deepseek", "xverse")
FEATURES = ("up", "gate")


@dataclass(frozen=True)
class UpcycleOptions:
    """How a dense FFN becomes experts (see docs/upcycling.md)."""

    method: str = "random"  # random | cluster | importance (LLaMA-MoE) | copy (each expert a full copy)
    experts: int = 16  # E: routed experts per layer
    top_k: int = 4  # K: routed experts per token
    shared: int = 0  # always-on shared experts, each as wide as a routed one (the most important neurons)
    gate: str = "mlp"  # mlp: LLaMA-MoE's Linear(d->E), Tanh, Linear(E->E); linear: Linear(d->E)
    gate_init: str = "random"  # zero (uniform routing) | random (PyTorch's Linear init) | centroids
    scale: float | None = None  # routed output multiplier; None: E/K for partitions (LLaMA-MoE), 1 for copy
    noise: float = 0.0  # copy only: add N(0, (noise * std(w))^2) to every expert copy's weights
    feature: str = "up"  # neuron rows that cluster / give centroids: rows of up_proj or gate_proj
    layout: str = "auto"  # checkpoint family: auto = llama_moe, or deepseek when there are shared experts
    kmeans_iters: int = 30  # cluster: at most this many k-means rounds
    seed: int = 0  # random split, k-means seeding, random gates, copy noise

    @classmethod
    def from_dict(cls, d: dict, where: str = "upcycle") -> UpcycleOptions:
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise MoekitError(f"{where}: unknown option(s) {bad}; known: {sorted(known)}")
        return cls(**d)

    @property
    def partition(self) -> bool:
        return self.method != "copy"

    @property
    def needs_calibration(self) -> bool:
        """Importance scores (the importance method, shared experts) come from calibration text."""
        return self.partition and (self.method == "importance" or self.shared > 0)

    def routed_scale(self) -> float:
        if self.scale is not None:
            return float(self.scale)
        return self.experts / self.top_k if self.partition else 1.0

    def family(self) -> str:
        """The checkpoint layout this model is written in."""
        if self.layout != "auto":
            return self.layout
        return "deepseek" if self.shared else "llama_moe"

    def validate(self, ffn_width: int) -> None:
        """Raise MoekitError naming the first option that cannot work for a dense FFN of ``ffn_width``."""
        for name, allowed in (("method", METHODS), ("gate", GATES), ("gate_init", GATE_INITS),
                              ("layout", LAYOUTS), ("feature", FEATURES)):
            if getattr(self, name) not in allowed:
                raise MoekitError(f"{name}={getattr(self, name)!r} must be one of {', '.join(allowed)}")
        E, K, N = self.experts, self.top_k, self.shared
        if not isinstance(E, int) or E < 1:
            raise MoekitError(f"experts={E!r} must be a positive integer")
        if not isinstance(K, int) or not 1 <= K <= E:
            raise MoekitError(f"top_k={K!r} must be in 1..experts={E}")
        if not isinstance(N, int) or N < 0:
            raise MoekitError(f"shared={N!r} must be a non-negative integer")
        if self.scale is not None and not self.scale > 0:
            raise MoekitError(f"scale={self.scale!r} must be positive")
        if self.noise < 0 or (self.noise and self.partition):
            raise MoekitError(f"noise={self.noise!r}: only copy-upcycling takes noise, and it must be >= 0")
        if self.kmeans_iters < 1:
            raise MoekitError(f"kmeans_iters={self.kmeans_iters!r} must be >= 1")
        if not self.partition and N:
            raise MoekitError(f"shared={N}: copy-upcycling has no shared experts (a shared full copy would "
                              "double the FFN output); use a partition method")
        if not self.partition and self.gate_init == "centroids":
            raise MoekitError("gate_init='centroids' needs a partition method (copies have no cluster centres)")
        family = self.family()
        if N and family in ("llama_moe", "mixtral"):
            raise MoekitError(f"shared={N}: the {family} layout has no shared experts; use layout deepseek or xverse")
        if family != "llama_moe" and self.gate != "linear":
            raise MoekitError(f"gate={self.gate!r}: only the llama_moe layout has an MLP gate; use gate linear "
                              f"for the {family} layout")
        if not self.partition:
            return
        if E + N > ffn_width:
            raise MoekitError(f"experts={E} + shared={N} is more than the FFN width {ffn_width}: "
                              "an expert would have no neurons")
        if (N or family != "llama_moe") and ffn_width % (E + N):
            raise MoekitError(f"experts={E} + shared={N} must divide the FFN width {ffn_width} for the {family} "
                              "layout (equal expert widths); only llama_moe without shared experts takes "
                              "uneven widths (size_experts)")
