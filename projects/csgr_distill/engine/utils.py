"""Small helpers shared by the trainer and its hooks."""
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model itself when ``model`` is wrapped in ``DistributedDataParallel``, else ``model``."""
    return model.module if isinstance(model, DistributedDataParallel) else model
