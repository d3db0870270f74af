#!/usr/bin/env python
"""Training memory and one-A100 throughput of a SpadeUNetModel preset, estimated from the model itself: no GPU needed.

    python benchmarks/estimate_memory.py --model_config configs/models/sdm_1024_latent.json --space latent \
      --resolution 1024 --batch_size 8 --mixed_precision bf16

The model is built on PyTorch's meta device (shapes only: no memory, no time) and one training step, forward and
backward, is traced at the full size and batch:

- parameters: counted exactly (num_classes and channels as train_spade_sdm.py sets them);
- weights and gradients in float32 (accelerate's mixed precision keeps float32 master weights), AdamW's two
  float32 moments, the float32 EMA copy (--use_ema);
- activations: the tensors autograd keeps for the backward, read from the traced graph, each storage once, in the
  dtype autocast gives them: the inputs of convolutions and matmuls in bf16 (cast copies of the weights included),
  everything else (GroupNorm, SiLU, residual sums) in float32. Attention is traced as flash attention keeps it
  (q, k, v, output and one log-sum-exp per query, not the attention matrix). With --gradient_checkpointing: what
  lies outside the checkpointed blocks, the input of every block, and the largest block's own (recomputed one at a
  time in the backward);
- FLOPs per step: torch.utils.flop_counter.FlopCounterMode over the traced step (checkpointing adds one more
  forward of the blocks), plus the frozen VAE encoder with --space latent (Stable Diffusion's VAE: factor 8,
  4 channels); divided by an assumed achievable A100 rate, printed with the result (--a100_utilization of the
  A100's dense peak: 312 TFLOP/s in bf16, 156 in TF32, which PyTorch's convolutions use by default in float32).

Not counted: the CUDA context and kernel workspaces (about 1-2 GB), allocator fragmentation, gradients of the
activations alive during the backward, the data loader, and the VAE encoder's transient memory (it runs without
gradients before the UNet's step; its largest activation is printed). Prints a table like the other benchmarks
and appends it to benchmarks/RESULTS.md (--results).
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import RESULTS, append_results  # noqa: E402

from segdiff.arguments import image_size  # noqa: E402
from segdiff.models.spade_unet import SpadeUNetModel  # noqa: E402

GIB = 2**30
A100_PEAK_TFLOPS = {"bf16": 312.0, "no": 156.0}  # dense tensor-core peaks: bf16, and TF32 for float32 training
A100_MEMORY_GIB = 80e9 / GIB  # "80 GB" is 80e9 bytes
# Autograd nodes whose saved inputs autocast has cast to bf16 (convolutions, linear layers, matmuls, attention).
LOW_PRECISION_NODES = ("Convolution", "Addmm", "Mm", "Bmm", "Baddbmm", "FlashAttention")
# Stable Diffusion's VAE (SD 1.x and 2.x: four encoder levels, factor 8, 4 latent channels).
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}
SD_VAE_FACTOR = 8


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_config", required=True, help="A SpadeUNetModel JSON, e.g. configs/models/sdm_256.json")
    parser.add_argument(
        "--resolution", type=image_size, required=True, help="Training image size: N or HEIGHT,WIDTH (pixels)."
    )
    parser.add_argument("--batch_size", type=int, required=True, help="Training batch per GPU.")
    parser.add_argument("--mixed_precision", choices=["no", "bf16"], default="no", help="Default: %(default)s")
    parser.add_argument(
        "--space",
        choices=["pixel", "latent"],
        default="pixel",
        help="pixel, or latent: the UNet runs on Stable Diffusion VAE latents (1/8 of --resolution, 4 channels) and "
        "the frozen VAE is counted too. Default: %(default)s",
    )
    parser.add_argument("--num_classes", type=int, default=None, help="Default: the config's.")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument(
        "--no_ema", dest="use_ema", action="store_false", help="Leave out the EMA copy (on by default, as in SDM)."
    )
    parser.add_argument(
        "--a100_utilization",
        type=float,
        default=0.4,
        help="Share of the A100's dense peak the step is assumed to reach (convolutional diffusion UNets: 0.3-0.5). "
        "Default: %(default)s",
    )
    parser.add_argument("--results", default=str(RESULTS), help="Markdown file the table is appended to.")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if not 0 < args.a100_utilization <= 1:
        parser.error("--a100_utilization must be in (0, 1]")
    return args


# ------------------------------------------------------------------------------------------------
# Tracing one step on the meta device
# ------------------------------------------------------------------------------------------------


class FlashAttention(torch.autograd.Function):
    """scaled_dot_product_attention as flash attention keeps it for the backward: q, k, v, the output and one
    log-sum-exp per query. The meta device only has the math kernel, which would save the L x L attention matrix."""

    @staticmethod
    def forward(ctx, query, key, value, kwargs):
        with torch.no_grad():
            output = ORIGINAL_ATTENTION(query, key, value, **kwargs)
        ctx.save_for_backward(query, key, value, output, query.new_empty(query.shape[:-1]))
        ctx.kwargs = kwargs
        return output

    @staticmethod
    def backward(ctx, grad_output):
        # Flash attention's backward recomputes the attention: so does this one (for the FLOP count).
        query, key, value = (t.detach().requires_grad_() for t in ctx.saved_tensors[:3])
        with torch.enable_grad():
            output = ORIGINAL_ATTENTION(query, key, value, **ctx.kwargs)
        return (*torch.autograd.grad(output, (query, key, value), grad_output), None)


ORIGINAL_ATTENTION = F.scaled_dot_product_attention


def flash_attention(query, key, value, **kwargs):
    return FlashAttention.apply(query, key, value, kwargs)


def saved_tensors(node) -> list[torch.Tensor]:
    """The tensors an autograd node keeps for its backward."""
    if isinstance(node, torch.autograd.function.BackwardCFunction):  # a custom Function (FlashAttention)
        return list(node.saved_tensors)
    found = []
    for name in dir(node):
        if name.startswith("_saved_"):
            value = getattr(node, name)
            values = value if isinstance(value, list | tuple) else [value]
            found += [v for v in values if isinstance(v, torch.Tensor)]
    return found


def new_nodes(root, seen: set) -> list:
    """The autograd nodes reachable from ``root`` that are not in ``seen`` yet (added to it)."""
    found, stack = [], [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        found.append(node)
        stack.extend(parent for parent, _ in node.next_functions)
    return found


class SavedBytes:
    """Bytes of saved tensors, each (storage, precision) once: under autocast a float32 activation and the bf16
    copy a convolution saves are two tensors."""

    def __init__(self, mixed_precision: bool, parameter_storages: set):
        self.mixed_precision = mixed_precision
        self.parameter_storages = parameter_storages
        self.counted = set()

    def of(self, nodes) -> int:
        total = 0
        for node in nodes:
            low_precision = self.mixed_precision and any(kind in type(node).__name__ for kind in LOW_PRECISION_NODES)
            for tensor in saved_tensors(node):
                total += self.add(tensor, low_precision)
        return total

    def add(self, tensor: torch.Tensor, low_precision: bool = False) -> int:
        storage = tensor.untyped_storage()
        key = (storage._cdata, low_precision)
        if key in self.counted:
            return 0
        self.counted.add(key)
        is_parameter = storage._cdata in self.parameter_storages
        if is_parameter and not low_precision:  # the weights themselves: counted apart
            return 0
        elements = storage.nbytes() // tensor.element_size()
        if not tensor.is_floating_point():
            return storage.nbytes()
        return elements * (2 if low_precision else 4)


def trace_training_step(
    model: SpadeUNetModel, batch: int, height: int, width: int, mixed_precision: bool, device: str = "meta"
) -> dict:
    """Forward + backward of ``model`` at this size: FLOPs and saved-activation bytes, in all and split as gradient
    checkpointing splits them (outside the blocks, each block's input, each block's own). ``device``: the model's,
    meta (shapes only), or cpu for a real step to compare with."""
    blocks = [*model.down_blocks, *model.mid_blocks, *model.up_blocks]
    parameter_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    counter = SavedBytes(mixed_precision, parameter_storages)
    block_inputs = SavedBytes(False, parameter_storages)  # checkpointing keeps each block's input as it is
    seen, own_bytes, input_bytes = set(), [], []

    def before_block(module, inputs):
        input_bytes.append(block_inputs.add(inputs[0]))

    def after_block(module, inputs, output):
        own_bytes.append(counter.of(new_nodes(output.grad_fn, seen)))

    hooks = [b.register_forward_pre_hook(before_block) for b in blocks]
    hooks += [b.register_forward_hook(after_block) for b in blocks]
    sample = torch.randn(batch, model.config.in_channels, height, width, device=device)
    segmentation = torch.zeros(batch, model.segmentation_channels, height, width, device=device)
    timesteps = torch.zeros(batch, dtype=torch.long, device=device)
    F.scaled_dot_product_attention = flash_attention
    try:
        with FlopCounterMode(display=False) as forward_flops:
            loss = model(sample, timesteps, segmentation).sample.float().square().mean()
        outside = counter.of(new_nodes(loss.grad_fn, seen))
        with FlopCounterMode(display=False) as backward_flops:
            loss.backward()
    finally:
        F.scaled_dot_product_attention = ORIGINAL_ATTENTION
        for hook in hooks:
            hook.remove()
    return {
        "forward_flops": forward_flops.get_total_flops(),
        "backward_flops": backward_flops.get_total_flops(),
        "activations": outside + sum(own_bytes),
        "checkpointed_activations": outside + sum(input_bytes) + max(own_bytes),
    }


def trace_vae_encoder(batch: int, height: int, width: int, weight_bytes: int) -> dict:
    """Stable Diffusion's VAE on the meta device: parameters, encoder FLOPs and its largest activation."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(SD_VAE)
    largest = []
    hooks = [m.register_forward_hook(lambda m, i, o: largest.append(o.numel())) for m in vae.encoder.modules()]
    images = torch.randn(batch, 3, height, width, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        vae.encode(images)
    for hook in hooks:
        hook.remove()
    return {
        "parameters": sum(p.numel() for p in vae.parameters()),
        "encoder_flops": flops.get_total_flops(),
        "largest_activation": max(largest) * weight_bytes,
    }


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def estimate(args) -> tuple[list[dict], dict]:
    """The table rows and the numbers behind them."""
    height, width = args.resolution
    factor = SD_VAE_FACTOR if args.space == "latent" else 1
    if height % factor or width % factor:
        raise SystemExit(f"--resolution {height}x{width}: --space latent needs multiples of {factor}.")
    overrides = {"in_channels": 4, "out_channels": 4} if args.space == "latent" else {}
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    if not Path(args.model_config).is_file():
        raise SystemExit(f"--model_config {args.model_config} does not exist.")
    with torch.device("meta"):
        model = SpadeUNetModel.from_config_file(args.model_config, **overrides)
    levels = 2 ** (len(model.config.channel_mult) - 1)
    if (height // factor) % levels or (width // factor) % levels:
        raise SystemExit(f"--resolution {height}x{width}: the UNet's levels need multiples of {factor * levels}.")
    parameters = sum(p.numel() for p in model.parameters())
    mixed = args.mixed_precision == "bf16"
    step = trace_training_step(model, args.batch_size, height // factor, width // factor, mixed)

    memory = {
        "weights (float32)": 4 * parameters,
        "gradients (float32)": 4 * parameters,
        "AdamW moments (2 x float32)": 8 * parameters,
    }
    if args.use_ema:
        memory["EMA weights (float32)"] = 4 * parameters
    activation_key = "activations (checkpointed)" if args.gradient_checkpointing else "activations"
    memory[activation_key] = step["checkpointed_activations" if args.gradient_checkpointing else "activations"]
    flops = step["forward_flops"] + step["backward_flops"]
    if args.gradient_checkpointing:
        flops += step["forward_flops"]  # the blocks run their forward again in the backward
    vae = None
    if args.space == "latent":
        vae = trace_vae_encoder(args.batch_size, height, width, 2 if mixed else 4)
        memory["frozen VAE weights"] = vae["parameters"] * (2 if mixed else 4)
        flops += vae["encoder_flops"]
    total = sum(memory.values())

    rate = args.a100_utilization * A100_PEAK_TFLOPS[args.mixed_precision] * 1e12
    seconds = flops / rate
    setup = (
        f"{Path(args.model_config).name}, {height}x{width} px"
        + (f" (latents {height // factor}x{width // factor})" if factor > 1 else "")
        + f", batch {args.batch_size}, {'bf16' if mixed else 'float32'}"
        + (", gradient checkpointing" if args.gradient_checkpointing else "")
    )
    rows = [{"setup": setup, "measurement": "parameters", "result": f"{parameters:,} ({parameters / 1e6:.1f} M)"}]
    rows += [{"setup": setup, "measurement": name, "result": size(value)} for name, value in memory.items()]
    fits = "fits" if total / GIB < A100_MEMORY_GIB else "does not fit"
    rows.append(
        {
            "setup": setup,
            "measurement": "total (estimate)",
            "result": f"{size(total)}: {fits} an 80 GB A100 ({A100_MEMORY_GIB:.1f} GiB)",
            "peak_memory_mb": round(total / 2**20),
        }
    )
    rows.append(
        {
            "setup": setup,
            "measurement": "FLOPs per step (forward + backward" + (" + VAE encoder)" if vae else ")"),
            "result": f"{flops / 1e12:.2f} TFLOP",
        }
    )
    rows.append(
        {
            "setup": setup,
            "measurement": f"one A100 at {args.a100_utilization:.0%} of {A100_PEAK_TFLOPS[args.mixed_precision]:.0f} "
            "TFLOP/s (assumed)",
            "result": f"{seconds:.3f} s/step, {args.batch_size / seconds:.1f} samples/s",
        }
    )
    numbers = {"parameters": parameters, "memory": memory, "total": total, "flops": flops, "seconds": seconds}
    if vae:
        numbers["vae"] = vae
    return rows, numbers


def size(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB / 10 else f"{num_bytes / 2**20:.1f} MiB"


def main(argv=None) -> dict:
    args = parse_args(argv)
    rows, numbers = estimate(args)
    note = (
        "Estimated from the model on the meta device (benchmarks/estimate_memory.py), not measured: add 1-2 GB of "
        "CUDA context and workspaces."
    )
    if "vae" in numbers:
        note += (
            f" The VAE encoder's largest activation, before the step and not added: "
            f"{size(numbers['vae']['largest_activation'])}."
        )
    append_results("estimate_memory.py", rows, results=args.results, note=note)
    return numbers


if __name__ == "__main__":
    main()
