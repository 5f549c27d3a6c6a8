// SPDX-License-Identifier: MIT
// Changes to the attention scores before they are normalised, computed inside the kernels with
// no Lk × Lq bias matrix: ALiBi slopes, and the general score modifier (a caller's callable on
// each score, with an optional predicate that lets the tiled kernel skip whole key blocks).
// Soft-capping, ALiBi and attention sinks are switched on in attention_options; the order of the
// operations is in docs/score_modifiers.md.
#pragma once

#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include <mha/core.hpp>
#include <mha/detail/eigen_compat.hpp>

namespace mha {

/// The ALiBi slopes of `num_heads` heads (Press et al., "Train Short, Test Long"): with n the
/// largest power of two <= num_heads, head h < n gets 2^(−8(h+1)/n); the remaining heads take
/// the slopes of 2n heads at odd positions, 2^(−4(2k+1)/n) for k = 0, 1, ... Returns an empty
/// vector for num_heads <= 0.
inline std::vector<double> alibi_slopes(Index num_heads) {
    std::vector<double> slopes;
    if (num_heads <= 0) return slopes;
    Index n = 1;
    while (2 * n <= num_heads)
        n *= 2;
    slopes.reserve(static_cast<std::size_t>(num_heads));
    for (Index h = 0; h < n; ++h)
        slopes.push_back(std::exp2(-8.0 * static_cast<double>(h + 1) / static_cast<double>(n)));
    // The extra heads interleave between the first n: every other slope of 2n heads.
    for (Index k = 0; n + k < num_heads; ++k)
        slopes.push_back(
            std::exp2(-8.0 * static_cast<double>(2 * k + 1) / static_cast<double>(2 * n)));
    return slopes;
}

/// The block predicate of a score modifier that has none: every block is visited.
struct visit_every_block {
    /// True: the block may hold a score that is not −∞.
    constexpr bool operator()(Index /*sequence*/, Index /*head*/, Index /*query_begin*/,
                              Index /*query_end*/, Index /*key_begin*/, Index /*key_end*/) const {
        return true;
    }
};

/// A caller's change to each score, inlined into the kernels. `score(sequence, head, i, j, s)`
/// returns the new score of query i and key j (indices within the sequence b of the packed
/// batch) of query head `head`, given s after scale, soft-capping and ALiBi; returning −∞
/// excludes the key, as a mask would. `visit(sequence, head, i0, i1, j0, j1)` may return false
/// only when `score` returns −∞ for every query in [i0, i1) and key in [j0, j1): the tiled kernel
/// then skips the block without reading its keys or values. Results do not depend on whether
/// a block is skipped, so the predicate is purely a saving (the materialised kernel ignores it).
/// Both are called from several threads at once and must not modify shared state.
template <class ScoreFn, class BlockPredicate = visit_every_block>
struct score_modifier {
    ScoreFn score;           ///< (sequence, head, i, j, s) → score
    BlockPredicate visit{};  ///< (sequence, head, i0, i1, j0, j1) → may the block matter
};

/// A score_modifier from a score function, visiting every block.
template <class ScoreFn>
score_modifier<ScoreFn> make_score_modifier(ScoreFn score) {
    return {std::move(score), {}};
}

/// A score_modifier from a score function and a block predicate.
template <class ScoreFn, class BlockPredicate>
score_modifier<ScoreFn, BlockPredicate> make_score_modifier(ScoreFn score, BlockPredicate visit) {
    return {std::move(score), std::move(visit)};
}

namespace detail {

/// The modifier of a call without one: compiled out of the kernels.
struct no_score_modifier {};

template <class Mod>
inline constexpr bool is_active_modifier_v = !std::is_same_v<Mod, no_score_modifier>;

template <class Mod>
struct has_block_predicate : std::false_type {};
template <class F, class P>
struct has_block_predicate<score_modifier<F, P>>
    : std::bool_constant<!std::is_same_v<P, visit_every_block>> {};

/// Calls the modifier's score function (never reached for no_score_modifier).
template <class Scalar, class Mod>
MHA_ALWAYS_INLINE Scalar call_modifier(const Mod& mod, Index b, Index h, Index i, Index j,
                                       Scalar s) {
    if constexpr (is_active_modifier_v<Mod>)
        return static_cast<Scalar>(mod.score(b, h, i, j, s));
    else
        return s;
}

/// Whether a block may matter (always true without a block predicate).
template <class Mod>
MHA_ALWAYS_INLINE bool visits_block(const Mod& mod, Index b, Index h, Index i0, Index i1, Index j0,
                                    Index j1) {
    if constexpr (has_block_predicate<Mod>::value)
        return static_cast<bool>(mod.visit(b, h, i0, i1, j0, j1));
    else
        return true;
}

}  // namespace detail
}  // namespace mha
