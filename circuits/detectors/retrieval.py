"""Retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality"):
the retrieval score and the masking experiment.

Retrieval score (``retrieval``, mode ``faithful``, the default): on needle-in-a-haystack
prompts (``circuits/needles.py``) decode greedily with a KV cache: the prompt minus its last
token is prefilled, then every decoding step feeds one token (the first step feeds the last
prompt token, as the reference code does). At each step, for each query head, take the argmax
key position i of the current query's attention row; the step counts when i lies inside the
needle sentence's token span AND the generated token equals the prompt token at i. Each counted
step adds 1 / (span length). Attention is read from the decoding steps only.

The null (``retrieval_null``, always computed: it needs no pass of its own): the same
bookkeeping with the needle's tokens shuffled within its span, averaged exactly over all
orders. The model, its prompt, its question, its decoding and each head's argmax stay as they
were; only the token a counted step compares against is the one a random order would put at
that position. So a step whose argmax lies in the span counts (# needle tokens equal to the
generated one) / (span length) in expectation. A head that copies the needle by position
(attending to exactly the token it emits) loses its score under the shuffle; chance hits of a
head that looks into the needle without copying from it remain. Shuffling the needle in the
prompt itself and decoding again would not be a null for this score: a copy head still copies,
in the shuffled order, and still counts. A head is above its null when the paired t interval
of its per-sample score minus null (counted samples only) lies above 0, Bonferroni-adjusted
over the heads (``circuits.methods.nulls``; ``level`` the family-wise level); it complements
Wu et al.'s fixed threshold of 0.1.

Only samples the model answered correctly count: ROUGE-1 recall of the needle's answer words in
the response > 0.5 (lower-cased alphanumeric words, clipped counts, no stemming; the reference
uses rouge_score with a Porter stemmer against its "real_needle"). A head's score is the mean
over counted samples. How many samples counted is part of every result; when too few counted
the result says so loudly (the reference writes empty files silently: its issues #6 and #12).

Mode ``fast`` (teacher-forced): the needle's answer tokens, copied from the needle in the
prompt, are appended to the prompt and scored in one forward pass over them (after a prefill
of the prompt): the same argmax/copy bookkeeping at each answer position, targets = the answer
tokens. A sample counts when teacher-forced top-1 accuracy over the answer tokens is > 0.5.

Masking (``retrieval-masking``): mask the top-K retrieval heads (UniformAttention: zero the
query, as the reference does; or zero ablation of the head output) against K random heads
drawn outside the top set, several draws, and report needle accuracy by context length and
depth. All conditions of a prompt run as rows of one batch, the interventions restricted to
their row.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import numpy as np
import pandas as pd
import torch

from circuits.data.needles import (
    Haystack,
    NeedleSample,
    grid_depths,
    grid_lengths,
    load_haystack,
    load_needles,
    make_grid,
    words,
)
from circuits.methods.decoding import greedy_decode
from circuits.methods.heads import Head, ranking_from_summary
from circuits.methods.nulls import RULE
from circuits.methods.retrieval_heads import scored_heads
from interp.errors import UserError
from interp.model.backends import RunOutput
from interp.model.interventions import Intervention
from interp.model.loaded import LoadedModel
from interp.runs import tables
from interp.runs.config import SEED_MAX, DetectorConfig, param
from interp.runs.registry import Detector, Summary, UnitResult, register
from interp.runs.runner import run_in_memory
from interp.runs.units import Unit
from interp.stats import Interval, interval, wilson

if TYPE_CHECKING:
    import plotly.graph_objects as go

RETRIEVAL_THRESHOLD = 0.1
# Axis titles of the curves accuracy_curves writes ("<condition>: accuracy vs ...").
NEEDLE_CURVE_AXES: dict[str, tuple[str, str]] = {
    "*: accuracy vs depth": ("needle depth (0 = start, 1 = end of the context)", "accuracy (fraction of samples)"),
    "*: accuracy vs length*": ("context length (tokens)", "accuracy (fraction of samples)"),
}
CORRECTNESS = "rouge1_recall>0.5"


# ---------------------------------------------------------------- correctness


def rouge1_recall(reference: str, prediction: str) -> float:
    """Share of the reference's words found in the prediction (clipped unigram counts)."""
    ref, pred = Counter(words(reference)), Counter(words(prediction))
    total = sum(ref.values())
    if total == 0:
        return 0.0
    return sum(min(c, pred[w]) for w, c in ref.items()) / total


def is_correct(answer: str, response: str) -> bool:
    return rouge1_recall(answer, response) > 0.5


# ---------------------------------------------------------------- bookkeeping


def step_hits(
    argmax: torch.Tensor, sequence: Sequence[int], span: tuple[int, int], target: int
) -> torch.Tensor:
    """Which heads count at one step: argmax ([layer, head] key positions) inside the needle
    span and pointing at a token equal to ``target`` (the token generated at this step)."""
    start, end = span
    seq = torch.as_tensor(list(sequence), dtype=torch.long)
    inside = (argmax >= start) & (argmax < end)
    safe = argmax.clamp(0, len(seq) - 1)
    return inside & (seq[safe] == int(target))


def retrieval_scores(
    argmaxes: Sequence[torch.Tensor], sequence: Sequence[int], span: tuple[int, int], targets: Sequence[int]
) -> torch.Tensor:
    """One sample's retrieval score per head: counted steps / needle span length."""
    if len(argmaxes) != len(targets):
        raise ValueError("one argmax table per target token")
    if not argmaxes:
        raise ValueError("no decoding steps")
    hits = torch.stack([step_hits(a, sequence, span, t) for a, t in zip(argmaxes, targets, strict=True)])
    return hits.sum(0).double() / (span[1] - span[0])


def null_step_hits(
    argmax: torch.Tensor, sequence: Sequence[int], span: tuple[int, int], target: int
) -> torch.Tensor:
    """:func:`step_hits` averaged over every order of the needle's tokens in its span: a head
    whose argmax lies in the span hits with the share of span tokens equal to ``target``."""
    start, end = span
    needle = torch.as_tensor(list(sequence[start:end]), dtype=torch.long)
    share = float((needle == int(target)).sum()) / (end - start)
    return ((argmax >= start) & (argmax < end)).double() * share


def retrieval_null_scores(
    argmaxes: Sequence[torch.Tensor], sequence: Sequence[int], span: tuple[int, int], targets: Sequence[int]
) -> torch.Tensor:
    """One sample's null score per head: :func:`retrieval_scores` with the needle's tokens in a
    uniformly random order, in expectation (see the module docstring)."""
    if len(argmaxes) != len(targets) or not argmaxes:
        raise ValueError("one argmax table per target token, at least one")
    hits = torch.stack([null_step_hits(a, sequence, span, t) for a, t in zip(argmaxes, targets, strict=True)])
    return hits.sum(0) / (span[1] - span[0])


def _argmax_rows(cache: Mapping[str, torch.Tensor], n_layers: int) -> torch.Tensor:
    """[layer, batch, head, query] argmax key position of each cached pattern."""
    return torch.stack([cache[f"pattern.{layer}"].argmax(-1) for layer in range(n_layers)])


# ---------------------------------------------------------------- decoding


def needle_decode(
    model: LoadedModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    interventions: Sequence[Intervention] = (),
    record_attention: bool = False,
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy decoding of a batch of equal-length prompts as the reference does: the last
    prompt token is fed by the first step, and an answer ends at EOS or a newline.

    Returns each row's generated tokens (up to and including its stop token) and, with
    ``record_attention``, one [layer, batch, head] table of argmax key positions per step, read
    from that step's attention row (decoding steps only, never the prefill).
    """
    n_layers = model.info.n_layers
    argmaxes: list[torch.Tensor] = []

    def choose(out: RunOutput) -> torch.Tensor:
        if record_attention:
            argmaxes.append(_argmax_rows(out.cache, n_layers)[..., -1].cpu())
        return out.logits[:, -1].argmax(-1)

    decoded = greedy_decode(model, input_ids, max_new_tokens, interventions=interventions,
                            cache=["pattern.*"] if record_attention else [], choose=choose,
                            stop_at_newline=True, feed_last_token=True)
    return decoded.tokens, argmaxes


def response_text(model: LoadedModel, tokens: Sequence[int]) -> str:
    return str(model.tokenizer.decode(list(tokens), skip_special_tokens=True)).strip()


def score_sample_faithful(
    model: LoadedModel, sample: NeedleSample, max_new_tokens: int, interventions: Sequence[Intervention] = ()
) -> dict[str, Any]:
    """Decode one sample greedily and score every head on it (the reference's procedure)."""
    ids = torch.tensor([sample.input_ids], dtype=torch.long)
    generated, argmaxes = needle_decode(
        model, ids, max_new_tokens, interventions=interventions, record_attention=True
    )
    gen = generated[0]
    # The sequence the step-t query can see: prompt + tokens generated before step t.
    seq = list(sample.input_ids) + gen
    steps = [a[:, 0] for a in argmaxes[: len(gen)]]
    scores = retrieval_scores(steps, seq, sample.needle_span, gen)
    null = retrieval_null_scores(steps, seq, sample.needle_span, gen)
    response = response_text(model, gen)
    recall = rouge1_recall(sample.needle.answer, response)
    return {
        "scores": scores,
        "null_scores": null,
        "generated": gen,
        "response": response,
        "rouge1_recall": recall,
        "correct": recall > 0.5,
        "steps": len(gen),
        "argmax": steps,
    }


def score_sample_fast(model: LoadedModel, sample: NeedleSample) -> dict[str, Any]:
    """Teacher-forced: the needle's answer tokens after the prompt, scored in one pass."""
    prompt = list(sample.input_ids)
    a0, a1 = sample.answer_span
    answer = prompt[a0:a1]
    n_layers = model.info.n_layers
    with torch.no_grad():
        pre = model.run(torch.tensor([prompt[:-1]]), use_cache=True)
        chunk = torch.tensor([[prompt[-1], *answer[:-1]]])
        out = model.run(chunk, cache=["pattern.*"], past_key_values=pre.past_key_values)
    # Query j of the chunk sits at position len(prompt) - 1 + j and predicts answer[j].
    am = _argmax_rows(out.cache, n_layers)[:, 0]  # [layer, head, query]
    steps = [am[..., j].cpu() for j in range(len(answer))]
    seq = prompt + answer
    scores = retrieval_scores(steps, seq, sample.needle_span, answer)
    null = retrieval_null_scores(steps, seq, sample.needle_span, answer)
    pred = out.logits[0].argmax(-1).tolist()
    acc = float(np.mean([p == t for p, t in zip(pred, answer, strict=True)]))
    return {
        "scores": scores,
        "null_scores": null,
        "generated": answer,
        "response": response_text(model, answer),
        "teacher_accuracy": acc,
        "correct": acc > 0.5,
        "steps": len(answer),
    }


# ---------------------------------------------------------------- the needle grid


@dataclass(frozen=True)
class NeedleGridConfig(DetectorConfig):
    """The needle-in-a-haystack grid both retrieval detectors run on: context lengths x needle
    depths x needles, each prompt within a token budget."""

    min_length: int = param(200, "shortest context (filler + needle), tokens", low=1)
    max_length: int = param(800, "longest context, tokens (at least min_length)", low=1)
    n_lengths: int = param(3, "context lengths, evenly spaced from min_length to max_length", low=1)
    n_depths: int = param(3, "needle depths, evenly spaced from 0 (start) to 1 (end)", low=1)
    n_needles: int = param(3, "needles used, from the start of the needles file (0 = all)", low=0)
    needles_file: str = param("", "JSONL of {sentence, question, answer} (default: shipped needles)")
    haystack_file: str = param("", "filler text file (default: shipped public-domain prose)")
    max_tokens: int = param(1024, "token budget: prompt + decoded tokens stay within it", low=2)
    max_new_tokens: int = param(24, "greedy decoding steps at most (the reference uses 50)", low=1)
    # needles.PromptFormat, written out: ruff (RUF009) takes a type alias for a mutable default.
    prompt_format: Literal["auto", "chat", "plain"] = param(
        "auto", "chat template (auto: when the tokenizer has one) or plain"
    )
    seed: int = param(0, "seed of the haystack windows", low=0, high=SEED_MAX)

    def check(self) -> None:
        """The relations between the grid parameters, and the data files, checked without a model."""
        super().check()
        lo, hi = self.min_length, self.max_length
        if lo > hi:
            raise UserError(f"min_length must be <= max_length, got min_length={lo} and max_length={hi}")
        budget, new = self.max_tokens, self.max_new_tokens
        if hi + new > budget:
            raise UserError(
                f"max_length + max_new_tokens must be <= max_tokens (the prompt and its decoding fit the "
                f"budget), got {hi} + {new} > {budget}"
            )
        if self.needles_file:
            load_needles(self.needles_file)
        if self.haystack_file:
            load_haystack(self.haystack_file)


def samples_for(model: LoadedModel, cfg: NeedleGridConfig) -> dict[str, NeedleSample]:
    """The grid of samples, keyed by unit name, in a fixed order."""
    needles = load_needles(cfg.needles_file or None)
    if cfg.n_needles:
        needles = needles[: cfg.n_needles]
    grid = make_grid(
        model,
        needles,
        Haystack(model, load_haystack(cfg.haystack_file or None)),
        grid_lengths(cfg.min_length, cfg.max_length, cfg.n_lengths),
        grid_depths(cfg.n_depths),
        budget=cfg.max_tokens,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
        prompt_format=cfg.prompt_format,
    )
    return {f"len{s.length}-depth{s.depth:.2f}-needle{s.needle_index}": s for s in grid}


def _file_hash(cfg: NeedleGridConfig) -> str | None:
    paths = [p for p in (cfg.needles_file, cfg.haystack_file) if p]
    if not paths:
        return None
    h = hashlib.sha256()
    for p in paths:
        try:
            with open(p, "rb") as f:
                h.update(f.read())
        except OSError:
            raise UserError(f"cannot read {p}") from None
    return h.hexdigest()[:16]


G = TypeVar("G", bound=NeedleGridConfig)


class _NeedleDetector(Detector[G]):
    """What both retrieval detectors share: the grid of needle prompts, one sample per unit."""

    curve_axes = NEEDLE_CURVE_AXES

    def dataset_hash(self, model: LoadedModel, cfg: G) -> str | None:
        return _file_hash(cfg)

    def samples(self, model: LoadedModel, cfg: G) -> dict[str, NeedleSample]:
        """The grid (:func:`samples_for`), built once per run: units() and every unit read it."""
        return self.memo("samples", model, cfg, lambda: samples_for(model, cfg))

    def sample_units(self, model: LoadedModel, cfg: G) -> list[Unit]:
        """One unit per sample of the grid, in the grid's order, named by the sample."""
        return [Unit("sample", i, label=name) for i, name in enumerate(self.samples(model, cfg))]

    def sample(self, model: LoadedModel, cfg: G, unit: Unit) -> NeedleSample:
        """The needle sample of a unit of :meth:`sample_units`."""
        return list(self.samples(model, cfg).values())[int(unit.index or 0)]

    def example_tokens(self, model: LoadedModel, cfg: G) -> torch.Tensor:
        first = next(iter(self.samples(model, cfg).values()))
        return torch.tensor([first.input_ids], dtype=torch.long)


def _artifacts(results: Mapping[str, pd.DataFrame], name: str) -> list[dict[str, Any]]:
    """Every JSON artifact of a name (one per unit), each with the unit that wrote it (when known)."""
    art = results.get("artifacts")
    if art is None or art.empty:
        return []
    sel = art[art["name"] == name]
    units = sel["unit"] if "unit" in sel.columns else [None] * len(sel)
    return [{**json.loads(j), "unit": u} for j, u in zip(sel["json"], units, strict=True)]


def _mean(values: Any) -> float:
    return float(np.mean(np.asarray(values, dtype=float)))


def accuracy_curves(samples: pd.DataFrame, column: str, condition: str,
                    method: Literal["wilson", "t"] = "wilson") -> pd.DataFrame:
    """Accuracy against length (one curve per depth) and against depth, as long rows, each point
    the mean over its samples with its interval: Wilson for 0/1 outcomes, ``method="t"`` for a
    per-sample mean of outcomes (the accuracy over random draws)."""
    depth = np.asarray(samples["depth"], dtype=float)
    length = np.asarray(samples["length"], dtype=float)
    value = np.asarray(samples[column], dtype=float)
    rows = []
    for d in sorted(set(depth)):
        for n in sorted(set(length)):
            sel = (depth == d) & (length == n)
            rows.append((f"{condition}: accuracy vs length, depth={d:.2f}", None, None, n, value[sel]))
    for d in sorted(set(depth)):
        rows.append((f"{condition}: accuracy vs depth", None, None, d, value[depth == d]))
    for n in sorted(set(length)):
        rows.append((f"{condition}: accuracy vs length", None, None, n, value[length == n]))
    # A cell without samples (none in a full grid) has no point rather than a NaN one.
    return tables.interval_curves((c, la, h, x, interval(v, method=method)) for c, la, h, x, v in rows if len(v))


# ---------------------------------------------------------------- the retrieval score


@dataclass(frozen=True)
class RetrievalConfig(NeedleGridConfig):
    """Parameters of the retrieval score: the grid, the mode and the counted-samples floor."""

    mode: Literal["faithful", "fast"] = param(
        "faithful", "faithful: greedy decoding with a KV cache; fast: teacher-forced answer"
    )
    min_counted: int = param(5, "fewer correctly answered samples than this triggers a loud warning", low=0)
    level: float = param(0.95, "family-wise confidence level of the above-null tests over all heads",
                         low=0, high=1, low_open=True, high_open=True)


@register
class RetrievalDetector(_NeedleDetector[RetrievalConfig]):
    name = "retrieval"
    description = "Retrieval score per query head on needle-in-a-haystack prompts (Wu et al. 2024)"
    output = "head_scores"
    head_columns: ClassVar[dict[str, str]] = {"retrieval_null": "null", "above_null": "> null"}
    in_default_scan = True
    Config = RetrievalConfig

    def variant(self, cfg: RetrievalConfig) -> str:
        return "faithful" if cfg.mode == "faithful" else "fast-teacher-forced"

    def method_text(self, cfg: RetrievalConfig) -> str:
        null = ("; null: the same count with the needle's tokens in a random order (exact expectation), a head "
                f"above it by a {RULE} (family-wise level {cfg.level})")
        if cfg.mode == "faithful":
            return ("retrieval score (Wu et al. 2024): greedy decoding with a KV cache; a head counts at a step "
                    "when its argmax key lies in the needle span on the token generated, 1/span per step; "
                    f"mean over the samples answered correctly ({CORRECTNESS})" + null)
        return ("teacher-forced retrieval score: the needle's answer tokens after the prompt, scored in one "
                "pass with the argmax/copy count of Wu et al. 2024; mean over the samples whose teacher-forced "
                "top-1 accuracy is > 0.5" + null)

    def units(self, model: LoadedModel, cfg: RetrievalConfig) -> list[Unit]:
        return self.sample_units(model, cfg)

    def run_unit(self, model: LoadedModel, cfg: RetrievalConfig, unit: Unit) -> UnitResult:
        sample = self.sample(model, cfg, unit)
        if cfg.mode == "faithful":
            r = score_sample_faithful(model, sample, cfg.max_new_tokens)
            quality = ("rouge1_recall", r["rouge1_recall"])
        else:
            r = score_sample_fast(model, sample)
            quality = ("teacher_accuracy", r["teacher_accuracy"])
        info = {**sample.describe(), "response": r["response"], "generated": r["generated"],
                "correct": bool(r["correct"]), quality[0]: quality[1], "steps": r["steps"]}
        return UnitResult(
            tables={
                "head_scores": pd.concat([tables.head_grid("retrieval_sample", r["scores"]),
                                          tables.head_grid("retrieval_null_sample", r["null_scores"])],
                                         ignore_index=True),
                "metrics": tables.metrics(
                    {"correct": float(r["correct"]), quality[0]: quality[1], "steps": r["steps"],
                     "length": sample.length, "depth": sample.depth, "n_tokens": sample.n_tokens,
                     "needle": sample.needle_index},
                    n=1,
                ),
                "artifacts": tables.artifact("sample", info),
            }
        )

    def finalize(self, model: LoadedModel, cfg: RetrievalConfig, results: Mapping[str, pd.DataFrame]) -> Summary:
        samples = pd.DataFrame(_artifacts(results, "sample"))
        n = len(samples)
        counted = samples[samples["correct"]] if n else samples
        n_counted = len(counted)
        warnings: list[str] = []
        rule = CORRECTNESS if cfg.mode == "faithful" else "teacher_accuracy>0.5"
        n_heads = model.info.n_total_heads
        metrics: dict[str, Any] = {
            "n_samples": n,
            "n_counted": n_counted,
            "share_counted": n_counted / n if n else 0.0,
            "accuracy": _mean(samples["correct"]) if n else 0.0,
            "min_counted": cfg.min_counted,
            "too_few_counted": int(n_counted < cfg.min_counted),
            "threshold": RETRIEVAL_THRESHOLD,
            "n_heads": n_heads,
        }
        out: dict[str, pd.DataFrame] = {}
        heads: list[dict[str, Any]] = []
        intervals: dict[str, Interval] = {}
        if n_counted == 0:
            warnings.append(
                f"NO RETRIEVAL SCORES: none of the {n} samples was answered correctly ({rule}) by "
                f"{model.name}; the score is undefined, so no head scores were written. Try shorter "
                f"contexts (min_length/max_length), other needles, or a larger model."
            )
        else:
            if n_counted < cfg.min_counted:
                warnings.append(
                    f"TOO FEW SAMPLES COUNTED: only {n_counted} of {n} samples were answered correctly "
                    f"({rule}), fewer than min_counted={cfg.min_counted}; these retrieval scores "
                    f"are noisy and may not rank heads reliably."
                )
            scored = scored_heads(results, list(samples["unit"]), set(counted["unit"]), model.info.n_heads,
                                  cfg.level, RETRIEVAL_THRESHOLD)
            heads, out["head_scores"], intervals = scored.heads, scored.table, scored.intervals
            metrics.update(scored.metrics)
            warnings += scored.warnings
        if n:
            out["curves"] = accuracy_curves(samples, "correct", "unmasked")
            # The needle accuracy is a share of the samples (0/1 outcomes), as is the share counted.
            correct = samples["correct"].astype(float).to_numpy()
            intervals.update({"accuracy": wilson(correct), "share_counted": wilson(correct)})
        out["metrics"] = tables.metrics(metrics, n=n)
        out["artifacts"] = tables.artifact(
            "counting", {"mode": self.variant(cfg), "correctness": rule,
                         "counted_units": sorted(counted["unit"]) if n_counted else []}
        )
        metrics["correctness"] = rule
        return Summary(heads=heads, metrics=metrics, intervals=intervals, warnings=warnings, tables=out)


# ---------------------------------------------------------------- the masking experiment


def ranked_by_retrieval(model: LoadedModel, cfg: RetrievalConfig | Mapping[str, Any]) -> tuple[list[Head], Summary]:
    """Rank heads best first with the retrieval detector, run in process with ``cfg`` (a config,
    or raw values; defaults fill the rest). Raises when no sample was answered correctly."""
    det = RetrievalDetector()
    summary, _ = run_in_memory(model, det, det.parse_params(cfg))
    ranking = ranking_from_summary(summary)
    if not ranking:
        raise UserError(
            f"retrieval ranking ({summary.variant}) is empty: no needle sample was answered correctly; "
            "pass heads explicitly"
        )
    return ranking, summary


# ---------------------------------------------------------------- comparison and figures


def agreement(a: Mapping[tuple[int, int], float], b: Mapping[tuple[int, int], float], k: int = 10) -> dict[str, float]:
    """Spearman rank correlation over the heads both score, and the overlap of their top-k."""
    from scipy.stats import spearmanr

    common = sorted(set(a) & set(b))
    if len(common) < 2:
        raise UserError("need at least two heads scored by both runs")
    rho = float(np.asarray(spearmanr([a[h] for h in common], [b[h] for h in common])[0]))
    top_a = sorted(common, key=lambda h: -a[h])[:k]
    top_b = sorted(common, key=lambda h: -b[h])[:k]
    return {"spearman": rho, f"top{k}_overlap": len(set(top_a) & set(top_b)) / k}


def score_matrix(heads: Sequence[Mapping[str, Any]], n_layers: int, n_heads: int) -> np.ndarray:
    m = np.full((n_layers, n_heads), np.nan)
    for h in heads:
        m[int(h["layer"]), int(h["head"])] = float(h["score"])
    return m


def score_heatmap(heads: Sequence[Mapping[str, Any]], n_layers: int, n_heads: int, title: str = "") -> go.Figure:
    """Layer x head heatmap of retrieval scores (grey where no score was written)."""
    import plotly.graph_objects as go

    m = score_matrix(heads, n_layers, n_heads)
    fig = go.Figure(go.Heatmap(z=m, x=list(range(n_heads)), y=list(range(n_layers)), colorscale="Viridis",
                               zmin=0, colorbar={"title": "score"},
                               hovertemplate="L%{y}H%{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title or "Retrieval score per head", xaxis_title="head", yaxis_title="layer",
                      yaxis={"autorange": "reversed"})
    return fig


