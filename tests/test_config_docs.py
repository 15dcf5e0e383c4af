"""docs/configuration.md is generated from the schema's comments (tools/config_docs.py), so it
cannot drift: it must equal what the tool writes now, and every key the project adds must carry
a comment where it is defined (a method's keys in its own file)."""
import os
import sys

from tiny import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import config_docs  # noqa: E402


def test_configuration_page_is_up_to_date():
    with open(config_docs.OUTPUT) as f:
        assert f.read() == config_docs.render(), "run tools/config_docs.py"


def test_every_key_is_documented_where_it_is_defined():
    undocumented = [key for _, _, keys in config_docs.sections() for key, text in keys
                    if not text.strip()]
    assert undocumented == []


def test_every_method_key_is_on_the_page():
    """A key a method's add_config defines but the parser misses would be undocumented."""
    from detectron2.config import get_cfg

    from csgr_distill.config import add_distill_config

    cfg = add_distill_config(get_cfg())
    listed = {key for _, _, keys in config_docs.sections() for key, _ in keys}
    for node, section in cfg.MODEL.DISTILL.items():
        if not hasattr(section, "items") or node in ("TEACHER", "DECAY"):
            continue
        for key in section:
            full = f"MODEL.DISTILL.{node}.{key}"
            assert full in listed or f"{full}.TYPE" in listed, full
