// Attention of n queries over a ring KV cache in one pass (see ring_attention_header.metal).
//
// Inputs: q [B, Hq, n, D], keys and values [B, Hk, S, D] (any strides), params (int32)
// {last, capacity, window, blocks (1 here), bits of the float scale}.
// Output: out [B, Hq, n, D], row contiguous.
// Template: T (dtype), D (head dim, a multiple of 32), R (rows per tile), BN (simdgroups,
// with 32 * BN >= D). Grid (32 * BN * tiles, Hk, B), threadgroups of (32 * BN, 1, 1).
  constexpr int E = D / 32;
  static_assert(D % 32 == 0 && 32 * BN >= D, "D must be a multiple of 32, at most 32 * BN");
  const int last = params[0];
  const int capacity = params[1];
  const int window = params[2];
  const float scale = as_type<float>(params[4]);
  const int Hq = q_shape[1];
  const int n = q_shape[2];
  const int Hk = keys_shape[1];
  const int S = keys_shape[2];
  const int G = Hq / Hk;
  const uint tile = threadgroup_position_in_grid.x;
  const uint kh = threadgroup_position_in_grid.y;
  const uint b = threadgroup_position_in_grid.z;
  const uint sg = simdgroup_index_in_threadgroup;
  const uint lane = thread_index_in_simdgroup;
  const uint tid = thread_index_in_threadgroup;

  RingRows<R, E> rows;
  ring_load_rows<T, R, E>(rows, q, q_strides, b, kh, tile, n, G, last, scale, lane);
  const int first = ring_first_key(rows, last, capacity, window);
  ring_attend<T, R, E>(
      rows,
      keys + int64_t(b) * keys_strides[0] + int64_t(kh) * keys_strides[1], keys_strides[2], keys_strides[3],
      values + int64_t(b) * values_strides[0] + int64_t(kh) * values_strides[1], values_strides[2], values_strides[3],
      first + int(sg), ring_last_key(rows), BN, capacity, S, window, lane);

  threadgroup float tg_m[BN];
  threadgroup float tg_l[BN];
  threadgroup float tg_o[BN * D];
  for (int j = 0; j < R; ++j) {
    const RingMerged merged = ring_merge<R, E, BN>(rows, j, tg_m, tg_l, tg_o, sg, lane, tid);
    if (rows.t[j] >= 0 && tid < uint(D)) {
      const int r = int(tile) * R + j;
      const int h = int(kh) * G + r % G;
      const int64_t row = (int64_t(b) * Hq + h) * n + r / G;
      out[row * D + tid] = static_cast<T>(merged.l > 0.0f ? merged.o / merged.l : 0.0f);
    }
  }
