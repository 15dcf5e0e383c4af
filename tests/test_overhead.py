"""tools/benchmark.py overhead on a small but real case: every variant trains with finite losses,
every method's distillation losses are there and non-zero, and the bookkeeping adds up. (The
numbers themselves are measured by the tool, never asserted here.)"""
import json
import math

import pytest

from csgr_distill.benchmark import overhead
from csgr_distill.benchmark.common import method_variants
from csgr_distill.distillers import registered_distillers

pytestmark = pytest.mark.slow  # every test here times full-size detectors


@pytest.fixture(scope="module")
def retinanet_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("overhead")
    # batch 2 at 128 px: every level has more than one position (p7 is 1x1 per image)
    overhead.run(str(out), height=128, width=128, batch=2, repeats=1, warmup=0,
                 detectors=("RetinaNet",), command="test", measure_memory=False)
    data = json.loads((out / "overhead.json").read_text())["cpu RetinaNet"]
    return {r["variant"]: r for r in data["rows"]}


def test_every_variant_trains_with_finite_losses(retinanet_rows):
    assert list(retinanet_rows)[:2] == [overhead.STUDENT, overhead.FLOOR]
    # LD needs the distribution box branch, DETRDistill a DETR pair: timed on their own
    # detectors (tests below)
    assert set(registered_distillers()) - {"LD", "DETRDistill"} <= set(retinanet_rows)
    assert "LD" not in retinanet_rows and "DETRDistill" not in retinanet_rows
    for label, row in retinanet_rows.items():
        assert row["losses_finite"], (label, row["losses"])
        assert {"loss_cls", "loss_box_reg"} <= set(row["losses"])
        assert all(math.isfinite(v) for v in row["losses"].values())


def _methods(label):
    """The registered methods a variant runs (from its MODEL.DISTILL.METHODS override)."""
    opts = method_variants("overhead")[label]
    return opts[opts.index("MODEL.DISTILL.METHODS") + 1]


def test_every_method_returns_nonzero_losses_on_every_level(retinanet_rows):
    for label, row in retinanet_rows.items():
        distill = {k: v for k, v in row["losses"].items()
                   if not k.startswith(("loss_cls", "loss_box_reg"))}
        if label in (overhead.STUDENT, overhead.FLOOR):
            assert not distill
            continue
        for method in _methods(label):
            own = {k: v for k, v in distill.items() if k.startswith(f"loss_{method.lower()}_")}
            levels = {k.rsplit("_", 1)[1] for k in own}
            assert levels == {"p3", "p4", "p5", "p6", "p7"}, label
            # two random networks: every level's loss is positive
            for lv in levels:
                assert sum(v for k, v in own.items() if k.endswith(f"_{lv}")) > 0, (label, lv)


def test_floor_and_method_bookkeeping(retinanet_rows):
    floor, student = retinanet_rows[overhead.FLOOR], retinanet_rows[overhead.STUDENT]
    assert floor["vs_floor"] == pytest.approx(1.0)
    assert floor["machinery_over_floor_percent"] == pytest.approx(0.0)
    assert 0 < student["matmul_gflop"] < floor["matmul_gflop"]  # the teacher forward adds work
    for label, row in retinanet_rows.items():
        if label in (overhead.STUDENT, overhead.FLOOR):
            continue
        # every method adds its loss; CSGR and FGD add matrix products (adapter-free MIMIC, PKD
        # and KD between equally wide FPNs add element-wise work only)
        assert row["matmul_flop_over_floor_percent"] >= 0, label
        if set(_methods(label)) & {"CSGR", "FGD"}:
            assert row["matmul_flop_over_floor_percent"] > 0, label


def test_ld_is_timed_on_the_distribution_head_detector_only(tmp_path):
    """Which pair times which method is the methods' own build-time check: LD on the
    distribution-head RetinaNet, not on the plain one."""
    for detector, expected in (("RetinaNet, distribution head", ["CSGR", "LD"]),
                               ("RetinaNet", ["CSGR"])):
        overhead.run(str(tmp_path), height=128, width=128, batch=2, repeats=1, warmup=0,
                     detectors=(detector,), command="test", measure_memory=False,
                     methods=["CSGR", "LD"])
        rows = {r["variant"]: r for r in json.loads((tmp_path / "overhead.json").read_text())
                [f"cpu {detector}"]["rows"]}
        assert list(rows) == [overhead.STUDENT, overhead.FLOOR] + expected, detector
    detector = "RetinaNet, distribution head"
    rows = {r["variant"]: r for r in json.loads((tmp_path / "overhead.json").read_text())
            [f"cpu {detector}"]["rows"]}
    assert all(r["losses_finite"] for r in rows.values())
    # LD's RetinaNet recipe (configs/LD-RetinaNet-R50.yaml): no DFL on the student
    assert {"loss_ld", "loss_ld_vlr", "loss_ld_kd"} <= set(rows["LD"]["losses"])


@pytest.mark.parametrize("detector", ["DETR", "Deformable DETR"])
def test_detr_family_students_are_timed_with_csgr_and_detrdistill(tmp_path, detector):
    labels = ["CSGR", "CSGR recurrence 2", "CSGR teacher_head", "KD", "DETRDistill",
              "DETRDistill logits only", "DETRDistill features only",
              "DETRDistill query prior only",
              "DETRDistill query prior only, last-layer assignment"]
    overhead.run(str(tmp_path), height=64, width=64, batch=2, repeats=1, warmup=0,
                 detectors=(detector,), command="test", measure_memory=False, methods=labels)
    rows = {r["variant"]: r for r in json.loads((tmp_path / "overhead.json").read_text())
            [f"cpu {detector}"]["rows"]}
    # CSGR teacher_head and KD need dense logits: refused by their own checks, skipped;
    # DETRDistill's components timed one by one
    assert list(rows) == [overhead.STUDENT, overhead.FLOOR, "CSGR", "CSGR recurrence 2",
                          "DETRDistill", "DETRDistill logits only", "DETRDistill features only",
                          "DETRDistill query prior only",
                          "DETRDistill query prior only, last-layer assignment"]
    assert all(r["losses_finite"] for r in rows.values())
    assert any(k.startswith("loss_csgr_cs_res5") for k in rows["CSGR"]["losses"])
    assert any(k.startswith("loss_detrdistill_qp_") for k in rows["DETRDistill"]["losses"])
    # each component alone: only its losses
    prefixes = {"logits": ("loss_detrdistill_cls_", "loss_detrdistill_l1_",
                           "loss_detrdistill_giou_"),
                "features": ("loss_detrdistill_feat_",), "query prior": ("loss_detrdistill_qp_",)}
    for part, own in prefixes.items():
        keys = [k for k in rows[f"DETRDistill {part} only"]["losses"]
                if k.startswith("loss_detrdistill")]
        assert keys and all(k.startswith(own) for k in keys), (part, keys)
    last = [k for k in rows["DETRDistill query prior only, last-layer assignment"]["losses"]
            if k.startswith("loss_detrdistill")]
    assert last and all(k.startswith("loss_detrdistill_qp_") for k in last)
