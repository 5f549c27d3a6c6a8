#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Write the PyTorch golden cases in tests/data/golden/ (run with a Python that has torch):

    /usr/bin/python3 tests/data/make_golden.py

Each case is one small safetensors file in the layout examples/export_pytorch.py writes (tensor
names and metadata keys: README.md, "PyTorch parity"), plus the reference results `output` and,
when the call asks for them, `weights`. Two sources:

- "torch.nn.MultiheadAttention": the module called as the metadata says. The module stays in
  training mode with dropout 0, which is PyTorch's plain path (1.13's inference fast path treats
  padded queries differently); every such case is also checked here against the plain math
  below, so a golden file never records a PyTorch quirk by accident.
- "torch math": matmul/softmax written out in torch, for what nn.MultiheadAttention 1.13 cannot
  express: bottom-right causal alignment and head widths other than E / H; and the attention
  core on bfloat16 inputs (`core_bf16_*`, format mha-core-bf16-case/1: see core_bf16_case).

Inputs and weights are random with fixed seeds; biases are random too (PyTorch initialises them
to 0, which would hide a bias bug). No case has a fully masked query except the one named
`fully_masked_query_nan`, which records PyTorch's NaN so that the test can check the library's
documented difference (exactly 0 from the attention, so the layer outputs the output bias).
"""

import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "examples"))
import export_pytorch  # noqa: E402  (shared safetensors writer and case layout)

OUT = os.path.join(HERE, "golden")


def allowed_rows(shape, generator, p_masked=0.35):
    """Random PyTorch-polarity bool mask (True = may NOT attend) with every row keeping a key."""
    masked = torch.rand(shape, generator=generator) < p_masked
    keep_one = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    masked.scatter_(-1, keep_one.unsqueeze(-1), False)
    return masked


def plain_math(query, key, value, p, num_heads, mask_bias, num_kv_heads=None):
    """Reference multi-head attention on unbatched (L, E) inputs. `mask_bias` is (H, L, S) with
    0 for allowed, -inf for excluded, or finite additive values. With `num_kv_heads` < H, K and V
    have that many heads, each repeated for H / num_kv_heads consecutive query heads (what
    torch's enable_gqa=True and an explicit repeat_interleave do). Returns output and per-head
    weights (H, L, S)."""
    num_kv_heads = num_kv_heads or num_heads
    def linear(x, w, b):
        return x @ w.T + (b if b is not None else 0)

    qk = p["w_q"].shape[0]
    vw = p["w_o"].shape[1]  # H·d_v, the concatenated heads (W_v has H_kv·d_v rows)
    dk, dv = qk // num_heads, vw // num_heads
    q = linear(query, p["w_q"], p["b_q"]).reshape(-1, num_heads, dk).transpose(0, 1)
    k = linear(key, p["w_k"], p["b_k"]).reshape(-1, num_kv_heads, dk).transpose(0, 1)
    v = linear(value, p["w_v"], p["b_v"]).reshape(-1, num_kv_heads, dv).transpose(0, 1)
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=0)
    v = v.repeat_interleave(group, dim=0)
    scores = q @ k.transpose(1, 2) / math.sqrt(dk) + mask_bias
    weights = torch.softmax(scores, dim=-1)
    heads = (weights @ v).transpose(0, 1).reshape(-1, vw)
    return linear(heads, p["w_o"], p["b_o"]), weights


def split_params(module):
    e = module.embed_dim
    s = module.state_dict()
    if "in_proj_weight" in s:
        w_q, w_k, w_v = s["in_proj_weight"].split(e)
    else:
        w_q, w_k, w_v = s["q_proj_weight"], s["k_proj_weight"], s["v_proj_weight"]
    b = s.get("in_proj_bias")
    b_q, b_k, b_v = b.split(e) if b is not None else (None, None, None)
    return dict(w_q=w_q, w_k=w_k, w_v=w_v, w_o=s["out_proj.weight"], b_q=b_q, b_k=b_k, b_v=b_v,
                b_o=s.get("out_proj.bias"))


def check_against_math(module, query, key, value, attn_mask, key_padding_mask, output,
                       weights, batch_first, average):
    """Recompute every sequence with plain_math and insist PyTorch agrees."""
    batched = query.dim() == 3
    h = module.num_heads
    if batched and not batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        output = output.transpose(0, 1)
    if not batched:
        query, key, value, output = (t.unsqueeze(0) for t in (query, key, value, output))
        if weights is not None:
            weights = weights.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    n, length, source = query.shape[0], query.shape[1], key.shape[1]
    p = split_params(module)
    for b in range(n):
        bias = torch.zeros(h, length, source, dtype=query.dtype)
        if attn_mask is not None:
            m = attn_mask if attn_mask.dim() == 2 else attn_mask[b * h:(b + 1) * h]
            bias = bias + (m.float().masked_fill(m, -math.inf).to(query.dtype)
                           if m.dtype == torch.bool else m)
        if key_padding_mask is not None:
            bias = bias.masked_fill(key_padding_mask[b][None, None, :], -math.inf)
        out, w = plain_math(query[b], key[b], value[b], p, h, bias)
        tol = 1e-5 if query.dtype == torch.float32 else 1e-12  # both are rounding differences
        assert torch.allclose(out, output[b], atol=tol, rtol=tol, equal_nan=True), b
        if weights is not None:
            expected = w.mean(0) if average else w
            assert torch.allclose(expected, weights[b], atol=tol, rtol=tol, equal_nan=True), b


CASES = []


def case(fn):
    CASES.append(fn)
    return fn


def mha_case(name, *, embed, heads, length, source=None, batch=None, batch_first=True, bias=True,
             kdim=None, vdim=None, dtype=torch.float32, attn_mask=None, key_padding=None,
             need_weights=True, average=True, key_padding_as="key_lengths", description="",
             gradients=False):
    """One nn.MultiheadAttention call. attn_mask: None, "bool", "float", "bool_per_head",
    "float_per_head", "causal" (PyTorch's triu bool mask), "causal_float", "fully_masked".
    key_padding: list of valid key counts per sequence (suffix padding) or "random".
    gradients: also record autograd's gradients for a random d_output (add_gradients)."""
    g = torch.Generator().manual_seed(len(CASES_WRITTEN) * 7919 + 17)
    torch.manual_seed(len(CASES_WRITTEN) * 104729 + 3)
    source = source or length
    self_attention = source == length and kdim is None and vdim is None
    module = torch.nn.MultiheadAttention(embed, heads, bias=bias, kdim=kdim, vdim=vdim,
                                         batch_first=batch_first, dtype=dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.4)

    def inputs(n, width):
        if batch is None:
            return torch.randn(n, width, generator=g, dtype=dtype)
        t = torch.randn(batch, n, width, generator=g, dtype=dtype)
        return t if batch_first else t.transpose(0, 1).contiguous()

    query = inputs(length, embed)
    if self_attention:
        key = value = query
    else:
        key = inputs(source, kdim or embed)
        value = inputs(source, vdim or embed)

    nb = batch or 1
    extra = {"source": "torch.nn.MultiheadAttention", "description": description}
    mask = None
    if attn_mask == "bool":
        mask = allowed_rows((length, source), g)
    elif attn_mask == "bool_per_head":
        mask = allowed_rows((nb * heads, length, source), g)
    elif attn_mask in ("float", "float_per_head"):
        shape = (length, source) if attn_mask == "float" else (nb * heads, length, source)
        mask = torch.randn(shape, generator=g, dtype=dtype) * 2
        mask = mask.masked_fill(allowed_rows(shape, g, 0.2), -math.inf)
    elif attn_mask == "causal":
        mask = torch.ones(length, source, dtype=torch.bool).triu(1)
        extra["causal"] = "top_left"
    elif attn_mask == "causal_float":
        mask = torch.zeros(length, source, dtype=dtype).masked_fill(
            torch.ones(length, source, dtype=torch.bool).triu(1), -math.inf)
    elif attn_mask == "fully_masked":
        mask = allowed_rows((length, source), g)
        mask[1, :] = True
        extra["fully_masked_queries"] = "1"

    padding = None
    if key_padding == "random":
        padding = allowed_rows((nb, source), g, 0.3)
        if key_padding_as == "key_lengths":  # a non-suffix pattern is no length
            key_padding_as = "keep_mask"
    elif key_padding is not None:
        padding = torch.arange(source)[None, :] >= torch.tensor(key_padding)[:, None]
    if padding is not None:
        if batch is None:
            padding = padding[0]
        extra["key_padding_as"] = key_padding_as

    with torch.no_grad():
        output, weights = module(query, key, value, key_padding_mask=padding, attn_mask=mask,
                                 need_weights=need_weights, average_attn_weights=average)
    check_against_math(module, query, key, value, mask, padding, output, weights, batch_first,
                       average)
    path = os.path.join(OUT, name + ".safetensors")
    export_pytorch.export_case(path, module, query, key, value, key_padding_mask=padding,
                               attn_mask=mask, need_weights=need_weights,
                               average_attn_weights=average, with_reference=True,
                               extra_metadata=extra)
    if gradients:
        add_gradients(path, module, query, key, value, self_attention, mask, padding,
                      need_weights, average, output, fully_masked=attn_mask == "fully_masked")
    CASES_WRITTEN.append(name)


def autograd_gradients(module, query, key, value, self_attention, mask, padding, need_weights,
                       average, d_output, keep=None):
    """{name: gradient} of the module's output for `d_output` by torch.autograd.grad: "query"
    (for self-attention the one input's, its three uses summed), "key", "value" and every
    parameter under its state_dict name. With `keep` (a bool per query of an unbatched call), the
    module runs on the kept queries only and the loss adds <out_proj.bias, d_output> of each
    dropped query: the layer whose dropped queries attend to nothing (output = out_proj.bias)."""
    x_q = query.detach().clone().requires_grad_()
    x_k = x_q if self_attention else key.detach().clone().requires_grad_()
    x_v = x_q if self_attention else value.detach().clone().requires_grad_()
    names, params = zip(*module.named_parameters())
    inputs = [x_q] if self_attention else [x_q, x_k, x_v]
    input_names = ["query"] if self_attention else ["query", "key", "value"]
    if keep is None:
        out, _ = module(x_q, x_k, x_v, key_padding_mask=padding, attn_mask=mask,
                        need_weights=need_weights, average_attn_weights=average)
        grads = torch.autograd.grad(out, inputs + list(params), grad_outputs=d_output)
    else:
        assert query.dim() == 2 and (mask is None or mask.dim() == 2)
        out, _ = module(x_q[keep], x_k, x_v, key_padding_mask=padding,
                        attn_mask=None if mask is None else mask[keep],
                        need_weights=need_weights, average_attn_weights=average)
        loss = (out * d_output[keep]).sum()
        if module.out_proj.bias is not None:
            loss = loss + (module.out_proj.bias * d_output[~keep]).sum()
        grads = torch.autograd.grad(loss, inputs + list(params))
    return out, dict(zip(input_names + list(names), grads))


def add_gradients(path, module, query, key, value, self_attention, mask, padding, need_weights,
                  average, output, fully_masked):
    """Add to the case at `path` a random `d_output` (the output's layout) and autograd's
    gradients for it as "grad.<name>" (grad.query, grad.key, grad.value, grad.in_proj_weight,
    ...: the state_dict names, so that the library's loader reads them as a layer).

    A fully masked query is NaN in PyTorch, and so is everything its NaN row reaches in the
    backward: its own input gradient, and through 0·NaN every key, value and weight gradient
    (only the other queries' input gradients and out_proj.bias's stay finite). "grad.*" keeps
    PyTorch's answer as it is; "defined_grad.*" adds autograd's gradients of the same module on
    the queries PyTorch defines, with the fully masked query's output taken as out_proj.bias (the
    library's semantics: attention to nothing is exactly 0, and so are that query's gradients)."""
    g = torch.Generator().manual_seed(len(CASES_WRITTEN) * 7919 + 29)
    d_output = torch.randn(output.shape, generator=g, dtype=output.dtype)
    tensors, metadata = export_pytorch.read_safetensors(path)
    out, grads = autograd_gradients(module, query, key, value, self_attention, mask, padding,
                                    need_weights, average, d_output)
    assert torch.allclose(out, output, rtol=0, atol=0, equal_nan=True)
    tensors["d_output"] = d_output
    tensors.update({"grad." + k: v for k, v in grads.items()})
    if fully_masked:
        assert mask is not None and mask.dim() == 2 and padding is None
        keep = ~mask.all(-1)
        assert (~keep).sum() == 1 and torch.isnan(grads["query"][~keep]).all()
        assert torch.isfinite(grads["query"][keep]).all()
        _, defined = autograd_gradients(module, query, key, value, self_attention, mask, padding,
                                        need_weights, average, d_output, keep)
        assert all(torch.isfinite(v).all() for v in defined.values())
        tensors.update({"defined_grad." + k: v for k, v in defined.items()})
    else:
        assert all(torch.isfinite(v).all() for v in grads.values())
    metadata["gradients"] = "1"
    export_pytorch.write_safetensors(path, tensors, metadata)


def math_case(name, *, embed, heads, head_dim, value_head_dim, length, source, causal,
              dtype=torch.float64, bias=True, description="", kv_heads=None):
    """Unbatched cross-attention computed with plain_math; weights per head."""
    g = torch.Generator().manual_seed(len(CASES_WRITTEN) * 7919 + 17)

    def rnd(*shape, scale=1.0):
        return torch.randn(shape, generator=g, dtype=dtype) * scale

    qk, vw = heads * head_dim, heads * value_head_dim
    kw, kvw = (kv_heads or heads) * head_dim, (kv_heads or heads) * value_head_dim
    p = dict(w_q=rnd(qk, embed, scale=0.4), w_k=rnd(kw, embed, scale=0.4),
             w_v=rnd(kvw, embed, scale=0.4), w_o=rnd(embed, vw, scale=0.4))
    for k, n in (("b_q", qk), ("b_k", kw), ("b_v", kvw), ("b_o", embed)):
        p[k] = rnd(n, scale=0.4) if bias else None
    query, key, value = rnd(length, embed), rnd(source, embed), rnd(source, embed)
    offset = source - length if causal == "bottom_right" else 0
    i = torch.arange(length)[:, None]
    j = torch.arange(source)[None, :]
    not_allowed = j > i + offset  # PyTorch polarity
    assert not not_allowed.all(-1).any(), "a fully masked query in a math case"
    bias_mask = torch.zeros(length, source, dtype=dtype).masked_fill(not_allowed, -math.inf)
    output, weights = plain_math(query, key, value, p, heads, bias_mask.expand(heads, -1, -1),
                                 kv_heads)
    tensors = {"q_proj_weight": p["w_q"], "k_proj_weight": p["w_k"], "v_proj_weight": p["w_v"]}
    if bias:
        tensors["in_proj_bias"] = torch.cat([p["b_q"], p["b_k"], p["b_v"]])
    tensors["out_proj.weight"] = p["w_o"]
    if bias:
        tensors["out_proj.bias"] = p["b_o"]
    tensors.update(query=query, key=key, value=value, attn_mask=not_allowed, output=output,
                   weights=weights)
    metadata = {"format": export_pytorch.FORMAT, "torch_version": torch.__version__,
                "source": "torch math", "description": description, "num_heads": heads,
                "batch_first": 1, "need_weights": 1, "average_attn_weights": 0,
                "self_attention": 0, "causal": causal}
    if kv_heads:
        metadata["num_kv_heads"] = kv_heads
    export_pytorch.write_safetensors(os.path.join(OUT, name + ".safetensors"), tensors, metadata)
    CASES_WRITTEN.append(name)


CORE_BF16_FORMAT = "mha-core-bf16-case/1"


def core_bf16_case(name, *, heads, head_dim, value_head_dim, batch, length, source,
                   kv_heads=None, causal=False, key_padding=None, attn_mask=None,
                   description=""):
    """The attention core on bfloat16 Q, K and V (no projections): batch_first `query` (N, L,
    H·d_k), `key` (N, S, H_kv·d_k), `value` (N, S, H_kv·d_v), all BF16. `output` (F64) is the
    attention of those bf16 values computed in float64, so it is exact up to fp64's rounding and
    the tests can hold the library's bf16 kernel to its a-priori bound; `torch_bf16_output`
    (BF16) is torch's own bf16 computation of the same math, for information only.

    torch 1.13 has no scaled_dot_product_attention (2.0) and nn.MultiheadAttention always
    projects, so both results come from the written-out math below (matmul, softmax), in
    float64 and in bfloat16. Masks as in the layer cases: `attn_mask` (L, S) BOOL, True = may
    not attend, shared by every sequence and head; `key_padding_mask` (N, S) BOOL, True =
    padding. A query left with no key is NaN in both results (torch's softmax of -inf); the
    library returns exactly 0 there."""
    g = torch.Generator().manual_seed(len(CASES_WRITTEN) * 7919 + 17)
    kv_heads = kv_heads or heads
    bf16, f64 = torch.bfloat16, torch.float64
    query = torch.randn(batch, length, heads * head_dim, generator=g, dtype=f64).to(bf16)
    key = torch.randn(batch, source, kv_heads * head_dim, generator=g, dtype=f64).to(bf16)
    value = torch.randn(batch, source, kv_heads * value_head_dim, generator=g, dtype=f64).to(bf16)

    not_allowed = torch.zeros(length, source, dtype=torch.bool)
    metadata = {"format": CORE_BF16_FORMAT, "torch_version": torch.__version__,
                "source": "torch math", "description": description, "num_heads": heads,
                "num_kv_heads": kv_heads, "batch_first": 1, "self_attention": 0}
    tensors = {"query": query, "key": key, "value": value}
    if causal:
        not_allowed = torch.ones(length, source, dtype=torch.bool).triu(1)
        metadata["causal"] = "top_left"
    if attn_mask is not None:
        not_allowed = not_allowed | attn_mask
    if causal or attn_mask is not None:
        tensors["attn_mask"] = not_allowed
    padding = torch.zeros(batch, source, dtype=torch.bool)
    if key_padding is not None:
        padding = torch.arange(source)[None, :] >= torch.tensor(key_padding)[:, None]
        tensors["key_padding_mask"] = padding
        metadata["key_padding_as"] = "key_lengths"
    excluded = not_allowed[None, None, :, :] | padding[:, None, None, :]  # (N, 1, L, S)
    fully_masked = excluded.all(-1)
    if fully_masked.any():
        metadata["fully_masked_queries"] = "1"

    def attend(dtype):
        group = heads // kv_heads
        q = query.to(dtype).reshape(batch, length, heads, head_dim).transpose(1, 2)
        k = key.to(dtype).reshape(batch, source, kv_heads, head_dim).transpose(1, 2)
        v = value.to(dtype).reshape(batch, source, kv_heads, value_head_dim).transpose(1, 2)
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(head_dim))
        scores = scores.masked_fill(excluded, -math.inf)
        out = torch.softmax(scores, dim=-1) @ v  # (N, H, L, d_v)
        return out.transpose(1, 2).reshape(batch, length, heads * value_head_dim)

    output = attend(f64)
    theirs = attend(bf16)
    # NaN exactly where a query has no key, in both; nowhere else.
    nan_rows = fully_masked.squeeze(1)  # (N, L)
    assert torch.equal(output.isnan().any(-1), nan_rows)
    assert torch.equal(theirs.isnan().any(-1), nan_rows)
    assert torch.isfinite(output[~nan_rows]).all()
    tensors.update(output=output, torch_bf16_output=theirs)
    export_pytorch.write_safetensors(os.path.join(OUT, name + ".safetensors"), tensors, metadata)
    CASES_WRITTEN.append(name)


CASES_WRITTEN = []


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(OUT, f))
    f32, f64 = torch.float32, torch.float64
    # Heads, bias, dtypes, unmasked.
    mha_case("self_h1_f32", embed=8, heads=1, length=5, description="1 head")
    mha_case("self_h2_f32", embed=8, heads=2, length=6, description="2 heads")
    mha_case("self_h4_f64", embed=16, heads=4, length=5, dtype=f64, description="4 heads, double")
    mha_case("self_h8_f32", embed=16, heads=8, length=7, description="8 heads")
    mha_case("self_h8_f64_nobias", embed=32, heads=8, length=4, dtype=f64, bias=False,
             description="8 heads, bias=False")
    mha_case("self_h2_f32_nobias", embed=8, heads=2, length=5, bias=False,
             description="bias=False, float")
    mha_case("self_h4_f32_per_head", embed=16, heads=4, length=5, average=False,
             description="average_attn_weights=False")
    mha_case("self_h2_f64_no_weights", embed=8, heads=2, length=5, dtype=f64, need_weights=False,
             description="need_weights=False")
    # Cross-attention, kdim / vdim.
    mha_case("cross_h2_f32", embed=8, heads=2, length=3, source=6,
             description="cross-attention, L=3, S=6")
    mha_case("cross_h4_f64_long_query", embed=16, heads=4, length=7, source=3, dtype=f64,
             description="cross-attention, L > S")
    mha_case("cross_kdim_vdim_h2_f32", embed=8, heads=2, length=4, source=5, kdim=5, vdim=3,
             description="kdim=5, vdim=3")
    mha_case("cross_kdim_vdim_h4_f64_nobias", embed=16, heads=4, length=3, source=6, kdim=12,
             vdim=7, dtype=f64, bias=False, average=False,
             description="kdim, vdim, bias=False, per-head weights")
    mha_case("cross_kdim_h1_f64", embed=6, heads=1, length=2, source=4, kdim=9, vdim=9,
             dtype=f64, description="kdim = vdim != embed_dim")
    # Masks.
    mha_case("self_causal_h2_f32", embed=8, heads=2, length=6, attn_mask="causal",
             description="causal bool attn_mask (PyTorch triu), as mha::causal top_left")
    mha_case("self_causal_float_h4_f64", embed=16, heads=4, length=5, dtype=f64,
             attn_mask="causal_float", description="causal as a float -inf attn_mask")
    mha_case("cross_causal_top_left_h2_f64", embed=8, heads=2, length=4, source=7, dtype=f64,
             attn_mask="causal", description="triu mask with L < S: top-left alignment")
    mha_case("cross_causal_top_left_long_query_h2_f32", embed=8, heads=2, length=6, source=3,
             attn_mask="causal", average=False,
             description="triu mask with L > S: top-left alignment")
    mha_case("self_bool_mask_h2_f32", embed=8, heads=2, length=5, attn_mask="bool",
             description="random bool attn_mask (True = may not attend)")
    mha_case("cross_bool_mask_h4_f64", embed=16, heads=4, length=4, source=6, dtype=f64,
             attn_mask="bool", average=False, description="bool attn_mask, per-head weights")
    mha_case("self_float_mask_h2_f32", embed=8, heads=2, length=5, attn_mask="float",
             description="float attn_mask with -inf entries")
    mha_case("cross_float_mask_h4_f64", embed=16, heads=4, length=3, source=5, dtype=f64,
             attn_mask="float", description="float attn_mask, cross-attention")
    mha_case("self_key_padding_h2_f32", embed=8, heads=2, length=5, key_padding=[3],
             description="unbatched key_padding_mask, as key_lengths")
    # Batches.
    mha_case("batch_first_h2_f32", embed=8, heads=2, length=4, batch=3,
             description="batch_first, 3 sequences")
    mha_case("batch_first_key_padding_h4_f64", embed=16, heads=4, length=5, batch=3, dtype=f64,
             key_padding=[5, 3, 1], description="batch_first, suffix key_padding_mask")
    mha_case("batch_first_key_padding_keep_h2_f32", embed=8, heads=2, length=4, batch=2,
             key_padding=[2, 4], key_padding_as="keep_mask",
             description="suffix key_padding_mask as keep_mask")
    mha_case("batch_first_random_padding_h2_f64", embed=8, heads=2, length=5, batch=2, dtype=f64,
             key_padding="random", description="non-suffix key_padding_mask, as keep_mask")
    mha_case("batch_first_causal_padding_h4_f32", embed=16, heads=4, length=5, batch=2,
             attn_mask="causal", key_padding=[5, 4], average=False,
             description="causal and key padding together")
    mha_case("batch_first_bool_per_head_h2_f32", embed=8, heads=2, length=4, batch=2,
             attn_mask="bool_per_head", average=False,
             description="3-D bool attn_mask (N*H, L, S)")
    mha_case("batch_first_float_per_head_h4_f64", embed=16, heads=4, length=3, batch=2,
             dtype=f64, attn_mask="float_per_head", key_padding=[3, 2],
             description="3-D float attn_mask and key padding")
    mha_case("batch_first_cross_kdim_h2_f64", embed=8, heads=2, length=3, source=5, batch=3,
             kdim=6, vdim=4, dtype=f64, key_padding=[5, 2, 4], description="batched cross, kdim/vdim")
    mha_case("seq_first_h2_f32", embed=8, heads=2, length=4, batch=3, batch_first=False,
             description="batch_first=False: (L, N, E)")
    mha_case("seq_first_cross_h4_f64", embed=16, heads=4, length=3, source=5, batch=2,
             batch_first=False, dtype=f64, key_padding=[4, 5], average=False,
             description="batch_first=False cross-attention with padding")
    mha_case("batch_first_h8_f32", embed=32, heads=8, length=3, batch=4, attn_mask="float",
             description="8 heads, 4 sequences, shared float mask")
    # The documented difference: PyTorch NaN where this library gives 0.
    mha_case("fully_masked_query_nan", embed=8, heads=2, length=4, dtype=f64,
             attn_mask="fully_masked",
             description="query 1 fully masked: NaN in PyTorch, exactly 0 attention here")
    # Plain math.
    math_case("math_causal_bottom_right", embed=8, heads=2, head_dim=4, value_head_dim=4,
              length=3, source=6, causal="bottom_right",
              description="causal aligned bottom-right (the library's default), L < S")
    math_case("math_causal_top_left", embed=8, heads=2, head_dim=4, value_head_dim=4, length=3,
              source=6, causal="top_left", description="causal top-left (is_causal), L < S")
    math_case("math_head_dims", embed=8, heads=2, head_dim=3, value_head_dim=5, length=4,
              source=5, causal="bottom_right",
              description="d_k=3, d_v=5 (beyond nn.MultiheadAttention)")
    math_case("math_head_dims_f32_nobias", embed=6, heads=3, head_dim=4, value_head_dim=2,
              length=5, source=5, causal="top_left", dtype=torch.float32, bias=False,
              description="float, d_k=4, d_v=2, bias=False")
    # Grouped-query attention (nn.MultiheadAttention has none; torch 2.5+'s
    # scaled_dot_product_attention(enable_gqa=True) is the same math).
    math_case("math_gqa_h4_kv2", embed=8, heads=4, head_dim=2, value_head_dim=2, length=5,
              source=5, causal="bottom_right", kv_heads=2,
              description="grouped-query: 4 query heads share 2 key/value heads")
    math_case("math_mqa_h4_kv1_f32", embed=12, heads=4, head_dim=3, value_head_dim=5, length=3,
              source=6, causal="top_left", kv_heads=1, dtype=torch.float32,
              description="multi-query: one key/value head, d_k=3, d_v=5, float")
    math_case("math_gqa_h6_kv3_nobias", embed=12, heads=6, head_dim=2, value_head_dim=2,
              length=4, source=7, causal="bottom_right", kv_heads=3, bias=False,
              description="grouped-query: 6 query heads, 3 key/value heads, bias=False")
    # Appended last: every case's seeds follow from its position, so the files above stay the same.
    mha_case("batch_first_random_padding_padded_keys_h4_f32", embed=16, heads=4, length=6,
             batch=3, key_padding="random", key_padding_as="padded_keys", average=False,
             description="non-suffix key_padding_mask, as padded_keys (N x S)")
    # Gradients (torch.autograd.grad for a random d_output), appended after every forward case.
    mha_case("grad_self_h2_f64", embed=8, heads=2, length=5, dtype=f64, gradients=True,
             description="gradients: self-attention, 2 heads, double")
    mha_case("grad_self_h8_f32", embed=16, heads=8, length=6, gradients=True,
             description="gradients: self-attention, 8 heads, float")
    mha_case("grad_cross_h4_f64", embed=16, heads=4, length=3, source=6, dtype=f64,
             gradients=True, description="gradients: cross-attention, L=3, S=6")
    mha_case("grad_cross_long_query_h2_f32", embed=8, heads=2, length=7, source=4,
             gradients=True, description="gradients: cross-attention, L=7 > S=4, float")
    mha_case("grad_self_causal_h2_f64", embed=8, heads=2, length=6, dtype=f64,
             attn_mask="causal", gradients=True,
             description="gradients: causal bool attn_mask, as mha::causal top_left")
    mha_case("grad_self_key_padding_h2_f64", embed=8, heads=2, length=6, dtype=f64,
             key_padding=[4], gradients=True,
             description="gradients: key_padding_mask, as key_lengths")
    mha_case("grad_self_bool_mask_h4_f32", embed=16, heads=4, length=5, attn_mask="bool",
             gradients=True, description="gradients: random bool attn_mask")
    mha_case("grad_cross_float_mask_h2_f64", embed=8, heads=2, length=4, source=6, dtype=f64,
             attn_mask="float", gradients=True,
             description="gradients: float attn_mask with -inf entries, cross-attention")
    mha_case("grad_cross_kdim_vdim_h2_f64", embed=8, heads=2, length=4, source=5, kdim=5,
             vdim=3, dtype=f64, gradients=True, description="gradients: kdim=5, vdim=3")
    mha_case("grad_cross_kdim_vdim_h4_f32_nobias", embed=16, heads=4, length=3, source=6,
             kdim=12, vdim=7, bias=False, gradients=True,
             description="gradients: kdim, vdim, bias=False, float")
    mha_case("grad_self_h4_f64_nobias", embed=16, heads=4, length=5, dtype=f64, bias=False,
             gradients=True, description="gradients: bias=False")
    mha_case("grad_cross_fully_masked_query_h2_f64", embed=8, heads=2, length=4, source=5,
             kdim=6, vdim=6, dtype=f64, attn_mask="fully_masked", gradients=True,
             description="gradients: query 1 fully masked: NaN in PyTorch, exactly 0 here")
    mha_case("grad_batch_first_causal_padding_h2_f64", embed=8, heads=2, length=5, batch=3,
             dtype=f64, attn_mask="causal", key_padding=[5, 3, 4], gradients=True,
             description="gradients: packed batch of 3, causal and key padding")
    mha_case("grad_batch_first_cross_h4_f32", embed=16, heads=4, length=3, source=5, batch=2,
             kdim=6, vdim=4, key_padding=[5, 2], gradients=True,
             description="gradients: packed batch of 2, cross-attention, kdim/vdim, padding")
    mha_case("grad_seq_first_float_per_head_h2_f64", embed=8, heads=2, length=4, batch=2,
             batch_first=False, dtype=f64, attn_mask="float_per_head", gradients=True,
             description="gradients: batch_first=False, 3-D float attn_mask")
    # The bf16 attention core (appended after every layer case). Named core_bf16_*: the layer
    # tests skip them, test_pytorch_golden's bf16 test reads them.
    core_bf16_case("core_bf16_causal_h2", heads=2, head_dim=16, value_head_dim=16, batch=1,
                   length=8, source=8, causal=True,
                   description="bf16 core: causal (L = S), 2 heads of width 16")
    # Sequence 1 has 3 valid keys; query 2 may see keys 4 and 5 only, so it has no key there.
    only_late_keys = torch.zeros(4, 6, dtype=torch.bool)
    only_late_keys[2, :4] = True
    core_bf16_case("core_bf16_padding_fully_masked_h2", heads=2, head_dim=8, value_head_dim=8,
                   batch=2, length=4, source=6, key_padding=[6, 3], attn_mask=only_late_keys,
                   description="bf16 core: key padding [6, 3] and a bool mask; query 2 of "
                               "sequence 1 has no key (NaN in torch, 0 here)")
    core_bf16_case("core_bf16_head_dims_h4", heads=4, head_dim=16, value_head_dim=4, batch=2,
                   length=5, source=7, description="bf16 core: d_k=16, d_v=4, 4 heads, 2 "
                                                   "sequences, cross-attention")
    core_bf16_case("core_bf16_gqa_h4_kv2", heads=4, kv_heads=2, head_dim=8, value_head_dim=8,
                   batch=1, length=6, source=9,
                   attn_mask=allowed_rows((6, 9), torch.Generator().manual_seed(5)),
                   description="bf16 core: grouped-query, 4 query heads share 2 key/value heads, "
                               "random bool mask")
    core_bf16_case("core_bf16_mqa_h8_kv1", heads=8, kv_heads=1, head_dim=4, value_head_dim=6,
                   batch=3, length=3, source=5, key_padding=[5, 2, 4],
                   description="bf16 core: multi-query (8 heads, 1 key/value head), d_k=4, "
                               "d_v=6, key padding [5, 2, 4]")
    print(f"wrote {len(CASES_WRITTEN)} cases to {OUT} with torch {torch.__version__}")


if __name__ == "__main__":
    main()
