#!/usr/bin/env python3
# Writes the seed corpus of the safetensors fuzzer: small valid files (tensors of every dtype the
# accessors read, half-precision bit patterns, PyTorch state_dicts in the packed and the separate form) and hand-made hostile
# ones (huge or zero dimensions, deep nesting, duplicate keys, zero-sized weights, offsets that
# overlap or leave gaps, a header length past the end). The golden files of tests/data/golden
# are seeds too; the fuzzing job passes their directory beside this one.
import json
import os
import random
import struct

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "safetensors_corpus")
os.makedirs(here, exist_ok=True)
rng = random.Random(20261202)
SIZES = {"F32": 4, "F64": 8, "BOOL": 1, "U8": 1}
PACK = {"F32": "<f", "F64": "<d"}


def header_file(header, data=b"", length=None):
    text = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))
    raw = text.encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def tensors(entries, metadata=None):
    """entries: (name, dtype, shape); values are random."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape in entries:
        n = 1
        for d in shape:
            n *= d
        if dtype in PACK:
            payload = b"".join(struct.pack(PACK[dtype], rng.uniform(-1, 1)) for _ in range(n))
        else:
            payload = bytes(rng.randrange(2) for _ in range(n))
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    return header_file(header, data)


def state_dict(e, kdim, vdim, bias, dtype):
    entries = []
    if kdim == e and vdim == e:
        entries.append(("in_proj_weight", dtype, [3 * e, e]))
    else:
        entries += [("q_proj_weight", dtype, [e, e]), ("k_proj_weight", dtype, [e, kdim]),
                    ("v_proj_weight", dtype, [e, vdim])]
    if bias:
        entries.append(("in_proj_bias", dtype, [3 * e]))
    entries.append(("out_proj.weight", dtype, [e, e]))
    if bias:
        entries.append(("out_proj.bias", dtype, [e]))
    return tensors(entries)


def empty(name, dtype, shape):
    return {name: {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}}


seeds = {
    "empty_header": header_file("{}"),
    "every_dtype": tensors([("f", "F32", [2, 3]), ("d", "F64", [3]), ("b", "BOOL", [2, 2]),
                            ("u", "U8", [4]), ("s", "F32", [])], {"format": "pt"}),
    "zero_size_tensors": tensors([("a", "F32", [0, 4]), ("b", "F64", [3, 0]), ("c", "F32", [1])]),
    "state_dict_packed_f32": state_dict(4, 4, 4, True, "F32"),
    "state_dict_separate_f64": state_dict(4, 3, 5, False, "F64"),
    "state_dict_packed_no_bias_f64": state_dict(2, 2, 2, False, "F64"),
    "state_dict_zero_sized": tensors([("in_proj_weight", "F32", [0, 0]),
                                      ("out_proj.weight", "F32", [0, 0])]),
    "state_dict_huge_empty_widths": header_file({
        **empty("out_proj.weight", "F32", [2**60, 0]), **empty("q_proj_weight", "F32", [0, 2**60]),
        **empty("k_proj_weight", "F32", [0, 0]), **empty("v_proj_weight", "F32", [0, 0])}),
    "dimension_after_zero": header_file(empty("w", "F32", [0, 2**62 - 1])),
    "dimension_2_63": header_file(empty("w", "U8", [0, 2**63])),
    "dimension_2_64_minus_1": header_file(empty("w", "U8", [2**64 - 1, 0])),
    "largest_empty": header_file(empty("w", "F32", [0, (2**63 - 1) // 4])),
    "nested_17": header_file('{"__metadata__":{"k":' + "[" * 15 + "]" * 15 + "}}"),
    "nested_deep": header_file("[" * 3000 + "]" * 3000),
    "duplicate_names": header_file('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                                   '"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
                                   bytes(8)),
    "duplicate_field": header_file('{"a":{"dtype":"F32","dtype":"F64","shape":[1],'
                                   '"data_offsets":[0,4]}}', bytes(4)),
    "overlapping_offsets": header_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                        "b": {"dtype": "F32", "shape": [1],
                                              "data_offsets": [4, 8]}}, bytes(8)),
    "header_length_past_end": header_file("{}", length=2**64 - 1),
    "not_json": header_file("\x00\xff{]"),
    # Half-precision bit patterns the bfloat16 reads must keep or round once: BF16 ±0, a
    # subnormal, ±∞, a quiet NaN with a payload, a signalling NaN; F16 and F32 ties and NaNs.
    "half_precision_patterns": header_file(
        {"b": {"dtype": "BF16", "shape": [2, 4], "data_offsets": [0, 16]},
         "h": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]},
         "s": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}},
        struct.pack("<8H", 0x0000, 0x8000, 0x0001, 0x7f80, 0xff80, 0x7fc1, 0x7f81, 0x3f80)
        + struct.pack("<4H", 0x3c01, 0x0001, 0x7bff, 0x7e01)
        + struct.pack("<4I", 0x3f808000, 0x3f818000, 0x7fa00000, 0x7f7fffff)),
}
for name, data in seeds.items():
    with open(os.path.join(here, name), "wb") as f:
        f.write(data)
print(f"wrote {len(seeds)} files to {here}")
