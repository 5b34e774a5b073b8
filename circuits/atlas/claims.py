"""The papers' claims checked per model from its finished runs, and the atlas summary."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from circuits.atlas.budget import CHANCE_METHOD, assess
from circuits.detectors.causal_trace import PEAK_MIN_FACTS
from circuits.methods.heads import head_label
from interp.runs.registry import Summary
from interp.stats import (
    Direction,
    Interval,
    against_random,
    mean_interval,
    overlap_vs_chance,
    verdict,
    wilson_counts,
)

SETS = (("induction", "induction"), ("retrieval", "retrieval"), ("cmr", "cmr"),
        ("memory", "conflict-heads"), ("context", "conflict-heads"))
HOLDS, FAILS, NM = "holds", "does not hold", "not measurable"
# A claim whose measured value comes with an interval that straddles the claim's threshold.
INCONCLUSIVE = "inconclusive"


# Stated with the claims, never fitted: "sparse" as Wu et al. 2024 put it (under 5 % of heads),
# "later" / "middle-to-late" as a mean relative depth past the middle of the stack, "early-to-
# middle" as a relative depth up to it.
SPARSE_SHARE = 0.05


LATE_DEPTH = 0.5


@dataclass(frozen=True)
class ModelResults:
    """What the atlas knows about one model: its shape (``n_heads``: every attention head of the
    model, all layers together) and each detector's summary or the reason it could not be measured."""

    n_layers: int
    n_heads: int
    summaries: Mapping[str, Summary] = field(default_factory=dict)
    not_measurable: Mapping[str, str] = field(default_factory=dict)


def _scored(heads: Sequence[Mapping[str, Any]] | None) -> list[Mapping[str, Any]]:
    """Heads with a numeric score (CMR leaves heads with a flat lag-CRP without one)."""
    return [h for h in heads or [] if isinstance(h.get("score"), int | float)]


def top_sets(res: ModelResults, top: int) -> dict[str, list[Mapping[str, Any]]]:
    """The top-k heads of each head set the model has, best first."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for set_name, det in SETS:
        s = res.summaries.get(det)
        if s is None or not s.heads:
            continue
        heads = _scored(s.heads)
        if set_name in ("memory", "context"):
            heads = [h for h in heads if h.get("role") == set_name]
        # Memory heads have the largest memory score, context heads the most negative one.
        heads = sorted(heads, key=lambda h: h["score"], reverse=set_name != "context")
        if heads:
            out[set_name] = heads[:top]
    return out


def jaccard(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> float | None:
    sa = {(int(h["layer"]), int(h["head"])) for h in a}
    sb = {(int(h["layer"]), int(h["head"])) for h in b}
    union = sa | sb
    return len(sa & sb) / len(union) if union else None


def _head_rows(heads: Sequence[Mapping[str, Any]], n_layers: int) -> list[dict[str, Any]]:
    return [{"label": head_label(int(h["layer"]), int(h["head"])), "layer": int(h["layer"]),
             "head": int(h["head"]), "relative_depth": int(h["layer"]) / n_layers, "score": float(h["score"])}
            for h in heads]


def _verdict(ok: bool | None, value: Any, detail: str, n: int | None = None, **extra: Any) -> dict[str, Any]:
    """A claim read from a point value (no interval: ``method`` "point"), or not measurable."""
    verdict = NM if ok is None else HOLDS if ok else FAILS
    method = None if ok is None else "point"
    return {"verdict": verdict, "value": value, "lo": None, "hi": None, "n": n, "method": method,
            "detail": detail, **extra}


def _interval_claim(iv: Interval, threshold: float, direction: Direction, detail: str,
                    **extra: Any) -> dict[str, Any]:
    """A claim that the true value lies on ``direction``'s side of ``threshold``, from its interval
    (interp.stats.verdict: holds, does not hold, or inconclusive where the interval contains the
    threshold or is undefined)."""
    fields = iv.to_dict()
    return {"verdict": verdict(iv, threshold, direction), "value": fields["value"], "lo": fields["lo"],
            "hi": fields["hi"], "n": fields["n"], "method": iv.method, "level": iv.level,
            "threshold": threshold, "detail": detail, **extra}


def _why_missing(res: ModelResults, det: str) -> str:
    if det in res.not_measurable:
        return f"{det}: {res.not_measurable[det]}"
    return f"{det} not run" if det not in res.summaries else f"{det} has no head scores"


def claim_retrieval_sparse(res: ModelResults, top: int) -> dict[str, Any]:
    s = res.summaries.get("retrieval")
    share = s.metrics.get("share_heads_above_threshold") if s is not None else None
    if s is None or share is None:
        return _verdict(None, None, _why_missing(res, "retrieval"))
    detail = f"{s.metrics.get('n_heads_above_threshold')} of {s.metrics.get('n_heads')} heads > " \
             f"{s.metrics.get('threshold')}"
    if s.metrics.get("too_few_counted"):
        detail += f" (noisy: only {s.metrics.get('n_counted')} samples counted)"
    iv = s.intervals.get("share_heads_above_threshold")
    if iv is not None:
        return _interval_claim(iv, SPARSE_SHARE, "lower", detail, n_of="samples")
    n_heads = s.metrics.get("n_heads")
    return _verdict(share < SPARSE_SHARE, share, detail, n=int(n_heads) if n_heads is not None else None)


def _later_than_middle(heads: Sequence[Mapping[str, Any]], n_layers: int, detail: str, **extra: Any) -> dict[str, Any]:
    """A claim that a set of heads sits past the middle of the stack: their mean relative depth
    with its t interval over the heads (one head: the point)."""
    depths = [int(h["layer"]) / n_layers for h in heads]
    if len(depths) < 2:
        return _verdict(depths[0] > LATE_DEPTH, depths[0], detail, n=len(depths), n_of="heads", **extra)
    return _interval_claim(mean_interval(depths), LATE_DEPTH, "higher", detail + " (t interval over the heads)",
                           n_of="heads", **extra)


def claim_memory_context_late(res: ModelResults, top: int) -> dict[str, Any]:
    sets = top_sets(res, top)
    heads = [*sets.get("memory", []), *sets.get("context", [])]
    if not heads:
        return _verdict(None, None, _why_missing(res, "conflict-heads"))
    n_mem, n_ctx = len(sets.get("memory", [])), len(sets.get("context", []))
    return _later_than_middle(heads, res.n_layers, f"mean relative depth of {n_mem} memory + {n_ctx} context heads")


def claim_cmr_mid_late(res: ModelResults, top: int) -> dict[str, Any]:
    s = res.summaries.get("cmr")
    if s is None or not s.heads:
        return _verdict(None, None, _why_missing(res, "cmr"))
    by_threshold = sum(bool(h.get("cmr_like")) for h in s.heads) / len(s.heads)
    # CMR-like = fits the CMR model better than its own null does (and under the paper's
    # distance threshold); runs stored before the null have the threshold alone.
    has_null = any("cmr_above_null" in h for h in s.heads)
    like = [h for h in s.heads if h.get("cmr_like") and (h.get("cmr_above_null") or not has_null)]
    share = len(like) / len(s.heads)
    which = "CMR-like heads (distance < 0.5 and above their null)" if has_null else "CMR-like heads (distance < 0.5)"
    detail = f"mean relative depth of {len(like)} {which}; share {share:.3f} ({by_threshold:.3f} by the threshold alone)"
    extra: dict[str, Any] = {"share": share, "share_by_threshold": by_threshold}
    if not like:
        # The claim places CMR-like heads; a model without any does not show it.
        return _verdict(False, None, f"no {which} (share by the threshold {by_threshold:.3f})", **extra)
    return _later_than_middle(like, res.n_layers, detail, **extra)


def claim_induction_exists(res: ModelResults, top: int) -> dict[str, Any]:
    s = res.summaries.get("induction")
    heads = _scored(s.heads if s is not None else None)
    if s is None or not heads or "threshold" not in s.metrics:
        return _verdict(None, None, _why_missing(res, "induction"))
    best = max(float(h["score"]) for h in heads)
    threshold = float(s.metrics["threshold"])
    n_above = sum(float(h["score"]) > threshold for h in heads)
    detail = f"max induction score; {n_above} heads > {threshold}"
    iv = s.intervals.get("top_score")
    if iv is not None:
        return _interval_claim(iv, threshold, "higher", detail + " (the top head's score over the prompts)",
                               n_of="prompts")
    return _verdict(best > threshold, best, detail)


def overlap_against_chance(a: int, b: int, shared: int, n_heads: int, alpha: float = 0.05) -> dict[str, Any]:
    """Two top sets of ``a`` and ``b`` of ``n_heads`` heads sharing ``shared``, against two sets of
    those sizes drawn at random: the shared count of random sets is hypergeometric, so the
    comparison is exact (no draws). Holds when the sets share more heads than chance would with
    p <= ``alpha``, does not hold when they share fewer with p <= ``alpha``, else inconclusive.
    The value is the Jaccard index's lead over its mean under chance; lo and hi its lead over
    chance's 97.5th and 2.5th percentiles, as for the random draws of :func:`_draws_claim`."""
    c = overlap_vs_chance(a, b, shared, n_heads)
    ok = HOLDS if c.p_more <= alpha else FAILS if c.p_fewer <= alpha else INCONCLUSIVE
    return {"verdict": ok, "value": round(c.jaccard - c.chance_mean, 9), "lo": c.jaccard - c.chance_hi,
            "hi": c.jaccard - c.chance_lo, "n": n_heads, "n_of": "heads", "method": CHANCE_METHOD, "p": c.p_more,
            "jaccard": c.jaccard, "chance_jaccard": c.chance_mean, "shared": shared}


def claim_induction_retrieval_overlap(res: ModelResults, top: int) -> dict[str, Any]:
    sets = top_sets(res, top)
    missing = [d for d in ("induction", "retrieval") if d not in sets]
    if missing:
        return _verdict(None, None, "; ".join(_why_missing(res, d) for d in missing))
    ind, ret = ({(int(h["layer"]), int(h["head"])) for h in sets[d]} for d in ("induction", "retrieval"))
    out = overlap_against_chance(len(ind), len(ret), len(ind & ret), res.n_heads)
    out["detail"] = (f"Jaccard {out['jaccard']:.2f} of the top-{top} sets ({out['shared']} shared) vs "
                     f"{out['chance_jaccard']:.2f} for random sets of as many heads; p = {out['p']:.2g}")
    return out


def _draws_claim(value: float, draws: Sequence[float], direction: Direction, detail: str,
                 alpha: float = 0.05) -> dict[str, Any]:
    """A top set against random draws of as many heads: holds when its empirical p (Phipson &
    Smyth 2010) in the claimed ``direction`` is at most ``alpha``, does not hold when the p the
    other way is, else inconclusive (too few draws can never decide: p >= 1 / (1 + draws)). The
    value is the top set's lead over the draws' mean; lo and hi its lead over the draws' 97.5th
    and 2.5th percentiles, the spread of a random set."""
    other: Direction = "lower" if direction == "higher" else "higher"
    toward, away = against_random(value, draws, direction), against_random(value, draws, other)
    sign = 1.0 if direction == "higher" else -1.0
    lead = [sign * (value - q) for q in np.quantile(draws, [0.975, 0.025] if sign > 0 else [0.025, 0.975])]
    ok = HOLDS if toward.p_value <= alpha else FAILS if away.p_value <= alpha else INCONCLUSIVE
    return {"verdict": ok, "value": round(sign * (value - float(np.mean(draws))), 9), "lo": float(lead[0]),
            "hi": float(lead[1]), "n": len(draws), "n_of": "draws", "method": "random draws", "p": toward.p_value,
            "percentile": toward.percentile, "detail": detail + f"; p = {toward.p_value:.3g} among {len(draws)} draws"}


def claim_retrieval_masking(res: ModelResults, top: int) -> dict[str, Any]:
    s = res.summaries.get("retrieval-masking")
    if s is None:
        return _verdict(None, None, _why_missing(res, "retrieval-masking"))
    m = s.metrics
    k = m.get("top_k")
    none, masked, rand = m.get("accuracy:none"), m.get(f"accuracy:top{k}"), m.get("accuracy:random-mean")
    if none is None or masked is None or rand is None:
        return _verdict(None, None, "retrieval-masking has no accuracies")
    detail = (f"needle accuracy {none:.2f} unmasked, {masked:.2f} top-{k} masked, {rand:.2f} {k} random "
              f"(mean of {m.get('n_random')} draws), {m.get('n_samples')} samples")
    if none == 0:
        return _verdict(None, None, detail + ": nothing to drop")
    draws = m.get("random_accuracies")
    if isinstance(draws, list) and draws:
        # The top set's accuracy lower than the random sets': the value is how much lower.
        return _draws_claim(float(masked), [float(d) for d in draws], "lower", detail)
    # A summary without the draws: the point comparison. Rounded: rates are fractions of few
    # items, and 0.45 - 0.45 must read 0, not -6.9e-18.
    return _verdict(masked < rand, round(rand - masked, 9), detail)


def claim_ph3_beats_random(res: ModelResults, top: int) -> dict[str, Any]:
    s = res.summaries.get("ph3")
    if s is None:
        return _verdict(None, None, _why_missing(res, "ph3"))
    m = s.metrics
    formats = m.get("formats", [])
    afters, gains = [], []
    for f in formats:
        after = m.get(f"test.prune-memory.conflict.{f}.context_rate")
        rand = m.get(f"test.prune-memory.random-control.conflict.{f}.context_rate")
        if after is not None and rand is not None:
            afters.append(after)
            gains.append(after - rand)
    if not gains:
        return _verdict(None, None, "ph3 has no test rates")
    gain = round(sum(gains) / len(gains), 9)
    detail = (f"context rate after pruning the top {m.get('prune-memory.k')} memory heads minus after as "
              f"many random heads, mean over {len(gains)} formats")
    draws = m.get("prune_memory_random_context_rates")
    if isinstance(draws, list) and draws and len(afters) == len(formats):
        return _draws_claim(sum(afters) / len(afters), [float(d) for d in draws], "higher", detail)
    return _verdict(gain > 0, gain, detail)


def claim_decore_beats_greedy(res: ModelResults, top: int) -> dict[str, Any]:
    s = res.summaries.get("decore-eval")
    if s is None:
        return _verdict(None, None, _why_missing(res, "decore-eval"))
    m = s.metrics
    greedy, decore = m.get("nqswap:greedy:test_accuracy"), m.get("nqswap:decore-entropy:test_accuracy")
    if greedy is None or decore is None:
        return _verdict(None, None, "decore-eval did not run the nqswap task")
    detail = (f"NQ-Swap-style test accuracy {decore:.2f} DeCoRe-entropy (k={m.get('nqswap:decore-entropy:k')}) "
              f"vs {greedy:.2f} greedy, {m.get('nqswap:n_test')} items")
    diff = s.intervals.get("nqswap:decore-entropy:minus_greedy")
    if diff is None:  # a summary without intervals: the point comparison
        return _verdict(decore > greedy, round(decore - greedy, 9), detail)
    detail += (f"; paired difference {diff.value:+.2f} [{diff.lo:+.2f}, {diff.hi:+.2f}] ({diff.method}, "
               f"n={diff.n}), McNemar p={m.get('nqswap:decore-entropy:mcnemar_p', float('nan')):.2g}")
    return _interval_claim(diff, 0.0, "higher", detail, n_of="items")


def claim_mlp_peak_early(res: ModelResults, top: int) -> dict[str, Any]:
    s = res.summaries.get("causal-trace")
    layer = s.metrics.get("peak_layer_mlp_last_subject") if s is not None else None
    if s is None or layer is None:
        return _verdict(None, None, _why_missing(res, "causal-trace"))
    depth = int(layer) / res.n_layers
    detail = (f"MLP restoration at the last subject token peaks at layer {int(layer)} of {res.n_layers} "
              f"(effect {float(s.metrics.get('peak_value_mlp_last_subject', float('nan'))):.3f}, "
              f"{s.metrics.get('n_facts_traced')} facts)")
    iv = s.intervals.get("peak_depth_mlp_last_subject")
    if iv is not None:
        # "Early-to-middle" includes the middle: the claim fails only above it. The interval is
        # the bootstrap over facts of the peak's depth.
        ok = (INCONCLUSIVE if not iv.defined else HOLDS if iv.hi <= LATE_DEPTH
              else FAILS if iv.lo > LATE_DEPTH else INCONCLUSIVE)
        return {**_interval_claim(iv, LATE_DEPTH, "lower", detail, n_of="facts"), "verdict": ok,
                "n_min": PEAK_MIN_FACTS}
    return _verdict(depth <= LATE_DEPTH, depth, detail)


def _k_receiver(layer: int, head: int, group_size: int) -> str:
    return f"k:{layer}.{head // group_size}"


def claim_induction_keys_from_previous_token(res: ModelResults, top: int) -> dict[str, Any]:
    """Of the top induction heads whose key was path-patched, the share whose strongest incoming
    head edge (|exact effect|) comes from a top previous-token head, against the share expected
    if that sender were drawn uniformly from the heads patched into the key."""
    ind, pp = res.summaries.get("induction"), res.summaries.get("path-patching")
    if ind is None or not ind.heads:
        return _verdict(None, None, _why_missing(res, "induction"))
    if pp is None or not pp.edges or pp.metrics.get("task") != "induction":
        return _verdict(None, None, "path-patching (induction task) not run" if pp is None else
                        "path-patching has no edges of the induction task")
    group = int(pp.metrics.get("group_size") or 1)
    heads = _scored(ind.heads)
    inductive = sorted(heads, key=lambda h: -float(h["score"]))[:top]
    previous = sorted(heads, key=lambda h: -float(h.get("previous_token", 0.0)))[:top]
    prev_names = {f"{int(h['layer'])}.{int(h['head'])}" for h in previous}
    hits, chance, found = 0, 0.0, []
    for h in inductive:
        into = [e for e in pp.edges if e["receiver"] == _k_receiver(int(h["layer"]), int(h["head"]), group)
                and e["score"] is not None and e["sender"] not in ("embed",) and not e["sender"].startswith("mlp")]
        if not into:
            continue
        best = max(into, key=lambda e: abs(float(e["score"])))
        hits += best["sender"] in prev_names
        chance += sum(e["sender"] in prev_names for e in into) / len(into)
        found.append(f"{head_label(int(h['layer']), int(h['head']))}<-{best['sender']}")
    if not found:
        return _verdict(None, None, "no top induction head's key was path-patched")
    random_share = chance / len(found)
    detail = (f"{hits} of {len(found)} top induction heads' strongest k edge from a top-{top} previous-token "
              f"head ({', '.join(found)}); random senders: {random_share:.2f}")
    # The share of found heads is a count of 0/1 outcomes; its Wilson interval against the share
    # random senders would give.
    return _interval_claim(wilson_counts(hits, len(found)), random_share, "higher", detail, random=random_share,
                           n_of="heads")


@dataclass(frozen=True)
class Claim:
    """A paper's qualitative claim: its id, its row title in the 80-column table, its text with
    the paper, how it is checked, and the detectors whose runs hold the numbers behind it."""

    id: str
    short: str
    text: str
    check: Callable[[ModelResults, int], dict[str, Any]]
    detectors: tuple[str, ...]


CLAIMS = (
    Claim("retrieval-sparse", "retrieval sparse",
          f"retrieval heads are sparse: share of heads with retrieval score > 0.1 below "
          f"{SPARSE_SHARE:.0%} (Wu et al. 2024)", claim_retrieval_sparse, ("retrieval",)),
    Claim("retrieval-masking", "retr. masking",
          "masking the top-K retrieval heads lowers needle accuracy more than masking K random heads "
          "(Wu et al. 2024, Sec. 4); value: random-masked minus top-masked accuracy", claim_retrieval_masking, ("retrieval-masking",)),
    Claim("memory-context-late", "mem/ctx late",
          f"memory/context heads sit in later layers: mean relative depth of the top memory and "
          f"context heads > {LATE_DEPTH} (Jin et al. 2024)", claim_memory_context_late, ("conflict-heads",)),
    Claim("ph3-beats-random", "PH3 vs random",
          "pruning the top memory heads raises the context rate more than pruning as many random heads "
          "(PH3, Jin et al. 2024); value: the difference in test context rate", claim_ph3_beats_random, ("ph3",)),
    Claim("decore-beats-greedy", "DeCoRe vs greedy",
          "DeCoRe-entropy answers NQ-Swap-style conflicts from the context more often than greedy decoding "
          "(Gema et al. 2024); value: accuracy difference on the test split", claim_decore_beats_greedy, ("decore-eval",)),
    Claim("mlp-peak-early", "MLP peak early",
          f"the MLP effect at the last subject token peaks in early-to-middle layers: relative depth of "
          f"the peak <= {LATE_DEPTH} (Meng et al. 2022, Sec. 2)", claim_mlp_peak_early, ("causal-trace",)),
    Claim("cmr-mid-late", "CMR-like mid-late",
          f"CMR-like heads in middle-to-late layers: mean relative depth of the CMR-like heads "
          f"(distance < 0.5 and above their null) > {LATE_DEPTH}, with their share (Ji-An et al. 2024)",
          claim_cmr_mid_late, ("cmr",)),
    Claim("induction-exists", "induction exists",
          "induction heads exist: some head above the induction threshold (Olsson et al. 2022)",
          claim_induction_exists, ("induction",)),
    Claim("induction-keys-previous-token", "ind. keys <- prev",
          "induction heads' keys are written by previous-token heads (Olsson et al. 2022, K-composition): "
          "share of the top induction heads whose strongest k edge (exact path patching) comes from a top "
          "previous-token head, more than for random senders", claim_induction_keys_from_previous_token,
          ("induction", "path-patching")),
    Claim("induction-retrieval-overlap", "ind/retr overlap",
          "induction top set overlaps retrieval top set more than two random sets of as many heads "
          "would (Wu et al. 2024 report retrieval heads distinct from induction heads); value: the "
          "Jaccard index minus its mean under chance", claim_induction_retrieval_overlap, ("induction", "retrieval")),
)


def _overlaps(res: ModelResults, top: int) -> list[dict[str, Any]]:
    sets = top_sets(res, top)
    names = [n for n, _ in SETS if n in sets and n != "context"] + (["context"] if "context" in sets else [])
    return [{"a": a, "b": b, "jaccard": jaccard(sets[a], sets[b])}
            for i, a in enumerate(names) for b in names[i + 1:]]


def summarize(models: Mapping[str, ModelResults], detectors: Sequence[str], top: int) -> dict[str, Any]:
    """The atlas as one JSON-able dict: per detector and model the top-k heads (label, relative
    depth, score) or why it is not measurable; per model the Jaccard overlaps of the top-k head
    sets; per claim and model a verdict with the number behind it."""
    by_detector: dict[str, dict[str, Any]] = {}
    for det in detectors:
        by_detector[det] = {}
        for name, res in models.items():
            s = res.summaries.get(det)
            if s is None:
                by_detector[det][name] = {"not_measurable": res.not_measurable.get(det, "not run")}
                continue
            heads = _head_rows(_scored(s.heads)[:top], res.n_layers) if s.heads else []
            scalars = {k: v for k, v in s.metrics.items() if isinstance(v, int | float | str | bool)}
            by_detector[det][name] = {"heads": heads, "metrics": scalars, "warnings": list(s.warnings)}
            if s.intervals:
                by_detector[det][name]["intervals"] = {k: iv.to_dict() for k, iv in s.intervals.items()}
    return {
        "top": top,
        "models": {name: {"n_layers": r.n_layers, "n_heads": r.n_heads} for name, r in models.items()},
        "detectors": by_detector,
        "overlap": {name: _overlaps(res, top) for name, res in models.items()},
        "claims": [{"id": c.id, "short": c.short, "claim": c.text, "detectors": list(c.detectors),
                    "models": {name: assess(c.check(res, top)) for name, res in models.items()}} for c in CLAIMS],
    }


# The head sets whose overlap is measured, in this order: (set name, detector it comes from).
