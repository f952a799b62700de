"""The small reference model: procedural data, shipped weights that really draw, TI that really learns, the bench."""

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from privdiff.embeddings.dpagg import encode_in_batches
from privdiff.embeddings.templates import STYLE_TEMPLATES
from privdiff.embeddings.textual_inversion import TIConfig, initial_vectors, train_shared_embedding
from privdiff.errors import PrivdiffError
from privdiff.models import small_spec
from privdiff.models.diffusers_backend import DiffusersBackend
from privdiff.models.registry import load_model
from privdiff.models.small import WEIGHTS
from privdiff.models.small_classifier import load_classifier
from privdiff.reference import shapes
from privdiff.reference.evaluate import evaluate, generate, prompt_pairs
from privdiff.reference.evaluate import main as evaluate_main
from privdiff.reference.score import score

ROOT = Path(__file__).resolve().parents[1]


def test_generator_is_deterministic():
    a, specs_a, caps_a = shapes.public_dataset(40, seed=3)
    b, specs_b, caps_b = shapes.public_dataset(40, seed=3)
    assert np.array_equal(a, b) and specs_a == specs_b and caps_a == caps_b
    c, _, _ = shapes.public_dataset(40, seed=4)
    assert not np.array_equal(a, c)
    x, _ = shapes.style_images("orange dots", 8, seed=1)
    assert np.array_equal(x, shapes.style_images("orange dots", 8, seed=1)[0])
    assert a.shape == (40, 32, 32, 3) and a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1


def test_public_part_never_shows_nor_names_a_private_style():
    _, specs, captions = shapes.public_dataset(3000, seed=0)
    assert not {s.style for s in specs} & set(shapes.PRIVATE_STYLES)
    assert {s.style for s in specs} == set(shapes.PUBLIC_STYLES)
    for private in shapes.PRIVATE_STYLES:
        assert not any(private in c for c in captions), private
    # ... while each private style's ingredients (background colour and texture) are named in public captions
    words = {w for c in captions for w in c.split()}
    assert all(set(p.split()) <= words for p in shapes.PRIVATE_STYLES)
    # every caption form occurs: shape + style, shape only, and the style templates TI trains with
    assert any(re.fullmatch(r"a \w+ \w+ in \w+ \w+ style", c) for c in captions)
    assert any(re.fullmatch(r"a \w+ \w+", c) for c in captions)
    assert any(c == t.format(s.style) for c, s in zip(captions, specs, strict=True) for t in STYLE_TEMPLATES)


def test_held_out_combinations_are_balanced_and_never_in_the_public_data():
    held = set(shapes.HELD_OUT)
    assert len(held) == len(shapes.HELD_OUT) == 2 * len(shapes.PUBLIC_STYLES)
    assert {s.style for s in held} == set(shapes.PUBLIC_STYLES)
    for field, values in (("shape", small_spec.SHAPES), ("colour", small_spec.COLOURS)):
        counts = [sum(getattr(s, field) == v for s in held) for v in values]
        assert max(counts) - min(counts) <= 2, (field, counts)
    _, specs, captions = shapes.public_dataset(3000, seed=0)
    assert not held & set(specs)
    assert not {f"a {s.colour} {s.shape} in {s.style} style" for s in held} & set(captions)
    # every held-out combination's parts are public: the shape and colour with other styles, and the style itself
    assert {(s.shape, s.colour) for s in held} <= {(s.shape, s.colour) for s in specs}
    # the draws of other callers are untouched by the exclusion
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    assert shapes.random_specs(50, rng_a) == shapes.random_specs(50, rng_b, exclude=frozenset())


def test_unet_cross_attention_levels():
    from privdiff.models.small import unet

    denoiser = unet((8, 4))
    assert denoiser.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert denoiser.config.up_block_types == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    with pytest.raises(ValueError, match="cross_attention"):
        unet((2,))


def test_widened_unet_computes_the_same_until_its_new_attention_trains():
    from privdiff.models import small
    from privdiff.reference.train import caption_ids, train_unet, widened

    torch.manual_seed(0)
    narrow = small.unet((4,))
    wide = widened(narrow, small.LEVELS)
    assert wide.config.down_block_types == ("CrossAttnDownBlock2D",) * 3
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 77, 768)
    with torch.no_grad():
        assert torch.allclose(narrow(x, t, text).sample, wide(x, t, text).sample, atol=1e-5)
    with pytest.raises(ValueError, match="does not extend"):
        widened(wide, (4,))
    tok = small.tokenizer()
    ids, rows, empty = caption_ids(tok, ["a red star", "a blue circle"])
    before = narrow.conv_in.weight.clone()
    refined, _ = train_unet(torch.randn(2, 4, 16, 16), ids, rows, empty, small.text_encoder(tok), 2,
                            torch.Generator().manual_seed(0), batch=2, cross_attention=small.LEVELS, start=narrow)
    added = [name for name, _ in refined.named_parameters() if name.startswith("down_blocks.0.attentions")]
    assert added and any(refined.get_parameter(name).abs().sum() > 0 for name in added if ".proj_out." in name)
    assert torch.equal(narrow.conv_in.weight, before)  # the start model itself is left as it was


def test_refine_runs_the_second_stage_from_a_trained_model(tmp_path):
    from privdiff.models.small_classifier import ENCODER_FILE, FILE
    from privdiff.reference import train

    out = tmp_path / "refined"
    timings = train.train(out, images=64, refine_steps=2, refine=WEIGHTS)
    assert set(timings) == {"data", "vae", "captions", "unet refinement"}
    unet_config = json.loads((out / "unet" / "config.json").read_text())
    assert unet_config["down_block_types"] == ["CrossAttnDownBlock2D"] * 3
    assert all((out / name).read_bytes() == (WEIGHTS / name).read_bytes() for name in (FILE, ENCODER_FILE))
    assert not list(out.glob("*.pt"))  # no training state left next to the weights


def test_text_encoder_learns_only_when_asked_and_offset_noise_trains():
    from privdiff.models import small
    from privdiff.reference.train import caption_ids, train_unet

    tok = small.tokenizer()
    captions = ["a red star in gray stripes style", "a blue circle", "a painting in the style of black dots"] * 2
    ids, rows, empty = caption_ids(tok, captions)
    latents = torch.randn(len(captions), 4, 16, 16)
    for learns in (False, True):
        torch.manual_seed(0)
        encoder = small.text_encoder(tok)
        before = encoder.get_input_embeddings().weight.clone()
        _, text = train_unet(latents, ids, rows, empty, encoder, 2, torch.Generator().manual_seed(0), batch=4,
                             train_text=learns, cross_attention=(4,), offset_noise=0.3 if learns else 0.0)
        changed = not torch.equal(text.get_input_embeddings().weight, before)
        assert changed == learns and not any(p.requires_grad for p in text.parameters())


def test_unet_training_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, monkeypatch):
    from privdiff.models import small
    from privdiff.reference import train

    tok = small.tokenizer()
    ids, rows, empty = train.caption_ids(tok, ["a red star", "a blue circle", "a green square"])
    latents = torch.randn(3, 4, 16, 16)
    encoder = small.text_encoder(tok)

    def run(checkpoint, seed=0):
        torch.manual_seed(0)
        unet, _ = train.train_unet(latents, ids, rows, empty, encoder, 4, torch.Generator().manual_seed(seed), batch=2,
                                   cross_attention=(4,), checkpoint=checkpoint, checkpoint_every=2)
        return unet.state_dict()

    straight = run(None)
    checkpoint = tmp_path / train.CHECKPOINT
    lr = train._lr

    def interrupted(seed):
        monkeypatch.setattr(train, "_lr", lambda step, *a, **k: 1 / 0 if step == 3 else lr(step, *a, **k))
        with pytest.raises(ZeroDivisionError):
            run(checkpoint, seed)
        monkeypatch.setattr(train, "_lr", lr)
        assert checkpoint.exists()

    interrupted(0)
    resumed = run(checkpoint)
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert torch.load(checkpoint, weights_only=True)["done"] == 4  # the final state stays: a rerun returns it
    again = run(checkpoint)
    assert all(torch.equal(straight[name], again[name]) for name in straight)
    checkpoint.unlink()
    interrupted(1)  # a checkpoint of another run is refused by name
    with pytest.raises(PrivdiffError, match="other data or seed"):
        run(checkpoint)


@pytest.fixture(scope="module")
def small():
    pipe = load_model("small")
    return pipe, load_classifier(WEIGHTS)


def test_shipped_weights_are_small_and_tokenize_the_grammar(small):
    pipe, _ = small
    size = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert size < 20e6, size
    tok = pipe.tokenizer
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in small_spec.WORDS)
    assert pipe.text_encoder.config.vocab_size == len(tok) and pipe.text_encoder.config.hidden_size == 768
    backend = DiffusersBackend(pipe)
    assert backend.family == "SD1" and backend.resolution == 32


def test_classifier_reads_rendered_images(small):
    _, classifier = small
    rng = np.random.default_rng(7)
    specs = shapes.random_specs(200, rng, styles=shapes.ALL_STYLES)
    images = torch.from_numpy(np.stack([shapes.render(s, rng) for s in specs])).permute(0, 3, 1, 2)
    labels = classifier.labels(images)
    for head in ("shape", "colour", "background", "texture"):
        accuracy = np.mean([lab[head] == getattr(s, head) for lab, s in zip(labels, specs, strict=True)])
        assert accuracy > 0.97, (head, accuracy)


def test_model_draws_prompted_public_attributes_far_above_chance(small):
    pipe, classifier = small
    pairs = prompt_pairs(40, seed=0)
    public = [shapes.PUBLIC_STYLES[i % len(shapes.PUBLIC_STYLES)] for i in range(len(pairs))]
    prompts = [f"a {c} {s} in {st} style" for (s, c), st in zip(pairs, public, strict=True)]
    images = generate(pipe, prompts, seed=0)
    labels = classifier.labels(images)
    adherence = score(classifier, images, None, pairs).adherence
    in_style = np.mean([f"{lab['background']} {lab['texture']}" == st for lab, st in zip(labels, public, strict=True)])
    # chance: 1/20 for shape and colour, 1/25 for the style; the weights before issue 23 scored about 0.43 and
    # 0.28 (they bound the background colour word poorly), the 6000-step weights without attention at 16x16 about
    # 0.75 (stars drawn as triangles); the shipped ones score 0.95 and 1.00 (docs/reference-model.md)
    assert adherence > 0.85, adherence
    assert in_style > 0.95, in_style


def test_held_out_evaluation_prints_the_four_accuracies(capsys, tmp_path):
    assert evaluate_main(["--count", "8"]) == 0
    out = capsys.readouterr().out
    rows = {line[:16].strip(): [float(v) for v in line[16:].split()] for line in out.splitlines()[2:]}
    assert list(rows) == ["rendered", "VAE round trip", "samples"] and all(len(v) == 4 for v in rows.values())
    assert "texture" in out.splitlines()[1] and "background colour" in out.splitlines()[1]
    assert min(rows["rendered"]) >= 0.95  # the classifier reads the rendered held-out images
    assert min(rows["samples"]) >= 0.875, rows["samples"]  # the model draws them: all four attributes
    assert evaluate_main(["--model", str(tmp_path)]) == 1
    assert "missing from" in capsys.readouterr().err


def test_textual_inversion_learns_a_private_style(small):
    pipe, classifier = small
    backend = DiffusersBackend(pipe)
    backend.freeze()
    style = "teal stripes"
    pixels, _ = shapes.style_images(style, 32, seed=5)
    gen = torch.Generator().manual_seed(0)
    latents = encode_in_batches(backend, torch.from_numpy(pixels).permute(0, 3, 1, 2), 32, gen)
    config = TIConfig(steps=150, lr=2e-2, batch_size=16)
    init = initial_vectors(backend, config)
    trained = train_shared_embedding(backend, latents, init, config, gen)
    before = evaluate(pipe, classifier, style, word=config.init_word, count=40, seed=1)
    after = evaluate(pipe, classifier, style, vectors=trained, count=40, seed=1)
    # The whole style is learned: the init word alone gives neither the teal background nor the stripes
    # (README "Does it work?": 0.00 before, 1.00 after on 200 images)
    assert before.style < 0.2 and after.style >= 0.9, (before, after)
    assert after.texture >= 0.95 and after.background >= 0.95, after


def _load_bench():
    spec = importlib.util.spec_from_file_location("privacy_utility", ROOT / "bench" / "privacy_utility.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_numbers_come_from_runs(small, monkeypatch, capsys):
    bench = _load_bench()
    for name in ("PER_IMAGE", "SHARED", "DPSGD"):
        monkeypatch.setattr(bench, name, TIConfig(steps=2, lr=1e-2, batch_size=4))
    monkeypatch.setattr(bench, "load_small", lambda: small[0])
    args = ["--images", "6", "--seeds", "1", "--samples", "4", "--epsilons", "inf,1"]
    assert bench.main(args) == 0
    table = capsys.readouterr().out
    rows = {tuple(m.group(1, 2)): float(m.group(3))
            for m in re.finditer(r"^(.+?)\s+(inf|1)\s+([\d.]+) ±", table, re.MULTILINE)}
    assert {k[0].strip() for k in rows} == {"init word alone", "TI (non-private)", "DPAgg-TI", "DP-SGD TI"}
    ratio = float(re.search(r"TI\(non-private\) style score: (\S+)", table).group(1))
    ti = rows[("TI (non-private)", "inf")]
    assert math.isnan(ratio) if ti == 0 else ratio == pytest.approx(rows[("DPAgg-TI", "1")] / ti, abs=0.01)
    # a classifier that sees the target style everywhere moves every style score to 1
    classifier = small[1]
    monkeypatch.setattr(classifier, "labels", lambda images: [
        {"shape": "star", "colour": "red", "background": "teal", "texture": "stripes"}] * len(images))
    monkeypatch.setattr(bench, "load_classifier", lambda _: classifier)
    assert bench.main(args) == 0
    assert re.findall(r"^.+?\s+(?:inf|1)\s+([\d.]+) ±", capsys.readouterr().out, re.MULTILINE) == ["1.00"] * 5


def test_guidance_toward_a_dp_target_raises_the_style_score(small):
    from privdiff.guidance.sampler import GuidanceConfig
    from privdiff.guidance.target import make_target, target_params
    from privdiff.models.image_encoders import load_small_encoder
    from privdiff.reference.evaluate import evaluate_guided

    pipe, classifier = small
    encoder = load_small_encoder()
    style = "teal stripes"
    pixels, _ = shapes.style_images(style, 100, seed=3)
    # Fixed seeds make the release noise reproducible (not private), so the test is deterministic. At epsilon = 1
    # the noise moves a single target a lot (one of the first six seeds guides to style 0.06, the best to 0.69):
    # the guided scores are averaged over three releases.
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    targets = [make_target(encoder, images, target_params(1.0, 1e-5), seed=seed).vector for seed in range(3)]
    plain = evaluate_guided(pipe, classifier, style, encoder, targets[0],
                            GuidanceConfig(steps=15, cfg=3.0, weight=0.0, recurrence=1), count=16)
    guided = [evaluate_guided(pipe, classifier, style, encoder, target,
                              GuidanceConfig(steps=15, cfg=3.0, weight=6.0, recurrence=2), count=16)
              for target in targets]
    style_gain = sum(g.style for g in guided) / 3 - plain.style
    texture_gain = sum(g.texture for g in guided) / 3 - plain.texture
    assert style_gain > 0.3 and texture_gain > 0.3, (plain, guided)
