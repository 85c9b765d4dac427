"""Every model type with a sparse MoE block that the installed transformers ships, end to end.

For each family discovered by `family_zoo.discover_families()` (a new transformers release adds
its families here by itself): a tiny random model is saved, loaded with the class moe_viz picks,
captured, pruned at two keep counts (in memory and streaming) and each export verified against
the masked original (`verify_export`: float64 block replay and end-to-end logits). Families in
`UNSUPPORTED` must fail with a one-line MoeVizError saying so — never a traceback — and the
README's family table (scripts/family_table.py) must match what this test expects.
"""

import json
import sys
from pathlib import Path

import pytest

from family_zoo import CAPTURE_ONLY, NOT_BUILT, UNSUPPORTED, check_family, discover_families
from moe_viz.errors import MoeVizError

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = [f for f in discover_families() if f not in NOT_BUILT]


def test_discovery_finds_the_known_families_and_the_lists_are_current():
    families = set(discover_families())
    # Families every transformers 5.x ships: discovery must not silently lose them.
    assert {"mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4_text", "qwen3_vl_moe", "switch_transformers",
            "nllb-moe"} <= families
    assert len(families) >= 70
    stale = sorted((set(UNSUPPORTED) | set(NOT_BUILT) | set(CAPTURE_ONLY)) - families)
    assert not stale, f"listed as unsupported but no longer shipped: {stale}"
    assert not set(UNSUPPORTED) & set(CAPTURE_ONLY) and not set(NOT_BUILT) & (set(UNSUPPORTED) | set(CAPTURE_ONLY))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_end_to_end(model_type, tmp_path):
    if model_type in UNSUPPORTED or model_type in CAPTURE_ONLY:
        phrase, _ = UNSUPPORTED.get(model_type) or CAPTURE_ONLY[model_type]
        with pytest.raises(MoeVizError) as refused:
            check_family(model_type, tmp_path)  # capture-only: the capture and its statistics checks pass first
        message = str(refused.value)
        assert "\n" not in message and phrase in message
        assert not list(tmp_path.glob(f"*{model_type}-keep*")), "a refused export must leave nothing behind"
        if model_type in CAPTURE_ONLY:
            from moe_viz import store

            runs = store.list_runs(tmp_path / "store.duckdb")
            assert list(runs.status) == ["complete"], "a capture-only family must be captured"
        return
    row = check_family(model_type, tmp_path)  # statistics vs the independent computation inside (AssertionError)
    assert row["moe_layers"] >= 1 and row["experts"] == 8
    for export in row["exports"]:
        assert export["verdict"] == "PASS", f"{model_type} keep {export['keep']} ({export['path']}): {export['reason']}"


def test_readme_family_table_is_generated_from_the_current_lists():
    sys.path.insert(0, str(ROOT / "scripts"))
    from family_table import render_table

    results = json.loads((ROOT / "docs" / "families.json").read_text())
    assert sorted(results) == sorted(discover_families()), "run scripts/family_table.py"
    for family, result in results.items():
        expected = ("not built" if family in NOT_BUILT else "unsupported" if family in UNSUPPORTED
                    else "capture only" if family in CAPTURE_ONLY else "supported")
        assert result["status"] == expected, f"{family}: run scripts/family_table.py"
    assert render_table(results) in (ROOT / "README.md").read_text(), "run scripts/family_table.py"
