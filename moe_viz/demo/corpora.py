"""Built-in calibration domains, built deterministically from material every install has.

Each domain has a `train` split (calibration and demo training) and a disjoint
`heldout` split (evaluation). Documents are assigned to a split by a hash of
their key (file path, topic name, ...) or, for generated domains, by seed, and
any held-out document whose text also occurs in train is dropped.

Sources and licences are listed in docs/DEMO.md.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import sysconfig
from functools import lru_cache
from pathlib import Path

DOMAINS = ("code", "prose", "math", "json", "multilingual")
SPLITS = ("train", "heldout")
TRAIN_BYTES = 1_500_000
HELDOUT_BYTES = 150_000
CHUNK_BYTES = 4000
MULTILINGUAL_LANGUAGES = (
    "de", "fr", "es", "it", "pt", "nl", "pl", "sv", "da", "cs", "ro", "ca", "fi", "hu", "sk", "sl", "hr",
    "lt", "lv", "et", "tr", "id", "sq", "eo", "gl", "eu", "nb", "is", "fy", "lb",
)
SKIPPED_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages", "lib2to3", "ensurepip", "turtledemo"}


def _is_heldout(key: str) -> bool:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 10 == 0


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIPPED_STDLIB_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        files.append(path)
    return files


def _keyed_code() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in _stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        out.append((str(path.relative_to(root)), text))
    return out


def _keyed_prose() -> list[tuple[str, str]]:
    import pydoc_data.topics

    out = [(f"topic:{name}", text) for name, text in sorted(pydoc_data.topics.topics.items())]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        docs = [ast.get_docstring(node) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        docs = [d for d in docs if d and len(d) > 80]
        if docs:
            out.append((f"docstrings:{path.relative_to(root)}", "\n\n".join(docs)))
    return out


def _math_problem(rng: random.Random) -> str:
    kind = rng.randrange(5)
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 20)
    if kind == 0:
        return f"Compute {a} + {b} * {c}.\nFirst {b} * {c} = {b * c}, then {a} + {b * c} = {a + b * c}.\nAnswer: {a + b * c}"
    if kind == 1:
        x = rng.randint(-20, 20)
        rhs = c * x + a
        return f"Solve {c}x + {a} = {rhs}.\nSubtract {a}: {c}x = {rhs - a}. Divide by {c}: x = {x}.\nAnswer: x = {x}"
    if kind == 2:
        names = ["Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Goran", "Hana"]
        items = ["apples", "books", "marbles", "coins", "tickets", "stamps"]
        who, what = rng.choice(names), rng.choice(items)
        return (f"{who} has {a} {what} and buys {c} bags with {b} {what} each. How many {what} now?\n"
                f"{c} * {b} = {b * c}; {a} + {b * c} = {a + b * c}.\nAnswer: {a + b * c} {what}")
    if kind == 3:
        return (f"Expand ({a}x + {c})({b}x - {c}).\n= {a * b}x^2 - {a * c}x + {b * c}x - {c * c}"
                f"\n= {a * b}x^2 + {b * c - a * c}x - {c * c}.\nAnswer: {a * b}x^2 + {b * c - a * c}x - {c * c}")
    total = a * c
    return (f"A train travels at {a} km/h for {c} hours. How far does it go?\nDistance = speed * time = "
            f"{a} * {c} = {total}.\nAnswer: {total} km")


def _generated_math(split: str) -> list[tuple[str, str]]:
    rng = random.Random(1 if split == "train" else 2)
    return [(f"math:{split}:{i}", "\n\n".join(_math_problem(rng) for _ in range(6))) for i in range(8000)]


_JSON_WORDS = ["id", "name", "email", "status", "created_at", "items", "price", "quantity", "tags", "address",
               "city", "country", "enabled", "timeout", "retries", "version", "owner", "region", "metadata", "score"]
_JSON_VALUES = ["active", "pending", "archived", "eu-west-1", "us-east-2", "admin", "guest", "blue", "green", "v2"]


def _json_value(rng: random.Random, depth: int):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.randint(0, 10_000)
    if kind == 1:
        return round(rng.uniform(0, 1000), 2)
    if kind == 2:
        return rng.choice(_JSON_VALUES)
    if kind == 3:
        return rng.choice([True, False, None])
    if kind in (4, 5):
        return {rng.choice(_JSON_WORDS): _json_value(rng, depth + 1) for _ in range(rng.randint(1, 5))}
    return [_json_value(rng, depth + 1) for _ in range(rng.randint(1, 4))]


def _generated_json(split: str) -> list[tuple[str, str]]:
    rng = random.Random(11 if split == "train" else 12)
    docs = []
    for i in range(6000):
        record = {w: _json_value(rng, 1) for w in rng.sample(_JSON_WORDS, rng.randint(3, 8))}
        docs.append((f"json:{split}:{i}", json.dumps(record, indent=rng.choice([None, 2]), sort_keys=False)))
    return docs


def _po_strings(path: Path) -> list[str]:
    """The translated strings (msgstr) of a gettext .po file, header skipped."""
    strings, current, in_msgstr = [], [], False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("msgstr"):
            in_msgstr, current = True, [line.split(" ", 1)[1] if " " in line else '""']
        elif line.startswith('"') and in_msgstr:
            current.append(line)
        else:
            if in_msgstr and current:
                text = "".join(json.loads(part) for part in current if part.startswith('"'))
                if text and "Content-Type" not in text:
                    strings.append(text)
            in_msgstr, current = False, []
    return strings


def _keyed_multilingual() -> list[tuple[str, str]]:
    import django

    root = Path(django.__file__).parent
    out = []
    for path in sorted(root.rglob("locale/*/LC_MESSAGES/*.po")):
        language = path.parts[-3]
        if language in MULTILINGUAL_LANGUAGES:
            strings = _po_strings(path)
            if strings:
                out.append((str(path.relative_to(root)), "\n".join(strings)))
    return out


def _chunks(keyed: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Cut documents at line boundaries into pieces of about CHUNK_BYTES, so splits mix well."""
    out = []
    for key, text in keyed:
        piece, size, index = [], 0, 0
        for line in text.splitlines(keepends=True):
            piece.append(line)
            size += len(line)
            if size >= CHUNK_BYTES:
                out.append((f"{key}#{index}", "".join(piece)))
                piece, size, index = [], 0, index + 1
        if piece:
            out.append((f"{key}#{index}", "".join(piece)))
    return out


def _split(keyed: list[tuple[str, str]], split: str) -> list[str]:
    train, heldout, size = [], [], {"train": 0, "heldout": 0}
    for key, text in _chunks(keyed):
        target, name, limit = (heldout, "heldout", HELDOUT_BYTES) if _is_heldout(key) else (train, "train", TRAIN_BYTES)
        if size[name] < limit:
            target.append(text)
            size[name] += len(text.encode())
    if split == "train":
        return train
    seen = set(train)
    return [t for t in heldout if t not in seen]


def _cap(texts: list[str], limit: int) -> list[str]:
    out, size = [], 0
    for text in texts:
        if size >= limit:
            break
        out.append(text)
        size += len(text.encode())
    return out


@lru_cache(maxsize=None)
def _documents(domain: str, split: str) -> tuple[str, ...]:
    if domain == "math" or domain == "json":
        generate = _generated_math if domain == "math" else _generated_json
        texts = _cap([t for _, t in generate(split)], TRAIN_BYTES if split == "train" else HELDOUT_BYTES)
        if split == "heldout":
            train = set(_documents(domain, "train"))
            texts = [t for t in texts if t not in train]
        return tuple(texts)
    keyed = {"code": _keyed_code, "prose": _keyed_prose, "multilingual": _keyed_multilingual}[domain]()
    return tuple(_split(keyed, split))


def documents(domain: str, split: str = "train") -> list[str]:
    """The documents of a built-in domain's split (deterministic)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown built-in domain {domain!r}; known: {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use train or heldout")
    return list(_documents(domain, split))
