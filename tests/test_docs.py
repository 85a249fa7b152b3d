"""The documentation stays true: the config reference is the code's, every relative link in README.md and docs/
resolves (files, and headings for #anchors), and the README keeps its size, its two commands and its layout."""
from __future__ import annotations

import re
import subprocess
import unicodedata
from pathlib import Path

import pytest

from fastdag.cli import main as cli
from fastdag.config import CONFIG_REFERENCE, config_reference

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# Markdown inline links and images, [text](target "title"); reference definitions; HTML src/href attributes
INLINE = re.compile(r"\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HTML = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")
HTML_ANCHOR = re.compile(r"""<a\s+(?:name|id)\s*=\s*["']([^"']+)["']""")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


def markdown_files() -> list[Path]:
    return [README, *sorted((REPO / "docs").rglob("*.md"))]


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code spans blanked out."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, re.sub(r"(`+)(?:(?!\1).)+?\1", "", line)))
    return out


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (github-slugger): the rendered text lower-cased, every character that is
    not a letter, digit, mark, space, hyphen or underscore dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or image renders as its text
    text = text.replace("`", "").replace("*", "")
    kept = [c for c in text.strip().lower()
            if c in " -_" or unicodedata.category(c)[0] in "LNM"]
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every #anchor a Markdown file offers: its headings' slugs (repeats get -1, -2, ...) and HTML anchors."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        m = HEADING.match(line)
        if m:
            slug = github_slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """'file:line: target (why)' for every relative link in ``path`` that does not resolve."""
    problems = []
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        for target in INLINE.findall(line) + REFERENCE.findall(line) + HTML.findall(line):
            if not target or SCHEME.match(target):
                continue
            file_part, _, anchor = target.partition("#")
            file_part = file_part.split("?")[0]
            dest = (root / file_part.lstrip("/")) if file_part.startswith("/") else (path.parent / file_part)
            dest = dest.resolve() if file_part else path
            where = f"{path.relative_to(root)}:{number}: {target}"
            if root.resolve() not in (dest, *dest.parents):
                problems.append(f"{where} (outside the repository)")
            elif not dest.exists():
                problems.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where} (no heading #{anchor} in {dest.relative_to(root.resolve())})")
    return problems


def test_the_config_reference_is_the_codes():
    page = REPO / CONFIG_REFERENCE
    assert page.is_file(), f"{CONFIG_REFERENCE} is missing: fastdag config-reference --out {CONFIG_REFERENCE}"
    assert page.read_text(encoding="utf-8") == config_reference(), (
        f"{CONFIG_REFERENCE} is stale (the config fields changed): fastdag config-reference --out {CONFIG_REFERENCE}")


def test_the_config_reference_names_every_field_with_its_type_default_and_doc():
    from fastdag.config import config_help

    page = config_reference()
    for key, tp, default, _ in config_help():
        row = next(line for line in page.splitlines() if line.startswith(f"| `{key}` |"))
        assert f"`{tp.replace('|', chr(92) + '|')}`" in row and f"`{default.replace('|', chr(92) + '|')}`" in row
        assert row.count(" | ") == 3, row  # four cells: no unescaped pipe split a cell


def test_fastdag_config_reference_writes_the_page(tmp_path, capsys):
    out = tmp_path / "config.md"
    assert cli(["config-reference", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == config_reference()
    assert cli(["config-reference"]) == 0 and capsys.readouterr().out.endswith(config_reference())
    assert cli(["config-reference", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(path):
    assert not broken_links(path), "\n".join(broken_links(path))


def test_the_link_check_catches_a_broken_file_and_a_broken_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## DAG on rectified flow (SD3 / SD3.5, FLUX) — new here\n## Repeat\n"
                                   "## Repeat\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#dag-on-rectified-flow-sd3--sd35-flux--new-here) [ok](a.md#repeat-1) [ok](#local)\n"
                    "[bad](missing.md) ![bad](img.png) [bad](a.md#nowhere) [bad](#nowhere-here)\n"
                    "`[not a link](inside-code.md)` [web](https://example.com/x.md)\n"
                    "```\n[not a link](in-a-fence.md)\n```\n## Local\n")
    problems = broken_links(page, root=tmp_path)
    assert [p.split(": ", 1)[1].split(" (")[0] for p in problems] == [
        "missing.md", "img.png", "a.md#nowhere", "#nowhere-here"], problems


def test_github_slugs():
    assert github_slug("DAG on rectified flow (SD3 / SD3.5, FLUX) — new here") == \
        "dag-on-rectified-flow-sd3--sd35-flux--new-here"
    assert github_slug("`dag.flow`") == "dagflow"
    assert github_slug("Checkpoints and resuming") == "checkpoints-and-resuming"
    assert github_slug("x̂_0 rewards: rollout | recompute") == "x̂_0-rewards-rollout--recompute"


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


def test_the_readme_is_short_and_leads_with_its_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; keep it to 200 and move the rest to docs/"
    first_screen = "\n".join(lines[:40])
    assert "make demo" in first_screen and "make test" in first_screen
    targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
    assert {"demo", "test"} <= set(targets)


def _top_level_folders() -> set[str]:
    """The repository's own top-level folders: what git tracks, or (a copy without .git) what is not ignored."""
    try:
        files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True,
                               timeout=60).stdout.split()
        return {f.split("/")[0] for f in files if "/" in f}
    except (OSError, subprocess.SubprocessError):
        return {p.name for p in REPO.iterdir() if p.is_dir() and (p.name == ".ci" or not p.name.startswith("."))
                and p.name not in ("runs", "build", "__pycache__") and not p.name.endswith(".egg-info")}


def test_the_readme_layout_names_every_folder_and_package():
    layout = _section(README.read_text(encoding="utf-8"), "Layout")
    missing = [f"{name}/" for name in sorted(_top_level_folders()) if f"{name}/" not in layout]
    packages = sorted(p.name for p in (REPO / "fastdag").iterdir()
                      if p.is_dir() and ((p / "__init__.py").is_file() or p.name == "assets"))
    missing += [f"fastdag/{name}/" for name in packages if f"fastdag/{name}/" not in layout]
    assert not missing, f"README.md's Layout does not name {', '.join(missing)}"
    assert "benchmarks/" in layout and "kernels/" in layout, "say where the design card's kernels/ and benchmarks/ went"
