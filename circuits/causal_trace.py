"""Factual-recall sites: causal tracing (Meng et al. 2022, ROME) and attention knockout (Geva et al. 2023).

Causal tracing (Meng et al. 2022), faithful to ROME's reference code:

- The batch is 1 clean row + N corrupted rows (N = ``samples``, 10). Corruption adds Gaussian
  noise to the subject tokens' embeddings only (site ``embed``), std = ``noise_factor`` (3) x the
  std of the embeddings of the dataset's subjects (each subject tokenised alone, all values
  pooled, as ROME's ``collect_embedding_std``), or an absolute ``noise`` when given. The noise is
  ``AddNoise``'s seeded draw, so every restoration sees the same N noise samples.
- A cell (token t, layer L) restores from the clean run, in all N corrupted rows: the residual
  state after block L (``resid_post.L``, ROME's hidden state), or the MLP outputs (``mlp_out``)
  or attention outputs (``attn_out``) of the layer window [L - w//2, L + w - w//2) (w = 10) at
  token t. Score = mean p(answer) over the corrupted rows at the last position.
  Indirect effect = restored - corrupted; total effect = clean - corrupted.
- Cells run through the patching engine (``interp.engine.run_sweep``): the noise is the sweep's
  base intervention, each cell gets its own N rows, cells are stacked in the batch dimension and
  chunked by a memory budget. A restoration at (t, L) can change nothing below its lowest
  restored layer or before position t, so the engine starts it there, from the corrupted run's
  residual and KV cache (``reuse``; checked against full passes in the tests). Cells at tokens
  before the first subject token are not run: with causal attention their clean and corrupted
  activations are identical, so restoring them gives the corrupted score exactly, which is what
  is stored for them.
- Multi-token answers are traced on the probability of their FIRST token (as ROME).

Averages over known facts use ROME's buckets: first / middle / last subject token, first
subsequent token, further tokens, last token (tokens before the subject belong to no bucket; a
one-token subject counts as both first and last subject token).

Attention knockout (Geva et al. 2023): from the last position, the attention edges to a set of
source positions (``subject``; ``non_subject`` = every other position except the last, the prompt prefix
included; ``last`` = itself) are blocked (score -inf before the softmax) in all heads of a window
of layers centred at L, same window convention as above (default 9). Metric = relative change
of p(answer first token) = (p_knocked - p_clean) / p_clean; averaged over facts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import numpy as np
import pandas as pd
import torch

from circuits.facts import Fact, answer_tokens, file_hash, known_facts, load_facts, subject_span
from interp import tables
from interp.config import SEED_MAX, DetectorConfig, param
from interp.engine import Prob, Sweep, activation_bytes, bytes_per_row, run_sweep, units_within
from interp.engine import window_layers as engine_window_layers
from interp.errors import UserError
from interp.interventions import AddNoise, Intervention, Knockout
from interp.model import LoadedModel
from interp.registry import Detector, Summary, UnitResult, register
from interp.runner import run_in_memory

if TYPE_CHECKING:
    import plotly.graph_objects as go

Kind = Literal["state", "mlp", "attn"]
KINDS: tuple[Kind, ...] = ("state", "mlp", "attn")
SITE_OF = {"state": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}
BUCKETS = ("first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last")
KNOCKOUT_SETS = ("subject", "non_subject", "last")
KNOWN_METRICS = ("n_facts_in_file", "n_facts_checked", "n_known", "fraction_known")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class TraceInput:
    """One fact, tokenised: prompt prefix + prompt, the subject's token range [start, end), the target."""

    prompt: str
    subject: str
    answer: str
    tokens: torch.Tensor  # [1, T]
    subject_range: tuple[int, int]
    target: int
    n_answer_tokens: int
    token_strs: tuple[str, ...]

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[1])


def prepare(model: LoadedModel, prompt: str, subject: str, answer: str) -> TraceInput:
    """Tokenise a fact; clear UserErrors for a missing subject, an empty answer, an over-long prompt."""
    if not prompt:
        raise UserError("prompt is empty")
    ids, start, end = subject_span(model, prompt, subject)
    ans = answer_tokens(model, answer)
    tokens = torch.tensor([ids], dtype=torch.long, device=model.device)
    strs = tuple(str(model.tokenizer.decode([i])) for i in ids)
    return TraceInput(prompt, subject, answer, tokens, (start, end), int(ans[0]), len(ans), strs)


def prepare_fact(model: LoadedModel, fact: Fact) -> TraceInput:
    return prepare(model, fact.prompt, fact.subject, fact.answer)


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """ROME's window of layers around ``layer`` (Meng et al. 2022), as the engine's
    :func:`interp.engine.window_layers` defines it."""
    return list(engine_window_layers(layer, window, n_layers))


def subject_embedding_std(model: LoadedModel, subjects: Iterable[str], batch_size: int = 64) -> float:
    """Std of the embeddings (site ``embed``) of all subject tokens, each subject tokenised alone
    without the prompt prefix, values pooled (ROME's ``collect_embedding_std``)."""
    rows = [list(model.tokenizer(s, add_special_tokens=False)["input_ids"]) for s in dict.fromkeys(subjects)]
    rows = [r for r in rows if r]
    if not rows:
        raise UserError("no subjects to measure the embedding std on")
    values = []
    for b0 in range(0, len(rows), batch_size):
        chunk = rows[b0 : b0 + batch_size]
        width = max(len(r) for r in chunk)
        # Padding cannot change the embeddings of real tokens (the embedding is per token).
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, : len(r)] = torch.tensor(r)
        with torch.no_grad():
            emb = model.run(ids, cache=["embed"]).cache["embed"]
        values.extend(emb[i, : len(r)].float().cpu() for i, r in enumerate(chunk))
    return float(torch.cat(values).std())


def _answer_probs(logits: torch.Tensor, target: int) -> torch.Tensor:
    return torch.softmax(logits[:, -1].float(), dim=-1)[:, target]


def rows_per_pass(model: LoadedModel, n_tokens: int, memory_mb: float) -> int:
    """How many batch rows one forward pass may hold: a rough per-row estimate dominated by the
    full-sequence logits (T x vocab) plus a few residual-sized buffers per layer, counted in
    float32 bytes."""
    per_row = activation_bytes(model, n_tokens, item=4, resid=16, logits=1, logit_positions=n_tokens)
    return units_within(memory_mb * 2**20, per_row)


# --------------------------------------------------------------------------- causal tracing


@dataclass(frozen=True)
class Cell:
    kind: str  # state | mlp | attn
    token: int
    layer: int


def _noise(inp: TraceInput, std: float, seed: int, rows: tuple[int, ...] | None) -> AddNoise:
    s, e = inp.subject_range
    return AddNoise("embed", positions=tuple(range(s, e)), std=std, seed=seed, batch=rows)


def clean_and_corrupted(
    model: LoadedModel, inp: TraceInput, *, noise_std: float, samples: int, seed: int, kinds: Sequence[str]
) -> tuple[float, float, dict[str, torch.Tensor]]:
    """ROME's base batch: row 0 clean, rows 1..N corrupted. Returns p_clean, p_corrupted (mean
    over the corrupted rows) and the clean row's activations at the sites the cells restore."""
    ids = inp.tokens.expand(samples + 1, -1)
    noise = _noise(inp, noise_std, seed, tuple(range(1, samples + 1)))
    with torch.no_grad():
        out = model.run(ids, interventions=[noise], cache=[f"{SITE_OF[k]}.*" for k in kinds])
    p = _answer_probs(out.logits, inp.target)
    clean = {name: act[:1] for name, act in out.cache.items()}
    return float(p[0]), float(p[1:].mean()), clean


def restored_scores(
    model: LoadedModel,
    inp: TraceInput,
    cells: Sequence[Cell],
    clean: Mapping[str, torch.Tensor],
    *,
    noise_std: float,
    samples: int,
    seed: int,
    window: int,
    memory_mb: float = 512.0,
    reuse: bool = True,
) -> np.ndarray:
    """Mean p(answer) over N corrupted rows with each cell restored, through the patching
    engine: one sweep per kind, cells stacked N rows each in the batch dimension, as many per
    forward pass as ``memory_mb`` allows. With ``reuse`` a restoration at (t, L) computes only
    layers from its lowest restored layer and positions from t, on the corrupted run's
    residual and KV cache (nothing below or before it can differ from the corrupted run);
    without it, every cell is a full forward pass of its N rows."""
    n_tok = inp.n_tokens
    ids = inp.tokens.expand(samples, -1)
    noise = _noise(inp, noise_std, seed, rows=None)
    metric = Prob([inp.target] * samples)
    per_cell = samples * bytes_per_row(model, n_tok, 1, kv=reuse)
    max_cells = max(1, int(memory_mb * 2**20) // per_cell)
    out = np.empty(len(cells), dtype=np.float64)
    for kind in dict.fromkeys(c.kind for c in cells):
        which = [i for i, c in enumerate(cells) if c.kind == kind]
        if kind == "state":
            sweep = Sweep("positions", "patch", site=SITE_OF[kind])
        else:
            sweep = Sweep("windows", "patch", site=SITE_OF[kind], window=window)
        # The sweep's cases run layer-major over all positions.
        select = [cells[i].layer * n_tok + cells[i].token for i in which]
        res = run_sweep(
            model, sweep, metric, ids, dict(clean), base_interventions=[noise], select=select,
            max_cases=max_cells, prefix_reuse=reuse, sequence_reuse=reuse,
        )
        out[which] = res.values.mean(dim=1).numpy()
    return out


@dataclass
class TraceResult:
    """One fact's trace: restored p(answer) per (kind, token, layer), and the base scores."""

    input: TraceInput
    p_clean: float
    p_corrupted: float
    scores: dict[str, np.ndarray]  # kind -> [T, n_layers] restored p(answer)
    noise_std: float
    samples: int
    window: int
    seed: int
    variant: str = "faithful"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_effect(self) -> float:
        return self.p_clean - self.p_corrupted

    def indirect(self, kind: str) -> np.ndarray:
        return self.scores[kind] - self.p_corrupted

    def to_frame(self, item: str = "") -> pd.DataFrame:
        return tables.token_layer(
            (kind, item, t, self.input.token_strs[t], layer, float(grid[t, layer]))
            for kind, grid in self.scores.items()
            for t in range(grid.shape[0])
            for layer in range(grid.shape[1])
        )


def trace_fact(
    model: LoadedModel,
    inp: TraceInput,
    *,
    noise_std: float,
    samples: int = 10,
    window: int = 10,
    seed: int = 1,
    kinds: Sequence[str] = KINDS,
    memory_mb: float = 512.0,
) -> TraceResult:
    """Causal trace of one fact: every (token, layer) cell of each kind, batched."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise UserError(f"unknown trace kind {bad[0] if bad else ''!r} (known: {', '.join(KINDS)})")
    if samples < 1 or window < 1 or noise_std <= 0:
        raise UserError("samples and window must be >= 1 and the noise std > 0")
    part = trace_part(model, inp, noise_std=noise_std, samples=samples, window=window, seed=seed, kinds=kinds,
                      memory_mb=memory_mb)
    return joined_trace(model, inp, [part], noise_std=noise_std, samples=samples, window=window, seed=seed,
                        kinds=kinds)


def trace_cells(model: LoadedModel, inp: TraceInput, kinds: Sequence[str]) -> list[Cell]:
    """The cells of one fact's trace: each kind, each token from the subject's first, each layer."""
    start, n_tok = inp.subject_range[0], inp.n_tokens
    return [Cell(k, t, layer) for k in kinds for t in range(start, n_tok) for layer in range(model.info.n_layers)]


def trace_part(
    model: LoadedModel,
    inp: TraceInput,
    *,
    noise_std: float,
    samples: int,
    window: int,
    seed: int,
    kinds: Sequence[str],
    memory_mb: float = 512.0,
    part: int = 0,
    n_parts: int = 1,
) -> dict[str, Any]:
    """Part ``part`` of ``n_parts`` of a trace: the base run (each part recomputes it: one forward
    pass) and the restored scores of its contiguous share of :func:`trace_cells`."""
    p_clean, p_corr, clean = clean_and_corrupted(model, inp, noise_std=noise_std, samples=samples, seed=seed,
                                                 kinds=kinds)
    cells = trace_cells(model, inp, kinds)
    index = np.array_split(np.arange(len(cells)), n_parts)[part]
    values = restored_scores(model, inp, [cells[i] for i in index], clean, noise_std=noise_std, samples=samples,
                             seed=seed, window=window, memory_mb=memory_mb)
    return {"p_clean": p_clean, "p_corrupted": p_corr, "index": index.tolist(), "values": values.tolist()}


def joined_trace(
    model: LoadedModel,
    inp: TraceInput,
    parts: Sequence[Mapping[str, Any]],
    *,
    noise_std: float,
    samples: int,
    window: int,
    seed: int,
    kinds: Sequence[str],
) -> TraceResult:
    """The trace of :func:`trace_part`'s parts (every cell once); the base scores of the first."""
    cells = trace_cells(model, inp, kinds)
    p_clean, p_corr = parts[0]["p_clean"], parts[0]["p_corrupted"]
    scores = {k: np.full((inp.n_tokens, model.info.n_layers), p_corr) for k in kinds}
    seen = [i for p in parts for i in p["index"]]
    if sorted(seen) != list(range(len(cells))):
        raise ValueError(f"the parts of a trace cover {len(set(seen))} of its {len(cells)} cells, some twice or none")
    for p in parts:
        for i, v in zip(p["index"], p["values"], strict=True):
            scores[cells[i].kind][cells[i].token, cells[i].layer] = v
    return TraceResult(inp, p_clean, p_corr, scores, noise_std, samples, window, seed)


# --------------------------------------------------------------------------- buckets


def token_buckets(t: int, subject_range: tuple[int, int], n_tokens: int) -> list[str]:
    s, e = subject_range
    out = []
    if s <= t < e:
        if t == s:
            out.append("first_subject")
        if t == e - 1:
            out.append("last_subject")
        if s < t < e - 1:
            out.append("middle_subject")
    if t == n_tokens - 1:
        out.append("last")
    elif t == e:
        out.append("first_subsequent")
    elif t > e:
        out.append("further")
    return out


def bucket_means(effects: np.ndarray, subject_range: tuple[int, int]) -> dict[str, np.ndarray]:
    """One fact's [T, L] effects averaged over the tokens of each ROME bucket present."""
    n_tok = effects.shape[0]
    members: dict[str, list[int]] = {b: [] for b in BUCKETS}
    for t in range(n_tok):
        for b in token_buckets(t, subject_range, n_tok):
            members[b].append(t)
    return {b: effects[ts].mean(axis=0) for b, ts in members.items() if ts}


def average_buckets(per_fact: Sequence[tuple[np.ndarray, tuple[int, int]]]) -> pd.DataFrame:
    """Bucket averages over facts (each fact weighs once per bucket it has): bucket, layer, value, n."""
    acc: dict[str, list[np.ndarray]] = {b: [] for b in BUCKETS}
    for effects, rng in per_fact:
        for b, v in bucket_means(effects, rng).items():
            acc[b].append(v)
    rows = []
    for b in BUCKETS:
        if acc[b]:
            mean = np.mean(np.stack(acc[b]), axis=0)
            rows.extend((b, layer, float(mean[layer]), len(acc[b])) for layer in range(mean.shape[0]))
    return pd.DataFrame(rows, columns=["bucket", "layer", "value", "n"])


# --------------------------------------------------------------------------- knockout


def knockout_keys(inp: TraceInput, which: str) -> tuple[int, ...]:
    s, e = inp.subject_range
    last = inp.n_tokens - 1
    if which == "subject":
        return tuple(range(s, e))
    if which == "non_subject":
        return tuple(i for i in range(inp.n_tokens) if not s <= i < e and i != last)
    if which == "last":
        return (last,)
    raise UserError(f"unknown knockout set {which!r} (known: {', '.join(KNOCKOUT_SETS)})")


def knockout_effects(
    model: LoadedModel, inp: TraceInput, *, window: int = 9, memory_mb: float = 512.0
) -> tuple[float, dict[str, np.ndarray]]:
    """p_clean and, per source set, the relative change of p(answer) with the last position's
    attention to that set blocked in the layer window centred at each layer (NaN where the set
    is empty). One clean row + one row per (set, layer), stacked and chunked."""
    n_layers = model.info.n_layers
    last = inp.n_tokens - 1
    variants: list[tuple[str, int, tuple[int, ...]]] = []
    for which in KNOCKOUT_SETS:
        keys = knockout_keys(inp, which)
        if keys:
            variants.extend((which, layer, keys) for layer in range(n_layers))
    per_pass = rows_per_pass(model, inp.n_tokens, memory_mb)
    with torch.no_grad():
        p_clean = float(_answer_probs(model.run(inp.tokens).logits, inp.target)[0])
    if p_clean <= 0:
        raise UserError("p(answer) is 0 on the clean run: the relative change is undefined")
    curves = {w: np.full(n_layers, np.nan) for w in KNOCKOUT_SETS}
    for v0 in range(0, len(variants), per_pass):
        chunk = variants[v0 : v0 + per_pass]
        ivs: list[Intervention] = [
            Knockout(layer=lw, query_positions=(last,), key_positions=keys, batch=(j,))
            for j, (_, layer, keys) in enumerate(chunk)
            for lw in window_layers(layer, window, n_layers)
        ]
        with torch.no_grad():
            logits = model.run(inp.tokens.expand(len(chunk), -1), interventions=ivs).logits
        p = _answer_probs(logits, inp.target).double().cpu().numpy()
        for j, (which, layer, _) in enumerate(chunk):
            curves[which][layer] = (p[j] - p_clean) / p_clean
    return p_clean, curves


# --------------------------------------------------------------------------- detectors


@dataclass(frozen=True)
class FactsConfig(DetectorConfig):
    """Parameters shared by the fact detectors: the facts (a file, or one prompt given on the
    command line) and the known-facts filter."""

    prompt: str = param("", "a single prompt to trace (with --subject and --answer) instead of the dataset")
    subject: str = param("", "the subject, verbatim in the prompt")
    answer: str = param("", "the expected answer (tokenised with a leading space; first token used)")
    facts: str = param("", "fact file (JSONL or CSV: subject, prompt, answer); default: the shipped dataset")
    scan_all: bool = param(False, "check every fact of the file (else stop once 'limit' known facts are found)")
    answer_mode: Literal["first", "sum"] = param(
        "first",
        "known-facts criterion: 'first' = top-1 is the answer's first token; 'sum' = every answer "
        "token top-1 under teacher forcing (score: summed log-probs)",
    )
    limit: int = param(20, "how many known facts of the file to use (in file order)", low=1)

    @property
    def single(self) -> bool:
        """A single prompt given on the command line instead of the fact file (check() makes
        sure prompt, subject and answer come together)."""
        return bool(self.prompt)

    def check(self) -> None:
        super().check()
        given = [bool(v) for v in (self.prompt, self.subject, self.answer)]
        if any(given) and not all(given):
            raise UserError("a single-prompt run needs all of --prompt, --subject and --answer")
        if self.single:
            if self.subject not in self.prompt:
                raise UserError(f"subject {self.subject!r} not found in prompt {self.prompt!r}")
        elif self.facts:
            load_facts(self.facts)  # a missing or malformed file fails before the model loads


F = TypeVar("F", bound=FactsConfig)


def _per_unit(metrics: pd.DataFrame) -> dict[str, dict[str, float]]:
    """The units' metrics tables as {unit: {name: value}}."""
    return {str(u): dict(zip(g["name"], g["value"], strict=True)) for u, g in metrics.groupby("unit")}


class _FactsDetector(Detector[F]):
    """Shared unit plan: a 'known' unit (the filter) then one unit per known fact, or a single
    'fact' unit for a prompt given on the command line."""

    def dataset_hash(self, model: LoadedModel, cfg: F) -> str | None:
        return None if cfg.single else file_hash(cfg.facts or None)

    def _facts(self, model: LoadedModel, cfg: F) -> list[Fact]:
        return self.memo("facts", model, cfg, lambda: load_facts(cfg.facts or None))

    def _known(self, model: LoadedModel, cfg: F) -> pd.DataFrame:
        """The known-facts filter over the file in order, in chunks, stopping once ``limit``
        known facts are found (``scan_all`` filters the whole file, to count what it knows).
        Memoised: units() and the 'known' unit filter only once per run."""

        def compute() -> pd.DataFrame:
            facts = self._facts(model, cfg)
            parts: list[pd.DataFrame] = []
            n_known, step = 0, 32
            for c0 in range(0, len(facts), step):
                part = known_facts(model, facts[c0 : c0 + step], answer_mode=cfg.answer_mode)
                parts.append(part.assign(index=part["index"] + c0))
                n_known += int(np.sum(part["known"].to_numpy()))
                if n_known >= cfg.limit and not cfg.scan_all:
                    break
            return pd.concat(parts, ignore_index=True)

        return self.memo("known", model, cfg, compute)

    def units(self, model: LoadedModel, cfg: F) -> list[str]:
        if cfg.single:
            prepare(model, cfg.prompt, cfg.subject, cfg.answer)
            return ["fact"]
        known = self._known(model, cfg)
        chosen = known[known["known"]]["index"].tolist()[: cfg.limit]
        if not chosen:
            raise UserError(f"{model.name} knows none of the {len(known)} facts: nothing to trace")
        return ["known", *(f"fact-{i}" for i in chosen)]

    def example_tokens(self, model: LoadedModel, cfg: F) -> torch.Tensor:
        # The prompt given on the command line, else the file's first fact (every fact of a
        # file is a prompt of the same form; picking a known one would need the filter).
        fact = self._fact_of(model, cfg, "fact" if cfg.single else "fact-0")
        return prepare_fact(model, fact).tokens

    def _fact_of(self, model: LoadedModel, cfg: F, unit: str) -> Fact:
        if unit == "fact":
            return Fact(cfg.subject, cfg.prompt, cfg.answer, id="prompt")
        try:
            return self._facts(model, cfg)[int(unit.split("-", 1)[1])]
        except (ValueError, IndexError):
            raise UserError(f"unknown unit {unit!r}") from None

    def _known_unit(self, model: LoadedModel, cfg: F) -> UnitResult:
        known = self._known(model, cfg)
        n_known = int(np.sum(known["known"].to_numpy()))
        counts = {
            "n_facts_in_file": len(self._facts(model, cfg)),
            "n_facts_checked": len(known),
            "n_known": n_known,
            "fraction_known": n_known / len(known),
        }
        return UnitResult(
            tables={
                "metrics": tables.metrics(counts, n=len(known)),
                "artifacts": tables.artifact("known_facts", known.to_dict(orient="records")),
            }
        )

    def _single_known(self, model: LoadedModel, fact: Fact, cfg: F) -> bool:
        return bool(known_facts(model, [fact], answer_mode=cfg.answer_mode)["known"].iloc[0])


@dataclass(frozen=True)
class CausalTraceConfig(FactsConfig):
    """Parameters of causal tracing (Meng et al. 2022, ROME; each field's help says what it is)."""

    # One fact is ~T x n_layers x 3 cells x N rows (about 9000 rows of ~10 tokens on
    # smollm2-135m), minutes on 2 CPU cores: the default keeps a first look short.
    limit: int = param(2, "how many known facts of the file to trace (in file order)", low=1)
    samples: int = param(10, "N corrupted copies per restoration (ROME: 10)", low=1)
    noise_factor: float = param(3.0, "noise std = this x the std of subject embeddings (ROME: 3)",
                                low=0, low_open=True)
    noise: float = param(0.0, "absolute noise std; overrides noise_factor when > 0", low=0)
    window: int = param(10, "layer window of the MLP and attention restorations (ROME: 10)", low=1)
    kinds: tuple[Kind, ...] = param(KINDS, "what to restore: comma-separated subset of state, mlp, attn")
    seed: int = param(1, "seed of the noise draw", low=0, high=SEED_MAX)
    memory_mb: float = param(512.0, "memory budget of one forward pass (chunks the stacked restorations)",
                             low=0, low_open=True)

    def check(self) -> None:
        super().check()
        if not self.kinds:
            raise UserError(f"kinds must be a comma-separated subset of {', '.join(KINDS)}, got none")


def _fact_effects(
    per_unit: Mapping[str, Mapping[str, float]], token_layer: pd.DataFrame, kinds: Sequence[str], n_layers: int
) -> tuple[dict[str, list[tuple[np.ndarray, tuple[int, int]]]], list[str]]:
    """Each traced fact's [T, L] indirect effects per kind (restored - corrupted) with its
    subject range, and the warnings about the facts."""
    fact_units = [u for u in per_unit if u != "known"]
    warnings: list[str] = []
    effects: dict[str, list[tuple[np.ndarray, tuple[int, int]]]] = {k: [] for k in kinds}
    for u in fact_units:
        mu = per_unit[u]
        rng = (int(mu["subject_start"]), int(mu["subject_end"]))
        n_tok = int(mu["n_tokens"])
        rows = token_layer[token_layer["unit"] == u]
        for k in kinds:
            r = pd.DataFrame(rows[rows["kind"] == k])
            grid = np.full((n_tok, n_layers), np.nan)
            grid[r["token_index"].to_numpy(int), r["layer"].to_numpy(int)] = r["value"].to_numpy(float)
            effects[k].append((grid - mu["p_corrupted"], rng))
        if mu.get("known", 1.0) == 0.0:
            warnings.append("the model does not predict this answer (top-1): tracing it may be meaningless")
    n_multi = sum(per_unit[u]["n_answer_tokens"] > 1 for u in fact_units)
    if n_multi:
        warnings.append(f"{n_multi} of {len(fact_units)} answers are several tokens: traced on the first token")
    return effects, warnings


def _bucket_averages(
    effects: Mapping[str, Sequence[tuple[np.ndarray, tuple[int, int]]]], kinds: Sequence[str], summary: dict[str, Any]
) -> pd.DataFrame:
    """The summary's token_layer table: per kind (``avg_indirect_<kind>``) the average indirect
    effect of each ROME bucket per layer (item and token = the bucket, token_index = its place
    in BUCKETS); the peak layer and value of the last-subject and last buckets go to ``summary``."""
    rows: list[tuple[str, str, int, str, int, float]] = []
    for k in kinds:
        b = average_buckets(effects[k])
        rows.extend(
            (f"avg_indirect_{k}", bucket, BUCKETS.index(bucket), bucket, int(layer), float(value))
            for bucket, layer, value in zip(b["bucket"], b["layer"], b["value"], strict=True)
        )
        for bucket in ("last_subject", "last"):
            sub = pd.DataFrame(b[b["bucket"] == bucket])
            if len(sub):
                values = sub["value"].to_numpy(float)
                best = int(np.argmax(values))
                summary[f"peak_layer_{k}_{bucket}"] = int(sub["layer"].to_numpy()[best])
                summary[f"peak_value_{k}_{bucket}"] = float(values[best])
    return tables.token_layer(rows)


@register
class CausalTraceDetector(_FactsDetector[CausalTraceConfig]):
    name = "causal-trace"
    description = "ROME causal tracing: restore states, MLP and attention windows into subject-noised runs"
    output = "token_layer"
    # The default scan traces the first 2 known facts with 3 noise samples instead of ROME's 10
    # (noisier maps, about a third of the time), so the Causal tracing page has a first look.
    in_default_scan = True
    scan_params: ClassVar[dict[str, Any]] = {"limit": 2, "samples": 3}
    Config = CausalTraceConfig

    def variant(self, cfg: CausalTraceConfig) -> str:
        return "faithful"

    def method_text(self, cfg: CausalTraceConfig) -> str:
        return (
            "causal tracing as ROME's reference code (Meng et al. 2022): Gaussian noise on the subject "
            "embeddings of N corrupted copies, each (token, layer) state or MLP/attention window restored "
            "from the clean run; score = mean p(answer's first token) over the corrupted copies"
        )

    def noise_std(self, model: LoadedModel, cfg: CausalTraceConfig) -> tuple[float, float | None]:
        """(noise std, measured subject-embedding std or None when overridden)."""
        if cfg.noise > 0:
            return float(cfg.noise), None
        std = self.memo(
            "std", model, cfg, lambda: subject_embedding_std(model, [f.subject for f in self._facts(model, cfg)])
        )
        return cfg.noise_factor * std, std

    def run_unit(self, model: LoadedModel, cfg: CausalTraceConfig, unit: str) -> UnitResult:
        if unit == "known":
            noise, std = self.noise_std(model, cfg)
            res = self._known_unit(model, cfg)
            extra = {"noise_std": noise} | ({} if std is None else {"subject_embedding_std": std})
            res.tables["metrics"] = pd.concat([res.tables["metrics"], tables.metrics(extra, n=1)], ignore_index=True)
            return res
        return self.join_parts(model, cfg, unit, [self.run_part(model, cfg, unit, "cells-0-of-1")])

    # A fact's trace splits by cells: each part recomputes the base run (one forward pass) and
    # restores its share of the (kind, token, layer) cells; the driver joins them.
    def split_unit(self, model: LoadedModel, cfg: CausalTraceConfig, unit: str, n: int) -> list[str]:
        return [] if unit == "known" or n < 2 else [f"cells-{i}-of-{n}" for i in range(n)]

    def run_part(self, model: LoadedModel, cfg: CausalTraceConfig, unit: str, part: str) -> dict[str, Any]:
        _, i, _, n = part.split("-")
        inp = prepare_fact(model, self._fact_of(model, cfg, unit))
        return trace_part(model, inp, noise_std=self.noise_std(model, cfg)[0], samples=cfg.samples,
                          window=cfg.window, seed=cfg.seed, kinds=cfg.kinds, memory_mb=cfg.memory_mb,
                          part=int(i), n_parts=int(n))

    def join_parts(
        self, model: LoadedModel, cfg: CausalTraceConfig, unit: str, parts: Sequence[Any]
    ) -> UnitResult:
        noise, _ = self.noise_std(model, cfg)
        fact = self._fact_of(model, cfg, unit)
        inp = prepare_fact(model, fact)
        result = joined_trace(model, inp, parts, noise_std=noise, samples=cfg.samples, window=cfg.window,
                              seed=cfg.seed, kinds=cfg.kinds)
        metrics = {
            "p_clean": result.p_clean,
            "p_corrupted": result.p_corrupted,
            "total_effect": result.total_effect,
            "noise_std": noise,
            "subject_start": inp.subject_range[0],
            "subject_end": inp.subject_range[1],
            "n_tokens": inp.n_tokens,
            "n_answer_tokens": inp.n_answer_tokens,
        }
        if unit == "fact":
            metrics["known"] = self._single_known(model, fact, cfg)
        doc = {
            **fact.to_dict(),
            "tokens": list(inp.token_strs),
            "subject_range": list(inp.subject_range),
            "answer_token": model.tokenizer.decode([inp.target]),
        }
        return UnitResult(
            tables={
                "token_layer": result.to_frame(item=fact.id),
                "metrics": tables.metrics(metrics, n=1),
                "artifacts": tables.artifact("fact", doc),
            }
        )

    def finalize(
        self, model: LoadedModel, cfg: CausalTraceConfig, results: Mapping[str, pd.DataFrame]
    ) -> Summary:
        per_unit = _per_unit(results["metrics"])
        fact_units = [u for u in per_unit if u != "known"]
        effects, warnings = _fact_effects(per_unit, results["token_layer"], cfg.kinds, model.info.n_layers)
        summary: dict[str, Any] = {"n_facts_traced": len(fact_units)}
        if "known" in per_unit:
            summary.update({k: per_unit["known"][k] for k in KNOWN_METRICS})
        for name in ("p_clean", "p_corrupted", "total_effect"):
            summary[f"mean_{name}"] = float(np.mean([per_unit[u][name] for u in fact_units]))
        summary["noise_std"] = float(per_unit[fact_units[0]]["noise_std"])
        table = _bucket_averages(effects, cfg.kinds, summary)
        summary.update(samples=cfg.samples, window=cfg.window, answer_mode=cfg.answer_mode)
        return Summary(
            detector=self.name,
            variant=self.variant(cfg),
            metrics=summary,
            warnings=sorted(set(warnings)),
            tables={"token_layer": table, "metrics": tables.metrics(summary, n=len(fact_units))},
        )


@dataclass(frozen=True)
class AttentionKnockoutConfig(FactsConfig):
    """Parameters of attention knockout (Geva et al. 2023; each field's help says what it is)."""

    window: int = param(9, "layers blocked around each layer L: [L - w//2, L + w - w//2)", low=1)
    memory_mb: float = param(512.0, "memory budget of one forward pass", low=0, low_open=True)


@register
class AttentionKnockoutDetector(_FactsDetector[AttentionKnockoutConfig]):
    name = "attention-knockout"
    description = "Geva et al. attention knockout: block the last position's attention to subject / non-subject / itself"
    output = "curves"
    curve_axes: ClassVar[dict[str, tuple[str, str]]] = dict.fromkeys(
        KNOCKOUT_SETS, ("layer (centre of the blocked window)", "relative change of p(answer): (p - p_clean) / p_clean")
    )
    Config = AttentionKnockoutConfig

    def variant(self, cfg: AttentionKnockoutConfig) -> str:
        return "faithful"

    def method_text(self, cfg: AttentionKnockoutConfig) -> str:
        return (
            "attention knockout as Geva et al. 2023: the last position's attention edges to the subject, "
            "the non-subject positions or itself blocked in every head of a window of layers; metric = "
            "relative change of p(answer's first token)"
        )

    def run_unit(self, model: LoadedModel, cfg: AttentionKnockoutConfig, unit: str) -> UnitResult:
        if unit == "known":
            return self._known_unit(model, cfg)
        fact = self._fact_of(model, cfg, unit)
        inp = prepare_fact(model, fact)
        p_clean, curves = knockout_effects(model, inp, window=cfg.window, memory_mb=cfg.memory_mb)
        rows = [
            (which, layer, -1, float(layer), float(y))
            for which, ys in curves.items()
            for layer, y in enumerate(ys)
            if not np.isnan(y)
        ]
        metrics: dict[str, Any] = {"p_clean": p_clean, "n_answer_tokens": inp.n_answer_tokens}
        if unit == "fact":
            metrics["known"] = self._single_known(model, fact, cfg)
        return UnitResult(tables={"curves": tables.curves(rows), "metrics": tables.metrics(metrics, n=1)})

    def finalize(
        self, model: LoadedModel, cfg: AttentionKnockoutConfig, results: Mapping[str, pd.DataFrame]
    ) -> Summary:
        per_unit = _per_unit(results["metrics"])
        fact_units = [u for u in per_unit if u != "known"]
        c = results["curves"]
        mean = c.groupby(["curve", "layer"], as_index=False).agg(y=("y", "mean"), n=("y", "size"))
        summary: dict[str, Any] = {"n_facts": len(fact_units)}
        if "known" in per_unit:
            summary.update({k: per_unit["known"][k] for k in KNOWN_METRICS})
        for which, g in mean.groupby("curve"):
            worst = g.loc[g["y"].idxmin()]
            summary[f"min_layer_{which}"] = int(worst["layer"])
            summary[f"min_change_{which}"] = float(worst["y"])
        warnings = []
        if any(per_unit[u].get("known", 1.0) == 0.0 for u in fact_units):
            warnings.append("the model does not predict this answer (top-1): the knockout may be meaningless")
        n_multi = sum(per_unit[u]["n_answer_tokens"] > 1 for u in fact_units)
        if n_multi:
            warnings.append(f"{n_multi} of {len(fact_units)} answers are several tokens: p of the first token used")
        curves = tables.curves(
            (curve, int(layer), -1, float(layer), float(y))
            for curve, layer, y in zip(mean["curve"], mean["layer"], mean["y"], strict=True)
        )
        summary["window"] = cfg.window
        return Summary(
            detector=self.name,
            variant=self.variant(cfg),
            metrics=summary,
            warnings=warnings,
            tables={"curves": curves, "metrics": tables.metrics(summary, n=len(fact_units))},
        )


def run_inline(model: LoadedModel, name: str, **params: Any) -> tuple[Summary, dict[str, pd.DataFrame]]:
    """Run a detector of this module without the store (notebooks, tests): units, then finalize.
    Returns the summary and the units' concatenated tables."""
    det = {"causal-trace": CausalTraceDetector, "attention-knockout": AttentionKnockoutDetector}[name]()
    return run_in_memory(model, det, params)


# --------------------------------------------------------------------------- figures


def heatmap_figure(result: TraceResult, kind: str, indirect: bool = False) -> go.Figure:
    """Token x layer heatmap of one fact (subject tokens marked with *), as ROME's figures."""
    import plotly.graph_objects as go

    s, e = result.input.subject_range
    labels = [f"{t!r}*" if s <= i < e else repr(t) for i, t in enumerate(result.input.token_strs)]
    z = result.indirect(kind) if indirect else result.scores[kind]
    what = {"state": "single restored state", "mlp": "MLP window", "attn": "attention window"}[kind]
    value = "indirect effect: p(answer) restored - corrupted" if indirect else "p(answer) restored"
    fig = go.Figure(go.Heatmap(z=z, y=labels, x=list(range(z.shape[1])), colorscale="Purples" if kind == "state"
                               else ("Greens" if kind == "mlp" else "Reds"), colorbar={"title": value}))
    fig.update_layout(
        title=f"{what}: p({result.input.answer!r}) restored; clean {result.p_clean:.3f}, corrupted {result.p_corrupted:.3f}",
        xaxis_title="layer" if kind == "state" else "layer (window centre)",
        yaxis={"title": "token (* = subject)", "autorange": "reversed", "type": "category"},
    )
    return fig


def bucket_figure(table: pd.DataFrame) -> go.Figure:
    """Average indirect effect per layer for each ROME bucket, one panel per kind; ``table`` is
    the causal-trace summary's token_layer table (kind avg_indirect_*, token = bucket)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    kinds = sorted(table["kind"].unique())
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=kinds, shared_yaxes=True)
    for col, kind in enumerate(kinds, start=1):
        sub = table[table["kind"] == kind]
        for bucket in BUCKETS:
            b = sub[sub["token"] == bucket]
            if len(b):
                fig.add_trace(
                    go.Scatter(x=b["layer"], y=b["value"], name=bucket, legendgroup=bucket, showlegend=col == 1),
                    row=1, col=col,
                )
    fig.update_layout(title="average indirect effect by token bucket")
    fig.update_xaxes(title_text="layer (window centre for mlp and attn)")
    fig.update_yaxes(title_text="average indirect effect: p(answer) restored - corrupted", row=1, col=1)
    return fig


def knockout_figure(curves: pd.DataFrame) -> go.Figure:
    """Relative change of p(answer) per window-centre layer for each blocked source set."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for which in KNOCKOUT_SETS:
        c = curves[curves["curve"] == which]
        if len(c):
            fig.add_trace(go.Scatter(x=c["x"], y=c["y"], name=f"last -> {which} blocked"))
    x_title, y_title = AttentionKnockoutDetector.curve_axes[KNOCKOUT_SETS[0]]
    fig.update_layout(title="attention knockout", xaxis_title=x_title, yaxis_title=y_title)
    return fig
