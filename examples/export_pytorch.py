#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Export a torch.nn.MultiheadAttention call to a safetensors file for examples/pytorch_check,
and compare what pytorch_check computed with PyTorch.

    # 1. weights, inputs and masks of a random layer -> case.safetensors
    python3 examples/export_pytorch.py export case.safetensors --embed-dim 16 --heads 4 \
        --batch 2 --length 5 --causal --key-padding 5,3
    # 2. the C++ layer on them -> result.safetensors (output, weights)
    ./build/dev/examples/pytorch_check case.safetensors result.safetensors
    # 3. PyTorch on the same file, compared with result.safetensors
    python3 examples/export_pytorch.py check case.safetensors result.safetensors

The file layout (tensor names, metadata keys) is described in README.md, section "PyTorch
parity". No safetensors package is needed: the format is small enough to write here, which also
keeps tests/data/make_golden.py (which imports this module) free of extra dependencies.
"""

import argparse
import json
import struct
import sys

import numpy as np
import torch

FORMAT = "mha-pytorch-case/1"
_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.bool_): "BOOL"}
_NUMPY = {v: k for k, v in _DTYPES.items()}


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor or ndarray} (float32, float64 or bool; torch.bfloat16 tensors as BF16,
    their bits unchanged) and string metadata."""
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        bf16 = isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16
        if bf16:  # numpy has no bfloat16: the same 2 bytes as int16
            t = t.detach().cpu().contiguous().view(torch.int16)
        a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        a = np.ascontiguousarray(a)
        blob = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": "BF16" if bf16 else _DTYPES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # align the data section to 8 bytes, as the format allows
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def read_safetensors(path):
    """Return ({name: torch.Tensor}, metadata) for F32, F64, BOOL and BF16 tensors."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    metadata = header.pop("__metadata__", {})
    tensors = {}
    for name, e in header.items():
        begin, end = e["data_offsets"]
        bf16 = e["dtype"] == "BF16"
        dtype = (np.dtype(np.int16) if bf16 else _NUMPY[e["dtype"]]).newbyteorder("<")
        a = np.frombuffer(data[8 + n + begin:8 + n + end], dtype=dtype).reshape(e["shape"])
        t = torch.from_numpy(a.astype(a.dtype.newbyteorder("="), copy=True))
        tensors[name] = t.view(torch.bfloat16) if bf16 else t
    return tensors, metadata


def export_case(path, module, query, key, value, *, key_padding_mask=None, attn_mask=None,
                need_weights=True, average_attn_weights=True, with_reference=False,
                extra_metadata=None):
    """Save the module's state_dict, the call's inputs and masks, and how it is called.

    With with_reference, also run the module and store its results as `output` and `weights`.
    """
    tensors = {name: t for name, t in module.state_dict().items()}
    self_attention = query is key and key is value
    # Self-attention stores the input once, as `query`: key and value are the same tensor.
    tensors["query"] = query
    if not self_attention:
        tensors.update(key=key, value=value)
    if key_padding_mask is not None:
        tensors["key_padding_mask"] = key_padding_mask
    if attn_mask is not None:
        tensors["attn_mask"] = attn_mask
    metadata = {
        "format": FORMAT,
        "torch_version": torch.__version__,
        "num_heads": module.num_heads,
        "batch_first": int(module.batch_first),
        "need_weights": int(need_weights),
        "average_attn_weights": int(average_attn_weights),
        "self_attention": int(self_attention),
    }
    metadata.update(extra_metadata or {})
    metadata = {k: str(v) for k, v in metadata.items()}  # safetensors metadata is strings
    if with_reference:
        output, weights = run_module(module, tensors, metadata)
        tensors["output"] = output
        if weights is not None:
            tensors["weights"] = weights
    write_safetensors(path, tensors, metadata)


def module_from_case(tensors, metadata):
    """Rebuild the nn.MultiheadAttention a case file describes."""
    packed = "in_proj_weight" in tensors
    embed = tensors["out_proj.weight"].shape[0]
    dtype = tensors["out_proj.weight"].dtype
    module = torch.nn.MultiheadAttention(
        embed, int(metadata["num_heads"]), bias="out_proj.bias" in tensors,
        kdim=None if packed else tensors["k_proj_weight"].shape[1],
        vdim=None if packed else tensors["v_proj_weight"].shape[1],
        batch_first=metadata["batch_first"] == "1", dtype=dtype)
    module.load_state_dict({k: v for k, v in tensors.items() if k in module.state_dict()})
    return module


def run_module(module, tensors, metadata):
    """Call the module as the case says. It stays in training mode with dropout 0: PyTorch
    1.13's inference fast path handles key_padding_mask differently (it zeroes padded queries),
    and training mode without dropout is the plain, deterministic computation."""
    query = tensors["query"]
    self_attention = metadata.get("self_attention") == "1"
    key = query if self_attention else tensors["key"]
    value = query if self_attention else tensors["value"]
    with torch.no_grad():
        return module(query, key, value, key_padding_mask=tensors.get("key_padding_mask"),
                      attn_mask=tensors.get("attn_mask"),
                      need_weights=metadata.get("need_weights", "1") == "1",
                      average_attn_weights=metadata.get("average_attn_weights", "1") == "1")


def max_abs_difference(ours, theirs):
    """Largest |ours - theirs| over entries where PyTorch is finite, and how many it skipped:
    a fully masked query is NaN in PyTorch 1.13 and exactly 0 (output: the bias) here."""
    finite = torch.isfinite(theirs)
    if not finite.any():
        return 0.0, int((~finite).sum())
    return float((ours[finite] - theirs[finite]).abs().max()), int((~finite).sum())


def random_case(args):
    torch.manual_seed(args.seed)
    dtype = torch.float64 if args.double else torch.float32
    module = torch.nn.MultiheadAttention(args.embed_dim, args.heads, bias=not args.no_bias,
                                         kdim=args.kdim, vdim=args.vdim, batch_first=True,
                                         dtype=dtype)
    with torch.no_grad():  # PyTorch initialises biases to 0; random ones test more
        for p in module.parameters():
            p.normal_(0, 0.3)
    lead = (args.batch,) if args.batch else ()
    source = args.source_length or args.length
    cross = args.kdim or args.vdim or args.source_length
    query = torch.randn(*lead, args.length, args.embed_dim, dtype=dtype)
    key = torch.randn(*lead, source, args.kdim or args.embed_dim, dtype=dtype) if cross else query
    value = torch.randn(*lead, source, args.vdim or args.embed_dim, dtype=dtype) if cross else query
    attn_mask, extra = None, {}
    if args.causal:  # PyTorch's causal mask: True above the diagonal = may not attend
        attn_mask = torch.ones(args.length, source, dtype=torch.bool).triu(1)
        extra["causal"] = "top_left"
    key_padding_mask = None
    if args.key_padding:
        lengths = [int(x) for x in args.key_padding.split(",")]
        key_padding_mask = torch.arange(source)[None, :] >= torch.tensor(lengths)[:, None]
        if not args.batch:
            key_padding_mask = key_padding_mask[0]
    export_case(args.file, module, query, key, value, key_padding_mask=key_padding_mask,
                attn_mask=attn_mask, average_attn_weights=not args.per_head,
                with_reference=args.with_reference, extra_metadata=extra)
    print(f"wrote {args.file}")


def check(args):
    tensors, metadata = read_safetensors(args.case)
    ours, _ = read_safetensors(args.result)
    output, weights = run_module(module_from_case(tensors, metadata), tensors, metadata)
    worst = 0.0
    for name, theirs in (("output", output), ("weights", weights)):
        if theirs is None:
            continue
        if ours[name].shape != theirs.shape:
            sys.exit(f"{name}: shape {tuple(ours[name].shape)} here, {tuple(theirs.shape)} in PyTorch")
        diff, skipped = max_abs_difference(ours[name], theirs)
        note = f" ({skipped} NaN entries of PyTorch's skipped: fully masked queries)" if skipped else ""
        print(f"{name}: max abs difference {diff:.3g}{note}")
        worst = max(worst, diff)
    if args.tolerance is not None and worst > args.tolerance:
        sys.exit(f"max abs difference {worst:.3g} > tolerance {args.tolerance}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a random layer's weights, inputs and masks")
    e.add_argument("file")
    e.add_argument("--embed-dim", type=int, default=16)
    e.add_argument("--heads", type=int, default=4)
    e.add_argument("--kdim", type=int)
    e.add_argument("--vdim", type=int)
    e.add_argument("--no-bias", action="store_true")
    e.add_argument("--batch", type=int, default=0, help="sequences (0: one unbatched sequence)")
    e.add_argument("--length", type=int, default=5, help="query length L")
    e.add_argument("--source-length", type=int, help="key length S (default L)")
    e.add_argument("--causal", action="store_true")
    e.add_argument("--key-padding", help="comma-separated valid key counts, one per sequence")
    e.add_argument("--per-head", action="store_true", help="average_attn_weights=False")
    e.add_argument("--double", action="store_true")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--with-reference", action="store_true",
                   help="also store PyTorch's output and weights in the file")
    c = sub.add_parser("check", help="compare pytorch_check's result with PyTorch")
    c.add_argument("case")
    c.add_argument("result")
    c.add_argument("--tolerance", type=float, help="exit with status 1 above this difference")
    args = parser.parse_args()
    random_case(args) if args.command == "export" else check(args)


if __name__ == "__main__":
    main()
