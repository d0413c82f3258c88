// The top-k search of a faiss IVF index for many queries at once (ivf_topk), for `index.KeyIndex`.
// It builds into the same extension as select.cpp, which binds it to Python and defines the
// selection helpers declared below.
//
// The k largest inner products of each query over the inverted lists it probes, in a faiss
// IndexIVFFlat: the IVF search of many queries at once. faiss's CPU search scans each query's
// lists on their own, one inner product at a time; attention sends hundreds of queries to each
// list, so here each list is scored once for all the queries probing it: by small fp32 GEMMs,
// or, on a CPU with AMX-BF16 (`use_amx`), on the tile unit in bf16x3 (see "AMX" below).
//   0. the probes: a query's lists in decreasing centroid inner product, at most nprobe, and
//      no more once they hold max_codes keys (max_codes > 0); as in faiss's IVF search, the list
//      that crosses max_codes is scanned up to it only (over its first keys).
//   1. a bar per query, from a sample of its best probes (an evenly strided <= kFirstKeys keys of
//      each, until sample_keys): its keys are spread over G >= 2k groups (in scan order, or by
//      key index on AMX) and the bar is the k-th largest group maximum, so at least k distinct
//      keys reach it. (On AMX both passes score a key alike, so the bar holds for pass 2's scores.)
//   2. all its probes: only scores above the bar are kept, in a buffer of 4k; a full buffer is
//      cut back to its best k, whose k-th score becomes the bar. Most scores fall below the bar,
//      and are skipped 16 at a time.
//   3. a final cut of each query's kept entries to its best k.
// (A bar from the exact top-k of the first probes cost more to select than the second pass saved.)
//   q (R, D) float32; centroids (nlist, D) float32; codes, ids, sizes (nlist,) int64: each list's
//   vectors (a float32 (size, D) array), ids (int64) and size, read from the index's
//   ArrayInvertedLists, and valid until the index is next added to.
// Returns values (R, k) and ids (R, k), in no particular order, (-inf, -1) in unfilled slots.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif
#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

// The selection's helpers, defined in select.cpp with these signatures.
namespace knn_patch {
void max_into(float* acc, const float* x, int64_t m);                              // acc = max(acc, x)
std::pair<float, float> min_max(const float* x, int64_t n);                        // of x[0..n), n >= 1
float kth_largest(const float* v, int64_t n, int64_t k, std::vector<float>& tmp);  // of v[0..n), 1 <= k <= n
}  // namespace knn_patch

using knn_patch::kth_largest;
using knn_patch::max_into;
using knn_patch::min_max;

namespace {

using Entry = std::pair<float, int64_t>;  // (score, list or key id)

// "a ranks above b": larger score, or equal score and lower id, as in select.cpp's selection.
constexpr auto ranks_above = [](const Entry& a, const Entry& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
};

}  // namespace

namespace {

constexpr int64_t kFirstKeys = 256;  // pass 1 samples at most this many keys of a list

// The step and count of an evenly strided sample of at most `limit` of a list's n keys.
inline std::pair<int64_t, int64_t> strided(int64_t n, int64_t limit) {
  const int64_t step = n > limit ? (n + limit - 1) / limit : 1;
  return {step, (n + step - 1) / step};
}

// Buffers of `best_lists`.
struct ListPicker {
  static constexpr int64_t kBuckets = 64;
  std::vector<float> score;
  std::vector<int64_t> count, weight, edge_at;
  std::vector<uint8_t> bucket;
  std::vector<Entry> edge;
};

// The first j of lists[0..n) in ranks_above's order of (score[list], list), written to out in
// any order but one: when the budget ends the choice, out[j - 1] is the list that reached it. j is
// the smallest with j == cap, or weight(out[0..j)) >= budget when budget > 0, or n. The lists are
// bucketed by score, so that only the bucket where j falls is sorted: O(n), with branch-free
// loops (this runs for every query over every list).
template <class Weight>
int64_t best_lists(const float* score, const int64_t* lists, int64_t n, int64_t cap, int64_t budget,
                   Weight&& weight, int64_t* out, ListPicker& ws) {
  constexpr int64_t nb = ListPicker::kBuckets;
  if (n == 0 || cap == 0) return 0;
  ws.score.resize(n);
  ws.bucket.resize(n);
  ws.edge_at.resize(n);
  float* sc = ws.score.data();
  for (int64_t i = 0; i < n; ++i) sc[i] = score[lists[i]];
  const auto [lo, hi] = min_max(sc, n);
  const float scale = hi > lo ? nb / (hi - lo) : 0.0f;  // bucket 0 holds the best scores
  ws.count.assign(nb, 0);
  ws.weight.assign(nb, 0);
  uint8_t* bucket = ws.bucket.data();
  for (int64_t i = 0; i < n; ++i) {
    const auto b = static_cast<int64_t>((hi - sc[i]) * scale);
    bucket[i] = static_cast<uint8_t>(b < nb - 1 ? b : nb - 1);
  }
  for (int64_t i = 0; i < n; ++i) {
    ++ws.count[bucket[i]];
    ws.weight[bucket[i]] += weight(lists[i]);
  }
  int64_t edge = 0, j = 0, w = 0;  // the bucket where j falls; lists and weight before it
  for (; edge < nb; ++edge) {
    if (j + ws.count[edge] >= cap || (budget > 0 && w + ws.weight[edge] >= budget)) break;
    j += ws.count[edge];
    w += ws.weight[edge];
  }
  int64_t taken = 0, at_edge = 0;
  int64_t* edge_at = ws.edge_at.data();
  for (int64_t i = 0; i < n; ++i) {
    out[taken] = lists[i];
    taken += bucket[i] < edge;
    edge_at[at_edge] = i;
    at_edge += bucket[i] == edge;
  }
  ws.edge.resize(at_edge);
  for (int64_t e = 0; e < at_edge; ++e) ws.edge[e] = {sc[edge_at[e]], lists[edge_at[e]]};
  std::sort(ws.edge.begin(), ws.edge.end(), ranks_above);
  for (int64_t e = 0; e < at_edge && taken < cap && !(budget > 0 && w >= budget); ++e) {
    out[taken++] = ws.edge[e].second;
    w += weight(ws.edge[e].second);
  }
  return taken;
}

// Row r's kept entries (vals, ids, *count, its bar): cut back to its k best (in ranks_above's
// order), the k-th of which becomes the bar. Needs *count >= k.
void cut_to_k(float* vals, int64_t* ids, int64_t* count, float* bar, int64_t k, std::vector<float>& tmp,
              std::vector<int64_t>& ties) {
  const int64_t n = *count;
  const float tau = kth_largest(vals, n, k, tmp);
  int64_t w = 0;
  ties.clear();
  for (int64_t t = 0; t < n; ++t) {  // w <= t: each entry is read before it can be overwritten
    if (vals[t] > tau) {
      vals[w] = vals[t];
      ids[w++] = ids[t];
    } else if (vals[t] == tau) {
      ties.push_back(ids[t]);
    }
  }
  std::sort(ties.begin(), ties.end());  // among equal scores the lower id ranks above
  for (int64_t t = 0; w < k; ++t) {
    vals[w] = tau;
    ids[w++] = ties[t];
  }
  *count = k;
  *bar = tau;
}

// A score above *bar joins the row's kept entries (vals, ids, *count) with its key id; at cap entries
// they are cut back to the best k. Returns whether that moved the bar.
inline bool keep(float score, int64_t id, int64_t k, int64_t cap, float* bar, float* vals, int64_t* ids,
                 int64_t* count, std::vector<float>& tmp, std::vector<int64_t>& ties) {
  vals[*count] = score;
  ids[*count] = id;
  if (++*count < cap) return false;
  cut_to_k(vals, ids, count, bar, k, tmp, ties);
  return true;
}

// The scores s[0..w) above *bar are kept (`keep`) with their key ids.
void keep_above(const float* s, const int64_t* key_ids, int64_t w, int64_t k, int64_t cap, float* bar, float* vals,
                int64_t* ids, int64_t* count, std::vector<float>& tmp, std::vector<int64_t>& ties) {
  float b = *bar;
  int64_t c = *count;
  auto offer = [&](int64_t j) { keep(s[j], key_ids[j], k, cap, &b, vals, ids, &c, tmp, ties); };
  int64_t j = 0;
#if defined(__SSE2__)
  for (; j + 16 <= w; j += 16) {
    const __m128 bb = _mm_set1_ps(b);
    unsigned bits = _mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(s + j), bb)) |
                    _mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(s + j + 4), bb)) << 4 |
                    _mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(s + j + 8), bb)) << 8 |
                    _mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(s + j + 12), bb)) << 12;
    for (; bits; bits &= bits - 1) {
      const int64_t t = j + __builtin_ctz(bits);
      if (s[t] > b) offer(t);  // a cut inside this group may have raised the bar
    }
  }
#endif
  for (; j < w; ++j)
    if (s[j] > b) offer(j);
  *bar = b;
  *count = c;
}

// ---- Both passes on AMX (Intel's tile unit: Sapphire Rapids and later) ----
// Each fp32 x is split into bf16 hi = round(x) and lo = round(x - hi), and q.k is taken as
// qh.kh + qh.kl + ql.kh ("bf16x3"), accumulated in fp32 by the tile unit: what it drops, ql.kl and
// lo's rounding, is ~3 * 2^-18 of |q_i k_i| per term, so the scores are within ~1e-5 * |q| |k| of
// fp32's, the order of fp32's own rounding over D terms. A 16 x 16 block of (key, query) scores
// costs 3 tile products per 32 dimensions.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define KNN_PATCH_AMX 1
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

// Whether this CPU has AMX-BF16 and AVX512-BF16 and Linux lets this process use the tile state
// (asked once, as oneDNN does).
bool amx_usable() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = d >> 24 & 1, bf16 = d >> 22 & 1, avx512 = (b >> 16 & 1) && (b >> 30 & 1);  // F, BW
    if (!tile || !bf16 || !avx512 || !__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a >> 5 & 1)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile used is 16 rows of 64 bytes: 16 x 32 bf16, or 16 x 16 fp32. (Static: GCC's
// _tile_loadconfig tells the compiler it reads 8 bytes, which let it drop the stores to a local.)
AMX_TARGET void amx_begin() {
  static const TileConfig cfg = [] {
    TileConfig c;
    for (int t = 0; t < 8; ++t) {
      c.rows[t] = 16;
      c.colsb[t] = 64;
    }
    return c;
  }();
  _tile_loadconfig(&cfg);
}

AMX_TARGET void amx_end() { _tile_release(); }

// Rows x (n, d) fp32, `stride` floats apart, as bf16 hi and lo rows (n, dpad), dpad a multiple of
// 32, zero beyond d.
AMX_TARGET void split_rows(const float* x, int64_t n, int64_t stride, int64_t d, int64_t dpad, uint16_t* hi,
                           uint16_t* lo) {
  const __m512i half = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1), top = _mm512_set1_epi32(-65536);
  for (int64_t i = 0; i < n; ++i, x += stride, hi += dpad, lo += dpad) {
    for (int64_t c = 0; c < dpad; c += 32) {
      __m512 h[2], l[2];
      for (int t = 0; t < 2; ++t) {
        const int64_t left = std::clamp<int64_t>(d - c - 16 * t, 0, 16);
        const __m512 v = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << left) - 1), x + c + 16 * t);
        const __m512i u = _mm512_castps_si512(v);  // rounded to nearest even at 16 bits, as fp32
        const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
        h[t] = _mm512_castsi512_ps(_mm512_and_si512(r, top));
        l[t] = _mm512_sub_ps(v, h[t]);
      }
      _mm512_storeu_si512(hi + c, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(h[1], h[0])));
      _mm512_storeu_si512(lo + c, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(l[1], l[0])));
    }
  }
}

// out[c][j] = row j's 32-bit word c, for 16 rows of 16 words at x + rows[j] * stride (bf16 units).
AMX_TARGET void transpose16(const uint16_t* x, const int32_t* rows, int64_t stride, uint32_t* out) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    const __m512i a = _mm512_loadu_si512(x + rows[2 * i] * stride), b = _mm512_loadu_si512(x + rows[2 * i + 1] * stride);
    t[2 * i] = _mm512_unpacklo_epi32(a, b);
    t[2 * i + 1] = _mm512_unpackhi_epi32(a, b);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + j], 128-bit lane L: word 4L + j of rows 4i .. 4i + 3
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88), v1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xDD);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88),
                  v3 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xDD);
    _mm512_storeu_si512(out + 16 * j, _mm512_shuffle_i32x4(v0, v2, 0x88));
    _mm512_storeu_si512(out + 16 * (j + 8), _mm512_shuffle_i32x4(v0, v2, 0xDD));
    _mm512_storeu_si512(out + 16 * (j + 4), _mm512_shuffle_i32x4(v1, v3, 0x88));
    _mm512_storeu_si512(out + 16 * (j + 12), _mm512_shuffle_i32x4(v1, v3, 0xDD));
  }
}

// A std::allocator whose storage starts on a 64-byte boundary: tile rows then never straddle cache lines.
template <class T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <class U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t{64}); }
  template <class U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <class U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};
template <class T>
using TileVector = std::vector<T, Aligned64<T>>;

// Buffers of one thread's AMX scans.
struct AmxScan {
  int64_t dpad = 0;
  TileVector<uint16_t> qhi, qlo;  // the chunk's queries, split: (rows, dpad)
  TileVector<uint16_t> khi, klo;  // a list's keys, split: (n rounded up to 32, dpad), zero past n
  TileVector<uint32_t> bhi, blo;  // 16 queries as tile B: dpad / 32 tiles of 16 dimension pairs x 16 queries
  TileVector<float> gm;  // pass 1: (groups, 16 queries) group maxima
  alignas(64) float c[2 * 16 * 16];  // two tiles of scores: 32 keys x 16 queries
  float hit_score[32 * 16 + 16];  // pass 2: a block's scores above the bar, their query rows and keys
  int32_t hit_row[32 * 16 + 16], hit_key[32 * 16 + 16];
};

// The list's n keys (rows of d floats, `stride` floats apart) into s.khi / s.klo, zero-padded to a
// multiple of 32 rows.
AMX_TARGET void amx_pack_keys(const float* keys, int64_t n, int64_t stride, int64_t d, AmxScan& s) {
  const int64_t npad = (n + 31) / 32 * 32;
  s.khi.resize(npad * s.dpad);
  s.klo.resize(npad * s.dpad);
  split_rows(keys, n, stride, d, s.dpad, s.khi.data(), s.klo.data());
  std::fill(s.khi.begin() + n * s.dpad, s.khi.end(), 0);
  std::fill(s.klo.begin() + n * s.dpad, s.klo.end(), 0);
}

// Queries row_of[0..16) (split in s.qhi / s.qlo) as tiles B in s.bhi / s.blo: their dimension pairs, transposed.
AMX_TARGET void amx_pack_queries(const int32_t* row_of, AmxScan& s) {
  s.bhi.resize(s.dpad * 8);
  s.blo.resize(s.dpad * 8);
  for (int64_t h = 0; h < s.dpad / 32; ++h) {
    transpose16(s.qhi.data() + 32 * h, row_of, s.dpad, s.bhi.data() + 256 * h);
    transpose16(s.qlo.data() + 32 * h, row_of, s.dpad, s.blo.data() + 256 * h);
  }
}

// Up to 64 dimensions the packed queries stay in tiles 2-5 (B hi and lo of dimensions 0-31, then
// 32-63) while their keys stream through tiles 6-7: 8 tile loads per 12 products against 12 when
// every block reloads them (loads and products overlap badly on the tile unit).
AMX_TARGET void amx_hold_queries(const AmxScan& s) {
  if (s.dpad > 64) return;
  _tile_loadd(2, s.bhi.data(), 64);
  _tile_loadd(3, s.blo.data(), 64);
  if (s.dpad == 64) {
    _tile_loadd(4, s.bhi.data() + 256, 64);
    _tile_loadd(5, s.blo.data() + 256, 64);
  }
}

// s.c = the scores of packed keys g .. g + 31 (rows) against the packed queries (columns): per 32
// dimensions, C += kh.qh + kh.ql + kl.qh in tiles 0 (keys g..) and 1 (keys g + 16..).
AMX_TARGET void amx_score(int64_t g, AmxScan& s) {
  const int64_t dpad = s.dpad, bytes = dpad * 2;  // per key row
  const uint16_t* kh = s.khi.data() + g * dpad;
  const uint16_t* kl = s.klo.data() + g * dpad;
  _tile_zero(0);
  _tile_zero(1);
  if (dpad <= 64) {  // queries held in tiles 2-5
    _tile_loadd(6, kh, bytes);
    _tile_loadd(7, kh + 16 * dpad, bytes);
    _tile_dpbf16ps(0, 6, 2);
    _tile_dpbf16ps(1, 7, 2);
    _tile_dpbf16ps(0, 6, 3);
    _tile_dpbf16ps(1, 7, 3);
    _tile_loadd(6, kl, bytes);
    _tile_loadd(7, kl + 16 * dpad, bytes);
    _tile_dpbf16ps(0, 6, 2);
    _tile_dpbf16ps(1, 7, 2);
    if (dpad == 64) {
      _tile_loadd(6, kh + 32, bytes);
      _tile_loadd(7, kh + 16 * dpad + 32, bytes);
      _tile_dpbf16ps(0, 6, 4);
      _tile_dpbf16ps(1, 7, 4);
      _tile_dpbf16ps(0, 6, 5);
      _tile_dpbf16ps(1, 7, 5);
      _tile_loadd(6, kl + 32, bytes);
      _tile_loadd(7, kl + 16 * dpad + 32, bytes);
      _tile_dpbf16ps(0, 6, 4);
      _tile_dpbf16ps(1, 7, 4);
    }
  } else {
    for (int64_t h = 0; h < dpad / 32; ++h) {
      _tile_loadd(2, s.bhi.data() + h * 256, 64);
      _tile_loadd(3, s.blo.data() + h * 256, 64);
      _tile_loadd(4, kh + h * 32, bytes);
      _tile_loadd(5, kl + h * 32, bytes);
      _tile_loadd(6, kh + 16 * dpad + h * 32, bytes);
      _tile_loadd(7, kl + 16 * dpad + h * 32, bytes);
      _tile_dpbf16ps(0, 4, 2);
      _tile_dpbf16ps(1, 6, 2);
      _tile_dpbf16ps(0, 4, 3);
      _tile_dpbf16ps(1, 6, 3);
      _tile_dpbf16ps(0, 5, 2);
      _tile_dpbf16ps(1, 7, 2);
    }
  }
  _tile_stored(0, s.c, 64);
  _tile_stored(1, s.c + 256, 64);
}

// row_of[0..16): the queries rows[a..a + m), m = min(16, nq - a), then the last repeated.
inline int64_t query_tile(const int64_t* rows, int64_t a, int64_t nq, int32_t* row_of) {
  const int64_t m = std::min<int64_t>(16, nq - a);
  for (int64_t j = 0; j < 16; ++j) row_of[j] = static_cast<int32_t>(rows[a + std::min(j, m - 1)]);
  return m;
}

// Pass 1 of one list on AMX: its n sampled keys (rows `stride` floats apart) against its queries
// rows[0..nq) (chunk rows, split in s.qhi / s.qlo); key j's score goes to group j % groups of its
// query, gmax[r * groups + j % groups] (groups a multiple of 16).
AMX_TARGET void amx_sample_list(const float* keys, int64_t n, int64_t stride, int64_t d, const int64_t* rows,
                                int64_t nq, int64_t groups, float* gmax, AmxScan& s) {
  amx_pack_keys(keys, n, stride, d, s);
  s.gm.resize(groups * 16);
  alignas(64) int32_t row_of[16], iota[16];
  for (int j = 0; j < 16; ++j) iota[j] = j;
  const int64_t used = std::min(groups, n);  // groups that get a key
  for (int64_t a = 0; a < nq; a += 16) {
    const int64_t m = query_tile(rows, a, nq, row_of);
    amx_pack_queries(row_of, s);
    amx_hold_queries(s);
    std::fill(s.gm.begin(), s.gm.begin() + used * 16, -std::numeric_limits<float>::infinity());
    for (int64_t g = 0; g < n; g += 32) {
      amx_score(g, s);
      for (int64_t i = 0, last = std::min<int64_t>(32, n - g); i < last; ++i) {
        float* gm = s.gm.data() + (g + i) % groups * 16;  // group (g + i) % groups, all 16 queries
        _mm512_storeu_ps(gm, _mm512_max_ps(_mm512_loadu_ps(gm), _mm512_load_ps(s.c + 16 * i)));
      }
    }
    for (int64_t g0 = 0; g0 < used; g0 += 16) {  // s.gm (groups, 16 queries) -> each query's groups
      alignas(64) uint32_t t[256];
      transpose16(reinterpret_cast<const uint16_t*>(s.gm.data() + g0 * 16), iota, 32, t);
      const auto mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, used - g0)) - 1);
      for (int64_t j = 0; j < m; ++j) {
        float* out = gmax + row_of[j] * groups + g0;
        const __m512 mine = _mm512_castsi512_ps(_mm512_load_si512(t + 16 * j));
        _mm512_mask_storeu_ps(out, mask, _mm512_max_ps(_mm512_maskz_loadu_ps(mask, out), mine));
      }
    }
  }
}

// Pass 2 of one list on AMX: its n keys (rows of d floats) against its queries rows[0..nq). Row r
// sees keys j < limit(r) only, and offer(r, score, j) gets each score above bar[r], returning
// whether it moved the bar.
template <class Limit, class Offer>
AMX_TARGET void amx_scan_list(const float* keys, int64_t n, int64_t d, const int64_t* rows, int64_t nq,
                              const float* bar, AmxScan& s, Limit&& limit, Offer&& offer) {
  amx_pack_keys(keys, n, d, d, s);
  for (int64_t a = 0; a < nq; a += 16) {
    alignas(64) int32_t row_of[16], lim[16];
    const int64_t m = query_tile(rows, a, nq, row_of);
    for (int64_t j = 0; j < 16; ++j) lim[j] = j < m ? static_cast<int32_t>(limit(row_of[j])) : 0;  // lanes past m see no key
    amx_pack_queries(row_of, s);
    amx_hold_queries(s);
    const __m512i row_v = _mm512_load_si512(row_of), lim_v = _mm512_load_si512(lim);
    __m512 bar_v = _mm512_i32gather_ps(row_v, bar, 4);
    for (int64_t g = 0; g < n; g += 32) {
      amx_score(g, s);
      // the scores above the bar, packed without a branch per key (a third of the keys have one)
      int64_t found = 0;
      for (int64_t i = 0, last = std::min<int64_t>(32, n - g); i < last; ++i) {
        const __m512i j = _mm512_set1_epi32(static_cast<int32_t>(g + i));
        const __m512 score = _mm512_load_ps(s.c + 16 * i);
        const __mmask16 hit = _mm512_cmp_ps_mask(score, bar_v, _CMP_GT_OQ) & _mm512_cmpgt_epi32_mask(lim_v, j);
        _mm512_storeu_ps(s.hit_score + found, _mm512_maskz_compress_ps(hit, score));
        _mm512_storeu_si512(s.hit_row + found, _mm512_maskz_compress_epi32(hit, row_v));
        _mm512_storeu_si512(s.hit_key + found, j);
        found += __builtin_popcount(hit);
      }
      bool moved = false;
      for (int64_t e = 0; e < found; ++e)  // a cut may have raised a row's bar since
        if (s.hit_score[e] > bar[s.hit_row[e]]) moved |= offer(s.hit_row[e], s.hit_score[e], s.hit_key[e]);
      if (moved) bar_v = _mm512_i32gather_ps(row_v, bar, 4);
    }
  }
}
#else
bool amx_usable() { return false; }
#endif

}  // namespace

bool amx_available() { return amx_usable(); }

// ivf_topk's per-thread buffers.
struct IvfBuffers {
  std::vector<float> qbuf, sbuf, vals, bar, gmax, cscore, tmp;
  std::vector<int64_t> kept_ids, count, next_group, start, fill, by_list, probes, n_probes, n_first, picked, cut_list,
      cut_keys, ties;
  std::vector<char> in_first;
  ListPicker picker;
#ifdef KNN_PATCH_AMX
  AmxScan tiles;
#endif
};

std::vector<torch::Tensor> ivf_topk(torch::Tensor q, torch::Tensor centroids, torch::Tensor codes, torch::Tensor ids,
                                    torch::Tensor sizes, int64_t k, int64_t nprobe, int64_t max_codes,
                                    bool use_amx) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kFloat32,
              "q must be a contiguous (R, D) float32 tensor");
  TORCH_CHECK(centroids.dim() == 2 && centroids.size(0) == sizes.numel() && centroids.size(1) == q.size(1) &&
                  centroids.scalar_type() == torch::kFloat32,
              "centroids must be a (nlist, D) float32 tensor");
  const int64_t rows = q.size(0), dim = q.size(1), nlist = sizes.numel();
  nprobe = std::min(nprobe, nlist);
  const int64_t sample_keys = 16 * k;  // pass 1's keys per query
  auto out_v = torch::full({rows, k}, -std::numeric_limits<float>::infinity(), q.options());
  auto out_i = torch::full({rows, k}, -1, q.options().dtype(torch::kInt64));
  const float* qp = q.data_ptr<float>();
  const int64_t* code_ptr = codes.data_ptr<int64_t>();
  const int64_t* id_ptr = ids.data_ptr<int64_t>();
  const int64_t* size = sizes.data_ptr<int64_t>();
  float* ov = out_v.data_ptr<float>();
  int64_t* oi = out_i.data_ptr<int64_t>();
  constexpr int64_t kRowTile = 128, kColTile = 512;
  // kept entries per query before a cut back to k: 4k keeps every query's entries of a call in L2
  // (1.5 KB each at k = 32), where 16k spilled them to memory
  const int64_t cap = 4 * k;
  const int64_t groups = (2 * k + 15) / 16 * 16;  // G of pass 1
  std::vector<int64_t> all_lists(nlist);
  for (int64_t l = 0; l < nlist; ++l) all_lists[l] = l;
  // Threads take disjoint query chunks; a chunk holds enough queries that every list it probes
  // is scored by one GEMM of many rows.
  const int64_t chunk = std::max<int64_t>(256, (rows + at::get_num_threads() - 1) / at::get_num_threads());
  const int64_t dpad = (dim + 31) / 32 * 32;
  // both passes on AMX when asked and present (a query tile holds its chunk row numbers as int32)
  const bool amx = use_amx && amx_usable() && chunk < std::numeric_limits<int32_t>::max();
  at::parallel_for(0, (rows + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
    at::NoGradGuard no_grad;
    // Each thread keeps its buffers across calls (attention calls this for every block: fresh
    // buffers of megabytes cost page faults and zero-filling each time); every element is
    // written before it is read, and in_first is all zero between uses. They are reached through a
    // pointer: with the thread_local object itself, GCC recomputed its address (a __tls_get_addr
    // call) inside the hot loops, and in the AMX helpers it cloned for that constant address.
    static thread_local std::unique_ptr<IvfBuffers> buffers;
    if (!buffers) buffers = std::make_unique<IvfBuffers>();
    IvfBuffers& b = *buffers;
#ifdef KNN_PATCH_AMX
    AmxScan& tiles = b.tiles;
    if (amx) {
      tiles.dpad = dpad;
      tiles.qhi.resize(chunk * dpad);
      tiles.qlo.resize(chunk * dpad);
    }
#endif
    b.qbuf.resize(kRowTile * dim);
    b.sbuf.resize(kRowTile * kColTile);
    b.vals.resize(chunk * cap);
    b.kept_ids.resize(chunk * cap);
    b.gmax.resize(chunk * groups);
    b.cscore.resize(chunk * nlist);
    b.probes.resize(chunk * nprobe);
    for (auto* v : {&b.count, &b.next_group, &b.n_probes, &b.n_first, &b.cut_list, &b.cut_keys}) v->resize(chunk);
    b.bar.resize(chunk);
    b.start.resize(nlist + 1);
    b.fill.resize(nlist);
    b.picked.resize(nprobe);
    b.in_first.resize(nlist, 0);
    auto &qbuf = b.qbuf, &sbuf = b.sbuf, &vals = b.vals, &bar = b.bar, &gmax = b.gmax, &cscore = b.cscore;
    // probes[r * nprobe ..] holds query r's n_probes[r] lists, the n_first[r] sampled by pass 1 first
    auto &kept_ids = b.kept_ids, &count = b.count, &next_group = b.next_group, &start = b.start, &fill = b.fill,
         &by_list = b.by_list, &probes = b.probes, &n_probes = b.n_probes, &n_first = b.n_first, &picked = b.picked,
         &cut_list = b.cut_list, &cut_keys = b.cut_keys;
    auto &in_first = b.in_first;
    auto &tmp = b.tmp;
    auto &ties = b.ties;
    ListPicker& picker = b.picker;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * chunk, nr = std::min(rows, r0 + chunk) - r0;
      auto cs = torch::from_blob(cscore.data(), {nr, nlist}, q.options());
      at::mm_out(cs, q.narrow(0, r0, nr), centroids.t());
      for (int64_t r = 0; r < nr; ++r) {
        int64_t* pr = probes.data() + r * nprobe;
        const float* score = cscore.data() + r * nlist;
        const int64_t np = best_lists(score, all_lists.data(), nlist, nprobe, max_codes,
                                      [&](int64_t l) { return size[l]; }, picked.data(), picker);
        // the list that crossed max_codes (last in `picked`) is scanned up to it only
        int64_t total = 0;
        for (int64_t i = 0; i < np; ++i) total += size[picked[i]];
        const bool cut = max_codes > 0 && total > max_codes;  // then picked[np - 1] crossed it
        cut_list[r] = cut ? picked[np - 1] : -1;
        cut_keys[r] = cut ? size[picked[np - 1]] - (total - max_codes) : 0;
        // pass 1 samples the best whole lists
        const int64_t nf = best_lists(score, picked.data(), np - cut, np - cut, sample_keys,
                                      [&](int64_t l) { return std::min(size[l], kFirstKeys); }, pr, picker);
        for (int64_t p = 0; p < nf; ++p) in_first[pr[p]] = 1;
        int64_t p = nf;
        for (int64_t i = 0; i < np; ++i)
          if (!in_first[picked[i]]) pr[p++] = picked[i];
        for (int64_t i = 0; i < nf; ++i) in_first[pr[i]] = 0;
        n_probes[r] = np;
        n_first[r] = nf;
      }
      // Score each query r's probes p < n[r], list by list, over an evenly strided `limit` keys of
      // each list at most: on_tile(r, l, j0, s, w, key_ids) gets the scores s[0..w) of list l's
      // keys j0 .. j0 + w - 1 scored for query r, and (when the list is not strided) their ids.
      // by_list[start[l] .. start[l + 1]) = the queries r with l among their first n[r] probes
      auto group = [&](const std::vector<int64_t>& n) {
        std::fill(start.begin(), start.end(), 0);
        for (int64_t r = 0; r < nr; ++r)
          for (int64_t p = 0; p < n[r]; ++p) ++start[probes[r * nprobe + p] + 1];
        for (int64_t l = 0; l < nlist; ++l) start[l + 1] += start[l];
        std::copy(start.begin(), start.end() - 1, fill.begin());
        by_list.resize(start[nlist]);
        for (int64_t r = 0; r < nr; ++r)
          for (int64_t p = 0; p < n[r]; ++p) by_list[fill[probes[r * nprobe + p]]++] = r;
      };
      auto scan = [&](const std::vector<int64_t>& n, int64_t limit, auto&& on_tile) {
        group(n);
        for (int64_t l = 0; l < nlist; ++l) {
          const auto [step, n_keys] = strided(size[l], limit);
          auto* keys = reinterpret_cast<float*>(code_ptr[l]);
          const auto* key_ids = reinterpret_cast<const int64_t*>(id_ptr[l]);
          for (int64_t a = start[l]; a < start[l + 1] && n_keys > 0; a += kRowTile) {
            const int64_t m = std::min(kRowTile, start[l + 1] - a);
            for (int64_t i = 0; i < m; ++i) std::copy_n(qp + (r0 + by_list[a + i]) * dim, dim, qbuf.data() + i * dim);
            auto qt = torch::from_blob(qbuf.data(), {m, dim}, q.options());
            for (int64_t j0 = 0; j0 < n_keys; j0 += kColTile) {
              const int64_t w = std::min(kColTile, n_keys - j0);
              auto s = torch::from_blob(sbuf.data(), {m, w}, q.options());
              at::mm_out(s, qt, torch::from_blob(keys + j0 * step * dim, {w, dim}, {step * dim, 1}, q.options()).t());
              for (int64_t i = 0; i < m; ++i) on_tile(by_list[a + i], l, j0, sbuf.data() + i * w, w, key_ids + j0);
            }
          }
        }
      };

      // pass 1: each query's sampled keys are spread over its groups
      std::fill(gmax.begin(), gmax.end(), -std::numeric_limits<float>::infinity());
#ifdef KNN_PATCH_AMX
      if (amx) {
        split_rows(qp + r0 * dim, nr, dim, dim, dpad, tiles.qhi.data(), tiles.qlo.data());
        amx_begin();
        group(n_first);
        for (int64_t l = 0; l < nlist; ++l) {
          if (start[l] == start[l + 1]) continue;
          const auto [step, n_keys] = strided(size[l], kFirstKeys);
          amx_sample_list(reinterpret_cast<const float*>(code_ptr[l]), n_keys, step * dim, dim,
                          by_list.data() + start[l], start[l + 1] - start[l], groups, gmax.data(), tiles);
        }
      }
#endif
      if (!amx) {
        std::fill(next_group.begin(), next_group.end(), 0);
        scan(n_first, kFirstKeys, [&](int64_t r, int64_t, int64_t, const float* s, int64_t w, const int64_t*) {
          float* g = gmax.data() + r * groups;
          for (int64_t t = 0; t < w;) {  // vectorised: runs of consecutive groups
            const int64_t at = next_group[r], n = std::min(groups - at, w - t);
            max_into(g + at, s + t, n);
            t += n;
            next_group[r] = (at + n) % groups;
          }
        });
      }
      for (int64_t r = 0; r < nr; ++r) {
        float* g = gmax.data() + r * groups;
        bar[r] = std::nextafter(kth_largest(g, groups, k, tmp), -std::numeric_limits<float>::infinity());  // it passes
        count[r] = 0;
      }
      // pass 2
#ifdef KNN_PATCH_AMX
      if (amx) {
        group(n_probes);
        for (int64_t l = 0; l < nlist; ++l) {
          if (start[l] == start[l + 1]) continue;
          const auto* key_ids = reinterpret_cast<const int64_t*>(id_ptr[l]);
          amx_scan_list(
              reinterpret_cast<const float*>(code_ptr[l]), size[l], dim, by_list.data() + start[l],
              start[l + 1] - start[l], bar.data(), tiles,
              [&](int64_t r) { return l == cut_list[r] ? cut_keys[r] : size[l]; },
              [&](int64_t r, float score, int64_t j) {
                return keep(score, key_ids[j], k, cap, &bar[r], vals.data() + r * cap, kept_ids.data() + r * cap,
                            &count[r], tmp, ties);
              });
        }
        amx_end();
      }
#endif
      if (!amx)
        scan(n_probes, std::numeric_limits<int64_t>::max(), [&](int64_t r, int64_t l, int64_t j0, const float* s,
                                                                int64_t w, const int64_t* key_ids) {
          if (l == cut_list[r]) w = std::min(w, cut_keys[r] - j0);
          if (w > 0)
            keep_above(s, key_ids, w, k, cap, &bar[r], vals.data() + r * cap, kept_ids.data() + r * cap,
                       &count[r], tmp, ties);
        });
      for (int64_t r = 0; r < nr; ++r) {
        if (count[r] > k)
          cut_to_k(vals.data() + r * cap, kept_ids.data() + r * cap, &count[r], &bar[r], k, tmp, ties);
        std::copy_n(vals.data() + r * cap, count[r], ov + (r0 + r) * k);
        std::copy_n(kept_ids.data() + r * cap, count[r], oi + (r0 + r) * k);
      }
    }
  });
  return {out_v, out_i};
}
