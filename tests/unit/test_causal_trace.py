"""Causal tracing and attention knockout on tiny models, against independent implementations:
a ROME-style one-cell-at-a-time trace with raw PyTorch hooks on a plain HF copy, and a
hand-written masked attention for the knockout."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from circuits.data.facts import DEFAULT_FACTS, Fact, answer_tokens, known_facts, load_facts, subject_span
from circuits.detectors import causal_trace as ct
from circuits.detectors import knockout
from circuits.methods import tracing
from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.runs.registry import all_detectors
from interp.runs.units import Part, Unit
from tests.tiny import loaded

PROMPT = "w5 w9 w17 w23 w40 w41 w7 w8"
SUBJECT = "w17 w23 w40"  # tokens 3..5 after BOS


# --------------------------------------------------------------------------- the reference


def _layout(hf: Any) -> tuple[Any, list[Any], str, str]:
    if hasattr(hf, "transformer"):  # GPT-2
        return hf.transformer.wte, list(hf.transformer.h), "mlp", "attn"
    return hf.model.embed_tokens, list(hf.model.layers), "mlp", "self_attn"


def reference_cell(
    hf: Any,
    ids: torch.Tensor,
    subject: tuple[int, int],
    target: int,
    *,
    noise_std: float,
    samples: int,
    seed: int,
    cell: tracing.Cell | None,
    window: int,
) -> tuple[float, float]:
    """ROME's trace_with_patch, one cell per forward pass: row 0 clean, rows 1..N noised on the
    subject embeddings, the cell's activations copied from row 0 into rows 1..N by raw hooks.
    Returns (p clean, mean p over the noised rows)."""
    embed, layers, mlp_name, attn_name = _layout(hf)
    s, e = subject
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((samples, e - s, hf.config.hidden_size), generator=gen) * noise_std

    def add_noise(_m, _i, out):
        out = out.clone()
        out[1:, s:e] += noise
        return out

    def restore_from_row0(token):
        def hook(_m, _i, out):
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            h[1:, token] = h[0, token]
            return (h, *out[1:]) if isinstance(out, tuple) else h

        return hook

    handles = [embed.register_forward_hook(add_noise)]
    if cell is not None:
        n = len(layers)
        if cell.kind == "state":
            mods = [layers[cell.layer]]
        else:
            lo, hi = max(0, cell.layer - window // 2), min(n, cell.layer + window - window // 2)
            name = mlp_name if cell.kind == "mlp" else attn_name
            mods = [getattr(layers[li], name) for li in range(lo, hi)]
        handles += [m.register_forward_hook(restore_from_row0(cell.token)) for m in mods]
    try:
        with torch.no_grad():
            logits = hf(ids.expand(samples + 1, -1)).logits
    finally:
        for h in handles:
            h.remove()
    p = torch.softmax(logits[:, -1].float(), dim=-1)[:, target]
    return float(p[0]), float(p[1:].mean())


@pytest.fixture(params=["llama", "gpt2"])
def pair(request: pytest.FixtureRequest, tiny_llama_hf, tiny_gpt2_hf) -> tuple[LoadedModel, torch.nn.Module]:
    """A bridge-backed model and an untouched plain-HF copy of the same weights."""
    hf = tiny_llama_hf if request.param == "llama" else tiny_gpt2_hf
    return loaded(copy.deepcopy(hf), "bridge"), copy.deepcopy(hf)


def _top1_answer(model: LoadedModel, prompt: str) -> str:
    ids = model.to_tokens(prompt)
    with torch.no_grad():
        return str(model.tokenizer.decode([int(model.run(ids).logits[0, -1].argmax())]))


def test_batched_restoration_equals_one_cell_at_a_time_hooks(pair) -> None:
    model, plain = pair
    answer = _top1_answer(model, PROMPT)
    inp = tracing.prepare(model, PROMPT, SUBJECT, answer)
    assert inp.subject_range == (3, 6)
    std = 3 * tracing.subject_embedding_std(model, ["w17 w23 w40", "w60 w61"])
    # A small memory budget forces several chunks per kind.
    res = tracing.trace_fact(model, inp, noise_std=std, samples=4, window=2, seed=7, memory_mb=0.2)
    assert tracing.rows_per_pass(model, inp.n_tokens, 0.2) < 3 * inp.n_tokens * model.info.n_layers * 4
    p_clean, p_corr = reference_cell(
        plain, inp.tokens, inp.subject_range, inp.target, noise_std=std, samples=4, seed=7, cell=None, window=2
    )
    assert res.p_clean == pytest.approx(p_clean, abs=1e-5)
    assert res.p_corrupted == pytest.approx(p_corr, abs=1e-5)
    cells = [
        tracing.Cell("state", 1, 0),  # before the subject: filled with the corrupted score, not run
        tracing.Cell("state", 5, 1),
        tracing.Cell("state", 3, 2),
        tracing.Cell("mlp", 5, 1),
        tracing.Cell("mlp", 4, 0),
        tracing.Cell("attn", 8, 2),
        tracing.Cell("attn", 5, 0),
    ]
    moved = 0.0
    for cell in cells:
        _, ref = reference_cell(
            plain, inp.tokens, inp.subject_range, inp.target, noise_std=std, samples=4, seed=7, cell=cell, window=2
        )
        got = res.scores[cell.kind][cell.token, cell.layer]
        assert abs(got - ref) < 1e-5, (cell, got, ref)
        moved = max(moved, abs(ref - p_corr))
    # The check bites only if restorations move the score well beyond the tolerance.
    assert moved > 1e-4
    # Restoring the last token's final state gives the clean score back.
    assert res.scores["state"][inp.n_tokens - 1, model.info.n_layers - 1] == pytest.approx(res.p_clean, abs=1e-5)


def test_restored_scores_independent_of_chunking(tiny_model: LoadedModel) -> None:
    inp = tracing.prepare(tiny_model, PROMPT, SUBJECT, "w11")
    _, _, clean = tracing.clean_and_corrupted(tiny_model, inp, noise_std=1.0, samples=3, seed=0, kinds=tracing.RESTORABLE)
    cells = [tracing.Cell(k, t, layer) for k in tracing.RESTORABLE for t in (3, 5, 8) for layer in range(3)]
    kw = {"noise_std": 1.0, "samples": 3, "seed": 0, "window": 3}
    a = tracing.restored_scores(tiny_model, inp, cells, clean, memory_mb=1e-6, **kw)
    b = tracing.restored_scores(tiny_model, inp, cells, clean, memory_mb=1e4, **kw)
    np.testing.assert_allclose(a, b, atol=1e-6)


# --------------------------------------------------------------------------- knockout reference


def _hand_attention(attn: Any, blocked: torch.Tensor):
    """Llama attention written out: RoPE, GQA, causal mask plus the blocked edges, softmax."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def forward(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        b, t, _ = hidden_states.shape
        hd = attn.head_dim
        q = attn.q_proj(hidden_states).view(b, t, -1, hd).transpose(1, 2)
        k = attn.k_proj(hidden_states).view(b, t, -1, hd).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(b, t, -1, hd).transpose(1, 2)
        assert position_embeddings is not None
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) * hd**-0.5
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(causal | blocked, float("-inf"))
        w = torch.softmax(scores, dim=-1)
        out = (w @ v).transpose(1, 2).reshape(b, t, -1)
        return attn.o_proj(out), w

    return forward


def _knocked_p(hf: Any, ids: torch.Tensor, target: int, layers: list[int], keys: tuple[int, ...]) -> float:
    hf = copy.deepcopy(hf)
    t = ids.shape[1]
    blocked = torch.zeros(t, t, dtype=torch.bool)
    blocked[t - 1, list(keys)] = True
    for i, layer in enumerate(hf.model.layers):
        layer.self_attn.forward = _hand_attention(layer.self_attn, blocked if i in layers else torch.zeros_like(blocked))
    with torch.no_grad():
        return float(torch.softmax(hf(ids).logits[0, -1], dim=-1)[target])


def test_knockout_equals_hand_written_masked_attention(tiny_llama_hf) -> None:
    hf = tiny_llama_hf
    model = loaded(copy.deepcopy(hf), "bridge")
    answer = _top1_answer(model, PROMPT)
    inp = tracing.prepare(model, PROMPT, SUBJECT, answer)
    with torch.no_grad():
        p_plain = float(torch.softmax(hf(inp.tokens).logits[0, -1], dim=-1)[inp.target])
    # The hand-written attention with nothing blocked is the model itself.
    assert _knocked_p(hf, inp.tokens, inp.target, [], ()) == pytest.approx(p_plain, abs=1e-6)
    p_clean, curves = knockout.knockout_effects(model, inp, window=2, memory_mb=0.05)
    assert p_clean == pytest.approx(p_plain, abs=1e-6)
    n = model.info.n_layers
    for which in knockout.KNOCKOUT_SETS:
        keys = knockout.knockout_keys(inp, which)
        for layer in range(n):
            lo, hi = max(0, layer - 1), min(n, layer + 1)
            ref = _knocked_p(hf, inp.tokens, inp.target, list(range(lo, hi)), keys)
            assert curves[which][layer] == pytest.approx((ref - p_plain) / p_plain, abs=1e-5)
    assert max(abs(v) for c in curves.values() for v in c) > 1e-3


def test_knockout_keys_partition_the_context(tiny_model: LoadedModel) -> None:
    inp = tracing.prepare(tiny_model, PROMPT, SUBJECT, "w11")
    sets = {w: set(knockout.knockout_keys(inp, w)) for w in knockout.KNOCKOUT_SETS}
    assert sets["subject"] == {3, 4, 5}
    assert sets["last"] == {8}
    assert sets["non_subject"] == {0, 1, 2, 6, 7}
    with pytest.raises(UserError, match="knockout set"):
        knockout.knockout_keys(inp, "bos")


# --------------------------------------------------------------------------- pieces


def test_window_layers_matches_rome_convention() -> None:
    assert tracing.window_layers(0, 10, 30) == [0, 1, 2, 3, 4]
    assert tracing.window_layers(12, 10, 30) == list(range(7, 17))
    assert tracing.window_layers(29, 10, 30) == list(range(24, 30))
    assert tracing.window_layers(4, 1, 30) == [4]
    assert tracing.window_layers(4, 9, 30) == list(range(9))


def test_buckets_hand_worked() -> None:
    # BOS, 'The', s0, s1, s2, s3, after0, after1, after2, last
    rng = (2, 6)
    assert tracing.token_buckets(0, rng, 10) == []
    assert tracing.token_buckets(2, rng, 10) == ["first_subject"]
    assert tracing.token_buckets(3, rng, 10) == ["middle_subject"]
    assert tracing.token_buckets(5, rng, 10) == ["last_subject"]
    assert tracing.token_buckets(6, rng, 10) == ["first_subsequent"]
    assert tracing.token_buckets(8, rng, 10) == ["further"]
    assert tracing.token_buckets(9, rng, 10) == ["last"]
    # one-token subject right before the last token
    assert tracing.token_buckets(1, (1, 2), 3) == ["first_subject", "last_subject"]
    assert tracing.token_buckets(2, (1, 2), 3) == ["last"]
    effects = np.arange(20, dtype=float).reshape(10, 2)
    means = tracing.bucket_means(effects, rng)
    np.testing.assert_allclose(means["middle_subject"], [7.0, 8.0])  # rows 3 and 4
    np.testing.assert_allclose(means["further"], [15.0, 16.0])  # rows 7 and 8
    avg = tracing.average_buckets([(effects, rng), (effects + 2, (1, 2))])
    row = avg[(avg["bucket"] == "middle_subject") & (avg["layer"] == 0)].iloc[0]
    assert (row["value"], row["n"]) == (7.0, 1)  # the second fact has no middle subject token
    row = avg[(avg["bucket"] == "last") & (avg["layer"] == 1)].iloc[0]
    assert (row["value"], row["n"]) == ((19.0 + 21.0) / 2, 2)


def test_subject_embedding_std_matches_embedding_matrix(tiny_llama_hf) -> None:
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    w = tiny_llama_hf.model.embed_tokens.weight.detach()
    ids = [17, 23, 40, 60, 61, 17]
    # 'w17 w23 w40' then 'w60 w61' then a repeated subject (counted once, as a unique subject)
    expected = float(w[ids[:5]].std())
    got = tracing.subject_embedding_std(model, ["w17 w23 w40", "w60 w61", "w17 w23 w40"])
    assert got == pytest.approx(expected, rel=1e-6)


def test_bad_inputs_are_user_errors(tiny_model: LoadedModel) -> None:
    with pytest.raises(UserError, match="not found in prompt"):
        tracing.prepare(tiny_model, PROMPT, "w99", "w11")
    with pytest.raises(UserError, match="longer than"):
        tracing.prepare(tiny_model, " ".join(["w5"] * 300) + " w6", "w6", "w11")
    with pytest.raises(UserError, match="empty"):
        tracing.prepare(tiny_model, PROMPT, SUBJECT, " ")
    with pytest.raises(UserError, match="noise"):
        tracing.trace_fact(tiny_model, tracing.prepare(tiny_model, PROMPT, SUBJECT, "w11"), noise_std=0.0)
    with pytest.raises(UserError, match="trace kind"):
        tracing.trace_fact(tiny_model, tracing.prepare(tiny_model, PROMPT, SUBJECT, "w11"), noise_std=1.0, kinds=("mlp", "x"))


def test_multi_token_answer_uses_first_token(tiny_model: LoadedModel) -> None:
    inp = tracing.prepare(tiny_model, PROMPT, SUBJECT, "w11 w12")
    assert inp.n_answer_tokens == 2
    assert tiny_model.tokenizer.decode([inp.target]) == "w11"


# --------------------------------------------------------------------------- facts


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_load_facts_jsonl_and_csv(tmp_path: Path) -> None:
    rows = [{"subject": "w6", "prompt": "w5 w6 w7", "answer": "w9", "relation": "r", "type": "t"}]
    j = _write(tmp_path, "f.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    c = _write(tmp_path, "f.csv", "subject,prompt,answer\nw6,w5 w6 w7,w9\n")
    assert load_facts(j) == [Fact("w6", "w5 w6 w7", "w9", "r", "t", "0")]
    assert load_facts(c) == [Fact("w6", "w5 w6 w7", "w9", "", "", "0")]


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("e.jsonl", "", "empty"),
        ("e.csv", "\n\n", "empty"),
        ("h.csv", "subject,prompt,answer\n", "no facts"),
        ("b.jsonl", '{"subject": "a", "prompt": "a b", "answer": "c"}\n{oops\n', "line 2: not valid JSON"),
        ("l.jsonl", "[1, 2]\n", "expected a JSON object"),
        ("m.jsonl", '{"subject": "a", "prompt": "a b"}\n', "missing column 'answer'"),
        ("s.csv", "subject,prompt,answer\nzz,a b,c\n", "does not occur in prompt"),
        ("v.csv", "subject,prompt,answer\na,a b, \n", "'answer' is empty"),
        ("x.txt", "whatever", "expected a .jsonl or .csv"),
    ],
)
def test_load_facts_rejects_bad_files(tmp_path: Path, name: str, text: str, match: str) -> None:
    with pytest.raises(UserError, match=match):
        load_facts(_write(tmp_path, name, text))


def test_load_facts_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_facts(tmp_path / "nope.jsonl")


def test_shipped_dataset_is_valid() -> None:
    facts = load_facts(DEFAULT_FACTS)
    assert len(facts) >= 300
    assert len({f.id for f in facts}) == len(facts)
    df = pd.DataFrame([f.to_dict() for f in facts])
    assert all(f.type and f.relation for f in facts)
    # a knowledge-conflict substitute needs another answer of the same type
    assert bool((df.groupby("type")["answer"].nunique() >= 2).all())
    assert len(df.drop_duplicates(["prompt", "answer"])) == len(df)


def test_subject_span_and_answer_tokens(tiny_model: LoadedModel) -> None:
    ids, s, e = subject_span(tiny_model, PROMPT, SUBJECT)
    assert (s, e) == (3, 6)
    assert ids[0] == tiny_model.prefix.token_id
    assert ids[s:e] == [17, 23, 40]
    # the LAST occurrence of the subject is traced
    _, s2, e2 = subject_span(tiny_model, "w6 w7 w6 w8", "w6")
    assert (s2, e2) == (3, 4)
    assert answer_tokens(tiny_model, "w11 w12") == [11, 12]


def test_known_facts_against_plain_forward(tiny_llama_hf) -> None:
    model = loaded(copy.deepcopy(tiny_llama_hf), "bridge")
    hf = tiny_llama_hf
    prompts = ["w5 w6 w7", "w9 w10 w11 w12 w13", "w20 w21"]
    facts = []
    for i, p in enumerate(prompts):
        ids = torch.tensor([[0, *[int(w[1:]) for w in p.split()]]])
        with torch.no_grad():
            top = int(hf(ids).logits[0, -1].argmax())
        answer = f"w{top}" if i != 1 else f"w{(top + 1) % 100 + 4}"  # the second one is wrong
        facts.append(Fact(p.split()[0], p, answer))
    df = known_facts(model, facts, batch_size=2)
    assert df["known"].tolist() == [True, False, True]
    # sum mode: teacher-forced log-probs of a two-token answer, by hand
    fact = Fact("w5", "w5 w6 w7", "w30 w31")
    ids = torch.tensor([[0, 5, 6, 7, 30]])
    with torch.no_grad():
        lp = torch.log_softmax(hf(ids).logits[0], dim=-1)
    expected = float(lp[3, 30] + lp[4, 31])
    row = known_facts(model, [fact], answer_mode="sum").iloc[0]
    assert row["logp_answer"] == pytest.approx(expected, abs=1e-5)
    assert row["known"] == bool(lp[3].argmax() == 30 and lp[4].argmax() == 31)
    with pytest.raises(UserError, match="answer_mode"):
        known_facts(model, [fact], answer_mode="all")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- detectors


def test_detectors_registered() -> None:
    d = all_detectors()
    assert "causal-trace" in d
    assert "attention-knockout" in d


def test_causal_trace_detector_on_a_fact_file(tiny_model: LoadedModel, tmp_path: Path) -> None:
    answers = [_top1_answer(tiny_model, p) for p in (PROMPT, "w30 w31 w32 w33")]
    lines = [
        {"subject": SUBJECT, "prompt": PROMPT, "answer": answers[0]},
        {"subject": "w31", "prompt": "w30 w31 w32 w33", "answer": answers[1]},
        {"subject": "w31", "prompt": "w30 w31 w32 w34", "answer": "w4 w5"},
    ]
    path = _write(tmp_path, "f.jsonl", "\n".join(json.dumps(r) for r in lines))
    summary, tables = ct.run_inline(tiny_model, "causal-trace", facts=str(path), limit=5, samples=2, window=2)
    assert summary.variant == "faithful"
    mt: Any = tables["metrics"]
    known = dict(zip(mt[mt["unit"] == "known"]["name"], mt[mt["unit"] == "known"]["value"], strict=True))
    assert known["n_facts_in_file"] == 3
    assert summary.metrics["n_facts_traced"] == known["n_known"]
    assert known["n_known"] >= 2
    assert summary.metrics["noise_std"] == pytest.approx(known["noise_std"])
    final = summary.tables["token_layer"]
    assert set(final["kind"]) == {f"avg_indirect_{k}" for k in tracing.RESTORABLE}
    # the bucket average recomputed from the per-fact rows
    tl: Any = tables["token_layer"]
    m: Any = tables["metrics"]
    vals = []
    for unit in tl["unit"].unique():
        mu = m[m["unit"] == unit].set_index("name")["value"]
        r = tl[(tl["unit"] == unit) & (tl["kind"] == "mlp") & (tl["layer"] == 1)]
        vals.append(float(r[r["token_index"] == int(mu["subject_end"]) - 1]["value"].iloc[0] - mu["p_corrupted"]))
    got: Any = final[(final["kind"] == "avg_indirect_mlp") & (final["token"] == "last_subject") & (final["layer"] == 1)]
    assert float(got["value"].iloc[0]) == pytest.approx(float(np.mean(vals)), abs=1e-9)
    assert "peak_layer_mlp_last_subject" in summary.metrics
    # The mean total effect's t interval over the traced facts, from scipy's quantile.
    effects = np.array([float(m[m["unit"] == u].set_index("name")["value"]["total_effect"]) for u in tl["unit"].unique()])
    half = stats.t.ppf(0.975, len(effects) - 1) * effects.std(ddof=1) / np.sqrt(len(effects))
    iv = summary.intervals["mean_total_effect"]
    assert (iv.lo, iv.hi, iv.n) == (pytest.approx(effects.mean() - half), pytest.approx(effects.mean() + half), len(effects))
    peak = summary.intervals["peak_depth_mlp_last_subject"]
    assert peak.value == summary.metrics["peak_layer_mlp_last_subject"] / tiny_model.info.n_layers
    json.dumps(summary.to_json())


def _spike(n_layers: int, layer: int, height: float = 1.0) -> tuple[np.ndarray, tuple[int, int]]:
    """One fact of 3 tokens (subject = token 1) whose last-subject effect is one spike at ``layer``."""
    grid = np.zeros((3, n_layers))
    grid[1, layer] = height
    return grid, (1, 2)


def test_peak_depth_interval_over_facts_by_hand() -> None:
    # Every fact peaks at layer 2 of 8: every resample does too, so the interval is the point 0.25.
    same = ct.peak_depth_interval([_spike(8, 2)] * 10, 8)
    assert (same.value, same.lo, same.hi, same.n) == (0.25, 0.25, 0.25, 10)
    # Spikes at layers 1 (x6) and 6 (x4): the average peaks at layer 1 (6/10 > 4/10), and a
    # resample's peak is one of the spikes' layers, so both bounds are 1/8 or 6/8; resamples
    # with more layer-6 facts are common (P(Bin(10, 0.4) >= 6) = 0.17): hi = 6/8.
    mixed = ct.peak_depth_interval([_spike(8, 1)] * 6 + [_spike(8, 6)] * 4, 8)
    assert mixed.value == 1 / 8
    assert {mixed.lo, mixed.hi} <= {1 / 8, 6 / 8}
    assert mixed.hi == 6 / 8
    # Fewer facts than PEAK_MIN_FACTS: no interval.
    nine = ct.peak_depth_interval([_spike(8, 2)] * 9, 8)
    assert math.isnan(nine.lo)
    assert nine.value == 0.25
    one = ct.peak_depth_interval([_spike(8, 3)], 8)
    assert math.isnan(one.lo)
    assert one.value == 3 / 8


def test_single_prompt_mode_and_warnings(tiny_model: LoadedModel) -> None:
    summary, _ = ct.run_inline(
        tiny_model, "causal-trace", prompt=PROMPT, subject=SUBJECT, answer="w11 w12", samples=2, kinds="state"
    )
    assert summary.metrics["n_facts_traced"] == 1
    assert any("first token" in w for w in summary.warnings)
    with pytest.raises(UserError, match="needs all of"):
        ct.run_inline(tiny_model, "causal-trace", prompt=PROMPT, answer="w11")
    with pytest.raises(UserError, match="not found in prompt"):
        ct.run_inline(tiny_model, "causal-trace", prompt=PROMPT, subject="w99", answer="w11")
    with pytest.raises(UserError, match="kinds"):
        ct.run_inline(tiny_model, "causal-trace", prompt=PROMPT, subject=SUBJECT, answer="w11", kinds="heads")


def test_knockout_detector(tiny_model: LoadedModel) -> None:
    answer = _top1_answer(tiny_model, PROMPT)
    summary, _tables = ct.run_inline(tiny_model, "attention-knockout", prompt=PROMPT, subject=SUBJECT, answer=answer)
    curves = summary.tables["curves"]
    assert set(curves["curve"]) == set(knockout.KNOCKOUT_SETS)
    assert len(curves) == 3 * tiny_model.info.n_layers
    assert all(math.isfinite(v) for v in curves["y"])
    assert summary.metrics["n_facts"] == 1


def test_configs_parse_lists_and_check_relations() -> None:
    trace, knock = ct.CausalTraceDetector, knockout.AttentionKnockoutDetector
    cfg = trace.parse_params({"kinds": "state,mlp", "samples": "3"})
    assert cfg.kinds == ("state", "mlp")
    assert cfg.samples == 3
    assert cfg.to_dict()["kinds"] == ["state", "mlp"]
    assert trace.parse_params({}).kinds == tracing.RESTORABLE
    # The shared fields come first, in the order of the command line; each detector its own limit.
    assert [p.name for p in knock.params] == [
        "prompt", "subject", "answer", "facts", "scan_all", "answer_mode", "limit", "window", "memory_mb"
    ]
    assert [p.name for p in trace.params][:7] == [p.name for p in knock.params][:7]
    assert (trace.parse_params({}).limit, knock.parse_params({}).limit) == (2, 20)
    for det in (trace, knock):
        assert det().variant(det.parse_params({})) == "faithful"
    with pytest.raises(UserError, match="kinds"):
        trace.parse_params({"kinds": ","})
    with pytest.raises(UserError, match="kinds"):
        trace.parse_params({"kinds": "state,heads"})
    with pytest.raises(UserError, match="needs all of"):
        knock.parse_params({"prompt": PROMPT, "subject": SUBJECT})
    with pytest.raises(UserError, match="answer_mode"):
        knock.parse_params({"answer_mode": "all"})


def test_a_trace_split_in_parts_joins_to_the_whole(tiny_llama_hf: Any) -> None:
    """Split a fact's trace by cells (as the Dask executor does when a run has fewer units than
    workers): each part recomputes the base run and restores its share of the cells; joined,
    they give run_unit's tables. A missing or doubled part is refused."""
    from circuits.detectors.causal_trace import CausalTraceDetector
    from interp.runs.runner import run_in_memory

    model = loaded(copy.deepcopy(tiny_llama_hf))
    det = CausalTraceDetector()
    cfg = det.parse_params({"prompt": "w5 w9 w17 w23 w40 w41 w7 w8", "subject": "w17 w23 w40", "answer": "w11",
                            "samples": 2, "kinds": "state,mlp,attn", "window": 2})
    [fact] = det.units(model, cfg)
    assert det.max_parts(model, cfg, Unit("known")) == 1
    assert det.max_parts(model, cfg, fact) >= 3
    parts = [det.run_part(model, cfg, Part(fact, i, 3)) for i in range(3)]
    assert sorted(i for p in parts for i in p["index"]) == list(range(sum(len(p["index"]) for p in parts)))
    whole = run_in_memory(model, det, cfg)[1]
    joined = det.join_parts(model, cfg, fact, parts).tables
    for table in ("token_layer", "metrics", "artifacts"):
        pd.testing.assert_frame_equal(joined[table], whole[table].drop(columns="unit"), check_exact=False,
                                      rtol=1e-6, atol=1e-7, obj=table)
    with pytest.raises(ValueError, match="cover"):
        det.join_parts(model, cfg, fact, parts[:2])
    with pytest.raises(ValueError, match="cover"):
        det.join_parts(model, cfg, fact, [*parts, parts[0]])
