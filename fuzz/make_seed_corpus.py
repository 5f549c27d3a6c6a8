#!/usr/bin/env python3
# Writes the seed corpus: inputs aimed at the edges (empty and one-token sequences, fully masked
# queries, causal with Lq != Lk, huge logits, tiny and odd tile sizes) plus seeded random ones.
# Byte layout (see decode() in attention_invariants.hpp): batch, heads, dk, dv, self flag,
# lengths, mask bits, window, key lengths, 8 mask-seed bytes, amplitude, tiles, 8 value-seed bytes,
# and for grouped heads the trailer "GQ" and the index of num_kv_heads among the divisors of heads.
import os
import random

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
os.makedirs(here, exist_ok=True)

def case(batch, heads, dk, dv, lengths, masks, window=(0, 0), key_lengths=(), amplitude=1,
         tiles=(3, 5, 1), seed=1, self_attention=False, kv_heads=None):
    b = [batch, heads - 1, dk - 1, dv - 1, 1 if self_attention else 0]
    for lq, lk in lengths:
        b += [lq] if self_attention else [lq, lk]
    b += [masks]
    if masks & 4:
        b += list(window)
    if masks & 8:
        b += list(key_lengths)
    b += list(seed.to_bytes(8, "big"))
    b += [amplitude, tiles[0] - 1, tiles[1] - 1, tiles[2] - 1]
    b += list((seed * 7919).to_bytes(8, "big"))
    if kv_heads is not None:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        b += list(b"GQ") + [divisors.index(kv_heads)]
    return bytes(b)

CAUSAL, TOP_LEFT, WINDOW, KEY_LENGTHS, KEEP, BIAS = 1, 2, 4, 8, 16, 32
seeds = {
    "empty_batch": case(0, 1, 1, 1, [], 0),
    "zero_length_sequences": case(3, 2, 3, 2, [(0, 5), (4, 0), (0, 0)], CAUSAL),
    "one_token": case(1, 1, 1, 1, [(1, 1)], 0, self_attention=True),
    "causal_more_queries_than_keys": case(1, 2, 5, 3, [(9, 4)], CAUSAL),
    "causal_decode": case(1, 3, 8, 8, [(1, 40)], CAUSAL, tiles=(1, 4, 2)),
    "causal_top_left": case(2, 2, 4, 6, [(7, 12), (12, 7)], CAUSAL | TOP_LEFT),
    "window_and_key_lengths": case(2, 4, 3, 3, [(13, 13), (6, 20)], WINDOW | KEY_LENGTHS,
                                   window=(2, 1), key_lengths=(10, 3)),
    "fully_masked_by_key_length": case(1, 1, 4, 4, [(5, 5)], KEY_LENGTHS, key_lengths=(0,)),
    "keep_and_bias": case(2, 2, 7, 5, [(11, 17), (3, 9)], KEEP | BIAS),
    "everything": case(3, 4, 16, 16, [(33, 40), (8, 64), (17, 17)],
                       CAUSAL | WINDOW | KEY_LENGTHS | KEEP | BIAS, window=(5, 3),
                       key_lengths=(30, 64, 9)),
    "huge_logits": case(1, 1, 16, 4, [(16, 16)], CAUSAL, amplitude=5, tiles=(4, 4, 1)),
    "tile_boundaries": case(1, 2, 9, 2, [(17, 33)], CAUSAL, tiles=(8, 16, 2)),
    "grouped_everything": case(3, 4, 16, 16, [(33, 40), (8, 64), (17, 17)],
                               CAUSAL | WINDOW | KEY_LENGTHS | KEEP | BIAS, window=(5, 3),
                               key_lengths=(30, 64, 9), kv_heads=2),
    "grouped_multi_query_decode": case(2, 4, 8, 3, [(1, 40), (2, 64)], CAUSAL, tiles=(1, 4, 2),
                                       kv_heads=1),
    "grouped_keep_and_bias": case(2, 4, 7, 5, [(11, 17), (3, 9)], KEEP | BIAS, kv_heads=2,
                                  tiles=(8, 16, 2)),
}
rng = random.Random(20261122)
for i in range(12):
    seeds[f"random_{i:02d}"] = bytes(rng.randrange(256) for _ in range(48))
for name, data in seeds.items():
    with open(os.path.join(here, name), "wb") as f:
        f.write(data)
print(f"wrote {len(seeds)} files to {here}")
