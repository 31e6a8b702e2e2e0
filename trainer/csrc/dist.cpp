// Data-parallel collectives and autocast for mae-train on libtorch's own c10d engine: a TCPStore
// rendezvous and a Gloo (CPU) or NCCL (CUDA) process group, behind a small C interface.
// Tensors arrive as tch's `C_tensor` pointers, which are `at::Tensor*`.
//
// Every function returns 0 on success and -1 on failure; the failure's message is then
// available from mae_dist_last_error() on the same thread.

#include <chrono>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef MAE_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace {

thread_local std::string last_error;

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return -1;
}

std::vector<at::Tensor> tensors_of(void* const* ptrs, int n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (int i = 0; i < n; ++i) {
    v.push_back(*static_cast<at::Tensor*>(ptrs[i]));
  }
  return v;
}

void wait(const c10::intrusive_ptr<c10d::Work>& work, const Group* g) {
  if (!work->wait(g->timeout)) {
    throw std::runtime_error("collective did not complete within the timeout");
  }
}

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

}  // namespace

extern "C" {

const char* mae_dist_last_error() { return last_error.c_str(); }

int mae_dist_nccl_available() {
#ifdef MAE_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

// Joins the group: rank 0 serves the TCPStore at host:port and waits for the others.
// backend: "gloo" or "nccl". interface: a network interface for Gloo, or empty.
int mae_dist_init(const char* backend, const char* host, int port, int rank, int world,
                  long long timeout_ms, const char* interface, void** out) {
  return guarded([&] {
    auto g = std::make_unique<Group>();
    g->timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(port);
    so.isServer = rank == 0;
    so.numWorkers = static_cast<std::size_t>(world);
    so.waitWorkers = true;
    so.timeout = g->timeout;
    g->store = c10::make_intrusive<c10d::TCPStore>(std::string(host), so);
    std::string b(backend);
    if (b == "gloo") {
      auto opts = c10d::ProcessGroupGloo::Options::create(g->timeout);
      std::string iface(interface);
      if (!iface.empty()) {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
      } else if (is_loopback(host)) {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      } else {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(g->store, rank, world, opts);
    } else if (b == "nccl") {
#ifdef MAE_WITH_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = g->timeout;
      g->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(g->store, rank, world, opts);
#else
      throw std::runtime_error("this mae-train was built without NCCL support");
#endif
    } else {
      throw std::runtime_error("unknown backend '" + b + "' (expected gloo or nccl)");
    }
    *out = g.release();
  });
}

void mae_dist_free(void* group) { delete static_cast<Group*>(group); }

// In-place sum over all ranks of each tensor.
int mae_dist_allreduce_sum(void* group, void* const* tensors, int n) {
  return guarded([&] {
    auto* g = static_cast<Group*>(group);
    auto v = tensors_of(tensors, n);
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    wait(g->backend->allreduce(v, o), g);
  });
}

// In-place broadcast of each tensor from `root`.
int mae_dist_broadcast(void* group, void* const* tensors, int n, int root) {
  return guarded([&] {
    auto* g = static_cast<Group*>(group);
    auto v = tensors_of(tensors, n);
    c10d::BroadcastOptions o;
    o.rootRank = root;
    wait(g->backend->broadcast(v, o), g);
  });
}

// Gathers `input` from every rank into `outputs[0..world)` (same shape and dtype everywhere).
int mae_dist_allgather(void* group, void* input, void* const* outputs, int world) {
  return guarded([&] {
    auto* g = static_cast<Group*>(group);
    std::vector<at::Tensor> in{*static_cast<at::Tensor*>(input)};
    std::vector<std::vector<at::Tensor>> out{tensors_of(outputs, world)};
    wait(g->backend->allgather(out, in), g);
  });
}

int mae_dist_barrier(void* group) {
  return guarded([&] {
    auto* g = static_cast<Group*>(group);
    wait(g->backend->barrier(), g);
  });
}

}  // extern "C"
