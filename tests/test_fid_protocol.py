"""evaluate.py's FID and KID follow torch-fidelity's protocol: the same numbers as torch_fidelity.calculate_metrics
on the same folders and weights, images of different sizes included.

The Inception-v3 is torch-fidelity's own network with seeded random weights, saved as a state dict like the real
weights file, so nothing is downloaded.
"""

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from segdiff.data import DatasetError
from segdiff.evaluation import (
    KID_SEED,
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    STANDARD_PROTOCOL,
    FeatureExtractor,
    protocol,
    resolve_kid_subset_size,
)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """A state dict of torch-fidelity's FeatureExtractorInceptionV3, randomly initialised (seed 0)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random initialisation
            return None

    empty = io.BytesIO()  # its constructor loads a weights file, or downloads one: give it an empty one
    torch.save({}, empty)
    empty.seek(0)
    torch.manual_seed(0)
    network = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    # He-initialised convolutions keep the activations' scale through the network: with PyTorch's default
    # initialisation the pool3 features come out around 1e-8, and every FID would be about 0.
    for layer in network.modules():
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(network.state_dict(), path)
    return path


def image_folders(toy, folder):
    """real/: 4 toy images (32 px). generated/: 4 others, in negative, one of them at 48 px (mixed sizes)."""
    images = sorted((toy / "images").iterdir())
    (folder / "real").mkdir(parents=True)
    (folder / "generated").mkdir()
    for path in images[:4]:
        shutil.copy(path, folder / "real" / path.name)
    for index, path in enumerate(images[4:8]):
        negative = Image.fromarray(255 - np.asarray(Image.open(path).convert("RGB")))
        if index == 3:
            negative = negative.resize((48, 48), Image.BICUBIC)
        negative.save(folder / "generated" / path.name)
    return folder / "real", folder / "generated"


def test_kid_defaults_are_torch_fidelitys():
    from torch_fidelity.defaults import DEFAULTS

    ours = {
        "kid_subsets": KID_SUBSETS,
        "kid_subset_size": KID_SUBSET_SIZE,
        "rng_seed": KID_SEED,
    }
    assert {name: DEFAULTS[name] for name in ours} == ours


def test_fid_and_kid_equal_torch_fidelitys(toy_data, random_inception, tmp_path):
    import torch_fidelity

    real, generated = image_folders(toy_data, tmp_path)
    results = evaluate.main(
        ["--generated_dir", str(generated), "--real_dir", str(real), "--metrics", "fid,kid"]
        + ["--inception_weights", str(random_inception), "--kid_subset_size", "3"]
        + ["--results_dir", str(tmp_path / "eval")]
    )
    reference = torch_fidelity.calculate_metrics(
        input1=str(generated),
        input2=str(real),
        fid=True,
        kid=True,
        kid_subset_size=3,  # fewer than the 4 images of each folder (torch-fidelity's 1000 would be refused)
        feature_extractor_weights_path=str(random_inception),
        batch_size=1,  # torch-fidelity stacks a batch: one image at a time, since generated/ mixes 32 and 48 px
        cuda=False,
        save_cpu_ram=True,  # no DataLoader worker processes
        cache=False,
        verbose=False,
    )
    assert reference["frechet_inception_distance"] > 1  # so that the 1e-3 below says something
    assert results["fid"] == pytest.approx(reference["frechet_inception_distance"], abs=1e-3)
    # KID is about 0.3 here: relative 1e-3 is the tighter test
    assert results["kid_mean"] == pytest.approx(reference["kernel_inception_distance_mean"], rel=1e-3)
    assert results["kid_std"] == pytest.approx(reference["kernel_inception_distance_std"], rel=1e-3)
    assert (results["kid_subsets"], results["kid_subset_size"], results["kid_seed"]) == (100, 3, 2020)
    assert results["fid_kid_protocol"] == STANDARD_PROTOCOL and results["fid_kid_standard"] is True
    assert results["feature_image_size"] is None
    report = (tmp_path / "eval" / "evaluation_report.txt").read_text()
    assert f"protocol: {STANDARD_PROTOCOL}" in report


def test_departures_from_the_protocol_are_named():
    def extractor(standard):
        return FeatureExtractor(torch.nn.Identity(), False, "a network", standard=standard)

    assert protocol(extractor(True), None) == STANDARD_PROTOCOL
    assert protocol(extractor(True), 64) == (
        f"non-standard: images first resized to 64 px (PIL bicubic), then {STANDARD_PROTOCOL}"
    )
    assert protocol(extractor(False), None) == (
        "non-standard: custom feature extractor (a network); not comparable with published FID/KID"
    )
    assert protocol(extractor(False), 64) == (
        "non-standard: custom feature extractor (a network), images first resized to 64 px (PIL bicubic); "
        "not comparable with published FID/KID"
    )


def test_kid_subset_size_is_torch_fidelitys_unless_there_are_fewer_images():
    assert resolve_kid_subset_size(None, 2000, 3000) == 1000
    assert resolve_kid_subset_size(None, 24, 12) == 12  # torch-fidelity would refuse; recorded in the report
    assert resolve_kid_subset_size(5, 24, 12) == 5
    with pytest.raises(DatasetError, match="--kid_subset_size 13 is more than the 24 real / 12 generated images"):
        resolve_kid_subset_size(13, 24, 12)
