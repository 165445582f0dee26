from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AccountKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCOUNT_KIND_UNSPECIFIED: _ClassVar[AccountKind]
    ACCOUNT_KIND_LOCAL: _ClassVar[AccountKind]
    ACCOUNT_KIND_SERVICE: _ClassVar[AccountKind]
    ACCOUNT_KIND_NONE: _ClassVar[AccountKind]
ACCOUNT_KIND_UNSPECIFIED: AccountKind
ACCOUNT_KIND_LOCAL: AccountKind
ACCOUNT_KIND_SERVICE: AccountKind
ACCOUNT_KIND_NONE: AccountKind

class User(_message.Message):
    __slots__ = ("user_id", "org_id", "roles", "account_kind")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_KIND_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    org_id: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    account_kind: AccountKind
    def __init__(self, user_id: _Optional[str] = ..., org_id: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., account_kind: _Optional[_Union[AccountKind, str]] = ...) -> None: ...

class GetCurrentUserRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetCurrentUserResponse(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: User
    def __init__(self, user: _Optional[_Union[User, _Mapping]] = ...) -> None: ...
