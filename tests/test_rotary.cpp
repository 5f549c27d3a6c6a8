// SPDX-License-Identifier: MIT
// Rotary position embedding of rotary.hpp: the scaled frequencies against hand-computed values,
// apply against a plain long-double reference written from the formulas (both layouts, partial
// width, every scaling, float and double, positions up to 10^6, per-column positions, several
// heads, a block of a bigger matrix), the properties of a rotation (pair norms, scores depending
// only on m − n, position 0), every bad argument, and no heap allocation in apply.
//
// The error bound used throughout (derived once here, referred to as "the rotation bound").
// The implementation rounds θ_i to double (u_d) and p·θ_i in double (u_d), so its angle is off by
// at most 2·u_d·|a|; cos and sin in double err by at most an ulp (2·u_d); the factor μ costs u_d
// and the rounding to Scalar u_s: |c̃ − μ·cos a| ≤ μ·((2|a| + 3)·u_d + u_s), likewise for sin.
// The rotated element x1·c̃ − x2·s̃ then adds γ_2 ≈ 2·u_s of μ·(|x1| + |x2|). To first order
//     |out − ref| ≤ μ·(|x1| + |x2|)·(3·u_s + (2|a| + 3)·u_d),
// doubled for the second-order terms and the long-double reference's own error (order |a|·2^−64).
// A wrong frequency, layout, sign or position moves outputs by O(|x|), far above it; the angle of
// a float-only implementation at position 10^6 would be off by about 0.06, also far above.
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <limits>
#include <new>
#include <sstream>
#include <string>
#include <vector>

// An Eigen allocation while set_is_malloc_allowed(false) fails an eigen_assert (kept on in every
// preset that runs the tests), which stops the run.
#define EIGEN_RUNTIME_NO_MALLOC

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_exception.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <mha/rotary.hpp>

#include "check.hpp"
#include "reference.hpp"

// Global operator new counts what apply might allocate through the standard library (a
// std::vector or std::string on the hot path); the array and nothrow forms call this one. Not
// inlined: GCC 12 at -O2 would otherwise pair malloc or free seen through one of them with the
// other operator at a call site and report -Wmismatched-new-delete, though the pair matches.
namespace {
long operator_new_calls = 0;
std::vector<int> allocation_sink;  // the negative control's allocation
}  // namespace
[[gnu::noinline]] void* operator new(std::size_t size) {
    ++operator_new_calls;
    if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
    throw std::bad_alloc();
}
[[gnu::noinline]] void operator delete(void* p) noexcept {
    std::free(p);
}
[[gnu::noinline]] void operator delete(void* p, std::size_t) noexcept {
    std::free(p);
}

using Catch::Matchers::ContainsSubstring;
using mha::Index;
using mha::rotary_layout;
using mha::rotary_options;
using mha::rotary_scaling;
using mha_test::mat;
using mha_test::unit_roundoff;

namespace {

constexpr long double pi_ld = 3.141592653589793238462643383279502884L;

// ---------------------------------------------------------------------------------------------
// The reference, written from the published formulas (RoFormer; Chen et al. for linear
// interpolation; bloc97's NTK-aware base; Peng et al. for YaRN as HF transformers implements it;
// Meta's Llama 3.1 release for llama3), in long double.

/// θ'_i for i < r/2.
std::vector<long double> reference_frequencies(const rotary_options& o, Index r) {
    const auto& s = o.scaling;
    const long double dim = static_cast<long double>(r);
    long double base = o.base;
    if (s.kind == mha::rotary_scaling_kind::ntk_aware)
        base = base * std::pow(static_cast<long double>(s.factor), dim / (dim - 2));
    std::vector<long double> out;
    for (Index i = 0; i < r / 2; ++i) {
        const long double theta = 1.0L / std::pow(base, static_cast<long double>(2 * i) / dim);
        const long double interpolated = theta / static_cast<long double>(s.factor);
        long double value = theta;
        if (s.kind == mha::rotary_scaling_kind::linear) value = interpolated;
        if (s.kind == mha::rotary_scaling_kind::yarn) {
            // The pair index that makes n turns over the original context L:
            // L·base^(−2i/r) = 2π·n  ⇔  i = r·ln(L/(2πn)) / (2·ln base).
            const long double context = static_cast<long double>(s.original_max_positions);
            const auto index_for_turns = [&](long double n) {
                return dim * std::log(context / (2 * pi_ld * n)) / (2 * std::log(base));
            };
            long double first = index_for_turns(s.beta_fast);
            long double last = index_for_turns(s.beta_slow);
            if (s.truncate) {  // outward to whole indices
                first = std::floor(first);
                last = std::ceil(last);
            }
            if (first < 0) first = 0;
            if (last > dim - 1) last = dim - 1;
            if (first == last) last = last + 0.001L;
            long double t = (static_cast<long double>(i) - first) / (last - first);
            t = t < 0 ? 0 : (t > 1 ? 1 : t);
            // t = 0: extrapolate (keep θ); t = 1: interpolate (θ / s).
            value = (1 - t) * theta + t * interpolated;
        }
        if (s.kind == mha::rotary_scaling_kind::llama3) {
            const long double context = static_cast<long double>(s.original_max_positions);
            const long double wavelength = 2 * pi_ld / theta;
            if (wavelength > context / s.low_freq_factor) {
                value = interpolated;
            } else if (wavelength >= context / s.high_freq_factor) {
                const long double g = (context / wavelength - s.low_freq_factor) /
                                      (s.high_freq_factor - s.low_freq_factor);
                value = g * theta + (1 - g) * interpolated;
            }
        }
        out.push_back(value);
    }
    return out;
}

long double reference_attention_factor(const rotary_scaling& s) {
    if (s.kind != mha::rotary_scaling_kind::yarn) return 1;
    return 1 + 0.1L * std::log(static_cast<long double>(s.factor));
}

/// Which (cos, sin) index feature k of a head uses, and its partner in rotate_half /
/// rotate_every_two: rot(x)_k = sign·x_partner.
struct feature_map {
    Index frequency, partner;
    long double sign;
};
feature_map feature(rotary_layout layout, Index k, Index r) {
    if (layout == rotary_layout::half_split) {
        // cos = [c_0..c_{r/2−1}, c_0..c_{r/2−1}], rotate_half(x) = [−x_second, x_first].
        const Index h = r / 2;
        return k < h ? feature_map{k, k + h, -1.0L} : feature_map{k - h, k - h, 1.0L};
    }
    // cos = [c_0, c_0, c_1, c_1, ...], rotate_every_two(x) = [−x1, x0, −x3, x2, ...].
    return k % 2 == 0 ? feature_map{k / 2, k + 1, -1.0L} : feature_map{k / 2, k - 1, 1.0L};
}

/// HF's form out = μ·(x·cos + rot(x)·sin) on the first r features of each head, the rest copied.
///   x : (num_heads·d) × N,  positions : N
template <class Scalar>
mat<long double> reference_rotate(const mat<Scalar>& x, Index num_heads, Index d,
                                  const rotary_options& o, const std::vector<Index>& positions) {
    const Index r = o.rotary_dim == 0 ? d : o.rotary_dim;
    const auto freqs = reference_frequencies(o, r);
    const long double mu = reference_attention_factor(o.scaling);
    mat<long double> out = x.template cast<long double>();
    for (Index j = 0; j < x.cols(); ++j)
        for (Index h = 0; h < num_heads; ++h)
            for (Index k = 0; k < r; ++k) {
                const feature_map f = feature(o.layout, k, r);
                const long double a = static_cast<long double>(positions[std::size_t(j)]) *
                                      freqs[std::size_t(f.frequency)];
                out(h * d + k, j) =
                    mu * (static_cast<long double>(x(h * d + k, j)) * std::cos(a) +
                          f.sign * static_cast<long double>(x(h * d + f.partner, j)) * std::sin(a));
            }
    return out;
}

/// The rotation bound (top of the file) for every element of x: 0 on the features that must be
/// passed through exactly.
template <class Scalar>
mat<long double> rotation_bound(const mat<Scalar>& x, Index num_heads, Index d,
                                const rotary_options& o, const std::vector<Index>& positions) {
    const Index r = o.rotary_dim == 0 ? d : o.rotary_dim;
    const auto freqs = reference_frequencies(o, r);
    const long double mu = reference_attention_factor(o.scaling);
    const long double us = unit_roundoff<Scalar>(), ud = unit_roundoff<double>();
    mat<long double> bound = mat<long double>::Zero(x.rows(), x.cols());
    for (Index j = 0; j < x.cols(); ++j)
        for (Index h = 0; h < num_heads; ++h)
            for (Index k = 0; k < r; ++k) {
                const feature_map f = feature(o.layout, k, r);
                const long double a = static_cast<long double>(positions[std::size_t(j)]) *
                                      freqs[std::size_t(f.frequency)];
                const long double pair =
                    std::fabs(static_cast<long double>(x(h * d + k, j))) +
                    std::fabs(static_cast<long double>(x(h * d + f.partner, j)));
                bound(h * d + k, j) = 2 * mu * pair * (3 * us + (2 * std::fabs(a) + 3) * ud);
            }
    return bound;
}

/// Every |out − ref| within its bound; a 0 bound demands equality (passed-through features).
template <class Scalar>
void require_within(const mat<Scalar>& out, const mat<long double>& ref,
                    const mat<long double>& bound, const std::string& what) {
    REQUIRE(out.rows() == ref.rows());
    REQUIRE(out.cols() == ref.cols());
    for (Index j = 0; j < ref.cols(); ++j)
        for (Index i = 0; i < ref.rows(); ++i) {
            const long double err = std::fabs(static_cast<long double>(out(i, j)) - ref(i, j));
            if (!(err <= bound(i, j))) {
                std::ostringstream m;
                m << what << ": |out - ref| = " << err << " > bound " << bound(i, j) << " at (" << i
                  << ", " << j << "); out = " << out(i, j) << ", ref = " << ref(i, j) << ", shape "
                  << ref.rows() << "x" << ref.cols();
                FAIL(m.str());
            }
        }
    SUCCEED();
}

std::vector<Index> consecutive(Index first, Index n) {
    std::vector<Index> p;
    for (Index j = 0; j < n; ++j)
        p.push_back(first + j);
    return p;
}

template <class Scalar>
mat<Scalar> random_matrix(Index rows, Index cols, unsigned seed) {
    std::srand(seed);
    return mat<Scalar>::Random(rows, cols);
}

rotary_options with(Index rotary_dim, rotary_layout layout, rotary_scaling scaling,
                    double base = 10000) {
    rotary_options o;
    o.rotary_dim = rotary_dim;
    o.layout = layout;
    o.scaling = scaling;
    o.base = base;
    return o;
}

std::vector<rotary_scaling> every_scaling() {
    return {rotary_scaling::none(),
            rotary_scaling::linear(4),
            rotary_scaling::ntk_aware(4),
            rotary_scaling::yarn(16, 64),
            rotary_scaling::yarn(16, 512, 32, 1, false),
            rotary_scaling::llama3(8, 1, 4, 256)};
}

std::string describe(const rotary_options& o, Index d, Index heads) {
    std::ostringstream m;
    m << to_string(o.layout) << ", " << to_string(o.scaling.kind) << ", d = " << d
      << ", rotary_dim = " << o.rotary_dim << ", heads = " << heads;
    return m.str();
}

/// Relative error of a stored double frequency against a hand value: the frequency is computed
/// in long double and rounded once to double (u_d, plus a few long-double ulps from pow), and the
/// literal carries at most its own decimal rounding (< u_d at 17 digits): 4·u_d.
void require_frequency(double got, long double expected, const std::string& what) {
    const long double rel = std::fabs(static_cast<long double>(got) - expected) / expected;
    INFO(what << ": got " << got << ", expected " << static_cast<double>(expected));
    CHECK(rel <= 4 * unit_roundoff<double>());
}

}  // namespace

// ---------------------------------------------------------------------------------------------

TEST_CASE("rotary: to_string names each layout and scaling", "[rotary]") {
    CHECK(std::string(to_string(rotary_layout::half_split)) == "half_split");
    CHECK(std::string(to_string(rotary_layout::interleaved)) == "interleaved");
    CHECK(std::string(to_string(mha::rotary_scaling_kind::none)) == "none");
    CHECK(std::string(to_string(mha::rotary_scaling_kind::linear)) == "linear");
    CHECK(std::string(to_string(mha::rotary_scaling_kind::ntk_aware)) == "ntk_aware");
    CHECK(std::string(to_string(mha::rotary_scaling_kind::yarn)) == "yarn");
    CHECK(std::string(to_string(mha::rotary_scaling_kind::llama3)) == "llama3");
}

TEST_CASE("rotary: frequencies of each scaling against hand-computed values", "[rotary]") {
    // r = 8, base = 10^4: θ_i = 10^(−4·2i/8) = 10^−i, i.e. 1, 0.1, 0.01, 0.001; each scaling
    // below is worked out by hand from that. Both the library and the test's reference must
    // give these values, so that the reference used in the other tests is itself checked.
    struct expectation {
        rotary_scaling scaling;
        std::vector<long double> theta;
        long double mu;
    };
    const std::vector<expectation> cases = {
        {rotary_scaling::none(), {1.0L, 0.1L, 0.01L, 0.001L}, 1.0L},
        // θ / 4.
        {rotary_scaling::linear(4), {0.25L, 0.025L, 0.0025L, 0.00025L}, 1.0L},
        // base' = 10^4·4^(8/6): θ_i = 10^−i·4^(−(4/3)·(2i/8)) = 10^−i·4^(−i/3); the highest
        // frequency is kept and the lowest divided by exactly 4.
        {rotary_scaling::ntk_aware(4),
         {1.0L, 0.0629960524947436582383605303639L, 0.00396850262992049868687926409818L, 0.00025L},
         1.0L},
        // L = 4096: the index for n turns is 8·ln(4096/(2πn))/(2·ln 10^4): 1.309 for n = 32
        // (floor 1), 2.814 for n = 1 (ceil 3). Ramp (i − 1)/2 clamped: 0, 0, 0.5, 1, so θ_0, θ_1
        // are kept, θ_2 = 0.01·(0.5 + 0.5/4) = 0.00625, θ_3 = 0.001/4; μ = 1 + 0.1·ln 4.
        {rotary_scaling::yarn(4, 4096),
         {1.0L, 0.1L, 0.00625L, 0.00025L},
         1.13862943611198906188344642429L},
        // The same without truncation: ramp (i − 1.309)/(2.814 − 1.309), i.e. 0, 0, 0.45907,
        // 1.12 → 1, so θ_2 = 0.01·(1 − 0.45907 + 0.45907/4) = 0.01·(1 − 0.75·0.45907).
        {rotary_scaling::yarn(4, 4096, 32, 1, false),
         {1.0L, 0.1L, 0.00655697152112943475932412276887L, 0.00025L},
         1.13862943611198906188344642429L},
        // L = 2000, bands L/4 = 500 and L/1 = 2000, wavelengths 2π·10^i = 6.28, 62.8, 628, 6283:
        // θ_0, θ_1 kept (high frequency), θ_3 / 8 (low frequency), θ_2 blended with
        // g = (2000/(200π) − 1)/3 = (10/π − 1)/3: θ_2 = 0.01·((1 − g)/8 + g) = 0.01·(1 + 7g)/8.
        {rotary_scaling::llama3(8, 1, 4, 2000),
         {1.0L, 0.1L, 0.00761737168036056125318488619673L, 0.000125L},
         1.0L},
    };
    for (const auto& c : cases) {
        for (auto layout : {rotary_layout::half_split, rotary_layout::interleaved}) {
            const auto o = with(8, layout, c.scaling);
            const std::string what = describe(o, 8, 1);
            const mha::rotary_embedding<float> rope(o, 8);
            REQUIRE(rope.rotary_dim() == 8);
            REQUIRE(rope.inverse_frequencies().size() == 4);
            const auto ref = reference_frequencies(o, 8);
            for (std::size_t i = 0; i < 4; ++i) {
                require_frequency(rope.inverse_frequencies()[i], c.theta[i],
                                  what + ", library, i = " + std::to_string(i));
                require_frequency(static_cast<double>(ref[i]), c.theta[i],
                                  what + ", reference, i = " + std::to_string(i));
            }
            require_frequency(rope.attention_factor(), c.mu, what + ", attention factor");
        }
    }
}

TEST_CASE("rotary: llama3 bands on the Llama 3.1 settings", "[rotary]") {
    // head 128, base 5·10^5, defaults s = 8, bands at wavelengths 8192/4 and 8192/1.
    auto o = with(0, rotary_layout::half_split, rotary_scaling::llama3(), 500000);
    const mha::rotary_embedding<float> rope(o, 128);
    const auto& got = rope.inverse_frequencies();
    const auto ref = reference_frequencies(o, 128);
    REQUIRE(got.size() == 64);
    Index kept = 0, divided = 0, blended = 0;
    for (std::size_t i = 0; i < got.size(); ++i) {
        const long double theta = std::pow(500000.0L, -static_cast<long double>(2 * i) / 128);
        const long double wavelength = 2 * pi_ld / theta;
        const std::string what = "i = " + std::to_string(i);
        require_frequency(got[i], ref[i], what);
        if (wavelength < 2048) {
            ++kept;
            require_frequency(got[i], theta, what + " (high frequency, kept)");
        } else if (wavelength > 8192) {
            ++divided;
            require_frequency(got[i], theta / 8, what + " (low frequency, divided by 8)");
        } else {
            ++blended;
            // Strictly between the two ends, and decreasing in i like θ itself.
            CHECK(got[i] < theta);
            CHECK(got[i] > theta / 8);
        }
        if (i > 0) CHECK(got[i] < got[i - 1]);
    }
    // All three bands occur (counted from the wavelengths 2π·500000^(i/64)).
    CHECK(kept == 29);
    CHECK(blended == 6);
    CHECK(divided == 29);
}

TEST_CASE("rotary: YaRN ramp between kept and interpolated frequencies", "[rotary]") {
    // r = 128, base 10^4, s = 16, L = 4096: the index for 32 turns is
    // 128·ln(4096/(64π))/(2·ln 10^4) = 20.94 (floor 20), for 1 turn 128·ln(4096/(2π))/(2·ln 10^4)
    // = 45.03 (ceil 46): pairs up to 20 keep θ, from 46 on θ / 16, a linear blend in between.
    auto o = with(0, rotary_layout::half_split, rotary_scaling::yarn(16, 4096));
    const mha::rotary_embedding<double> rope(o, 128);
    const auto& got = rope.inverse_frequencies();
    const auto ref = reference_frequencies(o, 128);
    for (std::size_t i = 0; i < got.size(); ++i) {
        const long double theta = std::pow(10000.0L, -static_cast<long double>(2 * i) / 128);
        const std::string what = "i = " + std::to_string(i);
        require_frequency(got[i], ref[i], what);
        if (i <= 20) {
            require_frequency(got[i], theta, what + " (kept)");
        } else if (i >= 46) {
            require_frequency(got[i], theta / 16, what + " (interpolated)");
        } else {
            const long double t = (static_cast<long double>(i) - 20) / 26;
            require_frequency(got[i], theta * (1 - t) + theta / 16 * t, what + " (ramp)");
        }
    }
    require_frequency(rope.attention_factor(), 1 + 0.1L * std::log(16.0L), "attention factor");
}

TEMPLATE_TEST_CASE("rotary: apply matches the reference", "[rotary]", float, double) {
    using Scalar = TestType;
    // Shapes: whole head, half of a head (partial rotary), a narrow rotation in an odd-looking
    // head width; 1 and 3 heads; first positions 0, 1, 65535 and 10^6 with 3 columns each.
    struct shape {
        Index d, rotary_dim;
    };
    const std::vector<shape> shapes = {{16, 0}, {16, 8}, {10, 4}};
    unsigned seed = 1;
    for (const auto& sh : shapes)
        for (auto layout : {rotary_layout::half_split, rotary_layout::interleaved})
            for (const auto& scaling : every_scaling())
                for (Index heads : {1, 3})
                    for (Index first : {0, 1, 65535, 1000000}) {
                        const auto o = with(sh.rotary_dim, layout, scaling);
                        const std::string what =
                            describe(o, sh.d, heads) + ", first position " + std::to_string(first);
                        const mha::rotary_embedding<Scalar> rope(o, sh.d);
                        const mat<Scalar> x = random_matrix<Scalar>(heads * sh.d, 3, seed++);
                        mat<Scalar> out = x;  // (heads·d) × 3
                        rope.apply(out, heads, first);
                        const auto positions = consecutive(first, 3);
                        require_within(out, reference_rotate(x, heads, sh.d, o, positions),
                                       rotation_bound(x, heads, sh.d, o, positions), what);
                    }
}

TEMPLATE_TEST_CASE("rotary: the reference check tells the layouts and positions apart", "[rotary]",
                   float, double) {
    // Negative controls: the bound is tight enough that the other layout, or a position off by
    // one, or the unscaled frequencies, fail it.
    using Scalar = TestType;
    const Index d = 16;
    const mat<Scalar> x = random_matrix<Scalar>(d, 2, 99);
    const auto positions = consecutive(1000, 2);
    const auto half = with(0, rotary_layout::half_split, rotary_scaling::none());
    const auto inter = with(0, rotary_layout::interleaved, rotary_scaling::none());
    mat<Scalar> out = x;
    mha::rotary_embedding<Scalar>(half, d).apply(out, 1, 1000);
    const mat<long double> bound = rotation_bound(x, 1, d, half, positions);
    const auto exceeds = [&](const mat<long double>& ref) {
        for (Index j = 0; j < ref.cols(); ++j)
            for (Index i = 0; i < ref.rows(); ++i)
                if (std::fabs(static_cast<long double>(out(i, j)) - ref(i, j)) > bound(i, j))
                    return true;
        return false;
    };
    CHECK_FALSE(exceeds(reference_rotate(x, 1, d, half, positions)));
    CHECK(exceeds(reference_rotate(x, 1, d, inter, positions)));
    CHECK(exceeds(reference_rotate(x, 1, d, half, consecutive(1001, 2))));
    CHECK(exceeds(reference_rotate(
        x, 1, d, with(0, rotary_layout::half_split, rotary_scaling::linear(2)), positions)));
}

TEMPLATE_TEST_CASE("rotary: per-column positions", "[rotary]", float, double) {
    // Positions out of order, repeated, and large; tolerance: the rotation bound.
    using Scalar = TestType;
    const std::vector<Index> positions = {5, 0, 1000000, 65535, 7, 5};
    unsigned seed = 200;
    for (auto layout : {rotary_layout::half_split, rotary_layout::interleaved})
        for (const auto& scaling : every_scaling()) {
            const auto o = with(12, layout, scaling);
            const mha::rotary_embedding<Scalar> rope(o, 16);
            const mat<Scalar> x = random_matrix<Scalar>(2 * 16, 6, seed++);
            mat<Scalar> out = x;  // (2·16) × 6
            rope.apply(out, 2, positions);
            require_within(out, reference_rotate(x, 2, 16, o, positions),
                           rotation_bound(x, 2, 16, o, positions), describe(o, 16, 2));
            // The same positions consecutive give the same bits through either overload.
            mat<Scalar> a = x, b = x;
            rope.apply(a, 2, 65535);
            rope.apply(b, 2, consecutive(65535, 6));
            CHECK(a == b);
        }
}

TEMPLATE_TEST_CASE("rotary: in place on a block leaves the rest of the matrix untouched",
                   "[rotary]", float, double) {
    // Rows [2, 2 + 3·8) and columns [1, 5) of a 29 × 6 matrix: the Ref carries the outer stride.
    // Tolerance inside the block: the rotation bound; outside: bit-for-bit equality.
    using Scalar = TestType;
    const Index d = 8, heads = 3;
    const mat<Scalar> original = random_matrix<Scalar>(2 + heads * d + 3, 6, 7);
    for (auto layout : {rotary_layout::half_split, rotary_layout::interleaved}) {
        const auto o = with(6, layout, rotary_scaling::yarn(8, 128));
        mat<Scalar> big = original;
        mha::rotary_embedding<Scalar>(o, d).apply(big.block(2, 1, heads * d, 4), heads, 300);
        const mat<Scalar> x = original.block(2, 1, heads * d, 4);
        const mat<Scalar> got = big.block(2, 1, heads * d, 4);
        const auto positions = consecutive(300, 4);
        require_within(got, reference_rotate(x, heads, d, o, positions),
                       rotation_bound(x, heads, d, o, positions), describe(o, d, heads));
        for (Index j = 0; j < big.cols(); ++j)
            for (Index i = 0; i < big.rows(); ++i) {
                const bool inside = i >= 2 && i < 2 + heads * d && j >= 1 && j < 5;
                if (!inside) CHECK(big(i, j) == original(i, j));
            }
    }
}

TEMPLATE_TEST_CASE("rotary: features beyond rotary_dim pass through bit for bit", "[rotary]", float,
                   double) {
    using Scalar = TestType;
    const Index d = 12, heads = 4;
    for (auto layout : {rotary_layout::half_split, rotary_layout::interleaved})
        for (const auto& scaling : every_scaling()) {
            const auto o = with(4, layout, scaling);
            const mat<Scalar> x = random_matrix<Scalar>(heads * d, 5, 3);
            mat<Scalar> out = x;
            mha::rotary_embedding<Scalar>(o, d).apply(out, heads, 12345);
            for (Index h = 0; h < heads; ++h) {
                INFO(describe(o, d, heads) << ", head " << h);
                CHECK(out.middleRows(h * d + 4, d - 4) == x.middleRows(h * d + 4, d - 4));
                CHECK(out.middleRows(h * d, 4) != x.middleRows(h * d, 4));
            }
        }
}

TEMPLATE_TEST_CASE("rotary: position 0 is the identity (times YaRN's factor)", "[rotary]", float,
                   double) {
    // cos 0 = 1 and sin 0 = 0 exactly, so x1·1 − x2·0 is x1 exactly: bit-for-bit equality. Under
    // YaRN each feature is fl(x·μ̃) with μ̃ = μ rounded to double then Scalar (u_d + u_s): to first
    // order 2·u_s + u_d ≤ 3·u_s of |μ·x|, which also covers the second-order terms.
    using Scalar = TestType;
    const Index d = 16;
    for (auto layout : {rotary_layout::half_split, rotary_layout::interleaved})
        for (const auto& scaling : every_scaling()) {
            const auto o = with(0, layout, scaling);
            const mha::rotary_embedding<Scalar> rope(o, d);
            const mat<Scalar> x = random_matrix<Scalar>(2 * d, 3, 11);
            mat<Scalar> out = x;
            rope.apply(out, 2, std::vector<Index>{0, 0, 0});
            INFO(describe(o, d, 2));
            if (scaling.kind != mha::rotary_scaling_kind::yarn) {
                CHECK(out == x);
            } else {
                const long double mu = reference_attention_factor(scaling);
                for (Index j = 0; j < x.cols(); ++j)
                    for (Index i = 0; i < x.rows(); ++i) {
                        const long double expected = mu * static_cast<long double>(x(i, j));
                        CHECK(std::fabs(static_cast<long double>(out(i, j)) - expected) <=
                              3 * unit_roundoff<Scalar>() * std::fabs(expected));
                    }
            }
        }
}

TEMPLATE_TEST_CASE("rotary: a rotation keeps each pair's norm (times YaRN's factor)", "[rotary]",
                   float, double) {
    // The norm does not depend on the angle's accuracy (cos² + sin² = 1 for any angle), only on
    // the rounding of cos and sin (3·u_d + u_s relative, see the top of the file) and of the two
    // products and the sum per element (2·u_s of μ·(|x1| + |x2|) ≤ 2√2·u_s·μ‖x‖ each, so
    // 4·u_s·μ‖x‖ on the pair's norm): |‖out‖ − μ‖x‖| ≤ μ‖x‖·(5·u_s + 3·u_d), doubled for the
    // second-order terms.
    using Scalar = TestType;
    const Index d = 16, heads = 2;
    const long double us = unit_roundoff<Scalar>(), ud = unit_roundoff<double>();
    for (auto layout : {rotary_layout::half_split, rotary_layout::interleaved})
        for (const auto& scaling : every_scaling()) {
            const auto o = with(0, layout, scaling);
            const mat<Scalar> x = random_matrix<Scalar>(heads * d, 4, 21);
            mat<Scalar> out = x;
            mha::rotary_embedding<Scalar>(o, d).apply(out, heads,
                                                      std::vector<Index>{1, 17, 65535, 1000000});
            const long double mu = reference_attention_factor(scaling);
            for (Index j = 0; j < x.cols(); ++j)
                for (Index h = 0; h < heads; ++h)
                    for (Index k = 0; k < d / 2; ++k) {
                        const Index a = layout == rotary_layout::half_split ? k : 2 * k;
                        const Index b = layout == rotary_layout::half_split ? k + d / 2 : 2 * k + 1;
                        const auto norm = [&](const mat<Scalar>& m) {
                            return std::hypot(static_cast<long double>(m(h * d + a, j)),
                                              static_cast<long double>(m(h * d + b, j)));
                        };
                        const long double before = mu * norm(x), after = norm(out);
                        INFO(describe(o, d, heads)
                             << ", column " << j << ", head " << h << ", pair " << k);
                        CHECK(std::fabs(after - before) <= 2 * before * (5 * us + 3 * ud));
                    }
        }
}

TEMPLATE_TEST_CASE("rotary: scores depend only on the distance between positions", "[rotary]",
                   float, double) {
    // q at m and k at n, then both shifted by t: q_m·k_n = q_{m+t}·k_{n+t} exactly in real
    // arithmetic. The dot products are taken in long double over the Scalar results, so they
    // differ only through the rotations' errors: Σ_c (|k_c|·B(q)_c + |q_c|·B(k)_c) per side, with
    // B the rotation bound (the reference is not used: this is an independent property).
    using Scalar = TestType;
    const Index d = 64;
    for (auto layout : {rotary_layout::half_split, rotary_layout::interleaved})
        for (const auto& scaling : every_scaling()) {
            const auto o = with(48, layout, scaling);
            const mha::rotary_embedding<Scalar> rope(o, d);
            const mat<Scalar> q = random_matrix<Scalar>(d, 1, 31);
            const mat<Scalar> k = random_matrix<Scalar>(d, 1, 32);
            struct side {
                long double dot, error;
            };
            const auto score = [&](Index m, Index n) {
                mat<Scalar> qr = q, kr = k;
                rope.apply(qr, 1, m);
                rope.apply(kr, 1, n);
                const mat<long double> bq = rotation_bound(q, 1, d, o, {m});
                const mat<long double> bk = rotation_bound(k, 1, d, o, {n});
                side s{0, 0};
                for (Index c = 0; c < d; ++c) {
                    const long double qc = qr(c, 0), kc = kr(c, 0);
                    s.dot += qc * kc;
                    s.error += std::fabs(kc) * bq(c, 0) + std::fabs(qc) * bk(c, 0);
                }
                return s;
            };
            const side base = score(7, 3);
            for (Index t : {1, 1000, 65535, 1000000}) {
                const side shifted = score(7 + t, 3 + t);
                INFO(describe(o, d, 1)
                     << ", shift " << t << ": " << base.dot << " vs " << shifted.dot);
                CHECK(std::fabs(base.dot - shifted.dot) <= base.error + shifted.error);
                // Negative control: shifting only the query changes the score beyond the bound.
                const side query_only = score(7 + t, 3);
                CHECK(std::fabs(base.dot - query_only.dot) > base.error + query_only.error);
            }
        }
}

TEST_CASE("rotary: the constructor rejects bad settings, naming them", "[rotary]") {
    const auto rejects = [](rotary_options o, Index head_dim, const std::string& message) {
        INFO("expected: " << message);
        REQUIRE_THROWS_MATCHES(mha::rotary_embedding<float>(o, head_dim), mha::value_error,
                               Catch::Matchers::MessageMatches(ContainsSubstring(message)));
    };
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const double inf = std::numeric_limits<double>::infinity();
    const std::string at = "mha::rotary_embedding: ";
    rotary_options o;
    rejects(o, 0, at + "head_dim must be >= 1, got 0");
    rejects(o, 7, at + "head_dim must be even when options.rotary_dim is 0");
    o.rotary_dim = -2;
    rejects(o, 16, at + "options.rotary_dim must be >= 0, got -2");
    o.rotary_dim = 18;
    rejects(o, 16, at + "options.rotary_dim must be <= head_dim = 16, got 18");
    o.rotary_dim = 5;
    rejects(o, 16, at + "options.rotary_dim must be even (features turn in pairs), got 5");
    o = {};
    o.layout = static_cast<rotary_layout>(7);
    rejects(o, 16, at + "options.layout must be half_split or interleaved, got 7");
    for (double base : {0.0, -1.0, nan, inf}) {
        o = {};
        o.base = base;
        rejects(o, 16, at + "options.base must be finite and > 0, got ");
    }
    o = {};
    o.scaling.kind = static_cast<mha::rotary_scaling_kind>(9);
    rejects(o, 16,
            at + "options.scaling.kind must be none, linear, ntk_aware, yarn or llama3, got 9");
    o = {};
    o.scaling.factor = 2;
    rejects(o, 16, at + "options.scaling.factor must be 1 with scaling kind none");
    for (double factor : {0.5, 0.0, -2.0, nan, inf})
        for (const auto& s : {rotary_scaling::linear(factor), rotary_scaling::ntk_aware(factor),
                              rotary_scaling::yarn(factor, 4096), rotary_scaling::llama3(factor)}) {
            o = {};
            o.scaling = s;
            rejects(o, 16, at + "options.scaling.factor must be finite and >= 1, got ");
        }
    o = {};
    o.rotary_dim = 2;
    o.scaling = rotary_scaling::ntk_aware(2);
    rejects(o, 16,
            at + "options.rotary_dim (or head_dim when it is 0) must be >= 4 with ntk_aware "
                 "scaling (base·s^(r/(r-2))), got 2");
    rejects(rotary_options{0, 10000, rotary_layout::half_split, rotary_scaling::ntk_aware(2)}, 2,
            at + "options.rotary_dim (or head_dim when it is 0) must be >= 4");
    o = {};
    o.scaling = rotary_scaling::yarn(4, 0);
    rejects(o, 16, at + "options.scaling.original_max_positions must be >= 1, got 0");
    o.scaling = rotary_scaling::yarn(4, 4096);
    o.base = 1;
    rejects(o, 16, at + "options.base must be > 1 with yarn scaling");
    o.base = 10000;
    o.scaling = rotary_scaling::yarn(4, 4096, 32, 0);
    rejects(o, 16, at + "options.scaling.beta_slow must be finite and > 0, got 0");
    o.scaling = rotary_scaling::yarn(4, 4096, 1, 1);
    rejects(o, 16, at + "options.scaling.beta_fast must be finite and > beta_slow = 1, got 1");
    o.scaling = rotary_scaling::yarn(4, 4096, nan, 1);
    rejects(o, 16, at + "options.scaling.beta_fast must be finite and > beta_slow = 1, got nan");
    o = {};
    o.scaling = rotary_scaling::llama3(8, 1, 4, -5);
    rejects(o, 16, at + "options.scaling.original_max_positions must be >= 1, got -5");
    o.scaling = rotary_scaling::llama3(8, 0, 4);
    rejects(o, 16, at + "options.scaling.low_freq_factor must be finite and > 0, got 0");
    o.scaling = rotary_scaling::llama3(8, 4, 4);
    rejects(
        o, 16,
        at + "options.scaling.high_freq_factor must be finite and > low_freq_factor = 4, got 4");
    o.scaling = rotary_scaling::llama3(8, 1, inf);
    rejects(o, 16, at + "options.scaling.high_freq_factor must be finite and > low_freq_factor");
    // Valid edges: rotary width 2, factor exactly 1, an odd head with an even rotary_dim.
    o = {};
    o.rotary_dim = 2;
    CHECK_NOTHROW(mha::rotary_embedding<float>(o, 3));
    o.scaling = rotary_scaling::yarn(1, 16);
    CHECK_NOTHROW(mha::rotary_embedding<float>(o, 3));
}

TEST_CASE("rotary: apply rejects bad arguments and leaves x unchanged", "[rotary]") {
    const mha::rotary_embedding<double> rope(rotary_options{}, 8);
    const mat<double> original = random_matrix<double>(16, 3, 5);
    mat<double> x = original;
    const std::string at = "mha::rotary_embedding::apply: ";
    const auto match = [](const std::string& s) {
        return Catch::Matchers::MessageMatches(ContainsSubstring(s));
    };
    REQUIRE_THROWS_MATCHES(rope.apply(x, 0, 0), mha::value_error,
                           match(at + "num_heads must be >= 1, got 0"));
    REQUIRE_THROWS_MATCHES(
        rope.apply(x, 3, 0), mha::shape_error,
        match(at + "x.rows() must be 24 (num_heads * head_dim = 3 * 8), got 16"));
    REQUIRE_THROWS_MATCHES(
        rope.apply(x, std::numeric_limits<Index>::max(), 0), mha::shape_error,
        match(at + "x.rows() must be num_heads * head_dim = 9223372036854775807 * 8, got 16"));
    REQUIRE_THROWS_MATCHES(rope.apply(x, 2, -1), mha::value_error,
                           match(at + "first_position must be in [0, 2^53 - (x.cols() - 1)] = [0, "
                                      "9007199254740990], got -1"));
    REQUIRE_THROWS_MATCHES(rope.apply(x, 2, Index(1) << 53), mha::value_error,
                           match(at + "first_position must be in"));
    REQUIRE_THROWS_MATCHES(rope.apply(x, 2, std::vector<Index>{1, 2}), mha::shape_error,
                           match(at + "positions.size() must be 3 (x.cols()), got 2"));
    REQUIRE_THROWS_MATCHES(rope.apply(x, 2, std::vector<Index>{1, -4, 2}), mha::value_error,
                           match(at + "positions[1] must be in [0, 2^53], got -4"));
    REQUIRE_THROWS_MATCHES(rope.apply(x, 2, std::vector<Index>{1, 2, (Index(1) << 53) + 1}),
                           mha::value_error,
                           match(at + "positions[2] must be in [0, 2^53], got 9007199254740993"));
    CHECK(x == original);
    // The largest positions are accepted; zero columns are valid at any position.
    CHECK_NOTHROW(rope.apply(x, 2, (Index(1) << 53) - 2));
    mat<double> empty(16, 0);
    CHECK_NOTHROW(rope.apply(empty, 2, Index(1) << 53));
    CHECK_NOTHROW(rope.apply(empty, 2, std::vector<Index>{}));
}

TEST_CASE("rotary: apply_transposed is the transpose of apply", "[rotary][backward]") {
    // <apply(x), y> = <x, apply_transposed(y)> for every layout and scaling, and
    // apply_transposed(apply(x)) = μ²·x. In double both sides round at about 1e-16 of the sums
    // of |terms| (the angles themselves are the same computation on both sides); 1e-13 of
    // Σ|x|·|y| leaves a wide margin, and a wrong sign or pair moves the products by O(1).
    unsigned seed = 900;
    for (auto layout : {rotary_layout::half_split, rotary_layout::interleaved})
        for (const auto& scaling : every_scaling())
            for (Index first : {0, 7, 1000000}) {
                const auto o = with(4, layout, scaling);
                const std::string what =
                    describe(o, 10, 2) + ", first position " + std::to_string(first);
                INFO(what);
                const mha::rotary_embedding<double> rope(o, 10);
                const mat<double> x = random_matrix<double>(20, 3, seed++);
                const mat<double> y = random_matrix<double>(20, 3, seed++);
                mat<double> rx = x, ty = y;
                rope.apply(rx, 2, first);
                rope.apply_transposed(ty, 2, first);
                const double scale =
                    (x.cwiseAbs().array() * y.cwiseAbs().array()).sum() * rope.attention_factor();
                CHECK(std::fabs((rx.array() * y.array()).sum() - (x.array() * ty.array()).sum()) <=
                      1e-13 * scale);
                // μ² on the rotated features (the first rotary_dim = 4 of each head of 10),
                // the rest passed through both times unchanged.
                mat<double> back = rx;
                rope.apply_transposed(back, 2, first);
                const double mu2 = rope.attention_factor() * rope.attention_factor();
                mat<double> expected = x;
                for (Index h = 0; h < 2; ++h)
                    expected.middleRows(h * 10, 4) *= mu2;
                CHECK((back - expected).cwiseAbs().maxCoeff() <=
                      1e-13 * (1 + x.cwiseAbs().maxCoeff()));
                // Not the identity (so the checks above see a rotation) unless at position 0.
                if (first > 0) CHECK((ty - y).cwiseAbs().maxCoeff() > 1e-3);
            }
    const mha::rotary_embedding<double> rope(rotary_options{}, 8);
    mat<double> x = random_matrix<double>(16, 3, 5);
    const std::string at = "mha::rotary_embedding::apply_transposed: ";
    REQUIRE_THROWS_MATCHES(rope.apply_transposed(x, 3, 0), mha::shape_error,
                           Catch::Matchers::MessageMatches(ContainsSubstring(
                               at + "x.rows() must be 24 (num_heads * head_dim = 3 * 8), got 16")));
    REQUIRE_THROWS_MATCHES(
        rope.apply_transposed(x, 2, -1), mha::value_error,
        Catch::Matchers::MessageMatches(ContainsSubstring(at + "first_position must be in")));
}

TEST_CASE("rotary: apply allocates nothing", "[rotary]") {
    // Counted: global operator new (replaced at the top of this file) and Eigen's allocator
    // (EIGEN_RUNTIME_NO_MALLOC: an Eigen allocation while forbidden fails an eigen_assert).
    const mha::rotary_embedding<float> rope(
        with(0, rotary_layout::interleaved, rotary_scaling::yarn(8, 1024)), 64);
    mat<float> x = random_matrix<float>(4 * 64, 16, 3);
    const std::vector<Index> positions = consecutive(100000, 16);
    const long before = operator_new_calls;
    Eigen::internal::set_is_malloc_allowed(false);
    rope.apply(x, 4, 100000);
    rope.apply(x.middleCols(3, 5), 4, 7);
    rope.apply(x, 4, positions);
    Eigen::internal::set_is_malloc_allowed(true);
    CHECK(operator_new_calls == before);
    // Negative control: the counter sees an allocation.
    const long control = operator_new_calls;
    // The vector lives at namespace scope: a local one's allocation may be elided (clang does).
    allocation_sink.assign(100, 1);
    CHECK(operator_new_calls == control + 1);
    std::vector<int>().swap(allocation_sink);
}
