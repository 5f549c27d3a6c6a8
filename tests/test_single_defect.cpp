// SPDX-License-Identifier: MIT
// Negative tests that differ from a valid input in exactly one way. A wrong-shape input that also
// has the wrong element count lets a check that compares only counts pass (a transposed matrix
// would then load); here every refused input has the right count, dtype and names, and only its
// shape (or rank) is wrong. Each case first shows that the valid input is accepted. Also: a layer
// saved in PyTorch's packed form, checked tensor by tensor against hand-written names and shapes.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include <mha/io/safetensors.hpp>
#include <mha/mha.hpp>

#include "reference.hpp"

using mha::Index;

namespace {

using bytes_t = std::vector<unsigned char>;

/// Runs `f`, which must throw Exception whose message contains `part`.
template <class Exception, class F>
void require_refused(F&& f, const std::string& part) {
    try {
        f();
    } catch (const Exception& e) {
        const std::string message = e.what();
        INFO("message: " << message);
        CHECK(message.find(part) != std::string::npos);
        return;
    }
    FAIL("not refused (expected a message containing '" << part << "')");
}

mha::matrix<float> numbered(Index rows, Index cols, float first) {
    mha::matrix<float> m(rows, cols);
    for (Index c = 0; c < cols; ++c)
        for (Index r = 0; r < rows; ++r)
            m(r, c) = first + static_cast<float>(r * cols + c);
    return m;
}

/// The separate form with E = 6, H = 2, d_k = 2 (q: 4 × 6), kdim 5 (k: 4 × 5), d_v = 2 and vdim 3
/// (v: 4 × 3, out: 6 × 4): no matrix is square, so each transpose is a different shape. `defect`
/// names the one tensor written transposed (or, for the biases, as a rank-2 tensor).
bytes_t separate_form(const std::string& defect = "") {
    mha::safetensors_writer w;
    auto add = [&](const std::string& name, const mha::matrix<float>& m) {
        if (name == defect)
            w.add_matrix(name, m.transpose());  // same elements, shape (cols, rows)
        else
            w.add_matrix(name, m);
    };
    add("q_proj_weight", numbered(4, 6, 0));
    add("k_proj_weight", numbered(4, 5, 100));
    add("v_proj_weight", numbered(4, 3, 200));
    add("out_proj.weight", numbered(6, 4, 300));
    const mha::vector<float> in_bias = numbered(12, 1, 400);
    if (defect == "in_proj_bias")
        w.add_columns("in_proj_bias", in_bias.transpose(), {12, 1});  // rank 2, same 12 elements
    else
        w.add_vector("in_proj_bias", in_bias);
    const mha::vector<float> out_bias = numbered(6, 1, 500);
    if (defect == "out_proj.bias")
        w.add_columns("out_proj.bias", out_bias.transpose(), {6, 1});
    else
        w.add_vector("out_proj.bias", out_bias);
    return w.bytes();
}

/// The packed form with E = 4: in_proj_weight 12 × 4, out_proj.weight 4 × 4 (square, so its
/// transpose cannot be told apart and is not a defect here).
bytes_t packed_form(const std::string& defect = "") {
    mha::safetensors_writer w;
    const mha::matrix<float> in_w = numbered(12, 4, 0);
    if (defect == "in_proj_weight")
        w.add_matrix("in_proj_weight", in_w.transpose());
    else if (defect == "in_proj_weight rank 3")
        w.add_columns("in_proj_weight", in_w.transpose(), {3, 4, 4});
    else
        w.add_matrix("in_proj_weight", in_w);
    w.add_vector("in_proj_bias", numbered(12, 1, 100));
    w.add_matrix("out_proj.weight", numbered(4, 4, 200));
    w.add_vector("out_proj.bias", numbered(4, 1, 300));
    return w.bytes();
}

auto load(const bytes_t& bytes, Index heads) {
    return mha::load_multi_head_attention<float>(mha::safetensors_file::parse(bytes), heads);
}

}  // namespace

TEST_CASE("a state_dict with one tensor transposed is refused", "[safetensors][single-defect]") {
    REQUIRE_NOTHROW(load(separate_form(), 2));
    for (const std::string name : {"q_proj_weight", "k_proj_weight", "v_proj_weight",
                                   "out_proj.weight", "in_proj_bias", "out_proj.bias"}) {
        INFO("transposed: " << name);
        // Which check fires first depends on what the loader reads first (a transposed
        // out_proj.weight makes E wrong, so q_proj_weight's width no longer fits); the message
        // must name a shape, and no layer may come out.
        require_refused<mha::format_error>([&] { (void)load(separate_form(name), 2); }, "shape");
    }
    REQUIRE_NOTHROW(load(packed_form(), 2));
    for (const std::string defect : {"in_proj_weight", "in_proj_weight rank 3"}) {
        INFO("defect: " << defect);
        require_refused<mha::format_error>([&] { (void)load(packed_form(defect), 2); },
                                           "shape of tensor 'in_proj_weight' must be [12, 4]");
    }
}

TEST_CASE("the reader's matrix and vector views refuse other ranks of the same size",
          "[safetensors][single-defect]") {
    mha::safetensors_writer w;
    w.add_matrix("m", numbered(2, 3, 0));
    w.add_columns("m3", numbered(3, 2, 0), {1, 2, 3});
    w.add_vector("v", numbered(6, 1, 0));
    w.add_columns("v2", numbered(6, 1, 0), {1, 6});
    const auto f = mha::safetensors_file::parse(w.bytes());
    CHECK(f.as_matrix<float>("m") == numbered(2, 3, 0));
    CHECK(f.as_vector<float>("v") == mha::vector<float>(numbered(6, 1, 0)));
    require_refused<mha::format_error>([&] { (void)f.as_matrix<float>("m3"); }, "rank");
    require_refused<mha::format_error>([&] { (void)f.as_matrix<float>("v"); }, "rank");
    require_refused<mha::format_error>([&] { (void)f.as_vector<float>("v2"); }, "rank");
    require_refused<mha::format_error>([&] { (void)f.as_vector<float>("m"); }, "rank");
    // Same dtype and count, other shape: expect() compares the whole shape.
    CHECK_NOTHROW(f.expect<float>("m", {2, 3}));
    require_refused<mha::format_error>([&] { (void)f.expect<float>("m", {3, 2}); }, "[3, 2]");
    require_refused<mha::format_error>([&] { (void)f.expect<float>("m", {6}); }, "[6]");
}

TEST_CASE("the writer refuses a shape with the right count but the wrong last dimension",
          "[safetensors][single-defect]") {
    mha::safetensors_writer w;
    const mha::matrix<float> m = numbered(4, 3, 0);  // 3 columns of width 4
    CHECK_NOTHROW(w.add_columns("ok", m, {3, 4}));
    require_refused<mha::shape_error>([&] { w.add_columns("bad", m, {4, 3}); }, "[4, 3]");
}

TEST_CASE("layer parameters transposed with the right element count are refused",
          "[layer][single-defect]") {
    // No parameter matrix is square (E 6, H·d_k 4, H·d_v 4, kdim 5, vdim 3), so each transpose
    // is a shape change that only a rows-and-columns check sees.
    mha::attention_config c;
    c.embed_dim = 6;
    c.num_heads = 2;
    c.head_dim = 2;
    c.value_head_dim = 2;
    c.key_input_dim = 5;
    c.value_input_dim = 3;
    const mha::attention_parameters<float> good =
        mha::multi_head_attention<float>(c, 1).parameters();
    REQUIRE_NOTHROW(mha::multi_head_attention<float>(c, good));
    auto with = [&](auto change) {
        mha::attention_parameters<float> p = good;
        change(p);
        return [c, p] { (void)mha::multi_head_attention<float>(c, p); };
    };
    require_refused<mha::shape_error>(
        with([](auto& p) { p.w_q = mha::matrix<float>(p.w_q.transpose()); }), "parameters.w_q");
    require_refused<mha::shape_error>(
        with([](auto& p) { p.w_k = mha::matrix<float>(p.w_k.transpose()); }), "parameters.w_k");
    require_refused<mha::shape_error>(
        with([](auto& p) { p.w_v = mha::matrix<float>(p.w_v.transpose()); }), "parameters.w_v");
    require_refused<mha::shape_error>(
        with([](auto& p) { p.w_o = mha::matrix<float>(p.w_o.transpose()); }), "parameters.w_o");

    // from_packed: the stacked input weight transposed (E × 3E instead of 3E × E).
    mha::attention_config e;
    e.embed_dim = 4;
    e.num_heads = 2;
    const mha::matrix<float> in_w = numbered(12, 4, 0), out_w = numbered(4, 4, 50);
    const mha::vector<float> in_b = numbered(12, 1, 0), out_b = numbered(4, 1, 0);
    REQUIRE_NOTHROW(mha::multi_head_attention<float>::from_packed(e, in_w, in_b, out_w, out_b));
    require_refused<mha::shape_error>(
        [&] {
            const mha::matrix<float> t = in_w.transpose();
            (void)mha::multi_head_attention<float>::from_packed(e, t, in_b, out_w, out_b);
        },
        "in_proj_weight");
}

TEST_CASE("kv_cache refuses keys or values of the other's width", "[kv_cache][single-defect]") {
    // Keys 6 rows, values 4 rows: appending values of 6 rows (a swapped argument) must throw.
    mha::kv_cache<float> cache(6, 4);
    cache.append(numbered(6, 2, 0), numbered(4, 2, 0));
    REQUIRE(cache.size() == 2);
    require_refused<mha::shape_error>([&] { cache.append(numbered(6, 2, 0), numbered(6, 2, 0)); },
                                      "values");
    require_refused<mha::shape_error>([&] { cache.append(numbered(4, 2, 0), numbered(4, 2, 0)); },
                                      "keys");
    require_refused<mha::shape_error>([&] { cache.append(numbered(6, 2, 0), numbered(4, 3, 0)); },
                                      "values");
    CHECK(cache.size() == 2);
}

TEST_CASE("a layer saves in PyTorch's packed form and loads back", "[safetensors][pytorch]") {
    // E = 4, H = 2, d_k = d_v = 2, kdim = vdim = E: exactly PyTorch's packed layout. Names and
    // shapes are written here by hand from nn.MultiheadAttention's state_dict.
    mha::attention_config c;
    c.embed_dim = 4;
    c.num_heads = 2;
    mha_test::value_source values(5);
    mha::attention_parameters<float> p;
    p.w_q = values.normal_matrix<float>(4, 4);
    p.w_k = values.normal_matrix<float>(4, 4);
    p.w_v = values.normal_matrix<float>(4, 4);
    p.w_o = values.normal_matrix<float>(4, 4);
    p.b_q = values.normal_matrix<float>(4, 1);
    p.b_k = values.normal_matrix<float>(4, 1);
    p.b_v = values.normal_matrix<float>(4, 1);
    p.b_o = values.normal_matrix<float>(4, 1);
    const mha::multi_head_attention<float> layer(c, p);
    mha::safetensors_writer w;
    mha::save_multi_head_attention(w, layer, "attn.");
    const auto f = mha::safetensors_file::parse(w.bytes());
    const std::vector<std::string> expected = {"attn.in_proj_bias", "attn.in_proj_weight",
                                               "attn.out_proj.bias", "attn.out_proj.weight"};
    std::vector<std::string> names = f.names();
    std::sort(names.begin(), names.end());
    CHECK(names == expected);
    CHECK(f.expect<float>("attn.in_proj_weight").shape == std::vector<std::int64_t>{12, 4});
    CHECK(f.expect<float>("attn.in_proj_bias").shape == std::vector<std::int64_t>{12});
    CHECK(f.expect<float>("attn.out_proj.weight").shape == std::vector<std::int64_t>{4, 4});
    CHECK(f.expect<float>("attn.out_proj.bias").shape == std::vector<std::int64_t>{4});
    // Rows of in_proj_weight are q, k, v in that order; in_proj_bias likewise.
    const mha::matrix<float> in_w = f.as_matrix<float>("attn.in_proj_weight");
    CHECK(in_w.topRows(4) == p.w_q);
    CHECK(in_w.middleRows(4, 4) == p.w_k);
    CHECK(in_w.bottomRows(4) == p.w_v);
    const mha::vector<float> in_b = f.as_vector<float>("attn.in_proj_bias");
    CHECK(in_b.head(4) == p.b_q);
    CHECK(in_b.segment(4, 4) == p.b_k);
    CHECK(in_b.tail(4) == p.b_v);
    CHECK(f.as_matrix<float>("attn.out_proj.weight") == p.w_o);
    CHECK(f.as_vector<float>("attn.out_proj.bias") == p.b_o);
    // Element (r, c) of a PyTorch weight is at r·cols + c in the file (row-major).
    const std::vector<float> raw = f.values<float>("attn.in_proj_weight");
    CHECK(raw[1 * 4 + 2] == p.w_q(1, 2));
    CHECK(raw[5 * 4 + 3] == p.w_k(1, 3));

    const auto back = mha::load_multi_head_attention<float>(f, 2, "attn.");
    const auto q = back.parameters();
    CHECK(q.w_q == p.w_q);
    CHECK(q.w_k == p.w_k);
    CHECK(q.w_v == p.w_v);
    CHECK(q.b_k == p.b_k);
    const mha::matrix<float> x = values.normal_matrix<float>(4, 5);
    CHECK(back.forward(x) == layer.forward(x));

    // Without bias: the same weights, no bias tensors.
    c.bias = false;
    p.b_q = p.b_k = p.b_v = p.b_o = mha::vector<float>();
    mha::safetensors_writer nb;
    mha::save_multi_head_attention(nb, mha::multi_head_attention<float>(c, p));
    const auto g = mha::safetensors_file::parse(nb.bytes());
    CHECK(g.contains("in_proj_weight"));
    CHECK_FALSE(g.contains("in_proj_bias"));
    CHECK_FALSE(g.contains("out_proj.bias"));
    CHECK_FALSE(g.contains("q_proj_weight"));

    // d_k ≠ E / H, or grouped heads: PyTorch has no packed form, so the separate one is written.
    for (const bool grouped : {false, true}) {
        mha::attention_config s;
        s.embed_dim = 4;
        s.num_heads = 2;
        if (grouped)
            s.num_kv_heads = 1;
        else
            s.head_dim = 3;
        mha::safetensors_writer sw;
        mha::save_multi_head_attention(sw, mha::multi_head_attention<float>(s, 2));
        const auto h = mha::safetensors_file::parse(sw.bytes());
        INFO("grouped " << grouped);
        CHECK_FALSE(h.contains("in_proj_weight"));
        CHECK(h.contains("q_proj_weight"));
        CHECK(h.expect<float>("k_proj_weight").shape ==
              std::vector<std::int64_t>{grouped ? 2 : 6, 4});
    }
}
