// SPDX-License-Identifier: MIT
// The bf16 ↔ fp32 array conversions (include/mha/detail/bf16_conversions.hpp) against their
// definitions, bit for bit: widening against the bits of the bf16 in the upper half, both
// roundings (in place in fp32, and into bf16 storage) against Eigen's scalar float → bfloat16.
// No tolerance: each is an integer operation on the bits, with one right answer. The functions
// go 16 lanes at a time (AVX-512), then 8 (AVX2), then one, so this file is built three times by
// tests/CMakeLists.txt: with the preset's flags (the scalar loops), for AVX2 with FMA
// (test_bf16_conversions_avx2) and for AVX-512 (test_bf16_conversions_avx512); the last two exit
// with 77, skipped, on a CPU without their instructions. The lengths run from 1 to 40, so that
// each special value stands at every lane position of both packet widths and in every tail.
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include <mha/detail/bf16_conversions.hpp>

#include "instruction_set_build.hpp"
#include "reference.hpp"

// A build for AVX2 or AVX-512 that lost its flags would pass on the scalar loops alone.
#if defined(MHA_TEST_AVX2_BUILD) && !defined(__AVX2__)
#error "test_bf16_conversions_avx2 must be compiled for AVX2: it exists to run the 8-lane loops"
#endif
#if defined(MHA_TEST_AVX512_BUILD) && !defined(__AVX512F__)
#error "test_bf16_conversions_avx512 must be compiled for AVX-512: it runs the 16-lane loops"
#endif

namespace {

using mha::Index;
using bf16 = Eigen::bfloat16;

std::uint32_t float_bits(float x) {
    std::uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    return u;
}

float float_of_bits(std::uint32_t u) {
    float x;
    std::memcpy(&x, &u, sizeof x);
    return x;
}

bf16 bf16_of_bits(std::uint16_t b) {
    bf16 x;
    std::memcpy(static_cast<void*>(&x), &b, sizeof b);  // bf16 is 16 bits
    return x;
}

/// Every kind of float the rounding treats apart: zeros, subnormals (rounded, not flushed; the
/// largest rounds up to the smallest normal), ties with an even and with an odd bf16 below, the
/// largest finite values (rounding to ±∞ or not), infinities, NaNs of either sign, quiet and
/// signalling, with payloads that the addition of the rounding would carry into the exponent.
const std::vector<std::uint32_t> special_patterns = {
    0x00000000U, 0x80000000U, 0x00000001U, 0x807fffffU, 0x007fffffU, 0x00008000U,
    0x00018000U, 0x00007fffU, 0x3f808000U, 0x3f818000U, 0x3f808001U, 0x3f80ffffU,
    0x7f7fffffU, 0xff7fffffU, 0x7f7f8000U, 0x7f7f7fffU, 0x7f800000U, 0xff800000U,
    0x7fc00000U, 0xffc00000U, 0x7f800001U, 0xff800001U, 0x7fffffffU, 0xffffffffU,
    0x7fbfffffU, 0xffbfffffU, 0x00800000U, 0x3e99999aU, 0xbb23d70aU};

/// What round_to_bf16_in_place and store_rounded_bf16 got wrong on x[0 : n] against Eigen's
/// scalar conversion: how many values, the input bits of the first, and whether either wrote
/// x[n] (x holds one more value than n).
struct rounding_mismatches {
    Index count = 0;
    std::uint32_t first = 0;
    bool past_n_written = false;
};

rounding_mismatches check_roundings(const std::vector<float>& x, Index n) {
    const auto end = static_cast<std::size_t>(n);
    std::vector<float> in_place = x;
    mha::detail::round_to_bf16_in_place(in_place.data(), n);
    const bf16 untouched = bf16_of_bits(0x5555);
    std::vector<bf16> stored(end + 1, untouched);
    mha::detail::store_rounded_bf16(x.data(), stored.data(), n);
    rounding_mismatches m;
    for (std::size_t i = 0; i < end; ++i) {
        const bf16 want = bf16(x[i]);
        const bool wrong =
            float_bits(in_place[i]) != float_bits(mha::detail::round_to_bf16(x[i])) ||
            mha::detail::bf16_bits(stored[i]) != mha::detail::bf16_bits(want);
        if (wrong && m.count++ == 0) m.first = float_bits(x[i]);
    }
    m.past_n_written = float_bits(in_place[end]) != float_bits(x[end]) ||
                       mha::detail::bf16_bits(stored[end]) != mha::detail::bf16_bits(untouched);
    return m;
}

}  // namespace

TEST_CASE("bf16 conversions: widening every bf16 pattern gives its bits in the upper half") {
    // The reference is the definition (a bf16 is the upper 16 bits of an fp32). Every pattern,
    // NaN payloads included, at every offset and length around the packet widths.
    std::vector<bf16> all(65536);
    for (std::uint32_t b = 0; b < 65536; ++b)
        all[b] = bf16_of_bits(static_cast<std::uint16_t>(b));
    Index wrong = 0;
    for (Index offset = 0; offset < 3; ++offset) {
        const Index n = 65536 - offset;
        std::vector<float> out(static_cast<std::size_t>(n), 1.0f);
        mha::detail::widen_bf16(all.data() + offset, n, out.data());
        for (Index i = 0; i < n; ++i)
            wrong += float_bits(out[static_cast<std::size_t>(i)]) !=
                     static_cast<std::uint32_t>(offset + i) << 16;
    }
    CHECK(wrong == 0);
    for (Index n = 0; n <= 40; ++n) {
        std::vector<float> out(static_cast<std::size_t>(n) + 1, 7.0f);
        mha::detail::widen_bf16(all.data() + 0x3f80, n, out.data());  // from 1.0 upwards
        Index bad = 0;
        for (Index i = 0; i < n; ++i)
            bad += float_bits(out[static_cast<std::size_t>(i)]) !=
                   static_cast<std::uint32_t>(0x3f80 + i) << 16;
        INFO("n " << n);
        CHECK(bad == 0);
        CHECK(out[static_cast<std::size_t>(n)] == 7.0f);  // nothing past n written
    }
}

TEST_CASE("bf16 conversions: both roundings equal Eigen's scalar rounding at every lane position") {
    // The ties against their written values first, so that the reference itself is checked.
    const float inf = std::numeric_limits<float>::infinity();
    CHECK(mha::detail::round_to_bf16(1.0f + 0x1.0p-8f) == 1.0f);
    CHECK(mha::detail::round_to_bf16(1.0f + 0x1.8p-7f) == 1.0f + 0x1.0p-6f);
    CHECK(mha::detail::round_to_bf16(1.0f + 0x1.0p-8f + 0x1.0p-23f) == 1.0f + 0x1.0p-7f);
    CHECK(mha::detail::round_to_bf16(std::numeric_limits<float>::max()) == inf);
    // Each special value at every position of every length up to 40, among random bit patterns.
    mha_test::value_source rnd(2061);
    for (Index n = 1; n <= 40; ++n)
        for (const std::uint32_t value : special_patterns)
            for (Index at = 0; at < n; ++at) {
                std::vector<float> x(static_cast<std::size_t>(n) + 1);
                for (float& e : x)
                    e = float_of_bits(static_cast<std::uint32_t>(rnd.next()));
                x[static_cast<std::size_t>(at)] = float_of_bits(value);
                const rounding_mismatches m = check_roundings(x, n);
                INFO("n " << n << ", position " << at << ", value bits 0x" << std::hex << value
                          << ", first wrong input 0x" << m.first);
                REQUIRE(m.count == 0);
                REQUIRE(!m.past_n_written);
            }
}

TEST_CASE("bf16 conversions: both roundings equal Eigen's on 100000 random bit patterns") {
    std::vector<std::uint32_t> patterns = special_patterns;
    mha_test::value_source rnd(77);
    for (int i = 0; i < 100000; ++i)
        patterns.push_back(static_cast<std::uint32_t>(rnd.uniform(0, 4294967295.0)));
    std::vector<float> x(patterns.size());
    std::memcpy(x.data(), patterns.data(), patterns.size() * sizeof(float));
    const auto all = static_cast<Index>(x.size()) - 1;  // check_roundings reads x[n]
    for (const Index n : {all, Index(17), Index(15)}) {
        const rounding_mismatches m = check_roundings(x, n);
        INFO("n " << n << ", first wrong input 0x" << std::hex << m.first);
        CHECK(m.count == 0);
        CHECK(!m.past_n_written);
    }
}
