"""Retrieval heads: generator, bookkeeping (hand-computed), decoding against plain HF, masking."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from circuits.data import needles as nd
from circuits.detectors import retrieval as rt
from circuits.detectors import retrieval_masking
from interp.errors import UserError
from interp.model.interventions import Intervention, Sources, ablate_heads
from interp.model.loaded import LoadedModel, Provenance
from interp.model.sites import Site
from interp.runs.runner import finalized
from tests.tiny import VOCAB, tiny_gpt2, tiny_llama

FORCED = 50  # the token the forced-output model always emits ("W50")


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Capitalised words W7..W127 and punctuation, so sentence splitting has real boundaries."""
    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2, "<unk>": 3, ".": 4, "?": 5, ":": 6}
    for i in range(7, VOCAB):
        vocab[f"W{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def wrap(hf: torch.nn.Module) -> LoadedModel:
    prov = Provenance(f"tiny-{type(hf).__name__}", "object", None, "float32", "cpu")
    return LoadedModel(hf, word_tokenizer(), prov)  # type: ignore[arg-type]


def force_output(hf: torch.nn.Module, token: int = FORCED) -> torch.nn.Module:
    """Replace the unembedding by a constant: every position predicts ``token``."""
    lm = torch.nn.Linear(int(hf.config.hidden_size), VOCAB, bias=True)  # type: ignore[union-attr]
    with torch.no_grad():
        lm.weight.zero_()
        lm.bias.zero_()
        lm.bias[token] = 10.0
    hf.lm_head = lm
    return hf


# Filler sentences of 4 words each; W50 appears in the filler only in sentence 3.
FILLER = [f"W{10 + i} W{20 + i} W{30 + i} W{40 + i}." for i in range(8)]
FILLER[3] = "W13 W50 W33 W43."
HAYSTACK_TEXT = " ".join(FILLER)
# The needle: 6 tokens ("W50 W60 W61 W62 W63 ."), answer "W50", question without it.
NEEDLE = {"sentence": "W50 W60 W61 W62 W63.", "question": "W70 W71?", "answer": "W50"}


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    hay = tmp_path / "hay.txt"
    hay.write_text(HAYSTACK_TEXT)
    nee = tmp_path / "needles.jsonl"
    nee.write_text(json.dumps(NEEDLE) + "\n")
    return {"haystack_file": str(hay), "needles_file": str(nee)}


def sample_for(model: LoadedModel, length: int = 20, depth: float = 0.5, seed: int = 0) -> nd.NeedleSample:
    hay = nd.Haystack(model, nd.split_sentences(HAYSTACK_TEXT))
    return nd.make_sample(model, hay, nd.Needle(**NEEDLE), length, depth, seed=seed, prompt_format="plain")


# ------------------------------------------------------------------ correctness


def test_rouge1_recall_by_hand() -> None:
    assert rt.rouge1_recall("blue falcon seven", "The password is blue falcon seven.") == 1.0
    assert rt.rouge1_recall("blue falcon seven", "Blue falcon!") == pytest.approx(2 / 3)
    # Clipped counts: a repeated reference word needs two occurrences.
    assert rt.rouge1_recall("the cat the dog", "the cat") == pytest.approx(2 / 4)
    assert rt.rouge1_recall("eat a sandwich", "") == 0.0
    assert rt.is_correct("eat a sandwich", "eat sandwich") is True  # 2/3 > 0.5
    assert rt.is_correct("eat a sandwich and sit", "a sandwich") is False  # 2/5


# ------------------------------------------------------------------ bookkeeping by hand


def test_retrieval_scores_hand_computed() -> None:
    # Prompt tokens by position; the needle span is [3, 7) (length 4).
    seq = [9, 9, 9, 5, 6, 7, 6, 9, 6]
    span = (3, 7)
    # 2 layers x 2 heads, 3 decoding steps generating 6, 7, 6.
    targets = [6, 7, 6]
    argmax = [
        torch.tensor([[4, 4], [8, 1]]),  # step 0 (target 6): L0H0 at 4 (6, in span) hit; L0H1 hit; L1H0 at 8 (6, outside) no
        torch.tensor([[5, 4], [8, 5]]),  # step 1 (target 7): L0H0 at 5 (7) hit; L0H1 at 4 (6) no; L1H1 at 5 hit
        torch.tensor([[6, 3], [8, 7]]),  # step 2 (target 6): L0H0 at 6 (6) hit; L0H1 at 3 (5) no; L1H1 at 7 (span end, excl.)
    ]
    scores = rt.retrieval_scores(argmax, seq, span, targets)
    expected = torch.tensor([[3 / 4, 1 / 4], [0.0, 1 / 4]], dtype=torch.float64)
    assert torch.equal(scores, expected)


@dataclass(frozen=True)
class ForceAttention(Intervention):
    """Test-only crafted pattern: head ``head`` of ``layer`` attends only to key ``key`` from
    every query that can see it (scores -inf elsewhere), in the prefill and at every step."""

    op: ClassVar[str] = "test_force_attention"
    layer: int
    head: int
    key: int

    @property
    def site(self) -> Site:
        return Site("scores", self.layer)

    def apply(self, x: torch.Tensor, sources: Sources) -> torch.Tensor:
        n_q, n_k = x.shape[2], x.shape[3]
        abs_q = torch.arange(n_k - n_q, n_k)
        rows = abs_q >= self.key
        forced = torch.full((n_k,), float("-inf"))
        forced[self.key] = 0.0
        x[:, self.head, rows, :] = forced
        return x


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_forced_head_scores_hand_computed(make: Any) -> None:
    model = wrap(force_output(make()))
    s = sample_for(model, length=46)  # all 8 filler sentences (5 tokens each) + the needle
    seq = list(s.input_ids)
    start, end = s.needle_span
    assert end - start == 6
    assert seq[start] == FORCED
    # Keys: a needle token equal to the output, a needle token that is not, and a W50 outside.
    j_in, j_other = start, start + 2
    outside = [i for i, t in enumerate(seq) if t == FORCED and not start <= i < end]
    assert outside, "the filler should hold W50 outside the needle"
    j_out = outside[0]
    ivs = [ForceAttention(1, 2, j_in), ForceAttention(0, 1, j_other), ForceAttention(2, 3, j_out)]
    r = rt.score_sample_faithful(model, s, max_new_tokens=3, interventions=ivs)
    assert r["generated"] == [FORCED] * 3
    # The argmax of the forced heads is the forced key at every decoding step.
    for table in r["argmax"]:
        assert int(table[1, 2]) == j_in
        assert int(table[0, 1]) == j_other
        assert int(table[2, 3]) == j_out
    # Hand-computed: 3 steps, each counted once, over a 6-token span.
    assert float(r["scores"][1, 2]) == pytest.approx(3 / 6)
    assert float(r["scores"][0, 1]) == 0.0  # in the span, but the token differs
    assert float(r["scores"][2, 3]) == 0.0  # the token matches, but outside the span
    assert r["correct"] is True


# ------------------------------------------------------------------ decoding vs plain HF


def hf_greedy_with_argmax(hf: Any, prompt: list[int], steps: int, eos: int) -> tuple[list[int], list[torch.Tensor]]:
    """Reference: no KV cache, a full forward per step, attention from output_attentions."""
    seq = list(prompt)
    gen, tables = [], []
    for _ in range(steps):
        with torch.no_grad():
            out = hf(torch.tensor([seq]), output_attentions=True)
        tok = int(out.logits[0, -1].argmax())
        tables.append(torch.stack([a[0, :, -1].argmax(-1) for a in out.attentions]))
        gen.append(tok)
        seq.append(tok)
        if tok == eos:
            break
    return gen, tables


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_kv_cache_decode_matches_plain_hf(make: Any) -> None:
    hf = make()
    ref_hf = copy.deepcopy(hf)
    model = wrap(hf)
    s = sample_for(model, length=24)
    gen, argmax = rt.needle_decode(model, torch.tensor([s.input_ids]), 6, record_attention=True)
    ref_gen, ref_tables = hf_greedy_with_argmax(ref_hf, list(s.input_ids), 6, eos=1)
    assert gen[0] == ref_gen
    assert len(argmax) == len(ref_tables)
    for ours, ref in zip(argmax, ref_tables, strict=True):
        assert torch.equal(ours[:, 0], ref)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_fast_mode_matches_naive_loop(make: Any) -> None:
    hf = make()
    ref_hf = copy.deepcopy(hf)
    model = wrap(hf)
    s = sample_for(model, length=24, depth=1.0)
    r = rt.score_sample_fast(model, s)
    prompt = list(s.input_ids)
    answer = prompt[s.answer_span[0] : s.answer_span[1]]
    seq = prompt + answer
    with torch.no_grad():
        att = ref_hf(torch.tensor([seq[:-1]]), output_attentions=True).attentions
    start, end = s.needle_span
    n_layers, n_heads = len(att), att[0].shape[1]
    expected = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    for j, target in enumerate(answer):
        q = len(prompt) - 1 + j
        for la in range(n_layers):
            for h in range(n_heads):
                i = int(att[la][0, h, q].argmax())
                if start <= i < end and seq[i] == target:
                    expected[la, h] += 1 / (end - start)
    assert torch.allclose(r["scores"], expected)
    assert r["generated"] == answer


# ------------------------------------------------------------------ generator


def test_generator_inserts_at_sentence_boundaries() -> None:
    model = wrap(tiny_llama())
    for depth, seed in [(0.0, 0), (0.5, 1), (1.0, 2), (0.3, 3)]:
        s = sample_for(model, length=30, depth=depth, seed=seed)
        toks = model.tokenizer.convert_ids_to_tokens(list(s.input_ids))
        start, end = s.needle_span
        assert " ".join(toks[start:end]) == "W50 W60 W61 W62 W63 ."
        assert toks[s.answer_span[0] : s.answer_span[1]] == ["W50"]
        # A boundary: the token before the needle ends a sentence or opens the book.
        assert toks[start - 1] in (".", "<unk>")
        assert toks[end] in ("W10", "W11", "W12", "W13", "W14", "W15", "W16", "W17", "<unk>")
        assert s.context_tokens <= 30
        assert s.prompt_format == "plain"
    first = sample_for(model, length=30, depth=0.0)
    last = sample_for(model, length=30, depth=1.0)
    assert first.actual_depth == 0.0
    assert last.actual_depth == 1.0
    assert first.needle_span[0] < last.needle_span[0]


def test_generator_is_seeded() -> None:
    model = wrap(tiny_llama())
    a = sample_for(model, length=20, seed=7)
    assert a.input_ids == sample_for(model, length=20, seed=7).input_ids
    assert any(sample_for(model, length=20, seed=k).input_ids != a.input_ids for k in range(8, 14))


def test_prompt_ends_with_question_and_answer_cue() -> None:
    model = wrap(tiny_llama())
    s = sample_for(model)
    text = str(model.tokenizer.decode(list(s.input_ids)))
    assert text.rstrip().endswith("W70 W71 ? <unk> :")  # "Answer:" is out of this vocab
    assert s.input_ids[0] == 0  # BOS in the plain format


def test_shipped_needles_and_haystack_load() -> None:
    needles = nd.load_needles()
    assert len(needles) >= 3
    for n in needles:
        assert n.answer.lower() in n.sentence.lower()
    sentences = nd.load_haystack()
    assert len(sentences) > 200
    assert sum(len(s) for s in sentences) > 20_000


def test_grid_bounded_by_budget() -> None:
    model = wrap(tiny_llama())
    hay = nd.Haystack(model, nd.split_sentences(HAYSTACK_TEXT))
    needle = nd.Needle(**NEEDLE)
    grid = nd.make_grid(model, [needle], hay, [16, 24], [0.0, 1.0], budget=64, max_new_tokens=8,
                        prompt_format="plain")
    assert len(grid) == 4
    assert all(s.n_tokens <= 64 - 8 for s in grid)
    with pytest.raises(UserError, match="exceeds the bound"):
        nd.make_grid(model, [needle], hay, [60], [0.5], budget=64, max_new_tokens=8, prompt_format="plain")
    # The model window bounds it too (tiny models have 256 positions).
    with pytest.raises(UserError, match="exceeds the bound"):
        nd.make_grid(model, [needle], hay, [300], [0.5], budget=10_000, max_new_tokens=8, prompt_format="plain")


# ------------------------------------------------------------------ bad input


def test_needle_longer_than_budget(tmp_path: Path) -> None:
    model = wrap(tiny_llama())
    long = {"sentence": " ".join(f"W{i}" for i in range(10, 100)) + ".", "question": "W5?", "answer": "W11"}
    p = tmp_path / "n.jsonl"
    p.write_text(json.dumps(long) + "\n")
    det = rt.RetrievalDetector()
    cfg = det.parse_params({"needles_file": str(p), "min_length": 20, "max_length": 40, "max_tokens": 64,
                            "max_new_tokens": 4, "prompt_format": "plain"})
    with pytest.raises(UserError, match="needle 0 needs"):
        det.units(model, cfg)
    hay = nd.Haystack(model, nd.split_sentences(HAYSTACK_TEXT))
    with pytest.raises(UserError, match="longer than the context length"):
        nd.make_sample(model, hay, nd.Needle(**long), 30, 0.5, prompt_format="plain")


def test_answer_not_in_needle(tmp_path: Path) -> None:
    p = tmp_path / "n.jsonl"
    p.write_text(json.dumps({"sentence": "The code is red.", "question": "What is the code?", "answer": "blue"}))
    with pytest.raises(UserError, match="does not appear in the needle sentence"):
        nd.load_needles(p)


def test_empty_haystack(tmp_path: Path) -> None:
    p = tmp_path / "empty.txt"
    p.write_text("  \n\n ")
    with pytest.raises(UserError, match="is empty"):
        nd.load_haystack(p)


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "holds no needles"), ("{not json", "not valid JSON"), ('{"sentence": "a"}', "expected an object")],
)
def test_bad_needle_files(tmp_path: Path, content: str, message: str) -> None:
    p = tmp_path / "n.jsonl"
    p.write_text(content)
    with pytest.raises(UserError, match=message):
        nd.load_needles(p)


def test_missing_files() -> None:
    with pytest.raises(UserError, match="not found"):
        nd.load_needles("/nonexistent/needles.jsonl")
    with pytest.raises(UserError, match="not found"):
        nd.load_haystack("/nonexistent/hay.txt")


# ------------------------------------------------------------------ detector bookkeeping


def run_units(det: Any, model: LoadedModel, cfg: Any) -> Any:
    parts: dict[str, list[pd.DataFrame]] = {}
    for u in det.units(model, cfg):
        for table, df in det.run_unit(model, cfg, u).tables.items():
            parts.setdefault(table, []).append(df.assign(unit=u.key))
    results = {t: pd.concat(v, ignore_index=True) for t, v in parts.items()}
    return finalized(model, det, cfg, results), results


GRID = {"min_length": 16, "max_length": 24, "n_lengths": 2, "n_depths": 2, "max_tokens": 128,
        "max_new_tokens": 3, "prompt_format": "plain"}


def test_detector_counts_only_correct_samples(files: dict[str, str]) -> None:
    model = wrap(force_output(tiny_llama()))  # always says W50 = the answer: every sample counts
    det = rt.RetrievalDetector()
    cfg = det.parse_params({**files, **GRID, "min_counted": 2})
    summary, results = run_units(det, model, cfg)
    assert summary.metrics["n_samples"] == 4
    assert summary.metrics["n_counted"] == 4
    assert summary.metrics["too_few_counted"] == 0
    assert summary.warnings == []
    per = results["head_scores"]
    per = per[per["metric"] == "retrieval_sample"]
    mean = per.groupby(["layer", "head"])["value"].mean()
    for h in summary.heads:
        assert h["score"] == pytest.approx(mean[(h["layer"], h["head"])])
    assert [h["score"] for h in summary.heads] == sorted((h["score"] for h in summary.heads), reverse=True)
    assert len(summary.heads) == model.info.n_total_heads
    # Every one of the 4 samples answered: Wilson's interval of 4/4, by its closed form
    # (z^2 / (n + z^2) below 1 at p = 1).
    z = 1.959963984540054
    acc = summary.intervals["accuracy"]
    assert (acc.value, acc.n, acc.method, acc.hi) == (1.0, 4, "wilson", pytest.approx(1.0))
    assert acc.lo == pytest.approx(4 / (4 + z * z))


def test_detector_warns_loudly_when_nothing_counts(files: dict[str, str]) -> None:
    model = wrap(force_output(tiny_llama(), token=99))  # never says the answer
    det = rt.RetrievalDetector()
    cfg = det.parse_params({**files, **GRID})
    summary, _ = run_units(det, model, cfg)
    assert summary.metrics["n_counted"] == 0
    assert summary.metrics["too_few_counted"] == 1
    assert summary.heads == []
    assert "head_scores" not in summary.tables
    assert any("NO RETRIEVAL SCORES" in w for w in summary.warnings)


def test_detector_warns_when_too_few_count(files: dict[str, str]) -> None:
    model = wrap(force_output(tiny_llama()))
    det = rt.RetrievalDetector()
    cfg = det.parse_params({**files, **GRID, "min_counted": 10})
    summary, _ = run_units(det, model, cfg)
    assert summary.metrics["n_counted"] == 4
    assert summary.metrics["too_few_counted"] == 1
    assert any("TOO FEW SAMPLES COUNTED" in w for w in summary.warnings)
    assert summary.heads  # scores are still written, flagged


def test_fast_mode_detector_runs(files: dict[str, str]) -> None:
    model = wrap(force_output(tiny_llama()))
    det = rt.RetrievalDetector()
    cfg = det.parse_params({**files, **GRID, "mode": "fast"})
    summary, _ = run_units(det, model, cfg)
    assert summary.variant == "fast-teacher-forced"
    assert summary.metrics["n_counted"] == 4  # the forced token is the one-token answer


# ------------------------------------------------------------------ masking


def test_masked_rows_match_plain_hf_with_zeroed_queries() -> None:
    hf = tiny_llama()
    ref_hf = copy.deepcopy(hf)
    model = wrap(hf)
    s = sample_for(model, length=24)
    top = [(1, 2), (2, 0)]
    ivs = ablate_heads(top, "uniform", batch=(1,))
    ids = torch.tensor([s.input_ids] * 2)
    gen, _ = rt.needle_decode(model, ids, 5, interventions=ivs)
    d = int(hf.config.head_dim)  # type: ignore[arg-type]

    def zero_q(layer: int, heads: list[int]) -> Any:
        def hook(_m: Any, _i: Any, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            for h in heads:
                out[..., h * d : (h + 1) * d] = 0.0
            return out

        return hook

    plain, _ = hf_greedy_with_argmax(ref_hf, list(s.input_ids), 5, eos=1)
    layers: Any = ref_hf.model.layers
    handles = [layers[la].self_attn.q_proj.register_forward_hook(zero_q(la, [h])) for la, h in top]
    try:
        masked, _ = hf_greedy_with_argmax(ref_hf, list(s.input_ids), 5, eos=1)
    finally:
        for h in handles:
            h.remove()
    assert gen[0] == plain
    assert gen[1] == masked


def test_masking_detector_on_tiny(files: dict[str, str]) -> None:
    model = wrap(force_output(tiny_llama()))
    det = retrieval_masking.RetrievalMaskingDetector()
    cfg = det.parse_params({**files, **GRID, "heads": "1.2,0.1,2.3,0.0", "top_k": 2, "n_random": 2,
                            "exclude_top": 4})
    assert cfg.heads == ("1.2", "0.1", "2.3", "0.0")  # the command-line form, as a typed list
    summary, _ = run_units(det, model, cfg)
    sets = det.head_sets(model, cfg)
    assert sets["top2"] == [(1, 2), (0, 1)]
    for name, hs in sets.items():
        if name.startswith("random"):
            assert not set(hs) & {(1, 2), (0, 1), (2, 3), (0, 0)}
    # The output is forced, so no mask can change the answer: accuracy 1 everywhere.
    assert summary.metrics["accuracy:none"] == 1.0
    assert summary.metrics["accuracy:top2"] == 1.0
    assert summary.metrics["drop:top"] == 0.0
    assert summary.variant == "uniform-mask"
    with pytest.raises(UserError, match="fewer than top_k"):
        det.units(model, det.parse_params({**files, **GRID, "heads": "1.2", "top_k": 2}))
    # The config checks the syntax; units() checks each head against the model.
    out_of_range = det.parse_params({**files, **GRID, "heads": ("1.2", "7.0"), "top_k": 2})
    with pytest.raises(UserError, match="layer 7 out of range"):
        det.units(model, out_of_range)


def test_masking_detector_computes_its_ranking(files: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    model = wrap(force_output(tiny_llama()))
    det = retrieval_masking.RetrievalMaskingDetector()
    cfg = det.parse_params({**files, **GRID, "top_k": 2, "n_random": 1, "ranking_mode": "fast"})
    units = det.units(model, cfg)
    assert units[0].key == "ranking"
    summary, results = run_units(det, model, cfg)
    # The ranking is the fast retrieval scan on the seed+1 haystack windows, best first.
    ref = rt.RetrievalDetector()
    rp = ref.parse_params({**files, **GRID, "mode": "fast", "seed": 1, "min_counted": 1})
    assert cfg.ranking_config() == rp
    ref_summary, _ = run_units(ref, model, rp)
    expected = [(h["layer"], h["head"]) for h in ref_summary.heads]
    assert det.head_sets(model, cfg)["top2"] == expected[:2]
    stored = json.loads(results["artifacts"].query("name == 'ranking'")["json"].iloc[0])
    assert [tuple(h) for h in stored["heads"]] == expected
    assert summary.metrics["ranking_source"].startswith("computed")
    # A resumed run (a fresh detector: nothing cached) finalizes from the stored ranking unit
    # and never ranks the heads again.
    resumed = retrieval_masking.RetrievalMaskingDetector()

    def no_ranking(*_: Any) -> Any:
        raise AssertionError("the ranking was recomputed")

    monkeypatch.setattr(retrieval_masking, "ranked_by_retrieval", no_ranking)
    again = finalized(model, resumed, cfg, results)
    assert resumed.head_sets(model, cfg)["top2"] == expected[:2]
    assert again.metrics == summary.metrics
    assert again.warnings == summary.warnings


# ------------------------------------------------------------------ configs


SLUG = re.compile(r"^[a-z0-9]+([-./+=][a-z0-9]+)*$")


def test_configs_are_typed_and_keep_the_old_parameters(files: dict[str, str]) -> None:
    det = rt.RetrievalDetector()
    cfg = det.parse_params({**files, **GRID, "min_length": "16", "n_needles": "0"})
    assert isinstance(cfg, rt.RetrievalConfig)
    assert (cfg.min_length, cfg.n_needles, cfg.mode, cfg.prompt_format) == (16, 0, "faithful", "plain")
    assert det.parse_params(cfg) is cfg
    defaults = {p.name: p.default for p in rt.RetrievalDetector.params}
    assert defaults == {"mode": "faithful", "min_length": 200, "max_length": 800, "n_lengths": 3, "n_depths": 3,
                        "n_needles": 3, "needles_file": "", "haystack_file": "", "max_tokens": 1024,
                        "max_new_tokens": 24, "prompt_format": "auto", "seed": 0, "min_counted": 5,
                        "level": 0.95}
    masking = {p.name: p.default for p in retrieval_masking.RetrievalMaskingDetector.params}
    assert masking == {**{k: v for k, v in defaults.items() if k not in ("mode", "min_counted", "level")},
                       "heads": (),
                       "top_k": 10, "method": "uniform", "n_random": 20, "exclude_top": -1,
                       "ranking_mode": "faithful"}
    choices = {p.name: p.choices for p in retrieval_masking.RetrievalMaskingDetector.params if p.choices}
    assert choices == {"prompt_format": ("auto", "chat", "plain"), "method": ("uniform", "zero"),
                       "ranking_mode": ("faithful", "fast")}
    with pytest.raises(UserError, match="mode"):
        det.parse_params({"mode": "slow"})
    with pytest.raises(UserError, match="min_length must be <= max_length"):
        dataclasses.replace(cfg, min_length=30)
    with pytest.raises(UserError, match="bad head"):
        retrieval_masking.RetrievalMaskingDetector.parse_params({"heads": "0-1"})


def test_variants_are_slugs_and_the_prose_is_method_text() -> None:
    det, masking = rt.RetrievalDetector(), retrieval_masking.RetrievalMaskingDetector()
    variants = {
        det.variant(rt.RetrievalConfig()): "faithful",
        det.variant(rt.RetrievalConfig(mode="fast")): "fast-teacher-forced",
        masking.variant(retrieval_masking.RetrievalMaskingConfig()): "uniform-mask",
        masking.variant(retrieval_masking.RetrievalMaskingConfig(method="zero")): "zero-mask",
    }
    for got, want in variants.items():
        assert got == want
        assert SLUG.match(got)
        assert len(got) <= 40
    assert "Wu et al. 2024" in det.method_text(rt.RetrievalConfig())
    assert "teacher-forced" in det.method_text(rt.RetrievalConfig(mode="fast"))
    assert "random heads" in masking.method_text(retrieval_masking.RetrievalMaskingConfig())


def test_grid_is_built_once_per_run(files: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    model = wrap(tiny_llama())
    det = rt.RetrievalDetector()
    cfg = det.parse_params({**files, **GRID})
    built: list[int] = []
    real = rt.samples_for

    def counting(m: LoadedModel, c: Any) -> Any:
        built.append(1)
        return real(m, c)

    monkeypatch.setattr(rt, "samples_for", counting)
    units = det.units(model, cfg)
    assert [u.key for u in units] == list(real(model, cfg))
    tokens = det.example_tokens(model, cfg)
    assert tokens.tolist() == [list(det.samples(model, cfg)[units[0].key].input_ids)]
    assert len(built) == 1
    # Another detector (another run) builds its own.
    rt.RetrievalDetector().units(model, cfg)
    assert len(built) == 2
