"""Causal tracing: stored traces as token x layer heatmaps (one per kind, subject tokens
marked where the run stored them), dataset averages, and live tracing where the tracing module
provides it."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import streamlit as st

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dashboard as dash

from interp.errors import UserError

dash.setup("causal tracing")
st.title("Causal tracing")
store = dash.store()
if store is None:
    st.stop()


def _tracing_module() -> Any:
    try:
        return importlib.import_module("circuits.methods.tracing")
    except ImportError:
        return None


runs = dash.runs(store)
outputs = dash.detector_outputs()
page = dash.PAGES["Causal tracing"]
trace_runs = dash.subset(runs, [page.accepts(str(d), outputs.get(str(d))) for d in runs["detector"]])

st.subheader("stored traces")
if trace_runs.empty:
    st.info("no tracing runs in this workspace yet (detectors that store token x layer tables show here)")
else:
    row = dash.select_run(trace_runs, key="ct-run")
    if row is not None:
        tables, warnings, final = dash.run_tables(store, row)
        dash.show_warnings(warnings)
        dash.show_run_header(row, final)

        units = dash.unit_tables(store, row)
        arts = units.get("artifacts")

        def _subject_tokens(item: Any) -> list[int]:
            # Per-fact artifacts "fact" carry the subject's token range [start, end).
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

        per_item = units.get("token_layer") if final else None
        if per_item is not None and len(per_item):
            st.markdown("**one fact: restored p(answer), subject tokens marked with \\***")
            dash.show_token_layer(per_item, key=f"ct-item-{row['id']}", marked=_subject_tokens, mean=False,
                                  value_title="restored p(answer)" if row["detector"] == "causal-trace" else None)
        if "token_layer" in tables:
            if per_item is not None and len(per_item):
                st.markdown("**averages over the traced facts, by ROME bucket**")
            dash.show_token_layer(tables["token_layer"], key=f"ct-{row['id']}", marked=_subject_tokens,
                                  value_title=(("indirect effect (p restored - p corrupted)" if final
                                                else "restored p(answer)")
                                               if row["detector"] == "causal-trace" else None))
        dash.show_tables(tables, key=f"ct-rest-{row['id']}", skip=("token_layer",), detector=str(row["detector"]))

st.divider()
st.subheader("trace a prompt live")
module = _tracing_module()
needed = ("prepare", "trace_fact", "heatmap_figure")
if module is None or not all(hasattr(module, n) for n in needed):
    st.info("live tracing needs circuits.methods.tracing (prepare, trace_fact, heatmap_figure); it is not available here")
else:
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
    if go:
        if not prompt.strip() or not subject.strip() or not answer.strip():
            st.error("give a prompt, a subject and an answer")
        elif subject not in prompt:
            st.error(f"the subject {subject!r} is not in the prompt")
        elif not kinds:
            st.error("choose at least one kind")
        else:
            model = dash.loaded_model(model_name.strip())
            if model is not None:
                try:
                    from interp.runs.registry import get_detector

                    det = get_detector("causal-trace")
                    # Noise as the stored runs: noise_factor x the std of the default facts' subjects.
                    noise, _std = det.noise_std(model, det.parse_params({}))  # type: ignore[attr-defined]
                    with st.spinner("tracing (one forward pass per chunk of restored cells)..."):
                        inp = module.prepare(model, prompt, subject, answer)
                        result = module.trace_fact(model, inp, noise_std=noise, samples=int(samples),
                                                   window=int(window), kinds=tuple(kinds))
                    st.caption(f"noise std {noise:.4f}; subject tokens marked with *; variant faithful "
                               f"with {int(samples)} samples (ROME: 10)")
                    cols = st.columns(len(kinds))
                    for col, kind in zip(cols, kinds, strict=True):
                        with col:
                            dash.plot(module.heatmap_figure(result, kind), key=f"ct-live-{kind}")
                except UserError as exc:
                    st.error(str(exc))
