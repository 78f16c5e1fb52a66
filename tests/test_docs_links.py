"""The README's and docs/*.md's references into the repository resolve: links and their anchors, the paths they
name, and the README's "Layout" names every module, benchmark script and page that exists (docs that match the
tree)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link targets and inline markup dropped, lower case, every character but
    letters, digits, ``_``, ``-`` and spaces removed, spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """The anchors of a page's headings outside code fences (a repeated one gets ``-1``, ``-2``, ... as on GitHub)."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    for m in re.finditer(r"^#{1,6}[ \t]+(.+)$", FENCE.sub("", markdown), flags=re.M):
        base = slug(m.group(1))
        n = seen.get(base, -1) + 1
        seen[base] = n
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path, text: str) -> list[str]:
    """``page:line: target`` for each relative link in ``text`` whose file or anchor does not exist."""
    out = []
    for m in re.finditer(r"\]\(([^)\s]+)\)", FENCE.sub(lambda f: "\n" * f.group(0).count("\n"), text)):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problem = "no such file"
        elif fragment and (file.suffix != ".md" or fragment not in anchors(file.read_text())):
            problem = "no such anchor"
        else:
            continue
        out.append(f"{page.name}:{text.count(chr(10), 0, m.start()) + 1}: {target} ({problem})")
    return out


def test_the_slug_is_githubs_and_a_broken_link_is_reported(tmp_path: Path) -> None:
    assert slug("Stop 61: three seeds through the iterator and the loader") == (
        "stop-61-three-seeds-through-the-iterator-and-the-loader"
    )
    assert slug("Gaussian mixture vs the exact posterior (`mcmc-unlearner demo`, 5 seeds)") == (
        "gaussian-mixture-vs-the-exact-posterior-mcmc-unlearner-demo-5-seeds"
    )
    assert slug("Stop 49: 1.94× the floor — forced") == "stop-49-194-the-floor--forced"
    page = tmp_path / "a.md"
    page.write_text("# Top\n\n## Top\n\n```\n# not a heading\n```\n")
    text = "[ok](a.md#top-1) [gone](a.md#not-a-heading) [none](b.md) [web](https://x.org/#y)\n"
    assert broken_links(page, text) == [
        "a.md:1: a.md#not-a-heading (no such anchor)",
        "a.md:1: b.md (no such file)",
    ]


def test_every_relative_link_and_anchor_in_the_readme_and_docs_resolves() -> None:
    broken = [b for page in PAGES for b in broken_links(page, page.read_text())]
    assert broken == [], "\n".join(broken)


def _created_by_a_stored_patch(path: str) -> bool:
    """A file that a patch kept under docs/runs/ creates (a change built, measured and not kept, which its section
    describes)."""
    return any(f"+++ b/{path}\n" in p.read_text() for p in (ROOT / "docs" / "runs").glob("*.patch"))


def test_every_repository_path_the_readme_and_docs_name_exists() -> None:
    missing = []
    for page in PAGES:
        for m in re.finditer(r"`((?:src|tests|benchmarks|docs)/[\w./-]+)`", page.read_text()):
            path = m.group(1).rstrip(".")
            if not (ROOT / path).exists() and not _created_by_a_stored_patch(path):
                missing.append(f"{page.name}: {path}")
    assert missing == [], "\n".join(missing)


def _layout_sections() -> dict[str, str]:
    """The README's Layout block cut at its top-level entries (``src/mcmc_unlearner/``, ``benchmarks/``, ...)."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Layout") : readme.index("## Development")]
    block = block[block.index("```\n") + 4 : block.rindex("```")]
    parts = re.split(r"^(?=\S)", block, flags=re.M)
    return {p.split()[0]: p for p in parts if p.strip()}


@pytest.mark.parametrize(
    ("section", "folder", "pattern"),
    [
        ("src/mcmc_unlearner/", "src/mcmc_unlearner", "*.py"),
        ("benchmarks/", "benchmarks", "*.py"),
        ("docs/", "docs", "*.md"),
        ("tests/", "tests", "[!t]*.py"),  # conftest.py and the _helpers: the test files are "one file per module"
    ],
)
def test_the_layout_names_what_exists_and_only_that(section: str, folder: str, pattern: str) -> None:
    text = _layout_sections()[section]
    named = set(re.findall(r"[\w/-]+\.(?:py|md)\b", text))
    for name in named:
        here = [ROOT / name] if "/" in name else list((ROOT / folder).rglob(name))
        assert any(p.is_file() for p in here), f"Layout's {section} names {name}, which {folder}/ does not hold"
    for file in sorted((ROOT / folder).glob(pattern)):
        if file.name != "__init__.py":
            assert file.name in named, f"{folder}/{file.name} is missing from the README's Layout ({section})"
    if section == "src/mcmc_unlearner/":  # a subpackage's files: by name, or by stem as the service's are
        entries = dict(re.findall(r"^  (\w+)/(.*?)(?=^  \S|\Z)", text, flags=re.M | re.S))
        for package in sorted(p for p in (ROOT / folder).iterdir() if (p / "__init__.py").exists()):
            assert package.name in entries, f"{folder}/{package.name}/ is missing from the README's Layout"
            for file in sorted(package.glob("*.py")):
                if file.name != "__init__.py":
                    assert re.search(rf"\b{file.stem}\b", entries[package.name]), f"{file} missing from the Layout"
