// Op schemas and dispatch only: torch.ops.use_kernels.gather_segments{,_packed}.
// Fake (meta) implementations live in Python (use_kernels/gather.py, register_fake), which
// set_python_module points torch to.
#include <Python.h>
#include <torch/library.h>

#include "gather_segments_ops.h"

extern "C" {
// A dummy module: `import use_kernels._C` loads this shared library, whose static initialisers
// below register the ops (the extension-cpp pattern; no pybind11 API).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(use_kernels, m) {
  m.set_python_module("use_kernels.gather");
  m.def("gather_segments(Tensor tokens, Tensor offsets, Tensor users, Tensor starts, "
        "Tensor lengths, int max_len, int pad_id, int fep_window=0, int num_events=0, "
        "int event_offset=5) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gather_segments_packed(Tensor tokens, Tensor offsets, Tensor users, Tensor starts, "
        "Tensor lengths, int fep_window=0, int num_events=0, int event_offset=5) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(use_kernels, CPU, m) {
  m.impl("gather_segments", &use_kernels::gather_segments_cpu);
  m.impl("gather_segments_packed", &use_kernels::gather_segments_packed_cpu);
}

#ifdef USE_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(use_kernels, CUDA, m) {
  m.impl("gather_segments", &use_kernels::gather_segments_cuda);
  m.impl("gather_segments_packed", &use_kernels::gather_segments_packed_cuda);
}
#endif
