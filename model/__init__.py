"""The decoder and its position schemes."""

from model.config import ModelConfig
from model.schemes import SCHEMES
from model.transformer import Transformer

__all__ = ["SCHEMES", "ModelConfig", "Transformer"]
