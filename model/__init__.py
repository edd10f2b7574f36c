"""The decoder and its position schemes."""

from model.config import SCHEMES, ModelConfig
from model.transformer import Transformer

__all__ = ["SCHEMES", "ModelConfig", "Transformer"]
