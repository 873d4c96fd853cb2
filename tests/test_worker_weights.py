"""The inference worker's weights and tokenizer: config.json and GGUF specs, sharded safetensors
slices, SmolLM2's GGUF (dequantized, Q/K un-permuted) against transformers' own GGUF loader,
tokenizer ids and chat prompts against transformers, model URIs, the converted cache, and the
errors each bad input gets (naming the file, field, tensor or URI).

transformers is the oracle here only; the worker never imports it."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tidal.inference_worker.model.spec import ModelSpec, RopeScaling, SpecError
from tidal.inference_worker.tokenizer import Tokenizer, TokenizerError, bytes_to_unicode
from tidal.inference_worker.weights.cache import cache_key, load_cached_gguf
from tidal.inference_worker.weights.gguf import GGUFSource, load_gguf, unpermute
from tidal.inference_worker.weights.hf import SafetensorsSource, WeightsError, spec_from_config
from tidal.inference_worker.weights.resolve import (
    ModelURIError,
    load_checkpoint,
    resolve_uri,
)

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "  leading spaces and trailing  ",
    "The quick brown fox jumps over the lazy dog. 1234567 + 89 = ?",
    "Unicode: naïve café, 日本語のテキスト, emoji 🦙🚀, tabs\tand\nnewlines\n\n",
    "<|im_start|>user\nspecial tokens inline<|im_end|> def f(x):\n    return x**2",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3? Answer with “quotes” & <tags>."},
]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def smollm2(smollm2_path: Path) -> tuple[ModelSpec, GGUFSource, Tokenizer]:
    spec, source, vocab = load_gguf(smollm2_path)
    return spec, source, Tokenizer.from_gguf(vocab)


@pytest.fixture(scope="session")
def hf_gguf_model(hf_smollm2_model: Any) -> dict[str, torch.Tensor]:
    """transformers' own dequantization of the file: the oracle."""
    return {k: v.detach() for k, v in hf_smollm2_model.state_dict().items()}


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(smollm2_path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name
    )


def _tiny_llama(tmp: Path, *, shard: str | None = "60KB") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=128,
        max_position_embeddings=256,
    )
    model = transformers.LlamaForCausalLM(config)
    kwargs: dict[str, Any] = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp, **kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- config.json


def _save(config: Any, tmp: Path, architectures: list[str] | None = None) -> Path:
    if architectures is not None:
        config.architectures = architectures
    config.save_pretrained(tmp)
    return tmp / "config.json"


def test_spec_from_llama_config_with_llama3_rope(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_hidden_layers=3,
        rms_norm_eps=1e-5,
        vocab_size=1000,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    spec = spec_from_config(_save(config, tmp_path, ["LlamaForCausalLM"]))
    assert spec == ModelSpec(
        architecture="llama",
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        layers=3,
        heads=8,
        kv_heads=2,
        head_dim=32,
        rms_eps=1e-5,
        rope_theta=500000.0,
        max_position=131072,
        tie_embeddings=True,
        qkv_bias=False,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
    )
    assert spec_from_config(tmp_path) == spec  # the directory works too


def test_spec_from_qwen2_and_mistral_configs(tmp_path: Path) -> None:
    qwen = transformers.Qwen2Config(
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=500,
        rope_theta=1e6,
        tie_word_embeddings=True,
    )
    spec = spec_from_config(_save(qwen, tmp_path / "qwen", ["Qwen2ForCausalLM"]))
    assert (spec.architecture, spec.qkv_bias, spec.head_dim, spec.rope_theta) == (
        "qwen2",
        True,
        32,
        1e6,
    )
    assert (spec.max_position, spec.tie_embeddings, spec.rope_scaling) == (32768, True, None)

    mistral = transformers.MistralConfig(
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=1,
        num_hidden_layers=2,
        vocab_size=500,
        head_dim=64,  # explicit and not hidden / heads, as Mistral-Nemo has it
        sliding_window=4096,
    )
    spec = spec_from_config(_save(mistral, tmp_path / "mistral"))  # no architectures: model_type
    assert (spec.architecture, spec.qkv_bias, spec.head_dim, spec.kv_heads) == (
        "mistral",
        False,
        64,
        1,
    )
    # Sliding-window attention equals full attention within the window: the context is capped.
    assert spec.max_position == 4096


def test_spec_from_transformers4_style_config(tmp_path: Path) -> None:
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "rms_norm_eps": 1e-6,
        "vocab_size": 10,
        "max_position_embeddings": 64,
        "rope_theta": 12345.0,
        "rope_scaling": None,
        "head_dim": None,
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    spec = spec_from_config(tmp_path / "config.json")
    assert (spec.kv_heads, spec.head_dim, spec.rope_theta, spec.tie_embeddings) == (
        4,
        16,
        12345.0,
        False,
    )
    del raw["rope_theta"]
    raw["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(SpecError, match=r"config\.json.*rope_scaling\.rope_type 'yarn'"):
        spec_from_config(tmp_path / "config.json")


def test_config_errors_name_the_file_and_field(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=rf"{tmp_path}/config\.json does not exist"):
        spec_from_config(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(SpecError, match=r"config\.json: architectures \['GPT2LMHeadModel'\]"):
        spec_from_config(path)
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(SpecError, match=r"config\.json: field 'num_attention_heads' is missing"):
        spec_from_config(path)
    path.write_text("{not json")
    with pytest.raises(SpecError, match=r"config\.json is not valid JSON"):
        spec_from_config(path)


# ----------------------------------------------------------------------------- safetensors


def test_sharded_safetensors_slices_equal_the_full_tensors(tmp_path: Path) -> None:
    state = _tiny_llama(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    source = SafetensorsSource(tmp_path)
    assert source.names() == set(state) - {"lm_head.weight"} or source.names() == set(state)
    for name in source.names():
        full = state[name].float()
        assert torch.equal(source.get(name), full), name
        if full.ndim == 2:
            rows, cols = full.shape
            r, c = slice(rows // 4, rows // 2), slice(cols // 2, cols)
            assert torch.equal(source.get(name, rows=r), full[r])
            assert torch.equal(source.get(name, cols=c), full[:, c])
            assert torch.equal(source.get(name, rows=r, cols=c), full[r, c])
        else:
            assert torch.equal(source.get(name, rows=slice(3, 9)), full[3:9])
    name = "model.layers.0.self_attn.q_proj.weight"
    assert source.get(name, dtype=None).dtype == state[name].dtype
    assert source.get(name, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_single_file_safetensors(tmp_path: Path) -> None:
    state = _tiny_llama(tmp_path, shard=None)
    assert (tmp_path / "model.safetensors").is_file()
    source = SafetensorsSource(tmp_path)
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(source.get(name, cols=slice(0, 48)), state[name][:, :48])


def test_safetensors_errors_name_the_file_and_tensor(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=rf"{tmp_path} holds neither model\.safetensors"):
        SafetensorsSource(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(WeightsError, match=r"model\.safetensors is corrupt"):
        SafetensorsSource(tmp_path)

    save_file({"a": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    source = SafetensorsSource(tmp_path)
    with pytest.raises(KeyError, match=r"has no tensor 'model\.norm\.weight'"):
        source.get("model.norm.weight")

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"a": torch.ones(3)}, str(sharded / "one.safetensors"))
    index = {"weight_map": {"a": "one.safetensors", "b": "one.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    source = SafetensorsSource(sharded)
    assert torch.equal(source.get("a"), torch.ones(3))
    with pytest.raises(WeightsError, match=r"one\.safetensors has no tensor 'b'"):
        source.get("b")
    index["weight_map"]["c"] = "two.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"two\.safetensors \(listed in .*index\.json\) is"):
        SafetensorsSource(sharded)


# ----------------------------------------------------------------------------- GGUF


def test_smollm2_gguf_spec(smollm2: tuple[ModelSpec, GGUFSource, Tokenizer]) -> None:
    spec, source, _ = smollm2
    assert spec == ModelSpec(
        architecture="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        layers=30,
        heads=9,
        kv_heads=3,
        head_dim=64,
        rms_eps=1e-5,
        rope_theta=100000.0,
        max_position=8192,
        tie_embeddings=True,
    )
    names = source.names()
    assert len(names) == 272 and "lm_head.weight" not in names
    assert {source.quant_type(n) for n in names} == {"Q4_1", "F32", "Q8_0"}
    assert source.quant_type("model.embed_tokens.weight") == "Q8_0"
    assert source.shape("model.embed_tokens.weight") == (49152, 576)
    assert source.shape("model.layers.0.mlp.down_proj.weight") == (576, 1536)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    def permute(w: np.ndarray[Any, Any], n: int) -> np.ndarray[Any, Any]:  # convert_hf_to_gguf
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.arange(12 * 64 * 5, dtype=np.float32).reshape(12 * 64, 5)
    for n in (1, 3, 12):
        assert np.array_equal(unpermute(permute(w, n), n), w)


def test_smollm2_tensors_equal_transformers_gguf_loader(
    smollm2: tuple[ModelSpec, GGUFSource, Tokenizer], hf_gguf_model: dict[str, torch.Tensor]
) -> None:
    _, source, _ = smollm2
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.17.self_attn.q_proj.weight",
        "model.layers.29.self_attn.k_proj.weight",
        "model.layers.5.self_attn.v_proj.weight",
        "model.layers.5.mlp.down_proj.weight",
        "model.layers.5.input_layernorm.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
    ]:
        ours, theirs = source.get(name), hf_gguf_model[name].float()
        assert ours.shape == theirs.shape, name
        assert torch.equal(ours, theirs), name
    # A rank's slice is a slice of the whole (dequantized, then cut).
    q = hf_gguf_model["model.layers.3.self_attn.q_proj.weight"]
    assert torch.equal(
        source.get("model.layers.3.self_attn.q_proj.weight", rows=slice(192, 384)), q[192:384]
    )
    o = hf_gguf_model["model.layers.3.self_attn.o_proj.weight"]
    assert torch.equal(
        source.get("model.layers.3.self_attn.o_proj.weight", cols=slice(0, 192)), o[:, :192]
    )


def _write_gguf(path: Path, arch: str = "llama", qtype: Any = None) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_context_length(128)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab", "<|end|>"])
    writer.add_token_types([1, 1, 1, 3])
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(3)
    if qtype is None:
        writer.add_tensor("token_embd.weight", np.ones((4, 32), dtype=np.float32))
    else:  # 4 rows of one Q8_1 block (32 values, 40 bytes) each
        writer.add_tensor("token_embd.weight", np.zeros((4, 40), dtype=np.uint8), raw_dtype=qtype)
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_errors_name_the_file_tensor_and_type(tmp_path: Path) -> None:
    bad = tmp_path / "q8_1.gguf"
    _write_gguf(bad, qtype=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(WeightsError, match=r"q8_1\.gguf: tensor 'token_embd\.weight' .* Q8_1"):
        load_gguf(bad)

    other = tmp_path / "gpt2.gguf"
    _write_gguf(other, arch="gpt2")
    with pytest.raises(SpecError, match=r"gpt2\.gguf: general\.architecture 'gpt2'"):
        load_gguf(other)

    good = tmp_path / "ok.gguf"
    _write_gguf(good)
    spec, source, vocab = load_gguf(good)
    assert (spec.vocab_size, spec.tie_embeddings, spec.head_dim) == (4, True, 16)
    assert torch.equal(source.get("model.embed_tokens.weight"), torch.ones(4, 32))
    with pytest.raises(KeyError, match=r"ok\.gguf has no tensor 'lm_head\.weight'"):
        source.get("lm_head.weight")
    tokenizer = Tokenizer.from_gguf(vocab)
    assert tokenizer.encode("abab<|end|>") == [2, 2, 3]
    assert tokenizer.eos_token_ids == (3,)

    with pytest.raises(WeightsError, match=r"missing\.gguf does not exist"):
        load_gguf(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(WeightsError, match=r"junk\.gguf is corrupt"):
        load_gguf(tmp_path / "junk.gguf")


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_ids_equal_transformers(
    smollm2: tuple[ModelSpec, GGUFSource, Tokenizer], hf_gguf_tokenizer: Any
) -> None:
    _, _, tokenizer = smollm2
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == hf_gguf_tokenizer.encode(text), text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_ids == (hf_gguf_tokenizer.eos_token_id,) == (2,)
    assert tokenizer.vocab_size == 49152


def test_chat_template_equals_transformers(
    smollm2: tuple[ModelSpec, GGUFSource, Tokenizer], hf_gguf_tokenizer: Any
) -> None:
    _, _, tokenizer = smollm2
    for messages in (CHAT, CHAT[1:2]):
        ours = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        theirs = hf_gguf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        assert ours == theirs
        ids = hf_gguf_tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True
        )
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        assert tokenizer.encode_chat(messages) == list(ids)
    assert ours.endswith("<|im_start|>assistant\n")
    assert tokenizer.apply_chat_template(CHAT[1:2], add_generation_prompt=False).endswith(
        "<|im_end|>\n"
    )


def test_chat_template_sandbox_and_errors() -> None:
    tokenizer = Tokenizer(
        backend=_byte_backend(),
        bos_token_id=None,
        eos_token_ids=(),
        chat_template=(
            "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
            "{{ messages[0] | tojson }}"
        ),
    )
    assert tokenizer.apply_chat_template([{"role": "user", "content": "é<"}]) == (
        '{"role": "user", "content": "é<"}'
    )
    with pytest.raises(Exception, match="one message only"):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}] * 2)
    tokenizer.chat_template = "{{ ''.__class__.__mro__ }}"
    with pytest.raises(Exception, match=r"unsafe|__class__|attribute"):
        tokenizer.apply_chat_template([])
    tokenizer.chat_template = None
    with pytest.raises(TokenizerError, match="no chat template"):
        tokenizer.apply_chat_template([])


def _byte_backend() -> Any:
    from tokenizers import Tokenizer as Backend  # noqa: PLC0415
    from tokenizers import models  # noqa: PLC0415

    alphabet = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    return Backend(models.BPE(vocab=alphabet, merges=[]))


def test_tokenizer_round_trips_through_hf_files(
    smollm2: tuple[ModelSpec, GGUFSource, Tokenizer], tmp_path: Path
) -> None:
    _, _, tokenizer = smollm2
    tokenizer.save(tmp_path)
    again = Tokenizer.from_hf_dir(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == tokenizer.encode(text)
    assert again.apply_chat_template(CHAT) == tokenizer.apply_chat_template(CHAT)
    assert (again.bos_token_id, again.eos_token_ids) == (1, (2,))
    # transformers reads the files the same way
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.encode(TEXTS[3]) == tokenizer.encode(TEXTS[3])
    with pytest.raises(TokenizerError, match=r"nowhere/tokenizer\.json does not exist"):
        Tokenizer.from_hf_dir(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- URIs


def test_uri_schemes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "claim" / "llama").mkdir(parents=True)
    assert resolve_uri(f"file://{tmp_path}/claim/llama") == tmp_path / "claim" / "llama"
    monkeypatch.setenv("TIDAL_PVC_ROOT", str(tmp_path))
    assert resolve_uri("pvc://claim/llama/") == tmp_path / "claim" / "llama"
    monkeypatch.delenv("TIDAL_PVC_ROOT")
    with pytest.raises(ModelURIError, match=r"'pvc://claim/llama': /models/claim/llama does"):
        resolve_uri("pvc://claim/llama")
    for uri in ("s3://bucket/m", "gs://bucket/m", "az://c/m", "https://example.com/m.gguf"):
        with pytest.raises(ModelURIError, match=rf"{uri}.*not supported yet"):
            resolve_uri(uri)
    with pytest.raises(ModelURIError, match=r"'file://host/x'.*absolute"):
        resolve_uri("file://host/x")
    with pytest.raises(ModelURIError, match=r"'\.\.'"):
        resolve_uri("pvc://claim/../etc")
    with pytest.raises(ModelURIError, match=r"file:///nonexistent/model.*does not exist"):
        resolve_uri("file:///nonexistent/model")


def test_hf_uri_uses_the_local_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelURIError, match=r"'hf://org/name' is not in the local cache \(offline"):
        resolve_uri("hf://org/name")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    _tiny_llama(snapshot, shard=None)
    assert resolve_uri("hf://org/name") == snapshot
    assert resolve_uri("hf://org/name/config.json") == snapshot / "config.json"


def test_load_checkpoint_hf_directory(
    smollm2: tuple[ModelSpec, GGUFSource, Tokenizer], tmp_path: Path
) -> None:
    state = _tiny_llama(tmp_path)
    smollm2[2].save(tmp_path)  # any tokenizer will do
    checkpoint = load_checkpoint(f"file://{tmp_path}")
    assert checkpoint.format == "hf" and checkpoint.spec.layers == 2
    name = "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(checkpoint.source.get(name, rows=slice(0, 16)), state[name][:16])
    assert checkpoint.tokenizer.encode("hi") == smollm2[2].encode("hi")


def test_converted_cache(
    smollm2_path: Path,
    smollm2: tuple[ModelSpec, GGUFSource, Tokenizer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TIDAL_CACHE_DIR", str(tmp_path / "cache"))
    spec, source, tokenizer = smollm2
    start = time.perf_counter()
    first = load_checkpoint(f"file://{smollm2_path}")
    converted = time.perf_counter() - start
    start = time.perf_counter()
    second = load_checkpoint(f"file://{smollm2_path}")
    cached = time.perf_counter() - start
    print(f"\nGGUF first load (dequantize + write): {converted:.2f} s, cached: {cached:.2f} s")
    assert (first.cached, second.cached) == (False, True)
    assert first.spec == second.spec == spec
    assert second.source.names() == source.names()
    for name in ("model.layers.2.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        assert torch.equal(second.source.get(name), source.get(name))
        assert torch.equal(second.source.get(name, rows=slice(64, 128)), source.get(name)[64:128])
    for text in TEXTS:
        assert second.tokenizer.encode(text) == tokenizer.encode(text)
    assert second.tokenizer.apply_chat_template(CHAT) == tokenizer.apply_chat_template(CHAT)
    assert second.tokenizer.eos_token_ids == tokenizer.eos_token_ids
    assert cached < converted
    entries = [p for p in (tmp_path / "cache").iterdir()]
    assert len(entries) == 1 and not entries[0].name.startswith(".")

    # A damaged entry is converted again, not trusted.
    (entries[0] / "spec.json").write_text("{}")
    _, _, _, hit = load_cached_gguf(smollm2_path)
    assert not hit

    # Without the cache: straight from the GGUF file.
    direct = load_checkpoint(smollm2_path, use_cache=False)
    assert isinstance(direct.source, GGUFSource) and not direct.cached


def test_cache_key_follows_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    _write_gguf(path)
    key = cache_key(path)
    assert cache_key(path) == key
    assert cache_key(path, torch.bfloat16) != key
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache_key(path) != key
    copy = tmp_path / "copy.gguf"
    shutil.copy2(path, copy)
    assert cache_key(copy) == cache_key(path)  # same size, mtime and header


def test_smollm2_gguf_is_found(smollm2_path: Path) -> None:
    assert smollm2_path.suffix == ".gguf" and smollm2_path.stat().st_size > 50_000_000
