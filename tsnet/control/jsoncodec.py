"""A small JSON codec for dataclasses that mirror Go structs.

Each dataclass field carries its JSON name in ``metadata["json"]`` (use :func:`jfield`).
Decoding follows Go's ``encoding/json``: names match case-insensitively, unknown
names are ignored (or kept in a field marked ``extra``), ``null`` gives ``None``.
Encoding omits fields whose value is ``None``; everything else is written, so an
empty tuple is sent as ``[]`` (which matters for e.g. ``PacketFilter``).

Supported field types: ``str``, ``int``, ``float``, ``bool``, :mod:`tsnet.key`
key classes (typed text form), ``datetime`` (RFC 3339, always with a zone),
``tuple[X, ...]`` (JSON arrays), ``dict[str, X]`` and ``dict[int, X]`` (decimal
string keys), nested dataclasses, ``X | None`` and ``Any`` (raw JSON).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import re
import types
import typing
from collections.abc import Callable
from typing import Any

from ..key import _Key

__all__ = ["DecodeError", "jfield", "extra_field", "to_json", "from_json", "format_time", "parse_time"]


class DecodeError(ValueError):
    """A JSON value does not fit the expected type."""


def jfield(json_name: str, default: Any = None) -> Any:
    """A dataclass field serialised under ``json_name`` (default ``None`` = omitted)."""
    return dataclasses.field(default=default, metadata={"json": json_name})


def extra_field() -> Any:
    """A ``dict`` field that collects unknown JSON members and writes them back out."""
    return dataclasses.field(default=None, metadata={"extra": True}, compare=False)


_TIME_RE = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})$"
)


def parse_time(text: str) -> _dt.datetime:
    """Parse RFC 3339 as Go writes it (any fraction length, zone mandatory)."""
    m = _TIME_RE.match(text)
    if not m:
        raise DecodeError(f"not an RFC 3339 time with zone: {text!r}")
    date, clock, frac, zone = m.groups()
    micro = (frac or "0")[:6].ljust(6, "0")
    zone = "+00:00" if zone in ("Z", "z") else zone
    try:
        return _dt.datetime.fromisoformat(f"{date}T{clock}.{micro}{zone}")
    except ValueError as exc:
        raise DecodeError(f"bad time {text!r}: {exc}") from None


def format_time(value: _dt.datetime) -> str:
    """RFC 3339 in UTC with ``Z``; naive datetimes are taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.timezone.utc)
    value = value.astimezone(_dt.timezone.utc)
    text = f"{value.year:04d}-{value.month:02d}-{value.day:02d}T{value.hour:02d}:{value.minute:02d}:{value.second:02d}"
    if value.microsecond:
        text += f".{value.microsecond:06d}".rstrip("0")
    return text + "Z"


Codec = tuple[Callable[[Any], Any], Callable[[Any], Any]]  # (encode, decode)
_codec_cache: dict[Any, Codec] = {}
_class_cache: dict[type, tuple[list[tuple[str, str, Codec]], dict[str, tuple[str, Codec]], str | None]] = {}


def _ident(v: Any) -> Any:
    return v


def _scalar(kind: type) -> Codec:
    def dec(v: Any) -> Any:
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            return float(v)
        if kind is int and isinstance(v, float) and v.is_integer():
            return int(v)
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise DecodeError(f"expected {kind.__name__}, got {type(v).__name__}")
        return v

    return _ident, dec


def _codec_for(tp: Any) -> Codec:
    cached = _codec_cache.get(tp)
    if cached is not None:
        return cached
    codec = _build_codec(tp)
    _codec_cache[tp] = codec
    return codec


def _build_codec(tp: Any) -> Codec:
    if tp is Any:
        return _ident, _ident
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union {tp}")
        inner_enc, inner_dec = _codec_for(args[0])
        return (lambda v: None if v is None else inner_enc(v)), (lambda v: None if v is None else inner_dec(v))
    if origin is tuple:
        args = typing.get_args(tp)
        item_enc, item_dec = _codec_for(args[0])

        def dec_list(v: Any) -> Any:
            if v is None:
                return None
            if not isinstance(v, list):
                raise DecodeError(f"expected array, got {type(v).__name__}")
            return tuple(item_dec(x) for x in v)

        return (lambda v: [item_enc(x) for x in v]), dec_list
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        val_enc, val_dec = _codec_for(val_tp)
        if key_tp is int:

            def dec_intmap(v: Any) -> Any:
                if v is None:
                    return None
                if not isinstance(v, dict):
                    raise DecodeError("expected object")
                out = {}
                for k, x in v.items():
                    try:
                        key = int(k)
                    except ValueError:
                        raise DecodeError(f"integer map key expected, got {k!r}") from None
                    # Go's maps of pointers may hold null (Headscale has sent null DERP regions):
                    # keep it as None for the caller to drop rather than refusing the whole message.
                    out[key] = None if x is None else val_dec(x)
                return out

            return (lambda v: {str(k): val_enc(x) for k, x in v.items()}), dec_intmap

        def dec_map(v: Any) -> Any:
            if v is None:
                return None
            if not isinstance(v, dict):
                raise DecodeError("expected object")
            return {str(k): None if x is None else val_dec(x) for k, x in v.items()}

        return (lambda v: {k: val_enc(x) for k, x in v.items()}), dec_map
    if isinstance(tp, type):
        if issubclass(tp, bool):
            return _scalar(bool)
        if issubclass(tp, (int, float, str)):
            return _scalar(tp)
        if issubclass(tp, _Key):
            key_cls = tp

            def dec_key(v: Any) -> Any:
                if not isinstance(v, str):
                    raise DecodeError(f"expected {key_cls.__name__} text")
                try:
                    return key_cls.parse(v)
                except ValueError as exc:
                    raise DecodeError(str(exc)) from None

            return str, dec_key
        if issubclass(tp, _dt.datetime):

            def dec_time(v: Any) -> Any:
                if not isinstance(v, str):
                    raise DecodeError("expected time string")
                return parse_time(v)

            return format_time, dec_time
        if dataclasses.is_dataclass(tp):
            cls = tp
            return to_json, (lambda v: from_json(cls, v))
    raise TypeError(f"unsupported field type {tp!r}")


def _class_info(cls: type) -> tuple[list[tuple[str, str, Codec]], dict[str, tuple[str, Codec]], str | None]:
    info = _class_cache.get(cls)
    if info is not None:
        return info
    hints = typing.get_type_hints(cls)
    fields: list[tuple[str, str, Codec]] = []
    by_lower: dict[str, tuple[str, Codec]] = {}
    extra: str | None = None
    for f in dataclasses.fields(cls):
        if f.metadata.get("extra"):
            extra = f.name
            continue
        name = f.metadata.get("json")
        if name is None:
            continue
        codec = _codec_for(hints[f.name])
        fields.append((f.name, name, codec))
        by_lower[name.lower()] = (f.name, codec)
    info = (fields, by_lower, extra)
    _class_cache[cls] = info
    return info


def to_json(obj: Any) -> dict[str, Any]:
    """Encode a dataclass instance into a JSON-ready dict (``None`` fields omitted)."""
    fields, _, extra = _class_info(type(obj))
    out: dict[str, Any] = {}
    if extra is not None:
        more = getattr(obj, extra)
        if more:
            out.update(more)
    for attr, name, (enc, _dec) in fields:
        value = getattr(obj, attr)
        if value is not None:
            out[name] = enc(value)
    return out


T = typing.TypeVar("T")


def from_json(cls: type[T], data: Any) -> T:
    """Decode a JSON object (already parsed) into ``cls``; raises :class:`DecodeError`."""
    if not isinstance(data, dict):
        raise DecodeError(f"{cls.__name__}: expected object, got {type(data).__name__}")
    _, by_lower, extra = _class_info(cls)
    kwargs: dict[str, Any] = {}
    unknown: dict[str, Any] = {}
    for name, value in data.items():
        hit = by_lower.get(name.lower())
        if hit is None:
            unknown[name] = value
            continue
        attr, (_enc, dec) = hit
        try:
            kwargs[attr] = None if value is None else dec(value)
        except DecodeError as exc:
            raise DecodeError(f"{cls.__name__}.{name}: {exc}") from None
    if extra is not None and unknown:
        kwargs[extra] = unknown
    return cls(**kwargs)
