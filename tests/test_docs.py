"""The README and docs/ hold together: every relative link and image points at a file (and a heading,
when it names one), every `docs/...` path and SPEC section named in the pages or in edtool's code exists,
no text outside CHANGELOG.md points at an issue number, the README's two fresh-machine commands are there
verbatim, the second being what CI runs, and every Python block runs as written in an empty folder (or says
why it cannot)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*PAGES, *sorted((ROOT / "experiments").rglob("*.md"))]  # pages whose links must resolve
CODE = [*sorted((ROOT / "edtool").rglob("*.py")), *sorted((ROOT / "edtool").rglob("*.cpp")), ROOT / "pyproject.toml"]
INSTALL_AND_ANALYZE = "pip install torch==2.13.0 && pip install -e . && edtool analyze"
INSTALL_AND_TEST = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest'
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# a ```python block, with the comment that marks it as not runnable when one stands on the line before it
PYTHON_BLOCK = re.compile(r"(?:^<!-- illustrative: (?P<why>.*?) -->\n)?^```python\n(?P<code>.*?)^```", re.S | re.M)


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set:
    """GitHub's anchors for the headings of a markdown page."""
    heads = re.findall(r"^#+\s+(.*)$", prose(page.read_text()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def relative_links(page: Path) -> list:
    return [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_link_check_catches_a_broken_link(tmp_path):
    """The checker itself: a missing file and a missing heading are found, code spans are ignored."""
    (tmp_path / "a.md").write_text("# Title\n\n## Some part\n")
    page = tmp_path / "p.md"
    page.write_text("[ok](a.md#some-part) [gone](b.md) ![img](a.md) `[code](nope.md)` [web](https://x.org/y)\n")
    assert relative_links(page) == ["a.md#some-part", "b.md", "a.md"]
    assert anchors(tmp_path / "a.md") == {"title", "some-part"}


# `docs/...` as a path in text or code; SPEC section numbers: "SPEC 5.4", "SPEC §12", "[SPEC.md](SPEC.md), sections 4
# and 6"
DOC_PATH = re.compile(r"(?<![\w/.])(?:\.\./)*docs/[\w./#-]*[\w#-]")
SPEC_REF = re.compile(r"SPEC(?:\.md\]\(SPEC\.md\)|\.md)?,?\s*(?:§\s*|sections?\s+)?(\d+(?:\.\d+)?)"
                      r"(?:\s+and\s+(\d+(?:\.\d+)?))?")
ISSUE = re.compile(r"\bissues?\s+#?\d+", re.I)


def spec_sections(spec: Path) -> set:
    """The numbered sections of a specification page: "## 5. ..." gives 5, "### 5.1 ..." gives 5.1."""
    return set(re.findall(r"^#{2,4}\s+(\d+(?:\.\d+)*)\.?\s", spec.read_text(), flags=re.M))


def broken_references(path: Path, root: Path) -> list:
    """The `docs/...` paths (and their headings) and SPEC sections a file names that do not exist under root."""
    text, sections, broken = path.read_text(), spec_sections(root / "docs" / "SPEC.md"), []
    for ref in DOC_PATH.findall(text):
        target, _, anchor = ref.lstrip("./").partition("#")
        dest = root / target
        if not dest.exists():
            broken.append(f"{ref} (no file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{ref} (no heading #{anchor})")
    for match in SPEC_REF.finditer(text):
        broken += [f"{match[0]} (no section {n} in docs/SPEC.md)" for n in match.groups() if n and n not in sections]
    return broken


@pytest.mark.parametrize("path", [*PAGES, *CODE], ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_paths_and_spec_sections_resolve(path):
    """Comments and docstrings included: a reader sent to docs/x.md or SPEC 14 finds it."""
    broken = broken_references(path, ROOT)
    assert not broken, f"{path.relative_to(ROOT)}: " + "; ".join(broken)


def test_reference_check_catches_a_missing_page_heading_and_section(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "SPEC.md").write_text("# Spec\n\n## 1. Purpose\n\n### 1.2 Detail\n")
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Part two\n")
    code = tmp_path / "m.py"
    code.write_text("# see docs/a.md#part-two, SPEC 1.2 and SPEC §1; [SPEC.md](SPEC.md), sections 1 and 1.2\n"
                    "# docs/gone, docs/a.md#nowhere, SPEC 14, SPEC.md section 3\n")
    assert broken_references(code, tmp_path) == [
        "docs/gone (no file)", "docs/a.md#nowhere (no heading #nowhere)",
        "SPEC 14 (no section 14 in docs/SPEC.md)", "SPEC.md section 3 (no section 3 in docs/SPEC.md)"]


def test_no_issue_numbers_outside_the_changelog():
    """Text says what and why; which issue asked for it is history, kept in CHANGELOG.md and git."""
    files = [ROOT / "README.md", *(p for folder in ("edtool", "tests", "docs") for p in (ROOT / folder).rglob("*")
                                   if p.suffix in {".py", ".md", ".cpp", ".sh", ".toml"})]
    found = {}
    for path in files:
        n = len(ISSUE.findall(path.read_text(errors="replace")))
        if n:
            found[path.relative_to(ROOT).as_posix()] = n
    assert not found, f"issue numbers in {found}"


def test_docs_index_links_every_page():
    index = set(relative_links(ROOT / "docs" / "README.md"))
    missing = [p.name for p in PAGES[1:] if p.name != "README.md" and p.name not in index]
    assert not missing, f"docs/README.md does not link {missing}"


def test_fresh_machine_commands_verbatim_near_the_top():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## On a fresh machine", 1)[1].split("\n## ", 1)[0]
    assert f"```bash\n{INSTALL_AND_ANALYZE}\n```" in section
    assert f"```bash\n{INSTALL_AND_TEST}\n```" in section
    assert readme.index(INSTALL_AND_TEST) < len(readme) // 3


def test_ci_runs_the_readme_test_command():
    """.ci/run installs the same torch and extras, then runs the same test command."""
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert any("pip install" in c and "torch==2.13.0" in c for c in commands)
    last = commands[-1]
    assert 'pip install' in last and '-e ".[test]"' in last and last.endswith("&& python -m pytest"), last


def python_blocks(page: Path) -> list:
    """(code, why) of each Python block of a page; `why` is the reason it is illustrative, else None."""
    return [(m["code"], m["why"]) for m in PYTHON_BLOCK.finditer(page.read_text())]


def test_block_finder_sees_runnable_and_illustrative_blocks(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("```python\na = 1\n```\n\n<!-- illustrative: needs a GPU -->\n```python\nb = 2\n```\n"
                    "```bash\nls\n```\n<!-- illustrative:  -->\n```python\nc = 3\n```\n")
    assert python_blocks(page) == [("a = 1\n", None), ("b = 2\n", "needs a GPU"), ("c = 3\n", "")]


def test_every_illustrative_block_says_why():
    unexplained = [f"{page.name}: {code.splitlines()[0]}" for page in PAGES for code, why in python_blocks(page)
                   if why is not None and not why.strip()]
    assert not unexplained, unexplained


RUNNABLE = [page for page in PAGES if any(why is None for _, why in python_blocks(page))]


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run_as_written_in_an_empty_folder(page, tmp_path):
    """A page's runnable blocks, in order in one interpreter (a later block may use an earlier one's names),
    started in an empty folder: nothing may depend on being run from the repository."""
    code = "\n".join(code for code, why in python_blocks(page) if why is None)
    if "from diffusers" in code:  # docs/models.md's example model: the optional extra, in ".[test]"
        pytest.importorskip("diffusers")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{page.name}:\n{proc.stderr[-3000:]}"
