// fasq::pq_linear and fasq::pq_linear_parts on the CPU, registered in C++ on the CPU dispatch
// key (kernels/cpu/torch_ops.py builds this file against the installed torch and loads it).
//
// Why: a decode token calls the op once per layer (112 times at 1B, 210 in the default model).
// Through the Python implementation a call costs about 10 us besides the kernel (dispatch into
// Python, selection, the prepared layer's lookup, checks, ctypes); here about 2 us, the rest of
// the work having been done once, when the layer was prepared.
//
// A call takes the fast path when every tensor is one an int8 layer was prepared from and
// tracked (kernels/cpu/int8.py: the same TensorImpl, at the same version and data pointer) and
// automatic selection would send it to the int8 kernel: 1 to max_tokens tokens of contiguous
// fp32 / fp16 / bf16 x, FASQ_CPU_KERNEL unset or "auto", FASQ_CPU_INT8 not off, no
// `use_kernel` block. Every other call goes, unchanged, to the Python implementation
// (fasq_cpu::pq_linear and fasq_cpu::pq_linear_parts, kernels/cpu/linear.py), which selects,
// prepares (and tracks), checks and raises as before. The int8 kernels are the ctypes
// library's (pq_cpu_int8.cpp), passed in by address: this file links only to torch.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <atomic>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <strings.h>  // strncasecmp
#include <unordered_map>
#include <vector>

namespace {

using c10::TensorImpl;
using OptTensor = std::optional<at::Tensor>;

// the library's entry points (pq_cpu_int8.cpp): 0 on success
using LinearFn = int (*)(const void* layer, const void* x, int x_dtype, int64_t T, void* y, int nthreads);
using PartsFn = int (*)(const void* const* layers, int n, const void* x, int x_dtype, int64_t T, void* y,
                        int nthreads);
std::atomic<LinearFn> g_linear{nullptr};
std::atomic<PartsFn> g_parts{nullptr};
std::atomic<int64_t> g_max_tokens{0};
std::atomic<int> g_forced{0};  // a use_kernel block is open: every call goes to Python
std::atomic<int> g_paused{0};  // a torch_ops.python_only block is open: the same
std::atomic<int64_t> g_hits{0}, g_misses{0};

// One tensor a layer was prepared from. The weak reference keeps the TensorImpl's memory (not
// its data) from being reused while tracked, so an equal address is the same tensor.
struct Ref {
  std::optional<c10::weak_intrusive_ptr<TensorImpl>> weak;
  const TensorImpl* impl = nullptr;  // null: absent (None)
  int64_t version = 0;
  const void* data = nullptr;

  bool matches(const at::Tensor* t) const {
    if (t == nullptr) return impl == nullptr;
    if (t->unsafeGetTensorImpl() != impl || t->const_data_ptr() != data) return false;
    // an inference tensor has no version counter: -1 (library.version, which explains it)
    return (t->is_inference() ? -1 : static_cast<int64_t>(t->_version())) == version;
  }
};

struct Layer {
  Ref refs[5];  // codes, codebooks, scales, offsets, bias
  const void* prepared = nullptr;  // the library's Int8Layer
  int64_t in = 0, out = 0;
};

std::shared_mutex g_mutex;
std::unordered_map<const TensorImpl*, Layer> g_layers;  // by the codes' TensorImpl

Ref make_ref(int64_t cdata, int64_t version, int64_t data) {
  Ref r;
  if (cdata == 0) return r;
  auto* impl = reinterpret_cast<TensorImpl*>(cdata);
  // the caller holds the tensor: a new owning pointer is safe, and the weak one outlives it
  auto strong = c10::intrusive_ptr<TensorImpl>::unsafe_reclaim_from_nonowning(impl);
  r.weak.emplace(strong);
  r.impl = impl, r.version = version, r.data = reinterpret_cast<const void*>(data);
  return r;
}

// Whether environment variable `name`, stripped, is one of `values` (any case).
bool env_is(const char* name, std::initializer_list<const char*> values) {
  const char* v = std::getenv(name);
  if (v == nullptr) return false;
  while (*v && std::isspace(static_cast<unsigned char>(*v))) v++;
  size_t n = std::strlen(v);
  while (n && std::isspace(static_cast<unsigned char>(v[n - 1]))) n--;
  for (const char* want : values)
    if (n == std::strlen(want) && strncasecmp(v, want, n) == 0) return true;
  return false;
}

// Whether automatic selection runs now (no forced path) and may take the int8 kernel: the
// settings read as linear.pq_linear_cpu reads them (FASQ_CPU_KERNEL as it is; FASQ_CPU_INT8
// stripped and lower-cased against library.OFF).
bool automatic() {
  if (g_forced.load(std::memory_order_relaxed) || g_paused.load(std::memory_order_relaxed) ||
      g_linear.load(std::memory_order_relaxed) == nullptr)
    return false;
  const char* k = std::getenv("FASQ_CPU_KERNEL");
  if (k != nullptr && *k && std::strcmp(k, "auto") != 0) return false;  // Python checks the value
  return !env_is("FASQ_CPU_INT8", {"0", "false", "no", "off"});
}

// x's element-type code for the library (0 fp32, 1 fp16, 2 bf16), -1 for others.
int dtype_code(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: return -1;
  }
}

// Tokens of a decode-sized call the fast path takes, else 0.
int64_t decode_tokens(const at::Tensor& x, int64_t in) {
  if (x.dim() < 1 || x.size(-1) != in || in == 0 || dtype_code(x) < 0 || !x.is_contiguous())
    return 0;
  const int64_t T = x.numel() / in;
  return (T >= 1 && T <= g_max_tokens.load(std::memory_order_relaxed)) ? T : 0;
}

// The prepared layer of one matrix if its tensors are the tracked ones, else null. Shared lock held.
const Layer* find(const at::Tensor& codes, const at::Tensor* codebooks, const at::Tensor* scales,
                  const at::Tensor* offsets, const at::Tensor* bias) {
  auto it = g_layers.find(codes.unsafeGetTensorImpl());
  if (it == g_layers.end()) return nullptr;
  const Layer& l = it->second;
  const at::Tensor* ts[5] = {&codes, codebooks, scales, offsets, bias};
  for (int i = 0; i < 5; i++)
    if (!l.refs[i].matches(ts[i])) return nullptr;
  return &l;
}

const at::Tensor* opt(const OptTensor& t) { return t.has_value() ? &*t : nullptr; }

at::Tensor output(const at::Tensor& x, int64_t out) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = out;
  return at::empty(sizes, x.options());
}

at::Tensor python_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                         const OptTensor& scales, const OptTensor& offsets, const OptTensor& bias) {
  g_misses.fetch_add(1, std::memory_order_relaxed);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fasq_cpu::pq_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                         const OptTensor&, const OptTensor&)>();
  return op.call(x, codes, codebooks, scales, offsets, bias);
}

at::Tensor pq_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                     const OptTensor& scales, const OptTensor& offsets, const OptTensor& bias) {
  if (automatic()) {
    const void* prepared = nullptr;
    int64_t in = 0, out = 0;
    {
      std::shared_lock<std::shared_mutex> lock(g_mutex);
      if (const Layer* l = find(codes, &codebooks, opt(scales), opt(offsets), opt(bias)))
        prepared = l->prepared, in = l->in, out = l->out;
    }
    const int64_t T = prepared ? decode_tokens(x, in) : 0;
    if (T) {
      at::Tensor y = output(x, out);
      if (g_linear.load()(prepared, x.const_data_ptr(), dtype_code(x), T, y.mutable_data_ptr(),
                          at::get_num_threads()) == 0) {
        g_hits.fetch_add(1, std::memory_order_relaxed);
        return y;
      }
    }
  }
  return python_linear(x, codes, codebooks, scales, offsets, bias);
}

at::Tensor python_parts(const at::Tensor& x, const at::TensorList codes, const at::TensorList codebooks,
                        const c10::List<OptTensor>& scales, const c10::List<OptTensor>& offsets) {
  g_misses.fetch_add(1, std::memory_order_relaxed);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fasq_cpu::pq_linear_parts", "")
                       .typed<at::Tensor(const at::Tensor&, at::TensorList, at::TensorList,
                                         const c10::List<OptTensor>&, const c10::List<OptTensor>&)>();
  return op.call(x, codes, codebooks, scales, offsets);
}

at::Tensor pq_linear_parts(const at::Tensor& x, const at::TensorList codes, const at::TensorList codebooks,
                           const c10::List<OptTensor>& scales, const c10::List<OptTensor>& offsets) {
  const size_t n = codes.size();
  if (automatic() && n > 0 && codebooks.size() == n && scales.size() == n && offsets.size() == n) {
    std::vector<const void*> prepared(n);
    int64_t in = -1, out = 0;
    {
      std::shared_lock<std::shared_mutex> lock(g_mutex);
      for (size_t i = 0; i < n; i++) {
        const OptTensor s = scales.get(i), o = offsets.get(i);
        const Layer* l = find(codes[i], &codebooks[i], opt(s), opt(o), nullptr);
        if (l == nullptr || (in >= 0 && l->in != in)) {
          in = -1;
          break;
        }
        prepared[i] = l->prepared, in = l->in, out += l->out;
      }
    }
    const int64_t T = in >= 0 ? decode_tokens(x, in) : 0;
    if (T) {
      at::Tensor y = output(x, out);
      if (g_parts.load()(prepared.data(), static_cast<int>(n), x.const_data_ptr(), dtype_code(x), T,
                         y.mutable_data_ptr(), at::get_num_threads()) == 0) {
        g_hits.fetch_add(1, std::memory_order_relaxed);
        return y;
      }
    }
  }
  return python_parts(x, codes, codebooks, scales, offsets);
}

}  // namespace

TORCH_LIBRARY_IMPL(fasq, CPU, m) {
  m.impl("pq_linear", pq_linear);
  m.impl("pq_linear_parts", pq_linear_parts);
}

extern "C" {

// The library's int8 entry points (fasq_cpu_int8_linear, fasq_cpu_int8_linear_parts) and
// the most tokens the int8 path takes (dispatch.CPU_INT8_MAX_TOKENS); until then every call
// goes to Python.
void fasq_ops_init(void* linear, void* parts, int64_t max_tokens) {
  g_max_tokens = max_tokens;
  g_parts = reinterpret_cast<PartsFn>(parts);
  g_linear = reinterpret_cast<LinearFn>(linear);
}

// Track a prepared int8 layer (replacing what its codes tensor had). Per tensor (codes,
// codebooks, scales, offsets, bias): its address (torch's Tensor._cdata, 0 for None), version
// and data pointer, which the caller read while holding it.
void fasq_ops_track(const int64_t* cdata, const int64_t* versions, const int64_t* data, const void* prepared,
                    int64_t in, int64_t out) {
  Layer l;
  for (int i = 0; i < 5; i++) l.refs[i] = make_ref(cdata[i], versions[i], data[i]);
  l.prepared = prepared, l.in = in, l.out = out;
  std::unique_lock<std::shared_mutex> lock(g_mutex);
  g_layers[reinterpret_cast<const TensorImpl*>(cdata[0])] = std::move(l);
}

// Forget the layer tracked under codes address `codes` if it is still `prepared` (the prepared
// copies are being freed). Returns whether one was removed.
int fasq_ops_untrack(int64_t codes, const void* prepared) {
  std::unique_lock<std::shared_mutex> lock(g_mutex);
  auto it = g_layers.find(reinterpret_cast<const TensorImpl*>(codes));
  if (it == g_layers.end() || it->second.prepared != prepared) return 0;
  g_layers.erase(it);
  return 1;
}

// A use_kernel block opened (1) or closed (0): while open every call goes to Python.
int fasq_ops_set_forced(int forced) { return g_forced.exchange(forced); }

// The same for torch_ops.python_only blocks; returns the previous setting.
int fasq_ops_set_paused(int paused) { return g_paused.exchange(paused); }

// Calls the fast path took and calls it passed to Python, since the last reset (tests).
void fasq_ops_counts(int64_t* out, int reset) {
  out[0] = reset ? g_hits.exchange(0) : g_hits.load();
  out[1] = reset ? g_misses.exchange(0) : g_misses.load();
}

int64_t fasq_ops_tracked() {
  std::shared_lock<std::shared_mutex> lock(g_mutex);
  return static_cast<int64_t>(g_layers.size());
}

}  // extern "C"
