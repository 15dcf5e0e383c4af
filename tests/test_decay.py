import math

import pytest
from detectron2.config import get_cfg

from csgr_distill.config import add_distill_config
from csgr_distill.engine import DistillDecay


def test_none_is_one_everywhere():
    d = DistillDecay("none", 0, 10, 0.0)
    assert [d(i) for i in (0, 5, 10, 100)] == [1.0, 1.0, 1.0, 1.0]


def test_linear_tar_schedule():
    # TAR: factor = 1 - iter / max_iter
    d = DistillDecay("linear", 0, 100, 0.0)
    assert d(0) == 1.0 and d(25) == pytest.approx(0.75) and d(100) == 0.0 and d(150) == 0.0


def test_linear_with_start_and_final():
    d = DistillDecay("linear", 10, 30, 0.2)
    assert d(0) == 1.0 and d(10) == 1.0
    assert d(20) == pytest.approx(0.6)
    assert d(30) == pytest.approx(0.2) and d(1000) == pytest.approx(0.2)


def test_cosine_midpoint_and_ends():
    d = DistillDecay("cosine", 0, 40, 0.0)
    assert d(0) == pytest.approx(1.0)
    assert d(20) == pytest.approx(0.5)
    assert d(10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert d(40) == pytest.approx(0.0, abs=1e-12)


def test_step_and_exp():
    s = DistillDecay("step", 0, 50, 0.1)
    assert s(49) == 1.0 and s(50) == pytest.approx(0.1)
    e = DistillDecay("exp", 0, 100, 0.01)
    assert e(50) == pytest.approx(0.1) and e(100) == pytest.approx(0.01)


def test_warmup_multiplies():
    d = DistillDecay("none", 0, 0, 0.0, warmup=4)
    assert [d(i) for i in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_end_iter_defaults_to_max_iter():
    cfg = add_distill_config(get_cfg())
    cfg.SOLVER.MAX_ITER = 200
    cfg.MODEL.DISTILL.DECAY.TYPE = "linear"
    d = DistillDecay.from_config(cfg)
    assert d.end == 200 and d(100) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "args, key",
    [
        (("bogus", 0, 10, 0.0), "DECAY.TYPE"),
        (("linear", 10, 10, 0.0), "DECAY.END_ITER"),
        (("exp", 0, 10, 0.0), "FINAL_FACTOR"),
    ],
)
def test_bad_decay_config_names_the_key(args, key):
    with pytest.raises(ValueError, match=key):
        DistillDecay(*args)
