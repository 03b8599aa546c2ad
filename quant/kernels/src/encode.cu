// One warp per vector: lane l holds coordinates [l·E, (l+1)·E), E = D / 32. Norm by warp reduction, the
// rotation's rounds as in-register butterflies (partners closer than E) and shuffles (farther), then the
// count of boundaries below each coordinate, packed little-endian into the lane's E·BITS/8 bytes.
  __shared__ float sb[(1 << BITS) - 1];
  for (int i = threadIdx.x; i < (1 << BITS) - 1; i += blockDim.x) sb[i] = bounds[i];
  __syncthreads();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  kvs_encode_row<D, BITS, ROUNDS, false>(x, x_shape, x_strides, signs, sb, sb, idx, norm, row, threadIdx.x & 31);
