from headrace.api.v1 import features_pb2 as _features_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Arm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARM_UNSPECIFIED: _ClassVar[Arm]
    CHAMPION: _ClassVar[Arm]
    CHALLENGER: _ClassVar[Arm]

class ScoreSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORE_SOURCE_UNSPECIFIED: _ClassVar[ScoreSource]
    MODEL: _ClassVar[ScoreSource]
    COLDSTART_MODEL: _ClassVar[ScoreSource]
ARM_UNSPECIFIED: Arm
CHAMPION: Arm
CHALLENGER: Arm
SCORE_SOURCE_UNSPECIFIED: ScoreSource
MODEL: ScoreSource
COLDSTART_MODEL: ScoreSource

class Candidate(_message.Message):
    __slots__ = ("ad_id", "campaign_id", "bid_cpm")
    AD_ID_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_ID_FIELD_NUMBER: _ClassVar[int]
    BID_CPM_FIELD_NUMBER: _ClassVar[int]
    ad_id: str
    campaign_id: str
    bid_cpm: float
    def __init__(self, ad_id: _Optional[str] = ..., campaign_id: _Optional[str] = ..., bid_cpm: _Optional[float] = ...) -> None: ...

class ScoreContext(_message.Message):
    __slots__ = ("country", "device_type", "placement", "creative_type", "publisher_id", "ts_ms")
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    CREATIVE_TYPE_FIELD_NUMBER: _ClassVar[int]
    PUBLISHER_ID_FIELD_NUMBER: _ClassVar[int]
    TS_MS_FIELD_NUMBER: _ClassVar[int]
    country: str
    device_type: str
    placement: str
    creative_type: str
    publisher_id: str
    ts_ms: int
    def __init__(self, country: _Optional[str] = ..., device_type: _Optional[str] = ..., placement: _Optional[str] = ..., creative_type: _Optional[str] = ..., publisher_id: _Optional[str] = ..., ts_ms: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("user_id", "context", "candidates", "request_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    context: ScoreContext
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    request_id: str
    def __init__(self, user_id: _Optional[str] = ..., context: _Optional[_Union[ScoreContext, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("order", "ad_ids", "p_ctr", "ecpm", "tiers", "model_version", "source", "fallback_reason", "user_tier", "as_of_ms", "arm", "prediction_id")
    ORDER_FIELD_NUMBER: _ClassVar[int]
    AD_IDS_FIELD_NUMBER: _ClassVar[int]
    P_CTR_FIELD_NUMBER: _ClassVar[int]
    ECPM_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    USER_TIER_FIELD_NUMBER: _ClassVar[int]
    AS_OF_MS_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    order: _containers.RepeatedScalarFieldContainer[int]
    ad_ids: _containers.RepeatedScalarFieldContainer[str]
    p_ctr: _containers.RepeatedScalarFieldContainer[float]
    ecpm: _containers.RepeatedScalarFieldContainer[float]
    tiers: _containers.RepeatedScalarFieldContainer[_features_pb2.ColdStartTier]
    model_version: str
    source: ScoreSource
    fallback_reason: _features_pb2.FallbackReason
    user_tier: _features_pb2.ColdStartTier
    as_of_ms: int
    arm: Arm
    prediction_id: str
    def __init__(self, order: _Optional[_Iterable[int]] = ..., ad_ids: _Optional[_Iterable[str]] = ..., p_ctr: _Optional[_Iterable[float]] = ..., ecpm: _Optional[_Iterable[float]] = ..., tiers: _Optional[_Iterable[_Union[_features_pb2.ColdStartTier, str]]] = ..., model_version: _Optional[str] = ..., source: _Optional[_Union[ScoreSource, str]] = ..., fallback_reason: _Optional[_Union[_features_pb2.FallbackReason, str]] = ..., user_tier: _Optional[_Union[_features_pb2.ColdStartTier, str]] = ..., as_of_ms: _Optional[int] = ..., arm: _Optional[_Union[Arm, str]] = ..., prediction_id: _Optional[str] = ...) -> None: ...
