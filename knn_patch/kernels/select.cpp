// Exact per-row top-k of a score block.
//
// torch.topk on CPU costs ~1 us per row plus ~3.5 ns per element (it copies every row into a
// vector of (value, index) pairs); attention has many short rows, so selection dominated the
// kernel. Here each row of n scores is cut into g segments of m = ceil(n / g) and:
//   1. group j = {j, j + m, j + 2m, ...}: the group maxima are an elementwise max of the
//      segments, one vectorised pass over the row;
//   2. tau = the k-th largest group maximum. At least k scores are >= tau (one per such group),
//      so every score of the true top-k is >= tau and lies in a group whose maximum is >= tau.
//      Only those groups' scores >= tau are collected (at most g * k), and their top-k is taken.
// g is the largest of 16, 8, 4, 2, 1 leaving m >= 4k groups, so tau prunes well. (Contiguous
// blocks with a horizontal max per block measured 1.6x slower here.)
//
// Ties keep the lower index, so the result is deterministic. Scores of -inf are masked keys and
// never selected; unfilled slots come back as (-inf, 0).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace {

using Entry = std::pair<float, int64_t>;

// "a ranks above b": larger score, or equal score and lower index. Used as the heap's "less",
// the std heap functions keep the lowest-ranked entry (the one to evict) at the front.
inline bool ranks_above(const Entry& a, const Entry& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

// acc[0..m) = max(acc, x[0..m)), elementwise.
inline void max_into(float* acc, const float* x, int64_t m) {
  int64_t j = 0;
#if defined(__SSE2__)
  for (; j + 4 <= m; j += 4) _mm_storeu_ps(acc + j, _mm_max_ps(_mm_loadu_ps(acc + j), _mm_loadu_ps(x + j)));
#endif
  for (; j < m; ++j) acc[j] = std::max(acc[j], x[j]);
}

}  // namespace

// scores: (R, L) float32, contiguous. row_end: (R,) int64, row r only considers columns
// [0, row_end[r]) (the causal limit), or an empty tensor for all L. Returns values (R, k) sorted
// descending and their column indices (R, k).
std::vector<torch::Tensor> topk_rows(torch::Tensor scores, int64_t k, torch::Tensor row_end) {
  TORCH_CHECK(scores.dim() == 2 && scores.is_contiguous() && scores.scalar_type() == torch::kFloat32,
              "scores must be a contiguous 2-D float32 tensor");
  const int64_t rows = scores.size(0), cols = scores.size(1);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  auto values = torch::full({rows, k}, neg_inf, scores.options());
  auto indices = torch::zeros({rows, k}, scores.options().dtype(torch::kInt64));
  const float* s = scores.data_ptr<float>();
  const int64_t* end = row_end.numel() ? row_end.data_ptr<int64_t>() : nullptr;
  float* out_v = values.data_ptr<float>();
  int64_t* out_i = indices.data_ptr<int64_t>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> group_max, scratch;
    std::vector<Entry> cand;
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = s + r * cols;
      const int64_t n = end ? std::min(end[r], cols) : cols;
      int64_t g = 16;
      while (g > 1 && n < 4 * k * g) g /= 2;
      const int64_t m = (n + g - 1) / g;
      group_max.assign(row, row + std::min(m, n));
      group_max.resize(m, neg_inf);
      for (int64_t t = 1; t < g; ++t) max_into(group_max.data(), row + t * m, std::min(m, n - t * m));
      float tau = neg_inf;
      if (m > k) {
        scratch.assign(group_max.begin(), group_max.end());
        std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
        tau = scratch[k - 1];
      }
      cand.clear();
      for (int64_t j = 0; j < m; ++j) {
        if (group_max[j] < tau || group_max[j] == neg_inf) continue;
        for (int64_t i = j; i < n; i += m)
          if (row[i] >= tau && row[i] != neg_inf) cand.emplace_back(row[i], i);
      }
      const int64_t take = std::min<int64_t>(k, cand.size());
      std::partial_sort(cand.begin(), cand.begin() + take, cand.end(), ranks_above);
      for (int64_t t = 0; t < take; ++t) {
        out_v[r * k + t] = cand[t].first;
        out_i[r * k + t] = cand[t].second;
      }
    }
  });
  return {values, indices};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("topk_rows", &topk_rows, "Exact per-row top-k of a float32 score block");
}
