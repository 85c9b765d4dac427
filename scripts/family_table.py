"""Run the all-families check (tests/test_all_families.py's) and write the README's family table.

    PYTHONPATH=. python scripts/family_table.py              # every family
    PYTHONPATH=. python scripts/family_table.py mixtral dbrx # re-run only these; keep the others' results

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


def run_all(only: list[str] | None = None) -> dict:
    """Results of every discovered family (or only of `only`; the others keep docs/families.json's)."""
    import torch
    from transformers.utils import logging as hf_logging

    from family_zoo import CAPTURE_ONLY, NOT_BUILT, UNSUPPORTED, capture_family, check_family, discover_families
    from moe_viz.errors import MoeVizError

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    families = discover_families()
    unknown = sorted(set(only or ()) - set(families))
    if unknown:
        raise SystemExit(f"not a discovered MoE family: {', '.join(unknown)}")
    previous = json.loads((ROOT / "docs" / "families.json").read_text()) if only else {}
    results = {}
    for family in families:
        if only and family not in only:
            if family in previous:
                results[family] = previous[family]
            continue
        if family in NOT_BUILT:
            results[family] = {"status": "not built", "why": NOT_BUILT[family]}
            continue
        with tempfile.TemporaryDirectory() as workdir:
            try:
                row = check_family(family, workdir)
            except MoeVizError as exc:
                results[family] = {"status": "unsupported", "why": UNSUPPORTED.get(family, ("", str(exc)))[1],
                                   "message": str(exc)}
                if family in CAPTURE_ONLY:
                    with tempfile.TemporaryDirectory() as again:
                        captured = capture_family(family, again)
                    results[family] = {"status": "capture only", "why": CAPTURE_ONLY[family][1], "message": str(exc),
                                       "class": captured["class"], "moe_layers": captured["moe_layers"],
                                       "statistics": captured["statistics"]}
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
    captured = sum(r["status"] == "capture only" for r in results.values())
    lines = [f"{supported} of the {len(results)} model types with a sparse MoE block in the installed transformers "
             "pass capture → prune (two keep counts, in memory and streaming) → verify exact against the masked "
             f"original; {captured} more are captured but not pruned (*capture only*) "
             "(tests/test_all_families.py; table written by scripts/family_table.py).", "",
             "Statistics *exact*: every count and norm-based statistic equals tests/test_capture_exact.py's "
             "independent computation; *end to end*: a block that computation cannot follow (router inside a "
             "wrapper, extra router arguments, MoE on the decoder layer, undecorated experts), checked through the "
             "exact exports only; *own test*: a block checked against an independent computation of "
             "its own in tests/test_family_structures.py.", "",
             "| model type | loaded as | status | statistics | why not (yet) |", "|---|---|---|---|---|"]
    shown = {"exact": "exact", "not standard": "end to end", "own test": "own test"}
    for family, r in sorted(results.items()):
        statistics = shown.get(r.get("statistics"), "")
        statistics = "own test" if r["status"] == "capture only" and statistics == "end to end" else statistics
        lines.append(f"| `{family}` | {r.get('class', '')} | {r['status']} | {statistics} "
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
    results = run_all(sys.argv[1:])
    (ROOT / "docs" / "families.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    write_readme(results)


if __name__ == "__main__":
    main()
