// Packed (reordered) copies of weights kept between calls, for the kernels whose per-call weight packing is
// a sizeable part of their time.
//
// One entry per weight tensor, held weakly (a dead weight's packed copy is freed by the next call that looks
// here), valid while that tensor's data pointer and version counter are unchanged and for the key it was
// packed for; another key repacks it, so the cache holds at most one packed copy of each weight. Weights that
// require grad are not cached (they change every training step), nor are inference tensors (they have no
// version counter). A weight changed through `.data` (which has a version counter of its own) is not seen.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

namespace fastops {

// The first value of every key: which kernel's packing the entry holds.
enum : int64_t { kConvOneDnnKey = -1, kConvGemmKey = -2, kSpatialReductionKey = -3 };

class PackedWeights {
 public:
  static PackedWeights& get() {
    static PackedWeights* cache = new PackedWeights();  // never destroyed: no tensor freed after torch at exit
    return *cache;
  }

  // Caching is on only inside fastops' own Python entry points (fastops.ops._registration.call turns it on
  // around each eager call, in the calling thread). A direct call of the op, as torch.compile's generated
  // code makes, packs afresh: Inductor reuses one buffer for several intermediate tensors (two folded conv
  // weights in turn) and writes it without bumping any version counter, so a cached copy would go stale.
  static bool& keep_flag() {
    static thread_local bool keep = false;
    return keep;
  }

  static bool cacheable(const at::Tensor& w) { return keep_flag() && !w.requires_grad() && !w.is_inference(); }

  // The packed copy of w for `key`, made by make() (a function returning the packed tensor) on a miss. Only
  // for weights that are cacheable(); make() runs under the cache's lock.
  template <typename Make>
  at::Tensor find_or_make(const at::Tensor& w, std::vector<int64_t> key, Make make) {
    const c10::TensorImpl* impl = w.unsafeGetTensorImpl();
    const auto version = impl->version_counter().current_version();
    std::lock_guard<std::mutex> lock(mu_);
    ++clock_;
    // The packed copies of weights that died (a model deleted) go at the next call, hit or miss.
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(), [](const Entry& e) { return e.weight.expired(); }),
                   entries_.end());
    for (Entry& e : entries_)
      if (e.impl == impl && e.key == key && e.data == w.data_ptr() && e.version == version) {
        e.used = clock_;
        return e.packed;
      }
    c10::InferenceMode normal_tensors(false);  // the entry outlives an inference_mode block it may be made in
    at::Tensor packed = make();
    // Drop this weight's stale entry, then the least recently used while full.
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(), [&](const Entry& e) { return e.impl == impl; }),
                   entries_.end());
    if (entries_.size() >= kMaxEntries)
      entries_.erase(std::min_element(entries_.begin(), entries_.end(),
                                      [](const Entry& a, const Entry& b) { return a.used < b.used; }));
    entries_.push_back({c10::weak_intrusive_ptr<c10::TensorImpl>(w.getIntrusivePtr()), impl, std::move(key),
                        w.data_ptr(), version, packed, clock_});
    return packed;
  }

 private:
  // A ResNet-152's convolutions at two input sizes fit.
  static constexpr size_t kMaxEntries = 512;
  struct Entry {
    c10::weak_intrusive_ptr<c10::TensorImpl> weight;
    const c10::TensorImpl* impl;
    std::vector<int64_t> key;
    const void* data;
    uint32_t version;
    at::Tensor packed;
    uint64_t used;
  };
  std::mutex mu_;
  std::vector<Entry> entries_;
  uint64_t clock_ = 0;
};

}  // namespace fastops
