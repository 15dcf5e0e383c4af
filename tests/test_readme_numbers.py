"""The README stays true and the docs hold together: every number of the README's results table is
the one in results/gain.json (so the test fails when either changes alone), the README is a page a
newcomer reads (at most 200 lines), every relative link of README.md, datasets/README.md and
docs/**/*.md reaches a file, and no tracked file cites the design inputs outside the repository."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
GAIN_JSON = os.path.join(REPO, "results", "gain.json")
MAX_README_LINES = 200

#: a data cell of the results table: "7.68 ± 0.61 (+1.74)", "16.27" (a teacher), optionally
#: followed by the json run label in backticks when it is not the row's method ("`FGD x0.01`")
CELL = re.compile(r"^(?P<ap>\d+\.\d{2})(?: ± (?P<std>\d+\.\d{2}))?"
                  r"(?: \((?P<gain>[+−-]\d+\.\d{2})\))?(?: `(?P<label>[^`]+)`)?$")
EMPTY = "—"
TEACHER = "teacher"


def results_table(text):
    """(header cells, body rows) of the first table after the README's "## Results" heading."""
    section = text.split("\n## Results\n", 1)
    assert len(section) == 2, "README.md has no '## Results' section"
    lines = section[1].split("\n## ", 1)[0].splitlines()
    rows = []
    for line in lines:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    assert len(rows) > 2, "no table under '## Results'"
    return rows[0], rows[2:]


def column_sections(header, gain):
    """json section of every data column: the one backticked name in its header."""
    sections = []
    for cell in header[1:]:
        names = re.findall(r"`([^`]+)`", cell)
        assert len(names) == 1, f"column {cell!r}: name its results/gain.json section in backticks"
        assert names[0] in gain, f"column {cell!r}: no section {names[0]!r} in results/gain.json"
        sections.append(names[0])
    return sections


def row_label(method_cell, section):
    """The json run label a row stands for: the longest run label of the section that the
    method cell (bold removed) starts with."""
    text = method_cell.replace("**", "")
    labels = [r["method"] for r in section["rows"]]
    matches = [lab for lab in labels if text == lab or text.startswith(lab + " ")
               or text.startswith(lab + ",")]
    return max(matches, key=len) if matches else None


def fmt(value, sign=False):
    return (f"{value:+.2f}" if sign else f"{value:.2f}").replace("-", "−")


def checked_cells():
    """(row, column, cell, expected) for every data cell of the README's results table."""
    with open(README, encoding="utf-8") as f:
        header, rows = results_table(f.read())
    with open(GAIN_JSON, encoding="utf-8") as f:
        gain = json.load(f)
    sections = column_sections(header, gain)
    out = []
    for row in rows:
        assert len(row) == len(header), f"row {row[0]!r}: {len(row)} cells, header {len(header)}"
        for name, cell in zip(sections, row[1:]):
            cell = cell.replace("**", "")
            if cell == EMPTY:
                continue
            m = CELL.match(cell)
            assert m, (f"row {row[0]!r}, column {name!r}: {cell!r} is neither {EMPTY!r} nor "
                       "'AP ± std (gain)' (a teacher: 'AP')")
            section = gain[name]
            if row[0].replace("**", "") == TEACHER:
                assert m["std"] is None and m["gain"] is None and m["label"] is None, cell
                out.append((row[0], name, m["ap"], fmt(section["teacher"]["AP"])))
                continue
            label = m["label"] or row_label(row[0], section)
            found = [r for r in section["rows"] if r["method"] == label]
            assert found, (f"row {row[0]!r}, column {name!r}: no run {label or row[0]!r} in "
                           f"that section of results/gain.json "
                           f"({[r['method'] for r in section['rows']]})")
            r = found[0]
            assert m["std"] is not None, f"row {row[0]!r}, column {name!r}: give the std"
            out.append((row[0], name, m["ap"], fmt(r["AP"])))
            out.append((row[0], name, m["std"], fmt(r["AP_std"])))
            if m["gain"] is not None:
                out.append((row[0], name, m["gain"], fmt(r["gain_AP"], sign=True)))
            else:
                assert r["gain_AP"] == 0.0, (f"row {row[0]!r}, column {name!r}: a distilled "
                                             "student's cell gives its gain")
    return out


def test_readme_results_table_equals_results_gain_json():
    cells = checked_cells()
    # every column holds numbers, and the table is not empty (a parse that found nothing fails)
    assert len(cells) >= 20, cells
    wrong = [(row, col, shown, want) for row, col, shown, want in cells if shown != want]
    assert not wrong, "README numbers that are not results/gain.json's: " + "; ".join(
        f"{row} / {col}: README {shown}, json {want}" for row, col, shown, want in wrong)


def test_the_table_check_fails_on_a_changed_number(tmp_path, monkeypatch):
    """The check above is not vacuous: one digit changed in the json is found."""
    with open(GAIN_JSON, encoding="utf-8") as f:
        gain = json.load(f)
    gain["shapes, rcnn"]["rows"][1]["AP"] += 0.01
    changed = tmp_path / "gain.json"
    changed.write_text(json.dumps(gain))
    monkeypatch.setattr(sys.modules[__name__], "GAIN_JSON", str(changed))
    with pytest.raises(AssertionError, match="shapes, rcnn: README 41.03, json 41.04"):
        test_readme_results_table_equals_results_gain_json()


def test_readme_is_a_page_a_newcomer_reads():
    with open(README, encoding="utf-8") as f:
        n = len(f.read().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES})"


def markdown_files():
    files = [README, os.path.join(REPO, "datasets", "README.md")]
    files += sorted(glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True))
    return files


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(path):
    """(line number, target) of every relative link or image of a markdown file, outside fenced
    code blocks and inline code."""
    links, fenced = [], False
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        line = re.sub(r"`[^`]*`", "", line)
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # http(s):, mailto:, an anchor of the same page
            links.append((number, target))
    # links whose text wraps onto the next line: "[text\ncontinued](target)"
    unfenced = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    for m in re.finditer(r"\[[^\]\n]*\n[^\]\n]*\]\(([^)\s]+)\)", unfenced):
        target = m.group(1)
        if not (re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#")):
            links.append((unfenced[:m.start()].count("\n") + 1, target))
    return links


def test_every_relative_link_of_the_docs_reaches_a_file():
    broken = []
    for path in markdown_files():
        for number, target in relative_links(path):
            file_part = target.split("#", 1)[0]
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
            if not os.path.exists(resolved):
                broken.append(f"{os.path.relpath(path, REPO)}:{number}: {target}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_the_link_check_sees_links_in_text_and_wrapped_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("see [a](docs/a.md#x) and ![b](b.png), not `[c](c.md)` or [d](https://e)\n"
                    "```\n[f](f.md)\n```\n[wrapped\ntext](g.md) [h](#anchor)\n")
    assert relative_links(str(page)) == [(1, "docs/a.md#x"), (1, "b.png"), (5, "g.md")]


#: the design inputs outside the repository (built from parts, so this file does not name them)
OUTSIDE_INPUTS = ("shared" + "/methods", "shared" + "/DESIGN")


def test_no_tracked_file_cites_the_design_inputs_outside_the_repository():
    try:
        # tracked files, and new files not yet added that git does not ignore
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], cwd=REPO, capture_output=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    citing = []
    for name in listed.decode().split("\0"):
        path = os.path.join(REPO, name)
        if not name or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" in data:
            continue  # a binary file
        text = data.decode("utf-8", errors="replace")
        for needle in OUTSIDE_INPUTS:
            if needle in text:
                line = text[:text.index(needle)].count("\n") + 1
                citing.append(f"{name}:{line}: {needle}")
    assert not citing, "tracked files citing files outside the repository:\n" + "\n".join(citing)


#: the README's matrix columns -> the demo student config of that pair (tools/benchmark.py gain)
MATRIX_CONFIGS = {"RetinaNet": "retinanet", "Faster R-CNN": "rcnn",
                  "distribution-head RetinaNet": "retinanet-dist", "DETR": "detr",
                  "Deformable DETR": "deformable-detr"}


def test_methods_and_detectors_matrix_is_what_the_methods_check():
    """Every ✓ of the README's "Methods and detectors" table is a pair the method's own build-time
    check accepts on that pair's demo configs (with its defaults), every "—" one it refuses."""
    from csgr_distill.benchmark import gain
    from csgr_distill.cli import load_config
    from csgr_distill.distillers import pair_problem, registered_distillers

    text = open(README).read()
    section = text.split("\n## Methods and detectors\n", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|")]
    header, body = rows[0], rows[2:]
    assert {r[0] for r in body} == set(registered_distillers()), "one row per registered method"
    checked = 0
    for row in body:
        method = row[0]
        for column, cell in zip(header[1:], row[1:]):
            if column not in MATRIX_CONFIGS or not (cell.startswith("✓") or cell == EMPTY):
                continue
            config = gain.DETECTORS[MATRIX_CONFIGS[column]][1]
            cfg = load_config(os.path.join(REPO, config),
                              ["MODEL.DISTILL.METHODS", f"['{method}']"], check_steps=False)
            problem = pair_problem(cfg)
            assert (problem is None) == cell.startswith("✓"), (method, column, cell, problem)
            checked += 1
    assert checked >= 30
