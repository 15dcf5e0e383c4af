"""COCO evaluation split by per-image domain tags (e.g. SODA10M's city/location/period/weather)."""
import contextlib
import copy
import io
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

from pycocotools.cocoeval import COCOeval

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation.coco_evaluation import COCOevalMaxDets
from detectron2.utils.logger import create_small_table

__all__ = ["DomainCOCOEvaluator", "domain_image_ids"]


def domain_image_ids(dataset_dicts: List[Dict], tag: str) -> Dict[str, List]:
    """``{tag value: [image_id, ...]}`` from dataset dicts (values in sorted order)."""
    groups: Dict[str, List] = {}
    for d in dataset_dicts:
        groups.setdefault(str(d.get(tag, "unknown")), []).append(d["image_id"])
    return OrderedDict(sorted(groups.items()))


class DomainCOCOEvaluator(COCOEvaluator):
    """:class:`COCOEvaluator` that also reports bbox AP and AP50 per domain-tag value.

    After the normal COCO evaluation, for every tag (e.g. ``period``) and every value of it found
    in the dataset dicts (e.g. ``daytime``), pycocotools' ``COCOeval`` is run again on the same
    predictions with ``params.imgIds`` restricted to the images having that value.

    Results: the normal ``"bbox"`` entry plus, per tag, a flat entry of scalars::

        results["bbox_by_period"] = {"daytime/AP": 51.2, "daytime/AP50": 77.0,
                                     "night/AP": 40.3, "night/AP50": 66.1}

    One level of nesting keeps detectron2's ``print_csv_format`` working, and
    ``flatten_results_dict`` turns it into ``"bbox_by_period/daytime/AP"`` for ``EventStorage``.
    A value whose images hold no ground-truth box reports NaN.
    """

    def __init__(
        self,
        dataset_name: str,
        tasks=None,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        *,
        tags: Optional[Sequence[str]] = None,
        use_fast_impl: bool = False,
        **kwargs,
    ):
        """
        Args:
            dataset_name, tasks, distributed, output_dir, **kwargs: as for ``COCOEvaluator``.
            tags: per-image keys of the dataset dicts to split by; default the metadata's
                ``domain_tags`` (none -> behaves like ``COCOEvaluator``).
            use_fast_impl: default False (this detectron2 build has no compiled ``_C``).
        """
        super().__init__(
            dataset_name,
            tasks=tasks,
            distributed=distributed,
            output_dir=output_dir,
            use_fast_impl=use_fast_impl,
            **kwargs,
        )
        self._dataset_name = dataset_name
        if tags is None:
            tags = MetadataCatalog.get(dataset_name).get("domain_tags", ())
        self._tags = tuple(tags)
        self._tag_groups = None  # loaded lazily from the dataset dicts
        if self._do_evaluation:
            self._prepare_ground_truth()

    def _prepare_ground_truth(self):
        """Make the original json agree with the training dicts: pycocotools needs ``area`` and
        ``iscrowd`` on every box (SODA10M may omit them), and degenerate boxes (w or h <= 0),
        which the loader skips, are marked crowd so that COCOeval ignores them."""
        num_degenerate = 0
        for ann in self._coco_api.dataset.get("annotations", []):
            w, h = float(ann["bbox"][2]), float(ann["bbox"][3])
            if "area" not in ann:
                ann["area"] = max(w, 0.0) * max(h, 0.0)
            ann.setdefault("iscrowd", 0)
            if w <= 0 or h <= 0:
                ann["iscrowd"] = 1
                num_degenerate += 1
        if num_degenerate:
            self._logger.info(
                f"{self._dataset_name}: {num_degenerate} degenerate ground-truth boxes "
                "(w or h <= 0) are ignored in evaluation, as in training."
            )

    def _groups(self) -> Dict[str, Dict[str, List]]:
        if self._tag_groups is None:
            dicts = DatasetCatalog.get(self._dataset_name)
            self._tag_groups = {tag: domain_image_ids(dicts, tag) for tag in self._tags}
        return self._tag_groups

    def _eval_predictions(self, predictions, img_ids=None):
        # the parent maps category ids in place (and loadRes adds fields): keep a pristine copy
        coco_results = copy.deepcopy([r for x in predictions for r in x.get("instances", [])])
        super()._eval_predictions(predictions, img_ids=img_ids)
        if not self._tags or not self._do_evaluation or "bbox" not in self._results:
            return
        if hasattr(self._metadata, "thing_dataset_id_to_contiguous_id"):
            reverse = {v: k for k, v in self._metadata.thing_dataset_id_to_contiguous_id.items()}
            for r in coco_results:
                r["category_id"] = reverse[r["category_id"]]
        coco_dt = None
        if coco_results:
            with contextlib.redirect_stdout(io.StringIO()):
                coco_dt = self._coco_api.loadRes(coco_results)
        allowed = None if img_ids is None else set(img_ids)
        for tag, groups in self._groups().items():
            res = OrderedDict()
            for value, ids in groups.items():
                if allowed is not None:
                    ids = [i for i in ids if i in allowed]
                ap, ap50 = self._eval_subset(coco_dt, ids)
                res[f"{value}/AP"] = ap
                res[f"{value}/AP50"] = ap50
            self._logger.info(f"bbox AP by {tag}:\n" + create_small_table(res))
            self._results[f"bbox_by_{tag}"] = res

    def _eval_subset(self, coco_dt, img_ids):
        nan = float("nan")
        if not img_ids:
            return nan, nan
        gt_ids = self._coco_api.getAnnIds(imgIds=img_ids, iscrowd=False)
        if not gt_ids:
            return nan, nan
        if coco_dt is None:  # no predictions at all
            return 0.0, 0.0
        max_dets = list(self._max_dets_per_image)
        # like detectron2: COCOeval's summary is hard-wired to 100 detections per image
        cocoeval_fn = COCOeval if max_dets[2] == 100 else COCOevalMaxDets
        ev = cocoeval_fn(self._coco_api, coco_dt, "bbox")
        ev.params.imgIds = list(img_ids)
        ev.params.maxDets = max_dets
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return tuple(float(s * 100) if s >= 0 else nan for s in ev.stats[:2])
