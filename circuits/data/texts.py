"""Natural text for the episodic-ablation detector: a public-domain sample cut into token chunks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from interp.errors import UserError
from interp.model.loaded import LoadedModel

if TYPE_CHECKING:
    pass


DATA_DIR = Path(__file__).resolve().parents[1] / "data"


TEXT_SAMPLE = DATA_DIR / "public_domain_sample.txt"


def text_chunks(model: LoadedModel, n: int, seq_len: int, path: Path = TEXT_SAMPLE) -> torch.Tensor:
    """Non-overlapping windows of the text sample: the prompt prefix (when the model has one)
    + tokens."""
    ids = model.tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    body = seq_len - len(model.prefix)
    available = len(ids) // body
    if available < 1:
        raise UserError(f"the text sample has {len(ids)} tokens: not one window of {seq_len}")
    n = min(n, available) if n > 0 else available
    rows = torch.tensor(ids[: n * body]).reshape(n, body)
    prefix = torch.tensor(model.prefix.ids, dtype=torch.long).expand(n, len(model.prefix))
    return torch.cat([prefix, rows], dim=1)
