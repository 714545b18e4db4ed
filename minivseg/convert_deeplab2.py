"""deeplab2 TensorFlow checkpoints -> minivseg state dicts, by name, without TensorFlow.

``python -m minivseg.convert_deeplab2 --checkpoint PREFIX --out FILE.pt [--model kitti]`` reads a
deeplab2 checkpoint (``PREFIX.index`` + ``PREFIX.data-*``, `minivseg.tf_checkpoint`), maps every
variable it knows to a key of the minivseg model, and writes ``{"state_dict", "report", ...}``
to ``FILE.pt`` for ``python -m minivseg.train --init=FILE.pt``. It prints a table: loaded
(tensors, parameters), new in minivseg (what the checkpoint does not have: TubeFormer's latent
layers, the semantic head, a class head for other classes), unused from the checkpoint (optimizer
slots, the step counters, the COCO auxiliary semantic decoder, an ImageNet classifier).
A variable that is neither mapped nor expected-unused, or whose shape differs from its minivseg
tensor, stops the conversion with its name (the class head alone is re-initialised when the
class count differs: COCO's 134 outputs are not KITTI's 20).

Checkpoints it reads (deeplab2 ``g3doc/projects/imagenet_pretrained_checkpoints.md`` and
``max_deeplab.md``): MaX-DeepLab-S-Backbone (ImageNet-1k, ReLU) and Axial-ResNet-50 (ImageNet-22k,
GeLU: convert into ``--model.activation=gelu``), which fill the backbone (stem, stages 2-5); and
MaX-DeepLab-S on COCO, which also fills stage5_extra, the four dual-path layers, the memory, the
stride-8/4 decoder and the pixel, mask and class heads. Keys are the object paths of
``tf.train.Checkpoint(encoder=..., <decoder items>, global_step=..., optimizer=...)`` as deeplab2's
trainer writes them; the leading ``_`` of each path part and ``/.ATTRIBUTES/VARIABLE_VALUE`` are
dropped, and a Model Garden prefix ``backbone/`` is stripped.

The name mapping and transforms (Keras HWIO -> torch OIHW, Conv1D (1, in, out) -> Linear
(out, in), the axial q/k/v einsum matrix -> Conv1d (out, in, 1), multi-axis BNs flattened) are
the ones deeplab2's own layers were checked against, output for output (the peer comparison);
deeplab2's ``stage5`` blocks are TubeFormer's first hierarchical blocks and ``stage5_extra`` its
last.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from minivseg.tf_checkpoint import list_variables, load_variables

SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
      "moving_variance": "running_var"}  # fmt: skip
TRANSFORMS = {
    "id": lambda a: a,
    "flat": lambda a: a.reshape(-1),  # (3,1,h,1,1) / (2,1,h,1,d) / (1,h,1,d) BN -> one channel each
    "conv2d": lambda a: a.transpose(3, 2, 0, 1),  # (kh, kw, in, out) -> (out, in, kh, kw)
    "depthwise": lambda a: a.transpose(2, 3, 0, 1),  # (kh, kw, C, 1) -> (C, 1, kh, kw)
    "linear": lambda a: a[0].T,  # Conv1D (1, in, out) -> Linear (out, in)
    "qkv": lambda a: a.T[:, :, None],  # einsum (in, out) -> Conv1d (out, in, 1)
}
UNUSED = (  # expected in deeplab2 checkpoints, never loaded
    (r"(global_step|save_counter|_CHECKPOINTABLE_OBJECT_GRAPH)", "step counters, object graph"),
    (r".*/\.OPTIMIZER_SLOT/.*|(backbone_)?optimizer/.*", "optimizer state"),
    (
        r"(semantic_decoder|semantic_head_without_last_layer|semantic_last_layer)/.*",
        "COCO auxiliary semantic decoder",
    ),
    (r"encoder/(classification_head|logits|global_pool|fc).*", "ImageNet classifier"),
)
STEM = {"conv1_bn_act": "0", "conv2_bn_act": "2", "conv3_bn": "4"}
BLOCK = {"conv1_bn_act": "conv1", "conv2_bn_act": "conv2", "conv3_bn": "conv3",
         "shortcut": "shortcut"}  # fmt: skip
DPT = {"memory_conv1_bn_act": "memory_conv1", "pixel_conv1_bn_act": "pixel_conv1",
       "memory_qkv_conv_bn": "memory_qkv", "pixel_qkv_conv_bn": "pixel_qkv",
       "memory_conv3_bn": "memory_conv3", "pixel_conv3_bn": "pixel_conv3",
       "memory_ffn_conv1_bn_act": "memory_ffn1", "memory_ffn_conv2_bn": "memory_ffn2"}  # fmt: skip


class ConversionError(ValueError):
    """A checkpoint variable that cannot be placed: unknown, or of the wrong shape."""


def clean(key: str) -> str:
    """Checkpoint key -> variable path: no ``/.ATTRIBUTES/VARIABLE_VALUE``, no leading ``_``."""
    key = key[: -len(SUFFIX)] if key.endswith(SUFFIX) else key
    if key.startswith("backbone/_encoder/"):  # TF Model Garden trainer prefix
        key = key[len("backbone/") :]
    return "/".join(part.lstrip("_") if part != "_CHECKPOINTABLE_OBJECT_GRAPH" else part
                    for part in key.split("/"))  # fmt: skip


def _bn(leaf: str, prefix: str, transform: str = "id"):
    return (f"{prefix}.{BN[leaf]}", transform) if leaf in BN else None


def _conv_bn(path: str, prefix: str, kernel: str = "conv2d"):
    """Conv2DSame / Conv1D with BN: ``conv/kernel`` and ``batch_norm/*``."""
    if path == "conv/kernel":
        return f"{prefix}.{'linear' if kernel == 'linear' else 'conv'}.weight", kernel
    head, _, leaf = path.partition("/")
    return _bn(leaf, f"{prefix}.bn") if head == "batch_norm" else None


def _axial(path: str, prefix: str):
    """AxialAttention2D: ``{height,width}_axis/...`` (Axial-DeepLab Eq. (4) weights)."""
    axis, _, rest = path.partition("/")
    if axis not in ("height_axis", "width_axis"):
        return None
    prefix = f"{prefix}.{axis[: -len('_axis')]}"
    if rest == "qkv_kernel":
        return f"{prefix}.qkv.weight", "qkv"
    head, _, leaf = rest.partition("/")
    if head in ("query_rpe", "key_rpe", "value_rpe") and leaf == "embeddings":
        return f"{prefix}.{head}", "id"
    bns = {"batch_norm_qkv": ("qkv_bn", "id"), "batch_norm_similarity": ("similarity_bn", "flat"),
           "batch_norm_retrieved_output": ("output_bn", "flat")}  # fmt: skip
    return _bn(leaf, f"{prefix}.{bns[head][0]}", bns[head][1]) if head in bns else None


def _block(path: str, prefix: str):
    """deeplab2 AxialBlock (conv or axial bottleneck) -> `BottleneckBlock`."""
    head, _, rest = path.partition("/")
    if head in BLOCK:
        return _conv_bn(rest, f"{prefix}.{BLOCK[head]}")
    return _axial(rest, f"{prefix}.attention") if head == "attention" else None


def _dual_path(path: str, prefix: str):
    """deeplab2 DualPathTransformerLayer -> `GlobalDualPath`."""
    head, _, rest = path.partition("/")
    if head in DPT:
        return _conv_bn(rest, f"{prefix}.{DPT[head]}", "linear")
    sub, _, leaf = rest.partition("/")
    if head in ("memory_attention", "pixel_attention") and sub == "batch_norm_similarity":
        return _bn(leaf, f"{prefix}.{head}.logits_bn")
    if head in ("memory_attention", "pixel_attention") and sub == "batch_norm_retrieved_value":
        return _bn(leaf, f"{prefix}.{head}.values_bn", "flat")
    return None


def target_key(name: str, backbone_only: bool = False):
    """deeplab2 variable path -> (minivseg key, transform), or None if we have no such tensor.

    ``backbone_only``: keys of a bare `AxialResNet` (stage5 blocks as ``stage5.{i}``) instead of
    `TubeFormer`'s (stage5 blocks are ``blocks.{i}.pixel_block``, stage5_extra is the last block).
    """
    match = re.fullmatch(r"encoder/stem/(\w+)/(.+)", name)
    if match and match[1] in STEM:
        prefix = "stem." if backbone_only else "backbone.stem."
        return _conv_bn(match[2], prefix + STEM[match[1]])
    match = re.fullmatch(r"encoder/stage([2-5])(_extra)?/block(\d+)(_transformer)?/(.+)", name)
    if match:
        stage, extra, index, transformer, rest = match.groups()
        index = int(index) - 1
        if stage != "5":
            if extra or transformer:
                return None
            return _block(rest, f"{'' if backbone_only else 'backbone.'}stage{stage}.{index}")
        if backbone_only:
            return None if extra or transformer else _block(rest, f"stage5.{index}")
        block = f"blocks.{index + (3 if extra else 0)}"
        if transformer:
            return _dual_path(rest, f"{block}.global_path")
        return _block(rest, f"{block}.pixel_block")
    if backbone_only:
        return None
    match = re.fullmatch(r"encoder/decoder_stage([12])_extra(_resized_fuse)?/(\w+)/(.+)", name)
    if match:
        scale, fuse, unit, rest = match.groups()
        part = f"decoder.{'fuse' if fuse else 'block'}_s{8 if scale == '1' else 4}"
        if fuse:
            number = re.fullmatch(r"resized_conv_bn(\d+)", unit)
            return _conv_bn(rest, f"{part}.projections.{int(number[1]) - 1}") if number else None
        return _block(rest, part) if unit == "block1" else None
    match = re.fullmatch(r"encoder/(class|mask)_feature_extra/(.+)", name)
    if match:
        return _conv_bn(match[2], f"{match[1]}_feature", "linear")
    head = {"encoder/memory_feature": ("memory", "id"),
            "pixel_space_head/final_conv/kernel": ("pixel_head.embedding.weight", "conv2d"),
            "pixel_space_head/final_conv/bias": ("pixel_head.embedding.bias", "id"),
            "transformer_class_head/conv/kernel": ("class_head.weight", "linear"),
            "transformer_class_head/conv/bias": ("class_head.bias", "id")}  # fmt: skip
    if name in head:
        return head[name]
    match = re.fullmatch(
        r"pixel_space_head/conv_block/conv1_bn_act/(depthwise|pointwise)/(.+)", name
    )
    if match:
        kind, rest = match.groups()
        if rest in ("depthwise_conv/depthwise_kernel", "conv/kernel"):
            return f"pixel_head.{kind}.weight", "depthwise" if kind == "depthwise" else "conv2d"
        head, _, leaf = rest.partition("/")
        return _bn(leaf, f"pixel_head.{kind}_bn") if head == "batch_norm" else None
    bns = {
        "pixel_space_feature_batch_norm": "pixel_head.embedding_bn",
        "pixel_space_mask_batch_norm": "mask_bn",
        "transformer_mask_head/batch_norm": "mask_head.bn",
    }
    head, _, leaf = name.rpartition("/")
    if head in bns:
        return _bn(leaf, bns[head])
    if name == "transformer_mask_head/conv/kernel":
        return "mask_head.linear.weight", "linear"
    return None


def unused_reason(name: str):
    """Why an expected variable is not loaded, or None."""
    return next((why for pattern, why in UNUSED if re.fullmatch(pattern, name)), None)


def plan(shapes: dict, model_state: dict, backbone_only: bool = False):
    """Where each checkpoint variable goes, from names and shapes alone.

    ``shapes``: {checkpoint key: shape}; ``model_state``: the target's state_dict (shapes read).
    Returns (moves {checkpoint key: (name, minivseg key, transform)}, unused {name: reason},
    reinitialised {minivseg key: reason}). Raises `ConversionError` naming every unknown
    variable, or a variable of the wrong shape, or two that land on one key.
    """
    moves, unused, reinitialised, unknown, taken = {}, {}, {}, [], {}
    for key, shape in shapes.items():
        name = clean(key)
        reason = unused_reason(key) or unused_reason(name)
        if reason:
            unused[name] = reason
            continue
        found = target_key(name, backbone_only)
        if found is None or found[0] not in model_state:
            unknown.append(name if found is None else f"{name} (-> {found[0]}, not in the model)")
            continue
        target, transform = found
        have = tuple(TRANSFORMS[transform](np.empty(shape, np.uint8)).shape)
        want = tuple(model_state[target].shape)
        if target.startswith("class_head.") and have[0] != want[0]:
            reinitialised[target] = f"{name} has {have[0]} classes, the model {want[0]}"
            unused[name] = "class head of other classes (re-initialised)"
            continue
        if have != want:
            raise ConversionError(f"{name} -> {target}: shape {have}, minivseg has {want}")
        if target in taken:
            raise ConversionError(f"{name} and {taken[target]} both map to {target}")
        moves[key], taken[target] = (name, target, transform), name
    if unknown:
        raise ConversionError(f"{len(unknown)} variables minivseg does not know: "
                              + ", ".join(sorted(unknown)[:20]))  # fmt: skip
    return moves, unused, reinitialised


def convert(prefix, model: torch.nn.Module, backbone_only: bool = False):
    """Read a deeplab2 checkpoint into ``model``'s key space (``model`` may be on "meta").

    Returns (state_dict, report): the converted tensors, in the model's dtypes, and ``loaded``
    {minivseg key: deeplab2 name}, ``new`` [model keys the checkpoint does not fill], ``unused``
    {deeplab2 name: reason}, ``reinitialised`` {minivseg key: reason}. Errors name the
    checkpoint and the variable (`ConversionError`).
    """
    ours = model.state_dict()
    shapes = {key: shape for key, (_, shape) in list_variables(prefix).items()}
    try:
        moves, unused, reinitialised = plan(shapes, ours, backbone_only)
    except ConversionError as error:
        raise ConversionError(f"{prefix}: {error}") from None
    state, loaded = {}, {}
    for key, array in load_variables(prefix, list(moves)).items():  # read one by one
        name, target, transform = moves[key]
        value = np.ascontiguousarray(TRANSFORMS[transform](array))
        state[target] = torch.from_numpy(value).to(ours[target].dtype)
        loaded[target] = name
    new = [k for k in ours if k not in state and not k.endswith("num_batches_tracked")]
    report = {"loaded": loaded, "new": new, "unused": unused, "reinitialised": reinitialised}
    return state, report


def summary(report: dict, model: torch.nn.Module) -> str:
    """The loaded / new / unused table, with tensor and parameter counts."""
    sizes = {k: v.numel() for k, v in model.state_dict().items()}
    groups = {}
    for key in report["new"]:
        part = ".".join(key.split(".")[:3]) if key.startswith("blocks.") else key.split(".")[0]
        groups.setdefault(part, []).append(key)
    unused = collections.Counter(report["unused"].values())
    lines = [f"{'':44s} {'tensors':>8s} {'values':>12s}",
             f"{'loaded':44s} {len(report['loaded']):8d} "
             f"{sum(sizes[k] for k in report['loaded']):12,d}",
             f"{'new in minivseg':44s} {len(report['new']):8d} "
             f"{sum(sizes[k] for k in report['new']):12,d}"]  # fmt: skip
    for part, keys in sorted(groups.items()):
        lines.append(f"  {part:42s} {len(keys):8d} {sum(sizes[k] for k in keys):12,d}")
    lines.append(f"{'unused from the checkpoint':44s} {len(report['unused']):8d}")
    lines += [f"  {why:42s} {count:8d}" for why, count in sorted(unused.items())]
    lines += [f"re-initialised: {k}: {why}" for k, why in report["reinitialised"].items()]
    return "\n".join(lines)


def build_target(model: str, activation: str):
    """The minivseg model a checkpoint is converted for: a TubeFormer preset or ``backbone``."""
    if model == "backbone":
        from minivseg.backbone import AxialResNet

        return AxialResNet(activation=activation)
    from minivseg.tubeformer import build_model

    return build_model(model, activation=activation)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="deeplab2 checkpoint PREFIX")
    parser.add_argument("--out", required=True, help="output .pt for --init")
    parser.add_argument("--model", default="kitti", help="TubeFormer preset, or 'backbone'")
    parser.add_argument("--activation", default="relu", choices=("relu", "gelu"),
                        help="gelu for the Axial-ResNet-50 ImageNet-22k checkpoint")  # fmt: skip
    args = parser.parse_args(argv)
    start, cpu = time.perf_counter(), time.process_time()
    with torch.device("meta"):  # shapes only: the converted tensors are the weights
        model = build_target(args.model, args.activation)
    try:
        state, report = convert(args.checkpoint, model, args.model == "backbone")
    except (ValueError, OSError) as error:  # ConversionError and CheckpointFormatError too
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary(report, model))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"state_dict": state, "report": report, "source": str(args.checkpoint),
               "model": args.model, "activation": args.activation}  # fmt: skip
    torch.save(payload, out.with_suffix(".tmp"))
    out.with_suffix(".tmp").replace(out)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s "
          f"({time.process_time() - cpu:.1f} s CPU)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
