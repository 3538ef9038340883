"""The training loop: one process or many (torchrun), pretraining, continual pretraining and SFT alike.

Each process takes every world-th row of a global batch that all processes draw identically,
optimises world_size x the global objective through its own autograd paths (balance
statistics are all-reduced, so they describe the global batch), and gradients are averaged
over processes: several processes reproduce the single-process run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from moekit.config import ConfigError
from moekit.errors import MoekitError
from moekit.models.loss import next_token_nll, perplexity, window_nll
from moekit.models.moe import MoE
from moekit.train import checkpoint
from moekit.train.build import build_model, build_streams
from moekit.train.config import TrainConfig
from moekit.train.losses import bias_update, expert_load, router_losses
from moekit.train.optim import build_optimizer, lr_at
from moekit.train.parallel import global_sum, init_distributed, parallelize, shutdown_distributed, sync_gradients


class Trainer:
    def __init__(self, cfg: TrainConfig, progress: bool | None = None):
        self.cfg = cfg
        self.d = init_distributed(cfg.parallel)
        self.rank, self.world = (self.d.rank, self.d.world) if self.d else (0, 1)
        if cfg.batch_size % (self.world * cfg.grad_accum):
            raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by processes x grad_accum "
                              f"({self.world} x {cfg.grad_accum})")
        self.show = (self.rank == 0) if progress is None else (progress and self.rank == 0)
        torch.manual_seed(cfg.seed + self.rank)
        self.device = _device(cfg.device, self.d)
        self.model = build_model(cfg.model, cfg.seed).to(self.device)
        self.moe = self.model.config.moe
        ctx = self.model.config.max_position_embeddings
        if cfg.data.seq_len > ctx and self.model.config.rope_scaling is None:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} is longer than the model's context "
                              f"(max_position_embeddings={ctx}); lower data.seq_len")
        if self.rank == 0:  # build shards once, then every process maps them
            self.mixture, self.heldout = build_streams(cfg.data, cfg.tokenizer, self.model, cfg.seed, self.show)
        self._barrier()
        if self.rank != 0:
            self.mixture, self.heldout = build_streams(cfg.data, cfg.tokenizer, self.model, cfg.seed, False)
        if cfg.activation_checkpointing:
            _checkpoint_blocks(self.model)
        if self.d:
            parallelize(self.model, self.d, cfg.parallel)
        self.model.train()
        self.opt = build_optimizer(self.model, cfg.optim)
        self.out = Path(cfg.out_dir)
        self.log_path = self.out / "log.jsonl"
        self.step = 0
        self._stop = False
        self.on_gradients = None  # optional callback(trainer) after gradients are averaged, before clipping

    # ----------------------------------------------------------------------------- helpers
    def _barrier(self) -> None:
        if self.d:
            dist.barrier()

    def _all_sum(self, x: float) -> float:
        if not self.d:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def _autocast(self):
        if self.cfg.precision != "bf16":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _local_rows(self, arr):
        return None if arr is None else torch.as_tensor(arr[self.rank::self.world]).to(self.device)

    # ----------------------------------------------------------------------------- one step
    def train_step(self) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        tokens, mask, _ = self.mixture.next_batch(cfg.batch_size)
        counted = float(mask[:, 1:].sum()) if mask is not None else float(tokens[:, 1:].size)
        x, m = self._local_rows(tokens), self._local_rows(mask)
        micro = x.shape[0] // cfg.grad_accum
        lm_sum, aux_sum, z_sum, dropped = 0.0, 0.0, 0.0, 0
        load = None
        red = (lambda t: global_sum(t, self.d))
        for i in range(cfg.grad_accum):
            rows = slice(i * micro, (i + 1) * micro)
            xs, ms = x[rows], (m[rows] if m is not None else None)
            if cfg.parallel.fsdp and hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(i == cfg.grad_accum - 1)
            with self._autocast(), self.model.record_routing() as routing:
                logits = self.model(xs[:, :-1])
            loss_sum, _ = next_token_nll(logits, xs[:, 1:], None if ms is None else ms[:, 1:])
            total = loss_sum / counted * self.world
            if self.moe is not None and routing:
                extra = router_losses(routing, self.moe, red)
                for name, v in extra.items():
                    total = total + v * self.world / cfg.grad_accum
                aux_sum += float(extra.get("aux_loss", torch.zeros(())).detach()) / cfg.grad_accum
                z_sum += float(extra.get("z_loss", torch.zeros(())).detach()) / cfg.grad_accum
                layer_load = expert_load(routing, self.moe.num_experts)
                load = layer_load if load is None else load + layer_load
                dropped += sum(r.dropped for r in routing)
            total.backward()
            lm_sum += float(loss_sum.detach())
        if self.d:
            sync_gradients(self.model, self.d, cfg.parallel)
        if self.on_gradients is not None:
            self.on_gradients(self)
        gnorm = self._clip()
        lr = lr_at(self.step, cfg.steps, cfg.optim)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if load is not None and self.d:
            dist.all_reduce(load)
        if load is not None and self.moe.bias_balance:
            self._update_bias(load)
        self.step += 1
        dt = time.perf_counter() - t0
        rec = {"step": self.step, "loss": self._all_sum(lm_sum) / counted, "lr": lr, "grad_norm": gnorm,
               "tokens": int(counted), "tokens_per_s": counted / dt, "time": dt}
        if load is not None:
            frac = load / load.sum(-1, keepdim=True)
            rec.update(aux_loss=aux_sum, z_loss=z_sum, dropped=int(self._all_sum(dropped)),
                       imbalance=(frac.max(-1).values * frac.shape[-1]).tolist(), load=frac.tolist())
        return rec

    def _clip(self) -> float:
        """Global gradient norm (DTensor shards counted once), clipped to optim.grad_clip."""
        from torch.distributed.tensor import DTensor

        sharded = torch.zeros((), dtype=torch.float64, device=self.device)
        replicated = torch.zeros((), dtype=torch.float64, device=self.device)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        for g in grads:
            if isinstance(g, DTensor):
                copies = math.prod(g.device_mesh.size(i) for i, p in enumerate(g.placements) if p.is_replicate())
                sharded += torch.linalg.vector_norm(g.to_local(), dtype=torch.float64) ** 2 / copies
            else:
                replicated += torch.linalg.vector_norm(g, dtype=torch.float64) ** 2
        if self.d:
            dist.all_reduce(sharded)
        norm = float((sharded + replicated).sqrt())
        limit = self.cfg.optim.grad_clip
        if limit > 0 and norm > limit:
            scale = limit / (norm + 1e-6)
            for g in grads:
                (g.to_local() if isinstance(g, DTensor) else g).mul_(scale)
        return norm

    @torch.no_grad()
    def _update_bias(self, load: torch.Tensor) -> None:
        moes = [mod for mod in self.model.modules() if isinstance(mod, MoE)]
        for layer_load, mod in zip(load, moes):
            mod.router.bias += bias_update(layer_load, self.moe.bias_update_rate)

    # ----------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss and perplexity, overall and per source."""
        self.model.eval()
        out, total_sum, total_n = {}, 0.0, 0.0
        n_rows = self.cfg.eval_batches * self.cfg.batch_size
        for name, stream in self.heldout.items():
            s, n = 0.0, 0.0
            for i in range(self.rank, min(n_rows, stream.windows), self.world):
                toks, mask = stream.window(i)
                x = torch.as_tensor(toks)[None].to(self.device)
                mk = None if mask is None else torch.as_tensor(mask)[None].to(self.device)
                with self._autocast():
                    ls, cnt = window_nll(self.model, x, mk)
                s, n = s + float(ls), n + float(cnt)
            s, n = self._all_sum(s), self._all_sum(n)
            if n:
                out[f"eval_loss/{name}"] = s / n
                total_sum, total_n = total_sum + s, total_n + n
        self.model.train()
        if total_n:
            out["eval_loss"] = total_sum / total_n
            out["eval_ppl"] = perplexity(total_sum, total_n)
            self.mixture.update_weights({k.split("/", 1)[1]: v for k, v in out.items() if k.startswith("eval_loss/")})
        return out

    def unigram_baseline(self) -> dict:
        """Held-out loss of a unigram model fitted on the training tokens (add-one smoothing): the bar to beat."""
        import numpy as np

        V = self.model.config.vocab_size
        counts = np.ones(V, dtype=np.float64)
        for stream in self.mixture.streams:
            counts += np.bincount(np.asarray(stream.tokens), minlength=V)[:V]
        logp = np.log(counts / counts.sum())
        out = {}
        for name, stream in self.heldout.items():
            toks = np.asarray(stream.tokens[1:])
            out[f"unigram_loss/{name}"] = float(-logp[toks].mean())
        return out

    # ----------------------------------------------------------------------------- the run
    def _log(self, rec: dict) -> None:
        if self.rank == 0:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def _save(self) -> None:
        checkpoint.save(self.out / "checkpoints", self.step, self.model, self.opt,
                        {"mixture": self.mixture.state_dict()}, self.cfg.keep_checkpoints)

    def _resume(self) -> None:
        last = _resumable(self.out)
        state = checkpoint.load(last, self.model, self.opt)
        self.mixture.load_state_dict(state["mixture"])
        self.step = state["step"]
        if self.rank == 0 and self.log_path.exists():  # drop log lines of steps done after that checkpoint
            kept = [ln for ln in self.log_path.read_text(errors="replace").splitlines()
                    if _step(ln) is not None and _step(ln) <= self.step]  # and a line a kill cut short
            tmp = self.log_path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            tmp.replace(self.log_path)

    def fit(self, resume: bool = False) -> dict:
        """Train to ``cfg.steps``; returns the last log record (with the last evaluation).

        The run holds ``out_dir/train.lock`` throughout: a second training on the same out_dir is
        refused, naming the holder. ``resume`` with no checkpoint to resume from is an error.
        """
        if resume:
            _resumable(self.out)
        lock = refused = None
        if self.rank == 0:  # rank 0 speaks for the whole torchrun job: its ranks share out_dir
            try:
                lock = _lock(self.out)
            except MoekitError as e:
                refused = e
        if self._all_sum(float(refused is not None)):  # every rank stops, not only rank 0
            raise refused or MoekitError(f"out_dir {self.out} is in use by another training (see rank 0)")
        try:
            return self._fit(resume)
        finally:
            if lock is not None:
                lock.truncate(0)
                lock.close()  # releases the flock

    def _fit(self, resume: bool) -> dict:
        cfg = self.cfg
        if self.rank == 0:
            if not resume and self.log_path.exists():
                self.log_path.unlink()
        self._barrier()
        if resume:
            self._resume()
        if self.step == 0 and self.heldout:
            baseline = self.unigram_baseline()
            self._log({"step": 0, **baseline})
            if self.show:
                tqdm.write("unigram baseline (held-out): " + ", ".join(f"{k.split('/')[1]} {v:.3f}"
                                                                        for k, v in baseline.items()))
        previous = signal.signal(signal.SIGTERM, lambda *a: setattr(self, "_stop", True))
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not self.show)
        last: dict = {}
        try:
            while self.step < cfg.steps:
                rec = self.train_step()
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    rec.update(self.evaluate())
                    if self.show:
                        bar.write(f"step {self.step}: eval loss {rec.get('eval_loss', float('nan')):.4f} "
                                  f"ppl {rec.get('eval_ppl', float('nan')):.2f}")
                self._log(rec)
                last = rec
                bar.update(1)
                if self.step % cfg.log_every == 0:
                    post = {"loss": f"{rec['loss']:.3f}", "lr": f"{rec['lr']:.2e}",
                            "tok/s": f"{rec['tokens_per_s']:.0f}"}
                    if "imbalance" in rec:
                        post["imb"] = f"{sum(rec['imbalance']) / len(rec['imbalance']):.2f}"
                    bar.set_postfix(post)
                stop = self._stop or (self.d is not None and self._all_sum(float(self._stop)) > 0)
                if stop or self.step == cfg.steps or (cfg.save_every and self.step % cfg.save_every == 0):
                    self._save()
                if stop:
                    break
        finally:
            bar.close()
            signal.signal(signal.SIGTERM, previous)
        if self.step == cfg.steps and cfg.export:
            self.export()
        return last

    def export(self) -> Path | None:
        """Write the trained model in its family's Hugging Face layout with the tokenizer files."""
        from moekit.train.export import export_model

        return export_model(self.model, self.d, self.cfg, self.out / "model")


def _step(line: str) -> int | None:
    """The step of a log.jsonl line; None for a line that is not a JSON record."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec.get("step", 0) if isinstance(rec, dict) else None


def _resumable(out: Path) -> Path:
    """The checkpoint a resumed run starts from; none is an error (as transformers' Trainer does), not step 0."""
    last = checkpoint.latest(out / "checkpoints")
    if last is None:
        raise MoekitError(f"--resume: no checkpoint under {out / 'checkpoints'} to resume from; "
                          f"leave out --resume to start from step 0")
    return last


def _lock(out: Path):
    """Hold ``out/train.lock`` (flock, released by the kernel however the process ends), or raise naming
    the run that holds it. Only rank 0 takes it: every rank of one torchrun job shares out_dir."""
    import fcntl

    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / "train.lock", "a+")
    except OSError as e:
        raise MoekitError(f"out_dir {out}: cannot be written ({e.strerror or e})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise MoekitError(f"out_dir {out} is in use by another training ({holder}; {out / 'train.lock'}); "
                          f"wait for it to finish or choose another out_dir") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC\n")
    f.flush()
    return f


def _device(name: str, d) -> torch.device:
    """The training device: the process's own GPU under torchrun, else cuda/cpu as asked."""
    if d is not None:
        if name == "cpu" and d.device.type != "cpu":
            raise ConfigError("device=cpu with a GPU process group: run torchrun on a machine without GPUs")
        return d.device
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no GPU")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def _checkpoint_blocks(model) -> None:
    """Recompute each decoder block during the backward pass instead of keeping its activations."""
    from torch.utils.checkpoint import checkpoint as ckpt

    for block in model.layers:
        forward = block.forward
        block.forward = lambda *a, _f=forward, **k: ckpt(_f, *a, use_reentrant=False, **k)


def train(cfg: TrainConfig | str | Path, resume: bool = False, overrides: dict | None = None) -> dict:
    """Run a training job from a TrainConfig or a YAML file; returns the last log record."""
    from moekit.train.config import load_config

    if not isinstance(cfg, TrainConfig):
        cfg = load_config(cfg, overrides)
    if resume:
        _resumable(Path(cfg.out_dir))  # before the model and data are built
    try:
        return Trainer(cfg).fit(resume=resume)
    finally:
        shutdown_distributed()
