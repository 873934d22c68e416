"""What a dataset or shard gives is bounded before it is read, and what it names is escaped before it is printed.

A shard or dataset may come from someone else. Whatever it declares is checked before memory is spent on it:
  - a tar member or a cell of encoded image bytes holds at most `MAX_CELL_BYTES` (checked on the tar header or the
    Arrow length, before the bytes are read or turned into Python objects);
  - a parquet column chunk unpacks to at most `MAX_EXPANSION` times its stored size (or `EXPANSION_FLOOR`, whichever
    is larger), in bytes and in values, read off the file's metadata before any page is decompressed: a few
    kilobytes of zstd cannot become gigabytes of memory or of `datasets`' Arrow cache;
  - an image in any form (encoded bytes, a path, a PIL image, an array, nested lists, an Arrow list cell) has at most
    Pillow's `Image.MAX_IMAGE_PIXELS` pixels, checked on its header or shape before it is decoded or converted;
  - a brace pattern names at most `MAX_PATTERN_NAMES` shards, counted before it is expanded.
`--max-image-pixels 0` (`PIL.Image.MAX_IMAGE_PIXELS = None`) is "these files are trusted": it lifts every bound here.

Names and fields taken from data (tar member names, keys, column names, forged config fields) are printed through
`shown`: control characters escaped (no terminal escape sequence reaches the terminal) and the length bounded.
"""

from __future__ import annotations

from typing import Any

MAX_CELL_BYTES = 256 << 20  # one encoded image: a tar member, a parquet/Arrow cell (an 89-megapixel PNG fits)
MAX_EXPANSION = 64  # a parquet column chunk's unpacked size (bytes, values) over its stored size
EXPANSION_FLOOR = 64 << 20  # ... unless it is no larger than this
MAX_PATTERN_NAMES = 1_000_000  # shard names one brace pattern may expand to
MAX_SHOWN_CHARS = 200  # a name from data, as printed
MAX_ERROR_CHARS = 2000  # one error line, as printed
CHANNELS = 4  # the most values per pixel an image array may hold (RGBA)


def shown(text: Any, limit: int = MAX_SHOWN_CHARS) -> str:
    """`text` safe to print on one line: control and format characters (escape sequences, newlines, bidi overrides)
    written as `\\xNN` / `\\uNNNN`, and at most `limit` characters with the count of the rest."""
    import unicodedata

    text = str(text)
    cut = text[:limit]
    out = "".join(c if c.isprintable() and unicodedata.category(c) != "Cf" else
                  (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else
                   f"\\U{ord(c):08x}") for c in cut)
    return out if len(text) <= limit else f"{out}... ({len(text) - limit} more characters)"


def error_line(err: BaseException | str) -> str:
    """An error message as one bounded, escaped line (a message built from data could hold anything)."""
    return shown(" ".join(str(err).split("\n")), MAX_ERROR_CHARS)


def bounds_on() -> bool:
    """False once the user declared the files trusted (`--max-image-pixels 0`: Pillow's limit is None)."""
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS is not None


def too_many_bytes(size: int, what: str) -> str | None:
    """Why `size` bytes of one encoded image are refused, or None."""
    if bounds_on() and size > MAX_CELL_BYTES:
        return (f"{what} holds {size:,} bytes, over the limit of {MAX_CELL_BYTES:,} for one image "
                "(--max-image-pixels 0 lifts it for trusted files)")
    return None


def too_many_pixels(width: int, height: int) -> str | None:
    """Why a `width` x `height` image is refused as a possible decompression bomb, or None (Pillow's limit)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        return (f"DecompressionBombError: {width}x{height} = {width * height:,} pixels, over the limit of {limit:,} "
                "(a possible decompression bomb; if the data is trusted: --max-image-pixels N, 0 for no limit)")
    return None


def array_pixels(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(width, height) of an image array of `shape` as `data.decode_hub_value` reads it (HW, HWC or CHW)."""
    if len(shape) == 2:
        return shape[1], shape[0]
    if len(shape) == 3:
        if shape[0] in (1, 3) and shape[-1] not in (1, 3):
            return shape[2], shape[1]
        return shape[1], shape[0]
    return None


def nested_shape(value: Any, depth: int = 3) -> tuple[int, ...]:
    """The shape of nested lists (or an array) from its first elements, without converting it."""
    if hasattr(value, "shape"):
        return tuple(int(n) for n in value.shape)
    shape: list[int] = []
    while isinstance(value, (list, tuple)) and len(shape) < depth + 1:
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return tuple(shape)


def array_problem(shape: tuple[int, ...], values: int | None = None) -> str | None:
    """Why an image array of `shape` (holding `values` numbers in all, when known) is refused, or None."""
    size = array_pixels(shape)
    problem = too_many_pixels(*size) if size else None
    if problem is None and values is not None and bounds_on():
        from PIL import Image

        if values > CHANNELS * Image.MAX_IMAGE_PIXELS:
            problem = f"an array cell of {values:,} values, more than {CHANNELS} per pixel of the pixel limit"
    return problem


# --------------------------------------------------------------------------------------------- Arrow and parquet


def arrow_cell_problem(cell: Any) -> str | None:
    """Why one row of an Arrow array (a length-1 `pyarrow.Array`) is refused before it becomes Python objects:
    encoded bytes over `MAX_CELL_BYTES`, a path over 4096 characters, an array over the pixel limit."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not bounds_on() or cell.null_count == len(cell):
        return None
    if isinstance(cell.type, pa.ExtensionType):  # `datasets`' Array2D/3D: a list array underneath
        cell = cell.storage
    kind = cell.type
    if pa.types.is_struct(kind):
        for index, child in enumerate(cell.flatten()):
            problem = arrow_cell_problem(child)
            if problem:
                return f"field {shown(kind.field(index).name)}: {problem}"
        return None
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_string(kind) \
            or pa.types.is_large_string(kind):
        size = pc.max(pc.binary_length(cell)).as_py() or 0
        limit = MAX_CELL_BYTES if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) else 4096
        return f"a cell of {size:,} bytes, over the limit of {limit:,}" if size > limit else None
    shape: list[int] = []
    values = cell
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or \
            pa.types.is_fixed_size_list(values.type):
        lengths = pc.list_value_length(values)
        shape.append(int(pc.max(lengths).as_py() or 0))
        values = values.flatten()
    return array_problem(tuple(shape), len(values)) if shape else None


def parquet_chunk_problem(chunk: Any) -> str | None:
    """Why a parquet column chunk (`pyarrow` ColumnChunkMetaData) would unpack to too much, or None: read off the
    file's metadata, before a page is decompressed."""
    if not bounds_on():
        return None
    stored = max(int(chunk.total_compressed_size), 1)
    allowed = max(EXPANSION_FLOOR, MAX_EXPANSION * stored)
    name = shown(chunk.path_in_schema)
    if chunk.total_uncompressed_size > allowed:
        return (f"column {name} unpacks from {stored:,} to {chunk.total_uncompressed_size:,} bytes, over "
                f"{allowed:,} (a possible decompression bomb; --max-image-pixels 0 lifts this for trusted files)")
    if chunk.num_values > allowed:
        return (f"column {name} holds {chunk.num_values:,} values in {stored:,} bytes, over {allowed:,} (a possible "
                "decompression bomb; --max-image-pixels 0 lifts this for trusted files)")
    return None


def parquet_row_group_problem(metadata: Any, group: int, columns: set[str] | None = None) -> str | None:
    """The first `parquet_chunk_problem` of row group `group` among the leaf columns under `columns` (None: all)."""
    row_group = metadata.row_group(group)
    for index in range(row_group.num_columns):
        chunk = row_group.column(index)
        path = chunk.path_in_schema  # "image.bytes", "image.list.element": the top column's name, then the leaf's
        if columns is None or any(path == name or path.startswith(name + ".") for name in columns):
            problem = parquet_chunk_problem(chunk)
            if problem:
                return problem
    return None


def parquet_file_problem(metadata: Any) -> str | None:
    """`parquet_chunk_problem`'s rule for a whole file (what `datasets` writes into its Arrow cache), or None: many
    row groups, each under the floor, must not add up to a bomb either."""
    if not bounds_on():
        return None
    chunks = [metadata.row_group(g).column(c) for g in range(metadata.num_row_groups)
              for c in range(metadata.num_columns)]
    stored = max(sum(int(chunk.total_compressed_size) for chunk in chunks), 1)
    unpacked = sum(int(chunk.total_uncompressed_size) for chunk in chunks)
    allowed = max(EXPANSION_FLOOR, MAX_EXPANSION * stored)
    if unpacked > allowed:
        return (f"its columns unpack from {stored:,} to {unpacked:,} bytes, over {allowed:,} (a possible "
                "decompression bomb; --max-image-pixels 0 lifts this for trusted files)")
    return None


# --------------------------------------------------------------------------------------------- brace patterns


def pattern_names(pattern: str) -> int:
    """How many names `braceexpand(pattern)` gives, counted without expanding (nested braces, lists, ranges)."""
    from braceexpand import char_range_re, int_range_re

    total, depth, start, pos = 1, 0, 0, 0
    while pos < len(pattern):
        c = pattern[pos]
        if c == "\\":
            pos += 2
            continue
        if c == "{":
            if depth == 0:
                start = pos
            depth += 1
        elif c == "}" and depth:
            depth -= 1
            if depth == 0:
                total *= _expression_names(pattern[start + 1:pos], int_range_re, char_range_re)
        pos += 1
    return total


def _expression_names(expr: str, int_range_re: Any, char_range_re: Any) -> int:
    match = int_range_re.match(expr)
    if match:
        first, last, step = int(match.group(1)), int(match.group(2)), abs(int(match.group(3) or 1)) or 1
        return abs(last - first) // step + 1
    match = char_range_re.match(expr)
    if match:
        from braceexpand import alphabet

        first, last, step = alphabet.index(match.group(1)), alphabet.index(match.group(2)), \
            abs(int(match.group(3) or 1)) or 1
        return abs(last - first) // step + 1
    items, depth, start, pos = [], 0, 0, 0
    while pos < len(expr):
        c = expr[pos]
        if c == "\\":
            pos += 2
            continue
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 0:
            items.append(expr[start:pos])
            start = pos + 1
        pos += 1
    if not items:  # not a list: braceexpand keeps the braces and expands inside
        return pattern_names(expr)
    items.append(expr[start:])
    return sum(pattern_names(item) for item in items)
