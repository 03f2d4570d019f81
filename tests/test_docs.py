"""Every fenced shell and Python block in README.md and docs/*.md runs, and prints what the page says it prints.

A block's info string is its language, then tags:
- ``python`` blocks run with this venv's Python, ``bash`` blocks with ``bash -e`` (``sparsec`` and ``python`` of this
  venv first on PATH); each in a fresh process;
- ``skip-test REASON`` is not run (the reason is required: a placeholder path, ``make demo`` itself, ...);
- ``slow`` runs only in ``make test-all`` (real models, long runs);
- an ``output`` block right after a code block is what that block prints on stdout: a line ``...`` stands for any
  number of lines, ``...`` inside a line for any text; trailing spaces are ignored;
- ``text`` / ``yaml`` / ``json`` blocks are not code.
The blocks of one page run in order in one temporary directory, so a block uses the files an earlier one wrote; the
fast test of a page runs its fast blocks only (they never depend on slow ones), the slow test all of them.
"""
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"python", "bash"}
NOT_CODE = {"text", "yaml", "json", "output"}
TIMEOUT_S = 1800


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    tags: list[str]
    code: str
    expected: str | None = None  # the following ``output`` block

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, each code block with the ``output`` block that follows it."""
    found, lines, i = [], page.read_text().split("\n"), 0
    while i < len(lines):
        m = re.match(r"^```(.*)$", lines[i])
        if not m:
            i += 1
            continue
        info = m.group(1).split()
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        code = "\n".join(lines[i + 1:end]) + "\n"
        lang, tags = (info[0], info[1:]) if info else ("", [])
        if lang == "output" and found and found[-1].expected is None and found[-1].lang in RUN:
            found[-1].expected = code
        else:
            found.append(Block(page, i + 1, lang, tags, code))
        i = end + 1
    return found


def _matches(expected: str, actual: str) -> bool:
    pattern = []
    for line in expected.rstrip("\n").split("\n"):
        if line.strip() == "...":
            pattern.append(r"(?:[^\n]*\n)*?")
        else:
            pattern.append(".*?".join(re.escape(part) for part in line.rstrip().split("...")) + r"[ \t]*\n")
    text = "\n".join(ln.rstrip() for ln in actual.rstrip("\n").split("\n")) + "\n"
    return re.fullmatch("".join(pattern), text, re.S) is not None


def _run(block: Block, cwd: Path) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               SPARSEC_REPO=str(ROOT))
    cmd = [sys.executable, "-c", block.code] if block.lang == "python" else ["bash", "-e", "-c", block.code]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{block.where} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    if block.expected is not None:
        assert _matches(block.expected, done.stdout), (
            f"{block.where} printed:\n{done.stdout}\nthe page shows:\n{block.expected}")


def _runnable(page: Path, slow: bool) -> list[Block]:
    return [b for b in blocks(page) if b.lang in RUN and "skip-test" not in b.tags and (slow or "slow" not in b.tags)]


def _run_page(page: Path, tmp_path: Path, slow: bool) -> None:
    todo = _runnable(page, slow)
    if not todo:
        pytest.skip(f"{page.name}: no {'' if slow else 'fast '}blocks to run")
    for block in todo:
        _run(block, tmp_path)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_fast_blocks_run(page, tmp_path):
    _run_page(page, tmp_path, slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if any("slow" in b.tags for b in blocks(p))], ids=lambda p: p.name)
def test_page_all_blocks_run(page, tmp_path):
    _run_page(page, tmp_path, slow=True)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_block_is_declared(page):
    """Each block says its language; shell and Python are run or say why not; nothing else is taken for code."""
    for b in blocks(page):
        assert b.lang in RUN | NOT_CODE, f"{b.where}: info string {b.lang!r}: use python, bash, text, yaml or json"
        if "skip-test" in b.tags:
            reason = b.tags[b.tags.index("skip-test") + 1:]
            assert reason, f"{b.where}: skip-test needs a reason after it"
        if b.lang not in RUN:
            assert not b.tags, f"{b.where}: tags on a {b.lang} block, which never runs"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    """Every relative link of a page points at a file of the repository."""
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path = (page.parent / target).resolve()
        assert path.exists(), f"{page.name}: broken link {target}"


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().split("\n")) <= 150


def test_output_matching():
    assert _matches("a\n...\nd\n", "a\nb\nc\nd\n") and _matches("x = ...!\n", "x = 42!  \n")
    assert not _matches("a\nd\n", "a\nb\nd\n") and not _matches("x = 4\n", "x = 42\n")


def test_blocks_are_parsed_with_their_output(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("t\n```bash slow\necho hi\n```\n```output\nhi\n```\n```text\nnot code\n```\n")
    (b, t) = blocks(page)
    assert (b.lang, b.tags, b.code, b.expected, b.line) == ("bash", ["slow"], "echo hi\n", "hi\n", 2)
    assert (t.lang, t.expected) == ("text", None)
