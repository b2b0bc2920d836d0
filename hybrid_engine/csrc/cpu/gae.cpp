// Generalised advantage estimation on the CPU: one backward scan per sequence, sequences in parallel.
#include <ATen/Parallel.h>

#include "hybrid_engine/checks.h"
#include "hybrid_engine/ops.h"

#define HE_OP "gae"

namespace hybrid_engine {
namespace {

template <typename scalar_t>
void gae_rows(const scalar_t* rewards, const scalar_t* values, const scalar_t* mask, float* adv, float* ret,
              int64_t begin, int64_t end, int64_t T, float gamma, float lam) {
  for (int64_t b = begin; b < end; ++b) {
    const int64_t o = b * T;
    // The value after the last masked token is 0, so the scan starts from a zero bootstrap.
    float next_value = 0.f, last_gae = 0.f;
    for (int64_t t = T - 1; t >= 0; --t) {
      const float m = static_cast<float>(mask[o + t]);
      const float v = static_cast<float>(values[o + t]);
      if (m == 0.f) {
        adv[o + t] = 0.f;
        ret[o + t] = 0.f;
        next_value = 0.f;
        last_gae = 0.f;
        continue;
      }
      const float delta = static_cast<float>(rewards[o + t]) + gamma * next_value - v;
      last_gae = delta + gamma * lam * last_gae;
      adv[o + t] = last_gae;
      ret[o + t] = last_gae + v;
      next_value = v;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                                           double gamma, double lam) {
  CHECK_DIM(rewards, 2, "[B, T]");
  CHECK_SHAPE(values, rewards.size(0), rewards.size(1));
  CHECK_SHAPE(mask, rewards.size(0), rewards.size(1));
  CHECK_FLOATING(rewards);
  CHECK_SAME_DTYPE(values, rewards);
  CHECK_SAME_DTYPE(mask, rewards);
  CHECK_CPU(rewards);
  CHECK_CPU(values);
  CHECK_CPU(mask);
  const auto r = rewards.contiguous(), v = values.contiguous(), m = mask.contiguous();
  const int64_t B = r.size(0), T = r.size(1);
  auto adv = at::empty({B, T}, r.options().dtype(at::kFloat));
  auto ret = at::empty({B, T}, r.options().dtype(at::kFloat));
  HE_DISPATCH_FLOATING(r.scalar_type(), "gae_cpu", [&] {
    const scalar_t *rp = r.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>(), *mp = m.data_ptr<scalar_t>();
    float *ap = adv.data_ptr<float>(), *tp = ret.data_ptr<float>();
    // Each sequence is a serial scan of T steps; parallelism is across sequences.
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(T, 1)), [&](int64_t begin, int64_t end) {
      gae_rows<scalar_t>(rp, vp, mp, ap, tp, begin, end, T, static_cast<float>(gamma), static_cast<float>(lam));
    });
  });
  return {adv, ret};
}

}  // namespace hybrid_engine
