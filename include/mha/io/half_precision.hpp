// SPDX-License-Identifier: MIT
/// @file
/// IEEE binary16 (F16) and bfloat16 (BF16) numbers, as published checkpoints store weights, to and
/// from float and double. Widening is exact for every value (subnormals, ±0, ±∞, NaN payloads
/// included); narrowing rounds to nearest, ties to even, overflows to ±∞ and keeps NaN a NaN.
/// Integer arithmetic on the bit patterns only: nothing here depends on the floating-point
/// environment or on the compiler's half-precision support.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace mha {

/// The value of the binary16 bit pattern `h` (1 sign, 5 exponent, 10 fraction bits), exactly.
inline float f16_to_float(std::uint16_t h) {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exponent = (h >> 10) & 0x1fu;
    const std::uint32_t fraction = h & 0x3ffu;
    std::uint32_t bits = 0;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (fraction << 13);  // ±∞, or NaN with its payload
    } else if (exponent != 0) {
        bits = sign | ((exponent + 127 - 15) << 23) | (fraction << 13);
    } else {
        // Zero or subnormal: fraction · 2⁻²⁴, a normal float (ldexp by a power of two is exact).
        const float magnitude = std::ldexp(static_cast<float>(fraction), -24);
        return sign != 0 ? -magnitude : magnitude;
    }
    float value = 0;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

/// The value of the bfloat16 bit pattern `b` (the upper half of a float), exactly.
inline float bf16_to_float(std::uint16_t b) {
    const std::uint32_t bits = static_cast<std::uint32_t>(b) << 16;
    float value = 0;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

namespace detail {

inline std::uint32_t float_bits(float x) {
    std::uint32_t bits = 0;
    std::memcpy(&bits, &x, sizeof bits);
    return bits;
}

/// q + 1 when the dropped bits `rest` (out of `half` · 2) round q up to nearest, ties to even.
inline std::uint32_t round_half_even(std::uint32_t q, std::uint32_t rest, std::uint32_t half) {
    return rest > half || (rest == half && (q & 1u) != 0) ? q + 1 : q;
}

/// `x` rounded to float toward zero with the last bit set when inexact ("round to odd"). Rounding
/// that float again to a format at least two bits narrower gives the correctly rounded result,
/// which rounding to nearest twice would not (a tie created by the first rounding).
inline float round_to_odd_float(double x) {
    if (std::isnan(x)) return static_cast<float>(x);
    float f = static_cast<float>(x);
    if (static_cast<double>(f) == x) return f;
    if (std::fabs(static_cast<double>(f)) > std::fabs(x))
        f = std::nextafter(f, 0.0f);  // toward zero, also from ±∞ to the largest float
    std::uint32_t bits = float_bits(f) | 1u;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

}  // namespace detail

/// `x` as binary16, rounded to nearest (ties to even); beyond 65504 rounds to ±∞; NaN stays NaN
/// (quiet, payload kept where it fits).
inline std::uint16_t float_to_f16(float x) {
    const std::uint32_t bits = detail::float_bits(x);
    const auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
    const std::uint32_t magnitude = bits & 0x7fffffffu;
    const std::uint32_t exponent = magnitude >> 23;
    const std::uint32_t fraction = magnitude & 0x7fffffu;
    if (exponent == 0xff)  // ±∞, or NaN made quiet so that it cannot turn into ∞
        return static_cast<std::uint16_t>(sign | 0x7c00u |
                                          (fraction != 0 ? 0x200u | (fraction >> 13) : 0u));
    if (exponent >= 127 + 16) return static_cast<std::uint16_t>(sign | 0x7c00u);  // ≥ 2¹⁶
    if (exponent >= 127 - 14) {
        // Normal range: keep 10 of the 23 fraction bits. A carry out of the fraction moves the
        // exponent up, to ∞ past 65504, which is the right rounding.
        const std::uint32_t q = ((exponent - (127 - 15)) << 10) | (fraction >> 13);
        return static_cast<std::uint16_t>(sign |
                                          detail::round_half_even(q, fraction & 0x1fffu, 0x1000u));
    }
    // Subnormal range: the value in units of 2⁻²⁴, (2²³ + fraction) · 2^(exponent − 150).
    const std::uint32_t shift = 126 - exponent;  // ≥ 14
    if (exponent == 0 || shift > 25)  // below 2⁻²⁶ (float subnormals included): rounds to 0
        return sign;
    const std::uint32_t m = fraction | 0x800000u;
    const std::uint32_t q = m >> shift;
    const std::uint32_t rest = m & ((1u << shift) - 1);
    // Rounding up from the largest subnormal gives 0x400, the smallest normal: also right.
    return static_cast<std::uint16_t>(sign | detail::round_half_even(q, rest, 1u << (shift - 1)));
}

/// `x` as bfloat16, rounded to nearest (ties to even); NaN stays NaN (quiet).
inline std::uint16_t float_to_bf16(float x) {
    const std::uint32_t bits = detail::float_bits(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);
    return static_cast<std::uint16_t>(detail::round_half_even(bits >> 16, bits & 0xffffu, 0x8000u));
}

/// `x` as binary16, correctly rounded from double (not through a float rounded to nearest).
inline std::uint16_t double_to_f16(double x) {
    return float_to_f16(detail::round_to_odd_float(x));
}

/// `x` as bfloat16, correctly rounded from double.
inline std::uint16_t double_to_bf16(double x) {
    return float_to_bf16(detail::round_to_odd_float(x));
}

}  // namespace mha
