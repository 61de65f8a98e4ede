"""The README as a newcomer reads it: its code blocks run as written, in order; its links lead
somewhere; its headline figures are the ones the docs quote (and `drive.py figures` checks)."""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

import drive
from conftest import ROOT, TINY_OPT

README = os.path.join(ROOT, "README.md")
README_LIMIT_BYTES = 15 * 1024
# Lines of the README's blocks that this test does not run, by how they start: why
NOT_RUN = {
    "pip install": "needs the network",
    "python -m pytest": "the suite this test is part of",
    "python drive.py ablate": "one run per suspect, thirteen in all: minutes even on the tiny model",
}
# Whole commands the test does not run: why
REPEATED = {"python ref_train.py --bs 2 --seq 128": "a later block runs it again, with --report baseline.json"}
# The python blocks build opt-125m's architecture; here the tiny OPT's, as the cached opt-125m is.
# The same loop at full size is docs/probe.md's script, which `drive.py figures` reruns.
AT_TINY_SIZE = {"OPTConfig()": f"OPTConfig(vocab_size=560, **{TINY_OPT})", "50272": "560"}


def readme_text():
    with open(README) as f:
        return f.read()


def code_blocks(text):
    """[(language, source)] of every bash and python block: what a user pastes. Output is `text`."""
    return re.findall(r"^```(bash|python)\n(.*?)^```", text, re.S | re.M)


def commands(source):
    """A bash block's commands, one per line, continuation lines joined."""
    return [line for line in source.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.fixture
def user_dir(tmp_path, hub_cache_with_tiny_opt):
    """(directory, environment) of a user's checkout: the project's scripts, `python` on the PATH
    being this interpreter, the tiny OPT as the cached opt-125m."""
    for script in glob.glob(os.path.join(ROOT, "*.py")):
        shutil.copy(script, tmp_path)
    (tmp_path / "bin").mkdir()
    python = tmp_path / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
               HF_HUB_CACHE=hub_cache_with_tiny_opt, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return tmp_path, env


def test_the_readme_is_at_most_15_kb():
    assert os.path.getsize(README) <= README_LIMIT_BYTES


def test_the_readme_assumes_no_history():
    # A newcomer has read nothing before it.
    text = readme_text().lower()
    for phrase in ("the seed", "pinned", "earlier session", "previous session", "with a profiler"):
        assert phrase not in text, phrase


def test_every_python_block_of_the_readme_names_the_file_it_is_saved_as():
    blocks = [source for language, source in code_blocks(readme_text()) if language == "python"]
    assert blocks
    for source in blocks:
        assert re.match(r"# [\w.]+\.py\n", source), source.splitlines()[0]
        compile(source, "readme", "exec")


def test_the_readmes_code_blocks_run_in_order_as_written_but_at_the_tiny_models_size(user_dir):
    directory, env = user_dir
    ran = []
    for language, source in code_blocks(readme_text()):
        if language == "python":   # saved under the name its first line gives, run by a later block
            for written, tiny in AT_TINY_SIZE.items():
                assert written in source, written
                source = source.replace(written, tiny)
            (directory / source.split()[1]).write_text(source)
            continue
        for command in commands(source):
            if command.startswith(tuple(NOT_RUN)) or command in REPEATED:
                continue
            done = subprocess.run(command, shell=True, cwd=directory, env=env, capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            ran.append(command)
    assert all(f"{c} --report baseline.json" in ran for c in REPEATED)
    # The blocks chain: step 2's diff read the stack.json the block before it wrote.
    assert any("memcheck.py diff baseline.json stack.json" in c for c in ran), ran
    assert (directory / "stack.json").exists() and (directory / "ref.json").exists()


def _anchors(path):
    """GitHub's anchors for the headings of a Markdown file."""
    with open(path) as f:
        headings = re.findall(r"^#+ (.*)$", f.read(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("path", [README, *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))],
                         ids=os.path.basename)
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(path):
    with open(path) as f:
        links = re.findall(r"\]\(([^)#:]*)(?:#([^)]*))?\)", f.read())
    for target, anchor in links:
        linked = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
        assert os.path.isfile(linked), target
        assert not anchor or anchor in _anchors(linked), f"{target}#{anchor}"


def test_every_headline_figure_is_quoted_in_the_docs():
    table = readme_text().split("## Headline figures")[1].split("\n## ")[0]
    docs = "".join(open(p).read() for p in drive.quoting_files())
    values = [row.split("|")[2] for row in table.splitlines() if row.startswith("| ") and "---" not in row]
    figures = [n for value in values[1:] for n in re.findall(r"\d+\.\d+", value)]
    assert len(figures) >= 10
    for figure in figures:   # each, outside the headline table itself, where the docs quote it
        assert docs.replace(table, "").count(figure), figure


def test_drive_figures_reads_the_readme_and_the_docs_and_merges_an_output_quoted_twice():
    everywhere = drive.readme_figures()
    readme_only = drive.readme_figures([README])
    for name in drive.FIGURE_CHECKS:
        assert any(k.startswith(name) for k in everywhere if everywhere[k]), name
    assert "script" in everywhere
    # The careless diff: the README's excerpt and docs/diagnosing.md's whole output, one rerun.
    assert 0 < len(readme_only["careless diff"]["figures"]) < len(everywhere["careless diff"]["figures"])
    assert everywhere["careless diff"]["commands"][-1] == "python memcheck.py diff baseline.json stack.json"
