"""The offline demo: built-in domains, a small trained MoE shipped with the package, and `moe-viz demo`."""

from __future__ import annotations

from pathlib import Path

from moe_viz import store
from moe_viz.errors import MoeVizError
from moe_viz.models.loading import canonical_model_id
from moe_viz.demo import corpora

SHIPPED_MODEL = Path(__file__).parent / "model"
DEMO_MAX_TOKENS = 20_000
DEMO_SEQ_LEN = 256


def shipped_model() -> Path:
    if not (SHIPPED_MODEL / "config.json").exists():
        raise MoeVizError(f"the demo model is missing from {SHIPPED_MODEL}: run `moe-viz demo train`")
    return SHIPPED_MODEL


def missing_domains(store_path: str | Path) -> list[str]:
    """Built-in domains without a complete run of the shipped model in the store."""
    if not Path(store_path).exists():
        return list(corpora.DOMAINS)
    runs = store.list_runs(store_path, status="complete")
    have = set(runs[runs.model_id == canonical_model_id(str(shipped_model()))].domain)
    return [d for d in corpora.DOMAINS if d not in have]


def prepare(store_path: str | Path | None = None, progress=None) -> list[str]:
    """Capture every built-in domain not yet in the store (default: store.default_store()); returns the new run ids."""
    from moe_viz.capture.run import CaptureSettings, capture

    store_path = store.default_store() if store_path is None else store_path
    missing = missing_domains(store_path)
    if not missing:
        return []
    settings = CaptureSettings(max_tokens=DEMO_MAX_TOKENS, seq_len=DEMO_SEQ_LEN, batch_size=8)
    return capture(str(shipped_model()), [f"{d}=builtin:{d}" for d in missing], store_path=store_path,
                   settings=settings, device="cpu", dtype="fp32", progress=progress)
