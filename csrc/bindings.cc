// fastdqn._core: the private extension. Arrays in, arrays out; fastdqn/replay.py builds
// the public API (shapes, dtypes, friendly errors) on top. The checks here are the
// safety net: byte sizes, contiguity and item types, so no call can read or write out
// of bounds. The GIL is released around every copy and every wait.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "prefetcher.h"
#include "replay_buffer.h"

namespace py = pybind11;

namespace fastdqn {
namespace {

// `kind` is numpy's dtype kind ('f', 'i', 'b'); 0 accepts any item type of that size.
template <typename T>
T* Data(const py::object& obj, const std::string& name, int64_t items, char kind, bool writable) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(name + " must be a numpy array");
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (kind != 0 && (a.dtype().kind() != kind || a.itemsize() != static_cast<py::ssize_t>(sizeof(T)))) {
    throw py::type_error(name + " has dtype " + std::string(py::str(a.dtype())) + ", expected kind '" +
                         std::string(1, kind) + "' with " + std::to_string(sizeof(T)) + "-byte items");
  }
  if (!(a.flags() & py::array::c_style)) throw py::value_error(name + " must be C-contiguous");
  if (writable && !a.writeable()) throw py::value_error(name + " must be writeable");
  const int64_t nbytes = items * static_cast<int64_t>(sizeof(T));
  if (static_cast<int64_t>(a.nbytes()) != nbytes) {
    throw py::value_error(name + " holds " + std::to_string(a.nbytes()) + " bytes, expected " + std::to_string(nbytes));
  }
  return static_cast<T*>(writable ? a.mutable_data() : const_cast<void*>(a.data()));
}

// The number of items of `obj`, a numpy array (checked).
int64_t Items(const py::object& obj, const std::string& name) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(name + " must be a numpy array");
  return py::reinterpret_borrow<py::array>(obj).size();
}

BatchOutput ParseOutput(const ReplayBuffer& buffer, const py::dict& out, int64_t batch) {
  const BufferConfig& c = buffer.Config();
  auto field = [&](const char* key) -> py::object { return out.contains(key) ? py::object(out[key]) : py::object(py::none()); };
  BatchOutput o;
  o.batch_size = batch;
  const int64_t stack = c.frame_stack * c.frame_bytes;
  if (!field("frames").is_none()) {
    o.frames = Data<uint8_t>(field("frames"), "frames", batch * (c.frame_stack + c.n_step) * c.frame_bytes, 0, true);
    o.next_offset = Data<int64_t>(field("next_offset"), "next_offset", batch, 'i', true);
  } else {
    o.obs = Data<uint8_t>(field("obs"), "obs", batch * stack, 0, true);
    o.next_obs = Data<uint8_t>(field("next_obs"), "next_obs", batch * stack, 0, true);
  }
  o.actions = Data<uint8_t>(field("actions"), "actions", batch * c.action_bytes, 0, true);
  o.rewards = Data<float>(field("rewards"), "rewards", batch, 'f', true);
  o.terminated = Data<float>(field("terminated"), "terminated", batch, 'f', true);
  o.discounts = Data<float>(field("discounts"), "discounts", batch, 'f', true);
  o.indices = Data<int64_t>(field("indices"), "indices", batch, 'i', true);
  if (c.prioritized) o.weights = Data<float>(field("weights"), "weights", batch, 'f', true);
  return o;
}

// Owns the output arrays for as long as the worker may write into them: members are
// destroyed in reverse order, so the worker is joined before the arrays are released.
class PyPrefetcher {
 public:
  PyPrefetcher(std::shared_ptr<ReplayBuffer> buffer, py::list batches, int64_t batch_size) : batches_(batches) {
    std::vector<BatchOutput> slots;
    for (py::handle batch : batches_) slots.push_back(ParseOutput(*buffer, batch.cast<py::dict>(), batch_size));
    prefetcher_ = std::make_unique<Prefetcher>(std::move(buffer), std::move(slots));
  }
  int64_t Next() {
    py::gil_scoped_release release;
    return prefetcher_->Next();
  }
  void Close() {
    py::gil_scoped_release release;
    prefetcher_->Close();
  }

 private:
  py::list batches_;
  std::unique_ptr<Prefetcher> prefetcher_;
};

py::array View(py::object owner, void* data, std::vector<py::ssize_t> shape, py::dtype dtype) {
  return py::array(dtype, shape, {}, data, owner);
}

}  // namespace
}  // namespace fastdqn

PYBIND11_MODULE(_core, m) {
  using namespace fastdqn;
  m.doc() = "fastdqn's C++ replay buffer (private; use fastdqn.ReplayBuffer)";

  py::class_<ReplayBuffer, std::shared_ptr<ReplayBuffer>>(m, "ReplayBuffer")
      .def(py::init([](int64_t capacity, int64_t num_envs, int64_t frame_stack, int64_t frame_bytes, int64_t action_bytes,
                       int64_t n_step, double gamma, uint64_t seed, bool prioritized, double alpha, double eps) {
             BufferConfig c;
             c.capacity = capacity;
             c.num_envs = num_envs;
             c.frame_stack = frame_stack;
             c.frame_bytes = frame_bytes;
             c.action_bytes = action_bytes;
             c.n_step = n_step;
             c.gamma = gamma;
             c.seed = seed;
             c.prioritized = prioritized;
             c.alpha = alpha;
             c.eps = eps;
             return std::make_shared<ReplayBuffer>(c);
           }),
           py::arg("capacity"), py::arg("num_envs"), py::arg("frame_stack"), py::arg("frame_bytes"),
           py::arg("action_bytes"), py::arg("n_step"), py::arg("gamma"), py::arg("seed"), py::arg("prioritized"),
           py::arg("alpha"), py::arg("eps"))
      .def(
          "add",
          [](ReplayBuffer& self, const py::object& obs, const py::object& actions, const py::object& rewards,
             const py::object& next_obs, const py::object& terminated, const py::object& truncated,
             const py::object& env_ids) {
            const BufferConfig& c = self.Config();
            AddInput in;
            if (env_ids.is_none()) {
              in.rows = c.num_envs;
            } else {
              in.rows = Items(env_ids, "env_ids");
              in.env_ids = Data<int64_t>(env_ids, "env_ids", in.rows, 'i', false);
            }
            if (in.rows > c.num_envs) throw py::value_error("more rows than num_envs");
            const int64_t stack = c.frame_stack * c.frame_bytes;
            in.obs = Data<uint8_t>(obs, "obs", in.rows * stack, 0, false);
            in.next_obs = Data<uint8_t>(next_obs, "next_obs", in.rows * stack, 0, false);
            in.actions = Data<uint8_t>(actions, "actions", in.rows * c.action_bytes, 0, false);
            in.rewards = Data<float>(rewards, "rewards", in.rows, 'f', false);
            in.terminated = Data<bool>(terminated, "terminated", in.rows, 'b', false);
            in.truncated = Data<bool>(truncated, "truncated", in.rows, 'b', false);
            py::gil_scoped_release release;
            self.Add(in);
          },
          py::arg("obs"), py::arg("actions"), py::arg("rewards"), py::arg("next_obs"), py::arg("terminated"),
          py::arg("truncated"), py::arg("env_ids"))
      .def(
          "sample",
          [](ReplayBuffer& self, int64_t batch_size, const py::dict& out, double beta) {
            if (batch_size <= 0) throw py::value_error("batch_size must be > 0, got " + std::to_string(batch_size));
            BatchOutput o = ParseOutput(self, out, batch_size);
            py::gil_scoped_release release;
            self.Sample(o, beta);
          },
          py::arg("batch_size"), py::arg("out"), py::arg("beta"))
      .def(
          "get",
          [](const ReplayBuffer& self, const py::object& indices, const py::dict& out) {
            const int64_t count = py::reinterpret_borrow<py::array>(indices).size();
            const int64_t* idx = Data<int64_t>(indices, "indices", count, 'i', false);
            BatchOutput o = ParseOutput(self, out, count);
            o.weights = nullptr;
            py::gil_scoped_release release;
            self.Get(idx, count, o);
          },
          py::arg("indices"), py::arg("out"))
      .def(
          "update_priorities",
          [](ReplayBuffer& self, const py::object& indices, const py::object& priorities) {
            const int64_t count = py::reinterpret_borrow<py::array>(indices).size();
            const int64_t* idx = Data<int64_t>(indices, "indices", count, 'i', false);
            const double* p = Data<double>(priorities, "priorities", count, 'f', false);
            py::gil_scoped_release release;
            self.UpdatePriorities(idx, p, count);
          },
          py::arg("indices"), py::arg("priorities"))
      .def("valid_indices",
           [](const ReplayBuffer& self) {
             std::vector<int64_t> v;
             {
               py::gil_scoped_release release;
               v = self.ValidIndices();
             }
             return py::array_t<int64_t>(static_cast<py::ssize_t>(v.size()), v.data());
           })
      .def(
          "end_episodes",
          [](ReplayBuffer& self, const py::object& env_ids) {
            const int64_t* ids = nullptr;
            int64_t count = 0;
            if (!env_ids.is_none()) {
              count = Items(env_ids, "env_ids");
              ids = Data<int64_t>(env_ids, "env_ids", count, 'i', false);
            }
            py::gil_scoped_release release;
            self.EndEpisodes(ids, count);
          },
          py::arg("env_ids"))
      .def("size", &ReplayBuffer::Size)
      .def_property("beta", &ReplayBuffer::Beta, &ReplayBuffer::SetBeta)
      .def("priority_total", &ReplayBuffer::PriorityTotal)
      .def("max_priority", &ReplayBuffer::MaxPriority)
      .def("sampling_mass",
           [](const ReplayBuffer& self, const py::object& indices) {
             const int64_t count = py::reinterpret_borrow<py::array>(indices).size();
             const int64_t* idx = Data<int64_t>(indices, "indices", count, 'i', false);
             py::array_t<double> out(count);
             self.SamplingMass(idx, count, out.mutable_data());
             return out;
           })
      .def("priority_leaves",
           [](const ReplayBuffer& self) {
             std::vector<double> v = self.PriorityLeaves();
             return py::array_t<double>(static_cast<py::ssize_t>(v.size()), v.data());
           })
      // Views of the raw storage, sharing memory with the buffer (for save/load).
      .def("storage",
           [](py::object self_obj) {
             ReplayBuffer& self = self_obj.cast<ReplayBuffer&>();
             const BufferConfig& c = self.Config();
             py::dict views;
             views["frames"] = View(self_obj, self.Frames(), {c.capacity, c.frame_bytes}, py::dtype::of<uint8_t>());
             views["actions"] = View(self_obj, self.Actions(), {c.capacity, c.action_bytes}, py::dtype::of<uint8_t>());
             views["rewards"] = View(self_obj, self.Rewards(), {c.capacity}, py::dtype::of<float>());
             views["flags"] = View(self_obj, self.Flags(), {c.capacity}, py::dtype::of<uint8_t>());
             return views;
           })
      .def("state",
           [](const ReplayBuffer& self) {
             BufferState s = self.State();
             py::dict d;
             d["end"] = s.end;
             d["episode_open"] = std::vector<bool>(s.episode_open.begin(), s.episode_open.end());
             d["episode_first_seq"] = s.episode_first_seq;
             d["sample_calls"] = s.sample_calls;
             d["max_priority"] = s.max_priority;
             d["beta"] = s.beta;
             return d;
           })
      .def(
          "restore",
          [](ReplayBuffer& self, const py::dict& d, const py::object& leaves) {
            BufferState s;
            s.end = d["end"].cast<std::vector<int64_t>>();
            for (bool open : d["episode_open"].cast<std::vector<bool>>()) s.episode_open.push_back(open);
            s.episode_first_seq = d["episode_first_seq"].cast<std::vector<int64_t>>();
            s.sample_calls = d["sample_calls"].cast<uint64_t>();
            s.max_priority = d["max_priority"].cast<double>();
            s.beta = d["beta"].cast<double>();
            const BufferConfig& c = self.Config();
            const double* p = c.prioritized ? Data<double>(leaves, "leaves", c.capacity, 'f', false) : nullptr;
            py::gil_scoped_release release;
            self.Restore(s, p);
          },
          py::arg("state"), py::arg("leaves"));

  py::class_<PyPrefetcher>(m, "Prefetcher")
      .def(py::init<std::shared_ptr<ReplayBuffer>, py::list, int64_t>(), py::arg("buffer"), py::arg("batches"),
           py::arg("batch_size"))
      .def("next", &PyPrefetcher::Next)
      .def("close", &PyPrefetcher::Close);
}
