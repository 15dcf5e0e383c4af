"""Turn a distillation checkpoint into a plain detectron2 student checkpoint."""
import os
from typing import Dict

import torch
from detectron2.utils.file_io import PathManager

#: state_dict prefixes that exist only for distillation (distiller adapters, classifiers, ...).
DISTILL_ONLY_PREFIXES = ("distillers.",)


def student_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The keys a plain detectron2 model of the student's base class has."""
    return {k: v for k, v in state_dict.items() if not k.startswith(DISTILL_ONLY_PREFIXES)}


def export_student(checkpoint: str, output: str) -> Dict[str, int]:
    """Write ``{"model": student weights}`` (no optimizer, scheduler, iteration, distillers).

    Returns counts of kept and dropped keys.
    """
    if not PathManager.exists(checkpoint):
        raise FileNotFoundError(f"Checkpoint {checkpoint!r} does not exist (expected e.g. "
                                "output/<run>/model_final.pth)")
    with PathManager.open(checkpoint, "rb") as f:
        loaded = torch.load(f, map_location="cpu", weights_only=False)
    model = loaded.get("model", loaded)
    kept = student_state_dict(model)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with PathManager.open(output, "wb") as f:
        torch.save({"model": kept, "__author__": "csgr_distill.export_student"}, f)
    return {"kept": len(kept), "dropped": len(model) - len(kept)}
