  // The decode step's new token (one per row), appended in place and attended from its codes: warp 0 codes
  // the key (minus the key mean) into row T of the key buffers, warp 1 the value into row T of the value
  // buffers; each row's score of it (tail_qnat turns this kernel's query scaling into natural-log units) joins
  // the merged (m, l), its weighted decoded value the sum attend_out.cu adds.
  static_assert(WARPS >= 2, "one warp codes the key, another the value");
  __shared__ float snk[D], snv[D];
  if (warp == 0)
    kvs_append_token<D, KB, ROUNDS, HAS_MEAN>(xk, xk_strides, kmean, kmean_strides, signs, kbounds, kcent, kidx,
                                              kidx_strides, knorm, knorm_strides, b, h, T, lane, snk);
  else if (warp == 1)
    kvs_append_token<D, VB, VROUNDS, false>(xv, xv_strides, kmean, kmean_strides, vsigns, vbounds, vcent, vidx,
                                            vidx_strides, vnorm, vnorm_strides, b, h, T, lane, snv);
  __syncthreads();
  kvs_merge_coded<R, D, WARPS>(sq, snk, snv, tail_qnat, srm, srl, tail_extra, warp, lane);
  __syncthreads();
