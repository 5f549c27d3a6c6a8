// SPDX-License-Identifier: MIT
// The bfloat16 projection (mha::linear with a bf16_linear_workspace,
// include/mha/projection_bf16.hpp, and its GEMM detail/gemm_bf16.hpp) against a long-double
// reference computed from the same bf16 values, so only the GEMM's own roundings count.
//
// Tolerance. A product of two bf16 is exact in fp32 (8 + 8 significand bits), so each output is
// an fp32 sum of d_in exact products started from the bias: d_in + 1 terms, whose error is at
// most γ_{d_in+1}·S with S = Σ_q |w(i,q)·x(q,j)| + |b(i)|, γ_n = n·u/(1 − n·u), u = 2⁻²⁴ (the
// standard bound for recursive summation, whatever the order or blocking). A bf16 output is that
// result rounded once more: |bf16(c) − r| ≤ |c − r| + u_b·|c| ≤ (1 + u_b)·γ·S + u_b·|r| with
// u_b = 2⁻⁸. A wrong pair, a missed k-block, a dropped edge row or column moves an output by a
// whole term |w·x|, which is far above γ·S for these sizes (γ_{1026} ≈ 6·10⁻⁵).
//
// Every GEMM path runs: the portable one always, the native vdpbf16ps one when the translation
// unit is compiled for AVX512-BF16 and the CPU has it, the AMX one when AMX-BF16 is compiled in,
// the CPU has it and the OS grants it. This file is built twice by tests/CMakeLists.txt: with the
// preset's flags, and with -mavx512bf16 (and -mamx-tile -mamx-bf16) where the compiler takes it
// (test_bf16_projection_native), so that every path the CPU has runs in every build, and the
// portable one alone where the instructions are not compiled in. The AMX path sums in chunks of
// 32 products, so its bits may differ from the others'; the bound above holds for all.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <mha/attention_bf16.hpp>
#include <mha/projection_bf16.hpp>

#include "bf16_kernels.hpp"
#include "check.hpp"
#include "reference.hpp"

namespace {

using mha::Index;
using mha_test::mat;
using bf16 = Eigen::bfloat16;
using bmat = Eigen::Matrix<bf16, Eigen::Dynamic, Eigen::Dynamic>;
using bmat_rows = Eigen::Matrix<bf16, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using kernel = mha::detail::bf16_kernel;

bmat normal_bf16(mha_test::value_source& rnd, Index rows, Index cols) {
    bmat m(rows, cols);
    for (Index c = 0; c < cols; ++c)
        for (Index r = 0; r < rows; ++r)
            m(r, c) = bf16(static_cast<float>(rnd.normal()));
    return m;
}

// The reference and the bound at the top of this file (tests/support/check.hpp).
using reference = mha_test::bf16_linear_reference;

template <class W, class B>
reference reference_of(const W& w, const B& b, const bmat& x) {
    return mha_test::bf16_linear_reference_of(w, b, x);
}

long double gamma_of(Index n) {
    return mha_test::fp32_gamma(n);
}

template <class Out>
void require_close(const Out& out, const reference& r, Index k, bool bf16_output,
                   const std::string& what) {
    mha_test::require_bf16_linear_close(out, r, k, bf16_output, what);
}

template <class Out, class W, class B>
Out project(kernel kn, const W& w, const B& b, const bmat& x, int threads,
            mha::bf16_linear_workspace& ws) {
    Out out(w.rows(), x.cols());
    mha::detail::linear_bf16(w, b, x, out, ws, threads, kn);
    return out;
}

bool same_bits(const mat<float>& a, const mat<float>& b) {
    return a.rows() == b.rows() && a.cols() == b.cols() &&
           std::memcmp(a.data(), b.data(), sizeof(float) * static_cast<std::size_t>(a.size())) == 0;
}

struct shape {
    Index m, k, n;
};

// Rows around the 16-lane packet and the 64-row tile, k odd, 1, around the 512 k-block, columns
// around the 6-column tile and the 192-column block; 1 to 4 columns (the native kernel's narrow
// path, A read in place) with rows and k around its packets and sweeps.
const shape kShapes[] = {{1, 1, 1},
                         {17, 1, 7},
                         {64, 2, 6},
                         {63, 7, 5},
                         {65, 3, 13},
                         {16, 512, 192},
                         {15, 511, 12},
                         {130, 513, 193},
                         {33, 1025, 7},
                         {200, 64, 385},
                         {80, 9, 1},
                         {1, 100, 70},
                         {2100, 33, 1},
                         {47, 1025, 3},
                         {300, 2, 2},
                         {1030, 7, 4},
                         {5, 16, 4},
                         {31, 17, 2},
                         // The AMX tiles: 16 × 16 blocks of C in 32 × 32 steps, k in chunks of 32.
                         {32, 32, 32},
                         {16, 32, 16},
                         {17, 31, 33},
                         {48, 65, 47},
                         {96, 96, 64},
                         {65, 63, 5}};

}  // namespace

TEST_CASE("bf16 linear: every edge shape, weight order, bias and output type within the bound",
          "[bf16_projection]") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    mha_test::value_source rnd(20261203);
    mha::bf16_linear_workspace ws;
    for (const shape& s : kShapes) {
        const bmat w = normal_bf16(rnd, s.m, s.k);
        const bmat_rows w_rows = w;
        const bmat x = normal_bf16(rnd, s.k, s.n);
        const mha::vector<float> b = normal_bf16(rnd, s.m, 1).cast<float>();
        const mha::vector<float> none(0);
        const reference with_bias = reference_of(w, b, x), without = reference_of(w, none, x);
        for (kernel kn : mha_test::bf16_kernels_here()) {
            const std::string at = std::string(mha_test::bf16_kernel_name(kn)) + " " +
                                   std::to_string(s.m) + "x" + std::to_string(s.k) + "x" +
                                   std::to_string(s.n);
            require_close(project<mat<float>>(kn, w, b, x, 1, ws), with_bias, s.k, false,
                          at + " col-major w, float bias, float out");
            require_close(project<mat<float>>(kn, w_rows, none, x, 1, ws), without, s.k, false,
                          at + " row-major w, no bias, float out");
            require_close(project<bmat>(kn, w, b, x, 1, ws), with_bias, s.k, true,
                          at + " col-major w, float bias, bf16 out");
            const Eigen::Matrix<bf16, Eigen::Dynamic, 1> b16 = b.cast<bf16>();
            require_close(project<bmat>(kn, w_rows, b16, x, 1, ws), with_bias, s.k, true,
                          at + " row-major w, bf16 bias, bf16 out");
        }
    }
}

TEST_CASE("bf16 linear: views with strides read and write in place", "[bf16_projection]") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    mha_test::value_source rnd(7);
    const bmat w_big = normal_bf16(rnd, 150, 90), x_big = normal_bf16(rnd, 90, 230);
    const auto w = w_big.middleRows(10, 130).leftCols(77);  // 130 × 77, outer stride 150
    const auto x = x_big.topRows(77).middleCols(3, 200);    // 77 × 200, outer stride 90
    const bmat w_plain = w, x_plain = x;
    const mha::vector<float> b = normal_bf16(rnd, 130, 1).cast<float>();
    const reference r = reference_of(w_plain, b, x_plain);
    mha::bf16_linear_workspace ws;
    for (kernel kn : mha_test::bf16_kernels_here()) {
        mat<float> big = mat<float>::Constant(140, 210, 7.0f);
        auto out = big.block(5, 4, 130, 200);  // 130 × 200, outer stride 140
        mha::detail::linear_bf16(w, b, x, out, ws, 1, kn);
        require_close(mat<float>(out), r, 77, false,
                      std::string(mha_test::bf16_kernel_name(kn)) + " strided views");
        // Outside the block: untouched.
        CHECK((big.topRows(5).array() == 7.0f).all());
        CHECK((big.bottomRows(5).array() == 7.0f).all());
        CHECK((big.leftCols(4).array() == 7.0f).all());
        CHECK((big.rightCols(6).array() == 7.0f).all());
    }
}

TEST_CASE("bf16 linear: empty shapes", "[bf16_projection]") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    mha::bf16_linear_workspace ws;
    const mha::vector<float> b = mha::vector<float>::LinSpaced(5, 1.0f, 5.0f);
    for (kernel kn : mha_test::bf16_kernels_here()) {
        // d_in = 0: the output is the bias (or 0), whatever `out` held.
        mat<float> out = mat<float>::Constant(5, 3, std::numeric_limits<float>::quiet_NaN());
        mha::detail::linear_bf16(bmat(5, 0), b, bmat(0, 3), out, ws, 1, kn);
        for (Index j = 0; j < 3; ++j)
            CHECK(out.col(j) == b);
        out.setConstant(std::numeric_limits<float>::quiet_NaN());
        mha::detail::linear_bf16(bmat(5, 0), mha::vector<float>(0), bmat(0, 3), out, ws, 1, kn);
        CHECK((out.array() == 0.0f).all());
        // No token, no output row.
        mat<float> none(5, 0);
        mha::detail::linear_bf16(bmat(5, 4), b, bmat(4, 0), none, ws, 1, kn);
        mat<float> no_rows(0, 3);
        mha::detail::linear_bf16(bmat(0, 4), mha::vector<float>(0), bmat(4, 3), no_rows, ws, 1, kn);
        bmat none16(0, 0);
        mha::detail::linear_bf16(bmat(0, 0), mha::vector<float>(0), bmat(0, 0), none16, ws, 1, kn);
    }
}

TEST_CASE("bf16 linear: NaN and infinity propagate to the outputs that read them",
          "[bf16_projection]") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    mha_test::value_source rnd(11);
    const Index m = 70, k = 9, n = 8;
    bmat w = normal_bf16(rnd, m, k), x = normal_bf16(rnd, k, n);
    for (Index i = 0; i < m; ++i)
        for (Index q = 0; q < k; ++q)
            if (w(i, q) == bf16(0.0f)) w(i, q) = bf16(0.5f);   // so that ∞·w is never NaN
    w(66, 4) = bf16(std::numeric_limits<float>::quiet_NaN());  // row 66, in the last packet
    x(8, 5) = bf16(std::numeric_limits<float>::infinity());    // the last k, partner of nothing
    const mha::vector<float> b = mha::vector<float>::Zero(m);
    for (kernel kn : mha_test::bf16_kernels_here()) {
        mha::bf16_linear_workspace ws;
        const mat<float> out = project<mat<float>>(kn, w, b, x, 1, ws);
        for (Index j = 0; j < n; ++j)
            for (Index i = 0; i < m; ++i) {
                const float o = out(i, j);
                if (i == 66) {
                    CHECK(std::isnan(o));
                } else if (j == 5) {
                    // x(8, 5) = +∞ times w(i, 8): ∞ with w's sign.
                    CHECK(std::isinf(o));
                    CHECK((o > 0) == (static_cast<float>(w(i, 8)) > 0));
                } else {
                    CHECK(std::isfinite(o));
                }
            }
    }
}

TEST_CASE("bf16 linear: 1, 2 and 3 threads give the same bits; every path agrees",
          "[bf16_projection]") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    mha_test::value_source rnd(3);
    // 5 column blocks of 192 (the last one partial), k over two k-blocks and odd.
    const bmat w = normal_bf16(rnd, 100, 601), x = normal_bf16(rnd, 601, 900);
    const mha::vector<float> b = normal_bf16(rnd, 100, 1).cast<float>();
    const reference r = reference_of(w, b, x);
    std::vector<mat<float>> results;
    for (kernel kn : mha_test::bf16_kernels_here()) {
        mha::bf16_linear_workspace ws;
        const mat<float> one = project<mat<float>>(kn, w, b, x, 1, ws);
        const mat<float> two = project<mat<float>>(kn, w, b, x, 2, ws);
        const mat<float> three = project<mat<float>>(kn, w, b, x, 3, ws);
        CHECK(same_bits(one, two));
        CHECK(same_bits(one, three));
        require_close(one, r, 601, false, mha_test::bf16_kernel_name(kn));
        results.push_back(one);
    }
    // Each within γ·S of the reference, hence within 2·γ·S of each other.
    const long double g = gamma_of(602);
    for (std::size_t other = 1; other < results.size(); ++other)
        for (Index j = 0; j < x.cols(); ++j)
            for (Index i = 0; i < w.rows(); ++i)
                REQUIRE(std::fabs(static_cast<long double>(results[0](i, j)) -
                                  results[other](i, j)) <= 2 * g * r.magnitude(i, j));
}

TEST_CASE("bf16 linear: a product's first columns alone give its bits, on each path",
          "[bf16_projection]") {
    // Each path switches form at a column count and keeps every output's chain: the native
    // kernel reads W in place up to bf16_narrow_columns columns and packs it beyond, with the
    // same sequence of vdpbf16ps per output (detail/gemm_bf16.hpp); the portable path widens W a
    // slice at a time on the stack up to 6 columns (one register tile) and all of W first beyond
    // (detail/gemm_bf16_portable.hpp). So the first n columns of a product past the switch are
    // the same bits as those n columns alone, for any thread count. Native: rows enough for
    // three threads to split them. Portable: rows past one 64-row block and a partial one, k
    // past one 256 chunk, odd.
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    struct path {
        kernel which;
        const char* name;
        Index rows, inner, wide_columns, narrow_up_to;
        int seed;
    };
    const path paths[] = {
        {kernel::native, "native", 2500, 301, 6, mha::detail::bf16_narrow_columns, 11},
        {kernel::portable, "portable", 150, 601, 7, 6, 13},
    };
    for (const path& p : paths) {
        INFO(p.name << " path");
        // The native kernel is not compiled in or not on this CPU: the portable row still runs.
        if (p.which == kernel::native && !mha_test::bf16_native_available()) continue;
        REQUIRE(p.narrow_up_to < p.wide_columns);
        mha_test::value_source rnd(p.seed);
        const bmat w = normal_bf16(rnd, p.rows, p.inner),
                   x = normal_bf16(rnd, p.inner, p.wide_columns);
        const mha::vector<float> b = normal_bf16(rnd, p.rows, 1).cast<float>();
        mha::bf16_linear_workspace ws;
        const mat<float> wide = project<mat<float>>(p.which, w, b, x, 1, ws);
        require_close(wide, reference_of(w, b, x), p.inner, false, p.name);
        for (Index n = 1; n <= p.narrow_up_to; ++n)
            for (int threads : {1, 2, 3}) {
                INFO(n << " columns, " << threads << " threads");
                const bmat xn = x.leftCols(n);
                const mat<float> narrow = project<mat<float>>(p.which, w, b, xn, threads, ws);
                CHECK(same_bits(narrow, wide.leftCols(n)));
            }
    }
}

TEST_CASE("bf16 linear: weights packed once give the bits of packing per call, whole or by rows",
          "[bf16_projection]") {
    // A layer packs its weights once (detail::bf16_packed_matrix) in the panels of the path the
    // build runs and hands gemm_bf16 a view, whole or as a block of rows starting on a panel (one
    // of a stacked Q, K, V projection). The native path reads the pair panels where it would have
    // packed A, the portable path widens the bf16 row panels where it would have widened A's
    // columns: every output is the same chain of products, so the same bits. The workspace's
    // own buffer for A (native: packed_a; portable, over 6 columns: wide_a, widened from the
    // panels in one run) shows which source was read: pair panels leave packed_a empty.
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    const kernel path = mha_test::bf16_native_available() ? kernel::native : kernel::portable;
#if defined(MHA_BF16_NATIVE)
    if (path == kernel::portable) SKIP("compiled for the native kernel, not on this CPU");
#endif
    INFO((path == kernel::native ? "native" : "portable") << " path");
    mha_test::value_source rnd(17);
    for (const shape& s : kShapes) {
        INFO(s.m << " x " << s.k << " times " << s.n);
        const bmat w = normal_bf16(rnd, s.m, s.k), x = normal_bf16(rnd, s.k, s.n);
        const mha::vector<float> b = normal_bf16(rnd, s.m, 1).cast<float>();
        const mha::detail::bf16_packed_matrix packed(s.m, s.k, mha::detail::bf16_operand_of(w));
        if (s.m > 0 && s.k > 0) {
            CHECK((packed.all().pairs != nullptr) == (path == kernel::native));
            CHECK((packed.all().row_panels != nullptr) == (path == kernel::portable));
        }
        for (int threads : {1, 2}) {
            mha::bf16_linear_workspace per_call, once;
            mat<float> want(s.m, s.n), got(s.m, s.n);
            mha::detail::linear_bf16(w, b, x, want, per_call, threads, path);
            mha::detail::linear_bf16(w, b, x, got, once, threads, path, packed.all());
            CHECK(same_bits(got, want));
            if (path == kernel::native) CHECK(once.gemm().packed_a.empty());
        }
    }
    // Three stacked blocks of 64, 100 and 72 rows (the last panel of the second holds rows of
    // the third); a block that does not start on a panel, or runs past the end, has no view.
    const bmat w = normal_bf16(rnd, 236, 130), x = normal_bf16(rnd, 130, 37);
    const mha::vector<float> b = normal_bf16(rnd, 236, 1).cast<float>();
    const mha::detail::bf16_packed_matrix packed(236, 130, mha::detail::bf16_operand_of(w));
    for (const auto& [r0, rows] :
         {std::pair<Index, Index>{0, 64}, {64, 100}, {128, 72}, {192, 44}, {64, 172}}) {
        INFO("rows " << r0 << " to " << r0 + rows);
        for (Index n : {Index(37), Index(3)}) {  // the portable path's wide and slice forms
            INFO(n << " columns");
            mha::bf16_linear_workspace per_call, once;
            mat<float> want(rows, n), got(rows, n);
            mha::detail::linear_bf16(w.middleRows(r0, rows), b.segment(r0, rows), x.leftCols(n),
                                     want, per_call, 1, path);
            const auto view = packed.rows(r0, rows);
            REQUIRE((view.pairs != nullptr || view.row_panels != nullptr));
            mha::detail::linear_bf16(w.middleRows(r0, rows), b.segment(r0, rows), x.leftCols(n),
                                     got, once, 1, path, view);
            CHECK(same_bits(got, want));
            if (path == kernel::native) CHECK(once.gemm().packed_a.empty());
        }
    }
    // Off a panel boundary (the panels are 64 rows for pairs, at least 2 for rows) or past the
    // end: no view, so the product packs per call.
    for (const auto& [r0, rows] : {std::pair<Index, Index>{1, 64}, {128, 109}}) {
        CHECK(packed.rows(r0, rows).pairs == nullptr);
        CHECK(packed.rows(r0, rows).row_panels == nullptr);
    }
    // Panels of another shape than the product's are refused, not read.
    mha::bf16_linear_workspace ws;
    mat<float> out(100, 37);
    CHECK_THROWS_AS(
        mha::detail::linear_bf16(w.topRows(100), b.head(100), x, out, ws, 1, path, packed.all()),
        std::logic_error);
}

TEST_CASE("bf16 linear: a workspace that served a shape is not grown again", "[bf16_projection]") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    mha_test::value_source rnd(5);
    const bmat w = normal_bf16(rnd, 96, 130), x = normal_bf16(rnd, 130, 400);
    const mha::vector<float> b = normal_bf16(rnd, 96, 1).cast<float>();
    for (kernel kn : mha_test::bf16_kernels_here()) {
        mha::bf16_linear_workspace ws;
        bmat out(96, 400);
        mha::detail::linear_bf16(w, b, x, out, ws, 1, kn);
        auto& g = ws.gemm();
        const auto* a_packed = g.packed_a.data();
        const auto* a_wide = g.wide_a.data();
        const auto* b_packed = g.per_thread.at(0).packed_b.data();
        const auto* b_wide = g.per_thread.at(0).wide_b.data();
        const float* result = ws.result(0);
        mha::detail::linear_bf16(w, b, x, out, ws, 1, kn);
        CHECK(g.packed_a.data() == a_packed);
        CHECK(g.wide_a.data() == a_wide);
        CHECK(g.per_thread.at(0).packed_b.data() == b_packed);
        CHECK(g.per_thread.at(0).wide_b.data() == b_wide);
        CHECK(ws.result(0) == result);
    }
}

// A 64-byte row (an AMX tile row, a zmm) that starts inside a cache line touches two: on a Xeon
// with AMX, tile loads from 16-byte aligned buffers (std::allocator's) made the GEMM and the
// attention core 1.3 to 2.2 times slower. The buffers the kernels load whole rows from start on
// cache lines.
TEST_CASE("bf16 linear: the packed operands and the result start on 64-byte boundaries",
          "[bf16_projection]") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    const auto on_line = [](const void* p) {
        return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % 64 == 0;
    };
    for (std::size_t n : {1, 3, 31, 1000, 100000}) {
        mha::detail::aligned_vector<std::uint16_t> words(n);
        mha::detail::aligned_vector<float> floats(n);
        INFO(n);
        CHECK(on_line(words.data()));
        CHECK(on_line(floats.data()));
    }
    mha_test::value_source rnd(9);
    const bmat w = normal_bf16(rnd, 70, 45), x = normal_bf16(rnd, 45, 33);
    const mha::vector<float> b(0);
    for (kernel kn : mha_test::bf16_kernels_here()) {
        INFO(mha_test::bf16_kernel_name(kn));
        mha::bf16_linear_workspace ws;
        bmat out(70, 33);  // a bfloat16 output: the fp32 result goes to the workspace
        mha::detail::linear_bf16(w, b, x, out, ws, 1, kn);
        const auto& g = ws.gemm();
        CHECK(on_line(g.packed_a.data()));
        CHECK(on_line(g.wide_a.data()));
        CHECK(on_line(g.per_thread.at(0).packed_b.data()));
        CHECK(on_line(g.per_thread.at(0).wide_b.data()));
        CHECK(on_line(ws.result(0)));
    }
    // The attention kernels' per-thread operands are the same kind of vector.
    using state = mha::detail::bf16_thread_state;
    using words = mha::detail::aligned_vector<std::uint16_t>;
    static_assert(std::is_same_v<decltype(state::q_rows), words> &&
                  std::is_same_v<decltype(state::k_pairs), words> &&
                  std::is_same_v<decltype(state::p_rows), words> &&
                  std::is_same_v<decltype(state::qp), words> &&
                  std::is_same_v<decltype(state::s_rows), mha::detail::aligned_vector<float>>);
}

TEST_CASE("bf16 linear: wrong shapes name the argument, the expected and the actual size",
          "[bf16_projection]") {
    using Catch::Matchers::ContainsSubstring;
    mha::bf16_linear_workspace ws;
    const bmat w(6, 4), x(4, 3);
    const mha::vector<float> b(6);
    mat<float> out(6, 3);
    REQUIRE_THROWS_AS(mha::linear(w, b, bmat(5, 3), out, ws), mha::shape_error);
    REQUIRE_THROWS_WITH(mha::linear(w, b, bmat(5, 3), out, ws),
                        ContainsSubstring("x.rows() must be 4 (w.cols()), got 5"));
    REQUIRE_THROWS_WITH(mha::linear(w, mha::vector<float>(5), x, out, ws),
                        ContainsSubstring("b.size() must be 6 (w.rows() or 0), got 5"));
    REQUIRE_THROWS_WITH(mha::linear(w, mha::matrix<float>(2, 3), x, out, ws),
                        ContainsSubstring("b.cols() must be 1 (a column vector), got 3"));
    mat<float> wrong_rows(7, 3), wrong_cols(6, 2);
    REQUIRE_THROWS_WITH(mha::linear(w, b, x, wrong_rows, ws),
                        ContainsSubstring("out.rows() must be 6 (w.rows()), got 7"));
    REQUIRE_THROWS_WITH(mha::linear(w, b, x, wrong_cols, ws),
                        ContainsSubstring("out.cols() must be 3 (x.cols()), got 2"));
}
