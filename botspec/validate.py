"""Check JSON values against the declarations in ``botspec.spec``, naming every wrong field.

msgspec does the checking; it stops at the first error, so a Struct is checked
field by field here to report all of them at once. What a refusal says is worded
from the declaration itself (its type and ``Meta`` constraints, or the
``extra["must"]`` a pattern carries), so it cannot drift from what is enforced.
"""

from __future__ import annotations

import base64
import binascii
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from msgspec import Meta, Struct

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")


@dataclass(frozen=True)
class FieldError:
    """One reason one input field was refused; ``field`` is a dotted path."""

    field: str
    message: str


def _strip(tp: Any) -> tuple[Any, list[Meta], bool]:
    """``tp`` without ``Annotated`` and ``| None``: (the bare type, its Metas, nullable)."""
    metas: list[Meta] = []
    nullable = False
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            base, *extras = typing.get_args(tp)
            metas.extend(m for m in extras if isinstance(m, Meta))
            tp = base
            continue
        if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            nullable = nullable or len(args) < len(typing.get_args(tp))
            if len(args) == 1:
                tp = args[0]
                continue
        return tp, metas, nullable


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _range(metas: list[Meta]) -> str:
    low = next((m.ge for m in metas if m.ge is not None), None)
    high = next((m.le for m in metas if m.le is not None), None)
    if low is not None and high is not None:
        return f" from {_number(low)} to {_number(high)}"
    if low is not None:
        return f" of at least {_number(low)}"
    if high is not None:
        return f" of at most {_number(high)}"
    return ""


def must(tp: Any) -> str:
    """How a refusal of a value for ``tp`` reads: 'must be …', from the declaration."""
    base, metas, nullable = _strip(tp)
    for meta in metas:
        if meta.extra and "must" in meta.extra:
            return str(meta.extra["must"])
    orless = " or null" if nullable else ""
    if base is bool:
        return f"must be true or false{orless}"
    if base is int:
        return f"must be an integer{_range(metas)}{orless}"
    if base is float:
        return f"must be a number{_range(metas)}{orless}"
    if base is str:
        low = next((m.min_length for m in metas if m.min_length is not None), None)
        high = next((m.max_length for m in metas if m.max_length is not None), None)
        size = f" of {low} to {high} characters" if low is not None and high is not None else ""
        return f"must be a string{size}{orless}"
    if typing.get_origin(base) is tuple:
        high = next((m.max_length for m in metas if m.max_length is not None), None)
        most = f" of at most {high}" if high is not None else ""
        item = must(typing.get_args(base)[0]).removeprefix("must be ")
        return f"must be a list{most} items, each {item}"
    if typing.get_origin(base) is dict or (isinstance(base, type) and issubclass(base, Struct)):
        return f"must be an object{orless}"
    return f"must be {base!r}{orless}"


def struct_of(tp: Any) -> type[Struct] | None:
    """The Struct that ``tp`` is (or is with ``| None``), else None."""
    base, _, _ = _strip(tp)
    return base if isinstance(base, type) and issubclass(base, Struct) else None


def check_value(tp: Any, value: object, path: str, errors: list[FieldError]) -> None:
    """Add to ``errors`` every reason ``value`` is no ``tp`` (a Struct is checked field by field)."""
    struct = struct_of(tp)
    if struct is not None and isinstance(value, dict):
        check_struct(struct, value, errors, prefix=f"{path}.")
        return
    try:
        msgspec.convert(value, tp)
        _check_whole_match(tp, value, path, errors)
    except msgspec.ValidationError as exc:
        found = _AT.search(str(exc))
        inner = found.group("path") if found else ""
        where = f"{path}{inner}"
        base, _, _ = _strip(tp)
        if inner.startswith("[") and typing.get_origin(base) is tuple and inner.count("[") == 1:
            errors.append(FieldError(where, must(typing.get_args(base)[0])))
        else:
            errors.append(FieldError(where, must(tp)))


def _check_whole_match(tp: Any, value: object, path: str, errors: list[FieldError]) -> None:
    """msgspec searches a pattern with Python's ``re``, where ``$`` also matches before a
    final newline: "name\n" would pass ``^[a-z]+$``. Insist on the whole string."""
    base, metas, _ = _strip(tp)
    if isinstance(value, str):
        for meta in metas:
            if meta.pattern is not None and not re.fullmatch(meta.pattern, value):
                errors.append(FieldError(path, must(tp)))
    elif isinstance(value, list) and typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        for index, element in enumerate(value):
            _check_whole_match(item, element, f"{path}[{index}]", errors)


def check_struct(
    struct: type[Struct],
    value: Mapping[str, Any],
    errors: list[FieldError],
    *,
    prefix: str = "",
    required: bool = True,
) -> None:
    """Check an object against a Struct: unknown keys, missing required ones, every value.

    ``required=False`` checks only the keys given (a partial document).
    """
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
    for key, item in value.items():
        field = fields.get(key)
        if field is None:
            errors.append(
                FieldError(f"{prefix}{key}", f"unknown field (known: {', '.join(fields)})")
            )
            continue
        check_value(field.type, item, f"{prefix}{key}", errors)
    if required:
        for key, field in fields.items():
            if field.required and key not in value:
                errors.append(FieldError(f"{prefix}{key}", "is required"))


def public_key_problem(pem: str) -> str | None:
    """Why ``pem`` is no PKCS#1 RSA public key as a bot loads it, or None."""
    numbers = _public_numbers_or_problem(pem)
    return numbers if isinstance(numbers, str) else None


def rsa_public_numbers(pem: str) -> tuple[int, int]:
    """(modulus, exponent) of a PKCS#1 PEM public key; ValueError (saying why) if it
    is none. What ``rsa.PublicKey.load_pkcs1`` reads, without its ASN.1 library: a
    forked bot that runs pyasn1's decoder makes ~0.5 MB of its fork server's pages
    its own (docs/internals.md, Memory)."""
    numbers = _public_numbers_or_problem(pem)
    if isinstance(numbers, str):
        raise ValueError(f"the public key {numbers}")
    return numbers


def _public_numbers_or_problem(pem: str) -> tuple[int, int] | str:
    """The key's (modulus, exponent), or why it has none: base64 between the PKCS#1
    markers, a DER SEQUENCE of two non-negative INTEGERs. Read with the standard
    library, so that neither the controller nor a bot needs more to refuse a broken
    key or to load a good one."""
    begin, end = "-----BEGIN RSA PUBLIC KEY-----", "-----END RSA PUBLIC KEY-----"
    if begin not in pem:
        return "must be a PKCS#1 PEM ('-----BEGIN RSA PUBLIC KEY-----'), as Telethon loads it"
    if end not in pem.split(begin, 1)[1]:
        return "is not an RSA public key: its end marker is missing"
    body = pem.split(begin, 1)[1].split(end, 1)[0]
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        return "is not an RSA public key: its base64 is broken"
    numbers = _two_integers(der)
    if numbers is None:
        return "is not an RSA public key: its content is not PKCS#1"
    return numbers


def _der_item(data: bytes, at: int) -> tuple[int, int, int] | None:
    """(tag, start of content, end of content) of the DER item at ``at``, or None."""
    if at + 2 > len(data):
        return None
    tag, size = data[at], data[at + 1]
    at += 2
    if size & 0x80:
        count = size & 0x7F
        if count == 0 or count > 4 or at + count > len(data):
            return None
        size = int.from_bytes(data[at : at + count], "big")
        at += count
    if at + size > len(data):
        return None
    return tag, at, at + size


def _two_integers(der: bytes) -> tuple[int, int] | None:
    """The two non-negative INTEGERs of a DER SEQUENCE that holds exactly them, or None."""
    outer = _der_item(der, 0)
    if outer is None or outer[0] != 0x30 or outer[2] != len(der):
        return None
    at = outer[1]
    numbers = []
    for _ in range(2):
        item = _der_item(der, at)
        if item is None or item[0] != 0x02 or item[2] == item[1] or der[item[1]] & 0x80:
            return None  # not an INTEGER, or an empty or negative one
        numbers.append(int.from_bytes(der[item[1] : item[2]], "big"))
        at = item[2]
    if at != outer[2]:
        return None
    return numbers[0], numbers[1]
