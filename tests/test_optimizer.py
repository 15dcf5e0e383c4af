"""SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model" (one norm over all gradients) next to detectron2's
per-parameter "norm" and "value", on a hand case whose gradients are known."""
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.solver import build_optimizer as build_detectron2_optimizer
from torch import nn

from csgr_distill.config import add_distill_config
from csgr_distill.engine import CLIP_TYPES, DistillTrainer, build_optimizer
from tiny import REPO

# gradients: a = (3, 4) (norm 5), b = (12,) (norm 12); all together: sqrt(9 + 16 + 144) = 13
GRAD_A, GRAD_B = torch.tensor([3.0, 4.0]), torch.tensor([12.0])


class TwoParams(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(2))
        self.b = nn.Parameter(torch.zeros(1))


def _cfg(clip_type, clip_value, norm_type=2.0):
    cfg = add_distill_config(get_cfg())
    # plain SGD: lr 1, no momentum, no weight decay -> after one step, param = -(clipped grad)
    cfg.SOLVER.BASE_LR = 1.0
    cfg.SOLVER.MOMENTUM = 0.0
    cfg.SOLVER.WEIGHT_DECAY = 0.0
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = clip_type
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = clip_value
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = norm_type
    return cfg


def _step(cfg, build=build_optimizer):
    """One step from zero parameters with the known gradients; returns the applied gradients."""
    model = TwoParams()
    optimizer = build(cfg, model)
    model.a.grad, model.b.grad = GRAD_A.clone(), GRAD_B.clone()
    optimizer.step()
    return -model.a.detach(), -model.b.detach(), optimizer


def test_full_model_scales_every_gradient_by_max_norm_over_total_norm():
    a, b, optimizer = _step(_cfg("full_model", 6.5))
    scale = 6.5 / 13.0
    torch.testing.assert_close(a, GRAD_A * scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(b, GRAD_B * scale, rtol=1e-6, atol=0)
    assert torch.cat([a, b]).norm().item() == pytest.approx(6.5)
    assert isinstance(optimizer, torch.optim.SGD)


def test_full_model_differs_from_detectron2_per_parameter_norm():
    a_full, b_full, _ = _step(_cfg("full_model", 6.5))
    a_norm, b_norm, _ = _step(_cfg("norm", 6.5))
    # per parameter: a (norm 5) is under 6.5 and untouched, b (norm 12) alone is cut to 6.5
    torch.testing.assert_close(a_norm, GRAD_A)
    torch.testing.assert_close(b_norm, torch.tensor([6.5]))
    assert not torch.allclose(a_full, a_norm) and not torch.allclose(b_full, b_norm)


def test_full_model_under_the_max_leaves_gradients_alone_and_uses_norm_type():
    a, b, _ = _step(_cfg("full_model", 13.5))
    torch.testing.assert_close(a, GRAD_A)
    torch.testing.assert_close(b, GRAD_B)
    # NORM_TYPE 1: total |3| + |4| + |12| = 19
    a, b, _ = _step(_cfg("full_model", 9.5, norm_type=1.0))
    torch.testing.assert_close(torch.cat([a, b]), torch.cat([GRAD_A, GRAD_B]) * 0.5)


@pytest.mark.parametrize("clip_type, value", [("norm", 6.5), ("value", 3.5)])
def test_norm_and_value_are_detectron2s(clip_type, value):
    ours = _step(_cfg(clip_type, value))
    theirs = _step(_cfg(clip_type, value), build=build_detectron2_optimizer)
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1])
    assert not torch.equal(torch.cat(ours[:2]), torch.cat([GRAD_A, GRAD_B]))  # it did clip
    assert type(ours[2]).__name__ == type(theirs[2]).__name__ == "SGDWithGradientClip"


def test_unknown_clip_type_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be one of") as e:
        build_optimizer(_cfg("global", 1.0), TwoParams())
    for name in CLIP_TYPES:
        assert repr(name) in str(e.value)
    with pytest.raises(ValueError, match="CLIP_VALUE must be > 0"):
        build_optimizer(_cfg("full_model", 0.0), TwoParams())


def test_clipped_optimizer_state_round_trips():
    _, _, optimizer = _step(_cfg("full_model", 6.5))
    fresh = build_optimizer(_cfg("full_model", 6.5), TwoParams())
    fresh.load_state_dict(optimizer.state_dict())
    assert fresh.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]


def test_trainer_and_soda10m_protocol_use_full_model_clipping():
    cfg = add_distill_config(get_cfg())
    cfg.merge_from_file(os.path.join(REPO, "configs/Base-SODA10M.yaml"))
    clip = cfg.SOLVER.CLIP_GRADIENTS
    assert (clip.ENABLED, clip.CLIP_TYPE, clip.CLIP_VALUE, clip.NORM_TYPE) == (
        True, "full_model", 35.0, 2.0)
    optimizer = DistillTrainer.build_optimizer(cfg, TwoParams())
    assert type(optimizer).__name__ == "SGDWithFullModelGradientClip"


def test_deformable_detr_recipe_scales_the_linear_projections_lr():
    """Official Deformable DETR: lr 2e-4, backbone x 0.1, and x 0.1 (lr_linear_proj_mult) for the
    sampling-offset and reference-point projections; every other parameter at the base lr. The
    old optimizer gave those projections the base lr."""
    from csgr_distill.cli import load_config
    from detectron2.modeling import build_model

    cfg = load_config(os.path.join(REPO, "configs/detr/DeformableDETR-R50.yaml"),
                      ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.DETR.ENC_LAYERS", "1",
                       "MODEL.DETR.DEC_LAYERS", "2", "MODEL.RESNETS.DEPTH", "18",
                       "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.DETR.DIM_FEEDFORWARD",
                       "32"], check_steps=False)
    assert cfg.SOLVER.LINEAR_PROJ_MULTIPLIER == 0.1 and cfg.SOLVER.BACKBONE_MULTIPLIER == 0.1
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    base = cfg.SOLVER.BASE_LR
    seen = {"backbone": 0, "linear_proj": 0, "other": 0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            kind, factor = "backbone", 0.1
        elif "sampling_offsets" in name or "reference_points" in name:
            kind, factor = "linear_proj", 0.1
        else:
            kind, factor = "other", 1.0
        seen[kind] += 1
        assert lr_of[id(p)] == pytest.approx(base * factor), name
    assert all(seen.values()), seen
