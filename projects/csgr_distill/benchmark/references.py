"""Straightforward implementations of each distiller's loss, the yardstick of ``kernels``.

Each one is the method's formula written the plain way (per branch, per level, CCNet-style
criss-cross with a per-call ``-inf`` diagonal), sharing the distiller's parameters so that both
compute the same numbers. Standardisation is the project's one ``channel_standardize`` (it is not
what the kernels compare). Register one per distiller name in ``REFERENCE_LOSSES``.
"""
from typing import Callable, Dict

import torch
from torch import Tensor
from torch.nn import functional as F

from ..layers.adapters import channel_standardize
from ..layers.reference import naive_criss_cross_pass


def straightforward_csgr(distiller, student: Dict[str, Tensor], teacher: Dict[str, Tensor]):
    """CSGR.md written plainly: teacher and student branches separately, einsum pooling, the
    naive criss-cross applied to each branch, ``sum / N`` reductions."""
    losses = {}
    for level in distiller.in_features:
        mod = distiller.levels[level]
        s_hat = channel_standardize(mod.adapter(student[level]))
        t_hat = channel_standardize(teacher[level].detach())
        n = s_hat.shape[0]
        vectors = []
        for x in (s_hat, t_hat):
            logits = mod.classifier(x).flatten(2)  # [N, K, HW]
            att = F.softmax(logits, dim=2)
            vectors.append(torch.einsum("nkp,ncp->nkc", att, x.flatten(2)))
        l_cs = ((vectors[1] - vectors[0]) ** 2).sum() / n
        outs = []
        for x in (s_hat, t_hat):
            for _ in range(mod.cca.recurrence):
                x = naive_criss_cross_pass(mod.cca, x)
            outs.append(x)
        l_gr = ((outs[1] - outs[0]) ** 2).sum() / n
        losses[f"loss_csgr_cs_{level}"] = distiller.alpha * l_cs
        losses[f"loss_csgr_gr_{level}"] = distiller.beta * l_gr
    return losses


#: distiller name -> fn(distiller, student_features, teacher_features) -> losses
REFERENCE_LOSSES: Dict[str, Callable] = {"CSGR": straightforward_csgr}
