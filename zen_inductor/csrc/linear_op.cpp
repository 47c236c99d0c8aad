// zen::quant_linear.native: the compiled graph's call of one of our C++ linear entries, with no
// Python between Inductor's wrapper and the kernel. At decode a linear's kernel runs 10-40 us;
// the Python op around it cost ~30 us a call, as much again.
//
// Every linear entry (woq_avx2.cpp, woq_avx512.cpp, a8w4_avx2.cpp, bf16_gemv_*.cpp) takes
//   (x, *weight, bias, y, M, N, *dims, x_bf16, y_bf16, has_bias, *extra, swiglu, residual, has_residual)
// and nothing but pointers and int64s. Python binds each entry's address and declared argument
// count once its library is loaded (zen_bind_native); this op lays the arguments out as 64-bit
// words in that order and calls the entry through a function type of exactly that many int64
// parameters, which the x86-64 System V ABI passes as it passes the pointers and int64s declared.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

constexpr size_t kMostWords = 24;

struct Entry {
  void* address;
  size_t words;
};

std::mutex entries_mutex;

std::unordered_map<std::string, Entry>& entries() {
  static std::unordered_map<std::string, Entry> table;
  return table;
}

Entry find_entry(const std::string& name) {
  std::lock_guard<std::mutex> lock(entries_mutex);
  auto it = entries().find(name);
  TORCH_CHECK(it != entries().end(), "zen: the native entry '", name,
              "' is not loaded in this process (zen_inductor.native.load binds it)");
  return it->second;
}

template <size_t>
using Word = int64_t;

template <size_t... I>
void call_with(void* address, const int64_t* w, std::index_sequence<I...>) {
  reinterpret_cast<void (*)(Word<I>...)>(address)(w[I]...);
}

template <size_t... N>
void call_entry(const Entry& entry, const std::vector<int64_t>& words, std::index_sequence<N...>) {
  // one arm per possible argument count; exactly one matches
  bool called = ((entry.words == N ? (call_with(entry.address, words.data(), std::make_index_sequence<N>{}), true)
                                   : false) || ...);
  TORCH_CHECK(called, "zen: a native entry with ", entry.words, " arguments");
}

int64_t word(const at::Tensor& t) {
  return reinterpret_cast<int64_t>(t.data_ptr());
}

// fp32 with rows packed, as every entry reads bias and residual
at::Tensor fp32_contiguous(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
}

at::Tensor native_linear(const at::Tensor& x_in, at::TensorList weight, const std::optional<at::Tensor>& bias_in,
                         c10::string_view entry_name, int64_t n, at::IntArrayRef dims, at::IntArrayRef extra,
                         bool swiglu, const std::optional<at::Tensor>& residual_in) {
  TORCH_CHECK(x_in.dim() == 2, "zen: quant_linear.native takes a 2-D x, got ", x_in.dim(), "-D");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "zen: quant_linear.native takes fp32 or bf16 x, got ", x_in.scalar_type());
  TORCH_CHECK(!weight.empty(), "zen: quant_linear.native without a weight");
  const at::Tensor x = x_in.is_contiguous() ? x_in : x_in.contiguous();
  const int64_t m = x.size(0), out_n = swiglu ? n / 2 : n;
  const bool has_residual = residual_in.has_value(), has_bias = bias_in.has_value();
  at::Tensor residual, bias;
  if (has_residual) {
    residual = fp32_contiguous(*residual_in);
    TORCH_CHECK(residual.dim() == 2 && residual.size(0) == m && residual.size(1) == out_n,
                "zen: the residual of quant_linear.native must be [M, N_out]");
  }
  if (has_bias) {
    bias = fp32_contiguous(*bias_in);
  }
  at::Tensor y = at::empty({m, out_n}, x.options().dtype(has_residual ? at::kFloat : x.scalar_type()));
  if (m == 0) {
    return y;
  }
  const Entry entry = find_entry(std::string(entry_name));
  const int64_t unread = word(weight[0]);  // a valid pointer where an entry reads nothing
  std::vector<int64_t> words;
  words.reserve(kMostWords);
  words.push_back(word(x));
  for (const at::Tensor& w : weight) {
    words.push_back(w.numel() ? word(w) : unread);
  }
  words.push_back(has_bias ? word(bias) : unread);
  words.push_back(word(y));
  words.push_back(m);
  words.push_back(n);
  words.insert(words.end(), dims.begin(), dims.end());
  words.push_back(x.scalar_type() == at::kBFloat16);
  words.push_back(y.scalar_type() == at::kBFloat16);
  words.push_back(has_bias);
  words.insert(words.end(), extra.begin(), extra.end());
  words.push_back(swiglu);
  words.push_back(has_residual ? word(residual) : unread);
  words.push_back(has_residual);
  TORCH_CHECK(words.size() == entry.words, "zen: the native entry '", std::string(entry_name), "' takes ",
              entry.words, " arguments, this call has ", words.size());
  call_entry(entry, words, std::make_index_sequence<kMostWords + 1>{});
  return y;
}

}  // namespace

extern "C" void zen_bind_native(const char* name, void* address, int64_t words) {
  TORCH_CHECK(words > 0 && static_cast<size_t>(words) <= kMostWords, "zen: a native entry with ", words, " arguments");
  std::lock_guard<std::mutex> lock(entries_mutex);
  entries()[name] = Entry{address, static_cast<size_t>(words)};
}

TORCH_LIBRARY_IMPL(zen, CPU, m) {
  m.impl("quant_linear.native", &native_linear);
}
