"""The user's own datasets without code: DATASETS.REGISTER, --register-dataset, validation, class
count. Every fixture is written here in the layout docs/own_data.md documents: a COCO json + PNG
images, and a VOC folder (Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/<split>.txt).
DatasetCatalog is global: each test registers fresh names."""
import argparse
import json
import logging
import os
import uuid

import cv2
import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.pascal_voc import load_voc_instances
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.structures import BoxMode

import csgr_distill.data as D
from csgr_distill.config import add_distill_config, apply_derived_keys
from csgr_distill.data.custom import DatasetEntryError, parse_entry, read_voc
from csgr_distill.evaluation import build_evaluator


def _fresh(prefix):
    return f"own_{prefix}_{uuid.uuid4().hex[:8]}"


def _image(path, width, height):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, np.full((height, width, 3), 100, np.uint8))


COCO_IMAGES = [(1, "a.png", 64, 48), (2, "sub/b.png", 64, 64)]
# non-contiguous ids, not in name order: classes sorted by id -> ["cat", "dog"]
COCO_CATS = [{"id": 3, "name": "dog"}, {"id": 1, "name": "cat"}]
COCO_ANNS = [(1, 1, [2.0, 3.0, 10.0, 20.0]), (1, 3, [30.0, 10.0, 20.0, 15.0]),
             (2, 3, [0.0, 0.0, 64.0, 64.0])]


def make_coco(root, images=COCO_IMAGES, anns=COCO_ANNS, cats=COCO_CATS, write_images=True,
              json_name="train.json", edit=None):
    """``root/<json_name>`` + ``root/images/<file_name>`` (PNG); anns: (image_id, cat, xywh)."""
    image_root = os.path.join(root, "images")
    os.makedirs(image_root, exist_ok=True)
    if write_images:
        for _, fname, w, h in images:
            _image(os.path.join(image_root, fname), w, h)
    data = {
        "images": [dict(id=i, file_name=f, width=w, height=h) for i, f, w, h in images],
        "annotations": [dict(id=k + 1, image_id=i, category_id=c, bbox=b, area=b[2] * b[3],
                             iscrowd=0) for k, (i, c, b) in enumerate(anns)],
        "categories": [dict(c) for c in cats],
    }
    if edit:
        edit(data)
    json_file = os.path.join(root, json_name)
    with open(json_file, "w") as f:
        json.dump(data, f)
    return json_file, image_root


VOC_OBJECTS = {"000001": [("dog", 10, 12, 40, 44)],
               "000002": [("cat", 2, 3, 20, 30), ("dog", 5, 6, 60, 40)]}


def make_voc(root, objects=VOC_OBJECTS, split="train", size=(64, 48), write_images=True):
    """``root/VOC/{Annotations/<id>.xml, JPEGImages/<id>.jpg, ImageSets/Main/<split>.txt}``;
    objects: id -> [(class, xmin, ymin, xmax, ymax)] (1-based VOC pixels)."""
    voc = os.path.join(root, "VOC")
    os.makedirs(os.path.join(voc, "Annotations"), exist_ok=True)
    os.makedirs(os.path.join(voc, "ImageSets", "Main"), exist_ok=True)
    os.makedirs(os.path.join(voc, "JPEGImages"), exist_ok=True)
    w, h = size
    for fid, objs in objects.items():
        if write_images:
            _image(os.path.join(voc, "JPEGImages", fid + ".jpg"), w, h)
        body = "".join(
            f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{x0}</xmin>"
            f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            for n, x0, y0, x1, y1 in objs)
        with open(os.path.join(voc, "Annotations", fid + ".xml"), "w") as f:
            f.write(f"<annotation><filename>{fid}.jpg</filename><size><width>{w}</width>"
                    f"<height>{h}</height><depth>3</depth></size>{body}</annotation>")
    with open(os.path.join(voc, "ImageSets", "Main", split + ".txt"), "w") as f:
        f.write("\n".join(objects) + "\n")
    return voc


def _cfg(entries=(), train=(), test=()):
    cfg = add_distill_config(get_cfg())
    cfg.DATASETS.REGISTER = [list(e) for e in entries]
    cfg.DATASETS.TRAIN = tuple(train)
    cfg.DATASETS.TEST = tuple(test)
    cfg.OUTPUT_DIR = "/tmp/unused"
    return cfg


# ------------------------------------------------------------------------------------------------
# happy paths
# ------------------------------------------------------------------------------------------------
def test_coco_entry_registers_names_classes_evaluator_and_boxes(tmp_path):
    json_file, image_root = make_coco(str(tmp_path))
    name = _fresh("coco")
    cfg = _cfg([[name, "coco", json_file, image_root]])
    assert D.register_from_cfg(cfg) == [name]
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["cat", "dog"]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 3: 1}
    assert meta.evaluator_type == "coco"
    assert (meta.json_file, meta.image_root) == (json_file, image_root)
    assert (meta.num_images, meta.num_instances, meta.image_size_median) == (2, 3, (64, 56))
    assert tuple(meta.register_entry) == (name, "coco", json_file, image_root)
    dicts = DatasetCatalog.get(name)
    assert [d["file_name"] for d in dicts] == [os.path.join(image_root, "a.png"),
                                               os.path.join(image_root, "sub/b.png")]
    assert [(a["category_id"], a["bbox"], a["bbox_mode"]) for a in dicts[0]["annotations"]] == [
        (0, [2.0, 3.0, 10.0, 20.0], BoxMode.XYWH_ABS), (1, [30.0, 10.0, 20.0, 15.0],
                                                        BoxMode.XYWH_ABS)]
    assert [a["category_id"] for a in dicts[1]["annotations"]] == [1]
    assert type(build_evaluator(cfg, name, str(tmp_path / "ev"))) is COCOEvaluator
    assert D.dataset_paths(name) == {"json_file": json_file, "image_root": image_root}
    # idempotent: nothing is read again (the json may even be gone now)
    os.remove(json_file)
    assert D.register_from_cfg(cfg) == [name]


def test_voc_entry_with_a_class_list_and_with_classes_from_the_xmls(tmp_path):
    voc = make_voc(str(tmp_path))
    given, read = _fresh("voc_given"), _fresh("voc_read")
    cfg = _cfg([[given, "voc", voc, "train", "dog, cat, bird"], [read, "voc", voc, "train"]])
    assert D.register_from_cfg(cfg) == [given, read]
    assert MetadataCatalog.get(given).thing_classes == ["dog", "cat", "bird"]  # as given
    assert MetadataCatalog.get(read).thing_classes == ["cat", "dog"]  # from the XMLs, sorted
    for name in (given, read):
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "pascal_voc"
        assert (meta.dirname, meta.split, meta.year) == (voc, "train", 2012)
        assert (meta.num_images, meta.num_instances) == (2, 3)
        assert type(build_evaluator(_cfg(), name, None)) is PascalVOCDetectionEvaluator
    dicts = DatasetCatalog.get(given)
    assert [d["image_id"] for d in dicts] == ["000001", "000002"]
    assert dicts[0]["file_name"] == os.path.join(voc, "JPEGImages", "000001.jpg")
    assert (dicts[0]["width"], dicts[0]["height"]) == (64, 48)
    # 1-based VOC corners -> 0-based XYXY, as detectron2
    assert [(a["category_id"], a["bbox"], a["bbox_mode"]) for a in dicts[1]["annotations"]] == [
        (1, [1.0, 2.0, 20.0, 30.0], BoxMode.XYXY_ABS), (0, [4.0, 5.0, 60.0, 40.0],
                                                        BoxMode.XYXY_ABS)]
    assert [a["category_id"] for a in DatasetCatalog.get(read)[1]["annotations"]] == [0, 1]


def test_voc_reader_matches_detectron2_load_voc_instances(tmp_path):
    voc = make_voc(str(tmp_path))
    classes = ("cat", "dog")
    name = _fresh("voc_same")
    D.register_from_cfg(_cfg([[name, "voc", voc, "train", ",".join(classes)]]))
    assert DatasetCatalog.get(name) == load_voc_instances(voc, "train", classes)
    # a one-image split, which detectron2's loader cannot iterate (np.loadtxt gives a 0-d array)
    one = make_voc(str(tmp_path / "one"), {"000009": [("cat", 3, 3, 9, 9)]})
    single = _fresh("voc_single")
    D.register_from_cfg(_cfg([[single, "voc", one, "train"]]))
    assert [a["bbox"] for d in DatasetCatalog.get(single) for a in d["annotations"]] == [
        [2.0, 2.0, 9.0, 9.0]]


def test_entry_forms_yaml_yacs_override_and_flag(tmp_path, monkeypatch):
    json_file, image_root = make_coco(str(tmp_path))
    voc = make_voc(str(tmp_path))
    # plain yacs override on the command line, relative paths (working directory)
    monkeypatch.chdir(tmp_path)
    name = _fresh("yacs")
    cfg = _cfg()
    cfg.merge_from_list(["DATASETS.REGISTER", f"[['{name}', 'coco', 'train.json', 'images']]"])
    assert cfg.DATASETS.REGISTER == [[name, "coco", "train.json", "images"]]
    assert D.register_from_cfg(cfg) == [name]
    assert MetadataCatalog.get(name).json_file == json_file
    # the yaml form (as default_setup dumps it to OUTPUT_DIR/config.yaml) reads back
    yaml_path = tmp_path / "dumped.yaml"
    yaml_path.write_text(cfg.dump())
    again = add_distill_config(get_cfg())
    again.merge_from_file(str(yaml_path))
    assert again.DATASETS.REGISTER == cfg.DATASETS.REGISTER
    assert D.register_from_cfg(again) == [name]
    # $DETECTRON2_DATASETS is expanded
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    assert parse_entry(["x", "coco", "$DETECTRON2_DATASETS/train.json", "images"]).json_file == \
        json_file
    # the tool flag: repeatable, replaces a yaml entry of the same name
    parser = D.add_dataset_arguments(argparse.ArgumentParser())
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    flag_coco, flag_voc = _fresh("flag_coco"), _fresh("flag_voc")
    args = parser.parse_args([
        "--register-dataset", f"{flag_coco}=coco:{json_file}:{image_root}",
        "--register-dataset", f"{flag_voc}=voc:{voc}:train:cat,dog",
        "SOLVER.MAX_ITER", "2"])
    assert args.opts == ["SOLVER.MAX_ITER", "2"]
    cfg = _cfg([[flag_coco, "coco", "elsewhere.json", "elsewhere"], ["keep", "coco", "k", "k"]])
    D.apply_dataset_arguments(args, cfg)
    assert cfg.DATASETS.REGISTER == [["keep", "coco", "k", "k"],
                                     [flag_coco, "coco", json_file, image_root],
                                     [flag_voc, "voc", voc, "train", "cat,dog"]]
    cfg.DATASETS.REGISTER = cfg.DATASETS.REGISTER[1:]
    assert D.register_from_cfg(cfg) == [flag_coco, flag_voc]
    assert MetadataCatalog.get(flag_voc).thing_classes == ["cat", "dog"]


@pytest.mark.parametrize("entry,match", [
    ("mydata", "is not a list"),
    (["mydata", "yolo", "a", "b"], "format 'yolo'"),
    (["mydata", "coco", "a.json"], r"not of the form \[NAME, \"coco\", JSON_FILE, IMAGE_DIR\]"),
    (["mydata", "voc", "root"], "not of the form"),
    (["my data", "coco", "a", "b"], "without spaces"),
    (["mydata", "voc", "root", "train", "cat,,dog"], "empty or repeated"),
    (["mydata", "voc", "root", "train", "cat,cat"], "empty or repeated"),
])
def test_malformed_entries_name_the_key_and_the_form(entry, match):
    with pytest.raises(DatasetEntryError, match=match) as e:
        D.register_from_cfg(_with_raw_entry(entry))
    assert "DATASETS.REGISTER entry 1" in str(e.value)


def _with_raw_entry(entry):
    cfg = _cfg()
    cfg.DATASETS.REGISTER = [entry]
    return cfg


@pytest.mark.parametrize("value,match", [
    ("mydata", "NAME=coco:JSON_FILE:IMAGE_DIR"),
    ("mydata=coco:only.json", "not of the form"),
    ("mydata=xml:a:b", "format 'xml'"),
])
def test_malformed_flag_values_name_the_flag(value, match):
    with pytest.raises(DatasetEntryError, match=match) as e:
        D.parse_dataset_argument(value)
    assert f"--register-dataset '{value}'" in str(e.value)


def test_names_registered_otherwise_are_errors(tmp_path):
    json_file, image_root = make_coco(str(tmp_path))
    other_json, _ = make_coco(str(tmp_path), json_name="other.json")
    name = _fresh("conflict")
    D.register_from_cfg(_cfg([[name, "coco", json_file, image_root]]))
    with pytest.raises(DatasetEntryError, match="already registered with other files") as e:
        D.register_from_cfg(_cfg([[name, "coco", other_json, image_root]]))
    assert json_file in str(e.value) and other_json in str(e.value)
    with pytest.raises(DatasetEntryError, match="twice with other files"):
        D.register_from_cfg(_cfg([["x_" + name, "coco", json_file, image_root],
                                  ["x_" + name, "coco", other_json, image_root]]))
    # an identical repeat (yaml + flag) is fine
    assert D.register_from_cfg(_cfg([[name, "coco", json_file, image_root]] * 2)) == [name]
    for builtin in ("coco_2017_val", "voc_2007_test", "shapes_val"):
        with pytest.raises(DatasetEntryError, match=f"'{builtin}' is already a registered"):
            D.register_from_cfg(_cfg([[builtin, "coco", json_file, image_root]]))


# ------------------------------------------------------------------------------------------------
# validation errors, each naming the file
# ------------------------------------------------------------------------------------------------
def test_missing_paths_are_named(tmp_path):
    json_file, image_root = make_coco(str(tmp_path))
    nowhere = str(tmp_path / "nowhere")
    cases = [
        ([_fresh("m"), "coco", nowhere + ".json", image_root], [nowhere + ".json"], "JSON_FILE"),
        ([_fresh("m"), "coco", json_file, nowhere], [nowhere], "IMAGE_DIR"),
        ([_fresh("m"), "coco", nowhere + ".json", nowhere], [nowhere + ".json", nowhere], ""),
        ([_fresh("m"), "voc", nowhere, "train"], [nowhere], "VOC_ROOT"),
    ]
    for entry, paths, what in cases:
        with pytest.raises(D.DatasetFileNotFoundError) as e:
            D.register_from_cfg(_cfg([entry]))
        msg = str(e.value)
        assert f"Dataset '{entry[0]}'" in msg and what in msg and "DATASETS.REGISTER" in msg
        assert all(p in msg for p in paths), msg
        assert isinstance(e.value, D.DatasetNotFoundError) and isinstance(e.value, OSError)
        assert entry[0] not in DatasetCatalog.list()  # nothing half-registered
    voc = make_voc(str(tmp_path))
    with pytest.raises(D.DatasetFileNotFoundError) as e:
        D.register_from_cfg(_cfg([[_fresh("m"), "voc", voc, "val"]]))
    assert os.path.join(voc, "ImageSets", "Main", "val.txt") in str(e.value)
    assert "name an existing split: train" in str(e.value)
    os.remove(os.path.join(voc, "Annotations", "000002.xml"))
    with pytest.raises(D.DatasetFileNotFoundError) as e:
        D.register_from_cfg(_cfg([[_fresh("m"), "voc", voc, "train"]]))
    assert os.path.join(voc, "Annotations", "000002.xml") in str(e.value)
    assert "1 of 2 images" in str(e.value)


def test_empty_annotation_files_are_errors_or_inference_only(tmp_path, caplog):
    # no images at all: an error at registration
    json_file, image_root = make_coco(str(tmp_path), images=[], anns=[])
    with pytest.raises(D.DatasetContentError, match="has no images") as e:
        D.register_from_cfg(_cfg([[_fresh("noimg"), "coco", json_file, image_root]]))
    assert json_file in str(e.value)
    voc = make_voc(str(tmp_path / "v"), objects={})
    with pytest.raises(D.DatasetContentError, match="lists no images") as e:
        D.register_from_cfg(_cfg([[_fresh("novoc"), "voc", voc, "train"]]))
    assert os.path.join(voc, "ImageSets", "Main", "train.txt") in str(e.value)
    # images but no annotations: registered (inference) with a warning; never a training set
    json_file, image_root = make_coco(str(tmp_path / "c"), anns=[])
    name = _fresh("noann")
    with caplog.at_level(logging.WARNING):
        D.register_from_cfg(_cfg([[name, "coco", json_file, image_root]]))
    assert "has no annotations: usable for inference only" in caplog.text
    with pytest.raises(D.DatasetContentError, match="no annotations") as e:
        D.check_training_data(_cfg(train=[name]))
    assert f"DATASETS.TRAIN names '{name}'" in str(e.value) and json_file in str(e.value)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        D.check_training_data(_cfg(test=[name]))
    assert f"DATASETS.TEST names '{name}', which has no annotations" in caplog.text
    # VOC without any object: no classes to read, unless they are given
    empty = make_voc(str(tmp_path / "e"), objects={"000001": []})
    with pytest.raises(D.DatasetContentError, match="No <object> in any XML"):
        D.register_from_cfg(_cfg([[_fresh("vempty"), "voc", empty, "train"]]))
    given = _fresh("vempty_given")
    D.register_from_cfg(_cfg([[given, "voc", empty, "train", "cat"]]))
    with pytest.raises(D.DatasetContentError, match="0 boxes"):
        D.check_training_data(_cfg(train=[given]))


def test_voc_unknown_class_names_the_xml_and_the_list(tmp_path):
    voc = make_voc(str(tmp_path))
    name = _fresh("unknown")
    with pytest.raises(D.DatasetContentError) as e:
        D.register_from_cfg(_cfg([[name, "voc", voc, "train", "dog,bird"]]))
    msg = str(e.value)
    assert os.path.join(voc, "Annotations", "000002.xml") in msg
    assert "'cat'" in msg and "['dog', 'bird']" in msg and name not in DatasetCatalog.list()


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.pop("categories"), "has no categories"),
    (lambda d: d["annotations"][0].update(category_id=7), "category_id that is not among"),
    (lambda d: d["annotations"][1].pop("area"), "have no 'area'"),
    (lambda d: d["annotations"][1].pop("bbox"), "have no bbox"),
    (lambda d: d["images"][0].pop("width"), "lack id, file_name, width or height"),
    (lambda d: d["categories"].append({"id": 9, "name": "cat"}), "repeated category"),
])
def test_coco_content_errors_name_the_json(tmp_path, edit, match):
    json_file, image_root = make_coco(str(tmp_path), edit=edit)
    with pytest.raises(D.DatasetContentError, match=match) as e:
        D.register_from_cfg(_cfg([[_fresh("bad"), "coco", json_file, image_root]]))
    assert json_file in str(e.value)


def test_invalid_json_names_the_file(tmp_path):
    json_file, image_root = make_coco(str(tmp_path))
    with open(json_file, "w") as f:
        f.write("{not json")
    with pytest.raises(D.DatasetContentError, match="is not valid json") as e:
        D.register_from_cfg(_cfg([[_fresh("badjson"), "coco", json_file, image_root]]))
    assert json_file in str(e.value)


def test_missing_image_files_are_an_error_listing_them(tmp_path):
    """At registration (every image file is checked then), and at loading when a file went
    missing since."""
    json_file, image_root = make_coco(str(tmp_path))
    os.remove(os.path.join(image_root, "sub", "b.png"))
    name = _fresh("noimage")
    with pytest.raises(D.DatasetFileNotFoundError) as e:
        D.register_from_cfg(_cfg([[name, "coco", json_file, image_root]]))
    msg = str(e.value)
    assert "1 of 2 images listed in " + json_file in msg
    assert os.path.join(image_root, "sub", "b.png") in msg and "IMAGE_DIR" in msg
    assert name not in DatasetCatalog.list()
    _image(os.path.join(image_root, "sub", "b.png"), 64, 64)
    D.register_from_cfg(_cfg([[name, "coco", json_file, image_root]]))
    os.remove(os.path.join(image_root, "a.png"))
    with pytest.raises(D.DatasetFileNotFoundError, match="a.png"):
        DatasetCatalog.get(name)
    voc = make_voc(str(tmp_path / "v"))
    os.remove(os.path.join(voc, "JPEGImages", "000001.jpg"))
    vname = _fresh("noimage_voc")
    with pytest.raises(D.DatasetFileNotFoundError, match="000001.jpg") as e:
        D.register_from_cfg(_cfg([[vname, "voc", voc, "train"]]))
    assert "as <id>.jpg (or .jpeg, .png" in str(e.value)


def test_boxes_outside_their_image_are_clipped_or_skipped_and_counted(tmp_path, caplog):
    anns = [(1, 1, [2.0, 3.0, 10.0, 20.0]),    # inside: kept as is
            (1, 1, [60.0, 10.0, 5.0, 10.0]),   # 1 px beyond the right border: clipped
            (1, 3, [50.0, 10.0, 30.0, 10.0]),  # 16 px beyond: skipped
            (1, 3, [-10.0, -10.0, 5.0, 5.0]),  # outside: skipped
            (1, 1, [5.0, 5.0, 0.0, 10.0])]     # empty: skipped
    json_file, image_root = make_coco(str(tmp_path), images=COCO_IMAGES[:1], anns=anns)
    name = _fresh("boxes")
    D.register_from_cfg(_cfg([[name, "coco", json_file, image_root]]))
    with caplog.at_level(logging.INFO, logger="csgr_distill"):
        dicts = DatasetCatalog.get(name)
    assert [a["bbox"] for a in dicts[0]["annotations"]] == [[2.0, 3.0, 10.0, 20.0],
                                                            [60.0, 10.0, 4.0, 10.0]]
    assert f"skipped 2 boxes outside their image in {json_file}" in caplog.text
    assert f"skipped 1 empty box with width or height <= 0 in {json_file}" in caplog.text
    assert f"clipped 1 box to their image in {json_file}" in caplog.text
    # VOC: XYXY boxes, the same rule; the split file is the source named
    voc = make_voc(str(tmp_path / "v"), {"000001": [("cat", 1, 1, 66, 20), ("cat", 40, 1, 90, 20),
                                                    ("dog", 3, 3, 9, 9)]})
    vname = _fresh("boxes_voc")
    D.register_from_cfg(_cfg([[vname, "voc", voc, "train"]]))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="csgr_distill"):
        boxes = [a["bbox"] for a in DatasetCatalog.get(vname)[0]["annotations"]]
    assert boxes == [[0.0, 0.0, 64.0, 20.0], [2.0, 2.0, 9.0, 9.0]]
    split = os.path.join(voc, "ImageSets", "Main", "train.txt")
    assert f"skipped 1 box outside their image in {split}" in caplog.text


# ------------------------------------------------------------------------------------------------
# class count and input size
# ------------------------------------------------------------------------------------------------
def test_check_num_classes_names_the_value_and_the_class_list(tmp_path):
    json_file, image_root = make_coco(str(tmp_path))
    name = _fresh("count")
    cfg = _cfg([[name, "coco", json_file, image_root]], train=[name])
    D.register_from_cfg(cfg)
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.RETINANET.NUM_CLASSES = 6
    with pytest.raises(ValueError) as e:
        D.check_num_classes(cfg)
    msg = str(e.value)
    assert msg.startswith(f"MODEL.RETINANET.NUM_CLASSES is 6, but the training set {name} has 2 "
                          "classes: ['cat', 'dog']")
    assert "Set MODEL.RETINANET.NUM_CLASSES 2" in msg
    with pytest.raises(ValueError) as e:
        D.check_num_classes(cfg, opts_key="MODEL.DISTILL.TEACHER.OPTS")
    assert "MODEL.DISTILL.TEACHER.OPTS \"['MODEL.RETINANET.NUM_CLASSES', 2]\"" in str(e.value)
    cfg.MODEL.META_ARCHITECTURE = "DistillGeneralizedRCNN"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.NUM_CLASSES is 1"):
        D.check_training_data(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    assert D.check_training_data(cfg) == ["cat", "dog"]
    # training sets with other class lists
    voc = make_voc(str(tmp_path))
    vname = _fresh("count_voc")
    D.register_from_cfg(_cfg([[vname, "voc", voc, "train", "dog,cat"]]))
    cfg.DATASETS.TRAIN = (name, vname)
    with pytest.raises(ValueError, match="mixes sets with different classes"):
        D.check_num_classes(cfg)
    # builtin metadata counts too: shapes has 6 classes, detectron2's default head 80
    with pytest.raises(ValueError, match=r"MODEL.ROI_HEADS.NUM_CLASSES is 80, .* 6 classes"):
        D.check_num_classes(_cfg(train=["shapes_train"]))


def test_input_size_far_from_the_images_is_a_warning_naming_fixed_size(tmp_path, caplog):
    images = [(1, "a.png", 200, 200), (2, "b.png", 200, 200)]
    json_file, image_root = make_coco(str(tmp_path), images=images,
                                      anns=[(1, 1, [5.0, 5.0, 50.0, 50.0])])
    name = _fresh("tiles")
    cfg = _cfg([[name, "coco", json_file, image_root]], train=[name])
    D.register_from_cfg(cfg)
    cfg.MODEL.RETINANET.NUM_CLASSES = 2
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (128,), 128
    with caplog.at_level(logging.WARNING):
        D.check_training_data(cfg)
    assert f"Training images of '{name}' are 200x200 px" in caplog.text
    assert "set INPUT.FIXED_SIZE 200" in caplog.text
    caplog.clear()
    cfg.INPUT.FIXED_SIZE = 200
    apply_derived_keys(cfg)
    assert (cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST,
            cfg.INPUT.MAX_SIZE_TEST) == ((200,), 200, 200, 200)
    with caplog.at_level(logging.WARNING):
        D.check_training_data(cfg)
    assert "Training images" not in caplog.text


def test_read_voc_documents_its_dicts(tmp_path):
    voc = make_voc(str(tmp_path))
    records = read_voc(voc, "train")
    assert records[1]["objects"] == [("cat", [1.0, 2.0, 20.0, 30.0]),
                                     ("dog", [4.0, 5.0, 60.0, 40.0])]
    assert records[1]["xml"] == os.path.join(voc, "Annotations", "000002.xml")
