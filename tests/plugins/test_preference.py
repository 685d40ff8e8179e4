"""pickscore: the model card's formula on a small local CLIP, and one line offline without the weights."""

import pytest
import torch
from harness_plugins.preference import PickScore
from PIL import Image

import harness
from tests.plugins.test_clip_score import tiny_clip  # noqa: F401 - the fixture, shared


def pickscore(model, processor=None):
    options = PickScore.Options(pickscore_model=str(model), pickscore_processor=str(processor or model))
    return PickScore(harness.MetricConfig(torch.device("cpu")), options)


def test_pickscore_is_the_logit_scale_times_the_cosine_of_each_pair(tiny_clip):  # noqa: F811 - the fixture
    from transformers import CLIPModel, CLIPProcessor

    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "yellow")]
    prompts = ["a red square", "a blue circle", "a yellow triangle"]
    result = pickscore(tiny_clip).score(harness.MetricInput(images, prompts))
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    expected = []
    with torch.inference_mode():
        for image, prompt in zip(images, prompts):
            image_embeds = model.get_image_features(**processor(images=[image], return_tensors="pt"))
            text_embeds = model.get_text_features(**processor(text=[prompt], return_tensors="pt", padding=True))
            image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
            text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
            cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds).item()
            expected.append(model.logit_scale.exp().item() * cosine)
    assert result["per_image"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert result["value"] == pytest.approx(sum(expected) / 3, rel=1e-4, abs=1e-5)
    assert result["model"] == str(tiny_clip)


def test_offline_without_the_weights_is_one_line_naming_the_fix(tmp_path):
    with pytest.raises(harness.HarnessError, match=r"^pickscore cannot load '.*nowhere' with the processor .*; pass "
                                                   r"--pickscore-model and --pickscore-processor with local folders"):
        pickscore(tmp_path / "nowhere").score(harness.MetricInput([Image.new("RGB", (32, 32))], ["a square"]))
