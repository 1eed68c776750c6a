"""StreamPlan: one value for a run's streams; the same streams as the parts it replaces."""
import json

import numpy as np
import pytest

from scadles.config import parse_args
from streamsim.datasets import ArrayDataset
from streamsim.partition import make_partition
from streamsim.plan import StreamPlan, default_stream_start_s
from streamsim.pool import make_pool_stream
from streamsim.record import VIRTUAL_EPOCH_S
from streamsim.schedule import make_schedules
from streamsim.stream import DeviceStream

LABELS = np.repeat(np.arange(10), 30)  # 300 samples, 10 labels


@pytest.fixture(scope="module")
def dataset():
    images = np.zeros((len(LABELS), 1, 2, 2), dtype=np.uint8)
    return ArrayDataset("tiny", LABELS, 10, images)


def _same_streams(got, expected, duration_s):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert (a.device, a.seed, a.arrivals, a.schedule) == (b.device, b.seed, b.arrivals,
                                                              b.schedule)
        np.testing.assert_array_equal(a.indices, b.indices)
        for x, y in zip(a.plan(duration_s), b.plan(duration_s)):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("plan", [
    StreamPlan(devices=4, rates="16,24,40,64", seed=3),
    StreamPlan(devices=3, rates="S1", partition="noniid", rate_schedule="rotate:5",
               arrivals="poisson", seed=7, stream_start_s=1.7e9 + 0.123, duration_s=30.0),
    StreamPlan(devices=5, rates="0:64,20:16", partition="dirichlet:0.5",
               rate_schedule="scale:10:2", seed=1),
])
def test_streams_equal_the_ones_built_from_the_parts(plan, dataset):
    part = make_partition(dataset.labels, plan.devices, plan.partition, plan.seed)
    schedules = make_schedules(plan.rates, plan.devices, plan.seed, plan.rate_schedule)
    expected = [DeviceStream(dataset, part.indices[d], schedules[d], d, plan.seed,
                             plan.arrivals) for d in range(plan.devices)]
    assert plan.schedules == schedules
    assert plan.make_partition(dataset.labels).summary() == part.summary()
    _same_streams(plan.streams(dataset), expected, 40.0)
    _same_streams(plan.streams(dataset, devices=[2, 0]), [expected[2], expected[0]], 40.0)
    _same_streams([plan.pool_stream(dataset, 12.5)],
                  [make_pool_stream(dataset, 12.5, plan.seed)], 40.0)


def test_json_round_trip():
    plan = StreamPlan(devices=np.int64(3), rates="10 20 30", partition="noniid",
                      rate_schedule="rotate:60", arrivals="poisson", seed=np.int64(2),
                      stream_start_s=1_700_000_000.123456789, duration_s=90)
    doc = json.loads(json.dumps(plan.to_dict()))
    assert doc == {"devices": 3, "rates": "10 20 30", "partition": "noniid",
                   "rate_schedule": "rotate:60", "arrivals": "poisson", "seed": 2,
                   "stream_start_s": 1_700_000_000.123456789, "duration_s": 90.0}
    again = StreamPlan.from_dict(doc)
    assert again == plan and hash(again) == hash(plan)
    assert again.schedules == plan.schedules
    assert StreamPlan.from_dict({"devices": 2, "rates": "5 6"}) == StreamPlan(2, "5 6")
    with pytest.raises(ValueError, match="unknown field.*colour"):
        StreamPlan.from_dict({**doc, "colour": "red"})
    with pytest.raises(ValueError, match="missing field.*rates"):
        StreamPlan.from_dict({"devices": 2})


@pytest.mark.parametrize("fields, match", [
    (dict(devices=0, rates="5"), "devices 0"),
    (dict(devices=2, rates="5 6 7"), "3 rate"),
    (dict(devices=2, rates="5 6", partition="random"), "partition 'random'"),
    (dict(devices=2, rates="5 6", arrivals="bursty"), "arrivals 'bursty'"),
    (dict(devices=2, rates="5 6", rate_schedule="rotate:0"), "rotate"),
    (dict(devices=2, rates="5 6", duration_s=0), "duration_s 0"),
])
def test_bad_plans_name_the_setting(fields, match):
    with pytest.raises(ValueError, match=match):
        StreamPlan(**fields)


def test_the_config_plan_has_one_stream_per_device():
    cfg = parse_args(["--world-size", "2", "--devices-per-rank", "2", "--rates", "16,24,40,64",
                      "--partition", "noniid", "--rate-schedule", "rotate:30", "--seed", "3",
                      "--arrivals", "poisson", "--clock", "virtual", "--source", "inprocess",
                      "--max-steps", "5"], check_environment=False)
    plan = cfg.stream_plan()
    assert plan == StreamPlan(devices=4, rates="16,24,40,64", partition="noniid",
                              rate_schedule="rotate:30", arrivals="poisson", seed=3,
                              stream_start_s=None, duration_s=cfg.duration_s)
    assert cfg.stream_plan(VIRTUAL_EPOCH_S).stream_start_s == VIRTUAL_EPOCH_S
    assert cfg.device_view().stream_plan() == plan  # what each simulated device builds


def test_default_stream_start():
    assert default_stream_start_s(virtual=True, delay_s=5.0) == VIRTUAL_EPOCH_S
    import time
    before = time.time()
    assert before + 5.0 <= default_stream_start_s(virtual=False, delay_s=5.0) <= time.time() + 5
