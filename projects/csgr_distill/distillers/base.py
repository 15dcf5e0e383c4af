"""The Distiller contract: a distillation method is one plug-in.

A method is a subclass of :class:`Distiller` registered with
:func:`~csgr_distill.distillers.registry.register_distiller`, in its own file (or folder), that
declares everything the rest of the project needs of it:

* **its config section** -- :meth:`Distiller.add_config` fills ``MODEL.DISTILL.<NODE>``
  (``NODE`` = :attr:`Distiller.config_node`, by default the registered name in capitals) with its
  keys, each with a comment: the published value and its source, or how ours was chosen
  (``docs/configuration.md`` is generated from these comments). A ``DECAY`` schedule node
  following ``MODEL.DISTILL.DECAY`` is added unless the method sets its own;
* **how it is built from the two detectors** -- ``from_config(cfg, student, teacher)`` (detectron2's
  ``@configurable``) receives the config and the two :class:`~csgr_distill.records.DetectorSpec`
  (config, meta-architecture, family, levels, class count; built from configs only, no weights)
  and raises ``ValueError``, naming the fix, for a pair it cannot distil. That, with the record
  fields below, is the only statement of which pairs a method supports: training, the
  benchmarks, the tests' method matrix and the docs all ask it
  (:func:`~csgr_distill.distillers.registry.pair_problem`);
* **what it reads** -- :attr:`Distiller.required_outputs`, the record fields per role (each
  role's family recorder checks them at build time), and :attr:`Distiller.in_features`, the
  levels it pairs (checked to exist in both with equal strides);
* **its losses** -- ``forward(student, teacher, gt_instances)`` on two
  :class:`~csgr_distill.outputs.DetectorOutputs` returns named, already weighted losses;
  :attr:`Distiller.loss_weight_keys` maps a loss-name prefix to the config key of its weight
  (named when a loss becomes non-finite or dwarfs the detection losses);
* **its benchmark variants** -- :attr:`Distiller.benchmark_variants` (:class:`Variant`): the
  options and combinations worth measuring besides its defaults;
* **a straightforward reference** -- :meth:`Distiller.reference_losses`, the formula written
  the plain way, which ``tools/benchmark.py kernels`` times and compares against ``forward``;
* **its pictures** -- a module ``csgr_distill.vis.<name in lower case>`` with
  ``pictures(inputs, distiller) -> [written files]``, found by name by ``tools/visualize.py``.
"""
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn

__all__ = ["Distiller", "Variant"]


@dataclass(frozen=True)
class Variant:
    """A benchmark run of a method besides its defaults.

    Attributes:
        opts: config overrides (``[KEY, VALUE, ...]``); without ``MODEL.DISTILL.METHODS`` the
            method itself is run, with it (e.g. ``["CSGR", "FGD"]``) a combination.
        families: the detector families (``"dense"``, ``"rcnn"``, ``"detr"``) where the run is
            worth measuring; None: wherever the pair is supported.
        parts: the parts of ``tools/benchmark.py`` that run it (``kernels`` compares one
            method's loss with its reference, so it never runs a combination).
    """

    opts: Tuple = ()
    families: Optional[Tuple[str, ...]] = None
    parts: Tuple[str, ...] = ("gain", "overhead", "kernels")

    def overrides(self, method: str) -> List:
        """The full overrides of the run: ``MODEL.DISTILL.METHODS`` first."""
        opts = list(self.opts)
        if "MODEL.DISTILL.METHODS" in opts[::2]:
            i = opts[::2].index("MODEL.DISTILL.METHODS") * 2
            methods = opts[i + 1]
            del opts[i:i + 2]
            return ["MODEL.DISTILL.METHODS", list(methods)] + opts
        return ["MODEL.DISTILL.METHODS", [method]] + opts


class Distiller(nn.Module):
    """Base class of every distillation method (module docstring: the contract).

    Subclasses set the class attributes they need and implement :meth:`add_config`,
    ``from_config`` (with ``@configurable`` on ``__init__``) and :meth:`forward`.
    """

    #: the registered name (``MODEL.DISTILL.METHODS``), set by ``register_distiller``
    name: ClassVar[str] = ""
    #: ``MODEL.DISTILL.<config_node>`` holds the method's keys (default: ``name.upper()``)
    config_node: ClassVar[str] = ""
    #: record fields read per role (checked by each role's recorder at build time)
    required_outputs: Dict[str, Tuple[str, ...]] = {"student": ("features",),
                                                    "teacher": ("features",)}
    #: levels paired between student and teacher (set by per-level methods)
    in_features: Sequence[str] = ()
    #: loss-name prefix -> config key of its weight
    loss_weight_keys: Dict[str, str] = {}
    #: label -> benchmark run besides the defaults
    benchmark_variants: ClassVar[Dict[str, Variant]] = {}

    @classmethod
    def add_config(cls, node) -> None:
        """Fill ``node`` (``MODEL.DISTILL.<config_node>``, a ``CfgNode``) with the method's keys,
        each with its comment."""
        raise NotImplementedError(f"{cls.__name__} must declare its config keys (add_config)")

    def forward(self, student, teacher, gt_instances) -> Dict[str, Tensor]:
        """``(DetectorOutputs, DetectorOutputs, list[Instances]) -> {loss name: weighted loss}``."""
        raise NotImplementedError

    def gt_boxes(self, gt_instances, n: int) -> List[Tensor]:
        """Per image the ``[B_i, 4]`` ground-truth boxes of ``gt_instances`` (``Instances`` with
        ``gt_boxes``, as the detectors' training forward receives them) for a method that reads
        them; one clear error when they are missing (a training-time loss called without them)."""
        if gt_instances is None or len(gt_instances) != n:
            got = "none" if gt_instances is None else len(gt_instances)
            raise ValueError(f"{self.name or type(self).__name__} needs the ground-truth instances "
                             f"of the {n} images of the batch (got {got}): it is a training-time "
                             "loss")
        return [inst.gt_boxes.tensor for inst in gt_instances]

    def reference_losses(self, student, teacher, gt_instances) -> Optional[Dict[str, Tensor]]:
        """The same losses as :meth:`forward`, computed the straightforward way (per branch, per
        level, per image: the formula as written), sharing this distiller's parameters; the
        yardstick of ``tools/benchmark.py kernels``. None: no reference."""
        return None
