"""The gradient exchange: every ``.grad`` becomes sum_i w_i grad_i, dense or compressed.

The training loop calls ``make_exchanger(comm, settings)`` once and then, after every
backward, ``exchanger.exchange(named_params, weight, step, epoch=...)``:

- ``none``: ``dense.DenseExchanger``, the weighted sum-allreduce of flat buckets;
- ``static``: the compressor every step (``sparse.SparseExchanger``);
- ``adaptive``: compressed or dense, chosen each step by a vote of all ranks on a
  compression signal (``scadles/compress/adaptive.py``).

Both exchangers have one interface: ``exchange`` replaces every ``.grad`` with the
aggregate and returns the step's stats (the metrics row's ``compressed``, ``ratio``,
``signal``, ``bytes_sent``, ``floats_sent``, ``compress_s``, and ``votes`` in adaptive
mode); ``summary()`` is the run's ``ExchangeSummary``; ``state_dict()`` /
``load_state_dict()`` carry the counters (and, compressed, the settings, residuals and
signal state) across a resume.

One idea per file: ``settings.py`` (what the exchange does: frozen, validated, described),
``stats.py`` (what it has done: counters and the run summary), ``dense.py`` and
``sparse.py`` (the two exchanges). What a compressed step sends (the compressor contract,
the compressors, error feedback, the signals and the vote) is ``scadles/compress/``.
"""
from __future__ import annotations

import logging

from scadles.compress import make_compressor
from scadles.exchange.dense import DenseExchanger, GradBuckets, weighted_allreduce_
from scadles.exchange.settings import MODES, ExchangeSettings
from scadles.exchange.sparse import SparseExchanger
from scadles.exchange.stats import ExchangeStats, ExchangeSummary

log = logging.getLogger(__name__)


def make_exchanger(comm, settings: ExchangeSettings | None = None, *,
                   bucket_cap_mb: float = 25.0, **fields) -> DenseExchanger | SparseExchanger:
    """The gradient exchanger for ``settings``, or for the ``ExchangeSettings`` built from
    ``fields`` (``compression="static", compression_ratio=0.1``; by default, dense).

    All settings are validated whatever the mode, and logged once (rank 0).
    """
    if settings is None:
        settings = ExchangeSettings(**fields)
    elif fields:
        raise TypeError(f"make_exchanger takes settings or their fields, not both "
                        f"(got {', '.join(sorted(fields))} too)")
    if comm.rank == 0:
        log.info(settings.describe())
    if not settings.compresses:
        return DenseExchanger(comm, bucket_cap_mb=bucket_cap_mb)
    return SparseExchanger(comm, settings,
                           make_compressor(settings.compressor, settings.compression_ratio),
                           bucket_cap_mb=bucket_cap_mb)


__all__ = ["MODES", "DenseExchanger", "ExchangeSettings", "ExchangeStats", "ExchangeSummary",
           "GradBuckets", "SparseExchanger", "make_exchanger", "weighted_allreduce_"]
