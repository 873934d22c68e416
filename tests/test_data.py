"""Data pipeline: built-in photos, transforms, odd image modes, bad-file skipping, hub column detection."""

import io
import math

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from kl_autoencoder.config import DataConfig
from kl_autoencoder.data import (
    MIN_EPOCH_ITEMS,
    SAMPLE_HELDOUT,
    SAMPLE_TRAIN,
    BadImageError,
    DatasetUnavailableError,
    ImageFolderDataset,
    SkipLog,
    build_dataloader,
    build_dataset,
    build_transform,
    collate_images,
    dataset_from_hf,
    image_to_tensor,
    iter_image_folder,
    load_eval_images,
    load_hub_dataset,
    ReducedImageCache,
    load_image,
    reduce_to_side,
    rotate_hue,
    sample_images,
    tensor_to_image,
)


def gradient_image(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """An asymmetric smooth image: red grows left to right, green top to bottom."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, np.full_like(x, 60)], -1).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


# ------------------------------------------------------------------ built-in sample photos


def saturation(image: Image.Image) -> float:
    """Mean over pixels of (max - min of R, G, B) / 255: 0 for a grey image."""
    array = np.asarray(image).astype(float)
    return float((array.max(axis=2) - array.min(axis=2)).mean() / 255)


def test_sample_split_is_fixed_disjoint_colour_and_deterministic():
    train, heldout, everything = sample_images("train"), sample_images("heldout"), sample_images("all")
    train_names, heldout_names = [n for n, _ in train], [n for n, _ in heldout]
    assert train_names == list(SAMPLE_TRAIN) and heldout_names == list(SAMPLE_HELDOUT) == ["chelsea", "coffee", "flower"]
    assert len(train) >= 8 and not set(train_names) & set(heldout_names)
    assert [n for n, _ in everything] == train_names + heldout_names
    again = sample_images("heldout")
    for (name_a, a), (name_b, b) in zip(heldout, again):
        assert name_a == name_b and np.array_equal(np.asarray(a), np.asarray(b))
    assert all(img.mode == "RGB" and min(img.size) >= 256 for _, img in everything)
    # Colour photos only (the old set was half greyscale): every photo has visibly coloured pixels.
    assert min(saturation(img) for _, img in everything) > 0.02  # greyscale: 0; hubble_deep_field (black sky): 0.03
    # No held-out photo is a training photo in disguise (same size and near-identical pixels).
    for _, held in heldout:
        for _, trained in train:
            if held.size == trained.size:
                assert np.abs(np.asarray(held, float) - np.asarray(trained, float)).mean() > 20
    with pytest.raises(ValueError, match="unknown sample split"):
        sample_images("validation")


def test_sample_dataset_has_virtual_length_and_tensors_in_range():
    dataset = build_dataset(DataConfig(source="sample", resolution=32))
    assert len(dataset) >= MIN_EPOCH_ITEMS
    item = dataset[5]
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    # Random multi-scale crops: the same photo gives different crops on two reads.
    assert not torch.equal(dataset[0]["pixel_values"], dataset[0]["pixel_values"])
    assert dataset.transform.max_scale is None  # per-source default for the sample photos: down to native pixels

    heldout = build_dataset(DataConfig(source="sample", resolution=32, random_hue=1.0), split="heldout")
    assert len(heldout) == 3 and [heldout[i]["path"] for i in range(3)] == list(SAMPLE_HELDOUT)
    assert torch.equal(heldout[1]["pixel_values"], heldout[1]["pixel_values"])  # centre crop, no hue: deterministic


# ------------------------------------------------------------------ tensors and transforms


def test_tensor_round_trip_is_exact():
    image = gradient_image(20, 12)
    tensor = image_to_tensor(image)
    assert tensor.shape == (3, 12, 20) and tensor.min() >= -1 and tensor.max() <= 1
    assert tensor[0, 0, 0] == -1 and tensor[0, 0, -1] == 1
    assert np.array_equal(np.asarray(tensor_to_image(tensor)), np.asarray(image))
    out_of_range = torch.tensor([3.0, -7.0, 0.0]).view(1, 3, 1, 1)  # batched, values clamped to [-1, 1]
    assert np.asarray(tensor_to_image(out_of_range)).tolist() == [[[255, 0, 128]]]


def test_centre_crop_matches_resize_then_crop():
    image = gradient_image(96, 48)
    ours = build_transform(16, random_crop=False, random_flip=False)(image)
    # Independent reference: resize the shorter side to 16 (96x48 -> 32x16), then cut the middle 16 columns.
    reference = image_to_tensor(image.resize((32, 16), Image.Resampling.BICUBIC).crop((8, 0, 24, 16)))
    assert ours.shape == (3, 16, 16)
    assert (ours - reference).abs().max() < 0.05


def test_small_images_are_resized_up_and_flip_mirrors():
    one_pixel = Image.new("RGB", (1, 1), (255, 0, 0))
    out = build_transform(8, random_crop=True, random_flip=True)(one_pixel)
    assert out.shape == (3, 8, 8)
    assert torch.allclose(out[0], torch.ones(8, 8)) and torch.allclose(out[1:], -torch.ones(2, 8, 8))

    image = gradient_image(16, 16)
    flips = {build_transform(16, random_crop=False, random_flip=True)(image)[0, 0, 0].item() for _ in range(40)}
    assert flips == {-1.0, 1.0}  # unflipped starts dark red, mirrored starts bright red


def test_rotate_hue_turns_colours_about_the_grey_axis():
    pixels = torch.rand(3, 5, 7) * 2 - 1
    assert torch.allclose(rotate_hue(pixels.clone(), 0.0), pixels, atol=1e-6)
    # A third of a turn about (1, 1, 1) carries R to G, G to B, B to R: an independent closed form.
    assert torch.allclose(rotate_hue(pixels.clone(), 2 * math.pi / 3), pixels[[2, 0, 1]], atol=1e-6)
    grey = torch.full((3, 2, 2), 0.3)
    assert torch.allclose(rotate_hue(grey.clone(), 1.0), grey, atol=1e-6)  # greys have no hue
    half = rotate_hue(torch.tensor([0.2, -0.1, -0.1]).view(3, 1, 1), math.pi)  # reddish -> its complement, cyan
    assert torch.allclose(half.flatten(), torch.tensor([-0.2, 0.1, 0.1]), atol=1e-6)


def test_random_hue_is_a_probability_of_turning_each_crop():
    image = gradient_image(24, 24)
    plain = build_transform(16, random_crop=False, random_flip=False)(image)
    never = build_transform(16, random_crop=False, random_flip=False, random_hue=0.0)
    always = build_transform(16, random_crop=False, random_flip=False, random_hue=1.0)
    assert all(torch.equal(never(image), plain) for _ in range(5))
    turned = [always(image) for _ in range(5)]
    assert all(not torch.equal(t, plain) for t in turned)
    # brightness (mean of R, G, B) is kept wherever no channel was clipped
    inside = (turned[0].abs() < 0.999).all(0)
    assert torch.allclose(turned[0].mean(0)[inside], plain.mean(0)[inside], atol=0.02)
    with pytest.raises(ValueError, match="random_hue"):
        build_transform(16, True, True, random_hue=1.5)


def test_source_side_is_the_most_pixels_a_crop_can_use():
    assert build_transform(64, random_crop=False, random_flip=False).source_side == 64  # evaluation: shorter side
    assert build_transform(64, random_crop=True, random_flip=False, max_scale=1.0).source_side == 64
    assert build_transform(64, random_crop=True, random_flip=False, max_scale=2.5).source_side == 160
    assert build_transform(64, random_crop=True, random_flip=False, max_scale=None).source_side is None  # native
    # Crops of a copy reduced to source_side are the crops of the original (same random draws): the reduced copy
    # carries every pixel the transform can use.
    image = gradient_image(1200, 800)
    transform = build_transform(32, random_crop=True, random_flip=False, max_scale=3.0)
    reduced = reduce_to_side(image, transform.source_side)
    assert min(reduced.size) == 96 and reduced.size == (144, 96)
    for seed in range(3):
        torch.manual_seed(seed)
        a = transform(image)
        torch.manual_seed(seed)
        b = transform(reduced)
        assert (a - b).abs().mean() < 0.02


def test_large_jpegs_decode_reduced_and_once(tmp_path, monkeypatch):
    big = gradient_image(1600, 1200)
    big.save(tmp_path / "big.jpg", quality=95)
    gradient_image(40, 30).save(tmp_path / "small.png")
    full = load_image(tmp_path / "big.jpg")
    reduced = load_image(tmp_path / "big.jpg", min_side=100)
    assert full.size == (1600, 1200) and reduced.size == (133, 100)
    reference = full.resize(reduced.size, Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(reduced, float) - np.asarray(reference, float)).mean() < 2
    assert load_image(tmp_path / "small.png", min_side=100).size == (40, 30)  # never enlarged

    import kl_autoencoder.data.images as data_module  # where load_image finds decode_image

    decoded = []
    real_decode = data_module.decode_image
    monkeypatch.setattr(data_module, "decode_image", lambda *a, **k: decoded.append(a[0]) or real_decode(*a, **k))
    transform = build_transform(16, random_crop=True, random_flip=False, max_scale=2.0)
    dataset = ImageFolderDataset(iter_image_folder(tmp_path), transform, repeats=10)
    for index in range(len(dataset)):
        assert dataset[index]["pixel_values"].shape == (3, 16, 16)
    assert sorted(map(str, decoded)) == sorted(str(p) for p in iter_image_folder(tmp_path))  # each file once
    assert max(min(image.size) for image in dataset.cache._images.values()) == 32


def test_reduced_image_cache_drops_least_recently_used_within_budget():
    loads = []

    def loader(side):
        return lambda: loads.append(side) or Image.new("RGB", (side, side))

    cache = ReducedImageCache(max_bytes=3 * 10 * 10 * 3)  # room for three 10x10 RGB images
    for key in "abc":
        cache.get(key, loader(10))
    cache.get("a", loader(10))  # a hit: "a" becomes the most recently used
    cache.get("d", loader(10))  # evicts "b", the least recently used
    assert list(cache._images) == ["c", "a", "d"] and cache.nbytes == 900 and len(loads) == 4
    cache.get("b", loader(10))
    assert len(loads) == 5  # "b" was gone: loaded again
    cache.get("huge", loader(100))  # larger than the whole budget: returned, not kept
    assert "huge" not in cache._images and len(cache) == 3 and cache.nbytes == 900


# ------------------------------------------------------------------ odd files


def save_exif_rotated_jpeg(path, upright: Image.Image) -> None:
    """Store the image rotated, with EXIF orientation 6 ("rotate 90 CW to display") undoing it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)


@pytest.fixture
def messy_folder(tmp_path):
    """A folder of good images in awkward modes plus bad files; returns (folder, good names, bad names)."""
    sub = tmp_path / "nested"
    sub.mkdir()
    gradient_image(40, 30, "L").save(tmp_path / "gray.png")
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([0, 0, 255] + [255, 0, 0] * 255)
    palette.paste(1, (0, 0, 5, 10))
    palette.save(tmp_path / "palette.png", transparency=0)  # right half (index 0, blue) transparent
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 128))
    rgba.save(tmp_path / "rgba.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    Image.fromarray(np.array([[0, 32768], [65535, 65535]], dtype=np.uint16)).save(sub / "deep16.PNG")
    Image.new("RGB", (1, 1), (10, 200, 30)).save(tmp_path / "tiny.png")
    Image.new("1", (8, 8), 1).save(tmp_path / "bilevel.bmp")
    save_exif_rotated_jpeg(tmp_path / "rotated.jpg", gradient_image(48, 32))

    (tmp_path / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.png").write_text("this is not a png")
    buffer = io.BytesIO()
    gradient_image(64, 64).save(buffer, format="JPEG")
    (sub / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "readme.txt").write_text("ignored: not an image extension")

    good = {"gray.png", "palette.png", "rgba.png", "cmyk.jpg", "deep16.PNG", "tiny.png", "bilevel.bmp", "rotated.jpg"}
    bad = {"corrupt.jpg", "empty.jpg", "notes.png", "truncated.jpg"}
    return tmp_path, good, bad


def pixels(path) -> np.ndarray:
    return np.asarray(load_image(path)).astype(int)


def test_modes_convert_to_rgb(messy_folder):
    folder, _, _ = messy_folder
    gray = pixels(folder / "gray.png")
    assert gray.shape == (30, 40, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    palette = pixels(folder / "palette.png")
    assert (palette[:, :5] == [255, 0, 0]).all() and (palette[:, 5:] == 255).all()  # transparent -> white
    assert np.abs(pixels(folder / "rgba.png") - 127).max() <= 1  # half-transparent black on white
    assert np.abs(pixels(folder / "cmyk.jpg") - [255, 0, 0]).max() <= 8
    deep = pixels(folder / "nested" / "deep16.PNG")[..., 0]
    assert deep.tolist() == [[0, 128], [255, 255]]  # scaled by 65535 -> 255, not clipped at 255
    assert pixels(folder / "tiny.png").tolist() == [[[10, 200, 30]]]
    assert (pixels(folder / "bilevel.bmp") == 255).all()


def test_exif_orientation_is_applied(messy_folder):
    folder, _, _ = messy_folder
    upright = np.asarray(gradient_image(48, 32)).astype(int)
    loaded = pixels(folder / "rotated.jpg")
    assert loaded.shape == upright.shape
    assert np.abs(loaded - upright).mean() < 3
    raw = np.asarray(Image.open(folder / "rotated.jpg").convert("RGB"))
    assert raw.shape == (48, 32, 3)  # stored sideways: only the orientation tag makes it upright


def test_bad_files_raise_bad_image_error(messy_folder, monkeypatch):
    folder, _, bad = messy_folder
    for name in bad:
        path = next(folder.rglob(name))
        with pytest.raises(BadImageError) as info:
            load_image(path)
        assert info.value.path == str(path) and info.value.reason
    with pytest.raises(BadImageError, match="missing.png"):
        load_image(folder / "missing.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40x30 = 1200 > 2 * 100: a "bomb"
    with pytest.raises(BadImageError, match="DecompressionBomb"):
        load_image(folder / "gray.png")


def test_iter_image_folder_is_recursive_sorted_case_insensitive(messy_folder, tmp_path_factory):
    folder, good, bad = messy_folder
    paths = iter_image_folder(folder)
    assert paths == sorted(paths)
    assert {p.name for p in paths} == good | bad
    with pytest.raises(FileNotFoundError, match="does not exist"):
        iter_image_folder(folder / "nope")
    empty = tmp_path_factory.mktemp("empty")
    (empty / "a.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no image files"):
        iter_image_folder(empty)
    with pytest.raises(NotADirectoryError):
        iter_image_folder(folder / "tiny.png")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_skips_and_reports_bad_files(messy_folder, num_workers):
    folder, good, bad = messy_folder
    dataset = build_dataset(DataConfig(source=str(folder), resolution=16), train=False)
    assert len(dataset) == len(good) + len(bad)
    loader = build_dataloader(dataset, batch_size=4, shuffle=False, num_workers=num_workers)
    seen, log = [], SkipLog()
    for batch in loader:
        log.record_batch(batch)
        assert batch["pixel_values"].shape[1:] == (3, 16, 16)
        assert batch["pixel_values"].shape[0] == 4  # bad images are replaced, batches stay full
        assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
        seen += batch["paths"]
    assert {p.split("/")[-1] for p in seen} == good
    assert {f.split("/")[-1] for f in log.files} == bad and log.count == len(bad)
    assert all(log.reasons.values())
    # Without workers the dataset's own log saw the skips too; in workers it cannot.
    assert dataset.skipped.count == (len(bad) if num_workers == 0 else 0)


def test_all_bad_batch_is_empty_not_a_crash(tmp_path):
    for i in range(3):
        (tmp_path / f"bad{i}.png").write_bytes(b"garbage")
    dataset = ImageFolderDataset(iter_image_folder(tmp_path), build_transform(8, False, False))
    assert dataset[0]["pixel_values"] is None
    batch = collate_images([dataset[0], dataset[1]], resolution=8)
    assert batch["pixel_values"].shape == (0, 3, 8, 8)
    assert batch["num_skipped"] == 6 and len(set(batch["skipped_files"])) == 3


def test_training_dataset_repeats_small_folders_and_shuffles_by_seed(messy_folder):
    folder, good, bad = messy_folder
    dataset = build_dataset(DataConfig(source=str(folder), resolution=8))
    assert len(dataset) >= MIN_EPOCH_ITEMS and len(dataset) % (len(good) + len(bad)) == 0

    def order(seed):
        loader = build_dataloader(dataset, batch_size=32, shuffle=True, seed=seed, num_workers=0)
        return [p for batch in loader for p in batch["paths"]]

    first = order(1)
    assert len(first) == (len(dataset) // 32) * 32  # drop_last in training
    assert first == order(1) and first != order(2)
    limited = build_dataset(DataConfig(source=str(folder), resolution=8, max_images=3), train=False)
    assert len(limited) == 3


# ------------------------------------------------------------------ evaluation images


def test_load_eval_images(messy_folder):
    names, images = load_eval_images("sample", 32)
    assert names == [n for n, _ in sample_images("all")] and images.shape == (len(names), 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1
    names, images = load_eval_images("sample:heldout", 16)
    assert names == list(SAMPLE_HELDOUT) and images.shape == (3, 3, 16, 16)

    folder, good, _ = messy_folder
    names, images = load_eval_images(str(folder), 8)
    assert {n.split("/")[-1] for n in names} == good and images.shape == (len(good), 3, 8, 8)
    assert load_eval_images(str(folder), 8, num_images=2)[1].shape == (2, 3, 8, 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_eval_images(str(folder / "missing"), 8)


# ------------------------------------------------------------------ hub datasets


def test_hub_dataset_offline_gives_clear_error(monkeypatch):
    # The library reads the offline switches at import time: set the variables and the values it read.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetUnavailableError, match="could not be downloaded.*local folder"):
        load_hub_dataset("someone/no-such-dataset")
    with pytest.raises(DatasetUnavailableError, match="someone/no-such-dataset"):
        build_dataset(DataConfig(source="someone/no-such-dataset"))


def fake_hub_dataset() -> datasets.Dataset:
    """Like a hub image dataset: an int column first, the Image column second, one corrupt row."""
    images = [gradient_image(24, 20), gradient_image(20, 20, "L"), gradient_image(30, 20).rotate(90)]
    rows = [{"bytes": encode_png(image), "path": None} for image in images]
    rows.append({"bytes": b"not an image", "path": "broken.png"})
    features = datasets.Features({"label": datasets.Value("int64"), "picture": datasets.Image()})
    return datasets.Dataset.from_dict({"label": [0, 1, 2, 3], "picture": rows}, features=features)


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_dataset_from_hf_finds_image_column_and_skips_corrupt_rows():
    hf = fake_hub_dataset()
    transform = build_transform(16, random_crop=False, random_flip=False)
    dataset = dataset_from_hf(hf, transform, name="fake")
    assert dataset.column == "picture" and len(dataset) == 4
    expected = transform(ImageOps.exif_transpose(gradient_image(24, 20)))
    assert torch.equal(dataset[0]["pixel_values"], expected)
    corrupt = dataset[3]  # replaced by the next readable row, the skip reported
    assert corrupt["path"] == "fake[0]" and [f for f, _ in corrupt["skipped"]] == ["broken.png"]

    with pytest.raises(KeyError, match=r"'photo'.*\['label', 'picture'\]"):
        dataset_from_hf(hf, transform, image_column="photo")
    with pytest.raises(KeyError, match=r"no image column.*\['label'\]"):
        dataset_from_hf(hf.remove_columns("picture"), transform)

    arrays = datasets.Dataset.from_dict({"id": [7], "img": [np.asarray(gradient_image(16, 16))]})
    by_name = dataset_from_hf(arrays, transform)
    assert by_name.column == "img"
    assert torch.equal(by_name[0]["pixel_values"], transform(gradient_image(16, 16)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streaming_dataset_yields_each_row_once(num_workers):
    hf = fake_hub_dataset().to_iterable_dataset(num_shards=2)
    dataset = dataset_from_hf(hf, build_transform(8, random_crop=False, random_flip=False), name="stream")
    assert dataset.column == "picture"
    loader = build_dataloader(dataset, batch_size=2, shuffle=True, num_workers=num_workers, drop_last=False)
    batches = list(loader)
    assert sum(b["pixel_values"].shape[0] for b in batches) == 3
    assert [f for b in batches for f in b["skipped_files"]] == ["broken.png"]
    means = sorted(round(b["pixel_values"][i].mean().item(), 4) for b in batches for i in range(len(b["paths"])))
    assert len(set(means)) == 3  # three distinct images, none duplicated


def test_stream_without_features_finds_image_column_on_first_row():
    def rows():
        for i, image in enumerate([gradient_image(12, 12), gradient_image(12, 12, "L")]):
            yield {"id": i, "photo": {"bytes": encode_png(image), "path": None}}

    hf = datasets.IterableDataset.from_generator(rows)
    assert hf.features is None  # as for many raw streams: nothing to read the column type from
    transform = build_transform(8, random_crop=False, random_flip=False)
    items = list(dataset_from_hf(hf, transform))
    assert len(items) == 2 and torch.equal(items[0]["pixel_values"], transform(gradient_image(12, 12)))
    with pytest.raises(KeyError, match=r"'picture'.*\['id', 'photo'\]"):
        list(dataset_from_hf(hf, transform, image_column="picture"))
