"""The argument types every script's numbers and output folders go through, and the one image-size type, from the
command line (`arguments.image_size`) to what configs record and pipelines take."""

import argparse
import json

import pytest

from segdiff.arguments import (
    add_switch,
    finite_float,
    fraction,
    image_size,
    non_negative_float,
    non_negative_int,
    output_folder,
    positive_float,
    positive_int,
    weight_list,
)
from segdiff.geometry import ImageSize


def test_a_size_is_n_or_height_comma_width_and_reads_back_from_configs():
    assert image_size("48") == ImageSize(48, 48) and image_size("384,512") == ImageSize(height=384, width=512)
    for bad in ("0", "-8", "16,", "a", "1,2,3", "16,0", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a size"):
            image_size(bad)
    size = ImageSize(384, 512)
    assert str(size) == "384,512" and str(ImageSize(32, 32)) == "32"  # as typed
    assert json.loads(json.dumps(size)) == [384, 512]  # what training_config.json records
    assert ImageSize.of(json.loads(json.dumps(size))) == size and ImageSize.of(32) == (32, 32)
    assert size // 8 == ImageSize(48, 64) and (size // 8) * 8 == size  # image <-> latent sizes
    assert size.config_value() == [384, 512] and ImageSize(32, 32).config_value() == 32
    assert not size.is_square and ImageSize(5, 5).is_square


def test_switches_are_name_and_no_name():
    parser = argparse.ArgumentParser()
    add_switch(parser, "match_ratios", default=True, help="h")
    assert parser.parse_args([]).match_ratios is True
    assert parser.parse_args(["--no_match_ratios"]).match_ratios is False
    assert parser.parse_args(["--no_match_ratios", "--match_ratios"]).match_ratios is True


def test_number_types_refuse_what_their_name_excludes():
    accepted = {
        positive_int: (("1", 1), ("64", 64)),
        non_negative_int: (("0", 0), ("7", 7)),
        finite_float: (("-2.5", -2.5), ("0", 0.0)),
        positive_float: (("1e-5", 1e-5),),
        non_negative_float: (("0", 0.0), ("7.5", 7.5)),
        fraction: (("0", 0.0), ("1", 1.0), ("0.25", 0.25)),
        weight_list: (("1,4,0", [1.0, 4.0, 0.0]), ("2", [2.0])),
    }
    refused = {
        positive_int: ("0", "-3", "1.5", "abc", ""),
        non_negative_int: ("-1", "2.0", "x"),
        finite_float: ("nan", "inf", "-inf", "abc"),
        positive_float: ("0", "-1e-5", "nan", "inf"),
        non_negative_float: ("-0.1", "nan", "inf"),
        fraction: ("-0.1", "1.01", "nan"),
        weight_list: ("1,abc", "1,-1", "0,0", "1,,2", "1,nan", ""),
    }
    for kind, cases in accepted.items():
        for text, value in cases:
            assert kind(text) == value, (kind.__name__, text)
    for kind, texts in refused.items():
        for text in texts:
            with pytest.raises(argparse.ArgumentTypeError):
                kind(text)
    parser = argparse.ArgumentParser()
    parser.add_argument("--train_batch_size", type=positive_int)
    with pytest.raises(SystemExit):
        parser.parse_args(["--train_batch_size", "0"])


def test_an_output_folder_must_be_a_folder_that_can_be_written(tmp_path):
    assert output_folder(str(tmp_path / "new" / "deep")) == str(tmp_path / "new" / "deep")
    assert output_folder(str(tmp_path)) == str(tmp_path)
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []  # probed, nothing left behind
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match="is a file, not a folder"):
        output_folder(str(tmp_path / "a_file"))
    with pytest.raises(argparse.ArgumentTypeError, match="lies under the file"):
        output_folder(str(tmp_path / "a_file" / "sub"))
    with pytest.raises(argparse.ArgumentTypeError, match="cannot be written"):
        output_folder("/proc/segdiff_output")  # root may write everywhere but there
