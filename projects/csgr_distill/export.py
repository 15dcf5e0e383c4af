"""The one exporter: a plain detectron2 student (checkpoint + config) from a distillation run.

``<name>.pth`` holds ``{"model": student weights}``: the distillation checkpoint's model without
the distillation-only tensors (:data:`DISTILL_ONLY_PREFIXES`), no optimizer, scheduler or
iteration. ``<name>.yaml`` beside it is the student's config as plain detectron2 reads it
(``get_cfg(); cfg.merge_from_file(yaml)`` in a process that never imported ``csgr_distill``):
``MODEL.META_ARCHITECTURE`` is the detectron2 base class of the ``Distill*`` one, every key
detectron2's ``get_cfg()`` lacks (``MODEL.DISTILL``, ...) is left out, and ``MODEL.WEIGHTS`` is the
absolute path of ``<name>.pth``.

Used by the trainer (``model_final_student.{pth,yaml}`` at the end of a distillation run) and by
``tools/export_student.py``. :class:`StudentCheckpointer` loads distillation checkpoints into a
model built without distillers. :func:`export_torchscript` (``export_student.py --format
torchscript``) writes ``<name>.ts``: the plain student traced with detectron2's ``TracingAdapter``,
which runs with torch and torchvision alone.
"""
import logging
import os
from typing import Dict, List, Mapping, Optional

import numpy as np
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.file_io import PathManager

from .checkpoint import CheckedCheckpointer, atomic_open, read_checkpoint
from .config import add_architecture_config
from .meta_arch.base import DistillMixin

logger = logging.getLogger(__name__)

__all__ = [
    "DISTILL_ONLY_PREFIXES",
    "student_state_dict",
    "plain_meta_architecture",
    "plain_student_cfg",
    "write_student",
    "export_student",
    "StudentCheckpointer",
    "without_distillation",
    "TORCHSCRIPT_ARCHITECTURES",
    "check_torchscript_supported",
    "export_torchscript",
    "torchscript_sample",
]

#: state_dict prefixes that exist only for distillation (distiller adapters, classifiers, ...).
DISTILL_ONLY_PREFIXES = ("distillers.",)


def student_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The keys a plain detectron2 model of the student's base class has."""
    return {k: v for k, v in state_dict.items() if not k.startswith(DISTILL_ONLY_PREFIXES)}


def plain_meta_architecture(name: str) -> str:
    """The detectron2 meta-architecture a registered ``name`` is built on.

    The first class in the MRO of ``META_ARCH_REGISTRY.get(name)`` that is itself registered
    (under its class name) and is not a :class:`~csgr_distill.meta_arch.base.DistillMixin`:
    ``DistillRetinaNet -> RetinaNet``, ``DistillGeneralizedRCNN -> GeneralizedRCNN``; a name that
    is not a ``DistillMixin`` is returned unchanged.
    """
    cls = META_ARCH_REGISTRY.get(name)
    registered = set(META_ARCH_REGISTRY)  # (name, class) pairs
    for base in cls.__mro__:
        if issubclass(base, DistillMixin):
            continue
        if (base.__name__, base) in registered:
            return base.__name__
    raise ValueError(f"MODEL.META_ARCHITECTURE {name!r} has no base class registered in "
                     "META_ARCH_REGISTRY that is not a DistillMixin; a plain detectron2 config "
                     "cannot name it")


def _is_project_architecture(name: str) -> bool:
    """Whether a registered meta-architecture is defined by this project (not detectron2)."""
    return META_ARCH_REGISTRY.get(name).__module__.startswith(__package__ + ".")


def _prune(cfg: CfgNode, reference: CfgNode, prefix: str, removed: List[str]) -> None:
    """Delete (in place) every key of ``cfg`` that ``reference`` lacks; record their full names."""
    for key in list(cfg.keys()):
        if key not in reference:
            removed.append(prefix + key)
            del cfg[key]
        elif isinstance(cfg[key], CfgNode) and isinstance(reference[key], CfgNode):
            _prune(cfg[key], reference[key], prefix + key + ".", removed)


def plain_student_cfg(cfg: CfgNode, weights: str) -> CfgNode:
    """The student's config as plain detectron2 has it: detectron2's ``get_cfg()`` merged with
    ``cfg`` minus the keys ``get_cfg()`` lacks, the base meta-architecture, ``MODEL.WEIGHTS =
    weights``. Merging into ``get_cfg()`` here is the check that the file will load."""
    student = cfg.clone()
    student.defrost()
    removed: List[str] = []
    arch = plain_meta_architecture(cfg.MODEL.META_ARCHITECTURE)
    plain = get_cfg()
    if _is_project_architecture(arch):
        # e.g. DistributionRetinaNet: its own keys stay; loading it needs `import csgr_distill`
        add_architecture_config(plain)
        logger.info("The plain student is a %s, a meta-architecture of csgr_distill: load it "
                    "where csgr_distill is imported (tools/train_net.py does)", arch)
    _prune(student, plain, "", removed)
    student.MODEL.META_ARCHITECTURE = arch
    student.MODEL.WEIGHTS = weights
    plain.merge_from_other_cfg(student)
    if removed:
        logger.info("Plain student config: left out %d key(s) detectron2 does not have: %s",
                    len(removed), ", ".join(removed))
    return plain


def write_student(state_dict: Mapping[str, torch.Tensor], output: str,
                  cfg: Optional[CfgNode] = None) -> Dict[str, object]:
    """Write ``output`` (``{"model": student weights}``) and, given the student's ``cfg``, the
    plain config beside it (``output`` with ``.yaml``; ``MODEL.WEIGHTS`` = absolute ``output``).

    Returns ``{"kept": n, "dropped": n, "checkpoint": output, "config": yaml path or None}``.
    """
    kept = student_state_dict(state_dict)
    output = os.path.abspath(output)
    yaml_path = os.path.splitext(output)[0] + ".yaml" if cfg is not None else None
    plain = plain_student_cfg(cfg, output) if cfg is not None else None  # fails before writing
    PathManager.mkdirs(os.path.dirname(output))
    with atomic_open(output, "wb") as f:  # whole or not at all (a full disk leaves nothing)
        torch.save({"model": kept, "__author__": "csgr_distill.export"}, f)
    if plain is not None:
        with atomic_open(yaml_path, "w") as f:
            f.write(plain.dump())
    counts = {"kept": len(kept), "dropped": len(state_dict) - len(kept), "checkpoint": output,
              "config": yaml_path}
    logger.info("Wrote the plain student %s (%d tensors, %d distillation-only dropped)%s",
                output, counts["kept"], counts["dropped"],
                f" and its config {yaml_path}" if yaml_path else "")
    return counts


def export_student(checkpoint: str, output: str, cfg: Optional[CfgNode] = None
                   ) -> Dict[str, object]:
    """:func:`write_student` of a training checkpoint (``model_final.pth``, ``model_0004999.pth``,
    ...): its ``"model"`` only, without optimizer, scheduler or iteration. Read without running
    code from the file (:func:`csgr_distill.checkpoint.read_checkpoint`: a file that is not a
    checkpoint is one clear error)."""
    if not PathManager.exists(checkpoint):
        raise FileNotFoundError(f"Checkpoint {checkpoint!r} does not exist (expected e.g. "
                                "output/<run>/model_final.pth)")
    loaded = read_checkpoint(checkpoint, "--checkpoint")
    return write_student(loaded.get("model", loaded), output, cfg)


def without_distillation(cfg: CfgNode) -> CfgNode:
    """A frozen copy of ``cfg`` with ``MODEL.DISTILL.ENABLED False``: the student alone (no
    distillers, nothing of the teacher read), into which :class:`StudentCheckpointer` loads a
    distillation checkpoint."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DISTILL.ENABLED = False
    cfg.freeze()
    return cfg


class StudentCheckpointer(CheckedCheckpointer):
    """A ``DetectionCheckpointer`` (with :class:`~csgr_distill.checkpoint.CheckedCheckpointer`'s
    checked reads: ``what`` names the weights in its messages) that loads a distillation
    checkpoint into a model built without distillers (``MODEL.DISTILL.ENABLED False``, or the
    plain base class): when the model has no key with a :data:`DISTILL_ONLY_PREFIXES` prefix, the
    checkpoint's keys with one are dropped with one info line (their count) instead of
    detectron2's "unexpected keys" warning. Every other key is loaded (and reported) exactly as
    detectron2 does."""

    def _load_model(self, checkpoint):
        state = checkpoint["model"]
        if not any(k.startswith(DISTILL_ONLY_PREFIXES) for k in self.model.state_dict()):
            dropped = [k for k in state if k.startswith(DISTILL_ONLY_PREFIXES)]
            for k in dropped:
                del state[k]
            if dropped:
                logger.info("Dropped %d distillation-only tensors (%s) of the checkpoint: the "
                            "model is built without distillers", len(dropped),
                            ", ".join(p + "*" for p in DISTILL_ONLY_PREFIXES))
        return super()._load_model(checkpoint)


# ------------------------------------------------------------------------------------------------
# TorchScript
# ------------------------------------------------------------------------------------------------
#: detectron2 meta-architectures (of the plain student) that :func:`export_torchscript` traces
TORCHSCRIPT_ARCHITECTURES = ("RetinaNet", "GeneralizedRCNN")

#: what the ``.ts`` file takes and returns (also stored in it as the extra file ``interface.txt``)
TORCHSCRIPT_INTERFACE = """\
input:  image, float32 [3, H, W], channel order INPUT.FORMAT ({format}), pixel values 0-255,
        already resized as the model was tested: short side INPUT.MIN_SIZE_TEST ({min_size}),
        long side at most INPUT.MAX_SIZE_TEST ({max_size}) (detectron2's ResizeShortestEdge)
output: (boxes float32 [N, 4] XYXY in the input image's pixels, scores float32 [N],
         classes int64 [N], indices into the class names below), best first
classes: {classes}
load:   import torch, torchvision  (torchvision registers the nms/roi_align ops the graph uses)
        model = torch.jit.load(path); boxes, scores, classes = model(image)
"""


def _boxes_scores_classes(model, inputs):
    """Inference for :class:`~detectron2.export.TracingAdapter`: (boxes, scores, classes) of the
    one input image, in its own pixels (R-CNN as detectron2's ``export_model.py``:
    ``inference(do_postprocess=False)``; dense detectors: their ``forward``, which postprocesses
    to the input's size when no ``height``/``width`` is given)."""
    from detectron2.modeling import GeneralizedRCNN

    if isinstance(model, GeneralizedRCNN):
        inst = model.inference(inputs, do_postprocess=False)[0]
    else:
        inst = model(inputs)[0]["instances"]
    return inst.pred_boxes.tensor, inst.scores, inst.pred_classes


def torchscript_sample(cfg, image_path: Optional[str] = None) -> torch.Tensor:
    """The image to trace with, as the model takes it (``[3, H, W]`` float, ``INPUT.FORMAT``,
    resized like the test set): ``image_path``, else the first image of ``DATASETS.TEST[0]``
    when that set is registered and on disk, else a fixed random image of the test size."""
    from detectron2.data import DatasetCatalog
    from detectron2.data import detection_utils as utils
    from detectron2.data import transforms as T

    if image_path is None and cfg.DATASETS.TEST and cfg.DATASETS.TEST[0] in DatasetCatalog.list():
        try:
            image_path = DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]["file_name"]
        except (OSError, IndexError, KeyError):  # not on disk: the synthetic image below
            image_path = None
    if image_path is not None:
        if not os.path.isfile(image_path):
            raise FileNotFoundError(f"Sample image {image_path!r} does not exist")
        image = utils.read_image(image_path, format=cfg.INPUT.FORMAT)
    else:
        size = int(cfg.INPUT.MIN_SIZE_TEST)
        image = np.random.RandomState(0).randint(0, 256, (size, size, 3)).astype(np.uint8)
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    image = aug.get_transform(image).apply_image(image)
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32"))


def check_torchscript_supported(plain_cfg: CfgNode) -> None:
    """Raise ValueError naming the key when ``--format torchscript`` cannot export this model."""
    arch = plain_cfg.MODEL.META_ARCHITECTURE
    if arch not in TORCHSCRIPT_ARCHITECTURES:
        raise ValueError(
            f"--format torchscript exports RetinaNet and Faster R-CNN (GeneralizedRCNN) students; "
            f"MODEL.META_ARCHITECTURE is {arch!r}. Export it with the default --format checkpoint")
    for key in ("MASK_ON", "KEYPOINT_ON"):
        if plain_cfg.MODEL.get(key, False):
            raise ValueError(f"--format torchscript exports box detectors only; MODEL.{key} is "
                             "True. Export it with the default --format checkpoint")
    if arch == "GeneralizedRCNN" and plain_cfg.MODEL.PROPOSAL_GENERATOR.NAME != "RPN":
        raise ValueError("--format torchscript exports Faster R-CNN with an RPN; "
                         f"MODEL.PROPOSAL_GENERATOR.NAME is "
                         f"{plain_cfg.MODEL.PROPOSAL_GENERATOR.NAME!r}")


def export_torchscript(state_dict: Mapping[str, torch.Tensor], cfg: CfgNode, output: str,
                       sample_image: Optional[str] = None) -> Dict[str, object]:
    """Trace the plain student (``cfg``: the distillation config, ``state_dict``: the training
    checkpoint's model) on the CPU with detectron2's ``TracingAdapter`` and ``torch.jit.trace``,
    check that the traced model returns exactly what the eager model returns on the sample image
    (:func:`torchscript_sample`) and on its mirror image, and save it to ``output`` (``.ts``),
    with :data:`TORCHSCRIPT_INTERFACE` as its extra file ``interface.txt``.

    Returns {"torchscript": output, "detections": number of detections on the sample image,
    "sample": (H, W)}. Raises ValueError for an architecture it does not export, RuntimeError
    when tracing fails or the traced outputs differ."""
    import warnings

    from detectron2.data import MetadataCatalog
    from detectron2.export import TracingAdapter
    from detectron2.modeling import build_model

    plain = plain_student_cfg(cfg, "")
    plain.defrost()
    plain.MODEL.DEVICE = "cpu"
    plain.freeze()
    check_torchscript_supported(plain)
    model = build_model(plain).eval()
    incompatible = model.load_state_dict(student_state_dict(state_dict), strict=False)
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise ValueError(
            "The checkpoint does not match --config-file: missing keys "
            f"{sorted(incompatible.missing_keys)[:8]}, unexpected keys "
            f"{sorted(incompatible.unexpected_keys)[:8]}; give the config it was trained with")
    for p in model.parameters():  # the traced graph then needs no autograd at all
        p.requires_grad_(False)
    image = torchscript_sample(plain, sample_image)
    adapter = TracingAdapter(model, ([{"image": image}],), _boxes_scores_classes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(adapter, (image,), check_trace=False)
    except Exception as e:  # noqa: BLE001  (said with the architecture, then the cause)
        raise RuntimeError(f"torch.jit.trace of the {plain.MODEL.META_ARCHITECTURE} student "
                           f"failed: {type(e).__name__}: {e}") from e
    for name, x in (("the sample image", image), ("its mirror image", image.flip(-1))):
        with torch.no_grad():
            eager = _boxes_scores_classes(model, [{"image": x}])
            got = traced(x)
        if not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(eager, got)):
            raise RuntimeError(f"The traced {plain.MODEL.META_ARCHITECTURE} student does not "
                               f"reproduce the eager model on {name}: {len(eager[0])} eager vs "
                               f"{len(got[0])} traced detections, or other values")
    names = None
    if plain.DATASETS.TRAIN:
        names = MetadataCatalog.get(plain.DATASETS.TRAIN[0]).get("thing_classes", None)
    interface = TORCHSCRIPT_INTERFACE.format(
        format=plain.INPUT.FORMAT, min_size=plain.INPUT.MIN_SIZE_TEST,
        max_size=plain.INPUT.MAX_SIZE_TEST, classes=", ".join(names) if names else "(unknown)")
    output = os.path.abspath(output)
    PathManager.mkdirs(os.path.dirname(output))
    with atomic_open(output, "wb") as f:
        torch.jit.save(traced, f, _extra_files={"interface.txt": interface})
    logger.info("Wrote the TorchScript student %s (traced on a %dx%d image, %d detections, "
                "equal to the eager model's)", output, image.shape[1], image.shape[2],
                len(eager[0]))
    return {"torchscript": output, "detections": int(len(eager[0])),
            "sample": (int(image.shape[1]), int(image.shape[2])), "interface": interface}
