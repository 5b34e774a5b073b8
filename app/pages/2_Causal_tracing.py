"""Causal tracing: stored traces as token x layer heatmaps (one per kind, subject tokens
marked where the run stored them), dataset averages, and live tracing of a prompt through the
causal-trace detector's public ``trace_prompt``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import streamlit as st

from app import dashboard as dash
from app.routing import PAGES
from interp.errors import UserError

if TYPE_CHECKING:
    from interp.model.loaded import LoadedModel
    from interp.runs.store import Store


class TracedPrompt(Protocol):
    """What the page shows of a live trace."""

    @property
    def noise_std(self) -> float: ...

    @property
    def figures(self) -> Mapping[str, Any]: ...


@runtime_checkable
class PromptTracer(Protocol):
    """A detector that traces one prompt live (causal-trace's public API)."""

    def parse_params(self, raw: Mapping[str, Any]) -> Any: ...

    def trace_prompt(self, model: LoadedModel, cfg: Any, prompt: str, subject: str, answer: str) -> TracedPrompt: ...


dash.setup("causal tracing")
st.title("Causal tracing")


def _tracer() -> PromptTracer | None:
    from interp.runs.registry import get_detector

    try:
        det = get_detector("causal-trace")
    except UserError:  # the plug-in that provides it is not installed
        return None
    return det if isinstance(det, PromptTracer) else None


def _subject_tokens(arts: Any, item: Any) -> list[int]:
    """The subject's token indices of one traced fact: its "fact" artifact's [start, end)."""
    if arts is None or item is None:
        return []
    for doc in arts.loc[arts["name"] == "fact", "json"]:
        try:
            fact = json.loads(doc)
            if str(fact.get("id")) == str(item):
                start, end = (int(t) for t in fact["subject_range"])
                return list(range(start, end))
        except (TypeError, ValueError, AttributeError, KeyError):
            continue
    return []


def _show_trace(store: Store, row: dict[str, Any]) -> None:
    tables, warnings, final = dash.run_tables(store, row)
    dash.show_warnings(warnings)
    dash.show_run_header(row, final)
    units = dash.unit_tables(store, row)
    arts = units.get("artifacts")
    traced = row["detector"] == "causal-trace"  # its values are p(answer): title them so

    def marked(item: Any) -> list[int]:
        return _subject_tokens(arts, item)

    per_item = units.get("token_layer") if final else None
    if per_item is not None and len(per_item):
        st.markdown("**one fact: restored p(answer), subject tokens marked with \\***")
        dash.show_token_layer(per_item, key=f"ct-item-{row['id']}", marked=marked, mean=False,
                              value_title="restored p(answer)" if traced else None)
    if "token_layer" in tables:
        if per_item is not None and len(per_item):
            st.markdown("**averages over the traced facts, by ROME bucket**")
        value = "indirect effect (p restored - p corrupted)" if final else "restored p(answer)"
        dash.show_token_layer(tables["token_layer"], key=f"ct-{row['id']}", marked=marked,
                              value_title=value if traced else None)
    dash.show_tables(tables, key=f"ct-rest-{row['id']}", skip=("token_layer",), detector=str(row["detector"]))


def _stored_traces(store: Store) -> None:
    trace_runs = dash.runs_on(PAGES["Causal tracing"], store, dash.runs(store))
    if trace_runs.empty:
        st.info("no tracing runs in this workspace yet (detectors that store token x layer tables show here)")
        return
    row = dash.select_run(trace_runs, key="ct-run")
    if row is not None:
        _show_trace(store, row)


def _live_trace(tracer: PromptTracer) -> None:
    with st.form("ct-live"):
        model_name = st.text_input("model", value="smollm2-135m", key="ct-model")
        prompt = st.text_input("prompt", value="The Eiffel Tower is located in the city of", key="ct-prompt")
        subject = st.text_input("subject (verbatim in the prompt)", value="Eiffel Tower", key="ct-subject")
        answer = st.text_input("answer", value=" Paris", key="ct-answer")
        c1, c2, c3 = st.columns(3)
        samples = c1.number_input("samples (ROME: 10)", 1, 10, 3)
        window = c2.number_input("window (ROME: 10)", 1, 20, 10)
        kinds = c3.multiselect("kinds", ["state", "mlp", "attn"], default=["state", "mlp", "attn"])
        go = st.form_submit_button("trace")
    if not go:
        return
    if not prompt.strip() or not subject.strip() or not answer.strip():
        raise UserError("give a prompt, a subject and an answer")
    if subject not in prompt:
        raise UserError(f"the subject {subject!r} is not in the prompt")
    if not kinds:
        raise UserError("choose at least one kind")
    # A stored run's parameters, so the noise is the stored runs' (noise_factor x the std of the
    # default facts' subjects); checked before the model loads.
    cfg = tracer.parse_params({"samples": int(samples), "window": int(window), "kinds": ",".join(kinds)})
    model = dash.loaded_model(model_name.strip())
    if model is None:
        return
    with st.spinner("tracing (one forward pass per chunk of restored cells)..."):
        trace = tracer.trace_prompt(model, cfg, prompt, subject, answer)
    st.caption(f"noise std {trace.noise_std:.4f}; subject tokens marked with *; variant faithful "
               f"with {int(samples)} samples (ROME: 10)")
    cols = st.columns(len(trace.figures))
    for col, (kind, fig) in zip(cols, trace.figures.items(), strict=True):
        with col:
            dash.plot(fig, key=f"ct-live-{kind}")


st.subheader("stored traces")
# Without a store yet (a new workspace), live tracing below still works.
if (store := dash.store()) is not None:
    _stored_traces(store)

st.divider()
st.subheader("trace a prompt live")
if (tracer := _tracer()) is None:
    st.info("live tracing needs the causal-trace detector (its trace_prompt); it is not installed here")
else:
    dash.guarded(partial(_live_trace, tracer))
