"""One run's streams, as one value: ``StreamPlan``.

A plan says what every device streams: how many devices, how the dataset is split over them
(``partition``), at what rates (``rates``, varied by ``rate_schedule``), with which arrivals,
from which seed, from which event time (``stream_start_s``) and for how long
(``duration_s``). It builds what producers and trainers used to rebuild from the same
strings: the rate schedules, the partition (from the dataset's labels) and each device's
``DeviceStream``. The launcher builds one from its configuration, records it in run.json
(``to_dict``) and hands it to the producer; a trainer builds the same one from the same
configuration, so both sides stream identical records.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from streamsim.partition import Partition, make_partition, parse_scheme
from streamsim.pool import make_pool_stream
from streamsim.record import VIRTUAL_EPOCH_S
from streamsim.schedule import ARRIVALS, RateSchedule, make_schedules
from streamsim.stream import DeviceStream


def default_stream_start_s(virtual: bool, delay_s: float = 0.0) -> float:
    """Event time (epoch seconds) of stream second 0 when none is given: ``VIRTUAL_EPOCH_S``
    for virtual time, else now plus ``delay_s``."""
    return VIRTUAL_EPOCH_S if virtual else time.time() + delay_s


@dataclass(frozen=True)
class StreamPlan:
    """What every device streams (see the module docstring); validated on construction
    (``ValueError`` naming the bad setting). ``stream_start_s`` and ``duration_s`` may be
    None: not fixed yet (``default_stream_start_s``), unbounded."""

    devices: int                      # D: one stream per device (ranks x devices per rank)
    rates: str                        # streamsim.schedule rate spec: '92 22 62', S1, ...
    partition: str = "iid"            # iid, noniid or dirichlet:ALPHA
    rate_schedule: str | None = None  # constant, rotate:SEC, scale:T:F,T:F
    arrivals: str = "even"            # even or poisson
    seed: int = 0                     # of the partition, sampled rates and streams
    stream_start_s: float | None = None  # event time (epoch s) of stream second 0
    duration_s: float | None = None   # stream seconds produced

    def __post_init__(self):
        if isinstance(self.devices, bool) or not isinstance(self.devices, (int, np.integer)) \
                or self.devices < 1:
            raise ValueError(f"stream plan: devices {self.devices!r} must be a whole number "
                             f">= 1")
        for name, kind in (("devices", int), ("seed", int), ("stream_start_s", float),
                           ("duration_s", float)):
            value = getattr(self, name)
            if value is not None:  # numpy scalars and ints-as-floats become JSON's own types
                object.__setattr__(self, name, kind(value))
        if not isinstance(self.rates, str):
            raise ValueError(f"stream plan: rates {self.rates!r} must be a rate spec string")
        parse_scheme(self.partition)
        if self.arrivals not in ARRIVALS:
            raise ValueError(f"stream plan: arrivals {self.arrivals!r}: use one of "
                             f"{', '.join(ARRIVALS)}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"stream plan: duration_s {self.duration_s} must be > 0")
        if len(self.schedules) != self.devices:
            raise ValueError(f"stream plan: rates {self.rates!r} give {len(self.schedules)} "
                             f"schedules for {self.devices} devices")

    @functools.cached_property
    def schedules(self) -> list[RateSchedule]:
        """One ``RateSchedule`` per device (``make_schedules``)."""
        return make_schedules(self.rates, self.devices, self.seed, self.rate_schedule)

    def make_partition(self, labels: np.ndarray) -> Partition:
        """Which samples (indices into ``labels``, the dataset's) each device streams."""
        return make_partition(labels, self.devices, self.partition, self.seed)

    def streams(self, dataset, devices: Sequence[int] | None = None,
                partition: Partition | None = None) -> list[DeviceStream]:
        """The ``DeviceStream`` of each device in ``devices`` (default all) over ``dataset``;
        ``partition``: one already made from the dataset's labels (else it is made here)."""
        part = self.make_partition(dataset.labels) if partition is None else partition
        devices = range(self.devices) if devices is None else devices
        return [DeviceStream(dataset, part.indices[d], self.schedules[d], d, self.seed,
                             self.arrivals) for d in devices]

    def pool_stream(self, dataset, rate_per_s: float) -> DeviceStream:
        """The injection pool's stream at ``rate_per_s`` (``streamsim.pool.make_pool_stream``,
        the plan's seed, even arrivals)."""
        return make_pool_stream(dataset, rate_per_s, self.seed)

    def mean_rates(self, duration_s: float) -> list[float]:
        """Each device's mean rate (samples/s) over stream seconds [0, duration_s)."""
        return [s.mean_rate(duration_s) for s in self.schedules]

    def to_dict(self) -> dict:
        """JSON-able fields (run.json's ``stream_plan``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, doc: dict) -> "StreamPlan":
        """The plan ``to_dict`` wrote; ``ValueError`` on unknown or missing fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - names)
        if unknown:
            raise ValueError(f"stream plan: unknown field(s) {', '.join(unknown)}")
        missing = [n for n in ("devices", "rates") if n not in doc]
        if missing:
            raise ValueError(f"stream plan: missing field(s) {', '.join(missing)}")
        return cls(**doc)
