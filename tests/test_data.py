"""Dataset registration, loaders, domain evaluation and the synthetic shapes set.

Every fixture is generated here in the exact on-disk layout documented in datasets/README.md.
DatasetCatalog is global: each test registers its own fresh names (``_fresh``).
"""
import json
import os
import subprocess
import sys
import threading
import uuid

import cv2
import numpy as np
import pytest
import torch

import csgr_distill.data as D
from csgr_distill.data import shapes as shapes_mod
from csgr_distill.evaluation import DomainCOCOEvaluator, build_evaluator
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASSES
from detectron2.data.datasets.pascal_voc import load_voc_instances
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.evaluation.testing import flatten_results_dict, print_csv_format
from detectron2.structures import Boxes, BoxMode, Instances



def _fresh(prefix):
    return f"test_{prefix}_{uuid.uuid4().hex[:8]}"


def _write_image(path, width, height, value=127):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, np.full((height, width, 3), value, np.uint8))


# ------------------------------------------------------------------------------------------------
# fixtures in the exact layouts
# ------------------------------------------------------------------------------------------------
SODA_IMAGES = [
    # id, file, width, height, tags
    (1, "HT_TRAIN_000001_SH_000.jpg", 63.6, 48.2, dict(city="Shanghai", location="Citystreet",
                                                       period="Daytime", weather="Clear")),
    (2, "HT_TRAIN_000002_SH_000.jpg", 64.0, 48.0, dict(city="Shanghai", location="Highway",
                                                       period="Daytime", weather="Overcast")),
    (3, "HT_TRAIN_000003_GZ_000.jpg", 64.0, 48.0, dict(city="Guangzhou", location="Citystreet",
                                                       period="Night", weather="Rainy")),
    (4, "HT_TRAIN_000004_GZ_000.jpg", 64.0, 48.0, dict(city="Guangzhou", period="Night")),
]
# image_id -> [(category_id, [x, y, w, h])]
SODA_BOXES = {
    1: [(1, [2.5, 3.0, 10.0, 20.0]), (3, [30.0, 10.0, 25.0, 15.5]), (4, [5.0, 5.0, 0.0, 8.0])],
    2: [(6, [10.0, 10.0, 12.0, 12.0])],
    3: [(3, [4.0, 4.0, 20.0, 10.0]), (2, [40.0, 20.0, 8.0, 16.0])],
    4: [(5, [8.0, 8.0, 30.0, 20.0])],
}


def make_soda10m(root, split="train", images=SODA_IMAGES, boxes=SODA_BOXES,
                 categories=D.SODA10M_CATEGORIES, with_annotations=True):
    """Write ``root/SODA10M/SSLAD-2D/labeled/{split}/`` + ``annotations/instance_{split}.json``."""
    base = os.path.join(root, "SODA10M", "SSLAD-2D", "labeled")
    json_images, json_anns = [], []
    for image_id, fname, w, h, tags in images:
        _write_image(os.path.join(base, split, fname), int(round(w)), int(round(h)))
        json_images.append(dict(id=image_id, file_name=fname, width=w, height=h, **tags))
        for cat, bbox in boxes.get(image_id, []):
            json_anns.append(dict(id=len(json_anns) + 1, image_id=image_id, category_id=cat,
                                  bbox=bbox, iscrowd=0))  # SODA jsons need not carry "area"
    data = {"images": json_images, "categories": categories}
    if with_annotations:
        data["annotations"] = json_anns
    json_file = os.path.join(base, "annotations", f"instance_{split}.json")
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    with open(json_file, "w") as f:
        json.dump(data, f)
    image_dir, json_rel = D.SODA10M_SPLITS[f"soda10m_{split}"]
    assert os.path.join(root, json_rel) == json_file  # the fixture is in the registered layout
    return json_file, os.path.join(root, image_dir)


def register_soda_fixture(root, split="train", **kwargs):
    json_file, image_root = make_soda10m(root, split, **kwargs)
    name = _fresh(f"soda_{split}")
    D.register_soda10m(name, json_file, image_root)
    return name


COCO_THINGS = [c for c in COCO_CATEGORIES if c["isthing"]]


def make_minicoco(root):
    """``root/coco/annotations/instances_minitrain2017.json`` + ``root/coco/train2017/*.jpg``."""
    image_root = os.path.join(root, "coco", "train2017")
    images = [dict(id=139, file_name="000000000139.jpg", width=64, height=48),
              dict(id=285, file_name="000000000285.jpg", width=48, height=64)]
    for im in images:
        _write_image(os.path.join(image_root, im["file_name"]), im["width"], im["height"])
    anns = [  # COCO ids with gaps: 1 person, 13 stop sign, 90 toothbrush
        dict(id=1, image_id=139, category_id=1, bbox=[1, 2, 10, 20], area=200.0, iscrowd=0),
        dict(id=2, image_id=139, category_id=90, bbox=[20, 5, 8, 4], area=32.0, iscrowd=0),
        dict(id=3, image_id=285, category_id=13, bbox=[3, 3, 30, 30], area=900.0, iscrowd=0),
    ]
    cats = [dict(id=c["id"], name=c["name"], supercategory="x") for c in COCO_THINGS]
    json_file = os.path.join(root, "coco", "annotations", "instances_minitrain2017.json")
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    with open(json_file, "w") as f:
        json.dump(dict(images=images, annotations=anns, categories=cats), f)
    image_dir, json_rel = D.MINICOCO_SPLITS["coco_2017_minitrain"]
    assert os.path.join(root, json_rel) == json_file
    return json_file, image_root


def make_voc2007(root, split="trainval"):
    """``root/VOC2007/{Annotations/*.xml, ImageSets/Main/{split}.txt, JPEGImages/*.jpg}``."""
    voc = os.path.join(root, "VOC2007")
    objs = {"000005": [("chair", 10, 12, 40, 44, 0), ("person", 2, 3, 20, 30, 1)],
            "000007": [("car", 5, 6, 60, 40, 0)]}
    os.makedirs(os.path.join(voc, "Annotations"))
    os.makedirs(os.path.join(voc, "ImageSets", "Main"))
    for fid, items in objs.items():
        _write_image(os.path.join(voc, "JPEGImages", fid + ".jpg"), 64, 48)
        xml_objs = "".join(
            f"<object><name>{n}</name><pose>Left</pose><truncated>0</truncated>"
            f"<difficult>{d}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            for n, x0, y0, x1, y1, d in items
        )
        with open(os.path.join(voc, "Annotations", fid + ".xml"), "w") as f:
            f.write(f"<annotation><folder>VOC2007</folder><filename>{fid}.jpg</filename>"
                    "<size><width>64</width><height>48</height><depth>3</depth></size>"
                    f"<segmented>0</segmented>{xml_objs}</annotation>")
    with open(os.path.join(voc, "ImageSets", "Main", split + ".txt"), "w") as f:
        f.write("\n".join(objs) + "\n")
    return voc


# ------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------
def test_names_registered_cheaply_and_idempotent(tmp_path, monkeypatch):
    for name in D.DATASET_NAMES:
        assert name in DatasetCatalog.list(), name
    assert MetadataCatalog.get("soda10m_val").domain_tags == ("city", "location", "period",
                                                               "weather")
    assert MetadataCatalog.get("shapes_train").thing_classes == list(D.SHAPES_CLASSES)
    # a second call skips everything (and, pointed at an empty root, touches no file)
    empty = tmp_path / "empty"
    assert D.register_all(str(empty)) == []
    assert not empty.exists()
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "elsewhere"))
    assert D.datasets_root() == str(tmp_path / "elsewhere")
    assert D.register_all() == []
    assert D.dataset_paths("soda10m_test")["json_file"].endswith(
        "SODA10M/SSLAD-2D/labeled/annotations/instance_test.json")


def test_registration_reads_env_at_import(tmp_path):
    """In a fresh process, every root (ours and detectron2's VOC) follows DETECTRON2_DATASETS."""
    make_voc2007(str(tmp_path))
    code = (
        "import csgr_distill.data as D\n"
        "from detectron2.data import DatasetCatalog, MetadataCatalog\n"
        "d = DatasetCatalog.get('voc_2007_trainval')\n"
        "print('VOC', len(d), sorted(a['category_id'] for r in d for a in r['annotations']))\n"
        "for n in D.DATASET_NAMES:\n"
        "    print('PATH', n, MetadataCatalog.get(n).json_file)\n"
    )
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    chair, person, car = (VOC_CLASSES.index(c) for c in ("chair", "person", "car"))
    assert f"VOC 2 {sorted([chair, person, car])}" in lines
    paths = [ln.split()[2] for ln in lines if ln.startswith("PATH")]
    assert len(paths) == len(D.DATASET_NAMES)
    assert all(p.startswith(str(tmp_path) + os.sep) for p in paths), paths


# ------------------------------------------------------------------------------------------------
# SODA10M
# ------------------------------------------------------------------------------------------------
def test_soda10m_load(tmp_path, caplog):
    name = register_soda_fixture(str(tmp_path))
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["Pedestrian", "Cyclist", "Car", "Truck", "Tram", "Tricycle"]
    assert meta.evaluator_type == "coco" and os.path.isfile(meta.json_file)
    with caplog.at_level("WARNING"):
        dicts = DatasetCatalog.get(name)
    assert "skipped 1 degenerate" in caplog.text
    assert [d["image_id"] for d in dicts] == [1, 2, 3, 4]
    d0 = dicts[0]
    assert (d0["width"], d0["height"]) == (64, 48)  # 63.6 x 48.2 rounded
    assert isinstance(d0["width"], int) and isinstance(d0["height"], int)
    assert os.path.isfile(d0["file_name"])
    assert cv2.imread(d0["file_name"]).shape[:2] == (d0["height"], d0["width"])
    assert (d0["city"], d0["location"], d0["period"], d0["weather"]) == (
        "Shanghai", "Citystreet", "Daytime", "Clear")
    assert (dicts[3]["location"], dicts[3]["weather"]) == ("unknown", "unknown")
    # the zero-width Truck box is dropped; ids 1..6 -> 0..5
    assert [(a["category_id"], a["bbox"]) for a in d0["annotations"]] == [
        (0, [2.5, 3.0, 10.0, 20.0]), (2, [30.0, 10.0, 25.0, 15.5])]
    assert all(a["bbox_mode"] == BoxMode.XYWH_ABS and a["iscrowd"] == 0
               for d in dicts for a in d["annotations"])
    assert [a["category_id"] for a in dicts[1]["annotations"]] == [5]


def test_soda10m_noncontiguous_category_ids(tmp_path):
    cats = [{"id": 9, "name": "Tram"}, {"id": 2, "name": "Pedestrian"}, {"id": 5, "name": "Car"}]
    boxes = {1: [(9, [1, 1, 5, 5]), (2, [2, 2, 5, 5])], 2: [(5, [3, 3, 4, 4])]}
    json_file, image_root = make_soda10m(str(tmp_path), "val", images=SODA_IMAGES[:2],
                                         boxes=boxes, categories=cats)
    dicts = D.load_soda10m_json(json_file, image_root)
    assert [a["category_id"] for a in dicts[0]["annotations"]] == [2, 0]
    assert [a["category_id"] for a in dicts[1]["annotations"]] == [1]
    # registered with the json's categories: metadata follows the same order
    name = _fresh("soda_noncontig")
    D.register_soda10m(name, json_file, image_root, categories=cats)
    assert MetadataCatalog.get(name).thing_classes == ["Pedestrian", "Car", "Tram"]
    assert MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id == {2: 0, 5: 1, 9: 2}
    assert len(DatasetCatalog.get(name)) == 2
    # registered with the default SODA10M categories: the mismatch is an explicit error
    other = _fresh("soda_mismatch")
    D.register_soda10m(other, json_file, image_root)
    with pytest.raises(ValueError, match="differ from the registered metadata"):
        DatasetCatalog.get(other)


def test_soda10m_test_split_without_annotations(tmp_path):
    name = register_soda_fixture(str(tmp_path), "test", with_annotations=False)
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == len(SODA_IMAGES)
    assert all(d["annotations"] == [] for d in dicts)
    assert dicts[2]["period"] == "Night"


def test_missing_root_errors_name_dataset_path_and_readme(tmp_path):
    nowhere = str(tmp_path / "nowhere")
    soda = _fresh("soda_missing")
    image_dir, json_rel = D.SODA10M_SPLITS["soda10m_val"]
    D.register_soda10m(soda, os.path.join(nowhere, json_rel), os.path.join(nowhere, image_dir))
    coco = _fresh("minicoco_missing")
    image_dir, json_rel = D.MINICOCO_SPLITS["coco_2017_minitrain"]
    D.register_minicoco(coco, os.path.join(nowhere, json_rel), os.path.join(nowhere, image_dir))
    assert not os.path.exists(nowhere)  # registering touched nothing
    for name in (soda, coco):
        with pytest.raises(FileNotFoundError) as e:
            DatasetCatalog.get(name)
        msg = str(e.value)
        assert isinstance(e.value, D.DatasetNotFoundError)
        assert name in msg and "datasets/README.md" in msg
        assert MetadataCatalog.get(name).json_file in msg
        assert MetadataCatalog.get(name).image_root in msg
    # only the image folder missing: named alone
    json_file, image_root = make_soda10m(str(tmp_path / "partial"), "val")
    os.rename(image_root, image_root + "_moved")
    partial = _fresh("soda_partial")
    D.register_soda10m(partial, json_file, image_root)
    with pytest.raises(D.DatasetNotFoundError) as e:
        DatasetCatalog.get(partial)
    assert image_root in str(e.value) and json_file not in str(e.value)


# ------------------------------------------------------------------------------------------------
# MiniCOCO and VOC
# ------------------------------------------------------------------------------------------------
def test_minicoco_uses_coco_metadata_and_contiguous_ids(tmp_path):
    json_file, image_root = make_minicoco(str(tmp_path))
    name = _fresh("minicoco")
    D.register_minicoco(name, json_file, image_root)
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == [c["name"] for c in COCO_THINGS]
    assert meta.thing_classes == MetadataCatalog.get("coco_2017_val").thing_classes
    assert meta.evaluator_type == "coco" and meta.json_file == json_file
    dicts = DatasetCatalog.get(name)
    by_id = {d["image_id"]: d for d in dicts}
    assert sorted(by_id) == [139, 285]
    assert [a["category_id"] for a in by_id[139]["annotations"]] == [0, 79]  # 1, 90
    assert [a["category_id"] for a in by_id[285]["annotations"]] == [11]  # 13 = stop sign
    assert meta.thing_classes[79] == "toothbrush" and meta.thing_classes[11] == "stop sign"
    assert os.path.isfile(by_id[139]["file_name"])
    # the registered name points to the coco-minitrain layout and is evaluated on val2017
    assert D.dataset_paths("coco_2017_minitrain")["json_file"].endswith(
        os.path.join("coco", "annotations", "instances_minitrain2017.json"))
    assert "coco_2017_val" in DatasetCatalog.list()


def test_voc_fixture_with_detectron2_loader(tmp_path):
    voc = make_voc2007(str(tmp_path), "test")
    dicts = load_voc_instances(voc, "test", VOC_CLASSES)
    assert [os.path.basename(d["file_name"]) for d in dicts] == ["000005.jpg", "000007.jpg"]
    assert all(os.path.isfile(d["file_name"]) for d in dicts)
    anns = dicts[0]["annotations"]
    assert [VOC_CLASSES[a["category_id"]] for a in anns] == ["chair", "person"]
    assert anns[0]["bbox"] == [9.0, 11.0, 40.0, 44.0]  # VOC is 1-based; d2 subtracts 1 at xmin
    meta = MetadataCatalog.get("voc_2007_test")
    assert meta.evaluator_type == "pascal_voc" and meta.split == "test" and meta.year == 2007


# ------------------------------------------------------------------------------------------------
# domain evaluation
# ------------------------------------------------------------------------------------------------
def _perfect_outputs(dicts, keep):
    inputs, outputs = [], []
    for d in dicts:
        inst = Instances((d["height"], d["width"]))
        anns = d["annotations"] if keep(d) else []
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.linspace(0.9, 0.5, len(anns))
        inst.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        inputs.append({"image_id": d["image_id"], "height": d["height"], "width": d["width"]})
        outputs.append({"instances": inst})
    return inputs, outputs


def test_domain_evaluator_per_tag_ap(tmp_path):
    name = register_soda_fixture(str(tmp_path / "data"))
    dicts = DatasetCatalog.get(name)
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    evaluator = build_evaluator(cfg, name, str(tmp_path / "out" / "inference"))
    assert isinstance(evaluator, DomainCOCOEvaluator)
    evaluator.reset()
    evaluator.process(*_perfect_outputs(dicts, lambda d: d["period"] == "Daytime"))
    results = evaluator.evaluate()

    assert 0 < results["bbox"]["AP"] < 100
    period = results["bbox_by_period"]
    assert period["Daytime/AP"] == pytest.approx(100.0)
    assert period["Daytime/AP50"] == pytest.approx(100.0)
    assert period["Night/AP"] == pytest.approx(0.0)
    assert period["Night/AP50"] == pytest.approx(0.0)
    assert set(results["bbox_by_city"]) == {"Guangzhou/AP", "Guangzhou/AP50",
                                            "Shanghai/AP", "Shanghai/AP50"}
    assert results["bbox_by_weather"]["unknown/AP"] == pytest.approx(0.0)  # image 4: night
    assert results["bbox_by_weather"]["Clear/AP"] == pytest.approx(100.0)
    # detectron2's reporting copes with the nesting
    flat = flatten_results_dict(results)
    assert flat["bbox_by_period/Night/AP"] == pytest.approx(0.0)
    assert all(isinstance(float(v), float) for v in flat.values())
    print_csv_format(results)

    # tags=() behaves like the plain COCOEvaluator
    plain = DomainCOCOEvaluator(name, output_dir=None, tags=())
    plain.reset()
    plain.process(*_perfect_outputs(dicts, lambda d: True))
    res = plain.evaluate()
    assert set(res) == {"bbox"} and res["bbox"]["AP"] == pytest.approx(100.0)


def test_build_evaluator_dispatch(tmp_path):
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    json_file, image_root = make_minicoco(str(tmp_path))
    coco = _fresh("minicoco_eval")
    D.register_minicoco(coco, json_file, image_root)
    ev = build_evaluator(cfg, coco, None)
    assert type(ev) is COCOEvaluator and ev._use_fast_impl is False
    assert isinstance(build_evaluator(cfg, "voc_2007_test", None), PascalVOCDetectionEvaluator)
    odd = _fresh("odd")
    DatasetCatalog.register(odd, lambda: [])
    MetadataCatalog.get(odd).evaluator_type = "lvis_like"
    with pytest.raises(NotImplementedError, match=odd):
        build_evaluator(cfg, odd, None)
    missing = _fresh("soda_missing_eval")
    D.register_soda10m(missing, str(tmp_path / "no.json"), str(tmp_path / "noimg"))
    with pytest.raises(D.DatasetNotFoundError, match="datasets/README.md"):
        build_evaluator(cfg, missing, None)


# ------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------
def _read_split(root, split):
    json_file, image_root = shapes_mod.shapes_split_paths(root, split)
    with open(json_file, "rb") as f:
        raw = f.read()
    images = {}
    for name in sorted(os.listdir(image_root)):
        with open(os.path.join(image_root, name), "rb") as f:
            images[name] = f.read()
    return raw, images


def test_shapes_deterministic_and_valid(tmp_path):
    a, b, c = (str(tmp_path / x) for x in "abc")
    D.generate_shapes(a, "train", num_images=30, image_size=128, seed=7)
    D.generate_shapes(b, "train", num_images=30, image_size=128, seed=7)
    D.generate_shapes(c, "train", num_images=30, image_size=128, seed=8)
    raw_a, imgs_a = _read_split(a, "train")
    raw_b, imgs_b = _read_split(b, "train")
    raw_c, imgs_c = _read_split(c, "train")
    assert raw_a == raw_b and imgs_a == imgs_b and len(imgs_a) == 30
    assert raw_a != raw_c and imgs_a != imgs_c

    data = json.loads(raw_a)
    assert [c["name"] for c in data["categories"]] == list(D.SHAPES_CLASSES)
    assert len(D.SHAPES_CLASSES) >= 6
    anns = data["annotations"]
    assert len({x["category_id"] for x in anns}) >= 6
    per_image = np.bincount([x["image_id"] for x in anns], minlength=31)[1:]
    assert per_image.max() <= shapes_mod.SHAPES_MAX_OBJECTS and per_image.mean() > 1.5
    sides = []
    for x in anns:
        bx, by, bw, bh = x["bbox"]
        assert bx >= 0 and by >= 0 and bw > 0 and bh > 0
        assert bx + bw <= 128 and by + bh <= 128
        assert 0 < x["area"] <= bw * bh
        sides.append(max(bw, bh))
    assert min(sides) >= shapes_mod.SHAPES_MIN_VISIBLE_SIDE
    assert max(sides) <= shapes_mod.SHAPES_MAX_SIZE + 2
    assert min(sides) <= 12 and max(sides) >= 40  # the range is actually covered
    img = cv2.imread(os.path.join(a, "train", "images", data["images"][0]["file_name"]))
    assert img.shape == (128, 128, 3)
    assert img.std() > 10  # textured, not flat


def test_shapes_boxes_tight_on_visible_pixels():
    """Re-draw images with their masks: boxes are tight on the visible pixels, occluded objects
    are kept up to the occlusion limit and dropped beyond it."""
    size, occluded, dropped = 128, 0, 0
    for idx in range(20):
        img, anns, masks = shapes_mod._draw_image(np.random.default_rng([3, idx]), size,
                                                   return_masks=True)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        assert [m["ann"] for m in masks if m["ann"] is not None] == anns
        for m in masks:
            full, vis, ann = m["full"].sum(), m["visible"].sum(), m["ann"]
            assert not (m["visible"] & ~m["full"]).any()
            if ann is None:
                dropped += 1
                continue
            assert vis >= (1 - shapes_mod.SHAPES_MAX_OCCLUSION) * full
            occluded += int(vis < full)
            ys, xs = np.nonzero(m["visible"])
            x0, y0 = xs.min(), ys.min()
            assert ann["bbox"] == [x0, y0, xs.max() - x0 + 1, ys.max() - y0 + 1]
            assert ann["area"] == vis
            full_ys, full_xs = np.nonzero(m["full"])
            side = max(np.ptp(full_xs), np.ptp(full_ys)) + 1
            assert shapes_mod.SHAPES_MIN_SIZE - 2 <= side <= shapes_mod.SHAPES_MAX_SIZE + 2
    assert occluded > 0 and dropped > 0


def test_shapes_marker_prevents_regeneration(tmp_path, monkeypatch):
    root = str(tmp_path / "shapes")
    json_file, image_root = D.generate_shapes(root, "val", num_images=4, seed=1)
    before = os.stat(json_file).st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("regenerated although the split is complete")

    monkeypatch.setattr(shapes_mod, "_draw_image", boom)
    assert D.generate_shapes(root, "val", num_images=4, seed=1) == (json_file, image_root)
    assert os.stat(json_file).st_mtime_ns == before
    # other parameters -> the stale split is replaced
    monkeypatch.undo()
    D.generate_shapes(root, "val", num_images=6, seed=1)
    assert len(os.listdir(image_root)) == 6
    assert len(json.load(open(json_file))["images"]) == 6
    assert sorted(os.listdir(root)) == ["val"]  # no temp folders left behind


def test_shapes_concurrent_generation(tmp_path):
    root = str(tmp_path / "shapes")
    errors = []

    def run():
        try:
            D.generate_shapes(root, "train", num_images=8, seed=5)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(os.listdir(root)) == ["train"]
    ref = str(tmp_path / "ref")
    D.generate_shapes(ref, "train", num_images=8, seed=5)
    assert _read_split(root, "train") == _read_split(ref, "train")

    # a process that finishes second keeps the complete split that is already in place
    split_dir = os.path.join(root, "train")
    before = os.stat(os.path.join(split_dir, "annotations.json")).st_mtime_ns
    late = tmp_path / "shapes" / ".tmp-late"
    late.mkdir()
    (late / "FROM_LATE_PROCESS").write_text("x")
    digest = json.load(open(os.path.join(split_dir, "COMPLETE")))["hash"]
    shapes_mod._move_into_place(str(late), split_dir, digest)
    assert not os.path.exists(os.path.join(split_dir, "FROM_LATE_PROCESS"))
    assert os.stat(os.path.join(split_dir, "annotations.json")).st_mtime_ns == before
    # ... but replaces a stale one (other parameters)
    shapes_mod._move_into_place(str(late), split_dir, "another-hash")
    assert os.listdir(split_dir) == ["FROM_LATE_PROCESS"]


def test_shapes_registered_generated_on_first_use(tmp_path):
    root = str(tmp_path / "shapes")
    name = _fresh("shapes")
    D.register_shapes(name, root, "val", num_images=5, seed=3)
    assert not os.path.exists(root)  # nothing generated at registration
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == list(D.SHAPES_CLASSES) and meta.evaluator_type == "coco"
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    ev = build_evaluator(cfg, name, None)  # needs the json: generates it first
    assert type(ev) is COCOEvaluator and os.path.isfile(meta.json_file)
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 5 and all(os.path.isfile(d["file_name"]) for d in dicts)
    assert all(0 <= a["category_id"] < len(D.SHAPES_CLASSES)
               for d in dicts for a in d["annotations"])
    # the default registration points at $DETECTRON2_DATASETS/shapes/{train,val}
    assert D.dataset_paths("shapes_val")["image_root"].endswith(os.path.join("shapes", "val",
                                                                             "images"))
