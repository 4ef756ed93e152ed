"""The runtime adapters (runtime/adapters/): one per image layout the manifest
names, each taking the tiling the manifest pairs with it; the session and
the chat tokenizer pick the adapter once and never switch on family strings."""
import ast
from pathlib import Path

import pytest

from vlmedge import manifest
from vlmedge.errors import ArtifactError
from vlmedge.runtime.adapters import ADAPTERS, adapter_for

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"


def test_every_layout_has_an_adapter_with_the_manifests_tiling():
    assert set(ADAPTERS) == set(manifest.EXPANDS)
    for layout, cls in ADAPTERS.items():
        assert cls.layout == layout
        assert cls.tilings == manifest._EXPAND_TILING[layout], layout


def test_unknown_layout_is_refused_in_one_line():
    class Facts:
        expand = "pixtral"

    with pytest.raises(ArtifactError, match="unknown image layout") as e:
        adapter_for(Facts())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("module", ["session.py", "chat.py", "decoders.py", "image_budget.py"])
def test_no_family_or_layout_strings_outside_the_adapters(module):
    """The session, chat tokenizer, decoders and budget compare no string with
    a family or layout name: what differs per family is the adapter's."""
    names = set(manifest.FAMILIES) | set(manifest.EXPANDS)
    tree = ast.parse((RUNTIME / module).read_text())
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                elts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                hits += [e.value for e in elts
                         if isinstance(e, ast.Constant) and e.value in names]
    assert not hits, f"{module} switches on {sorted(set(hits))}"
