"""The ranked heads of a stored run, in one call: ``interp heads RUN`` and :func:`interp.heads`.

A head detector's summary (its ``heads``, best first) is printed when it runs; what the store
keeps is the run's final ``head_scores`` table. :class:`HeadRanking` says which metric of that
table orders the heads, in which direction, and which signs of it are a role (memory or context
heads): each plug-in declares its detectors' rankings with :func:`declare_ranking` (the core never
names a detector). A detector that declares none is ranked by the metric named like it, or by its
only metric, highest first (the convention of the dashboard's head maps).

Order: by the oriented score (``sign * value``) descending, ties by (layer, head), heads without
a finite score last, as the detectors order their summaries. A role keeps the heads whose
oriented score has the role's sign, strongest first.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from interp.errors import UserError
from interp.model.layout import Head
from interp.model.prefix import describe_stored

if TYPE_CHECKING:
    from interp.model.loaded import LoadedModel



@dataclass(frozen=True)
class HeadRanking:
    """How a detector's final ``head_scores`` rank its heads.

    ``metric``: the ranking metric; ``sign``: +1 when higher is better, -1 when lower is;
    ``roles``: role name -> the sign (+1 or -1) of the oriented score its heads have;
    ``unit``: the stored unit whose rows hold it (the runner's ``final`` by default).
    """

    metric: str
    sign: int = 1
    roles: Mapping[str, int] = field(default_factory=dict)
    unit: str = "final"

    def __post_init__(self) -> None:
        if self.sign not in (1, -1) or any(s not in (1, -1) for s in self.roles.values()):
            raise ValueError("a ranking's sign and its roles' signs are +1 or -1")


_RANKINGS: dict[str, HeadRanking] = {}


def declare_ranking(detector: str, ranking: HeadRanking) -> None:
    """Say how runs of ``detector`` rank heads (a plug-in calls this when imported)."""
    known = _RANKINGS.get(detector)
    if known is not None and known != ranking:
        raise RuntimeError(f"detector {detector!r} declared two head rankings")
    _RANKINGS[detector] = ranking


def declared_rankings() -> dict[str, HeadRanking]:
    """Every declared ranking, the plug-ins discovered first."""
    from interp.runs.registry import all_detectors

    all_detectors()
    return dict(_RANKINGS)


@dataclass(frozen=True)
class RankedHeads(Sequence[Head]):
    """Heads of one stored run, best first, with what they were found on.

    ``heads`` are (layer, head) pairs, and the object is their sequence (it goes wherever heads
    do: ``ablate_heads``, ``decore_generate``, and ``save_pruned``, whose model card then names
    the run); :attr:`ids` are the CLI's ``LAYER.HEAD`` ids, :meth:`heads_option` the ``--heads``
    value of ``interp prune`` / ``interp decore``.
    """

    run_id: int
    store: str
    detector: str
    variant: str
    model: str
    model_hash: str | None
    prefix: str
    prefix_token: dict[str, Any] | None
    dtype: str | None
    metric: str
    role: str | None
    top: int | None
    heads: list[Head]
    scores: list[float]
    n_ranked: int  # heads in the whole ranking (of the role), before --top

    @property
    def ids(self) -> list[str]:
        return [f"{la}.{h}" for la, h in self.heads]

    def heads_option(self) -> str:
        return ",".join(self.ids)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["heads"] = self.ids
        return out

    def __len__(self) -> int:
        return len(self.heads)

    @overload
    def __getitem__(self, index: int) -> Head: ...

    @overload
    def __getitem__(self, index: slice) -> list[Head]: ...

    def __getitem__(self, index: int | slice) -> Head | list[Head]:
        return self.heads[index]

    def __iter__(self) -> Iterator[Head]:
        return iter(self.heads)


def ranking_for(detector: str, metrics: list[str]) -> HeadRanking:
    """The convention for a detector that declares no ranking: its own name, or its only
    metric, highest first; ``metrics`` are those its run stored."""
    if detector in metrics:
        return HeadRanking(detector)
    if len(metrics) == 1:
        return HeadRanking(metrics[0])
    raise UserError(f"{detector} runs store several head metrics ({', '.join(metrics)}) and the "
                    f"detector declares no ranking among them")


def ranked(scores: Mapping[Head, float], ranking: HeadRanking, role: str | None) -> list[tuple[Head, float]]:
    """(head, score) best first: by ``sign * score`` descending, ties by (layer, head), heads
    without a finite score last; with ``role``, only the heads of the role's sign."""
    def oriented(v: float) -> float:
        return ranking.sign * v if math.isfinite(v) else -math.inf

    order = sorted(scores.items(), key=lambda kv: (not math.isfinite(kv[1]), -oriented(kv[1]), kv[0]))
    if role is None:
        return order
    want = ranking.roles[role]
    kept = [(h, v) for h, v in order if math.isfinite(v) and want * oriented(v) > 0]
    return sorted(kept, key=lambda kv: (-want * oriented(kv[1]), kv[0]))


def _same_model(run: Mapping[str, Any], model: str | LoadedModel) -> bool:
    """A run is of ``model``: a LoadedModel by its weights hash (else its name); a name as the
    store keeps it (a zoo name, a hub id, a local folder's absolute path)."""
    if isinstance(model, str):
        name = model.strip()
        path = Path(name).expanduser()
        if path.is_dir():
            name = str(path.resolve())
        return str(run["model"]) == name
    want = model.provenance.file_sha256 or ""
    stored = run["model_hash"] if isinstance(run["model_hash"], str) else ""
    return stored == want if want else (not stored and str(run["model"]) == model.name)


def _article(word: str) -> str:
    """'a' or 'an' before ``word`` (by its first letter: "an atlas run", "a ph3 run")."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def heads(
    workspace: str | Path | None,
    run: int,
    *,
    top: int | None = None,
    role: str | None = None,
    model: str | LoadedModel | None = None,
) -> RankedHeads:
    """The ranked heads of stored run ``run`` in ``workspace`` (None: ./.interp or
    $INTERP_WORKSPACE): all of them, or the ``top`` first; ``role`` (``memory``, ``context``)
    keeps the heads of that kind where the detector has roles (conflict-heads, ph3). With
    ``model`` (a name or a LoadedModel) a run of another model is refused.
    """
    from interp.runs.store import Store

    if top is not None and top < 1:
        raise UserError(f"top must be >= 1, got {top}")
    with Store(workspace, create=False) as store:
        info = store.run(int(run)).info()
        if model is not None and not _same_model(info, model):
            name = model if isinstance(model, str) else model.name
            raise UserError(f"run {run} is of {info['model']}, not of {name}")
        if info["status"] != "done":
            raise UserError(f"run {run} ({info['detector']}) is {info['status']}: it has no final head scores; "
                            f"rerun its command to finish it")
        detector = str(info["detector"])
        declared = declared_rankings().get(detector)
        final = store.run(int(run)).to_frame("head_scores", declared.unit if declared else "final")
        where = str(store.path.resolve())
    if final.empty:
        raise UserError(f"run {run} is {_article(detector)} {detector} run and holds no head scores: "
                        "`interp heads` reads head-scoring runs (induction, retrieval, conflict-heads, ph3, ...)")
    rule = declared or ranking_for(detector, sorted(str(m) for m in final["metric"].unique()))
    if role is not None and role not in rule.roles:
        have = f"roles {', '.join(rule.roles)}" if rule.roles else "no roles"
        raise UserError(f"run {run} ({detector}) has {have}; --role {role} is not one of them")
    rows = final[final["metric"] == rule.metric]
    if rows.empty:
        raise UserError(f"run {run} ({detector}) holds no {rule.metric!r} head scores")
    means = rows.groupby(["layer", "head"])["value"].mean()
    scores = {(int(la), int(h)): float(v) for (la, h), v in means.items()}  # type: ignore[misc]
    order = ranked(scores, rule, role)
    if not order:
        raise UserError(f"run {run} ({detector}) ranks no {role} heads: no head has a {role} head's sign of {rule.metric}")
    kept = order[:top] if top is not None else order
    provenance: dict[str, Any] = info["provenance"]
    dtype = provenance.get("dtype")
    return RankedHeads(
        run_id=int(run), store=where, detector=detector, variant=str(info["variant"]), model=str(info["model"]),
        model_hash=info["model_hash"] or None, prefix=describe_stored(provenance.get("prefix")),
        prefix_token=provenance.get("prefix"), dtype=str(dtype).removeprefix("torch.") if dtype else None, metric=rule.metric, role=role,
        top=top, heads=[h for h, _ in kept], scores=[v for _, v in kept], n_ranked=len(order),
    )


__all__ = ["HeadRanking", "RankedHeads", "declare_ranking", "declared_rankings", "heads", "ranked", "ranking_for"]
