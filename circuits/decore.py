"""DeCoRe: decoding by contrasting retrieval heads (Gema et al. 2024, arXiv:2410.18860).

Two models decode together: the base model and the same model with its top-k retrieval heads
masked. Each step scores every token as

    (1 + alpha_t) * logsoftmax(base) - alpha_t * logsoftmax(masked)

and greedy decoding takes the argmax. ``alpha_t`` is the entropy (nats) of the base model's
next-token distribution ("entropy", DeCoRe-entropy; optionally divided by log|V| and capped),
or a fixed number (DeCoRe-vanilla, 0.5 in the paper).

Masking (``method``): ``uniform`` (default, as the reference code of Wu et al. and DeCoRe: the
head's query is zeroed, so it attends uniformly to the visible keys) or ``zero`` (the head's
output is zeroed). Per query head, also under grouped-query attention.

Batching: the base rows and the masked rows are stacked in ONE batch, [base; masked], the
masking interventions restricted to the masked rows (``batch=``), with one KV cache for the
stacked batch; so each step is one forward pass, not two (the reference runs the two models
one after the other, one example at a time); the loop is circuits/decoding.py's. Prompts are
left-padded with an attention mask; the bridge derives position ids from the mask, so padding
changes no result (tested).

Prefill (``prefill``): ``masked`` (default) gives the masked model its own cache of the prompt,
computed with the heads masked (two KV caches, one per model, as the method describes). ``shared`` is what
the reference's ``generate`` does: the masked model starts from a copy of the BASE model's
prompt cache and its heads are masked only from the last prompt token on.

Scoring (``decore_score``): a given answer's score is the sum over its tokens of the combined
score of that token (the reference's ``lm_score``). ``alpha_scope="token"`` (default) takes
alpha_t at each answer position; ``"prefix"`` (the reference's ``lm_score``) uses the alpha of
the first answer position for all its tokens. ``post_softmax`` renormalises the combined scores
with a log-softmax before summing (the reference's option of that name).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
import torch
import typer

from circuits.decoding import greedy_decode, left_pad, pad_id, prompt_rows
from circuits.heads import check_heads, parse_heads, ranking_from_summary
from circuits.retrieval import RetrievalDetector, rank_heads
from interp.backends import RunOutput
from interp.errors import StoreError, UserError
from interp.interventions import Intervention, ablate_heads
from interp.model import LoadedModel
from interp.options import DeviceOpt, DtypeOpt
from interp.registry import command
from interp.runner import FINAL_UNIT, run_detector
from interp.store import Store

Alpha = float | Literal["entropy"]
Method = Literal["uniform", "zero"]
Prefill = Literal["masked", "shared"]
Head = tuple[int, int]
VANILLA_ALPHA = 0.5
# interp.cli's --workspace option (not imported from there: `python -m interp.cli` would load
# that module twice).
WorkspaceOpt = Annotated[
    Path | None, typer.Option("--workspace", "-w", help="results workspace (default: ./.interp or $INTERP_WORKSPACE)")
]


# ---------------------------------------------------------------- settings


def parse_alpha(value: str | float) -> Alpha:
    """'entropy' or a non-negative number (a fixed alpha: DeCoRe-vanilla)."""
    if isinstance(value, str):
        if value.strip().lower() == "entropy":
            return "entropy"
        try:
            value = float(value)
        except ValueError:
            raise UserError(f"alpha must be 'entropy' or a number, got {value!r}") from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"alpha must be >= 0, got {value}")
    return float(value)


@dataclass(frozen=True)
class DecoreSettings:
    alpha: Alpha = "entropy"
    normalize_entropy: bool = False
    alpha_cap: float | None = None
    method: Method = "uniform"
    prefill: Prefill = "masked"

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", parse_alpha(self.alpha))
        if self.method not in ("uniform", "zero"):
            raise UserError(f"masking method must be 'uniform' or 'zero', got {self.method!r}")
        if self.prefill not in ("masked", "shared"):
            raise UserError(f"prefill must be 'masked' or 'shared', got {self.prefill!r}")
        if self.alpha_cap is not None and not self.alpha_cap > 0:
            raise UserError(f"alpha_cap must be > 0, got {self.alpha_cap}")

    @property
    def variant(self) -> str:
        if self.alpha == "entropy":
            a = "entropy" + ("/log|V|" if self.normalize_entropy else "")
            if self.alpha_cap is not None:
                a += f",cap={self.alpha_cap:g}"
        else:
            a = f"vanilla(alpha={self.alpha:g})"
        return f"{a};{self.method}-mask;{self.prefill}-prefill"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "variant": self.variant}


# ---------------------------------------------------------------- the combination


def base_entropy(base_logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last axis (0 log 0 = 0)."""
    p = torch.softmax(base_logits.float(), dim=-1)
    return torch.special.entr(p).sum(-1)


def decore_alpha(base_logits: torch.Tensor, settings: DecoreSettings) -> torch.Tensor:
    """alpha_t for each row of ``base_logits`` [..., V]."""
    if settings.alpha != "entropy":
        return torch.full(base_logits.shape[:-1], float(settings.alpha), device=base_logits.device)
    a = base_entropy(base_logits)
    if settings.normalize_entropy:
        a = a / math.log(base_logits.shape[-1])
    if settings.alpha_cap is not None:
        a = a.clamp(max=settings.alpha_cap)
    return a


def combine(
    base_logits: torch.Tensor, masked_logits: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """(1 + alpha) logsoftmax(base) - alpha logsoftmax(masked), alpha broadcast per row."""
    lb = torch.log_softmax(base_logits.float(), dim=-1)
    lm = torch.log_softmax(masked_logits.float(), dim=-1)
    a = alpha.float()[..., None]
    return (1 + a) * lb - a * lm


# ---------------------------------------------------------------- batching helpers


def mask_interventions(
    heads: Sequence[Head], method: Method, rows: Sequence[int], positions: Sequence[int] | None = None
) -> list[Intervention]:
    """The masking of ``heads`` on batch rows ``rows`` (at ``positions``, None = all)."""
    if not heads or not rows:
        return []
    ivs = ablate_heads(list(heads), method, batch=tuple(rows))
    if positions is not None:
        ivs = [dataclasses.replace(iv, positions=tuple(positions)) for iv in ivs]
    return ivs


# ---------------------------------------------------------------- generation


@dataclass
class Generation:
    """One prompt's decoded continuation."""

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    scores: list[float] = field(default_factory=list)  # the decoder's score of each chosen token
    base_logprobs: list[float] = field(default_factory=list)  # log p_base of each chosen token
    alphas: list[float] = field(default_factory=list)
    stop: str = "length"  # eos, newline or length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _decode_batch(
    model: LoadedModel,
    rows: Sequence[Sequence[int]],
    heads: Sequence[Head],
    settings: DecoreSettings,
    max_new_tokens: int,
    stop_at_newline: bool,
    contrast: bool,
) -> list[Generation]:
    b = len(rows)
    ids, mask = left_pad(rows, pad_id(model))
    width = int(ids.shape[1])
    first_ivs: list[Intervention] = []
    step_ivs: list[Intervention] = []
    if contrast:
        ids, mask = torch.cat([ids, ids]), torch.cat([mask, mask])
        masked_rows = list(range(b, 2 * b))
        first_ivs = mask_interventions(
            heads, settings.method, masked_rows, [width - 1] if settings.prefill == "shared" else None
        )
        step_ivs = mask_interventions(heads, settings.method, masked_rows)
    # Per step, every sequence's (score, base log-prob, alpha) of its chosen token; a sequence
    # keeps the first len(tokens) steps (it stops taking tokens once it stopped).
    chosen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def choose(out: RunOutput) -> torch.Tensor:
        logits = out.logits[:, -1].float()
        base = logits[:b]
        lb = torch.log_softmax(base, dim=-1)
        if contrast:
            alpha = decore_alpha(base, settings)
            scores = combine(base, logits[b:], alpha)
        else:
            alpha = torch.zeros(b, device=logits.device)
            scores = lb
        nxt = scores.argmax(-1)
        chosen.append((scores.gather(-1, nxt[:, None])[:, 0], lb.gather(-1, nxt[:, None])[:, 0], alpha))
        return nxt

    decoded = greedy_decode(model, ids, max_new_tokens, attention_mask=mask, interventions=step_ivs,
                            prefill_interventions=first_ivs, choose=choose, stop_at_newline=stop_at_newline)
    gens = []
    for i, (row, tokens, stop) in enumerate(zip(rows, decoded.tokens, decoded.stops, strict=True)):
        steps = chosen[: len(tokens)]
        gens.append(Generation(
            prompt_tokens=list(row),
            tokens=tokens,
            text=str(model.tokenizer.decode(tokens, skip_special_tokens=True)),
            scores=[float(s[i]) for s, _, _ in steps],
            base_logprobs=[float(lp[i]) for _, lp, _ in steps],
            alphas=[float(a[i]) for _, _, a in steps],
            stop=stop,
        ))
    return gens


def _batches(n: int, batch_size: int) -> list[range]:
    if batch_size < 1:
        raise UserError("batch_size must be >= 1")
    return [range(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]


def decore_generate(
    model: LoadedModel,
    prompts: Sequence[str | Sequence[int]],
    heads: Sequence[Head],
    alpha: Alpha | str = "entropy",
    *,
    max_new_tokens: int = 32,
    method: Method = "uniform",
    normalize_entropy: bool = False,
    alpha_cap: float | None = None,
    prefill: Prefill = "masked",
    stop_at_newline: bool = False,
    prefix: bool = True,
    batch_size: int = 16,
) -> list[Generation]:
    """DeCoRe greedy decoding of each prompt until EOS (or a newline, with ``stop_at_newline``)
    or ``max_new_tokens``. ``heads`` are (layer, head) pairs to mask; none makes it greedy."""
    settings = DecoreSettings(alpha=alpha, normalize_entropy=normalize_entropy, alpha_cap=alpha_cap,  # type: ignore[arg-type]
                              method=method, prefill=prefill)
    return _generate(model, prompts, heads, settings, max_new_tokens, stop_at_newline, prefix,
                     batch_size, contrast=True)


def greedy_generate(
    model: LoadedModel,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_new_tokens: int = 32,
    stop_at_newline: bool = False,
    prefix: bool = True,
    batch_size: int = 16,
) -> list[Generation]:
    """Plain greedy decoding through the same batched, left-padded, cached loop."""
    return _generate(model, prompts, [], DecoreSettings(), max_new_tokens, stop_at_newline, prefix,
                     batch_size, contrast=False)


def _generate(
    model: LoadedModel,
    prompts: Sequence[str | Sequence[int]],
    heads: Sequence[Head],
    settings: DecoreSettings,
    max_new_tokens: int,
    stop_at_newline: bool,
    prefix: bool,
    batch_size: int,
    contrast: bool,
) -> list[Generation]:
    if max_new_tokens < 1:
        raise UserError("max_new_tokens must be >= 1")
    if not prompts:
        raise UserError("no prompts given")
    heads = check_heads(heads, model)
    rows = prompt_rows(model, prompts, prefix)
    out: list[Generation] = []
    for chunk in _batches(len(rows), batch_size):
        out.extend(_decode_batch(model, [rows[i] for i in chunk], heads, settings, max_new_tokens,
                                 stop_at_newline, contrast))
    return out


# ---------------------------------------------------------------- scoring given answers


def decore_score(
    model: LoadedModel,
    prompts: Sequence[str],
    answers: Sequence[Sequence[str]],
    heads: Sequence[Head],
    alpha: Alpha | str = "entropy",
    *,
    method: Method = "uniform",
    normalize_entropy: bool = False,
    alpha_cap: float | None = None,
    alpha_scope: Literal["token", "prefix"] = "token",
    post_softmax: bool = False,
    prefix: bool = True,
    batch_size: int = 16,
) -> pd.DataFrame:
    """Score each candidate answer of each prompt: the sum over its tokens of the combined
    DeCoRe log-prob (``decore``) and of the base model's log-prob (``base``, greedy scoring).

    Answers are tokenised on their own (no special tokens) and appended to the prompt's
    tokens, so give them their leading space (" Paris"). One row per (prompt, answer).
    """
    settings = DecoreSettings(alpha=alpha, normalize_entropy=normalize_entropy, alpha_cap=alpha_cap,  # type: ignore[arg-type]
                              method=method)
    if alpha_scope not in ("token", "prefix"):
        raise UserError(f"alpha_scope must be 'token' or 'prefix', got {alpha_scope!r}")
    if len(prompts) != len(answers):
        raise UserError(f"{len(prompts)} prompts but {len(answers)} answer lists")
    heads = check_heads(heads, model)
    rows = prompt_rows(model, prompts, prefix)
    pairs: list[tuple[int, int, list[int], list[int]]] = []
    for pi, (p, cands) in enumerate(zip(rows, answers, strict=True)):
        if not cands:
            raise UserError(f"prompt {pi} has no candidate answers")
        for ai, a in enumerate(cands):
            toks = [int(t) for t in model.tokenizer(a, add_special_tokens=False)["input_ids"]]
            if not toks:
                raise UserError(f"answer {a!r} tokenises to nothing")
            pairs.append((pi, ai, p, toks))
    records: list[dict[str, Any]] = []
    for chunk in _batches(len(pairs), batch_size):
        sel = [pairs[i] for i in chunk]
        b = len(sel)
        ids, mask = left_pad([p + a for _, _, p, a in sel], pad_id(model))
        ids, mask = torch.cat([ids, ids]).to(model.device), torch.cat([mask, mask]).to(model.device)
        ivs = mask_interventions(heads, settings.method, list(range(b, 2 * b)))
        with torch.no_grad():
            logits = model.run(ids, attention_mask=mask, interventions=ivs).logits.float()
        width = ids.shape[1]
        for j, (pi, ai, _, ans) in enumerate(sel):
            n = len(ans)
            # Position t predicts token t + 1: the answer's logits sit one to the left.
            pos = torch.arange(width - n - 1, width - 1, device=logits.device)
            base, masked = logits[j, pos], logits[b + j, pos]
            alpha_t = decore_alpha(base, settings)
            if alpha_scope == "prefix":
                alpha_t = alpha_t[:1].expand_as(alpha_t)
            comb = combine(base, masked, alpha_t)
            if post_softmax:
                comb = torch.log_softmax(comb, dim=-1)
            target = torch.tensor(ans, device=logits.device)[:, None]
            lb = torch.log_softmax(base, dim=-1)
            records.append({
                "prompt_index": pi,
                "answer_index": ai,
                "answer": answers[pi][ai],
                "n_tokens": n,
                "decore": float(comb.gather(-1, target).sum()),
                "base": float(lb.gather(-1, target).sum()),
                "alpha_mean": float(alpha_t.mean()),
            })
    return pd.DataFrame(records).sort_values(["prompt_index", "answer_index"]).reset_index(drop=True)


def choices(scored: pd.DataFrame, column: str = "decore") -> list[int]:
    """The chosen answer index per prompt (highest summed score in ``column``)."""
    return [int(g.loc[g[column].idxmax(), "answer_index"]) for _, g in scored.groupby("prompt_index", sort=True)]


# ---------------------------------------------------------------- head sets


def _record_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A ranking run's summary metrics as its record keeps them: numbers and strings (a record
    is JSON, printed by the CLI; not a metrics table)."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}


def retrieval_ranking(
    model: LoadedModel, mode: str = "fast", overrides: Mapping[str, Any] | None = None
) -> tuple[list[Head], dict[str, Any]]:
    """Rank heads with the retrieval detector (circuits/retrieval.py), run in process.

    Returns the ranking (best first) and a record: mode, metrics and warnings of the run.
    """
    cfg = RetrievalDetector.parse_params({"mode": mode, **(overrides or {})})
    ranking, summary = rank_heads(model, cfg)
    scores = [float(h["score"]) for h in summary.heads or []]
    record = {"mode": summary.variant, "params": cfg.to_dict(), "warnings": summary.warnings,
              "metrics": _record_metrics(summary.metrics), "scores": scores}
    return ranking, record


# ---------------------------------------------------------------- how many heads to mask

#: DeCoRe's number of masked retrieval heads for Llama-3-8B(-Instruct), and that model's query
#: heads (32 layers x 32 heads): 50 / 1024 = 4.9% of the heads. See :func:`default_k`.
DECORE_PAPER_K = 50
DECORE_PAPER_N_HEADS = 32 * 32


def default_k(n_total_heads: int) -> int:
    """How many top retrieval heads DeCoRe masks by default in a model of ``n_total_heads``
    query heads: the share of the DeCoRe paper's main setting, at least one head.

    Gema et al. 2024, "DeCoRe: Decoding by Contrasting Retrieval Heads to Mitigate
    Hallucinations" (arXiv:2410.18860; EMNLP 2025 Findings), mask the top k = 50 retrieval heads
    of the 7-8B models (Llama-3-8B: 32 x 32 = 1024 query heads), and sweep k from 10 to 100 in
    steps of 10 in the appendix (Tables 7 and 9: Llama3-8B-Instruct with different numbers of
    masked retrieval heads). A model of another size gets the same share of its heads:
    ``max(1, round(50 / 1024 * n_total_heads))`` (Python's round: halves go to the even
    neighbour): 50 for 1024 heads, 13 for smollm2-135m's 270, 1 for a model of 30 or fewer.
    """
    if n_total_heads < 1:
        raise UserError(f"a model needs at least one head, got {n_total_heads}")
    return max(1, round(DECORE_PAPER_K / DECORE_PAPER_N_HEADS * n_total_heads))


def default_k_reason(n_total_heads: int) -> str:
    """Why :func:`default_k` chose its k, in one line (the CLI prints it on stderr)."""
    share = DECORE_PAPER_K / DECORE_PAPER_N_HEADS
    return (f"the DeCoRe paper's share of heads, {DECORE_PAPER_K} of Llama-3-8B's {DECORE_PAPER_N_HEADS} "
            f"({share:.1%}; Gema et al. 2024), times this model's {n_total_heads} heads = "
            f"{share * n_total_heads:.1f}, rounded, at least 1: k = {default_k(n_total_heads)} "
            f"(--k or --heads to choose)")


# ---------------------------------------------------------------- the ranking, from a workspace


def _retrieval_variant(mode: str) -> str:
    det = RetrievalDetector()
    return det.variant(det.parse_params({"mode": mode}))


def _same_model(model_name: Any, model_hash: Any, model: LoadedModel) -> bool:
    """A stored run is of ``model``: the same weights hash, or, for a model without one (a
    model object, some local folders), the same name and no hash."""
    want = model.provenance.file_sha256 or ""
    stored = model_hash if isinstance(model_hash, str) else ""  # None (or NaN) when unknown
    if want:
        return stored == want
    return not stored and str(model_name) == model.name


def _same_prefix(provenance_json: Any, model: LoadedModel) -> bool:
    try:
        stored = json.loads(provenance_json).get("prefix") if isinstance(provenance_json, str) else None
    except (ValueError, AttributeError):
        return False
    # Through JSON, as the store keeps it (tuples become lists).
    return stored == json.loads(json.dumps(model.prefix.to_dict()))


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


def stored_ranking(
    store: Store, model: LoadedModel, mode: str = "fast", params: Mapping[str, Any] | None = None
) -> tuple[list[Head], dict[str, Any]] | None:
    """The head ranking of a finished retrieval run of ``model`` in ``store``, or None.

    A run counts when it is 'done', of the same model (weights hash, else name) and made with
    the same prompt prefix, its parameters agree with ``params`` (parsed values as JSON, as
    :func:`parse_ranking_params` gives them; those not given are free), and its final table holds a ranking (a run with no correctly answered sample has
    none). Of those the newest run of ``mode``'s variant is taken, else the newest of any mode.
    The ranking is the run's final ``head_scores`` (unit "final", metric "retrieval": the mean
    retrieval score over the counted samples), best first, ties by (layer, head) as the
    detector orders them.
    """
    rows: list[dict[str, Any]] = store.runs().to_dict("records")
    want = _retrieval_variant(mode)
    fallback: tuple[list[Head], dict[str, Any]] | None = None
    for row in sorted(rows, key=lambda r: -int(r["id"])):  # newest first
        if row["detector"] != RetrievalDetector.name or row["status"] != "done":
            continue
        if not (_same_model(row["model"], row["model_hash"], model) and _same_prefix(row["provenance_json"], model)):
            continue
        run_params = json.loads(str(row["params_json"])) if row["params_json"] else {}
        if any(run_params.get(name) != value for name, value in (params or {}).items()):
            continue
        final = store.run(int(row["id"])).to_frame("head_scores", FINAL_UNIT)
        scored = sorted(
            (-float(v), int(la), int(h))
            for metric, la, h, v in zip(final["metric"], final["layer"], final["head"], final["value"], strict=True)
            if metric == "retrieval"
        )
        if not scored:
            continue
        ranking = [(la, h) for _, la, h in scored]
        record = {"source": "stored run", "run_id": int(row["id"]), "workspace": str(store.workspace),
                  "mode": str(row["variant"]), "params": run_params, "created_at": str(row["created_at"]),
                  "scores": [-v for v, _, _ in scored]}
        if row["variant"] == want:
            return ranking, record
        if fallback is None:
            fallback = ranking, record
    return fallback


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

    A stored run that :func:`stored_ranking` accepts is reused. Otherwise the retrieval detector
    runs now (mode ``mode``, the detector's defaults but for ``params``) as a run of the store,
    so the next call reuses it; where the workspace cannot be written it runs in memory
    (:func:`retrieval_ranking`) and nothing is stored. Each step is said on ``log``. The record's
    ``source`` is "stored run", "computed now" (with the new ``run_id``) or "in memory".
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
    try:
        found = stored_ranking(store, model, mode, params)
        if found is not None:
            ranking, record = found
            if record["mode"] == _retrieval_variant(mode):
                log(f"using retrieval run {record['run_id']} ({record['mode']}) from {ws}")
            else:
                log(f"using retrieval run {record['run_id']} ({record['mode']}) from {ws}: the newest finished "
                    f"one of {model.name}; none is {_retrieval_variant(mode)}")
            return ranking, {**record, "workspace": str(ws)}
        log(f"no finished retrieval run of {model.name} with this prompt prefix in {ws}; computing one "
            f"({_retrieval_variant(mode)}) and storing it there")
        result = run_detector(model, RetrievalDetector.name, {"mode": mode, **(params or {})}, store)
        summary = result.summary
        if not summary.heads:
            raise UserError(f"retrieval ranking ({mode}, run {result.run_id} in {ws}) is empty: no needle "
                            f"sample was answered correctly; pass heads explicitly")
        for w in summary.warnings:
            log(f"WARNING {w}")
        log(f"stored as retrieval run {result.run_id} in {ws}")
        ranking = ranking_from_summary(summary)
        run_params = store.run(result.run_id).info()["params"]
        record = {"source": "computed now", "run_id": result.run_id, "workspace": str(ws),
                  "mode": summary.variant, "params": run_params, "warnings": summary.warnings,
                  "metrics": _record_metrics(summary.metrics),
                  "scores": [float(h["score"]) for h in summary.heads]}
        return ranking, record
    finally:
        store.close()


# ---------------------------------------------------------------- CLI


@command("decore")
def decore_cli(
    model: Annotated[str, typer.Option("--model", "-m", help="zoo name, local HF folder or hub id")] = "smollm2-135m",
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
    backend: Annotated[str, typer.Option("--backend", help="hook backend (the KV cache needs bridge)")] = "bridge",
    prefix: Annotated[str, typer.Option("--prefix", help="token prompts start with: auto, none or a token")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """DeCoRe decoding next to greedy decoding; masks --heads, or the top-k retrieval heads (see --k)."""
    # The masked heads are --heads, or the top-k of a retrieval ranking: a finished retrieval
    # run of the model in the workspace, else one computed now and stored there (in memory where
    # the workspace cannot be written): workspace_ranking. k is --k, else default_k.
    import interp

    # Every option is checked before the model is loaded (only head indices and --k against
    # the model's head count need it).
    if not prompt:
        raise UserError("give at least one --prompt")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    settings = DecoreSettings(alpha=alpha, normalize_entropy=normalize_entropy,  # type: ignore[arg-type]
                              alpha_cap=alpha_cap or None, method=method, prefill=prefill)  # type: ignore[arg-type]
    overrides = _checked_head_options(heads, k, ranking_mode, ranking_param or [])
    sys.stderr.write(f"loading {model}...\n")
    m = interp.load_model(model, backend=backend, prefix=prefix, device=device, dtype=dtype)
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


__all__ = [
    "DECORE_PAPER_K",
    "DECORE_PAPER_N_HEADS",
    "VANILLA_ALPHA",
    "DecoreSettings",
    "Generation",
    "base_entropy",
    "choices",
    "combine",
    "decore_alpha",
    "decore_generate",
    "decore_score",
    "default_k",
    "greedy_generate",
    "retrieval_ranking",
    "stored_ranking",
    "workspace_ranking",
]
