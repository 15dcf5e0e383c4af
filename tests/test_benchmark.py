"""tools/benchmark.py's parts on tiny inputs: they run, cover every registered distiller, and
their arithmetic is right (numbers themselves are measured by the tool, never asserted here)."""
import json

import pytest

from csgr_distill.benchmark import gain, kernels
from csgr_distill.distillers import registered_distillers


def test_fpn_shapes_of_800x1333():
    assert kernels.fpn_shapes(800, 1333) == {"p3": (100, 168), "p4": (50, 84), "p5": (25, 42),
                                             "p6": (13, 21), "p7": (7, 11)}


@pytest.mark.slow
def test_kernels_ours_equals_the_straightforward_formula(tmp_path):
    kernels.run(str(tmp_path), height=64, width=96, batch=2, channels=16, num_classes=3,
                repeats=1, warmup=0, command="test")
    data = json.loads((tmp_path / "kernels.json").read_text())["cpu"]
    rows = {r["method"]: r for r in data["rows"]}
    assert set(registered_distillers()) <= set(rows)
    for label in ("CSGR", "CSGR recurrence 2"):
        assert rows[label]["max_rel_diff_loss"] < 1e-4
        assert rows[label]["max_rel_diff_grad"] < 1e-3
        assert rows[label]["ours_ms"] > 0 and rows[label]["reference_ms"] > 0
        # one value projection instead of two in the last pass: fewer matmul FLOPs
        assert 1.0 < rows[label]["flop_ratio"] < 2.0
    assert rows["CSGR"]["flop_ratio"] > rows["CSGR recurrence 2"]["flop_ratio"]
    for name in ("FGD", "MIMIC", "PKD"):  # every feature method meets its reference
        assert rows[name]["inputs"] == "p3-p7 maps"
        assert rows[name]["max_rel_diff_loss"] < 1e-4, name
        assert rows[name]["max_rel_diff_grad"] < 1e-3, name
    # the head-output losses, on the records of their detector pairs, every term included
    inputs = {"KD": "RetinaNet records", "LD": "RetinaNet, distribution head records",
              "TAR": "Faster R-CNN records", "DETRDistill": "Deformable DETR records"}
    for name, source in inputs.items():
        row = rows[name]
        assert row["inputs"] == source
        assert row["max_rel_diff_loss"] < 1e-4, (name, row)
        assert row["max_rel_diff_grad"] < 1e-3, (name, row)
        assert row["ours_ms"] > 0 and row["reference_ms"] > 0
    assert {"loss_ld", "loss_ld_vlr", "loss_ld_kd"} <= set(rows["LD"]["losses"])
    assert {"loss_tar_cls", "loss_tar_reg", "loss_tar_feat_p2"} <= set(rows["TAR"]["losses"])
    qp = [k for k in rows["DETRDistill"]["losses"] if k.startswith("loss_detrdistill_qp_")]
    feat = [k for k in rows["DETRDistill"]["losses"] if k.startswith("loss_detrdistill_feat_")]
    assert qp and feat and "loss_detrdistill_giou_l0" in rows["DETRDistill"]["losses"]
    assert "kernels (cpu)" in (tmp_path / "kernels.md").read_text()


def test_gain_plan_contains_baseline_every_distiller_and_options():
    plan = gain.method_runs()
    assert gain.BASELINE in plan and plan[gain.BASELINE] == ["MODEL.DISTILL.ENABLED", False]
    for name in registered_distillers():
        if name in ("LD", "DETRDistill"):  # their own pairs (retinanet-dist, detr)
            assert name not in plan and "CSGR+LD" not in plan
            continue
        assert plan[name] == ["MODEL.DISTILL.METHODS", [name]]
    dist = gain.method_runs(detector="retinanet-dist")
    assert {"LD", "CSGR+LD", "FGD+LD"} <= set(dist)
    gain.check_overrides(dist, gain.student_cfg((), gain.DETECTORS["retinanet-dist"][1]))
    for detector in ("detr", "deformable-detr"):
        detr_plan = gain.method_runs(detector=detector)
        assert {"DETRDistill", "DETRDistill logits only", "DETRDistill features only",
                "DETRDistill query prior only", "DETRDistill+CSGR", "CSGR",
                "PKD"} <= set(detr_plan)
        assert not {"LD", "KD", "TAR", "CSGR+LD", "CSGR teacher_head"} & set(detr_plan)
        gain.check_overrides(detr_plan, gain.student_cfg((), gain.DETECTORS[detector][1]))
    assert "CSGR teacher_head" in plan and "CSGR recurrence 2" in plan
    with pytest.raises(SystemExit, match="unknown"):
        gain.method_runs(["NoSuchMethod"])


def test_gain_variants_add_runs_and_bad_ones_fail_early():
    label, opts = gain.parse_variant("CSGR x4=MODEL.DISTILL.CSGR.ALPHA 2e-3 "
                                     "MODEL.DISTILL.CSGR.BETA 4e-5")
    assert label == "CSGR x4"
    assert opts == ["MODEL.DISTILL.CSGR.ALPHA", "2e-3", "MODEL.DISTILL.CSGR.BETA", "4e-5"]
    plan = gain.method_runs([], {label: opts})
    assert list(plan) == [gain.BASELINE, "CSGR x4"]
    gain.check_overrides(plan)  # valid keys: no error
    for bad in ("no equals sign", "L=MODEL.DISTILL.CSGR.ALPHA", "=MODEL.DISTILL.CSGR.ALPHA 1"):
        with pytest.raises(SystemExit, match="LABEL=KEY VALUE"):
            gain.parse_variant(bad)
    with pytest.raises(SystemExit, match="taken"):
        gain.method_runs(None, {"CSGR": opts})
    with pytest.raises(SystemExit, match="MODEL.DISTILL.CSGR.ALPA"):
        gain.check_overrides({"typo": ["MODEL.DISTILL.CSGR.ALPA", "1e-3"]})


def test_gain_summary_counts_a_run_that_detected_nothing_as_ap_0():
    """detectron2 reports NaN for every metric of a model with no detections (a collapsed
    student); the summary counts it as AP 0 and says so, instead of failing in stdev (old code:
    AttributeError) or making the mean NaN."""
    def run(ap, seed):
        return {"final": {"AP": ap, "AP50": ap + 10, "AP75": ap - 5}, "curve": [], "seed": seed}

    nan = float("nan")
    teacher = {"AP": 40.0, "AP50": 50.0, "AP75": 35.0}
    runs = {gain.BASELINE: [run(20.0, 0), run(22.0, 1)], "TAR": [run(28.0, 0), run(nan, 1)]}
    rows = {r["method"]: r for r in gain.summarize(teacher, runs)}
    assert rows["TAR"]["AP"] == pytest.approx(14.0)
    assert rows["TAR"]["AP50"] == pytest.approx(19.0)  # (38 + 0) / 2
    assert rows["TAR"]["AP_std"] == pytest.approx(19.79899, rel=1e-5)
    assert rows["TAR"]["no_detection_seeds"] == [1]
    assert rows[gain.BASELINE]["no_detection_seeds"] == []
    assert ("TAR seed 1: no detections at the end of training (detectron2 reports NaN), counted "
            "as AP 0") in gain.table_note(list(rows.values()))


def test_gain_bar_chart_starts_at_zero(tmp_path, monkeypatch):
    """AP bars are lengths: the axis starts at 0 however high every AP is (old code raised the
    floor to the lowest mean - 2 std - 2, 16 AP on the Faster R-CNN table, which drew a 38 AP
    bar 4x as long as a 21 AP one) and reaches above the highest bar's error bar."""
    import matplotlib.figure

    limits = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, path, **kw: limits.append(fig.axes[0].get_ylim()))

    def run(ap):
        return {"final": {"AP": ap, "AP50": ap + 10, "AP75": ap - 5},
                "curve": [[600, {"AP": ap}]]}

    teacher = {"AP": 65.0, "AP50": 80.0, "AP75": 70.0}
    runs = {gain.BASELINE: [run(20.0), run(22.0)], "CSGR": [run(66.0), run(70.0)]}
    gain.plot(str(tmp_path), teacher, gain.summarize(teacher, runs), runs)
    bottom, top = limits[0]  # the bar chart is saved first
    assert bottom == 0
    assert top >= 68.0 + 2.8284  # mean + sample std of CSGR


def test_gain_summary_arithmetic():
    def run(ap):
        return {"final": {"AP": ap, "AP50": ap + 10, "AP75": ap - 5}, "curve": []}

    teacher = {"AP": 40.0, "AP50": 50.0, "AP75": 35.0}
    runs = {gain.BASELINE: [run(29.0), run(30.0), run(31.0)],
            "CSGR": [run(34.5), run(35.0), run(35.5)]}
    rows = {r["method"]: r for r in gain.summarize(teacher, runs)}
    assert rows[gain.BASELINE]["AP"] == pytest.approx(30.0)
    assert rows[gain.BASELINE]["AP_std"] == pytest.approx(1.0)  # sample std
    assert rows["CSGR"]["gain_AP"] == pytest.approx(5.0)
    assert rows["CSGR"]["gap_closed_percent"] == pytest.approx(50.0)
    assert rows["CSGR"]["gain_over_2std"]  # 5 > 2 * max(0.5, 1.0)
    assert not rows[gain.BASELINE]["gain_over_2std"]
