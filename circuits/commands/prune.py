"""``interp prune``: a generation with heads pruned next to the unpruned one (PH3, Jin et al. 2024),
and with ``--save`` the pruned model as a plain Hugging Face folder (:func:`interp.save_pruned`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from circuits.detectors.ph3 import greedy_continuation, prune
from circuits.methods.heads import check_heads, head_label, parse_heads
from interp.errors import UserError
from interp.model.load import load_spec
from interp.model.loaded import LoadedModel
from interp.options import (
    BackendOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    ModelOptions,
    PrefixOpt,
    WorkspaceOpt,
    check_prompts,
)
from interp.runs.registry import command


@command("prune")
def prune_command(
    prompt: Annotated[str, typer.Option("--prompt", help="prompt to continue (after the prompt prefix)")],
    heads: Annotated[str, typer.Option(
        "--heads", help="heads to prune, LAYER.HEAD comma-separated, e.g. 20.3,25.1 (or --run)")] = "",
    run: Annotated[int | None, typer.Option(
        "--run", help="prune the top --top heads of this stored run (see `interp heads`)")] = None,
    top: Annotated[int | None, typer.Option("--top", help="how many heads of --run")] = None,
    role: Annotated[str | None, typer.Option(
        "--role", help="memory or context: that kind of heads of --run (conflict-heads, ph3)")] = None,
    workspace: WorkspaceOpt = None,
    save: Annotated[Path | None, typer.Option(
        "--save", help="also save the pruned model as a plain Hugging Face folder (heads zeroed in the weights)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="let --save replace a non-empty folder")] = False,
    model: ModelOpt = ModelOptions.model,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="tokens to generate")] = 20,
    backend: BackendOpt = ModelOptions.backend,
    prefix: PrefixOpt = ModelOptions.prefix,
    as_json: JsonOpt = False,
    device: DeviceOpt = ModelOptions.device,
    dtype: DtypeOpt = ModelOptions.dtype,
) -> None:
    """Generate with the given heads pruned (zeroed), next to the unpruned generation; --save
    writes the pruned model as a folder plain transformers loads."""
    import sys

    import interp
    from interp.model.pruned import check_target

    check_prompts([prompt])
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    _check_head_options(heads, run, top, role)
    if overwrite and save is None:
        raise UserError("--overwrite goes with --save DIR")
    if save is not None:
        check_target(save, overwrite)  # before the model loads: a refused folder costs nothing
    # An unknown run, or one without such heads, is refused before the model loads too.
    ranked = interp.heads(workspace, run, top=top, role=role) if run is not None else None
    loaded = load_spec(ModelOptions(model, backend, prefix, device, dtype).check())
    if run is not None:
        ranked = interp.heads(workspace, run, top=top, role=role, model=loaded)
    hs = check_heads(ranked.heads, loaded) if ranked is not None else parse_heads(heads, loaded)
    unpruned = greedy_continuation(loaded, prompt, max_new_tokens)
    with prune(loaded, hs):
        pruned = greedy_continuation(loaded, prompt, max_new_tokens)
    saved = _save(loaded, ranked if ranked is not None else hs, save, overwrite)
    labels = [head_label(*h) for h in hs]
    if as_json:
        out: dict[str, Any] = {"model": loaded.name, "prompt": prompt, "heads": labels, "unpruned": unpruned,
                               "pruned": pruned, "ablation": "zero",
                               "run": None if ranked is None else ranked.run_id, "saved": saved}
        sys.stdout.write(json.dumps(out) + "\n")
        return
    typer.echo(f"prompt:   {prompt!r}")
    typer.echo(f"unpruned: {unpruned!r}")
    typer.echo(f"pruned ({', '.join(labels)}; zero ablation): {pruned!r}")
    if saved is not None:
        typer.echo(f"saved:    {saved} (a Hugging Face folder; the model card is its README.md)")


def _check_head_options(heads: str, run: int | None, top: int | None, role: str | None) -> None:
    """--heads, or --run with --top (and maybe --role): checked before any model loads."""
    if heads and run is not None:
        raise UserError("give either --heads L.H,... or --run RUN, not both")
    if not heads and run is None:
        raise UserError("give the heads to prune: --heads L.H,... or --run RUN --top K")
    if run is None and (top is not None or role is not None):
        raise UserError("--top and --role choose heads of a stored run: give --run RUN")
    if run is not None and top is None:
        raise UserError("give --top K with --run: how many of the run's heads to prune")
    if top is not None and top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    if role is not None and role not in ("memory", "context"):
        raise UserError(f"--role must be memory or context, got {role!r}")
    if heads:
        parse_heads(heads)


def _save(model: LoadedModel, heads: Any, save: Path | None, overwrite: bool) -> str | None:
    if save is None:
        return None
    from interp.model.pruned import save_pruned

    return str(save_pruned(model, heads, save, overwrite=overwrite))
