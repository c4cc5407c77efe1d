"""An example user definitions module, written as a Headrace user would, with the
matching hand-written oracle specs.

``--definitions tests.user_views:VIEWS`` (or ``HEADRACE_DEFINITIONS``) runs the three
views below alone; ``tests.user_views:ALL_VIEWS`` runs them beside the shipped set.

* ``publisher_clicks``: keyed by publisher, reads only ``clicks``: click counts over 1h
  and 24h sliding windows.
* ``ad_bids``: keyed by ad, reads only ``impressions``: SUM/MEAN/MIN/MAX/LAST of
  ``bid_cpm`` and an impression count over a tumbling 1h and a lifetime window, spend
  per impression over the tumbling hour; declared online TTL 3 days.
* ``user_spend``: keyed by user, reads both topics, allowed lateness 5 s (the shipped
  views allow 60 s): spend over 1h, last bid and distinct publishers over 24h, clicks
  over 10 min, click rate over the tumbling day.

``SPECS`` / ``ALL_SPECS`` describe the same views as plain data for
:mod:`tests.oracle_views`. They are written by hand from the definitions' *meaning*,
never derived from the objects, so a wrong name, window or TTL in either shows up as a
difference.
"""

from __future__ import annotations

from datetime import timedelta

from feature_defs.model import AggOp, Feature, FeatureView, Measure, Source
from feature_defs.standard import AD, PUBLISHER, USER
from feature_defs.standard import VIEWS as STANDARD
from feature_defs.windows import lifetime, sliding, tumbling
from tests import oracle_views as ov
from tests.oracle import DAY, HOUR, MINUTE, SECOND

__all__ = ["VIEWS", "ALL_VIEWS", "SPECS", "ALL_SPECS"]

_M, _H, _D = timedelta(minutes=1), timedelta(hours=1), timedelta(days=1)
IMPRESSIONS = Source("impressions", "impression")
CLICKS = Source("clicks", "click")

PUBLISHER_CLICKS = FeatureView(
    name="publisher_clicks",
    entity=PUBLISHER,
    sources=(CLICKS,),
    features=(Feature("clicks", (sliding(_H, _M), sliding(24 * _H, 15 * _M)),
                      measure=Measure(AggOp.COUNT, "clicks"), default=0),),
    description="clicks per publisher (reads only the clicks topic)",
)

_BID_WINDOWS = (tumbling(_H), lifetime())


def _bid(name: str, op: AggOp, default: float | None = None) -> Feature:
    return Feature(name, _BID_WINDOWS, measure=Measure(op, "impressions", "bid_cpm"),
                   default=default)


AD_BIDS = FeatureView(
    name="ad_bids",
    entity=AD,
    sources=(IMPRESSIONS,),
    features=(
        Feature("imps", _BID_WINDOWS, measure=Measure(AggOp.COUNT, "impressions"), default=0),
        _bid("bid_sum", AggOp.SUM, 0.0),
        _bid("bid_mean", AggOp.MEAN),
        _bid("bid_min", AggOp.MIN),
        _bid("bid_max", AggOp.MAX),
        _bid("bid_last", AggOp.LAST),
        Feature("spend_per_imp", (tumbling(_H),),
                ratio=(Measure(AggOp.SUM, "impressions", "bid_cpm"),
                       Measure(AggOp.COUNT, "impressions"))),
    ),
    online_ttl=timedelta(days=3),
    description="bid statistics per ad (reads only the impressions topic)",
)

USER_SPEND = FeatureView(
    name="user_spend",
    entity=USER,
    sources=(IMPRESSIONS, CLICKS),
    features=(
        Feature("spend", (sliding(_H, 5 * _M),),
                measure=Measure(AggOp.SUM, "impressions", "bid_cpm"), default=0.0),
        Feature("last_bid", (sliding(24 * _H, _H),),
                measure=Measure(AggOp.LAST, "impressions", "bid_cpm")),
        Feature("publishers", (sliding(24 * _H, _H),),
                measure=Measure(AggOp.APPROX_DISTINCT, "impressions", "publisher_id"),
                default=0),
        Feature("clicks", (sliding(10 * _M, _M),), measure=Measure(AggOp.COUNT, "clicks"),
                default=0),
        Feature("click_rate", (tumbling(_D),),
                ratio=(Measure(AggOp.COUNT, "clicks"), Measure(AggOp.COUNT, "impressions"))),
    ),
    allowed_lateness=timedelta(seconds=5),
    description="per-user spend, with a tighter lateness than the shipped views",
)

VIEWS = (PUBLISHER_CLICKS, AD_BIDS, USER_SPEND)
ALL_VIEWS = (*STANDARD, *VIEWS)

# --------------------------------------------------------------------------- oracle specs
_IMP, _CLK = "impression", "click"
_T1H, _LIFE = ov.tumbling(HOUR), ov.LIFETIME


def _bids(op: str, stem: str, default: object = ov.UNSET) -> tuple[ov.Feature, ...]:
    return (ov.feature(f"ad__{stem}_1h", op, _IMP, "bid_cpm", _T1H, default),
            ov.feature(f"ad__{stem}_lifetime", op, _IMP, "bid_cpm", _LIFE, default))


SPECS = (
    ov.View("publisher_clicks", "publisher_id", (_CLK,), (
        ov.feature("publisher__clicks_1h", "count", _CLK, None, ov.sliding(HOUR, MINUTE), 0),
        ov.feature("publisher__clicks_24h", "count", _CLK, None,
                   ov.sliding(24 * HOUR, 15 * MINUTE), 0),
    )),
    ov.View("ad_bids", "ad_id", (_IMP,), (
        ov.feature("ad__imps_1h", "count", _IMP, None, _T1H, 0),
        ov.feature("ad__imps_lifetime", "count", _IMP, None, _LIFE, 0),
        *_bids("sum", "bid_sum", 0.0),
        *_bids("mean", "bid_mean", None),
        *_bids("min", "bid_min", None),
        *_bids("max", "bid_max", None),
        *_bids("last", "bid_last", None),
        ov.ratio("ad__spend_per_imp_1h", ov.Measure("sum", _IMP, "bid_cpm"),
                 ov.Measure("count", _IMP), _T1H, None),
    ), ttl_ms=3 * DAY),
    ov.View("user_spend", "user_id", (_IMP, _CLK), (
        ov.feature("user__spend_1h", "sum", _IMP, "bid_cpm", ov.sliding(HOUR, 5 * MINUTE), 0.0),
        ov.feature("user__last_bid_24h", "last", _IMP, "bid_cpm", ov.sliding(24 * HOUR, HOUR),
                   None),
        ov.feature("user__publishers_24h", "approx_distinct", _IMP, "publisher_id",
                   ov.sliding(24 * HOUR, HOUR), 0),
        ov.feature("user__clicks_10m", "count", _CLK, None, ov.sliding(10 * MINUTE, MINUTE), 0),
        ov.ratio("user__click_rate_24h", ov.Measure("count", _CLK), ov.Measure("count", _IMP),
                 ov.tumbling(DAY), None),
    ), lateness_ms=5 * SECOND),
)
ALL_SPECS = (*ov.STANDARD_VIEWS, *SPECS)
