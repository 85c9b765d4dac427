"""No destructive path without proof of ownership; durable, atomic publishing of exports and JSON files.

Layout used by most tests (all under one tmp dir, so even a regression only damages the test's own files):

    home/models/mixtral/        the source model
    home/proj/cache/store.duckdb the store
    home/proj/cache/exports/    where exports go
"""

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moe_viz import atomic
from moe_viz.cli import _write_json, main
from moe_viz.prune.export import PARTIAL_MARKER, PRUNE_MANIFEST, export_name_path, export_pruned, write_manifest
from moe_viz.errors import MoeVizError
from test_export import _saved_and_captured
from test_ui import _app
from test_ui import captured as ui_captured  # noqa: F401  (a pytest fixture)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    home = tmp_path_factory.mktemp("safe") / "home"
    model_dir, plan = _saved_and_captured(home / "models", "mixtral")
    store = home / "proj" / "cache" / "store.duckdb"
    store.parent.mkdir(parents=True)
    shutil.move(home / "models" / "store.duckdb", store)
    for leftover in (home / "models").glob("store.duckdb*"):
        shutil.move(leftover, store.parent / leftover.name)
    (store.parent / "exports").mkdir()
    return home, model_dir, store, plan


def _snapshot(root: Path) -> dict:
    """Every entry under root (root included): file bytes, link targets, or 'dir'."""
    root = Path(root)
    if root.is_symlink():
        return {".": ("link", os.readlink(root))}
    if root.is_file():
        return {".": root.read_bytes()}
    if not root.exists():
        return {}
    out = {".": "dir"}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = ("link", os.readlink(path))
        elif path.is_file():
            out[key] = path.read_bytes()
        else:
            out[key] = "dir"
    return out


def _hidden_temp(directory: Path) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if ".partial-" in p.name or ".old-" in p.name
                  or ".tmp-" in p.name)


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and "choose" in message, message
    return message


# -- --force refuses everything that is not a previous export -------------------------

REFUSED = {
    "source model": (lambda home, model, store, tmp: model, "is "),
    "dir containing the source model": (lambda home, model, store, tmp: model.parent, "contains"),
    "the store's dir": (lambda home, model, store, tmp: store.parent, "contains"),
    "ancestor of the store": (lambda home, model, store, tmp: store.parent.parent, "contains"),
    "ancestor of both": (lambda home, model, store, tmp: home, "contains"),
    "the store file itself": (lambda home, model, store, tmp: store, "is "),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_force_never_replaces_the_source_model_or_the_store(layout, tmp_path, case):
    home, model_dir, store, plan = layout
    target_of, relation = REFUSED[case]
    target = target_of(home, model_dir, store, tmp_path)
    before = _snapshot(home)
    for streaming in (True, False):
        with pytest.raises(MoeVizError, match=relation) as exc_info:
            export_pruned(plan, model_dir, target, streaming=streaming, force=True, protect=[store])
        assert "choose another --out" in _one_line(exc_info)
    assert _snapshot(home) == before
    assert _hidden_temp(target.parent) == []


def test_protected_paths_are_compared_resolved(layout, tmp_path):
    """A symlinked spelling of the store's directory is still the store's directory."""
    home, model_dir, store, plan = layout
    alias = tmp_path / "alias"
    alias.symlink_to(store.parent.parent, target_is_directory=True)
    before = _snapshot(home)
    with pytest.raises(MoeVizError, match="contains"):
        export_pruned(plan, model_dir, alias / "cache", streaming=True, force=True, protect=[store])
    with pytest.raises(MoeVizError, match="contains"):  # the store given through the alias, --out real
        export_pruned(plan, model_dir, store.parent, streaming=True, force=True, protect=[alias / "cache" / store.name])
    assert _snapshot(home) == before


def test_force_refuses_a_plain_directory_and_a_regular_file(layout, tmp_path):
    _, model_dir, store, plan = layout
    plain = tmp_path / "mine"
    plain.mkdir()
    (plain / "thesis.tex").write_text("years of work")
    (plain / "sub").mkdir()
    (plain / "sub" / "data.bin").write_bytes(bytes(range(256)))
    regular = tmp_path / "notes.txt"
    regular.write_text("do not lose me")
    before = _snapshot(tmp_path)
    with pytest.raises(MoeVizError, match=f"is not a moe_viz export \\(no {PRUNE_MANIFEST}\\)") as exc_info:
        export_pruned(plan, model_dir, plain, streaming=True, force=True, protect=[store])
    assert "refusing to replace it; choose another --out" in _one_line(exc_info)
    with pytest.raises(MoeVizError, match="is a file, not a moe_viz export") as exc_info:
        export_pruned(plan, model_dir, regular, streaming=True, force=True, protect=[store])
    _one_line(exc_info)
    assert _snapshot(tmp_path) == before
    assert _hidden_temp(tmp_path) == []


NOT_A_MANIFEST = {
    "not JSON": lambda d, elsewhere: (d / PRUNE_MANIFEST).write_text("my notes, not JSON"),
    "a JSON list": lambda d, elsewhere: (d / PRUNE_MANIFEST).write_text("[1, 2]"),
    "a directory": lambda d, elsewhere: (d / PRUNE_MANIFEST).mkdir(),
    "a symlink to a real manifest": lambda d, elsewhere: (d / PRUNE_MANIFEST).symlink_to(elsewhere / PRUNE_MANIFEST),
}


@pytest.mark.parametrize("case", list(NOT_A_MANIFEST))
def test_force_needs_a_readable_manifest_that_is_a_real_file(layout, tmp_path, case):
    """A file merely named like the manifest is no proof: the folder is someone else's."""
    _, model_dir, store, plan = layout
    previous = export_pruned(plan, model_dir, tmp_path / "previous", streaming=True, protect=[store])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    NOT_A_MANIFEST[case](mine, previous)
    before = _snapshot(tmp_path)
    with pytest.raises(MoeVizError, match=f"is not a moe_viz export \\(no {PRUNE_MANIFEST}\\)") as exc_info:
        export_pruned(plan, model_dir, mine, streaming=True, force=True, protect=[store])
    _one_line(exc_info)
    assert _snapshot(tmp_path) == before
    assert _hidden_temp(tmp_path) == []


def test_force_refuses_a_symlink_even_to_a_previous_export(layout, tmp_path):
    _, model_dir, store, plan = layout
    export = export_pruned(plan, model_dir, tmp_path / "export", streaming=True)
    link = tmp_path / "link"
    link.symlink_to(export, target_is_directory=True)
    before = _snapshot(tmp_path)
    with pytest.raises(MoeVizError, match="symbolic link"):
        export_pruned(plan, model_dir, link, streaming=True, force=True, protect=[store])
    assert _snapshot(tmp_path) == before
    assert _hidden_temp(tmp_path) == []


def test_out_inside_the_source_model_is_refused(layout):
    home, model_dir, store, plan = layout
    before = _snapshot(home)
    for force in (False, True):
        with pytest.raises(MoeVizError, match="inside the source model directory") as exc_info:
            export_pruned(plan, model_dir, model_dir / "pruned", streaming=True, force=force, protect=[store])
        _one_line(exc_info)
    assert _snapshot(home) == before


@pytest.mark.parametrize("force", [False, True])
def test_an_out_that_appears_while_the_export_runs_is_never_replaced(layout, tmp_path, force):
    """`out` is checked again just before publishing: a folder made meanwhile is the user's, kept as it is."""
    _, model_dir, store, plan = layout
    out = tmp_path / "export"

    def user_makes_out(done, total):
        if not out.exists():
            out.mkdir()
            (out / "thesis.tex").write_text("years of work")

    expected = "already exists: choose another --out" if force is False else "is not a moe_viz export"
    with pytest.raises(MoeVizError, match=expected) as exc_info:
        export_pruned(plan, model_dir, out, streaming=True, force=force, protect=[store], progress=user_makes_out)
    _one_line(exc_info)
    assert _snapshot(out) == {".": "dir", "thesis.tex": b"years of work"}
    assert _hidden_temp(tmp_path) == []


def test_force_replaces_a_previous_export(layout, tmp_path):
    _, model_dir, store, plan = layout
    out = tmp_path / "export"
    export_pruned(plan, model_dir, out, streaming=True, protect=[store])
    (out / "stale.txt").write_text("from the old export")
    first_manifest = (out / PRUNE_MANIFEST).read_bytes()
    export_pruned(plan, model_dir, out, streaming=False, force=True, protect=[store])
    assert not (out / "stale.txt").exists()
    assert json.loads((out / PRUNE_MANIFEST).read_text())["method"] == "in-memory"
    assert json.loads(first_manifest)["method"] == "streaming"
    assert not (out / PARTIAL_MARKER).exists()  # the marker is never published
    assert _hidden_temp(tmp_path) == []


def test_an_export_may_go_next_to_the_store(layout):
    """cache/exports/NAME is the dashboard's own target: inside the store's dir, but not containing it."""
    _, model_dir, store, plan = layout
    out = store.parent / "exports" / "fine"
    try:
        export_pruned(plan, model_dir, out, streaming=True, protect=[store])
        export_pruned(plan, model_dir, out, streaming=True, force=True, protect=[store])
        assert (out / PRUNE_MANIFEST).is_file()
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_prune_cli_force_onto_protected_paths_is_one_line_exit_2(layout, capsys):
    home, model_dir, store, plan = layout
    base = ["prune", "--model", str(model_dir), "--criterion", "frequency", "--keep", "4", "--domain", "rand",
            "--store", str(store), "--no-verify", "--force"]
    before = _snapshot(model_dir)
    models_before = _snapshot(home / "models")
    exports = store.parent / "exports"
    (exports / "user").mkdir()
    (exports / "user" / "file.txt").write_text("mine")
    try:
        for out, expected in [(store.parent, "contains"), (model_dir, "is "), (home / "models", "contains"),
                              (home, "contains"), (exports / "user", "not a moe_viz export"),
                              (model_dir / "sub", "inside the source model directory")]:
            assert main(base + ["--out", str(out)]) == 2, out
            err = capsys.readouterr().err.strip().splitlines()
            errors = [line for line in err if line.startswith("moe-viz: error:")]
            assert len(errors) == 1 and expected in errors[0], err
            assert not any("Traceback" in line for line in err)
        assert _snapshot(model_dir) == before and _snapshot(home / "models") == models_before
        assert (exports / "user" / "file.txt").read_text() == "mine"
        assert sorted(p.name for p in exports.iterdir()) == ["user"]
        assert _hidden_temp(home) == [] and _hidden_temp(store.parent) == [] and _hidden_temp(home / "models") == []
    finally:
        shutil.rmtree(exports / "user")


# -- leftovers of killed exports --------------------------------------------------

def _dir_with(path: Path, **files: str) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    (path / "model.safetensors").write_bytes(b"half a shard")
    (path / "sub").mkdir()
    (path / "sub" / "x").write_text("x")
    return path


def test_stale_temp_dirs_of_killed_exports_are_cleaned_and_nothing_else(layout, tmp_path):
    _, model_dir, store, plan = layout
    parent = tmp_path / "exports"
    parent.mkdir()
    manifest = {PRUNE_MANIFEST: json.dumps({"method": "streaming"})}
    marker = {PARTIAL_MARKER: "moe_viz export in progress\n"}
    cleaned = [
        _dir_with(parent / ".x.partial-0123abcd", **marker),
        _dir_with(parent / ".x.old-89abcdef", **manifest),
        _dir_with(parent / ".other.partial-00000000", **marker),  # any export's leftovers in this parent
    ]
    kept = [
        _dir_with(parent / ".x.partial-foo", **marker),  # not our exact name pattern
        _dir_with(parent / ".x.partial-deadbeef"),  # our pattern, but no marker: not provably ours
        _dir_with(parent / ".x.old-cafebabe", **{"notes.txt": "no manifest"}),
        _dir_with(parent / ".x.old-0000000g", **manifest),  # not hex
        _dir_with(parent / "x.partial-11111111", **marker),  # not hidden
        _dir_with(parent / ".x.partial-22222222", **{PARTIAL_MARKER: "live"}),  # a live export holds its lock
    ]
    (parent / ".y.partial-33333333").write_text("a file, not a directory")
    victim = tmp_path / "victim"
    _dir_with(victim, **marker)
    (parent / ".z.partial-44444444").symlink_to(victim, target_is_directory=True)
    outside = _dir_with(tmp_path / ".x.partial-55555555", **marker)  # another parent
    before = {p: _snapshot(p) for p in kept + [parent / ".y.partial-33333333", victim, outside]}

    live = os.open(parent / ".x.partial-22222222" / PARTIAL_MARKER, os.O_RDONLY)
    try:
        fcntl.flock(live, fcntl.LOCK_EX)
        export_pruned(plan, model_dir, parent / "x", streaming=True, protect=[store])
    finally:
        os.close(live)
    assert (parent / "x" / PRUNE_MANIFEST).is_file()
    assert [p for p in cleaned if os.path.lexists(p)] == []
    assert {p: _snapshot(p) for p in before} == before
    assert (parent / ".z.partial-44444444").is_symlink()


def test_stale_looking_dirs_without_a_real_marker_file_are_kept(layout, tmp_path):
    """The partial marker proves ownership only as a regular file: not as a symlink to one, nor as a directory."""
    _, model_dir, store, plan = layout
    parent = tmp_path / "exports"
    parent.mkdir()
    real_marker = tmp_path / "elsewhere" / PARTIAL_MARKER
    real_marker.parent.mkdir()
    real_marker.write_text("moe_viz export in progress\n")
    linked = _dir_with(parent / ".x.partial-66666666")
    (linked / PARTIAL_MARKER).symlink_to(real_marker)
    as_dir = _dir_with(parent / ".x.partial-77777777")
    (as_dir / PARTIAL_MARKER).mkdir()
    before = _snapshot(tmp_path)
    export_pruned(plan, model_dir, parent / "x", streaming=True, protect=[store])
    shutil.rmtree(parent / "x")
    assert _snapshot(tmp_path) == before


def test_stale_cleanup_never_removes_a_protected_path(layout, tmp_path):
    """A store kept in a folder named like a leftover (with the proof inside) is still never removed."""
    _, model_dir, store, plan = layout
    parent = tmp_path / "exports"
    parent.mkdir()
    old = _dir_with(parent / ".x.old-89abcdef", **{PRUNE_MANIFEST: json.dumps({"method": "streaming"})})
    shutil.copyfile(store, old / "store.duckdb")
    partial = _dir_with(parent / ".x.partial-0123abcd", **{PARTIAL_MARKER: "moe_viz export in progress\n"})
    shutil.copyfile(store, partial / "store.duckdb")
    before = _snapshot(parent)
    export_pruned(plan, model_dir, parent / "x", streaming=True,
                  protect=[store, old / "store.duckdb", partial / "store.duckdb"])
    shutil.rmtree(parent / "x")
    assert _snapshot(parent) == before


KILLED = """
import os, sys
from pathlib import Path
from moe_viz.prune.export import atomic_directory
with atomic_directory(Path(sys.argv[1]), force=False) as tmp:
    (tmp / "model.safetensors").write_bytes(b"half a shard")
    os._exit(9)
"""


def test_the_next_export_cleans_up_after_a_killed_one(layout, tmp_path):
    _, model_dir, store, plan = layout
    out = tmp_path / "x"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", KILLED, str(out)], env=env, capture_output=True, timeout=300)
    assert done.returncode == 9, done.stderr
    leftovers = _hidden_temp(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".x.partial-") and not out.exists()
    assert (tmp_path / leftovers[0] / PARTIAL_MARKER).is_file()
    export_pruned(plan, model_dir, out, streaming=True, protect=[store])
    assert _hidden_temp(tmp_path) == [] and (out / PRUNE_MANIFEST).is_file()


# -- durability ---------------------------------------------------------------------

def _record_fsyncs(monkeypatch, events, move="replace"):
    """Append ("fsync", path) for every os.fsync and (move, src, dst) for every os.<move> (rename or replace)."""
    real_fsync, real_move = os.fsync, getattr(os, move)

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def moved(src, dst, *args, **kwargs):
        events.append((move, os.fspath(src), os.fspath(dst)))
        return real_move(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, move, moved)


def test_every_file_is_fsynced_before_the_rename_that_publishes_it(layout, tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name fsynced descriptors")
    _, model_dir, store, plan = layout
    events = []
    _record_fsyncs(monkeypatch, events, move="rename")
    out = tmp_path / "export"
    export_pruned(plan, model_dir, out, streaming=True, protect=[store])
    publish = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(out))
    tmp = events[publish][1]
    synced = {e[1] for e in events[:publish] if e[0] == "fsync"}
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert PRUNE_MANIFEST in files and "config.json" in files and "model.safetensors" in files
    assert [f for f in files if os.path.join(tmp, f) not in synced] == []
    assert tmp in synced  # the directory's own entries
    assert ("fsync", str(tmp_path)) in events[publish:]  # the new name in the parent


def test_write_text_atomic_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    path = tmp_path / "moe_viz_verify.json"
    atomic.write_text_atomic(path, '{"old": true}\n')
    assert path.read_text() == '{"old": true}\n'

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic.write_text_atomic(path, '{"new": true}\n')
    assert path.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe_viz_verify.json"]


def test_write_text_atomic_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name fsynced descriptors")
    tmp_path = tmp_path.resolve()
    events = []
    _record_fsyncs(monkeypatch, events)
    path = tmp_path / "progress.json"
    atomic.write_text_atomic(path, '{"finished": true}')
    (tmp,) = [e[1] for e in events if e[0] == "replace"]
    assert Path(tmp).parent == tmp_path and Path(tmp).name.startswith(".progress.json.tmp-")
    assert events == [("fsync", tmp), ("replace", tmp, str(path)), ("fsync", str(tmp_path))]
    assert path.read_text() == '{"finished": true}'


def test_fsync_tree_syncs_every_regular_file_then_every_directory_deepest_first(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name fsynced descriptors")
    root = tmp_path.resolve() / "tree"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"a")
    (root / "sub" / "b.bin").write_bytes(b"b")
    (root / "sub" / "deeper" / "c.bin").write_bytes(b"c")
    outside = tmp_path.resolve() / "outside.bin"
    outside.write_bytes(b"not in the tree")
    (root / "sub" / "link.bin").symlink_to(outside)  # a link is not a file of the tree: not synced
    events = []
    _record_fsyncs(monkeypatch, events)
    atomic.fsync_tree(root)
    assert events == [("fsync", str(root / "a.bin")), ("fsync", str(root / "sub" / "b.bin")),
                      ("fsync", str(root / "sub" / "deeper" / "c.bin")),
                      ("fsync", str(root / "sub" / "deeper")), ("fsync", str(root / "sub")), ("fsync", str(root))]


def test_manifest_and_progress_writes_are_atomic(layout, tmp_path, monkeypatch):
    _, model_dir, store, plan = layout

    def crash(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_manifest(tmp_path, plan, model_dir, "streaming")
    progress = tmp_path / "progress.json"
    with pytest.raises(OSError):
        _write_json(progress, {"finished": True})
    assert list(tmp_path.iterdir()) == []  # no half-written manifest, no temp file
    monkeypatch.undo()
    write_manifest(tmp_path, plan, model_dir, "streaming")
    _write_json(progress, {"finished": True})
    assert json.loads((tmp_path / PRUNE_MANIFEST).read_text())["method"] == "streaming"
    assert json.loads(progress.read_text()) == {"finished": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == [PRUNE_MANIFEST, "progress.json"]


def test_an_interrupted_export_leaves_a_previous_export_intact(layout, tmp_path):
    _, model_dir, store, plan = layout
    out = export_pruned(plan, model_dir, tmp_path / "export", streaming=True, protect=[store])
    before = _snapshot(out)

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_pruned(plan, model_dir, out, streaming=True, force=True, protect=[store], progress=interrupt)
    assert _snapshot(out) == before and _hidden_temp(tmp_path) == []


# -- dashboard export names ---------------------------------------------------------

BAD_NAMES = ["", " ", ".", "..", "../../x", "../x", "/abs", "/", "a/b", "a\\b", "C:\\x", ".hidden", "a\x00b",
             "a\nb", "tab\there", "x" * 101]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_export_name_must_be_one_plain_component(tmp_path, name):
    with pytest.raises(MoeVizError, match="export name") as exc_info:
        export_name_path(tmp_path / "exports", name)
    assert "\n" not in str(exc_info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["model-reap-keep4", "x" * 100, "mixtral v2 (keep 4)", "a.b", "modèle"])
def test_plain_export_names_are_accepted(tmp_path, name):
    assert export_name_path(tmp_path / "exports", name) == tmp_path / "exports" / name


def test_prune_page_refuses_bad_names_and_never_replaces_the_exports_dir(ui_captured, monkeypatch):
    root, _, store_path = ui_captured
    exports = root / "exports"
    exports.mkdir(exist_ok=True)
    (exports / "precious").mkdir(exist_ok=True)
    (exports / "precious" / "notes.txt").write_text("mine")
    names_before = {p: sorted(x.name for x in p.iterdir()) for p in (root.parent, root)}  # "../../x" lands in root.parent
    exports_before = _snapshot(exports)

    at = _app(store_path, monkeypatch, "prune")
    for name, replace, expected in [("../../escape", False, "path separator"), ("/abs/escape", False, "absolute"),
                                    (".", True, "starts with '.'"), ("..", True, "starts with '.'"),
                                    ("precious", True, "not a moe_viz export")]:
        at.text_input(key="pr_name").set_value(name).run()
        at.checkbox(key="pr_force").set_value(replace).run()
        at.button(key="pr_export").click().run()
        assert not at.exception, [e.value for e in at.exception]
        errors = [e.value for e in at.error]
        assert len(errors) == 1 and expected in errors[0] and "\n" not in errors[0], (name, errors)
        assert not at.success
    assert _snapshot(exports) == exports_before
    assert {p: sorted(x.name for x in p.iterdir()) for p in names_before} == names_before
    assert not Path("/abs").exists()


# -- a failed publish restores what the export replaced ------------------------------------------------------

def test_a_failed_publishing_rename_puts_the_previous_export_back(layout, tmp_path, monkeypatch):
    """--force moves the previous export aside, then renames the new one into place: if that rename fails,
    the previous export is back under its name and nothing else is left."""
    _, model_dir, store, plan = layout
    out = export_pruned(plan, model_dir, tmp_path / "export", streaming=True, protect=[store])
    before = _snapshot(out)
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        if ".partial-" in os.fspath(src) and os.fspath(dst) == str(out):
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        export_pruned(plan, model_dir, out, streaming=True, force=True, protect=[store])
    monkeypatch.undo()
    assert _snapshot(out) == before
    assert _hidden_temp(tmp_path) == []
