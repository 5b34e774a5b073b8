"""Atlas: what ``interp atlas`` found across models. The papers' claims x models, each cell a
link to the run behind it, and each detector's top heads of every model on one relative-depth
axis. It reads the newest finished atlas run of the workspace's store (its claims and document,
:mod:`circuits.atlas.stored`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from app import dashboard as dash
from app.routing import UNKNOWN, declared_routes, run_url
from circuits.atlas.stored import latest_atlas
from interp import figures
from interp.errors import UserError

VERDICT_WORD = {"holds": "yes", "does not hold": "no", "inconclusive": "inconclusive", "not measurable": "n.m."}

dash.setup("atlas")
st.title("Atlas")
NONE_YET = f"no atlas in this workspace yet: run `interp atlas -w {dash.workspace()}` (see `interp atlas --help`)"
if not dash.has_store():
    st.info(NONE_YET)
    st.stop()
store = dash.store()  # an error on the page when the store cannot be opened
if store is None:
    st.stop()
try:
    found = latest_atlas(store)
except UserError as exc:
    st.error(str(exc))
    st.stop()
if found is None:
    st.info(NONE_YET)
    st.stop()
atlas: dict[str, Any] = {**found.document, "claims": found.claims}

models = list(atlas["models"])
labels = {m: str(atlas["models"][m].get("label") or Path(m).name) for m in models}
routes = declared_routes()
st.caption(f"{len(models)} models · top-{atlas['top']} head sets · atlas run #{found.run_id} of "
           f"`interp atlas`, {found.created_at[:19].replace('T', ' ')} UTC")


def cell(claim: dict[str, Any], model: str) -> str:
    """The verdict and its number with its 95 % interval, linked to the run of the claim's first
    detector on this model; * marks a claim inconclusive at this budget."""
    result = claim["models"][model]
    value, lo, hi = result.get("value"), result.get("lo"), result.get("hi")
    text = str(VERDICT_WORD.get(result["verdict"], result["verdict"])) + ("*" if "need" in result else "")
    if isinstance(value, int | float):
        text += f" {value:.3g}"
        if isinstance(lo, int | float) and isinstance(hi, int | float):
            text += f" [{lo:.2g}, {hi:.2g}]"
    run = atlas.get("runs", {}).get(model, {}).get(claim.get("detectors", [None])[0] or "", {})
    if "run_id" not in run:
        return text
    det = claim["detectors"][0]
    return f"[{text}]({run_url(routes.get(det, UNKNOWN), int(run['run_id']))})"


def md(text: str) -> str:
    return text.replace("|", "\\|")


st.subheader("Claims")
header = "| claim | " + " | ".join(md(labels[m]) for m in models) + " |"
lines = [header, "|" + "---|" * (len(models) + 1)]
for c in atlas["claims"]:
    lines.append(f"| {md(c['short'])} | " + " | ".join(cell(c, m) for m in models) + " |")
st.markdown("\n".join(lines))
st.caption("yes / no / inconclusive / n.m. (not measurable), with the number behind it and its 95 % interval "
           "(* inconclusive at this budget: the table below says what n it needs); each cell opens the run "
           "it comes from.")
with st.expander("the claims, and the numbers behind each cell"):
    for c in atlas["claims"]:
        st.markdown(f"**{c['short']}**: {c['claim']}")
        rows = [{"model": labels[m], **{k: c["models"][m].get(k) for k in ("verdict", "value", "lo", "hi", "n", "method")},
                 "needs": c["models"][m].get("need", ""), "detail": c["models"][m].get("detail", "")} for m in models]
        st.dataframe(pd.DataFrame(rows), hide_index=True)

st.subheader("Heads by relative depth")
for det, per_model in atlas["detectors"].items():
    rows = [{"model": labels[m], **h} for m in models for h in per_model.get(m, {}).get("heads", [])]
    missing = [f"{labels[m]}: {e.get('not_measurable')}" for m, e in per_model.items() if "not_measurable" in e]
    if rows:
        frame = pd.DataFrame(rows)
        dash.plot(figures.depth_strip_figure(frame, title=f"{det}: top-{atlas['top']} heads"), key=f"atlas-{det}")
    for line in missing:
        st.caption(f"{det} not measurable on {line}")

overlap = [{"model": labels[m], "sets": f"{p['a']}/{p['b']}", "jaccard": p["jaccard"]}
           for m in models for p in atlas["overlap"].get(m, [])]
if overlap:
    st.subheader(f"Overlap of the top-{atlas['top']} head sets (Jaccard)")
    table = pd.DataFrame(overlap).pivot(index="sets", columns="model", values="jaccard")
    st.dataframe(table[[labels[m] for m in models if labels[m] in table.columns]])

costs = [{"model": labels[m], **atlas["models"][m]["cost"]} for m in models if "cost" in atlas["models"][m]]
if costs:
    st.subheader("Cost per model")
    st.dataframe(pd.DataFrame(costs), hide_index=True)
    st.caption("compute_s: the runs' stored compute time (over every session); wall_s and peak_rss_mb: "
               "the last `interp atlas` call (peak sampled every 0.1 s)")
