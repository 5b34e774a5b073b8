"""Attention heads as (layer, head) pairs: parsing, labels, rankings and random control sets.

Grammar of a head list (``--heads``, the ``heads`` parameters): comma-separated heads, each
``LAYER.HEAD`` (``12.3``) or ``L<layer>H<head>`` (``L12H3``, any case), the form
:func:`head_label` prints; spaces around a head are ignored. A head listed twice is an error,
and with a model given every index is checked against it.

Random control heads: :func:`random_heads` is the one draw every intervention detector compares
its top heads against (Wu et al. 2024 for retrieval masking; Jin et al. 2024 for PH3; Gema et
al. 2024 for DeCoRe; the episodic ablation). Each stored result depends on its exact draws, so
the caller hands in its seeded generator (``random.Random`` or a numpy ``Generator``) and the
order of the candidates.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from interp.errors import UserError
from interp.model.layout import Head

if TYPE_CHECKING:
    from interp.model.loaded import LoadedModel
    from interp.runs.registry import Summary

_HEAD = re.compile(r"(\d+)\.(\d+)|L(\d+)H(\d+)", re.IGNORECASE)


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def all_heads(model: LoadedModel) -> list[Head]:
    """Every query head of the model, layer by layer."""
    return [(la, h) for la in range(model.info.n_layers) for h in range(model.info.n_heads)]


def check_heads(heads: Iterable[Sequence[int]], model: LoadedModel | None = None) -> list[Head]:
    """(layer, head) pairs as int tuples (JSON gives lists), each in range for ``model`` when
    given; a head listed twice is an error."""
    out: list[Head] = []
    for layer, head in heads:
        pair = (int(layer), int(head))
        if model is not None:
            model.check_head(*pair)
        if pair in out:
            raise UserError(f"head {head_label(*pair)} listed twice")
        out.append(pair)
    return out


def parse_heads(text: str, model: LoadedModel | None = None) -> list[Head]:
    """'12.3,L4H1' -> [(12, 3), (4, 1)], in the given order. Without a model only the syntax
    and duplicates are checked (parameter checks run before any model is loaded)."""
    pairs = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = _HEAD.fullmatch(part)
        if m is None:
            raise UserError(f"bad head {part!r}: write heads as LAYER.HEAD or LxHy, comma-separated, e.g. 12.3,L4H1")
        layer, head = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        pairs.append((int(layer), int(head)))
    if not pairs:
        raise UserError("no heads given (write them as LAYER.HEAD,LAYER.HEAD, e.g. 12.3,4.1)")
    return check_heads(pairs, model)


def ranking_from_summary(summary: Summary) -> list[Head]:
    """A head detector's ranking, best first, from its summary (empty when it scored none)."""
    return [(int(h["layer"]), int(h["head"])) for h in summary.heads or []]


def random_heads(
    candidates: Sequence[Head], exclude: Iterable[Sequence[int]], k: int, rng: random.Random | np.random.Generator
) -> list[Head]:
    """``k`` heads drawn without replacement from ``candidates`` minus ``exclude``, sorted.

    Exclusion rule: a head in ``exclude`` is never drawn; heads are compared as (int, int)
    tuples, so heads given as lists (JSON) are excluded too (the DeCoRe reference compares
    tuples with lists, so its control can draw the retrieval heads it masks). Fewer than
    ``k`` heads left is an error. The callers exclude at least the heads they intervene on.

    The draw depends on the order of ``candidates`` and on the generator, which is the
    caller's and advances: ``random.Random`` draws ``rng.sample(pool, k)``, a numpy
    ``Generator`` draws ``rng.choice(len(pool), k, replace=False)`` indices into the pool.
    """
    if k < 0:
        raise UserError(f"cannot draw {k} heads: k must be >= 0")
    excluded = {(int(la), int(h)) for la, h in exclude}
    pool = [hd for hd in candidates if hd not in excluded]
    if len(pool) < k:
        raise UserError(f"only {len(pool)} heads lie outside the {len(excluded)} excluded ones; cannot draw {k}")
    if isinstance(rng, random.Random):
        return sorted(rng.sample(pool, k))
    return sorted(pool[int(j)] for j in rng.choice(len(pool), size=k, replace=False))


__all__ = [
    "Head",
    "all_heads",
    "check_heads",
    "head_label",
    "parse_heads",
    "random_heads",
    "ranking_from_summary",
]
