#include <pybind11/stl.h>

#include "bindings/bindings.h"
#include "memory/host_pool.h"

namespace py = pybind11;

namespace cachedattn::bindings {

namespace {

// A handed-out block. It shares ownership of the region, so any memoryview or
// tensor made from it keeps the memory mapped even after the pool is closed.
struct Block {
  std::shared_ptr<Region> region;
  size_t index;
  uintptr_t ptr;
  size_t nbytes;
};

HugePages parse_hugepages(const std::string& s) {
  if (s == "off") return HugePages::Off;
  if (s == "auto") return HugePages::Auto;
  if (s == "on") return HugePages::On;
  throw std::invalid_argument("hugepages must be 'off', 'auto' or 'on', not '" + s + "'");
}

size_t index_for(HostPool& pool, py::handle block) {
  if (py::isinstance<Block>(block)) {
    const Block& b = block.cast<const Block&>();
    if (pool.closed() || b.region != pool.region())
      throw std::invalid_argument("block " + std::to_string(b.index) + " does not belong to this pool");
    return b.index;
  }
  if (py::isinstance<py::int_>(block)) return pool.index_of(block.cast<uintptr_t>());
  throw py::type_error("expected a Block or an address (int)");
}

}  // namespace

void bind_memory(py::module_& m) {
  py::class_<Block>(m, "Block", py::buffer_protocol(), "One block of a HostPool; exports its bytes zero-copy.")
      .def_buffer([](Block& b) {
        return py::buffer_info(reinterpret_cast<void*>(b.ptr), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {b.nbytes}, {size_t{1}}, /*readonly=*/false);
      })
      .def_readonly("index", &Block::index)
      .def_readonly("ptr", &Block::ptr)
      .def_readonly("nbytes", &Block::nbytes)
      .def("__len__", [](const Block& b) { return b.nbytes; })
      .def("__repr__", [](const Block& b) {
        return "<Block " + std::to_string(b.index) + " of " + std::to_string(b.nbytes) + " bytes>";
      });

  py::class_<HostPool, std::shared_ptr<HostPool>>(m, "HostPool")
      .def(py::init([](size_t capacity_bytes, size_t block_bytes, const std::string& hugepages, bool register_cuda) {
             HugePages mode = parse_hugepages(hugepages);
             py::gil_scoped_release release;  // mapping and pinning gigabytes takes a while
             return std::make_shared<HostPool>(capacity_bytes, block_bytes, mode, register_cuda);
           }),
           py::arg("capacity_bytes"), py::arg("block_bytes"), py::arg("hugepages") = "off",
           py::arg("register_cuda") = false)
      .def(
          "alloc",
          [](HostPool& p) -> py::object {
            auto i = p.alloc();
            if (!i) return py::none();
            return py::cast(Block{p.region(), *i, p.address_of(*i), p.block_bytes()});
          },
          "A free Block, or None when every block is in use.")
      .def(
          "free", [](HostPool& p, py::handle block) { p.free(index_for(p, block)); }, py::arg("block"),
          "Returns a Block (or the address of one) to the pool. Double frees and foreign blocks raise ValueError.")
      .def(
          "block_at",
          [](HostPool& p, uintptr_t address) {
            size_t i = p.index_of(address);
            return Block{p.region(), i, p.address_of(i), p.block_bytes()};
          },
          py::arg("address"), "The Block starting at an address (allocated or not).")
      .def("close", &HostPool::close,
           "Releases the pool's hold on its memory; views still alive keep their blocks readable.")
      .def_property_readonly("closed", &HostPool::closed)
      .def_property_readonly("block_bytes", &HostPool::block_bytes)
      .def_property_readonly("num_blocks", &HostPool::num_blocks)
      .def_property_readonly("num_free", &HostPool::num_free)
      .def_property_readonly("capacity_bytes", [](const HostPool& p) { return p.num_blocks() * p.block_bytes(); })
      .def_property_readonly("base_ptr",
                             [](const HostPool& p) { return reinterpret_cast<uintptr_t>(p.region()->base()); })
      .def_property_readonly("page_kind", [](const HostPool& p) { return p.region()->page_kind(); })
      .def_property_readonly("cuda_registered", [](const HostPool& p) { return p.region()->cuda_registered(); });

  m.def("_live_regions", &Region::live_count, "Host regions currently mapped (for leak tests).");
}

}  // namespace cachedattn::bindings
