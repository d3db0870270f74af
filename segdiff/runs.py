"""Opening a trained folder: the one way every generator, ``--renderer``, ``--layout_model`` and ``--init_from`` read one.

A trainer's ``--output_dir`` holds the finished model (the EMA weights when it kept them) with its run files,
``training_config.json`` (every argument, the base model, the ``pipeline`` kind) and ``class_names.json`` (classes
and palette). Each ``checkpoint-N/`` inside it holds the models as they were at step N: ``<model>/`` and, with
``--use_ema``, ``<model>_ema/``. `open_run` takes either folder and answers, in one place:

* what kind of model it holds (`TrainedRun.kind`: the ``pipeline`` its trainer recorded),
* the weights to sample with (`TrainedRun.load_model`: a checkpoint's EMA weights when kept, else its raw ones),
* the run's settings, classes and palette, and the base model its training used (`TrainedRun.base`).

A Hub repository id (an output folder that ``--push_to_hub`` uploaded) opens too, from the Hugging Face cache
(`hub_snapshot`); a local folder of that name wins.

    run = open_run("outputs/sdm/checkpoint-500")
    unet = run.load_model(SpadeUNetModel, "unet")          # checkpoint-500/unet_ema, else checkpoint-500/unet
    class_names, palette = run.classes()                    # outputs/sdm/class_names.json
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from segdiff.data import DatasetError, first_line, load_class_names, read_json
from segdiff.geometry import ImageSize, check_size_multiple, size_multiple
from segdiff.labels import default_palette

CHECKPOINT_NAME = re.compile(r"checkpoint-\d+")
# How the Hub copy of a run file names a folder of the machine that trained it: <local>/<folder name>.
LOCAL_FOLDER = "<local>"


def recorded_path(name: str | Path | None) -> str | None:
    """A path argument (data, base model, checkpoint, reference image) as a run file records it (training_config.json,
    generation_args.json): a local path made absolute, so that it names the same folder read from any working
    directory (a re-run from elsewhere still matches; evaluate.py still finds a model's training data); anything else
    (a Hub id) as given."""
    if name is None:
        return None
    return str(Path(name).resolve()) if Path(name).exists() else str(name)


# The ``pipeline`` each trainer records in training_config.json, and what a folder of it is called in messages.
KINDS = {
    "joint_image_mask": "train_seg_mask_diffusion.py",
    "controlnet_seg": "train_controlnet_seg.py",
    "spade_sdm": "train_spade_sdm.py",
    "layout_diffusion": "train_layout_diffusion.py",
}

# The diffusers class a folder of each kind saves (model_index.json's, or a bare model's config.json).
KIND_OF_CLASS = {
    "JointImageMaskPipeline": "joint_image_mask",
    "ControlNetModel": "controlnet_seg",
    "SemanticDiffusionPipeline": "spade_sdm",
    "LayoutDiffusionPipeline": "layout_diffusion",
}


class RunError(DatasetError):
    """A folder that is not the trained model asked for. The message names the folder, the flag and the fix.

    A DatasetError, so the scripts' `segdiff.data.exit_on_bad_input` turns it into a one-line error."""


def read_run_file(path: Path) -> dict:
    return read_json(path, "run file", "Fix: restore it from the training output.", an_object=True)


@dataclass
class TrainedRun:
    """A training output folder, or one of its checkpoint-N/ folders (``checkpoint``), and its run files."""

    folder: Path  # as given: the output folder or a checkpoint-N/ in it
    run_dir: Path  # the output folder: where training_config.json and class_names.json are
    is_checkpoint: bool
    config: dict = field(default_factory=dict)  # training_config.json; {} for a folder without one
    flag: str = "--model"  # how the user passed it, for messages

    @property
    def kind(self) -> str | None:
        """The ``pipeline`` the trainer recorded (a key of KINDS); for a folder without training_config.json (one
        assembled by hand, or downloaded), the kind its diffusers class names say; else None."""
        if "pipeline" in self.config:
            return self.config["pipeline"]
        for file_name in ("model_index.json", "config.json"):
            path = self.run_dir / file_name
            class_name = read_run_file(path).get("_class_name") if path.is_file() else None
            if isinstance(class_name, list):  # [code file, class]: a pipeline saved with its code (remote_code.py)
                class_name = class_name[1]
            if class_name in KIND_OF_CLASS:
                return KIND_OF_CLASS[class_name]
        return None

    def require(self, *kinds: str) -> None:
        """Refuse a folder of another kind, naming the trainers whose output is expected."""
        if self.kind in kinds:
            return
        expected = " or ".join(KINDS[kind] for kind in kinds)
        found = f"a {self.kind!r} model" if self.kind else "no training_config.json naming its kind"
        raise RunError(
            f"{self.flag} {self.folder} holds {found}. Fix: pass the output folder of {expected}, or one of its "
            "checkpoint-N folders."
        )

    def weights(self, name: str, *, at_root: bool = False) -> tuple[Path, str | None]:
        """(folder, subfolder) of model ``name``'s weights: in a checkpoint ``<name>_ema/`` when kept, else ``<name>/``;
        in the output folder ``<name>/``, or the folder itself when the model is saved there (``at_root``:
        a ControlNet)."""
        if self.is_checkpoint:
            for subfolder in (f"{name}_ema", name):
                if (self.folder / subfolder / "config.json").is_file():
                    return self.folder, subfolder
            raise RunError(
                f"{self.flag} {self.folder} holds no {name}/ model. Fix: pass a complete checkpoint-N folder, or "
                "the output folder of the run."
            )
        if at_root:
            return self.folder, None
        if not (self.folder / name / "config.json").is_file():
            raise RunError(f"{self.flag} {self.folder} holds no {name}/ model. Fix: pass the output folder of the run.")
        return self.folder, name

    def load_model(self, model_class, name: str, *, at_root: bool = False, **kwargs):
        """Model ``name`` (see `weights`), by ``model_class.from_pretrained``."""
        folder, subfolder = self.weights(name, at_root=at_root)
        with self.refusing_unreadable(folder / subfolder if subfolder else folder):
            return model_class.from_pretrained(folder, subfolder=subfolder, **kwargs)

    def load_pipeline(self, pipeline_class, unet_class, **kwargs):
        """The run's saved pipeline (model_index.json); for a checkpoint-N/, with that checkpoint's UNet (its EMA
        weights when kept) in place of the final one."""
        if not (self.run_dir / "model_index.json").is_file():
            raise RunError(
                f"{self.flag} {self.folder}: {self.run_dir} holds no finished pipeline (model_index.json) yet. Fix: "
                "let the run finish, or pass a finished output folder."
            )
        components = {"unet": self.load_model(unet_class, "unet", **kwargs)} if self.is_checkpoint else {}
        with self.refusing_unreadable(self.run_dir):
            return pipeline_class.from_pretrained(self.run_dir, **components, **kwargs)

    @contextmanager
    def refusing_unreadable(self, folder: Path):
        """diffusers' errors for a model folder it cannot read (a broken config, missing or truncated weights) as a
        RunError that names the flag and the folder, instead of a traceback."""
        try:
            yield
        except (OSError, ValueError) as error:
            raise RunError(
                f"{self.flag} {self.folder}: cannot load the model in {folder} ({first_line(error)}). Fix: pass a complete "
                "training output folder (or a checkpoint-N in one); re-copy the folder if it was copied."
            ) from None

    def classes(self, class_names_json: str | Path | None = None) -> tuple[list[str], list[tuple[int, int, int]]]:
        """Class names and palette: ``class_names_json`` when given, else the run's class_names.json (the default
        palette for a file without one)."""
        path = Path(class_names_json) if class_names_json else self.run_dir / "class_names.json"
        if not path.is_file():
            raise RunError(
                f"{self.flag} {self.folder}: no {path.name} in {self.run_dir}, so the class of each id is unknown. "
                "Fix: copy the class_names.json its trainer wrote there (generate_controlnet_seg.py also takes "
                "--class_names_json)."
            )
        names, palette = load_class_names(path)
        return names, palette or default_palette(len(names))

    def setting(self, key: str, default=None):
        """A recorded training argument (training_config.json), else ``default``."""
        return self.config.get(key, default)

    def check_size(self, size: ImageSize, flag: str = "--resolution", base: str | None = None) -> None:
        """Refuse an output size the run's models cannot draw (sides not multiples of its VAE's factor times its
        UNet's downsampling), from their config files only: before any weights load. The VAE and UNet are the run's
        own (an SDM in pixel space has no VAE); the base's (``base``, else the one the run names) where the run has
        none of its own: a ControlNet's, and a checkpoint's of a run that has not saved its pipeline yet."""
        unet = self.model_config("unet", base)
        pixel_space = (
            self.kind == "spade_sdm" and self.setting("space") != "latent" and not (self.run_dir / "vae").is_dir()
        )
        vae = None if pixel_space else self.model_config("vae", base)
        why = f"VAE factor x UNet downsampling of {self.folder}"
        try:
            check_size_multiple(size, size_multiple(vae, unet), why)
        except ValueError as error:
            raise RunError(f"{flag} {size}: {error}.") from None

    def model_config(self, name: str, base: str | None = None) -> dict:
        """The config of the run's model ``name`` (``unet`` or ``vae``; a checkpoint's own UNet when it has one),
        else of the base's, read without weights."""
        if self.kind != "controlnet_seg":
            own = [self.folder / f"{name}_ema", self.folder / name] if self.is_checkpoint else []
            for folder in [*own, self.run_dir / name]:
                if (folder / "config.json").is_file():
                    return read_run_file(folder / "config.json")
        from diffusers import AutoencoderKL, UNet2DConditionModel

        base = self.base(base)
        model_class = {"vae": AutoencoderKL, "unet": UNet2DConditionModel}[name]
        try:
            return model_class.load_config(base, subfolder=name, revision=self.setting("revision"))
        except (OSError, ValueError) as error:
            raise RunError(
                f"{self.flag} {self.folder}: cannot read the {name} config of its base {base} ({first_line(error)}). "
                "Fix: make that base reachable from here, or pass --pretrained_model_name_or_path."
            ) from None

    def base(self, override: str | None = None, flag: str = "--pretrained_model_name_or_path") -> str:
        """The Stable Diffusion base the run trained on: ``override`` when given, else the one training_config.json
        names."""
        base = override or self.config.get("pretrained_model_name_or_path")
        if base is None:
            raise RunError(
                f"{self.flag} {self.folder}: no training_config.json in {self.run_dir} names the base model it was "
                f"trained on. Fix: pass {flag} (a Stable Diffusion folder or hub id)."
            )
        if str(base).startswith(f"{LOCAL_FOLDER}/"):
            raise RunError(
                f"{self.flag} {self.folder} was trained on the local base {base}, which the Hub copy of its run names "
                f"only by its folder name. Fix: pass {flag} (that Stable Diffusion folder or hub id)."
            )
        return str(base)


def in_dtype(pipeline, dtype):
    """``pipeline.to(dtype=dtype)`` (a torch dtype, or None: as loaded), skipped when every weight already has that
    dtype: diffusers' ModelMixin.to warns at any cast with a dtype about "modules that should be kept in float32",
    even in a model that has none, and a generator loading float32 weights in float32 has nothing to cast."""
    import torch

    modules = [module for module in pipeline.components.values() if isinstance(module, torch.nn.Module)]
    if dtype is None or all(weight.dtype == dtype for module in modules for weight in module.parameters()):
        return pipeline
    return pipeline.to(dtype=dtype)


def open_run(folder: str | Path, flag: str = "--model", revision: str | None = None) -> TrainedRun:
    """The trained folder ``folder`` (an output folder or a checkpoint-N/ in one) with its run files read.

    A name that is not a folder here is read as a Hub repository id (an output folder uploaded by --push_to_hub) and
    opened from the Hugging Face cache, downloaded there first if need be (``huggingface_hub.snapshot_download``:
    ``revision`` is a branch, tag or commit; with HF_HUB_OFFLINE the cache only). A local folder of that name wins.
    """
    if Path(folder).is_dir():
        if revision is not None:
            raise RunError(
                f"{flag} {folder} is a local folder, which has no revisions. Fix: drop the revision, or rename the "
                "folder to load the Hub repository of that name."
            )
        folder = Path(folder)
    else:
        folder = hub_snapshot(str(folder), flag, revision)
    is_checkpoint = CHECKPOINT_NAME.fullmatch(folder.name) is not None
    run_dir = folder.parent if is_checkpoint else folder
    config_file = run_dir / "training_config.json"
    config = read_run_file(config_file) if config_file.is_file() else {}
    return TrainedRun(folder, run_dir, is_checkpoint, config, flag)


def hub_snapshot(repo_id: str, flag: str, revision: str | None) -> Path:
    """The folder of Hub repository ``repo_id`` (at ``revision``) in the Hugging Face cache, downloaded if need be."""
    import huggingface_hub
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        huggingface_hub.utils.validate_repo_id(repo_id)
    except HFValidationError:
        raise RunError(
            f"{flag} {repo_id} does not exist. Fix: pass a training output folder, a checkpoint-N in one, or the id "
            "of a Hub repository that --push_to_hub uploaded."
        ) from None
    at = f" at revision {revision}" if revision else ""
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision))
    except LocalEntryNotFoundError as error:
        raise RunError(
            f"{flag} {repo_id} is not a folder here, and the Hub repository {repo_id}{at} is not in the Hugging "
            f"Face cache, which is all there is offline ({error}). Fix: pass a local folder, or run once with the "
            "Hub reachable (HF_HUB_OFFLINE unset) to download it."
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise RunError(
            f"{flag} {repo_id} is neither a folder here nor a Hub repository{at} you can read. Fix: check the name "
            "and revision, or log in (hf auth login) for a private repository."
        ) from None
