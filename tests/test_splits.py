"""Tests for training/splits.py: split files, iNaturalist JSON, images, class names and the checks of
`load_labelled_split`. Expectations are written out by hand."""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from training.arguments import DataArguments
from training.data import ProcessorTransform, eval_image_processor, train_transform
from training.io_utils import DataError
from training.splits import (
    ImageDataset,
    check_images,
    check_labels,
    check_split_classes,
    class_counts,
    load_labelled_split,
    load_rgb,
    read_class_names,
    read_image_list,
    read_inat_json,
)


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def random_rgb(size=(48, 40), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def truncated_copy(image: Image.Image, path, **save_kwargs):
    image.save(path, **save_kwargs)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def check_read(list_file, root, num_classes: int):
    """A split file read and its labels checked against `num_classes`, as `load_labelled_split` does."""
    samples = read_image_list(list_file, root)
    check_labels(samples, num_classes)
    return samples


def load_split(path, root):
    """The split as the scripts read it (every check of `load_labelled_split`), with ten classes."""
    args = DataArguments(image_root=str(root), image_check="none")
    return load_labelled_split(args, str(path), None, "training split", class_names=[str(i) for i in range(10)])


# ----------------------------------------------------------------------------------------------------------------------
# read_image_list
# ----------------------------------------------------------------------------------------------------------------------


def test_read_image_list_parses_relative_paths_skips_blank_lines_and_keeps_spaces(tmp_path):
    list_file = write(
        tmp_path / "train.txt",
        "train/n01/a.JPEG 0\n\n   \ndir with space/my image.png 2\r\nb.png\t1\n  c.png 3  \n",
    )
    samples = check_read(list_file, "/data/root", 4)
    got = [(s.path, s.label, s.where) for s in samples]
    assert got == [
        ("/data/root/train/n01/a.JPEG", 0, f"{list_file}:1"),
        ("/data/root/dir with space/my image.png", 2, f"{list_file}:4"),
        ("/data/root/b.png", 1, f"{list_file}:5"),
        ("/data/root/c.png", 3, f"{list_file}:6"),
    ]


def test_read_image_list_without_num_classes_accepts_any_non_negative_label(tmp_path):
    samples = read_image_list(write(tmp_path / "t.txt", "a.png 12345\n"), tmp_path)
    assert [s.label for s in samples] == [12345]
    assert samples[0].path == os.path.join(tmp_path, "a.png")


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("c.png one", r"train\.txt:3: label 'one' is not an integer"),
        ("c.png 1.0", r"train\.txt:3: label '1\.0' is not an integer"),
        ("c.png -1", r"train\.txt:3: negative label -1"),
        ("c.png 4", r"train\.txt:3: label 4 is outside the class list \(0\.\.3\)"),
        ("c.png 400", r"train\.txt:3: label 400 is outside"),
        ("only_a_path.png", r"train\.txt:3: expected 'relative/path label'"),
    ],
)
def test_read_image_list_errors_name_file_and_line(tmp_path, bad_line, message):
    # line 2 is blank, so the bad line is line 3 of the file (blank lines still count)
    list_file = write(tmp_path / "train.txt", f"a.png 0\n\n{bad_line}\nd.png 1\n")
    with pytest.raises(DataError, match=message):
        check_read(list_file, tmp_path, 4)


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_read_image_list_empty_file(tmp_path, content):
    with pytest.raises(DataError, match=r"empty\.txt: the split is empty"):
        load_split(write(tmp_path / "empty.txt", content), tmp_path)


def test_read_image_list_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.txt: split file not found"):
        read_image_list(tmp_path / "nothere.txt", tmp_path)


def test_read_image_list_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9.png 0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt:1: not valid UTF-8"):
        read_image_list(path, tmp_path)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------------------------------------------------
# read_inat_json
# ----------------------------------------------------------------------------------------------------------------------


def inat(images, annotations, categories):
    return {"images": images, "annotations": annotations, "categories": categories}


def test_read_inat_json_joins_by_image_id_and_sorts_categories(tmp_path):
    data = inat(
        images=[
            {"id": 10, "file_name": "train_val2018/a/10.jpg"},
            {"id": 11, "file_name": "train_val2018/b/11.jpg"},
            {"id": 12, "file_name": "train_val2018/c/12.jpg"},
        ],
        # a different order from the images: zipping by position would give wrong labels
        annotations=[
            {"id": 1, "image_id": 12, "category_id": 3},
            {"id": 2, "image_id": 10, "category_id": 7},
            {"id": 3, "image_id": 11, "category_id": 5},
        ],
        categories=[{"id": 7, "name": "Panthera leo"}, {"id": 3, "name": "Aix sponsa"}, {"id": 5, "name": "Bufo"}],
    )
    path = write(tmp_path / "train2018.json", json.dumps(data))
    samples, class_names = read_inat_json(path, "/inat")
    check_labels(samples, 3)
    # categories sorted by id: 3 -> 0, 5 -> 1, 7 -> 2
    assert class_names == ["Aix sponsa", "Bufo", "Panthera leo"]
    assert [(s.path, s.label) for s in samples] == [
        ("/inat/train_val2018/a/10.jpg", 2),
        ("/inat/train_val2018/b/11.jpg", 1),
        ("/inat/train_val2018/c/12.jpg", 0),
    ]
    assert "image id 11" in samples[1].where and "train2018.json" in samples[1].where


def test_read_inat_json_image_without_annotation_names_the_image(tmp_path):
    data = inat(
        images=[{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        annotations=[{"image_id": 1, "category_id": 0}],
        categories=[{"id": 0, "name": "x"}],
    )
    with pytest.raises(DataError, match=r"val2018\.json: image id 2 \(b\.jpg\): has no annotation"):
        read_inat_json(write(tmp_path / "val2018.json", json.dumps(data)), tmp_path)


def test_read_inat_json_unknown_category_names_the_image(tmp_path):
    data = inat(
        images=[{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        annotations=[{"image_id": 1, "category_id": 0}, {"image_id": 2, "category_id": 99}],
        categories=[{"id": 0, "name": "x"}, {"id": 1, "name": "y"}],
    )
    with pytest.raises(DataError, match=r"image id 2 .*category_id 99 is not in the categories list"):
        read_inat_json(write(tmp_path / "val2018.json", json.dumps(data)), tmp_path)


def test_read_inat_json_label_outside_num_classes(tmp_path):
    data = inat(
        images=[{"id": 5, "file_name": "a.jpg"}],
        annotations=[{"image_id": 5, "category_id": 2}],
        categories=[{"id": i, "name": str(i)} for i in range(3)],
    )
    with pytest.raises(DataError, match=r"image id 5 .*label 2 is outside the class list"):
        check_labels(read_inat_json(write(tmp_path / "v.json", json.dumps(data)), tmp_path)[0], 2)


def test_read_inat_json_without_categories_uses_category_ids(tmp_path):
    data = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "category_id": 4}]}
    samples, class_names = read_inat_json(write(tmp_path / "v.json", json.dumps(data)), tmp_path)
    assert class_names is None and samples[0].label == 4


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", r"broken\.json: not valid JSON \(Expecting property name .* at line 1\)"),
        (json.dumps({"images": []}), r"broken\.json: missing the 'annotations' list"),
        (json.dumps({"images": [], "annotations": []}), r"broken\.json: the split is empty"),
    ],
)
def test_read_inat_json_bad_files(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        load_split(write(tmp_path / "broken.json", content), tmp_path)


def test_read_inat_json_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"gone\.json: iNaturalist JSON file not found"):
        read_inat_json(tmp_path / "gone.json", tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# load_rgb
# ----------------------------------------------------------------------------------------------------------------------


def as_array(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_load_rgb_cmyk():
    image = Image.new("CMYK", (3, 2), (0, 255, 255, 0))  # no cyan, full magenta + yellow: red
    assert (as_array(load_rgb(image)) == [255, 0, 0]).all()


def test_load_rgb_palette_with_and_without_transparency():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * (256 * 3 - 6))
    image.putpixel((0, 0), 1)
    image.putpixel((1, 0), 0)
    assert as_array(load_rgb(image)).tolist() == [[[200, 100, 50], [0, 0, 0]]]
    image.info["transparency"] = 0
    assert as_array(load_rgb(image))[0, 0].tolist() == [200, 100, 50]
    # transparency as a byte string: converted through RGBA, so PIL does not warn about it
    image.info["transparency"] = bytes([0, 255] + [255] * 254)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert as_array(load_rgb(image)).tolist() == [[[200, 100, 50], [0, 0, 0]]]


def test_load_rgb_rgba_la_and_bilevel():
    assert as_array(load_rgb(Image.new("RGBA", (2, 2), (10, 20, 30, 0))))[1, 1].tolist() == [10, 20, 30]
    assert as_array(load_rgb(Image.new("LA", (2, 2), (90, 128))))[0, 0].tolist() == [90, 90, 90]
    assert as_array(load_rgb(Image.new("1", (2, 2), 1)))[0, 0].tolist() == [255, 255, 255]


def test_load_rgb_grayscale():
    image = Image.fromarray(np.array([[0, 77], [200, 255]], dtype=np.uint8))
    assert image.mode == "L"
    out = as_array(load_rgb(image))
    assert out[..., 0].tolist() == [[0, 77], [200, 255]]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_load_rgb_keeps_rgb_and_opens_paths(tmp_path):
    image = random_rgb()
    assert load_rgb(image) is image
    image.save(tmp_path / "x.png")
    assert (as_array(load_rgb(tmp_path / "x.png")) == np.asarray(image)).all()
    assert (as_array(load_rgb(str(tmp_path / "x.png"))) == np.asarray(image)).all()


def test_load_rgb_16_bit_grayscale_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 32768], [40000, 65535, 257]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    image.save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    expected = np.round(values.astype(float) / 65535 * 255)  # 32768 -> 128 (mid-grey, not white)
    for source in (image, tmp_path / "gray16.png"):
        out = as_array(load_rgb(source))
        assert np.abs(out[..., 0] - expected).max() <= 1
        assert out[0, 2, 0] in (127, 128)
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()


def test_load_rgb_32_bit_integer_image_is_read_as_16_bit():
    """16-bit PNGs open in mode "I": values up to 65535 are scaled by the 16-bit range, not clipped to white and
    not stretched per image (a dark image stays dark)."""
    values = (np.arange(12, dtype=np.int32).reshape(3, 4) * 3000) + 500  # 500 .. 33500, far above 255
    image = Image.fromarray(values)
    assert image.mode == "I"
    out = as_array(load_rgb(image))[..., 0]
    expected = values / 65535 * 255
    assert np.abs(out - expected).max() <= 1
    assert (np.diff(out.flatten()) > 0).all()  # increasing like the input
    small = Image.fromarray(np.full((2, 2), 200, dtype=np.int32))  # already in 8-bit range: kept as is
    assert as_array(load_rgb(small))[..., 0].tolist() == [[200, 200], [200, 200]]


def test_load_rgb_float_image():
    """Float images in [0, 1] are scaled by 255; negative values clip to black."""
    image = Image.fromarray(np.array([[-1.0, 0.0], [0.5, 1.0]], dtype=np.float32))
    assert image.mode == "F"
    assert as_array(load_rgb(image))[..., 1].tolist() == [[0, 0], [128, 255]]


# ----------------------------------------------------------------------------------------------------------------------
# check_images and ImageDataset
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path):
    """Two good images, then one bad file per kind, each listed on line 3 of its own split file."""
    root = tmp_path / "imgs"
    root.mkdir()
    random_rgb(seed=1).save(root / "good0.png")
    random_rgb(seed=2).save(root / "good1.jpg", quality=90)
    truncated_copy(random_rgb((64, 64), seed=3), root / "cut.png")
    truncated_copy(random_rgb((64, 64), seed=4), root / "cut.jpg", quality=90)
    (root / "text.png").write_bytes(b"this is not an image at all\n" * 10)
    lists = {}
    for name, bad in [("missing", "absent.png"), ("cut_png", "cut.png"), ("cut_jpg", "cut.jpg"), ("text", "text.png")]:
        lists[name] = write(tmp_path / f"{name}.txt", f"good0.png 0\ngood1.jpg 1\n{bad} 0\n")
    lists["good"] = write(tmp_path / "good.txt", "good0.png 0\ngood1.jpg 1\n")
    return root, lists


def dataset_from(list_file, root, transform=None):
    return ImageDataset(read_image_list(list_file, root), transform)


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing", r"missing\.txt:3: image not found: .*absent\.png"),
        ("cut_png", r"cut_png\.txt:3: cannot read image .*cut\.png"),
        ("cut_jpg", r"cut_jpg\.txt:3: cannot read image .*cut\.jpg .*truncated"),
        ("text", r"text\.txt:3: cannot read image .*text\.png"),
    ],
)
def test_check_images_full_names_list_file_and_line(image_folder, name, message):
    root, lists = image_folder
    with pytest.raises(DataError, match=message):
        check_images(dataset_from(lists[name], root), mode="full", num_workers=2)


def test_check_images_header_mode_misses_truncation_full_mode_catches_it(image_folder):
    root, lists = image_folder
    dataset = dataset_from(lists["cut_jpg"], root)
    check_images(dataset, mode="header")  # a JPEG header is intact: only decoding finds the cut
    with pytest.raises(DataError, match=r"cut_jpg\.txt:3"):
        check_images(dataset, mode="full")


@pytest.mark.parametrize("name", ["missing", "text"])
def test_check_images_header_mode_still_catches_missing_and_non_images(image_folder, name):
    root, lists = image_folder
    with pytest.raises(DataError, match=rf"{name}\.txt:3"):
        check_images(dataset_from(lists[name], root), mode="header")


def test_check_images_none_skips_and_good_split_passes(image_folder):
    root, lists = image_folder
    for name in ("missing", "cut_png", "cut_jpg", "text"):
        check_images(dataset_from(lists[name], root), mode="none")
    for mode in ("full", "header"):
        check_images(dataset_from(lists["good"], root), mode=mode)
    with pytest.raises(ValueError, match="'full', 'header' or 'none'"):
        check_images(dataset_from(lists["good"], root), mode="fast")


def test_check_images_ignores_and_restores_load_truncated_images(image_folder):
    root, lists = image_folder
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # a user setting that would hide truncation
    try:
        with pytest.raises(DataError, match=r"cut_png\.txt:3"):
            check_images(dataset_from(lists["cut_png"], root), mode="full")
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def test_check_images_reports_first_bad_line_in_file_order(tmp_path):
    random_rgb().save(tmp_path / "ok.png")
    lines = ["ok.png 0"] * 150 + ["gone_a.png 0"] + ["ok.png 0"] * 100 + ["gone_b.png 1"]
    list_file = write(tmp_path / "many.txt", "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"many\.txt:151: image not found: .*gone_a\.png"):
        check_images(dataset_from(list_file, tmp_path), mode="header", num_workers=2)


def test_image_dataset_missing_or_non_image_file_raises_data_error_naming_line(image_folder):
    root, lists = image_folder
    with pytest.raises(DataError, match=r"missing\.txt:3: cannot read image \(FileNotFoundError"):
        dataset_from(lists["missing"], root, transform=lambda im: im)[2]
    with pytest.raises(DataError, match=r"text\.txt:3: cannot read image"):
        dataset_from(lists["text"], root, transform=lambda im: im)[(2, 5)]


def test_image_dataset_truncated_file_raises_data_error_naming_line(image_folder):
    root, lists = image_folder
    dataset = dataset_from(lists["cut_png"], root, transform=ProcessorTransform(eval_image_processor(32)))
    with pytest.raises(DataError, match=r"cut_png\.txt:3"):
        dataset[2]


def test_check_images_full_on_hf_dataset_with_truncated_image(image_folder):
    datasets = pytest.importorskip("datasets")
    root, _ = image_folder
    hf = datasets.Dataset.from_dict(
        {"image": [str(root / "good0.png"), str(root / "cut.jpg")], "label": [0, 1]}
    ).cast_column("image", datasets.Image())
    with pytest.raises(DataError, match=r"dataset row 1"):
        check_images(ImageDataset(hf, None), mode="full", num_workers=1)


def test_image_dataset_labels_and_plain_index(lt_dataset):
    samples = check_read(lt_dataset["train"], lt_dataset["root"], 4)
    dataset = ImageDataset(samples, ProcessorTransform(eval_image_processor(32)))
    assert len(dataset) == 12 + 6 + 3 + 2
    assert dataset.labels.tolist() == [0] * 12 + [1] * 6 + [2] * 3 + [3] * 2
    item = dataset[13]
    assert item["labels"] == 1 and item["sample_seed"] is None
    assert item["pixel_values"].shape == (3, 32, 32)
    assert dataset.describe(13) == f"{lt_dataset['train']}:14"
    assert class_counts(dataset.labels, 5).tolist() == [12, 6, 3, 2, 0]


def test_image_dataset_seeded_augmentation_is_deterministic_and_leaves_global_rng(lt_dataset):
    samples = check_read(lt_dataset["train"], lt_dataset["root"], 4)
    dataset = ImageDataset(samples, train_transform(32))
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = dataset[(3, 42)]
    b = dataset[(3, 42)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched by seeded draws
    assert a["sample_seed"] == 42 and a["labels"] == 0
    assert a["pixel_values"].shape == (3, 32, 32)
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    others = [dataset[(3, s)]["pixel_values"] for s in (43, 2**61 + 7, 99)]
    assert all(not torch.equal(a["pixel_values"], o) for o in others)
    # the result does not depend on the global RNG state either
    torch.manual_seed(999)
    assert torch.equal(dataset[(3, 42)]["pixel_values"], a["pixel_values"])


# ----------------------------------------------------------------------------------------------------------------------
# Class names
# ----------------------------------------------------------------------------------------------------------------------


def test_read_class_names_underscores_and_trailing_blank_lines(tmp_path):
    path = write(tmp_path / "classes.txt", "great_white_shark\n  tench \nice cream\n\n\n  \n")
    assert read_class_names(path) == ["great white shark", "tench", "ice cream"]


def test_read_class_names_empty_line_in_the_middle(tmp_path):
    path = write(tmp_path / "classes.txt", "a\nb\n\nc\n")
    with pytest.raises(DataError, match=r"classes\.txt:3: empty class name"):
        read_class_names(path)


@pytest.mark.parametrize("content", ["", "\n \n"])
def test_read_class_names_no_names(tmp_path, content):
    with pytest.raises(DataError, match=r"classes\.txt: no class names"):
        read_class_names(write(tmp_path / "classes.txt", content))


def test_read_class_names_missing_and_non_utf8(tmp_path):
    with pytest.raises(DataError, match=r"absent\.txt: class-name file not found"):
        read_class_names(tmp_path / "absent.txt")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match=r"bad\.txt:1: not valid UTF-8"):
        read_class_names(tmp_path / "bad.txt")


def test_check_split_classes():
    check_split_classes(np.array([0, 3, 3]), 4, "val")
    with pytest.raises(DataError, match=r"val: holds images of 1 class"):
        check_split_classes(np.array([2, 2, 2]), 4, "val")


# ----------------------------------------------------------------------------------------------------------------------
# load_labelled_split: the one path the scripts take
# ----------------------------------------------------------------------------------------------------------------------


def test_load_labelled_split_reads_checks_and_builds(lt_dataset):
    args = DataArguments(image_root=lt_dataset["root"], class_names=lt_dataset["classes"], image_check="full")
    split = load_labelled_split(args, lt_dataset["train"], None, "training split", min_classes=2)
    assert split.class_names == read_class_names(lt_dataset["classes"])
    assert split.labels.tolist() == [s.label for s in read_image_list(lt_dataset["train"], lt_dataset["root"])]
    assert split.class_counts.tolist() == np.bincount(split.labels, minlength=4).tolist()
    assert split.description == lt_dataset["train"]
    dataset = split.dataset(ProcessorTransform(eval_image_processor(32)))
    assert len(dataset) == len(split) and dataset[0]["pixel_values"].shape == (3, 32, 32)
    first = split.first_per_class(2)
    assert first.class_counts.tolist() == [min(2, n) for n in split.class_counts.tolist()]
    assert first.labels.tolist() == sorted(first.labels.tolist())  # split order kept (the split is sorted by class)


def test_load_labelled_split_not_given_is_none(tmp_path):
    assert load_labelled_split(DataArguments(), None, None, "evaluation split") is None
    assert load_labelled_split(DataArguments(dataset_name="x"), None, None, "evaluation split") is None


def test_load_labelled_split_checks_labels_against_the_given_class_list(tmp_path):
    list_file = write(tmp_path / "val.txt", "a.png 0\nb.png 1\nc.png 2\n")
    args = DataArguments(image_check="none")
    with pytest.raises(DataError, match=r"val\.txt:3: label 2 is outside the class list \(0\.\.1\)"):
        load_labelled_split(args, str(list_file), None, "evaluation split", class_names=["a", "b"])


def test_load_labelled_split_needs_min_classes(tmp_path):
    list_file = write(tmp_path / "train.txt", "a.png 0\nb.png 0\n")
    args = DataArguments(image_check="none")
    with pytest.raises(DataError, match=r"training split: holds images of 1 class\(es\) only"):
        load_labelled_split(args, str(list_file), None, "training split", class_names=["a", "b"], min_classes=2)


def test_load_labelled_split_without_class_names_names_the_flag(tmp_path):
    list_file = write(tmp_path / "train.txt", "a.png 0\nb.png 1\n")
    with pytest.raises(DataError, match=r"No class names: pass --class_names"):
        load_labelled_split(DataArguments(image_check="none"), str(list_file), None, "training split")
