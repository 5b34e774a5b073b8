"""Units of work and their parts, as typed values.

A detector's run is a list of :class:`Unit` values, each committed to the store on its own
under its :attr:`Unit.key`, so an interrupted run resumes without redoing finished units. A
large unit may be computed in :class:`Part` values on several workers and joined; the base of
the executors (:mod:`interp.runs.executors`) decides how many parts, never a detector and never
one executor.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Unit:
    """One unit of a run's work.

    Attributes:
        group: what kind of work it is ("batch", "fact", "random", "format", "ov"...).
        index: its place within the group (the batch number, the fact's index, the draw), or
            None when the group has one unit.
        label: a readable name that stands for the unit in the store instead of group and
            index (a needle sample's "len300-depth0.50-needle1", a prompt format's name); the
            code never reads it back, it uses ``index``.
    """

    group: str
    index: int | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        if not self.group:
            raise ValueError("a unit needs a group")
        if self.index is not None and self.index < 0:
            raise ValueError(f"unit index must be >= 0, got {self.index}")

    @property
    def key(self) -> str:
        """The unit's name in the store: stable across versions, since a resumed run matches its
        committed units by it."""
        if self.label is not None:
            return self.label
        return self.group if self.index is None else f"{self.group}-{self.index}"

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class Part:
    """Part ``index`` of ``count`` of a unit, computed apart and joined in index order.

    A detector takes its contiguous share of the unit's work from (index, count), e.g. with
    :meth:`share`.
    """

    unit: Unit
    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"part {self.index} of {self.count} does not exist")

    def share(self, n_items: int) -> range:
        """This part's contiguous share of ``n_items`` items (the first parts take one more when
        they do not divide evenly)."""
        base, extra = divmod(n_items, self.count)
        start = self.index * base + min(self.index, extra)
        return range(start, start + base + (1 if self.index < extra else 0))

    def __str__(self) -> str:
        return f"{self.unit.key} part {self.index + 1}/{self.count}"


Task = Unit | Part
"""What an executor computes: a whole unit, or one part of one."""


