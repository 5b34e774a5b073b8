"""A loaded model: the HF module, its tokenizer, its shape, its provenance and a hook backend."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch

from interp.errors import UserError
from interp.model.backends import Backend, RunOutput, make_backend
from interp.model.layout import Layout, ModelInfo, layout_of
from interp.model.prefix import PromptPrefix, choose_prefix

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from interp.model.interventions import Intervention, Sources
    from interp.model.spec import ModelSpec

BackendName = Literal["bridge", "nnsight"]


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("interp-workbench", "torch", "transformers", "transformer-lens", "nnsight"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "absent"
    return out


@dataclass
class Provenance:
    """Where the weights came from: stored with every result."""

    model_id: str
    source: Literal["zoo", "local", "hub", "object"]
    file_sha256: str | None
    dtype: str
    device: str
    versions: dict[str, str] = field(default_factory=library_versions)
    # The prompt prefix (interp.model.prefix.PromptPrefix.to_dict()), set by LoadedModel.
    prefix: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoadedModel:
    """The HF model and tokenizer, plus the hook backend every detector goes through.

    ``prefix`` is the token raw-text prompts start with (:mod:`interp.model.prefix`); by default the
    rule there picks it from the tokenizer. It is part of the provenance of every result.
    """

    def __init__(
        self,
        hf: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        provenance: Provenance,
        backend: BackendName = "bridge",
        prefix: PromptPrefix | None = None,
    ) -> None:
        hf.eval()
        # The layout first: an architecture the workbench cannot hook (an encoder, a
        # state-space model) is a UserError naming what it lacks, before any run can start.
        self._layout: Layout | None = layout_of(hf)
        self.hf = hf
        self.tokenizer = tokenizer
        self.prefix = prefix if prefix is not None else choose_prefix(tokenizer, hf.config)
        self.provenance = replace(provenance, prefix=self.prefix.to_dict())
        self.info = ModelInfo.from_config(hf.config)
        self.backend_name: BackendName = backend
        self._backend: Backend | None = None
        # How to load this model again in another process (set by interp.load_model for a model
        # loaded by name; None for a model passed as an object).
        self.spec: ModelSpec | None = None

    @property
    def name(self) -> str:
        return self.provenance.model_id

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = make_backend(self.backend_name, self.hf, self.tokenizer, self.info, self.name)
        return self._backend

    @property
    def layout(self) -> Layout:
        """Where the HF module keeps its parts (:mod:`interp.model.layout`); a UserError for an
        architecture the workbench has no layout for."""
        if self._layout is None:
            self._layout = layout_of(self.hf)
        return self._layout

    def check_head(self, layer: int, head: int) -> None:
        self.info.check_head(layer, head, self.name)

    def check_length(self, n_tokens: int) -> None:
        self.info.check_length(n_tokens, self.name)

    def to_tokens(self, text: str | list[str], prefix: bool = True) -> torch.Tensor:
        """Tokenise one raw text (or several of equal token length), after the prompt prefix
        unless ``prefix=False``."""
        texts = [text] if isinstance(text, str) else text
        rows = [self.encode(t, prefix) for t in texts]
        if len({len(r) for r in rows}) != 1:
            raise UserError("texts have different token lengths; pad them explicitly")
        self.check_length(len(rows[0]))
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def encode(self, text: str, prefix: bool = True) -> list[int]:
        """One raw text's token ids, after the prompt prefix unless ``prefix=False``."""
        ids = [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
        return [*self.prefix.ids, *ids] if prefix else ids

    def run(
        self,
        input_ids: torch.Tensor,
        *,
        interventions: Sequence[Intervention] = (),
        cache: Sequence[str] = (),
        sources: Sources | None = None,
        attention_mask: torch.Tensor | None = None,
        grad: bool = False,
        cache_to_cpu: bool = False,
        past_key_values: Any = None,
        use_cache: bool = False,
        last_logits_only: bool = False,
    ) -> RunOutput:
        """Run the model with interventions applied and the given sites cached.

        ``cache`` takes site names or globs (``"z.*"``); ``sources`` maps a run name to a
        cache, for patching and mean/resample ablation. Hooks never outlive the call.
        With ``use_cache`` (or a ``past_key_values`` from an earlier output) a backend with
        the ``kv_cache`` capability steps HF's KV cache, for decoding. ``last_logits_only``
        returns the logits of the last position alone, [batch, 1, vocab], computed only there
        where the backend and the model allow.
        """
        if past_key_values is None:
            self.check_length(int(input_ids.shape[-1]))
        backend = self.backend
        keep = last_logits_only and backend.capabilities.forward_kwargs and _takes_logits_to_keep(self.hf)
        out = backend.run(
            input_ids.to(self.device),
            interventions=interventions,
            cache=cache,
            sources=sources,
            attention_mask=attention_mask,
            grad=grad,
            cache_to_cpu=cache_to_cpu,
            past_key_values=past_key_values,
            use_cache=use_cache,
            # The unembedding of every position is a fifth of a small model's forward pass.
            forward_kwargs={"logits_to_keep": 1} if keep else None,
        )
        if last_logits_only and not keep:
            out = replace(out, logits=out.logits[:, -1:])
        return out

    def __repr__(self) -> str:
        i = self.info
        return (
            f"LoadedModel({self.name!r}, {i.architecture}, {i.n_layers}x{i.n_heads} heads "
            f"({i.n_kv_heads} kv), backend={self.backend_name}, {self.dtype}, {self.device})"
        )


def _takes_logits_to_keep(hf: Any) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(hf.forward).parameters
