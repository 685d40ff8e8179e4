"""fidelity and coverage: the pixel judge of ``harness.lab.judge`` on prompts of the embedded shapes grammar.

- ``fidelity``: per picture, half commitment (the stated number of crisp, solid objects and nothing
  else) and half the share of what the caption states that the picture shows; the mean over pictures.
- ``coverage``: over the pictures of the same captions across seeds, how the attributes the captions
  leave open are spread, against the data's own spread (1 - total-variation distance). Run it with
  several seeds per prompt (``--num_images``, or several ``--seed``s) or it measures little.
"""

from __future__ import annotations

from collections.abc import Sequence

import harness
from harness import HarnessError, MetricInput, PerImageMetric

EXAMPLE = "'two blue squares on a white background'"


def _check_prompts(name: str, prompts: Sequence[str]) -> None:
    from harness.lab.scenes import parse

    for prompt in dict.fromkeys(prompts):
        try:
            parse(prompt)
        except ValueError:
            raise HarnessError(f"{name} scores prompts of the shapes grammar only (e.g. {EXAMPLE}); "
                               f"'{prompt[:60]}' is not one.") from None


class FidelityMetric(PerImageMetric):
    name = "fidelity"
    description = ("Prompt fidelity on the embedded shapes grammar: half commitment (the stated number of solid "
                   "objects), half the share of stated attributes the pixel judge finds.")

    def score_batch(self, batch: MetricInput) -> list[dict]:
        from harness.lab.judge import judge

        _check_prompts(self.name, batch.prompts)
        return [judge(image, text) for image, text in zip(batch.images, batch.prompts)]

    def summarize(self, values: list[dict], prompts: list[str]) -> dict:
        from harness.lab.judge import summarize

        summary = summarize(values)
        return {"value": summary["overall"], **summary}


class CoverageMetric(PerImageMetric):
    name = "coverage"
    description = ("Spread of what the shapes captions leave open (layout, size, shape, colour) across seeds, "
                   "against the data's: 1 - total-variation distance.")

    def score_batch(self, batch: MetricInput) -> list:
        from harness.lab.judge import read

        _check_prompts(self.name, batch.prompts)
        return [read(image) for image in batch.images]

    def summarize(self, values: list, prompts: list[str]) -> dict:
        from harness.lab.judge import coverage_of

        try:
            return coverage_of(zip(values, prompts))
        except ValueError as error:
            raise HarnessError(f"{error}; e.g. {EXAMPLE}.") from None


@harness.hookimpl
def register_metrics(register):
    register(FidelityMetric)
    register(CoverageMetric)
