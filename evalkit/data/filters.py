"""The CLI's row filters: "COL OP VALUE" -> a pyarrow compute expression.

1) split the text into column, operator and value (a column with spaces is quoted in backticks);
2) resolve the column against the schema (or an output name given by rename), naming the real
   columns when it is missing;
3) read the value as null, a number, true/false or text (quoted to keep digits as text), cast it
   to the column's type, and build the comparison.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from evalkit.data.sources import is_text, missing_column
from evalkit.errors import DataError, EvalkitError

_FILTER_RE = re.compile(
    r"^\s*(?P<col>`[^`]+`|\"[^\"]+\"|'[^']+'|.+?)\s*(?P<op>==|!=|<=|>=|=|<|>)\s*(?P<val>.*?)\s*$"
)


_OPS = {
    "==": lambda a, b: a == b,
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def parse_filter(text: str, *, schema: pa.Schema | None = None) -> pc.Expression:
    """Parse the CLI's "COL OP VALUE" into a pyarrow expression. OP is ==, !=, <, <=, >, >=
    (= means ==). VALUE is a number, true/false, null (with == or !=), or text (quote it to keep
    digits as text: `label == "1"`). Quote a COL with spaces in backticks: `#1 ID` > 5.
    With `schema`, the column must exist and VALUE is cast to its type."""
    return _parse_filter(text, schema, "the data")


def _parse_filter(
    text: str, schema: pa.Schema | None, label: str, aliases: Mapping[str, str] | None = None
) -> pc.Expression:
    match = _FILTER_RE.match(text or "")
    if not match or not match["val"]:
        raise EvalkitError(
            f"cannot parse filter {text!r}; write COL OP VALUE with OP one of "
            "==, !=, <, <=, >, >= (for example: score >= 2.5)"
        )
    col, op, raw = match["col"], match["op"], match["val"]
    if col[0] in "`\"'" and col[-1] == col[0]:
        col = col[1:-1]
    if schema is not None and col not in schema.names and aliases and col in aliases:
        col = aliases[col]  # an output name given by rename
    ref = pc.field(col)
    target = None
    if schema is not None:
        if col not in schema.names:
            raise DataError(missing_column(col, label, schema.names))
        target = schema.field(col).type
    quoted = len(raw) >= 2 and raw[0] in "\"'" and raw[-1] == raw[0]
    if not quoted and raw.lower() in ("null", "none"):
        if op in ("==", "="):
            return ref.is_null()
        if op == "!=":
            return ref.is_valid()
        raise EvalkitError(f"filter {text!r}: null can only be compared with == or !=")
    value: Any = raw[1:-1] if quoted else _literal(raw)
    if target is not None:
        value = _cast_literal(value, raw, target, col, text)
    return _OPS[op](ref, value)


def _literal(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _cast_literal(value: Any, raw: str, target: pa.DataType, col: str, text: str) -> Any:
    if is_text(target):
        return value if isinstance(value, str) else raw
    try:
        return pa.scalar(value).cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise EvalkitError(
            f"filter {text!r}: {raw!r} is not a valid {target} value for column '{col}'"
        ) from exc
