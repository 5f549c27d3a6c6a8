// SPDX-License-Identifier: MIT
// Packed batches: sequences of different lengths stored side by side as columns, no padding.
#pragma once

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
        detail::check_size("mha::packed_batch", "key_lengths.size()", size(),
                           static_cast<Index>(key_lengths_.size()), "query_lengths.size()");
        for (std::size_t b = 0; b < query_lengths_.size(); ++b) {
            if (query_lengths_[b] < 0)
                detail::fail<value_error>("mha::packed_batch",
                                          "query_lengths[" + std::to_string(b) + "]", ">= 0",
                                          query_lengths_[b]);
            if (key_lengths_[b] < 0)
                detail::fail<value_error>("mha::packed_batch",
                                          "key_lengths[" + std::to_string(b) + "]", ">= 0",
                                          key_lengths_[b]);
        }
        query_offsets_ = offsets(query_lengths_, "the sum of query_lengths");
        key_offsets_ = offsets(key_lengths_, "the sum of key_lengths");
    }

    Index size() const { return static_cast<Index>(query_lengths_.size()); }
    Index query_length(Index b) const { return query_lengths_[static_cast<std::size_t>(b)]; }
    Index key_length(Index b) const { return key_lengths_[static_cast<std::size_t>(b)]; }
    Index query_offset(Index b) const { return query_offsets_[static_cast<std::size_t>(b)]; }
    Index key_offset(Index b) const { return key_offsets_[static_cast<std::size_t>(b)]; }
    Index total_queries() const { return query_offsets_.back(); }
    Index total_keys() const { return key_offsets_.back(); }
    const std::vector<Index>& query_lengths() const { return query_lengths_; }
    const std::vector<Index>& key_lengths() const { return key_lengths_; }

private:
    // A sum that wrapped around could equal a matrix's real column count and pass every shape
    // check, so the sums are checked, not only the lengths.
    static std::vector<Index> offsets(const std::vector<Index>& lengths, const char* sum) {
        std::vector<Index> result(lengths.size() + 1, 0);
        for (std::size_t b = 0; b < lengths.size(); ++b)
            result[b + 1] =
                detail::checked_add<value_error>("mha::packed_batch", sum, result[b], lengths[b]);
        return result;
    }

    std::vector<Index> query_lengths_;
    std::vector<Index> key_lengths_;
    std::vector<Index> query_offsets_;
    std::vector<Index> key_offsets_;
};

}  // namespace mha
