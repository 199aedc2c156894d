// CPU kernel: one Gated DeltaNet decode step between the projections, as the
// composition of the CPU kernels of gdn_gating, causal_conv1d_update,
// gated_delta_rule_recurrent and gated_rms_norm (so it rounds exactly as they do).
// Semantics: ops/reference_linear_attn.py (gated_delta_net_decode).
#include "../linear_attn_checks.h"
#include "cpu_common.h"
#include "ops_cpu.h"

namespace splitvl::cpu {

void gated_delta_net_decode(at::Tensor& out, const at::Tensor& proj, const at::Tensor& conv_weight,
                            at::Tensor& conv_states, const at::Tensor& A_log,
                            const at::Tensor& dt_bias, at::Tensor& recurrent_states,
                            const at::Tensor& state_indices, const at::Tensor& norm_weight,
                            double eps, bool use_qk_l2norm) {
  const GdnDecodeDims d = check_gated_delta_net_decode(out, proj, conv_weight, conv_states, A_log,
                                                       dt_bias, recurrent_states, state_indices,
                                                       norm_weight);
  SPLITVL_CHECK_CPU(proj);
  const int64_t value_dim = d.hv * d.dv;
  const at::Tensor mixed = proj.narrow(1, 0, d.conv_dim);
  const at::Tensor z = proj.narrow(1, d.conv_dim, value_dim).view({d.batch, d.hv, d.dv});
  const at::Tensor ba = proj.narrow(1, d.conv_dim + value_dim, 2 * d.hv);
  const auto f32 = proj.options().dtype(at::kFloat);
  at::Tensor g = at::empty({d.batch, d.hv}, f32), beta = at::empty({d.batch, d.hv}, f32);
  gdn_gating(g, beta, ba, A_log, dt_bias);
  at::Tensor conv_out = at::empty({d.batch, d.conv_dim}, proj.options());
  causal_conv1d_update(conv_out, mixed, conv_weight, std::nullopt, conv_states, state_indices, true);
  const at::Tensor q = conv_out.narrow(1, 0, d.key_dim).view({d.batch, d.hk, d.dk});
  const at::Tensor k = conv_out.narrow(1, d.key_dim, d.key_dim).view({d.batch, d.hk, d.dk});
  const at::Tensor v = conv_out.narrow(1, 2 * d.key_dim, value_dim).view({d.batch, d.hv, d.dv});
  at::Tensor core = at::empty({d.batch, d.hv, d.dv}, proj.options());
  gated_delta_rule_recurrent(core, q, k, v, g, beta, recurrent_states, state_indices, use_qk_l2norm);
  at::Tensor rows = out.view({d.batch * d.hv, d.dv});
  gated_rms_norm(rows, core.view({d.batch * d.hv, d.dv}), z, norm_weight, eps);
}

}  // namespace splitvl::cpu
