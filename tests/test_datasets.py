"""Dataset readers: label mappings, layouts, counts and messy-folder decisions."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from fakes_datasets import (
    make_csv_dataset,
    make_folder_tree,
    make_rafdb_tree,
    make_sfew_tree,
    tinted_image,
    write_image,
)

from parsing.datasets import (
    EXPRESSION_ALIASES,
    RAFDB_NATIVE_LABELS,
    DatasetError,
    expression_id,
    format_counts_table,
    parse_label,
    read_dataset,
)
from parsing.labels import EXPRESSIONS


def as_expected(listing):
    return [(record.name, EXPRESSIONS[record.label], record.split) for record in listing.records]


def some_image(size=8):
    return tinted_image(np.random.default_rng(1), size, 0)


# --- label mappings --------------------------------------------------------------------------


def test_canonical_order_pinned():
    assert EXPRESSIONS == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


@pytest.mark.parametrize(
    "native, canonical_id",
    [(1, 5), (2, 2), (3, 1), (4, 3), (5, 4), (6, 0), (7, 6)],
    ids=["surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"],
)
def test_rafdb_native_label_mapping(native, canonical_id):
    assert EXPRESSIONS.index(RAFDB_NATIVE_LABELS[native]) == canonical_id


def test_rafdb_reader_applies_mapping(tmp_path):
    label_file = tmp_path / "EmoLabel" / "list_patition_label.txt"
    label_file.parent.mkdir()
    lines = []
    for native in range(1, 8):
        write_image(tmp_path / "Image" / "aligned" / f"train_{native:05d}_aligned.jpg", some_image())
        lines.append(f"train_{native:05d}.jpg {native}")
    label_file.write_text("\n".join(lines) + "\n")
    listing = read_dataset("rafdb", tmp_path)
    labels = {record.name: record.label for record in listing.records}
    # native 1 Surprise -> 5, 2 Fear -> 2, 3 Disgust -> 1, 4 Happiness -> 3, 5 Sadness -> 4,
    # 6 Anger -> 0, 7 Neutral -> 6.
    expected = {1: 5, 2: 2, 3: 1, 4: 3, 5: 4, 6: 0, 7: 6}
    for native, canonical_id in expected.items():
        assert labels[f"Image/aligned/train_{native:05d}_aligned.jpg"] == canonical_id


@pytest.mark.parametrize(
    "folder, canonical_id",
    [
        ("Angry", 0),
        ("Disgust", 1),
        ("Fear", 2),
        ("Happy", 3),
        ("Sad", 4),
        ("Surprise", 5),
        ("Neutral", 6),
    ],
)
def test_sfew_folder_mapping(folder, canonical_id):
    assert expression_id(folder) == canonical_id


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("anger", "angry"),
        ("HAPPINESS", "happy"),
        ("Sadness", "sad"),
        ("surprised", "surprise"),
        ("disgusted", "disgust"),
        ("Fearful", "fear"),
        ("neutral", "neutral"),
    ],
)
def test_alias_mapping(alias, canonical):
    assert expression_id(alias) == EXPRESSIONS.index(canonical)


def test_aliases_cover_all_classes():
    assert set(EXPRESSION_ALIASES.values()) == set(EXPRESSIONS)
    assert expression_id("contempt") is None


@pytest.mark.parametrize(
    "text, expected",
    [("0", 0), ("6", 6), ("7", None), ("-1", None), ("Happy", 3), ("anger", 0), ("smile", None)],
)
def test_parse_label(text, expected):
    assert parse_label(text) == expected


# --- RAF-DB ----------------------------------------------------------------------------------


def test_rafdb_tree_listing(tmp_path):
    expected = make_rafdb_tree(tmp_path, n_train_per_class=2, n_test_per_class=1)
    listing = read_dataset("rafdb", tmp_path)
    assert as_expected(listing) == expected
    assert listing.source_format == "rafdb"
    assert listing.skipped == []
    counts = listing.counts()
    assert list(counts) == ["test", "train"]
    assert counts["train"] == {name: 2 for name in EXPRESSIONS}
    assert counts["test"] == {name: 1 for name in EXPRESSIONS}


def test_rafdb_crlf_and_whitespace(tmp_path):
    expected = make_rafdb_tree(tmp_path, line_ending="\r\n")
    label_file = tmp_path / "EmoLabel" / "list_patition_label.txt"
    lines = label_file.read_bytes().split(b"\r\n")
    padded = [b"  " + line.replace(b" ", b" \t ") + b"  " for line in lines if line]
    label_file.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(padded) + b"\r\n\r\n  \r\n\r\n")
    assert as_expected(read_dataset("rafdb", tmp_path)) == expected


@pytest.mark.parametrize("bad_label", ["0", "8", "five"])
def test_rafdb_invalid_label_line(tmp_path, bad_label):
    make_rafdb_tree(tmp_path)
    label_file = tmp_path / "EmoLabel" / "list_patition_label.txt"
    lines = label_file.read_text().splitlines()
    lines[2] = f"train_00003.jpg {bad_label}"
    label_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"list_patition_label\.txt, line 3") as caught:
        read_dataset("rafdb", tmp_path, on_bad="skip")
    assert bad_label in str(caught.value)


def test_rafdb_malformed_line_and_duplicate(tmp_path):
    make_rafdb_tree(tmp_path)
    label_file = tmp_path / "EmoLabel" / "list_patition_label.txt"
    original = label_file.read_text()

    label_file.write_text(original + "train_00001.jpg 3 extra\n")
    with pytest.raises(DatasetError, match="line 15: expected"):
        read_dataset("rafdb", tmp_path)

    label_file.write_text(original + "train_00001.jpg 3\n")
    with pytest.raises(DatasetError, match="listed again"):
        read_dataset("rafdb", tmp_path)

    label_file.write_text(original + "val_00001.jpg 3\n")
    with pytest.raises(DatasetError, match="split is unknown"):
        read_dataset("rafdb", tmp_path)


def test_rafdb_missing_image(tmp_path, caplog):
    expected = make_rafdb_tree(tmp_path)
    missing = tmp_path / "Image" / "aligned" / "test_00002_aligned.jpg"
    missing.unlink()
    with pytest.raises(DatasetError, match="test_00002_aligned.jpg") as caught:
        read_dataset("rafdb", tmp_path)
    assert "line" in str(caught.value)

    with caplog.at_level(logging.WARNING, logger="parsing.datasets"):
        listing = read_dataset("rafdb", tmp_path, on_bad="skip")
    assert len(listing.skipped) == 1
    assert listing.skipped[0]["path"] == str(missing)
    assert "missing" in listing.skipped[0]["reason"]
    assert "test_00002_aligned.jpg" in caplog.text
    assert len(listing.records) == len(expected) - 1


def test_rafdb_unlisted_image_logged(tmp_path, caplog):
    expected = make_rafdb_tree(tmp_path)
    write_image(tmp_path / "Image" / "aligned" / "train_09999_aligned.jpg", some_image())
    (tmp_path / "Image" / "aligned" / "Thumbs.db").write_bytes(b"junk")
    with caplog.at_level(logging.INFO, logger="parsing.datasets"):
        listing = read_dataset("rafdb", tmp_path)
    assert as_expected(listing) == expected
    assert "ignored 1 images" in caplog.text
    assert "Thumbs.db" in caplog.text


def test_rafdb_uppercase_extension_on_disk(tmp_path):
    make_rafdb_tree(tmp_path)
    aligned = tmp_path / "Image" / "aligned"
    (aligned / "train_00001_aligned.jpg").rename(aligned / "train_00001_aligned.JPG")
    names = [record.name for record in read_dataset("rafdb", tmp_path).records]
    assert "Image/aligned/train_00001_aligned.JPG" in names


def test_rafdb_original_only_explains(tmp_path):
    make_rafdb_tree(tmp_path)
    shutil.move(tmp_path / "Image" / "aligned", tmp_path / "Image" / "original")
    with pytest.raises(DatasetError, match="Image/original exists, but this reader uses only the aligned"):
        read_dataset("rafdb", tmp_path)


def test_rafdb_missing_label_file(tmp_path):
    make_rafdb_tree(tmp_path)
    (tmp_path / "EmoLabel" / "list_patition_label.txt").unlink()
    with pytest.raises(DatasetError, match="label file not found"):
        read_dataset("rafdb", tmp_path)


def test_rafdb_case_collision(tmp_path):
    make_rafdb_tree(tmp_path)
    aligned = tmp_path / "Image" / "aligned"
    shutil.copy(aligned / "train_00001_aligned.jpg", aligned / "TRAIN_00001_ALIGNED.JPG")
    with pytest.raises(DatasetError, match="differ only in case"):
        read_dataset("rafdb", tmp_path)


# --- SFEW -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["plain", "aligned", "nested", "lower"])
def test_sfew_layouts(tmp_path, layout):
    expected = make_sfew_tree(tmp_path, n_train_per_class=2, n_val_per_class=1, layout=layout)
    listing = read_dataset("sfew", tmp_path)
    assert as_expected(listing) == expected
    counts = listing.counts()
    assert sorted(counts) == ["test", "train"]
    assert sum(counts["train"].values()) == 14
    assert sum(counts["test"].values()) == 7


def test_sfew_test_folder_ignored(tmp_path):
    expected = make_sfew_tree(tmp_path)
    write_image(tmp_path / "Test" / "frame.png", some_image())
    assert as_expected(read_dataset("sfew", tmp_path)) == expected


def test_sfew_unknown_emotion_folder(tmp_path):
    make_sfew_tree(tmp_path)
    write_image(tmp_path / "Train" / "Contempt" / "x.png", some_image())
    with pytest.raises(DatasetError, match=r"unknown class folder\(s\) \['Contempt'\]") as caught:
        read_dataset("sfew", tmp_path)
    assert "angry" in str(caught.value)
    assert "surprised" in str(caught.value)


def test_sfew_missing_val_folder(tmp_path):
    make_sfew_tree(tmp_path)
    shutil.rmtree(tmp_path / "Val")
    with pytest.raises(DatasetError, match="'val' folder not found"):
        read_dataset("sfew", tmp_path)


def test_sfew_two_train_folders(tmp_path):
    make_sfew_tree(tmp_path)
    shutil.copytree(tmp_path / "Train", tmp_path / "Train_Aligned_Faces")
    with pytest.raises(DatasetError, match="several SFEW 'train' folders"):
        read_dataset("sfew", tmp_path)


def test_sfew_no_emotion_folders(tmp_path):
    make_sfew_tree(tmp_path)
    shutil.rmtree(tmp_path / "Val")
    (tmp_path / "Val" / "a").mkdir(parents=True)
    (tmp_path / "Val" / "b").mkdir()
    with pytest.raises(DatasetError, match="no emotion folders found"):
        read_dataset("sfew", tmp_path)


# --- generic folders ----------------------------------------------------------------------


def test_folder_tree_with_aliases(tmp_path):
    folders = {
        "angry": "Anger",
        "disgust": "disgusted",
        "fear": "FEARFUL",
        "happy": "Happiness",
        "sad": "sadness",
        "surprise": "Surprised",
        "neutral": "Neutral",
    }
    expected = make_folder_tree(tmp_path, per_split={"Train": 2, "val": 1}, class_folders=folders)
    listing = read_dataset("folder", tmp_path)
    assert as_expected(listing) == expected
    assert sorted(listing.counts()) == ["train", "val"]


def test_folder_unknown_class(tmp_path):
    make_folder_tree(tmp_path)
    write_image(tmp_path / "train" / "smile" / "x.png", some_image())
    with pytest.raises(DatasetError, match="unknown class folder"):
        read_dataset("folder", tmp_path)


def test_folder_records_sorted(tmp_path):
    make_folder_tree(tmp_path, per_split={"train": 3, "test": 2})
    records = read_dataset("folder", tmp_path).records
    keys = [(record.split, record.name) for record in records]
    assert keys == sorted(keys)
    assert records[0].split == "test"


def test_folder_junk_ignored_and_counted(tmp_path, caplog):
    expected = make_folder_tree(tmp_path)
    happy = tmp_path / "train" / "happy"
    for junk in ("Thumbs.db", ".DS_Store", "desktop.ini", "README.txt", "._00000.png"):
        (happy / junk).write_bytes(b"junk")
    (tmp_path / "__MACOSX").mkdir()
    with caplog.at_level(logging.INFO, logger="parsing.datasets"):
        listing = read_dataset("folder", tmp_path)
    assert as_expected(listing) == expected
    assert listing.skipped == []
    assert "known junk" in caplog.text
    assert "Thumbs.db" in caplog.text


def test_folder_unknown_extension(tmp_path):
    expected = make_folder_tree(tmp_path)
    odd = tmp_path / "train" / "sad" / "clip.gif"
    odd.write_bytes(b"GIF89a")
    with pytest.raises(DatasetError, match="clip.gif") as caught:
        read_dataset("folder", tmp_path)
    assert "on_bad='skip'" in str(caught.value)

    listing = read_dataset("folder", tmp_path, on_bad="skip")
    assert as_expected(listing) == expected
    assert listing.skipped == [
        {"path": str(odd), "reason": listing.skipped[0]["reason"]},
    ]
    assert "'.gif' is not an image extension" in listing.skipped[0]["reason"]


def test_folder_image_extensions_any_case(tmp_path):
    for index, extension in enumerate([".JPG", ".jpeg", ".Png", ".BMP"]):
        write_image(tmp_path / "train" / "happy" / f"img{index}{extension}", some_image())
    listing = read_dataset("folder", tmp_path)
    assert len(listing.records) == 4


def test_folder_case_collision(tmp_path):
    make_folder_tree(tmp_path)
    happy = tmp_path / "train" / "happy"
    write_image(happy / "a.jpg", some_image())
    write_image(happy / "A.JPG", some_image())
    with pytest.raises(DatasetError, match="differ only in case") as caught:
        read_dataset("folder", tmp_path, on_bad="skip")
    assert "train/happy/A.JPG and train/happy/a.jpg" in str(caught.value)


def test_folder_image_outside_class_folder(tmp_path):
    make_folder_tree(tmp_path)
    stray = tmp_path / "train" / "stray.png"
    write_image(stray, some_image())
    with pytest.raises(DatasetError, match="outside any class folder"):
        read_dataset("folder", tmp_path)
    listing = read_dataset("folder", tmp_path, on_bad="skip")
    assert [entry["path"] for entry in listing.skipped] == [str(stray)]


def test_folder_nested_folder_in_class(tmp_path):
    make_folder_tree(tmp_path)
    write_image(tmp_path / "train" / "happy" / "more" / "x.png", some_image())
    with pytest.raises(DatasetError, match="folder inside a class folder"):
        read_dataset("folder", tmp_path)


def test_folder_empty_root(tmp_path):
    with pytest.raises(DatasetError, match="no split folders"):
        read_dataset("folder", tmp_path)


def test_folder_all_skipped_is_error(tmp_path):
    (tmp_path / "train" / "happy").mkdir(parents=True)
    (tmp_path / "train" / "happy" / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(DatasetError, match="no images found"):
        read_dataset("folder", tmp_path, on_bad="skip")


# --- CSV manifest --------------------------------------------------------------------------


@pytest.mark.parametrize("integer_labels", [False, True])
def test_csv_manifest(tmp_path, integer_labels):
    expected = make_csv_dataset(tmp_path, integer_labels=integer_labels)
    listing = read_dataset("csv", tmp_path)
    assert as_expected(listing) == expected
    assert listing.source_format == "csv"


def test_csv_manifest_outside_root(tmp_path):
    root = tmp_path / "data"
    expected = make_csv_dataset(root)
    manifest = tmp_path / "lists" / "mine.csv"
    manifest.parent.mkdir()
    shutil.move(root / "manifest.csv", manifest)
    assert as_expected(read_dataset("csv", root, manifest=manifest)) == expected


def test_csv_missing_columns(tmp_path):
    (tmp_path / "manifest.csv").write_text("file,label\nimages/a.png,happy\n")
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['path', 'split'\]"):
        read_dataset("csv", tmp_path)


def test_csv_aliases_and_backslashes(tmp_path):
    write_image(tmp_path / "imgs" / "a.png", some_image())
    write_image(tmp_path / "imgs" / "b.png", some_image())
    (tmp_path / "manifest.csv").write_text(
        "Path,LABEL,Split,extra\r\nimgs\\a.png,Happiness,TRAIN,x\r\nimgs/b.png, anger ,test,y\r\n,,,\r\n"
    )
    listing = read_dataset("csv", tmp_path)
    assert as_expected(listing) == [("imgs/b.png", "angry", "test"), ("imgs/a.png", "happy", "train")]


@pytest.mark.parametrize(
    "row, message",
    [
        ("imgs/a.png,7,train", "invalid label '7'"),
        ("imgs/a.png,smile,train", "invalid label 'smile'"),
        ("imgs/a.png,happy,", "split of 'imgs/a.png' is empty"),
        ("../a.png,happy,train", "must be relative"),
        ("/abs/a.png,happy,train", "must be relative"),
        ("C:\\data\\a.png,happy,train", "must be relative"),
    ],
)
def test_csv_invalid_row_line(tmp_path, row, message):
    write_image(tmp_path / "imgs" / "a.png", some_image())
    (tmp_path / "manifest.csv").write_text(f"path,label,split\nimgs/a.png,happy,train\n{row}\n")
    with pytest.raises(DatasetError, match=message) as caught:
        read_dataset("csv", tmp_path)
    assert "manifest.csv, line 3" in str(caught.value)


def test_csv_duplicate_row(tmp_path):
    write_image(tmp_path / "imgs" / "a.png", some_image())
    (tmp_path / "manifest.csv").write_text("path,label,split\nimgs/a.png,happy,train\nimgs/a.png,sad,train\n")
    with pytest.raises(DatasetError, match="listed again"):
        read_dataset("csv", tmp_path)


def test_csv_missing_image_skip(tmp_path):
    expected = make_csv_dataset(tmp_path)
    (tmp_path / expected[0][0]).unlink()
    with pytest.raises(DatasetError, match="the image file is missing"):
        read_dataset("csv", tmp_path)
    listing = read_dataset("csv", tmp_path, on_bad="skip")
    assert as_expected(listing) == expected[1:]
    assert len(listing.skipped) == 1


def test_csv_missing_manifest(tmp_path):
    with pytest.raises(DatasetError, match="manifest not found"):
        read_dataset("csv", tmp_path)


# --- arguments and output ------------------------------------------------------------------


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="invalid dataset format 'affectnet'"):
        read_dataset("affectnet", tmp_path)
    with pytest.raises(ValueError, match="only read with format 'csv'"):
        read_dataset("folder", tmp_path, manifest=tmp_path / "m.csv")
    with pytest.raises(ValueError, match="invalid on_bad 'ignore'"):
        read_dataset("folder", tmp_path, on_bad="ignore")
    with pytest.raises(DatasetError, match="is not a folder"):
        read_dataset("folder", tmp_path / "absent")


def test_counts_table_lists_totals():
    counts = {"test": {name: 1 for name in EXPRESSIONS}, "train": {name: 2 for name in EXPRESSIONS}}
    lines = format_counts_table(counts).splitlines()
    assert lines[0].split() == ["split", *EXPRESSIONS, "total"]
    assert lines[1].split() == ["test"] + ["1"] * 7 + ["7"]
    assert lines[2].split() == ["train"] + ["2"] * 7 + ["14"]
    assert lines[3].split() == ["total"] + ["3"] * 7 + ["21"]
