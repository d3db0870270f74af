"""The one image-size type, from the command line (`arguments.image_size`) to what configs record and pipelines take."""

import argparse
import json

import pytest

from segdiff.arguments import add_switch, image_size
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
