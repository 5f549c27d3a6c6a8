// SPDX-License-Identifier: MIT
/// @file
/// Packed batches: sequences of different lengths stored side by side as columns, no padding.
#pragma once

#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include <mha/core.hpp>

namespace mha {

/// Describes how the columns of packed query and key/value matrices split into sequences.
/// Sequence b owns query columns [query_offset(b), query_offset(b) + query_lengths[b]) and
/// key/value columns likewise. Attention never crosses from one sequence to another.
class packed_batch {
public:
    /// One unbatched sequence: `length` queries and `length` keys.
    static packed_batch single(Index query_length, Index key_length) {
        return packed_batch({query_length}, {key_length});
    }

    /// Self-attention: query and key lengths are the same.
    explicit packed_batch(std::vector<Index> lengths) : packed_batch(lengths, lengths) {}

    /// Cross-attention: sequence b has query_lengths[b] queries and key_lengths[b] keys.
    packed_batch(std::vector<Index> query_lengths, std::vector<Index> key_lengths)
        : query_lengths_(std::move(query_lengths)), key_lengths_(std::move(key_lengths)) {
        check_lengths(query_lengths_, key_lengths_);
        offsets(query_lengths_, query_offsets_);
        offsets(key_lengths_, key_offsets_);
    }

    /// No sequence (fill it with `assign`).
    packed_batch() : query_offsets_(1, 0), key_offsets_(1, 0) {}

    /// Makes this the batch of the given lengths, reusing its storage: with as many sequences
    /// as an earlier batch held, no allocation (a decoding loop reassigns one batch per step).
    /// Checked first: on error the batch is unchanged.
    void assign(const std::vector<Index>& query_lengths, const std::vector<Index>& key_lengths) {
        check_lengths(query_lengths, key_lengths);
        query_lengths_.assign(query_lengths.begin(), query_lengths.end());
        key_lengths_.assign(key_lengths.begin(), key_lengths.end());
        offsets(query_lengths_, query_offsets_);
        offsets(key_lengths_, key_offsets_);
    }

    /// The number of sequences, B.
    Index size() const { return static_cast<Index>(query_lengths_.size()); }
    /// The queries (columns of Q) of sequence b, 0 ≤ b < size().
    Index query_length(Index b) const { return query_lengths_[static_cast<std::size_t>(b)]; }
    /// The keys (columns of K and V) of sequence b.
    Index key_length(Index b) const { return key_lengths_[static_cast<std::size_t>(b)]; }
    /// The column of Q where sequence b starts: the query lengths of sequences 0..b-1 summed.
    Index query_offset(Index b) const { return query_offsets_[static_cast<std::size_t>(b)]; }
    /// The column of K and V where sequence b starts.
    Index key_offset(Index b) const { return key_offsets_[static_cast<std::size_t>(b)]; }
    /// Columns of Q (and of the output) over the whole batch, Nq.
    Index total_queries() const { return query_offsets_.back(); }
    /// Columns of K and V over the whole batch, Nk.
    Index total_keys() const { return key_offsets_.back(); }
    /// Every sequence's query length, in batch order.
    const std::vector<Index>& query_lengths() const { return query_lengths_; }
    /// Every sequence's key length, in batch order.
    const std::vector<Index>& key_lengths() const { return key_lengths_; }

private:
    static void check_lengths(const std::vector<Index>& query_lengths,
                              const std::vector<Index>& key_lengths) {
        detail::check_size("mha::packed_batch", "key_lengths.size()",
                           static_cast<Index>(query_lengths.size()),
                           static_cast<Index>(key_lengths.size()), "query_lengths.size()");
        Index query_sum = 0, key_sum = 0;
        for (std::size_t b = 0; b < query_lengths.size(); ++b) {
            if (query_lengths[b] < 0)
                detail::fail<value_error>("mha::packed_batch",
                                          "query_lengths[" + std::to_string(b) + "]", ">= 0",
                                          query_lengths[b]);
            if (key_lengths[b] < 0)
                detail::fail<value_error>("mha::packed_batch",
                                          "key_lengths[" + std::to_string(b) + "]", ">= 0",
                                          key_lengths[b]);
            // A sum that wrapped around could equal a matrix's real column count and pass
            // every shape check, so the sums are checked, not only the lengths.
            query_sum = detail::checked_add<value_error>(
                "mha::packed_batch", "the sum of query_lengths", query_sum, query_lengths[b]);
            key_sum = detail::checked_add<value_error>(
                "mha::packed_batch", "the sum of key_lengths", key_sum, key_lengths[b]);
        }
    }

    // Prefix sums of lengths that check_lengths accepted (so they do not overflow).
    static void offsets(const std::vector<Index>& lengths, std::vector<Index>& result) {
        result.resize(lengths.size() + 1);
        result[0] = 0;
        std::partial_sum(lengths.begin(), lengths.end(), result.begin() + 1);
    }

    std::vector<Index> query_lengths_;
    std::vector<Index> key_lengths_;
    std::vector<Index> query_offsets_;
    std::vector<Index> key_offsets_;
};

}  // namespace mha
