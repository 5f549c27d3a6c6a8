// SPDX-License-Identifier: MIT
// bfloat16 tensors in safetensors files read into and written from Eigen::bfloat16 matrices: a
// BF16 tensor is its bits (NaN payloads, infinities, subnormals and signed zeros unchanged), a
// wider tensor is rounded once to nearest even, and a bf16 matrix is written as BF16. The files
// read here are built byte by byte, so the reader is checked independently of the writer, and
// the expected bit patterns come from the bfloat16 layout (1 sign, 8 exponent, 7 fraction bits),
// not from a conversion routine of the library.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include <mha/io/safetensors.hpp>

namespace {

using bytes_t = std::vector<unsigned char>;
using bf16 = Eigen::bfloat16;
using bmat = Eigen::Matrix<bf16, Eigen::Dynamic, Eigen::Dynamic>;

std::uint16_t bits(bf16 x) {
    std::uint16_t b = 0;
    std::memcpy(&b, &x, sizeof b);
    return b;
}

bf16 from_bits(std::uint16_t b) {
    bf16 x;
    std::memcpy(static_cast<void*>(&x), &b, sizeof b);
    return x;
}

// A file of `header` (length prefix little-endian) followed by `data`.
bytes_t make_file(const std::string& header, const bytes_t& data) {
    bytes_t b;
    for (int i = 0; i < 8; ++i)
        b.push_back(
            static_cast<unsigned char>(static_cast<std::uint64_t>(header.size()) >> (8 * i)));
    b.insert(b.end(), header.begin(), header.end());
    b.insert(b.end(), data.begin(), data.end());
    return b;
}

// `value`'s `width` bytes, least significant first: the file's byte order, whatever the host's.
void put_le(bytes_t& out, std::uint64_t value, int width) {
    for (int i = 0; i < width; ++i)
        out.push_back(static_cast<unsigned char>(value >> (8 * i)));
}

template <class F>
void require_format_error(F&& f, const std::vector<std::string>& parts) {
    try {
        f();
    } catch (const mha::format_error& e) {
        const std::string message = e.what();
        INFO("message: " << message);
        for (const auto& part : parts)
            CHECK(message.find(part) != std::string::npos);
        return;
    }
    FAIL("no mha::format_error thrown");
}

// Bit patterns that arithmetic would change or that sit at the edges of the format: ±0, 1, −2,
// the largest finite, the smallest and largest subnormal (both signs), the smallest normal, ±∞,
// a quiet NaN with a payload, a signalling NaN (quiet bit clear), a negative NaN of all ones.
const std::vector<std::uint16_t> edge_patterns = {0x0000, 0x8000, 0x3f80, 0xc000, 0x7f7f,
                                                  0x0001, 0x007f, 0x807f, 0x0080, 0x7f80,
                                                  0xff80, 0x7fc1, 0x7f81, 0xffff};

// The (2, 7) BF16 tensor "b" holding edge_patterns in row-major order.
bytes_t edge_file() {
    bytes_t data;
    for (std::uint16_t p : edge_patterns)
        put_le(data, p, 2);
    return make_file(R"({"b":{"dtype":"BF16","shape":[2,7],"data_offsets":[0,28]}})", data);
}

}  // namespace

TEST_CASE("a BF16 tensor reads into bfloat16 matrices bit for bit", "[safetensors][bf16]") {
    const auto f = mha::safetensors_file::parse(edge_file());
    const std::vector<bf16> v = f.values<bf16>("b");
    REQUIRE(v.size() == edge_patterns.size());
    for (std::size_t i = 0; i < v.size(); ++i) {
        INFO("element " << i);
        CHECK(bits(v[i]) == edge_patterns[i]);
    }
    // (2, 7) row-major: as_matrix keeps PyTorch's indexing, as_columns gives 7 × 2.
    const bmat m = f.as_matrix<bf16>("b");
    const bmat c = f.as_columns<bf16>("b");
    REQUIRE(m.rows() == 2);
    REQUIRE(m.cols() == 7);
    REQUIRE(c.rows() == 7);
    REQUIRE(c.cols() == 2);
    for (Eigen::Index r = 0; r < 2; ++r)
        for (Eigen::Index k = 0; k < 7; ++k) {
            INFO("(" << r << ", " << k << ")");
            const std::uint16_t expected = edge_patterns[static_cast<std::size_t>(r * 7 + k)];
            CHECK(bits(m(r, k)) == expected);
            CHECK(bits(c(k, r)) == expected);
        }
    // The same bytes read as float are the exact widening (the upper half of the float's bits).
    const std::vector<float> w = f.values<float>("b");
    for (std::size_t i = 0; i < w.size(); ++i) {
        std::uint32_t wide = 0;
        std::memcpy(&wide, &w[i], sizeof wide);
        if (edge_patterns[i] == 0x7f81) continue;  // a signalling NaN may be quietened by a copy
        CHECK(wide == static_cast<std::uint32_t>(edge_patterns[i]) << 16);
    }
}

TEST_CASE("F32, F64 and F16 tensors read into bfloat16 rounded once to nearest even",
          "[safetensors][bf16]") {
    // F32 bit patterns and their bf16 (the upper 16 bits, rounded by the lower 16):
    // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: to even, 1 (0x3f80); 1 + 3·2^-8 a tie to
    // 1 + 2^-6 (0x3f82); just above a tie rounds up (0x3f81); the largest float rounds to +∞;
    // a signalling NaN becomes a quiet NaN (never ∞); a subnormal tie to even (0); −0 stays −0.
    const std::vector<std::pair<std::uint32_t, std::uint16_t>> f32 = {
        {0x3f808000u, 0x3f80}, {0x3f818000u, 0x3f82}, {0x3f808001u, 0x3f81},
        {0x7f7fffffu, 0x7f80}, {0xff7fffffu, 0xff80}, {0x00008000u, 0x0000},
        {0x00018000u, 0x0002}, {0x80000000u, 0x8000}, {0x40490fdbu, 0x4049}};
    const std::uint32_t signalling = 0x7fa00000u;
    // F64: 1 + 2^-8 + 2^-32 is above the tie, so 1 + 2^-7 (0x3f81); rounding through the nearest
    // float first would give 1 + 2^-8 and then the tie's even 1.0 (0x3f80).
    const std::uint64_t f64_above_tie = 0x3ff0100000100000ull;
    const std::uint64_t f64_tie = 0x3ff0100000000000ull;  // 1 + 2^-8 exactly: even, 0x3f80
    // F16: 1 + 2^-10 has more fraction bits than bf16's 7: nearest is 1; 2^-24, F16's smallest
    // subnormal, is a normal bf16 (0x3380); 65504, F16's largest, is between 65280 and 65536,
    // nearer 65536 (0x4780).
    const std::vector<std::pair<std::uint16_t, std::uint16_t>> f16 = {
        {0x3c01, 0x3f80}, {0x0001, 0x3380}, {0x7bff, 0x4780}, {0xfc00, 0xff80}};

    bytes_t data;
    for (const auto& [in, out] : f32)
        put_le(data, in, 4);
    put_le(data, signalling, 4);
    put_le(data, f64_above_tie, 8);
    put_le(data, f64_tie, 8);
    for (const auto& [in, out] : f16)
        put_le(data, in, 2);
    const std::string header = R"({"s":{"dtype":"F32","shape":[10],"data_offsets":[0,40]},)"
                               R"("d":{"dtype":"F64","shape":[2],"data_offsets":[40,56]},)"
                               R"("h":{"dtype":"F16","shape":[4],"data_offsets":[56,64]}})";
    const auto f = mha::safetensors_file::parse(make_file(header, data));

    const auto s = f.as_vector<bf16>("s");
    for (std::size_t i = 0; i < f32.size(); ++i) {
        INFO("F32 element " << i);
        CHECK(bits(s(static_cast<Eigen::Index>(i))) == f32[i].second);
    }
    const std::uint16_t quiet = bits(s(9));
    CHECK((quiet & 0x7f80) == 0x7f80);
    CHECK((quiet & 0x0040) != 0);  // the quiet bit set: a NaN, not ∞
    const auto d = f.values<bf16>("d");
    CHECK(bits(d[0]) == 0x3f81);
    CHECK(bits(d[1]) == 0x3f80);
    const auto h = f.values<bf16>("h");
    for (std::size_t i = 0; i < f16.size(); ++i) {
        INFO("F16 element " << i);
        CHECK(bits(h[i]) == f16[i].second);
    }
}

TEST_CASE("a bfloat16 matrix is written as BF16 with the bytes the format defines",
          "[safetensors][bf16]") {
    bmat m(2, 3);  // a (2, 3) weight: rows 1, −2, +∞ and 2^-133, NaN, −0
    const std::uint16_t p[2][3] = {{0x3f80, 0xc000, 0x7f80}, {0x0001, 0x7fc1, 0x8000}};
    for (int r = 0; r < 2; ++r)
        for (int c = 0; c < 3; ++c)
            m(r, c) = from_bits(p[r][c]);
    mha::safetensors_writer w;
    w.set_float_dtype("F16");  // applies to float and double only: bf16 stays BF16
    w.add_matrix("w", m);
    const bytes_t b = w.bytes();
    std::uint64_t header_length = 0;
    for (int i = 0; i < 8; ++i)
        header_length |= static_cast<std::uint64_t>(b[static_cast<std::size_t>(i)]) << (8 * i);
    const std::string header(b.begin() + 8,
                             b.begin() + 8 + static_cast<std::ptrdiff_t>(header_length));
    CHECK(header.find(R"("dtype":"BF16")") != std::string::npos);
    CHECK(header.find(R"("shape":[2,3])") != std::string::npos);
    // The data section: 6 elements, row-major, each least significant byte first.
    REQUIRE(b.size() == 8 + header_length + 12);
    const unsigned char* data = b.data() + 8 + header_length;
    for (int i = 0; i < 6; ++i) {
        INFO("element " << i);
        const std::uint16_t expected = p[i / 3][i % 3];
        CHECK(data[2 * i] == (expected & 0xff));
        CHECK(data[2 * i + 1] == (expected >> 8));
    }
}

TEST_CASE("bfloat16 matrices, columns and vectors survive a round trip bit for bit",
          "[safetensors][bf16]") {
    bmat columns(2, 7);  // 7 tokens of width 2: the (7, 2) tensor
    for (Eigen::Index i = 0; i < columns.size(); ++i)
        columns.data()[i] = from_bits(edge_patterns[static_cast<std::size_t>(i)]);
    const bmat weight = columns.transpose();  // 7 × 2, a (7, 2) tensor
    Eigen::Matrix<bf16, Eigen::Dynamic, 1> vector(edge_patterns.size());
    for (Eigen::Index i = 0; i < vector.size(); ++i)
        vector(i) = from_bits(edge_patterns[static_cast<std::size_t>(vector.size() - 1 - i)]);
    mha::safetensors_writer w;
    w.add_columns("columns", columns);
    w.add_columns("batch", columns, {7, 1, 2});  // (N, L, E) with L = 1
    w.add_matrix("weight", weight);
    w.add_vector("vector", vector);
    w.add_matrix("empty", bmat(0, 3));
    const auto f = mha::safetensors_file::parse(w.bytes());
    const auto same = [](const auto& a, const auto& b) {
        if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
        for (Eigen::Index i = 0; i < a.size(); ++i)
            if (bits(a.data()[i]) != bits(b.data()[i])) return false;
        return true;
    };
    CHECK(f.info("columns").shape == std::vector<std::int64_t>{7, 2});
    CHECK(same(f.as_columns<bf16>("columns"), columns));
    CHECK(same(f.as_columns<bf16>("batch"), columns));
    CHECK(same(f.as_matrix<bf16>("weight"), weight));
    CHECK(same(f.as_vector<bf16>("vector"), vector));
    CHECK(f.as_matrix<bf16>("empty").rows() == 0);
    CHECK(f.as_matrix<bf16>("empty").cols() == 3);
    // And from disk.
    const std::string path = "test_safetensors_bf16_round_trip.safetensors";
    w.write(path);
    const auto g = mha::safetensors_file::read(path);
    std::remove(path.c_str());
    CHECK(same(g.as_matrix<bf16>("weight"), weight));
}

TEST_CASE("a tensor bfloat16 cannot read is refused naming its dtype, shape or rank",
          "[safetensors][bf16]") {
    bytes_t data(2 * 6 + 4 * 2 + 2, 0);
    const std::string header = R"({"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},)"
                               R"("i":{"dtype":"I32","shape":[2],"data_offsets":[12,20]},)"
                               R"("m":{"dtype":"BOOL","shape":[2],"data_offsets":[20,22]}})";
    const auto f = mha::safetensors_file::parse(make_file(header, data));
    const std::string bf16_dtypes = "must be BF16 (or F32, F64, F16, rounded to nearest even)";
    require_format_error([&] { (void)f.as_vector<bf16>("i"); },
                         {"dtype of tensor 'i'", bf16_dtypes, "got I32"});
    require_format_error([&] { (void)f.values<bf16>("m"); },
                         {"dtype of tensor 'm'", bf16_dtypes, "got BOOL"});
    require_format_error([&] { (void)f.values<bool>("w"); },
                         {"dtype of tensor 'w' must be BOOL", "got BF16"});
    require_format_error(
        [&] {
            (void)f.expect<bf16>("w", {3, 2}, "(out, in)");
        },
        {"shape of tensor 'w' must be [3, 2] (out, in)", "got [2, 3]"});
    require_format_error([&] { (void)f.as_vector<bf16>("w"); },
                         {"rank of tensor 'w' must be 1", "got 2"});
    require_format_error([&] { (void)f.as_matrix<bf16>("absent"); },
                         {"tensor 'absent' must be present", "w"});
    CHECK(f.expect<bf16>("w", {2, 3}).dtype == "BF16");
}

TEST_CASE("BF16 files that differ from a valid one in one way are refused", "[safetensors][bf16]") {
    // The valid file first, so that each refusal below is due to its one change.
    const bytes_t data(12, 0x3f);
    const auto file = [&](const std::string& dtype, const std::string& shape,
                          const std::string& offsets, std::size_t data_bytes) {
        return make_file(
            R"({"w":{"dtype":")" + dtype + R"(","shape":)" + shape + R"(,"data_offsets":)" +
                offsets + "}}",
            bytes_t(data.begin(), data.begin() + static_cast<std::ptrdiff_t>(data_bytes)));
    };
    const auto valid = mha::safetensors_file::parse(file("BF16", "[2,3]", "[0,12]", 12));
    CHECK(bits(valid.as_matrix<bf16>("w")(1, 2)) == 0x3f3f);
    // 2·3 BF16 elements are 12 bytes: a shape of [2,4] (16 bytes), or offsets one byte short.
    require_format_error(
        [&] { (void)mha::safetensors_file::parse(file("BF16", "[2,4]", "[0,12]", 12)); },
        {"tensor 'w' byte size must be 16 (BF16 [2, 4])", "got 12"});
    require_format_error(
        [&] { (void)mha::safetensors_file::parse(file("BF16", "[2,3]", "[0,11]", 11)); },
        {"tensor 'w' byte size must be 12 (BF16 [2, 3])", "got 11"});
    // The data section one byte shorter than the offsets say.
    require_format_error(
        [&] { (void)mha::safetensors_file::parse(file("BF16", "[2,3]", "[0,12]", 11)); },
        {"data_offsets", "within the data section (end <= 11)"});
    // A dtype the format does not define.
    require_format_error(
        [&] { (void)mha::safetensors_file::parse(file("bf16", "[2,3]", "[0,12]", 12)); },
        {"tensor 'w' dtype must be one of", "got \"bf16\""});
    // The same bytes as F16 parse, but are not BF16: read as bf16 they are rounded from F16,
    // 0x3f3f in F16 is 1.8115234375, in bf16 0x3fe8 (1.8125: the nearest, 7 fraction bits).
    const auto as_f16 = mha::safetensors_file::parse(file("F16", "[2,3]", "[0,12]", 12));
    CHECK(bits(as_f16.as_matrix<bf16>("w")(1, 2)) == 0x3fe8);
}
