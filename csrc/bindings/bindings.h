// The pybind11 layer: converts Python arguments into the core's plain types,
// releases the GIL around anything that blocks, and maps errors to Python's.
#pragma once
#include <pybind11/pybind11.h>

namespace cachedattn::bindings {

void bind_memory(pybind11::module_& m);
void bind_io(pybind11::module_& m);
void bind_kernels(pybind11::module_& m);

}  // namespace cachedattn::bindings
