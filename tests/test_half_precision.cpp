// SPDX-License-Identifier: MIT
// F16 and BF16 conversions (include/mha/io/half_precision.hpp): every bit pattern widened and
// narrowed back, the values at the edges (subnormals, the largest finite, ±∞, NaN, −0), and
// rounding to nearest with ties to even, from float and from double.
#include <cmath>
#include <cstdint>
#include <limits>

#include <catch2/catch_test_macros.hpp>

#include <mha/io/half_precision.hpp>

namespace {

constexpr float inf = std::numeric_limits<float>::infinity();

bool f16_is_nan(std::uint16_t h) {
    return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0;
}
bool bf16_is_nan(std::uint16_t b) {
    return (b & 0x7f80u) == 0x7f80u && (b & 0x7fu) != 0;
}

}  // namespace

TEST_CASE("every F16 pattern widens exactly and narrows back to itself", "[half_precision]") {
    for (std::uint32_t i = 0; i <= 0xffffu; ++i) {
        const auto h = static_cast<std::uint16_t>(i);
        const float f = mha::f16_to_float(h);
        if (f16_is_nan(h)) {
            REQUIRE(std::isnan(f));
            // NaN comes back a NaN, made quiet (0x200), with its payload.
            REQUIRE(mha::float_to_f16(f) == (h | 0x200u));
            REQUIRE(mha::double_to_f16(static_cast<double>(f)) == (h | 0x200u));
            continue;
        }
        REQUIRE(mha::float_to_f16(f) == h);
        REQUIRE(mha::double_to_f16(static_cast<double>(f)) == h);
    }
}

TEST_CASE("every BF16 pattern widens exactly and narrows back to itself", "[half_precision]") {
    for (std::uint32_t i = 0; i <= 0xffffu; ++i) {
        const auto b = static_cast<std::uint16_t>(i);
        const float f = mha::bf16_to_float(b);
        if (bf16_is_nan(b)) {
            REQUIRE(std::isnan(f));
            REQUIRE(mha::float_to_bf16(f) == (b | 0x40u));
            continue;
        }
        REQUIRE(mha::float_to_bf16(f) == b);
        REQUIRE(mha::double_to_bf16(static_cast<double>(f)) == b);
    }
}

TEST_CASE("F16 values at the edges", "[half_precision]") {
    CHECK(mha::f16_to_float(0x3c00) == 1.0f);
    CHECK(mha::f16_to_float(0xc000) == -2.0f);
    CHECK(mha::f16_to_float(0x7bff) == 65504.0f);                  // largest finite
    CHECK(mha::f16_to_float(0x0400) == std::ldexp(1.0f, -14));     // smallest normal
    CHECK(mha::f16_to_float(0x03ff) == std::ldexp(1023.0f, -24));  // largest subnormal
    CHECK(mha::f16_to_float(0x0001) == std::ldexp(1.0f, -24));     // smallest subnormal
    CHECK(mha::f16_to_float(0x8001) == -std::ldexp(1.0f, -24));
    CHECK(mha::f16_to_float(0x7c00) == inf);
    CHECK(mha::f16_to_float(0xfc00) == -inf);
    CHECK(mha::f16_to_float(0x0000) == 0.0f);
    CHECK_FALSE(std::signbit(mha::f16_to_float(0x0000)));
    CHECK(std::signbit(mha::f16_to_float(0x8000)));
    CHECK(std::isnan(mha::f16_to_float(0x7e00)));
    CHECK(std::isnan(mha::f16_to_float(0x7c01)));  // signalling pattern: still NaN
}

TEST_CASE("narrowing to F16 rounds to nearest, ties to even", "[half_precision]") {
    const float ulp1 = std::ldexp(1.0f, -10);                 // spacing of F16 above 1
    CHECK(mha::float_to_f16(1.0f + ulp1 / 2) == 0x3c00);      // tie, down to even
    CHECK(mha::float_to_f16(1.0f + 3 * ulp1 / 2) == 0x3c02);  // tie, up to even
    CHECK(mha::float_to_f16(1.0f + ulp1 / 2 + ulp1 / 8) == 0x3c01);
    CHECK(mha::float_to_f16(65504.0f) == 0x7bff);
    CHECK(mha::float_to_f16(65519.0f) == 0x7bff);  // below the midpoint to 2¹⁶
    CHECK(mha::float_to_f16(65520.0f) == 0x7c00);  // the midpoint: ties to even, which is ∞
    CHECK(mha::float_to_f16(1e10f) == 0x7c00);
    CHECK(mha::float_to_f16(-1e10f) == 0xfc00);
    CHECK(mha::float_to_f16(inf) == 0x7c00);
    CHECK(mha::float_to_f16(-inf) == 0xfc00);
    CHECK(f16_is_nan(mha::float_to_f16(std::numeric_limits<float>::quiet_NaN())));
    // Subnormals: units of 2⁻²⁴.
    const float unit = std::ldexp(1.0f, -24);
    CHECK(mha::float_to_f16(unit / 2) == 0x0000);   // tie between 0 and 1 unit: 0
    CHECK(mha::float_to_f16(-unit / 2) == 0x8000);  // keeps the sign
    CHECK(mha::float_to_f16(unit / 2 * 1.0001f) == 0x0001);
    CHECK(mha::float_to_f16(3 * unit / 2) == 0x0002);  // tie between 1 and 2: 2
    CHECK(mha::float_to_f16(5 * unit / 2) == 0x0002);  // tie between 2 and 3: 2
    CHECK(mha::float_to_f16(unit / 4) == 0x0000);
    CHECK(mha::float_to_f16(std::numeric_limits<float>::denorm_min()) == 0x0000);
    CHECK(mha::float_to_f16(std::ldexp(1023.5f, -24)) == 0x0400);  // up into the normals
    CHECK(mha::float_to_f16(std::ldexp(1.0f, -14)) == 0x0400);
}

TEST_CASE("narrowing to BF16 rounds to nearest, ties to even", "[half_precision]") {
    const float ulp1 = std::ldexp(1.0f, -7);
    CHECK(mha::bf16_to_float(0x3f80) == 1.0f);
    CHECK(mha::bf16_to_float(0x0001) == std::ldexp(1.0f, -133));  // smallest subnormal
    CHECK(mha::bf16_to_float(0x7f80) == inf);
    CHECK(mha::bf16_to_float(0xff80) == -inf);
    CHECK(mha::float_to_bf16(1.0f + ulp1 / 2) == 0x3f80);
    CHECK(mha::float_to_bf16(1.0f + 3 * ulp1 / 2) == 0x3f82);
    CHECK(mha::float_to_bf16(std::numeric_limits<float>::max()) == 0x7f80);  // rounds to ∞
    CHECK(mha::float_to_bf16(-inf) == 0xff80);
    CHECK(bf16_is_nan(mha::float_to_bf16(std::numeric_limits<float>::quiet_NaN())));
    // A NaN whose payload lies in the dropped bits only must not become ∞.
    CHECK(bf16_is_nan(mha::float_to_bf16(mha::f16_to_float(0x7c01))));
}

TEST_CASE("narrowing from double rounds once, not twice through float", "[half_precision]") {
    // 1 + 2⁻¹¹ + 2⁻⁴⁰ is just above the F16 midpoint between 1 and 1 + 2⁻¹⁰, so it rounds up;
    // rounded to float first it would land on the midpoint and then go down to 1.
    const double x = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);
    CHECK(mha::float_to_f16(static_cast<float>(x)) == 0x3c00);
    CHECK(mha::double_to_f16(x) == 0x3c01);
    const double y = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40);
    CHECK(mha::double_to_bf16(y) == 0x3f81);
    CHECK(mha::double_to_f16(1e300) == 0x7c00);
    CHECK(mha::double_to_f16(-1e-300) == 0x8000);
    CHECK(mha::double_to_bf16(1e300) == 0x7f80);
    CHECK(f16_is_nan(mha::double_to_f16(std::numeric_limits<double>::quiet_NaN())));
    CHECK(mha::double_to_f16(0.5) == 0x3800);
}
