#!/usr/bin/env python
"""Write ``docs/configuration.md`` from the config schema's own comments, so the page cannot
drift from the code (``tests/test_config_docs.py`` checks it is up to date):

    tools/config_docs.py            # rewrite docs/configuration.md
    tools/config_docs.py --check    # exit 1 when it is out of date

Every key the project adds is documented where it is defined, by the comment lines right above
its assignment (or at its end): the core ``MODEL.DISTILL`` keys, the decay schedule and the
project's detector and data keys in ``csgr_distill/config.py``; each registered method's section
``MODEL.DISTILL.<METHOD>`` in its own file (``Distiller.add_config``). A key without a comment of
its own shares the comment of the key above it (one comment over a group). Defaults are read
from a config built the way every tool builds one.
"""
import argparse
import ast
import inspect
import os
import sys
import textwrap
from typing import Callable, Dict, List, Tuple

import csgr_distill  # noqa: F401  (registers every method and its config section)
from csgr_distill import config as schema
from csgr_distill.distillers import DISTILLER_REGISTRY, registered_distillers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(REPO, "docs", "configuration.md")


def documented_keys(fn: Callable, prefixes: Dict[str, str],
                    intro: List[str] = None) -> List[Tuple[str, str]]:
    """``[(key, comment)]`` of the assignments in ``fn``'s source, in order. ``prefixes`` maps
    the name an assignment starts with (``_C``, ``cfg``, ``node``, ``d``) to the key prefix it
    stands for (``""``, ``"MODEL.DISTILL.CSGR."``, ...). A comment block with a bare ``#`` line
    is a section's introduction up to that line (appended to ``intro``)."""
    intro = [] if intro is None else intro
    source = textwrap.dedent(inspect.getsource(fn))
    lines = source.splitlines()
    out: List[Tuple[str, str]] = []
    shared = ""
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Attribute)):
            continue
        target = ast.unparse(node.targets[0])
        head, _, rest = target.partition(".")
        if head not in prefixes or not rest.split(".")[-1].isupper():
            continue
        if isinstance(node.value, ast.Call) and ast.unparse(node.value.func) in ("CN", "CfgNode"):
            continue  # a section, not a key
        comment, i = [], node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            comment.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        if "" in comment:  # a bare "#" ends a section's introduction: the key's own text follows
            cut = len(comment) - comment[::-1].index("")
            intro.append(" ".join(c for c in comment[:cut] if c))
            comment = comment[cut:]
        own = lines[node.lineno - 1]
        if "#" in own.split("=", 1)[1]:
            comment.append(own.split("#", 1)[1].strip())
        text = " ".join(c for c in comment if c)
        if text:
            shared = text
        elif i == node.lineno - 2 and lines[i].strip():  # right under another key: its group
            text = shared
        out.append((prefixes[head] + rest, text))
    return sorted(out, key=lambda kc: _order(source, kc[0], prefixes))


def _order(source: str, key: str, prefixes: Dict[str, str]) -> int:
    for head, prefix in prefixes.items():
        if key.startswith(prefix):
            at = source.find(f"{head}.{key[len(prefix):]} ")
            if at >= 0:
                return at
    return len(source)


def default_of(cfg, key: str) -> str:
    node = cfg
    for part in key.split("."):
        node = node[part]
    if hasattr(node, "TYPE"):  # a decay-schedule node
        return f"schedule node, `TYPE {node.TYPE!r}`"
    value = list(node) if isinstance(node, tuple) else node
    return f"`{value!r}`".replace("|", "\\|")


def sections() -> List[Tuple[str, str, List[Tuple[str, str]]]]:
    """``[(title, introduction, [(key, comment)])]`` of the whole schema."""
    methods = []
    for name in registered_distillers():
        cls = DISTILLER_REGISTRY.get(name)
        node = f"MODEL.DISTILL.{cls.config_node}."
        intro: List[str] = []
        keys = documented_keys(cls.add_config, {"node": node}, intro)
        if not any(k == node + "DECAY.TYPE" for k, _ in keys) and \
                not any(k.startswith(node + "DECAY") for k, _ in keys):
            keys.append((node + "DECAY.TYPE", "The method's own decay schedule (a "
                         "MODEL.DISTILL.DECAY node): \"default\" follows MODEL.DISTILL.DECAY."))
        page = f"[docs/methods/{name}.md](methods/{name}.md)"
        methods.append((f"`MODEL.DISTILL.{cls.config_node}` — {name}",
                        " ".join(intro + [
                            f"Declared in `{os.path.relpath(inspect.getsourcefile(cls), REPO)}` "
                            f"(`{cls.__name__}.add_config`); the method: {page}."]), keys))
    core = documented_keys(schema.add_distill_config, {"_C": ""})
    decay = documented_keys(schema.decay_node, {"node": "MODEL.DISTILL.DECAY."})
    arch = documented_keys(schema.add_architecture_config, {"cfg": ""})
    detr = documented_keys(schema.add_detr_config, {"d": "MODEL.DETR."})
    data = documented_keys(schema.add_data_config, {"cfg": ""})
    return ([("`MODEL.DISTILL` — the framework", "`csgr_distill/config.py`, "
              "`add_distill_config`.", core),
             ("`MODEL.DISTILL.DECAY` — decay schedules", "`csgr_distill/config.py`, "
              "`decay_node`: the same keys in `MODEL.DISTILL.DECAY` and in each method's "
              "`DECAY`.", decay)]
            + methods
            + [("Detector keys the project adds", "`csgr_distill/config.py`, "
                "`add_architecture_config` (also what an exported student's config needs).",
                arch),
               ("`MODEL.DETR` — DETR and Deformable DETR", "`csgr_distill/config.py`, "
                "`add_detr_config`; [docs/detr_port.md](detr_port.md).", detr),
               ("Data and input keys", "`csgr_distill/config.py`, `add_data_config`; "
                "[docs/own_data.md](own_data.md).", data)])


def render() -> str:
    from detectron2.config import get_cfg

    cfg = schema.add_distill_config(get_cfg())
    out = ["# Configuration", "",
           "<!-- Generated by tools/config_docs.py from the comments of the schema; do not edit "
           "by hand (tests/test_config_docs.py fails when it is out of date). -->", "",
           "Every key csgr_distill adds to detectron2's config, with its default and what it "
           "means — the comment written above the key where it is defined. Sources of the "
           "values: *paper*, *released code* (the authors'), or *ours* with how it was chosen. "
           "A method's keys are declared in its own file; [docs/extending.md](extending.md) "
           "says how to add one.", ""]
    out += ["Values the project adds to detectron2's own keys:", "",
            "* `SOLVER.CLIP_GRADIENTS.CLIP_TYPE \"full_model\"` clips the norm of *all* "
            "gradients together to `CLIP_VALUE` (p = `NORM_TYPE`; FGD's protocol, the SODA10M "
            "configs' default); detectron2's `\"norm\"` clips each parameter alone and "
            "`\"value\"` each element. A plain student yaml exported from a `full_model` run "
            "evaluates in plain detectron2; to train from it there, set `CLIP_TYPE` back to "
            "`norm`.",
            "* `SOLVER.STEPS` may be fractions of `SOLVER.MAX_ITER` (e.g. `(0.8, 0.95)`), so "
            "that `MAX_ITER` alone changes the schedule ([own_data.md](own_data.md)).", ""]
    for title, intro, keys in sections():
        out += [f"## {title}", "", intro, "", "| key | default | meaning |", "|---|---|---|"]
        for key, comment in keys:
            out.append(f"| `{key}` | {default_of(cfg, key)} | "
                       f"{comment.replace('|', chr(92) + '|') or '—'} |")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true",
                   help="exit 1 when docs/configuration.md differs from what would be written")
    p.add_argument("--output", default=OUTPUT)
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = open(args.output).read() if os.path.isfile(args.output) else ""
        if current != text:
            print(f"{args.output} is out of date: run tools/config_docs.py", file=sys.stderr)
            return 1
        return 0
    with open(args.output, "w") as f:
        f.write(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
