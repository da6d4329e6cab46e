"""docs/architecture.md's table of layer types matches what the registry holds."""
import re

from deeper_ssd.layers import registry
from support import REPO


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
