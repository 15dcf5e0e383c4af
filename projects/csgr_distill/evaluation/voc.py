"""detectron2's ``PascalVOCDetectionEvaluator`` for VOC-XML data written by other tools.

detectron2 evaluates from the XMLs (``parse_rec`` of ``pascal_voc_evaluation``), which requires
what the official VOC files always have: ``<pose>``, ``<truncated>`` and ``<difficult>`` in every
``<object>``, integer ``<bndbox>`` corners and class names without surrounding spaces. Annotation
tools (CVAT, Label Studio, Roboflow exports) often leave the first three out or write corners
such as ``10.5``: training reads such files (:func:`csgr_distill.data.custom.read_voc`), and
detectron2's evaluation would then crash after the last iteration (``'NoneType' object has no
attribute 'text'``) or score a class it cannot match. Here the split's XMLs are checked once;
when one is not in the official form, completed copies (pose ``Unspecified``, truncated 0,
difficult 0, corners rounded, names stripped) are written under the evaluator's output folder
and evaluated instead; the user's files are never touched.
"""
import logging
import os
import xml.etree.ElementTree as ET
from typing import List

from detectron2.data import MetadataCatalog
from detectron2.evaluation import PascalVOCDetectionEvaluator

logger = logging.getLogger(__name__)

#: the <object> children detectron2's parse_rec reads besides <name> and <bndbox>, with the
#: value written where one is missing
DEFAULTS = (("pose", "Unspecified"), ("truncated", "0"), ("difficult", "0"))
CORNERS = ("xmin", "ymin", "xmax", "ymax")


def _is_int(text) -> bool:
    try:
        int(text)
        return True
    except (TypeError, ValueError):
        return False


def needs_completion(xml_path: str) -> bool:
    """Whether detectron2's ``parse_rec`` would fail on (or misread) this XML."""
    for obj in ET.parse(xml_path).findall("object"):
        name = obj.find("name")
        if name is None or name.text is None or name.text != name.text.strip():
            return True
        if any(obj.find(k) is None or not (k == "pose" or _is_int(obj.find(k).text))
               for k, _ in DEFAULTS):
            return True
        box = obj.find("bndbox")
        if box is None or not all(_is_int(getattr(box.find(k), "text", None)) for k in CORNERS):
            return True
    return False


def completed(xml_path: str) -> ET.ElementTree:
    """The XML with every ``<object>`` in the official form (module docstring)."""
    tree = ET.parse(xml_path)
    for obj in tree.findall("object"):
        obj.find("name").text = obj.find("name").text.strip()
        for key, default in DEFAULTS:
            node = obj.find(key)
            if node is None:
                node = ET.SubElement(obj, key)
                node.text = default
            elif key != "pose" and not _is_int(node.text):
                node.text = str(int(round(float(node.text or default))))
        box = obj.find("bndbox")
        for key in CORNERS:
            node = box.find(key)
            node.text = str(int(round(float(node.text))))
    return tree


def _split_ids(meta) -> List[str]:
    """The split's image ids; none when its file is absent (the trainer's dataset check names
    missing files before evaluation; the evaluator alone can be built without them)."""
    path = os.path.join(meta.dirname, "ImageSets", "Main", meta.split + ".txt")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


def voc_evaluator(dataset_name: str, output_folder: str) -> PascalVOCDetectionEvaluator:
    """``PascalVOCDetectionEvaluator(dataset_name)``, reading completed copies of the split's XMLs
    from ``output_folder/voc_annotations/`` when any of them is not in the official form."""
    evaluator = PascalVOCDetectionEvaluator(dataset_name)
    meta = MetadataCatalog.get(dataset_name)
    ids = _split_ids(meta)
    xml = os.path.join(meta.dirname, "Annotations", "{}.xml")
    todo = [i for i in ids if os.path.isfile(xml.format(i)) and needs_completion(xml.format(i))]
    if not todo:
        return evaluator
    out = os.path.join(output_folder, "voc_annotations")
    os.makedirs(out, exist_ok=True)
    for i in ids:
        if os.path.isfile(xml.format(i)):
            completed(xml.format(i)).write(os.path.join(out, f"{i}.xml"))
    logger.info("%d of %d XMLs of %s lack <pose>/<truncated>/<difficult> or have non-integer "
                "corners, which detectron2's VOC evaluation needs: evaluating completed copies "
                "in %s", len(todo), len(ids), dataset_name, out)
    evaluator._anno_file_template = os.path.join(out, "{}.xml")  # detectron2 reads it there
    return evaluator
