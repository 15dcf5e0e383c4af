"""check_datasets: what the trainer checks about DATASETS.TRAIN / DATASETS.TEST before training."""
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from csgr_distill.data import register_shapes
from csgr_distill.data.errors import (
    DatasetNotFoundError,
    DatasetNotRegisteredError,
    check_datasets,
)
from tiny import TINY_TRAIN, TINY_VAL


@pytest.fixture
def registered():
    """Register datasets for one test and remove them afterwards."""
    names = []

    def add(name, register, *args, **kwargs):
        register(name, *args, **kwargs)
        names.append(name)
        return name

    yield add
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_registered_sets_on_disk_pass(tiny_shapes):
    check_datasets((TINY_TRAIN, TINY_VAL), "DATASETS.TRAIN")
    check_datasets((), "DATASETS.TEST")


def test_unregistered_name_is_named_with_its_key_and_close_names(tiny_shapes):
    with pytest.raises(DatasetNotRegisteredError) as e:
        check_datasets((TINY_VAL, "shapes_tiny_vall"), "DATASETS.TEST")
    message = str(e.value)
    assert message.startswith("DATASETS.TEST names dataset 'shapes_tiny_vall', which is not "
                              "registered in DatasetCatalog.")
    assert TINY_VAL in message  # the closest registered name


def test_missing_files_are_named_with_the_key(tmp_path, registered):
    name = registered("csgr_check_missing", register_coco_instances, {},
                      str(tmp_path / "annotations.json"), str(tmp_path / "images"))
    with pytest.raises(DatasetNotFoundError) as e:
        check_datasets((name,), "DATASETS.TEST")
    message = str(e.value)
    assert f"Dataset '{name}' (named in DATASETS.TEST) is registered but its files are missing" \
        in message
    assert str(tmp_path / "annotations.json") in message and str(tmp_path / "images") in message
    assert f"remove '{name}' from DATASETS.TEST" in message


def test_sets_generated_on_first_use_pass_and_are_generated(tmp_path, registered):
    name = registered("csgr_check_generated", register_shapes, str(tmp_path), "val",
                      num_images=2, image_size=32, seed=3)
    json_file = MetadataCatalog.get(name).json_file
    assert not os.path.exists(json_file)
    check_datasets((name,), "DATASETS.TEST")
    assert os.path.isfile(json_file)
