"""The user's data checked before training (issue: nothing goes wrong silently or hours in):
image files (missing, not an image, another size than the annotations give as detectron2 reads
them, EXIF orientation included) all reported at once; annotation values that are not numbers;
image / file / annotation ids given twice; classes without boxes; crowd-only training sets; VOC
images other than .jpg; a test set with other classes; the registration line on the console and
in log.txt. Fixtures are written in the layouts docs/own_data.md documents (COCO json +
images/, VOC folder), with real JPEG / PNG / TIFF / WebP files."""
import io
import json
import logging
import os
import struct
import sys
import uuid
import zlib

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.detection_utils import read_image
from detectron2.engine import default_argument_parser
from PIL import Image, ImageFile

import csgr_distill.data as D
from csgr_distill.cli import USER_ERROR_EXIT, run_cli
from test_custom_data import _cfg, make_coco, make_voc
from tiny import REPO, base_cfg

sys.path.insert(0, os.path.join(REPO, "tools"))
import train_net  # noqa: E402

ROTATED = 6  # EXIF orientation of a phone photo held upright: stored landscape, shown portrait
MAX_LISTED = 10  # csgr_distill.data.checks.MAX_LISTED (imported in the tests, which run on the
#                  code before these checks existed too, and fail there)


def _fresh(prefix):
    return f"img_{prefix}_{uuid.uuid4().hex[:8]}"


def _photo(path, width, height, orientation=None, fmt=None):
    """An image file of ``width`` x ``height`` stored pixels, with an EXIF orientation tag."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(np.full((height, width, 3), 90, np.uint8))
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[274] = orientation
        kw["exif"] = exif
    im.save(path, format=fmt, **kw)


def _png_with_late_exif(path, width, height, orientation):
    """A PNG whose eXIf chunk follows the image data (inserted before IEND)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    exif = Image.Exif()
    exif[274] = orientation
    data = exif.tobytes()[6:]  # without the "Exif\0\0" header, as the PNG chunk stores it
    chunk = struct.pack(">I", len(data)) + b"eXIf" + data + \
        struct.pack(">I", zlib.crc32(b"eXIf" + data))
    with open(path, "wb") as f:
        f.write(png[:-12] + chunk + png[-12:])  # the last 12 bytes are the IEND chunk


def _not_an_image(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("<html>404 Not Found</html>")


def _coco_with_files(root, files, sizes=None, anns=None, cats=None):
    """A COCO set over the given image files (``files``: name -> writer(path)); json sizes from
    ``sizes`` (name -> (w, h)); one box per image unless ``anns`` is given."""
    image_root = os.path.join(root, "images")
    for fname, write in files.items():
        write(os.path.join(image_root, fname))
    images = [(k + 1, fname, *sizes[fname]) for k, fname in enumerate(files)]
    if anns is None:
        anns = [(k + 1, 1, [1.0, 1.0, 10.0, 10.0]) for k in range(len(files))]
    return make_coco(root, images=images, anns=anns, cats=cats or [{"id": 1, "name": "cat"}],
                     write_images=False)


# ------------------------------------------------------------------------------------------------
# 1. image headers, as detectron2 reads the files
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,orientation", [("JPEG", o) for o in range(1, 9)] + [
    ("PNG", None), ("PNG", ROTATED), ("PNG", "late"), ("TIFF", ROTATED), ("WEBP", 8),
    ("BMP", None)])
def test_header_size_is_the_size_detectron2_reads(tmp_path, fmt, orientation, monkeypatch):
    """read_header gives (width, height) of detectron2's read_image (EXIF orientation applied)
    for every orientation and the common formats, without decoding a pixel."""
    from csgr_distill.data import images as I

    path = str(tmp_path / f"im.{fmt.lower()}")
    if orientation == "late":
        _png_with_late_exif(path, 50, 30, 8)
    else:
        _photo(path, 50, 30, orientation, fmt)
    expected = read_image(path, "BGR").shape[1::-1]

    def no_decoding(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    header = I.read_header(path)
    assert (header.width, header.height) == tuple(expected)
    assert header.orientation == {"late": 8, None: 1}.get(orientation, orientation)


def test_unchanged_files_are_read_once_and_large_sets_keep_a_cache_file(tmp_path, monkeypatch):
    from csgr_distill.data import images as I

    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(I, "CACHE_MIN_IMAGES", 3)
    paths = [str(tmp_path / f"{i}.jpg") for i in range(3)]
    for i, p in enumerate(paths):
        _photo(p, 40 + i, 30, ROTATED)
    reads = []
    real = I.read_header
    monkeypatch.setattr(I, "read_header", lambda p: reads.append(p) or real(p))
    source = str(tmp_path / "train.json")
    first = I.read_headers(paths, source)
    assert [(h.width, h.height) for h in first] == [(30, 40), (30, 41), (30, 42)]
    assert len(reads) == 3 and os.path.isfile(I.cache_file(source))
    I._SEEN.clear()  # a new process: the cache file answers
    assert I.read_headers(paths, source) == first and len(reads) == 3
    _photo(paths[1], 60, 30)  # replaced: read again
    again = I.read_headers(paths, source)
    assert reads[3:] == [paths[1]] and (again[1].width, again[1].height) == (60, 30)
    os.remove(paths[2])
    assert isinstance(I.read_headers(paths, source)[2], FileNotFoundError)
    # a small set keeps no cache file
    assert I.read_headers(paths[:2], str(tmp_path / "small.json"))
    assert not os.path.exists(I.cache_file(str(tmp_path / "small.json")))


def test_bad_image_files_are_one_error_listing_them_all_with_the_fix(tmp_path):
    """EXIF-rotated photos whose json gives the stored size (what many exporters write), a file
    that is not an image, a plain size mismatch: one error at registration, each kind with its
    count, up to MAX_LISTED files and its fix; detectron2 would have stopped at the first one
    the sampler drew (SizeMismatchError / UnidentifiedImageError)."""
    n_rotated = MAX_LISTED + 2
    files = {f"phone_{i:02d}.jpg": lambda p: _photo(p, 80, 60, ROTATED) for i in range(n_rotated)}
    files["notes.jpg"] = _not_an_image
    files["small.png"] = lambda p: _photo(p, 20, 10)
    sizes = dict.fromkeys(files, (80, 60))
    json_file, image_root = _coco_with_files(str(tmp_path), files, sizes)
    name = _fresh("bad")
    with pytest.raises(D.DatasetContentError) as e:
        D.register_from_cfg(_cfg([[name, "coco", json_file, image_root]]))
    msg = str(e.value)
    total = n_rotated + 2
    assert msg.startswith(f"Dataset '{name}': images listed in {json_file} cannot be trained on")
    assert f"{n_rotated} of {total} images listed in {json_file} are EXIF-rotated to another " \
           "size than the annotations give:" in msg
    assert f"{os.path.join(image_root, 'phone_00.jpg')}: 80x60 in the annotations, 60x80 as " \
           "detectron2 reads it (stored 80x60, EXIF orientation 6: turned 90 degrees " \
           "clockwise)" in msg
    assert "... and 2 more" in msg and "phone_11.jpg" not in msg
    assert f"write the size detectron2 reads as width/height in {json_file}" in msg
    assert "remove the EXIF orientation tag from the files" in msg
    assert f"1 of {total} images listed in {json_file} is not an image file that PIL opens" in msg
    assert "notes.jpg: UnidentifiedImageError" in msg
    assert f"small.png: 80x60 in the annotations, 20x10 as detectron2 reads it\n" in msg
    assert name not in DatasetCatalog.list()
    # the json written with the size detectron2 reads registers, and loads
    with open(json_file) as f:
        data = json.load(f)
    for im in data["images"]:
        im["width"], im["height"] = {"notes.jpg": (60, 80), "small.png": (20, 10)}.get(
            im["file_name"], (60, 80))
    data["images"] = [im for im in data["images"] if im["file_name"] != "notes.jpg"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != n_rotated + 1]
    with open(json_file, "w") as f:
        json.dump(data, f)
    D.register_from_cfg(_cfg([[name, "coco", json_file, image_root]]))
    assert len(DatasetCatalog.get(name)) == n_rotated + 1
    from csgr_distill.data.checks import MAX_LISTED as listed

    assert listed == MAX_LISTED


def test_missing_files_are_listed_with_the_other_problems(tmp_path):
    files = {"a.png": lambda p: _photo(p, 30, 20), "b.png": lambda p: _photo(p, 30, 20)}
    json_file, image_root = _coco_with_files(str(tmp_path), files, {"a.png": (30, 20),
                                                                    "b.png": (31, 20)})
    os.remove(os.path.join(image_root, "a.png"))
    with pytest.raises(D.DatasetFileNotFoundError) as e:
        D.register_from_cfg(_cfg([[_fresh("missing"), "coco", json_file, image_root]]))
    msg = str(e.value)
    assert f"1 of 2 images listed in {json_file}: {os.path.join(image_root, 'a.png')}" in msg
    assert "b.png: 31x20 in the annotations, 30x20 as detectron2 reads it" in msg


def test_bad_data_stops_train_net_with_one_error_line_before_training(tmp_path, monkeypatch):
    """Through the tool: exit code 2, one ``error:`` line naming the file and the fix, no
    traceback (before: training started, and detectron2's SizeMismatchError came as a traceback
    when the sampler drew the photo)."""
    files = {f"{i}.jpg": lambda p: _photo(p, 64, 48, ROTATED) for i in range(2)}
    json_file, image_root = _coco_with_files(str(tmp_path / "data"), files,
                                             dict.fromkeys(files, (64, 48)))
    name = _fresh("cli")
    cfg = base_cfg(tmp_path / "out")
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (name,), ()
    cfg.MODEL.RETINANET.NUM_CLASSES = 1
    (tmp_path / "cfg.yaml").write_text(cfg.dump())
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    code = run_cli(train_net.cli, ["--config-file", str(tmp_path / "cfg.yaml"),
                                   "--register-dataset", f"{name}=coco:{json_file}:{image_root}"])
    out = err.getvalue()
    assert code == USER_ERROR_EXIT and "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: Dataset '{name}'"), out
    assert "EXIF orientation 6" in out and "Fix:" in out
    assert not os.path.exists(tmp_path / "out" / "last_checkpoint")


@pytest.mark.parametrize("edit,fragments", [
    (lambda d: d["annotations"][1].update(bbox=["28.0", "12", "30", "40"]),
     ["annotations have a bbox whose values are not finite numbers", "annotation id 2: bbox "
      "['28.0', '12', '30', '40']", "not strings"]),
    (lambda d: d["annotations"][0].update(bbox=[1.0, float("nan"), 3.0, 4.0]),
     ["annotation id 1: bbox [1.0, nan, 3.0, 4.0]"]),
    (lambda d: d["images"][1].update(width="64"),
     ["images have a width or height that is not a positive number", "images[1] (sub/b.png): "
      "width '64', height 64", "not strings"]),
    (lambda d: d["annotations"][2].update(area="640"), ["annotation id 3: area '640'"]),
    (lambda d: d["annotations"][2].update(category_id="3"),
     ["category_id that is not an integer", "annotation id 3: category_id '3'"]),
    (lambda d: d["annotations"][2].update(iscrowd=2), ["iscrowd that is not 0 or 1"]),
    (lambda d: d["annotations"][2].update(ignore=1), ["'ignore' flag", "\"iscrowd\": 1"]),
])
def test_annotation_values_that_are_not_numbers_name_the_json_the_id_and_the_fix(
        tmp_path, edit, fragments):
    json_file, image_root = make_coco(str(tmp_path), edit=edit)
    with pytest.raises(D.DatasetContentError) as e:
        D.register_from_cfg(_cfg([[_fresh("values"), "coco", json_file, image_root]]))
    assert str(e.value).startswith(json_file)
    for f in fragments:
        assert f in str(e.value), str(e.value)


# ------------------------------------------------------------------------------------------------
# 2. ids and files given twice
# ------------------------------------------------------------------------------------------------
def test_duplicate_image_ids_are_refused_naming_both_entries(tmp_path):
    """Before: the second image trained with the first one's boxes and its own were dropped,
    under a misleading "annotations name an image_id that is not among its images"."""
    json_file, image_root = make_coco(str(tmp_path), edit=lambda d: d["images"][1].update(id=1))
    with pytest.raises(D.DatasetContentError) as e:
        D.register_from_cfg(_cfg([[_fresh("dupid"), "coco", json_file, image_root]]))
    msg = str(e.value)
    assert f"{json_file} (dataset '" in msg
    assert "1 image ids are given twice: id 1: images[0] (a.png) and images[1] (sub/b.png)" in msg
    assert "Give every image its own id" in msg


def test_duplicate_file_names_and_annotation_ids_are_refused(tmp_path):
    json_file, image_root = make_coco(
        str(tmp_path), edit=lambda d: d["images"][1].update(file_name="./a.png"))
    with pytest.raises(D.DatasetContentError, match=r"image files are listed twice: ./a.png: "
                                                    r"images\[0\] \(id 1\) and images\[1\] "
                                                    r"\(id 2\)"):
        D.register_from_cfg(_cfg([[_fresh("dupfile"), "coco", json_file, image_root]]))
    json_file, image_root = make_coco(
        str(tmp_path / "a"), edit=lambda d: d["annotations"][2].update(id=1))
    with pytest.raises(D.DatasetContentError, match=r"annotation ids are given twice, e.g. id 1 "
                                                    r"\(annotations\[0\] and annotations\[2\]\)"):
        D.register_from_cfg(_cfg([[_fresh("dupann"), "coco", json_file, image_root]]))
    voc = make_voc(str(tmp_path / "v"))
    split = os.path.join(voc, "ImageSets", "Main", "train.txt")
    with open(split, "a") as f:
        f.write("000001\n")
    with pytest.raises(D.DatasetContentError, match="lists 1 image ids twice, e.g. '000001' "
                                                    r"\(entries 1 and 3\)"):
        D.register_from_cfg(_cfg([[_fresh("dupvoc"), "voc", voc, "train"]]))


# ------------------------------------------------------------------------------------------------
# 6. classes without boxes
# ------------------------------------------------------------------------------------------------
def test_category_without_boxes_is_a_warning_naming_it_and_how_to_drop_it(tmp_path, caplog):
    cats = [{"id": 0, "name": "objects"}, {"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
    json_file, image_root = make_coco(str(tmp_path), cats=cats)
    name = _fresh("dead")
    cfg = _cfg([[name, "coco", json_file, image_root]], train=[name])
    D.register_from_cfg(cfg)
    cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.RETINANET.NUM_CLASSES = "RetinaNet", 3
    with caplog.at_level(logging.WARNING):
        assert D.check_training_data(cfg) == ["objects", "cat", "dog"]
    assert f"Classes without boxes in DATASETS.TRAIN ['{name}']: ['objects']" in caplog.text
    assert f"delete 'objects' (id 0) from the \"categories\" of {json_file}" in caplog.text
    assert "the class count is then 2" in caplog.text
    assert MetadataCatalog.get(name).class_box_counts == [0, 1, 2]
    cfg.MODEL.RETINANET.NUM_CLASSES = 5
    with pytest.raises(ValueError, match=r"Set MODEL.RETINANET.NUM_CLASSES 3 .*; without the "
                                         r"classes that have no boxes, \['objects'\], it would "
                                         r"be 2 \(docs/own_data.md"):
        D.check_num_classes(cfg)
    # the demo / gain pipeline warns too
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        D.pipeline_overrides([], name)
    assert "Classes without boxes in --train" in caplog.text
    # VOC: a class of the given list that no XML has
    voc = make_voc(str(tmp_path / "v"))
    vname = _fresh("dead_voc")
    D.register_from_cfg(_cfg([[vname, "voc", voc, "train", "cat,dog,bird"]]))
    caplog.clear()
    cfg = _cfg(train=[vname])
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    with caplog.at_level(logging.WARNING):
        D.check_training_data(cfg)
    assert f"remove ['bird'] from the class list of the '{vname}' entry" in caplog.text
    # every class with boxes: no warning
    caplog.clear()
    ok = _fresh("alive")
    D.register_from_cfg(_cfg([[ok, "voc", voc, "train"]]))
    cfg = _cfg(train=[ok])
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    with caplog.at_level(logging.WARNING):
        D.check_training_data(cfg)
    assert "without boxes" not in caplog.text


def test_test_set_with_other_classes_is_an_error(tmp_path):
    """The evaluators map the model's class k to the test set's k-th class: another list (e.g.
    the dead class dropped from the training json only) would give a wrong AP silently."""
    train_json, image_root = make_coco(str(tmp_path))  # cat, dog
    test_json, _ = make_coco(str(tmp_path), json_name="val.json",
                             cats=[{"id": 0, "name": "objects"}] + [
                                 {"id": 3, "name": "dog"}, {"id": 1, "name": "cat"}])
    train, test = _fresh("train"), _fresh("val")
    cfg = _cfg([[train, "coco", train_json, image_root], [test, "coco", test_json, image_root]],
               train=[train], test=[test])
    D.register_from_cfg(cfg)
    cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.RETINANET.NUM_CLASSES = "RetinaNet", 2
    with pytest.raises(D.DatasetContentError, match=rf"DATASETS.TEST names '{test}', whose "
                                                    r"classes \['objects', 'cat', 'dog'\] are not "
                                                    r"the training classes \['cat', 'dog'\]"):
        D.check_training_data(cfg)


# ------------------------------------------------------------------------------------------------
# 7. smaller gaps
# ------------------------------------------------------------------------------------------------
def test_crowd_only_training_set_is_one_error_before_training(tmp_path):
    json_file, image_root = make_coco(
        str(tmp_path), edit=lambda d: [a.update(iscrowd=1) for a in d["annotations"]])
    name = _fresh("crowd")
    cfg = _cfg([[name, "coco", json_file, image_root]], train=[name])
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    D.register_from_cfg(cfg)
    # what detectron2 does with it: its training loader stops on an assertion
    with pytest.raises(AssertionError, match="No valid data found"):
        get_detection_dataset_dicts([name], filter_empty=True)
    with pytest.raises(D.DatasetContentError) as e:
        D.check_training_data(cfg)
    msg = str(e.value)
    assert f"({json_file} has 2 images and 0 boxes and 3 iscrowd regions; detectron2 skips " \
           "iscrowd regions in training)" in msg
    assert "Set \"iscrowd\": 0 on the annotations of single objects" in msg


def test_voc_png_images_are_accepted(tmp_path):
    voc = make_voc(str(tmp_path), write_images=False)
    for fid in ("000001", "000002"):
        _photo(os.path.join(voc, "JPEGImages", fid + ".png"), 64, 48)
    name = _fresh("vocpng")
    D.register_from_cfg(_cfg([[name, "voc", voc, "train"]]))
    assert [d["file_name"] for d in DatasetCatalog.get(name)] == [
        os.path.join(voc, "JPEGImages", f"{fid}.png") for fid in ("000001", "000002")]
    os.remove(os.path.join(voc, "JPEGImages", "000002.png"))
    with pytest.raises(D.DatasetFileNotFoundError) as e:
        DatasetCatalog.get(name)
    assert os.path.join(voc, "JPEGImages", "000002.jpg") in str(e.value)
    assert "as <id>.jpg (or .jpeg, .png, .bmp" in str(e.value)


def test_registration_line_reaches_the_console_and_log_txt(tmp_path, monkeypatch):
    """train_net.py registers the user's sets after detectron2's loggers are set up (before,
    the "Registered dataset" info line went to no handler at all)."""
    json_file, image_root = make_coco(str(tmp_path / "data"))
    name = _fresh("logged")
    cfg = base_cfg(tmp_path / "out")
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (name,), ()
    (tmp_path / "cfg.yaml").write_text(cfg.dump())
    parser = D.add_dataset_arguments(default_argument_parser())
    args = parser.parse_args(["--config-file", str(tmp_path / "cfg.yaml"), "--register-dataset",
                              f"{name}=coco:{json_file}:{image_root}"])
    console = io.StringIO()  # the handler keeps it: not a stream pytest closes
    monkeypatch.setattr(sys, "stdout", console)
    train_net.setup(args)
    line = f"Registered dataset '{name}' (coco, {json_file}): 2 images (checked), 3 boxes"
    assert line in console.getvalue()
    assert line in (tmp_path / "out" / "log.txt").read_text()
