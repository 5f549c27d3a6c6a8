// Ring attention across processes: causal self-attention over one sequence whose tokens are
// split into equal blocks, one per MPI rank. Each rank keeps its block of queries; the key/value
// blocks travel around a ring of ranks (MPI_Sendrecv), and each rank attends its queries to
// every block as it arrives, keeping an attention state (output and log-sum-exp) that
// mha::merge_attention_states extends block by block. No rank ever holds more than two key/value
// blocks. Rank 0 then gathers the outputs and compares them with the single-process attention
// over the whole sequence; the program fails (exit 1) if they differ by more than rounding.
//
//   mpirun -np 2 ./ring_attention_mpi   (any number of ranks; add --oversubscribe for more
//                                        ranks than cores)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <limits>

#include <mha/mha.hpp>

#include <mpi.h>

namespace {

constexpr mha::Index heads = 4, head_width = 8, block_tokens = 24;
constexpr mha::Index width = heads * head_width;  // rows of Q, K and V: H·d

/// Deterministic pseudo-random values in [−1, 1) (a 64-bit LCG), identical on every rank and
/// platform, so that rank 0 can rebuild every rank's block for the comparison.
class lcg {
public:
    explicit lcg(std::uint64_t seed) : state_(seed * 0x9E3779B97F4A7C15ULL + 1) {}
    float next() {
        state_ = state_ * 6364136223846793005ULL + 1442695040888963407ULL;
        return static_cast<float>(static_cast<double>(state_ >> 40) * 0x1.0p-23 - 1.0);
    }

private:
    std::uint64_t state_;
};

/// Q, K and V of the tokens of rank `r` (each width × block_tokens), as a projection would give.
struct token_block {
    mha::matrix<float> q, k, v;
};

token_block make_block(int r) {
    lcg values(static_cast<std::uint64_t>(r) + 1);
    token_block b{mha::matrix<float>(width, block_tokens), mha::matrix<float>(width, block_tokens),
                  mha::matrix<float>(width, block_tokens)};
    for (mha::matrix<float>* m : {&b.q, &b.k, &b.v})
        for (mha::Index i = 0; i < m->size(); ++i)
            m->data()[i] = 2 * values.next();
    return b;
}

}  // namespace

int main(int argc, char** argv) {
    MPI_Init(&argc, &argv);
    int rank = 0, ranks = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &ranks);

    const token_block mine = make_block(rank);
    // The travelling key/value block: rows [0, width) keys, [width, 2·width) values, so one
    // message carries both. 2·width × block_tokens.
    mha::matrix<float> kv(2 * width, block_tokens), incoming(2 * width, block_tokens);
    kv.topRows(width) = mine.k;
    kv.bottomRows(width) = mine.v;

    // The running state of this rank's queries: the state over no keys (0 and −∞) to start.
    mha::matrix<float> out = mha::matrix<float>::Zero(width, block_tokens);  // H·d_v × T
    mha::matrix<float> lse = mha::matrix<float>::Constant(                   // H × T
        heads, block_tokens, -std::numeric_limits<float>::infinity());
    mha::matrix<float> part(width, block_tokens);  // H·d_v × T

    const int next = (rank + 1) % ranks, previous = (rank + ranks - 1) % ranks;
    const mha::packed_batch block = mha::packed_batch::single(block_tokens, block_tokens);
    const mha::attention_request with_lse{mha::weights_mode::none, true};
    for (int step = 0; step < ranks; ++step) {
        // After `step` hops this rank holds the keys and values of rank − step.
        const int source = (rank + ranks - step) % ranks;
        // Causal at block level: earlier blocks are seen whole, this rank's own block causally
        // (equal lengths, so query i sees keys 0..i), later blocks not at all.
        if (source <= rank) {
            const mha::attention_mask<float> mask = source == rank
                                                        ? mha::attention_mask<float>(mha::causal{})
                                                        : mha::attention_mask<float>();
            const auto extra =
                mha::multi_head_attention_core(mine.q, kv.topRows(width), kv.bottomRows(width),
                                               heads, block, part, mask, {}, with_lse);
            mha::merge_attention_states(out, lse, part, extra.log_sum_exp);
        }
        if (step + 1 < ranks) {
            MPI_Sendrecv(kv.data(), static_cast<int>(kv.size()), MPI_FLOAT, next, 0,
                         incoming.data(), static_cast<int>(incoming.size()), MPI_FLOAT, previous, 0,
                         MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            kv.swap(incoming);
        }
    }

    // Rank r's outputs are columns [r·T, (r + 1)·T) of the sequence's: contiguous in memory.
    const mha::Index length = block_tokens * ranks;
    mha::matrix<float> gathered(rank == 0 ? width : 0, rank == 0 ? length : 0);
    MPI_Gather(out.data(), static_cast<int>(out.size()), MPI_FLOAT, gathered.data(),
               static_cast<int>(out.size()), MPI_FLOAT, 0, MPI_COMM_WORLD);

    int status = 0;
    if (rank == 0) {
        // The whole sequence in one process.
        mha::matrix<float> q(width, length), k(width, length), v(width, length);
        for (int r = 0; r < ranks; ++r) {
            const token_block b = make_block(r);
            q.middleCols(r * block_tokens, block_tokens) = b.q;
            k.middleCols(r * block_tokens, block_tokens) = b.k;
            v.middleCols(r * block_tokens, block_tokens) = b.v;
        }
        mha::matrix<float> whole(width, length);
        mha::multi_head_attention_core(q, k, v, heads, mha::packed_batch::single(length, length),
                                       whole, mha::causal{});
        // Tolerance, element by element, as the library's tests derive it: each result is within
        //   8·u·Vmax·(1 + Smax) + u·|R|
        // of the exact attention (u = 2^−24, Vmax the largest |value| over the keys the query
        // sees, Smax the largest |scale|·Σ_d |q_d·k_d| over them; docs/testing.md, check A), so
        // two results differ by at most twice that. A key block attended wrongly (a later block
        // seen, an earlier one missed) moves outputs by O(Vmax), far above.
        const double u = std::numeric_limits<float>::epsilon() / 2.0;
        const double scale = 1.0 / std::sqrt(static_cast<double>(head_width));
        double max_difference = 0, worst_ratio = 0;
        for (mha::Index h = 0; h < heads; ++h)
            for (mha::Index i = 0; i < length; ++i) {
                double vmax = 0, smax = 0;
                for (mha::Index j = 0; j <= i; ++j) {
                    double terms = 0;
                    for (mha::Index d = 0; d < head_width; ++d) {
                        const mha::Index row = h * head_width + d;
                        terms += std::fabs(static_cast<double>(q(row, i)) * k(row, j));
                        vmax = std::max(vmax, std::fabs(static_cast<double>(v(row, j))));
                    }
                    smax = std::max(smax, scale * terms);
                }
                for (mha::Index d = 0; d < head_width; ++d) {
                    const mha::Index row = h * head_width + d;
                    const double difference =
                        std::fabs(static_cast<double>(gathered(row, i)) - whole(row, i));
                    const double bound = 2 * (8 * u * vmax * (1 + smax) +
                                              u * std::fabs(static_cast<double>(whole(row, i))));
                    max_difference = std::max(max_difference, difference);
                    worst_ratio = std::max(worst_ratio, difference / bound);
                }
            }
        std::cout << ranks << " ranks, " << length << " tokens, " << heads
                  << " heads: max |ring - single process| = " << max_difference << " (at most "
                  << worst_ratio << " of the tolerance)\n";
        if (!(worst_ratio <= 1)) {
            std::cout << "FAILED: the ring result differs from the single-process one\n";
            status = 1;
        }
    }
    MPI_Finalize();
    return status;
}
