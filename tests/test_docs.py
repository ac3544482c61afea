"""Every document the repository's files refer to is in the repository.

Checked in every tracked *.md file: markdown links to relative paths
(`[text](docs/method.md#notation)`) and names of markdown files; in every *.py file, names
of documents: upper-case ones (`README.md`) and those under docs/ (names of files a program
writes, such as `structured-quick.md`, are lower-case). A path resolves against the
referring file's folder or the repository root; a bare file name may name any tracked file
of that name. This file's own examples aside.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
DOCUMENT_NAME = re.compile(r"(?<![\w/.{}-])([\w][\w./-]*\.md)\b")


def tracked_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "*.md", "*.py"], cwd=REPOSITORY, capture_output=True, text=True
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return [REPOSITORY / name for name in listed.stdout.split()]


def references(text: str, markdown: bool) -> list[str]:
    """Relative link targets (anchors dropped) of a markdown `text`, then the document names
    in it, each once."""
    links = []
    if markdown:
        links = [
            target.split("#")[0]
            for target in MARKDOWN_LINK.findall(text)
            if not re.match(r"[a-z]+:|#", target)
        ]
    names = DOCUMENT_NAME.findall(text)
    if not markdown:
        names = [name for name in names if name.startswith("docs/") or _upper_case_name(name)]
    return list(dict.fromkeys([link for link in links if link] + names))


def _upper_case_name(name: str) -> bool:
    stem = Path(name).stem
    return stem == stem.upper()


def dangling(path: Path, tracked_names: set[str]) -> list[str]:
    missing = []
    for reference in references(path.read_text(encoding="utf-8"), path.suffix == ".md"):
        candidates = (path.parent / reference, REPOSITORY / reference)
        if any(candidate.exists() for candidate in candidates):
            continue
        if "/" not in reference and reference in tracked_names:
            continue
        missing.append(reference)
    return missing


def test_no_file_refers_to_a_document_the_repository_lacks():
    files = [path for path in tracked_files() if path != Path(__file__).resolve()]
    names = {path.name for path in files}
    found = {str(path.relative_to(REPOSITORY)): dangling(path, names) for path in files}
    assert {name: refs for name, refs in found.items() if refs} == {}


def test_a_dangling_reference_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "See METHOD.md, [the design](docs/design.md#layout), [gone](notes/gone.md) "
        "and [the web](https://example.org/x.md)."
    )
    assert dangling(page, set()) == ["notes/gone.md", "METHOD.md"]
    module = tmp_path / "module.py"
    module.write_text('"""The sums of METHOD.md; see docs/gone.md."""\nout = "runs-quick.md"\n')
    assert dangling(module, set()) == ["METHOD.md", "docs/gone.md"]
