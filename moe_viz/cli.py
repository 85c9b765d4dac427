"""The `moe-viz` command: a thin layer over moe_viz's public functions.

Each command is a function whose docstring is its help text.
"""

from __future__ import annotations

import argparse
import sys

from .models import MoeVizError
from .store import DEFAULT_STORE


def cmd_capture(args: argparse.Namespace) -> int:
    """Record per-layer, per-expert routing statistics of a MoE model on calibration domains.

    One run per --domain is written to the DuckDB store. Sources: a .txt file,
    a .jsonl file (field `text`, or `input_ids` for pre-tokenised data), a
    directory of text files, hf:DATASET[:CONFIG[:SPLIT[:FIELD]]], or builtin:NAME.
    """
    from .capture import CaptureSettings, capture

    settings = CaptureSettings(
        max_tokens=args.max_tokens, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed
    )
    run_ids = capture(
        args.model,
        args.domain,
        store_path=args.store,
        settings=settings,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"stored {len(run_ids)} run(s) in {args.store}: {', '.join(run_ids)}")
    return 0


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-viz", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("capture", help=cmd_capture.__doc__.splitlines()[0], description=cmd_capture.__doc__)
    p.add_argument("--model", required=True, help="local model directory or hub id (safetensors only)")
    p.add_argument("--domain", action="append", default=[], metavar="NAME=SOURCE", help="calibration domain; repeat")
    p.add_argument("--max-tokens", type=int, default=200_000, help="tokens per domain (default 200000)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per packed sequence (default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--seed", type=int, default=0, help="document shuffling seed (default 0)")
    p.add_argument("--store", default=str(DEFAULT_STORE), help=f"DuckDB store (default {DEFAULT_STORE})")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto spreads over GPUs)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code")
    p.set_defaults(func=cmd_capture)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _set_threads(args.threads)
    try:
        return args.func(args)
    except MoeVizError as exc:
        print(f"moe-viz: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-viz: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
