"""DeCoRe: decoding by contrasting retrieval heads (Gema et al. 2024, methods.md section 4).

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
one after the other, one example at a time). Prompts are left-padded with an attention mask;
the bridge derives position ids from the mask, so padding changes no result (tested).

Prefill (``prefill``): ``masked`` (default) gives the masked model its own cache of the prompt,
computed with the heads masked ("two KV caches, one per model", methods.md). ``shared`` is what
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
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pandas as pd
import torch
import typer

from circuits.retrieval import RetrievalDetector, parse_heads
from interp.errors import UserError
from interp.interventions import Intervention, ablate_heads
from interp.model import LoadedModel
from interp.registry import command
from interp.runner import run_in_memory

Alpha = float | Literal["entropy"]
Method = Literal["uniform", "zero"]
Prefill = Literal["masked", "shared"]
Head = tuple[int, int]
VANILLA_ALPHA = 0.5


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


def encode(model: LoadedModel, prompts: Sequence[str | Sequence[int]], prefix: bool = True) -> list[list[int]]:
    """Token ids per prompt: text is tokenised after the prompt prefix (unless ``prefix`` is
    False); token lists are taken as they are."""
    rows: list[list[int]] = []
    for p in prompts:
        ids = model.encode(p, prefix) if isinstance(p, str) else [int(i) for i in p]
        if not ids:
            raise UserError("empty prompt")
        rows.append(ids)
    return rows


def pad_id(model: LoadedModel) -> int:
    for cand in (model.tokenizer.pad_token_id, model.tokenizer.eos_token_id, model.tokenizer.bos_token_id):
        if isinstance(cand, int):
            return cand
    return 0


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, W] ids and 0/1 attention mask, real tokens right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def check_heads(model: LoadedModel, heads: Sequence[Head]) -> list[Head]:
    out: list[Head] = []
    for la, h in heads:
        model.check_head(int(la), int(h))
        if (int(la), int(h)) in out:
            raise UserError(f"head L{la}H{h} listed twice")
        out.append((int(la), int(h)))
    return out


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


def _is_stop(model: LoadedModel, token: int, stop_at_newline: bool) -> str | None:
    eos = model.tokenizer.eos_token_id
    if isinstance(eos, int) and token == eos:
        return "eos"
    if stop_at_newline and "\n" in str(model.tokenizer.decode([token])):
        return "newline"
    return None


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
    model.check_length(width + max_new_tokens)
    if contrast:
        ids, mask = torch.cat([ids, ids]), torch.cat([mask, mask])
        masked_rows = list(range(b, 2 * b))
        first_ivs = mask_interventions(
            heads, settings.method, masked_rows, [width - 1] if settings.prefill == "shared" else None
        )
        step_ivs = mask_interventions(heads, settings.method, masked_rows)
    else:
        first_ivs = step_ivs = []
    dev = model.device
    ids, mask = ids.to(dev), mask.to(dev)
    gens = [Generation(prompt_tokens=list(r)) for r in rows]
    done = [False] * b
    with torch.no_grad():
        out = model.run(ids, attention_mask=mask, interventions=first_ivs, use_cache=True)
        for step in range(max_new_tokens):
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
            for i in range(b):
                if done[i]:
                    continue
                tok = int(nxt[i])
                g = gens[i]
                g.tokens.append(tok)
                g.scores.append(float(scores[i, tok]))
                g.base_logprobs.append(float(lb[i, tok]))
                g.alphas.append(float(alpha[i]))
                why = _is_stop(model, tok, stop_at_newline)
                if why is not None:
                    g.stop, done[i] = why, True
            if all(done) or step == max_new_tokens - 1:
                break
            feed = torch.cat([nxt, nxt]) if contrast else nxt
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model.run(
                feed[:, None], attention_mask=mask, interventions=step_ivs, past_key_values=out.past_key_values
            )
    for g in gens:
        g.text = str(model.tokenizer.decode(g.tokens, skip_special_tokens=True))
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
    heads = check_heads(model, heads)
    rows = encode(model, prompts, prefix)
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
    heads = check_heads(model, heads)
    prompt_rows = encode(model, prompts, prefix)
    pairs: list[tuple[int, int, list[int], list[int]]] = []
    for pi, (p, cands) in enumerate(zip(prompt_rows, answers, strict=True)):
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


def all_heads(model: LoadedModel) -> list[Head]:
    return [(la, h) for la in range(model.info.n_layers) for h in range(model.info.n_heads)]


def random_control_heads(
    model: LoadedModel, ranking: Sequence[Head], k: int, exclude_top: int, seed: int
) -> list[Head]:
    """k heads drawn (seeded, without replacement) from the heads OUTSIDE the top
    ``max(k, exclude_top)`` of the ranking: never a retrieval head of the DeCoRe sets.

    The reference's control compares tuples with lists, so its exclusion never matches and
    it can draw retrieval heads; here heads are normalised to (int, int) tuples first.
    """
    if k < 0:
        raise UserError("k must be >= 0")
    top = {(int(la), int(h)) for la, h in list(ranking)[: max(k, exclude_top)]}
    pool = [hd for hd in all_heads(model) if hd not in top]
    if len(pool) < k:
        raise UserError(f"only {len(pool)} heads lie outside the top {len(top)}; cannot draw {k}")
    return sorted(random.Random(seed).sample(pool, k))


def retrieval_ranking(
    model: LoadedModel, mode: str = "fast", overrides: Mapping[str, Any] | None = None
) -> tuple[list[Head], dict[str, Any]]:
    """Rank heads with the retrieval detector (circuits/retrieval.py), run in process.

    Returns the ranking (best first) and a record: mode, metrics and warnings of the run.
    """
    det = RetrievalDetector()
    params = det.parse_params({"mode": mode, **(overrides or {})})
    summary, _ = run_in_memory(model, det, params)
    if not summary.heads:
        raise UserError(
            f"retrieval ranking ({mode}) is empty: no needle sample was answered correctly; pass heads explicitly"
        )
    ranking = [(int(h["layer"]), int(h["head"])) for h in summary.heads]
    scores = [float(h["score"]) for h in summary.heads]
    record = {"mode": summary.variant, "params": dict(params), "warnings": summary.warnings,
              "metrics": {k: v for k, v in summary.metrics.items() if isinstance(v, int | float | str)},
              "scores": scores}
    return ranking, record


# ---------------------------------------------------------------- CLI


@command("decore")
def decore_cli(
    model: Annotated[str, typer.Option("--model", "-m", help="zoo name, local HF folder or hub id")] = "smollm2-135m",
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="prompt (repeat for a batch)")] = None,
    heads: Annotated[str, typer.Option("--heads", help="heads to mask: L.H,L.H,...")] = "",
    k: Annotated[int, typer.Option("--k", help="mask the top-k heads of a retrieval ranking computed now")] = 0,
    ranking_mode: Annotated[str, typer.Option("--ranking-mode", help="retrieval score for --k: fast or faithful")] = "fast",
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
) -> None:
    """DeCoRe decoding next to greedy decoding, for one or more prompts."""
    import sys

    import interp

    # Every option is checked here, before the model is loaded (only head indices and --k
    # against the model's head count need it).
    if not prompt:
        raise UserError("give at least one --prompt")
    if k < 0:
        raise UserError(f"--k must be >= 1, got {k}")
    if bool(heads) == bool(k):
        raise UserError("give either --heads L.H,... or --k K (not both, not neither)")
    if heads:
        parse_heads(heads)
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    settings = DecoreSettings(alpha=alpha, normalize_entropy=normalize_entropy,  # type: ignore[arg-type]
                              alpha_cap=alpha_cap or None, method=method, prefill=prefill)  # type: ignore[arg-type]
    if ranking_mode not in ("fast", "faithful"):
        raise UserError(f"--ranking-mode must be fast or faithful, got {ranking_mode!r}")
    sys.stderr.write(f"loading {model}...\n")
    m = interp.load_model(model, backend=backend, prefix=prefix)
    ranking_record: dict[str, Any] | None = None
    if heads:
        masked = parse_heads(heads, m)
    else:
        if k >= m.info.n_total_heads:
            raise UserError(f"--k {k} is not below the model's {m.info.n_total_heads} heads")
        sys.stderr.write(f"ranking heads (retrieval, {ranking_mode})...\n")
        ranked, ranking_record = retrieval_ranking(m, ranking_mode)
        masked = ranked[:k]
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
    print(f"DeCoRe [{settings.variant}] masking {len(masked)} heads: "
          + ", ".join(f"L{la}H{h}" for la, h in masked))
    for r in rows:
        print(f"\nprompt: {r['prompt']!r}\n  greedy: {r['greedy']!r}\n  decore: {r['decore']!r}")
        if r["alphas"]:
            print(f"  alpha: mean {sum(r['alphas']) / len(r['alphas']):.3f} over {len(r['alphas'])} steps")


__all__ = [
    "VANILLA_ALPHA",
    "DecoreSettings",
    "Generation",
    "base_entropy",
    "choices",
    "combine",
    "decore_alpha",
    "decore_generate",
    "decore_score",
    "greedy_generate",
    "random_control_heads",
    "retrieval_ranking",
]
