"""Validation of a ``ScoreRequest``: the checked, deduplicated input of one ``Score`` call.

:func:`parse_score_request` checks every field a malformed request could get wrong and
raises :class:`~headrace.core.errors.InvalidArgument` naming the first bad one
(``candidates[3].bid_cpm``, ``context.publisher_id``, ...; the server interceptor turns
it into INVALID_ARGUMENT). A field this server does not know (a newer client) is an
error too, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.unknown_fields import UnknownFieldSet

from feature_defs.coldstart import Segment
from feature_defs.layout import entity_id_problem
from headrace.api.v1 import scoring_pb2 as spb
from headrace.core.errors import InvalidArgument

__all__ = ["MAX_CANDIDATES", "MAX_BID_CPM", "CONTEXT_FIELDS", "ScoreInput",
           "parse_score_request"]

#: the default limit of candidates per request
MAX_CANDIDATES = 200
#: the default highest accepted ``bid_cpm`` (CPM, the currency unit per 1,000
#: impressions); ``HEADRACE_MAX_BID_CPM`` of :class:`~headrace.core.settings.ServeSettings`
MAX_BID_CPM = 10_000.0
#: the request context's categoricals, as the cold-start model reads them
CONTEXT_FIELDS = ("country", "device_type", "placement", "creative_type", "publisher_id")


@dataclass(frozen=True)
class ScoreInput:
    """A validated request.

    Attributes:
        user_id: the user, None when anonymous.
        publisher_id: the context's publisher, None when absent.
        ad_ids: every candidate's ad id, in request order.
        ads: the distinct ad ids, first-seen order.
        ad_index: per candidate, the position of its ad among ``ads``.
        campaign_ids: every candidate's campaign id, in request order.
        campaigns: the distinct campaign ids, first-seen order.
        campaign_index: per candidate, the position of its campaign among ``campaigns``.
        bids: per candidate, the bid in CPM (finite, 0 <= bid <= the cap).
        as_of_ms: the request time (``context.ts_ms``, else the server clock), epoch ms.
        context: the cold-start model's row: ``ts`` plus the categoricals (None = unknown).
        segment: (country, device_type) when both are given, else None.
        request_id: the caller's request id, None when unset.
    """

    user_id: str | None
    publisher_id: str | None
    ad_ids: list[str]
    ads: list[str]
    ad_index: np.ndarray
    campaign_ids: list[str]
    campaigns: list[str]
    campaign_index: np.ndarray
    bids: np.ndarray
    as_of_ms: int
    context: dict[str, Any]
    segment: Segment | None
    request_id: str | None = None


def _unknown(msg: Any, where: str) -> None:
    fields = UnknownFieldSet(msg)
    if len(fields):
        raise InvalidArgument(where, f"unknown field number {fields[0].field_number} "
                                     "(a newer client? this server does not know it)")


def _distinct(values: Sequence[str], field: str) -> tuple[list[str], np.ndarray]:
    """Distinct valid ids and each value's index among them (InvalidArgument if bad)."""
    seen: dict[str, int] = {}
    index = np.array([seen.setdefault(v, len(seen)) for v in values], dtype=np.intp)
    for value in seen:
        problem = entity_id_problem(value)
        if problem is not None:
            raise InvalidArgument(f"candidates[{values.index(value)}].{field}", problem)
    return list(seen), index


def parse_score_request(request: spb.ScoreRequest, *, max_candidates: int,
                        clock_ms: Callable[[], int],
                        max_bid_cpm: float = MAX_BID_CPM) -> ScoreInput:
    """Validate ``request``.

    Args:
        request: the request as received.
        max_candidates: most candidates allowed.
        clock_ms: epoch milliseconds, the request time when ``context.ts_ms`` is unset.
        max_bid_cpm: highest accepted bid in CPM (a larger one is a client bug, and
            eCPM = pCTR x bid x 1000 must stay finite).

    Returns:
        The validated input.

    Raises:
        InvalidArgument: naming the first bad field (no candidates or too many, a bad
            id or ``request_id``, a bid that is not a finite number in [0,
            ``max_bid_cpm``], a negative ``context.ts_ms``, an unknown field).
    """
    _unknown(request, "request")
    ctx = request.context
    _unknown(ctx, "context")
    cands = request.candidates
    n = len(cands)
    if n == 0:
        raise InvalidArgument("candidates", "must not be empty")
    if n > max_candidates:
        raise InvalidArgument("candidates", f"{n} candidates exceed the limit of "
                                            f"{max_candidates}")
    for i, cand in enumerate(cands):
        _unknown(cand, f"candidates[{i}]")
    ads = [c.ad_id for c in cands]
    distinct_ads, ad_index = _distinct(ads, "ad_id")
    campaign_ids = [c.campaign_id for c in cands]
    distinct_campaigns, campaign_index = _distinct(campaign_ids, "campaign_id")
    bids = np.array([c.bid_cpm for c in cands], dtype=np.float64)
    bad = ~(np.isfinite(bids) & (bids >= 0.0) & (bids <= max_bid_cpm))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidArgument(f"candidates[{i}].bid_cpm",
                              f"must be a finite number from 0 to {max_bid_cpm:g} (CPM), "
                              f"got {float(bids[i])}")
    user = request.user_id or None
    if user is not None and (problem := entity_id_problem(user)) is not None:
        raise InvalidArgument("user_id", problem)
    publisher = ctx.publisher_id or None
    if publisher is not None and (problem := entity_id_problem(publisher)) is not None:
        raise InvalidArgument("context.publisher_id", problem)
    request_id = None
    if request.HasField("request_id"):
        request_id = request.request_id
        if (problem := entity_id_problem(request_id)) is not None:
            raise InvalidArgument("request_id", problem)
    if ctx.HasField("ts_ms"):
        if ctx.ts_ms < 0:
            raise InvalidArgument("context.ts_ms", "must be >= 0 (epoch milliseconds)")
        as_of = ctx.ts_ms
    else:
        as_of = clock_ms()
    row: dict[str, Any] = {name: getattr(ctx, name) or None for name in CONTEXT_FIELDS}
    segment = (ctx.country, ctx.device_type) if ctx.country and ctx.device_type else None
    return ScoreInput(user, publisher, ads, distinct_ads, ad_index, campaign_ids,
                      distinct_campaigns, campaign_index, bids, as_of, {**row, "ts": as_of},
                      segment, request_id)
