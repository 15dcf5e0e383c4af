"""Evaluators: domain-split COCO evaluation and the trainer's evaluator factory."""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator

from .domain_evaluator import DomainCOCOEvaluator, domain_image_ids
from .voc import voc_evaluator

__all__ = ["DomainCOCOEvaluator", "domain_image_ids", "build_evaluator", "voc_evaluator"]


def build_evaluator(cfg, dataset_name: str, output_folder: str = None):
    """The evaluator for ``dataset_name``, chosen from its metadata.

    * metadata has ``domain_tags`` -> :class:`DomainCOCOEvaluator` (COCO AP + AP per tag value);
    * ``evaluator_type == "coco"`` -> ``COCOEvaluator(use_fast_impl=False)``;
    * ``evaluator_type == "pascal_voc"`` -> ``PascalVOCDetectionEvaluator`` (on completed copies of
      XMLs that other annotation tools wrote: :func:`voc_evaluator`).

    Args:
        cfg: the detectron2 config (``cfg.OUTPUT_DIR`` gives the default output folder).
        dataset_name: a registered dataset name (e.g. ``cfg.DATASETS.TEST[0]``).
        output_folder: default ``cfg.OUTPUT_DIR/inference``.
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    meta = MetadataCatalog.get(dataset_name)
    evaluator_type = meta.get("evaluator_type", None)
    if evaluator_type == "coco":
        json_file = meta.get("json_file", None)
        if json_file and not os.path.isfile(json_file):
            # datasets generated on first use (shapes) write their json when loaded; the others
            # raise a clear "missing files" error from their loader
            DatasetCatalog.get(dataset_name)
        if meta.get("domain_tags", None):
            return DomainCOCOEvaluator(dataset_name, output_dir=output_folder)
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)
    if meta.get("domain_tags", None):
        return DomainCOCOEvaluator(dataset_name, output_dir=output_folder)
    if evaluator_type == "pascal_voc":
        return voc_evaluator(dataset_name, output_folder)
    raise NotImplementedError(
        f"No evaluator for dataset '{dataset_name}' (evaluator_type={evaluator_type!r}). "
        "Supported: metadata with domain_tags, evaluator_type 'coco' or 'pascal_voc'. Set "
        f"MetadataCatalog.get({dataset_name!r}).evaluator_type when registering the dataset."
    )
