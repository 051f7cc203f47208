// ophsd_kernels._C: the C++ CPU backend of the fused vocab-parallel divergence kernel.
//
// Three primitives over contiguous [N, V_local] CPU logits shards (float32/bfloat16/float16,
// both inputs the same dtype); the Python side (kernels/cpu_backend.py, kernels/divergence.py)
// reduces the per-token statistics over the tensor-parallel group and combines them:
//
//   partial_stats(student, teacher, kind, inv_temp, col_start, vocab_size) -> [N, 5] f32
//       (m_s, z_s, m_t, z_t, a): max and sum of exp(x - max) of s = student*inv_temp and
//       t = teacher*inv_temp over the valid local columns; a = sum exp(s-m_s)(s-t) (reverse_kl),
//       sum exp(t-m_t)(t-s) (forward_kl), 0 (jsd).  One streaming read of each input.
//   jsd_partial(student, teacher, lse_s, lse_t, beta, inv_temp, col_start, vocab_size) -> [N, 2]
//       (b_s, b_t) = (sum p_s (log p_s - log m), sum p_t (log p_t - log m)), m = beta p_t + (1-beta) p_s.
//   grad(student, teacher, lse_s, lse_t, coef, extra, kind, beta, inv_temp, col_start,
//        vocab_size) -> [N, V_local] in the student's dtype: coef_i * f_ij, with
//       f = p_s (log p_s - log p_t - extra_i) | p_s - p_t | (1-beta) p_s (log p_s - log m - extra_i).
//
// Local column j is global column col_start + j; global columns >= vocab_size are padding:
// excluded from every sum, zero gradient.  Rows are independent and split over OpenMP threads
// (torch's thread count, i.e. torch.set_num_threads / OMP_NUM_THREADS); each row streams over
// its columns in L1-sized chunks.  Extra memory: O(N) outputs plus a few KiB of stack per thread.
//
// The hot loops are compiled three times (AVX-512, AVX2+FMA, baseline x86-64) from
// divergence_rows.inc and the best one the CPU supports is picked once at load time, so the
// module is portable across x86-64 machines without -march=native.
//
// The ops are registered with the PyTorch dispatcher (torch.ops.ophsd_kernels.*) rather than
// through pybind11: that keeps this one translation unit light to compile (no torch/extension.h)
// and needs no libtorch_python.  The Python module itself only carries build information.

#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif


#ifndef OPHSD_TORCH_VERSION
#define OPHSD_TORCH_VERSION "unknown"
#endif

namespace ophsd {
namespace {

constexpr int64_t kChunk = 1024;  // columns per L1 chunk (3 x 4 KiB buffers per thread)
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
enum Kind : int { kReverse = 0, kForward = 1, kJsd = 2 };

struct RowKernels {
  void (*stats)(const void*, const void*, int, int64_t, int, float, float*);
  void (*jsd)(const void*, const void*, int, int64_t, float, float, float, float, float*);
  void (*grad)(const void*, const void*, void*, int, int64_t, int64_t, float, float, float, float,
               int, float, float);
};

// ---- the same row kernels for three instruction sets ----------------------------------------
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define OPHSD_X86_MULTIVERSION 1
namespace isa_avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
#include "divergence_rows.inc"
#pragma GCC pop_options
}  // namespace isa_avx512
namespace isa_avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#include "divergence_rows.inc"
#pragma GCC pop_options
}  // namespace isa_avx2
#endif
namespace isa_base {
#include "divergence_rows.inc"
}  // namespace isa_base

struct Selected {
  const RowKernels* k;
  const char* name;
};

Selected select_kernels() {
#ifdef OPHSD_X86_MULTIVERSION
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
    return {&isa_avx512::kRowKernels, "avx512"};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("bmi2"))
    return {&isa_avx2::kRowKernels, "avx2"};
#endif
  return {&isa_base::kRowKernels, "baseline"};
}

const Selected& kernels() {
  static const Selected sel = select_kernels();
  return sel;
}

// ---- argument checks (ValueError in Python) -------------------------------------------------

int parse_kind(const std::string& kind) {
  if (kind == "reverse_kl") return kReverse;
  if (kind == "forward_kl") return kForward;
  if (kind == "jsd") return kJsd;
  TORCH_CHECK_VALUE(false, "kind must be 'reverse_kl', 'forward_kl' or 'jsd', got '", kind, "'");
  return -1;
}

int check_logits(const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK_VALUE(student.device().is_cpu() && teacher.device().is_cpu(),
                    "student and teacher must be CPU tensors");
  TORCH_CHECK_VALUE(student.dim() == 2, "student must be 2-D [N, V_local], got ", student.dim(),
                    "-D");
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "teacher shape ", teacher.sizes(),
                    " must equal student shape ", student.sizes());
  TORCH_CHECK_VALUE(teacher.scalar_type() == student.scalar_type(), "teacher dtype ",
                    teacher.scalar_type(), " must equal student dtype ", student.scalar_type());
  TORCH_CHECK_VALUE(student.is_contiguous() && teacher.is_contiguous(),
                    "student and teacher must be contiguous");
  switch (student.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default:
      TORCH_CHECK_VALUE(false, "student dtype must be float32, bfloat16 or float16, got ",
                        student.scalar_type());
  }
  return -1;
}

void check_row_vector(const at::Tensor& x, const char* name, int64_t n) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 1 &&
                        x.size(0) == n && x.is_contiguous(),
                    name, " must be a contiguous float32 CPU tensor of shape [", n, "], got ",
                    x.scalar_type(), " ", x.sizes());
}

void check_common(double inv_temp, int64_t col_start, int64_t vocab_size) {
  TORCH_CHECK_VALUE(std::isfinite(inv_temp) && inv_temp > 0.0,
                    "inv_temp must be finite and > 0, got ", inv_temp);
  TORCH_CHECK_VALUE(col_start >= 0, "col_start must be >= 0, got ", col_start);
  TORCH_CHECK_VALUE(vocab_size >= 0, "vocab_size must be >= 0, got ", vocab_size);
}

// number of valid (non-padding) local columns
int64_t valid_cols(int64_t ncols, int64_t col_start, int64_t vocab_size) {
  return std::max<int64_t>(0, std::min<int64_t>(ncols, vocab_size - col_start));
}

// torch's thread count, but at least kGrain elements per thread (like at::parallel_for's grain
// size): small problems run on the calling thread without waking the OpenMP team.
constexpr int64_t kGrain = 32768;
int num_threads(int64_t rows, int64_t cols) {
  const int64_t by_work = std::max<int64_t>(1, rows * std::max<int64_t>(cols, 1) / kGrain);
  return (int)std::max<int64_t>(1, std::min<int64_t>({(int64_t)at::get_num_threads(), rows, by_work}));
}

// ---- the ops --------------------------------------------------------------------------------

at::Tensor partial_stats(const at::Tensor& student, const at::Tensor& teacher,
                         c10::string_view kind_sv, double inv_temp, int64_t col_start,
                         int64_t vocab_size) {
  const int dt = check_logits(student, teacher);
  const int kind = parse_kind(std::string(kind_sv));
  check_common(inv_temp, col_start, vocab_size);
  const int64_t N = student.size(0), V = student.size(1);
  const int64_t nvalid = valid_cols(V, col_start, vocab_size);
  at::Tensor out = at::empty({N, 5}, student.options().dtype(at::kFloat));
  const char* sp = static_cast<const char*>(student.data_ptr());
  const char* tp = static_cast<const char*>(teacher.data_ptr());
  float* op = out.data_ptr<float>();
  const int64_t row_bytes = V * (int64_t)student.element_size();
  const float it = (float)inv_temp;
  const RowKernels* k = kernels().k;
  const int nt = num_threads(N, nvalid);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t i = 0; i < N; ++i)
    k->stats(sp + i * row_bytes, tp + i * row_bytes, dt, nvalid, kind, it, op + 5 * i);
  return out;
}

at::Tensor jsd_partial(const at::Tensor& student, const at::Tensor& teacher,
                       const at::Tensor& lse_s, const at::Tensor& lse_t, double beta,
                       double inv_temp, int64_t col_start, int64_t vocab_size) {
  const int dt = check_logits(student, teacher);
  check_common(inv_temp, col_start, vocab_size);
  TORCH_CHECK_VALUE(beta > 0.0 && beta < 1.0, "beta must be in (0, 1), got ", beta);
  const int64_t N = student.size(0), V = student.size(1);
  check_row_vector(lse_s, "lse_s", N);
  check_row_vector(lse_t, "lse_t", N);
  const int64_t nvalid = valid_cols(V, col_start, vocab_size);
  at::Tensor out = at::empty({N, 2}, student.options().dtype(at::kFloat));
  const char* sp = static_cast<const char*>(student.data_ptr());
  const char* tp = static_cast<const char*>(teacher.data_ptr());
  const float* ls = lse_s.data_ptr<float>();
  const float* lt = lse_t.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t row_bytes = V * (int64_t)student.element_size();
  const float it = (float)inv_temp, b = (float)beta;
  const RowKernels* k = kernels().k;
  const int nt = num_threads(N, nvalid);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t i = 0; i < N; ++i)
    k->jsd(sp + i * row_bytes, tp + i * row_bytes, dt, nvalid, ls[i], lt[i], b, it, op + 2 * i);
  return out;
}

at::Tensor grad(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& lse_s,
                const at::Tensor& lse_t, const at::Tensor& coef, const at::Tensor& extra,
                c10::string_view kind_sv, double beta, double inv_temp, int64_t col_start,
                int64_t vocab_size) {
  const int dt = check_logits(student, teacher);
  const int kind = parse_kind(std::string(kind_sv));
  check_common(inv_temp, col_start, vocab_size);
  if (kind == kJsd) TORCH_CHECK_VALUE(beta > 0.0 && beta < 1.0, "beta must be in (0, 1), got ", beta);
  const int64_t N = student.size(0), V = student.size(1);
  check_row_vector(lse_s, "lse_s", N);
  check_row_vector(lse_t, "lse_t", N);
  check_row_vector(coef, "coef", N);
  check_row_vector(extra, "extra", N);
  const int64_t nvalid = valid_cols(V, col_start, vocab_size);
  at::Tensor out = at::empty({N, V}, student.options());
  // `out` is written exactly once; with 4 KiB pages its first-touch page faults cost about as
  // much as the math (0.6 s of ~0.75 s at N=4096, V=32768 here).  THP_MEM_ALLOC_ENABLE=1 makes
  // torch's CPU allocator use transparent huge pages and removes most of that (3x faster grad
  // in steady state).  It is not forced here: with THP defrag=madvise the first huge-page
  // allocations stall on memory compaction (measured 2.5 s once on a busy machine).
  const char* sp = static_cast<const char*>(student.data_ptr());
  const char* tp = static_cast<const char*>(teacher.data_ptr());
  char* gp = static_cast<char*>(out.data_ptr());
  const float* ls = lse_s.data_ptr<float>();
  const float* lt = lse_t.data_ptr<float>();
  const float* cp = coef.data_ptr<float>();
  const float* ep = extra.data_ptr<float>();
  const int64_t row_bytes = V * (int64_t)student.element_size();
  const float it = (float)inv_temp, b = (float)beta;
  const RowKernels* k = kernels().k;
  const int nt = num_threads(N, V);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t i = 0; i < N; ++i)
    k->grad(sp + i * row_bytes, tp + i * row_bytes, gp + i * row_bytes, dt, nvalid, V, ls[i],
            lt[i], cp[i], ep[i], kind, b, it);
  return out;
}

}  // namespace
}  // namespace ophsd

TORCH_LIBRARY(ophsd_kernels, m) {
  m.def("partial_stats(Tensor student, Tensor teacher, str kind, float inv_temp, int col_start, "
        "int vocab_size) -> Tensor");
  m.def("jsd_partial(Tensor student, Tensor teacher, Tensor lse_s, Tensor lse_t, float beta, "
        "float inv_temp, int col_start, int vocab_size) -> Tensor");
  m.def("grad(Tensor student, Tensor teacher, Tensor lse_s, Tensor lse_t, Tensor coef, "
        "Tensor extra, str kind, float beta, float inv_temp, int col_start, int vocab_size) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(ophsd_kernels, CPU, m) {
  m.impl("partial_stats", &ophsd::partial_stats);
  m.impl("jsd_partial", &ophsd::jsd_partial);
  m.impl("grad", &ophsd::grad);
}

// ---- the Python module: importing it registers the ops; attributes describe the build ------

static PyModuleDef ophsd_module = {PyModuleDef_HEAD_INIT, "_C",
                                   "ophsd_kernels C++ CPU backend (ops in torch.ops.ophsd_kernels)",
                                   -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&ophsd_module);
  if (m == nullptr) return nullptr;
#ifdef _OPENMP
  const int openmp = 1;
#else
  const int openmp = 0;
#endif
  if (PyModule_AddStringConstant(m, "TORCH_VERSION", OPHSD_TORCH_VERSION) < 0 ||
      PyModule_AddStringConstant(m, "SIMD", ophsd::kernels().name) < 0 ||
      PyModule_AddIntConstant(m, "OPENMP", openmp) < 0 ||
      PyModule_AddIntConstant(m, "CHUNK", (long)ophsd::kChunk) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
