"""Conflicts and interventions: memory vs context rates of stored runs and their head maps, and
live interventions on a prompt: PH3 pruning or head scaling next to the unmodified model, DeCoRe
next to greedy. Computation lives in circuits.detectors.ph3 and circuits.methods.decore."""

from __future__ import annotations

import streamlit as st

from app import dashboard as dash
from app.routing import PAGES
from circuits.detectors import ph3
from circuits.detectors.conflict_heads import rates_figure
from circuits.methods import decore
from circuits.methods.heads import parse_heads
from interp.errors import UserError
from interp.runs.store import Store

dash.setup("conflicts and interventions")
st.title("Conflicts and interventions")


def _stored_runs(store: Store) -> None:
    # Knowledge-conflict detectors and every intervention, as their detectors declare.
    mine = dash.runs_on(PAGES["Conflicts"], store, dash.runs(store))
    if mine.empty:
        st.info("no conflict or intervention runs in this workspace yet")
        return
    row = dash.select_run(mine, key="cf-run")
    if row is None:
        return
    tables, warnings, final = dash.run_tables(store, row)
    dash.show_warnings(warnings)
    dash.show_run_header(row, final)
    metrics = tables.get("metrics")
    if metrics is not None:
        rates = dash.subset(metrics, metrics["name"].str.contains("rate", case=False, na=False))
        if len(rates):
            st.markdown("**memory / context rates**")
            dash.show_metrics(rates)
    dash.show_tables(tables, key=f"cf-{row['id']}", primary=str(row["detector"]), detector=str(row["detector"]))


st.subheader("stored runs")
# Without a store yet (a new workspace), the live interventions below still work.
if (store := dash.store()) is not None:
    _stored_runs(store)

st.divider()
st.subheader("interventions, live")
st.caption(
    "heads as LAYER.HEAD,LAYER.HEAD; the stored conflict-heads and ph3 runs above list the memory "
    "and context heads of a model"
)
tab_ph3, tab_decore = st.tabs(["PH3 pruning / head scaling", "DeCoRe vs greedy"])

with tab_ph3, st.form("ph3-live"):
    c1, c2 = st.columns(2)
    ph3_model = c1.text_input("model", value="smollm2-135m", key="ph3-model")
    ph3_heads = c2.text_input("heads", value="", key="ph3-heads", placeholder="24.4,29.0")
    ph3_prompt = st.text_input(
        "prompt", value="The capital of France is Rome. The capital of France is", key="ph3-prompt"
    )
    c3, c4, c5 = st.columns(3)
    ph3_factor = c3.number_input("value scale (0 = prune, as PH3)", 0.0, 10.0, 0.0, 0.5, key="ph3-factor")
    ph3_tokens = c4.number_input("new tokens", 1, 64, 12, key="ph3-tokens")
    ph3_items = c5.number_input("conflict items for rates (0 = skip)", 0, 200, 0, key="ph3-items")
    ph3_go = st.form_submit_button("compare")
if ph3_go:
    model = dash.loaded_model(ph3_model.strip())
    if model is not None:
        try:
            heads = parse_heads(ph3_heads, model)
            if not ph3_prompt.strip():
                raise UserError("give a prompt")
            with st.spinner("generating with and without the heads..."):
                gen = ph3.compare_generations(model, ph3_prompt, heads, float(ph3_factor), int(ph3_tokens))
            st.caption(f"{gen['variant']} of {', '.join(gen['heads'])}")
            left, right = st.columns(2)
            left.markdown("**unmodified**")
            left.code(ph3_prompt + gen["unmodified"], language=None)
            right.markdown(f"**{gen['variant']}**")
            right.code(ph3_prompt + gen["modified"], language=None)
            if int(ph3_items) > 0:
                with st.spinner("scoring conflict items..."):
                    table = ph3.compare_rates(model, heads, float(ph3_factor), max_items=int(ph3_items))
                st.markdown(f"**memory / context rates on {int(table['n_items'].iloc[0])} conflict items**")
                st.dataframe(table, hide_index=True)
                dash.plot(rates_figure(table), key="ph3-live-rates")
        except UserError as exc:
            st.error(str(exc))

with tab_decore, st.form("decore-live"):
    c1, c2 = st.columns(2)
    dc_model = c1.text_input("model", value="smollm2-135m", key="dc-model")
    dc_heads = c2.text_input("retrieval heads to mask", value="", key="dc-heads", placeholder="15.7,20.1")
    dc_prompt = st.text_area(
        "prompt",
        value="Context: The capital of France is Rome.\nQ: What is the capital of France?\nA:",
        key="dc-prompt",
    )
    c3, c4 = st.columns(2)
    dc_alpha = c3.text_input("alpha ('entropy' or a number)", value="entropy", key="dc-alpha")
    dc_tokens = c4.number_input("new tokens", 1, 64, 12, key="dc-tokens")
    dc_go = st.form_submit_button("decode")
if dc_go:
    model = dash.loaded_model(dc_model.strip())
    if model is not None:
        try:
            heads = parse_heads(dc_heads, model)
            if not dc_prompt.strip():
                raise UserError("give a prompt")
            alpha = decore.parse_alpha(dc_alpha.strip())
            with st.spinner("decoding (base and masked model in one batch per step)..."):
                greedy = decore.greedy_generate(model, [dc_prompt], max_new_tokens=int(dc_tokens))[0]
                contrast = decore.decore_generate(model, model.tokenizer, [dc_prompt], heads, alpha, max_new_tokens=int(dc_tokens))[0]
            st.caption(f"{len(heads)} heads masked with uniform attention; alpha = {dc_alpha.strip()}")
            left, right = st.columns(2)
            left.markdown("**greedy**")
            left.code(dc_prompt + greedy.text, language=None)
            right.markdown("**DeCoRe**")
            right.code(dc_prompt + contrast.text, language=None)
        except UserError as exc:
            st.error(str(exc))
