"""Request fields, each declared once: its type, range, default and description. A task lists
its fields; the request validation (`read`) and the JSON schema of the OpenAPI document and of
BentoML's /schema.json (`schema`) are both generated from the declaration, so a default or a
limit cannot say one thing in the document and another in the server.

A limit is a number, the name of a setting (`"max_generate"`: read from the settings the
server runs with), or a function of the settings and the model (None while the document is
written without one)."""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.errors import ApiError, bool_field, int_field, shown, str_field

Limit = int | str | Callable[[Any, Any], int]  # a number, a setting's name, or f(settings, model)


def limit(value: Limit, s, model=None) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return getattr(s, value)
    return value(s, model)


@dataclass(frozen=True)
class Field:
    """One request field. `read` validates a value as the client sent it (JSON, or a form
    string) and gives the default when it is absent; `schema` is its JSON schema."""

    name: str
    description: str = ""
    default: Any = None
    file: bool = False  # an uploaded file (multipart), not a form or JSON field

    def read(self, value, s, model=None, name: str | None = None) -> Any:
        raise NotImplementedError

    def schema(self, s) -> dict:
        raise NotImplementedError

    def bare(self, s) -> dict:
        """The schema without the description (an array's items: the array says what they are)."""
        return {k: v for k, v in self.schema(s).items() if k != "description"}

    def _described(self, schema: dict) -> dict:
        if self.default is not None:
            schema["default"] = self.default
        if self.description:
            schema["description"] = self.description
        return schema


@dataclass(frozen=True)
class Integer(Field):
    """An integer in [minimum, maximum]; form strings are parsed, booleans refused."""

    minimum: Limit = 0
    maximum: Limit = 0
    nullable: bool = False  # null means "absent" (the default, or the task's own choice)

    def read(self, value, s, model=None, name=None):
        if value is None and self.default is None:
            return None  # optional without a default: the task decides (a random seed, a random digit)
        return int_field(
            value, name or self.name, limit(self.minimum, s, model), limit(self.maximum, s, model), self.default
        )

    def schema(self, s):
        out = {"type": "integer", "minimum": limit(self.minimum, s), "maximum": limit(self.maximum, s)}
        if self.nullable:
            out["nullable"] = True
        return self._described(out)


@dataclass(frozen=True)
class Boolean(Field):
    default: bool = False

    def read(self, value, s, model=None, name=None):
        return bool_field(value, name or self.name, self.default)

    def schema(self, s):
        return self._described({"type": "boolean"})


@dataclass(frozen=True)
class Choice(Field):
    """One of a few strings."""

    choices: tuple[str, ...] = ()

    def read(self, value, s, model=None, name=None):
        if value is None:
            return self.default
        if value not in self.choices:
            wanted = " or ".join(f"'{c}'" for c in self.choices)
            raise ApiError(400, f"{name or self.name} must be {wanted}, got {shown(value, 20)}", "bad_field")
        return value

    def schema(self, s):
        return self._described({"type": "string", "enum": list(self.choices)})


@dataclass(frozen=True)
class Text(Field):
    """A text: a string of at most `max_chars` characters (413 naming the limit) holding
    something besides whitespace."""

    max_chars: Limit = "max_text_chars"

    def read(self, value, s, model=None, name=None):
        label, most = name or self.name, limit(self.max_chars, s, model)
        str_field(value, label)
        if len(value) > most:
            raise ApiError(413, f"{label} is {len(value)} characters; the limit is {most}", "text_too_long", limit=most)
        if not value.strip():
            raise ApiError(400, f"{label} is empty or only whitespace", "empty_text")
        return value

    def schema(self, s):
        return self._described(
            {"type": "string", "minLength": 1, "maxLength": limit(self.max_chars, s), "pattern": r"\S"}
        )


@dataclass(frozen=True)
class Texts(Field):
    """A list of 1 to `max_items` texts, each read as `item` reads one."""

    item: Text = Text("text")
    max_items: Limit = "max_texts"

    def read(self, value, s, model=None, name=None):
        most = limit(self.max_items, s, model)
        if not isinstance(value, list) or not 1 <= len(value) <= most:
            raise ApiError(400, f"{name or self.name} must be a list of 1 to {most} strings", "bad_field")
        return [self.item.read(v, s, model, f"{name or self.name}[{i}]") for i, v in enumerate(value)]

    def schema(self, s):
        return self._described(
            {"type": "array", "minItems": 1, "maxItems": limit(self.max_items, s), "items": self.item.bare(s)}
        )


@dataclass(frozen=True)
class Point(Field):
    """A JSON object of integer fields, any of them absent (`read` gives only those sent)."""

    parts: tuple[Integer, ...] = ()
    example: str = ""  # how the message shows a valid object

    def read(self, value, s, model=None, name=None):
        label = name or self.name
        known = {p.name: p for p in self.parts}
        if not isinstance(value, dict) or not set(value) <= set(known):
            raise ApiError(400, f"{label} must be an object like {self.example}", "bad_field")
        return {k: known[k].read(v, s, model, f"{label}.{k}") for k, v in value.items()}

    def schema(self, s):
        props = {p.name: p.schema(s) for p in self.parts}
        return self._described({"type": "object", "additionalProperties": False, "properties": props})


@dataclass(frozen=True)
class Code(Field):
    """A base64 string that must decode to exactly `size(model)` bytes."""

    size: Callable[[Any], int] = lambda model: 0
    hint: str = ""  # where a valid code comes from

    def read(self, value, s, model=None, name=None):
        label = name or self.name
        if not isinstance(value, str):
            raise ApiError(400, f"{label} must be a base64 string ({self.hint})", "bad_field")
        n = self.size(model)
        if len(value) > 4 * n:
            raise ApiError(
                400,
                f"{label} is too long: a {label} is {n} bytes ({4 * math.ceil(n / 3)} base64 characters)",
                "bad_code",
            )
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{label} is not valid base64", "bad_code") from None
        if len(raw) != n:
            raise ApiError(400, f"{label} must decode to exactly {n} bytes, got {len(raw)}", "bad_code")
        return raw

    def schema(self, s):
        return self._described({"type": "string", "format": "byte"})


@dataclass(frozen=True)
class Images(Field):
    """Uploaded image files (multipart field `image`): one, or 1 to `max_items`."""

    many: bool = False
    max_items: Limit = "max_images"
    file: bool = True

    def read(self, files: list[bytes], s, model=None, name=None) -> list[bytes]:
        if not files:
            raise ApiError(400, f"no file field '{self.name}' in the form", "missing_image")
        if not self.many and len(files) != 1:
            raise ApiError(400, f"send exactly one image, got {len(files)}", "bad_field")
        return files

    def schema(self, s):
        one = {"type": "string", "format": "binary", "description": self.description}
        if not self.many:
            return one
        return {"type": "array", "items": one, "minItems": 1, "maxItems": limit(self.max_items, s)}


@dataclass(frozen=True)
class Fields:
    """A task's request fields, in the order the document lists them; `required` ones must be
    sent (the text task's "one of text or texts" is its own rule)."""

    declared: tuple[Field, ...] = ()
    required: tuple[str, ...] = ()
    by_name: dict[str, Field] = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "by_name", {f.name: f for f in self.declared})

    def __getitem__(self, name: str) -> Field:
        return self.by_name[name]

    def names(self) -> frozenset[str]:
        """The body fields besides files (a multipart or JSON field of another name is unknown)."""
        return frozenset(f.name for f in self.declared if not f.file)

    def read(self, payload: dict, s, model=None, *names: str) -> list[Any]:
        """The named fields of a request, validated, defaults filled in."""
        return [self.by_name[n].read(payload.get(n), s, model) for n in names]

    def properties(self, s) -> tuple[dict, list[str]]:
        """JSON-schema properties and the required names (service.openapi)."""
        return {f.name: f.schema(s) for f in self.declared}, list(self.required)


# Fields several tasks take, declared once here
IMAGE_DESCRIPTION = "PNG, JPEG, GIF, BMP, WebP or TIFF; grey or colour; any size up to the pixel limits"
RETURN_INPUT = Boolean(
    "return_input",
    "also answer the 28×28 image the model received (after framing), as a base64 PNG (`input_png`)",
)
REJECT_OOD = Boolean(
    "reject_ood",
    "answer 422 instead of labels when any input looks unlike the training data",
)


def top_k(default: int) -> Integer:
    """How many of the most probable classes an answer lists."""
    return Integer(
        "top_k", "how many of the most probable classes each answer lists", default=default, minimum=1, maximum=10
    )
