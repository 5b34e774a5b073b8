"""A batched patching engine: sweeps as data, executed as few large forward passes.

A :class:`Sweep` says *what* to do: for each site (a head, a layer, a (layer, position) cell,
or a window of layers at a position), apply one intervention (patch from a source run,
zero / mean / resample ablation, attention knockout) and measure a :class:`Metric`.
:func:`run_sweep` decides *how*: :func:`plan_sweep` makes a :class:`SweepPlan` (cases,
chunks, reuse decisions, budget) before any forward pass, :func:`execute_plan` runs it:

- every case (one site's edit) becomes a block of rows (one per prompt) in the batch
  dimension, through the interventions' ``batch=`` field, so one forward pass evaluates
  many cases;
- cases are grouped by the lowest layer they edit; a chunk starting at layer L hands the
  base run's cached ``resid_pre.L`` to the backend's ``run_from_layer`` (where its
  capabilities offer it), which does not compute the layers below L, so the shared prefix is
  computed once, by the base run, instead of once per case;
- a case that can change only positions >= p (a patch or head ablation at some positions,
  or a patch from a source whose prompts equal the base prompts up to p, as a conflict prompt
  and its consistent twin do) computes positions p.. only, attending to the base run's KV
  cache of 0..p-1; the layer and position re-entry is checked once per sweep against a full
  pass, with a fallback to full passes;
- ``base_interventions`` belong to the base run (ROME's embedding noise) and so to every case;
- chunks are sized to a memory budget in bytes (default: a quarter of the free memory);
- logits are computed only at the positions the metric reads (HF's ``logits_to_keep``) and,
  for a logit difference, only for its tokens; the metric is evaluated on the device and read
  back once per chunk.

Case names stored with every result: ``patch`` (activation patching from ``source``),
``zero``, ``mean`` (mean over batch and positions of the reference run, like
``AblateHeads(method="mean")``), ``resample`` (the same positions of the reference run, prompt
i taking reference row i; the default reference is the base prompts rolled by one), and
``knockout`` (scores from ``query_positions`` to the swept key positions set to -inf).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from interp.errors import UserError
from interp.interventions import AblateHeads, Intervention, Knockout, Patch
from interp.layout import tensor_of, unembedding
from interp.model import LoadedModel
from interp.sites import ATTN_KINDS, HEAD_KINDS, KV_KINDS, parse_site

SweepOver = Literal["heads", "layers", "positions", "windows"]
Kind = Literal["patch", "zero", "mean", "resample", "knockout"]
OVERS: tuple[str, ...] = ("heads", "layers", "positions", "windows")
KINDS: tuple[str, ...] = ("patch", "zero", "mean", "resample", "knockout")
DEFAULT_SITE = {"heads": "z", "layers": "resid_pre", "positions": "resid_pre", "windows": "mlp_out"}

# Names of the runs the edit templates read from (keys of the ``sources`` mapping).
SOURCE, MEAN, ZERO = "source", "mean", "zero"

# A forward pass costs Python overhead on top of its arithmetic; the planner counts it as this
# many token-layers per layer run, so it merges tiny chunks but never big ones.
_OVERHEAD_TOKENS_PER_LAYER = 32


# --------------------------------------------------------------------------- metrics


class Metric(Protocol):
    """What a sweep measures, evaluated on the device for a whole chunk at once.

    ``positions``: the positions whose logits are read (None: all); the logits handed to
    ``__call__`` hold only those, [rows, len(positions), vocab]. ``prompt_index`` maps each row
    to its prompt, so per-prompt answers can be gathered. Returns one value per row.
    """

    @property
    def name(self) -> str: ...

    @property
    def positions(self) -> tuple[int, ...] | None: ...

    def __call__(self, logits: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor: ...


def _ids(x: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in (x.tolist() if isinstance(x, torch.Tensor) else x))


@dataclass(frozen=True)
class LogitDiff:
    """logit[correct[i]] - logit[wrong[i]] at one position, for prompt i."""

    correct: Sequence[int]
    wrong: Sequence[int]
    position: int = -1
    name: str = "logit_diff"

    def __post_init__(self) -> None:
        object.__setattr__(self, "correct", _ids(self.correct))
        object.__setattr__(self, "wrong", _ids(self.wrong))
        if len(self.correct) != len(self.wrong):
            raise UserError("logit_diff: give one correct and one wrong token per prompt")

    @property
    def positions(self) -> tuple[int, ...]:
        return (self.position,)

    def on_vocab(self) -> tuple[tuple[int, ...], LogitDiff]:
        """The token ids this metric reads, and the same metric over the logits of those alone
        (the engine then unembeds only them)."""
        vocab = tuple(sorted(set(self.correct) | set(self.wrong)))
        at = {t: i for i, t in enumerate(vocab)}
        return vocab, LogitDiff([at[t] for t in self.correct], [at[t] for t in self.wrong], self.position, self.name)

    def __call__(self, logits: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        lg = logits[:, 0, :]
        c = torch.tensor(self.correct, device=lg.device)[prompt_index]
        w = torch.tensor(self.wrong, device=lg.device)[prompt_index]
        return lg.gather(1, c[:, None])[:, 0] - lg.gather(1, w[:, None])[:, 0]


@dataclass(frozen=True)
class LogProb:
    """log p(target[i]) at one position, for prompt i."""

    target: Sequence[int]
    position: int = -1
    name: str = "logprob"

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", _ids(self.target))

    @property
    def positions(self) -> tuple[int, ...]:
        return (self.position,)

    def __call__(self, logits: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits[:, 0, :].float(), dim=-1)
        t = torch.tensor(self.target, device=logp.device)[prompt_index]
        return logp.gather(1, t[:, None])[:, 0]


@dataclass(frozen=True)
class Prob(LogProb):
    """p(target[i]) at one position, for prompt i (ROME's causal-tracing score)."""

    name: str = "prob"

    def __call__(self, logits: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        return super().__call__(logits, prompt_index).exp()


def _check_metric(metric: Any, n_prompts: int) -> None:
    if not callable(metric) or not hasattr(metric, "positions"):
        raise UserError("metric must be a Metric (LogitDiff, LogProb, Prob or an object with positions and __call__)")
    for attr in ("correct", "wrong", "target"):
        ids = getattr(metric, attr, None)
        if ids is not None and len(ids) != n_prompts:
            raise UserError(f"metric {getattr(metric, 'name', '?')}: {len(ids)} answer tokens for {n_prompts} prompts")


# --------------------------------------------------------------------------- sweeps as data


Index = tuple[int, ...] | None


def _tup(x: Sequence[int] | int | None) -> Index:
    if x is None:
        return None
    if isinstance(x, int):
        return (int(x),)
    return tuple(int(i) for i in x)


@dataclass
class Case:
    """One swept site: its label and the edit templates (no batch rows yet)."""

    label: dict[str, int]
    edits: tuple[Intervention, ...]

    @property
    def start_layer(self) -> int:
        """The lowest layer edited: everything below it is the base run's."""
        layers = [iv.site.layer for iv in self.edits]
        return 0 if any(layer is None for layer in layers) else min(int(x) for x in layers if x is not None)

    def start_position(self, seq_len: int, same_prefix: int = 0) -> int:
        """The lowest position the edits change, when every edit is a patch or head ablation
        on the position axis (else 0): with causal attention every earlier position is the
        base run's. ``same_prefix``: the base and source runs have the same tokens there, so
        a patch from the source cannot change those positions."""
        lows = []
        for iv in self.edits:
            pos = getattr(iv, "positions", None)
            if not isinstance(iv, Patch | AblateHeads) or iv.site.position_axis != 1:
                return 0
            low = 0 if pos is None else min(_norm_pos(p, seq_len) for p in pos)
            if isinstance(iv, Patch) and iv.source == SOURCE:
                low = max(low, same_prefix)
            lows.append(low)
        return min(lows, default=0)


@dataclass(frozen=True)
class Sweep:
    """For each site, apply one intervention; see the module docstring for the interventions.

    - ``over="heads"``: one case per (layer, head) at a per-head site (z by default), at
      ``positions`` (None: all).
    - ``over="layers"``: one case per layer at a whole-stream site (resid_pre by default),
      at ``positions``; with ``heads`` on a head site, those heads together.
    - ``over="positions"``: one case per (layer, position) (causal tracing's grid).
    - ``over="windows"``: one case per (layer, position), editing layers
      [L - window//2, L + ceil(window/2)) clipped to the model (ROME's windows; mlp_out default).
    - ``intervention="knockout"``: attention edges from ``query_positions`` to the key
      positions (``positions``; swept one by one under positions/windows) are blocked.
    """

    over: SweepOver
    intervention: Kind = "patch"
    site: str | None = None
    layers: Index = None
    heads: Index = None
    positions: Index = None
    window: int = 10
    query_positions: tuple[int, ...] = (-1,)

    def __post_init__(self) -> None:
        for name in ("layers", "heads", "positions", "query_positions"):
            object.__setattr__(self, name, _tup(getattr(self, name)))
        if self.over not in OVERS:
            raise UserError(f"unknown sweep {self.over!r} (known: {', '.join(OVERS)})")
        if self.intervention not in KINDS:
            raise UserError(f"unknown intervention {self.intervention!r} (known: {', '.join(KINDS)})")
        if self.window < 1:
            raise UserError(f"window must be at least 1 layer, got {self.window}")

    @property
    def site_kind(self) -> str:
        if self.intervention == "knockout":
            if self.site not in (None, "scores"):
                raise UserError("knockout acts on attention scores; leave site unset")
            return "scores"
        kind = self.site or DEFAULT_SITE[self.over]
        if kind in ATTN_KINDS:
            raise UserError(f"sweeps edit activations, not {kind!r}; use intervention='knockout' for attention edges")
        parse_site(kind if kind == "embed" else f"{kind}.0")
        if self.over == "heads" and kind not in HEAD_KINDS + KV_KINDS:
            raise UserError(f"a heads sweep needs a per-head site (q, k, v, z), not {kind!r}")
        if kind == "embed" and self.over in ("layers", "windows"):
            raise UserError("embed has no layers; sweep positions over it with over='positions'")
        return kind

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sweep:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"unknown sweep field {sorted(unknown)[0]!r}")
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    def cases(self, model: LoadedModel, seq_len: int) -> list[Case]:
        info = model.info
        kind = self.site_kind
        layers = self.layers if self.layers is not None else tuple(range(info.n_layers))
        for layer in layers:
            if not 0 <= layer < info.n_layers:
                raise UserError(f"layer {layer} out of range: {model.name} has layers 0..{info.n_layers - 1}")
        n_heads = info.n_kv_heads if kind in KV_KINDS else info.n_heads
        heads = self.heads
        for h in heads or ():
            if not 0 <= h < n_heads:
                raise UserError(f"head {h} out of range at site {kind} (0..{n_heads - 1})")
        if heads is not None and kind not in HEAD_KINDS + KV_KINDS + ("scores",):
            raise UserError(f"site {kind!r} has no heads; drop heads=")
        positions = None if self.positions is None else tuple(_norm_pos(p, seq_len) for p in self.positions)
        qpos = tuple(_norm_pos(p, seq_len) for p in self.query_positions)

        if self.intervention == "knockout":
            return self._knockout_cases(layers, heads, positions, qpos, seq_len, info.n_layers, n_heads)

        def edit(layer: int | None, hs: Index, pos: Index) -> Intervention:
            name = kind if layer is None else f"{kind}.{layer}"
            if self.intervention == "zero" and kind == "z":
                return AblateHeads(layer=int(layer or 0), heads=hs, method="zero", positions=pos)
            src = {"patch": SOURCE, "resample": SOURCE, "mean": MEAN, "zero": ZERO}[self.intervention]
            return Patch(site_name=name, source=src, heads=hs, positions=pos)

        out: list[Case] = []
        if self.over == "heads":
            for layer in layers:
                for h in heads if heads is not None else range(n_heads):
                    out.append(Case({"layer": layer, "head": h}, (edit(layer, (h,), positions),)))
        elif self.over == "layers":
            for layer in layers:
                out.append(Case({"layer": layer}, (edit(layer, heads, positions),)))
        else:
            swept = positions if positions is not None else tuple(range(seq_len))
            if kind == "embed":
                return [Case({"position": p}, (edit(None, heads, (p,)),)) for p in swept]
            for layer in layers:
                win = window_layers(layer, self.window, info.n_layers) if self.over == "windows" else (layer,)
                for p in swept:
                    out.append(Case({"layer": layer, "position": p}, tuple(edit(w, heads, (p,)) for w in win)))
        return out

    def _knockout_cases(
        self, layers: Sequence[int], heads: Index, positions: Index, qpos: tuple[int, ...], seq_len: int,
        n_layers: int, n_heads: int,
    ) -> list[Case]:
        def ko(layer: int, hs: Index, keys: tuple[int, ...]) -> Intervention:
            return Knockout(layer=layer, query_positions=qpos, key_positions=keys, heads=hs)

        if self.over in ("heads", "layers"):
            if positions is None:
                raise UserError("a knockout over heads or layers needs the key positions to block (positions=...)")
            if self.over == "heads":
                return [
                    Case({"layer": layer, "head": h}, (ko(layer, (h,), positions),))
                    for layer in layers
                    for h in (heads if heads is not None else range(n_heads))
                ]
            return [Case({"layer": layer}, (ko(layer, heads, positions),)) for layer in layers]
        swept = positions if positions is not None else tuple(range(seq_len))
        out = []
        for layer in layers:
            win = window_layers(layer, self.window, n_layers) if self.over == "windows" else (layer,)
            for p in swept:
                out.append(Case({"layer": layer, "position": p}, tuple(ko(w, heads, (p,)) for w in win)))
        return out


def window_layers(layer: int, window: int, n_layers: int) -> tuple[int, ...]:
    """The window of ``window`` layers around ``layer`` that causal tracing restores together:
    [L - w//2, L + ceil(w/2)), clipped to the model (Meng et al. 2022, ROME, the
    ``trace_important_window`` of their code)."""
    return tuple(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def _norm_pos(p: int, seq_len: int) -> int:
    if not -seq_len <= p < seq_len:
        raise UserError(f"position {p} out of range for prompts of {seq_len} tokens")
    return p % seq_len


# --------------------------------------------------------------------------- results


@dataclass
class SweepResult:
    """Metric values per case and prompt, with the base run's and the execution record."""

    sweep: Sweep
    variant: str
    metric: str
    labels: list[dict[str, int]]
    values: torch.Tensor  # [n_cases, n_prompts]: the metric with the case's edit
    base: torch.Tensor  # [n_prompts]: the metric of the unedited base run
    stats: dict[str, Any] = field(default_factory=dict)

    def mean(self) -> torch.Tensor:
        return self.values.mean(dim=1)

    def effect(self) -> torch.Tensor:
        """Per case: mean over prompts of (edited - base)."""
        return (self.values - self.base[None, :]).mean(dim=1)

    def to_frame(self) -> Any:
        import pandas as pd

        rows = []
        for i, label in enumerate(self.labels):
            for j in range(self.values.shape[1]):
                rows.append({**label, "prompt": j, "value": float(self.values[i, j]), "base": float(self.base[j])})
        df = pd.DataFrame(rows)
        df["variant"] = self.variant
        df["metric"] = self.metric
        return df


# --------------------------------------------------------------------------- memory


def free_memory_bytes(device: torch.device) -> int:
    """Memory the process could still allocate on ``device`` (CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def default_budget(model: LoadedModel) -> int:
    """A quarter of the free memory of the tightest device holding the model (a model spread by a
    device map has activations on each of its devices)."""
    devices = {p.device for p in model.hf.parameters()}
    return min(free_memory_bytes(d) for d in devices) // 4


def activation_bytes(
    model: LoadedModel,
    seq_len: int,
    *,
    item: int | None = None,
    resid: int = 0,
    mlp: int = 0,
    scores: int = 0,
    kv: bool = False,
    logits: int = 0,
    logit_positions: int = 0,
) -> int:
    """Estimated bytes of one batch row's activations in a forward pass over ``seq_len`` tokens.

    The one memory estimator the engine and the detectors share; each says which buffers it
    counts, per token: ``resid`` residual-sized (d_model) copies, ``mlp`` MLP-sized (d_mlp)
    ones, ``scores`` copies of one layer's attention scores (heads x seq_len), every layer's
    keys and values with ``kv``; and ``logits`` vocab-sized copies at each of
    ``logit_positions``. ``item``: bytes per number (default: the model's dtype).
    """
    info = model.info
    size = torch.finfo(model.dtype).bits // 8 if item is None else item
    per_token = resid * info.d_model + mlp * info.d_mlp + scores * info.n_heads * seq_len
    if kv:
        per_token += 2 * info.n_layers * info.n_kv_heads * info.d_head
    return size * (seq_len * per_token + logits * logit_positions * info.vocab_size)


def units_within(budget_bytes: float, unit_bytes: int) -> int:
    """How many units of ``unit_bytes`` fit in ``budget_bytes``, at least one."""
    return max(1, int(budget_bytes // unit_bytes))


def bytes_per_row(model: LoadedModel, seq_len: int, n_logit_positions: int, kv: bool = False) -> int:
    """Estimated peak bytes one batch row needs in a no-grad forward pass.

    A deliberate over-estimate: the residual and its copies (norms, hook clones, q/k/v/z,
    attention output) ~ 10 d_model, the MLP's intermediates ~ 4 d_mlp, scores/pattern and
    their softmax ~ 3 heads x seq, per token; logits and the metric's log-softmax ~ 3 vocab per
    kept position; with ``kv``, every layer's keys and values (a pass on a cached prefix).
    """
    return activation_bytes(model, seq_len, resid=10, mlp=4, scores=3, kv=kv, logits=3,
                            logit_positions=n_logit_positions)


def _prefix_kv(model: LoadedModel, pkv: Any, n_pos: int, copies: int) -> Any:
    """HF's KV cache of the base run's first ``n_pos`` positions, its rows tiled ``copies``
    times (row = copy * prompts + prompt, the chunk's layout)."""
    from transformers.cache_utils import DynamicCache

    data = [
        (layer.keys[:, :, :n_pos].repeat(copies, 1, 1, 1), layer.values[:, :, :n_pos].repeat(copies, 1, 1, 1))
        for layer in pkv.layers
    ]
    return DynamicCache(data, config=model.hf.config)


def _plain_kv(pkv: Any) -> bool:
    """Only full-attention dynamic caches can be cut at a position (not sliding windows or
    recurrent state)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(pkv) is DynamicCache and all(type(layer) is DynamicLayer for layer in pkv.layers)


# --------------------------------------------------------------------------- execution


@contextlib.contextmanager
def _unembed_only(head: torch.nn.Linear | None, vocab: tuple[int, ...] | None) -> Iterator[None]:
    """Make the unembedding compute the logits of ``vocab`` alone: a metric that reads two
    tokens need not pay for a d_model x vocab product per row."""
    if head is None or vocab is None:
        yield
        return
    weight = tensor_of(head)
    idx = torch.tensor(vocab, device=weight.device)
    w = weight[idx]
    b = None if head.bias is None else tensor_of(head, "bias")[idx]
    object.__setattr__(head, "forward", lambda h: torch.nn.functional.linear(h, w, b))
    try:
        yield
    finally:
        del head.__dict__["forward"]


def _logit_positions(metric: Metric, seq_len: int) -> tuple[int, ...] | None:
    pos = metric.positions
    return None if pos is None else tuple(_norm_pos(p, seq_len) for p in pos)


class SweepForwards:
    """The forward passes of one sweep (its base run, then its chunks), each computing only
    the logits the metric reads, with counters of passes and token-layers.

    ``metric`` is what the caller asked for; ``self.metric`` is the one to apply to these
    passes' logits (over a few token ids when the metric says which it reads). Passes go
    through the backend's contract only: HF forward kwargs where the backend passes them
    (``capabilities.forward_kwargs``), ``run_from_layer`` for a pass that enters a layer."""

    def __init__(self, model: LoadedModel, metric: Metric, seq_len: int) -> None:
        self.model = model
        self.metric = metric
        self.seq_len = seq_len
        self.backend = model.backend
        # Only where the backend hands HF's forward our kwargs do we choose which logits it
        # computes (positions and, below, vocabulary); elsewhere logits are sliced afterwards.
        self.direct = self.backend.capabilities.forward_kwargs
        self.head: torch.nn.Linear | None = None
        self.vocab: tuple[int, ...] | None = None
        head = unembedding(model.hf) if self.direct else None
        on_vocab = getattr(metric, "on_vocab", None)
        if on_vocab is not None and isinstance(head, torch.nn.Linear):
            self.head = head
            self.vocab, self.metric = on_vocab()
        self.logit_positions = _logit_positions(metric, seq_len)
        self.keep: int | torch.Tensor = 0
        self.slice_after: tuple[int, ...] | None = self.logit_positions
        if (
            self.direct
            and self.logit_positions is not None
            and "logits_to_keep" in inspect.signature(model.hf.forward).parameters
        ):
            if self.logit_positions == (seq_len - 1,):
                self.keep = 1
            else:
                self.keep = torch.tensor(self.logit_positions, device=model.device)
            self.slice_after = None
        self.forwards = 0
        self.token_layers = 0

    @property
    def n_logit_positions(self) -> int:
        return self.seq_len if self.logit_positions is None else len(self.logit_positions)

    def _forward_kwargs(self, past: Any, keep_kv: bool, offset: int) -> dict[str, Any] | None:
        if not self.direct:
            return None
        fkw: dict[str, Any] = {} if (past is not None or keep_kv) else {"use_cache": False}
        keep = self.keep
        if isinstance(keep, torch.Tensor):
            keep = keep - offset
        if not isinstance(keep, int) or keep:
            fkw["logits_to_keep"] = keep
        return fkw

    def forward(
        self,
        tokens: torch.Tensor,
        interventions: Sequence[Intervention] = (),
        sources: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        *,
        start: int = 0,
        resid: torch.Tensor | None = None,
        cache: Sequence[str] = (),
        grad: bool = False,
        offload: bool = False,
        past: Any = None,
        offset: int = 0,
        keep_kv: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
        """Logits at the metric's positions [rows, k, vocab], the cache and HF's KV cache.

        With ``resid`` the pass enters block ``start`` with that residual (``start`` may be 0).
        With ``past`` (HF's KV cache of positions 0..offset-1) the pass computes positions
        offset.. only; ``keep_kv`` returns the pass's own KV cache.
        """
        self.forwards += 1
        n_pos = int(tokens.shape[1]) if resid is None else int(resid.shape[1])
        self.token_layers += tokens.shape[0] * n_pos * (self.model.info.n_layers - start)
        common: dict[str, Any] = {
            "interventions": interventions, "sources": sources, "cache": cache, "grad": grad,
            "cache_to_cpu": offload, "past_key_values": past, "use_cache": keep_kv,
            "forward_kwargs": self._forward_kwargs(past, keep_kv, offset),
        }
        with _unembed_only(self.head, self.vocab), warnings.catch_warnings():
            # transformers renames past_key_values to cache; the bridge still passes the old name.
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
            if resid is not None:
                out = self.backend.run_from_layer(resid, start, **common)
            else:
                out = self.backend.run(tokens.to(self.model.device), **common)
        logits = out.logits
        if self.slice_after is not None:
            logits = logits[:, [p - offset for p in self.slice_after], :]
        return logits, out.cache, out.past_key_values


def _check_tokens(model: LoadedModel, tokens: torch.Tensor, what: str = "tokens") -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.is_floating_point():
        raise UserError(f"{what} must be a [prompts, positions] tensor of token ids")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise UserError(f"{what} is empty")
    model.check_length(int(tokens.shape[1]))
    return tokens.to(model.device)


def _needed_sites(cases: Sequence[Case], source_name: str) -> list[str]:
    return sorted({str(iv.site) for v in cases for iv in v.edits if getattr(iv, "source", None) == source_name})


def _reference_tokens(sweep: Sweep, tokens: torch.Tensor, source: Any) -> Any:
    if source is not None:
        return source
    if sweep.intervention == "patch":
        raise UserError("a patch sweep needs a source run: give source= (tokens or a cache)")
    if sweep.intervention == "resample":
        if tokens.shape[0] < 2:
            raise UserError("resample ablation without a reference needs at least 2 prompts")
        return tokens.roll(1, dims=0)
    return tokens


def _reference(
    model: LoadedModel,
    sweep: Sweep,
    cases: Sequence[Case],
    tokens: torch.Tensor,
    source: torch.Tensor | Mapping[str, torch.Tensor] | None,
) -> torch.Tensor | Mapping[str, torch.Tensor] | None:
    """What the edits read from: the source run's checked token ids, a given cache, or None
    when no edit reads a source run or a reference mean."""
    need_src = _needed_sites(cases, SOURCE)
    if not (need_src or _needed_sites(cases, MEAN)):
        return None
    ref = _reference_tokens(sweep, tokens, source)
    if not isinstance(ref, torch.Tensor):
        return ref
    n_prompts, seq_len = tokens.shape
    src_tokens = _check_tokens(model, ref, "source tokens")
    if src_tokens.shape[1] != seq_len:
        raise UserError(f"source prompts have {src_tokens.shape[1]} tokens, base prompts {seq_len}")
    if src_tokens.shape[0] not in (1, n_prompts) and need_src:
        raise UserError(f"source has {src_tokens.shape[0]} prompts; give 1 or {n_prompts}")
    return src_tokens


def build_sources(
    model: LoadedModel,
    sweep: Sweep,
    cases: Sequence[Case],
    tokens: torch.Tensor,
    source: torch.Tensor | Mapping[str, torch.Tensor] | None,
    offload: bool = False,
) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor | None]:
    """The runs the edit templates read from, caching only the sites they name.

    Returns the sources mapping and the source run's tokens (None when a cache was given).
    """
    n_prompts, seq_len = tokens.shape
    sources: dict[str, dict[str, torch.Tensor]] = {}
    need_src = _needed_sites(cases, SOURCE)
    need_mean = _needed_sites(cases, MEAN)
    need_zero = _needed_sites(cases, ZERO)
    ref = _reference(model, sweep, cases, tokens, source)
    src_tokens = None
    ref_cache: Mapping[str, torch.Tensor] = {}
    if isinstance(ref, torch.Tensor):
        src_tokens = ref
        with torch.no_grad():
            ref_cache = model.run(src_tokens, cache=need_src + need_mean, cache_to_cpu=offload).cache
    elif ref is not None:
        ref_cache = ref
        missing = [s for s in need_src + need_mean if s not in ref_cache]
        if missing:
            raise UserError(f"source cache has no activation at site {missing[0]}")
    if need_src:
        sources[SOURCE] = {s: ref_cache[s] for s in need_src}
        for s, t in sources[SOURCE].items():
            if t.shape[0] not in (1, n_prompts) or t.shape[1] != seq_len:
                raise UserError(f"source activation at {s} has shape {tuple(t.shape)}; base is {n_prompts}x{seq_len}")
    if need_mean:
        sources[MEAN] = {
            s: ref_cache[s].mean(dim=(0, 1), keepdim=True).expand(1, seq_len, *ref_cache[s].shape[2:]).contiguous()
            for s in need_mean
        }
    if need_zero:
        shapes = _site_shapes(model, need_zero, seq_len)
        sources[ZERO] = {s: torch.zeros((1, *shapes[s]), dtype=model.dtype, device=model.device) for s in need_zero}
    return sources, src_tokens


def _site_shapes(model: LoadedModel, names: Sequence[str], seq_len: int) -> dict[str, tuple[int, ...]]:
    info = model.info
    out = {}
    for name in names:
        kind = parse_site(name).kind
        if kind in ("q", "z"):
            out[name] = (seq_len, info.n_heads, info.d_head)
        elif kind in KV_KINDS:
            out[name] = (seq_len, info.n_kv_heads, info.d_head)
        else:
            out[name] = (seq_len, info.d_model)
    return out


def _same_prefix(tokens: torch.Tensor, src_tokens: torch.Tensor | None) -> int:
    """How many leading positions the base and source prompts share in every row (0 when the
    source is a cache: its tokens are unknown)."""
    if src_tokens is None:
        return 0
    differs = (tokens != src_tokens.to(tokens.device)).any(dim=0)
    return int(differs.float().argmax()) if bool(differs.any()) else int(tokens.shape[1])


def _shifted(iv: Intervention, offset: int, seq_len: int) -> Intervention:
    """The edit in a pass that starts at position ``offset``."""
    pos = getattr(iv, "positions", None)
    if not offset or pos is None:
        return iv
    return dataclasses.replace(iv, positions=tuple(_norm_pos(p, seq_len) - offset for p in pos))  # type: ignore[call-arg]


def _cut_sources(sources: Mapping[str, Mapping[str, torch.Tensor]], offset: int,
                 seq_len: int) -> dict[str, dict[str, torch.Tensor]]:
    """Source activations from position ``offset`` on (position axis 1, as the edits that
    allow a cut prefix require)."""
    return {
        name: {site: t[:, offset:] if t.ndim > 1 and t.shape[1] == seq_len else t for site, t in acts.items()}
        for name, acts in sources.items()
    }


def _with_rows(iv: Intervention, rows: tuple[int, ...], sources: Mapping[str, Mapping[str, torch.Tensor]],
               n_prompts: int) -> Intervention:
    own = getattr(iv, "batch", None)
    if own is not None:
        # A base edit on some prompts: the same prompts of this case's block.
        rows = tuple(rows[b] for b in own)
    if isinstance(iv, Patch):
        src = sources[iv.source][iv.site_name]
        return dataclasses.replace(iv, batch=rows, source_batch=tuple(range(n_prompts)) if src.shape[0] > 1 else None)
    return dataclasses.replace(iv, batch=rows)  # type: ignore[call-arg]


def plan_chunks(starts: Sequence[int], max_cases: int, rows_per_case: int, seq_len: int,
                n_layers: int, prefix_reuse: bool) -> list[tuple[int, list[int]]]:
    """Group case indices into (start layer, indices) chunks of at most ``max_cases``.

    Minimises the estimated cost: token-layers computed (rows x tokens x layers from the
    chunk's lowest start) plus a per-forward overhead, over contiguous runs of cases
    sorted by start layer (a small dynamic programme).
    """
    order = sorted(range(len(starts)), key=lambda i: (starts[i] if prefix_reuse else 0, i))
    eff = [starts[i] if prefix_reuse else 0 for i in order]
    n = len(order)
    tok = rows_per_case * seq_len
    overhead = _OVERHEAD_TOKENS_PER_LAYER * n_layers
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        for j in range(max(0, i - max_cases), i):
            cost = best[j] + (i - j) * tok * (n_layers - eff[j]) + overhead
            if cost < best[i]:
                best[i], cut[i] = cost, j
    chunks = []
    i = n
    while i > 0:
        j = cut[i]
        chunks.append((eff[j], order[j:i]))
        i = j
    return chunks[::-1]


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Chunk:
    """One forward pass: the cases (indices into the plan's) stacked in the batch, each a
    block of one row per prompt, computing positions ``offset``.. and layers ``start``.."""

    offset: int
    start: int
    cases: tuple[int, ...]


@dataclass(frozen=True)
class SweepPlan:
    """How :func:`run_sweep` executes a sweep on given prompts, decided before any forward pass.

    ``starts``/``offsets``: per case, the lowest layer and position its edits can change
    (the pass computes from there when the reuse is on). ``resid_layers``: where the base run
    caches ``resid_pre`` for chunks to enter at; ``from_resid``: chunks enter from the base
    residual even at layer 0 (base edits, or a cut prefix). The base run can still turn reuse
    off (:meth:`without_sequence_reuse`, :meth:`without_reuse`), which re-plans the chunks.
    """

    sweep: Sweep
    cases: tuple[Case, ...]
    base_interventions: tuple[Intervention, ...]
    n_prompts: int
    seq_len: int
    n_layers: int
    logit_positions: tuple[int, ...] | None
    budget_bytes: int
    bytes_per_case: int
    max_per_chunk: int
    prefix_reuse: bool
    sequence_reuse: bool
    from_resid: bool
    starts: tuple[int, ...]
    offsets: tuple[int, ...]
    resid_layers: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    @property
    def n_logit_positions(self) -> int:
        return self.seq_len if self.logit_positions is None else len(self.logit_positions)

    def __str__(self) -> str:
        s = self.sweep
        onoff = {True: "on", False: "off"}
        lines = [
            f"{len(self.cases)} cases ({s.over}, {s.intervention}) on {self.n_prompts} prompts x "
            f"{self.seq_len} tokens, {self.n_logit_positions} logit positions",
            f"budget {self.budget_bytes} bytes, {self.bytes_per_case} per case, "
            f"at most {self.max_per_chunk} cases per chunk",
            f"prefix reuse {onoff[self.prefix_reuse]}, sequence reuse {onoff[self.sequence_reuse]}, "
            f"from the base residual {onoff[self.from_resid]}, base caches resid_pre at {list(self.resid_layers)}",
            f"{len(self.chunks)} chunks (cases @ layer/position): "
            + ", ".join(f"{len(c.cases)}@L{c.start}/p{c.offset}" for c in self.chunks),
        ]
        return "\n".join(lines)

    def without_sequence_reuse(self) -> SweepPlan:
        """Every pass computes every position (the base run's KV cache cannot be cut)."""
        offsets = (0,) * len(self.cases)
        return dataclasses.replace(self, sequence_reuse=False, offsets=offsets,
                                   chunks=_plan_chunks(self, self.prefix_reuse, offsets))

    def without_reuse(self) -> SweepPlan:
        """Every pass is a full forward pass (re-entry disagreed with a full pass)."""
        offsets = (0,) * len(self.cases)
        return dataclasses.replace(self, prefix_reuse=False, sequence_reuse=False, from_resid=False,
                                   offsets=offsets, chunks=_plan_chunks(self, False, offsets))


def _plan_chunks(plan: SweepPlan, prefix_reuse: bool, offsets: Sequence[int]) -> tuple[Chunk, ...]:
    """Chunks per position offset, each group split by :func:`plan_chunks`."""
    chunks: list[Chunk] = []
    for off in sorted(set(offsets)):
        group = [i for i, o in enumerate(offsets) if o == off]
        planned = plan_chunks([plan.starts[i] for i in group], plan.max_per_chunk, plan.n_prompts,
                              plan.seq_len - off, plan.n_layers, prefix_reuse)
        chunks.extend(Chunk(off, start, tuple(group[k] for k in idx)) for start, idx in planned)
    return tuple(chunks)


def _selected(cases: list[Case], select: Sequence[int] | None) -> list[Case]:
    if select is not None:
        bad = [i for i in select if not 0 <= i < len(cases)]
        if bad:
            raise UserError(f"case index {bad[0]} out of range (0..{len(cases) - 1})")
        cases = [cases[i] for i in select]
    if not cases:
        raise UserError("the sweep has no cases")
    return cases


def _budget(model: LoadedModel, n_prompts: int, seq_len: int, n_logit_positions: int, kv: bool,
            budget_bytes: int | None, max_cases: int | None) -> tuple[int, int, int]:
    """The chunk budget in bytes, the bytes of one case's block of rows, and the most
    cases per chunk."""
    budget = default_budget(model) if budget_bytes is None else int(budget_bytes)
    per_case = n_prompts * bytes_per_row(model, seq_len, n_logit_positions, kv=kv)
    if budget < per_case:
        raise UserError(
            f"memory budget of {budget} bytes is smaller than one patched case "
            f"({per_case} bytes for {n_prompts} prompts x {seq_len} tokens); raise budget_bytes or use fewer prompts"
        )
    cap = budget // per_case
    if max_cases is not None:
        if max_cases < 1:
            raise UserError(f"max_cases must be at least 1, got {max_cases}")
        cap = min(cap, max_cases)
    return budget, per_case, cap


def plan_sweep(
    model: LoadedModel,
    sweep: Sweep,
    metric: Metric,
    tokens: torch.Tensor,
    source: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    *,
    budget_bytes: int | None = None,
    max_cases: int | None = None,
    prefix_reuse: bool = True,
    sequence_reuse: bool = True,
    select: Sequence[int] | None = None,
    base_interventions: Sequence[Intervention] = (),
) -> SweepPlan:
    """The plan :func:`run_sweep` executes (same arguments); no forward pass is run."""
    tokens = _check_tokens(model, tokens)
    n_prompts, seq_len = tokens.shape
    _check_metric(metric, n_prompts)
    cases = _selected(sweep.cases(model, seq_len), select)
    base_ivs = tuple(base_interventions)
    caps = model.backend.capabilities
    # Only edits below every block are inside the cached residual a chunk starts from.
    prefix = prefix_reuse and caps.run_from_layer and not any(iv.site.layer is not None for iv in base_ivs)
    seq = sequence_reuse and prefix and caps.kv_cache
    logit_positions = _logit_positions(metric, seq_len)
    n_logit = seq_len if logit_positions is None else len(logit_positions)
    budget, per_case, cap = _budget(model, n_prompts, seq_len, n_logit, seq, budget_bytes, max_cases)
    ref = _reference(model, sweep, cases, tokens, source)
    same = _same_prefix(tokens, ref if isinstance(ref, torch.Tensor) else None)
    first_read = 0 if logit_positions is None else min(logit_positions)
    offsets = tuple(min(v.start_position(seq_len, same), first_read) if seq else 0 for v in cases)
    if any(iv.site.layer is None for v in cases for iv in v.edits):
        # An edit of the embedding needs its pass to start from the tokens.
        seq, offsets, embed_edits = False, (0,) * len(cases), True
    else:
        embed_edits = False
    starts = tuple(v.start_layer for v in cases)
    # A chunk enters at its start layer from the base residual; with base edits or a cut
    # prefix it does so even at layer 0, where the residual holds the edited embedding.
    from_resid = prefix and not embed_edits and (bool(base_ivs) or any(o > 0 for o in offsets))
    plan = SweepPlan(
        sweep=sweep, cases=tuple(cases), base_interventions=base_ivs, n_prompts=n_prompts,
        seq_len=seq_len, n_layers=model.info.n_layers, logit_positions=logit_positions,
        budget_bytes=budget, bytes_per_case=per_case, max_per_chunk=cap, prefix_reuse=prefix,
        sequence_reuse=seq, from_resid=from_resid, starts=starts, offsets=offsets,
        resid_layers=tuple(sorted({s for s in starts if s > 0 or from_resid})) if prefix else (),
        chunks=(),
    )
    return dataclasses.replace(plan, chunks=_plan_chunks(plan, prefix, offsets))


# --------------------------------------------------------------------------- execution of a plan


def _base_run(
    plan: SweepPlan, runner: SweepForwards, tokens: torch.Tensor, sources: Mapping[str, Mapping[str, torch.Tensor]]
) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any, SweepPlan]:
    """The base run: its metric, the residuals chunks enter at, its KV cache, and the plan
    without sequence reuse when that cache cannot be cut at a position."""
    logits, base_cache, base_kv = runner.forward(
        tokens, plan.base_interventions, sources, cache=[f"resid_pre.{s}" for s in plan.resid_layers],
        keep_kv=plan.sequence_reuse,
    )
    base = runner.metric(logits, torch.arange(plan.n_prompts, device=tokens.device))
    if plan.sequence_reuse and not _plain_kv(base_kv):
        plan = plan.without_sequence_reuse()
    return base, base_cache, base_kv, plan


def _check_reentry(
    model: LoadedModel, plan: SweepPlan, runner: SweepForwards, tokens: torch.Tensor, base: torch.Tensor,
    base_cache: Mapping[str, torch.Tensor], base_kv: Any,
) -> tuple[SweepPlan, float | None]:
    """Layer (and position) re-entry is checked once per sweep on this model: resuming the
    base run at the highest start layer, after the largest cut, must give the base metric
    back; otherwise the plan falls back to full passes. Returns the plan and the difference."""
    if not plan.resid_layers:
        return plan, None
    top, cut = plan.resid_layers[-1], max(plan.offsets)
    past = _prefix_kv(model, base_kv, cut, 1) if cut else None
    again, _, _ = runner.forward(tokens, start=top, resid=base_cache[f"resid_pre.{top}"][:, cut:], past=past,
                                 offset=cut)
    diff = float((runner.metric(again, torch.arange(plan.n_prompts, device=tokens.device)) - base).abs().max())
    if diff > 1e-4 * (1.0 + float(base.abs().max())):
        # stacklevel: the caller of run_sweep.
        warnings.warn(f"prefix reuse disagrees with a full forward on {model.name} "
                      f"(max diff {diff:.2g}); running full forwards", stacklevel=4)
        plan = plan.without_reuse()
    return plan, diff


def _run_chunks(
    model: LoadedModel, plan: SweepPlan, runner: SweepForwards, tokens: torch.Tensor,
    sources: Mapping[str, Mapping[str, torch.Tensor]], base_cache: Mapping[str, torch.Tensor], base_kv: Any,
) -> torch.Tensor:
    """Metric values [cases, prompts], one forward pass per chunk."""
    n_prompts, seq_len = plan.n_prompts, plan.seq_len
    prompt_index = torch.arange(n_prompts, device=tokens.device)
    values = torch.empty(len(plan.cases), n_prompts, dtype=torch.float64)
    cut_sources: dict[int, Mapping[str, Mapping[str, torch.Tensor]]] = {0: sources}
    for chunk in plan.chunks:
        off, start, idx = chunk.offset, chunk.start, list(chunk.cases)
        if off not in cut_sources:
            cut_sources[off] = _cut_sources(sources, off, seq_len)
        resid = None
        if plan.prefix_reuse and (start > 0 or plan.from_resid):
            resid = base_cache[f"resid_pre.{start}"][:, off:].repeat(len(idx), 1, 1)
        ivs: list[Intervention] = []
        for slot, vi in enumerate(idx):
            rows = tuple(range(slot * n_prompts, (slot + 1) * n_prompts))
            if resid is None:
                ivs.extend(_with_rows(iv, rows, sources, n_prompts) for iv in plan.base_interventions)
            ivs.extend(_with_rows(_shifted(iv, off, seq_len), rows, sources, n_prompts)
                       for iv in plan.cases[vi].edits)
        batch_tokens = tokens[:, off:].repeat(len(idx), 1)
        past = _prefix_kv(model, base_kv, off, len(idx)) if off else None
        logits, _, _ = runner.forward(batch_tokens, ivs, cut_sources[off], start=start, resid=resid,
                                      past=past, offset=off)
        vals = runner.metric(logits, prompt_index.repeat(len(idx)))
        values[idx] = vals.view(len(idx), n_prompts).double().cpu()
    return values


def execute_plan(
    model: LoadedModel,
    plan: SweepPlan,
    metric: Metric,
    tokens: torch.Tensor,
    source: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    *,
    offload: bool = False,
) -> SweepResult:
    """Run ``plan`` (from :func:`plan_sweep` with the same metric, tokens and source)."""
    t0 = time.perf_counter()
    tokens = _check_tokens(model, tokens)
    runner = SweepForwards(model, metric, plan.seq_len)
    with torch.no_grad():
        sources, _ = build_sources(model, plan.sweep, plan.cases, tokens, source, offload)
        base, base_cache, base_kv, plan = _base_run(plan, runner, tokens, sources)
        plan, prefix_diff = _check_reentry(model, plan, runner, tokens, base, base_cache, base_kv)
        values = _run_chunks(model, plan, runner, tokens, sources, base_cache, base_kv)
    cache_bytes = sum(t.numel() * t.element_size() for t in base_cache.values()) + sum(
        t.numel() * t.element_size() for c in sources.values() for t in c.values()
    )
    stats = {
        "n_cases": len(plan.cases),
        "chunks": len(plan.chunks),
        "chunk_sizes": [len(c.cases) for c in plan.chunks],
        "forwards": runner.forwards,
        "token_layers": runner.token_layers,
        "prefix_reuse": plan.prefix_reuse,
        "sequence_reuse": plan.sequence_reuse,
        "prefix_check_diff": prefix_diff,
        "logits_positions": runner.n_logit_positions,
        "budget_bytes": plan.budget_bytes,
        "bytes_per_case": plan.bytes_per_case,
        "cache_bytes": cache_bytes,
        "seconds": time.perf_counter() - t0,
    }
    sweep = plan.sweep
    return SweepResult(
        sweep=sweep, variant=sweep.intervention, metric=metric.name, labels=[v.label for v in plan.cases],
        values=values, base=base.double().cpu(), stats=stats,
    )


def run_sweep(
    model: LoadedModel,
    sweep: Sweep,
    metric: Metric,
    tokens: torch.Tensor,
    source: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    *,
    budget_bytes: int | None = None,
    max_cases: int | None = None,
    prefix_reuse: bool = True,
    sequence_reuse: bool = True,
    offload: bool = False,
    select: Sequence[int] | None = None,
    base_interventions: Sequence[Intervention] = (),
) -> SweepResult:
    """Run every case of ``sweep`` on ``tokens`` (the base run) and measure ``metric``.

    ``source``: the source run for patching, or the reference for mean/resample ablation,
    as token ids ([prompts or 1, positions]) or as a cache {site: tensor}. ``budget_bytes``:
    memory for one chunk's activations (default a quarter of the free memory);
    ``max_cases`` caps cases per chunk; ``select`` runs only those case indices.
    ``base_interventions`` are part of the base run itself (ROME's embedding noise): every
    case sees them, each prompt row with its own row's edit.
    ``prefix_reuse``: start each chunk at its lowest edited layer from the base run's residual.
    ``sequence_reuse``: when a case edits only positions >= p (and the metric reads no
    earlier position), compute positions p.. only, on the base run's KV cache of 0..p-1.
    The plan (:func:`plan_sweep`) is made first, then executed (:func:`execute_plan`).
    """
    t0 = time.perf_counter()
    plan = plan_sweep(
        model, sweep, metric, tokens, source, budget_bytes=budget_bytes, max_cases=max_cases,
        prefix_reuse=prefix_reuse, sequence_reuse=sequence_reuse, select=select,
        base_interventions=base_interventions,
    )
    result = execute_plan(model, plan, metric, tokens, source, offload=offload)
    result.stats["seconds"] = time.perf_counter() - t0
    return result


__all__ = [
    "DEFAULT_SITE",
    "Case",
    "Chunk",
    "LogProb",
    "LogitDiff",
    "Metric",
    "Prob",
    "Sweep",
    "SweepForwards",
    "SweepPlan",
    "SweepResult",
    "activation_bytes",
    "build_sources",
    "bytes_per_row",
    "default_budget",
    "execute_plan",
    "free_memory_bytes",
    "plan_chunks",
    "plan_sweep",
    "run_sweep",
    "units_within",
    "window_layers",
]
