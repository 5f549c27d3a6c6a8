// SPDX-License-Identifier: MIT
/// @file
/// Rotary position embedding (RoPE): Q and K are rotated, pair of features by pair of features,
/// by an angle proportional to the token's position, so that the score q_m·k_n of a query at
/// position m and a key at position n depends on the positions only through m − n.
///
/// Formulas. A head of width d rotates its first r features (r = rotary_dim, even, r ≤ d; the
/// remaining d − r features pass through, as GPT-NeoX's rotary_pct and Phi's partial rotary do).
/// Pair i ∈ [0, r/2) turns with the inverse frequency θ_i = base^(−2i/r); at position p its angle
/// is a = p·θ_i, and the pair (x1, x2) becomes
///     x1' = μ·(x1·cos a − x2·sin a),   x2' = μ·(x2·cos a + x1·sin a)
/// with μ = 1 except under YaRN (its attention temperature, below).
///
/// Layouts: which features form pair i.
///   half_split   (i, i + r/2): GPT-NeoX, Llama, Mistral, Qwen, Gemma, Phi. HF transformers'
///                `rotate_half`: x·cos + rotate_half(x)·sin with cos, sin repeated as [c, c].
///   interleaved  (2i, 2i + 1): GPT-J, the original RoFormer, Meta's original Llama checkpoints
///                (complex multiplication). GPT-J's `rotate_every_two` with cos, sin repeated
///                element by element.
/// The two differ only by a permutation of the features, applied to the weights by checkpoint
/// converters; using the wrong one gives wrong attention without any error, so it is stated.
///
/// Frequency scalings (for contexts longer than the model was trained on), s = factor ≥ 1:
///   linear     θ_i / s (position interpolation: positions divided by s).
///   ntk_aware  base' = base·s^(r/(r−2)), then θ_i = base'^(−2i/r): the highest frequency is
///              kept, the lowest is divided by exactly s.
///   yarn       blends θ_i (extrapolation) and θ_i / s (interpolation) by a ramp over the pair
///              index: with L the original context length and
///                  c(n) = r·ln(L / (2π·n)) / (2·ln base)
///              (the pair index whose wavelength fits n turns into L), low = max(⌊c(β_fast)⌋, 0),
///              high = min(⌈c(β_slow)⌉, r − 1) (without ⌊⌋ and ⌈⌉ when truncate is false, as
///              gpt-oss sets), ramp_i = clamp((i − low)/(high − low), 0, 1) (high − low = 0.001
///              if they are equal),
///                  θ'_i = θ_i·(1 − ramp_i) + (θ_i / s)·ramp_i,
///              and μ = 0.1·ln s + 1 multiplies cos and sin (so each score gains μ²), as HF
///              transformers does. Defaults β_fast = 32, β_slow = 1.
///   llama3     by wavelength λ_i = 2π/θ_i against L (original_max_positions) and the factors
///              low < high: λ_i < L/high keeps θ_i; λ_i > L/low gives θ_i / s; in between
///              g = (L/λ_i − low)/(high − low) and θ'_i = (1 − g)·θ_i / s + g·θ_i.
///              Defaults (Llama 3.1): s = 8, low = 1, high = 4, L = 8192.
///
/// Precision. Frequencies are computed in long double and kept in double; the angle p·θ_i and its
/// cos and sin are evaluated in double for every Scalar, then cos and sin are rounded to Scalar.
/// A float token at position 10^6 therefore sees an angle error near 10^6·2^−53 ≈ 10^−10, not the
/// 10^6·2^−24 ≈ 0.06 of an angle computed in float. Positions must not exceed 2^53 (exact in a
/// double).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <mha/core.hpp>

namespace mha {

/// Which features of a head form a rotated pair (see the top of this header).
enum class rotary_layout {
    /// Pairs (i, i + r/2): GPT-NeoX, Llama, Mistral, Qwen; HF `rotate_half`.
    half_split,
    /// Pairs (2i, 2i + 1): GPT-J, RoFormer; GPT-J's `rotate_every_two`.
    interleaved,
};

/// The enumerator's name, e.g. "half_split".
inline const char* to_string(rotary_layout layout) {
    switch (layout) {
        case rotary_layout::half_split:
            return "half_split";
        case rotary_layout::interleaved:
            return "interleaved";
    }
    return "unknown";
}

/// Which frequency scaling a rotary embedding applies.
enum class rotary_scaling_kind {
    none,       ///< the trained frequencies
    linear,     ///< positions divided by the factor (position interpolation)
    ntk_aware,  ///< the base raised so that low frequencies stretch by the factor
    yarn,       ///< YaRN: per-pair ramp between kept and interpolated frequencies
    llama3,     ///< Llama 3.1's wavelength bands
};

/// The enumerator's name, e.g. "yarn".
inline const char* to_string(rotary_scaling_kind kind) {
    switch (kind) {
        case rotary_scaling_kind::none:
            return "none";
        case rotary_scaling_kind::linear:
            return "linear";
        case rotary_scaling_kind::ntk_aware:
            return "ntk_aware";
        case rotary_scaling_kind::yarn:
            return "yarn";
        case rotary_scaling_kind::llama3:
            return "llama3";
    }
    return "unknown";
}

/// A frequency scaling and its parameters; build one with the named functions. Fields a kind
/// does not use are ignored.
struct rotary_scaling {
    /// Which scaling; none unless set.
    rotary_scaling_kind kind = rotary_scaling_kind::none;
    /// s ≥ 1: how many times longer the target context is than the trained one.
    double factor = 1;
    /// L: the context length the model was trained on (yarn, llama3).
    Index original_max_positions = 0;
    /// YaRN's ramp ends, in rotations over L: pairs turning more than β_fast times keep their
    /// frequency, pairs turning fewer than β_slow times are interpolated. β_fast > β_slow > 0.
    double beta_fast = 32;
    /// YaRN's other ramp end, β_slow (see beta_fast).
    double beta_slow = 1;
    /// YaRN: round the ramp ends outward to whole pair indices (HF transformers' default; gpt-oss
    /// turns it off).
    bool truncate = true;
    /// Llama 3's wavelength bands: 0 < low_freq_factor < high_freq_factor.
    double low_freq_factor = 1;
    /// Llama 3's other band bound (see low_freq_factor).
    double high_freq_factor = 4;

    /// No scaling.
    static rotary_scaling none() { return {}; }
    /// Linear position interpolation: positions divided by `factor`.
    static rotary_scaling linear(double factor) {
        rotary_scaling s;
        s.kind = rotary_scaling_kind::linear;
        s.factor = factor;
        return s;
    }
    /// NTK-aware scaling: the base raised so that the longest wavelength grows by `factor`.
    static rotary_scaling ntk_aware(double factor) {
        rotary_scaling s;
        s.kind = rotary_scaling_kind::ntk_aware;
        s.factor = factor;
        return s;
    }
    /// YaRN for a context `factor` times `original_max_positions`, ramp ends β_fast, β_slow.
    static rotary_scaling yarn(double factor, Index original_max_positions, double beta_fast = 32,
                               double beta_slow = 1, bool truncate = true) {
        rotary_scaling s;
        s.kind = rotary_scaling_kind::yarn;
        s.factor = factor;
        s.original_max_positions = original_max_positions;
        s.beta_fast = beta_fast;
        s.beta_slow = beta_slow;
        s.truncate = truncate;
        return s;
    }
    /// Llama 3.1's scaling (its published defaults).
    static rotary_scaling llama3(double factor = 8, double low_freq_factor = 1,
                                 double high_freq_factor = 4, Index original_max_positions = 8192) {
        rotary_scaling s;
        s.kind = rotary_scaling_kind::llama3;
        s.factor = factor;
        s.low_freq_factor = low_freq_factor;
        s.high_freq_factor = high_freq_factor;
        s.original_max_positions = original_max_positions;
        return s;
    }
};

/// A rotary embedding's settings.
struct rotary_options {
    /// r: rotated features at the start of each head; 0 means the whole head. Even, ≤ head_dim.
    Index rotary_dim = 0;
    /// θ_i = base^(−2i/r). Llama 3 uses 500000, most others 10000.
    double base = 10000;
    /// Which features form a rotated pair.
    rotary_layout layout = rotary_layout::half_split;
    /// A frequency scaling for contexts longer than the trained one.
    rotary_scaling scaling{};
};

namespace detail {

/// Largest position: every Index up to 2^53 is exact in the double that multiplies θ_i.
inline constexpr Index rotary_max_position = Index(1) << 53;

/// Validates (options, head_dim) and returns the rotary width r.
inline Index rotary_width(const rotary_options& o, Index head_dim) {
    constexpr const char* where = "mha::rotary_embedding";
    if (head_dim < 1) fail<value_error>(where, "head_dim", ">= 1", head_dim);
    if (o.rotary_dim < 0) fail<value_error>(where, "options.rotary_dim", ">= 0", o.rotary_dim);
    if (o.rotary_dim > head_dim)
        fail<value_error>(where, "options.rotary_dim", "<= head_dim = " + std::to_string(head_dim),
                          o.rotary_dim);
    if (o.rotary_dim % 2 != 0)
        fail<value_error>(where, "options.rotary_dim", "even (features turn in pairs)",
                          o.rotary_dim);
    const Index r = o.rotary_dim == 0 ? head_dim : o.rotary_dim;
    if (r % 2 != 0)
        fail<value_error>(where, "head_dim",
                          "even when options.rotary_dim is 0 (the whole head turns in pairs)",
                          head_dim);
    if (o.layout != rotary_layout::half_split && o.layout != rotary_layout::interleaved)
        fail<value_error>(where, "options.layout", "half_split or interleaved",
                          static_cast<int>(o.layout));
    if (!(o.base > 0) || !std::isfinite(o.base))
        fail<value_error>(where, "options.base", "finite and > 0", o.base);

    const rotary_scaling& s = o.scaling;
    switch (s.kind) {
        case rotary_scaling_kind::none:
            // A factor with no kind is a scaling the caller meant to ask for.
            if (s.factor != 1)
                fail<value_error>(where, "options.scaling.factor",
                                  "1 with scaling kind none (choose a kind)", s.factor);
            return r;
        case rotary_scaling_kind::linear:
        case rotary_scaling_kind::ntk_aware:
        case rotary_scaling_kind::yarn:
        case rotary_scaling_kind::llama3:
            break;
        default:
            fail<value_error>(where, "options.scaling.kind",
                              "none, linear, ntk_aware, yarn or llama3", static_cast<int>(s.kind));
    }
    if (!(s.factor >= 1) || !std::isfinite(s.factor))
        fail<value_error>(where, "options.scaling.factor", "finite and >= 1", s.factor);
    if (s.kind == rotary_scaling_kind::ntk_aware && r < 4)
        fail<value_error>(where, "options.rotary_dim (or head_dim when it is 0)",
                          ">= 4 with ntk_aware scaling (base·s^(r/(r-2)))", r);
    if (s.kind == rotary_scaling_kind::yarn || s.kind == rotary_scaling_kind::llama3) {
        if (s.original_max_positions < 1)
            fail<value_error>(where, "options.scaling.original_max_positions", ">= 1",
                              s.original_max_positions);
    }
    if (s.kind == rotary_scaling_kind::yarn) {
        if (!(o.base > 1))
            fail<value_error>(where, "options.base",
                              "> 1 with yarn scaling (it divides by ln base)", o.base);
        if (!(s.beta_slow > 0) || !std::isfinite(s.beta_slow))
            fail<value_error>(where, "options.scaling.beta_slow", "finite and > 0", s.beta_slow);
        if (!(s.beta_fast > s.beta_slow) || !std::isfinite(s.beta_fast))
            fail<value_error>(where, "options.scaling.beta_fast",
                              "finite and > beta_slow = " + to_text(s.beta_slow), s.beta_fast);
    }
    if (s.kind == rotary_scaling_kind::llama3) {
        if (!(s.low_freq_factor > 0) || !std::isfinite(s.low_freq_factor))
            fail<value_error>(where, "options.scaling.low_freq_factor", "finite and > 0",
                              s.low_freq_factor);
        if (!(s.high_freq_factor > s.low_freq_factor) || !std::isfinite(s.high_freq_factor))
            fail<value_error>(where, "options.scaling.high_freq_factor",
                              "finite and > low_freq_factor = " + to_text(s.low_freq_factor),
                              s.high_freq_factor);
    }
    return r;
}

/// θ'_i for i ∈ [0, r/2) of validated options (the formulas at the top of rotary.hpp), computed
/// in long double so that the double kept is the correctly rounded value to within an ulp.
inline std::vector<double> rotary_inverse_frequencies(const rotary_options& o, Index r) {
    using real = long double;
    const rotary_scaling& s = o.scaling;
    const real d = static_cast<real>(r);
    const real factor = s.factor;
    real base = o.base;
    if (s.kind == rotary_scaling_kind::ntk_aware) base *= std::pow(factor, d / (d - 2));

    // YaRN's ramp ends (pair indices) and Llama 3's wavelength bands.
    real low = 0, high = 0;
    if (s.kind == rotary_scaling_kind::yarn) {
        const real pi = 3.141592653589793238462643383279502884L;
        const real context = static_cast<real>(s.original_max_positions);
        const auto correction = [&](real rotations) {
            return d * std::log(context / (rotations * 2 * pi)) / (2 * std::log(base));
        };
        low = correction(s.beta_fast);
        high = correction(s.beta_slow);
        if (s.truncate) {
            low = std::floor(low);
            high = std::ceil(high);
        }
        low = std::max(low, real(0));
        high = std::min(high, d - 1);
        if (high == low) high += real(0.001);
    }

    std::vector<double> inv_freq(static_cast<std::size_t>(r / 2));
    for (Index i = 0; i < r / 2; ++i) {
        const real theta = std::pow(base, -static_cast<real>(2 * i) / d);
        real scaled = theta;
        switch (s.kind) {
            case rotary_scaling_kind::none:
            case rotary_scaling_kind::ntk_aware:
                break;
            case rotary_scaling_kind::linear:
                scaled = theta / factor;
                break;
            case rotary_scaling_kind::yarn: {
                const real ramp = std::min(
                    std::max((static_cast<real>(i) - low) / (high - low), real(0)), real(1));
                scaled = theta * (1 - ramp) + theta / factor * ramp;
                break;
            }
            case rotary_scaling_kind::llama3: {
                const real pi = 3.141592653589793238462643383279502884L;
                const real context = static_cast<real>(s.original_max_positions);
                const real wavelength = 2 * pi / theta;
                const real lo = s.low_freq_factor, hi = s.high_freq_factor;
                if (wavelength < context / hi) {
                    scaled = theta;
                } else if (wavelength > context / lo) {
                    scaled = theta / factor;
                } else {
                    const real g = (context / wavelength - lo) / (hi - lo);
                    scaled = (1 - g) * theta / factor + g * theta;
                }
                break;
            }
        }
        inv_freq[static_cast<std::size_t>(i)] = static_cast<double>(scaled);
    }
    return inv_freq;
}

/// μ: YaRN's factor on cos and sin, 1 for the other scalings.
inline double rotary_attention_factor(const rotary_scaling& s) {
    if (s.kind != rotary_scaling_kind::yarn || s.factor <= 1) return 1;
    return static_cast<double>(0.1L * std::log(static_cast<long double>(s.factor)) + 1);
}

}  // namespace detail

/// Rotary position embedding for heads of width `head_dim` stacked by rows (head h owns rows
/// [h·head_dim, (h+1)·head_dim) of each column). Immutable after construction; `apply` is const,
/// safe from several threads on different matrices, and allocates nothing.
template <class Scalar>
class rotary_embedding {
    static_assert(detail::is_supported_scalar_v<Scalar>, "mha: Scalar must be float or double");

public:
    /// Throws value_error naming the offending setting (odd or too wide rotary_dim, base ≤ 0 or
    /// not finite, factor < 1, missing original context length, misordered bands...).
    rotary_embedding(const rotary_options& options, Index head_dim)
        : options_(options),
          head_dim_(head_dim),
          rotary_dim_(detail::rotary_width(options, head_dim)),
          inv_freq_(detail::rotary_inverse_frequencies(options, rotary_dim_)),
          attention_factor_(detail::rotary_attention_factor(options.scaling)) {}

    /// The settings the embedding was built with.
    const rotary_options& options() const noexcept { return options_; }
    /// d_k: the width of the heads it rotates.
    Index head_dim() const noexcept { return head_dim_; }
    /// r: the rotated features of each head (options.rotary_dim, or head_dim when that is 0).
    Index rotary_dim() const noexcept { return rotary_dim_; }
    /// θ'_i, i ∈ [0, r/2), after scaling: pair i turns by position·θ'_i.
    const std::vector<double>& inverse_frequencies() const noexcept { return inv_freq_; }
    /// μ, the factor on cos and sin (YaRN's attention temperature; 1 otherwise).
    double attention_factor() const noexcept { return attention_factor_; }

    /// Rotates every head of every column of x in place, column j at position
    /// first_position + j (a prefill chunk, or a decode step after `first_position` cached
    /// tokens).
    ///   x : (num_heads·head_dim) × N
    /// Throws (leaving x unchanged) value_error if num_heads < 1 or a position falls outside
    /// [0, 2^53], shape_error if x.rows() != num_heads·head_dim.
    void apply(Eigen::Ref<matrix<Scalar>> x, Index num_heads, Index first_position) const {
        constexpr const char* where = "mha::rotary_embedding::apply";
        check_rows(where, x.rows(), num_heads);
        check_first_position(where, x.cols(), first_position);
        for (Index j = 0; j < x.cols(); ++j)
            rotate_column(x.col(j).data(), num_heads, first_position + j, false);
    }

    /// The transpose of `apply` (each pair turned back by its angle, times the same factor μ):
    /// the backward pass of `apply`, taking ∂loss/∂(rotated x) to ∂loss/∂x. With μ = 1 it
    /// undoes `apply`. Same arguments and errors as `apply`.
    void apply_transposed(Eigen::Ref<matrix<Scalar>> x, Index num_heads,
                          Index first_position) const {
        constexpr const char* where = "mha::rotary_embedding::apply_transposed";
        check_rows(where, x.rows(), num_heads);
        check_first_position(where, x.cols(), first_position);
        for (Index j = 0; j < x.cols(); ++j)
            rotate_column(x.col(j).data(), num_heads, first_position + j, true);
    }

    /// The same with each column's own position (packed sequences, speculative or tree decoding).
    ///   x : (num_heads·head_dim) × N,   positions : N, each in [0, 2^53]
    void apply(Eigen::Ref<matrix<Scalar>> x, Index num_heads,
               const std::vector<Index>& positions) const {
        constexpr const char* where = "mha::rotary_embedding::apply";
        check_rows(where, x.rows(), num_heads);
        detail::check_size(where, "positions.size()", x.cols(),
                           static_cast<Index>(positions.size()), "x.cols()");
        for (std::size_t j = 0; j < positions.size(); ++j)
            if (positions[j] < 0 || positions[j] > detail::rotary_max_position)
                detail::fail<value_error>(where, "positions[" + std::to_string(j) + "]",
                                          "in [0, 2^53]", positions[j]);
        for (Index j = 0; j < x.cols(); ++j)
            rotate_column(x.col(j).data(), num_heads, positions[static_cast<std::size_t>(j)],
                          false);
    }

private:
    void check_rows(const char* where, Index rows, Index num_heads) const {
        if (num_heads < 1) detail::fail<value_error>(where, "num_heads", ">= 1", num_heads);
        // Compared by division: num_heads·head_dim may not fit an Index.
        if (rows % head_dim_ == 0 && rows / head_dim_ == num_heads) return;
        std::string expected = "num_heads * head_dim = " + std::to_string(num_heads) + " * " +
                               std::to_string(head_dim_);
        if (num_heads <= std::numeric_limits<Index>::max() / head_dim_)
            expected = std::to_string(num_heads * head_dim_) + " (" + expected + ")";
        detail::fail<shape_error>(where, "x.rows()", expected, rows);
    }

    static void check_first_position(const char* where, Index columns, Index first_position) {
        const Index last_offset = columns > 0 ? columns - 1 : 0;
        if (first_position < 0 || first_position > detail::rotary_max_position - last_offset)
            detail::fail<value_error>(
                where, "first_position",
                "in [0, 2^53 - (x.cols() - 1)] = [0, " +
                    std::to_string(detail::rotary_max_position - last_offset) + "]",
                first_position);
    }

    // One column: cos and sin once per frequency, shared by all heads. `transposed`: turn by
    // −angle (sin negated), the transpose of the turn.
    void rotate_column(Scalar* column, Index num_heads, Index position, bool transposed) const {
        const Index half = rotary_dim_ / 2;
        const bool split = options_.layout == rotary_layout::half_split;
        const double p = static_cast<double>(position);
        for (Index i = 0; i < half; ++i) {
            const double angle = p * inv_freq_[static_cast<std::size_t>(i)];
            const auto c = static_cast<Scalar>(std::cos(angle) * attention_factor_);
            const auto s = static_cast<Scalar>((transposed ? -std::sin(angle) : std::sin(angle)) *
                                               attention_factor_);
            const Index a = split ? i : 2 * i;
            const Index b = split ? i + half : 2 * i + 1;
            for (Index h = 0; h < num_heads; ++h) {
                Scalar* head = column + h * head_dim_;
                const Scalar x1 = head[a], x2 = head[b];
                head[a] = x1 * c - x2 * s;
                head[b] = x2 * c + x1 * s;
            }
        }
    }

    rotary_options options_;
    Index head_dim_;
    Index rotary_dim_;
    std::vector<double> inv_freq_;  // r/2
    double attention_factor_;
};

}  // namespace mha
