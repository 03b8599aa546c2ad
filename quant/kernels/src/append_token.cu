  // The decode step's new token (one per row), appended in place and attended from its codes: warp 0 codes
  // the key (minus the key mean) into row T of the key buffers, warp 1 the value into row T of the value
  // buffers; each row's score of it (tail_qnat turns this kernel's query scaling into natural-log units) joins
  // the merged (m, l), and its weight times the decoded value joins the sum in attend_out.cu.
  static_assert(WARPS >= 2, "one warp codes the key, another the value");
  __shared__ float snk[D];
  if (warp == 0)
    kvs_append_token<D, KB, ROUNDS, HAS_MEAN>(xk, xk_strides, kmean, kmean_strides, signs, kbounds, kcent, kidx,
                                              kidx_strides, knorm, knorm_strides, b, h, T, lane, snk);
  else if (warp == 1)
    kvs_append_token<D, VB, VROUNDS, false>(xv, xv_strides, kmean, kmean_strides, vsigns, vbounds, vcent, vidx,
                                            vidx_strides, vnorm, vnorm_strides, b, h, T, lane, snv);
  __syncthreads();
  for (int r = warp; r < R; r += WARPS) {
    float s = 0.0f;
    for (int d = lane; d < D; d += 32) s += sq[r * D + d] * snk[d];
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(FULL, s, off);
    s *= tail_qnat;
    if (lane == 0) {
      const float mn = fmaxf(srm[r], s);
      const float w = __expf(s - mn);
      srl[r] = srl[r] * __expf(srm[r] - mn) + w;
      srm[r] = mn;
      sbw[r] = w;
    }
  }
  __syncthreads();
