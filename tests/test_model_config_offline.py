"""The dashboard's model_config reads local files only: no socket is opened, even for a hub id.

huggingface_hub reads HF_HOME when it is imported, so the check runs in a fresh interpreter whose
environment points at a hub cache built here (the layout huggingface_hub writes: models--ORG--NAME
with snapshots/REV/config.json and refs/main). tests/conftest.py's HF_HUB_OFFLINE is removed there:
a user's dashboard does not set it, and with it huggingface_hub would never try the network anyway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OLD, NEW = "1" * 40, "2" * 40

# Runs in the child. The audit hook cannot be removed, so it records only while `watching` is set.
CHILD = """
import json, sys
watching = False
events = []

def hook(event, args):
    if watching and event in ("socket.getaddrinfo", "socket.connect"):
        events.append(event + " " + repr(args[:2] if event == "socket.getaddrinfo" else args[1]))

sys.addaudithook(hook)
from moe_viz.ui.common import model_config

watching = True
missing = model_config("acme/absent-moe")  # first: the old code's network request came with a cache miss
cached = model_config("acme/tiny-moe")
local = model_config(sys.argv[1])
watching = False
print(json.dumps({"events": events, "missing": None if missing is None else missing.to_dict(),
                  "cached": cached.to_dict(), "cached_class": type(cached).__name__, "local": local.to_dict()}))
"""


def write_snapshot(repo: Path, revision: str, experts: int) -> Path:
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({
        "model_type": "mixtral", "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": experts, "num_experts_per_tok": 2}))
    return snapshot


def test_model_config_opens_no_socket(tmp_path):
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-moe"
    write_snapshot(repo, OLD, 8)  # an older snapshot: refs/main names the other one
    current = write_snapshot(repo, NEW, 4)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(NEW)
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_HUB_DISABLE_TELEMETRY", "TRANSFORMERS_OFFLINE")}
    # A closed local port as the Hub: were a request made, it would fail at once and reach no one.
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", CHILD, str(current)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["events"] == []
    assert result["missing"] is None
    assert result["cached_class"] == "MixtralConfig"
    assert (result["cached"]["num_local_experts"], result["cached"]["hidden_size"],
            result["cached"]["num_experts_per_tok"]) == (4, 64, 2)
    assert result["local"] == result["cached"]
