#include <pybind11/stl.h>

#include "bindings/bindings.h"
#include "cpu/kernels_ref.h"
#include "cuda/cuda_api.h"

namespace py = pybind11;

namespace cachedattn::bindings {

namespace {

using cuda::Direction;

Direction parse_direction(const std::string& s) {
  if (s == "h2d") return Direction::HostToDevice;
  if (s == "d2h") return Direction::DeviceToHost;
  throw std::invalid_argument("direction must be 'h2d' or 'd2h', not '" + s + "'");
}

std::vector<Segment> to_segments(const std::vector<std::tuple<uintptr_t, uintptr_t, size_t>>& items) {
  std::vector<Segment> out;
  out.reserve(items.size());
  for (const auto& [src, dst, bytes] : items) out.push_back({src, dst, bytes});
  return out;
}

RopeArgs rope_args(uintptr_t src, uintptr_t dst, size_t rows, int head_dim, int rotary_dim, bool interleaved,
                   int dtype, double delta, const std::vector<float>& inv_freq) {
  if (inv_freq.size() * 2 != static_cast<size_t>(rotary_dim))
    throw std::invalid_argument("inv_freq has " + std::to_string(inv_freq.size()) + " entries; rotary_dim " +
                                std::to_string(rotary_dim) + " needs " + std::to_string(rotary_dim / 2));
  RopeArgs a{src, dst, rows, head_dim, rotary_dim, interleaved, dtype_from_int(dtype), {}};
  a.cos_sin = rope_cos_sin(delta, inv_freq.data(), rotary_dim / 2);
  check_rope_args(a);
  return a;
}

#define ROPE_PARAMS                                                                                 \
  py::arg("src"), py::arg("dst"), py::arg("rows"), py::arg("head_dim"), py::arg("rotary_dim"),      \
      py::arg("interleaved"), py::arg("dtype"), py::arg("delta"), py::arg("inv_freq")

}  // namespace

void bind_kernels(py::module_& m) {
  m.def(
      "segment_copy_cpu",
      [](const std::vector<std::tuple<uintptr_t, uintptr_t, size_t>>& segs) {
        auto s = to_segments(segs);
        py::gil_scoped_release release;
        cpu::segment_copy(s);
      },
      py::arg("segments"), "CPU reference of the segment-copy kernel: (src, dst, bytes) triples.");
  m.def(
      "rope_rotate_cpu",
      [](uintptr_t src, uintptr_t dst, size_t rows, int head_dim, int rotary_dim, bool interleaved, int dtype,
         double delta, const std::vector<float>& inv_freq) {
        RopeArgs a = rope_args(src, dst, rows, head_dim, rotary_dim, interleaved, dtype, delta, inv_freq);
        py::gil_scoped_release release;
        cpu::rope_rotate(a);
      },
      ROPE_PARAMS, "CPU reference of the RoPE re-rotation kernel (keys rotated by `delta` positions).");

  // Every call that issues or waits releases the GIL once its arguments are
  // C++ values: issuing thousands of copies, or a host wait, must not stall
  // the other Python threads (the store's I/O, the server).
  using Segs = std::vector<std::tuple<uintptr_t, uintptr_t, size_t>>;
  py::class_<cuda::CopyEngine>(m, "CopyEngine",
                               "Dedicated H2D/D2H streams with per-epoch layer events and tickets (see GPU_API).")
      .def(py::init<int, int>(), py::arg("device"), py::arg("num_layers"))
      .def_property_readonly("device", &cuda::CopyEngine::device)
      .def_property_readonly("num_layers", &cuda::CopyEngine::num_layers)
      .def(
          "stream", [](const cuda::CopyEngine& e, const std::string& d) { return e.stream(parse_direction(d)); },
          py::arg("direction"), "The direction's cudaStream_t as an int.")
      .def("begin_epoch", &cuda::CopyEngine::begin_epoch,
           "Opens a new epoch (one per load) and returns it; other open epochs keep their layer events.")
      .def("end_epoch", &cuda::CopyEngine::end_epoch, py::arg("epoch"),
           "Forgets an epoch's layer events: waiting on them afterwards raises.")
      .def(
          "copy_batch",
          [](cuda::CopyEngine& e, const std::string& d, const Segs& s, int layer, int64_t epoch) {
            Direction dir = parse_direction(d);
            auto segs = to_segments(s);
            py::gil_scoped_release release;
            e.copy_batch(dir, segs, layer, epoch);
          },
          py::arg("direction"), py::arg("segments"), py::arg("layer") = -1, py::arg("epoch") = -1)
      .def(
          "copy_2d",
          [](cuda::CopyEngine& e, const std::string& d, uintptr_t src, size_t src_pitch, uintptr_t dst,
             size_t dst_pitch, size_t width, size_t height, int layer, int64_t epoch) {
            Direction dir = parse_direction(d);
            py::gil_scoped_release release;
            e.copy_2d(dir, src, src_pitch, dst, dst_pitch, width, height, layer, epoch);
          },
          py::arg("direction"), py::arg("src"), py::arg("src_pitch"), py::arg("dst"), py::arg("dst_pitch"),
          py::arg("width"), py::arg("height"), py::arg("layer") = -1, py::arg("epoch") = -1,
          "One strided copy: `height` rows of `width` bytes, rows `src_pitch` / `dst_pitch` bytes apart.")
      .def(
          "segment_copy",
          [](cuda::CopyEngine& e, const std::string& d, const Segs& s, int layer, int64_t epoch) {
            Direction dir = parse_direction(d);
            auto segs = to_segments(s);
            py::gil_scoped_release release;
            e.segment_copy(dir, segs, layer, epoch);
          },
          py::arg("direction"), py::arg("segments"), py::arg("layer") = -1, py::arg("epoch") = -1)
      .def(
          "rope_copy",
          [](cuda::CopyEngine& e, uintptr_t src, uintptr_t dst, size_t rows, int head_dim, int rotary_dim,
             bool interleaved, int dtype, double delta, const std::vector<float>& inv_freq, int layer,
             int64_t epoch) {
            RopeArgs a = rope_args(src, dst, rows, head_dim, rotary_dim, interleaved, dtype, delta, inv_freq);
            py::gil_scoped_release release;
            e.rope_copy(a, layer, epoch);
          },
          ROPE_PARAMS, py::arg("layer") = -1, py::arg("epoch") = -1)
      .def(
          "stream_wait_layer",
          [](cuda::CopyEngine& e, const std::string& d, int layer, uintptr_t stream, int64_t epoch) {
            Direction dir = parse_direction(d);
            py::gil_scoped_release release;
            e.stream_wait_layer(dir, layer, stream, epoch);
          },
          py::arg("direction"), py::arg("layer"), py::arg("stream"), py::arg("epoch") = -1)
      .def(
          "wait_layer",
          [](cuda::CopyEngine& e, const std::string& d, int layer, int64_t epoch) {
            Direction dir = parse_direction(d);
            py::gil_scoped_release release;
            e.wait_layer(dir, layer, epoch);
          },
          py::arg("direction"), py::arg("layer"), py::arg("epoch") = -1,
          "Blocks until the layer's copies of the epoch are done.")
      .def(
          "wait_for_stream",
          [](cuda::CopyEngine& e, const std::string& d, uintptr_t stream) {
            Direction dir = parse_direction(d);
            py::gil_scoped_release release;
            e.wait_for_stream(dir, stream);
          },
          py::arg("direction"), py::arg("stream"))
      .def(
          "layer_done",
          [](const cuda::CopyEngine& e, const std::string& d, int layer, int64_t epoch) {
            return e.layer_done(parse_direction(d), layer, epoch);
          },
          py::arg("direction"), py::arg("layer"), py::arg("epoch") = -1)
      .def(
          "record", [](cuda::CopyEngine& e, const std::string& d) { return e.record(parse_direction(d)); },
          py::arg("direction"), "A ticket marking every copy issued so far in the direction.")
      .def("ticket_done", &cuda::CopyEngine::ticket_done, py::arg("ticket"))
      .def(
          "wait_ticket",
          [](cuda::CopyEngine& e, int64_t ticket) {
            py::gil_scoped_release release;
            e.wait_ticket(ticket);
          },
          py::arg("ticket"))
      .def(
          "synchronize",
          [](cuda::CopyEngine& e, const std::string& d) {
            Direction dir = parse_direction(d);
            py::gil_scoped_release release;
            e.synchronize(dir);
          },
          py::arg("direction"));
}

}  // namespace cachedattn::bindings
