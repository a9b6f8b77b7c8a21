// bfloat16 matmuls by fixed weights for x86 CPUs with AVX512-BF16: the decode-time kernels of `mixtral.cpu_kernels`.
//
// Decode multiplies a few rows (1 to 16 per expert) by a large weight, so its speed is the speed at which
// the weight streams from memory. The weight is stored once in tiles of 16 output rows, each tile holding
// for every pair of input columns the 16 rows' two values side by side ([N/16][K/2][16][2]), so that one
// 64-byte load feeds a `vdpbf16ps` for each input row, no horizontal sums are needed, and every thread
// reads its tiles front to back. Accumulation is in float32 over k in ascending pairs, the same order for
// a row whatever the other rows: a row's result never depends on what else is in the batch.
//
// Built by setup.py as a plain shared library (no Python or torch headers) and called through ctypes;
// OpenMP resolves to the libgomp torch has loaded, so it shares torch's thread team.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

namespace {

constexpr int kTile = 16;   // output rows per tile: one zmm of float32 accumulators
constexpr int kRows = 16;   // input rows per pass over a tile
constexpr int kAhead = 256; // prefetch distance in k pairs (16 KiB of a tile)
constexpr int64_t kRowBlock = 192;  // rows per block of four_tiles' row loop (the x block stays in L2)
// From this many rows on, four_tiles (one tile: weights whose tiles are not a multiple of four). Measured on
// the 2-core machine with 48 distinct experts' w13 and w2: 1.1-1.15x one tile at a single row (four streams
// from memory per thread, not one), 1.1-1.7x at 2-5 rows (an MoE layer of 8 sequences routes about 2 rows to
// each expert), 1.1-1.3x at 6-16 rows.
constexpr int kManyRows = 1;
constexpr int64_t kChunkedRowsMin = 6, kChunkedRowsMax = 24;  // four_tiles_chunked's rows
constexpr int64_t kChunkPairs = 32;
constexpr int64_t kParallelRows = 64;  // fewer rows: an expert's element-wise steps run on one thread

template <int R>
void tile_rows(const uint16_t* x, int64_t ldx, const uint16_t* tile, uint16_t* y, int64_t ldy, int64_t pairs) {
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; p++) {
    const __m512bh w = (__m512bh)_mm512_loadu_si512((const void*)(tile + p * kTile * 2));
    _mm_prefetch((const char*)(tile + (p + kAhead) * kTile * 2), _MM_HINT_T0);
    for (int r = 0; r < R; r++) {
      int32_t pair;
      memcpy(&pair, x + r * ldx + 2 * p, sizeof pair);
      acc[r] = _mm512_dpbf16_ps(acc[r], w, (__m512bh)_mm512_set1_epi32(pair));
    }
  }
  for (int r = 0; r < R; r++) _mm256_storeu_si256((__m256i*)(y + r * ldy), (__m256i)_mm512_cvtneps_pbh(acc[r]));
}

// Pair p of four tiles by R rows: acc[t][r] += the dot product of tile t's pair p with row r's pair p.
// ahead > 0: also prefetch the tiles' pairs that far on into L2.
template <int R>
__attribute__((always_inline)) inline void four_tiles_pair(const uint16_t* x, int64_t ldx, const uint16_t* tiles,
                                                           int64_t tile_stride, int64_t p, int64_t ahead,
                                                           __m512 (&acc)[4][R]) {
  __m512bh w[4];
  for (int t = 0; t < 4; t++) {
    w[t] = (__m512bh)_mm512_loadu_si512((const void*)(tiles + t * tile_stride + p * kTile * 2));
    if (ahead) _mm_prefetch((const char*)(tiles + t * tile_stride + (p + ahead) * kTile * 2), _MM_HINT_T1);
  }
  for (int r = 0; r < R; r++) {
    int32_t pair;
    memcpy(&pair, x + r * ldx + 2 * p, sizeof pair);
    const __m512bh xr = (__m512bh)_mm512_set1_epi32(pair);
    for (int t = 0; t < 4; t++) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], w[t], xr);
  }
}

// Four tiles by six rows at once (24 accumulators): the blocking for many rows, where the tiles stay in
// L2 across row blocks and each weight load feeds six dot products.
template <int R>
void four_tiles(const uint16_t* x, int64_t ldx, const uint16_t* tiles, int64_t tile_stride, uint16_t* y,
                int64_t ldy, int64_t pairs) {
  __m512 acc[4][R];
  for (int t = 0; t < 4; t++)
    for (int r = 0; r < R; r++) acc[t][r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; p++) four_tiles_pair<R>(x, ldx, tiles, tile_stride, p, 0, acc);
  for (int t = 0; t < 4; t++)
    for (int r = 0; r < R; r++)
      _mm256_storeu_si256((__m256i*)(y + r * ldy + t * kTile), (__m256i)_mm512_cvtneps_pbh(acc[t][r]));
}

// tile_rows<rows> / four_tiles<rows> for a run-time count of rows <= R.
template <int R>
void one_tile_upto(int rows, const uint16_t* x, int64_t ldx, const uint16_t* tile, uint16_t* y, int64_t ldy,
                   int64_t pairs) {
  if constexpr (R > 1) {
    if (rows < R) return one_tile_upto<R - 1>(rows, x, ldx, tile, y, ldy, pairs);
  }
  tile_rows<R>(x, ldx, tile, y, ldy, pairs);
}

template <int R>
void four_tiles_upto(int rows, const uint16_t* x, int64_t ldx, const uint16_t* tiles, int64_t tile_stride,
                     uint16_t* y, int64_t ldy, int64_t pairs) {
  if constexpr (R > 1) {
    if (rows < R) return four_tiles_upto<R - 1>(rows, x, ldx, tiles, tile_stride, y, ldy, pairs);
  }
  four_tiles<R>(x, ldx, tiles, tile_stride, y, ldy, pairs);
}

// Pairs [p0, p1) of four_tiles for R rows, its accumulators carried in `saved` ([4][R][16] floats) from one
// part to the next; `ahead` as in four_tiles_pair.
template <int R>
void four_tiles_part(const uint16_t* x, int64_t ldx, const uint16_t* tiles, int64_t tile_stride, float* saved,
                     int64_t p0, int64_t p1, int64_t ahead) {
  __m512 acc[4][R];
  for (int t = 0; t < 4; t++)
    for (int r = 0; r < R; r++) acc[t][r] = _mm512_loadu_ps(saved + (t * R + r) * kTile);
  for (int64_t p = p0; p < p1; p++) four_tiles_pair<R>(x, ldx, tiles, tile_stride, p, ahead, acc);
  for (int t = 0; t < 4; t++)
    for (int r = 0; r < R; r++) _mm512_storeu_ps(saved + (t * R + r) * kTile, acc[t][r]);
}

template <int R>
void four_tiles_part_upto(int rows, const uint16_t* x, int64_t ldx, const uint16_t* tiles, int64_t tile_stride,
                          float* saved, int64_t p0, int64_t p1, int64_t ahead) {
  if constexpr (R > 1) {
    if (rows < R) return four_tiles_part_upto<R - 1>(rows, x, ldx, tiles, tile_stride, saved, p0, p1, ahead);
  }
  four_tiles_part<R>(x, ldx, tiles, tile_stride, saved, p0, p1, ahead);
}

// Four tiles by kChunkedRowsMin..kChunkedRowsMax rows: the blocks of six rows take turns on each chunk of
// kChunkPairs pairs (8 KiB of the four tiles, read from memory once and then from L1), and the first block
// prefetches the next chunk, so the memory streams while the other blocks compute. Row by row blocks, the
// first block waited for memory and the others then only computed: measured with 48 distinct experts,
// 1.05-1.2x at 7-16 rows.
void four_tiles_chunked(const uint16_t* x, int64_t m, int64_t ldx, const uint16_t* tiles, int64_t tile_stride,
                        uint16_t* y, int64_t ldy, int64_t pairs) {
  alignas(64) float saved[kChunkedRowsMax * 4 * kTile];
  memset(saved, 0, sizeof(float) * m * 4 * kTile);
  for (int64_t p0 = 0; p0 < pairs; p0 += kChunkPairs) {
    const int64_t p1 = p0 + kChunkPairs < pairs ? p0 + kChunkPairs : pairs;
    for (int64_t r = 0; r < m; r += 6) {
      const int rows = (int)(m - r < 6 ? m - r : 6);
      four_tiles_part_upto<6>(rows, x + r * ldx, ldx, tiles, tile_stride, saved + r * 4 * kTile, p0, p1,
                              r == 0 ? kChunkPairs : 0);
    }
  }
  for (int64_t r = 0; r < m; r += 6) {
    const int rows = (int)(m - r < 6 ? m - r : 6);
    const float* block = saved + r * 4 * kTile;
    for (int t = 0; t < 4; t++)
      for (int i = 0; i < rows; i++)
        _mm256_storeu_si256((__m256i*)(y + (r + i) * ldy + t * kTile),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(block + (t * rows + i) * kTile)));
  }
}

// e^x for 16 floats: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2 (Cephes' degree-6 polynomial, about
// 1 float32 ulp); x below -87 gives 0, as softmax needs for masked scores.
__m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

float bf16_round(float f) {  // float32 -> nearest bfloat16 (ties to even) -> float32
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  u = (u + 0x7fff + ((u >> 16) & 1)) & 0xffff0000u;
  memcpy(&f, &u, sizeof f);
  return f;
}

__m512 widen_bf16(__m256i bits) {  // 16 bfloat16 -> 16 float32 (exact)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

__m512 bf16x16_to_float(const uint16_t* p) { return widen_bf16(_mm256_loadu_si256((const __m256i*)p)); }

__m512 round_bf16(__m512 v) {  // each float32 -> nearest bfloat16 (ties to even) -> float32
  return widen_bf16((__m256i)_mm512_cvtneps_pbh(v));
}

// Sixteen horizontal sums at once: lane j of the result is the sum of v[j]'s 16 lanes, each summed in the
// tree of _mm512_reduce_add_ps (halves, then quarters, then lanes 0+2 and 1+3), so the bits are the same.
__m512 reduce_add_16(__m512 v[16]) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; i++)  // 128-bit blocks (0+2, 1+3) of v[2i] and of v[2i+1]
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; i++)  // block k: the four blocks of v[4i + k] summed
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; i++)  // in each block, lanes (0+2, 1+3) of two vectors' sums
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0xEE));
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
  // lane 4k + m of z holds the sum of v[4m + k]
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), z);
}

// acc[i] = the float32 dot products, in 32-wide bf16 pairs, of query q with key i of `keys` (rows dh apart),
// for i < n; zero for the rest. P = dh / 32 when known at compile time (0: read dh).
template <int P>
void dot_keys(const uint16_t* q, const uint16_t* keys, int n, int64_t dh, __m512 acc[16]) {
  const int64_t pieces = P > 0 ? P : dh / 32;
  for (int i = 0; i < 16; i++) {
    acc[i] = _mm512_setzero_ps();
    if (i >= n) continue;
    for (int64_t d = 0; d < pieces; d++)
      acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512((const void*)(q + 32 * d)),
                                (__m512bh)_mm512_loadu_si512((const void*)(keys + i * dh + 32 * d)));
  }
}

// out[h][c] = bf16(sum_k p[h][k] * values[k][c]) for H heads' probabilities p ([H][nkeys], rows nkeys apart) and
// C * 16 columns of the value rows (ldv apart; so are out's rows), keys in ascending order: each value row is
// read once for all H heads. H and C are template arguments so the H * C accumulators stay in registers.
template <int H, int C>
void weigh_values(const float* p, int64_t nkeys, const uint16_t* values, int64_t ldv, uint16_t* out) {
  __m512 acc[H][C];
  for (int h = 0; h < H; h++)
    for (int c = 0; c < C; c++) acc[h][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < nkeys; k++) {
    __m512 v[C];
    for (int c = 0; c < C; c++) v[c] = bf16x16_to_float(values + k * ldv + 16 * c);
    for (int h = 0; h < H; h++) {
      const __m512 pk = _mm512_set1_ps(p[h * nkeys + k]);
      for (int c = 0; c < C; c++) acc[h][c] = _mm512_fmadd_ps(pk, v[c], acc[h][c]);
    }
  }
  for (int h = 0; h < H; h++)
    for (int c = 0; c < C; c++)
      _mm256_storeu_si256((__m256i*)(out + h * ldv + 16 * c), (__m256i)_mm512_cvtneps_pbh(acc[h][c]));
}

constexpr int kHeadsAtOnce = 4;  // query heads whose values pass shares each value row's loads

// One sequence's query heads of one KV group over its cached keys: scores rounded to bfloat16 and scaled,
// float32 softmax, probabilities rounded to bfloat16, float32 sum of values rounded to bfloat16 (the
// roundings of the two bfloat16 batched matmuls this replaces). Scores are found sixteen keys at a time and
// each value row is read once for up to kHeadsAtOnce heads; every sum is in the order of one head and one
// key at a time. scores: scratch of group * nkeys floats.
void attend_group(const uint16_t* q, int64_t group, int64_t dh, const uint16_t* keys, const uint16_t* values,
                  const uint8_t* mask, int64_t nkeys, float scale, float* scores, uint16_t* out) {
  const __m512 scaled = _mm512_set1_ps(scale);
  for (int64_t g = 0; g < group; g++) {
    const uint16_t* qg = q + g * dh;
    float* sg = scores + g * nkeys;
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t j0 = 0; j0 < nkeys; j0 += 16) {
      const int n = nkeys - j0 < 16 ? (int)(nkeys - j0) : 16;
      __m512 acc[16];
      switch (dh) {  // a head size known at compile time keeps the 16 sums in registers
        case 64: dot_keys<2>(qg, keys + j0 * dh, n, dh, acc); break;
        case 128: dot_keys<4>(qg, keys + j0 * dh, n, dh, acc); break;
        default: dot_keys<0>(qg, keys + j0 * dh, n, dh, acc); break;
      }
      const __mmask16 live = (__mmask16)(n == 16 ? 0xffff : (1u << n) - 1);
      const __m128i flags = _mm_maskz_loadu_epi8(live, mask + j0);
      const __mmask16 attend = _mm_test_epi8_mask(flags, flags);
      const __m512 sums = _mm512_mul_ps(round_bf16(reduce_add_16(acc)), scaled);
      const __m512 masked = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), attend, sums);
      _mm512_mask_storeu_ps(sg + j0, live, masked);
      top = _mm512_mask_max_ps(top, live, top, masked);
    }
    const __m512 most = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= nkeys; j += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sg + j), most));
      _mm512_storeu_ps(sg + j, e);
      total = _mm512_add_ps(total, e);
    }
    if (j < nkeys) {
      const __mmask16 tail = (__mmask16)((1u << (nkeys - j)) - 1);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sg + j), most));
      _mm512_mask_storeu_ps(sg + j, tail, e);
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(tail, e));
    }
    const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (j = 0; j + 16 <= nkeys; j += 16)  // the probabilities, as bf16 values
      _mm512_storeu_ps(sg + j, round_bf16(_mm512_mul_ps(_mm512_loadu_ps(sg + j), inverse)));
    if (j < nkeys) {
      const __mmask16 tail = (__mmask16)((1u << (nkeys - j)) - 1);
      _mm512_mask_storeu_ps(sg + j, tail, round_bf16(_mm512_mul_ps(_mm512_maskz_loadu_ps(tail, sg + j), inverse)));
    }
  }
  for (int64_t g0 = 0; g0 < group; g0 += kHeadsAtOnce) {
    const int heads = group - g0 < kHeadsAtOnce ? (int)(group - g0) : kHeadsAtOnce;
    for (int64_t d0 = 0; d0 < dh; d0 += 64) {  // 64 output columns at a time (32 for a head size's last 32)
      const bool half = dh - d0 < 64;
      const float* p = scores + g0 * nkeys;
      uint16_t* o = out + g0 * dh + d0;
      switch (heads * 2 + half) {
        case 2: weigh_values<1, 4>(p, nkeys, values + d0, dh, o); break;
        case 3: weigh_values<1, 2>(p, nkeys, values + d0, dh, o); break;
        case 4: weigh_values<2, 4>(p, nkeys, values + d0, dh, o); break;
        case 5: weigh_values<2, 2>(p, nkeys, values + d0, dh, o); break;
        case 6: weigh_values<3, 4>(p, nkeys, values + d0, dh, o); break;
        case 7: weigh_values<3, 2>(p, nkeys, values + d0, dh, o); break;
        case 8: weigh_values<4, 4>(p, nkeys, values + d0, dh, o); break;
        default: weigh_values<4, 2>(p, nkeys, values + d0, dh, o); break;
      }
    }
  }
}

// Four tiles (64 output columns) by m rows, each row's sums in the order of every other path: the blocking
// moe_linear_bf16 uses for the same rows, on one tile group. y's rows ldy apart.
void four_tiles_rows(const uint16_t* x, int64_t m, int64_t ldx, const uint16_t* tiles, int64_t tile_stride,
                     uint16_t* y, int64_t ldy, int64_t pairs) {
  if (m >= kChunkedRowsMin && m <= kChunkedRowsMax) return four_tiles_chunked(x, m, ldx, tiles, tile_stride, y, ldy, pairs);
  for (int64_t r = 0; r < m; r += 6)
    four_tiles_upto<6>((int)(m - r < 6 ? m - r : 6), x + r * ldx, ldx, tiles, tile_stride, y + r * ldy, ldy, pairs);
}

// SwiGLU of f columns: act[j] = bf16(bf16(silu(gate[j])) * up[j]), f % 16 == 0;
// silu(g) = g / (1 + e^-g) in float32, with e^-g = +inf past float32's range, as torch computes it.
void swiglu_span(const uint16_t* gate, const uint16_t* up, int64_t f, uint16_t* act) {
  const __m512 one = _mm512_set1_ps(1.0f), inf = _mm512_set1_ps(INFINITY);
  for (int64_t j = 0; j < f; j += 16) {
    const __m512 g = bf16x16_to_float(gate + j), u = bf16x16_to_float(up + j);
    const __m512 neg = _mm512_sub_ps(_mm512_setzero_ps(), g);
    __m512 e = exp16(neg);
    e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(neg, _mm512_set1_ps(88.72283935546875f), _CMP_GT_OQ), inf);
    const __m512 s = round_bf16(_mm512_div_ps(g, _mm512_add_ps(one, e)));
    _mm256_storeu_si256((__m256i*)(act + j), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(s, u)));
  }
}

// out_row += bf16(y_row * weight), each sum rounded to bfloat16: a weighted expert output added the way
// `(y * w).to(bfloat16)` then `index_add_` add it. d % 16 == 0.
void add_weighted_row(const uint16_t* y, float weight, int64_t d, uint16_t* out) {
  const __m512 w = _mm512_set1_ps(weight);
  for (int64_t j = 0; j < d; j += 16) {
    const __m512 sum = _mm512_add_ps(bf16x16_to_float(out + j), round_bf16(_mm512_mul_ps(bf16x16_to_float(y + j), w)));
    _mm256_storeu_si256((__m256i*)(out + j), (__m256i)_mm512_cvtneps_pbh(sum));
  }
}


// A layer's experts in one parallel region, for groups of fewer than kParallelRows rows (decode) with D and F
// in whole groups of four tiles: the gather of every routed row, then for each expert in ascending order its
// w13 product (each thread's share of the gate columns, then the same columns of up, SwiGLU'd as they come)
// and its w2 product, 64 output columns at a time, each added weighted into its tokens' rows as it comes.
// The per-expert loop's two parallel regions, with the element-wise steps on one thread between them, made
// the experts of a decode step at 32 sequences 2-4% slower (measured on the 2-core machine). Loops of one
// length with a static schedule give each thread the same iterations every time (OpenMP guarantees it), so
// a thread's up pass finds its own gate columns without a barrier, and each output element gets its
// additions in ascending expert order without a barrier after w2; activations alternate between two
// buffers, so a thread may start the next expert while the other finishes this one's w2. Every sum and
// rounding is the loop's, so the bits are the same. Scratch: xs routed * d, gate most * f, act 2 * most * f.
void experts_one_region(const uint16_t* x, int64_t d, int64_t f, int64_t k, const int64_t* order,
                        const int64_t* counts, const float* weights, int64_t num_experts, const int64_t* slot,
                        const uint16_t* w13, const uint16_t* w2, int64_t routed, int64_t most, uint16_t* xs,
                        uint16_t* gate, uint16_t* act, uint16_t* out) {
  constexpr int64_t kSpan = 4 * kTile;
  const int64_t w13_tile = kTile * d, w2_tile = kTile * f;
#pragma omp parallel
  {
    alignas(64) uint16_t up[kParallelRows * kSpan];
#pragma omp for schedule(static)
    for (int64_t i = 0; i < routed; i++) memcpy(xs + i * d, x + (order[i] / k) * d, sizeof(uint16_t) * d);
    int64_t start = 0, parity = 0;
    for (int64_t e = 0; e < num_experts; e++) {
      const int64_t rows = counts[e];
      if (rows == 0) continue;
      const int64_t* mine = order + start;
      const uint16_t *xe = xs + start * d, *we13 = w13 + slot[e] * 2 * f * d, *we2 = w2 + slot[e] * d * f;
      uint16_t* ae = act + parity * most * f;
#pragma omp for schedule(static) nowait
      for (int64_t c = 0; c < f / kSpan; c++)
        four_tiles_rows(xe, rows, d, we13 + c * 4 * w13_tile, w13_tile, gate + c * kSpan, f, d / 2);
#pragma omp for schedule(static)
      for (int64_t c = 0; c < f / kSpan; c++) {
        four_tiles_rows(xe, rows, d, we13 + (f / kTile + c * 4) * w13_tile, w13_tile, up, kSpan, d / 2);
        for (int64_t i = 0; i < rows; i++)
          swiglu_span(gate + i * f + c * kSpan, up + i * kSpan, kSpan, ae + i * f + c * kSpan);
      }
#pragma omp for schedule(static) nowait
      for (int64_t c = 0; c < d / kSpan; c++) {
        four_tiles_rows(ae, rows, f, we2 + c * 4 * w2_tile, w2_tile, up, kSpan, f / 2);
        for (int64_t i = 0; i < rows; i++)
          add_weighted_row(up + i * kSpan, weights[mine[i]], kSpan, out + (mine[i] / k) * d + c * kSpan);
      }
      start += rows;
      parity ^= 1;
    }
  }
}

// One head's rotary embedding, as `mixtral.rope.apply_rope` rounds it: out = bf16(bf16(x * cos) + bf16(r * sin))
// with r = cat(-x[half:], x[:half]); head size dh a multiple of 32.
void rope_head(const uint16_t* x, const uint16_t* cos, const uint16_t* sin, int64_t dh, uint16_t* out) {
  const int64_t half = dh / 2;
  for (int64_t j = 0; j < half; j += 16) {
    const __m512 lo = bf16x16_to_float(x + j), hi = bf16x16_to_float(x + half + j);
    const __m512 lo_out = _mm512_add_ps(round_bf16(_mm512_mul_ps(lo, bf16x16_to_float(cos + j))),
                                        round_bf16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), hi),
                                                                 bf16x16_to_float(sin + j))));
    const __m512 hi_out = _mm512_add_ps(round_bf16(_mm512_mul_ps(hi, bf16x16_to_float(cos + half + j))),
                                        round_bf16(_mm512_mul_ps(lo, bf16x16_to_float(sin + half + j))));
    _mm256_storeu_si256((__m256i*)(out + j), (__m256i)_mm512_cvtneps_pbh(lo_out));
    _mm256_storeu_si256((__m256i*)(out + half + j), (__m256i)_mm512_cvtneps_pbh(hi_out));
  }
}

}  // namespace

extern "C" {

void moe_linear_bf16(const uint16_t* x, const uint16_t* tiles, uint16_t* y, int64_t m, int64_t n, int64_t k);


int moe_cpu_kernels_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

// w [N, K] (nn.Linear layout) -> tiles [N/16][K/2][16][2]. N % 16 == 0, K % 2 == 0.
void moe_pack_bf16(const uint16_t* w, uint16_t* out, int64_t n, int64_t k) {
  const int64_t pairs = k / 2;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < n / kTile; t++)
    for (int64_t r = 0; r < kTile; r++) {
      const uint32_t* src = (const uint32_t*)(w + (t * kTile + r) * k);
      uint32_t* dst = (uint32_t*)(out + t * kTile * k) + r;
      for (int64_t p = 0; p < pairs; p++) dst[p * kTile] = src[p];
    }
}

// The inverse of moe_pack_bf16.
void moe_unpack_bf16(const uint16_t* tiles, uint16_t* w, int64_t n, int64_t k) {
  const int64_t pairs = k / 2;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < n / kTile; t++)
    for (int64_t r = 0; r < kTile; r++) {
      const uint32_t* src = (const uint32_t*)(tiles + t * kTile * k) + r;
      uint32_t* dst = (uint32_t*)(w + (t * kTile + r) * k);
      for (int64_t p = 0; p < pairs; p++) dst[p] = src[p * kTile];
    }
}

// y [M, N] = x [M, K] @ w.T for w packed by moe_pack_bf16; x and y row-major with leading dimensions k and n.
void moe_linear_bf16(const uint16_t* x, const uint16_t* tiles, uint16_t* y, int64_t m, int64_t n, int64_t k) {
  const int64_t pairs = k / 2, tile_size = kTile * k;
  if (m >= kChunkedRowsMin && m <= kChunkedRowsMax && (n / kTile) % 4 == 0) {
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < n / kTile; t += 4)
      four_tiles_chunked(x, m, k, tiles + t * tile_size, tile_size, y + t * kTile, n, pairs);
    return;
  }
  if (m >= kManyRows && (n / kTile) % 4 == 0) {
    // Rows in blocks that stay in L2 while every tile passes by (one parallel region per block).
    for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) {
      const int64_t r1 = r0 + kRowBlock < m ? r0 + kRowBlock : m;
#pragma omp parallel for schedule(static)
      for (int64_t t = 0; t < n / kTile; t += 4)
        for (int64_t r = r0; r < r1; r += 6) {
          const int rows = (int)(r1 - r < 6 ? r1 - r : 6);
          four_tiles_upto<6>(rows, x + r * k, k, tiles + t * tile_size, tile_size, y + r * n + t * kTile, n, pairs);
        }
    }
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < n / kTile; t++)
    for (int64_t r = 0; r < m; r += kRows) {
      const int rows = (int)(m - r < kRows ? m - r : kRows);
      one_tile_upto<kRows>(rows, x + r * k, k, tiles + t * tile_size, y + r * n + t * kTile, n, pairs);
    }
}

// Decode attention, one query per sequence, over the ring cache in place (no copy of the cached keys).
// q [B, H, Dh]; caches [S, Hkv, C, Dh]; slots [B]; mask [B, K] (1 = attend; K <= C); out [B, H, Dh].
// H % Hkv == 0, Dh % 32 == 0. Returns 0, or -1 when scratch memory could not be had.
int moe_decode_attention_bf16(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,
                              const int64_t* slots, const uint8_t* mask, uint16_t* out, int64_t batch,
                              int64_t heads, int64_t kv_heads, int64_t capacity, int64_t dh, int64_t nkeys,
                              float scale) {
  const int64_t group = heads / kv_heads;
  int failed = 0;
#pragma omp parallel
  {
    float* scores = (float*)malloc(sizeof(float) * (group * nkeys > 0 ? group * nkeys : 1));
    if (scores == NULL) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t item = 0; item < batch * kv_heads; item++) {
      if (scores == NULL) continue;
      const int64_t b = item / kv_heads, h = item % kv_heads;
      const int64_t cache_row = (slots[b] * kv_heads + h) * capacity * dh;
      attend_group(q + (b * heads + h * group) * dh, group, dh, k_cache + cache_row, v_cache + cache_row,
                   mask + b * nkeys, nkeys, scale, scores, out + (b * heads + h * group) * dh);
    }
    free(scores);
  }
  return failed ? -1 : 0;
}

// One layer's experts on their routed rows: the whole of `mixtral.expert.moe_forward` for tiled stacks.
// ids and weights [T, K]: each token's experts (-1: a slot served elsewhere) and routing weights. The
// (token, k) pairs are grouped by expert, in ascending pair order within an expert (a stable sort, as
// group_by_expert's); then for each expert e in ascending order: gather its tokens' rows of x [T, D], run
// SwiGLU (w13 [2F, D] and w2 [D, F] tiles, stacks indexed by slot[e]) and add each output row, weighted
// by its routing weight, into out [T, D] (zeroed by the caller). counts [E] receives each expert's rows.
// D and F multiples of 16. Returns 0; -1 when scratch memory could not be had; -2 for an id outside
// [-1, E); -3 when an expert with rows is not held (slot -1).
int moe_experts_bf16(const uint16_t* x, int64_t tokens, int64_t d, int64_t f, const int64_t* ids,
                     const float* weights, int64_t k, const int64_t* slot, int64_t num_experts, const uint16_t* w13,
                     const uint16_t* w2, uint16_t* out, int64_t* counts) {
  const int64_t pairs = tokens * k;
  for (int64_t e = 0; e < num_experts; e++) counts[e] = 0;
  bool distinct = true;  // no token names an expert twice: an expert's rows are distinct output rows
  for (int64_t i = 0; i < pairs; i++) {
    const int64_t id = ids[i];
    if (id < -1 || id >= num_experts) return -2;
    if (id >= 0) counts[id]++;
    if (id >= 0)
      for (int64_t j = i - i % k; j < i; j++) distinct = distinct && ids[j] != id;
  }
  int64_t most = 0, routed = 0;
  for (int64_t e = 0; e < num_experts; e++) {
    if (counts[e] > 0 && slot[e] < 0) return -3;
    most = counts[e] > most ? counts[e] : most;
    routed += counts[e];
  }
  if (most == 0) return 0;
  const bool one_region = most < kParallelRows && d % (4 * kTile) == 0 && f % (4 * kTile) == 0;
  int64_t* order = (int64_t*)malloc(sizeof(int64_t) * (routed + num_experts));
  uint16_t* scratch = (uint16_t*)malloc(sizeof(uint16_t) * (one_region ? routed * d + 3 * most * f
                                                                        : most * (d + 2 * f + f + d)));
  if (order == NULL || scratch == NULL) {
    free(order);
    free(scratch);
    return -1;
  }
  int64_t* next = order + routed;  // [E] where each expert's next pair goes
  for (int64_t e = 0, at = 0; e < num_experts; at += counts[e], e++) next[e] = at;
  for (int64_t i = 0; i < pairs; i++)
    if (ids[i] >= 0) order[next[ids[i]]++] = i;
  if (one_region) {
    experts_one_region(x, d, f, k, order, counts, weights, num_experts, slot, w13, w2, routed, most, scratch,
                       scratch + routed * d, scratch + routed * d + most * f, out);
    free(order);
    free(scratch);
    return 0;
  }
  uint16_t *xs = scratch, *h = xs + most * d, *act = h + most * 2 * f, *y = act + most * f;
  int64_t start = 0;
  for (int64_t e = 0; e < num_experts; e++) {
    const int64_t rows = counts[e];
    if (rows == 0) continue;
    const int64_t* mine = order + start;
#pragma omp parallel for schedule(static) if (rows >= kParallelRows)
    for (int64_t i = 0; i < rows; i++) memcpy(xs + i * d, x + (mine[i] / k) * d, sizeof(uint16_t) * d);
    moe_linear_bf16(xs, w13 + slot[e] * 2 * f * d, h, rows, 2 * f, d);
#pragma omp parallel for schedule(static) if (rows >= kParallelRows)
    for (int64_t i = 0; i < rows; i++) swiglu_span(h + i * 2 * f, h + i * 2 * f + f, f, act + i * f);
    moe_linear_bf16(act, w2 + slot[e] * d * f, y, rows, d, f);
#pragma omp parallel for schedule(static) if (distinct && rows >= kParallelRows)
    for (int64_t i = 0; i < rows; i++) add_weighted_row(y + i * d, weights[mine[i]], d, out + (mine[i] / k) * d);
    start += rows;
  }
  free(order);
  free(scratch);
  return 0;
}

// RMSNorm of rows x [M, D] into out [M, D]: float32 mean of squares, r = 1 / sqrt(mean + eps), x * r rounded
// to bfloat16, times the weight [D] rounded again (the roundings of `mixtral.block.rms_norm`; the sum's
// order is this kernel's, so about one output in 100,000 differs from torch's by one or two bf16 steps).
// D a multiple of 16.
void moe_rms_norm_bf16(const uint16_t* x, const uint16_t* weight, uint16_t* out, int64_t m, int64_t d, float eps) {
#pragma omp parallel for schedule(static) if (m >= kParallelRows)
  for (int64_t i = 0; i < m; i++) {
    const uint16_t* row = x + i * d;
    __m512 squares = _mm512_setzero_ps();
    for (int64_t j = 0; j < d; j += 16) {
      const __m512 v = bf16x16_to_float(row + j);
      squares = _mm512_fmadd_ps(v, v, squares);
    }
    const __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)d + eps));
    for (int64_t j = 0; j < d; j += 16) {
      const __m512 n = round_bf16(_mm512_mul_ps(bf16x16_to_float(row + j), r));
      _mm256_storeu_si256((__m256i*)(out + i * d + j),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(bf16x16_to_float(weight + j), n)));
    }
  }
}


// The step's rotary embedding and cache store in one pass over the projected rows: qkv [T, (H + 2 Hkv) * Dh]
// (query heads, then key heads, then value heads); cos and sin [T, Dh]. Writes the rotated queries to
// q_out [T, H, Dh], and for each of the w stored rows rows[i] its rotated keys and its values into the
// caches [S, Hkv, C, Dh] at slot slots[i], ring index ring[i]. Dh a multiple of 32.
void moe_rope_store_bf16(const uint16_t* qkv, int64_t tokens, int64_t heads, int64_t kv_heads, int64_t dh,
                         const uint16_t* cos, const uint16_t* sin, uint16_t* q_out, const int64_t* rows,
                         const int64_t* slots, const int64_t* ring, int64_t w, uint16_t* k_cache, uint16_t* v_cache,
                         int64_t capacity) {
  const int64_t width = (heads + 2 * kv_heads) * dh;
#pragma omp parallel for schedule(static) if (tokens >= kParallelRows)
  for (int64_t t = 0; t < tokens; t++)
    for (int64_t h = 0; h < heads; h++)
      rope_head(qkv + t * width + h * dh, cos + t * dh, sin + t * dh, dh, q_out + (t * heads + h) * dh);
#pragma omp parallel for schedule(static) if (w >= kParallelRows)
  for (int64_t i = 0; i < w; i++) {
    const int64_t t = rows[i];
    const uint16_t* keys = qkv + t * width + heads * dh;
    const uint16_t* values = keys + kv_heads * dh;
    for (int64_t h = 0; h < kv_heads; h++) {
      const int64_t at = ((slots[i] * kv_heads + h) * capacity + ring[i]) * dh;
      rope_head(keys + h * dh, cos + t * dh, sin + t * dh, dh, k_cache + at);
      memcpy(v_cache + at, values + h * dh, sizeof(uint16_t) * dh);
    }
  }
}

// Each float32 logit row's greedy token and log-normaliser: rows x [R, V] -> ids[r], the first index of the
// row's largest value, top[r], that value, and log_norm[r] = log(sum_j e^(x_j - top)), summed in float64, so
// that x_j's log-probability is x_j - top - log_norm (log_softmax's formula). Returns 0, or -1 when a row
// holds a NaN or an infinite largest value (the caller then computes them another way).
int moe_greedy_f32(const float* x, int64_t rows, int64_t vocab, int64_t* ids, float* top, float* log_norm) {
  int failed = 0;
#pragma omp parallel for schedule(static) if (rows >= 8)
  for (int64_t r = 0; r < rows; r++) {
    const float* row = x + r * vocab;
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i best_at = _mm512_set1_epi32(0);
    __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __mmask16 nan = 0;
    int64_t j = 0;
    for (; j + 16 <= vocab; j += 16) {
      const __m512 v = _mm512_loadu_ps(row + j);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __mmask16 greater = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);  // strictly: a lane keeps its first
      best = _mm512_mask_mov_ps(best, greater, v);
      best_at = _mm512_mask_mov_epi32(best_at, greater, at);
      at = _mm512_add_epi32(at, _mm512_set1_epi32(16));
    }
    float value = _mm512_reduce_max_ps(best);
    int64_t index = vocab;
    alignas(64) float lanes[16];
    alignas(64) int32_t lane_at[16];
    _mm512_store_ps(lanes, best);
    _mm512_store_si512((void*)lane_at, best_at);
    for (int l = 0; l < 16; l++)
      if (lanes[l] == value && lane_at[l] < index) index = lane_at[l];
    for (; j < vocab; j++) {  // the tail past the last whole vector
      if (row[j] != row[j]) nan = 1;
      if (row[j] > value) value = row[j], index = j;
    }
    if (nan || isinf(value)) {
#pragma omp atomic write
      failed = 1;
      continue;
    }
    __m512d sum_lo = _mm512_setzero_pd(), sum_hi = _mm512_setzero_pd();
    const __m512 shift = _mm512_set1_ps(value);
    for (j = 0; j + 16 <= vocab; j += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row + j), shift));
      sum_lo = _mm512_add_pd(sum_lo, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
      sum_hi = _mm512_add_pd(sum_hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
    }
    double sum = _mm512_reduce_add_pd(_mm512_add_pd(sum_lo, sum_hi));
    for (; j < vocab; j++) sum += exp((double)row[j] - value);
    ids[r] = index;
    top[r] = value;
    log_norm[r] = (float)log(sum);
  }
  return failed ? -1 : 0;
}


// One decoder layer's attention half for a decode step (one token per sequence),
// and the gate's logits, in one call: n = RMSNorm(x, norm1); qkv = n @ wqkv.T; rotary embedding, the keys'
// and values' store at ring[b] of slot slots[b], attention over the first nkeys ring entries (mask [T, nkeys]);
// x_out = x + attn @ wo.T; h = RMSNorm(x_out, norm2); logits = h @ gate.T ([T, gate_n], tiles). Each step is
// the kernel the separate calls use, so the bits are theirs. Returns 0, or -1 when scratch could not be had.
int moe_decode_block_bf16(const uint16_t* x, int64_t tokens, int64_t d, const uint16_t* norm1,
                          const uint16_t* norm2, float eps, const uint16_t* wqkv, const uint16_t* wo,
                          const uint16_t* gate, int64_t gate_n, int64_t heads, int64_t kv_heads, int64_t dh,
                          const uint16_t* cos, const uint16_t* sin, uint16_t* k_cache, uint16_t* v_cache,
                          int64_t capacity, const int64_t* slots, const int64_t* ring, const uint8_t* mask,
                          int64_t nkeys, float scale, uint16_t* x_out, uint16_t* h, uint16_t* logits) {
  const int64_t q_size = heads * dh, qkv_n = (heads + 2 * kv_heads) * dh;
  // Scratch rows start on cache lines, as torch's tensors do (a row across two lines slows every load of it).
  const auto lines = [tokens](int64_t width) { return (tokens * width + 31) / 32 * 32; };
  void* memory = NULL;
  if (posix_memalign(&memory, 64, sizeof(uint16_t) * (2 * lines(d) + lines(qkv_n) + 2 * lines(q_size))) != 0)
    memory = NULL;
  int64_t* rows = (int64_t*)malloc(sizeof(int64_t) * (tokens > 0 ? tokens : 1));
  if (memory == NULL || rows == NULL) {
    free(memory);
    free(rows);
    return -1;
  }
  uint16_t *normed = (uint16_t*)memory, *qkv = normed + lines(d), *q = qkv + lines(qkv_n), *attn = q + lines(q_size),
           *o = attn + lines(q_size);
  for (int64_t t = 0; t < tokens; t++) rows[t] = t;
  moe_rms_norm_bf16(x, norm1, normed, tokens, d, eps);
  moe_linear_bf16(normed, wqkv, qkv, tokens, qkv_n, d);
  moe_rope_store_bf16(qkv, tokens, heads, kv_heads, dh, cos, sin, q, rows, slots, ring, tokens, k_cache, v_cache,
                      capacity);
  int status = moe_decode_attention_bf16(q, k_cache, v_cache, slots, mask, attn, tokens, heads, kv_heads, capacity,
                                         dh, nkeys, scale);
  if (status == 0) {
    moe_linear_bf16(attn, wo, o, tokens, d, q_size);
#pragma omp parallel for schedule(static) if (tokens >= kParallelRows)
    for (int64_t t = 0; t < tokens; t++)
      for (int64_t j = 0; j < d; j += 16) {  // the residual: bf16(x + o), torch's bf16 add
        const __m512 sum = _mm512_add_ps(bf16x16_to_float(x + t * d + j), bf16x16_to_float(o + t * d + j));
        _mm256_storeu_si256((__m256i*)(x_out + t * d + j), (__m256i)_mm512_cvtneps_pbh(sum));
      }
    moe_rms_norm_bf16(x_out, norm2, h, tokens, d, eps);
    moe_linear_bf16(h, gate, logits, tokens, gate_n, d);
  }
  free(memory);
  free(rows);
  return status;
}

}  // extern "C"
