"""The image cells of `datasets` tables (hub datasets, save_to_disk folders, parquet files) to RGB images.

Which column holds the image, how a cell becomes an image whatever form it takes (encoded bytes, {"bytes", "path"},
a PIL image, an array), how big a cell may be before it becomes Python objects, and when a cell that names a local
file is followed. Below every table source: they differ in where the table comes from, not in what a cell holds.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from kl_autoencoder.data.images import BadImageError, _rescale_to_uint8, decode_image, to_rgb
from kl_autoencoder.untrusted import arrow_cell_problem, array_problem, nested_shape, shown, too_many_pixels


IMAGE_COLUMN_NAMES = ("image", "img", "pixel_values")


def find_image_column(features: Any, image_column: str | None = None) -> str:
    """The image column of a `datasets` feature dict: `image_column` if given, else the first `Image`
    feature, else the first of image/img/pixel_values. A clear error lists the columns otherwise."""
    import datasets

    columns = list(features or {})
    if image_column is not None:
        if image_column not in columns:
            raise KeyError(f"image column {image_column!r} not in the dataset; its columns are {columns}")
        return image_column
    for column in columns:
        if isinstance(features[column], datasets.Image):
            return column
    for column in IMAGE_COLUMN_NAMES:
        if column in columns:
            return column
    raise KeyError(
        f"no image column found (no column of type Image, none named {', '.join(IMAGE_COLUMN_NAMES)}); "
        f"the dataset's columns are {columns}: set data.image_column"
    )


def decode_hub_value(value: Any, name: str, local_paths: bool | str = False) -> Image.Image:
    """One image-column value of a `datasets` row -> RGB image: undecoded {"bytes", "path"}, PIL, or array.

    A value that names a file instead of holding the image (a path, or {"bytes": None, "path": ...}) is read only
    with `local_paths` True, or when it lies inside the folder `local_paths` names (a dataset from someone else could
    name any file of this machine); every form is held to the pixel limit before it is decoded or converted."""
    if isinstance(value, Image.Image):
        problem = too_many_pixels(*value.size)
        if problem:
            raise BadImageError(name, problem)
        return to_rgb(ImageOps.exif_transpose(value))
    if isinstance(value, dict):
        if value.get("bytes"):
            return decode_image(value["bytes"], value.get("path") or name)
        if value.get("path"):
            return decode_image(local_image_path(value["path"], name, local_paths))
        raise BadImageError(name, "image entry has neither bytes nor path")
    if isinstance(value, str):
        return decode_image(local_image_path(value, name, local_paths), name)
    if isinstance(value, bytes):
        return decode_image(value, name)
    problem = array_problem(nested_shape(value))
    if problem:
        raise BadImageError(name, problem)
    try:
        array = np.asarray(value)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)  # CHW -> HWC
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.dtype != np.uint8:
            array = _rescale_to_uint8(array, "F")
        return to_rgb(Image.fromarray(array))
    except Exception as err:
        raise BadImageError(name, f"cannot interpret value of type {type(value).__name__} as an image: {err}") from err


def local_image_path(path: str, name: str, allowed: bool | str) -> str:
    """`path`, a file a dataset cell names, when following such names is `allowed` (True, or a folder it lies in);
    else a `BadImageError` that says nothing of the file (not even whether it exists)."""
    if isinstance(allowed, str):
        root = os.path.realpath(os.path.expanduser(allowed))
        allowed = os.path.realpath(os.path.expanduser(path)).startswith(root.rstrip(os.sep) + os.sep)
    if not allowed:
        raise BadImageError(name, f"the cell names a local file ({shown(path, 80)}) instead of holding the image; "
                                  "not followed (set data.allow_local_paths=true, or encode --allow-local-paths, if "
                                  "you trust the dataset)")
    return path


def checked_cell(arrow_rows: Any, index: int, column: str, name: str) -> Any:
    """Row `index`'s `column` of a `datasets.Dataset` in Arrow format, as Python, once its size is checked
    (`untrusted.arrow_cell_problem`): a hostile cell fails before it becomes gigabytes of Python objects."""
    cell = arrow_rows[index].column(column).combine_chunks()
    problem = arrow_cell_problem(cell)
    if problem:
        raise BadImageError(name, problem)
    return cell.to_pylist()[0]


def _is_encoded_image(value: Any) -> bool:
    return isinstance(value, Image.Image) or (isinstance(value, dict) and ("bytes" in value or "path" in value))


def _undecoded(hf_dataset: Any, column: str) -> Any:
    """Switch off `datasets`' own decoding of an Image column so a corrupt file is ours to skip."""
    import datasets

    features = hf_dataset.features
    if features is not None and isinstance(features.get(column), datasets.Image):
        return hf_dataset.cast_column(column, datasets.Image(decode=False))
    return hf_dataset
