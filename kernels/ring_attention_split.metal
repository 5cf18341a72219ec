// Attention of n queries over a ring KV cache, first of two passes: each threadgroup takes
// one of `blocks` equal runs of the key positions its tile sees, so that long rings spread
// over more threadgroups. ring_attention_reduce.metal merges the blocks.
//
// Inputs: q [B, Hq, n, D], keys and values [B, Hk, S, D] (any strides), params (int32)
// {last, capacity, window, blocks, bits of the float scale}.
// Outputs (row contiguous): o_part [B, Hq, n, blocks, D], each block's unnormalised output,
// and ml_part [B, Hq, n, blocks, 2], its max score and sum of exp(score - max).
// Template: T, D, R, BN as ring_attention.metal. Grid (32 * BN * tiles, Hk, B * blocks),
// threadgroups of (32 * BN, 1, 1).
  constexpr int E = D / 32;
  static_assert(D % 32 == 0 && 32 * BN >= D, "D must be a multiple of 32, at most 32 * BN");
  const int last = params[0];
  const int capacity = params[1];
  const int window = params[2];
  const int blocks = params[3];
  const float scale = as_type<float>(params[4]);
  const int Hq = q_shape[1];
  const int n = q_shape[2];
  const int Hk = keys_shape[1];
  const int S = keys_shape[2];
  const int G = Hq / Hk;
  const uint tile = threadgroup_position_in_grid.x;
  const uint kh = threadgroup_position_in_grid.y;
  const uint b = threadgroup_position_in_grid.z / uint(blocks);
  const int block = int(threadgroup_position_in_grid.z % uint(blocks));
  const uint sg = simdgroup_index_in_threadgroup;
  const uint lane = thread_index_in_simdgroup;
  const uint tid = thread_index_in_threadgroup;

  RingRows<R, E> rows;
  ring_load_rows<T, R, E>(rows, q, q_strides, b, kh, tile, n, G, last, scale, lane);
  const int first = ring_first_key(rows, last, capacity, window);
  const int end = ring_last_key(rows);
  const int run = (end - first + blocks) / blocks;  // ceil((end - first + 1) / blocks)
  const int from = first + block * run;
  ring_attend<T, R, E>(
      rows,
      keys + int64_t(b) * keys_strides[0] + int64_t(kh) * keys_strides[1], keys_strides[2], keys_strides[3],
      values + int64_t(b) * values_strides[0] + int64_t(kh) * values_strides[1], values_strides[2], values_strides[3],
      from + int(sg), min(end, from + run - 1), BN, capacity, S, window, lane);

  threadgroup float tg_m[BN];
  threadgroup float tg_l[BN];
  threadgroup float tg_o[BN * D];
  for (int j = 0; j < R; ++j) {
    const RingMerged merged = ring_merge<R, E, BN>(rows, j, tg_m, tg_l, tg_o, sg, lane, tid);
    if (rows.t[j] >= 0 && tid < uint(D)) {
      const int r = int(tile) * R + j;
      const int h = int(kh) * G + r % G;
      const int64_t part = ((int64_t(b) * Hq + h) * n + r / G) * blocks + block;
      o_part[part * D + tid] = merged.o;
      if (tid == 0) {
        ml_part[part * 2] = merged.m;
        ml_part[part * 2 + 1] = merged.l;
      }
    }
  }
