from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeatureStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEATURE_STATUS_UNSPECIFIED: _ClassVar[FeatureStatus]
    PRESENT: _ClassVar[FeatureStatus]
    DEFAULT: _ClassVar[FeatureStatus]
    STALE: _ClassVar[FeatureStatus]
    FALLBACK: _ClassVar[FeatureStatus]

class ColdStartTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COLD_START_TIER_UNSPECIFIED: _ClassVar[ColdStartTier]
    PERSONALIZED: _ClassVar[ColdStartTier]
    BLENDED: _ClassVar[ColdStartTier]
    SEGMENT: _ClassVar[ColdStartTier]
    GLOBAL: _ClassVar[ColdStartTier]

class FallbackReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NONE: _ClassVar[FallbackReason]
    REDIS_ERROR: _ClassVar[FallbackReason]
    BUDGET_EXCEEDED: _ClassVar[FallbackReason]
    BREAKER_OPEN: _ClassVar[FallbackReason]
    CORRUPT_STATE: _ClassVar[FallbackReason]
FEATURE_STATUS_UNSPECIFIED: FeatureStatus
PRESENT: FeatureStatus
DEFAULT: FeatureStatus
STALE: FeatureStatus
FALLBACK: FeatureStatus
COLD_START_TIER_UNSPECIFIED: ColdStartTier
PERSONALIZED: ColdStartTier
BLENDED: ColdStartTier
SEGMENT: ColdStartTier
GLOBAL: ColdStartTier
NONE: FallbackReason
REDIS_ERROR: FallbackReason
BUDGET_EXCEEDED: FallbackReason
BREAKER_OPEN: FallbackReason
CORRUPT_STATE: FallbackReason

class RequestContext(_message.Message):
    __slots__ = ("country", "device_type")
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    country: str
    device_type: str
    def __init__(self, country: _Optional[str] = ..., device_type: _Optional[str] = ...) -> None: ...

class FeatureNames(_message.Message):
    __slots__ = ("names",)
    NAMES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ...) -> None: ...

class GetOnlineFeaturesRequest(_message.Message):
    __slots__ = ("entity_type", "ids", "feature_names", "feature_set", "as_of_ms", "context")
    ENTITY_TYPE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SET_FIELD_NUMBER: _ClassVar[int]
    AS_OF_MS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    entity_type: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    feature_names: FeatureNames
    feature_set: str
    as_of_ms: int
    context: RequestContext
    def __init__(self, entity_type: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., feature_names: _Optional[_Union[FeatureNames, _Mapping]] = ..., feature_set: _Optional[str] = ..., as_of_ms: _Optional[int] = ..., context: _Optional[_Union[RequestContext, _Mapping]] = ...) -> None: ...

class GetOnlineFeaturesResponse(_message.Message):
    __slots__ = ("feature_names", "ids", "tiers", "values", "is_null", "statuses", "as_of_ms", "fallback_reason")
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    IS_NULL_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    AS_OF_MS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    ids: _containers.RepeatedScalarFieldContainer[str]
    tiers: _containers.RepeatedScalarFieldContainer[ColdStartTier]
    values: _containers.RepeatedScalarFieldContainer[float]
    is_null: _containers.RepeatedScalarFieldContainer[bool]
    statuses: _containers.RepeatedScalarFieldContainer[FeatureStatus]
    as_of_ms: int
    fallback_reason: FallbackReason
    def __init__(self, feature_names: _Optional[_Iterable[str]] = ..., ids: _Optional[_Iterable[str]] = ..., tiers: _Optional[_Iterable[_Union[ColdStartTier, str]]] = ..., values: _Optional[_Iterable[float]] = ..., is_null: _Optional[_Iterable[bool]] = ..., statuses: _Optional[_Iterable[_Union[FeatureStatus, str]]] = ..., as_of_ms: _Optional[int] = ..., fallback_reason: _Optional[_Union[FallbackReason, str]] = ...) -> None: ...
