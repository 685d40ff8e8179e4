"""fidelity: does the image show what the prompt says? For prompts of the embedded shapes grammar."""

from __future__ import annotations

import harness
from harness.errors import HarnessError
from harness.metric import Metric, MetricInput


class FidelityMetric(Metric):
    name = "fidelity"
    description = ("Prompt fidelity of the embedded shapes grammar: share of attributes (shape, colours, position, "
                   "size) the pixel judge finds as the prompt says.")

    def score(self, data: MetricInput) -> dict:
        from harness.judge import judge_all
        from harness.shapes import parse_caption

        for prompt in dict.fromkeys(data.prompts):
            try:
                parse_caption(prompt)
            except ValueError:
                raise HarnessError(f"fidelity scores prompts of the shapes grammar only (e.g. 'a small red circle "
                                   f"at the top on a blue background'); '{prompt[:60]}' is not one.") from None
        summary = judge_all(zip(data.images, data.prompts))
        return {"value": summary["overall"], **summary}


@harness.hookimpl
def register_metrics(register):
    register(FidelityMetric)
