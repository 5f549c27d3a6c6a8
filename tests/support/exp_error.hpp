// SPDX-License-Identifier: MIT
// The accuracy sweep of the exp pass's vectorised exps (include/mha/detail/tiled/exp_avx512.hpp
// and exp_avx2.hpp), for any packet width: the 16-lane ones in test_bf16_attention.cpp, the
// 8-lane one in test_tiled_attention.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include <catch2/catch_test_macros.hpp>

namespace mha_test {

/// The worst relative error of an exp against the long-double exp over 2^20 points spread over
/// the range the exp pass sees (differences from the running max, down to exp_flush_below ≈
/// −86), plus 0 and a value near it (x[1] = −1e-7 in the first packet); results below FLT_MIN,
/// which the callers flush to 0, are not counted. apply(x, y) sets y[i] to the exp of x[i] for
/// i < Lanes, both 64-byte aligned. Checks that exp(0) is exactly 1 and that NaN stays NaN.
template <int Lanes, class Exp>
long double worst_exp_error(Exp apply) {
    static_assert(Lanes >= 2, "x[1] holds the value near 0");
    constexpr long points = 1L << 20;
    long double worst = 0;
    alignas(64) float x[Lanes], y[Lanes];
    for (long n = 0; n < points; n += Lanes) {
        for (int i = 0; i < Lanes; ++i)
            x[i] = -88.0f * static_cast<float>(n + i) / static_cast<float>(points);
        if (n == 0) x[1] = -1e-7f;
        apply(x, y);
        if (n == 0) CHECK(y[0] == 1.0f);
        for (int i = 0; i < Lanes; ++i) {
            const long double exact = std::exp(static_cast<long double>(x[i]));
            if (exact < std::numeric_limits<float>::min()) continue;  // flushed by the callers
            worst = std::max(worst, std::fabs(y[i] - exact) / exact);
        }
    }
    std::fill(x, x + Lanes, std::numeric_limits<float>::quiet_NaN());
    apply(x, y);
    CHECK(std::all_of(y, y + Lanes, [](float e) { return std::isnan(e); }));
    return worst;
}

}  // namespace mha_test
