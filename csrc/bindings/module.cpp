#include <pybind11/stl.h>

#include "bindings/bindings.h"
#include "common/errors.h"
#include "cuda/cuda_api.h"
#include "io/io_engine.h"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "cachedattn native core: host memory pool, file I/O engine, CUDA copy engine (no torch inside)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const cachedattn::OsError& e) {
      // OSError(errno, message, path) picks the errno's subclass (FileNotFoundError, ...).
      py::tuple args;
      if (e.path().empty())
        args = py::make_tuple(e.code(), e.message());
      else
        args = py::make_tuple(e.code(), e.message(), e.path());
      PyErr_SetObject(PyExc_OSError, args.ptr());
    }
  });

  m.def("cuda_built", &cachedattn::cuda::built, "Whether this build contains the CUDA code.");
  m.def(
      "cuda_device_count",
      [] {
        std::string reason;
        int n = cachedattn::cuda::device_count(&reason);
        return py::make_tuple(n, reason);
      },
      "(usable CUDA devices, why none when 0).");
  m.def("uring_built", &cachedattn::uring_built, "Whether this build contains the io_uring backend.");

  cachedattn::bindings::bind_memory(m);
  cachedattn::bindings::bind_io(m);
  cachedattn::bindings::bind_kernels(m);
}
