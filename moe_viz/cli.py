"""The `moe-viz` command: a thin layer over moe_viz's public functions.

Each command is a function whose docstring is its help text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from moe_viz.errors import MoeVizError
from moe_viz.capture.trace import DEFAULT_TRACE_TOKENS
from moe_viz.store import check_store_path
from moe_viz.store_location import HOME_ENV, default_store


def cmd_capture(args: argparse.Namespace) -> int:
    """Record per-layer, per-expert routing statistics of a MoE model on calibration domains.

    One run per --domain is written to the DuckDB store. Sources: a .txt file,
    a .jsonl file (field `text`, or `input_ids` for pre-tokenised data), a
    directory of text files, hf:DATASET[:CONFIG[:SPLIT[:FIELD]]], or builtin:NAME.

    --layerwise streams one decoder layer at a time from the safetensors shards
    (chosen automatically when the checkpoint would not fit on the device);
    --resume continues one that was interrupted. Under torchrun or accelerate
    launch the batches are split over the ranks and rank 0 stores the runs.
    """
    from moe_viz.capture.run import CaptureSettings, capture, tqdm_progress

    settings = CaptureSettings(
        max_tokens=args.max_tokens, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
        trace_tokens=args.trace_tokens,
    )
    progress = tqdm_progress()
    if args.progress_file:
        progress = _file_progress(Path(args.progress_file), progress)
    run_ids = capture(
        args.model,
        args.domain,
        store_path=args.store,
        settings=settings,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        progress=progress,
        layerwise=True if args.layerwise else None,
        resume=args.resume,
        max_host_memory=parse_bytes(args.max_host_memory, "--max-host-memory") if args.max_host_memory else None,
        timing=args.timing,
    )
    if not run_ids:  # a data-parallel rank other than 0: rank 0 stored the runs
        return 0
    if args.progress_file:
        _write_json(Path(args.progress_file), {"finished": True, "run_ids": run_ids})
    print(f"stored {len(run_ids)} run(s) in {args.store}: {', '.join(run_ids)}")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    """Trace the routing of a text through a MoE model: every token's experts and gates in every MoE layer.

    Writes token_routes, run_tokens and token_pieces as Parquet (plus meta.json) into a new --out
    directory (the dashboard's Token routes page runs this for pasted text).
    """
    from moe_viz.capture.trace import save_trace, trace_text
    from moe_viz.models.loading import load_model

    if (args.text is None) == (args.text_file is None):
        raise MoeVizError("give exactly one of --text or --text-file")
    if Path(args.out).exists():
        raise MoeVizError(f"{args.out} already exists: choose a new --out directory")
    if args.text_file is not None:
        try:
            text = Path(args.text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MoeVizError(f"cannot read --text-file {args.text_file}: {exc}") from None
    else:
        text = args.text
    progress_file = Path(args.progress_file) if args.progress_file else None
    if progress_file:
        _write_json(progress_file, {"stage": "loading model", "finished": False})
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    if progress_file:
        _write_json(progress_file, {"stage": "tracing", "finished": False})
    frames = trace_text(model, tokenizer, text, max_tokens=args.max_tokens, seq_len=args.seq_len,
                        batch_size=args.batch_size)
    out = save_trace(args.out, frames, {"model": args.model, "tokens": len(frames["run_tokens"])})
    if progress_file:
        _write_json(progress_file, {"stage": "traced", "out": str(out), "finished": True})
    print(f"traced {len(frames['run_tokens'])} tokens into {out}")
    return 0


def parse_bytes(text: str, option: str) -> int:
    """'64G', '512MiB', '1.5T' or a plain number of bytes."""
    import re

    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not found:
        raise MoeVizError(f"{option} {text!r} is not a size: use e.g. 64G, 512M or a number of bytes")
    return int(float(found.group(1)) * 1024 ** " KMGT".index(found.group(2) or " "))


def _write_json(path: Path, data: dict) -> None:
    from moe_viz.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(data))  # readers never see a half-written file


def _file_progress(path: Path, also):
    """Progress callback that also mirrors the latest state to a JSON file (for the dashboard)."""
    def report(p) -> None:
        also(p)
        _write_json(path, {"domain": p.domain, "tokens_done": p.tokens_done, "tokens_total": p.tokens_total,
                           "elapsed_s": round(p.elapsed_s, 2), "detail": p.detail, "finished": False})

    return report


def _verify_and_report(export_dir, store_path: str, source_dir=None) -> int:
    from moe_viz.prune.verify import format_report, verify_from_store

    result, notes = verify_from_store(export_dir, store_path, source_dir)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(format_report(result))
    print(f"details in {Path(export_dir) / 'moe_viz_verify.json'}")
    return 0 if result["verdict"] == "PASS" else 1


def _parse_protected(specs: list[str]) -> dict[int, list[int]]:
    protected: dict[int, list[int]] = {}
    for spec in specs:
        layer, sep, expert = spec.partition(":")
        if not sep or not layer.isdigit() or not expert.isdigit():
            raise MoeVizError(f"--protect {spec!r} must look like LAYER:EXPERT, e.g. 3:17")
        protected.setdefault(int(layer), []).append(int(expert))
    return protected


def cmd_prune(args: argparse.Namespace) -> int:
    """Score experts on captured domains, export a pruned checkpoint, and verify it.

    The plan comes from --criterion with --sparsity or --keep on --domain, or from
    --plan FILE (a uniform plan JSON, e.g. written by `search --out`). The export is
    written atomically to --out (refused if it exists, unless --force), with
    moe_viz_prune.json beside the weights. Verification (skip with --no-verify;
    see `verify`) ends with PASS or FAIL; exit code 1 on FAIL.
    """
    from moe_viz.checkpoint import load_config
    from moe_viz.prune.export import export_pruned
    from moe_viz.models.loading import canonical_model_id, check_model_path
    from moe_viz.prune.plan import build_plan, parse_domain_weights

    check_store_path(args.store, write=False)
    check_model_path(args.model)
    config = load_config(args.model)  # broken config.json, uncached hub id offline: one line
    model_id = canonical_model_id(args.model)
    if args.plan:
        if (args.criterion or args.sparsity is not None or args.keep is not None or args.domain or args.protect
                or args.top_k is not None):
            raise MoeVizError("--plan FILE replaces --criterion, --sparsity/--keep, --domain, --protect and --top-k: "
                              "give one or the other")
        plan = _read_plan_file(args.plan)
        if plan.model_id != model_id:
            raise MoeVizError(f"--plan {args.plan} was made for {plan.model_id}, not {model_id}")
    elif args.criterion is None or (args.sparsity is None) == (args.keep is None):
        raise MoeVizError("give --criterion and one of --sparsity or --keep, or a --plan FILE")
    else:
        plan = build_plan(
            args.store, model_id, args.criterion, parse_domain_weights(args.domain), config=config,
            sparsity=args.sparsity, keep=args.keep, protected=_parse_protected(args.protect), seed=args.seed,
            top_k=args.top_k,
        )
    out = export_pruned(plan, model_id, args.out, streaming=True if args.streaming else None, force=args.force,
                        protect=[args.store])
    print(f"exported {out}: kept {plan.keep_per_layer} of {next(iter(plan.num_experts.values()))} experts per layer "
          f"({plan.criterion}, sparsity {plan.sparsity:.3f})")
    if args.no_verify:
        return 0
    return _verify_and_report(out, args.store)


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify an existing moe_viz export against its source model: PASS (exit 0) or FAIL (exit 1).

    PASS needs: a clean reload; every MoE block equal to the original block with the
    dropped experts masked, replayed in float64 (to float64 rounding); every other
    tensor unchanged; and end-to-end logits in the checkpoint dtype within 4x the
    measured dtype-vs-float64 noise floor. Per-domain perplexity, KL and top-1
    agreement vs the unpruned original are reported beside the verdict.
    """
    from moe_viz.checkpoint import check_verify_inputs

    check_verify_inputs(args.export, args.model)  # moved or broken source model: one line, nothing written
    check_store_path(args.store, write=False)
    return _verify_and_report(args.export, args.store, source_dir=args.model)


def cmd_import_run(args: argparse.Namespace) -> int:
    """Import a run that `capture` saved to a directory because the store stayed locked.

    `capture` prints the exact command when that happens. The run is completed in
    one transaction (replacing older runs with the same settings, as a capture
    would) and the saved directory is removed.
    """
    from moe_viz.store import import_run_file

    check_store_path(args.store, write=True)
    run_id = import_run_file(args.path, args.store)
    print(f"imported run {run_id} into {args.store}")
    return 0


def _evaluation_text(args: argparse.Namespace, plan, tokenizer, vocab: int) -> dict[str, list[list[int]]]:
    """--eval-domain text, else what the plan's captured domains' statistics did not see."""
    from moe_viz.prune.evaluate import evaluation_sequences, named_sequences

    notes: list[str] = []
    if args.eval_domain:
        sequences = named_sequences(args.eval_domain, tokenizer, vocab, args.seq_len, args.max_tokens)
    else:
        sequences, notes = evaluation_sequences(args.store, plan, tokenizer, vocab, args.seq_len, args.max_tokens)
    sequences = {name: seqs for name, seqs in sequences.items() if seqs}
    if not sequences:
        raise MoeVizError("no evaluation text: " + ("; ".join(notes) or "give --eval-domain NAME=SOURCE"))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return sequences


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a pruning plan without exporting it: per-domain quality vs the unpruned model.

    The plan (from --criterion/--sparsity/--domain like `prune`, or --plan FILE)
    is applied by masking the dropped experts, exactly the reference exports are
    verified against. Per evaluation domain: tokens, mean NLL of the original and
    pruned model (nats/token), KL(original || pruned) per token, top-1 agreement,
    with 95% bootstrap intervals over sequences. Evaluation text: --eval-domain
    NAME=SOURCE (capture source syntax), else text of the captured domains their
    statistics did not see (built-in held-out splits; the rest of a file source).
    --store-result also stores the numbers in the store's plan_evals (as `sweep` does),
    where the dashboard's Compare plans and Prune & export pages show them.
    """
    from moe_viz.checkpoint import load_config
    from moe_viz.prune.evaluate import evaluate_plan, reference_batches
    from moe_viz.models.loading import canonical_model_id, check_model_path, load_model
    from moe_viz.prune.plan import build_plan, parse_domain_weights

    check_store_path(args.store, write=args.store_result)
    check_model_path(args.model)
    progress_file = Path(args.progress_file) if args.progress_file else None
    if args.plan:
        plan = _read_plan_file(args.plan)
    else:
        if args.criterion is None or (args.sparsity is None) == (args.keep is None):
            raise MoeVizError("give --criterion and one of --sparsity or --keep, or a --plan FILE")
        plan = build_plan(args.store, canonical_model_id(args.model), args.criterion, parse_domain_weights(args.domain),
                          config=load_config(args.model), sparsity=args.sparsity, keep=args.keep, scope=args.scope,
                          seed=args.seed, top_k=args.top_k)
    if args.store_result and plan.model_id != canonical_model_id(args.model):
        raise MoeVizError(f"--plan {args.plan} was made for {plan.model_id}, not {canonical_model_id(args.model)}: "
                          "its numbers cannot be stored for that plan")
    if progress_file:
        _write_json(progress_file, {"stage": "loading model", "finished": False})
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    sequences = _evaluation_text(args, plan, tokenizer, model.get_input_embeddings().weight.shape[0])
    if progress_file:
        _write_json(progress_file, {"stage": "evaluating", "finished": False})
    references = {name: reference_batches(model, seqs, args.batch_size) for name, seqs in sequences.items()}
    results = evaluate_plan(model, plan.dropped, references, seed=args.seed, top_k=plan.top_k)
    if args.store_result:
        from moe_viz.prune.sweep import eval_set_keys, plan_key, save_results

        save_results(args.store, plan_key(plan, args.seed), plan, results, eval_set_keys(sequences), args.seed)
    if progress_file:
        _write_json(progress_file, {"stage": "stored" if args.store_result else "evaluated", "finished": True})
    if args.json:
        print(json.dumps({"plan": json.loads(plan.to_json()), "results": results}))
        return 0
    print(f"plan: {plan.criterion}, {plan.scope}, sparsity {plan.sparsity:.3f}"
          + (f", top-k {plan.top_k}" if plan.top_k is not None else ""))
    print(f"{'domain':<14}{'tokens':>8}{'NLL orig':>10}{'NLL pruned':>12}{'KL':>9}{'KL 95% CI':>20}{'top1 agree':>12}")
    for r in results:
        ci = f"[{r['kl_ci'][0]:.4f}, {r['kl_ci'][1]:.4f}]"
        print(f"{r['domain']:<14}{r['tokens']:>8}{r['nll_original']:>10.4f}{r['nll_pruned']:>12.4f}{r['kl']:>9.4f}"
              f"{ci:>20}{r['top1_agreement']:>12.3f}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Quality vs sparsity for several criteria: evaluate every (criterion, sparsity, scope) plan.

    Each plan is evaluated like `evaluate` (no export) on the same evaluation
    text; the random baseline is always included. Every result is stored in the
    store (table plan_evals), keyed by the weights, the kept experts, the seed
    and the evaluation tokens, so a repeated sweep is served from the store.
    """
    import math

    from tqdm.auto import tqdm

    from moe_viz.checkpoint import load_config
    from moe_viz.models.loading import canonical_model_id, check_model_path, load_model
    from moe_viz.prune.plan import parse_domain_weights
    from moe_viz.prune.sweep import run_sweep, sweep_plans

    check_store_path(args.store, write=True)
    check_model_path(args.model)
    try:
        sparsities = [float(x) for x in args.sparsities.split(",") if x.strip()]
    except ValueError as exc:
        raise MoeVizError(f"--sparsities {args.sparsities!r} must be numbers separated by commas, e.g. 0.25,0.5") from exc
    criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    scopes = tuple(s.strip() for s in args.scopes.split(",") if s.strip())
    plans = sweep_plans(args.store, canonical_model_id(args.model), criteria, sparsities,
                        parse_domain_weights(args.domain), load_config(args.model), scopes, args.seed, args.top_k)
    # for the dashboard's jobs: plans done of total, served from the store, seconds elapsed and to go
    state = {"done": 0, "total": len(plans), "cached": 0, "elapsed_s": 0.0, "eta_s": None, "finished": False}
    progress_file = Path(args.progress_file) if args.progress_file else None
    if progress_file:
        _write_json(progress_file, {**state, "stage": "loading model"})
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    sequences = _evaluation_text(args, plans[0], tokenizer, model.get_input_embeddings().weight.shape[0])
    bar = tqdm(total=len(plans), desc="sweep", unit="plan", file=sys.stderr)

    def progress(p) -> None:
        bar.update(p.done - bar.n)
        bar.set_postfix(cached=p.cached)
        state.update(done=p.done, total=p.total, cached=p.cached, elapsed_s=round(p.elapsed_s, 2),
                     eta_s=None if math.isnan(p.eta_s) else round(p.eta_s, 1))
        if progress_file:
            _write_json(progress_file, {**state, "stage": "evaluating"})

    rows = run_sweep(model, args.store, plans, sequences, args.batch_size, args.seed, progress)
    bar.close()
    if progress_file:
        _write_json(progress_file, {**state, "eta_s": 0.0, "stage": "stored", "finished": True})
    if args.json:
        print(json.dumps({"results": rows}))
        return 0
    print(f"{'criterion':<14}{'scope':<9}{'sparsity':>9}{'domain':>14}{'KL':>9}{'KL 95% CI':>20}{'ΔNLL':>9}{'top1':>7}")
    for r in rows:
        ci = f"[{r['kl_ci'][0]:.4f}, {r['kl_ci'][1]:.4f}]"
        print(f"{r['criterion']:<14}{r['scope']:<9}{r['sparsity']:>9.3f}{r['domain']:>14}{r['kl']:>9.4f}{ci:>20}"
              f"{r['nll_pruned'] - r['nll_original']:>9.4f}{r['top1_agreement']:>7.3f}")
    return 0


def _read_plan_file(path: str):
    from moe_viz.prune.plan import PrunePlan

    try:
        return PrunePlan.from_json(Path(path).read_text())
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise MoeVizError(f"--plan {path} is not a moe_viz plan JSON ({exc}): write one with `evaluate --json` "
                          "or `search --out`") from exc


def _search_args_problem(args: argparse.Namespace) -> str | None:
    """One line on what is wrong with `search`'s numeric options and --out, before anything loads."""
    if (args.sparsity is None) == (args.keep is None):
        return "give one of --keep K or --sparsity X"
    if args.generations < 0:
        return f"--generations {args.generations} must be 0 or more"
    if args.population < 2:
        return f"--population {args.population} must be at least 2"
    if args.time_budget is not None and args.time_budget <= 0:
        return f"--time-budget {args.time_budget} must be a positive number of seconds"
    if args.recon_tokens < 1 or args.max_tokens < 4 or args.seq_len < 2 or args.batch_size < 1:
        return "--recon-tokens, --batch-size must be ≥ 1, --seq-len ≥ 2 and --max-tokens ≥ 4"
    if args.out and (Path(args.out).is_dir() or not Path(args.out).resolve().parent.is_dir()):
        return f"--out {args.out} must be a file path in an existing directory"
    return None


def cmd_search(args: argparse.Namespace) -> int:
    """Search for a pruning plan better than any single criterion (enumeration + evolutionary search).

    Seed plans: one per --criteria (built from the stored statistics like `prune`;
    by default every criterion the store can score, `random` included; others are
    skipped with a note) and the Lu et al. enumeration plan (per layer, the
    keep-set with the smallest block-output reconstruction error). The search
    minimises the mean over evaluation domains of KL(original || pruned) per token,
    measured on the FIRST half of each domain's evaluation sequences; the best plan
    and every seed plan are then reported on the SECOND half, which neither the
    search nor the enumeration saw. Evaluation text as in `evaluate` (--eval-domain,
    else held-out text of the captured domains). --mode nonuniform lets layers keep
    different counts with the same total: evaluable, not exportable. --out writes
    the best plan (read by `evaluate --plan`, and by `prune --plan` when uniform).
    """
    from moe_viz.checkpoint import load_config
    from moe_viz.analysis.criteria import CRITERIA, check_criterion
    from moe_viz.prune.evaluate import evaluate_plan, reference_batches
    from moe_viz.models.loading import canonical_model_id, check_model_path, load_model
    from moe_viz.prune.plan import RouterConstraints, build_plan, parse_domain_weights
    from moe_viz.analysis.reconstruction import enumeration_plan, record_block_inputs
    from moe_viz.prune.search import interleave, plan_problem, search, split_halves
    from moe_viz.store import layer_stats

    check_store_path(args.store, write=False)
    check_model_path(args.model)
    problem = _search_args_problem(args)
    if problem:
        raise MoeVizError(problem)
    names = list(dict.fromkeys(c.strip() for c in (args.criteria or ",".join(CRITERIA)).split(",") if c.strip()))
    if not names:
        raise MoeVizError("--criteria is empty: give a comma-separated list, e.g. reap,frequency,random")
    for name in names:
        check_criterion(name)
    config = load_config(args.model)
    model_id = canonical_model_id(args.model)
    domains = parse_domain_weights(args.domain)
    seeds, errors = [], []
    for name in names:
        try:
            seeds.append(build_plan(args.store, model_id, name, domains, config=config, sparsity=args.sparsity,
                                    keep=args.keep, seed=args.seed))
        except MoeVizError as exc:
            if args.criteria:  # asked for by name: its problem is the answer
                raise
            errors.append(exc)
            print(f"note: criterion {name} skipped: {exc}", file=sys.stderr)
    if not seeds:
        raise errors[0]
    names = [plan.criterion for plan in seeds]
    keep = seeds[0].keep_per_layer
    observed_top_k = int(layer_stats(args.store, list(seeds[0].run_ids.values())).top_k.max())
    constraints = RouterConstraints.from_config(config, observed_top_k)
    total = sum(len(v) for v in seeds[0].kept.values())
    seed_names = list(names)
    if args.mode == "nonuniform":  # global-scope plans: one ranking across layers, same total
        for name in names:
            plan = build_plan(args.store, model_id, name, domains, config=config, keep=keep, scope="global",
                              seed=args.seed)
            if plan_problem(plan, constraints, args.mode, total) is None:
                seeds.append(plan)
                seed_names.append(f"{name}/global")

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    sequences = _evaluation_text(args, seeds[0], tokenizer, model.get_input_embeddings().weight.shape[0])
    search_text, heldout_text = split_halves(sequences)

    inputs = record_block_inputs(model, interleave(search_text), args.batch_size, args.recon_tokens)
    enumeration, enumeration_info = enumeration_plan(model, inputs, keep, template=seeds[0], constraints=constraints)
    del inputs
    seeds.append(enumeration)
    seed_names.append("enumeration")

    search_refs = {name: reference_batches(model, seqs, args.batch_size) for name, seqs in search_text.items()}
    bar = _search_bar(args.generations)
    result = search(model, search_refs, seeds, constraints, mode=args.mode, generations=args.generations,
                    population=args.population, time_budget_s=args.time_budget, seed=args.seed, progress=bar,
                    seed_names=seed_names)
    bar.close()
    del search_refs
    heldout_refs = {name: reference_batches(model, seqs, args.batch_size) for name, seqs in heldout_text.items()}
    results = evaluate_plan(model, result.plan.dropped, heldout_refs, seed=args.seed)
    by_seed = [{**row, "results": evaluate_plan(model, plan.dropped, heldout_refs, seed=args.seed)}
               for row, plan in zip(result.seeds, seeds)]
    if args.out:
        from moe_viz.atomic import write_text_atomic

        write_text_atomic(Path(args.out), result.plan.to_json())
    if args.json:
        print(json.dumps({
            "plan": json.loads(result.plan.to_json()), "exportable": result.plan.exportable, "note": result.note,
            "mode": result.mode, "fitness": result.fitness, "best_seed": result.best_seed,
            "best_seed_fitness": result.best_seed_fitness, "best_is_seed": result.best_is_seed,
            "results": results, "seeds": by_seed, "history": result.history, "evaluations": result.evaluations,
            "stopped": result.stopped, "enumeration": {str(k): v for k, v in enumeration_info.items()},
            "search_tokens": {d: sum(len(s) for s in seqs) for d, seqs in search_text.items()},
            "heldout_tokens": {d: sum(len(s) for s in seqs) for d, seqs in heldout_text.items()},
        }))
        return 0
    _print_search(result, results, by_seed, args.out)
    return 0


def _search_bar(generations: int):
    """A tqdm bar over generations on stderr; also a progress callback for `search.search`."""
    from tqdm.auto import tqdm

    bar = tqdm(total=generations, desc="search", unit="gen", file=sys.stderr)

    def report(p) -> None:
        bar.update(p.generation - bar.n)
        bar.set_postfix(best_kl=f"{p.best_fitness:.4f}", plans=p.evaluations)

    report.close = bar.close
    return report


def _print_search(result, results: list[dict], by_seed: list[dict], out: str | None) -> None:
    plan = result.plan
    counts = [len(plan.kept[layer]) for layer in sorted(plan.kept)]
    kept = str(counts[0]) if plan.exportable else "(" + ", ".join(map(str, counts)) + ")"
    history = result.history[-1]
    print(f"search ({result.mode}): keeps {kept} of {max(plan.num_experts.values())} experts per layer, "
          f"sparsity {plan.sparsity:.3f}; {history['generation']} generation(s), {result.evaluations} "
          f"plans evaluated in {history['elapsed_s']:.1f} s (stopped: {result.stopped})")
    change = (result.fitness / result.best_seed_fitness - 1) * 100 if result.best_seed_fitness else 0.0
    print(f"search fitness (mean KL, first half of the evaluation text): best seed {result.best_seed} "
          f"{result.best_seed_fitness:.4f} -> search {result.fitness:.4f} ({change:+.1f}%)"
          + (f"; the best plan is the seed {result.best_is_seed}" if result.best_is_seed else ""))
    domains = [r["domain"] for r in results]
    width = max([10] + [len(d) + 2 for d in domains])
    print("held-out KL(original || pruned) per token (second half; lower is better):")
    print(f"{'plan':<20}{'fitness':>10}" + "".join(f"{d:>{width}}" for d in domains) + f"{'mean':>10}")
    rows = [("search", result.fitness, results)] + sorted(
        ((row["name"], row["fitness"], row["results"]) for row in by_seed), key=lambda r: r[1])
    for name, fitness, res in rows:
        kls = [r["kl"] for r in res]
        mark = " *" if name == result.best_seed else ""
        print(f"{name + mark:<20}{fitness:>10.4f}" + "".join(f"{kl:>{width}.4f}" for kl in kls)
              + f"{sum(kls) / len(kls):>10.4f}")
    print("* best seed plan on the search fitness")
    if not plan.exportable:
        print(f"note: {result.note}")
    if out:
        hint = f"export it with `moe-viz prune --plan {out} --out DIR`" if plan.exportable else \
            f"evaluate it with `moe-viz evaluate --plan {out}`"
        print(f"wrote {out}: {hint}")


def cmd_importance(args: argparse.Namespace) -> int:
    """Measure what removing each expert really changes (causal importance), beside the routing statistics.

    For each --domain's captured run: the MoE block's relative output error when
    one expert alone is masked, on the run's own calibration tokens (stored; the
    criterion `reconstruction`); with --knockout-layer L, also KL(original ||
    expert masked) per token for every expert of layer L on held-out text, with
    95% bootstrap intervals. Prints the Spearman rank correlation per layer
    between these and every observational criterion, averaged over layers.
    """
    from tqdm.auto import tqdm

    from moe_viz.prune.evaluate import heldout_text
    from moe_viz.analysis.importance import causal_agreement, measure_knockout, measure_reconstruction
    from moe_viz.models.loading import canonical_model_id, check_model_path, load_model
    from moe_viz.prune.plan import complete_runs_for, parse_domain_weights

    check_store_path(args.store, write=True)
    check_model_path(args.model)
    if args.max_tokens < 1:
        raise MoeVizError("--max-tokens must be a positive integer")
    model_id = canonical_model_id(args.model)
    run_ids, _ = complete_runs_for(args.store, model_id, list(parse_domain_weights(args.domain)))
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    vocab = model.get_input_embeddings().weight.shape[0]
    output: dict[str, list] = {"reconstruction": [], "knockout": [], "agreement": []}
    for domain, run_id in run_ids.items():
        print(f"{domain}: reconstruction error per expert ...", file=sys.stderr)
        scores = measure_reconstruction(model, args.store, run_id, tokenizer, args.max_tokens, args.batch_size)
        output["reconstruction"] += scores.assign(domain=domain).to_dict("records")
        if args.knockout_layer is not None:
            texts, notes = heldout_text(args.store, {domain: run_id}, tokenizer, vocab, args.seq_len, args.max_tokens)
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
            if not texts.get(domain):
                raise MoeVizError(f"no evaluation text for {domain}: " + "; ".join(notes))
            bar = tqdm(desc=f"knockout layer {args.knockout_layer} ({domain})", unit="expert", file=sys.stderr)

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            frame = measure_knockout(model, args.store, run_id, args.knockout_layer, texts[domain], args.batch_size,
                                     args.seed, progress)
            bar.close()
            output["knockout"] += frame.assign(domain=domain).to_dict("records")
        output["agreement"] += causal_agreement(args.store, run_id).assign(domain=domain).to_dict("records")
    if args.json:
        print(json.dumps(output))
        return 0
    agreement = _mean_agreement(output["agreement"])
    print("Spearman rank correlation with each observational criterion (mean over layers):")
    print(agreement.to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


def _mean_agreement(rows: list[dict]):
    import pandas as pd

    frame = pd.DataFrame(rows)
    return frame.groupby(["domain", "causal", "criterion"])["spearman"].mean().unstack("criterion")


def cmd_demo(args: argparse.Namespace) -> int:
    """Make the offline demo ready and open the dashboard.

    Captures every built-in domain (code, prose, math, json, multilingual) with
    the small MoE shipped in moe_viz/demo/model into the store, unless already
    there, then starts the dashboard on localhost.
    """
    from moe_viz import demo

    run_ids = demo.prepare(args.store)
    print(f"demo store {args.store}: {'captured ' + str(len(run_ids)) + ' domain(s)' if run_ids else 'already complete'}")
    if args.no_ui:
        return 0
    return _run_dashboard(args.store, args.port, args.threads)


def _run_dashboard(store_path: str, port: int, threads: int | None = None) -> int:
    """`streamlit run app.py` on localhost; `threads` reaches the dashboard's background jobs (MOE_VIZ_THREADS)."""
    import os
    import subprocess

    app = Path(__file__).resolve().parent / "ui" / "app.py"  # shipped in the package: works from any directory
    # No file watcher (it would walk the store's cache/ and .git for nothing), no Deploy button, no usage statistics.
    command = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", "127.0.0.1",
               "--server.port", str(port), "--server.headless", "true", "--server.fileWatcherType", "none",
               "--client.toolbarMode", "minimal", "--browser.gatherUsageStats", "false",
               "--", "--store", str(Path(store_path).absolute())]
    environment = dict(os.environ)
    if threads:
        environment["MOE_VIZ_THREADS"] = str(threads)
    print(f"dashboard: http://127.0.0.1:{port} on the store {Path(store_path).absolute()}  (Ctrl+C to stop)")
    return subprocess.call(command, env=environment)


def cmd_demo_train(args: argparse.Namespace) -> int:
    """Train the demo MoE from the built-in domains (about 13 minutes on 2 CPU cores)."""
    from moe_viz.demo.train import train

    train(Path(args.out), steps=args.steps, seed=args.seed)
    return 0


def cmd_demo_eval(args: argparse.Namespace) -> int:
    """Measure the demo model's held-out losses and expert specialisation; prints JSON."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_viz.demo import shipped_model
    from moe_viz.demo.specialisation import measure

    path = Path(args.model) if args.model else shipped_model()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    print(json.dumps(measure(model, AutoTokenizer.from_pretrained(path)), indent=2))
    return 0


def _set_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise MoeVizError(f"--threads {threads} must be a positive integer (or leave it out for torch's choice)")
    if threads:
        import torch

        torch.set_num_threads(threads)


def _text_arguments(p: argparse.ArgumentParser, max_tokens: int = 2048,
                    max_tokens_help: str = "evaluation tokens per domain") -> None:
    """Calibration domains to score on and evaluation text (`evaluate`, `sweep`, `search`)."""
    p.add_argument("--domain", action="append", default=[], metavar="NAME[:WEIGHT]", help="calibration domain(s) to score on")
    p.add_argument("--eval-domain", action="append", default=[], metavar="NAME=SOURCE", help="evaluation text; repeat")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per evaluation sequence (default 128)")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"{max_tokens_help} (default {max_tokens})")


def _model_arguments(p: argparse.ArgumentParser) -> None:
    """How the model runs (every command that loads it for forward passes)."""
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])


def _evaluation_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by `evaluate` and `sweep`."""
    _text_arguments(p)
    _model_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="bootstrap and random-criterion seed (default 0)")
    p.add_argument("--top-k", type=int, default=None, help="also lower the experts per token to this (default: keep it)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _store_argument(p: argparse.ArgumentParser) -> None:
    """--store; left out, main() fills in default_store() (MOE_VIZ_HOME, the checkout's cache/, or the user cache)."""
    p.add_argument("--store", default=None,
                   help=f"DuckDB store (default ${HOME_ENV}/moe_viz.duckdb; here {default_store()})")


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
    _store_argument(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto spreads over GPUs)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code")
    p.add_argument("--layerwise", action="store_true",
                   help="stream one decoder layer at a time (default: only when the model would not fit)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted layer-wise capture")
    p.add_argument("--max-host-memory", default=None, metavar="SIZE",
                   help="layer-wise: hidden states beyond this (e.g. 64G) are kept on disk (default: all in memory)")
    p.add_argument("--timing", action="store_true",
                   help="print where each rank's time went (start-up, load, forward, all-reduce, store, ...)")
    p.add_argument("--progress-file", default=None, help=argparse.SUPPRESS)  # for the dashboard's jobs
    p.add_argument("--trace-tokens", type=int, default=DEFAULT_TRACE_TOKENS, metavar="N",
                   help=f"record every routed slot of the first N tokens per domain (default {DEFAULT_TRACE_TOKENS}; "
                        "0: none; in-memory captures only)")
    p.set_defaults(func=cmd_capture)

    p = commands.add_parser("trace", help=cmd_trace.__doc__.splitlines()[0], description=cmd_trace.__doc__)
    p.add_argument("--model", required=True, help="local model directory or hub id (with a tokenizer)")
    p.add_argument("--text", default=None, help="the text to trace")
    p.add_argument("--text-file", default=None, help="a UTF-8 file with the text to trace")
    p.add_argument("--out", required=True, help="new directory for the trace (Parquet files)")
    p.add_argument("--max-tokens", type=int, default=2048, help="trace at most this many tokens (default 2048)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--progress-file", default=None, help=argparse.SUPPRESS)  # for the dashboard's jobs
    _model_arguments(p)
    p.set_defaults(func=cmd_trace)

    from moe_viz.analysis.criteria import CRITERIA

    p = commands.add_parser("prune", help=cmd_prune.__doc__.splitlines()[0], description=cmd_prune.__doc__)
    p.add_argument("--model", required=True, help="the captured model's directory (safetensors)")
    p.add_argument("--criterion", default=None, help=f"one of: {', '.join(CRITERIA)}")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--sparsity", type=float, help="fraction of routed experts to remove, in [0, 1)")
    amount.add_argument("--keep", type=int, help="experts to keep in every MoE layer")
    p.add_argument("--domain", action="append", default=[], metavar="NAME[:WEIGHT]", help="calibration domain(s) to score on")
    p.add_argument("--protect", action="append", default=[], metavar="LAYER:EXPERT", help="never drop this expert")
    p.add_argument("--plan", default=None, help="a uniform plan JSON (e.g. from `search --out`) instead of --criterion")
    p.add_argument("--out", required=True, help="directory to write the pruned checkpoint to")
    _store_argument(p)
    p.add_argument("--streaming", action="store_true", help="rewrite shards without loading the model (automatic when it would not fit)")
    p.add_argument("--force", action="store_true", help="replace --out if it is a previous moe_viz export")
    p.add_argument("--no-verify", action="store_true", help="skip verification")
    p.add_argument("--seed", type=int, default=0, help="seed of the random criterion (default 0)")
    p.add_argument("--top-k", type=int, default=None, help="also lower the experts per token (config num_experts_per_tok)")
    p.set_defaults(func=cmd_prune)

    p = commands.add_parser("verify", help=cmd_verify.__doc__.splitlines()[0], description=cmd_verify.__doc__)
    p.add_argument("export", help="a directory written by `moe-viz prune`")
    p.add_argument("--model", default=None, help="source model directory (default: the one recorded in the export)")
    _store_argument(p)
    p.set_defaults(func=cmd_verify)

    p = commands.add_parser("import-run", help=cmd_import_run.__doc__.splitlines()[0], description=cmd_import_run.__doc__)
    p.add_argument("path", help="the directory the capture saved (STORE.pending/RUN_ID)")
    _store_argument(p)
    p.set_defaults(func=cmd_import_run)

    p = commands.add_parser("evaluate", help=cmd_evaluate.__doc__.splitlines()[0], description=cmd_evaluate.__doc__)
    p.add_argument("--model", required=True, help="the captured model's directory (safetensors)")
    _store_argument(p)
    p.add_argument("--criterion", default=None, help=f"one of: {', '.join(CRITERIA)}")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--sparsity", type=float, help="fraction of routed experts to remove, in [0, 1)")
    amount.add_argument("--keep", type=int, help="experts to keep in every MoE layer")
    p.add_argument("--scope", default="uniform", choices=["uniform", "global"])
    p.add_argument("--plan", default=None, help="a plan JSON (the `plan` object of `evaluate --json`) instead of a criterion")
    p.add_argument("--store-result", action="store_true", help="also store the numbers in the store (plan_evals)")
    p.add_argument("--progress-file", default=None, help=argparse.SUPPRESS)  # for the dashboard's jobs
    _evaluation_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = commands.add_parser("sweep", help=cmd_sweep.__doc__.splitlines()[0], description=cmd_sweep.__doc__)
    p.add_argument("--model", required=True, help="the captured model's directory (safetensors)")
    _store_argument(p)
    p.add_argument("--criteria", default="frequency,soft_count,reap", help=f"comma-separated, from: {', '.join(CRITERIA)}")
    p.add_argument("--sparsities", default="0.25,0.5,0.75", help="comma-separated fractions of experts removed")
    p.add_argument("--scopes", default="uniform", help="comma-separated: uniform, global")
    p.add_argument("--progress-file", default=None, help=argparse.SUPPRESS)  # for the dashboard's jobs
    _evaluation_arguments(p)
    p.set_defaults(func=cmd_sweep)

    p = commands.add_parser("search", help=cmd_search.__doc__.splitlines()[0], description=cmd_search.__doc__)
    p.add_argument("--model", required=True, help="the captured model's directory (safetensors)")
    _store_argument(p)
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--keep", type=int, help="experts to keep per MoE layer (nonuniform: on average)")
    amount.add_argument("--sparsity", type=float, help="fraction of routed experts to remove, in [0, 1)")
    _text_arguments(p, 4096, "evaluation tokens per domain, half searched on, half held out")
    p.add_argument("--criteria", default=None, help="seed criteria, comma-separated (default: every one the store can score)")
    p.add_argument("--mode", default="uniform", choices=["uniform", "nonuniform"])
    p.add_argument("--generations", type=int, default=10, help="generations after the seeds (default 10)")
    p.add_argument("--population", type=int, default=8, help="plans per generation (default 8)")
    p.add_argument("--time-budget", type=float, default=None, help="stop starting generations after S seconds")
    p.add_argument("--seed", type=int, default=0, help="search, random-criterion and bootstrap seed (default 0)")
    p.add_argument("--out", default=None, help="write the best plan JSON here")
    p.add_argument("--recon-tokens", type=int, default=4096, help="tokens for the enumeration's block replay (default 4096)")
    _model_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object {plan, results, seeds, history, ...}")
    p.set_defaults(func=cmd_search)

    p = commands.add_parser("importance", help=cmd_importance.__doc__.splitlines()[0], description=cmd_importance.__doc__)
    p.add_argument("--model", required=True, help="the captured model's directory (safetensors)")
    _store_argument(p)
    p.add_argument("--domain", action="append", default=[], metavar="NAME", help="captured domain(s) to measure on")
    p.add_argument("--max-tokens", type=int, default=4096, help="calibration / evaluation tokens used (default 4096)")
    p.add_argument("--knockout-layer", type=int, default=None, help="also knock out each expert of this MoE layer")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per evaluation sequence for the knockout")
    _model_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object {reconstruction, knockout, agreement}")
    p.set_defaults(func=cmd_importance)

    p = commands.add_parser("demo", help=cmd_demo.__doc__.splitlines()[0], description=cmd_demo.__doc__)
    _store_argument(p)
    p.add_argument("--port", type=int, default=8501, help="dashboard port on 127.0.0.1 (default 8501)")
    p.add_argument("--no-ui", action="store_true", help="only capture; do not start the dashboard")
    p.add_argument("--threads", type=int, default=argparse.SUPPRESS,
                   help="torch CPU threads, also for the dashboard's background jobs (default: torch's choice)")
    p.set_defaults(func=cmd_demo)
    demo_commands = p.add_subparsers(dest="demo_command")
    t = demo_commands.add_parser("train", help=cmd_demo_train.__doc__, description=cmd_demo_train.__doc__)
    t.add_argument("--out", default=str(Path(__file__).parent / "demo" / "model"), help="where to save the model")
    t.add_argument("--steps", type=int, default=750)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_demo_train)
    e = demo_commands.add_parser("eval", help=cmd_demo_eval.__doc__, description=cmd_demo_eval.__doc__)
    e.add_argument("--model", default=None, help="model directory (default: the shipped demo model)")
    e.set_defaults(func=cmd_demo_eval)

    p = commands.add_parser("ui", help="Open the dashboard on a store (localhost).")
    _store_argument(p)
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--threads", type=int, default=argparse.SUPPRESS,
                   help="torch CPU threads, also for the dashboard's background jobs (default: torch's choice)")
    p.set_defaults(func=lambda args: _run_dashboard(args.store, args.port, args.threads))
    return parser


def _interrupt_on_sigterm() -> None:
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt  # unwinds through capture/export cleanup (runs marked failed, temp dirs removed)

    signal.signal(signal.SIGTERM, handler)


def _with_store(message: str, store: str | None) -> str:
    """An error message that says which store the command used (unless it already names it)."""
    if store is None or store in message or str(Path(store).absolute()) in message:
        return message
    return f"{message} [store: {Path(store).absolute()}]"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:
        _interrupt_on_sigterm()
    store = None
    if "store" in args and getattr(args, "demo_command", None) is None:  # `demo train/eval` use no store
        if args.store is None:
            args.store = str(default_store())
        store = args.store
    try:
        _set_threads(args.threads)
        code = args.func(args)
        # last, on stderr: --json output stays one JSON object, errors stay one line; under torchrun
        # only rank 0 (the rank that writes the store) says it, once
        if store is not None and os.environ.get("RANK", "0") == "0":
            print(f"moe-viz: store {Path(store).absolute()}", file=sys.stderr)
        return code
    except MoeVizError as exc:
        print(f"moe-viz: error: {_with_store(str(exc), store)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-viz: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
