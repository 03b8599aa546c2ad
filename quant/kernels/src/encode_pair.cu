// Keys and values of one append in one launch: the first half of the warps encode keys, the rest values. A side
// with REFIT (klt) arrives in its coded domain and gets its scale refitted (common.cuh, kvs_encode_row).
  __shared__ float sbk[(1 << KBITS) - 1], sbv[(1 << VBITS) - 1], sck[1 << KBITS], scv[1 << VBITS];
  for (int i = threadIdx.x; i < (1 << KBITS) - 1; i += blockDim.x) sbk[i] = kbounds[i];
  for (int i = threadIdx.x; i < (1 << VBITS) - 1; i += blockDim.x) sbv[i] = vbounds[i];
  for (int i = threadIdx.x; i < (1 << KBITS); i += blockDim.x) sck[i] = kcent[i];
  for (int i = threadIdx.x; i < (1 << VBITS); i += blockDim.x) scv[i] = vcent[i];
  __syncthreads();
  const int64_t rows = static_cast<int64_t>(xk_shape[0]) * xk_shape[1] * xk_shape[2];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row < rows)
    kvs_encode_row<D, KBITS, KROUNDS, KREFIT>(xk, xk_shape, xk_strides, ksigns, sbk, sck, kidx, knorm, row,
                                              threadIdx.x & 31);
  else
    kvs_encode_row<D, VBITS, VROUNDS, VREFIT>(xv, xv_shape, xv_strides, vsigns, sbv, scv, vidx, vnorm, row - rows,
                                              threadIdx.x & 31);
