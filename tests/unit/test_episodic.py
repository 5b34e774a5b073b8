"""Copying scores, attention lag-CRPs, the CMR simulation and fit, on tiny models.

The references are independent: the vocab x vocab OV map built by calling a plain copy of the
HF modules, the lag-CRP read from HF's ``output_attentions`` by loops, the reference's
recall loop ported line by line, and small cases worked by hand.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from circuits.data.texts import text_chunks
from circuits.detectors import cmr, copying, episodic_ablation
from circuits.detectors import lag_crp as episodic
from circuits.methods import cmr_model, lists
from interp.errors import UserError
from interp.model.loaded import LoadedModel
from interp.runs.config import DetectorConfig
from interp.runs.registry import Summary, get_detector
from interp.runs.runner import finalized
from interp.runs.units import Unit
from tests.tiny import loaded

TABLES = ("head_scores", "token_layer", "curves", "metrics", "artifacts")


def run_local(model: LoadedModel, name: str, raw: dict | DetectorConfig) -> Summary:
    """Drive a detector as the runner does (units, then finalize), without the store."""
    det = get_detector(name)
    cfg = det.parse_params(raw)
    per: dict[str, list[pd.DataFrame]] = {t: [] for t in TABLES}
    for unit in det.units(model, cfg):
        for table, df in det.run_unit(model, cfg, unit).tables.items():
            per[table].append(df.assign(unit=unit.key))
    results = {t: pd.concat(v, ignore_index=True) if v else pd.DataFrame(columns=["unit"]) for t, v in per.items()}
    return finalized(model, det, cfg, results)


# ---------------------------------------------------------------- copying score


def _unnormed(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """An RMS norm module called on x [n, d], its 1/rms(x) undone by hand: x times the norm's
    elementwise factor, whatever form it takes (w for Llama, 1 + w for Gemma)."""
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    return norm(x) * torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _full_vocab_copying(hf: Any) -> np.ndarray:
    """Copying score from the vocab x vocab OV map, built by calling the HF modules on the
    (norm-weight scaled) embeddings of every token, then eigenvalues of the full map. Biases
    are left out (the OV circuit is the linear map); Gemma's post-attention norm is applied to
    the head's output as its forward pass does."""
    cfg = hf.config
    gpt2 = hasattr(hf, "transformer")
    base = hf.transformer if gpt2 else hf.model
    blocks = base.h if gpt2 else base.layers
    n_heads = cfg.n_head if gpt2 else cfg.num_attention_heads
    d = cfg.n_embd if gpt2 else cfg.hidden_size
    dh = getattr(cfg, "head_dim", None) or d // n_heads
    n_kv = n_heads if gpt2 else cfg.num_key_value_heads
    hf = hf.double()
    vocab = torch.arange(cfg.vocab_size)
    with torch.no_grad():
        emb = hf.get_input_embeddings()(vocab)  # Gemma's module scales by sqrt(d_model)
    final = base.ln_f if gpt2 else base.norm
    lm = hf.get_output_embeddings()
    out = np.zeros((len(blocks), n_heads))
    with torch.no_grad():
        for li, block in enumerate(blocks):
            attn = block.attn if gpt2 else block.self_attn
            zero = torch.zeros(1, d, dtype=torch.float64)
            if gpt2:
                x = emb * block.ln_1.weight.detach()
                v = attn.c_attn(x)[:, 2 * d :] - attn.c_attn(zero)[:, 2 * d :]
                proj = lambda z, c=attn.c_proj: c(z) - c(torch.zeros_like(z))  # noqa: E731
                readout = lambda r: lm(r * final.weight)  # noqa: E731
            else:
                x = _unnormed(block.input_layernorm, emb)
                v = attn.v_proj(x) - attn.v_proj(zero)
                gemma = hasattr(block, "pre_feedforward_layernorm")  # its post_attention_layernorm is on the output
                proj = lambda z, o=attn.o_proj, b=block, g=gemma: (  # noqa: E731
                    _unnormed(b.post_attention_layernorm, o(z)) if g else o(z))
                readout = lambda r: lm(_unnormed(final, r))  # noqa: E731
            for h in range(n_heads):
                kv = h // (n_heads // n_kv)
                z = torch.zeros(emb.shape[0], n_heads * dh, dtype=torch.float64)
                z[:, h * dh : (h + 1) * dh] = v[:, kv * dh : (kv + 1) * dh]
                full = readout(proj(z))  # [vocab_in, vocab_out]
                eig = np.linalg.eigvals(full.numpy())
                out[li, h] = eig.sum().real / np.abs(eig).sum()
    return out


def test_copying_equals_full_vocab_eigenvalues(tiny_model: LoadedModel, tiny_hf: torch.nn.Module) -> None:
    reference = _full_vocab_copying(copy.deepcopy(tiny_hf))
    got = copying.copying_scores(tiny_model).numpy()
    np.testing.assert_allclose(got, reference, atol=1e-5)
    # The heads must differ, else a score that ignores the head index would pass.
    assert np.ptp(reference) > 0.05


def test_copying_score_of_a_pure_copying_head() -> None:
    """Hand-made head: with W_V W_O the identity on a tied, orthonormal embedding the OV map
    is the identity (all eigenvalues 1): score 1; its negation scores -1."""
    from tests.tiny import tiny_llama

    hf: Any = tiny_llama()
    d = hf.config.hidden_size
    dh = hf.config.head_dim
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))
        hf.model.embed_tokens.weight.zero_()
        hf.model.embed_tokens.weight[:dh] = q[:dh]  # dh tokens spanning head 0's subspace
        hf.lm_head.weight.copy_(hf.model.embed_tokens.weight)
        hf.model.norm.weight.fill_(1.0)
        layer = hf.model.layers[0]
        layer.input_layernorm.weight.fill_(1.0)
        layer.self_attn.v_proj.weight.zero_()
        layer.self_attn.v_proj.weight[:dh] = q[:dh]  # kv head 0 reads the subspace
        layer.self_attn.o_proj.weight.zero_()
        layer.self_attn.o_proj.weight[:, :dh] = q[:dh].T  # query head 0 writes it back
        layer.self_attn.o_proj.weight[:, dh : 2 * dh] = -q[:dh].T  # query head 1 (same kv) negates
    scores = copying.copying_scores(loaded(hf))
    assert scores[0, 0].item() == pytest.approx(1.0, abs=1e-5)
    assert scores[0, 1].item() == pytest.approx(-1.0, abs=1e-5)


# ---------------------------------------------------------------- lag-CRP


def _plain_lag_crp(hf: Any, prompts: lists.ListPrompts, max_lag: int) -> np.ndarray:
    with torch.no_grad():
        att = hf(prompts.tokens, output_attentions=True).attentions
    n_l, n_h = len(att), att[0].shape[1]
    off, r = prompts.offset, prompts.length
    out = np.zeros((n_l, n_h, 2 * max_lag + 1))
    for li in range(n_l):
        for h in range(n_h):
            for li_lag, lag in enumerate(range(-max_lag, max_lag + 1)):
                vals = []
                for b in range(prompts.tokens.shape[0]):
                    for k in range(r):
                        p = int(prompts.match[b, k])
                        if 0 <= p + lag < r:
                            vals.append(float(att[li][b, h, off + r + k, off + p + lag]))
                out[li, h, li_lag] = np.mean(vals)
    return out


@pytest.mark.parametrize("variant", ["repeated", "mistry"])
def test_lag_crp_matches_hf_output_attentions(
    tiny_model: LoadedModel, tiny_hf: torch.nn.Module, variant: str
) -> None:
    raw = {"lists": variant, "seq_len": 12, "n_prompts": 3, "batch_size": 2, "max_lag": 4, "seed": 3}
    summary = run_local(tiny_model, "lag-crp", raw)
    curves = summary.tables["curves"]
    c_curve, c_layer, c_head, c_x, c_y = (np.asarray(curves[c].to_numpy()) for c in ("curve", "layer", "head", "x", "y"))
    det = get_detector("lag-crp")
    cfg = det.parse_params(raw)
    units = det.units(tiny_model, cfg)
    prompt_sets = [det.prompts(tiny_model, cfg, u) for u in units]  # type: ignore[attr-defined]
    hf = copy.deepcopy(tiny_hf)
    for pr in prompt_sets:
        # The second list must show the first list's tokens at the claimed positions.
        first = pr.tokens[:, pr.offset : pr.offset + pr.length]
        second = pr.tokens[:, pr.offset + pr.length :]
        assert torch.equal(first.gather(1, pr.match), second)
    tokens = torch.cat([p.tokens for p in prompt_sets])
    merged = lists.ListPrompts(tokens, prompt_sets[0].offset, 12, torch.cat([p.match for p in prompt_sets]))
    reference = _plain_lag_crp(hf, merged, 4)
    for layer, head in [(0, 0), (1, 2), (2, 3), (2, 1)]:
        sel = (c_curve == "lag_crp") & (c_layer == layer) & (c_head == head)
        got = c_y[sel][np.argsort(c_x[sel].astype(float))].astype(float)
        np.testing.assert_allclose(got, reference[layer, head], atol=1e-6)
    assert np.ptp(reference[:, :, 4 + 1]) > 1e-3  # heads differ at lag +1


def test_primacy_recency_by_hand() -> None:
    spc = np.array([4.0, 1, 1, 1, 1, 1, 1, 1, 1, 2])
    primacy, recency = episodic.primacy_recency(spc, edge_frac=0.1)
    assert primacy == pytest.approx(4.0)
    assert recency == pytest.approx(2.0)


def test_mistry_lists_use_frequent_tokens(tiny_model: LoadedModel) -> None:
    pr = lists.mistry_lists(tiny_model, 2, 20, seed=1)
    assert pr.tokens.shape == (2, 41)
    for b in range(2):
        first = pr.tokens[b, 1:21]
        assert len(set(first.tolist())) == 20
        assert sorted(first.tolist()) == sorted(pr.tokens[b, 21:].tolist())
        assert not torch.equal(pr.tokens[b, 1:21], pr.tokens[b, 21:])


# ---------------------------------------------------------------- CMR model


def test_encode_by_hand() -> None:
    m = cmr_model.encode(0.5, 2)
    # M = (I - 0.5 T)^-1 T for 2 items + absorbing: M[i, j] = 0.5^(j-i-1) for j > i.
    np.testing.assert_allclose(m, [[0, 1, 0.5], [0, 0, 1], [0, 0, 0]], atol=1e-12)


def test_closed_form_by_hand() -> None:
    # beta_rec = 0, gamma = 0, s0 = 0: P1 = [0, 1, 0.5] / 1.5; crp(0) = 5/9, crp(+-1) = 2/9.
    crp = cmr_model.closed_form_crp(cmr_model.encode(0.5, 2), 0, 0.0, 2, 1)
    np.testing.assert_allclose(crp, [2 / 9, 5 / 9, 2 / 9], atol=1e-12)


def test_simulation_chain_case_by_hand() -> None:
    """beta_enc = 1 (M = T), beta_rec = 1, gamma = 0: recall walks +1 from s0 to the end."""
    m = cmr_model.encode(1.0, 10)
    n = 6
    for estimator in ("sampled", "expected"):
        freq = cmr_model.simulate_counts(
            m, torch.ones(n), torch.zeros(n), torch.arange(n), 3, 100, torch.Generator().manual_seed(0), estimator
        ).numpy()
        expected = np.zeros((n, 7))
        expected[:, 3 + 1] = 1.0
        np.testing.assert_allclose(freq, expected, atol=1e-6)


def test_simulation_two_items_by_hand() -> None:
    """2 items, beta_enc = 1, beta_rec = 0.5, gamma = 0, s0 = 0: the first transition is +1
    (item 1), every later one repeats item 1 (lag 0) until the absorbing state: a trial of N
    transitions has frequency 1/N at +1 and (N-1)/N at 0."""
    m = cmr_model.encode(1.0, 2)
    n = 200
    freq = cmr_model.simulate_counts(
        m, torch.full((n,), 0.5), torch.zeros(n), torch.zeros(n, dtype=torch.long), 1, 100,
        torch.Generator().manual_seed(1),
    ).numpy()
    assert np.allclose(freq[:, 0], 0)
    np.testing.assert_allclose(freq.sum(1), 1.0, atol=1e-9)
    n_trans = 1 / freq[:, 2]
    np.testing.assert_allclose(n_trans, np.round(n_trans), atol=1e-6)
    assert n_trans.max() > 1  # some trials repeat item 1


def _reference_recall(m: np.ndarray, beta: float, gamma: float, s0: int, n_exps: int, rng: np.random.Generator) -> list[list[int]]:
    """The reference's recall loop (corxyz/icl-cmr est_cmr_crp.recall), ported as is."""
    trials = []
    stim = np.identity(m.shape[0])
    for _ in range(n_exps):
        t = stim[:, s0]
        samples: list[int] = []
        while len(samples) < 100:
            f = m.T @ t
            p = f / f.sum()
            j = int(np.where(rng.random() <= np.cumsum(p))[0][0])
            if j >= m.shape[0] - 1:
                break
            samples.append(j)
            t_in = (1 - gamma) * stim[:, j] + gamma * (m @ stim[:, j])
            t_in = t_in / np.linalg.norm(t_in)
            t = (1 - beta) * t + beta * t_in
            t = t / np.linalg.norm(t)
        trials.append(samples)
    return trials


def _reference_crp(trials: list[list[int]], s0: int, max_lag: int) -> np.ndarray:
    rows = []
    for tr in trials:
        if not tr:
            continue
        c = np.zeros(2 * max_lag + 1)
        prev = s0
        for s in tr:
            if abs(s - prev) <= max_lag:
                c[s - prev + max_lag] += 1
            prev = s
        rows.append(c / len(tr))
    crp = np.mean(rows, axis=0)
    return crp / crp.sum()


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["sampled", "expected"])
def test_vectorised_simulation_matches_reference_loop(estimator: str) -> None:
    n_items, max_lag, s0, n_exps = 20, 4, 3, 1000
    m = cmr_model.encode(0.4, n_items)
    for beta, gamma in [(0.6, 0.3), (0.3, 0.8)]:
        ref = _reference_crp(_reference_recall(m, beta, gamma, s0, n_exps, np.random.default_rng(0)), s0, max_lag)
        freq = cmr_model.simulate_counts(
            m, torch.full((n_exps,), beta), torch.full((n_exps,), gamma), torch.full((n_exps,), s0), max_lag, 100,
            torch.Generator().manual_seed(5), estimator,
        ).numpy()
        got = np.nanmean(freq, axis=0)
        got = got / got.sum()
        # Monte-Carlo tolerance: ~4 standard errors of a lag probability over 1000 trials.
        np.testing.assert_allclose(got, ref, atol=0.025)


def _small_spec(**kw: object) -> cmr_model.GridSpec:
    base = {"beta_enc": (0.5,), "beta_rec": (0.0, 0.5), "gamma_ft": (0.0, 0.5), "n_items": 20, "n_starts": 2, "n_sims": 3}
    base.update(kw)
    return cmr_model.GridSpec(**base)  # type: ignore[arg-type]


def test_grid_deterministic_and_cached(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERP_CACHE_DIR", str(tmp_path))
    spec = _small_spec()
    a = cmr_model.simulate_grid(spec)
    b = cmr_model.simulate_grid(spec)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-9)
    g1 = cmr_model.cmr_grid(spec)
    g2 = cmr_model.cmr_grid(spec)
    assert not g1.cached
    assert g2.cached
    np.testing.assert_array_equal(g1.crp, g2.crp)
    assert (cmr_model.cache_dir() / f"crp-{spec.key()}.npz").exists()
    assert _small_spec(seed=1).key() != spec.key()
    assert not np.array_equal(cmr_model.simulate_grid(_small_spec(seed=1)), a)
    # The closed-form cell (beta_rec = 0, gamma = 0) is the average of the per-start closed forms.
    m = cmr_model.encode(0.5, 20)
    cf = np.mean([cmr_model.closed_form_crp(m, s, 0.0, 20, 8) for s in range(2)], axis=0)
    np.testing.assert_allclose(a[0, 0, 0], cf, atol=1e-12)


def test_grid_spec_rejects_bad_values() -> None:
    with pytest.raises(UserError):
        cmr_model.GridSpec(beta_enc=(0.0, 0.5))
    with pytest.raises(UserError):
        cmr_model.GridSpec(estimator="magic")


def _naive_distance(attn: np.ndarray, crp: np.ndarray) -> float:
    """fit_attn_score.get_head_mse, written out."""
    a = attn - attn.min()
    c = crp / crp.sum()
    c = c - c.min()
    c = c * (a.max() / c.max())
    return float(np.mean((c - a) ** 2) / np.var(a))


def test_fit_matches_naive_distance_and_recovers_parameters() -> None:
    rng = np.random.default_rng(0)
    spec = cmr_model.GridSpec(beta_enc=(0.2, 0.6), beta_rec=(0.1, 0.5, 0.9), gamma_ft=(0.0, 1.0), max_lag=8)
    crp = rng.random((2, 3, 2, 17)) + 0.1
    crp /= crp.sum(-1, keepdims=True)
    grid = cmr_model.CMRGrid(spec=spec, crp=crp, seconds=0.0)
    lags = np.arange(-8, 9)
    sel = np.abs(lags) <= 5
    target = 0.3 * crp[1, 2, 0] + 0.01  # an exact CMR curve, scaled and shifted
    noisy = rng.random(17)
    fit = cmr_model.fit_cmr(np.stack([target, noisy, np.ones(17)]), lags, grid, fit_lag=5)
    assert fit.distance[0] == pytest.approx(0.0, abs=1e-9)
    assert (fit.beta_enc[0], fit.beta_rec[0], fit.gamma_ft[0]) == (0.6, 0.9, 0.0)
    naive = min(_naive_distance(noisy[sel], crp[i, j, k][sel]) for i in range(2) for j in range(3) for k in range(2))
    assert fit.distance[1] == pytest.approx(naive, rel=1e-9)
    assert np.isnan(fit.distance[2])  # flat curve: no variance
    labels = fit.labels()
    assert labels["cmr_like"][0]
    assert labels["cmr_like_strict"][0]
    assert not labels["cmr_like"][2]


# ---------------------------------------------------------------- detectors


def test_detectors_are_deterministic(tiny_model: LoadedModel) -> None:
    for name, raw in [
        ("copying", {"seq_len": 10, "n_prompts": 3}),
        ("lag-crp", {"seq_len": 12, "n_prompts": 4, "batch_size": 2, "max_lag": 4}),
    ]:
        a, b = run_local(tiny_model, name, raw), run_local(tiny_model, name, raw)
        assert a.to_json() == b.to_json()
    raw = {"seq_len": 12, "n_prompts": 4, "batch_size": 2, "max_lag": 4, "seed": 1}
    other = run_local(tiny_model, "lag-crp", raw)
    assert other.to_json() != run_local(tiny_model, "lag-crp", {**raw, "seed": 0}).to_json()


def test_ablation_units_and_draws(tiny_model: LoadedModel) -> None:
    raw = {
        "score": "induction", "k": 2, "n_draws": 3, "seq_len": 64, "late": 50, "early": 10, "window": 5,
        "n_single": 1, "cum_sizes": (1,), "rep_len": 10, "rep_prompts": 3, "n_texts": 2,
    }
    det = get_detector("episodic-ablation")
    cfg = det.parse_params(raw)
    units = det.units(tiny_model, cfg)
    assert [u.key for u in units] == ["clean", "top", "random-0", "random-1", "random-2", "single-0", "cum-1"]
    top = set(det.heads_for(tiny_model, cfg, Unit("top")))  # type: ignore[attr-defined]
    draws = [det.heads_for(tiny_model, cfg, Unit("random", i)) for i in range(3)]  # type: ignore[attr-defined]
    for d in draws:
        assert len(d) == 2
        assert not top & set(d)
    s = run_local(tiny_model, "episodic-ablation", raw)
    s2 = run_local(tiny_model, "episodic-ablation", raw)
    assert s.to_json() == s2.to_json()
    m = s.metrics
    assert m["k"] == 2
    assert len(m["random_heads"]) == 3
    assert m["icl_delta_cum-1"] == pytest.approx(m["icl_delta_single-0"])
    # The change under the top set: a paired t interval over the prompts, from the units' own
    # per-prompt ICL scores and scipy's t quantile.
    def icl(unit: Unit) -> np.ndarray:
        c = det.run_unit(tiny_model, cfg, unit).tables["curves"]
        c = c[c["curve"] == "icl"].sort_values("x")
        return c["y"].to_numpy(dtype=float)

    diff = icl(Unit("top")) - icl(Unit("clean"))
    half = scipy.stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    iv = s.intervals["icl_delta_top"]
    assert (iv.method, iv.n) == ("paired-t", len(diff))
    assert (iv.value, iv.lo, iv.hi) == pytest.approx((diff.mean(), diff.mean() - half, diff.mean() + half), abs=1e-9)
    assert set(s.to_json()["intervals"]) >= {"icl_delta_random", "second_copy_loss_top_minus_random", "icl_delta_cum-1"}


def test_ablation_effect_matches_plain_hook(tiny_model: LoadedModel, tiny_hf: torch.nn.Module) -> None:
    """The ICL score under ablation equals one computed with a raw hook zeroing the head's
    slice of the output projection's input on a plain HF copy."""
    raw = {
        "score": "induction", "k": 1, "n_draws": 1, "seq_len": 64, "late": 50, "early": 10, "window": 5,
        "n_single": 0, "cum_sizes": (), "rep_len": 10, "rep_prompts": 2, "n_texts": 1,
    }
    det = get_detector("episodic-ablation")
    cfg = det.parse_params(raw)
    [(layer, head)] = det.heads_for(tiny_model, cfg, Unit("top"))  # type: ignore[attr-defined]
    res = det.run_unit(tiny_model, cfg, Unit("top")).tables["curves"]
    got = np.asarray(res["y"].to_numpy())[np.asarray(res["curve"].to_numpy()) == "icl"]
    tokens = text_chunks(tiny_model, 1, 64)
    hf: Any = copy.deepcopy(tiny_hf)
    gpt2 = hasattr(hf, "transformer")
    attn = hf.transformer.h[layer].attn if gpt2 else hf.model.layers[layer].self_attn
    proj = attn.c_proj if gpt2 else attn.o_proj
    dh = hf.config.n_embd // hf.config.n_head if gpt2 else (
        getattr(hf.config, "head_dim", None) or hf.config.hidden_size // hf.config.num_attention_heads)

    def zero_head(_mod: torch.nn.Module, args: tuple) -> tuple:
        x = args[0].clone()
        x[..., head * dh : (head + 1) * dh] = 0
        return (x,)

    handle = proj.register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            logits = hf(tokens).logits
    finally:
        handle.remove()
    logp = torch.log_softmax(logits[0, :-1].double(), -1)
    nll = -logp.gather(-1, tokens[0, 1:, None])[:, 0]
    np.testing.assert_allclose(got, [float(nll[50] - nll[10])], atol=1e-4)


def test_bad_input_is_a_user_error(tiny_model: LoadedModel) -> None:
    with pytest.raises(UserError):
        run_local(tiny_model, "lag-crp", {"seq_len": 3, "max_lag": 8})
    with pytest.raises(UserError):
        run_local(tiny_model, "episodic-ablation", {"k": 7, "seq_len": 64, "late": 50, "early": 10})
    with pytest.raises(UserError):
        get_detector("cmr").parse_params({"grid_estimator": "nope"})


# ---------------------------------------------------------------- typed configs


SLUG = re.compile(r"^[a-z0-9]+([-./+=][a-z0-9]+)*$")


def test_configs_parse_command_line_values() -> None:
    cfg = episodic_ablation.EpisodicAblationConfig.parse({"cum_sizes": "3,1", "k": "4", "method": "mean"})
    assert cfg.cum_sizes == (3, 1)
    assert cfg.k == 4
    assert cfg.method == "mean"
    assert episodic_ablation.EpisodicAblationConfig().cum_sizes == (1, 3)
    assert episodic_ablation.EpisodicAblationConfig(cum_sizes=()).cum_sizes == ()
    for bad in ("0,2", "1,x"):
        with pytest.raises(UserError, match="cum_sizes"):
            episodic_ablation.EpisodicAblationConfig.parse({"cum_sizes": bad})
    with pytest.raises(UserError, match="n_single"):
        episodic_ablation.EpisodicAblationConfig(k=2, n_single=3)
    with pytest.raises(UserError, match="fit_lag"):
        cmr.CMRConfig(max_lag=4, fit_lag=5)
    # A list size of 0 is the variant's default; the check reads the default.
    assert episodic.LagCRPConfig().lists == "mistry"
    assert cmr.CMRConfig().lists == "repeated"
    mistry = episodic.LagCRPConfig().resolved()
    assert (mistry.seq_len, mistry.n_prompts, mistry.batch_size) == (500, 2, 1)
    repeated = cmr.CMRConfig(n_prompts=3).resolved()
    assert (repeated.seq_len, repeated.n_prompts, repeated.batch_size) == (50, 3, 10)
    assert isinstance(repeated, cmr.CMRConfig)
    with pytest.raises(UserError, match="repeated default"):
        cmr.CMRConfig(max_lag=49)


def test_variants_are_the_old_slugs() -> None:
    """The slugs stay those of earlier runs (they are part of the run key)."""
    cases = [
        ("copying", {}, "eig-lowrank/ln-weights-folded"),
        ("lag-crp", {}, "mistry"),
        ("lag-crp", {"lists": "repeated"}, "repeated"),
        ("cmr", {}, "repeated-lists/cmr-grid-expected-1"),
        ("cmr", {"lists": "mistry", "grid_estimator": "sampled", "grid_sims": 1000}, "mistry-lists/cmr-grid-sampled-1000"),
        ("episodic-ablation", {}, "zero-ablation/top-by-cmr"),
        ("episodic-ablation", {"method": "mean", "score": "induction"}, "mean-ablation/top-by-induction"),
    ]
    for name, raw, slug in cases:
        det = get_detector(name)
        cfg = det.parse_params(raw)
        assert det.variant(cfg) == slug
        assert SLUG.match(slug)
        assert len(slug) <= 40
        assert det.method_text(cfg)
    longest = get_detector("cmr").parse_params({"lists": "repeated", "grid_sims": 9_999_999})
    assert len(get_detector("cmr").variant(longest)) <= 40


def test_example_tokens_are_the_first_unit_inputs(tiny_model: LoadedModel) -> None:
    lag = get_detector("lag-crp")
    cfg = lag.parse_params({"lists": "repeated", "seq_len": 12, "n_prompts": 3, "batch_size": 2, "max_lag": 4})
    tokens = lag.example_tokens(tiny_model, cfg)
    assert tokens is not None
    assert torch.equal(tokens, lag.prompts(tiny_model, cfg, Unit("batch", 0)).tokens)  # type: ignore[attr-defined]
    assert tokens.shape == (2, 1 + 2 * 12)
    cp = get_detector("copying")
    cp_tokens = cp.example_tokens(tiny_model, cp.parse_params({"seq_len": 10, "n_prompts": 3}))
    assert cp_tokens is not None
    assert cp_tokens.shape == (3, 1 + 2 * 10)
    abl = get_detector("episodic-ablation")
    abl_tokens = abl.example_tokens(tiny_model, abl.parse_params({"seq_len": 64, "late": 50, "early": 10, "window": 5, "n_texts": 2}))
    assert torch.equal(abl_tokens, text_chunks(tiny_model, 2, 64))  # type: ignore[arg-type]


def test_ranking_is_computed_once_per_detector(tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    rank = episodic_ablation.ranked_by_score

    def counted(model: LoadedModel, score: str, seed: int) -> list[tuple[int, int]]:
        calls.append(score)
        return rank(model, score, seed)

    monkeypatch.setattr(episodic_ablation, "ranked_by_score", counted)
    det = episodic_ablation.EpisodicAblationDetector()
    cfg = det.parse_params({"score": "induction", "k": 1, "n_single": 0, "seq_len": 64, "late": 50, "early": 10, "window": 5})
    first = det.ranking(tiny_model, cfg)
    assert det.ranking(tiny_model, cfg) is first
    assert det.ranking(tiny_model, dataclasses.replace(cfg, score="copying")) is not first
    assert calls == ["induction", "copying"]
    assert episodic_ablation.EpisodicAblationDetector().ranking(tiny_model, cfg) == first
    assert len(first) == tiny_model.info.n_total_heads
