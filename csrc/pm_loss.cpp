// Pairwise preference-model loss over all pairs (CPU).
//
// Per pair (i, j) with label p, margin m, weight w and reward gap d = r_i - r_j:
//   loss = p * softplus(m - d) + (1 - p) * softplus(d + m)
//   dloss/dd = -p * sigmoid(m - d) + (1 - p) * sigmoid(d + m)
// Pass 1 (vectorised, threaded) computes every pair; pass 2 scatters per-response weighted gradient
// sums and per-group sums (rows of group_stats: weight, weighted loss, pairs, agreeing, decisive,
// label-oriented margin). The caller scales them for its reduction. A response belongs to one group.
#include "pm_loss.h"

#include <algorithm>
#include <vector>

#include "vecmath.h"

namespace {

enum Stat { kWeight, kLoss, kPairs, kAgree, kDecisive, kMargin, kNumStats };

// Contiguous inputs only (the gap is gathered beforehand) so that the loop vectorises.
CAI_MULTIVERSION void pair_terms(const float* gap, const float* pr, const float* mg, int64_t n, float* loss,
                                 float* grad) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const float d = gap[k], p = pr[k], m = mg[k];
    const float x1 = m - d, x2 = d + m;
    const float e1 = exp_nonpositive(x1 > 0 ? -x1 : x1), e2 = exp_nonpositive(x2 > 0 ? -x2 : x2);
    const float sp1 = (x1 > 0 ? x1 : 0.f) + log1p_unit(e1), sp2 = (x2 > 0 ? x2 : 0.f) + log1p_unit(e2);
    const float sg1 = (x1 >= 0 ? 1.f : e1) / (1.f + e1), sg2 = (x2 >= 0 ? 1.f : e2) / (1.f + e2);
    loss[k] = p * sp1 + (1.f - p) * sp2;
    grad[k] = -p * sg1 + (1.f - p) * sg2;
  }
}

}  // namespace

void pm_pairs(f32_array rewards, i64_array pairs, f32_array prob, f32_array weight, f32_array margin,
              i64_array group, f32_out pair_loss, f32_out pair_grad, f32_out resp_grad, f32_out group_stats,
              i64_array_out resp_group) {
  check_ndim(rewards, 1, "rewards");
  check_ndim(pairs, 2, "pairs");
  check_dim(pairs, 1, 2, "pairs");
  check_ndim(group_stats, 2, "group_stats");
  check_dim(group_stats, 0, kNumStats, "group_stats");
  const int64_t R = rewards.shape(0), P = pairs.shape(0), G = group_stats.shape(1);
  for (auto* a : {&prob, &weight, &margin}) check_dim(*a, 0, P, "per-pair input");
  check_dim(group, 0, P, "group");
  check_dim(pair_loss, 0, P, "pair_loss");
  check_dim(pair_grad, 0, P, "pair_grad");
  check_dim(resp_grad, 0, R, "resp_grad");
  check_dim(resp_group, 0, R, "resp_group");
  const float *r = rewards.data(), *pr = prob.data(), *w = weight.data(), *mg = margin.data();
  const int64_t *pp = pairs.data(), *g = group.data();
  for (int64_t k = 0; k < P; ++k) {
    for (int s = 0; s < 2; ++s)
      if (pp[2 * k + s] < 0 || pp[2 * k + s] >= R)
        throw std::invalid_argument("pairs[" + std::to_string(k) + "][" + std::to_string(s) + "] = " +
                                    std::to_string(pp[2 * k + s]) + " is outside [0, " + std::to_string(R) + ")");
    if (g[k] < 0 || g[k] >= G)
      throw std::invalid_argument("group[" + std::to_string(k) + "] = " + std::to_string(g[k]) + " is outside [0, " +
                                  std::to_string(G) + ")");
    if (!(pr[k] >= 0.f && pr[k] <= 1.f))
      throw std::invalid_argument("prob[" + std::to_string(k) + "] = " + std::to_string(pr[k]) +
                                  " is not a probability in [0, 1]");
  }
  float *pl = pair_loss.mutable_data(), *pg = pair_grad.mutable_data(), *rg = resp_grad.mutable_data();
  float* st = group_stats.mutable_data();
  int64_t* rgp = resp_group.mutable_data();
  py::gil_scoped_release nogil;
  std::vector<float> gap(P);
  for (int64_t k = 0; k < P; ++k) gap[k] = r[pp[2 * k]] - r[pp[2 * k + 1]];
  constexpr int64_t kBlock = 4096;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < P; b += kBlock)
    pair_terms(gap.data() + b, pr + b, mg + b, std::min(kBlock, P - b), pl + b, pg + b);
  std::fill(rg, rg + R, 0.f);
  std::fill(st, st + kNumStats * G, 0.f);
  std::fill(rgp, rgp + R, int64_t{0});  // responses in no pair get zero gradient under group 0
  for (int64_t k = 0; k < P; ++k) {
    const int64_t i = pp[2 * k], j = pp[2 * k + 1], gk = g[k];
    const float wg = w[k] * pg[k], d = gap[k], p = pr[k];
    rg[i] += wg;
    rg[j] -= wg;
    rgp[i] = rgp[j] = gk;
    const bool decisive = p != 0.5f;
    st[kWeight * G + gk] += w[k];
    st[kLoss * G + gk] += w[k] * pl[k];
    st[kPairs * G + gk] += 1.f;
    st[kDecisive * G + gk] += decisive;
    st[kAgree * G + gk] += decisive ? (d == 0.f ? 0.5f : static_cast<float>((d > 0) == (p > 0.5f))) : 0.f;
    st[kMargin * G + gk] += (2.f * p - 1.f) * d;
  }
}
