"""Run by tests/test_train_distributed.py under torchrun: train each run of a JSON list, record losses and gradients.

Usage: torchrun --nproc_per_node N tests/dist_worker.py RUNS.json RESULT.pt
RUNS.json is a list of TrainConfig dicts (+ optional "resume": true). Rank 0 writes, for each run,
{"losses": [...], "grad_norms": [...], "grads": [{name: full gradient}, ...]} to RESULT.pt.
"""

import json
import sys

import torch
import torch.distributed as dist

from moekit.train.parallel import shutdown_distributed


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def record_gradients(store):
    def hook(trainer):
        grads = {}
        for name, p in trainer.model.named_parameters():
            if p.grad is not None:
                grads[name] = full(p.grad).detach().clone()  # collective for DTensors: every rank calls it
        store.append(grads)
    return hook


def run_one(run: dict) -> dict:
    """Train one run (resuming from its out_dir's last checkpoint if "resume"); losses, norms, gradients."""
    from moekit.train import TrainConfig
    from moekit.train.trainer import Trainer

    run = dict(run)
    resume = run.pop("resume", False)
    trainer = Trainer(TrainConfig(**run), progress=False)
    if resume:
        trainer._resume()
    grads: list = []
    trainer.on_gradients = record_gradients(grads)
    losses, norms = [], []
    while trainer.step < trainer.cfg.steps:  # fit() without evaluation and logging, one step at a time
        rec = trainer.train_step()
        losses.append(rec["loss"])
        norms.append(rec["grad_norm"])
        if trainer.cfg.save_every and trainer.step % trainer.cfg.save_every == 0:
            trainer._save()
    return {"losses": losses, "grad_norms": norms, "grads": grads}


def main(runs_file: str, result_file: str) -> None:
    results = []
    for run in json.loads(open(runs_file).read()):
        results.append(run_one(run))
        dist.barrier()
    if dist.get_rank() == 0:
        torch.save(results, result_file)
    del results
    shutdown_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:3])
