  __shared__ int is_last;
  __shared__ float srm[R], srl[R];
  __shared__ float swt[32 * R];
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    int* ticket = const_cast<int*>(counter) + (b * H + h);
    is_last = atomicAdd(ticket, 1) == n_splits - 1;
    if (is_last) atomicExch(ticket, 0);  // every block has drawn: the slot is clean for a later launch
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const int64_t split0 = static_cast<int64_t>(b * H + h) * n_splits;
  for (int r = warp; r < R; r += WARPS) {
    float mr = NEG_INF;
    for (int s = lane; s < n_splits; s += 32) mr = fmaxf(mr, __ldcg(part_ml + ((split0 + s) * R + r) * 2));
    for (int off = 16; off > 0; off >>= 1) mr = fmaxf(mr, __shfl_xor_sync(FULL, mr, off));
    const float ms = kvs_finite_or_zero(mr);
    float lr = 0.0f;
    for (int s = lane; s < n_splits; s += 32)
      lr += __ldcg(part_ml + ((split0 + s) * R + r) * 2 + 1) * __expf(__ldcg(part_ml + ((split0 + s) * R + r) * 2) - ms);
    for (int off = 16; off > 0; off >>= 1) lr += __shfl_xor_sync(FULL, lr, off);
    if (lane == 0) {
      srm[r] = mr;
      srl[r] = lr;
    }
  }
  // R x D: what the tail adds to the splits' value sums in the rotated domain (append_token.cu), else 0. The
  // warps' partials (tail_extra's space) are done with.
  for (int i = tid; i < R * D; i += NT) tail_extra[i] = 0.0f;
  __syncthreads();
