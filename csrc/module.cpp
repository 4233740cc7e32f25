#include "common.h"
#include "logprob.h"
#include "pm_loss.h"
#include "rowstats.h"

PYBIND11_MODULE(_native, m) {
  m.doc() = "cai-engine CPU kernels (no libtorch: plain buffers in, buffers out)";
  m.def("logsumexp_rows", &logsumexp_rows, py::arg("x"),
        "log(sum(exp(x), axis=1)) of a float32 [rows, cols] array, computed stably.");
  m.def("logprob_forward", &logprob_forward, py::arg("logits"), py::arg("labels"), py::arg("inv_temp"),
        py::arg("ignore_index"), py::arg("logp"), py::arg("lse"), py::arg("entropy") = py::none(),
        "Row statistics of softmax(logits * inv_temp): writes log p(label), log-sum-exp and (optionally) entropy.");
  m.def("logprob_backward", &logprob_backward, py::arg("logits"), py::arg("labels"), py::arg("inv_temp"),
        py::arg("lse"), py::arg("entropy"), py::arg("grad_logp"), py::arg("grad_entropy"),
        "Overwrites a [rows, cols] block of raw logits in place with d(loss)/d(logits); labels are relative to the "
        "block's first column (outside [0, cols) adds nothing); ignored rows come with zero upstream gradients.");
  m.def("kl_forward", &kl_forward, py::arg("logits"), py::arg("ref_logits"), py::arg("inv_temp"), py::arg("kl"),
        py::arg("lse"), py::arg("mean_diff"), "Per-row KL(softmax(logits) || softmax(ref_logits)) at a temperature.");
  m.def("kl_backward", &kl_backward, py::arg("logits"), py::arg("ref_logits"), py::arg("inv_temp"), py::arg("lse"),
        py::arg("mean_diff"), py::arg("grad_kl"), "Overwrites logits in place with d(loss)/d(logits) of the KL.");
  m.def("pm_pairs", &pm_pairs, py::arg("rewards"), py::arg("pairs"), py::arg("prob"), py::arg("weight"),
        py::arg("margin"), py::arg("group"), py::arg("pair_loss"), py::arg("pair_grad"), py::arg("resp_grad"),
        py::arg("group_stats"), py::arg("resp_group"),
        "Soft-label pairwise PM loss over all pairs: per-pair loss and d/d(gap), per-response and per-group sums.");
}
