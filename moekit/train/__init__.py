"""Training: data shards and mixtures, balance losses, the trainer, checkpoints, torch.distributed."""

from moekit.train.config import DataSpec, ModelSpec, TrainConfig, load_config
from moekit.train.data import Source
from moekit.train.optim import OptimConfig
from moekit.train.parallel import ParallelConfig
from moekit.train.trainer import Trainer, train

__all__ = ["DataSpec", "ModelSpec", "OptimConfig", "ParallelConfig", "Source", "TrainConfig", "Trainer",
           "load_config", "train"]
