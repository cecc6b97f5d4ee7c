"""Every document the code cites is in the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r"[A-Za-z0-9_./-]+\.md\b")
# written by the study and the analysis, not documents of the repository
GENERATED = {"report.md", "analysis.md"}


def _cited_documents():
    for folder in ("xeno_jax", "data_builders", "experiments", "tests", "tools"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for match in CITED.finditer(path.read_text(encoding="utf-8")):
                yield path, match.group(0)


def _resolves(path: Path, reference: str) -> bool:
    candidates = (path.parent / reference, ROOT / reference, ROOT / "docs" / reference)
    return any(candidate.is_file() for candidate in candidates)


def test_every_cited_document_is_in_the_repository():
    missing = sorted({f"{path.relative_to(ROOT)}: {reference}"
                      for path, reference in _cited_documents()
                      if Path(reference).name not in GENERATED
                      and not _resolves(path, reference)})
    assert not missing, "documents cited but not in the repository:\n" + "\n".join(missing)


def test_no_file_points_outside_the_repository():
    outside = sorted(f"{path.relative_to(ROOT)}: {reference}"
                     for path, reference in _cited_documents() if reference.startswith("../"))
    assert not outside, outside
