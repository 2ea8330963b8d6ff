// crformer._C: defines the crformer:: operator schemas and a tiny Python module.
//
// Importing crformer._C loads this shared library, which registers the ops with the dispatcher
// (CPU kernels in masked_pool_cpu.cpp; CUDA ones in masked_pool_cuda_host.cpp + masked_pool_cuda.cu
// when compiled). All registration is here: torch/library.h is the costliest header to compile. The
// autograd formula and the fake (meta) implementation live in Python (crformer/ops/pooling.py),
// which set_python_module points torch to. The module itself only reports how it was built.

#include <Python.h>

#include "masked_pool.h"

#include <torch/library.h>

TORCH_LIBRARY(crformer, m) {
  m.set_python_module("crformer.ops.pooling");
  m.def("masked_pool(Tensor x, Tensor mask, str mode) -> Tensor");
  m.def("masked_pool_backward(Tensor grad_out, Tensor mask, Tensor? x, str mode) -> Tensor");
}

TORCH_LIBRARY_IMPL(crformer, CPU, m) {
  m.impl("masked_pool", &crformer::masked_pool_cpu);
  m.impl("masked_pool_backward", &crformer::masked_pool_backward_cpu);
}

#ifdef CRFORMER_WITH_CUDA
TORCH_LIBRARY_IMPL(crformer, CUDA, m) {
  m.impl("masked_pool", &crformer::masked_pool_cuda);
  m.impl("masked_pool_backward", &crformer::masked_pool_backward_cuda);
}
#endif

namespace {

#ifdef CRFORMER_WITH_CUDA
constexpr bool kCudaCompiled = true;
#else
constexpr bool kCudaCompiled = false;
#endif

PyObject* cuda_compiled(PyObject* /*self*/, PyObject* /*args*/) {
  if (kCudaCompiled) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyMethodDef methods[] = {
    {"cuda_compiled", cuda_compiled, METH_NOARGS,
     "True when the CUDA kernels of crformer._C were compiled in."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_C",
    "Compiled crformer ops (registered as torch.ops.crformer.*).", -1, methods,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
  if (PyModule_AddObject(mod, "CUDA_COMPILED", PyBool_FromLong(kCudaCompiled ? 1 : 0)) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
