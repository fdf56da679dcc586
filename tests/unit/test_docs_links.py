"""Every relative link in the repository's Markdown resolves inside the repository.

Links in every tracked `*.md` (inline `[text](target)`, images, reference definitions and HTML
`href` / `src`) must name a file or folder that exists in the clone, and an `#anchor` into a
Markdown file must name one of its headings (GitHub's heading ids). Links to web addresses are not
fetched. Code blocks and inline code are not links. Nothing may point outside the clone: the docs
must stand alone.
"""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
OUTSIDE = ".." + "/shared"  # the sibling folder of working notes that is not part of the clone

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
HTML = re.compile(r"\b(?:href|src)\s*=\s*[\"']([^\"']+)[\"']", re.I)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def tracked(pattern: str) -> list[pathlib.Path]:
    """Tracked files matching `pattern` (git), or, outside a git checkout, the files on disk."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", pattern], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout
        return [REPO / name for name in out.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        skip = {".venv", ".refenv", ".cache", "outputs", ".git"}
        return [p for p in REPO.rglob(pattern)
                if not skip.intersection(p.relative_to(REPO).parts)]


def prose(text: str) -> str:
    """`text` without fenced code blocks and inline code spans."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    body = prose(text)
    return [m.group(1) for rx in (INLINE_LINK, REFERENCE, HTML) for m in rx.finditer(body)]


def slug(heading: str, seen: dict[str, int]) -> str:
    """GitHub's id of a heading: inline markup dropped, lower case, punctuation other than `-`
    and `_` removed, spaces to `-`; a repeated id gets `-1`, `-2`, ..."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    base = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
    count = seen.get(base, 0)
    seen[base] = count + 1
    return base if count == 0 else f"{base}-{count}"


def anchors(path: pathlib.Path) -> set[str]:
    seen: dict[str, int] = {}
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(m.group(2), seen) for m in HEADING.finditer(text)}


def dead_links(path: pathlib.Path, root: pathlib.Path = REPO) -> list[str]:
    """`path`'s links that do not resolve, each with the reason."""
    bad = []
    for target in links(path.read_text(encoding="utf-8")):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # a web address
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.is_relative_to(root.resolve()):
            bad.append(f"{target} (outside the repository)")
        elif not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {dest.name})")
    return bad


def test_markdown_files_are_found():
    names = {p.relative_to(REPO).as_posix() for p in tracked("*.md")}
    assert {"README.md", "docs/architecture.md", "benchmarks/RESULTS.md"} <= names


@pytest.mark.parametrize("path", tracked("*.md"), ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(path):
    assert not dead_links(path), f"{path.relative_to(REPO)}: dead links {dead_links(path)}"


def test_nothing_names_the_folder_outside_the_clone():
    hits = [p.relative_to(REPO).as_posix() for pattern in ("*.md", "*.py", "*.json", "*.sh",
                                                           "*.toml", "*.yaml", "*.cfg")
            for p in tracked(pattern) if OUTSIDE in p.read_text(encoding="utf-8", errors="ignore")]
    assert not hits, f"files that name {OUTSIDE}: {hits}"


def test_the_checker_finds_dead_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# B title\n\n## Use `x` here\n\n## Use x here\n")
    a = tmp_path / "a.md"
    a.write_text("[ok](docs/b.md#b-title) [ok2](docs/b.md#use-x-here-1) [self](#top)\n"
                 "# Top\n![img](missing.png) [gone](docs/c.md) [anchor](docs/b.md#nope)\n"
                 "[up](../elsewhere.md) [web](https://example.com/x)\n"
                 "`[code](not-a-link.md)`\n```\n[block](not-a-link-either.md)\n```\n"
                 "[ref]: docs/missing.md\n")
    assert sorted(dead_links(a, root=tmp_path)) == sorted([
        "missing.png (no such file)", "docs/c.md (no such file)",
        "docs/b.md#nope (no heading #nope in b.md)", "../elsewhere.md (outside the repository)",
        "docs/missing.md (no such file)"])
