#!/usr/bin/env python
"""Compare finished runs: one markdown table of their final evaluations.

    tools/compare.py output/own-data/teacher output/own-data/baseline output/own-data/csgr
    tools/compare.py teacher=output/own-data/teacher baseline=output/own-data/baseline \\
        CSGR=output/own-data/csgr --baseline baseline

Each run is an ``OUTPUT_DIR`` holding ``eval_results.json`` (``tools/train_net.py`` writes it after
training and with ``--eval-only``) or that file itself, optionally as ``LABEL=PATH`` (default
label: the folder's name). The table has every bbox metric of the runs (COCO: AP, AP50, AP75,
APs, APm, APl; VOC: AP, AP50, AP75); ``—`` marks a metric without a value (no objects of that
size), said in a footnote. With ``--baseline LABEL``, a column of AP gained over that run. A
known user error prints one message (``--debug``: the traceback).
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

from csgr_distill.benchmark.common import NO_VALUE, markdown_table, missing, number_cell
from csgr_distill.cli import CliError, add_debug_argument, run_cli

#: the order of the columns; metrics outside it follow in the order the first run has them
METRIC_ORDER = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def read_run(spec: str) -> Tuple[str, Dict[str, object]]:
    """``[LABEL=]PATH`` -> (label, the ``bbox`` results of its ``eval_results.json``)."""
    label, sep, path = spec.partition("=")
    if not sep:
        label, path = "", spec
    if not os.path.exists(path):
        raise CliError(f"{spec}: {path} does not exist; give a run's OUTPUT_DIR or its "
                       "eval_results.json")
    file = os.path.join(path, "eval_results.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise CliError(f"{spec}: no {file}. Give a run's OUTPUT_DIR after its training finished "
                       "with an evaluation (DATASETS.TEST set), or evaluate it first: "
                       "tools/train_net.py --config-file <yaml> --eval-only MODEL.WEIGHTS "
                       f"<checkpoint> OUTPUT_DIR {path}")
    with open(file) as f:
        results = json.load(f)
    if "bbox" not in results:
        raise CliError(f"{file} has no bbox results (it has {sorted(results)})")
    if not label:
        label = os.path.basename(os.path.dirname(os.path.abspath(file)))
    return label, results["bbox"]


def comparison(runs: Sequence[Tuple[str, Dict[str, object]]], baseline: str = "") -> str:
    """The markdown table (+ footnote) of ``runs`` [(label, bbox results)]."""
    labels = [label for label, _ in runs]
    if baseline and baseline not in labels:
        raise CliError(f"--baseline {baseline!r} is not one of the runs {labels}")
    names: List[str] = [m for m in METRIC_ORDER if any(m in r for _, r in runs)]
    names += [m for _, r in runs for m in r if m not in names and "-" not in m]
    header = ["run"] + names
    base = dict(runs)[baseline] if baseline else None
    if base is not None:
        header.append(f"AP vs {baseline}")
    rows = []
    for label, r in runs:
        row = [label] + [number_cell(r.get(m)) for m in names]
        if base is not None:
            row.append(NO_VALUE if missing(r.get("AP")) or missing(base.get("AP"))
                       else f"{r['AP'] - base['AP']:+.2f}")
        rows.append(row)
    table = markdown_table(header, rows)
    if any(c == NO_VALUE for row in rows for c in row[1:]):
        table += f"\n\n{NO_VALUE} : no value (no objects of that size in the evaluation set)"
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="[LABEL=]PATH",
                        help="a run's OUTPUT_DIR or its eval_results.json")
    parser.add_argument("--baseline", default="", metavar="LABEL",
                        help="add a column of AP gained over this run")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    table = comparison([read_run(s) for s in args.runs], args.baseline)
    print(table)
    return table


if __name__ == "__main__":
    sys.exit(run_cli(main))
