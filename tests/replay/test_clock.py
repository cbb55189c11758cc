import pytest

from cachedattn.replay.clock import ServiceModel, VirtualClock
from cachedattn.serving.job import Job


def _job(computed, reused, host, disk, answer):
    j = Job("c", None, 0, None, {})
    j.computed_tokens, j.reused_tokens, j.prompt_tokens, j.answer_tokens = computed, reused, computed + reused, answer
    j.tier_tokens = {"host": host, "disk": disk}
    return j


def test_service_model_terms():
    m = ServiceModel(c0=1.0, c1=0.1, c2=0.01, d0=0.5, d1=0.2, host_bw=100.0, disk_bw=10.0)
    assert m.compute(10, 1000) == pytest.approx(1 + 1 + 0.1)
    j = _job(10, 990, 900, 90, 4)  # 10 bytes per token: load = 9000/100 + 900/10 = 180 s
    assert m.prefill(j, 10, layerwise=False) == pytest.approx(2.1 + 180)
    assert m.prefill(j, 10, layerwise=True) == pytest.approx(180)  # compute hidden under the load
    assert m.prefill(_job(10, 0, 0, 0, 0), 10, layerwise=True) == pytest.approx(1 + 1 + 0.01 * 10 * 10 / 1000)
    assert m.decode(4, 1000) == pytest.approx(4 * 0.7)


def test_virtual_clock_is_charged_per_job():
    m = ServiceModel(c0=1.0, c1=0.0, c2=0.0, d0=0.5, d1=0.0)
    clock = VirtualClock(m, bytes_per_token=1)
    clock.advance_to(10.0)
    clock.advance_to(5.0)  # never goes back
    assert clock() == 10.0
    j = _job(3, 0, 0, 0, 4)
    clock.charge(j)
    assert j.modelled_prefill == 1.0 and j.service_time == 3.0 and clock() == 13.0 and clock.busy == 3.0
