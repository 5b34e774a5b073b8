"""The base of detectors that run over known facts (causal tracing, attention knockout): facts
loaded, checked against the model, one unit per known fact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np
import pandas as pd
import torch

from circuits.data.facts import Fact, file_hash, known_facts, load_facts
from circuits.methods.tracing import (
    prepare,
    prepare_fact,
)
from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.runs import tables
from interp.runs.config import DetectorConfig, param
from interp.runs.registry import Detector, UnitResult
from interp.runs.units import Unit

if TYPE_CHECKING:
    pass


KNOWN_METRICS = ("n_facts_in_file", "n_facts_checked", "n_known", "fraction_known")


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

    def units(self, model: LoadedModel, cfg: F) -> list[Unit]:
        if cfg.single:
            prepare(model, cfg.prompt, cfg.subject, cfg.answer)
            return [Unit("fact")]
        known = self._known(model, cfg)
        chosen = known[known["known"]]["index"].tolist()[: cfg.limit]
        if not chosen:
            raise UserError(f"{model.name} knows none of the {len(known)} facts: nothing to trace")
        return [Unit("known"), *(Unit("fact", int(i)) for i in chosen)]

    def example_tokens(self, model: LoadedModel, cfg: F) -> torch.Tensor:
        # The prompt given on the command line, else the file's first fact (every fact of a
        # file is a prompt of the same form; picking a known one would need the filter).
        fact = self._fact_of(model, cfg, Unit("fact") if cfg.single else Unit("fact", 0))
        return prepare_fact(model, fact).tokens

    def _fact_of(self, model: LoadedModel, cfg: F, unit: Unit) -> Fact:
        if unit.index is None:
            return Fact(cfg.subject, cfg.prompt, cfg.answer, id="prompt")
        try:
            return self._facts(model, cfg)[unit.index]
        except IndexError:
            raise UserError(f"unknown unit {unit}") from None

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
