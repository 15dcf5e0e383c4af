"""DistillDetr / DistillDeformableDetr: the DETR records (backbone levels, every decoder layer's
predictions and queries, the matcher's assignment), CSGR and the feature baselines on the levels
the transformer reads, 2-iteration runs through tools/train_net.py with --eval-only (teacher
never built) and the exported student."""
import json
import os
import sys

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from csgr_distill.cli import load_config
from csgr_distill.detr_port.detr import detr_targets
from tiny import REPO, fake_batch, logged_keys, train_opts, write_model

VARIANTS = {"DETR": ["res5"], "DeformableDETR": ["res3", "res4", "res5"]}
SMALL = ["INPUT.FIXED_SIZE", "64", "MODEL.DETR.HIDDEN_DIM", "64",
         "MODEL.DETR.DIM_FEEDFORWARD", "64", "MODEL.DETR.NUM_QUERIES", "10"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("detr_teachers")
    return {v: write_model(tmp, load_config(os.path.join(
        REPO, f"configs/demo/teacher-{v}-R18-wide.yaml"), SMALL, check_steps=False), v)[:2]
        for v in VARIANTS}


def _student(variant, teacher, methods=("CSGR",), extra=()):
    opts = SMALL + ["MODEL.DISTILL.TEACHER.CONFIG", teacher[0],
                    "MODEL.DISTILL.TEACHER.WEIGHTS", teacher[1],
                    "MODEL.DISTILL.METHODS", str(list(methods))] + list(extra)
    return load_config(os.path.join(REPO, f"configs/demo/CSGR-{variant}-R18.yaml"), opts,
                       check_steps=False)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_records_hold_every_layer_and_the_assignment(variant, teachers):
    model = build_model(_student(variant, teachers[variant])).train()
    batch = fake_batch()
    fields = ("pred_logits", "pred_boxes", "query_embeds", "object_queries", "memory",
              "softmax", "matches")
    with EventStorage(0):
        with model._recording({}, model.recorder.capture_methods(model, fields)) as rec:
            losses = super(type(model), model).forward(batch)
    student = model.recorder.from_hooks(model, rec, batch, fields)
    layers, n, q = 2, 2, 10
    k = 6 + (1 if variant == "DETR" else 0)
    assert student.pred_logits.shape == (layers, n, q, k)
    assert student.pred_boxes.shape == (layers, n, q, 4)
    assert student.query_embeds.shape[:3] == (layers, n, q)
    assert student.softmax == (variant == "DETR")
    assert list(student.features) == VARIANTS[variant]
    # the last layer is what the detector's own loss saw; the assignment is its matcher's
    targets = detr_targets([x["instances"] for x in batch], student.image_sizes)
    last = model.match(student.pred_logits[-1], student.pred_boxes[-1], targets)
    for (a, b), (c, d) in zip(student.matches[-1], last):
        assert torch.equal(a, c) and torch.equal(b, d)
        assert len(a) == 2  # every GT box matched once
    assert all(torch.isfinite(v) for v in losses.values())
    # the teacher records the same fields from its own pass
    with torch.no_grad():
        teacher = model.run_teacher(batch, student, fields[:-1])
    assert teacher.pred_logits.shape[1:] == (n, q, k) and teacher.family == "detr"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_feature_methods_distil_the_levels_the_transformer_reads(variant, teachers):
    levels = VARIANTS[variant]
    extra = ["MODEL.DISTILL.PKD.IN_FEATURES", str(levels),
             "MODEL.DISTILL.MIMIC.IN_FEATURES", str(levels),
             "MODEL.DISTILL.FGD.IN_FEATURES", str(levels)]
    model = build_model(_student(variant, teachers[variant], ("CSGR", "PKD", "MIMIC", "FGD"),
                                 extra)).train()
    with EventStorage(0):
        losses = model(fake_batch())
    for level in levels:
        for name in (f"loss_csgr_cs_{level}", f"loss_pkd_{level}", f"loss_mimic_{level}",
                     f"loss_fgd_fg_{level}"):
            assert name in losses and torch.isfinite(losses[name]), name
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.model.parameters())


def _tiny_opts(out):
    """2 iterations on the tiny shapes, DETR's augmentation scaled to their 64 px."""
    return train_opts(out, test=True) + ["INPUT.DETR_CROP_RESIZE", "(48, 56)",
                                         "INPUT.CROP.SIZE", "(40, 56)"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_csgr_config_trains_evaluates_without_teacher_and_exports(variant, teachers, tmp_path,
                                                                  tiny_shapes):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import train_net
    from csgr_distill.export import StudentCheckpointer

    config = os.path.join(REPO, f"configs/demo/CSGR-{variant}-R18.yaml")
    out = tmp_path / "run"
    train_net.cli(["--config-file", config, *SMALL, *_tiny_opts(out),
                   "MODEL.DISTILL.TEACHER.CONFIG", teachers[variant][0],
                   "MODEL.DISTILL.TEACHER.WEIGHTS", teachers[variant][1]])
    keys = logged_keys(out)
    assert {f"loss_csgr_cs_{lv}" for lv in VARIANTS[variant]} <= keys and "loss_giou" in keys
    train_net.cli(["--config-file", config, "--eval-only", *SMALL, *_tiny_opts(tmp_path / "e"),
                   "MODEL.WEIGHTS", str(out / "model_final.pth"),
                   "MODEL.DISTILL.TEACHER.CONFIG", str(tmp_path / "absent.yaml"),
                   "MODEL.DISTILL.TEACHER.WEIGHTS", str(tmp_path / "absent.pth")])
    with open(tmp_path / "e" / "eval_results.json") as f:
        assert "AP" in json.load(f)["bbox"]
    plain = load_config(str(out / "model_final_student.yaml"))
    assert plain.MODEL.META_ARCHITECTURE == ("Detr" if variant == "DETR" else "DeformableDetr")
    reloaded = build_model(plain).eval()
    StudentCheckpointer(reloaded).load(plain.MODEL.WEIGHTS)
    trained = build_model(load_config(config, SMALL + _tiny_opts(tmp_path / "x")
                                      + ["MODEL.DISTILL.ENABLED", "False"])).eval()
    StudentCheckpointer(trained).load(str(out / "model_final.pth"))
    batch = fake_batch(n=1)
    with torch.no_grad():
        a, b = trained(batch)[0]["instances"], reloaded(batch)[0]["instances"]
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_extra_decoder_pass_reproduces_the_forward_and_takes_other_queries(variant, teachers):
    """The documented call a distiller uses for an extra student decoder pass (record field
    ``decoder``): with the student's own queries it gives the forward's every-layer outputs; with
    the teacher's queries it runs, differentiably, without running the encoder again."""
    model = build_model(_student(variant, teachers[variant])).eval()
    batch = fake_batch()
    with torch.no_grad():
        images = model.preprocess_image(batch)
        student = model.recorder.record(model, images, batch,
                                        ("pred_logits", "pred_boxes", "object_queries",
                                         "decoder"))
        again = student.decoder(student.object_queries)
    assert torch.allclose(again["pred_logits"], student.pred_logits, atol=1e-5)
    assert torch.allclose(again["pred_boxes"], student.pred_boxes, atol=1e-5)
    model.train()
    with EventStorage(0):
        images = model.preprocess_image(batch)
        rec = model.recorder.record(model, images, batch, ("decoder",))
        teacher_queries = model.teacher.model.decoder_outputs(
            model.teacher.model.predict(model.teacher_images(batch)))["object_queries"].detach()
        encoder = (model.transformer.encoder if variant == "DETR"
                   else model.detector.model.encoder)
        calls = []
        handles = [encoder.register_forward_hook(lambda *a: calls.append("encoder")),
                   model.backbone.register_forward_hook(lambda *a: calls.append("backbone"))]
        out = rec.decoder(teacher_queries[:7])
        for h in handles:
            h.remove()
    assert calls == []  # neither the backbone nor the encoder runs again
    assert out["pred_logits"].shape[:3] == (2, 2, 7)
    out["pred_logits"].sum().backward()
    head = model.class_embed if variant == "DETR" else model.detector.class_embed[0]
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_visualize_draws_a_detr_student_and_its_csgr_attention_on_res5(teachers, tmp_path,
                                                                      tiny_shapes):
    import cv2
    from tiny import TINY_VAL
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import visualize

    cfg = _student("DETR", teachers["DETR"], extra=["DATASETS.TEST", f"('{TINY_VAL}',)"])
    yaml_path, weights, _ = write_model(tmp_path, cfg, "detr_csgr")
    written = visualize.main(["--config-file", yaml_path, "--weights", weights, "--output",
                              str(tmp_path / "vis"), "--num-images", "1"])
    names = sorted(os.path.basename(p).split("_", 3)[-1] for p in written)
    assert names == ["csgr_category_attention.png", "csgr_criss_cross.png", "detections.png"]
    assert all(cv2.imread(p) is not None for p in written)


#: Deformable DETR's official variants (--with_box_refine; --with_box_refine --two_stage)
MODES = {"box_refine": ["MODEL.DETR.WITH_BOX_REFINE", "True"],
         "two_stage": ["MODEL.DETR.WITH_BOX_REFINE", "True", "MODEL.DETR.TWO_STAGE", "True"]}


@pytest.fixture(scope="module")
def variant_teachers(tmp_path_factory):
    """A demo Deformable DETR teacher of each variant (random weights)."""
    tmp = tmp_path_factory.mktemp("deformable_variant_teachers")
    return {mode: write_model(tmp, load_config(os.path.join(
        REPO, "configs/demo/teacher-DeformableDETR-R18-wide.yaml"), SMALL + opts,
        check_steps=False), mode)[:2] for mode, opts in MODES.items()}


def _variant_student(mode, teacher):
    return load_config(os.path.join(REPO, "configs/demo/DETRDistill-DeformableDETR-R18.yaml"),
                       SMALL + MODES[mode] + ["MODEL.DISTILL.TEACHER.CONFIG", teacher[0],
                                              "MODEL.DISTILL.TEACHER.WEIGHTS", teacher[1]],
                       check_steps=False)


@pytest.mark.parametrize("mode", list(MODES))
def test_box_refine_and_two_stage_record_for_distillation(mode, variant_teachers):
    """Student and teacher records of both variants: every layer's predictions from that layer's
    own heads, the queries (two-stage: the encoder's proposals), the extra decoder pass with the
    teacher's queries (differentiable, reaching every layer's head), and a DETRDistill step."""
    model = build_model(_variant_student(mode, variant_teachers[mode])).train()
    batch = fake_batch()
    fields = ("pred_logits", "pred_boxes", "query_embeds", "object_queries", "memory",
              "softmax", "matches", "decoder", "encoder_inputs")
    with EventStorage(0):
        with model._recording({}, model.recorder.capture_methods(model, fields)) as rec:
            losses = super(type(model), model).forward(batch)
    student = model.recorder.from_hooks(model, rec, batch, fields)
    with torch.no_grad():
        teacher = model.run_teacher(batch, student, fields[:-2])
    layers, n, q, k = 2, 2, 10, 6
    queries = (n, q, 4) if mode == "two_stage" else (q, 128)
    for record, heads in ((student, model.detector.class_embed),
                          (teacher, model.teacher.model.detector.class_embed)):
        assert record.pred_logits.shape == (layers, n, q, k)
        assert tuple(record.object_queries.shape) == queries
        for layer in range(layers):  # each layer's logits from its own head
            assert torch.allclose(record.pred_logits[layer],
                                  heads[layer](record.query_embeds[layer]), atol=1e-5)
        assert len(record.matches) == layers
    assert (model.detector.class_embed[0].weight
            is not model.detector.class_embed[1].weight)
    assert all(torch.isfinite(v) for v in losses.values())
    assert ("loss_ce_enc" in losses) == (mode == "two_stage")
    with EventStorage(0):
        extra = student.decoder(teacher.object_queries.detach())
    assert extra["pred_logits"].shape == (layers, n, q, k)
    extra["pred_logits"].sum().backward()
    for layer in range(layers):
        assert model.detector.class_embed[layer].weight.grad.abs().sum() > 0
    with EventStorage(0):
        distilled = model(batch)
    assert any(key.startswith("loss_detrdistill") for key in distilled)
    assert all(torch.isfinite(v) for v in distilled.values())


@pytest.mark.parametrize("mode", list(MODES))
def test_box_refine_and_two_stage_train_with_and_without_distillation(mode, variant_teachers,
                                                                       tmp_path, tiny_shapes):
    """2 iterations of tools/train_net.py on the tiny shapes: the plain demo student of each
    variant, then the DETRDistill demo student taught by a teacher of the same variant."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import train_net

    train_net.cli(["--config-file", os.path.join(REPO, "configs/demo/DeformableDETR-R18.yaml"),
                   *SMALL, *MODES[mode], *_tiny_opts(tmp_path / "plain")])
    keys = logged_keys(tmp_path / "plain")
    assert {"loss_ce", "loss_ce_0"} <= keys
    assert ("loss_ce_enc" in keys) == (mode == "two_stage")
    train_net.cli(["--config-file",
                   os.path.join(REPO, "configs/demo/DETRDistill-DeformableDETR-R18.yaml"),
                   *SMALL, *MODES[mode], *_tiny_opts(tmp_path / "distilled"),
                   "MODEL.DISTILL.TEACHER.CONFIG", variant_teachers[mode][0],
                   "MODEL.DISTILL.TEACHER.WEIGHTS", variant_teachers[mode][1]])
    keys = logged_keys(tmp_path / "distilled")
    assert any(key.startswith("loss_detrdistill") for key in keys)
    assert ("loss_ce_enc" in keys) == (mode == "two_stage")
