#!/usr/bin/env python3
# Writes the seed corpus: inputs aimed at the edges (empty and one-token sequences, fully masked
# queries, causal with Lq != Lk, huge logits, tiny and odd tile sizes) plus seeded random ones.
# Byte layout (see decode() in attention_invariants.hpp): batch, heads, dk, dv, self flag,
# lengths, mask bits, window, key lengths, 8 mask-seed bytes, amplitude, tiles, 8 value-seed bytes,
# and for grouped heads the trailer "GQ" and the index of num_kv_heads among the divisors of heads;
# for score terms (after "GQ" and its byte, or after one byte that is not "G") the trailer "ST", a
# byte of flags (1 soft-capping, 2 ALiBi, 4 sinks) and per term a byte: the cap's index in
# {0.25, 1, 2.5, 5, 20, 50}, odd for the standard ALiBi slopes (else random ones), the sinks'
# amplitude index in {0.5, 2, 8, 40}.
import os
import random

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
os.makedirs(here, exist_ok=True)

def case(batch, heads, dk, dv, lengths, masks, window=(0, 0), key_lengths=(), amplitude=1,
         tiles=(3, 5, 1), seed=1, self_attention=False, kv_heads=None, softcap=None,
         alibi=None, sinks=None):
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
    if softcap is not None or alibi is not None or sinks is not None:
        if kv_heads is None:
            b += [0]  # not "G": no grouped heads
        flags = (softcap is not None) | (alibi is not None) << 1 | (sinks is not None) << 2
        b += list(b"ST") + [flags]
        if softcap is not None:
            b += [softcap]
        if alibi is not None:
            b += [1 if alibi == "standard" else 0]
        if sinks is not None:
            b += [sinks]
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
    # Score terms (soft-capping, ALiBi, sinks): names hold "terms", and only these have them.
    "terms_softcap_causal_keep": case(2, 2, 8, 4, [(9, 17), (16, 5)], CAUSAL | KEEP, amplitude=3,
                                      softcap=1, tiles=(4, 8, 2)),
    "terms_softcap_huge_logits": case(1, 2, 16, 4, [(16, 16)], 0, amplitude=5, softcap=3,
                                      tiles=(4, 4, 1)),
    "terms_alibi_three_heads": case(1, 3, 4, 4, [(20, 20)], CAUSAL, self_attention=True,
                                    alibi="standard", tiles=(5, 7, 2)),
    "terms_alibi_random_bias": case(2, 2, 5, 3, [(7, 30), (12, 12)], BIAS | WINDOW,
                                    window=(6, 2), alibi="random", seed=5),
    "terms_sinks_fully_masked": case(2, 2, 4, 4, [(5, 5), (3, 9)], KEY_LENGTHS,
                                     key_lengths=(0, 4), sinks=2),
    "terms_sinks_large": case(1, 4, 8, 8, [(6, 40)], CAUSAL | KEEP, sinks=3, seed=11),
    "terms_everything": case(3, 4, 16, 16, [(33, 40), (8, 64), (17, 17)],
                             CAUSAL | WINDOW | KEY_LENGTHS | KEEP | BIAS, window=(5, 3),
                             key_lengths=(30, 64, 9), softcap=4, alibi="standard", sinks=1),
    "grouped_terms_everything": case(3, 4, 16, 16, [(33, 40), (8, 64), (17, 17)],
                                     CAUSAL | KEY_LENGTHS | KEEP | BIAS, key_lengths=(30, 0, 9),
                                     kv_heads=2, softcap=2, alibi="random", sinks=2,
                                     tiles=(8, 16, 2)),
}
rng = random.Random(20261122)
for i in range(12):
    seeds[f"random_{i:02d}"] = bytes(rng.randrange(256) for _ in range(48))
for name, data in seeds.items():
    with open(os.path.join(here, name), "wb") as f:
        f.write(data)
print(f"wrote {len(seeds)} files to {here}")
