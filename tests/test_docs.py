"""The docs stay true to the code: docs/architecture.md's table of layer types matches the
registry, and every section of docs/semantics.md, architecture.md or performance.md that a
docstring, comment or doc cites by heading exists."""
import re

from deeper_ssd.layers import registry
from support import REPO

CITED = ("semantics", "architecture", "performance")
# docs/semantics.md, "Matching"  /  docs/semantics.md: "Box helpers" to "DetectionOutput and NMS"
CITATION = re.compile(r'docs/(%s)\.md[,:]?\s*((?:"[^"\n]+"(?:,\s*|\s+to\s+|\s+and\s+|\s*\n\s*)*)+)' % "|".join(CITED))


def _registry_rows():
    rows = {}
    for name in registry.supported_types():
        module = registry.get(name).__module__.rsplit(".", 1)[-1]
        rows.setdefault(f"layers/{module}.py", set()).add(name)
    return rows


def _documented_rows():
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## Where each Caffe type lives", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for module, types in re.findall(r"^\| `(layers/\w+\.py)` \| (.+) \|$", section, re.M):
        rows[module] = set(re.findall(r"`(\w+)`", types))
    return rows


def test_layer_type_table_matches_registry():
    want, have = _registry_rows(), _documented_rows()
    table = "\n".join(f"| `{m}` | {', '.join(f'`{t}`' for t in sorted(want[m]))} |" for m in sorted(want))
    assert have == want, f"docs/architecture.md, 'Where each Caffe type lives', should read:\n{table}"


def test_cited_doc_sections_exist():
    headings = {doc: {line[3:].strip() for line in (REPO / "docs" / f"{doc}.md").read_text().splitlines()
                      if line.startswith("## ")} for doc in CITED}
    paths = [REPO / "README.md"] + [p for folder in ("deeper_ssd", "tests", "bench", "tools", "docs")
                                    for p in sorted((REPO / folder).rglob("*")) if p.suffix in (".py", ".md")]
    cited, missing = 0, []
    for path in paths:
        if path.name == "caffe_pb2.py":
            continue
        for match in CITATION.finditer(path.read_text()):
            for heading in re.findall(r'"([^"\n]+)"', match.group(2)):
                cited += 1
                if heading not in headings[match.group(1)]:
                    missing.append(f'{path.relative_to(REPO)}: docs/{match.group(1)}.md "{heading}"')
    assert cited > 20, f"only {cited} citations found: the pattern no longer matches how the code cites"
    assert not missing, "sections cited but absent:\n" + "\n".join(missing)
