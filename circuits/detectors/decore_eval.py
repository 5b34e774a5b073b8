"""Offline evaluation of DeCoRe (Gema et al. 2024) on small shipped sets.

Tasks (each split into validation and test; k is chosen on validation, reported on test):

- ``nqswap``: context-faithful QA where the context contradicts memory, NQ-Swap style, built
  from the knowledge-conflict dataset (``circuits/conflicts.py``: known facts, a same-type
  substitute stated in context, its QA form "<context> Q: <question> A:"). Target: the context
  answer. Metric: prefix exact match of the greedy/DeCoRe generation (normalised words of the
  generation start with the target's), decoding stops at a newline. One fixed fictional
  demonstration is prepended, so the answer comes in the demonstrated format.
- ``closedbook``: the same facts asked without the context ("Q: <question> A:"), target the
  memory answer: the cost of DeCoRe on parametric recall (the paper's NQ-Open / TriviaQA role).
  A fixed demonstration about a fact outside the dataset is prepended. The facts are known in
  the restated form ("The capital of France is the city of" -> Paris), so greedy accuracy in
  QA form is high but not 1 by construction.
- ``memotrap``: ``circuits/data/memotrap.jsonl`` (written for this workbench in the spirit of
  MemoTrap): 'Write a quote that ends in the word "<instructed>": <proverb stem>'; the two
  candidate endings " <instructed>." and " <memorised>." are scored with summed log-probs
  (``decore_score``); correct when the instructed ending scores higher.

Methods: ``greedy`` (k = 0), ``decore-vanilla`` (alpha 0.5), ``decore-entropy`` (alpha = the
base entropy), and ``control-entropy``: DeCoRe-entropy masking k random heads drawn outside the
top ``exclude_top`` retrieval heads (max of the k sweep and the heads scoring above 0.1), so a
control never masks a retrieval head (the reference's control can).

Uncertainty: each test accuracy carries its Wilson interval (0/1 outcomes), and each method
other than greedy its paired difference from greedy on the same test items (Newcombe 1998,
method 10) with McNemar's exact p (``<task>:<method>:minus_greedy``, ``...:mcnemar_p``): the
methods are compared on the same items, so the comparison is paired.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pandas as pd

from circuits.data.conflicts import build_dataset
from circuits.data.facts import answer_tokens
from circuits.detectors.retrieval import RETRIEVAL_THRESHOLD
from circuits.methods.decore import (
    VANILLA_ALPHA,
    DecoreSettings,
    Head,
    decore_generate,
    greedy_generate,
    retrieval_ranking,
)
from circuits.methods.decore_scoring import choices, decore_score
from circuits.methods.heads import all_heads, parse_heads, random_heads
from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.runs import tables
from interp.runs.config import SEED_MAX, DetectorConfig, param
from interp.runs.registry import Detector, Summary, UnitResult, register
from interp.runs.units import Unit
from interp.stats import Interval, interval, mcnemar_exact_p, paired_interval

if TYPE_CHECKING:
    import plotly.graph_objects as go

MEMOTRAP = Path(__file__).resolve().parents[1] / "data" / "memotrap.jsonl"
Task = Literal["nqswap", "memotrap", "closedbook"]
TASKS: tuple[Task, ...] = ("nqswap", "memotrap", "closedbook")
METHODS: tuple[str, ...] = ("greedy", "decore-vanilla", "decore-entropy", "control-entropy")
NQSWAP_DEMO = "The capital of Zubrowka is the city of Lutz. Q: What is the capital of Zubrowka? A: Lutz\n"
CLOSEDBOOK_DEMO = "Q: What is the largest planet of the solar system? A: Jupiter\n"
METRIC = {"nqswap": "prefix_em(context answer)", "closedbook": "prefix_em(memory answer)",
          "memotrap": "instructed ending scores higher (summed log-probs)"}


@dataclass(frozen=True)
class EvalItem:
    id: str
    task: str
    split: str
    prompt: str
    target: str
    other: str  # the competing answer: memory (nqswap), none (closedbook), memorised ending (memotrap)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- data


def load_memotrap(path: str | Path | None = None) -> list[dict[str, str]]:
    p = MEMOTRAP if path in (None, "") else Path(str(path))
    if not p.is_file():
        raise UserError(f"MemoTrap file not found: {p}")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{p.name} line {n}: not valid JSON") from None
        missing = [c for c in ("id", "stem", "memorised", "instructed") if not str(row.get(c, "")).strip()]
        if missing:
            raise UserError(f"{p.name} line {n}: missing {missing[0]!r}")
        if row["memorised"].strip().lower() == row["instructed"].strip().lower():
            raise UserError(f"{p.name} line {n}: instructed ending equals the memorised one")
        rows.append({k: str(row[k]) for k in ("id", "stem", "memorised", "instructed")})
    if not rows:
        raise UserError(f"{p} has no items")
    return rows


def memotrap_prompt(row: Mapping[str, str]) -> str:
    return f'Write a quote that ends in the word "{row["instructed"]}": {row["stem"]}'


def _split_half(ids: Sequence[str], seed: int) -> dict[str, str]:
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    n_val = len(order) // 2
    return {i: ("validation" if j < n_val else "test") for j, i in enumerate(order)}


def build_tasks(
    model: LoadedModel, seed: int = 0, max_items: int = 0, tasks: Sequence[str] = TASKS
) -> dict[str, list[EvalItem]]:
    """The items of the given tasks, each tagged with its split. ``max_items`` > 0 keeps at
    most that many per split and task (the first, in a seeded order)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r} (known: {', '.join(TASKS)})")
    out: dict[str, list[EvalItem]] = {t: [] for t in TASKS}
    # The conflict items (a known-facts pass over the dataset) are built only for the tasks
    # that use them; callers that build the tasks several times cache the result themselves.
    conflicts = build_dataset(model, seed=seed) if "nqswap" in tasks or "closedbook" in tasks else None
    for split in ("validation", "test"):
        for it in conflicts.split(split) if conflicts is not None else ():
            out["nqswap"].append(EvalItem(f"{it.id}", "nqswap", split, NQSWAP_DEMO + it.conflict_prompt("qa"),
                                          it.context_answer, it.memory_answer))
            out["closedbook"].append(EvalItem(f"{it.id}", "closedbook", split,
                                              CLOSEDBOOK_DEMO + it.plain_prompt("qa"), it.memory_answer, ""))
    rows = load_memotrap() if "memotrap" in tasks else []
    split_of = _split_half([r["id"] for r in rows], seed)
    for r in rows:
        out["memotrap"].append(EvalItem(r["id"], "memotrap", split_of[r["id"]], memotrap_prompt(r),
                                        f" {r['instructed']}.", f" {r['memorised']}."))
    if max_items > 0:
        for task, items in out.items():
            kept = []
            for split in ("validation", "test"):
                sel = [i for i in items if i.split == split]
                random.Random(seed).shuffle(sel)
                kept.extend(sorted(sel[:max_items], key=lambda i: i.id))
            out[task] = kept
    return {t: out[t] for t in tasks}


def data_hash(tasks: Mapping[str, Sequence[EvalItem]]) -> str:
    text = json.dumps({t: [i.to_dict() for i in items] for t, items in sorted(tasks.items())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- scoring


def _words(text: str) -> list[str]:
    text = text.lower().split("\n")[0]
    ws = re.findall(r"[a-z0-9]+", text)
    return [w for w in ws if w not in ("a", "an", "the")]


def prefix_em(generated: str, target: str) -> bool:
    """The generation's first line, normalised (lower case, alphanumeric words, no articles),
    starts with the target's normalised words."""
    t = _words(target)
    return bool(t) and _words(generated)[: len(t)] == t


def max_answer_tokens(model: LoadedModel, items: Sequence[EvalItem]) -> int:
    return max(len(answer_tokens(model, i.target)) for i in items)


def method_settings(method: str, masking: str = "uniform") -> DecoreSettings | None:
    """The decoder of a method; None for greedy."""
    alpha = {"greedy": None, "decore-vanilla": VANILLA_ALPHA, "decore-entropy": "entropy",
             "control-entropy": "entropy"}.get(method, "?")
    if alpha == "?":
        raise UserError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    return None if alpha is None else DecoreSettings(alpha=alpha, method=masking)  # type: ignore[arg-type]


def run_method(
    model: LoadedModel,
    task: str,
    items: Sequence[EvalItem],
    heads: Sequence[Head],
    settings: DecoreSettings | None,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Per item: split, correct, output (and, on nqswap, whether it gave the memory answer).
    ``settings`` None = greedy (heads ignored)."""
    if not items:
        return []
    if task == "memotrap":
        s = settings or DecoreSettings()
        scored = decore_score(model, [i.prompt for i in items], [[i.target, i.other] for i in items], heads,
                              s.alpha, method=s.method, normalize_entropy=s.normalize_entropy,
                              alpha_cap=s.alpha_cap, batch_size=batch_size)
        pick = choices(scored, "base" if settings is None else "decore")
        return [{"item": i.id, "split": i.split, "correct": p == 0, "output": [i.target, i.other][p]}
                for i, p in zip(items, pick, strict=True)]
    n_new = max_answer_tokens(model, items) + 2
    prompts = [i.prompt for i in items]
    if settings is None:
        gens = greedy_generate(model, prompts, max_new_tokens=n_new, stop_at_newline=True, batch_size=batch_size)
    else:
        gens = decore_generate(model, model.tokenizer, prompts, heads, settings.alpha, max_new_tokens=n_new, method=settings.method,
                               normalize_entropy=settings.normalize_entropy, alpha_cap=settings.alpha_cap,
                               prefill=settings.prefill, stop_at_newline=True, batch_size=batch_size)
    rows = []
    for i, g in zip(items, gens, strict=True):
        row = {"item": i.id, "split": i.split, "correct": prefix_em(g.text, i.target), "output": g.text}
        if task == "nqswap":
            row["memory"] = prefix_em(g.text, i.other)
        rows.append(row)
    return rows


def method_heads(
    method: str, k: int, ranking: Sequence[Head], exclude_top: int, model: LoadedModel, seed: int, draw: int = 0
) -> list[Head]:
    if method == "greedy":
        return []
    if method == "control-entropy":
        # Never a head of the DeCoRe sets: the draw avoids the top max(k, exclude_top) of the ranking.
        return random_heads(all_heads(model), ranking[: max(k, exclude_top)], k, random.Random(seed * 1000 + k * 10 + draw))
    return list(ranking[:k])


def default_exclude_top(ks: Sequence[int], scores: Sequence[float] | None) -> int:
    above = sum(s > RETRIEVAL_THRESHOLD for s in scores) if scores else 0
    return max([*ks, above])


# ---------------------------------------------------------------- tables


def accuracy_table(per_item: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per task, split, method and k: mean of ``correct`` over n items (and, on
    nqswap, the rate of memory answers)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in per_item.to_dict("records"):
        groups.setdefault((r["task"], r["split"], r["method"], int(r["k"])), []).append(r)
    rows = []
    for (task, split, method, k), rs in sorted(groups.items()):
        row = {"task": task, "split": split, "method": method, "k": k,
               "accuracy": float(np.mean([bool(r["correct"]) for r in rs])), "n": len(rs)}
        mem = [r.get("memory") for r in rs]
        if all(isinstance(m, bool | np.bool_) for m in mem):
            row["memory_rate"] = float(np.mean([bool(m) for m in mem]))
        rows.append(row)
    return pd.DataFrame(rows)


def results_table(acc: pd.DataFrame) -> pd.DataFrame:
    """Methods x tasks on the test split, k chosen per task and method on validation (the
    smallest k among ties); the control uses DeCoRe-entropy's chosen k."""
    by: dict[tuple[str, str, str, int], dict[str, Any]] = {
        (r["task"], r["method"], r["split"], int(r["k"])): r for r in acc.to_dict("records")
    }
    rows = []
    for task in [t for t in TASKS if any(key[0] == t for key in by)]:
        chosen: dict[str, int] = {}
        for method in METHODS:
            val = {key[3]: r["accuracy"] for key, r in by.items() if key[:3] == (task, method, "validation")}
            if not val:
                continue
            if method == "control-entropy" and "decore-entropy" in chosen:
                k = chosen["decore-entropy"]
            else:
                best = max(val.values())
                k = min(kk for kk, v in val.items() if v == best)
            chosen[method] = k
            test = by.get((task, method, "test", k))
            v = by[(task, method, "validation", k)]
            rows.append({
                "task": task, "method": method, "k": k,
                "test_accuracy": float(test["accuracy"]) if test else float("nan"),
                "n_test": int(test["n"]) if test else 0,
                "validation_accuracy": float(v["accuracy"]), "n_validation": int(v["n"]),
            })
    return pd.DataFrame(rows)


def sweep_figure(acc: pd.DataFrame, split: str = "validation") -> go.Figure:
    """Accuracy against k per task (one panel each), a line per method; greedy as a flat line."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    tasks = [t for t in TASKS if t in set(acc["task"])]
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks, shared_yaxes=True)
    colors = {"greedy": "black", "decore-vanilla": "#1f77b4", "decore-entropy": "#d62728", "control-entropy": "#7f7f7f"}
    for c, task in enumerate(tasks, 1):
        recs = [r for r in acc.to_dict("records") if r["task"] == task and r["split"] == split]
        ks = sorted({int(r["k"]) for r in recs if r["method"] != "greedy"}) or [0]
        for method in METHODS:
            m = sorted((int(r["k"]), float(r["accuracy"])) for r in recs if r["method"] == method)
            if not m:
                continue
            x, y = (ks, [m[0][1]] * len(ks)) if method == "greedy" else ([p[0] for p in m], [p[1] for p in m])
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=method, legendgroup=method,
                                     showlegend=c == 1, line={"color": colors[method],
                                                             "dash": "dot" if method == "greedy" else "solid"}),
                          row=1, col=c)
        fig.update_xaxes(title_text="k (heads masked)", row=1, col=c)
    fig.update_yaxes(title_text=f"accuracy ({split})", row=1, col=1, range=[0, 1.02])
    fig.update_layout(title=f"DeCoRe: accuracy against k ({split} items)")
    return fig


# ---------------------------------------------------------------- whole evaluation (API)


def evaluate(
    model: LoadedModel,
    ranking: Sequence[Head],
    ks: Sequence[int],
    tasks: Sequence[str] = TASKS,
    *,
    seed: int = 0,
    max_items: int = 0,
    exclude_top: int | None = None,
    methods: Sequence[str] = METHODS,
    masking: str = "uniform",
    batch_size: int = 16,
) -> pd.DataFrame:
    """Per-item results for every task, method and k (greedy once, as k = 0)."""
    data = build_tasks(model, seed, max_items, tasks)
    excl = max(ks) if exclude_top is None else exclude_top
    rows = []
    for task in tasks:
        if task not in TASKS:
            raise UserError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
        for method in methods:
            for k in ([0] if method == "greedy" else ks):
                heads = method_heads(method, k, ranking, excl, model, seed)
                settings = method_settings(method, masking)
                for r in run_method(model, task, data[task], heads, settings, batch_size):
                    rows.append({"task": task, "method": method, "k": k, **r,
                                 "heads": json.dumps([list(h) for h in heads])})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- detector


@dataclass(frozen=True)
class DecoreEvalConfig(DetectorConfig):
    """Parameters of the DeCoRe evaluation (each field's help says what it is)."""

    heads: tuple[str, ...] = param(
        (), "retrieval ranking LAYER.HEAD,... best first (empty: compute it with 'retrieval')"
    )
    ranking_mode: Literal["fast", "faithful"] = param("fast", "retrieval score used to rank heads when 'heads' is empty")
    ks: tuple[int, ...] = param((1, 3, 10, 30), "k values to sweep (heads masked)", low=1)
    tasks: tuple[Task, ...] = param(TASKS, "tasks: nqswap, memotrap, closedbook")
    max_items: int = param(0, "at most this many items per task and split (0 = all)", low=0)
    exclude_top: int = param(-1, "control heads are drawn outside this top of the ranking "
                             "(-1: max of ks and the heads scoring above 0.1)", low=-1)
    method: Literal["uniform", "zero"] = param(
        "uniform", "masking: uniform (zero the query, the reference) or zero (head output)"
    )
    seed: int = param(0, "seed of the conflict substitutes, the splits and the control draws", low=0, high=SEED_MAX)
    batch_size: int = param(16, "prompts per batch", low=1)

    @property
    def k_values(self) -> list[int]:
        """The swept k, each once, in increasing order (the unit order), whatever order --ks
        lists them in."""
        return sorted(set(self.ks))

    def ranked_heads(self, model: LoadedModel | None = None) -> list[Head]:
        """The given ranking as (layer, head) pairs, checked against ``model`` when given."""
        return parse_heads(",".join(self.heads), model)

    def check(self) -> None:
        super().check()
        if not self.ks:
            raise UserError("ks must list at least one k (integers >= 1)")
        if not self.tasks:
            raise UserError(f"tasks must list at least one task (known: {', '.join(TASKS)})")
        if self.heads:
            ranked = self.ranked_heads()
            if len(ranked) < max(self.ks):
                raise UserError(f"'heads' lists {len(ranked)} heads, fewer than the largest k={max(self.ks)}")


@dataclass(frozen=True)
class EvalCase:
    """One evaluated condition: a task, a decoding method and its number of masked heads."""

    task: str
    method: str
    k: int

    @property
    def key(self) -> str:
        """Its unit's name in the store."""
        return f"{self.task}/{self.method}/k{self.k}"


def eval_cases(cfg: DecoreEvalConfig) -> list[EvalCase]:
    """The conditions of a run in unit order: per task, greedy once, then each method per k."""
    cases: list[EvalCase] = []
    for task in cfg.tasks:
        cases.append(EvalCase(task, "greedy", 0))
        cases += [EvalCase(task, m, k) for m in METHODS[1:] for k in cfg.k_values]
    return cases


@register
class DecoreEvalDetector(Detector[DecoreEvalConfig]):
    name = "decore-eval"
    description = "DeCoRe vs greedy vs random-head control on NQ-Swap-style, MemoTrap-style and closed-book items"
    output = "metrics"
    knowledge_conflict = True
    # Curves "<task>:<split>:<method>": accuracy against k.
    curve_axes: ClassVar[dict[str, tuple[str, str]]] = {"*:*:*": ("k (retrieval heads masked)", "accuracy (fraction of items)")}
    Config = DecoreEvalConfig

    def variant(self, cfg: DecoreEvalConfig) -> str:
        return f"{cfg.method}-mask.masked-prefill"

    def method_text(self, cfg: DecoreEvalConfig) -> str:
        how = "the head's query zeroed" if cfg.method == "uniform" else "the head's output zeroed"
        return (
            f"DeCoRe (Gema et al. 2024) masking the top-k retrieval heads ({how}), the masked model "
            "prefilling its own prompt cache; greedy, DeCoRe-vanilla, DeCoRe-entropy and a random-head "
            "control, k chosen on the validation split and reported on the test split"
        )

    def dataset_hash(self, model: LoadedModel, cfg: DecoreEvalConfig) -> str | None:
        return data_hash(self._items(model, cfg))

    def _items(self, model: LoadedModel, cfg: DecoreEvalConfig) -> dict[str, list[EvalItem]]:
        # Built once per run: the conflict tasks run the known-facts filter over the dataset.
        # A task's items do not depend on the other tasks asked for.
        return self.memo("items", model, cfg, lambda: build_tasks(model, cfg.seed, cfg.max_items, cfg.tasks))

    def units(self, model: LoadedModel, cfg: DecoreEvalConfig) -> list[Unit]:
        ks = cfg.k_values
        if max(ks) >= model.info.n_total_heads:
            raise UserError(f"k={max(ks)} is not below the model's {model.info.n_total_heads} heads")
        if cfg.heads:
            cfg.ranked_heads(model)
        if cfg.exclude_top >= 0:
            # The control draws max(ks) heads outside the top max(exclude_top, max(ks)) of the ranking
            # (with exclude_top -1 that top depends on the ranking's scores: checked when drawn).
            total = model.info.n_total_heads
            n_ranked = len(cfg.ranked_heads()) if cfg.heads else total
            pool = total - min(self._exclude_top(cfg, {}), n_ranked)
            if pool < max(ks):
                raise UserError(
                    f"only {pool} of the model's {total} heads lie outside the top {total - pool} of the "
                    f"ranking (exclude_top); cannot draw k={max(ks)} control heads"
                )
        units = [] if cfg.heads else [Unit("ranking")]
        return units + [Unit("case", i, label=c.key) for i, c in enumerate(eval_cases(cfg))]

    def ranking(self, model: LoadedModel, cfg: DecoreEvalConfig) -> tuple[list[Head], dict[str, Any]]:
        if cfg.heads:
            return cfg.ranked_heads(model), {"mode": "param", "scores": None}
        return self.memo("ranking", model, cfg, lambda: retrieval_ranking(model, cfg.ranking_mode))

    def _exclude_top(self, cfg: DecoreEvalConfig, record: Mapping[str, Any]) -> int:
        if cfg.exclude_top >= 0:
            return max(cfg.exclude_top, max(cfg.ks))
        return default_exclude_top(cfg.k_values, record.get("scores"))

    def run_unit(self, model: LoadedModel, cfg: DecoreEvalConfig, unit: Unit) -> UnitResult:
        ranked, record = self.ranking(model, cfg)
        if unit.group == "ranking":
            rec = {**{k: v for k, v in record.items() if k != "scores"}, "heads": [list(h) for h in ranked]}
            scores = record.get("scores") or [np.nan] * len(ranked)
            hs = tables.head_scores(("ranking_retrieval", la, h, s) for (la, h), s in zip(ranked, scores, strict=True))
            return UnitResult(tables={"head_scores": hs, "artifacts": tables.artifact("ranking", rec)})
        case = eval_cases(cfg)[int(unit.index or 0)]
        task, method, k = case.task, case.method, case.k
        items = self._items(model, cfg)[task]
        heads = method_heads(method, k, ranked, self._exclude_top(cfg, record), model, cfg.seed)
        heads_settings = method_settings(method, cfg.method)
        rows = run_method(model, task, items, heads, heads_settings, cfg.batch_size)
        metrics = []
        for split in ("validation", "test"):
            ok = [bool(r["correct"]) for r in rows if r["split"] == split]
            metrics.append((f"accuracy:{split}", float(np.mean(ok)) if ok else float("nan"), None, None, len(ok)))
        art = {"task": task, "method": method, "k": k, "heads": [list(h) for h in heads],
               "settings": None if heads_settings is None else heads_settings.to_dict(), "items": rows}
        return UnitResult(tables={"metrics": tables.metric_rows(metrics), "artifacts": tables.artifact("per_item", art)})

    def finalize(
        self, model: LoadedModel, cfg: DecoreEvalConfig, results: Mapping[str, pd.DataFrame]
    ) -> Summary:
        per, ranking_rec = _per_item_rows(results["artifacts"])
        acc = accuracy_table(per)
        table = results_table(acc)
        metrics: dict[str, Any] = {}
        for r in table.to_dict("records"):
            metrics[f"{r['task']}:{r['method']}:test_accuracy"] = r["test_accuracy"]
            metrics[f"{r['task']}:{r['method']}:k"] = r["k"]
            metrics[f"{r['task']}:n_test"] = r["n_test"]
            metrics[f"{r['task']}:n_validation"] = r["n_validation"]
        intervals, p_values = test_intervals(per, table)
        for name, iv in intervals.items():
            metrics.setdefault(name, iv.value)
        metrics.update(p_values)
        metrics["ranking_source"] = "param" if cfg.heads else f"retrieval ({cfg.ranking_mode})"
        warnings = []
        if ranking_rec:
            warnings += [f"ranking: {w}" for w in ranking_rec.get("warnings", [])]
        n_test: dict[str, int] = {}
        for r in table.to_dict("records"):
            n_test[r["task"]] = max(n_test.get(r["task"], 0), int(r["n_test"]))
        for task, n in sorted(n_test.items()):
            if n < 30:
                warnings.append(f"{task}: only {n} test items; differences of a few items are noise")
        return Summary(heads=None, metrics=metrics, intervals=intervals, warnings=warnings,
                       tables=_summary_tables(acc, table))


def test_intervals(per: pd.DataFrame, table: pd.DataFrame) -> tuple[dict[str, Interval], dict[str, float]]:
    """Per row of the results table: the test accuracy's Wilson interval, and for a method other
    than greedy its paired difference from greedy on the test items both answered (Newcombe) and
    McNemar's exact p, by metric name."""
    intervals: dict[str, Interval] = {}
    p_values: dict[str, float] = {}
    test = per[per["split"] == "test"] if len(per) else per
    for r in table.to_dict("records"):
        task, method, k = r["task"], r["method"], int(r["k"])
        rows = pd.DataFrame(test[(test["task"] == task) & (test["method"] == method) & (test["k"] == k)])
        if not len(rows):
            continue
        correct = rows.set_index("item")["correct"].astype(float)
        intervals[f"{task}:{method}:test_accuracy"] = interval(correct.to_numpy(), method="wilson")
        greedy = pd.DataFrame(test[(test["task"] == task) & (test["method"] == "greedy")]).set_index("item")["correct"]
        both = correct.index.intersection(greedy.index)
        if method == "greedy" or not len(both):
            continue
        a, b = correct.loc[both].to_numpy(), greedy.loc[both].astype(float).to_numpy()
        intervals[f"{task}:{method}:minus_greedy"] = paired_interval(a, b, method="newcombe")
        p_values[f"{task}:{method}:mcnemar_p"] = mcnemar_exact_p(a, b)
    return intervals, p_values


def _per_item_rows(artifacts: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any] | None]:
    """The units' per-item results as one table (task, method, k and each item's row), and the
    ranking unit's record (None when the heads were given)."""
    per_rows = []
    ranking_rec = None
    for name, js in zip(artifacts["name"], artifacts["json"], strict=True):
        obj = json.loads(js)
        if name == "per_item":
            for r in obj["items"]:
                per_rows.append({"task": obj["task"], "method": obj["method"], "k": obj["k"], **r})
        elif name == "ranking":
            ranking_rec = obj
    return pd.DataFrame(per_rows), ranking_rec


def _summary_tables(acc: pd.DataFrame, table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The final tables: accuracy per task, split, method and k as metrics and as curves
    against k, and the results table (test accuracy at the k chosen on validation)."""
    cols = (acc["task"], acc["split"], acc["method"], acc["k"], acc["accuracy"])
    return {
        "metrics": tables.metric_rows(
            (f"{t}:{s}:{m}:k{k}", a, None, None, n) for t, s, m, k, a, n in zip(*cols, acc["n"], strict=True)
        ),
        "curves": tables.curves((f"{t}:{s}:{m}", None, None, float(k), float(a)) for t, s, m, k, a in zip(*cols, strict=True)),
        "artifacts": tables.artifact("results_table", table.to_dict("records")),
    }
