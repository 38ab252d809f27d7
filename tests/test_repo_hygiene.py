"""The repository explains itself: no file cites a path outside the repository or an issue
number, and every ``docs/<page>.md#<anchor>`` citation names a page and a section that exist."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("kla_megatron", "data_tools", "launch", "configs", "tests", "docs", "docker", "README.md", "pyproject.toml")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".sbatch", ".toml", ".txt", ".cfg", ".ini", ".json"}
SKIP_DIRS = {"__pycache__", ".pytest_cache"}
MAX_BYTES = 2_000_000  # data files, not prose
# Built from pieces so that this file does not match itself.
OUTSIDE = [re.escape(".." + "/shared"), re.escape("/" + "work/"), re.escape("kla_" + "math.md")]
OUTSIDE_RE = re.compile("|".join(OUTSIDE))
ISSUE_RE = re.compile("[Ii]ssue" + r" ?#?\d+")  # history belongs in git and bench/README.md
DOC_REF_RE = re.compile(r"docs/([\w./-]+?\.md)(?:#([\w-]+))?")


def _text_files():
    for root in ROOTS:
        path = REPO / root
        paths = [path] if path.is_file() else sorted(path.rglob("*"))
        for p in paths:
            if (p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name == "Dockerfile")
                    and not SKIP_DIRS & set(p.parts) and not p.name.endswith(".egg-info")
                    and p.stat().st_size <= MAX_BYTES):
                yield p


def _read(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="replace")


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, in_fence = set(), False
    for line in _read(page).splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and (m := re.match(r"#{1,6}\s+(.*)", line)):
            found.add(slug(m.group(1)))
    return found


def outside_citations(files, repo: Path = REPO, pattern: re.Pattern = OUTSIDE_RE) -> list[str]:
    bad = []
    for p in files:
        for n, line in enumerate(_read(p).splitlines(), 1):
            if pattern.search(line):
                bad.append(f"{p.relative_to(repo)}:{n}: {line.strip()[:120]}")
    return bad


def broken_doc_refs(files, repo: Path = REPO) -> list[str]:
    bad, cache = [], {}
    for p in files:
        for n, line in enumerate(_read(p).splitlines(), 1):
            for m in DOC_REF_RE.finditer(line):
                page = repo / "docs" / m.group(1)
                where = f"{p.relative_to(repo)}:{n}: docs/{m.group(1)}"
                if not page.is_file():
                    bad.append(f"{where}: no such page")
                    continue
                if m.group(2) is None:
                    continue
                if page not in cache:
                    cache[page] = anchors(page)
                if m.group(2) not in cache[page]:
                    bad.append(f"{where}#{m.group(2)}: no such section (sections: {sorted(cache[page])})")
    return bad


def test_scans_the_package_and_the_docs():
    files = {p.relative_to(REPO).as_posix() for p in _text_files()}
    assert "kla_megatron/ops/kla/scan.py" in files and "docs/kla.md" in files and "README.md" in files


def test_no_citation_of_a_path_outside_the_repository():
    bad = outside_citations(_text_files())
    assert not bad, "cite docs/ pages inside the repository instead:\n" + "\n".join(bad)


def test_no_issue_numbers():
    bad = outside_citations(_text_files(), pattern=ISSUE_RE)
    assert not bad, "say what the code does, not which issue asked for it:\n" + "\n".join(bad)


def test_every_docs_citation_names_an_existing_section():
    bad = broken_doc_refs(_text_files())
    assert not bad, "\n".join(bad)


def test_the_code_cites_the_kla_page():
    cited = {m.group(2) for p in _text_files() if p.suffix == ".py"
             for m in DOC_REF_RE.finditer(_read(p)) if m.group(1) == "kla.md" and m.group(2)}
    assert {"filter", "transforms", "backward", "context-parallelism"} <= cited, cited


@pytest.mark.parametrize("line, problem", [
    ("see ../" + "shared/design/notes.md", "outside"),
    ("read /" + "work/main/x", "outside"),
    ("(kla_" + "math.md §3)", "outside"),
    ("(docs/" + "kla.md#no-such-section)", "section"),
    ("added for iss" + "ue 12", "issue"),
    ("see Iss" + "ue #7", "issue"),
    ("(docs/" + "no_such_page.md)", "page"),
])
def test_checks_catch_planted_mistakes(tmp_path, line, problem):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "kla.md").write_text((REPO / "docs" / "kla.md").read_text())
    planted = tmp_path / "planted.py"
    planted.write_text(f'"""ok (docs/kla.md#backward)."""\n# {line}\n')
    if problem == "outside":
        assert len(outside_citations([planted], repo=tmp_path)) == 1
    elif problem == "issue":
        assert len(outside_citations([planted], repo=tmp_path, pattern=ISSUE_RE)) == 1
    else:
        (msg,) = broken_doc_refs([planted], repo=tmp_path)
        assert f"no such {problem}" in msg
