  __shared__ float sbk[(1 << KBITS) - 1];
  __shared__ float sbv[(1 << VBITS) - 1];
  for (int i = threadIdx.x; i < (1 << KBITS) - 1; i += blockDim.x) sbk[i] = kbounds[i];
  for (int i = threadIdx.x; i < (1 << VBITS) - 1; i += blockDim.x) sbv[i] = vbounds[i];
  __syncthreads();
  const int64_t rows = static_cast<int64_t>(xk_shape[0]) * xk_shape[1] * xk_shape[2];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row < rows)
    kvs_encode_row<D, KBITS, KROUNDS>(xk, xk_shape, xk_strides, ksigns, sbk, kidx, knorm, row, threadIdx.x & 31);
  else
    kvs_encode_row<D, VBITS, VROUNDS>(xv, xv_shape, xv_strides, vsigns, sbv, vidx, vnorm, row - rows,
                                      threadIdx.x & 31);
