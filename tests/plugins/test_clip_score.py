"""clip-score with a tiny CLIP built locally: known inputs, how bench records it, and offline failure."""

import pytest
import torch
import torch.nn.functional as F
from harness_plugins.clip_score import SCALE, ClipScoreMetric
from PIL import Image, ImageDraw

from harness.benchmark.metric import MetricConfig, MetricInput
from tests.conftest import invoke, record_json

FAST = ("--warmup", "0", "--repeats", "1", "--quiet")
SHAPES_PROMPT = "a large red square in the centre on a blue background"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIP (fixed seed) with its processor, saved as a user would save a real one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from harness.models.embedded import build_tokenizer

    tokenizer = build_tokenizer()
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(small, vocab_size=len(tokenizer), max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(small, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def picture(colour):
    image = Image.new("RGB", (64, 64), (30, 60, 200))
    ImageDraw.Draw(image).rectangle((16, 16, 48, 48), fill=colour)
    return image


def metric(clip_model):
    return ClipScoreMetric(MetricConfig(torch.device("cpu")), ClipScoreMetric.Options(clip_model=str(clip_model)))


def reference_cosine(folder, image, prompt):
    """The cosine recomputed from the towers and projections, without the metric's code path."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    text = processor.tokenizer([prompt], return_tensors="pt")
    pixels = processor.image_processor([image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        text_embed = model.text_projection(model.text_model(**text).pooler_output)
        image_embed = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    return F.cosine_similarity(text_embed, image_embed).item()


def test_clip_score_on_known_inputs(tiny_clip):
    image, prompts = picture((220, 40, 40)), ["a red square", "a green circle at the top"]
    clip = metric(tiny_clip)
    own, other = (clip.score(MetricInput([image], [prompt])) for prompt in prompts)
    assert own["cosine"] != pytest.approx(other["cosine"])

    expected = [reference_cosine(tiny_clip, image, prompt) for prompt in prompts]
    mean = sum(expected) / 2
    both = clip.score(MetricInput([image, image], prompts))
    assert both["per_image_cosine"] == pytest.approx(expected, abs=1e-5)
    assert both["cosine"] == pytest.approx(mean, abs=1e-5)
    assert both["value"] == pytest.approx(100 * max(mean, 0.0), abs=1e-3)
    assert both["scale"] == SCALE and both["clip_model"] == str(tiny_clip)
    assert metric(tiny_clip).score(MetricInput([image, image], prompts)) == both  # deterministic


def test_prompts_beyond_clips_77_tokens_are_truncated(tiny_clip):
    # Two prompts that differ only after CLIP's context score the same: the tail is cut, not an error.
    long = "a red square " * 40
    clip = metric(tiny_clip)
    image = picture((220, 40, 40))
    first, second = (clip.score(MetricInput([image], [long + tail])) for tail in ("red", "green circle"))
    assert first["cosine"] == pytest.approx(second["cosine"])


def test_bench_records_clip_score_with_its_model_and_scale(tmp_path, embedded_model, tiny_clip):
    outdir = tmp_path / "run"
    result = invoke("bench", "--steps", "2", "--metric", "clip-score", "--clip_model", tiny_clip,
                    "--outdir", outdir, *FAST)
    assert result.exit_code == 0, result.output
    [record] = record_json(outdir)
    scores = record["metrics"]["clip-score"]
    assert scores["clip_model"] == str(tiny_clip) and scores["scale"] == SCALE
    assert scores["value"] == pytest.approx(100 * max(scores["cosine"], 0.0))
    assert -1 <= scores["cosine"] <= 1


def test_offline_without_the_weights_one_line_and_the_other_metrics_still_run(tmp_path, embedded_model):
    outdir = tmp_path / "run"
    result = invoke("bench", "--steps", "2", "--metric", "clip-score", "--metric", "fidelity",
                    "--clip_model", "nobody/no-clip", "--prompt", SHAPES_PROMPT, "--outdir", outdir, *FAST)
    assert result.exit_code == 0, result.output
    [record] = record_json(outdir)
    error = record["metrics"]["clip-score"]["error"]
    assert "nobody/no-clip" in error and "pass --clip_model with a local folder" in error
    assert "\n" not in error
    assert "Warning: metric clip-score on flash-lcm 2 steps" in result.output
    assert 0 <= record["metrics"]["fidelity"]["value"] <= 1
