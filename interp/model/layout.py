"""Where a decoder's parts live, per architecture family, and its shape from the HF config.

One :class:`Layout` per supported family, in the spirit of TransformerLens's
``model_bridge/supported_architectures`` adapters and nnsight's ``RenameConfig``: a frozen
record of attribute paths on the plain Hugging Face module (decoder layers, attention and its
q/k/v/o projections, the MLP, the norms, the embedding and unembedding). :func:`layout_of` picks
it from the config's ``model_type`` in this one place; nothing else asks which family a model is.

The TransformerLens bridge rewires the HF module tree in place (each HF module is kept inside
its wrapper as ``_original_component``), so :func:`resolve` unwraps at every step: the same
paths work on a bridged model and on a plain one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from interp.errors import UserError

Head = tuple[int, int]
"""A query head: (its layer, its index among the layer's query heads)."""


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
    d_mlp: int

    @property
    def n_total_heads(self) -> int:
        return self.n_layers * self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads per kv head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def check_head(self, layer: int, head: int, name: str) -> None:
        """A one-line error unless (layer, head) is a query head of this shape (``name``: the
        model's, for the message)."""
        if not 0 <= layer < self.n_layers:
            raise UserError(f"layer {layer} out of range: {name} has layers 0..{self.n_layers - 1}")
        if not 0 <= head < self.n_heads:
            raise UserError(f"head {head} out of range: {name} has heads 0..{self.n_heads - 1}")

    def check_length(self, n_tokens: int, name: str) -> None:
        """A one-line error when ``n_tokens`` exceed the model's positions."""
        if n_tokens > self.max_positions:
            raise UserError(f"prompt of {n_tokens} tokens is longer than {name}'s context of {self.max_positions}")

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
        # GPT-2 leaves n_inner unset for its default of 4 d_model.
        d_mlp = int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * d_model)
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
            d_mlp=d_mlp,
        )


# Roles by where their path starts: the whole model, one decoder layer, its attention module.
MODEL_ROLES = ("decoder", "layers", "embed", "final_norm", "unembed")
LAYER_ROLES = ("layer", "attn", "attn_norm", "mlp", "attn_post_norm", "mlp_post_norm", "mlp_norm")
ATTN_ROLES = ("q", "k", "v", "qkv", "o")
# Roles a family may lack (None in its Layout): a fused qkv, or no norm after a sublayer.
OPTIONAL_ROLES = ("q", "k", "v", "qkv", "attn_post_norm", "mlp_post_norm", "mlp_norm")


@dataclass(frozen=True)
class Layout:
    """Attribute paths of one architecture family (dotted; a number indexes a module list).

    Model-level paths start at the ``...ForCausalLM`` module; ``attn``, ``attn_norm`` and
    ``mlp`` at a decoder layer; the projections at the attention module. A family has either
    separate ``q``/``k``/``v`` projections or one fused ``qkv`` whose output is [q | k | v].

    Gemma 2/3 differ from Llama in facts a reader of the weights must know (Gemma Team 2024,
    "Gemma 2", sec. 2; Gemma Team 2025, "Gemma 3 Technical Report", sec. 2): a norm on each
    sublayer's output before it joins the residual (``attn_post_norm``, ``mlp_post_norm``),
    RMSNorm scaling by (1 + w) (``norm_offset``), and embeddings multiplied by sqrt(d_model)
    inside the embedding module (``embed_scale``: the module attribute holding the factor).
    """

    family: str
    decoder: str  # the decoder stack: embedding, layers, final norm
    layers: str
    embed: str
    final_norm: str
    unembed: str
    attn: str
    attn_norm: str  # the norm on the attention input
    mlp: str
    o: str  # input: z, the heads concatenated; output: the attention output
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    # GPT-2's Conv1D stores its weight [in, out]; nn.Linear stores [out, in].
    weight_in_out: bool = False
    attn_post_norm: str | None = None  # a norm between the attention output and the residual
    mlp_post_norm: str | None = None  # likewise after the MLP
    norm_offset: float = 0.0  # a norm scales by (norm_offset + w)
    embed_scale: str | None = None  # attribute of the embedding module that scales its output
    # The norm on the MLP's input (Llama's post_attention_layernorm, Gemma's
    # pre_feedforward_layernorm, GPT-2's ln_2): path patching recomputes it on an edited input.
    mlp_norm: str | None = None

    @property
    def fused_qkv(self) -> bool:
        return self.qkv is not None

    @property
    def attn_out_direct(self) -> bool:
        """Whether the attention output joins the residual as it is, so a head's output
        z_h W_O is its exact additive share there (false under a post-attention norm)."""
        return self.attn_post_norm is None

    def out_role(self, sublayer: str) -> str:
        """The role whose output a sublayer (``attn`` or ``mlp``) adds to the residual: its
        post-norm where the family has one, else the sublayer itself."""
        post = self.attn_post_norm if sublayer == "attn" else self.mlp_post_norm
        return f"{sublayer}_post_norm" if post is not None else sublayer

    def norm_scale(self, hf: torch.nn.Module, role: str, layer: int | None = None) -> torch.Tensor:
        """The elementwise factor of the norm at ``role`` (its weight, plus the family's
        offset: Gemma's RMSNorm computes x / rms(x) * (1 + w)), detached."""
        w = tensor_of(self.module(hf, role, layer))
        return w + self.norm_offset if self.norm_offset else w

    def embedding(self, hf: torch.nn.Module) -> torch.Tensor:
        """[vocab, d_model]: each token's embedding as the embedding module outputs it (Gemma
        scales the weight by sqrt(d_model) in its forward), detached."""
        mod = self.module(hf, "embed")
        w = tensor_of(mod)
        if self.embed_scale is None:
            return w
        return w * torch.as_tensor(getattr(mod, self.embed_scale), dtype=w.dtype, device=w.device)

    def path(self, role: str, layer: int | None = None) -> str:
        """The dotted path of ``role`` (of decoder layer ``layer`` for per-layer roles)."""
        if role in MODEL_ROLES:
            return str(getattr(self, role))
        if role not in LAYER_ROLES + ATTN_ROLES:
            raise ValueError(f"unknown layout role {role!r}")
        if layer is None:
            raise ValueError(f"{role} is per layer: give layer=")
        at = f"{self.layers}.{layer}"
        if role == "layer":
            return at
        name = getattr(self, role)
        if name is None and role in ATTN_ROLES:
            fused = "fused into " + str(self.qkv) if self.fused_qkv else "absent"
            raise UserError(f"the {self.family} layout has no separate {role} projection ({fused})")
        if name is None:
            raise UserError(f"the {self.family} layout has no {role}")
        if role in LAYER_ROLES:
            return f"{at}.{name}"
        return f"{at}.{self.attn}.{name}"

    def module(self, hf: torch.nn.Module, role: str, layer: int | None = None, *, live: bool = False) -> Any:
        """The plain HF module of ``role``; with ``live``, the module the forward pass calls
        there (the bridge's wrapper on a bridged model), which is where hooks belong."""
        return resolve(hf, self.path(role, layer), live=live)

    def weight(self, hf: torch.nn.Module, role: str, layer: int) -> torch.Tensor:
        """A projection's weight as [out, in] (detached; a transposed view for Conv1D)."""
        w = tensor_of(self.module(hf, role, layer))
        return w.T if self.weight_in_out else w

    def value_weight(self, hf: torch.nn.Module, layer: int, info: ModelInfo) -> torch.Tensor:
        """W_V of every kv head, [n_kv_heads * d_head, d_model] as [out, in]."""
        if not self.fused_qkv:
            return self.weight(hf, "v", layer)
        start = (info.n_heads + info.n_kv_heads) * info.d_head
        return self.weight(hf, "qkv", layer)[start : start + info.n_kv_heads * info.d_head]

    def qkv_sizes(self, info: ModelInfo) -> tuple[int, int, int]:
        """Output widths of q, k and v inside the fused projection."""
        kv = info.n_kv_heads * info.d_head
        return info.n_heads * info.d_head, kv, kv

    def first_missing(self, hf: torch.nn.Module) -> str | None:
        """The first path of this layout that ``hf`` lacks (checked on layer 0), with its role,
        or None."""
        roles = [(r, None) for r in MODEL_ROLES] + [(r, 0) for r in LAYER_ROLES + ATTN_ROLES]
        for role, layer in roles:
            if role in OPTIONAL_ROLES and getattr(self, role) is None:
                continue
            path = self.path(role, layer)
            try:
                mod = resolve(hf, path)
            except (AttributeError, IndexError, KeyError, TypeError):
                return f"{path} ({role})"
            if role == "embed" and self.embed_scale is not None and not hasattr(mod, self.embed_scale):
                return f"{path}.{self.embed_scale} (embedding scale)"
        return None


LLAMA_LIKE = Layout(
    family="llama-like",
    decoder="model",
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    attn="self_attn",
    attn_norm="input_layernorm",
    mlp="mlp",
    q="q_proj",
    k="k_proj",
    v="v_proj",
    o="o_proj",
    mlp_norm="post_attention_layernorm",
)

GPT2_LIKE = Layout(
    family="gpt2-like",
    decoder="transformer",
    layers="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    attn="attn",
    attn_norm="ln_1",
    mlp="mlp",
    qkv="c_attn",
    o="c_proj",
    weight_in_out=True,
    mlp_norm="ln_2",
)

# Gemma keeps Llama's module paths; what differs is what a reader of the weights must know.
GEMMA_LIKE = replace(
    LLAMA_LIKE,
    family="gemma-like",
    # Gemma's post_attention_layernorm normalises the attention output (Llama's module of that
    # name is the MLP's input norm; Gemma's is pre_feedforward_layernorm).
    attn_post_norm="post_attention_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
    norm_offset=1.0,
    embed_scale="embed_scale",
    mlp_norm="pre_feedforward_layernorm",
)

# The config's model_type -> its family. Gemma 3 counts in its text-only form (Gemma3ForCausalLM).
# Qwen2 is Llama's layout: its q/k/v biases live inside the projections.
MODEL_TYPES: dict[str, Layout] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "gemma3_text": GEMMA_LIKE,
    "gpt2": GPT2_LIKE,
}
# Gemma first: a Gemma port has every Llama path too, and the Llama layout would ignore its norms.
FAMILIES: tuple[Layout, ...] = (GEMMA_LIKE, LLAMA_LIKE, GPT2_LIKE)


def layout_of(hf: torch.nn.Module) -> Layout:
    """The layout of ``hf``, chosen by its config's ``model_type``.

    A model type not in :data:`MODEL_TYPES` gets the family whose every path it has (many HF
    ports reuse the Llama names); otherwise, and when a listed type lacks a path of its family,
    a UserError names what is missing.
    """
    config = getattr(hf, "config", None)
    model_type = str(getattr(config, "model_type", "") or "")
    # The class name, not ModelInfo: a config without attention heads (a state-space model)
    # has no ModelInfo, and this error must still name it.
    arch = str((getattr(config, "architectures", None) or [type(hf).__name__])[0])
    known = MODEL_TYPES.get(model_type)
    gaps: dict[str, str] = {}
    for layout in [known] if known is not None else FAMILIES:
        gap = layout.first_missing(hf)
        if gap is None:
            return layout
        gaps[layout.family] = gap
    if known is not None:
        raise UserError(f"{arch} (model_type {model_type!r}) should have the {known.family} layout "
                        f"but has no module at {gaps[known.family]}")
    tried = "; ".join(f"{family}: no {gap}" for family, gap in gaps.items())
    raise UserError(f"unsupported architecture {arch} (model_type {model_type!r}): {tried}. "
                    f"Known model types: {', '.join(MODEL_TYPES)}")


def tensor_of(module: Any, name: str = "weight") -> torch.Tensor:
    """A module's parameter ``name``, detached, with its values also where a device map
    offloaded it: accelerate then keeps the parameter on the meta device and its hook loads it
    into place for each forward pass, so it is read from the hook's weights map and put on the
    hook's execution device, where that forward would use it."""
    value = getattr(module, name)
    if value.device.type != "meta":
        return value.detach()
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        weights = getattr(h, "weights_map", None)
        if weights is not None and name in weights:
            return weights[name].detach().to(h.execution_device)
    raise UserError(f"the {name} of {type(module).__name__} has no values (meta device, no offload hook holds it)")


def unwrap(module: Any) -> Any:
    """The HF module inside a TransformerBridge wrapper (the module itself when unwrapped)."""
    while isinstance(module, torch.nn.Module):
        inner = module._modules.get("_original_component")
        if inner is None:
            break
        module = inner
    return module


def resolve(root: Any, path: str, *, live: bool = False) -> Any:
    """Follow ``path`` from ``root``, through the HF modules inside any bridge wrappers.

    The last step returns the plain HF module, or with ``live`` the module its HF parent holds
    there (the bridge's wrapper on a bridged model: what the forward pass calls).
    """
    obj = unwrap(root)
    parts = path.split(".")
    for i, part in enumerate(parts):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        if i < len(parts) - 1 or not live:
            obj = unwrap(obj)
    return obj


def walk(root: Any, path: str) -> Any:
    """Follow ``path`` by attribute and index only (for proxies such as nnsight's envoys)."""
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def unembedding(hf: Any) -> Any:
    """The unembedding as a plain module, through HF's own accessor: every causal LM has one,
    so callers that need only this work on any architecture."""
    return unwrap(hf.get_output_embeddings())


__all__ = [
    "FAMILIES",
    "GEMMA_LIKE",
    "GPT2_LIKE",
    "LLAMA_LIKE",
    "MODEL_TYPES",
    "Layout",
    "ModelInfo",
    "layout_of",
    "resolve",
    "unembedding",
    "unwrap",
    "walk",
]
