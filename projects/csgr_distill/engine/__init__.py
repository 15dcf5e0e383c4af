from .decay import DECAY_TYPES, DistillDecay, DistillDecayHook
from .trainer import DistillTrainer, unwrap_model

__all__ = ["DECAY_TYPES", "DistillDecay", "DistillDecayHook", "DistillTrainer", "unwrap_model"]
