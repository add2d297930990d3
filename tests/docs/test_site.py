"""The documentation site builds, and README stays a front page whose links work.

* ``python3 -m mkdocs build --strict`` from the repository root exits with status 0: a
  broken link or anchor, a missing cross-reference, a missing included file or a docstring
  griffe cannot parse fails the build (``mkdocs.yml``);
* README.md is at most 220 lines and holds the exact test command ``.ci/run`` runs;
* every relative link in README.md points to an existing file;
* every page and heading the code cites (``docs/architecture.md#ensemble-output``) exists.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TEST_COMMAND = "bash workflows/install.sh dev && python3 -m pytest -n 2 tests"


def test_site_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.fail("mkdocs is not installed: the documentation tools are in the dev extra "
                    "(bash workflows/install.sh dev)")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    output = (proc.stdout + proc.stderr)[-20000:]
    assert proc.returncode == 0, f"mkdocs build --strict failed (exit {proc.returncode}):\n{output}"
    assert (tmp_path / "site" / "index.html").is_file(), output
    assert (tmp_path / "site" / "architecture" / "index.html").is_file(), output


def test_broken_links_and_anchors_are_errors():
    """The build's strictness is configured, not left to the command line: every link, anchor
    and nav check warns, and warnings fail the build."""
    pytest.importorskip("mkdocs")
    from mkdocs.config import load_config

    config = load_config(str(ROOT / "mkdocs.yml"))
    assert config["strict"] is True
    for group, checks in config["validation"].items():
        for name, level in checks.items():
            assert level >= logging.WARNING, f"mkdocs.yml: validation.{group}.{name} must be warn"


def test_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; the manual belongs in docs/ (at most 220 here)"
    assert TEST_COMMAND in text, f"README.md must hold the exact test command {TEST_COMMAND!r} (.ci/run runs it)"


_LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)


def relative_links(markdown: str) -> list[str]:
    """The targets of inline and reference links and images that are not URLs or anchors."""
    body = re.sub(r"```.*?```", "", markdown, flags=re.S)      # code blocks hold no links
    body = re.sub(r"`[^`\n]*`", "", body)                       # nor does inline code
    targets = _LINK.findall(body) + _REF.findall(body)
    targets += re.findall(r"!\[[^\]]*\]\(\s*([^)\s]+)", body)
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#|//)", t, re.I)]


def test_relative_link_parser():
    md = ("[a](docs/x.md) [b](https://e.org) [c](#top) ![i](img/p.png) [d](y.md#sec) `[e](no.md)`\n"
          "```\n[f](nofence.md)\n```\n[r]: ref.md\n")
    assert relative_links(md) == ["docs/x.md", "y.md#sec", "ref.md", "img/p.png"]


def test_readme_links_exist():
    links = relative_links(README.read_text(encoding="utf-8"))
    assert links, "README.md should link into the documentation"
    missing = [t for t in links if not (README.parent / t.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


_CITATION = re.compile(r"docs/((?:[\w-]+/)*[\w-]+\.md)(?:#([\w-]+))?")


def headings(page: Path) -> set[str]:
    """The anchors of a page's headings (as mkdocs' toc makes them), included snippets too."""
    from markdown.extensions.toc import slugify

    text = page.read_text(encoding="utf-8")
    for include in re.findall(r'^--8<-- "([^":]+)', text, re.M):
        text += "\n" + (ROOT / include).read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    titles = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)
    return {slugify(re.sub(r"[`*]", "", t), "-") for t in titles}


def test_code_citations_of_the_docs_resolve():
    """Comments and docstrings cite pages and headings of the site (``docs/architecture.md#ensemble-output``):
    each cited page exists and has the cited heading."""
    broken = []
    for folder in ("scidiff", "configs", "workflows", "datasets", "tests"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in {".py", ".yaml", ".sh", ".md"} or "tests/docs" in path.as_posix():
                continue
            for page, anchor in _CITATION.findall(path.read_text(encoding="utf-8", errors="replace")):
                target = ROOT / "docs" / page
                where = f"{path.relative_to(ROOT)}: docs/{page}" + (f"#{anchor}" if anchor else "")
                if not target.is_file():
                    broken.append(f"{where} (no such page)")
                elif anchor and anchor not in headings(target):
                    broken.append(f"{where} (no such heading)")
    assert not broken, "citations of the documentation that do not resolve:\n" + "\n".join(broken)
