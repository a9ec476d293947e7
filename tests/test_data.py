"""Tests for training/data.py: split files, images, class names, the text corpus and its tokens, the long-tail sampler,
transforms and collators. Expectations are written out by hand or computed with naive loops."""

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from transformers import AutoTokenizer

from training.data import (
    IMAGENET_TEMPLATES,
    CVLPCollator,
    DataError,
    ImageDataset,
    LongTailSampler,
    MixupCutmixCollator,
    ProcessorTransform,
    _sample_beta,
    build_class_corpus,
    check_images,
    check_split_classes,
    class_counts,
    eval_collator,
    eval_image_processor,
    load_rgb,
    one_hot_smoothed,
    read_class_names,
    read_image_list,
    read_inat_json,
    split_sentences,
    tokenize_corpus,
    train_transform,
    wikipedia_text,
)

# The CLIP normalisation constants, typed in from the OpenAI CLIP repository (not imported from the module).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


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


# ----------------------------------------------------------------------------------------------------------------------
# read_image_list
# ----------------------------------------------------------------------------------------------------------------------


def test_read_image_list_parses_relative_paths_skips_blank_lines_and_keeps_spaces(tmp_path):
    list_file = write(
        tmp_path / "train.txt",
        "train/n01/a.JPEG 0\n\n   \ndir with space/my image.png 2\r\nb.png\t1\n  c.png 3  \n",
    )
    samples = read_image_list(list_file, "/data/root", num_classes=4)
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
        read_image_list(list_file, tmp_path, num_classes=4)


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_read_image_list_empty_file(tmp_path, content):
    with pytest.raises(DataError, match=r"empty\.txt: the split is empty"):
        read_image_list(write(tmp_path / "empty.txt", content), tmp_path)


def test_read_image_list_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.txt: split file not found"):
        read_image_list(tmp_path / "nothere.txt", tmp_path)


def test_read_image_list_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9.png 0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not valid UTF-8"):
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
    samples, class_names = read_inat_json(path, "/inat", num_classes=3)
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
        read_inat_json(write(tmp_path / "v.json", json.dumps(data)), tmp_path, num_classes=2)


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
        read_inat_json(write(tmp_path / "broken.json", content), tmp_path)


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
    samples = read_image_list(lt_dataset["train"], lt_dataset["root"], num_classes=4)
    dataset = ImageDataset(samples, ProcessorTransform(eval_image_processor(32)))
    assert len(dataset) == 12 + 6 + 3 + 2
    assert dataset.labels.tolist() == [0] * 12 + [1] * 6 + [2] * 3 + [3] * 2
    item = dataset[13]
    assert item["labels"] == 1 and item["sample_seed"] is None
    assert item["pixel_values"].shape == (3, 32, 32)
    assert dataset.describe(13) == f"{lt_dataset['train']}:14"
    assert class_counts(dataset.labels, 5).tolist() == [12, 6, 3, 2, 0]


def test_image_dataset_seeded_augmentation_is_deterministic_and_leaves_global_rng(lt_dataset):
    samples = read_image_list(lt_dataset["train"], lt_dataset["root"], num_classes=4)
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
    with pytest.raises(DataError, match=r"bad\.txt: not valid UTF-8"):
        read_class_names(tmp_path / "bad.txt")


def test_check_split_classes():
    check_split_classes(np.array([0, 3, 3]), 4, "val")
    with pytest.raises(DataError, match=r"val: holds images of 1 class"):
        check_split_classes(np.array([2, 2, 2]), 4, "val")


# ----------------------------------------------------------------------------------------------------------------------
# Sentence splitting and Wikipedia sections
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The cat sat. The dog ran.", ["The cat sat.", "The dog ran."]),
        ("He left.She stayed.", ["He left.", "She stayed."]),  # no space, next is a capital
        ("It ended. then more", ["It ended.", "then more"]),  # white space is enough
        ("First line.\n\nSecond line.", ["First line.", "Second line."]),
        ("Why? Because it can.", ["Why?", "Because it can."]),
        ("Tools, e.g. this one, help.", ["Tools, e.g. this one, help."]),
        ("Tools, e.g. This one.", ["Tools, e.g. This one."]),
        ("Written by J. R. R. Tolkien in 1937. A classic.", ["Written by J. R. R. Tolkien in 1937.", "A classic."]),
        ("The U.S. Army grew. It won.", ["The U.S. Army grew.", "It won."]),
        # as the reference pattern: a capital and a full stop never end a sentence, so neither does an acronym
        ("Found in the USA. It is rare.", ["Found in the USA. It is rare."]),
        ("Is it a.b? Yes.", ["Is it a.b? Yes."]),
        ("Pi is 3.14 roughly. Yes.", ["Pi is 3.14 roughly.", "Yes."]),
        ("no full stop at the end", ["no full stop at the end"]),
        ("  padded.   Also padded.  ", ["padded.", "Also padded."]),
        ("", []),
        ("   \n ", []),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


WIKI = """Lions are large cats.

The lion is muscular.
== Description ==
Manes are dark.
=== Size ===
Males weigh more.
== References ==
Smith 2001.
=== Journals ===
Journal of Lions.
== External Links ==
http://example.org
== Further reading ==
Book one.
==Bibliography==
Book two.
== Behaviour ==
They hunt at night.
=== Hunting ===
Prides hunt together.
"""


def test_wikipedia_text_keeps_summary_and_sections_drops_reference_sections_and_headers():
    assert wikipedia_text(WIKI).splitlines() == [
        "Lions are large cats.",
        "The lion is muscular.",
        "Manes are dark.",
        "Males weigh more.",
        "They hunt at night.",
        "Prides hunt together.",
    ]


def test_wikipedia_text_without_headers_is_the_text_without_blank_lines():
    assert wikipedia_text("  One.\n\nTwo.  \n") == "One.\nTwo."


def test_wikipedia_text_sub_section_after_a_dropped_sub_section_of_a_kept_section():
    text = "Summary.\n== Works ==\nWorks.\n=== Bibliography ===\nA list.\n=== Filmography ===\nFilms.\n"
    assert wikipedia_text(text).splitlines() == ["Summary.", "Works.", "Films."]


# ----------------------------------------------------------------------------------------------------------------------
# build_class_corpus
# ----------------------------------------------------------------------------------------------------------------------


def test_imagenet_templates_are_clips_80():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    for t in ("a photo of a {}.", "itap of my {}.", "a tattoo of the {}.", "a {} in a video game."):
        assert t in IMAGENET_TEMPLATES


def templates_for(name):
    return [t.replace("{}", name) for t in IMAGENET_TEMPLATES]


def check_layout(corpus, expected_per_class):
    """sentences, labels, offsets and class_sentences against a hand-written list per class."""
    flat, labels, offsets = [], [], [0]
    for c, pool in enumerate(expected_per_class):
        flat += pool
        labels += [c] * len(pool)
        offsets.append(offsets[-1] + len(pool))
    assert corpus.sentences == flat
    assert corpus.labels.tolist() == labels
    assert corpus.offsets.tolist() == offsets
    for c, pool in enumerate(expected_per_class):
        assert corpus.class_sentences(c) == pool


def test_build_class_corpus_from_json_keyed_by_name(tmp_path):
    path = write(
        tmp_path / "corpus.json",
        json.dumps({"tabby cat": ["A cat sleeps.", "Cats purr."], "dog": "Dogs bark. They run fast."}),
    )
    corpus = build_class_corpus(["tabby cat", "dog"], path)
    check_layout(
        corpus,
        [
            templates_for("tabby cat") + ["A cat sleeps.", "Cats purr."],
            templates_for("dog") + ["Dogs bark.", "They run fast."],
        ],
    )
    assert corpus.class_sentences(0)[0] == "a bad photo of a tabby cat."
    assert corpus.stats == {"empty_dropped": 0, "duplicates_removed": 0, "template_sentences": 160}
    assert corpus.class_names == ["tabby cat", "dog"]


def test_build_class_corpus_from_json_keyed_by_index_without_templates(tmp_path):
    path = write(tmp_path / "c.json", json.dumps({"1": ["B one.", "B two."], "0": ["A one."], "2": ["C."]}))
    corpus = build_class_corpus(["a", "b", "c"], path, use_templates=False)
    check_layout(corpus, [["A one."], ["B one.", "B two."], ["C."]])
    assert corpus.stats["template_sentences"] == 0


def test_build_class_corpus_removes_duplicates_and_empty_sentences_within_a_class(tmp_path):
    path = write(
        tmp_path / "c.json",
        json.dumps(
            {
                "cat": ["A cat.", "A   cat.", "", "   ", "a photo of a cat.", "Cats\tpurr.", "A cat."],
                "dog": ["A cat.", "Dogs bark."],  # the same sentence in another class is kept there
            }
        ),
    )
    corpus = build_class_corpus(["cat", "dog"], path, drop_duplicates=True)
    check_layout(
        corpus, [templates_for("cat") + ["A cat.", "Cats purr."], templates_for("dog") + ["A cat.", "Dogs bark."]]
    )
    # "A   cat." and "A cat." repeat "A cat."; "a photo of a cat." repeats a template; "" and "   " are empty
    assert corpus.stats == {"empty_dropped": 2, "duplicates_removed": 3, "template_sentences": 160}
    # by default duplicates are kept, as the reference `SentPreProcessor` keeps them; empty sentences still go
    kept = build_class_corpus(["cat", "dog"], path)
    check_layout(
        kept,
        [
            templates_for("cat") + ["A cat.", "A cat.", "a photo of a cat.", "Cats purr.", "A cat."],
            templates_for("dog") + ["A cat.", "Dogs bark."],
        ],
    )
    assert kept.stats == {"empty_dropped": 2, "duplicates_removed": 0, "template_sentences": 160}


def test_build_class_corpus_from_desc_folder(tmp_path):
    for folder in (tmp_path / "flat", tmp_path / "official" / "wiki"):
        write(folder / "desc_0.txt", WIKI)
        write(folder / "desc_1.txt", "A rose is a plant. It has thorns.\n== References ==\nBook.\n")
        write(folder / "notes.txt", "ignored")
        write(folder / "desc_x.txt", "ignored: not an index")
    lion = [
        "Lions are large cats.",
        "The lion is muscular.",
        "Manes are dark.",
        "Males weigh more.",
        "They hunt at night.",
        "Prides hunt together.",
    ]
    rose = ["A rose is a plant.", "It has thorns."]
    for root in (tmp_path / "flat", tmp_path / "official"):
        corpus = build_class_corpus(["lion", "rose"], root)
        check_layout(corpus, [templates_for("lion") + lion, templates_for("rose") + rose])
        no_templates = build_class_corpus(["lion", "rose"], str(root), use_templates=False)
        check_layout(no_templates, [lion, rose])


@pytest.mark.parametrize("text_corpus", [None, "templates"])
def test_build_class_corpus_templates_only(text_corpus):
    corpus = build_class_corpus(["a b", "c", "d"], text_corpus)
    check_layout(corpus, [templates_for("a b"), templates_for("c"), templates_for("d")])
    assert corpus.offsets.tolist() == [0, 80, 160, 240]


def test_build_class_corpus_templates_off_and_no_corpus():
    with pytest.raises(DataError, match="templates are turned off"):
        build_class_corpus(["a"], None, use_templates=False)
    with pytest.raises(DataError, match="templates are turned off"):
        build_class_corpus(["a"], "templates", use_templates=False)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"cat": ["A cat."]}, r"1 class\(es\) have no sentences, e\.g\. 1 \('dog'\)"),
        ({"cat": ["A cat."], "dog": ["", "  "]}, r"have no sentences, e\.g\. 1 \('dog'\)"),
        ({"cat": ["A cat."], "dog": ["D."], "cow": ["Moo."]}, r"names class 'cow', which is not in the class list"),
        ({"cat": ["A cat."], "dog": ["D."], "2": ["Two."]}, r"names class '2', which is not in the class list"),
        ({"cat": ["A cat."], "dog": [1, 2]}, r"entry for class 'dog' must be a list of sentences"),
        (["A cat."], r"expected a JSON object"),
    ],
)
def test_build_class_corpus_json_errors(tmp_path, data, message):
    path = write(tmp_path / "corpus.json", json.dumps(data))
    with pytest.raises(DataError, match=message):
        build_class_corpus(["cat", "dog"], path)


def test_build_class_corpus_ambiguous_class_name_key(tmp_path):
    path = write(tmp_path / "corpus.json", json.dumps({"crane": ["A bird or a machine."]}))
    with pytest.raises(DataError, match=r"'crane' is ambiguous"):
        build_class_corpus(["crane", "crane"], path)


def test_build_class_corpus_file_errors(tmp_path):
    (tmp_path / "latin1.json").write_bytes('{"caf\xe9": ["x."]}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.json: not valid UTF-8"):
        build_class_corpus(["café"], tmp_path / "latin1.json")
    write(tmp_path / "broken.json", "{oops")
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        build_class_corpus(["a"], tmp_path / "broken.json")
    with pytest.raises(DataError, match=r"nowhere: text corpus not found"):
        build_class_corpus(["a"], tmp_path / "nowhere")


def test_build_class_corpus_desc_folder_errors(tmp_path):
    write(tmp_path / "d1" / "desc_0.txt", "Zero.")
    write(tmp_path / "d1" / "desc_1.txt", "One.")
    write(tmp_path / "d1" / "desc_5.txt", "Five.")
    with pytest.raises(DataError, match=r"desc_5\.txt: names class index 5, but there are 2 classes"):
        build_class_corpus(["a", "b"], tmp_path / "d1")

    write(tmp_path / "d2" / "desc_0.txt", "Zero.")
    with pytest.raises(DataError, match=r"have no sentences, e\.g\. 1 \('b'\)"):
        build_class_corpus(["a", "b"], tmp_path / "d2")

    write(tmp_path / "d3" / "desc_0.txt", "Zero.")
    (tmp_path / "d3" / "desc_1.txt").write_bytes("Caf\xe9 au lait.".encode("latin-1"))
    with pytest.raises(DataError, match=r"desc_1\.txt: not valid UTF-8"):
        build_class_corpus(["a", "b"], tmp_path / "d3")


def test_corpus_fingerprint_changes_with_content():
    a = build_class_corpus(["x", "y"])
    b = build_class_corpus(["x", "y"])
    c = build_class_corpus(["x", "z"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


# ----------------------------------------------------------------------------------------------------------------------
# tokenize_corpus
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_clip_dir):
    return AutoTokenizer.from_pretrained(tiny_clip_dir)


SENTENCES = {
    "short": ["A cat.", "Cats purr loudly at night."],
    "long": ["An extremely long sentence that has far more characters than the maximum length allows."],
}


def small_corpus(tmp_path, sentences=SENTENCES):
    path = write(tmp_path / "corpus.json", json.dumps(sentences))
    return build_class_corpus(list(sentences), path, use_templates=False)


def test_tokenize_corpus_rows_truncation_and_padding(tmp_path, tokenizer):
    corpus = small_corpus(tmp_path)
    max_length = 24
    tokens = tokenize_corpus(corpus, tokenizer, max_length=max_length, cache_dir=tmp_path / "cache")
    assert tokens.input_ids.shape == (3, max_length) and tokens.attention_mask.shape == (3, max_length)
    assert tokens.input_ids.dtype == torch.int64 and tokens.attention_mask.dtype == torch.int64
    num_truncated = 0
    for row, mask, sentence in zip(tokens.input_ids.tolist(), tokens.attention_mask.tolist(), corpus.sentences):
        full = tokenizer(sentence)["input_ids"]  # [SOT] + body + [EOT]
        assert full[0] == 0 and full[-1] == 1
        body = full[1:-1]
        if len(body) > max_length - 2:
            body = body[: max_length - 2]
            num_truncated += 1
        expected = [0] + body + [1]
        n = len(expected)
        assert row[:n] == expected
        assert row[n:] == [1] * (max_length - n)  # pad id 1
        assert mask == [1] * n + [0] * (max_length - n)
        assert row[0] == 0 and row[:n].count(1) == 1 and row[n - 1] == 1  # one EOT, at the end of the real tokens
    assert num_truncated == 1 and tokens.num_truncated == 1
    assert tokens.attention_mask[2].sum() == max_length  # the long sentence fills the row


def test_tokenize_corpus_cache_written_and_reused(tmp_path, tokenizer, monkeypatch):
    corpus = small_corpus(tmp_path)
    cache = tmp_path / "cache"
    first = tokenize_corpus(corpus, tokenizer, max_length=30, cache_dir=cache)
    files = sorted((cache / "tokens").glob("*.safetensors"))
    assert len(files) == 1

    def boom(*args, **kwargs):
        raise AssertionError("the tokenizer must not run when the cache is valid")

    monkeypatch.setattr(type(tokenizer), "__call__", boom)
    second = tokenize_corpus(corpus, tokenizer, max_length=30, cache_dir=cache)
    assert torch.equal(first.input_ids, second.input_ids)
    assert torch.equal(first.attention_mask, second.attention_mask)
    assert second.input_ids.dtype == torch.int64 and second.attention_mask.dtype == torch.int64
    assert second.num_truncated == first.num_truncated == 1


def test_tokenize_corpus_changed_corpus_or_length_gets_a_new_cache_entry(tmp_path, tokenizer, monkeypatch):
    cache = tmp_path / "cache"
    first = tokenize_corpus(small_corpus(tmp_path / "a"), tokenizer, max_length=30, cache_dir=cache)
    edited = {**SENTENCES, "short": ["A dog.", "Cats purr loudly at night."]}
    calls = []
    original = type(tokenizer).__call__

    def counting(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("text"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    second = tokenize_corpus(small_corpus(tmp_path / "b", edited), tokenizer, max_length=30, cache_dir=cache)
    assert len(calls) == 1  # re-tokenised, not read from the stale entry
    assert not torch.equal(first.input_ids, second.input_ids)
    assert torch.equal(first.input_ids[1:], second.input_ids[1:])
    assert len(list((cache / "tokens").glob("*.safetensors"))) == 2
    third = tokenize_corpus(small_corpus(tmp_path / "a"), tokenizer, max_length=40, cache_dir=cache)
    assert third.input_ids.shape == (3, 40) and third.num_truncated == 1
    assert len(list((cache / "tokens").glob("*.safetensors"))) == 3


def test_tokenize_corpus_corrupted_cache_is_rebuilt(tmp_path, tokenizer):
    corpus = small_corpus(tmp_path)
    cache = tmp_path / "cache"
    good = tokenize_corpus(corpus, tokenizer, max_length=30, cache_dir=cache)
    (cache_file,) = (cache / "tokens").glob("*.safetensors")
    cache_file.write_bytes(b"\x00garbage, not safetensors" * 3)
    rebuilt = tokenize_corpus(corpus, tokenizer, max_length=30, cache_dir=cache)
    assert torch.equal(rebuilt.input_ids, good.input_ids) and rebuilt.num_truncated == good.num_truncated
    # the entry was rewritten and is readable again
    from safetensors.torch import load_file

    assert torch.equal(load_file(cache_file)["input_ids"].long(), good.input_ids)


def test_tokenize_corpus_cache_with_wrong_row_count_is_rebuilt(tmp_path, tokenizer):
    from safetensors.torch import save_file

    corpus = small_corpus(tmp_path)
    cache = tmp_path / "cache"
    good = tokenize_corpus(corpus, tokenizer, max_length=30, cache_dir=cache)
    (cache_file,) = (cache / "tokens").glob("*.safetensors")
    save_file(
        {
            "input_ids": torch.zeros(1, 30, dtype=torch.int32),
            "attention_mask": torch.zeros(1, 30, dtype=torch.int8),
            "num_truncated": torch.tensor(0),
        },
        cache_file,
    )
    assert torch.equal(tokenize_corpus(corpus, tokenizer, max_length=30, cache_dir=cache).input_ids, good.input_ids)


def test_tokenize_corpus_default_cache_dir_is_vlltr_cache(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("VLLTR_CACHE", str(tmp_path / "env_cache"))
    tokenize_corpus(small_corpus(tmp_path), tokenizer, max_length=20)
    assert len(list((tmp_path / "env_cache" / "tokens").glob("*.safetensors"))) == 1


# ----------------------------------------------------------------------------------------------------------------------
# LongTailSampler
# ----------------------------------------------------------------------------------------------------------------------

COUNTS = [100, 25, 4, 1]  # sqrt: 10, 5, 2, 1


def long_tail_labels():
    labels = []
    for c, n in enumerate(COUNTS):
        labels += [c] * n
    rng = np.random.default_rng(0)
    return rng.permutation(labels)  # classes interleaved, so index order tells nothing


def test_sampler_sqrt_class_frequencies_and_uniform_within_class():
    labels = long_tail_labels()
    draws = 100_000
    sampler = LongTailSampler(labels, "sqrt", num_samples=draws, seed=3)
    indices = np.array([i for i, _ in sampler])
    assert len(indices) == draws == len(sampler)
    observed = np.bincount(labels[indices], minlength=4)
    roots = [math.sqrt(n) for n in COUNTS]
    expected_p = [r / sum(roots) for r in roots]  # 10/18, 5/18, 2/18, 1/18
    chi2 = 0.0
    for c in range(4):
        p = expected_p[c]
        se = math.sqrt(p * (1 - p) / draws)
        assert abs(observed[c] / draws - p) < 3 * se, (c, observed[c] / draws, p)
        chi2 += (observed[c] - draws * p) ** 2 / (draws * p)
    assert chi2 < 16.27  # chi-square, 3 degrees of freedom, 99.9 %
    # within class 0, each of its 100 images equally likely
    members = np.flatnonzero(labels == 0)
    per_image = np.array([np.sum(indices == m) for m in members])
    expected = observed[0] / len(members)
    assert ((per_image - expected) ** 2 / expected).sum() < 148.2  # chi-square, 99 d.o.f., 99.9 %
    # all images of the tail class are drawn, and nothing outside the dataset
    assert indices.min() >= 0 and indices.max() < len(labels)


def test_sampler_class_mode_balances_classes():
    labels = long_tail_labels()
    draws = 40_000
    indices = np.array([i for i, _ in LongTailSampler(labels, "class", num_samples=draws, seed=1)])
    observed = np.bincount(labels[indices], minlength=4) / draws
    se = math.sqrt(0.25 * 0.75 / draws)
    assert np.all(np.abs(observed - 0.25) < 3 * se), observed


def test_sampler_instance_mode_is_a_permutation_and_default_length_is_dataset_size():
    labels = long_tail_labels()
    sampler = LongTailSampler(labels, "instance", seed=5)
    items = list(sampler)
    assert len(sampler) == len(items) == len(labels)
    assert sorted(i for i, _ in items) == list(range(len(labels)))
    assert [i for i, _ in items] != list(range(len(labels)))  # shuffled
    sqrt_default = LongTailSampler(labels, "sqrt")
    assert len(sqrt_default) == len(list(sqrt_default)) == len(labels)


def test_sampler_yields_index_seed_pairs_and_epochs():
    labels = long_tail_labels()
    sampler = LongTailSampler(labels, "sqrt", num_samples=64, seed=7)
    epoch0 = list(sampler)
    assert all(isinstance(i, int) and isinstance(s, int) and 0 <= s < 2**62 for i, s in epoch0)
    assert len({s for _, s in epoch0}) == 64  # per-draw seeds are distinct
    assert list(sampler) == epoch0  # iterating again without set_epoch repeats
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert [i for i, _ in epoch1] != [i for i, _ in epoch0] and [s for _, s in epoch1] != [s for _, s in epoch0]
    again = LongTailSampler(labels, "sqrt", num_samples=64, seed=7)
    again.set_epoch(1)
    assert list(again) == epoch1  # same (seed, epoch): same draws, in a fresh process too
    other_seed = LongTailSampler(labels, "sqrt", num_samples=64, seed=8)
    assert list(other_seed) != epoch0


def test_sampler_rejects_unknown_mode():
    with pytest.raises(ValueError, match="sampling mode must be one of"):
        LongTailSampler([0, 1], "balanced")


@pytest.mark.parametrize("mode, batch_size", [("sqrt", 4), ("instance", 5)])
def test_sampler_shards_are_disjoint_and_cover_the_global_sequence(mode, batch_size):
    from accelerate.data_loader import BatchSamplerShard

    labels = long_tail_labels()  # 130 images
    sampler = LongTailSampler(labels, mode, num_samples=96 if mode == "sqrt" else None, seed=2)
    sampler.set_epoch(3)
    loader = torch.utils.data.DataLoader(
        list(range(len(labels))), sampler=sampler, batch_size=batch_size, collate_fn=lambda x: x
    )
    global_batches = list(loader.batch_sampler)
    expected = list(sampler)
    assert [item for batch in global_batches for item in batch] == expected
    shards = [
        list(BatchSamplerShard(loader.batch_sampler, num_processes=2, process_index=i, split_batches=False))
        for i in range(2)
    ]
    assert len(global_batches) % 2 == 0  # an even number of batches: no padding from the start of the epoch
    assert shards[0] == global_batches[0::2] and shards[1] == global_batches[1::2]
    # positions are disjoint and together cover the sequence, in order
    positions = {0: set(), 1: set()}
    for b in range(len(global_batches)):
        rank = b % 2
        positions[rank].update(range(b * batch_size, (b + 1) * batch_size))
    assert positions[0].isdisjoint(positions[1])
    assert positions[0] | positions[1] == set(range(len(expected)))
    interleaved = [item for pair in zip(shards[0], shards[1]) for batch in pair for item in batch]
    assert interleaved == expected


def test_sampler_feeds_a_data_loader_end_to_end(lt_dataset, tmp_path, tokenizer):
    samples = read_image_list(lt_dataset["train"], lt_dataset["root"], num_classes=4)
    dataset = ImageDataset(samples, train_transform(32, rand_augment=False))
    corpus = build_class_corpus(read_class_names(lt_dataset["classes"]), lt_dataset["corpus"])
    tokens = tokenize_corpus(corpus, tokenizer, cache_dir=tmp_path)
    sampler = LongTailSampler(dataset.labels, "sqrt", num_samples=8, seed=0)
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=4, collate_fn=CVLPCollator(tokens, corpus)
    )
    batches = list(loader)
    assert len(batches) == 2
    draws = list(sampler)
    for b, batch in enumerate(batches):
        assert batch["pixel_values"].shape == (4, 3, 32, 32)
        assert batch["labels"].tolist() == [int(dataset.labels[i]) for i, _ in draws[4 * b : 4 * b + 4]]
        assert corpus.labels[batch["sentence_ids"].numpy()].tolist() == batch["labels"].tolist()
    assert torch.equal(batches[0]["pixel_values"][0], dataset[draws[0]]["pixel_values"])


# ----------------------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------------------


def test_eval_image_processor_224_settings():
    processor = eval_image_processor(224)
    assert processor.size == {"shortest_edge": 256}
    assert processor.crop_size == {"height": 224, "width": 224}
    assert int(processor.resample) == int(Image.Resampling.BICUBIC)
    assert processor.do_center_crop and processor.do_normalize and processor.do_resize
    assert np.allclose(processor.image_mean, MEAN) and np.allclose(processor.image_std, STD)


def test_eval_image_processor_32_short_side_36():
    processor = eval_image_processor(32)
    assert processor.size == {"shortest_edge": 36}
    assert processor.crop_size == {"height": 32, "width": 32}


def test_eval_image_processor_output_resize_crop_and_normalisation():
    # 300 (high) x 500 (wide), white, with black bands that only "resize short side to 256, crop 224" removes:
    # 12 rows at the top (10.2 rows after resizing, crop starts 16 rows down) and 100 columns on the left
    # (85 columns after resizing, the crop starts about 101 columns in)
    array = np.full((300, 500, 3), 255, dtype=np.uint8)
    array[:12] = 0
    array[:, :100] = 0
    out = ProcessorTransform(eval_image_processor(224))(Image.fromarray(array))
    assert out.shape == (3, 224, 224)
    white = torch.tensor([(1.0 - m) / s for m, s in zip(MEAN, STD)])[:, None, None]
    assert torch.allclose(out, white.expand_as(out), atol=0.05)
    # a flat colour checks rescaling and CLIP mean / std
    flat = np.zeros((300, 500, 3), dtype=np.uint8)
    flat[..., 0], flat[..., 1], flat[..., 2] = 128, 64, 32
    out = ProcessorTransform(eval_image_processor(224))(Image.fromarray(flat))
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip((128, 64, 32), MEAN, STD)])[:, None, None]
    assert torch.allclose(out, expected.expand_as(out), atol=1e-3)


def test_eval_image_processor_converts_grayscale():
    out = ProcessorTransform(eval_image_processor(32))(Image.new("L", (50, 40), 255))
    assert out.shape == (3, 32, 32)


def test_train_transform_output():
    transform = train_transform(32)
    torch.manual_seed(0)
    out = transform(random_rgb((50, 40)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    plain = train_transform(32, crop_scale=(1.0, 1.0), hflip=0, rand_augment=False, random_erasing=0)
    image = Image.new("RGB", (40, 40), (128, 64, 32))
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip((128, 64, 32), MEAN, STD)])[:, None, None]
    assert torch.allclose(plain(image), expected.expand(3, 32, 32), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# CVLPCollator
# ----------------------------------------------------------------------------------------------------------------------


def features_for(labels, seeds, size=4):
    return [
        {"pixel_values": torch.full((3, size, size), float(i)), "labels": int(y), "sample_seed": s}
        for i, (y, s) in enumerate(zip(labels, seeds))
    ]


@pytest.fixture
def lt_corpus_tokens(lt_dataset, tokenizer, tmp_path):
    corpus = build_class_corpus(read_class_names(lt_dataset["classes"]), lt_dataset["corpus"])
    return corpus, tokenize_corpus(corpus, tokenizer, cache_dir=tmp_path)


def test_cvlp_collator_sentences_belong_to_the_class_and_are_trimmed(lt_corpus_tokens):
    corpus, tokens = lt_corpus_tokens
    collator = CVLPCollator(tokens, corpus)
    labels = [0, 3, 3, 1, 2, 0, 1]
    seeds = [11, 2**61 + 3, 5, 987654321, 42, 7, 2**40]
    batch = collator(features_for(labels, seeds))
    ids = batch["sentence_ids"].tolist()
    assert batch["labels"].tolist() == labels
    assert [int(corpus.labels[i]) for i in ids] == labels
    for i, y in zip(ids, labels):  # an index inside the class's block
        start, end = corpus.offsets[y], corpus.offsets[y + 1]
        assert start <= i < end
    lengths = [int(tokens.attention_mask[i].sum()) for i in ids]
    length = max(lengths)
    assert batch["input_ids"].shape == (7, length) and batch["attention_mask"].shape == (7, length)
    for row, i in enumerate(ids):
        assert batch["input_ids"][row].tolist() == tokens.input_ids[i, :length].tolist()
        assert batch["attention_mask"][row].tolist() == [1] * lengths[row] + [0] * (length - lengths[row])
        assert tokens.attention_mask[i, length:].sum() == 0  # nothing real was cut off
    assert torch.equal(batch["pixel_values"][:, 0, 0, 0], torch.arange(7, dtype=torch.float32))
    again = collator(features_for(labels, seeds))
    assert torch.equal(again["sentence_ids"], batch["sentence_ids"])
    assert torch.equal(again["input_ids"], batch["input_ids"])


def test_cvlp_collator_draws_cover_each_class_pool_uniformly(tmp_path, tokenizer):
    corpus = small_corpus(tmp_path, {"a": ["A one.", "A two.", "A three."], "b": ["B one.", "B two."]})
    collator = CVLPCollator(tokenize_corpus(corpus, tokenizer, cache_dir=tmp_path), corpus)
    rng = np.random.default_rng(0)
    seeds = [int(s) for s in rng.integers(0, 2**62, size=6000)]
    labels = [k % 2 for k in range(6000)]
    ids = collator(features_for(labels, seeds, size=1))["sentence_ids"].numpy()
    assert (corpus.labels[ids] == np.array(labels)).all()
    for c, n in ((0, 3), (1, 2)):
        mine = ids[np.array(labels) == c]
        counts = np.bincount(mine - corpus.offsets[c], minlength=n)
        assert len(counts) == n
        expected = len(mine) / n
        assert ((counts - expected) ** 2 / expected).sum() < 13.8  # chi-square, <= 2 d.o.f., 99.9 %


def test_cvlp_collator_without_seeds(lt_corpus_tokens):
    corpus, tokens = lt_corpus_tokens
    batch = CVLPCollator(tokens, corpus)(features_for([2, 1, 0], [None, None, None]))
    assert [int(corpus.labels[i]) for i in batch["sentence_ids"]] == [2, 1, 0]


# ----------------------------------------------------------------------------------------------------------------------
# MixupCutmixCollator
# ----------------------------------------------------------------------------------------------------------------------


def mix_features(seeds, batch=6, size=12, labels=None):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    labels = list(range(batch)) if labels is None else labels
    return pixels, [{"pixel_values": pixels[b], "labels": labels[b], "sample_seed": seeds[b]} for b in range(batch)]


def naive_smoothed(labels, num_classes, eps):
    return torch.tensor(
        [[1 - eps + eps / num_classes if c == y else eps / num_classes for c in range(num_classes)] for y in labels]
    )


def test_mixup_collator_without_mixing_or_smoothing_keeps_class_ids():
    pixels, features = mix_features([1, 2, 3, 4, 5, 6], labels=[3, 1, 4, 1, 5, 0])
    out = MixupCutmixCollator(6, mixup_alpha=0, cutmix_alpha=0, label_smoothing=0)(features)
    assert out["labels"].dtype == torch.int64 and out["labels"].tolist() == [3, 1, 4, 1, 5, 0]
    assert torch.equal(out["pixel_values"], pixels)


def test_mixup_collator_smoothing_only():
    pixels, features = mix_features([1, 2, 3, 4, 5, 6], labels=[3, 1, 4, 1, 5, 0])
    out = MixupCutmixCollator(7, mixup_alpha=0, cutmix_alpha=0, label_smoothing=0.1)(features)
    assert torch.equal(out["pixel_values"], pixels)
    targets = out["labels"]
    assert targets.shape == (6, 7)
    assert torch.allclose(targets, naive_smoothed([3, 1, 4, 1, 5, 0], 7, 0.1))
    assert math.isclose(targets[0, 3].item(), 1 - 0.1 + 0.1 / 7, rel_tol=1e-6)
    assert math.isclose(targets[0, 0].item(), 0.1 / 7, rel_tol=1e-6)
    assert torch.allclose(one_hot_smoothed(torch.tensor([3, 1, 4, 1, 5, 0]), 7, 0.1), targets)


def test_mixup_collator_prob_zero_gives_smoothed_targets_only():
    pixels, features = mix_features([9, 8, 7, 6, 5, 4])
    out = MixupCutmixCollator(6, prob=0.0, label_smoothing=0.2)(features)
    assert torch.equal(out["pixel_values"], pixels)
    assert torch.allclose(out["labels"], naive_smoothed(range(6), 6, 0.2))


def recover_lambda(targets, eps, num_classes):
    on, off = 1 - eps + eps / num_classes, eps / num_classes
    return (targets[0, 0].item() - off) / (on - off)  # row 0 is label 0 mixed with label 5


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_mixup_images_and_targets_are_a_convex_combination(eps):
    num_classes = 6
    lambdas = []
    for trial in range(5):
        seeds = [100 * trial + k for k in range(6)]
        pixels, features = mix_features(seeds)
        collator = MixupCutmixCollator(num_classes, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=eps)
        out = collator(features)
        targets = out["labels"]
        assert torch.allclose(targets.sum(1), torch.ones(6), atol=1e-6)
        lam = recover_lambda(targets, eps, num_classes)
        assert 0.0 <= lam <= 1.0
        y = naive_smoothed(range(6), num_classes, eps)
        y_flipped = naive_smoothed(list(reversed(range(6))), num_classes, eps)
        assert torch.allclose(targets, lam * y + (1 - lam) * y_flipped, atol=1e-6)
        expected = torch.stack([lam * pixels[b] + (1 - lam) * pixels[5 - b] for b in range(6)])
        assert torch.allclose(out["pixel_values"], expected, atol=1e-5)
        lambdas.append(lam)
    assert len({round(v, 6) for v in lambdas}) == 5  # λ changes with the seeds
    assert any(0.05 < v < 0.95 for v in lambdas)


def test_cutmix_pastes_one_box_and_lambda_is_the_unpasted_area():
    num_classes, size = 6, 12
    fractions = []
    for trial in range(12):
        seeds = [7 * trial + k + 1 for k in range(6)]
        pixels, features = mix_features(seeds, size=size)
        out = MixupCutmixCollator(num_classes, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1)(features)
        mixed, targets = out["pixel_values"], out["labels"]
        flipped = torch.stack([pixels[5 - b] for b in range(6)])
        box = (mixed[0] != pixels[0]).any(0)  # (H, W)
        for b in range(6):
            assert torch.equal(mixed[b][:, box], flipped[b][:, box])
            assert torch.equal(mixed[b][:, ~box], pixels[b][:, ~box])
        rows, cols = box.any(1), box.any(0)
        assert torch.equal(box, rows[:, None] & cols[None, :])  # a rectangle
        for line in (rows, cols):
            hits = torch.nonzero(line).flatten().tolist()
            if hits:
                assert hits == list(range(hits[0], hits[-1] + 1))  # contiguous
        area = box.float().mean().item()
        lam = recover_lambda(targets, 0.1, num_classes)
        assert math.isclose(lam, 1 - area, abs_tol=1e-6)
        assert torch.allclose(targets.sum(1), torch.ones(6), atol=1e-6)
        y = naive_smoothed(range(6), num_classes, 0.1)
        assert torch.allclose(targets, lam * y + (1 - lam) * y.flip(0), atol=1e-6)
        fractions.append(area)
    assert any(0 < a < 1 for a in fractions) and len(set(fractions)) > 3


def test_mixup_cutmix_switch_prob_selects_the_method():
    seeds = [3, 1, 4, 1, 5, 9]
    pixels, features = mix_features(seeds)
    always_mixup = MixupCutmixCollator(6, switch_prob=0.0)(features)["pixel_values"]
    assert (always_mixup != pixels).all()  # every pixel blended
    for trial in range(5):
        pixels, features = mix_features([s + trial for s in seeds])
        always_cutmix = MixupCutmixCollator(6, switch_prob=1.0)(features)["pixel_values"]
        assert (always_cutmix == pixels).any()  # a box: some pixels untouched
        unchanged = always_cutmix == pixels
        pasted = always_cutmix == pixels.flip(0)
        assert (unchanged | pasted).all()


def test_mixup_cutmix_is_deterministic_in_the_seeds():
    collator = MixupCutmixCollator(6)
    _, features = mix_features([5, 6, 7, 8, 9, 10])
    a, b = collator(features), collator(features)
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
    outputs = [collator(mix_features([5 + t, 6, 7, 8, 9, 10])[1])["labels"] for t in range(1, 4)]
    assert any(not torch.equal(a["labels"], o) for o in outputs)
    # without seeds it still mixes (from the global RNG)
    _, unseeded = mix_features([None] * 6)
    out = collator(unseeded)
    assert torch.allclose(out["labels"].sum(1), torch.ones(6), atol=1e-6)


@pytest.mark.parametrize("alpha", [0.8, 1.0])
def test_sample_beta_moments(alpha):
    generator = torch.Generator().manual_seed(0)
    n = 20_000
    draws = np.array([_sample_beta(alpha, generator) for _ in range(n)])
    assert ((draws > 0) & (draws < 1)).all()
    variance = 1 / (4 * (2 * alpha + 1))  # Beta(α, α)
    assert abs(draws.mean() - 0.5) < 3 * math.sqrt(variance / n)
    # standard error of the sample variance from the fourth moment of Beta(α, α)
    excess_kurtosis = -6 / (2 * alpha + 3)
    se_var = variance * math.sqrt((2 + excess_kurtosis) / n)
    assert abs(draws.var() - variance) < 3 * se_var
    # the shape matches numpy's Beta sampler at a few quantiles
    reference = np.random.default_rng(1).beta(alpha, alpha, size=200_000)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        assert abs(np.quantile(draws, q) - np.quantile(reference, q)) < 0.02


def test_eval_collator():
    _, features = mix_features([None] * 6, labels=[5, 4, 3, 2, 1, 0])
    out = eval_collator(features)
    assert out["pixel_values"].shape == (6, 3, 12, 12) and out["labels"].tolist() == [5, 4, 3, 2, 1, 0]
