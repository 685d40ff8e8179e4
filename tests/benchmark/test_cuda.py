"""The CUDA paths of a measurement, on the embedded model: run where a GPU is (``pytest -m gpu``)."""

import pytest

import harness

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_a_cuda_run_records_the_device_its_allocator_peaks_and_identical_repeats(tmp_path):
    records = harness.bench(sampler=["flash-lcm"], steps=[2, 4], model="embedded", device="cuda", dtype="float16",
                            seed=3, warmup=1, repeats=3, outdir=tmp_path / "run")
    assert [(r.sampler, r.steps) for r in records] == [("flash-lcm", 2), ("flash-lcm", 4)]
    for record in records:
        assert record.error is None
        assert record.environment["device"].startswith("cuda")
        assert record.environment["dtype"] == "float16"
        assert record.measured is not None
        memory = record.measured.memory
        assert memory.cuda_max_allocated_mb > 0 and memory.cuda_max_reserved_mb >= memory.cuda_max_allocated_mb
        assert record.measured.deterministic is True  # the same seeds gave the same pixels in every repeat
