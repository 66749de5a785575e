"""The distill objective, the gated projector and the hybrid caches, on tiny models built in-process."""

from __future__ import annotations

import copy
import dataclasses
import hashlib

import numpy as np
import pandas as pd
import pytest
import test_gemma
import test_projection
import torch

from kvpipe.data.prompt import build_prompt
from kvpipe.models.load import load_model
from kvpipe.projection.distill import distill_loss, log_probs_after, question_sample
from kvpipe.projection.distill_fit import FitSchedule, fit_distill, schedule
from kvpipe.projection.fuser import fuse_f1, fuse_loss, fuse_sample, fuser_start
from kvpipe.projection.layer_map import relative_depth
from kvpipe.projection.registry import CONDITIONS, PROJECTORS

kv_dirs, self_fit = test_projection.kv_dirs, test_projection.self_fit  # the projection tests' fixtures
_answerer, identity_hidden = test_projection._answerer, test_projection.identity_hidden
spec, gemma_dir, gemma, tokens = test_gemma.spec, test_gemma.gemma_dir, test_gemma.gemma, test_gemma.tokens

SETTINGS = FitSchedule(steps=30, accumulate=2, lr=3e-3, eval_every=5, patience=20, checkpoint_every=2, seed=0, max_new_tokens=4)


def _perturbed_identity(width: int, n_layers: int, cfg: dict, scale: float = 0.05):
    projector = PROJECTORS["ridge"](n_layers, ("key", "value"), width, width, cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for kind in ("key", "value"):
            projector.weight[kind].copy_(torch.eye(width) + scale * torch.randn(n_layers, width, width, generator=gen))
    return projector


@pytest.fixture(scope="module")
def self_samples(self_fit, tiny_main, smoke_config, samples):
    """Distill samples of the tiny main paired with itself: four to train on, one held out."""
    answerer = _answerer(self_fit, tiny_main, smoke_config, ["main_full"])
    rows = list(samples.head(5).itertuples(index=False))
    data = [question_sample(tiny_main, tiny_main, answerer.prompt_tokens(r), tuple(r.answers), 4) for r in rows]
    return data[:4], data[4:]


def _state_bytes(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        digest.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.slow  # a 30-step distill fit
def test_distill_from_a_perturbed_identity_recovers_the_main_answers(self_fit, self_samples, tiny_main, smoke_config, samples):
    cal, _, _, cfg = self_fit
    train, held = self_samples
    projector = _perturbed_identity(cal.widths[0], len(cal.layer_map), cfg)
    answerer = _answerer(self_fit, tiny_main, smoke_config, ["main_full", "projected_kv"])
    answerer.common["projectors"] = {("ridge", "distill"): projector.eval()}

    def same() -> list[bool]:  # the projected cache's answer is the main's own, per sample
        tables = [
            pd.DataFrame(answerer.sample(row, ttft=False)[0]).set_index("condition")["prediction"]
            for row in samples.head(5).itertuples(index=False)
        ]
        return [t["projected_kv"] == t["main_full"] for t in tables]

    assert not all(same())
    before = [float(distill_loss(projector, s, cal.layer_map, tiny_main).detach()) for s in train]
    result = fit_distill(projector, train, held, cal.layer_map, tiny_main, SETTINGS)
    after = [float(distill_loss(projector, s, cal.layer_map, tiny_main).detach()) for s in train]
    assert np.mean(after) < 0.2 * np.mean(before), (before, after)
    assert result["learning_curve"][0]["step"] == 0 and len(result["learning_curve"]) == 1 + result["steps"] // 5
    assert result["tokens_seen"]["target"] == sum(
        len(train[i].after) for s in range(1, result["steps"] + 1) for i in schedule(len(train), s, 2, 0)
    )
    assert all(same())


def _random_gated(scout, main, cfg):
    """The relative-depth layer map and a gated projector from scout to main with random maps, one gate per head."""
    lmap = relative_depth(scout.card["num_layers"], main.card["num_layers"])
    p = scout.card["num_kv_heads"] * scout.card["head_dim"]
    q = main.card["num_kv_heads"] * main.card["head_dim"]
    projector = PROJECTORS["gated"](len(lmap), ("key", "value"), p, q, cfg)
    projector.set_heads(main.card["num_kv_heads"])
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for kind in ("key", "value"):
            projector.weight[kind].copy_(0.1 * torch.randn(projector.weight[kind].shape, generator=gen))
    return lmap, projector


def test_distill_gradients_reach_only_the_projector(model_dirs, tiny_main, smoke_config, samples, self_fit):
    scout = load_model(model_dirs["tiny-scout"], "cpu", "float32")
    _, _, _, cfg = self_fit
    answerer = _answerer(self_fit, tiny_main, smoke_config, ["main_full"])
    rows = list(samples.head(3).itertuples(index=False))
    data = [question_sample(scout, tiny_main, answerer.prompt_tokens(r), tuple(r.answers), 4) for r in rows]
    lmap, projector = _random_gated(scout, tiny_main, cfg)
    models = {"scout": _state_bytes(scout.model), "main": _state_bytes(tiny_main.model)}
    start = copy.deepcopy(projector.state_dict())
    fit_distill(projector, data[:2], data[2:], lmap, tiny_main, dataclasses.replace(SETTINGS, steps=3, eval_every=1))
    assert {"scout": _state_bytes(scout.model), "main": _state_bytes(tiny_main.model)} == models
    assert all(p.grad is None for m in (scout.model, tiny_main.model) for p in m.parameters())
    assert all(p.requires_grad for p in tiny_main.model.parameters())  # flags restored
    changed = {k for k, v in projector.state_dict().items() if not torch.equal(v, start[k])}
    assert {"weight.key", "weight.value", "gate.key", "gate.value"} <= changed


@pytest.mark.slow  # three distill fits, one killed
def test_a_killed_fit_resumes_to_the_same_weights(self_fit, self_samples, tiny_main, tmp_path):
    cal, _, _, cfg = self_fit
    train, held = self_samples
    settings = dataclasses.replace(SETTINGS, steps=7, eval_every=3)
    whole = _perturbed_identity(cal.widths[0], len(cal.layer_map), cfg)
    killed, resumed = copy.deepcopy(whole), copy.deepcopy(whole)
    expected = fit_distill(whole, train, held, cal.layer_map, tiny_main, settings)

    def kill(step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt

    checkpoint = tmp_path / "ridge-distill.pt"
    with pytest.raises(KeyboardInterrupt):
        fit_distill(killed, train, held, cal.layer_map, tiny_main, settings, checkpoint, on_step=kill)
    assert torch.load(checkpoint, weights_only=False)["step"] == 4
    got = fit_distill(resumed, train, held, cal.layer_map, tiny_main, settings, checkpoint)
    assert got.pop("peak_mib") > 0 and expected.pop("peak_mib") > 0
    assert got == expected  # losses, learning curve, tokens seen
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in resumed.state_dict().items())


def _predictions(self_fit, tiny_main, smoke_config, samples, conditions, hybrid, hidden_layer=0):
    answerer = _answerer(self_fit, tiny_main, smoke_config, conditions)
    answerer.cfg = dataclasses.replace(answerer.cfg, hybrid=dataclasses.replace(answerer.cfg.hybrid, **hybrid))
    answerer.common["extras"] = {"hidden": (tiny_main, identity_hidden(tiny_main, hidden_layer))}
    out = []
    for row in samples.head(3).itertuples(index=False):
        out.append(pd.DataFrame(answerer.sample(row, ttft=False)[0]))
    return pd.concat(out)


def test_hybrid_caches_at_their_extremes_are_the_main_or_the_projection(self_fit, tiny_main, smoke_config, samples):
    table = _predictions(
        self_fit,
        tiny_main,
        smoke_config,
        samples,
        ["main_full", "projected_kv", "own_bottom_projected_top", "projected_hidden"],
        {"bottom_fractions": [0.0, 1.0]},
    )
    table = table[table["key_map"] != "post_rope"]
    assert (table["rank"] == -1).all()  # B and L have their own columns
    by = table.set_index(["sample_idx", "condition", "projector", "objective", "bottom_layers", "hidden_layer"])["prediction"]
    n_layers = len(self_fit[0].layer_map)
    for i in table["sample_idx"].unique():
        full = by[(i, "main_full", "none", "none", -1, -1)]
        assert by[(i, "own_bottom_projected_top", "ridge", "reconstruction", n_layers, -1)] == full
        assert (
            by[(i, "own_bottom_projected_top", "ridge", "reconstruction", 0, -1)]
            == by[(i, "projected_kv", "ridge", "reconstruction", -1, -1)]
        )
        assert by[(i, "projected_hidden", "ridge", "reconstruction", -1, 0)] == full


def test_hybrid_caches_are_exact_where_they_must_be(self_fit, tiny_main, smoke_config, samples):
    from kvpipe.inference.session import Session
    from kvpipe.projection.conditions import SampleInputs
    from kvpipe.projection.hidden import main_bottom, main_from_layer
    from kvpipe.projection.inject import project

    answerer = _answerer(self_fit, tiny_main, smoke_config, ["main_full"])
    tokens = answerer.prompt_tokens(next(samples.itertuples(index=False)))
    own = Session(tiny_main, tokens, 1).own
    for b, kv in enumerate(main_bottom(tiny_main, tokens, 3)):  # the bottom layers are the own prefill's
        assert torch.allclose(kv[0], own.keys[b], atol=1e-5) and torch.allclose(kv[1], own.values[b], atol=1e-5)
    assert main_bottom(tiny_main, tokens, 0) == []
    from kvpipe.projection.hidden import hidden_states

    upper = main_from_layer(tiny_main, tokens, 2, hidden_states(tiny_main, tokens, 2))
    assert len(upper) == 1 and torch.allclose(upper[0][0], own.keys[2], atol=1e-4)
    payload, selections = answerer.scout_side(tokens, 0)
    cal, _, fitted, cfg = self_fit
    s = SampleInputs(
        tokens,
        "",
        payload,
        own,
        {k: f.projector for k, f in fitted.items()},
        cal.layer_map,
        tiny_main,
        {},
        selections,
        answerer.cfg,
    )
    fuser = fuser_start(s.projectors[("gated", "reconstruction")])  # every gate 0: the main's own cache
    s.extras["fuser"] = fuser
    (plan,) = CONDITIONS["fused"]().plans(s)
    assert (plan.variant.projector, plan.variant.objective, plan.own_prefill) == ("gated", "next_token", True)
    built = plan.build()
    assert all(torch.equal(a, b.float()) for a, b in zip(built.keys + built.values, own.keys + own.values))
    with torch.no_grad():
        for g in fuser.gate.values():
            g.fill_(1.0)  # every gate 1: the ungated projection at the context rows, the main's own template rows
    built, t = plan.build(), tokens.context_start
    with torch.no_grad(), fuser.ungated():
        projected = project(fuser, payload, cal.layer_map, tiny_main)
    for a, b, o in zip(built.keys + built.values, projected.keys + projected.values, own.keys + own.values):
        assert torch.equal(a[:, :t], o[:, :t].float()) and torch.allclose(a[:, t:], b[:, t:].float())


class _Held:
    """A tensor autograd keeps for backward, counted by its meter while it lives."""

    def __init__(self, meter: _SavedBytes, t: torch.Tensor) -> None:
        self.meter, self.t, self.n = meter, t, t.numel() * t.element_size()
        meter.live += self.n
        meter.peak = max(meter.peak, meter.live)

    def __del__(self) -> None:
        self.meter.live -= self.n


class _SavedBytes:
    """Live and peak bytes of the tensors saved for backward within a saved_tensors_hooks block."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(lambda t: _Held(self, t), lambda held: held.t)


def test_memory_is_one_sample_graph_whatever_the_samples_per_step(self_fit, self_samples, tiny_main):
    from kvpipe.projection.distill import frozen
    from kvpipe.projection.distill_fit import Student, _step

    cal, _, _, cfg = self_fit
    sample = self_samples[0][0]
    peaks = {}
    for k in (1, 4):
        meter = _SavedBytes()
        projector = _perturbed_identity(cal.widths[0], len(cal.layer_map), cfg)
        optimiser = torch.optim.Adam(projector.parameters(), lr=1e-3)
        log = {"tokens": [0, 0], "train_loss": []}
        with frozen(tiny_main), meter.hooks():
            _step(Student(projector, cal.layer_map, tiny_main), optimiser, [sample] * k, log)
        peaks[k] = meter.peak
        assert meter.live == 0 and log["tokens"] == [k * sample.prefix, k * len(sample.after)]
    assert peaks[1] == peaks[4] > 0  # the graph of 4 samples per step peaks as high as that of 1


def test_continuation_samples_cut_the_passage_in_two(self_fit, tiny_main, smoke_config, samples):
    from kvpipe.projection.distill import continuation_sample

    cal, _, fitted, _ = self_fit
    tokens = _answerer(self_fit, tiny_main, smoke_config, ["main_full"]).prompt_tokens(next(samples.itertuples(index=False)))
    sample = continuation_sample(tiny_main, tiny_main, tokens)
    n = tokens.context_end - tokens.context_start
    assert sample.prefix == tokens.context_start + n // 2 and sample.prefix + len(sample.after) == tokens.context_end
    assert sample.teacher.shape == (len(sample.after), tiny_main.model.config.vocab_size) and sample.tokens is None
    identity = fitted[("ridge", "reconstruction")].projector
    assert float(distill_loss(identity, sample, cal.layer_map, tiny_main).detach()) < 1e-3


def test_partial_prefills_are_the_own_prefills_layers_on_gemma3_too(gemma, tokens):
    """Gemma 3 (sliding-window layers, decoder layers returning tuples): the bottom B layers and the layers above
    L, fed the model's own hidden states at L, are its own prefill's."""
    from kvpipe.inference.cache_sources import OwnPrefill
    from kvpipe.projection.hidden import hidden_states, main_bottom, main_from_layer

    own = OwnPrefill(1).context_kv(gemma, tokens)
    n = gemma.card["num_layers"]
    for j, (k, v) in enumerate(main_bottom(gemma, tokens, n - 1)):
        assert torch.allclose(k, own.keys[j], atol=1e-5) and torch.allclose(v, own.values[j], atol=1e-5)
    for j, (k, v) in enumerate(main_from_layer(gemma, tokens, 1, hidden_states(gemma, tokens, 1)), start=1):
        assert torch.allclose(k, own.keys[j], atol=1e-4) and torch.allclose(v, own.values[j], atol=1e-4)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"hybrid": {"projector": "mlp"}, "projectors": ["ridge", "gated"]}, "projection.hybrid.projector: 'mlp' is not fitted"),
        ({"hybrid": {"objective": "distill"}, "objectives": ["reconstruction"]}, "projection.hybrid.objective"),
        ({"projectors": ["ridge"]}, "projection.conditions: fused needs the gated projector"),
        ({"fused": {"objective": "distill"}, "objectives": ["reconstruction"]}, "projection.fused.objective: 'distill'"),
    ],
)
def test_hybrid_config_cross_references(smoke_config, edit, message):
    from kvpipe.config import validate
    from kvpipe.errors import KvpipeError

    config = dict(smoke_config)
    section = smoke_config["projection"]
    config["projection"] = {**section, **edit, "hybrid": {**section["hybrid"], **edit.get("hybrid", {})}}
    with pytest.raises(KvpipeError, match=message):
        validate(config)


def test_an_extra_passages_file_needs_its_path(smoke_config):
    from kvpipe.config import validate
    from kvpipe.errors import KvpipeError

    section = smoke_config["projection"]
    extra = section["distill"]["extra"] | {"source": "file", "path": None}
    config = dict(smoke_config) | {"projection": section | {"distill": section["distill"] | {"extra": extra}}}
    with pytest.raises(KvpipeError, match="projection.distill.extra.path: required with source: file"):
        validate(config)
    validate(
        dict(smoke_config) | {"projection": section | {"distill": section["distill"] | {"extra": extra | {"path": "x.txt"}}}}
    )


def test_the_hidden_map_trained_with_distill_gets_the_gradient_and_only_it(self_fit, self_samples, tiny_main, tmp_path):
    from kvpipe.projection.distill import frozen
    from kvpipe.projection.hidden import HiddenMap
    from kvpipe.projection.hidden_distill import HiddenStudent, distill_hidden, hidden_loss, with_hidden

    cal, _, fitted, fit_cfg = self_fit
    train = with_hidden(self_samples[0][:2], tiny_main, 1)  # the main paired with itself, at layer 1
    width = tiny_main.model.config.hidden_size
    gen = torch.Generator().manual_seed(5)
    start = HiddenMap(1, 1, torch.eye(width) + 0.02 * torch.randn(width, width, generator=gen), torch.zeros(width))
    projector = fitted[("ridge", "reconstruction")].projector
    models = _state_bytes(tiny_main.model), _state_bytes(projector)

    def kl(hidden: HiddenMap) -> torch.Tensor:
        student = HiddenStudent(hidden, projector)
        return torch.stack([hidden_loss(student, s, cal.layer_map, tiny_main) for s in train]).mean()

    assert float(kl(HiddenMap(1, 1, torch.eye(width), torch.zeros(width))).detach()) < 1e-3 * float(kl(start).detach())
    probe = copy.deepcopy(start)
    with frozen(tiny_main):
        loss = kl(probe)
        loss.backward()
    assert all(p.grad is None for p in [*tiny_main.model.parameters(), *projector.parameters()])
    grad = probe.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    with torch.no_grad():  # a small step down the gradient lowers the KL: the gradient is the loss's
        probe.weight -= 0.05 * (probe.weight - torch.eye(width)).norm() / grad.norm() * grad
    assert float(kl(probe).detach()) < float(loss.detach())
    distill = {k: v for k, v in dataclasses.asdict(SETTINGS).items() if k not in ("seed", "max_new_tokens")}
    distill |= {"steps": 2, "eval_every": 1}
    cfg = dataclasses.replace(fit_cfg, distill=dataclasses.replace(fit_cfg.distill, **distill), seed=0, max_new_tokens=4)
    trained, fields = distill_hidden(start, projector, (train, train), cal.layer_map, tiny_main, cfg, tmp_path / "c" / "h.pt")
    assert fields["steps"] == 2 and len(fields["learning_curve"]) == 3 and fields["tokens_seen"]["target"] > 0
    assert (_state_bytes(tiny_main.model), _state_bytes(projector)) == models  # only the hidden map is trained
    assert not (tmp_path / "c").exists()


def test_the_fuser_learns_the_main_next_token_loss_with_both_models_frozen(
    model_dirs, tiny_main, smoke_config, samples, self_fit
):
    scout = load_model(model_dirs["tiny-scout"], "cpu", "float32")
    answerer = _answerer(self_fit, tiny_main, smoke_config, ["main_full"])
    rows = list(samples.head(4).itertuples(index=False))
    answers = [() if i == 1 else tuple(r.answers) for i, r in enumerate(rows)]  # sample 1 taken as unanswerable
    data = [fuse_sample(scout, tiny_main, answerer.prompt_tokens(r), a) for r, a in zip(rows, answers)]
    replies = [tiny_main.tokenizer.decode(s.targets[s.targets >= 0][:-1]) for s in data]
    assert replies[1] == "unanswerable" and replies[0] == rows[0].answers[0]["text"]  # no answer: the abstention reply
    lmap, gated = _random_gated(scout, tiny_main, self_fit[3])
    fuser = fuser_start(gated)
    for s in data:  # every gate 0: the loss is the main's own cross-entropy of the gold reply, from its own cache
        scored = s.targets >= 0
        own = log_probs_after(s.own, s.after, tiny_main)[scored].gather(1, s.targets[scored][:, None])
        assert int(scored.sum()) >= 2 and torch.allclose(fuse_loss(fuser, s, lmap, tiny_main), -own.mean(), atol=1e-5)
    models = {"scout": _state_bytes(scout.model), "main": _state_bytes(tiny_main.model)}
    before = [float(fuse_loss(fuser, s, lmap, tiny_main).detach()) for s in data[:3]]
    settings = dataclasses.replace(SETTINGS, steps=20, lr=1e-1, eval_every=5)
    result = fit_distill(fuser, data[:3], data[:3], lmap, tiny_main, settings, loss=fuse_loss, f1=fuse_f1)
    after = [float(fuse_loss(fuser, s, lmap, tiny_main).detach()) for s in data[:3]]
    curve = [c["validation_loss"] for c in result["learning_curve"]]  # the training prompts, scored every 5 steps
    assert curve[0] == pytest.approx(np.mean(before)) and all(np.diff(curve) < 0), curve
    assert np.mean(after) < np.mean(before) - 0.15, (before, after)  # random tiny models: CE near log(vocab) at start
    assert all(g.abs().max() > 0 for g in fuser.gate.values())  # the gates were trained off the main's own cache
    assert {"scout": _state_bytes(scout.model), "main": _state_bytes(tiny_main.model)} == models
    assert result["tokens_seen"]["target"] == sum(
        data[i].n_tokens[1] for step in range(1, result["steps"] + 1) for i in schedule(3, step, 2, 0)
    )


def test_extra_passages_never_overlap_the_samples_table(tmp_path, samples):
    from kvpipe.data.synthetic import generate
    from kvpipe.projection.extra import extra_passages
    from kvpipe.settings import ExtraPassages

    known = list(samples["context"].unique())
    text = "First extra passage.\n\n" + known[0][:40] + "\n\n \n\nSecond  extra\npassage.\n\n" + known[1] + " More.\n"
    (tmp_path / "p.txt").write_text(text)
    spec = ExtraPassages(source="file", path=str(tmp_path / "p.txt"), passages=8, seed=0, target="question", question_tokens=8)
    assert extra_passages(spec, known) == ["First extra passage.", "Second  extra\npassage."]  # in and around known: out
    assert extra_passages(dataclasses.replace(spec, passages=1), known) == ["First extra passage."]
    made = list(generate(seed=1009, passages=3)["context"].unique())
    synthetic = dataclasses.replace(spec, source="synthetic", path=None, seed=1009, passages=3)
    assert extra_passages(synthetic, [made[1]]) == [made[0], made[2]]
    assert extra_passages(dataclasses.replace(spec, source="none"), known) == []


def test_extra_samples_are_self_questions_or_continuations_of_the_passages(model_dirs, tiny_main, smoke_config, tmp_path):
    from kvpipe.projection.extra import ASK, extra_samples, self_question
    from kvpipe.settings import ExtraPassages, ProjectionSettings, from_section

    scout = load_model(model_dirs["tiny-scout"], "cpu", "float32")
    passages = ["Kalo Rinvel was born in the town of Quamel in 1841.", "Dar Tho founded the Velwyn Guild in Ostban."]
    known = ["Another passage entirely."]
    spec = ExtraPassages(source="file", path=str(tmp_path / "p.txt"), passages=8, seed=0, target="question", question_tokens=8)
    cfg, prompt = from_section(ProjectionSettings, smoke_config["projection"]), smoke_config["prompt"]
    (tmp_path / "p.txt").write_text("\n\n".join(passages))

    def settings(target: str) -> ProjectionSettings:
        distill = dataclasses.replace(cfg.distill, extra=dataclasses.replace(spec, target=target), teacher_top_k=16)
        return dataclasses.replace(cfg, distill=distill, max_new_tokens=4)

    asked, cont = (extra_samples(scout, tiny_main, prompt, settings(t), known) for t in ("question", "continuation"))
    questions = [self_question(tiny_main, p, 8) for p in passages]
    assert len(asked) == sum(map(bool, questions)) > 0 and len(cont) == 2
    for s, (p, q) in zip(asked, [(p, q) for p, q in zip(passages, questions) if q]):
        expected = build_prompt(tiny_main.tokenizer, prompt, p, q)
        assert s.extra and s.answers == () and np.array_equal(s.tokens.input_ids, expected.input_ids)
        assert s.teacher.shape == s.teacher_ids.shape == (len(s.after), 16)  # the top-k teacher
        assert torch.equal(
            s.after[: len(expected) - expected.context_end], torch.as_tensor(expected.input_ids[expected.context_end :])
        )
    for s, p in zip(cont, passages):
        tokens = build_prompt(tiny_main.tokenizer, prompt, p, ASK)
        assert s.extra and s.tokens is None and s.prefix + len(s.after) == tokens.context_end


def test_a_top_k_teacher_is_the_kl_of_the_coarsened_distributions():
    from kvpipe.projection.distill import token_kl

    gen = torch.Generator().manual_seed(4)
    teacher = torch.log_softmax(3 * torch.randn(5, 50, generator=gen), -1)
    student = torch.log_softmax(3 * torch.randn(5, 50, generator=gen), -1)
    full = token_kl(teacher, student)
    assert torch.allclose(full, torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="none").sum(-1))
    top = teacher.topk(8, dim=-1)
    coarse = token_kl(top.values, student, top.indices)
    p, q = teacher.exp(), student.exp()  # the same KL computed on 9 outcomes: the top 8 and the rest
    p9 = torch.cat([p.gather(1, top.indices), 1 - p.gather(1, top.indices).sum(-1, keepdim=True)], 1)
    q9 = torch.cat([q.gather(1, top.indices), 1 - q.gather(1, top.indices).sum(-1, keepdim=True)], 1)
    assert torch.allclose(coarse, (p9 * (p9.log() - q9.log())).sum(-1), atol=1e-5)
    assert (coarse <= full + 1e-6).all() and (coarse < full).any()  # a lower bound of the full KL
    assert torch.allclose(token_kl(top.values, teacher, top.indices), torch.zeros(5), atol=1e-6)
    whole = teacher.topk(50, dim=-1)
    assert torch.allclose(token_kl(whole.values, student, whole.indices), full, atol=1e-5)
