"""Every bad input is one `moe-viz: error:` line, exit code != 0, no traceback, and nothing written.

Damaged checkpoints (truncated, random bytes, a shard missing, layers missing, no tokenizer,
broken config), replaced after capture, moved before verification; bad --threads and
--protect; binary .jsonl; uncached hub ids offline; relative --domain paths.
"""

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import duckdb
import pytest
from safetensors.torch import load_file, save_file

from moe_viz.cli import main
from moe_viz.prune.export import export_pruned
from moe_viz.prune.plan import build_plan
from moe_viz.capture.sources import read_documents
from tiny_models import SAMPLE_TEXT, save_tiny_model, tiny_model, tiny_tokenizer

SHARD = "40KB"  # the tiny model in about six shards


def _save(path: Path, seed: int = 0, shard: str | None = SHARD, **overrides) -> Path:
    """Like tiny_models.save_tiny_model, optionally sharded (with an index) and with config overrides."""
    tokenizer = tiny_tokenizer()
    model = tiny_model("qwen3_moe", seed=seed, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **overrides)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(path)
    return path


def _error_line(code: int, capsys, phrase: str) -> str:
    """Assert exit != 0, exactly one `moe-viz: error:` line containing `phrase`, no traceback."""
    printed = capsys.readouterr()
    lines = (printed.err + printed.out).splitlines()
    errors = [line for line in lines if line.startswith("moe-viz: error:")]
    assert code != 0, lines
    assert len(errors) == 1, lines
    assert phrase in errors[0], errors[0]
    assert not any("Traceback" in line for line in lines), lines
    return errors[0]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@contextlib.contextmanager
def _restored(directory: Path):
    """Let a test damage `directory` (the captured model); put every byte back afterwards."""
    backup = directory.parent / f"{directory.name}.backup"
    shutil.copytree(directory, backup)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)
        backup.rename(directory)


def _shards(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _randomise(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


def _remove_a_shard(model_dir: Path) -> None:
    _shards(model_dir)[1].unlink()


def _invalid_config(model_dir: Path) -> None:
    (model_dir / "config.json").write_text('{"model_type": "qwen3_moe", "hidden_size": ')


def _config_without_model_type(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    del config["model_type"]
    (model_dir / "config.json").write_text(json.dumps(config))


# -- fixtures ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A sharded tiny model with tokenizer; tests copy it before damaging it."""
    return _save(tmp_path_factory.mktemp("pristine") / "model")


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """A sharded model captured on one text domain given by a *relative* path; then exported."""
    root = tmp_path_factory.mktemp("captured")
    model_dir = _save(root / "model")
    (root / "calib").mkdir()
    (root / "calib" / "code.txt").write_text(SAMPLE_TEXT * 10)
    store_path = root / "store.duckdb"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["capture", "--model", str(model_dir), "--domain", "code=calib/code.txt", "--store",
                     str(store_path), "--seq-len", "32", "--max-tokens", "256", "--batch-size", "4"]) == 0
    finally:
        os.chdir(cwd)
    export = root / "exports" / "pruned"
    assert main(["prune", "--model", str(model_dir), "--criterion", "frequency", "--keep", "4", "--domain", "code",
                 "--out", str(export), "--store", str(store_path), "--no-verify", "--streaming"]) == 0
    return model_dir, store_path, export


@pytest.fixture
def text_domain(tmp_path):
    path = tmp_path / "code.txt"
    path.write_text(SAMPLE_TEXT * 4)
    return path


def _capture_fails(capsys, model: str, domain: str, store_path: Path, phrase: str) -> str:
    code = main(["capture", "--model", model, "--domain", domain, "--store", str(store_path),
                 "--seq-len", "32", "--max-tokens", "128"])
    line = _error_line(code, capsys, phrase)
    assert not store_path.exists()
    assert not list(store_path.parent.glob(f"{store_path.name}*"))  # no .wal or other sibling either
    return line


def _prune_fails(capsys, captured, phrase: str, *extra: str) -> str:
    """`moe-viz prune` on the captured model: refused, no --out, no hidden temp sibling, store unchanged."""
    model_dir, store_path, _ = captured
    out_parent = Path(tempfile.mkdtemp(prefix="prune_out", dir=store_path.parent))
    before = _digest(store_path)
    code = main(["prune", "--model", str(model_dir), "--criterion", "frequency", "--domain", "code",
                 "--out", str(out_parent / "pruned"), "--store", str(store_path), "--no-verify", *extra])
    line = _error_line(code, capsys, phrase)
    assert list(out_parent.iterdir()) == []  # neither the export nor a .pruned.partial-* / .old-* sibling
    assert _digest(store_path) == before
    return line


def _verify_fails(capsys, captured, phrase: str, *extra: str) -> str:
    """`moe-viz verify` of the captured export: refused, no moe_viz_verify.json, export and store unchanged."""
    _, store_path, export = captured
    before_export, before_store = _listing(export), _digest(store_path)
    code = main(["verify", str(export), "--store", str(store_path), *extra])
    line = _error_line(code, capsys, phrase)
    assert _listing(export) == before_export and not (export / "moe_viz_verify.json").exists()
    assert _digest(store_path) == before_store
    return line


# -- 1. truncated or random-bytes safetensors --------------------------------------

@pytest.mark.parametrize("damage", [_truncate, _randomise], ids=["truncated", "random-bytes"])
def test_capture_refuses_a_corrupt_shard(tmp_path, pristine, text_domain, capsys, damage):
    model_dir = shutil.copytree(pristine, tmp_path / "model")
    damage(_shards(model_dir)[2])
    line = _capture_fails(capsys, str(model_dir), f"code={text_domain}", tmp_path / "store.duckdb",
                          "is corrupt or truncated")
    assert _shards(model_dir)[2].name in line


def test_capture_refuses_a_truncated_single_file_checkpoint(tmp_path, text_domain, capsys):
    model_dir = save_tiny_model(tmp_path / "model")
    (model_dir / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes()[:5])
    _capture_fails(capsys, str(model_dir), f"code={text_domain}", tmp_path / "store.duckdb", "is corrupt or truncated")


@pytest.mark.parametrize("damage", [_truncate, _randomise], ids=["truncated", "random-bytes"])
@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_prune_refuses_a_corrupt_shard(captured, capsys, damage, streaming):
    with _restored(captured[0]) as model_dir:
        damage(_shards(model_dir)[2])
        _prune_fails(capsys, captured, "is corrupt or truncated", "--keep", "4", *(["--streaming"] if streaming else []))


def test_verify_refuses_a_corrupt_source_shard(captured, capsys):
    with _restored(captured[0]) as model_dir:
        _truncate(_shards(model_dir)[0])
        _verify_fails(capsys, captured, "is corrupt or truncated")


# -- 2. a sharded checkpoint missing a shard ---------------------------------------

def test_capture_refuses_a_missing_shard(tmp_path, pristine, text_domain, capsys):
    model_dir = shutil.copytree(pristine, tmp_path / "model")
    _remove_a_shard(model_dir)
    _capture_fails(capsys, str(model_dir), f"code={text_domain}", tmp_path / "store.duckdb", "is missing shard")


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_prune_refuses_a_missing_shard(captured, capsys, streaming):
    with _restored(captured[0]) as model_dir:
        _remove_a_shard(model_dir)
        _prune_fails(capsys, captured, "is missing shard", "--keep", "4", *(["--streaming"] if streaming else []))


def test_verify_refuses_a_source_missing_a_shard(captured, capsys):
    with _restored(captured[0]) as model_dir:
        _remove_a_shard(model_dir)
        _verify_fails(capsys, captured, "is missing shard")


# -- 3. weights missing for layers the config declares -------------------------------

def _rewrite_weights(model_dir: Path, edit) -> None:
    tensors = load_file(model_dir / "model.safetensors")
    save_file(edit(tensors), model_dir / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("edit, phrase", [
    (lambda t: {k: v for k, v in t.items() if ".layers.1." not in k}, "missing (11): model.layers.1."),
    (lambda t: {**t, "model.layers.2.mlp.gate.weight": t["model.layers.1.mlp.gate.weight"].clone()},
     "unexpected (1): model.layers.2.mlp.gate.weight"),
    (lambda t: {**t, "model.norm.weight": t["model.norm.weight"][:-1].clone()}, "mismatched shape (1): model.norm.weight"),
], ids=["missing-layer", "unexpected", "mismatched"])
def test_capture_never_random_initialises(tmp_path, text_domain, capsys, edit, phrase):
    model_dir = save_tiny_model(tmp_path / "model")
    _rewrite_weights(model_dir, edit)
    line = _capture_fails(capsys, str(model_dir), f"code={text_domain}", tmp_path / "store.duckdb",
                          "does not hold the weights its config declares")
    assert phrase in line


def test_tied_embeddings_are_not_missing(tmp_path, text_domain):
    """lm_head tied to the embeddings is saved once; that is a complete checkpoint."""
    model_dir = _save(tmp_path / "model", shard=None, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(model_dir / "model.safetensors")
    assert main(["capture", "--model", str(model_dir), "--domain", f"code={text_domain}",
                 "--store", str(tmp_path / "store.duckdb"), "--seq-len", "32", "--max-tokens", "64"]) == 0


# -- 4. a text domain on a model without a usable tokenizer --------------------------

def _without_tokenizer(tmp_path, pristine) -> Path:
    model_dir = shutil.copytree(pristine, tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_dir / name).unlink(missing_ok=True)
    return model_dir


def test_text_domain_needs_a_usable_tokenizer(tmp_path, pristine, text_domain, capsys):
    model_dir = _without_tokenizer(tmp_path, pristine)
    line = _capture_fails(capsys, str(model_dir), f"code={text_domain}", tmp_path / "store.duckdb",
                          f"domain code is text but {model_dir} has no usable tokenizer")
    assert "no tokenizer files" in line and "pre-tokenised .jsonl with input_ids" in line


def test_pretokenised_domain_needs_no_tokenizer(tmp_path, pristine):
    model_dir = _without_tokenizer(tmp_path, pristine)
    ids = tmp_path / "ids.jsonl"
    ids.write_text("".join(json.dumps({"input_ids": list(range(i, i + 20))}) + "\n" for i in range(5)))
    store_path = tmp_path / "store.duckdb"
    assert main(["capture", "--model", str(model_dir), "--domain", f"ids={ids}", "--store", str(store_path)]) == 0
    with duckdb.connect(str(store_path), read_only=True) as con:
        assert con.execute("SELECT tokens FROM runs").fetchone() == (100,)


# -- 5. a binary .jsonl --------------------------------------------------------------

def test_binary_jsonl_names_file_and_line(tmp_path, pristine, capsys):
    binary = tmp_path / "blob.jsonl"
    binary.write_bytes(b'{"text": "fine"}\n' + b'{"text": "\xff\xfe\x00\x81"}\n')
    line = _capture_fails(capsys, str(pristine), f"d={binary}", tmp_path / "store.duckdb", "line 2 is not UTF-8")
    assert str(binary) in line


def test_random_bytes_jsonl(tmp_path, pristine, capsys):
    binary = tmp_path / "random.jsonl"
    binary.write_bytes(random.Random(0).randbytes(4096))
    line = _capture_fails(capsys, str(pristine), f"d={binary}", tmp_path / "store.duckdb", f"{binary} line ")
    assert "not UTF-8" in line or "not valid JSON" in line


def test_negative_token_ids_name_file_and_line(tmp_path, pristine, capsys):
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"input_ids": [5, 6, 7]}\n{"input_ids": [8, -1, 9]}\n')
    line = _capture_fails(capsys, str(pristine), f"d={ids}", tmp_path / "store.duckdb",
                          "line 2: 'input_ids' must be a non-empty list of token ids (ints ≥ 0)")
    assert str(ids) in line


def test_a_domain_name_given_twice_is_refused(tmp_path, pristine, text_domain, capsys):
    other = tmp_path / "other.txt"
    other.write_text(SAMPLE_TEXT)
    store_path = tmp_path / "store.duckdb"
    code = main(["capture", "--model", str(pristine), "--domain", f"code={text_domain}", "--domain", f"code={other}",
                 "--store", str(store_path), "--seq-len", "32", "--max-tokens", "128"])
    _error_line(code, capsys, "domain names must be unique; repeated: code")
    assert not store_path.exists()


# -- 6. --threads <= 0 ---------------------------------------------------------------

@pytest.mark.parametrize("threads", ["0", "-2"])
def test_threads_must_be_positive(tmp_path, pristine, text_domain, capsys, threads):
    store_path = tmp_path / "store.duckdb"
    code = main(["--threads", threads, "capture", "--model", str(pristine), "--domain", f"code={text_domain}",
                 "--store", str(store_path)])
    _error_line(code, capsys, f"--threads {threads} must be a positive integer")
    assert not store_path.exists()


# -- 7. a broken config.json, an uncached hub id offline -----------------------------

@pytest.mark.parametrize("damage, phrase", [(_invalid_config, "config.json is not valid JSON"),
                                            (_config_without_model_type, "config.json has no model_type")],
                         ids=["invalid-json", "no-model-type"])
def test_broken_config_in_capture_prune_and_verify(tmp_path, pristine, captured, text_domain, capsys, damage, phrase):
    copy = shutil.copytree(pristine, tmp_path / "model")
    damage(copy)
    _capture_fails(capsys, str(copy), f"code={text_domain}", tmp_path / "store.duckdb", phrase)
    with _restored(captured[0]) as model_dir:
        damage(model_dir)
        _prune_fails(capsys, captured, phrase, "--keep", "4")
        _verify_fails(capsys, captured, phrase)


def test_uncached_hub_id_offline(tmp_path, captured, text_domain, capsys):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py
    hub_id = "moe-viz-tests/no-such-model"
    phrase = f"cannot load the config of {hub_id} (HF_HUB_OFFLINE is set"
    _capture_fails(capsys, hub_id, f"code={text_domain}", tmp_path / "store.duckdb", phrase)
    _, store_path, _ = captured
    before = _digest(store_path)
    code = main(["prune", "--model", hub_id, "--criterion", "frequency", "--keep", "4", "--domain", "code",
                 "--out", str(tmp_path / "out"), "--store", str(store_path)])
    _error_line(code, capsys, phrase)
    assert not (tmp_path / "out").exists() and _digest(store_path) == before
    _verify_fails(capsys, captured, phrase, "--model", hub_id)


# -- 8. a checkpoint replaced after capture -----------------------------------------

def _replace_with_other_weights(model_dir: Path) -> None:
    for path in model_dir.iterdir():
        path.unlink()
    _save(model_dir, seed=1)  # same config, same file sizes, different weights


def test_capture_records_the_checkpoint_digest(captured):
    from moe_viz.checkpoint import checkpoint_digest

    model_dir, store_path, export = captured
    with duckdb.connect(str(store_path), read_only=True) as con:
        settings = json.loads(con.execute("SELECT settings FROM runs").fetchone()[0])
    assert settings["checkpoint_digest"] == checkpoint_digest(model_dir)
    manifest = json.loads((export / "moe_viz_prune.json").read_text())
    assert manifest["plan"]["checkpoint_digest"] == settings["checkpoint_digest"]


def test_capture_refuses_bytes_after_the_last_tensor(tmp_path, pristine, text_domain, capsys):
    model_dir = shutil.copytree(pristine, tmp_path / "model")
    shard = _shards(model_dir)[2]
    shard.write_bytes(shard.read_bytes() + bytes(16))
    line = _capture_fails(capsys, str(model_dir), f"code={text_domain}", tmp_path / "store.duckdb",
                          "16 bytes after the last tensor")
    assert shard.name in line


@pytest.mark.parametrize("edit", ["config", "last byte"])
def test_the_checkpoint_digest_sees_the_config_and_the_end_of_each_shard(tmp_path, pristine, edit):
    """A config edited after capture, or a shard's last byte changed in place (same size), is a changed checkpoint."""
    from moe_viz.checkpoint import check_unchanged, checkpoint_digest
    from moe_viz.errors import MoeVizError

    model_dir = shutil.copytree(pristine, tmp_path / "model")
    before = checkpoint_digest(model_dir)
    if edit == "config":
        config = json.loads((model_dir / "config.json").read_text())
        config["rms_norm_eps"] = config["rms_norm_eps"] * 10
        (model_dir / "config.json").write_text(json.dumps(config))
    else:
        shard = max(_shards(model_dir), key=lambda p: p.stat().st_size)
        data = bytearray(shard.read_bytes())
        assert len(data) > 3 * 4096  # digested in sampled 4 KiB blocks, the last ending at the file's end
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
    assert checkpoint_digest(model_dir) != before
    with pytest.raises(MoeVizError, match="changed since it was captured"):
        check_unchanged(model_dir, before, "tiny")


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_prune_refuses_a_checkpoint_replaced_after_capture(captured, capsys, streaming):
    with _restored(captured[0]) as model_dir:
        sizes = {p.name: p.stat().st_size for p in model_dir.iterdir()}
        _replace_with_other_weights(model_dir)
        assert {p.name: p.stat().st_size for p in model_dir.iterdir()} == sizes
        _prune_fails(capsys, captured, f"{model_dir} changed since it was captured (checkpoint digest differs): "
                     "re-capture it or point --model at the captured checkpoint",
                     "--keep", "4", *(["--streaming"] if streaming else []))


def test_dashboard_export_refuses_a_replaced_checkpoint(captured, tmp_path):
    """The dashboard calls export_pruned with a plan from the store: the same check applies there."""
    from moe_viz.errors import MoeVizError

    model_dir, store_path, _ = captured
    plan = build_plan(store_path, str(model_dir.resolve()), "frequency", {"code": 1.0}, keep=4)
    with _restored(model_dir):
        _replace_with_other_weights(model_dir)
        with pytest.raises(MoeVizError, match="changed since it was captured"):
            export_pruned(plan, model_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_verify_refuses_a_source_replaced_after_capture(captured, capsys):
    with _restored(captured[0]) as model_dir:
        _replace_with_other_weights(model_dir)
        _verify_fails(capsys, captured, "changed since it was captured")


# -- 9. verify after the source model moved -----------------------------------------

def test_verify_after_the_source_moved(captured, capsys):
    model_dir = captured[0]
    moved = model_dir.parent / "moved-model"
    model_dir.rename(moved)
    try:
        line = _verify_fails(capsys, captured, f"the source model recorded in moe_viz_prune.json ({model_dir}) "
                             "no longer exists: pass --model PATH")
        assert line.count("\n") == 0
        _verify_fails(capsys, captured, f"--model {model_dir} does not exist", "--model", str(model_dir))
    finally:
        moved.rename(model_dir)


# -- 10. --protect naming an expert or layer that does not exist ---------------------

@pytest.mark.parametrize("protect, phrase", [
    ("7:0", "--protect 7:0: layer 7 is not a MoE layer of this model (MoE layers: 0-1)"),
    ("1:8", "--protect 1:8: layer 1 has no expert 8 (experts 0-7)"),
    ("3:17", "layer 3 is not a MoE layer"),
    ("x:1", "must look like LAYER:EXPERT"),
])
def test_protect_must_name_a_real_expert(captured, capsys, protect, phrase):
    _prune_fails(capsys, captured, phrase, "--keep", "4", "--protect", "0:1", "--protect", protect)


# -- 11. relative --domain paths are stored absolute ---------------------------------

def test_relative_domain_is_stored_absolute_and_readable_from_elsewhere(captured, tmp_path, monkeypatch):
    _, store_path, _ = captured
    with duckdb.connect(str(store_path), read_only=True) as con:
        (source,) = con.execute("SELECT source FROM runs WHERE domain = 'code'").fetchone()
    assert Path(source).is_absolute() and source == str(store_path.parent / "calib" / "code.txt")
    monkeypatch.chdir(tmp_path)  # verification run from another directory reads the stored source
    docs = read_documents("code", source)
    assert docs.texts == [SAMPLE_TEXT * 10] and docs.source == source
