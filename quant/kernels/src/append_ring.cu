  // The decode step with an fp16 window of W tokens held as a ring (wk, wv; `ring` names the oldest slot):
  // the oldest token leaves the window for the codes (warps 0 and 1 code it into row T of the code buffers,
  // as append_token.cu codes a new one), the new token takes its slot, and the tail attends the coded token
  // from its codes and the whole ring exactly.
  static_assert(WARPS >= 2, "one warp codes the key, another the value");
  __shared__ float snk[D], snv[D];
  const int slot = ring[0];
  if (warp == 0)
    kvs_append_token<D, KB, ROUNDS, HAS_MEAN>(wk + slot * wk_strides[2], wk_strides, kmean, kmean_strides, signs,
                                              kbounds, kcent, kidx, kidx_strides, knorm, knorm_strides, b, h, T,
                                              lane, snk);
  else if (warp == 1)
    kvs_append_token<D, VB, VROUNDS, false>(wv + slot * wv_strides[2], wv_strides, kmean, kmean_strides, vsigns,
                                            vbounds, vcent, vidx, vidx_strides, vnorm, vnorm_strides, b, h, T,
                                            lane, snv);
  __syncthreads();
  kvs_put_token<D, NT>(wk, wk_strides, xk, xk_strides, b, h, slot, tid);
  kvs_put_token<D, NT>(wv, wv_strides, xv, xv_strides, b, h, slot, tid);
  __syncthreads();
  kvs_merge_coded<R, D, WARPS>(sq, snk, snv, tail_qnat, srm, srl, tail_extra, warp, lane);
  __syncthreads();
  kvs_merge_window<R, D, W, WARPS, VROUNDS, HAS_MEAN>(q, q_strides, kmean, kmean_strides, wk, wk_strides, wv,
                                                      wv_strides, vsigns, scale, b, h, G, L, srm, srl, tail_extra,
                                                      warp, lane);
  __syncthreads();
