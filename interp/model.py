"""A loaded model: the HF module, its tokenizer, its shape, its provenance and a hook backend."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch

from interp.errors import UserError
from interp.prefix import PromptPrefix, choose_prefix

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from interp.backends import Backend, RunOutput
    from interp.interventions import Intervention, Sources

BackendName = Literal["bridge", "nnsight"]


@dataclass(frozen=True)
class ModelInfo:
    """The shape of a decoder-only transformer, read from its HF config."""

    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    vocab_size: int
    max_positions: int

    @property
    def n_total_heads(self) -> int:
        return self.n_layers * self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads per kv head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_config(cls, config: Any) -> ModelInfo:
        text = getattr(config, "text_config", None) or config
        n_heads = int(getattr(text, "num_attention_heads", None) or text.n_head)
        d_model = int(getattr(text, "hidden_size", None) or text.n_embd)
        n_kv = int(getattr(text, "num_key_value_heads", None) or n_heads)
        d_head = int(getattr(text, "head_dim", None) or d_model // n_heads)
        n_layers = int(getattr(text, "num_hidden_layers", None) or text.n_layer)
        max_pos = int(
            getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or 2048
        )
        archs = getattr(config, "architectures", None) or [type(config).__name__]
        return cls(
            architecture=str(archs[0]),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            d_head=d_head,
            d_model=d_model,
            vocab_size=int(text.vocab_size),
            max_positions=max_pos,
        )


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
    # The prompt prefix (interp.prefix.PromptPrefix.to_dict()), set by LoadedModel.
    prefix: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoadedModel:
    """The HF model and tokenizer, plus the hook backend every detector goes through.

    ``prefix`` is the token raw-text prompts start with (:mod:`interp.prefix`); by default the
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
        self.hf = hf
        self.tokenizer = tokenizer
        self.prefix = prefix if prefix is not None else choose_prefix(tokenizer, hf.config)
        self.provenance = replace(provenance, prefix=self.prefix.to_dict())
        self.info = ModelInfo.from_config(hf.config)
        self.backend_name: BackendName = backend
        self._backend: Backend | None = None

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
            from interp.backends import make_backend

            self._backend = make_backend(self.backend_name, self)
        return self._backend

    def check_head(self, layer: int, head: int) -> None:
        if not 0 <= layer < self.info.n_layers:
            raise UserError(f"layer {layer} out of range: {self.name} has layers 0..{self.info.n_layers - 1}")
        if not 0 <= head < self.info.n_heads:
            raise UserError(f"head {head} out of range: {self.name} has heads 0..{self.info.n_heads - 1}")

    def check_length(self, n_tokens: int) -> None:
        if n_tokens > self.info.max_positions:
            raise UserError(
                f"prompt of {n_tokens} tokens is longer than {self.name}'s context of {self.info.max_positions}"
            )

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
        With ``use_cache`` (or a ``past_key_values`` from an earlier output) the bridge
        backend steps HF's KV cache, for decoding. ``last_logits_only`` returns the logits of
        the last position alone, [batch, 1, vocab], computed only there where the model allows.
        """
        if past_key_values is None:
            self.check_length(int(input_ids.shape[-1]))
        kwargs: dict[str, Any] = {}
        keep = last_logits_only and self.backend_name == "bridge" and _takes_logits_to_keep(self.hf)
        if keep:
            # The unembedding of every position is a fifth of a small model's forward pass.
            kwargs["forward_kwargs"] = {"logits_to_keep": 1}
        out = self.backend.run(
            input_ids.to(self.device),
            interventions=interventions,
            cache=cache,
            sources=sources,
            attention_mask=attention_mask,
            grad=grad,
            cache_to_cpu=cache_to_cpu,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
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
