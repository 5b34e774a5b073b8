"""``interp prune``: a generation with heads pruned next to the unpruned one (PH3, Jin et al. 2024)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from circuits.detectors.ph3 import greedy_generate, prune
from circuits.methods.heads import head_label, parse_heads
from interp.errors import UserError
from interp.model.load import load_spec
from interp.options import (
    BackendOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    ModelOptions,
    PrefixOpt,
    check_prompts,
)
from interp.runs.registry import command


@command("prune")
def prune_command(
    heads: Annotated[str, typer.Option("--heads", help="heads to prune, LAYER.HEAD comma-separated, e.g. 20.3,25.1")],
    prompt: Annotated[str, typer.Option("--prompt", help="prompt to continue (after the prompt prefix)")],
    model: ModelOpt = ModelOptions.model,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="tokens to generate")] = 20,
    backend: BackendOpt = ModelOptions.backend,
    prefix: PrefixOpt = ModelOptions.prefix,
    as_json: JsonOpt = False,
    device: DeviceOpt = ModelOptions.device,
    dtype: DtypeOpt = ModelOptions.dtype,
) -> None:
    """Generate with the given heads pruned (zeroed), next to the unpruned generation."""
    import sys

    check_prompts([prompt])
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    parse_heads(heads)
    loaded = load_spec(ModelOptions(model, backend, prefix, device, dtype).check())
    hs = parse_heads(heads, loaded)
    unpruned = greedy_generate(loaded, prompt, max_new_tokens)
    with prune(loaded, hs):
        pruned = greedy_generate(loaded, prompt, max_new_tokens)
    labels = [head_label(*h) for h in hs]
    if as_json:
        out = {"model": loaded.name, "prompt": prompt, "heads": labels, "unpruned": unpruned, "pruned": pruned,
               "ablation": "zero"}
        sys.stdout.write(json.dumps(out) + "\n")
        return
    typer.echo(f"prompt:   {prompt!r}")
    typer.echo(f"unpruned: {unpruned!r}")
    typer.echo(f"pruned ({', '.join(labels)}; zero ablation): {pruned!r}")
