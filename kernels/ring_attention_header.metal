// Attention over a ring KV cache: what the ring_attention*.metal bodies share (their
// `header` in mx.fast.metal_kernel). The computation is ring_attention_reference in
// src/voxtral_mlx/kernels.py.
//
// Slot s of the ring holds the position p with p % capacity == s, for the last `capacity`
// positions. The query at position t sees the positions t - window < p <= t that are still
// in the ring (p > last - capacity, p >= 0) and whose slot exists (slot < S).
//
// A threadgroup takes a tile of R rows of one kv head: row r is query position r / G of
// query head kh * G + r % G (the G query heads that share kv head kh), so the rows of a tile
// read each key and value once. Its BN simdgroups take every BN-th position; each lane holds
// E = D / 32 consecutive elements of every query, key, value and output row.

// Running max before any score: finite, so that no exp() meets an infinity under fast math.
#define RING_NO_SCORE (-1.0e30f)

template <int R, int E>
struct RingRows {
  float q[R][E];  // this lane's part of each query, times the scale
  float o[R][E];  // this lane's part of each unnormalised output
  float m[R];     // running max score
  float l[R];     // running sum of exp(score - m)
  int t[R];       // query position; -1 for the padding rows of the last tile
};

// Loads this lane's part of the rows of `tile` and clears their softmax state. `Strides` is
// whatever MLX passes as q_strides (int64_t today, size_t in older versions).
template <typename T, int R, int E, typename Strides>
void ring_load_rows(
    thread RingRows<R, E>& rows,
    const device T* q,
    Strides q_strides,
    uint b,
    uint kh,
    uint tile,
    int n,
    int G,
    int last,
    float scale,
    uint lane) {
  const int total = n * G;
  for (int j = 0; j < R; ++j) {
    const int r = int(tile) * R + j;
    const bool valid = r < total;
    const int i = r / G;
    const int h = int(kh) * G + r % G;
    rows.t[j] = valid ? last - n + 1 + i : -1;
    rows.m[j] = RING_NO_SCORE;
    rows.l[j] = 0.0f;
    const int64_t base = int64_t(b * q_strides[0] + h * q_strides[1] + i * q_strides[2]);
    for (int e = 0; e < E; ++e) {
      const int64_t d = int64_t(lane) * E + e;
      rows.q[j][e] = valid ? float(q[base + d * int64_t(q_strides[3])]) * scale : 0.0f;
      rows.o[j][e] = 0.0f;
    }
  }
}

// The first key position that a row of the tile sees.
template <int R, int E>
int ring_first_key(thread const RingRows<R, E>& rows, int last, int capacity, int window) {
  return max(max(0, rows.t[0] - window + 1), last - capacity + 1);
}

// The last key position that a row of the tile sees: the position of its last valid row.
template <int R, int E>
int ring_last_key(thread const RingRows<R, E>& rows) {
  int end = rows.t[0];
  for (int j = 1; j < R; ++j) end = max(end, rows.t[j]);
  return end;
}

// Online softmax of the rows over the keys at positions from, from + step, ... <= to.
// `keys` and `values` point at slot 0 of this batch row and kv head.
template <typename T, int R, int E>
void ring_attend(
    thread RingRows<R, E>& rows,
    const device T* keys,
    int64_t key_slot_stride,
    int64_t key_elem_stride,
    const device T* values,
    int64_t value_slot_stride,
    int64_t value_elem_stride,
    int from,
    int to,
    int step,
    int capacity,
    int slots,
    int window,
    uint lane) {
  for (int p = from; p <= to; p += step) {
    const int slot = p % capacity;
    if (slot >= slots) {
      continue;
    }
    float k[E];
    float v[E];
    for (int e = 0; e < E; ++e) {
      const int64_t d = int64_t(lane) * E + e;
      k[e] = float(keys[slot * key_slot_stride + d * key_elem_stride]);
      v[e] = float(values[slot * value_slot_stride + d * value_elem_stride]);
    }
    for (int j = 0; j < R; ++j) {
      // The same for every lane: the simd_sum below runs in uniform control flow.
      if (p > rows.t[j] || p <= rows.t[j] - window) {
        continue;
      }
      float s = 0.0f;
      for (int e = 0; e < E; ++e) {
        s += rows.q[j][e] * k[e];
      }
      s = simd_sum(s);
      const float m = max(rows.m[j], s);
      const float rescale = fast::exp(rows.m[j] - m);
      const float w = fast::exp(s - m);
      rows.l[j] = rows.l[j] * rescale + w;
      for (int e = 0; e < E; ++e) {
        rows.o[j][e] = rows.o[j][e] * rescale + w * v[e];
      }
      rows.m[j] = m;
    }
  }
}

// Row j's softmax state merged over the BN simdgroups: its max, its sum, and element
// d = thread_index_in_threadgroup (< D) of its unnormalised output. Every thread of the
// threadgroup must call it, with the same j.
struct RingMerged {
  float m;
  float l;
  float o;
};

template <int R, int E, int BN>
RingMerged ring_merge(
    thread const RingRows<R, E>& rows,
    int j,
    threadgroup float* tg_m,
    threadgroup float* tg_l,
    threadgroup float* tg_o,
    uint sg,
    uint lane,
    uint tid) {
  constexpr int D = 32 * E;
  if (lane == 0) {
    tg_m[sg] = rows.m[j];
    tg_l[sg] = rows.l[j];
  }
  for (int e = 0; e < E; ++e) {
    tg_o[sg * D + lane * E + e] = rows.o[j][e];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  RingMerged merged = {RING_NO_SCORE, 0.0f, 0.0f};
  for (int s = 0; s < BN; ++s) {
    merged.m = max(merged.m, tg_m[s]);
  }
  if (tid < uint(D)) {
    for (int s = 0; s < BN; ++s) {
      const float f = fast::exp(tg_m[s] - merged.m);
      merged.l += tg_l[s] * f;
      merged.o += tg_o[s * D + tid] * f;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return merged;
}
