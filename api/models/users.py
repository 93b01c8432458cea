"""`POST /api/auth` and `/api/users` bodies: credentials and per-survey permissions."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from api.models.base import (
    Model,
    required,
)
from api.responses import BadRequest
from kowalski.surveys import SURVEYS

# ------------------------------------------------------------------ route bodies


MAX_PASSWORD_BYTES = 72  # bcrypt reads no further (bcrypt 5 refuses longer ones)


def check_password_length(password: str) -> None:
    """A password bcrypt can hash, or a 400 saying why not."""
    if len(password.encode()) > MAX_PASSWORD_BYTES:
        raise BadRequest(f"password is longer than {MAX_PASSWORD_BYTES} bytes (bcrypt's limit)")


class AuthRequest(Model):
    """`POST /api/auth`: username and password (penquins adds its version)."""

    username: Annotated[str, WithJsonSchema({"type": "string"})] = required()
    password: Annotated[str, WithJsonSchema({"type": "string"})] = required()
    penquins_version: Any = Field(default=None, alias="penquins.__version__")

    @field_validator("username", "password", mode="before")
    @classmethod
    def _given(cls, value: Any, info: ValidationInfo) -> str:
        if not value or not isinstance(value, str):
            raise BadRequest(f"missing {info.field_name}")
        return value


# every programid any survey of the registry has (ZTF's 0..3)
PROGRAMIDS = sorted({p for survey in SURVEYS.values() for p in survey.programids})


def permissions(value: Any) -> dict[str, list[int]]:
    """`{"ZTF": [1, 2]}`: survey -> programids this user may see."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest('permissions must be an object like {"ZTF": [1, 2]}')
    out: dict[str, list[int]] = {}
    for survey, ids in value.items():
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i in PROGRAMIDS for i in ids
        ):
            raise BadRequest(f"permissions.{survey} must be a list of programids in {PROGRAMIDS}")
        out[str(survey)] = sorted(set(ids))
    return out


Permissions = Annotated[
    dict[str, list[int]],
    BeforeValidator(permissions),
    WithJsonSchema(
        {
            "type": "object",
            "description": 'programids per survey, e.g. {"ZTF": [1, 2]}',
            "additionalProperties": {
                "type": "array",
                "items": {"type": "integer", "enum": PROGRAMIDS},
            },
        }
    ),
]
Flag = Annotated[bool, BeforeValidator(bool), WithJsonSchema({"type": "boolean"})]


class UserCreate(Model):
    """`POST /api/users` (admin)."""

    username: str
    password: str
    email: Annotated[Any, WithJsonSchema({"type": "string"})] = None
    permissions: Permissions = Field(default=None, validate_default=True)
    admin: Flag = False

    @model_validator(mode="before")
    @classmethod
    def _credentials(cls, data: Any) -> Any:
        given = data if isinstance(data, dict) else {}
        username, password = given.get("username"), given.get("password")
        if (
            not isinstance(username, str)
            or not username
            or not isinstance(password, str)
            or not password
        ):
            raise BadRequest("username and password must be set")
        check_password_length(password)
        return data


class UserUpdate(Model):
    """`PUT /api/users/{username}` (admin): only the keys given change."""

    username: Annotated[Any, WithJsonSchema({"type": "string", "description": "new name"})] = None
    password: Annotated[Any, WithJsonSchema({"type": "string"})] = None
    email: Annotated[Any, WithJsonSchema({"type": "string"})] = None
    permissions: Permissions = Field(default_factory=dict)
    admin: Flag = False

    @field_validator("password", mode="before")
    @classmethod
    def _password(cls, value: Any) -> Any:
        if isinstance(value, str):
            check_password_length(value)
        return value
