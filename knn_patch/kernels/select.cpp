// The compiled parts of the `topk` kernel: exact per-row top-k selection of score blocks, the
// `tail` estimator's uniform sample of the keys outside a row's top-k (tail_sample), and both fused
// with the scoring of query blocks (scores_topk). The IVF search lives in ivf.cpp; both files build
// one extension (select.py), whose module is defined at the end of this file.
//
// Selection. torch.topk on CPU copies every row into a vector of (value, index) pairs before
// selecting; attention has many short rows, where that fixed cost per row and element dominates.
// Here each row of n scores is cut into g segments of m = ceil(n / g) and:
//   1. group j = {j, j + m, j + 2m, ...}: the group maxima are an elementwise max of the
//      segments, one vectorised pass over the row (strided groups rather than contiguous blocks,
//      which would need a horizontal max per block);
//   2. tau = the k-th largest group maximum. At least k scores are >= tau (one per such group),
//      so every score of the true top-k is >= tau and lies in a group whose maximum is >= tau.
//      Only those groups' scores >= tau are collected (at most g * k), and their top-k is taken.
// g is the largest of 16, 8, 4, 2, 1 leaving m >= 4k groups, so tau prunes well.
//
// Ties keep the lower index, so the result is deterministic. Scores of -inf are masked keys and
// never selected; unfilled slots come back as (-inf, 0).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace {

using Entry = std::pair<float, int64_t>;

// "a ranks above b": larger score, or equal score and lower index; the order of every selection.
// (An object, not a function: the sorts inline it.)
constexpr auto ranks_above = [](const Entry& a, const Entry& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
};

}  // namespace

// ---- Helpers shared with the IVF search (ivf.cpp declares them) ----

namespace knn_patch {

// acc[0..m) = max(acc, x[0..m)), elementwise.
void max_into(float* acc, const float* x, int64_t m) {
  int64_t j = 0;
#if defined(__SSE2__)
  for (; j + 4 <= m; j += 4) _mm_storeu_ps(acc + j, _mm_max_ps(_mm_loadu_ps(acc + j), _mm_loadu_ps(x + j)));
#endif
  for (; j < m; ++j) acc[j] = std::max(acc[j], x[j]);
}

// The smallest and largest of x[0..n), n >= 1.
std::pair<float, float> min_max(const float* x, int64_t n) {
  float lo = x[0], hi = x[0];
  int64_t i = 0;
#if defined(__SSE2__)
  if (n >= 4) {
    __m128 vlo = _mm_loadu_ps(x), vhi = vlo;
    for (i = 4; i + 4 <= n; i += 4) {
      const __m128 v = _mm_loadu_ps(x + i);
      vlo = _mm_min_ps(vlo, v);
      vhi = _mm_max_ps(vhi, v);
    }
    float l[4], h[4];
    _mm_storeu_ps(l, vlo);
    _mm_storeu_ps(h, vhi);
    lo = std::min({l[0], l[1], l[2], l[3]});
    hi = std::max({h[0], h[1], h[2], h[3]});
  }
#endif
  for (; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  return {lo, hi};
}

// The k-th largest of v[0..n), 1 <= k <= n, no NaN: the values are bucketed between their minimum and
// maximum (branch-free), and only the bucket holding the k-th is partially sorted: nth_element
// over all of them spends most of its time in mispredicted branches.
float kth_largest(const float* v, int64_t n, int64_t k, std::vector<float>& tmp) {
  constexpr int64_t nb = 64;
  const auto [lo, hi] = min_max(v, n);
  if (k == n) return lo;
  if (!(hi > lo)) return hi;
  if (!std::isfinite(hi - lo)) {  // infinities: no buckets
    tmp.assign(v, v + n);
    std::nth_element(tmp.begin(), tmp.begin() + (k - 1), tmp.end(), std::greater<float>());
    return tmp[k - 1];
  }
  const float scale = nb / (hi - lo);  // bucket 0 holds the largest values
  // computed twice rather than stored: a stored bucket per value cost a thread_local lookup per call
  auto bucket = [&](float x) {
    const auto b = static_cast<int64_t>((hi - x) * scale);
    return b < nb - 1 ? b : nb - 1;
  };
  int64_t count[nb] = {};
  for (int64_t i = 0; i < n; ++i) ++count[bucket(v[i])];
  int64_t edge = 0, before = 0;  // the bucket of the k-th, and the values in buckets before it
  for (; before + count[edge] < k; ++edge) before += count[edge];
  tmp.resize(n);
  int64_t w = 0;
  for (int64_t i = 0; i < n; ++i) {
    tmp[w] = v[i];
    w += bucket(v[i]) == edge;
  }
  std::nth_element(tmp.begin(), tmp.begin() + (k - before - 1), tmp.begin() + w, std::greater<float>());
  return tmp[k - before - 1];
}

}  // namespace knn_patch

using knn_patch::kth_largest;
using knn_patch::max_into;

// ---- Top-k selection ----

// Buffers reused across the rows one thread handles.
struct Workspace {
  std::vector<float> group_max, scratch;
  std::vector<Entry> cand;
};

// The top-k of cand, in descending order if `sorted`, into out_v / out_i.
void take_best(std::vector<Entry>& cand, int64_t k, float* out_v, int64_t* out_i, bool sorted) {
  const int64_t take = std::min<int64_t>(k, cand.size());
  if (sorted)
    std::partial_sort(cand.begin(), cand.begin() + take, cand.end(), ranks_above);
  else if (take < static_cast<int64_t>(cand.size()))
    std::nth_element(cand.begin(), cand.begin() + (take - 1), cand.end(), ranks_above);
  for (int64_t t = 0; t < take; ++t) {
    out_v[t] = cand[t].first;
    out_i[t] = cand[t].second;
  }
}

// Candidates a row ranks beside its own scores (scores_topk's seeds): values v[0..n) (-inf: an
// empty slot) with their ids i, while the row's score j comes back as id j + offset.
struct Seeds {
  const float* v;
  const int64_t* i;
  int64_t n, offset;
};

// Top-k of one row of n scores into out_v / out_i (pre-filled with -inf / 0), in descending order
// if `sorted`, else in any order (the same set). With `seeds`, the top-k of the row and its seeds;
// once k seeds are given, a score below the k-th of them cannot rank, so the row is read in one
// pass for the scores at or above it.
void select_row(const float* row, int64_t n, int64_t k, float* out_v, int64_t* out_i, Workspace& ws,
                bool sorted, const Seeds* seeds = nullptr) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (seeds) {
    ws.cand.clear();
    ws.scratch.clear();
    for (int64_t t = 0; t < seeds->n; ++t)
      if (seeds->v[t] > neg_inf) {
        ws.cand.emplace_back(seeds->v[t], seeds->i[t]);
        ws.scratch.push_back(seeds->v[t]);
      }
    const auto given = static_cast<int64_t>(ws.scratch.size());
    // masked (-inf) scores never pass, whatever the seeds
    const float low = given >= k ? kth_largest(ws.scratch.data(), given, k, ws.group_max)
                                 : std::numeric_limits<float>::lowest();
    int64_t i = 0;
#if defined(__SSE2__)
    const __m128 f = _mm_set1_ps(low);
    for (; i + 4 <= n; i += 4)
      for (unsigned bits = _mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(row + i), f)); bits; bits &= bits - 1)
        ws.cand.emplace_back(row[i + __builtin_ctz(bits)], seeds->offset + i + __builtin_ctz(bits));
#endif
    for (; i < n; ++i)
      if (row[i] >= low) ws.cand.emplace_back(row[i], seeds->offset + i);
    take_best(ws.cand, k, out_v, out_i, sorted);
    return;
  }
  int64_t g = 16;
  while (g > 1 && n < 4 * k * g) g /= 2;
  const int64_t m = (n + g - 1) / g;
  ws.group_max.assign(row, row + std::min(m, n));
  ws.group_max.resize(m, neg_inf);
  for (int64_t t = 1; t < g; ++t) max_into(ws.group_max.data(), row + t * m, std::min(m, n - t * m));
  float tau = neg_inf;
  if (m > k) {
    tau = kth_largest(ws.group_max.data(), m, k, ws.scratch);
  }
  ws.cand.clear();
  for (int64_t j = 0; j < m; ++j) {
    if (ws.group_max[j] < tau || ws.group_max[j] == neg_inf) continue;
    for (int64_t i = j; i < n; i += m)
      if (row[i] >= tau && row[i] != neg_inf) ws.cand.emplace_back(row[i], i);
  }
  take_best(ws.cand, k, out_v, out_i, sorted);
}

std::vector<torch::Tensor> empty_result(int64_t rows, int64_t k, const torch::TensorOptions& options) {
  return {torch::full({rows, k}, -std::numeric_limits<float>::infinity(), options),
          torch::zeros({rows, k}, options.dtype(torch::kInt64))};
}

// Log-weights of (rows, m) sample slots before any draw: -inf, float64.
torch::Tensor empty_log_weights(int64_t rows, int64_t m, const torch::TensorOptions& options) {
  return torch::full({rows, m}, -std::numeric_limits<double>::infinity(), options.dtype(torch::kFloat64));
}

// scores: (R, L) float32, contiguous. row_end: (R,) int64, row r only considers columns
// [0, row_end[r]) (the causal limit), or an empty tensor for all L. Returns values (R, k) and
// their column indices (R, k), sorted descending if `sorted`, else in any order.
std::vector<torch::Tensor> topk_rows(torch::Tensor scores, int64_t k, torch::Tensor row_end, bool sorted) {
  TORCH_CHECK(scores.dim() == 2 && scores.is_contiguous() && scores.scalar_type() == torch::kFloat32,
              "scores must be a contiguous 2-D float32 tensor");
  const int64_t rows = scores.size(0), cols = scores.size(1);
  auto out = empty_result(rows, k, scores.options());
  const float* s = scores.data_ptr<float>();
  const int64_t* end = row_end.numel() ? row_end.data_ptr<int64_t>() : nullptr;
  float* out_v = out[0].data_ptr<float>();
  int64_t* out_i = out[1].data_ptr<int64_t>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    Workspace ws;
    for (int64_t r = r0; r < r1; ++r)
      select_row(s + r * cols, end ? std::min(end[r], cols) : cols, k, out_v + r * k, out_i + r * k, ws, sorted);
  });
  return out;
}

// The `tail` sample: for each row, min(m, n_rest) distinct keys drawn uniformly from the row's
// n_rest = end - k visible keys [0, end) outside its top-k. The torch version (sampling.py) loops
// over the m draws in Python with a sort and a searchsorted per chunk; here one pass per row does it.
namespace {

// splitmix64's output function: a bijection of 64-bit words that mixes every input bit.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// splitmix64, one stream per (seed, row): rows draw independently of which thread runs them, so a
// seeded call reproduces exactly.
class RowRng {
 public:
  RowRng(uint64_t seed, uint64_t row) : state_(mix64(seed ^ mix64(row + 0x9E3779B97F4A7C15ULL))) {}

  // Uniform in [0, bound), exactly: Lemire's multiply-shift with rejection of the biased low products.
  uint64_t below(uint64_t bound) {
    unsigned __int128 p = static_cast<unsigned __int128>(next()) * bound;
    if (static_cast<uint64_t>(p) < bound) {
      const uint64_t threshold = -bound % bound;
      while (static_cast<uint64_t>(p) < threshold) p = static_cast<unsigned __int128>(next()) * bound;
    }
    return static_cast<uint64_t>(p >> 64);
  }

 private:
  uint64_t next() { return mix64(state_ += 0x9E3779B97F4A7C15ULL); }
  uint64_t state_;
};

// One row: top (k) holds the top-k key indices in any order, all in [0, end) when end > k. Writes
// the sampled keys in ascending order to out_pos (m slots) and their log-weight log(n_rest / drawn)
// to out_logw; unused slots are left as they are (the caller fills them with 0 and -inf).
// Returns the number drawn.
int64_t sample_row(const int64_t* top, int64_t k, int64_t end, int64_t m, RowRng rng, int64_t* out_pos,
                   double* out_logw, std::vector<int64_t>& ranks, std::vector<int64_t>& sorted_top) {
  const int64_t n_rest = std::max<int64_t>(end - k, 0), drawn = std::min(m, n_rest);
  if (drawn == 0) return 0;
  // Floyd's algorithm: step j draws t uniform in [0, j] and keeps t, or j if t was already taken;
  // every subset of `drawn` ranks is equally likely, at O(drawn^2) however large n_rest is.
  ranks.clear();
  for (int64_t j = n_rest - drawn; j < n_rest; ++j) {
    const int64_t t = static_cast<int64_t>(rng.below(static_cast<uint64_t>(j) + 1));
    ranks.push_back(std::find(ranks.begin(), ranks.end(), t) == ranks.end() ? t : j);
  }
  std::sort(ranks.begin(), ranks.end());
  // The rank-th key outside the sorted top-k t_0 < t_1 < ...: rank + #{i : t_i - i <= rank}, and
  // t_i - i never decreases, so one merge maps the sorted ranks.
  sorted_top.assign(top, top + k);
  std::sort(sorted_top.begin(), sorted_top.end());
  const double logw = std::log(static_cast<double>(n_rest) / static_cast<double>(drawn));
  int64_t skip = 0;
  for (int64_t i = 0; i < drawn; ++i) {
    while (skip < k && sorted_top[skip] - skip <= ranks[i]) ++skip;
    out_pos[i] = ranks[i] + skip;
    out_logw[i] = logw;
  }
  return drawn;
}

}  // namespace

// Fused scores and selection, so the scores never leave the cache: for each of P independent
// problems (one per batch and KV head), q (P, R, D) holds the scaled queries and key (P, L, D)
// the keys. Blocks of 64 query rows are scored with a small GEMM into a per-thread buffer (only
// up to the block's last causal limit) and selected at once. The same keys as topk_rows on the
// full (P*R, L) score matrix, in no particular order. With m > 0 each row also draws its tail
// sample (the same draw as tail_sample for this seed) and reads the sampled keys' scores from the
// buffer: values and indices are then (P*R, k + m), the samples last (unused slots -inf, 0), and
// the third result holds their log-weights (P*R, m) (-inf in unused slots).
// seed_v (P*R, s) float32 and seed_i (P*R, s) int64 (s >= 0), or 1-D empty tensors: each row's
// seeds compete with its scores (select_row), and key j comes back as index j + offset (not with m > 0).
std::vector<torch::Tensor> scores_topk(torch::Tensor q, torch::Tensor key, int64_t k, torch::Tensor row_end,
                                       int64_t m, int64_t seed, torch::Tensor seed_v, torch::Tensor seed_i,
                                       int64_t offset) {
  TORCH_CHECK(q.dim() == 3 && key.dim() == 3 && q.scalar_type() == torch::kFloat32 &&
                  key.scalar_type() == torch::kFloat32 && q.size(0) == key.size(0) && q.size(2) == key.size(2),
              "q (P, R, D) and key (P, L, D) must be float32");
  const int64_t problems = q.size(0), rows = q.size(1), cols = key.size(1);
  constexpr int64_t kRows = 64;
  const int64_t blocks = (rows + kRows - 1) / kRows;
  const int64_t slots = k + m;
  auto out = empty_result(problems * rows, slots, q.options());
  out.push_back(empty_log_weights(problems * rows, m, q.options()));
  const int64_t* end = row_end.numel() ? row_end.data_ptr<int64_t>() : nullptr;
  const bool seeded = seed_v.dim() == 2;
  const int64_t n_seeds = seeded ? seed_v.size(1) : 0;
  TORCH_CHECK(!seeded || (m == 0 && seed_v.size(0) == problems * rows &&
                               seed_v.is_contiguous() && seed_v.scalar_type() == torch::kFloat32 &&
                               seed_i.sizes() == seed_v.sizes() && seed_i.is_contiguous() &&
                               seed_i.scalar_type() == torch::kInt64),
              "seeds must be 1-D empty, or (P*R, s) contiguous float32 values and int64 ids without tail samples");
  const float* sv = n_seeds ? seed_v.data_ptr<float>() : nullptr;
  const int64_t* si = n_seeds ? seed_i.data_ptr<int64_t>() : nullptr;
  float* out_v = out[0].data_ptr<float>();
  int64_t* out_i = out[1].data_ptr<int64_t>();
  double* out_logw = out[2].data_ptr<double>();
  at::parallel_for(0, problems * blocks, 1, [&](int64_t t0, int64_t t1) {
    at::NoGradGuard no_grad;  // grad mode is per thread: worker threads start with it on
    Workspace ws;
    std::vector<float> buffer(kRows * cols);
    std::vector<int64_t> ranks, sorted_top;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = t / blocks, r0 = (t % blocks) * kRows, nr = std::min(kRows, rows - r0);
      const int64_t first = p * rows + r0;
      int64_t width = cols;
      if (end) {
        width = 0;
        for (int64_t i = 0; i < nr; ++i) width = std::max(width, std::min(end[first + i], cols));
      }
      if (width == 0 && !seeded) continue;
      if (width > 0) {
        auto s = torch::from_blob(buffer.data(), {nr, width}, q.options());
        at::mm_out(s, q[p].narrow(0, r0, nr), key[p].narrow(0, 0, width).t());
      }
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t r = first + i, n = end ? std::min(end[r], width) : width;
        const float* row = buffer.data() + i * width;
        float* v = out_v + r * slots;
        int64_t* idx = out_i + r * slots;
        const Seeds row_seeds{sv + r * n_seeds, si + r * n_seeds, n_seeds, offset};
        select_row(row, n, k, v, idx, ws, false, seeded ? &row_seeds : nullptr);
        if (m == 0) continue;
        const int64_t drawn = sample_row(idx, k, n, m, RowRng(static_cast<uint64_t>(seed), r), idx + k,
                                         out_logw + r * m, ranks, sorted_top);
        for (int64_t j = k; j < k + drawn; ++j) v[j] = row[idx[j]];
      }
    }
  });
  return out;
}

// top: (R, k) int64 top-k key indices per row; row_end: (R,) int64, row r sees keys [0, row_end[r]).
// Returns the sampled keys (R, m) int64 (0 in unused slots) and their log-weights (R, m) float64
// (-inf in unused slots); the draws are a function of `seed`.
std::vector<torch::Tensor> tail_sample(torch::Tensor top, torch::Tensor row_end, int64_t m, int64_t seed) {
  TORCH_CHECK(top.dim() == 2 && top.is_contiguous() && top.scalar_type() == torch::kInt64,
              "top must be a contiguous 2-D int64 tensor");
  TORCH_CHECK(row_end.dim() == 1 && row_end.is_contiguous() && row_end.scalar_type() == torch::kInt64 &&
                  row_end.size(0) == top.size(0),
              "row_end must be a contiguous (R,) int64 tensor");
  const int64_t rows = top.size(0), k = top.size(1);
  auto pos = torch::zeros({rows, m}, top.options());
  auto logw = empty_log_weights(rows, m, top.options());
  const int64_t* t = top.data_ptr<int64_t>();
  const int64_t* end = row_end.data_ptr<int64_t>();
  int64_t* out_pos = pos.data_ptr<int64_t>();
  double* out_logw = logw.data_ptr<double>();
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> ranks, sorted_top;
    for (int64_t r = r0; r < r1; ++r)
      sample_row(t + r * k, k, end[r], m, RowRng(static_cast<uint64_t>(seed), r), out_pos + r * m,
                 out_logw + r * m, ranks, sorted_top);
  });
  return {pos, logw};
}

// ---- The extension's module ----

// The IVF search, defined in ivf.cpp.
std::vector<torch::Tensor> ivf_topk(torch::Tensor q, torch::Tensor centroids, torch::Tensor codes, torch::Tensor ids,
                                    torch::Tensor sizes, int64_t k, int64_t nprobe, int64_t max_codes, bool use_amx);
bool amx_available();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("topk_rows", &topk_rows, "Exact per-row top-k of a float32 score block");
  m.def("scores_topk", &scores_topk, "Exact top-k of q @ key^T per row (and its tail sample), scores kept in cache");
  m.def("tail_sample", &tail_sample, "Uniform distinct keys per row outside its top-k, and their log-weights");
  m.def("ivf_topk", &ivf_topk, "Top-k inner products over probed IVF lists, grouped by list");
  m.def("amx_available", &amx_available, "Whether ivf_topk can score on AMX tiles here");
}
