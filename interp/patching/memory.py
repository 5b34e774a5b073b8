"""Memory estimates: free memory per device, bytes per batch row, and the chunk budget."""

from __future__ import annotations

import torch

from interp.model.loaded import LoadedModel


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
