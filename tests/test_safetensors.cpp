// SPDX-License-Identifier: MIT
// mha/io/safetensors.hpp: the reader's view of tensors (columns, matrices, vectors), the writer,
// and every malformed file the reader must refuse with a format_error naming what is wrong, what
// was expected and what was found. Bad files are built here byte by byte.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include <mha/io/safetensors.hpp>
#include <mha/mha.hpp>

namespace {

using bytes_t = std::vector<unsigned char>;

// A file with the given header text (length prefix computed) and `data` bytes after it.
bytes_t make_file(const std::string& header, std::size_t data = 0, std::uint64_t length = ~0ull) {
    if (length == ~0ull) length = header.size();
    bytes_t b;
    for (int i = 0; i < 8; ++i)
        b.push_back(static_cast<unsigned char>(length >> (8 * i)));
    b.insert(b.end(), header.begin(), header.end());
    b.resize(b.size() + data, 0);
    return b;
}

// Runs `f`, which must throw mha::format_error (hence std::invalid_argument) whose message
// contains every one of `parts`.
template <class F>
void require_format_error(F&& f, const std::vector<std::string>& parts) {
    try {
        f();
    } catch (const mha::format_error& e) {
        const std::string message = e.what();
        for (const auto& part : parts) {
            INFO("message: " << message);
            CHECK(message.find(part) != std::string::npos);
        }
        const std::invalid_argument* base = &e;  // the documented base class
        CHECK(base != nullptr);
        return;
    }
    FAIL("no mha::format_error thrown");
}

void require_parse_error(const bytes_t& b, const std::vector<std::string>& parts) {
    require_format_error([&] { (void)mha::safetensors_file::parse(b, "bad"); }, parts);
}

const char* one_f32 = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";

}  // namespace

TEST_CASE("writer and reader agree on layout, dtypes and metadata", "[safetensors]") {
    // A 3 × 2 matrix of tokens (one column per token) is the (2, 3) tensor with the same bytes.
    mha::matrix<float> tokens(3, 2);
    tokens << 1, 4, 2, 5, 3, 6;
    mha::matrix<double> weight(2, 3);  // a PyTorch (out, in) weight
    weight << 1, 2, 3, 4, 5, 6;
    mha::vector<double> bias(2);
    bias << -1, 0.5;
    mha::bool_matrix keep(2, 2);
    keep << true, false, true, true;

    mha::safetensors_writer w;
    w.set_metadata("torch_version", "1.13");
    w.add_columns("tokens", tokens);
    w.add_matrix("weight", weight);
    w.add_vector("bias", bias);
    w.add_columns("keep", keep);
    w.add_columns("batch", tokens, {2, 1, 3});  // (N, L, E) with N = 2, L = 1
    const bytes_t b = w.bytes();
    const auto header_length =
        static_cast<std::size_t>(b[0]) | (static_cast<std::size_t>(b[1]) << 8);
    CHECK(header_length % 8 == 0);  // the data section is aligned

    const auto f = mha::safetensors_file::parse(b);
    CHECK(f.metadata("torch_version", "") == "1.13");
    CHECK(f.metadata("absent", "fallback") == "fallback");
    CHECK(f.names() == std::vector<std::string>{"batch", "bias", "keep", "tokens", "weight"});
    CHECK(f.info("tokens").shape == std::vector<std::int64_t>{2, 3});
    CHECK(f.info("tokens").dtype == "F32");
    CHECK(f.values<float>("tokens") == std::vector<float>{1, 2, 3, 4, 5, 6});  // row-major (L, E)
    CHECK(f.as_columns<float>("tokens") == tokens);
    CHECK(f.info("weight").shape == std::vector<std::int64_t>{2, 3});
    CHECK(f.values<double>("weight") == std::vector<double>{1, 2, 3, 4, 5, 6});
    CHECK(f.as_matrix<double>("weight") == weight);
    CHECK(f.as_vector<double>("bias") == bias);
    CHECK(f.as_columns<bool>("keep") == keep);
    CHECK(f.info("batch").shape == std::vector<std::int64_t>{2, 1, 3});
    CHECK(f.as_columns<float>("batch") == tokens);
}

TEST_CASE("a file written to disk reads back", "[safetensors]") {
    const std::string path = "test_safetensors_roundtrip.safetensors";
    mha::safetensors_writer w;
    w.add_vector("v", mha::vector<float>::LinSpaced(5, 0, 4));
    w.write(path);
    const auto f = mha::safetensors_file::read(path);
    CHECK(f.as_vector<float>("v") == mha::vector<float>::LinSpaced(5, 0, 4));
    std::remove(path.c_str());
    require_format_error([&] { (void)mha::safetensors_file::read("no/such/file.safetensors"); },
                         {"'no/such/file.safetensors' must be a readable file"});
}

TEST_CASE("an empty tensor set and zero-size tensors are valid", "[safetensors]") {
    CHECK(mha::safetensors_file::parse(make_file("{}")).names().empty());
    mha::safetensors_writer w;
    w.add_columns("empty", mha::matrix<float>(4, 0));
    w.add_vector("v", mha::vector<float>::Ones(2));
    const auto f = mha::safetensors_file::parse(w.bytes());
    CHECK(f.info("empty").shape == std::vector<std::int64_t>{0, 4});
    CHECK(f.as_columns<float>("empty").rows() == 4);
    CHECK(f.as_columns<float>("empty").cols() == 0);
}

TEST_CASE("truncated and oversized headers are refused", "[safetensors]") {
    require_parse_error(bytes_t{1, 0, 0}, {"bad", "file size must be at least 8 bytes", "got 3"});
    require_parse_error(make_file("{}", 0, 1000), {"header length must be at most 2", "got 1000"});
    // Every proper prefix of a valid file is refused, and none crashes the reader.
    mha::safetensors_writer w;
    w.add_vector("x", mha::vector<double>::Ones(3));
    w.add_matrix("y", mha::matrix<float>::Ones(2, 2));
    const bytes_t good = w.bytes();
    CHECK_NOTHROW(mha::safetensors_file::parse(good));
    for (std::size_t n = 0; n < good.size(); ++n) {
        INFO("prefix of " << n << " bytes");
        CHECK_THROWS_AS(mha::safetensors_file::parse(bytes_t(good.begin(), good.begin() + n)),
                        mha::format_error);
    }
}

TEST_CASE("a header that is not the expected JSON is refused", "[safetensors]") {
    require_parse_error(make_file("{\"a\": [1, 2"), {"header must be valid JSON", "{\"a\": [1, 2"});
    require_parse_error(make_file("[1, 2]"), {"header must be a JSON object", "got array"});
    require_parse_error(make_file(R"({"a": 3})"), {"tensor 'a' must be an object"});
    require_parse_error(make_file(R"({"a":{"shape":[1],"data_offsets":[0,4]}})", 4),
                        {"tensor 'a' dtype must be a string", "got nothing"});
    require_parse_error(make_file(R"({"a":{"dtype":"F12","shape":[1],"data_offsets":[0,4]}})", 4),
                        {"tensor 'a' dtype must be one of", "got \"F12\""});
    require_parse_error(make_file(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4),
                        {"tensor 'a' shape must be non-negative integers", "got -1"});
    require_parse_error(make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", 4),
                        {"tensor 'a' data_offsets must be an array of two", "got [0]"});
    require_parse_error(make_file(R"({"__metadata__":{"k":1}})"),
                        {"__metadata__[\"k\"] must be a string", "got number"});
    require_parse_error(
        make_file(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}})",
                  4),
        {"tensor 'a' shape must be dimensions whose non-zero product times 4 bytes is at most "
         "9223372036854775807",
         "got [4294967296,4294967296]"});
}

TEST_CASE("data offsets out of range, overlapping or leaving gaps are refused", "[safetensors]") {
    CHECK_NOTHROW(mha::safetensors_file::parse(make_file(one_f32, 8)));
    require_parse_error(make_file(one_f32, 4), {"tensor 'a' data_offsets must be within the data "
                                                "section (end <= 4)",
                                                "got [0,8]"});
    require_parse_error(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8),
                        {"begin <= end", "got [8,0]"});
    require_parse_error(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,12]}})", 12),
                        {"tensor 'a' byte size must be 8 (F32 [2])", "got 12"});
    require_parse_error(
        make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                  R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                  12),
        {"data_offsets of tensor 'b' must be not overlapping", "end of tensor 'a'", "got 4"});
    require_parse_error(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                  R"("b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}})",
                                  16),
                        {"data_offsets of tensor 'b' must be contiguous: begin == 8", "got 12"});
    require_parse_error(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
                        {"tensor 'a' must be contiguous: begin == 0", "start of the data section"});
    require_parse_error(make_file(one_f32, 9),
                        {"data section size must be 8 bytes", "got 9 bytes"});
}

TEST_CASE("missing tensors, wrong dtypes and wrong ranks are refused", "[safetensors]") {
    const auto f = mha::safetensors_file::parse(make_file(one_f32, 8));
    require_format_error([&] { (void)f.info("b"); },
                         {"tensor 'b' must be present", "got absent (the file has: a)"});
    require_format_error([&] { (void)f.as_columns<double>("a"); },
                         {"dtype of tensor 'a' must be F64", "got F32"});
    require_format_error([&] { (void)f.as_columns<bool>("a"); },
                         {"dtype of tensor 'a' must be BOOL", "got F32"});
    require_format_error([&] { (void)f.as_matrix<float>("a"); },
                         {"rank of tensor 'a' must be 2", "got 1"});
    require_format_error([&] { (void)f.expect<float>("a", {3}, "(three)"); },
                         {"shape of tensor 'a' must be [3] (three)", "got [2]"});
}

TEST_CASE("the writer refuses duplicate names and shapes that do not fit", "[safetensors]") {
    mha::safetensors_writer w;
    w.add_vector("x", mha::vector<float>::Ones(2));
    CHECK_THROWS_AS(w.add_vector("x", mha::vector<float>::Ones(2)), mha::value_error);
    CHECK_THROWS_AS(w.add_vector("__metadata__", mha::vector<float>::Ones(2)), mha::value_error);
    CHECK_THROWS_AS(w.add_columns("y", mha::matrix<float>::Ones(3, 2), {3, 2}), mha::shape_error);
}

namespace {

// A state_dict as nn.MultiheadAttention(embed, heads, bias, kdim, vdim) names it, random values.
mha::safetensors_writer state_dict(mha::Index e, mha::Index kdim, mha::Index vdim, bool bias) {
    mha::safetensors_writer w;
    if (kdim == e && vdim == e) {
        w.add_matrix("in_proj_weight", mha::matrix<float>::Random(3 * e, e));
    } else {
        w.add_matrix("q_proj_weight", mha::matrix<float>::Random(e, e));
        w.add_matrix("k_proj_weight", mha::matrix<float>::Random(e, kdim));
        w.add_matrix("v_proj_weight", mha::matrix<float>::Random(e, vdim));
    }
    if (bias) w.add_vector("in_proj_bias", mha::vector<float>::Random(3 * e));
    w.add_matrix("out_proj.weight", mha::matrix<float>::Random(e, e));
    if (bias) w.add_vector("out_proj.bias", mha::vector<float>::Random(e));
    return w;
}

}  // namespace

TEST_CASE("a PyTorch state_dict loads into the layer and saves back", "[safetensors]") {
    for (const bool bias : {true, false}) {
        for (const mha::Index kdim : {8, 5}) {
            INFO("bias " << bias << ", kdim " << kdim);
            const auto f = mha::safetensors_file::parse(state_dict(8, kdim, 3, bias).bytes());
            const auto layer = mha::load_multi_head_attention<float>(f, 2);
            CHECK(layer.config().embed_dim == 8);
            CHECK(layer.config().key_input_dim == kdim);
            CHECK(layer.config().value_input_dim == 3);
            CHECK(layer.config().bias == bias);
            CHECK(layer.parameters().w_k == f.as_matrix<float>("k_proj_weight"));
            CHECK(layer.parameters().w_o == f.as_matrix<float>("out_proj.weight"));
            if (bias) CHECK(layer.parameters().b_v == f.as_vector<float>("in_proj_bias").tail(8));

            mha::safetensors_writer again;
            mha::save_multi_head_attention(again, layer, "attn.");
            const auto g = mha::safetensors_file::parse(again.bytes());
            CHECK(g.contains("attn.in_proj_bias") == bias);
            for (const auto& name : f.names())
                CHECK(g.values<float>("attn." + name) == f.values<float>(name));
        }
    }
    // Packed form: in_proj_weight's rows are q, k, v.
    const auto f = mha::safetensors_file::parse(state_dict(8, 8, 8, true).bytes());
    const auto layer = mha::load_multi_head_attention<float>(f, 4);
    CHECK(layer.parameters().w_k == f.as_matrix<float>("in_proj_weight").middleRows(8, 8));
    CHECK(layer.config().head_dim == 2);
}

TEST_CASE("a state_dict of the wrong shape, dtype or form is refused", "[safetensors]") {
    auto load = [](const mha::safetensors_writer& w, mha::Index heads = 2) {
        return [bytes = w.bytes(), heads] {
            (void)mha::load_multi_head_attention<float>(mha::safetensors_file::parse(bytes), heads);
        };
    };
    mha::safetensors_writer w;
    w.add_matrix("in_proj_weight", mha::matrix<float>::Ones(24, 9));
    w.add_matrix("out_proj.weight", mha::matrix<float>::Ones(8, 8));
    require_format_error(load(w), {"shape of tensor 'in_proj_weight' must be [24, 8] "
                                   "(3·embed_dim, embed_dim)",
                                   "got [24, 9]"});
    require_format_error(
        load(state_dict(8, 8, 8, true), 3),
        {"rows of tensor 'out_proj.weight' must be a multiple of num_heads = 3", "got 8"});
    mha::safetensors_writer d;
    d.add_matrix("in_proj_weight", mha::matrix<double>::Ones(24, 8));
    d.add_matrix("out_proj.weight", mha::matrix<double>::Ones(8, 8));
    require_format_error(load(d), {"dtype of tensor 'out_proj.weight' must be F32", "got F64"});
    mha::safetensors_writer m;
    m.add_matrix("out_proj.weight", mha::matrix<float>::Ones(8, 8));
    require_format_error(
        load(m), {"tensor 'in_proj_weight' or 'q_proj_weight' must be present", "got neither"});
    mha::safetensors_writer b = state_dict(8, 8, 8, false);
    b.add_vector("out_proj.bias", mha::vector<float>::Ones(8));
    require_format_error(load(b), {"tensor 'out_proj.bias' must be absent", "got present"});
    mha::safetensors_writer kv = state_dict(8, 8, 8, true);
    kv.add_matrix("bias_k", mha::matrix<float>::Ones(1, 8));
    require_format_error(load(kv), {"tensor 'bias_k' must be absent (add_bias_kv=True is not "
                                    "supported)"});
    mha::safetensors_writer s;
    s.add_matrix("q_proj_weight", mha::matrix<float>::Ones(8, 8));
    s.add_matrix("k_proj_weight", mha::matrix<float>::Ones(6, 5));
    s.add_matrix("v_proj_weight", mha::matrix<float>::Ones(8, 3));
    s.add_matrix("out_proj.weight", mha::matrix<float>::Ones(8, 8));
    require_format_error(load(s), {"shape of tensor 'k_proj_weight' must be (8", "got [6, 5]"});
    mha::safetensors_writer bad_bias = state_dict(8, 8, 8, false);
    bad_bias.add_vector("in_proj_bias", mha::vector<float>::Ones(23));
    bad_bias.add_vector("out_proj.bias", mha::vector<float>::Ones(8));
    require_format_error(load(bad_bias),
                         {"shape of tensor 'in_proj_bias' must be [24]", "got [23]"});
}

TEST_CASE("F16 and BF16 tensors are read as float and double, exactly", "[safetensors]") {
    // +0, −0, 1, −2, 65504, the smallest and largest subnormal, the smallest normal, ±∞, NaN.
    const std::vector<std::uint16_t> f16 = {0x0000, 0x8000, 0x3c00, 0xc000, 0x7bff, 0x0001,
                                            0x03ff, 0x0400, 0x7c00, 0xfc00, 0x7e00};
    const std::vector<std::uint16_t> bf16 = {0x0000, 0x8000, 0x3f80, 0xc000, 0x7f7f, 0x0001,
                                             0x007f, 0x0080, 0x7f80, 0xff80, 0x7fc0};
    const std::size_t n = f16.size();
    const std::string header =
        R"({"h":{"dtype":"F16","shape":[)" + std::to_string(n) + R"(],"data_offsets":[0,)" +
        std::to_string(2 * n) + R"(]},"b":{"dtype":"BF16","shape":[)" + std::to_string(n) +
        R"(],"data_offsets":[)" + std::to_string(2 * n) + "," + std::to_string(4 * n) + "]}}";
    bytes_t file = make_file(header);
    for (const auto* values : {&f16, &bf16})
        for (std::uint16_t v : *values) {
            file.push_back(static_cast<unsigned char>(v & 0xff));
            file.push_back(static_cast<unsigned char>(v >> 8));
        }
    const auto f = mha::safetensors_file::parse(file);
    const auto hf = f.values<float>("h");
    const auto hd = f.values<double>("h");
    const auto bf = f.values<float>("b");
    const auto bd = f.as_vector<double>("b");
    for (std::size_t i = 0; i < n; ++i) {
        INFO("element " << i);
        const float ef = mha::f16_to_float(f16[i]), eb = mha::bf16_to_float(bf16[i]);
        if (i + 1 == n) {
            CHECK((std::isnan(hf[i]) && std::isnan(hd[i]) && std::isnan(bf[i]) &&
                   std::isnan(bd(static_cast<Eigen::Index>(i)))));
            continue;
        }
        CHECK(hf[i] == ef);
        CHECK(hd[i] == static_cast<double>(ef));
        CHECK(std::signbit(hf[i]) == std::signbit(ef));
        CHECK(bf[i] == eb);
        CHECK(bd(static_cast<Eigen::Index>(i)) == static_cast<double>(eb));
    }
    CHECK(hf[2] == 1.0f);
    CHECK(hd[5] == std::ldexp(1.0, -24));
    CHECK(hf[8] == std::numeric_limits<float>::infinity());
    CHECK(bd(4) == static_cast<double>(mha::bf16_to_float(0x7f7f)));
    // Only float and double widen; a half tensor is no bool.
    require_format_error([&] { (void)f.values<bool>("h"); },
                         {"dtype of tensor 'h' must be BOOL", "got F16"});
    require_format_error([&] { (void)f.values<float>("missing"); }, {"tensor 'missing'"});
}

TEST_CASE("a layer written in F16 or BF16 loads with its weights rounded once", "[safetensors]") {
    const mha::multi_head_attention<double> layer({8, 2}, 5);
    for (const std::string dtype : {"F16", "BF16"}) {
        INFO(dtype);
        mha::safetensors_writer out;
        out.set_float_dtype(dtype);
        mha::save_multi_head_attention(out, layer);
        const auto file = mha::safetensors_file::parse(out.bytes());
        CHECK(file.info("in_proj_weight").dtype == dtype);
        const auto loaded = mha::load_multi_head_attention<float>(file, 2);
        const auto p = layer.parameters();
        const auto q = loaded.parameters();
        for (Eigen::Index i = 0; i < p.w_q.size(); ++i) {
            const double x = p.w_q.data()[i];
            const float expected = dtype == "F16" ? mha::f16_to_float(mha::double_to_f16(x))
                                                  : mha::bf16_to_float(mha::double_to_bf16(x));
            REQUIRE(q.w_q.data()[i] == expected);
        }
    }
    mha::safetensors_writer out;
    CHECK_THROWS_AS(out.set_float_dtype("F8_E4M3"), mha::value_error);
}

// Files a stranger could send: each must be refused with a format_error, quickly and with a short
// message, or (at the boundary) read.
TEST_CASE("hostile shapes: a dimension after a 0, dimensions of 2^63 and more", "[safetensors]") {
    const auto empty_f32 = [](const std::string& shape) {
        return make_file(R"({"w":{"dtype":"F32","shape":)" + shape + R"(,"data_offsets":[0,0]}})");
    };
    // (2^63 − 1) / 4 = 2305843009213693951 elements of 4 bytes is the largest non-zero product.
    const auto largest = mha::safetensors_file::parse(empty_f32("[0,2305843009213693951]"));
    const auto m = largest.as_matrix<float>("w");  // immediate: no loop over the huge dimension
    CHECK(m.rows() == 0);
    CHECK(m.cols() == 2305843009213693951);
    CHECK(largest.as_columns<float>("w").rows() == 2305843009213693951);
    require_parse_error(empty_f32("[0,2305843009213693952]"),
                        {"tensor 'w' shape must be dimensions whose non-zero product times 4 bytes "
                         "is at most 9223372036854775807",
                         "got [0,2305843009213693952]"});
    // The one the reader took before: a dimension after a 0 skipped the overflow check.
    require_parse_error(empty_f32("[0,4611686018427387903]"), {"tensor 'w' shape must be"});
    require_parse_error(empty_f32("[1152921504606846976,0,4]"), {"tensor 'w' shape must be"});
    // 2^63 and 2^64 − 1 do not fit in Index (they became negative there); U8 has 1-byte elements.
    const auto empty_u8 = [](const std::string& shape) {
        return make_file(R"({"w":{"dtype":"U8","shape":)" + shape + R"(,"data_offsets":[0,0]}})");
    };
    CHECK(mha::safetensors_file::parse(empty_u8("[0,9223372036854775807]")).info("w").shape[1] ==
          9223372036854775807);
    require_parse_error(empty_u8("[0,9223372036854775808]"), {"tensor 'w' shape must be"});
    require_parse_error(empty_u8("[18446744073709551615,0]"), {"tensor 'w' shape must be"});
}

TEST_CASE("hostile headers: nesting, size, duplicate keys, long names", "[safetensors]") {
    // {"__metadata__":{"k": n arrays}} nests n + 2 deep; 16 is the limit.
    const auto nested = [](std::size_t arrays) {
        return make_file(R"({"__metadata__":{"k":)" + std::string(arrays, '[') +
                         std::string(arrays, ']') + "}}");
    };
    require_parse_error(nested(14), {"__metadata__[\"k\"] must be a string", "got array"});
    require_parse_error(nested(15), {"header nesting depth must be at most 16",
                                     "got deeper, at byte 43 of the file"});
    // The ~200 KB header that overflowed the stack while its error message was being formatted.
    require_parse_error(nested(100000), {"header nesting depth must be at most 16"});
    // Brackets inside strings, escaped quotes included, are text.
    const std::string text = "\\\"" + std::string(1000, '[');
    const auto f =
        mha::safetensors_file::parse(make_file(R"({"__metadata__":{"k":")" + text + R"("}})"));
    CHECK(f.metadata("k", "") == "\"" + std::string(1000, '['));

    // The header length is refused before anything is parsed.
    const std::uint64_t too_long = mha::safetensors_max_header_bytes + 1;
    require_parse_error(make_file(std::string(too_long, ' '), 0, too_long),
                        {"header length must be at most 100000000 bytes", "got 100000001"});

    // Duplicate keys: a tensor name, or a field of an entry.
    require_parse_error(make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                  R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                  8),
                        {"header keys must be unique within each object", "got \"a\" twice"});
    require_parse_error(
        make_file(R"({"a":{"dtype":"F32","dtype":"F64","shape":[1],"data_offsets":[0,4]}})", 4),
        {"header keys must be unique within each object", "got \"dtype\" twice"});

    // A megabyte-long name and dtype give a message of bounded length.
    const std::string long_name(1 << 20, 'x');
    try {
        (void)mha::safetensors_file::parse(make_file("{\"" + long_name + R"(":{"dtype":")" +
                                                         long_name +
                                                         R"(","shape":[1],"data_offsets":[0,4]}})",
                                                     4));
        FAIL("no format_error");
    } catch (const mha::format_error& e) {
        const std::string message = e.what();
        INFO(message);
        CHECK(message.size() < 600);
        CHECK(message.find("...(1048576 bytes)") != std::string::npos);
    }
    // data_offsets of 100000 entries: the message shows eight.
    std::string many = "[";
    for (int i = 0; i < 100000; ++i)
        many += i ? ",[0]" : "[0]";
    require_parse_error(
        make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":)" + many + "]}}", 4),
        {"tensor 'a' data_offsets must be an array of two non-negative integers",
         "got [[...],[...],[...],[...],[...],[...],[...],[...],...(100000 in all)]"});
}

TEST_CASE("I/O errors and directories are format_errors", "[safetensors]") {
    require_format_error([] { (void)mha::safetensors_file::read(MHA_TEST_DATA_DIR); },
                         {"mha::safetensors_file::read", "must be a readable file"});
}

TEST_CASE("a state_dict with zero-sized weights is a format_error", "[safetensors]") {
    const auto load = [](const mha::safetensors_writer& w) {
        return [bytes = w.bytes()] {
            (void)mha::load_multi_head_attention<float>(mha::safetensors_file::parse(bytes), 1);
        };
    };
    mha::safetensors_writer packed;
    packed.add_matrix("in_proj_weight", mha::matrix<float>(0, 0));
    packed.add_matrix("out_proj.weight", mha::matrix<float>(0, 0));
    require_format_error(load(packed), {"mha::load_multi_head_attention: the weights in <memory> "
                                        "must be a valid layer",
                                        "embed_dim must be >= 1, got 0"});
    mha::safetensors_writer separate;
    separate.add_matrix("q_proj_weight", mha::matrix<float>(0, 4));
    separate.add_matrix("k_proj_weight", mha::matrix<float>(0, 4));
    separate.add_matrix("v_proj_weight", mha::matrix<float>(4, 4));
    separate.add_matrix("out_proj.weight", mha::matrix<float>(4, 4));
    require_format_error(load(separate), {"must be a valid layer"});
    // Empty weights with huge widths, which only the shape bound keeps small: refused at once.
    const std::string huge = "1152921504606846976";  // 2^60
    const std::string header =
        R"({"out_proj.weight":{"dtype":"F32","shape":[)" + huge +
        R"(,0],"data_offsets":[0,0]},"q_proj_weight":{"dtype":"F32",)"
        R"("shape":[0,)" +
        huge +
        R"(],"data_offsets":[0,0]},)"
        R"("k_proj_weight":{"dtype":"F32","shape":[0,0],"data_offsets":[0,0]},)"
        R"("v_proj_weight":{"dtype":"F32","shape":[0,0],"data_offsets":[0,0]}})";
    require_format_error(
        [&] {
            (void)mha::load_multi_head_attention<float>(
                mha::safetensors_file::parse(make_file(header)), 1);
        },
        {"must be a valid layer"});
}

TEST_CASE("Hugging Face attention weights (q_proj, k_proj, v_proj, o_proj) load by name",
          "[safetensors][hugging_face]") {
    // E 12, 4 query heads of d_k 3, 2 key/value heads, d_v 2: every tensor has its own shape,
    // so a swapped or transposed one cannot load.
    const mha::matrix<float> wq = mha::matrix<float>::Random(12, 12);
    const mha::matrix<float> wk = mha::matrix<float>::Random(6, 12);
    const mha::matrix<float> wv = mha::matrix<float>::Random(4, 12);
    const mha::matrix<float> wo = mha::matrix<float>::Random(12, 8);
    const mha::vector<float> bq = mha::vector<float>::Random(12),
                             bk = mha::vector<float>::Random(6), bv = mha::vector<float>::Random(4),
                             bo = mha::vector<float>::Random(12);
    const std::string prefix = "model.layers.0.self_attn.";
    for (const std::string out_name : {"o_proj", "out_proj"}) {
        for (const int biases : {0, 3, 4}) {  // none; q, k, v (Qwen2); all four
            INFO(out_name << ", " << biases << " biases");
            mha::safetensors_writer w;
            w.add_matrix(prefix + "q_proj.weight", wq);
            w.add_matrix(prefix + "k_proj.weight", wk);
            w.add_matrix(prefix + "v_proj.weight", wv);
            w.add_matrix(prefix + out_name + ".weight", wo);
            if (biases >= 3) {
                w.add_vector(prefix + "q_proj.bias", bq);
                w.add_vector(prefix + "k_proj.bias", bk);
                w.add_vector(prefix + "v_proj.bias", bv);
            }
            if (biases == 4) w.add_vector(prefix + out_name + ".bias", bo);
            // gpt-oss's sinks, one per query head, with the o_proj layout only.
            const mha::vector<float> sinks =
                (mha::vector<float>(4) << 0.5f, -1.25f, 2.0f, 0.0f).finished();
            const bool with_sinks = out_name == "o_proj";
            if (with_sinks) w.add_vector(prefix + "sinks", sinks);
            mha::attention_config base;
            base.attention.scale = 0.25;
            const auto layer = mha::load_hugging_face_attention<float>(
                mha::safetensors_file::parse(w.bytes()), 4, 2, prefix, base);
            const mha::attention_config& c = layer.config();
            CHECK(c.embed_dim == 12);
            CHECK(c.num_heads == 4);
            CHECK(c.num_kv_heads == 2);
            CHECK(c.head_dim == 3);
            CHECK(c.value_head_dim == 2);
            CHECK(c.attention.scale == 0.25);  // from base
            CHECK(c.bias == (biases > 0));
            if (with_sinks)
                CHECK(c.attention.sinks == std::vector<double>{0.5, -1.25, 2.0, 0.0});
            else
                CHECK(c.attention.sinks.empty());
            const auto p = layer.parameters();
            CHECK(p.w_q == wq);
            CHECK(p.w_k == wk);
            CHECK(p.w_v == wv);
            CHECK(p.w_o == wo);
            if (biases > 0) {
                CHECK(p.b_q == bq);
                CHECK(p.b_k == bk);
                CHECK(p.b_v == bv);
                CHECK(p.b_o == (biases == 4 ? bo : mha::vector<float>::Zero(12)));
            }
        }
    }
}

TEST_CASE("Hugging Face attention weights: missing, doubled or misshapen tensors are refused",
          "[safetensors][hugging_face]") {
    auto load = [](const mha::safetensors_writer& w, mha::Index heads, mha::Index kv_heads) {
        return [bytes = w.bytes(), heads, kv_heads] {
            (void)mha::load_hugging_face_attention<float>(mha::safetensors_file::parse(bytes),
                                                          heads, kv_heads);
        };
    };
    mha::safetensors_writer w;
    w.add_matrix("q_proj.weight", mha::matrix<float>::Ones(8, 8));
    w.add_matrix("k_proj.weight", mha::matrix<float>::Ones(4, 8));
    w.add_matrix("v_proj.weight", mha::matrix<float>::Ones(4, 8));
    require_format_error(load(w, 2, 1),
                         {"mha::load_hugging_face_attention: tensors 'o_proj.weight' and "
                          "'out_proj.weight' must be exactly one present, got neither"});
    mha::safetensors_writer both = w;
    both.add_matrix("o_proj.weight", mha::matrix<float>::Ones(8, 8));
    both.add_matrix("out_proj.weight", mha::matrix<float>::Ones(8, 8));
    require_format_error(load(both, 2, 1), {"must be exactly one present, got both"});
    mha::safetensors_writer ok = w;
    ok.add_matrix("o_proj.weight", mha::matrix<float>::Ones(8, 8));
    REQUIRE_NOTHROW(load(ok, 2, 1)());
    // 2 query heads of d_k 4 with 2 key/value heads need 8 key rows, not 4.
    require_format_error(
        load(ok, 2, 2),
        {"shape of tensor 'k_proj.weight' must be (8 (num_kv_heads · d_k), kdim)", "got [4, 8]"});
    require_format_error(load(ok, 3, 1), {"shape of tensor 'q_proj.weight' must be (a multiple of "
                                          "num_heads = 3, embed_dim = 8)",
                                          "got [8, 8]"});
    mha::safetensors_writer bias = ok;
    bias.add_vector("k_proj.bias", mha::vector<float>::Ones(5));
    require_format_error(load(bias, 2, 1),
                         {"shape of tensor 'k_proj.bias' must be [4]", "got [5]"});
    // Sinks: one per query head (2 here), not per key/value head.
    mha::safetensors_writer sinks = ok;
    sinks.add_vector("sinks", mha::vector<float>::Ones(1));
    require_format_error(load(sinks, 2, 1), {"shape of tensor 'sinks' must be [2]", "got [1]"});
    mha::safetensors_writer wrong_dtype;
    wrong_dtype.add_matrix("q_proj.weight", mha::matrix<double>::Ones(8, 8));
    wrong_dtype.add_matrix("k_proj.weight", mha::matrix<float>::Ones(4, 8));
    wrong_dtype.add_matrix("v_proj.weight", mha::matrix<float>::Ones(4, 8));
    wrong_dtype.add_matrix("o_proj.weight", mha::matrix<float>::Ones(8, 8));
    require_format_error(load(wrong_dtype, 2, 1),
                         {"dtype of tensor 'q_proj.weight' must be F32", "got F64"});
}
