"""Shared plumbing for the segmentation-mask-conditioned diffusion scripts, one module per job.

The top-level scripts (``train_*.py``, ``generate_*.py``, ``evaluate.py``, ``prepare_sidewalk.py``, ``demo.py``)
read like diffusers examples; what they share lives here once. Layers point down (scripts -> training, generation,
evaluation -> runs, rendering, data -> pipelines -> models -> leaves):

* ``training``: accelerate plumbing of every trainer (arguments, seeded sampling, checkpoints, resume, EMA, run files)
* ``generation``: the generators' command line, mask reading, the one resumable output writer
* ``evaluation``, ``metrics``, ``downstream``: scoring generated data
* ``layout_quality``: diversity, copying and region shapes of generated layouts against real label maps
* ``runs``: the one way to open a trained folder or one of its checkpoint-N/ folders
* ``rendering``: label maps -> images with a trained ControlNet or SDM
* ``data``: dataset layouts, class-name files, label PNG I/O, joint transforms, the dataset check
* ``synthetic``: class-ratio requests and their report
* ``processes``: the processes of a run and each one's share
* ``arguments``: command-line argument types
* ``files``: atomic writes
* ``toy``, ``tiny``: the offline toy dataset and tiny base models
* ``visualize``: overlays and grids
* ``pipelines``, ``models``: the DiffusionPipeline and ModelMixin classes
* leaves, which import nothing of segdiff but each other: ``schedulers``, ``seeds``, ``labels``, ``geometry``,
  ``prompts``
"""

# The oldest diffusers the scripts run on: pyproject.toml's lower bound (a test keeps the two equal).
MIN_DIFFUSERS_VERSION = "0.35.0"


def check_min_diffusers_version() -> None:
    """diffusers' examples' ``check_min_version``, called by every script that uses diffusers, with the upgrade to
    make in its message."""
    from diffusers.utils import check_min_version

    try:
        check_min_version(MIN_DIFFUSERS_VERSION)
    except ImportError as error:
        raise ImportError(f"{error}Fix: pip install --upgrade 'diffusers>={MIN_DIFFUSERS_VERSION}'.") from None
