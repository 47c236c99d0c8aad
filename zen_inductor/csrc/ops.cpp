// The ops the compiled graph calls in C++, with no Python between Inductor's wrapper and our
// kernels (at decode a linear's kernel runs 10-40 us; a Python op around it costs ~10 us more):
//   zen::quant_linear.native  one of our C++ linear entries, on a weight packed for it
//   zen::decode_attention     one query position over a KV cache, fp32, bf16 or int8 (decode_attention.cpp)
//   zen::mask_extent          how far each block of a prompt's queries may see into the keys (attention.py)
//   zen::quant_linear.by_rows, zen::prefill_attention.by_rows
//                             one program for any number of rows: one row by the C++ above, more
//                             by the Python op (kernels/op.py, attention.py)
// and the first two again as CPython functions (zen_fast_calls below), which Inductor's Python
// wrapper calls where zen lowers the ops (wrapper_calls.py): the same code, without the
// dispatcher's parsing and boxing of the schema's lists and string on each call.
// Their schemas and fake implementations are Python's (kernels/op.py, attention.py); the kernels
// are plain libraries whose entry addresses Python binds here once they are loaded.
//
// Every linear entry (woq_avx2.cpp, woq_avx512.cpp, a8w4_avx2.cpp, bf16_gemv_*.cpp) takes
//   (x, *weight, bias, y, M, N, *dims, x_bf16, y_bf16, has_bias, *extra, swiglu, residual, has_residual)
// and nothing but pointers and int64s. Python binds each entry's address and declared argument
// count once its library is loaded (zen_bind_native); this op lays the arguments out as 64-bit
// words in that order and calls the entry through a function type of exactly that many int64
// parameters, which the x86-64 System V ABI passes as it passes the pointers and int64s declared.
#include <Python.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
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

// the first of ``names`` that is bound, or an error naming the last
Entry find_first_entry(std::initializer_list<const char*> names) {
  std::lock_guard<std::mutex> lock(entries_mutex);
  for (const char* name : names) {
    auto it = entries().find(name);
    if (it != entries().end()) return it->second;
  }
  TORCH_CHECK(false, "zen: the native entry '", *(names.end() - 1), "' is not loaded in this process (zen_inductor.native.load binds it)");
}

Entry find_entry(const std::string& name) { return find_first_entry({name.c_str()}); }

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

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_in, const at::Tensor& v_in,
                            const std::optional<at::Tensor>& mask_in, double scale,
                            const std::optional<at::Tensor>& k_scale_in, const std::optional<at::Tensor>& v_scale_in) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k_in.dim() == 4 && v_in.dim() == 4,
              "zen: decode_attention takes q [B, H, 1, D] and k, v [B, Hkv, L, D]");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k_in.size(1), L = k_in.size(2);
  TORCH_CHECK(k_in.size(0) == B && v_in.size(0) == B && v_in.size(1) == Hkv && v_in.size(2) == L &&
                  k_in.size(3) == D && v_in.size(3) == D && Hkv > 0 && H % Hkv == 0,
              "zen: decode_attention: the shapes of q, k and v do not match");
  TORCH_CHECK(D <= 512 && H / Hkv <= 64, "zen: decode_attention takes D <= 512 and up to 64 query heads a KV head");
  const at::ScalarType kv_type = k_in.scalar_type();
  TORCH_CHECK(kv_type == v_in.scalar_type() &&
                  (kv_type == at::kFloat || kv_type == at::kBFloat16 || kv_type == at::kChar),
              "zen: decode_attention takes fp32, bf16 or int8 k and v of one dtype");
  const bool int8 = kv_type == at::kChar;
  TORCH_CHECK(int8 == k_scale_in.has_value() && int8 == v_scale_in.has_value(),
              "zen: decode_attention takes k_scale and v_scale with int8 k and v, and only then");
  // int8: one scale a (batch, KV head, position), read as a packed [B, Hkv, L]
  at::Tensor k_scale, v_scale;
  if (int8) {
    for (const at::Tensor* t : {&*k_scale_in, &*v_scale_in}) {
      TORCH_CHECK(t->numel() == B * Hkv * L && t->size(0) == B && t->size(1) == Hkv && t->size(2) == L,
                  "zen: decode_attention: int8 scales must be [B, Hkv, L] or [B, Hkv, L, 1], got ", t->sizes());
    }
    k_scale = fp32_contiguous(*k_scale_in);
    v_scale = fp32_contiguous(*v_scale_in);
  }
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  // q is scaled as the kernel reads it; a copy only where q is not fp32 with rows packed
  const at::Tensor qf = fp32_contiguous(q);
  const float scale_f = static_cast<float>(scale);
  at::Tensor mask;
  int64_t m_strides[4] = {0, 0, 0, 0};  // [B, H, 1, L] broadcast: 0 where the mask has size 1 or no dim
  if (mask_in.has_value()) {
    TORCH_CHECK(at::isFloatingType(mask_in->scalar_type()) && mask_in->dim() <= 4,
                "zen: decode_attention takes an additive floating mask");
    mask = mask_in->scalar_type() == at::kFloat ? *mask_in : mask_in->to(at::kFloat);
    const int64_t lead = 4 - mask.dim();
    const int64_t wanted[4] = {B, H, 1, L};
    for (int64_t d = 0; d < mask.dim(); ++d) {
      TORCH_CHECK(mask.size(d) == 1 || mask.size(d) == wanted[lead + d],
                  "zen: decode_attention: a mask of shape ", mask.sizes(), " does not broadcast to [B, H, 1, L]");
      m_strides[lead + d] = mask.size(d) == 1 ? 0 : mask.stride(d);
    }
  }
  at::Tensor out = at::empty({B, H, 1, D}, q.options().dtype(at::kFloat));
  // the AVX-512 build where this CPU has it and Python bound it (attention.unavailable), else AVX2's
  const Entry entry = find_first_entry({"decode_attention_avx512", "decode_attention"});
  const bool has_mask = mask.defined();
  const int64_t kv_kind = kv_type == at::kFloat ? 0 : kv_type == at::kBFloat16 ? 1 : 2;
  const std::vector<int64_t> words{
      word(qf), word(k), word(v), has_mask ? word(mask) : word(qf), word(out), reinterpret_cast<int64_t>(&scale_f),
      B, H, Hkv, L, D, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
      m_strides[0], m_strides[1], m_strides[3], has_mask, kv_kind, int8 ? word(k_scale) : word(qf),
      int8 ? word(v_scale) : word(qf)};
  TORCH_CHECK(words.size() == entry.words, "zen: the native entry 'decode_attention' takes ", entry.words,
              " arguments, this call has ", words.size());
  call_entry(entry, words, std::make_index_sequence<kMostWords + 1>{});
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

// whether row[start, end) holds something other than `neg_inf` (T: a float's bits): one OR of XORs,
// which the compiler vectorizes (a float compare with an exit at each element ran at ~2 ns an element)
template <typename T>
bool any_other(const T* row, int64_t start, int64_t end, T neg_inf) {
  T differ = 0;
  for (int64_t i = start; i < end; ++i) differ |= row[i] ^ neg_inf;
  return differ != 0;
}

// one past the last of row[0, n) that is not -inf (bit pattern `neg_inf`), or 0. The last stretch is
// looked at first (a row that sees its last keys ends there); else the row is read forwards: read
// from its end backwards, a causal row's -inf tail came at ~1.5 GB/s, each line a wait
template <typename T>
int64_t last_visible(const T* row, int64_t n, T neg_inf) {
  constexpr int64_t kStretch = 64;
  const int64_t tail = std::max<int64_t>(0, n - kStretch);
  int64_t found = -1;  // start of the last stretch holding something visible
  if (any_other(row, tail, n, neg_inf)) {
    found = tail;
  } else {
    for (int64_t start = 0; start < tail; start += kStretch)
      if (any_other(row, start, std::min(start + kStretch, tail), neg_inf)) found = start;
  }
  if (found < 0) return 0;
  for (int64_t i = std::min(found + kStretch, n); i-- > found;)
    if (row[i] != neg_inf) return i + 1;
  return 0;
}

// [ceil(rows / block)]: for each block of `block` query rows, one past the last key position any of
// its rows may see (over the mask's batches and heads), at least 1. mask: additive, [..., rows or 1, S]
at::Tensor mask_extent(const at::Tensor& mask_in, int64_t rows, int64_t block) {
  const at::ScalarType type = mask_in.scalar_type();
  TORCH_CHECK(mask_in.dim() >= 2 && (type == at::kFloat || type == at::kBFloat16 || type == at::kHalf) && block > 0 &&
                  rows >= 0,
              "zen: mask_extent takes an additive fp32, bf16 or fp16 mask [..., L, S], got ", type, " ", mask_in.sizes());
  const int64_t mask_rows = mask_in.size(-2), S = mask_in.size(-1);
  TORCH_CHECK(mask_rows == rows || mask_rows == 1, "zen: mask_extent: a mask of ", mask_rows, " rows for ", rows, " queries");
  const at::Tensor mask = mask_in.reshape({-1, mask_rows, S}).contiguous();
  const int64_t planes = mask.size(0), blocks = (rows + block - 1) / block;
  at::Tensor extent = at::empty({blocks}, mask.options().dtype(at::kLong));
  int64_t* out = extent.data_ptr<int64_t>();
  // -inf's bits in the mask's type
  const bool wide = type == at::kFloat;
  const uint32_t neg_inf32 = 0xFF800000u;
  const uint16_t neg_inf16 = type == at::kBFloat16 ? 0xFF80u : 0xFC00u;
  const void* data = mask.data_ptr();
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
      for (int64_t j = first; j < last; ++j) {
        const int64_t r0 = mask_rows == 1 ? 0 : j * block, r1 = mask_rows == 1 ? 1 : std::min(rows, r0 + block);
        int64_t end = 0;
        for (int64_t p = 0; p < planes && end < S; ++p)
          for (int64_t r = r1; r-- > r0 && end < S;) {  // the last row first: under a causal mask it sees furthest
            const int64_t offset = (p * mask_rows + r) * S + end;
            end += wide ? last_visible(static_cast<const uint32_t*>(data) + offset, S - end, neg_inf32)
                        : last_visible(static_cast<const uint16_t*>(data) + offset, S - end, neg_inf16);
          }
        out[j] = std::max<int64_t>(end, 1);
      }
  });
  return extent;
}

// ---- the CPython functions: the ops' arguments in their schemas' order, positionally

at::Tensor tensor_of(PyObject* o, const char* what) {
  TORCH_CHECK_TYPE(THPVariable_Check(o), "zen: ", what, " must be a tensor");
  return THPVariable_Unpack(o);
}

std::optional<at::Tensor> optional_tensor(PyObject* o, const char* what) {
  if (o == Py_None) return std::nullopt;
  return tensor_of(o, what);
}

int64_t int_of(PyObject* o) {
  const int64_t v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) throw python_error();
  return v;
}

std::vector<int64_t> ints_of(PyObject* o) {
  TORCH_CHECK_TYPE(PyList_Check(o) || PyTuple_Check(o), "zen: a list of ints expected");
  std::vector<int64_t> out(PySequence_Fast_GET_SIZE(o));
  for (size_t i = 0; i < out.size(); ++i) out[i] = int_of(PySequence_Fast_GET_ITEM(o, i));
  return out;
}

// the GIL released while the kernel runs, as torch.ops does; taken back however the scope ends
struct WithoutGil {
  PyThreadState* state = PyEval_SaveThread();
  ~WithoutGil() { PyEval_RestoreThread(state); }
};

// linear(x, weight: list, bias, entry: str, n, dims: list, extra: list, swiglu: bool, residual)
PyObject* fast_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(nargs == 9, "zen: linear takes (x, weight, bias, entry, n, dims, extra, swiglu, residual), got ", nargs,
              " arguments");
  const at::Tensor x = tensor_of(args[0], "x");
  TORCH_CHECK_TYPE(PyList_Check(args[1]), "zen: linear's weight must be a list of tensors");
  std::vector<at::Tensor> weight(PyList_GET_SIZE(args[1]));
  for (size_t i = 0; i < weight.size(); ++i) weight[i] = tensor_of(PyList_GET_ITEM(args[1], i), "a weight");
  const std::optional<at::Tensor> bias = optional_tensor(args[2], "bias");
  Py_ssize_t length = 0;
  const char* entry = PyUnicode_AsUTF8AndSize(args[3], &length);
  if (entry == nullptr) throw python_error();
  const int64_t n = int_of(args[4]);
  const std::vector<int64_t> dims = ints_of(args[5]), extra = ints_of(args[6]);
  const int swiglu = PyObject_IsTrue(args[7]);
  if (swiglu < 0) throw python_error();
  const std::optional<at::Tensor> residual = optional_tensor(args[8], "residual");
  at::Tensor y;
  {
    RECORD_FUNCTION("zen::quant_linear", std::vector<c10::IValue>());  // as the op shows in torch.profiler
    WithoutGil released;
    y = native_linear(x, weight, bias, c10::string_view(entry, length), n, dims, extra, swiglu != 0, residual);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// decode_attention(q, k, v, mask, scale: float, k_scale, v_scale)
PyObject* fast_decode_attention(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(nargs == 7, "zen: decode_attention takes (q, k, v, mask, scale, k_scale, v_scale), got ", nargs,
              " arguments");
  const at::Tensor q = tensor_of(args[0], "q"), k = tensor_of(args[1], "k"), v = tensor_of(args[2], "v");
  const std::optional<at::Tensor> mask = optional_tensor(args[3], "mask");
  const double scale = PyFloat_AsDouble(args[4]);
  if (scale == -1.0 && PyErr_Occurred()) throw python_error();
  const std::optional<at::Tensor> k_scale = optional_tensor(args[5], "k_scale"), v_scale = optional_tensor(args[6], "v_scale");
  at::Tensor out;
  {
    RECORD_FUNCTION("zen::decode_attention", std::vector<c10::IValue>());
    WithoutGil released;
    out = decode_attention(q, k, v, mask, scale, k_scale, v_scale);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef fast_methods[] = {
    {"linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_linear)), METH_FASTCALL,
     "zen::quant_linear.native's work, called from Inductor's Python wrapper"},
    {"decode_attention", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_decode_attention)),
     METH_FASTCALL, "zen::decode_attention's work, called from Inductor's Python wrapper"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef fast_module = {PyModuleDef_HEAD_INIT, "zen_fast_calls", "zen's ops as CPython functions", -1, fast_methods,
                           nullptr, nullptr, nullptr, nullptr};

}  // namespace

// One compiled program for any number of rows (a prompt, then one token a step, ahead of time):
// a single row runs our C++ directly, more rows go the way of the Python op (a prompt's call,
// where ~25 us of Python is nothing beside the work)
at::Tensor quant_linear_by_rows(const at::Tensor& x, at::TensorList packed, at::IntArrayRef counts,
                                const std::optional<at::Tensor>& bias, c10::string_view plan, at::TensorList weight,
                                const std::optional<at::Tensor>& native_bias, c10::string_view entry, int64_t n,
                                at::IntArrayRef dims, at::IntArrayRef extra, bool swiglu,
                                const std::optional<at::Tensor>& residual) {
  if (x.dim() == 2 && x.size(0) == 1) {
    const int64_t out_n = swiglu ? n / 2 : n;
    if (residual.has_value() && (swiglu || residual->dim() != 2 || residual->size(0) != 1 || residual->size(1) != out_n)) {
      return at::add(*residual, native_linear(x, weight, native_bias, entry, n, dims, extra, swiglu, std::nullopt));
    }
    return native_linear(x, weight, native_bias, entry, n, dims, extra, swiglu, residual);
  }
  static const auto by_plan =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("zen::quant_linear", "")
          .typed<at::Tensor(const at::Tensor&, at::TensorList, at::IntArrayRef, const std::optional<at::Tensor>&,
                            c10::string_view, const std::optional<at::Tensor>&)>();
  return by_plan.call(x, packed, counts, bias, plan, residual);
}

// The same for attention: one query position by decode attention, a prompt by prefill_attention
at::Tensor prefill_attention_by_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& mask, double scale, bool zentorch) {
  if (q.dim() == 4 && q.size(2) == 1) {
    return decode_attention(q, k, v, mask, scale, std::nullopt, std::nullopt);
  }
  static const auto prefill =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("zen::prefill_attention", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool)>();
  return prefill.call(q, k, v, mask, scale, zentorch);
}

// A new module object holding the functions above; called once, with the GIL held (ctypes.PyDLL)
extern "C" PyObject* zen_fast_calls() { return PyModule_Create(&fast_module); }

extern "C" void zen_bind_native(const char* name, void* address, int64_t words) {
  TORCH_CHECK(words > 0 && static_cast<size_t>(words) <= kMostWords, "zen: a native entry with ", words, " arguments");
  std::lock_guard<std::mutex> lock(entries_mutex);
  entries()[name] = Entry{address, static_cast<size_t>(words)};
}

TORCH_LIBRARY_IMPL(zen, CPU, m) {
  m.impl("quant_linear.native", &native_linear);
  m.impl("decode_attention", &decode_attention);
  m.impl("mask_extent", &mask_extent);
  m.impl("quant_linear.by_rows", &quant_linear_by_rows);
  m.impl("prefill_attention.by_rows", &prefill_attention_by_rows);
}
