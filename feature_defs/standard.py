"""The standard ads feature set.

Allowed lateness 60 s; online TTL of each view = its longest window + 1 day; defaults 0
for counts and distinct counts, null for ratios.

* user: impressions, clicks over 5m (5 s tiles), 1h (1 min), 24h (15 min), 7d (1 h);
  ctr over 1h, 24h, 7d; approximate distinct ads over 24h.
* ad: impressions, clicks, ctr over 1h (1 min tiles) and 24h (15 min tiles).
* campaign: ctr over 24h (15 min tiles). publisher: ctr over 24h (15 min tiles).
"""

from __future__ import annotations

from datetime import timedelta

from feature_defs.model import AggOp, Entity, Feature, FeatureView, Measure, Source
from feature_defs.windows import sliding

__all__ = ["USER", "AD", "CAMPAIGN", "PUBLISHER", "ENTITIES", "VIEWS", "SOURCES"]

USER = Entity("user", "user_id", "an ad viewer; anonymous traffic has no user_id")
AD = Entity("ad", "ad_id", "a creative")
CAMPAIGN = Entity("campaign", "campaign_id", "a group of ads")
PUBLISHER = Entity("publisher", "publisher_id", "a site or app")
ENTITIES = (USER, AD, CAMPAIGN, PUBLISHER)

SOURCES = (Source("impressions", "impression"), Source("clicks", "click"))

_S, _M, _H, _D = timedelta(seconds=1), timedelta(minutes=1), timedelta(hours=1), timedelta(days=1)
W5M = sliding(5 * _M, 5 * _S)
W1H = sliding(_H, _M)
W24H = sliding(24 * _H, 15 * _M)
W7D = sliding(7 * _D, _H)

IMPS = Measure(AggOp.COUNT, "impressions")
CLICKS = Measure(AggOp.COUNT, "clicks")
LATENESS = timedelta(seconds=60)


def _counts_and_ctr(
    count_windows: tuple, ctr_windows: tuple, with_counts: bool = True
) -> tuple[Feature, ...]:
    feats: list[Feature] = []
    if with_counts:
        feats.append(Feature("impressions", count_windows, measure=IMPS, default=0,
                             description="impressions served"))
        feats.append(Feature("clicks", count_windows, measure=CLICKS, default=0,
                             description="clicks"))
    feats.append(Feature("ctr", ctr_windows, ratio=(CLICKS, IMPS), default=None,
                         description="clicks / impressions; null without impressions"))
    return tuple(feats)


USER_ACTIVITY = FeatureView(
    name="user_activity",
    entity=USER,
    sources=SOURCES,
    features=_counts_and_ctr((W5M, W1H, W24H, W7D), (W1H, W24H, W7D))
    + (
        Feature("distinct_ads", (W24H,), measure=Measure(AggOp.APPROX_DISTINCT, "impressions",
                                                         "ad_id"),
                default=0, description="approximate distinct ads shown"),
    ),
    allowed_lateness=LATENESS,
    description="per-user engagement",
)
AD_ACTIVITY = FeatureView(
    name="ad_activity", entity=AD, sources=SOURCES,
    features=_counts_and_ctr((W1H, W24H), (W1H, W24H)), allowed_lateness=LATENESS,
)
CAMPAIGN_ACTIVITY = FeatureView(
    name="campaign_activity", entity=CAMPAIGN, sources=SOURCES,
    features=_counts_and_ctr((), (W24H,), with_counts=False), allowed_lateness=LATENESS,
)
PUBLISHER_ACTIVITY = FeatureView(
    name="publisher_activity", entity=PUBLISHER, sources=SOURCES,
    features=_counts_and_ctr((), (W24H,), with_counts=False), allowed_lateness=LATENESS,
)
VIEWS = (USER_ACTIVITY, AD_ACTIVITY, CAMPAIGN_ACTIVITY, PUBLISHER_ACTIVITY)
