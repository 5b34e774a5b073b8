"""Head maps: a layer x head heatmap per metric of a head detector's run, and one head's detail."""

from __future__ import annotations

import json

import streamlit as st

from app import dashboard as dash
from app import edge_runs
from app.routing import PAGES
from interp import figures
from interp.errors import UserError

dash.setup("head maps")
st.title("Head maps")
store = dash.store()
if store is None:
    st.stop()

runs = dash.runs(store)
if runs.empty:
    st.info("no runs stored yet: start one on the Home page")
    st.stop()


# Head detectors, plus runs whose output is unknown (their tables decide what shows).
head_runs = dash.runs_on(PAGES["Head maps"], store, runs)
if head_runs.empty:
    st.info("no head-detector runs in this workspace")
    st.stop()

row = dash.select_run(head_runs, key="hm-run")
if row is None:
    st.stop()
tables, warnings, final = dash.run_tables(store, row)
dash.show_warnings(warnings)
dash.show_run_header(row, final)

hs = tables.get("head_scores")
if hs is None:
    st.info("this run has no head scores (yet)")
    dash.show_tables(tables, key=f"hm-{row['id']}", detector=str(row["detector"]))
    st.stop()

detector = str(row["detector"])
st.subheader("layer x head")
st.caption("hover for values; heads at or above the stored threshold are outlined; click a cell for its detail")
clicked = dash.show_head_scores(hs, tables.get("metrics"), key=f"hm-{row['id']}", primary=detector, select=True)

metric_names = dash.head_metrics(hs)
primary = detector if detector in metric_names else metric_names[0]
prim_rows = hs if primary == "score" else dash.subset(hs, hs["metric"] == primary)
mat = figures.head_matrix(prim_rows)
top = figures.top_heads(prim_rows)

c1, c2 = st.columns([1, 2])
with c1:
    st.markdown(f"**top heads by {primary}**")
    st.dataframe(top.head(15), hide_index=True)
with c2:
    dash.show_tables(tables, key=f"hm-{row['id']}", skip=("head_scores",), primary=detector, detector=detector)

# -- head detail ---------------------------------------------------------------------------------

st.divider()
st.subheader("head detail")
layers = [int(v) for v in mat.index]
heads = [int(v) for v in mat.columns]
default_layer, default_head = (int(top["layer"].iloc[0]), int(top["head"].iloc[0])) if len(top) else (layers[0], heads[0])
lkey, hkey = f"hd-layer-{row['id']}", f"hd-head-{row['id']}"
# ?layer=&head= (a link from the Circuits page) picks the head once per value; a click wins.
asked = dash.head_in_query(layers, heads)
if asked is not None and st.session_state.get(f"hd-asked-{row['id']}") != asked:
    st.session_state[f"hd-asked-{row['id']}"] = asked
    st.session_state[lkey], st.session_state[hkey] = asked
if clicked is not None and clicked[0] in layers and clicked[1] in heads:
    st.session_state[lkey], st.session_state[hkey] = clicked
st.session_state.setdefault(lkey, default_layer)
st.session_state.setdefault(hkey, default_head)
d1, d2 = st.columns(2)
layer = int(d1.selectbox("layer", layers, key=lkey))
head = int(d2.selectbox("head", heads, key=hkey))

scores = hs[(hs["layer"] == layer) & (hs["head"] == head)]
cols = [c for c in ("metric", "value") if c in scores.columns]
st.markdown(f"**L{layer}H{head}**: scores in this run")
st.dataframe(scores[cols], hide_index=True)

curves = tables.get("curves")
if curves is not None and {"layer", "head"} <= set(curves.columns):
    mine = dash.subset(curves, (curves["layer"] == layer) & (curves["head"] == head))
    for name in sorted(str(c) for c in mine["curve"].dropna().unique()):
        dash.plot(figures.curves_figure(dash.subset(mine, mine["curve"] == name), title=f"{name}: L{layer}H{head}",
                                        axes=dash.curve_axes_of(detector)),
                  key=f"hd-curve-{row['id']}-{name}")

edge_runs.show_head_edges(store, runs, row, layer, head)

others = dash.head_in_other_runs(store, runs, row, layer, head)
for rr in [row, *(o for o, _, _ in others)]:
    # Runs that stored per-sample retrieval scores with their needle samples (retrieval's).
    examples = dash.retrieval_examples(store, rr, layer, head)
    if len(examples):
        st.markdown(f"**retrieval examples of L{layer}H{head}** ({dash.run_label(rr)}): "
                    "the needle samples where it copied most")
        st.dataframe(examples, hide_index=True)
if others:
    with st.expander(f"L{layer}H{head} in {len(others)} other runs on this model", expanded=True):
        for other, other_scores, other_curves in others:
            st.markdown(f"**{dash.run_label(other)}**")
            if len(other_scores):
                st.dataframe(other_scores[[c for c in ("metric", "value") if c in other_scores.columns]],
                             hide_index=True)
            if len(other_curves):
                figs = figures.head_curves_figures(other_curves, layer, head, title=f"{other['detector']}: L{layer}H{head}",
                                                   axes=dash.curve_axes_of(str(other["detector"])))
                for i, fig in enumerate(figs):
                    dash.plot(fig, key=f"hd-other-{row['id']}-{other['id']}-{i}")

with st.expander("attention pattern on an example (computed on demand through the model)", expanded=False):
    name, dtype, device = dash.model_spec(row)
    if name is None:
        st.info("this run's model was an in-memory object: give a zoo name or a local folder to load instead")
    model_name = st.text_input("model", value=name or "", key=f"hd-model-{row['id']}")
    text = st.text_input("example text (empty: the detector's own example input)", value="",
                         key=f"hd-text-{row['id']}")
    max_tokens = st.slider("at most tokens", 8, 160, 64, key=f"hd-max-{row['id']}")
    if st.toggle("compute", key=f"hd-go-{row['id']}"):
        if not model_name.strip():
            st.error("give a model name or folder")
        else:
            model = dash.loaded_model(model_name.strip(), dtype, device)
            if model is not None:
                try:
                    if text.strip():
                        ids = [int(t) for t in model.to_tokens(text.strip())[0][:max_tokens]]
                    else:
                        params = json.loads(row["params_json"] or "{}")
                        ids = dash.example_ids(model, detector, params, max_tokens)
                        if ids is None:
                            raise UserError("this detector exposes no example input: enter a text")
                    pattern, toks = dash.attention_pattern(model_name.strip(), dtype, device, layer, head, tuple(ids))
                    dash.plot(
                        figures.attention_pattern_figure(pattern, toks, title=f"L{layer}H{head} attention"),
                        key=f"hd-pattern-{row['id']}",
                    )
                except UserError as exc:
                    st.error(str(exc))
