#include <pybind11/stl.h>

#include <map>

#include "bindings/bindings.h"
#include "io/io_engine.h"
#include "memory/host_pool.h"

namespace py = pybind11;

namespace cachedattn::bindings {

namespace {

DirectMode parse_direct(const std::string& s) {
  if (s == "off") return DirectMode::Off;
  if (s == "auto") return DirectMode::Auto;
  if (s == "on") return DirectMode::On;
  throw std::invalid_argument("direct must be 'off', 'auto' or 'on', not '" + s + "'");
}

// (File or fd, offset, address, length) tuples -> requests.
std::vector<IoRequest> to_requests(const py::sequence& items, IoOp op) {
  std::vector<IoRequest> reqs;
  reqs.reserve(items.size());
  std::map<int, FilePtr> fds;  // one wrapper per raw descriptor in this batch
  for (const py::handle item : items) {
    auto t = item.cast<py::tuple>();
    if (t.size() != 4) throw std::invalid_argument("each I/O request is (file, offset, address, length)");
    FilePtr file;
    if (py::isinstance<py::int_>(t[0])) {
      int fd = t[0].cast<int>();
      auto& slot = fds[fd];
      if (!slot) slot = std::make_shared<File>(fd);
      file = slot;
    } else {
      file = t[0].cast<FilePtr>();
    }
    auto offset = t[1].cast<int64_t>();
    auto length = t[3].cast<int64_t>();
    if (offset < 0 || length < 0) throw std::invalid_argument("I/O offset and length must be >= 0");
    reqs.push_back({std::move(file), op, static_cast<uint64_t>(offset), t[2].cast<uintptr_t>(),
                    static_cast<size_t>(length)});
  }
  return reqs;
}

}  // namespace

void bind_io(py::module_& m) {
  py::class_<File, FilePtr>(m, "File", "A file for the I/O engine (O_DIRECT where the filesystem allows it).")
      .def(py::init([](const std::string& path, const std::string& mode, const std::string& direct) {
             DirectMode d = parse_direct(direct);
             py::gil_scoped_release release;
             return std::make_shared<File>(path, mode, d);
           }),
           py::arg("path"), py::arg("mode") = "r", py::arg("direct") = "auto")
      .def_static(
          "openat",
          [](int dir_fd, const std::string& name, const std::string& mode, const std::string& direct,
             const std::string& label) {
            DirectMode d = parse_direct(direct);
            py::gil_scoped_release release;
            return File::openat(dir_fd, name, mode, d, label);
          },
          py::arg("dir_fd"), py::arg("name"), py::arg("mode") = "r", py::arg("direct") = "auto",
          py::arg("label") = "",
          "`name` in the directory open as dir_fd, never through a symbolic link and only if it is a "
          "regular file (OSError otherwise: ELOOP for a link, EISDIR/EINVAL for other file types). "
          "`label` names the file in errors and .path (default: name).")
      .def_property_readonly("path", &File::path)
      .def_property_readonly("direct", &File::direct, "Whether aligned transfers bypass the page cache.")
      .def_property_readonly("closed", &File::closed)
      .def("size", &File::size)
      .def("truncate", &File::truncate, py::arg("size"))
      .def("sync", &File::sync, py::call_guard<py::gil_scoped_release>())
      .def("close", &File::close)
      .def("__enter__", [](FilePtr f) { return f; })
      .def("__exit__", [](File& f, py::args) { f.close(); })
      .def("__repr__", [](const File& f) { return "<File '" + f.path() + "'" + (f.direct() ? " O_DIRECT>" : ">"); });

  py::class_<IoBatch, std::shared_ptr<IoBatch>>(m, "IoBatch", "Completion handle of one submitted batch.")
      .def(
          "wait",
          [](IoBatch& b, std::optional<double> timeout) {
            py::gil_scoped_release release;
            return b.wait(timeout ? *timeout : -1.0);
          },
          py::arg("timeout") = py::none(),
          "Blocks (GIL released) until every request ended; False on timeout. Raises OSError for a failed request.")
      .def("done", &IoBatch::done)
      .def_property_readonly("bytes", &IoBatch::bytes, "Bytes moved so far.");

  py::class_<IoEngine>(m, "IoEngine")
      .def_property_readonly("name", &IoEngine::name)
      .def_property_readonly("threads", &IoEngine::threads)
      .def(
          "read", [](IoEngine& e, const py::sequence& r) { return e.submit(to_requests(r, IoOp::Read)); },
          py::arg("requests"), "Reads (file, offset, address, length) requests; returns an IoBatch at once.")
      .def(
          "write", [](IoEngine& e, const py::sequence& r) { return e.submit(to_requests(r, IoOp::Write)); },
          py::arg("requests"), "Writes (file, offset, address, length) requests; returns an IoBatch at once.");

  m.def(
      "make_io_engine",
      [](const std::string& backend, int threads, int queue_depth, const std::string& uring_sysctl,
         std::shared_ptr<HostPool> pool) {
        IoEngineOptions o;
        o.backend = backend;
        o.threads = threads;
        o.queue_depth = queue_depth;
        o.uring_sysctl = uring_sysctl;
        if (pool) o.fixed_region = pool->region();
        std::string why;
        std::unique_ptr<IoEngine> engine;
        {
          py::gil_scoped_release release;
          engine = make_io_engine(o, &why);
        }
        return py::make_tuple(py::cast(std::move(engine)), why);
      },
      py::arg("backend"), py::arg("threads"), py::arg("queue_depth"), py::arg("uring_sysctl"),
      py::arg("pool") = nullptr, "(engine, why io_uring was not used or '').");
}

}  // namespace cachedattn::bindings
