"""Causal tracing (Meng et al. 2022, ROME): the corrupted runs, restored cells, per-token buckets
and figures, shared by the causal-trace detector and the notebooks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch

from circuits.data.facts import Fact, answer_tokens, subject_span
from interp.errors import UserError
from interp.model.interventions import AddNoise
from interp.model.loaded import LoadedModel
from interp.patching.execution import run_sweep
from interp.patching.memory import activation_bytes, bytes_per_row, units_within
from interp.patching.metrics import Prob
from interp.patching.sweeps import Sweep
from interp.patching.sweeps import window_layers as engine_window_layers
from interp.runs import tables

if TYPE_CHECKING:
    import plotly.graph_objects as go


# What a causal trace restores at a (token, layer) cell: the hidden state, the MLP or the attention output.
Restored = Literal["state", "mlp", "attn"]
RESTORABLE: tuple[Restored, ...] = ("state", "mlp", "attn")
SITE_OF = {"state": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}


BUCKETS = ("first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last")


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
    :func:`interp.patching.execution.window_layers` defines it."""
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


@dataclass(frozen=True)
class PromptTrace:
    """One prompt traced live (the dashboard's form): the trace, the noise std it used, and a
    token x layer heatmap of restored p(answer) per kind traced."""

    result: TraceResult
    figures: Mapping[str, go.Figure]

    @property
    def noise_std(self) -> float:
        return self.result.noise_std

    @property
    def samples(self) -> int:
        return self.result.samples


def trace_fact(
    model: LoadedModel,
    inp: TraceInput,
    *,
    noise_std: float,
    samples: int = 10,
    window: int = 10,
    seed: int = 1,
    kinds: Sequence[str] = RESTORABLE,
    memory_mb: float = 512.0,
) -> TraceResult:
    """Causal trace of one fact: every (token, layer) cell of each kind, batched."""
    bad = [k for k in kinds if k not in RESTORABLE]
    if bad or not kinds:
        raise UserError(f"unknown trace kind {bad[0] if bad else ''!r} (known: {', '.join(RESTORABLE)})")
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

