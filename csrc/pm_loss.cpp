// Pairwise preference-model loss over all pairs in one pass (CPU).
//
// Per pair (i, j) with label p, margin m, weight w and reward gap d = r_i - r_j:
//   loss = p * softplus(m - d) + (1 - p) * softplus(d + m)
//   dloss/dd = -p * sigmoid(m - d) + (1 - p) * sigmoid(d + m)
// Accumulates per-response weighted gradient sums and per-group weight / loss / pair counts; the caller
// scales them for its reduction. A response belongs to one group, recorded in resp_group.
#include "pm_loss.h"

#include <cmath>

namespace {

inline double softplus(double x) { return x > 0 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x)); }
inline double sigmoid(double x) {
  if (x >= 0) return 1.0 / (1.0 + std::exp(-x));
  const double e = std::exp(x);
  return e / (1.0 + e);
}

}  // namespace

void pm_pairs(f32_array rewards, i64_array pairs, f32_array prob, f32_array weight, f32_array margin,
              i64_array group, f32_out pair_loss, f32_out pair_grad, f32_out resp_grad, f32_out group_weight,
              f32_out group_loss, f32_out group_pairs, i64_array_out resp_group) {
  check_ndim(rewards, 1, "rewards");
  check_ndim(pairs, 2, "pairs");
  check_dim(pairs, 1, 2, "pairs");
  const int64_t R = rewards.shape(0), P = pairs.shape(0), G = group_weight.shape(0);
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
  float *gw = group_weight.mutable_data(), *gl = group_loss.mutable_data(), *gp = group_pairs.mutable_data();
  int64_t* rgp = resp_group.mutable_data();
  py::gil_scoped_release nogil;
  std::fill(rg, rg + R, 0.f);
  std::fill(gw, gw + G, 0.f);
  std::fill(gl, gl + G, 0.f);
  std::fill(gp, gp + G, 0.f);
  std::fill(rgp, rgp + R, int64_t{0});  // responses in no pair get zero gradient under group 0
  for (int64_t k = 0; k < P; ++k) {
    const int64_t i = pp[2 * k], j = pp[2 * k + 1], gk = g[k];
    const double d = static_cast<double>(r[i]) - r[j], p = pr[k], m = mg[k];
    const double loss = p * softplus(m - d) + (1 - p) * softplus(d + m);
    const double grad = -p * sigmoid(m - d) + (1 - p) * sigmoid(d + m);
    pl[k] = static_cast<float>(loss);
    pg[k] = static_cast<float>(grad);
    rg[i] += static_cast<float>(w[k] * grad);
    rg[j] -= static_cast<float>(w[k] * grad);
    gw[gk] += w[k];
    gl[gk] += static_cast<float>(w[k] * loss);
    gp[gk] += 1.f;
    rgp[i] = gk;
    rgp[j] = gk;
  }
}
