// A counting CPU allocator for bench/plan_worker.py: installed over torch's CPU allocator, it adds each tensor's bytes
// to a running total when it is allocated and takes them off when it is freed, on whichever thread frees it, and keeps
// the total's peak (what torch.cuda.max_memory_allocated is on a GPU). The profiler's profile_memory keeps such a total
// too, but only for frees on a thread it profiles: a tensor whose last reference a gloo worker thread drops (the
// Work of an asynchronous collective) stays counted after it is freed.
#include <torch/extension.h>

#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstring>

namespace {

std::atomic<int64_t> current{0};
std::atomic<int64_t> peak{0};
c10::Allocator* wrapped = nullptr;

struct Block {
  c10::DataPtr data;  // the wrapped allocator's: freeing the Block frees the memory
  int64_t bytes;
};

void release(void* context) {
  auto* block = static_cast<Block*>(context);
  current.fetch_sub(block->bytes);
  delete block;
}

void raise_peak(int64_t now) {
  int64_t seen = peak.load();
  while (now > seen && !peak.compare_exchange_weak(seen, now)) {
  }
}

struct CountingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr data = wrapped->allocate(n);
    if (n == 0) {
      return data;
    }
    void* ptr = data.get();
    c10::Device device = data.device();
    raise_peak(current.fetch_add(static_cast<int64_t>(n)) + static_cast<int64_t>(n));
    return {ptr, new Block{std::move(data), static_cast<int64_t>(n)}, &release, device};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

CountingAllocator counting;

// Counts every CPU tensor allocated from now on (those allocated before are freed as they were allocated).
void install() {
  if (wrapped == nullptr) {
    wrapped = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&counting, /*priority=*/UINT8_MAX);
  }
}

// The peak from now on starts at the current total.
void reset_peak() { peak.store(current.load()); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("install", &install, "count every CPU tensor allocated from now on");
  m.def("allocated", [] { return current.load(); }, "bytes of the counted tensors alive now");
  m.def("peak", [] { return peak.load(); }, "the largest allocated() since install or reset_peak");
  m.def("reset_peak", &reset_peak, "start the peak again from allocated()");
}
