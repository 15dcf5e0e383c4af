"""Records per detector family: cross-family pairs both ways, per-role fields, one grid for
teacher and student, teacher preprocessing (channel order, pixel mean/std), branch-level
teacher work, numerical robustness, and a 2-process DDP step."""
import logging
import os

import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling import BACKBONE_REGISTRY, build_model
from detectron2.modeling.backbone.fpn import build_retinanet_resnet_fpn_backbone
from detectron2.utils.events import EventStorage
from torch import nn

from csgr_distill.layers import channel_standardize
from csgr_distill.records import DenseRecorder, RCNNRecorder, recorder_for
from tiny import base_cfg, fake_batch, rcnn_base_cfg, write_model


def _distill(cfg, teacher_yaml, teacher_weights, methods=("CSGR",)):
    cfg.MODEL.META_ARCHITECTURE = "Distill" + cfg.MODEL.META_ARCHITECTURE
    cfg.MODEL.DISTILL.ENABLED = True
    cfg.MODEL.DISTILL.METHODS = list(methods)
    cfg.MODEL.DISTILL.TEACHER.CONFIG = teacher_yaml
    cfg.MODEL.DISTILL.TEACHER.WEIGHTS = teacher_weights
    return cfg


def _step(model, batch):
    model.train()
    with EventStorage(0):
        return model(batch)


def test_recorder_is_chosen_by_model_type_for_both_roles(tmp_path):
    assert isinstance(recorder_for(build_model(base_cfg(tmp_path))), DenseRecorder)
    assert isinstance(recorder_for(build_model(rcnn_base_cfg(tmp_path))), RCNNRecorder)
    with pytest.raises(ValueError, match="No recorder for the detector Linear"):
        recorder_for(nn.Linear)


def test_retinanet_student_with_faster_rcnn_teacher(tmp_path, caplog):
    """Old code: built, loaded the teacher, then AttributeError 'head_in_features' at step 1."""
    tyaml, tw, _ = write_model(tmp_path, rcnn_base_cfg(tmp_path / "t", fpn_channels=32), "t")
    cfg = _distill(base_cfg(tmp_path / "s"), tyaml, tw)
    cfg.MODEL.DISTILL.CSGR.IN_FEATURES = ["p3", "p4", "p5", "p6"]  # the levels both have
    with caplog.at_level(logging.WARNING):
        model = build_model(cfg)
    # R-CNN's p6 is a max-pool of p5, RetinaNet's a conv on res5: said at build time
    assert any("p6" in r.getMessage() and "LastLevelMaxPool" in r.getMessage()
               and "LastLevelP6P7" in r.getMessage() for r in caplog.records)
    model.attach_teacher()
    losses = _step(model, fake_batch(2))
    for lv in ("p3", "p4", "p5", "p6"):
        assert torch.isfinite(losses[f"loss_csgr_gr_{lv}"]) and losses[f"loss_csgr_gr_{lv}"] > 0
    with pytest.raises(ValueError, match="p7.*teacher"):
        cfg.MODEL.DISTILL.CSGR.IN_FEATURES = ["p3", "p7"]
        build_model(cfg)


def test_faster_rcnn_student_with_retinanet_teacher_head_attention(tmp_path):
    """Old code: refused ('cannot provide cls_logits'), though only the teacher's logits are
    read and a RetinaNet teacher has them."""
    tyaml, tw, teacher = write_model(tmp_path, base_cfg(tmp_path / "t", fpn_channels=32), "t")
    cfg = _distill(rcnn_base_cfg(tmp_path / "s"), tyaml, tw)
    cfg.MODEL.DISTILL.CSGR.IN_FEATURES = ["p3", "p4", "p5", "p6"]
    cfg.MODEL.DISTILL.CSGR.ATTENTION = "teacher_head"
    model = build_model(cfg)
    assert model.distill_fields == {"student": ("features",),
                                    "teacher": ("cls_logits", "features")}
    model.attach_teacher()
    losses = _step(model, fake_batch(2))
    assert {"loss_rpn_cls", "loss_cls"} <= set(losses)
    assert all(torch.isfinite(losses[f"loss_csgr_cs_{lv}"]) for lv in ("p3", "p6"))


def test_a_field_the_role_cannot_record_fails_at_build_time(tmp_path):
    """The check asks each role's recorder: teacher_head needs logits an R-CNN teacher lacks."""
    tyaml, tw, _ = write_model(tmp_path, rcnn_base_cfg(tmp_path / "t", fpn_channels=32), "t")
    cfg = _distill(base_cfg(tmp_path / "s"), tyaml, tw)
    cfg.MODEL.DISTILL.CSGR.IN_FEATURES = ["p3", "p4"]
    cfg.MODEL.DISTILL.CSGR.ATTENTION = "teacher_head"
    with pytest.raises(ValueError, match=r"\['cls_logits'\] from the teacher, a rcnn detector"):
        build_model(cfg)


@BACKBONE_REGISTRY.register()
def build_retinanet_fpn_backbone_div64(cfg, input_shape):
    """A RetinaNet FPN that pads batches to multiples of 64 (as some backbones do)."""
    backbone = build_retinanet_resnet_fpn_backbone(cfg, input_shape)
    backbone._size_divisibility = 64
    return backbone


@pytest.mark.parametrize("size", [64, 96, 160])
def test_teacher_with_another_size_divisibility_sees_the_students_grid(tmp_path, size):
    """Old code: 96 and 160 px crashed at the loss (grids 12 vs 16, 20 vs 24 at p3)."""
    tcfg = base_cfg(tmp_path / "t", fpn_channels=32)
    tcfg.MODEL.BACKBONE.NAME = "build_retinanet_fpn_backbone_div64"
    tyaml, tw, _ = write_model(tmp_path, tcfg, "t")
    model = build_model(_distill(base_cfg(tmp_path / "s"), tyaml, tw))
    assert model._grid_multiple == 64
    model.attach_teacher()
    batch = fake_batch(2, size=size)
    seen = {}
    def keep(role):
        def hook(_m, _i, out):
            seen[role] = tuple(out["p3"].shape)
        return hook

    model.backbone.register_forward_hook(keep("s"))
    model.teacher.model.backbone.register_forward_hook(keep("t"))
    losses = _step(model, batch)
    assert seen["s"][-2:] == seen["t"][-2:] == (-(-size // 64) * 8,) * 2
    assert torch.isfinite(losses["loss_csgr_gr_p3"])
    # inference keeps the student's own padding
    model.eval()
    assert model.preprocess_image(batch).tensor.shape[-1] == -(-size // 32) * 32


def test_teacher_gets_its_own_channel_order_and_pixel_statistics(tmp_path):
    """RGB teacher with other pixel mean/std under a BGR student: the teacher's record equals
    its backbone on the flipped, teacher-normalised image."""
    tcfg = base_cfg(tmp_path / "t", fpn_channels=32)
    tcfg.INPUT.FORMAT = "RGB"
    tcfg.MODEL.PIXEL_MEAN = [120.0, 110.0, 100.0]
    tcfg.MODEL.PIXEL_STD = [50.0, 60.0, 70.0]
    tyaml, tw, _ = write_model(tmp_path, tcfg, "t")
    model = build_model(_distill(base_cfg(tmp_path / "s"), tyaml, tw))
    teacher = model.attach_teacher().model
    batch = fake_batch(1)
    with torch.no_grad():
        record = model.run_teacher(batch, fields=("features",))
        rgb = batch[0]["image"].flip(0)
        mean = torch.tensor([120.0, 110.0, 100.0]).view(3, 1, 1)
        std = torch.tensor([50.0, 60.0, 70.0]).view(3, 1, 1)
        expected = teacher.backbone(((rgb - mean) / std)[None])
    for lv in ("p3", "p7"):
        assert torch.allclose(record.features[lv], expected[lv], atol=1e-6)
    wrong = teacher.backbone(((batch[0]["image"] - mean) / std)[None])
    assert not torch.allclose(record.features["p3"], wrong["p3"], atol=1e-3)


def test_teacher_head_logits_come_from_the_real_head_without_the_box_branch(tmp_path):
    tyaml, tw, _ = write_model(tmp_path, base_cfg(tmp_path / "t", fpn_channels=32), "t")
    cfg = _distill(base_cfg(tmp_path / "s"), tyaml, tw)
    cfg.MODEL.DISTILL.CSGR.ATTENTION = "teacher_head"
    model = build_model(cfg)
    teacher = model.attach_teacher().model
    calls = {"cls": 0, "box": 0}

    def count(branch):
        def hook(*_):
            calls[branch] += 1
        return hook

    teacher.head.cls_subnet.register_forward_hook(count("cls"))
    teacher.head.bbox_subnet.register_forward_hook(count("box"))
    batch = fake_batch(2)
    with torch.no_grad():
        record = model.run_teacher(batch)
        images = teacher.preprocess_image(batch)
        feats = teacher.backbone(images.tensor)
    assert calls == {"cls": 5, "box": 0}  # class branch on p3..p7, box branch never
    with torch.no_grad():
        logits, _ = teacher.head([feats[f] for f in teacher.head_in_features])
    for i, lv in enumerate(teacher.head_in_features):
        assert torch.equal(record.level_logits(lv), logits[i])
    assert "box_deltas" not in record
    with pytest.raises(AttributeError, match="required_outputs"):
        record.box_deltas


def test_channel_standardize_is_finite_at_one_position_and_for_constant_channels():
    """Old code: unbiased std over a single value is NaN (batch 1 at p7 of a 64 px image)."""
    x = torch.randn(1, 4, 1, 1, requires_grad=True)
    y = channel_standardize(x)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    c = torch.randn(2, 3, 4, 4)
    c[:, 1] = 2.5  # a constant channel
    c.requires_grad_(True)
    y = channel_standardize(c)
    (y ** 2).sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(c.grad).all()
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1]))
    # the regular case is unchanged: unbiased std over (n, h, w)
    r = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    expected = (r - r.mean((0, 2, 3), keepdim=True)) / (r.std((0, 2, 3), keepdim=True) + 1e-6)
    assert torch.allclose(channel_standardize(r), expected)


def test_batch_one_training_step_has_finite_losses_at_p7(tmp_path):
    tyaml, tw, _ = write_model(tmp_path, base_cfg(tmp_path / "t", fpn_channels=32), "t")
    cfg = _distill(base_cfg(tmp_path / "s"), tyaml, tw)
    cfg.MODEL.RETINANET.NORM = ""  # as the SODA10M configs: a BN head cannot train on one value
    model = build_model(cfg)
    model.attach_teacher()
    losses = _step(model, fake_batch(1))  # 64 px: p7 is 1x1
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_non_finite_distillation_loss_names_the_loss_and_its_weight_key(tmp_path, caplog):
    tyaml, tw, _ = write_model(tmp_path, base_cfg(tmp_path / "t", fpn_channels=32), "t")
    cfg = _distill(base_cfg(tmp_path / "s"), tyaml, tw)
    cfg.MODEL.DISTILL.CSGR.ALPHA = 1e30
    model = build_model(cfg)
    model.attach_teacher()
    with caplog.at_level(logging.WARNING):
        _step(model, fake_batch(2))  # finite but absurd: a warning naming the key
    assert any("MODEL.DISTILL.CSGR.ALPHA = 1e+30" in r.getMessage() for r in caplog.records)
    model.distillers["CSGR"].beta = float("inf")
    with pytest.raises(FloatingPointError, match=r"loss_csgr_gr_p3 = inf .*MODEL\.DISTILL\.CSGR\.BETA"):
        _step(model, fake_batch(2))


def test_class_names_of_teacher_and_student_are_compared(tmp_path, tiny_shapes):
    """Old code compared the class count only: same count, other names went through."""
    from detectron2.data import DatasetCatalog

    from csgr_distill.data import SHAPES_CLASSES

    name, renamed = "renamed_classes_train", [f"other_{c}" for c in SHAPES_CLASSES]
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(thing_classes=renamed)
    tcfg = base_cfg(tmp_path / "t", fpn_channels=32)
    tcfg.DATASETS.TRAIN = (name,)
    tyaml, tw, _ = write_model(tmp_path, tcfg, "t")
    with pytest.raises(ValueError, match="class names") as e:
        build_model(_distill(base_cfg(tmp_path / "s"), tyaml, tw))
    assert str(list(SHAPES_CLASSES)) in str(e.value) and str(renamed) in str(e.value)


# ---- DDP: two processes, gloo, CPU ----------------------------------------------------------
def _ddp_worker(rank, world, init_file, cfg_dump, result_dir):
    import torch.distributed as dist
    from detectron2.config import CfgNode
    from torch.nn.parallel import DistributedDataParallel

    import csgr_distill  # noqa: F401

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    cfg = CfgNode.load_cfg(cfg_dump)
    model = build_model(cfg)
    model.attach_teacher()
    model.train()
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    for step, factor in enumerate((1.0, 0.0)):  # a zero factor still uses every parameter
        model.distill_factor = factor
        with EventStorage(step):
            losses = ddp(fake_batch(2, seed=10 * rank + step))
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("distillers.")},
               os.path.join(result_dir, f"rank{rank}.pth"))
    dist.destroy_process_group()


def test_two_process_ddp_step_keeps_distillers_in_sync(tmp_path):
    import torch.multiprocessing as mp

    tyaml, tw, _ = write_model(tmp_path, base_cfg(tmp_path / "t", fpn_channels=32), "t")
    cfg = _distill(base_cfg(tmp_path / "s"), tyaml, tw)
    cfg.MODEL.RESNETS.NORM = "FrozenBN"  # BN statistics differ per rank; weights must not
    cfg.MODEL.RETINANET.NORM = ""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), cfg.dump(), str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pth") for r in (0, 1))
    fresh = {k: v for k, v in build_model(cfg).state_dict().items() if k.startswith("distillers.")}
    assert a and set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), "DDP must average the distillers' gradients"
    assert any(not torch.equal(a[k], fresh[k]) for k in a if a[k].is_floating_point())


# ---- per-method decay: a decaying method and a constant one combine -------------------------
class _ConstProbe(nn.Module):
    """A test distiller (not registered: the benchmarks cover every registered one): one loss
    equal to its parameter (1.0), whatever the inputs."""

    required_outputs = ("features",)

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, student, teacher, gt_instances):
        return {"loss_probe": self.w * 1.0}


def test_each_method_gets_its_own_decay_factor(tmp_path):
    from types import SimpleNamespace

    from csgr_distill.engine.decay import DistillDecayHook, method_schedules

    tyaml, tw, _ = write_model(tmp_path, base_cfg(tmp_path / "t", fpn_channels=32), "t")
    cfg = _distill(base_cfg(tmp_path / "s"), tyaml, tw)
    cfg.SOLVER.MAX_ITER = 10
    cfg.MODEL.DISTILL.DECAY.TYPE = "none"             # the default: constant
    cfg.MODEL.DISTILL.CSGR.DECAY.TYPE = "linear"      # CSGR carries its own: 1 - it / 10
    assert set(method_schedules(cfg)) == {"CSGR"}
    model = build_model(cfg)
    model.distillers["ConstProbe"] = _ConstProbe()  # a second method, on the default schedule
    model.attach_teacher()
    hook = DistillDecayHook.from_config(cfg)
    with EventStorage(4) as storage:
        hook.trainer = SimpleNamespace(model=model, iter=4, storage=storage)
        hook.before_step()
        assert model.distill_factor == 1.0 and model.distill_factors == {"CSGR": pytest.approx(0.6)}
        assert storage.latest()["distill/factor_CSGR"][0] == pytest.approx(0.6)
        torch.manual_seed(0)
        decayed = model.train()(fake_batch(2))
        model.distill_factors = {}
        torch.manual_seed(0)
        full = model(fake_batch(2))
    assert decayed["loss_probe"].item() == full["loss_probe"].item() == 1.0
    for k in ("loss_csgr_cs_p3", "loss_csgr_gr_p5"):
        assert decayed[k].item() == pytest.approx(0.6 * full[k].item(), rel=1e-5)
    cfg.MODEL.DISTILL.CSGR.DECAY.TYPE = "linaer"
    with pytest.raises(ValueError, match=r"MODEL\.DISTILL\.CSGR\.DECAY\.TYPE"):
        method_schedules(cfg)
