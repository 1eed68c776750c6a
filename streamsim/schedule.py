"""Stream rates per device, how they change over time, and the arrival (event) times they give.

Rate specs (``parse_rates`` / ``make_schedules``):
  ``92 22 62 ...`` or ``92,22,62,...``  one rate (samples/s) per device
  ``S1``  uniform, mean 38, sd 24     ``S2``  uniform, mean 300, sd 112   (the paper's)
  ``S10`` normal, mean 64, sd 24      ``S20`` normal, mean 256, sd 28
  ``normal:MEAN,SD``, ``uniform:LO,HI``  sampled per device, clipped to >= 1
  ``0:64,300:16``  piecewise, every device: 64/s from t=0 s, 16/s from t=300 s
  ``PATH.csv``     trace, rows ``t_seconds,device,rate`` (header optional)
A uniform with mean m and sd s is U(m - s*sqrt(3), m + s*sqrt(3)).

Variation on top of the base rates (``rate_schedule``), for the paper's varying stream rates:
  ``constant`` (or None), ``rotate:SEC`` (every SEC s each device takes the next device's
  base rate: the aggregate stays constant), ``scale:T:F,T:F`` (base rates x F from time T).

Arrivals: the cumulative rate Lambda(t) = integral of the rate. ``even`` puts the k-th arrival
(k = 0, 1, ...) at Lambda^-1(k), so an interval [t0, t1) holds exactly
ceil(Lambda(t1)) - ceil(Lambda(t0)) arrivals: no drift however long the stream. ``poisson``
maps a unit-rate Poisson process through Lambda^-1 (time rescaling).
"""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

# name -> (distribution, mean, sd), rates in samples/s, as in the ScaDLES paper
NAMED_RATES = {
    "S1": ("uniform", 38.0, 24.0),
    "S2": ("uniform", 300.0, 112.0),
    "S10": ("normal", 64.0, 24.0),
    "S20": ("normal", 256.0, 28.0),
}
RATE_FORMS = ("a list of one rate per device ('92 22 62' or '92,22,62')", "S1", "S2", "S10",
              "S20", "normal:MEAN,SD", "uniform:LO,HI", "piecewise T:RATE,T:RATE",
              "a CSV trace path (t_seconds,device,rate)")
RATE_SCHEDULE_FORMS = ("constant", "rotate:SEC", "scale:T:F,T:F")
RATE_LIST_SEPARATOR = re.compile(r"[,\s]+")  # between the rates of a listed spec
RATE_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?")  # one rate of a listed spec
ARRIVALS = ("even", "poisson")
_RATES_STREAM = 0x7A7E  # separates rate draws from other users of the same seed
_BLOCK = 8192  # arrivals generated per step (fixed, so every consumer sees the same draws)


class RateSchedule:
    """One device's rate over stream time: ``segments`` [(start_s, rate_per_s)], the first at
    0 s, each holding until the next start. With ``period_s`` the segments repeat forever."""

    def __init__(self, segments: Sequence[tuple[float, float]], period_s: float | None = None):
        if not segments:
            raise ValueError("a rate schedule needs at least one (start_s, rate_per_s)")
        starts = np.array([float(s) for s, _ in segments])
        rates = np.array([float(r) for _, r in segments])
        if starts[0] != 0 or np.any(np.diff(starts) <= 0):
            raise ValueError(f"segment starts {starts.tolist()}: must begin at 0 and increase")
        if not np.all(np.isfinite(rates)) or np.any(rates < 0):
            raise ValueError(f"rates {rates.tolist()}: must be finite and >= 0")
        if period_s is not None and not period_s > starts[-1]:
            raise ValueError(f"period {period_s} s must exceed the last start {starts[-1]} s")
        self.segments = [(float(s), float(r)) for s, r in zip(starts, rates)]
        self.period_s = None if period_s is None else float(period_s)
        self._starts, self._rates = starts, rates
        ends = np.append(starts[1:], self.period_s if period_s is not None else np.inf)
        widths = np.where(np.isfinite(ends), ends - starts, 0.0)
        self._cum = np.concatenate([[0.0], np.cumsum(rates * widths)[:-1]])
        self._period_count = float(np.sum(rates * widths)) if period_s is not None else None

    def __repr__(self) -> str:
        period = f", period_s={self.period_s}" if self.period_s is not None else ""
        return f"RateSchedule({self.segments}{period})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, RateSchedule) and self.segments == other.segments
                and self.period_s == other.period_s)

    @property
    def is_constant(self) -> bool:
        return len(self.segments) == 1

    def rate_at(self, t_s):
        """Rate (samples/s) at stream time ``t_s`` (scalar or array); 0 before t = 0."""
        t = np.asarray(t_s, dtype=np.float64)
        local = np.mod(t, self.period_s) if self.period_s is not None else t
        i = np.searchsorted(self._starts, local, side="right") - 1
        rate = np.where(t >= 0, self._rates[np.maximum(i, 0)], 0.0)
        return float(rate) if rate.ndim == 0 else rate

    def cumulative(self, t_s):
        """Lambda(t): expected arrivals in [0, t_s) (scalar or array)."""
        t = np.maximum(np.asarray(t_s, dtype=np.float64), 0.0)
        if self.period_s is not None:
            periods, local = np.divmod(t, self.period_s)
            out = periods * self._period_count + self._cum_within(local)
        else:
            out = self._cum_within(t)
        return float(out) if out.ndim == 0 else out

    def _cum_within(self, t: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self._starts, t, side="right") - 1
        return self._cum[i] + self._rates[i] * (t - self._starts[i])

    def expected_count(self, t0_s: float, t1_s: float) -> float:
        """Integral of the rate over [t0_s, t1_s)."""
        return self.cumulative(t1_s) - self.cumulative(t0_s)

    def mean_rate(self, duration_s: float) -> float:
        """The time-average of the rate over [0, duration_s) (samples/s): Lambda(d) / d; a
        constant rate exactly, and the rate at 0 s when ``duration_s`` is 0."""
        if self.is_constant or not duration_s > 0:
            return self.rate_at(0.0)
        return self.cumulative(duration_s) / duration_s

    def time_of_count(self, counts) -> np.ndarray:
        """Lambda^-1: the first time the cumulative count reaches ``counts`` while the
        stream is running (inf where it never does)."""
        u = np.asarray(counts, dtype=np.float64)
        if self.period_s is None:
            return self._time_within(u)
        if self._period_count == 0:
            return np.full(u.shape, np.inf)
        periods = np.floor(u / self._period_count)
        rest = np.maximum(u - periods * self._period_count, 0.0)
        return periods * self.period_s + self._time_within(rest)

    def _time_within(self, u: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self._cum, u, side="right") - 1
        rate = self._rates[i]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = self._starts[i] + (u - self._cum[i]) / rate
        return np.where(rate > 0, t, np.inf)

    def count_limit(self, duration_s: float) -> float:
        """Arrivals in [0, duration_s) are the count-space points below this: Lambda(t),
        less a relative 1e-9 so that rounding never admits an arrival at t = duration_s."""
        total = self.cumulative(duration_s)
        return total - 1e-9 * max(1.0, total)

    def arrival_count(self, duration_s: float) -> int:
        """Number of even arrivals in [0, duration_s): ceil(Lambda(duration_s))."""
        return max(0, math.ceil(self.count_limit(duration_s)))


# ---------------------------------------------------------------- base rates

def _numbers(text: str, spec: str, count: int) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count or not all(np.isfinite(values)):
        raise ValueError(f"rates {spec!r}: expected {count} number(s) after ':'")
    return values


def parse_rates(spec: str | Sequence[float], world_size: int, seed: int) -> list[float]:
    """Base rate (samples/s) per device from an explicit list or a named/parametric
    distribution, sampled per device from a generator seeded by ``seed``."""
    if world_size < 1:
        raise ValueError(f"world_size {world_size}: must be >= 1")
    if not isinstance(spec, str):
        values = [float(v) for v in spec]
        return _explicit(values, str(spec), world_size)
    text = spec.strip()
    kind, sep, arg = text.partition(":")
    rng = np.random.default_rng([seed, _RATES_STREAM])
    if text.upper() in NAMED_RATES:
        dist, mean, sd = NAMED_RATES[text.upper()]
        drawn = (rng.normal(mean, sd, world_size) if dist == "normal" else
                 rng.uniform(mean - sd * math.sqrt(3), mean + sd * math.sqrt(3), world_size))
    elif sep and kind.lower() == "normal":
        mean, sd = _numbers(arg, spec, 2)
        if sd < 0:
            raise ValueError(f"rates {spec!r}: SD must be >= 0")
        drawn = rng.normal(mean, sd, world_size)
    elif sep and kind.lower() == "uniform":
        lo, hi = _numbers(arg, spec, 2)
        if hi < lo:
            raise ValueError(f"rates {spec!r}: uniform:LO,HI needs LO <= HI")
        drawn = rng.uniform(lo, hi, world_size)
    else:
        try:
            values = [float(v) for v in RATE_LIST_SEPARATOR.split(text) if v]
        except ValueError:
            raise ValueError(f"rates {spec!r}: use {'; '.join(RATE_FORMS[:7])}") from None
        return _explicit(values, spec, world_size)
    return np.maximum(drawn, 1.0).tolist()


def listed_rates(spec: str) -> list[str] | None:
    """The items of a rate list ('92 22 62' or '92,22,62'), or None when ``spec`` is not a
    list of numbers (a named or parametric distribution, piecewise rates, a trace)."""
    items = RATE_LIST_SEPARATOR.split(spec.strip())
    return items if all(RATE_NUMBER.fullmatch(v) for v in items) else None


def _explicit(values: list[float], spec: str, world_size: int) -> list[float]:
    if len(values) != world_size:
        raise ValueError(f"rates {spec!r}: {len(values)} rate(s) for world size {world_size}; "
                         f"give one per device (or 0:RATE for the same rate on every device)")
    if not all(np.isfinite(values)) or min(values) <= 0:
        raise ValueError(f"rates {spec!r}: every rate must be a number > 0 (samples/s)")
    return values


# ---------------------------------------------------------------- schedules

def _parse_piecewise(spec: str) -> list[tuple[float, float]]:
    segments = []
    for item in re.split(r"[,\s]+", spec.strip()):
        t, sep, rate = item.partition(":")
        try:
            segments.append((float(t), float(rate)))
        except ValueError:
            raise ValueError(f"piecewise rates {spec!r}: {item!r} is not T:RATE") from None
    if segments[0][0] != 0 or any(b[0] <= a[0] for a, b in zip(segments, segments[1:])):
        raise ValueError(f"piecewise rates {spec!r}: times must start at 0 and increase")
    if any(r < 0 for _, r in segments):
        raise ValueError(f"piecewise rates {spec!r}: rates must be >= 0")
    return segments


def _load_trace(path: Path, world_size: int) -> list[RateSchedule]:
    """CSV rows ``t_seconds,device,rate``; every device needs a row at t = 0."""
    if not path.is_file():
        raise ValueError(f"rate trace {path}: no such file")
    per_device: dict[int, dict[float, float]] = {}
    with open(path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row]
            if not cells or not cells[0] or cells[0].startswith("#"):
                continue
            try:
                t, device, rate = float(cells[0]), int(cells[1]), float(cells[2])
            except (ValueError, IndexError):
                if line_no == 1:
                    continue  # header
                raise ValueError(f"rate trace {path}:{line_no}: {row} is not "
                                 f"t_seconds,device,rate") from None
            if not 0 <= device < world_size or t < 0 or rate < 0 or not np.isfinite(rate):
                raise ValueError(f"rate trace {path}:{line_no}: {row}: need device in "
                                 f"[0, {world_size}), t >= 0, rate >= 0")
            if t in per_device.setdefault(device, {}):
                raise ValueError(f"rate trace {path}:{line_no}: device {device} at t={t} twice")
            per_device[device][t] = rate
    schedules = []
    for device in range(world_size):
        rows = per_device.get(device, {})
        if 0.0 not in rows:
            raise ValueError(f"rate trace {path}: device {device} has no rate at t=0")
        schedules.append(RateSchedule(sorted(rows.items())))
    return schedules


def _is_distribution(text: str) -> bool:
    kind = text.partition(":")[0].lower()
    return text.upper() in NAMED_RATES or kind in ("normal", "uniform")


def make_schedules(rates_spec: str | Sequence[float], world_size: int, seed: int,
                   rate_schedule: str | None = None) -> list[RateSchedule]:
    """One ``RateSchedule`` per device from a rate spec and an optional time variation."""
    if isinstance(rates_spec, str):
        text = rates_spec.strip()
        if not text:
            raise ValueError(f"rates {rates_spec!r}: use {'; '.join(RATE_FORMS)}")
        if _is_distribution(text):
            base = [RateSchedule([(0.0, r)]) for r in parse_rates(text, world_size, seed)]
        elif text.lower().endswith(".csv") or Path(text).is_file():
            base = _load_trace(Path(text), world_size)
        elif ":" in text:
            segments = _parse_piecewise(text)
            base = [RateSchedule(segments) for _ in range(world_size)]
        else:
            base = [RateSchedule([(0.0, r)]) for r in parse_rates(text, world_size, seed)]
    else:
        base = [RateSchedule([(0.0, r)]) for r in parse_rates(rates_spec, world_size, seed)]
    return apply_rate_schedule(base, rate_schedule)


def apply_rate_schedule(base: list[RateSchedule], rate_schedule: str | None) -> list[RateSchedule]:
    """Vary base schedules over time: ``constant``, ``rotate:SEC``, ``scale:T:F,T:F``."""
    if rate_schedule is None or rate_schedule.strip() in ("", "constant"):
        return base
    kind, _, arg = rate_schedule.strip().partition(":")
    if kind == "rotate":
        try:
            period_s = float(arg)
        except ValueError:
            period_s = float("nan")
        if not period_s > 0 or not np.isfinite(period_s):
            raise ValueError(f"rate schedule {rate_schedule!r}: rotate:SEC needs SEC > 0")
        if not all(s.is_constant and s.period_s is None for s in base):
            raise ValueError(f"rate schedule {rate_schedule!r}: rotate needs constant base "
                             f"rates (a list or a distribution), not piecewise or a trace")
        rates = [s.segments[0][1] for s in base]
        w = len(rates)
        return [RateSchedule([(j * period_s, rates[(r + j) % w]) for j in range(w)],
                             period_s=w * period_s) for r in range(w)]
    if kind == "scale":
        changes = []
        for item in arg.split(","):
            t, _, factor = item.partition(":")
            try:
                changes.append((float(t), float(factor)))
            except ValueError:
                changes = []
                break
        if not changes or any(t < 0 or f < 0 for t, f in changes):
            raise ValueError(f"rate schedule {rate_schedule!r}: scale:T:F,T:F needs times "
                             f"and factors >= 0")
        if any(s.period_s is not None for s in base):
            raise ValueError(f"rate schedule {rate_schedule!r}: cannot scale a periodic "
                             f"schedule")
        changes.sort()
        change_t = np.array([t for t, _ in changes])
        factors = np.array([f for _, f in changes])

        def factor_at(t: float) -> float:
            i = np.searchsorted(change_t, t, side="right") - 1
            return 1.0 if i < 0 else float(factors[i])

        scaled = []
        for s in base:
            starts = sorted({start for start, _ in s.segments} | set(change_t.tolist()))
            scaled.append(RateSchedule([(t, s.rate_at(t) * factor_at(t)) for t in starts]))
        return scaled
    raise ValueError(f"rate schedule {rate_schedule!r}: use one of "
                     f"{', '.join(RATE_SCHEDULE_FORMS)}")


# ---------------------------------------------------------------- arrivals

def check_arrivals(arrivals: str, rng: np.random.Generator | None) -> None:
    if arrivals not in ARRIVALS:
        raise ValueError(f"arrivals {arrivals!r}: use one of {', '.join(ARRIVALS)}")
    if arrivals == "poisson" and rng is None:
        raise ValueError("poisson arrivals need a seeded numpy Generator (rng)")


def count_blocks(arrivals: str, rng: np.random.Generator | None) -> Iterator[np.ndarray]:
    """Arrival points in count space (Lambda units), in blocks, forever: 0, 1, 2, ... for
    ``even``; a unit-rate Poisson process (cumulated Exp(1) gaps from ``rng``) for
    ``poisson``. Lambda^-1 of these points gives the arrival times."""
    check_arrivals(arrivals, rng)
    start = 0.0
    while True:
        if arrivals == "even":
            block = start + np.arange(_BLOCK, dtype=np.float64)
            start += _BLOCK
        else:
            block = start + np.cumsum(rng.standard_exponential(_BLOCK))
            start = float(block[-1])
        yield block


def arrival_times(schedule: RateSchedule, duration_s: float, arrivals: str = "even",
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Sorted arrival offsets (s) in [0, duration_s) for one device."""
    check_arrivals(arrivals, rng)
    if not duration_s >= 0:
        raise ValueError(f"duration_s {duration_s}: must be >= 0")
    if arrivals == "even":
        return schedule.time_of_count(np.arange(schedule.arrival_count(duration_s),
                                                dtype=np.float64))
    limit = schedule.count_limit(duration_s)
    points = []
    for block in count_blocks(arrivals, rng):
        points.append(block[block < limit])
        if block[-1] >= limit:
            break
    return schedule.time_of_count(np.concatenate(points))
