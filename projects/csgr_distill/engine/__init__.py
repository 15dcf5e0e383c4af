from .decay import DECAY_TYPES, DistillDecay, DistillDecayHook
from .optimizer import CLIP_TYPES, add_full_model_gradient_clipping, build_optimizer
from .trainer import STUDENT_EXPORT_NAME, DistillTrainer
from .utils import unwrap_model

__all__ = [
    "CLIP_TYPES",
    "DECAY_TYPES",
    "DistillDecay",
    "DistillDecayHook",
    "DistillTrainer",
    "STUDENT_EXPORT_NAME",
    "add_full_model_gradient_clipping",
    "build_optimizer",
    "unwrap_model",
]
