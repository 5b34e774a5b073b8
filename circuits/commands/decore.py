"""``interp decore``: DeCoRe next to greedy decoding, with the head ranking found in the workspace."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from circuits.detectors.retrieval import RetrievalDetector
from circuits.methods.decore import (
    DecoreSettings,
    Head,
    _generate,
    _record_metrics,
    default_k,
    default_k_reason,
    retrieval_ranking,
)
from circuits.methods.heads import parse_heads, ranking_from_summary
from interp.errors import StoreError, UserError
from interp.model.load import load_spec
from interp.model.loaded import LoadedModel
from interp.options import (
    BackendOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    ModelOptions,
    PrefixOpt,
    WorkspaceOpt,
    check_prompts,
)
from interp.runs.registry import command
from interp.runs.runner import find_latest, run_detector
from interp.runs.store import Store


def parse_ranking_params(items: Sequence[str], mode: str = "fast") -> dict[str, Any]:
    """``NAME=VALUE`` retrieval-detector parameters (``--ranking-param``), checked against the
    detector (before any model is loaded). ``mode`` comes from --ranking-mode, not from here."""
    raw: dict[str, str] = {}
    for item in items:
        name, eq, value = item.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if not eq or not name:
            raise UserError(f"--ranking-param takes NAME=VALUE, got {item!r}")
        if name == "mode":
            raise UserError("give the retrieval mode with --ranking-mode, not --ranking-param")
        raw[name] = value
    # As JSON values (lists for list parameters): what a stored run's parameters are compared with.
    parsed = RetrievalDetector.parse_params({"mode": mode, **raw}).to_dict()
    return {name: parsed[name] for name in raw}


def _stderr_line(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def workspace_ranking(
    model: LoadedModel,
    mode: str = "fast",
    workspace: str | Path | None = None,
    params: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[list[Head], dict[str, Any]]:
    """Retrieval ranking of ``model`` through a workspace's store (``workspace``: None is
    ./.interp or $INTERP_WORKSPACE, as for every command).

    The newest finished retrieval run of ``model`` whose parameters agree with ``params`` (the
    others free) is reused, of mode ``mode`` if there is one, else of the other mode (and it says
    so); else the detector runs now with ``params`` (its defaults for the rest) and
    is stored, so the next call reuses it (:func:`find_latest`, then :func:`run_detector`); where
    the workspace cannot be written it runs in memory (:func:`retrieval_ranking`) and nothing is
    stored. Each step is said on ``log``. The record's ``source`` is "stored run", "computed
    now" or "in memory".
    """
    log = log or _stderr_line
    try:
        store = Store(workspace, create=True)
    except StoreError as exc:
        log(f"note: {exc}; ranking heads in memory instead (retrieval, {mode}), nothing stored")
        ranking, record = retrieval_ranking(model, mode, params)
        for w in record["warnings"]:
            log(f"WARNING {w}")
        return ranking, {"source": "in memory", "run_id": None, "workspace": None, **record}
    ws = store.workspace.resolve()
    wanted = RetrievalDetector().variant(RetrievalDetector.parse_params({"mode": mode}))
    try:
        result = find_latest(model, RetrievalDetector.name, store, where=params, prefer={"mode": mode})
        if result is None:
            log(f"no finished retrieval run of {model.name} with this prompt prefix in {ws}; computing one "
                f"({wanted}) and storing it there")
            result = run_detector(model, RetrievalDetector.name, {"mode": mode, **(params or {})}, store)
        summary = result.summary
        if not summary.heads:
            raise UserError(f"retrieval ranking ({summary.variant}, run {result.run_id} in {ws}) is empty: no "
                            f"needle sample was answered correctly; pass heads explicitly")
        if result.reused:
            note = "" if summary.variant == wanted else f": the finished one of {model.name}; none is {wanted}"
            log(f"using retrieval run {result.run_id} ({summary.variant}) from {ws}{note}")
        else:
            for w in summary.warnings:
                log(f"WARNING {w}")
            log(f"stored as retrieval run {result.run_id} in {ws}")
        info = store.run(result.run_id).info()
        record = {"source": "stored run" if result.reused else "computed now", "run_id": result.run_id,
                  "workspace": str(ws), "mode": summary.variant, "params": info["params"],
                  "created_at": info.get("created_at"), "warnings": summary.warnings,
                  "metrics": _record_metrics(summary.metrics), "scores": [float(h["score"]) for h in summary.heads]}
        return ranking_from_summary(summary), record
    finally:
        store.close()


@command("decore")
def decore_cli(
    model: ModelOpt = ModelOptions.model,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="prompt (repeat for a batch)")] = None,
    heads: Annotated[str, typer.Option("--heads", help="heads to mask: L.H,L.H,... (instead of a ranking)")] = "",
    k: Annotated[int, typer.Option(
        "--k", help="mask the top-k heads of the retrieval ranking (default: the DeCoRe paper's share of the "
        "model's heads, 50 of Llama-3-8B's 1024 (4.9%), at least 1: 13 for smollm2-135m's 270)")] = 0,
    workspace: WorkspaceOpt = None,
    ranking_mode: Annotated[str, typer.Option(
        "--ranking-mode", help="retrieval score for the ranking: fast or faithful. A finished retrieval run of "
        "the model in the workspace is reused (this mode's, else the newest and its mode is said); without "
        "one the ranking is computed with this mode and stored there")] = "fast",
    ranking_param: Annotated[list[str] | None, typer.Option(
        "--ranking-param", help="retrieval parameter NAME=VALUE for a ranking computed now (repeat; see "
        "`interp detectors`); a stored run is reused only if it has these values")] = None,
    alpha: Annotated[str, typer.Option("--alpha", help="'entropy' (DeCoRe-entropy) or a number (DeCoRe-vanilla, 0.5)")] = "entropy",
    normalize_entropy: Annotated[bool, typer.Option("--normalize-entropy", help="divide the entropy by log|V|")] = False,
    alpha_cap: Annotated[float, typer.Option("--alpha-cap", help="cap alpha (0: no cap)")] = 0.0,
    method: Annotated[str, typer.Option("--method", help="uniform (zero the query) or zero (zero the output)")] = "uniform",
    prefill: Annotated[str, typer.Option("--prefill", help="masked (own cache) or shared (the reference's generate)")] = "masked",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="length limit")] = 32,
    stop_at_newline: Annotated[bool, typer.Option("--stop-at-newline", help="stop at a newline token")] = False,
    backend: BackendOpt = ModelOptions.backend,
    prefix: PrefixOpt = ModelOptions.prefix,
    json_out: JsonOpt = False,
    device: DeviceOpt = ModelOptions.device,
    dtype: DtypeOpt = ModelOptions.dtype,
) -> None:
    """DeCoRe decoding next to greedy decoding; masks --heads, or the top-k retrieval heads (see --k)."""
    # The masked heads are --heads, or the top-k of a retrieval ranking: a finished retrieval
    # run of the model in the workspace, else one computed now and stored there (in memory where
    # the workspace cannot be written): workspace_ranking. k is --k, else default_k.

    # Every option is checked before the model is loaded (only head indices and --k against
    # the model's head count need it).
    prompt = check_prompts(prompt or [])
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    settings = DecoreSettings(alpha=alpha, normalize_entropy=normalize_entropy,  # type: ignore[arg-type]
                              alpha_cap=alpha_cap or None, method=method, prefill=prefill)  # type: ignore[arg-type]
    overrides = _checked_head_options(heads, k, ranking_mode, ranking_param or [])
    spec = ModelOptions(model, backend, prefix, device, dtype).check()
    sys.stderr.write(f"loading {model}...\n")
    m = load_spec(spec)
    masked, ranking_record = _masked_heads(m, heads, k, ranking_mode, workspace, overrides)
    dec = _generate(m, prompt, masked, settings, max_new_tokens, stop_at_newline, True, 16, contrast=True)
    greedy = _generate(m, prompt, [], settings, max_new_tokens, stop_at_newline, True, 16, contrast=False)
    rows = [{"prompt": p, "greedy": g.text, "decore": d.text, "decore_tokens": d.tokens, "greedy_tokens": g.tokens,
             "alphas": d.alphas, "decore_scores": d.scores, "stop": d.stop}
            for p, g, d in zip(prompt, greedy, dec, strict=True)]
    result = {"model": m.name, "heads": [list(h) for h in masked], "settings": settings.to_dict(),
              "ranking": None if ranking_record is None else {k2: v for k2, v in ranking_record.items() if k2 != "scores"},
              "results": rows}
    if json_out:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        return
    _print_generations(settings, masked, rows)


def _checked_head_options(heads: str, k: int, ranking_mode: str, ranking_param: Sequence[str]) -> dict[str, Any]:
    """The checks of the head options that need no model (--heads syntax, --k, the ranking's
    mode and parameters); returns the retrieval parameters of a ranking computed now."""
    if k < 0:
        raise UserError(f"--k must be >= 1, got {k}")
    if heads and k:
        raise UserError("give either --heads L.H,... or --k K, not both")
    if heads:
        parse_heads(heads)
    if ranking_mode not in ("fast", "faithful"):
        raise UserError(f"--ranking-mode must be fast or faithful, got {ranking_mode!r}")
    overrides = parse_ranking_params(ranking_param, ranking_mode)
    if heads and overrides:
        raise UserError("--ranking-param is for a ranking; --heads needs none")
    return overrides


def _masked_heads(
    model: LoadedModel, heads: str, k: int, ranking_mode: str, workspace: Path | None, overrides: Mapping[str, Any]
) -> tuple[list[Head], dict[str, Any] | None]:
    """The heads the CLI masks: --heads, else the top k (--k, else :func:`default_k`) of the
    workspace's retrieval ranking, with the ranking's record (None for --heads)."""
    if heads:
        return parse_heads(heads, model), None
    n_total = model.info.n_total_heads
    if k:
        k_rule = "--k"
    else:
        k, k_rule = default_k(n_total), "default"
        sys.stderr.write(f"masking the top {k} retrieval heads: {default_k_reason(n_total)}\n")
    if k >= n_total:
        raise UserError(f"--k {k} is not below the model's {n_total} heads")
    ranked, ranking_record = workspace_ranking(model, ranking_mode, workspace, overrides)
    if len(ranked) < k:
        raise UserError(f"the retrieval ranking holds {len(ranked)} heads, fewer than k = {k}")
    return ranked[:k], {**ranking_record, "k": k, "k_rule": k_rule}


def _print_generations(settings: DecoreSettings, masked: Sequence[Head], rows: Sequence[Mapping[str, Any]]) -> None:
    print(f"DeCoRe [{settings.variant}] masking {len(masked)} heads: "
          + ", ".join(f"L{la}H{h}" for la, h in masked))
    for r in rows:
        print(f"\nprompt: {r['prompt']!r}\n  greedy: {r['greedy']!r}\n  decore: {r['decore']!r}")
        if r["alphas"]:
            print(f"  alpha: mean {sum(r['alphas']) / len(r['alphas']):.3f} over {len(r['alphas'])} steps")
