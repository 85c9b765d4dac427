"""The model fingerprint (moe_viz/models/fingerprint.py): what it sees and what it must not."""

import torch

from capture_compare import save_model
from moe_viz.models.fingerprint import model_fingerprint
from moe_viz.models.loading import load_model
from tiny_models import tiny_model


def test_the_fingerprint_sees_the_tail_of_every_tensor():
    model = tiny_model("qwen2_moe")
    before = model_fingerprint(model)
    assert model_fingerprint(tiny_model("qwen2_moe")) == before  # deterministic
    with torch.no_grad():
        model.lm_head.weight.view(-1)[-1] += 1.0  # the last element only: not in the first 64
    assert model.lm_head.weight.numel() > 128
    assert model_fingerprint(model) != before


def test_the_fingerprint_sees_the_config_beside_the_weights():
    a, b = tiny_model("qwen2_moe"), tiny_model("qwen2_moe", rms_norm_eps=1e-3)  # the same random weights
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert model_fingerprint(a) != model_fingerprint(b)


def test_the_fingerprint_sees_the_dtype():
    wide = tiny_model("qwen2_moe").to(torch.bfloat16).to(torch.float32)  # values a bfloat16 holds exactly
    narrow = tiny_model("qwen2_moe").to(torch.bfloat16)
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(wide.state_dict().values(),
                                                               narrow.state_dict().values()))
    assert model_fingerprint(wide) != model_fingerprint(narrow)


def test_the_fingerprint_does_not_depend_on_where_the_checkpoint_lies(tmp_path):
    """The same checkpoint in two directories (moved, copied) is the same model."""
    model_a, _ = load_model(save_model(tmp_path / "a", "qwen2_moe"), device="cpu")
    model_b, _ = load_model(save_model(tmp_path / "elsewhere" / "b", "qwen2_moe"), device="cpu")
    assert model_a.config._name_or_path != model_b.config._name_or_path
    assert model_fingerprint(model_a) == model_fingerprint(model_b)
