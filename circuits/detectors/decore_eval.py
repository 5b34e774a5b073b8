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

The control is a distribution (circuits/detectors/decore_draws.py): per task and k, ``n_random``
seeded draws of k random heads (default 20; draw 0 is the single draw of earlier versions), every
draw decoded on the same validation and test items as rows of shared batches. The
``control-entropy`` accuracy rows (per split and k, the curves, the results table) are the mean
over the draws, an item's ``correct`` in its ``per_item`` artifact the fraction of draws that got
it right; each draw's heads, accuracy per split and per-item rows are the ``random_draws``
artifact. Per task and k, DeCoRe-entropy's test accuracy is placed among the draws' test
accuracies: its percentile (ties half) and the empirical p of Phipson & Smyth (2010) that random
heads do as well (``<task>:decore-entropy:k<k>:vs_random_percentile``, ``..._p``; without ``k<k>``
at the k chosen on validation, with the draws' accuracies as
``<task>:control-entropy:random_test_accuracies``).

Uncertainty: each test accuracy carries its interval and each method other than greedy its
paired difference from greedy on the same test items (``<task>:<method>:minus_greedy``): the
methods are compared on the same items, so the comparison is paired. 0/1 outcomes (greedy, the
DeCoRe methods, a control of one draw) get Wilson's interval, Newcombe's paired difference (1998,
method 10) and McNemar's exact p (``...:mcnemar_p``); the control's per-item fractions over
several draws get the t interval, the paired t interval and the paired t test's p
(``...:paired_t_p``).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd

from circuits.data.conflicts import build_dataset
from circuits.data.facts import answer_tokens
from circuits.detectors.decore_draws import control_draws, draw_records, mean_rows
from circuits.detectors.decore_results import (
    METHODS,
    TASKS,
    Task,
    accuracy_table,
    per_item_rows,
    results_table,
    summary_tables,
    test_intervals,
    versus_random_metrics,
)
from circuits.detectors.retrieval import RETRIEVAL_THRESHOLD
from circuits.methods.decore import (
    VANILLA_ALPHA,
    DecoreSettings,
    Head,
    decore_generate_sets,
    greedy_generate,
    retrieval_ranking,
)
from circuits.methods.decore_scoring import choices, decore_score_sets
from circuits.methods.heads import parse_heads
from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.runs import tables
from interp.runs.config import MAX_DRAWS, SEED_MAX, DetectorConfig, param
from interp.runs.registry import Detector, Summary, UnitResult, register
from interp.runs.units import Unit

MEMOTRAP = Path(__file__).resolve().parents[1] / "data" / "memotrap.jsonl"
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
    return run_head_sets(model, task, items, [heads], settings, batch_size)[0]


def run_head_sets(
    model: LoadedModel,
    task: str,
    items: Sequence[EvalItem],
    head_sets: Sequence[Sequence[Head]],
    settings: DecoreSettings | None,
    batch_size: int = 16,
) -> list[list[dict[str, Any]]]:
    """``run_method`` with each head set masked in turn, one list of rows per set, the sets
    decoded (scored) in shared batches. Greedy (``settings`` None) runs once for all sets."""
    if not items:
        return [[] for _ in head_sets]
    if task == "memotrap":
        s = settings or DecoreSettings()
        scored = decore_score_sets(model, [i.prompt for i in items], [[i.target, i.other] for i in items],
                                   head_sets, s, batch_size=batch_size)
        col = "base" if settings is None else "decore"
        return [[{"item": i.id, "split": i.split, "correct": p == 0, "output": [i.target, i.other][p]}
                 for i, p in zip(items, choices(frame, col), strict=True)] for frame in scored]
    n_new = max_answer_tokens(model, items) + 2
    prompts = [i.prompt for i in items]
    if settings is None:
        gens = [greedy_generate(model, prompts, max_new_tokens=n_new, stop_at_newline=True,
                                batch_size=batch_size)] * len(head_sets)
    else:
        gens = decore_generate_sets(model, prompts, head_sets, settings, max_new_tokens=n_new,
                                    stop_at_newline=True, batch_size=batch_size)
    out = []
    for set_gens in gens:
        rows = []
        for i, g in zip(items, set_gens, strict=True):
            row = {"item": i.id, "split": i.split, "correct": prefix_em(g.text, i.target), "output": g.text}
            if task == "nqswap":
                row["memory"] = prefix_em(g.text, i.other)
            rows.append(row)
        out.append(rows)
    return out


def method_heads(
    method: str, k: int, ranking: Sequence[Head], exclude_top: int, model: LoadedModel, seed: int, draw: int = 0
) -> list[Head]:
    """The heads a method masks at k; the control's ``draw``-th random draw (``control_draws``)."""
    if method == "greedy":
        return []
    if method == "control-entropy":
        # Never a head of the DeCoRe sets: the draw avoids the top max(k, exclude_top) of the ranking.
        return control_draws(model, ranking, k, exclude_top, seed, draw + 1)[draw]
    return list(ranking[:k])


def default_exclude_top(ks: Sequence[int], scores: Sequence[float] | None) -> int:
    above = sum(s > RETRIEVAL_THRESHOLD for s in scores) if scores else 0
    return max([*ks, above])


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
    n_random: int = 20,
) -> pd.DataFrame:
    """Per-item results for every task, method and k (greedy once, as k = 0); the control's
    ``correct`` is the fraction of its ``n_random`` draws that got the item right, its ``heads``
    one list per draw."""
    data = build_tasks(model, seed, max_items, tasks)
    excl = max(ks) if exclude_top is None else exclude_top
    rows = []
    for task in tasks:
        if task not in TASKS:
            raise UserError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
        for method in methods:
            for k in ([0] if method == "greedy" else ks):
                case = EvalCase(task, method, k)
                got, sets, _ = run_case(model, case, data[task], ranking, excl, seed, n_random, masking, batch_size)
                heads = [[list(h) for h in hs] for hs in sets]
                for r in got:
                    rows.append({"task": task, "method": method, "k": k, **r,
                                 "heads": json.dumps(heads if method == "control-entropy" else heads[0])})
    return pd.DataFrame(rows)


def run_case(
    model: LoadedModel, case: EvalCase, items: Sequence[EvalItem], ranking: Sequence[Head], exclude_top: int,
    seed: int, n_random: int, masking: str, batch_size: int
) -> tuple[list[dict[str, Any]], list[list[Head]], list[dict[str, Any]]]:
    """One condition's per-item rows, the head sets it masked (one per draw for the control) and
    the control's ``random_draws`` records (none for the other methods)."""
    settings = method_settings(case.method, masking)
    if case.method != "control-entropy":
        heads = method_heads(case.method, case.k, ranking, exclude_top, model, seed)
        return run_method(model, case.task, items, heads, settings, batch_size), [heads], []
    draws = control_draws(model, ranking, case.k, exclude_top, seed, n_random)
    per_draw = run_head_sets(model, case.task, items, draws, settings, batch_size)
    return mean_rows(per_draw), draws, draw_records(case.task, case.k, draws, per_draw)


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
    n_random: int = param(20, "draws of k random heads per k (the control)", low=1, high=MAX_DRAWS)
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
            f"control ({cfg.n_random} draws of k random heads: their mean, and DeCoRe-entropy's percentile and "
            "empirical p among them), k chosen on the validation split and reported on the test split"
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
        rows, sets, draws = run_case(model, case, self._items(model, cfg)[case.task], ranked,
                                     self._exclude_top(cfg, record), cfg.seed, cfg.n_random, cfg.method, cfg.batch_size)
        metrics = []
        for split in ("validation", "test"):
            ok = [float(r["correct"]) for r in rows if r["split"] == split]
            metrics.append((f"accuracy:{split}", float(np.mean(ok)) if ok else float("nan"), None, None, len(ok)))
        settings = method_settings(case.method, cfg.method)
        heads = {"draw_heads": [[list(h) for h in hs] for hs in sets]} if draws else {"heads": [list(h) for h in sets[0]]}
        art = {"task": case.task, "method": case.method, "k": case.k, **heads,
               "settings": None if settings is None else settings.to_dict(), "items": rows}
        arts = tables.artifact("per_item", art)
        if draws:
            arts = pd.concat([arts, tables.artifact("random_draws", draws)], ignore_index=True)
        return UnitResult(tables={"metrics": tables.metric_rows(metrics), "artifacts": arts})

    def finalize(
        self, model: LoadedModel, cfg: DecoreEvalConfig, results: Mapping[str, pd.DataFrame]
    ) -> Summary:
        per, ranking_rec, draws = per_item_rows(results["artifacts"])
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
        versus = versus_random_metrics(acc, table, draws)
        metrics.update(versus)
        metrics["n_random"] = cfg.n_random
        metrics["ranking_source"] = "param" if cfg.heads else f"retrieval ({cfg.ranking_mode})"
        warnings = _draw_warnings(cfg, draws)
        if ranking_rec:
            warnings += [f"ranking: {w}" for w in ranking_rec.get("warnings", [])]
        n_test: dict[str, int] = {}
        for r in table.to_dict("records"):
            n_test[r["task"]] = max(n_test.get(r["task"], 0), int(r["n_test"]))
        for task, n in sorted(n_test.items()):
            if n < 30:
                warnings.append(f"{task}: only {n} test items; differences of a few items are noise")
        return Summary(heads=None, metrics=metrics, intervals=intervals, warnings=warnings,
                       tables=summary_tables(acc, table, versus))


def _draw_warnings(cfg: DecoreEvalConfig, draws: Sequence[Mapping[str, Any]]) -> list[str]:
    """A control whose stored draws are not the ``n_random`` asked for (a unit stored before the
    control had draws holds none)."""
    found: dict[tuple[str, int], set[int]] = {}
    for r in draws:
        found.setdefault((str(r["task"]), int(r["k"])), set()).add(int(r["draw"]))
    return [f"{c.task}: the control at k={c.k} has {len(found.get((c.task, c.k), ()))} stored draws, not "
            f"n_random={cfg.n_random}; rerun it for DeCoRe-entropy's place among the draws"
            for c in eval_cases(cfg) if c.method == "control-entropy" and len(found.get((c.task, c.k), ())) != cfg.n_random]
