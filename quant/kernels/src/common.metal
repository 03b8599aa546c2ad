template <int NW>
inline void kvs_load(const device uint8_t* p, thread uint32_t* w) {
  const device uint32_t* p32 = reinterpret_cast<const device uint32_t*>(p);
  for (int i = 0; i < NW; ++i) w[i] = p32[i];
}

template <int BITS>
inline int kvs_code(const thread uint32_t* w, int c) {
  return (w[(c * BITS) >> 5] >> ((c * BITS) & 31)) & ((1 << BITS) - 1);
}

inline float kvs_finite_or_zero(float m) {
  return m == -INFINITY ? 0.0f : m;
}
