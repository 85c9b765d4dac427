"""The capture progress bar's rate is tokens over the time the capture really took."""

import io
import re
import time

import torch

from moe_viz.capture.run import CaptureSettings, capture_model, tqdm_progress
from moe_viz.capture.sources import Documents
from tiny_models import VOCAB, tiny_model

UNITS = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}


def _last_rate(text: str) -> float:
    value, unit = re.findall(r"([\d.]+)([kMG]?)tok/s", text)[-1]
    return float(value) * UNITS[unit]


def test_progress_rate_counts_the_forward_of_a_one_batch_run(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("qwen3_moe")
    forwards: list[float] = []
    model.register_forward_pre_hook(lambda *_: forwards.append(-time.perf_counter()))
    model.register_forward_hook(lambda *_: forwards.append(forwards.pop() + time.perf_counter()))
    g = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, VOCAB, (64,), generator=g).tolist() for _ in range(4)]
    docs = Documents(domain="ids", source="test", token_ids=sequences)
    out = io.StringIO()

    start = time.perf_counter()
    capture_model(model, None, "tiny", [docs], CaptureSettings(seq_len=64, batch_size=4),
                  store_path=tmp_path / "s.duckdb", progress=tqdm_progress(file=out))
    whole_call = time.perf_counter() - start

    assert len(forwards) == 1  # one batch: the case where a late-starting bar reported Mtok/s
    rate = _last_rate(out.getvalue())
    tokens = 4 * 64
    # The bar's time includes the forward (display rounds to 3 digits) and no more than the whole call.
    assert rate <= tokens / forwards[0] * 1.01
    assert rate >= tokens / whole_call * 0.99
