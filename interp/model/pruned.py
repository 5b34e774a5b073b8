"""A pruned model on disk: zero ablation of attention heads baked into a plain Hugging Face folder.

:func:`save_pruned` writes what ``AutoModelForCausalLM.from_pretrained`` (or an evaluation
harness, a serving engine) loads without this package: config, safetensors weights, tokenizer,
generation config, and a model card (``README.md``) naming the source model, the heads, the run
they came from and the exact intervention, with ``interp_pruning.json`` holding the same record
for programs.

Why zeroing columns of the output projection is exactly zero ablation of the head (the run-time
``AblateHeads(method="zero")`` on z, PH3's pruning, Jin et al. 2024, sec. 3.3):

- the output projection is linear in z, the query heads' outputs concatenated:
  ``out = W_O z + b = sum_h W_O[:, h] z_h + b``, and head h's z_h enters only through its own
  d_head columns ``W_O[:, h]``. Zeroing those columns removes exactly z_h's term, at every
  position and for every input, as zeroing z_h does; every other term is the same product;
- the bias ``b`` (GPT-2 has one) is not per head: run-time zero ablation keeps it, so it stays;
- under grouped-query attention the key and value projections are shared by all query heads of a
  group: they are never touched (zeroing a kv head's slice would ablate its whole group);
- Gemma 2/3's post-attention norm acts on the output projection's output, which is the same
  tensor as under run-time ablation, so the norm sees the same input and gives the same output;
- GPT-2's ``c_proj`` is a Conv1D that stores its weight as [in, out]: the head's slice of the
  INPUT axis is zeroed there (rows of the stored matrix); :mod:`interp.model.layout` says which
  axis (``weight_in_out``), so nothing here names an architecture.

Mean ablation cannot be baked in this way: it replaces z_h by a reference run's mean m_h, which
adds the constant ``W_O[:, h] m_h`` to the output, a bias that Llama, Qwen2 and Gemma's output
projections do not have (and that depends on the reference data); it is refused.

The folder is written into a temporary folder beside the target and renamed into place at the
end, so a failure leaves nothing half-written (and, with ``overwrite``, the old folder intact).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from interp.errors import UserError
from interp.model.layout import Head, Layout, ModelInfo, layout_of, resolve, tensor_of, unwrap
from interp.model.loaded import LoadedModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

RECORD_NAME = "interp_pruning.json"
METHODS_REFUSED = {
    "mean": "mean ablation adds W_O[:, h] m_h (a reference run's mean m_h) to the output: a bias that "
            "Llama, Qwen2 and Gemma's output projections do not have, and that depends on the reference data",
    "resample": "resample ablation takes each row's z from another run: no fixed weights do that",
    "uniform": "uniform attention zeroes the head's query; only zero ablation of z is baked here",
}


@runtime_checkable
class HeadsFromRun(Protocol):
    """Heads with the stored run they came from (:class:`interp.runs.heads.RankedHeads`)."""

    @property
    def heads(self) -> list[Head]: ...

    def to_dict(self) -> dict[str, Any]: ...


def save_pruned(
    model: LoadedModel | PreTrainedModel,
    heads: Sequence[Sequence[int]] | HeadsFromRun,
    path: str | os.PathLike[str],
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    method: str = "zero",
    overwrite: bool = False,
) -> Path:
    """Save ``model`` with the query ``heads`` ((layer, head) pairs, or the result of
    :func:`interp.heads`, whose run the card then names) zero-ablated in its weights.

    ``model`` is a LoadedModel (its tokenizer and provenance are used) or a plain HF model (give
    ``tokenizer``); it is not modified. Weights keep the model's dtype. Returns the folder.
    A non-empty existing folder needs ``overwrite``; bad heads, an unwritable place or another
    ``method`` than ``zero`` are UserErrors before anything is written.
    """
    if method != "zero":
        reason = METHODS_REFUSED.get(method, "only zero ablation can be baked into weights")
        raise UserError(f"cannot bake {method!r} ablation into weights exactly: {reason}")
    hf, tok, source = _parts(model, tokenizer)
    info, layout = ModelInfo.from_config(hf.config), layout_of(hf)
    pairs, run = (heads.heads, heads.to_dict()) if isinstance(heads, HeadsFromRun) else (heads, None)
    chosen = checked_heads(pairs, info)
    target = check_target(Path(path), overwrite)
    state, skeleton = plain_state_dict(hf)
    changed = zero_head_columns(state, layout, info, chosen)
    record = {
        "source": source,
        "heads": [f"{la}.{h}" for la, h in chosen],
        "run": run,
        "intervention": {"method": "zero", "site": "z (each query head's output, before the output projection)",
                         "positions": "all", "baked_into": changed},
        "dtype": str(next(iter(state.values())).dtype).removeprefix("torch."),
    }

    def write(folder: Path) -> None:
        skeleton.save_pretrained(folder, state_dict=state)
        tok.save_pretrained(folder)
        (folder / "README.md").write_text(model_card(record, layout, info), encoding="utf-8")
        (folder / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    write_atomically(target, write, overwrite)
    return target


def _parts(
    model: LoadedModel | PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None
) -> tuple[Any, Any, dict[str, Any]]:
    """(HF module, tokenizer, the source model's record) of a LoadedModel or a plain HF model."""
    if isinstance(model, LoadedModel):
        prov = model.provenance
        source = {"model": prov.model_id, "origin": prov.source, "weights_sha256": prov.file_sha256,
                  "loaded_dtype": prov.dtype, "prompt_prefix": model.prefix.to_dict()}
        if prov.source == "zoo":
            from interp.model.zoo import ZOO

            source["description"] = ZOO[prov.model_id].description
        return model.hf, tokenizer or model.tokenizer, source
    if tokenizer is None:
        raise UserError("a plain Hugging Face model was given without tokenizer=: pass its tokenizer, "
                        "so that the saved folder is complete")
    name = str(getattr(model, "name_or_path", "") or type(model).__name__)
    return model, tokenizer, {"model": name, "origin": "object", "weights_sha256": None,
                              "loaded_dtype": str(model.dtype).removeprefix("torch."), "prompt_prefix": None}


def checked_heads(heads: Sequence[Sequence[int]], info: ModelInfo) -> list[Head]:
    """(layer, head) pairs as ints, each in range for ``info``, none twice, at least one."""
    out: list[Head] = []
    for pair in heads:
        if len(pair) != 2:
            raise UserError(f"a head is a (layer, head) pair, got {tuple(pair)!r}")
        layer, head = int(pair[0]), int(pair[1])
        if not 0 <= layer < info.n_layers:
            raise UserError(f"layer {layer} out of range: the model has layers 0..{info.n_layers - 1}")
        if not 0 <= head < info.n_heads:
            raise UserError(f"head {head} out of range: the model has query heads 0..{info.n_heads - 1}")
        if (layer, head) in out:
            raise UserError(f"head {layer}.{head} listed twice")
        out.append((layer, head))
    if not out:
        raise UserError("no heads given to prune")
    return out


def plain_state_dict(hf: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """The weights under their Hugging Face names, and an empty (meta-device) model of the same
    class and dtype to save them with.

    A model the TransformerLens bridge has wrapped keeps its HF modules inside the wrappers, so
    its own ``state_dict`` has the wrappers' names: the names are taken from the skeleton
    instead and each tensor is read through the wrappers (:func:`interp.model.layout.resolve`),
    from the offload map where a device map put it there. No weight is copied.
    """
    config = copy.deepcopy(unwrap(hf).config)
    with torch.device("meta"):
        skeleton = type(hf)(config)
    state: dict[str, torch.Tensor] = {}
    for key in skeleton.state_dict():
        owner, _, name = key.rpartition(".")
        state[key] = tensor_of(resolve(hf, owner) if owner else unwrap(hf), name)
    dtype = next(iter(state.values())).dtype
    skeleton = skeleton.to(dtype=dtype)
    if getattr(hf, "generation_config", None) is not None:
        skeleton.generation_config = copy.deepcopy(hf.generation_config)
    return state, skeleton


def zero_head_columns(
    state: dict[str, torch.Tensor], layout: Layout, info: ModelInfo, heads: Sequence[Head]
) -> list[dict[str, Any]]:
    """Zero each head's d_head-wide slice of its layer's output-projection INPUT in ``state``
    (new tensors; the model's own are untouched). Returns what changed, per layer."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    # nn.Linear stores [out, in]: the input is axis 1 (columns); Conv1D stores [in, out].
    axis = 0 if layout.weight_in_out else 1
    d = info.d_head
    changed = []
    for layer, hs in sorted(by_layer.items()):
        key = f"{layout.path('o', layer)}.weight"
        if key not in state:
            raise UserError(f"the output projection's weight {key} is not among the model's weights")
        w = state[key].clone()
        if w.shape[axis] != info.n_heads * d:
            raise UserError(f"{key} has {w.shape[axis]} inputs, not n_heads x d_head = {info.n_heads * d}")
        for h in sorted(hs):
            w.narrow(axis, h * d, d).zero_()
        state[key] = w
        cut = [f"{h * d}:{(h + 1) * d}" for h in sorted(hs)]
        slices = [f"[{c}, :]" if axis == 0 else f"[:, {c}]" for c in cut]
        changed.append({"tensor": key, "axis": axis, "heads": sorted(hs), "slices": slices})
    return changed


def check_target(path: Path, overwrite: bool) -> Path:
    """The absolute target folder, refused when it is a file or a non-empty folder (without
    ``overwrite``) or lies under a file."""
    target = path.expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} is a file, not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UserError(f"{target} exists and is not empty: choose another folder, or overwrite=True (--overwrite)")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write {target}: {parent} is a file")
            break
    return target


def write_atomically(target: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """Run ``write`` into a temporary folder beside ``target``, then rename it into place; an
    old folder is moved aside first and deleted only once the new one is there. On any failure
    the temporary folder (and every parent folder this call made) is removed."""
    made = _make_parents(target.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    except OSError as exc:
        _remove_made(made)
        raise UserError(f"cannot write to {target.parent}: {exc.strerror or exc}") from None
    try:
        write(tmp)
        _replace(tmp, target, overwrite)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(made)
        raise UserError(f"cannot write {target}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(made)
        raise


def _make_parents(folder: Path) -> list[Path]:
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    for p in reversed(missing):
        try:
            p.mkdir()
        except OSError as exc:
            _remove_made([m for m in missing if m.exists()])
            raise UserError(f"cannot create {p}: {exc.strerror or exc}") from None
    return missing


def _remove_made(made: Sequence[Path]) -> None:
    for p in made:  # deepest first
        with contextlib.suppress(OSError):  # not empty: not ours to remove
            p.rmdir()


def _replace(tmp: Path, target: Path, overwrite: bool) -> None:
    if not target.exists():
        tmp.rename(target)
        return
    if any(target.iterdir()) and not overwrite:  # appeared since the check
        raise UserError(f"{target} exists and is not empty: choose another folder, or overwrite=True (--overwrite)")
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    target.rename(old)
    try:
        tmp.rename(target)
    except OSError:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def model_card(record: Mapping[str, Any], layout: Layout, info: ModelInfo) -> str:
    """The folder's README.md: what the weights are, where the heads came from, what was done
    and why it is exact."""
    src, run, heads = record["source"], record["run"], record["heads"]
    lines = ["---", "library_name: transformers", "tags:", "- pruned", "- attention-heads", "- interp-workbench",
             "---", "", f"# {Path(str(src['model'])).name}, {len(heads)} attention head"
             f"{'' if len(heads) == 1 else 's'} pruned (zero ablation in the weights)", ""]
    lines += ["## Source model", "", f"- model: `{src['model']}` ({src['origin']})"]
    if src.get("description"):
        lines.append(f"- {src['description']}")
    if src.get("weights_sha256"):
        lines.append(f"- weights sha256: `{src['weights_sha256']}`")
    lines.append(f"- loaded as {src['loaded_dtype']}; saved here as {record['dtype']}")
    lines += ["", "## Heads", "", f"Query heads pruned (LAYER.HEAD; {info.n_layers} layers x {info.n_heads} "
              f"query heads, {info.n_kv_heads} kv heads): {', '.join(heads)}", ""]
    lines += _run_lines(run)
    lines += _intervention_lines(record, layout, info)
    lines += _prefix_lines(src.get("prompt_prefix"))
    return "\n".join(lines) + "\n"


def _run_lines(run: Mapping[str, Any] | None) -> list[str]:
    if not run:
        return ["Given by hand (no stored run named).", ""]
    role = f", role {run['role']}" if run.get("role") else ""
    top = f", the top {run['top']}" if run.get("top") else ""
    return [f"From run {run['run_id']} of the results store {run['store']}: `{run['detector']}` "
            f"({run['variant']}) on `{run['model']}`, {run.get('dtype')}, prompt prefix "
            f"{run.get('prefix')}; heads ranked by `{run['metric']}`{role}{top}.", ""]


def _intervention_lines(record: Mapping[str, Any], layout: Layout, info: ModelInfo) -> list[str]:
    where = "rows of its stored [in, out] matrix (Conv1D)" if layout.weight_in_out else "columns"
    tensors = "; ".join(f"`{c['tensor']}{s}`" for c in record["intervention"]["baked_into"] for s in c["slices"])
    return [
        "## The intervention", "",
        "Zero ablation of each listed head's output z (its attention-weighted values, before the "
        "output projection) at every position, the run-time `interp.AblateHeads(layer, heads, "
        'method="zero")` (PH3, Jin et al. 2024), baked into the weights: the head\'s '
        f"{info.d_head}-wide slice of the output projection's input is zero, i.e. its {where}: {tensors}. "
        "No other weight differs from the source model.", "",
        "Why this is exact:", "",
        "- the output projection is linear, out = W_O z + b = sum over heads h of W_O[:, h] z_h + b, and "
        "z_h enters only through its own columns W_O[:, h]: zeroing them removes exactly z_h's term, at "
        "every position and for every input, as zeroing z_h does;",
        "- its bias, where it has one, is not per head and is kept, as run-time zero ablation keeps it;",
        "- under grouped-query attention the key and value projections are shared by the query heads "
        "of a group and are untouched: only the listed query heads lose their output;",
        "- where a norm follows the attention output (Gemma 2/3's post-attention norm), it acts on the "
        "output projection's output, the same tensor as under run-time ablation.", "",
        "Mean ablation is not baked: it would add W_O[:, h] m_h, a bias these projections lack.", "",
    ]


def _prefix_lines(prefix: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
             'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", ""]
    if prefix and prefix.get("token_id") is not None:
        lines += [f"In interp-workbench, raw-text prompts to the source model start with the token "
                  f"`{prefix['text']}` (id {prefix['token_id']}); prepend it for the same setting.", ""]
    return lines


__all__ = ["HeadsFromRun", "check_target", "checked_heads", "model_card", "plain_state_dict", "save_pruned", "zero_head_columns"]
