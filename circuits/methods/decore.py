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

Any model (``decore_generate``): a LoadedModel decodes through its hook backend; a plain
transformers model object (``AutoModelForCausalLM``) through :class:`circuits.methods.hf_runner.HFRunner`,
torch hooks on its own modules for the masked rows, removed after each pass (no copy of the
weights, no patched attention class). Both run this module's one loop (``_generate``), which
``interp decore`` uses too. ``do_sample`` draws each token from the combined scores as
``generate`` draws from its logits (:mod:`circuits.methods.sampling`: temperature, top-k, top-p,
seed); greedy takes the argmax, as the paper.

Several head sets (``decore_generate_sets``: the random-head control's draws): each (set,
prompt) pair is a sequence of its own, and a batch holds sequences of several sets, each set's
masking restricted to its own masked rows.

Scoring given answers (``decore_score``, the reference's ``lm_score``) is
:mod:`circuits.methods.decore_scoring`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from circuits.detectors.retrieval import RetrievalDetector, ranked_by_retrieval
from circuits.methods.decoding import Decodable, greedy_decode, left_pad, pad_id, prompt_rows
from circuits.methods.heads import check_heads
from circuits.methods.hf_runner import HFRunner
from circuits.methods.sampling import Sampling
from interp.errors import UserError
from interp.model.backends import RunOutput
from interp.model.interventions import Intervention, ablate_heads
from interp.model.layout import Head
from interp.model.loaded import LoadedModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Alpha = float | Literal["entropy"]
Method = Literal["uniform", "zero"]
Prefill = Literal["masked", "shared"]
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


def _masking(row_heads: Sequence[Sequence[Head]], settings: DecoreSettings,
             width: int) -> tuple[list[Intervention], list[Intervention]]:
    """The prefill's and the steps' masking of a stacked [base; masked] batch: sequence i's
    heads (``row_heads[i]``) on its masked twin, row ``len(row_heads) + i``; the sequences that
    mask the same heads share one intervention per layer."""
    b = len(row_heads)
    rows_of: dict[tuple[Head, ...], list[int]] = {}
    for i, heads in enumerate(row_heads):
        rows_of.setdefault(tuple(heads), []).append(b + i)
    at = [width - 1] if settings.prefill == "shared" else None
    first: list[Intervention] = []
    step: list[Intervention] = []
    for heads, rows in rows_of.items():
        first += mask_interventions(heads, settings.method, rows, at)
        step += mask_interventions(heads, settings.method, rows)
    return first, step


def _decode_batch(
    model: Decodable,
    rows: Sequence[Sequence[int]],
    row_heads: Sequence[Sequence[Head]],
    settings: DecoreSettings,
    max_new_tokens: int,
    stop_at_newline: bool,
    contrast: bool,
    sampling: Sampling,
    generator: torch.Generator | None,
) -> list[Generation]:
    """One batch of sequences, sequence i the prompt ``rows[i]`` contrasted (``contrast``) with
    its twin masking ``row_heads[i]``."""
    b = len(rows)
    ids, mask = left_pad(rows, pad_id(model))
    first_ivs: list[Intervention] = []
    step_ivs: list[Intervention] = []
    if contrast:
        first_ivs, step_ivs = _masking(row_heads, settings, int(ids.shape[1]))
        ids, mask = torch.cat([ids, ids]), torch.cat([mask, mask])
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
        nxt = sampling.pick(scores, generator)
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


def batches(n: int, batch_size: int) -> list[range]:
    if batch_size < 1:
        raise UserError("batch_size must be >= 1")
    return [range(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]


def decore_generate(
    model: PreTrainedModel | LoadedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    prompts: Sequence[str | Sequence[int]],
    heads: Sequence[Head],
    alpha: Alpha | str = "entropy",
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    batch_size: int = 16,
    method: Method = "uniform",
    normalize_entropy: bool = False,
    alpha_cap: float | None = None,
    prefill: Prefill = "masked",
    stop_at_newline: bool = False,
    prefix: bool = True,
) -> list[Generation]:
    """DeCoRe decoding of each prompt until EOS (or a newline, with ``stop_at_newline``) or
    ``max_new_tokens``, in batches of ``batch_size`` left-padded prompts.

    ``model``: a plain transformers causal LM (an ``AutoModelForCausalLM`` in eval mode, with its
    ``tokenizer``) or a LoadedModel (``tokenizer`` None or its own). ``prompts``: texts, tokenised
    with the tokenizer's special tokens (a LoadedModel: after its prompt prefix) unless ``prefix``
    is False, or lists of token ids taken as they are. ``heads``: the (layer, head) pairs masked
    in the contrasted model (``method`` uniform: the query zeroed; zero: the output zeroed); none
    makes it plain decoding. ``alpha``: "entropy" (DeCoRe-entropy) or a number (DeCoRe-vanilla,
    0.5 in the paper). ``do_sample`` draws from the combined scores (``temperature``, ``top_k``,
    ``top_p``; ``seed`` makes the draws reproducible); otherwise greedy, as the paper. The model
    is left as it came (hooks are removed after every pass).
    """
    settings = DecoreSettings(alpha=alpha, normalize_entropy=normalize_entropy, alpha_cap=alpha_cap,  # type: ignore[arg-type]
                              method=method, prefill=prefill)
    sampling = Sampling(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    return _generate(decoder_for(model, tokenizer), prompts, heads, settings, max_new_tokens, stop_at_newline,
                     prefix, batch_size, contrast=True, sampling=sampling)


def decoder_for(model: PreTrainedModel | LoadedModel, tokenizer: PreTrainedTokenizerBase | None) -> Decodable:
    """What decodes ``model``: a LoadedModel itself, a plain HF model in an :class:`HFRunner`."""
    if isinstance(model, LoadedModel):
        if tokenizer is not None and tokenizer is not model.tokenizer:
            raise UserError("a LoadedModel decodes with its own tokenizer: pass tokenizer=None (or model.tokenizer)")
        return model
    return HFRunner(model, tokenizer, last_logits_only=True)


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
    model: Decodable,
    prompts: Sequence[str | Sequence[int]],
    heads: Sequence[Head],
    settings: DecoreSettings,
    max_new_tokens: int,
    stop_at_newline: bool,
    prefix: bool,
    batch_size: int,
    contrast: bool,
    sampling: Sampling | None = None,
) -> list[Generation]:
    """The one generation loop: ``decore_generate`` (a LoadedModel or a plain HF model),
    ``greedy_generate`` and ``interp decore`` all decode here."""
    return _generate_sets(model, prompts, [heads], settings, max_new_tokens, stop_at_newline, prefix,
                          batch_size, contrast, sampling)[0]


def _generate_sets(
    model: Decodable,
    prompts: Sequence[str | Sequence[int]],
    head_sets: Sequence[Sequence[Head]],
    settings: DecoreSettings,
    max_new_tokens: int,
    stop_at_newline: bool,
    prefix: bool,
    batch_size: int,
    contrast: bool,
    sampling: Sampling | None = None,
) -> list[list[Generation]]:
    """``_generate`` of each head set, one list of generations per set: the (set, prompt)
    sequences, set by set, cut into batches of ``batch_size`` sequences."""
    if max_new_tokens < 1:
        raise UserError("max_new_tokens must be >= 1")
    if not prompts:
        raise UserError("no prompts given")
    sets = [check_heads(heads) for heads in head_sets]
    for layer, head in dict.fromkeys(h for heads in sets for h in heads):
        model.check_head(layer, head)
    rows = prompt_rows(model, prompts, prefix)
    sampling = sampling or Sampling()
    generator = sampling.generator(model.device)
    seqs = [(s, i) for s in range(len(sets)) for i in range(len(rows))]
    out: list[list[Generation]] = [[] for _ in sets]
    for chunk in batches(len(seqs), batch_size):
        pairs = [seqs[j] for j in chunk]
        gens = _decode_batch(model, [rows[i] for _, i in pairs], [sets[s] for s, _ in pairs], settings,
                             max_new_tokens, stop_at_newline, contrast, sampling, generator)
        for (s, _), g in zip(pairs, gens, strict=True):
            out[s].append(g)
    return out


def decore_generate_sets(
    model: LoadedModel,
    prompts: Sequence[str | Sequence[int]],
    head_sets: Sequence[Sequence[Head]],
    settings: DecoreSettings,
    *,
    max_new_tokens: int = 32,
    stop_at_newline: bool = False,
    prefix: bool = True,
    batch_size: int = 16,
) -> list[list[Generation]]:
    """Greedy DeCoRe decoding of every prompt with each head set masked in turn: per set, what
    ``decore_generate`` gives with that set. The sets share forward passes: a batch holds up to
    ``batch_size`` (set, prompt) sequences, each set's masking restricted to its own rows (the
    random-head control's draws, circuits/detectors/decore_draws.py)."""
    return _generate_sets(model, prompts, head_sets, settings, max_new_tokens, stop_at_newline, prefix,
                          batch_size, contrast=True)


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
    ranking, summary = ranked_by_retrieval(model, cfg)
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


__all__ = [
    "DECORE_PAPER_K",
    "DECORE_PAPER_N_HEADS",
    "VANILLA_ALPHA",
    "DecoreSettings",
    "Generation",
    "base_entropy",
    "combine",
    "decoder_for",
    "decore_alpha",
    "decore_generate",
    "decore_generate_sets",
    "default_k",
    "greedy_generate",
    "retrieval_ranking",
]
