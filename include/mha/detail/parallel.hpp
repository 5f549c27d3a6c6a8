// SPDX-License-Identifier: MIT
// The one place that knows OpenMP. Without it (the compiler's OpenMP off, or MHA_NO_OPENMP
// defined) everything here runs on the calling thread and the kernels compute the same results.
//
// Both helpers open a plain `omp parallel` region and hand out work themselves instead of using
// a worksharing loop (`omp for`): LLVM's OpenMP runtime allocates for every chunk a worksharing
// loop hands out (about 3 mallocs per chunk with libomp 14), while a plain region allocates
// nothing once its team exists, in libgomp and libomp alike. That keeps `forward_into`
// allocation-free on any thread count.
#pragma once

#include <algorithm>
#include <atomic>
#include <vector>

#if defined(_OPENMP) && !defined(MHA_NO_OPENMP)
#include <omp.h>
#define MHA_USE_OPENMP 1
#endif

#include <mha/core.hpp>

namespace mha {
namespace detail {

/// The number of threads a parallel region would run: `requested` if positive, else OpenMP's
/// default (omp_get_max_threads()); always 1 without OpenMP.
inline int thread_count(int requested) {
#if defined(MHA_USE_OPENMP)
    return requested > 0 ? requested : omp_get_max_threads();
#else
    (void)requested;
    return 1;
#endif
}

/// Runs fn(part, thread) for part in [0, parts) on `threads` threads (at least 1), with a fixed
/// part-to-thread map: thread t runs parts t, t + team, ... So a thread's buffers (index
/// `thread`) serve the same parts on every call and stay sized for them.
template <class Fn>
void parallel_parts(int parts, Fn fn) {
#if defined(MHA_USE_OPENMP)
    if (parts > 1) {
#pragma omp parallel num_threads(parts)
        {
            const int team = omp_get_num_threads(), me = omp_get_thread_num();
            for (int part = me; part < parts; part += team)
                fn(part, me);
        }
        return;
    }
#endif
    for (int part = 0; part < parts; ++part)
        fn(part, 0);
}

/// Runs fn(b, g) for every entry e = b·per_b + g of `offsets` that is not negative, spread over
/// `threads` threads (at most one per entry): the drivers' packing of each (sequence, key/value
/// head) once per call.
template <class Fn>
void for_each_listed(const std::vector<Index>& offsets, Index per_b, int threads, Fn fn) {
    const auto listed = static_cast<Index>(
        std::count_if(offsets.begin(), offsets.end(), [](Index at) { return at >= 0; }));
    if (listed == 0) return;
    const int parts = static_cast<int>(std::min<Index>(thread_count(threads), listed));
    parallel_parts(parts, [&](int part, int) {
        Index n = 0;
        for (std::size_t e = 0; e < offsets.size(); ++e) {
            if (offsets[e] < 0 || n++ % parts != part) continue;
            fn(static_cast<Index>(e) / per_b, static_cast<Index>(e) % per_b);
        }
    });
}

/// What an `enter` of parallel_tasks returns when the thread holds nothing until its last task.
struct nothing_held {
    ~nothing_held() {}  // NOLINT: user-provided, so that keeping one unused is not a warning
};

/// Runs fn(task, state) for task in [0, count), in parallel when OpenMP is on, handing tasks out
/// one at a time in index order (callers sort them, most expensive first). `states` holds one
/// state per thread, index omp_get_thread_num() (grown here to the thread count; a state
/// outlives the call, so what it holds is reused by the next one). Each thread calls
/// enter(state) once before its first task and keeps what it returns (a guard, or anything)
/// until its last task is done. Which thread runs a task must not change its result.
template <class State, class Enter, class Fn>
void parallel_tasks(Index count, int threads, std::vector<State>& states, Enter enter, Fn fn) {
#if defined(MHA_USE_OPENMP)
    const int nt = thread_count(threads);
    if (nt > 1 && count > 1) {
        if (states.size() < static_cast<std::size_t>(nt))
            states.resize(static_cast<std::size_t>(nt));
        std::atomic<Index> next{0};
#pragma omp parallel num_threads(nt)
        {
            State& state = states[static_cast<std::size_t>(omp_get_thread_num())];
            const auto session = enter(state);
            for (Index task; (task = next.fetch_add(1, std::memory_order_relaxed)) < count;)
                fn(task, state);
        }
        return;
    }
#else
    (void)threads;
#endif
    if (states.empty()) states.resize(1);
    const auto session = enter(states.front());
    for (Index task = 0; task < count; ++task)
        fn(task, states.front());
}

}  // namespace detail
}  // namespace mha
