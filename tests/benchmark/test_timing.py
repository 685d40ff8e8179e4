"""The timing protocol: statistics, call accounting and the instrumented stage profile."""

import gc
import statistics
import time

import pytest
import torch

from harness.benchmark import timing
from harness.records.stats import Stats

CPU = torch.device("cpu")


def test_stats_on_known_samples():
    samples = [0.4, 0.1, 0.3, 0.2, 1.0]
    stats = Stats.from_samples(samples)
    assert (stats.n, stats.min, stats.max, stats.median) == (5, 0.1, 1.0, 0.3)
    assert stats.mean == pytest.approx(0.4)
    assert stats.stdev == pytest.approx(statistics.stdev(samples))
    assert stats.p90 == pytest.approx(0.76)  # numpy.percentile(samples, 90), linear interpolation
    assert stats.iqr == pytest.approx(0.4 - 0.2)
    assert Stats.from_samples([2.0]).stdev == 0.0


def test_measure_accounts_for_every_call_and_restores_gc():
    calls = {"a": 0, "b": 0}

    def make(name):
        def call():
            calls[name] += 1
            return name
        return call

    handed: list[tuple[int, int, str]] = []

    def on_output(number, call, output):  # outside the timed brackets and the wall-clock span
        handed.append((number, call, output))
        assert gc.isenabled()  # a handler's garbage is collected as it is made
        time.sleep(0.05)

    measurement = timing.measure([make("a"), make("b")], CPU, timing.TimingSettings(warmup=3, repeats=4), on_output)
    # first call (a) + 3 warmups (a, b, a) + 4 passes over both calls
    assert calls == {"a": 1 + 2 + 4, "b": 1 + 4}
    assert len(measurement.samples) == 8 and max(measurement.samples) < 0.05
    assert handed == [(number, call, name) for number in range(4) for call, name in enumerate("ab")]
    assert measurement.handled_s >= 8 * 0.05
    assert measurement.finished - measurement.started < measurement.handled_s
    assert measurement.first_call_s >= 0
    assert gc.isenabled()


def test_min_time_extends_the_measurement():
    import time

    measurement = timing.measure([lambda: time.sleep(0.01)], CPU, timing.TimingSettings(0, 1, min_time_s=0.05))
    assert len(measurement.samples) >= 5
    assert sum(measurement.samples) >= 0.05


def test_profile_counts_denoiser_calls_and_batches():
    text_encoder, denoiser, decoder = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def pipeline_call():
        text_encoder(torch.zeros(1, 4))
        for _ in range(3):
            denoiser(torch.zeros(2, 4))
        decoder(torch.zeros(1, 4))

    profile = timing.profile(pipeline_call, {"text_encoder": text_encoder, "denoiser": denoiser, "decoder": decoder},
                             CPU)
    assert profile.unet_calls == 3 and profile.unet_batch_sizes == [2, 2, 2]
    assert len(profile.per_step_s) == 3
    assert 0 < profile.text_encode_s + profile.denoise_s + profile.decode_s <= profile.total_s
    # The hooks are removed afterwards: the modules are untouched for the next call.
    assert not denoiser._forward_hooks and not denoiser._forward_pre_hooks
