"""moekit: Mixture-of-Experts language models, one decoder for every family."""

from moekit.config import ConfigError, ModelConfig, MoEConfig, RopeScaling, count_params
from moekit.errors import MoekitError
from moekit.models import MoEDecoder
from moekit.presets import PRESETS, preset
from moekit.weights import CheckpointError, load, save
from moekit.tokenizer import Tokenizer
from moekit.engine import CausalLM, Engine, SamplingParams
from moekit.assets import default_model_path

__version__ = "0.1.0"
__all__ = ["PRESETS", "CausalLM", "CheckpointError", "ConfigError", "Engine", "ModelConfig", "MoEConfig", "MoEDecoder",
           "MoekitError", "RopeScaling", "SamplingParams", "Tokenizer", "count_params", "default_model_path", "load",
           "preset", "save"]
