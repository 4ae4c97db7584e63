"""The result records the tools write as JSON and ``lowshot report`` reads back (layer 1).

One dataclass per file kind, each with ``to_dict()`` (exactly the JSON on disk) and a strict
``from_dict(data, where)`` that raises a DataError naming the file (``where``) and the key of a
malformed record, so no reader has to guess at keys:

==========================  ==============================  =========================================
file                        written by                      dataclass
==========================  ==============================  =========================================
``eval*.json``              ``lowshot eval`` (checkpoint:   :class:`EvalResult` (+ :class:`FewShotAccuracy`)
                            ``fewshot.cli.run_eval``;
                            ``--features``:
                            ``fewshot.feature_files``)
``result.json``             ``lowshot sweep`` (one point)   :class:`SweepPoint` (+ :class:`PhiSplit`)
``sweep.json``              ``lowshot sweep``               :class:`SweepSummary`
``analysis.json``           ``lowshot analyze``             :class:`PhiAnalysis`
``decouple_<method>.json``  ``lowshot decouple``            :class:`DecoupleResult` (+ :class:`LongTailMetrics`)
``generalized*.json``       ``lowshot eval --generalized``  ``lowshot.fewshot.generalized.GeneralizedReport``
==========================  ==============================  =========================================

Also the novel-class protocols of sweeps (``5x1``, ``20x1@alphabet``): :func:`parse_protocol`.
"""
from __future__ import annotations

from .fewshot import EvalResult, FewShotAccuracy, PhiAnalysis, PhiSplit
from .longtail import DecoupleResult, LongTailMetrics
from .protocols import SEED_KEY, Protocol, fewshot_items, format_value, parse_protocol, point_name
from .sweep import SweepPoint, SweepSummary

__all__ = ["SEED_KEY", "DecoupleResult", "EvalResult", "FewShotAccuracy", "LongTailMetrics", "PhiAnalysis", "PhiSplit",
           "Protocol", "SweepPoint", "SweepSummary", "fewshot_items", "format_value", "parse_protocol", "point_name"]
