"""Shared pieces of the dashboard pages: the store, cached queries, and the model/domain pickers.

Queries are cached per (store path, store file mtime), so a finished capture
shows up on the next rerun without stale data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import streamlit as st

from moe_viz.analysis import tables, domain_stats
from moe_viz import store
from moe_viz.errors import MoeVizError

COLOR_SEQUENTIAL = "Viridis"
COLOR_DIVERGING = "RdBu_r"  # blue-red diverging: readable with red-green colour blindness
# Kept / dropped experts: Okabe-Ito blue and orange, told apart by every common colour-vision deficiency.
KEPT_COLOR, DROPPED_COLOR = "#0072B2", "#E69F00"
CHART_HEIGHT = 460
# The modebar's camera saves SVG, drawn in the browser (no kaleido, no Chrome on the server); no Plotly logo link.
PLOTLY_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "svg"}}


def csv_download(data: pd.DataFrame, key: str, container=None) -> None:
    """A download button for `data`, the frame a chart draws, as `<key>.csv` (widget key `<key>_csv`).

    Deferred: the CSV is written when the button is clicked, not on every rerun (a big heatmap's is megabytes).
    """
    (container or st).download_button(
        "CSV of this chart's data", lambda: data.to_csv(index=False).encode("utf-8"), file_name=f"{key}.csv",
        mime="text/csv", key=f"{key}_csv", on_click="ignore", icon=":material/download:")


def plotly_chart(figure, data: pd.DataFrame, key: str, container=None, **kwargs):
    """st.plotly_chart whose modebar camera saves `<key>.svg`, then a CSV download of `data` (what it draws)."""
    config = {**PLOTLY_CONFIG, "toImageButtonOptions": {"format": "svg", "filename": key}}
    event = (container or st).plotly_chart(figure, key=key, config=config, **kwargs)
    csv_download(data, key, container)
    return event


def warm_imports() -> None:
    """Run warm.warm_up() in a background thread, once per server process.

    plotly.express, transformers and torch take seconds to import, and each page's first
    figure loads more; doing it while the user looks at the first page keeps every later
    page change fast (moe_viz/ui/warm.py says what and why). The thread makes no Streamlit call.
    """
    import threading

    from moe_viz.ui.warm import warm_up

    if not getattr(warm_imports, "started", False):
        warm_imports.started = True
        threading.Thread(target=warm_up, name="moe_viz-warm-imports", daemon=True).start()


def store_path() -> str:
    """The store given as `streamlit run app.py -- --store PATH`, else store.default_store(); absolute."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--store", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:])
    return str(Path(args.store).absolute()) if args.store else str(store.default_store())


def _stamp(path: str) -> float:
    p = Path(path)
    return p.stat().st_mtime if p.exists() else 0.0


@st.cache_data(show_spinner=False, max_entries=64)
def _runs(path: str, stamp: float) -> pd.DataFrame:
    return store.list_runs(path)


@st.cache_data(show_spinner=False, max_entries=64)
def _expert_stats(path: str, stamp: float, run_ids: tuple[str, ...], columns: tuple[str, ...] | None = None,
                  layer: int | None = None) -> pd.DataFrame:
    return store.expert_stats(path, list(run_ids), list(columns) if columns else None, layer)


@st.cache_data(show_spinner=False, max_entries=64)
def _layer_stats(path: str, stamp: float, run_ids: tuple[str, ...]) -> pd.DataFrame:
    return store.layer_stats(path, list(run_ids))


@st.cache_data(show_spinner=False, max_entries=64)
def _coactivation(path: str, stamp: float, run_id: str, layer: int) -> pd.DataFrame:
    return store.coactivation(path, run_id, layer)


@st.cache_data(show_spinner=False, max_entries=64)
def _metric_values(path: str, stamp: float, run_ids: tuple[str, ...], metric: str) -> pd.DataFrame:
    stats = store.expert_stats(path, list(run_ids), tables.metric_columns(metric))
    layers = store.layer_stats(path, list(run_ids))
    return tables.metric_values(stats, layers, metric)


@st.cache_data(show_spinner=False, max_entries=32)
def _overlap(path: str, stamp: float, run_ids: tuple[str, ...], criterion: str, k: int) -> pd.DataFrame:
    scores = _metric_values(path, stamp, run_ids, criterion).rename(columns={"value": "score"})
    return domain_stats.topk_jaccard(scores, k)


@st.cache_data(show_spinner=False, max_entries=32)
def _mutual_information(path: str, stamp: float, run_ids: tuple[str, ...]) -> pd.Series:
    return domain_stats.mutual_information(_expert_stats(path, stamp, run_ids, ("routed_tokens",)))


def overlap(run_ids, criterion: str, k: int) -> pd.DataFrame:
    path = store_path()
    return _overlap(path, _stamp(path), tuple(run_ids), criterion, int(k))


def mutual_information(run_ids) -> pd.Series:
    path = store_path()
    return _mutual_information(path, _stamp(path), tuple(run_ids))


def runs() -> pd.DataFrame:
    path = store_path()
    return _runs(path, _stamp(path))


def expert_stats(run_ids, columns: list[str] | None = None, layer: int | None = None) -> pd.DataFrame:
    """expert_stats rows of these runs (only `columns` / one `layer` when given)."""
    path = store_path()
    return _expert_stats(path, _stamp(path), tuple(run_ids), tuple(columns) if columns else None,
                         None if layer is None else int(layer))


def layer_stats(run_ids) -> pd.DataFrame:
    path = store_path()
    return _layer_stats(path, _stamp(path), tuple(run_ids))


def layer_format(run_ids):
    """`format_func` for a layer picker: the number, with its module path for encoder-decoder models."""
    labels = tables.layer_labels(layer_stats(run_ids))
    return lambda layer: labels.get(int(layer), str(layer))


def coactivation(run_id: str, layer: int) -> pd.DataFrame:
    path = store_path()
    return _coactivation(path, _stamp(path), run_id, int(layer))


def metric_values(run_ids, metric: str) -> pd.DataFrame:
    path = store_path()
    return _metric_values(path, _stamp(path), tuple(run_ids), metric)


def measured_criteria(run_ids) -> list[str]:
    """Criteria (but the random baseline) that every expert of these runs has scores for."""
    from moe_viz.analysis import criteria

    names = [c for c in criteria.CRITERIA if c != "random"]
    stats = expert_stats(run_ids, criteria.columns_for(names))
    return [c for c in names if criteria.measured(stats, c)]


def causal_vs_observational(model_id: str, run_id: str, domain: str) -> None:
    """The Spearman table between causal measures and routing criteria of one run, or how to measure them."""
    from moe_viz.analysis.importance import causal_agreement

    st.subheader("Causal vs observational")
    try:
        causal = causal_agreement(store_path(), run_id)
    except MoeVizError:
        st.info(f"No causal measurements for {domain} yet: `moe-viz importance --model {model_id} --domain {domain} "
                "[--knockout-layer L]` measures what masking each expert does (block reconstruction error; "
                "end-to-end KL for one layer).")
        return
    st.caption("Spearman ρ, per layer, between each causal measure (reconstruction error; knockout KL where a "
               "layer was knocked out) and each routing criterion's scores. Low ρ: the criterion misjudges "
               "which experts matter there.")
    pivot = causal.pivot_table(index=["causal", "layer"], columns="criterion", values="spearman")
    st.dataframe(pivot.reset_index(), hide_index=True)


def require_runs() -> pd.DataFrame:
    """Complete runs, or a friendly start message and stop."""
    try:
        all_runs = runs()
    except MoeVizError as exc:
        st.info(f"{exc}. Start with `moe-viz demo`, or capture a model on the **Runs** page.")
        st.stop()
    complete = all_runs[all_runs.status == "complete"]
    if complete.empty:
        st.info("The store has no complete runs yet: run `moe-viz demo`, or capture a model on the **Runs** page.")
        st.stop()
    return complete


def local_config_dir(model_id: str) -> str | None:
    """The directory holding the model's config.json on this machine, found without the network.

    A local directory is itself; a hub id is its snapshot in the Hugging Face hub cache (revision
    `main`, as from_pretrained resolves it); None when there is no local copy.
    """
    from huggingface_hub import try_to_load_from_cache

    if Path(model_id).is_dir():
        return model_id
    try:
        cached = try_to_load_from_cache(model_id, "config.json")
    except ValueError:  # not a valid hub id either (huggingface_hub's validation error is a ValueError)
        return None
    return str(Path(cached).parent) if isinstance(cached, str) else None


@st.cache_resource(show_spinner=False)
def model_config(model_id: str):
    """The model's config from local files (None for a hub id without a local copy)."""
    from transformers import AutoConfig

    # Never reach for the network from a page. from_pretrained(hub_id, local_files_only=True) is not
    # enough: for a hub id missing from the cache, huggingface_hub still fetches its agent-harness
    # registry from the Hub to build a user-agent header (3 s timeout), so a hub id is looked up
    # in the cache here and only a local directory is handed to transformers.
    directory = local_config_dir(model_id)
    if directory is None:
        return None  # a hub id without a local copy just has no config
    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable or unknown to transformers
        return None


def model_label(model_id: str) -> str:
    """A name a person recognises for a captured model id (an absolute directory or a hub id).

    The shipped demo model: "demo (moe_viz/demo/model)". Another local directory: its parent and
    folder name plus the config's model_type, e.g. "checkpoints/qwen-tiny (qwen3_moe)". A hub id: itself.
    """
    import json

    from moe_viz.demo import SHIPPED_MODEL

    path = Path(model_id)
    if not path.is_absolute():
        return model_id  # a hub id
    if path == SHIPPED_MODEL.resolve():
        return "demo (moe_viz/demo/model)"
    name = f"{path.parent.name}/{path.name}" if path.parent.name else path.name or model_id
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    return f"{name} ({model_type})" if model_type else name


def criteria_help(names: list[str] | None = None) -> str:
    """Markdown for a criterion picker's help: one bullet per criterion (Streamlit help drops bare line breaks)."""
    from moe_viz.analysis import criteria

    chosen = list(criteria.CRITERIA) if names is None else names

    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace("*", "\\*").replace("_", "\\_")

    return "\n".join(f"- **{escape(name)}**: {escape(criteria.CRITERIA[name].description)}" for name in chosen)


def pick_model() -> tuple[str, dict[str, str]]:
    """Sidebar model picker: (model id, domain -> run id of its newest complete run), domains sorted."""
    complete = require_runs()
    models = list(dict.fromkeys(complete.model_id))
    model = st.sidebar.selectbox("Model", models, key="model", format_func=model_label)
    chosen = complete[complete.model_id == model].drop_duplicates("domain").sort_values("domain")
    return model, dict(zip(chosen.domain, chosen.run_id))


# -- token-level traces (moe_viz/analysis/token_profiles.py) ---------------------------

@st.cache_data(show_spinner=False, max_entries=64)
def _trace_view(path: str, stamp: float, run_id: str, view: str, args: tuple) -> object:
    from moe_viz.analysis import token_profiles

    return getattr(token_profiles, view)(token_profiles.TraceSource(path, run_id), *args)


def trace_view(run_id: str, view: str, *args):
    """A view of token_profiles (its name) on a run's stored trace, cached until the store changes."""
    path = store_path()
    return _trace_view(path, _stamp(path), run_id, view, args)


@st.cache_data(show_spinner=False, max_entries=16)
def _domain_differences(path: str, stamp: float, run_a: str, run_b: str, layer: int) -> pd.DataFrame:
    from moe_viz.analysis.token_profiles import TraceSource, domain_differences

    return domain_differences(TraceSource(path, run_a), TraceSource(path, run_b), layer)


def domain_differences(run_a: str, run_b: str, layer: int) -> pd.DataFrame:
    path = store_path()
    return _domain_differences(path, _stamp(path), run_a, run_b, int(layer))


def visible(piece: str) -> str:
    """A token piece with its whitespace made visible (space ·, newline ⏎, tab →)."""
    return piece.replace(" ", "·").replace("\n", "⏎").replace("\t", "→")


def context_html(before: str, piece: str, after: str) -> str:
    """One example context as HTML: the token highlighted (escaped; newlines shown as ⏎)."""
    import html

    def text(s: str) -> str:
        return html.escape(s.replace("\n", "⏎"))

    return (f"<code>{text(before)}<mark style='background:{KEPT_COLOR};color:white'>{text(piece)}</mark>"
            f"{text(after)}</code>")
