// latentfast._C: module init and every kernel schema.
//
// The public ops live in the `latentfast::` namespace and are defined in Python
// (latentfast/ops), because each one picks its backend (reference, cpp, triton) at call
// time and must exist even when this extension is not built. The C++ CPU kernels they call
// for the cpp backend are declared here, once, in the `latentfast_cpp::` namespace.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "common/isa.h"

extern "C" {
// Importing latentfast._C from Python runs the static TORCH_LIBRARY registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {
// The instruction-set build of the per-ISA kernel files that an op call would use now (the
// widest the CPU runs, or LATENTFAST_CPU_ISA), and the widest the CPU runs; see common/isa.h.
std::string cpu_isa() {
  return std::string(latentfast::isa::name(latentfast::isa::selected())) + " (widest available: " +
         latentfast::isa::name(latentfast::isa::best()) + ")";
}
}  // namespace

TORCH_LIBRARY(latentfast_cpp, m) {
  m.def("cpu_isa() -> str", &cpu_isa);
  // Flows. mode: 0 = no coupling, 1 = additive (NICE), 2 = affine (Glow).
  m.def("actnorm_invconv_fwd(Tensor x, Tensor weight, Tensor bias, Tensor? h, int mode) -> (Tensor, Tensor)");
  m.def("actnorm_invconv_bwd(Tensor grad_y, Tensor grad_logdet, Tensor x, Tensor weight, Tensor bias, Tensor? h, int mode, Tensor? y=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("affine_coupling_fwd(Tensor x, Tensor h, bool additive, bool inverse) -> (Tensor, Tensor)");
  m.def("affine_coupling_bwd(Tensor grad_y, Tensor grad_logdet, Tensor x, Tensor h, bool additive, Tensor? y=None) -> (Tensor, Tensor)");
  // Vector flow stacks (K masked-MLP steps on [B, d]; see latentfast/reference/vector_flows.py).
  m.def("vector_flow_fwd(Tensor x, Tensor? ctx, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor act, bool additive, bool save, bool keep_hidden=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("vector_flow_bwd(Tensor grad_y, Tensor grad_logdet, Tensor xs, Tensor out, Tensor? ctx, Tensor w1, Tensor b1, Tensor w2, Tensor act, bool additive, Tensor? hidden=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("vector_flow_inv(Tensor y, Tensor? ctx, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor act, bool additive, int n_passes) -> (Tensor, Tensor)");
  m.def("vector_flow_inv_train(Tensor y, Tensor? ctx, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor act, bool additive, int n_passes) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("vector_flow_inv_grad(Tensor grad_x, Tensor grad_logdet, Tensor xs, Tensor out, Tensor hidden, Tensor w1, Tensor w2, Tensor act, bool additive, int n_passes) -> Tensor");
  m.def("lu_weight(Tensor perm, Tensor lower, Tensor upper, Tensor sign_s, Tensor log_abs_s) -> (Tensor, Tensor)");
  m.def("lu_weight_bwd(Tensor perm, Tensor lower, Tensor upper, Tensor sign_s, Tensor log_abs_s, Tensor w_inv, Tensor? grad_w, Tensor? grad_w_inv) -> (Tensor, Tensor, Tensor)");
  // Latent geometry (act codes: 0 identity, 1 tanh, 2 softplus, 3 elu, 4 sigmoid).
  m.def("mlp_act_tangent_(Tensor(a!) buf, Tensor(b!) deriv, int n_points, int n_dirs, int act, Tensor? bias=None) -> ()");
  m.def("weighted_gram(Tensor p, Tensor q, Tensor? w) -> Tensor");
  m.def("rbf_metric(Tensor z, Tensor centres, Tensor lam, Tensor wr, float zeta, Tensor? base=None) -> Tensor");
  m.def("rbf_sigma_(Tensor(a!) out, Tensor z, Tensor centres, Tensor lam, Tensor wr, float zeta) -> ()");
  m.def("rbf_sigma_backward_(Tensor(a!) gz, Tensor sigma, Tensor grad_sigma, Tensor z, Tensor centres, Tensor lam, Tensor wr) -> ()");
  m.def("curve_reduce(Tensor g, Tensor? grad_energy, Tensor? grad_length) -> (Tensor, Tensor, Tensor)");
  m.def("curve_reduce_grad_(Tensor(a!) gg, Tensor g, Tensor? grad_energy, Tensor? grad_length) -> (Tensor, Tensor)");
  m.def("curve_energy_small(Tensor curves, Tensor[] weights, Tensor[] biases, int[] acts, Tensor? centres, Tensor? lam, Tensor? wr, float zeta, Tensor? grad_energy, Tensor? grad_length) -> (Tensor, Tensor, Tensor)");
  // The batched L-BFGS of geometry.geodesic, per iteration (csrc/geometry/lbfgs_cpu.cpp).
  m.def("lbfgs_direction_(Tensor(a!) p, Tensor(b!) slope, Tensor g, Tensor s_hist, Tensor y_hist, Tensor count) -> ()");
  m.def("lbfgs_trial_(Tensor(a!) f_new, Tensor(b!) g_new, Tensor(c!) step, Tensor(d!) searching, Tensor ft, Tensor gt, Tensor f, Tensor slope, Tensor? rows) -> int");
  m.def("lbfgs_update_(Tensor(a!) x, Tensor(b!) s_hist, Tensor(c!) y_hist, Tensor(d!) count, Tensor(e!) small, Tensor(f!) iters, Tensor(g!) done, Tensor f, Tensor g, Tensor f_new, Tensor g_new, Tensor p, Tensor step, Tensor searching, float tol) -> ()");
  // RNNs (torch.nn.GRU / LSTM conventions, gates r, z, n / i, f, g, o).
  m.def("gru_sequence_fwd(Tensor x, Tensor h0, Tensor weight_ih, Tensor weight_hh, Tensor bias_ih, Tensor bias_hh, bool save) -> (Tensor, Tensor)");
  m.def("gru_sequence_bwd(Tensor grad_out, Tensor x, Tensor h0, Tensor weight_ih, Tensor weight_hh, Tensor out, Tensor gates) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("lstm_sequence_fwd(Tensor x, Tensor h0, Tensor c0, Tensor weight_ih, Tensor weight_hh, Tensor bias_ih, Tensor bias_hh, bool save) -> (Tensor, Tensor, Tensor)");
  m.def("lstm_sequence_bwd(Tensor grad_out, Tensor grad_cells, Tensor x, Tensor h0, Tensor c0, Tensor weight_ih, Tensor weight_hh, Tensor out, Tensor cells, Tensor gates) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Lyapunov spectra (cell: 0 tanh RNN, 1 GRU, 2 LSTM; system: 0 Lorenz-63, 1 Lorenz-96).
  m.def("rnn_lyapunov(Tensor s0, Tensor q0, Tensor mat, Tensor bias, int cell, int n_steps, int qr_every, int transient, float dt) -> (Tensor, Tensor)");
  m.def("lorenz_lyapunov(Tensor x0, Tensor q0, int system, float p0, float p1, float p2, float dt, int n_steps, int qr_every, int transient) -> (Tensor, Tensor)");
}
