"""What store and job tests need without a model: a hand-written run's rows, a registered run, a
live process of ours to stand in for a job's, and job folders as the Runs page leaves them."""

import json
import subprocess
import sys

import pandas as pd
import psutil

from moe_viz import jobs, store


def run_frames() -> dict[str, pd.DataFrame]:
    """expert_stats, layer_stats and coactivation rows of a two-layer run, every value written by hand."""
    return {
        "expert_stats": pd.DataFrame({
            "layer": [0, 0, 1], "expert": [0, 1, 0], "routed_tokens": [5, 3, 8], "top1_tokens": [2, 1, 4],
            "top1_prob_sum": [0.5, 0.25, 1.0], "gate_sum": [1.5, 0.75, 2.0], "prob_sum": [2.0, 1.0, 3.0],
            "ean_sum": [4.0, 2.0, 6.0], "ean_sq_sum": [9.0, 3.0, 12.0], "ean_max": [2.0, 1.0, 3.0],
            "reap_sum": [1.0, 0.5, 2.0], "contribution_sum": [0.1, 0.2, 0.3]}),
        "layer_stats": pd.DataFrame({
            "layer": [0, 1], "module": ["a", "b"], "tokens": [8, 8], "num_experts": [2, 1], "top_k": [1, 1],
            "router_score": ["softmax", "sigmoid"], "entropy_mean": [0.3, 0.0]}),
        "coactivation": pd.DataFrame({"layer": [0], "expert_a": [0], "expert_b": [1], "tokens": [3]}),
    }


def register_run(path, domain: str = "code", settings: dict | None = None) -> str:
    """begin_run of model "m" on inline text (settings {"seq_len": 8} unless given); the run's id."""
    return store.begin_run(path, model_id="m", model_fingerprint="f", model_type="qwen3_moe", domain=domain,
                           source="inline", settings={"seq_len": 8} if settings is None else settings,
                           tool_version="test")


def stand_in_process() -> subprocess.Popen:
    """A process of ours that exits 0 when its stdin closes (and dies of SIGTERM if signalled)."""
    return subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)


def pid_line(pid: int) -> str:
    """A job's pid file for the live process `pid`: its pid and start time, as moe_viz.jobs records them."""
    return f"{pid} {psutil.Process(pid).create_time()!r}\n"


def job_folder(store_path, job_id: str, pid_line: str | None, kind: str | None = "capture",
               progress: dict | None = None, stderr: str = ""):
    """A job folder as `jobs._new_job`/`_launch` and the command leave it (pid_line None: being started;
    kind None: recorded before kinds were kept)."""
    folder = jobs.jobs_dir(store_path) / job_id
    folder.mkdir(parents=True)
    if kind is not None:
        (folder / "kind").write_text(kind)
    if pid_line is not None:
        (folder / "pid").write_text(pid_line)
    if progress is not None:
        (folder / "progress.json").write_text(json.dumps(progress))
    (folder / "stderr.log").write_text(stderr)
    return folder
