"""Text columns at the door: what gets embedded is exactly the text stored in the file.

1) `check_text_types(schema, columns, label)`, before any row is read: each text column must be a
   string type (string, large_string, string_view, or a dictionary of strings), binary (decoded in
   step 2) or all-null (the null policy then names the row). Anything else is refused with its type:
   numbers, dates or lists are not turned into text, since str() changes them (1.50 -> '1.5',
   007 -> '7'). CSV/TSV text columns never arrive as numbers: `evalkit.data.sources` reads the
   columns it is told are text as strings, so a column of digits keeps its exact characters.
2) `as_text(array, label, column, first_row)` on every batch: string arrays are fully validated
   (some readers, such as pyarrow's JSON reader, pass bytes that are not UTF-8 through as
   strings); binary arrays are decoded strictly as UTF-8 (a Parquet file written without the UTF-8
   annotation still reads); a value that is not valid UTF-8 is refused naming the source, the
   column and its row. Text is never made with str(bytes), which would embed "b'caf\\xe9'".
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from evalkit.errors import DataError

__all__ = ["as_text", "check_text_types", "is_string_type"]


def is_string_type(dtype: pa.DataType) -> bool:
    """A type whose values are Python str: string, large_string, string_view, dictionary of those."""
    if pa.types.is_dictionary(dtype):
        return is_string_type(dtype.value_type)
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or _is_view(dtype, "string")


def _is_binary_type(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        return _is_binary_type(dtype.value_type)
    return pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or _is_view(dtype, "binary")


def _is_view(dtype: pa.DataType, name: str) -> bool:
    return str(dtype) == f"{name}_view"


def check_text_types(schema: pa.Schema, columns: Sequence[str], label: str) -> None:
    """Refuse a text column whose type is not text (or binary to decode), before reading rows."""
    for name in columns:
        dtype = schema.field(name).type
        if is_string_type(dtype) or _is_binary_type(dtype) or pa.types.is_null(dtype):
            continue
        raise DataError(
            f"text column {name!r} of {label} holds {dtype}, not text; evalkit does not turn "
            f"{dtype} values into text (str() would change them); store the column as strings"
        )


def as_text(array: pa.Array | pa.ChunkedArray, label: str, column: str, first_row: int) -> pa.Array:
    """`array` as a valid UTF-8 string array (see the module docstring). `first_row` is the row of
    array[0] in the source, for the error message."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    dtype = array.type
    if pa.types.is_dictionary(dtype):
        array, dtype = array.dictionary_decode(), dtype.value_type
    if pa.types.is_null(dtype):
        return array
    if not (is_string_type(dtype) or _is_binary_type(dtype)):
        check_text_types(pa.schema([(column, dtype)]), [column], label)
    try:
        if is_string_type(dtype):
            # Some readers (pyarrow's JSON reader) hand over string arrays whose bytes are not
            # UTF-8; full validation checks the offsets and the UTF-8 of every value.
            array.validate(full=True)
            return array
        return array.cast(pa.large_string() if pa.types.is_large_binary(dtype) else pa.string())
    except pa.ArrowInvalid:
        raise _first_invalid(array, label, column, first_row) from None


def _first_invalid(array: pa.Array, label: str, column: str, first_row: int) -> DataError:
    """The error naming the first value of `array` that is not valid UTF-8."""
    raw = array.cast(pa.large_binary()) if not _is_binary_type(array.type) else array
    for i, value in enumerate(raw.to_pylist()):
        try:
            if value is not None:
                value.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = value[exc.start : exc.start + 1].hex()
            return DataError(
                f"{label}: row {first_row + i} (0-based) of text column {column!r} is not valid "
                f"UTF-8 (byte 0x{bad} at offset {exc.start}); evalkit reads text as UTF-8 only: "
                "re-encode the file (e.g. iconv -f latin1 -t utf-8)"
            )
    return DataError(f"{label}: text column {column!r} is corrupt (offsets out of range)")
