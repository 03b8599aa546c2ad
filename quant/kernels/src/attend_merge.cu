  __shared__ int is_last;
  __shared__ float srm[R], srl[R];
  __shared__ float swt[32 * R];
  __shared__ float snv[D], sbw[R];  // an appended token's decoded value and weight (append_token.cu), else 0
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
      sbw[r] = 0.0f;
    }
  }
  for (int d = tid; d < D; d += NT) snv[d] = 0.0f;
  __syncthreads();
