// Attention over a ring KV cache, second pass: merges the blocks of ring_attention_split.
//
// Inputs (row contiguous): o_part [B, Hq, n, blocks, D] and ml_part [B, Hq, n, blocks, 2].
// Output: out [B, Hq, n, D]. Template: T (output dtype).
// Grid (D, B * Hq * n, 1), threadgroups of (D, 1, 1): one thread per output element.
  const int blocks = o_part_shape[3];
  const int D = o_part_shape[4];
  const uint d = thread_position_in_grid.x;
  const int64_t row = thread_position_in_grid.y;
  float m = -1.0e30f;
  for (int j = 0; j < blocks; ++j) {
    m = max(m, ml_part[(row * blocks + j) * 2]);
  }
  float l = 0.0f;
  float o = 0.0f;
  for (int j = 0; j < blocks; ++j) {
    const float f = fast::exp(ml_part[(row * blocks + j) * 2] - m);
    l += ml_part[(row * blocks + j) * 2 + 1] * f;
    o += o_part[(row * blocks + j) * D + d] * f;
  }
  out[row * D + d] = static_cast<T>(l > 0.0f ? o / l : 0.0f);
