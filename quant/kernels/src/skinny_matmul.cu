// y (rows, N) = x (rows, K) · wᵀ, w (N, K): a decode step's projections for a few rows (rows ≤ M, a template
// bucket, so that a batch of any size up to M shares one compiled kernel). MLX's CUDA matmul keeps its gemv for
// one row and hands two rows or more to cuBLAS, whose kernels for a few rows cost about twice the gemv (H200,
// random Llama-3.2-1B: the forward pass 2.2 ms at one row, 4.0 ms at eight). Here each warp reads COLS rows of w
// once, 16 bytes a lane at a time, and multiplies them with every row of x (read through L1), in fp32; one warp
// reduction per output. K must be a multiple of 8, x and w row-contiguous.
  const int lane = threadIdx.x & 31;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5)) * COLS;
  const int64_t N = w_shape[0];
  const int K = w_shape[1];
  const int rows = x_shape[0];
  if (n0 >= N) return;
  float acc[COLS][M];
#pragma unroll
  for (int c = 0; c < COLS; ++c)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[c][m] = 0.f;
  for (int k = lane * 8; k < K; k += 256) {
    uint4 wv[COLS];
#pragma unroll
    for (int c = 0; c < COLS; ++c)
      wv[c] = n0 + c < N ? *reinterpret_cast<const uint4*>(w + (n0 + c) * K + k) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if (m >= rows) break;
      const uint4 xv = *reinterpret_cast<const uint4*>(x + static_cast<int64_t>(m) * K + k);
      const __half2* xh = reinterpret_cast<const __half2*>(&xv);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 xf = __half22float2(xh[i]);
#pragma unroll
        for (int c = 0; c < COLS; ++c) {
          const float2 wf = __half22float2(reinterpret_cast<const __half2*>(&wv[c])[i]);
          acc[c][m] = fmaf(xf.x, wf.x, fmaf(xf.y, wf.y, acc[c][m]));
        }
      }
    }
  }
#pragma unroll
  for (int c = 0; c < COLS; ++c)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = acc[c][m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == (c * M + m) % 32 && n0 + c < N && m < rows) y[static_cast<int64_t>(m) * N + n0 + c] = __float2half(v);
    }
