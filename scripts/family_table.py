"""Run the all-families check (tests/test_all_families.py's) and write the README's family table.

    PYTHONPATH=. python scripts/family_table.py

Writes docs/families.json (one result per model type) and replaces the table between the
`<!-- families:begin -->` / `<!-- families:end -->` markers in README.md. The test checks that
README and JSON match its own expectations, so the table cannot drift from what is tested.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
BEGIN, END = "<!-- families:begin -->", "<!-- families:end -->"


def run_all() -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    from family_zoo import NOT_BUILT, UNSUPPORTED, check_family, discover_families
    from moe_viz.models import MoeVizError

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    results = {}
    for family in discover_families():
        if family in NOT_BUILT:
            results[family] = {"status": "not built", "why": NOT_BUILT[family]}
            continue
        with tempfile.TemporaryDirectory() as workdir:
            try:
                row = check_family(family, workdir)
            except MoeVizError as exc:
                results[family] = {"status": "unsupported", "why": UNSUPPORTED.get(family, ("", str(exc)))[1],
                                   "message": str(exc)}
                print(f"{family}: refused: {exc}", flush=True)
                continue
            except Exception as exc:  # a crash is a result too: the test reports it as a failure
                results[family] = {"status": "failed", "why": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                print(f"{family}: CRASH {results[family]['why']}", flush=True)
                continue
        ok = all(e["verdict"] == "PASS" for e in row["exports"])
        results[family] = {"status": "supported" if ok else "failed", "class": row["class"],
                           "moe_layers": row["moe_layers"], "statistics": row["statistics"], "exports": row["exports"]}
        print(f"{family}: {results[family]['status']}", flush=True)
    return results


def render_table(results: dict) -> str:
    supported = sum(r["status"] == "supported" for r in results.values())
    lines = [f"{supported} of the {len(results)} model types with a sparse MoE block in the installed transformers "
             "pass capture → prune (two keep counts, in memory and streaming) → verify exact against the masked "
             "original (tests/test_all_families.py; table written by scripts/family_table.py).", "",
             "Statistics *exact*: every count and norm-based statistic equals tests/test_capture_exact.py's "
             "independent computation; *end to end*: a block that computation cannot follow (router inside a "
             "wrapper, extra router arguments, MoE on the decoder layer, undecorated experts), checked through the "
             "exact exports only.", "",
             "| model type | loaded as | status | statistics | why not (yet) |", "|---|---|---|---|---|"]
    shown = {"exact": "exact", "not standard": "end to end"}
    for family, r in sorted(results.items()):
        lines.append(f"| `{family}` | {r.get('class', '')} | {r['status']} | {shown.get(r.get('statistics'), '')} "
                     f"| {r.get('why', '')} |")
    return "\n".join(lines)


def write_readme(results: dict) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text:
        raise SystemExit(f"README.md has no {BEGIN} marker")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{render_table(results)}\n{END}{tail}")


def main() -> None:
    results = run_all()
    (ROOT / "docs" / "families.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    write_readme(results)


if __name__ == "__main__":
    main()
