// pybind11 bindings of layerswap_fast._core (specification: layerswap_fast/_core.pyi).
// Everything Python is extracted here, with the GIL held; the I/O and the kernels then run with
// the GIL released and report failures as lsf::CoreErr, which becomes the Python CoreError.

#include <Python.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "chunk_reader.hpp"
#include "common.hpp"
#include "io.hpp"
#include "kernel_util.hpp"
#include "kernels.hpp"
#include "mapped.hpp"
#include "mergekit_program.hpp"
#include "ties.hpp"

namespace py = pybind11;
using lsf::CoreErr;
using lsf::DType;
using lsf::fail;

namespace {

PyObject* g_core_error = nullptr;  // the CoreError class (a new reference kept for the module)

void set_core_error(int err, const std::string& msg) {
  PyObject* text = PyUnicode_DecodeUTF8(msg.data(), static_cast<Py_ssize_t>(msg.size()),
                                        "backslashreplace");
  if (!text) return;  // an exception (MemoryError) is already set
  PyObject* args = err != 0 ? Py_BuildValue("(iN)", err, text) : Py_BuildValue("(N)", text);
  if (!args) return;
  PyObject* exc = PyObject_Call(g_core_error, args, nullptr);
  Py_DECREF(args);
  if (!exc) return;
  PyErr_SetObject(g_core_error, exc);
  Py_DECREF(exc);
}

// ---- argument helpers --------------------------------------------------------------------------

// A Python integer (anything with __index__) as int64; CoreError when it does not fit.
int64_t to_i64(py::handle h, const char* name) {
  PyObject* idx = PyNumber_Index(h.ptr());
  if (!idx) throw py::error_already_set();
  int overflow = 0;
  long long v = PyLong_AsLongLongAndOverflow(idx, &overflow);
  Py_DECREF(idx);
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (overflow != 0) fail(std::string(name) + " is out of range (does not fit in 64 bits)");
  return static_cast<int64_t>(v);
}

// A non-negative Python integer as uint64; CoreError when negative or too large.
uint64_t to_u64(py::handle h, const char* name) {
  PyObject* idx = PyNumber_Index(h.ptr());
  if (!idx) throw py::error_already_set();
  int neg = PyObject_RichCompareBool(idx, py::int_(0).ptr(), Py_LT);
  if (neg < 0) {
    Py_DECREF(idx);
    throw py::error_already_set();
  }
  if (neg) {
    std::string shown = py::str(py::handle(idx));
    Py_DECREF(idx);
    fail(std::string(name) + " must be >= 0 (got " + shown + ")");
  }
  unsigned long long v = PyLong_AsUnsignedLongLong(idx);
  Py_DECREF(idx);
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    fail(std::string(name) + " is out of range (does not fit in 64 bits)");
  }
  return static_cast<uint64_t>(v);
}

// A str / bytes / os.PathLike as the bytes the OS sees.
std::string to_path(py::handle h) {
  PyObject* p = PyOS_FSPath(h.ptr());
  if (!p) throw py::error_already_set();
  PyObject* b = nullptr;
  if (PyUnicode_Check(p)) {
    b = PyUnicode_EncodeFSDefault(p);
    Py_DECREF(p);
    if (!b) throw py::error_already_set();
  } else {
    b = p;  // bytes
  }
  std::string out(PyBytes_AS_STRING(b), static_cast<size_t>(PyBytes_GET_SIZE(b)));
  Py_DECREF(b);
  return out;
}

py::str path_to_str(const std::string& p) {
  PyObject* s = PyUnicode_DecodeFSDefaultAndSize(p.data(), static_cast<Py_ssize_t>(p.size()));
  if (!s) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(s);
}

std::string to_string_arg(py::handle h, const std::string& role) {
  if (!PyUnicode_Check(h.ptr())) throw py::type_error(role + " must be a str");
  Py_ssize_t n = 0;
  const char* s = PyUnicode_AsUTF8AndSize(h.ptr(), &n);
  if (!s) throw py::error_already_set();
  return std::string(s, static_cast<size_t>(n));
}

// The items of a sequence (list, tuple, ...), as new references.
std::vector<py::object> to_items(py::handle seq, const char* name) {
  if (PyUnicode_Check(seq.ptr()) || PyBytes_Check(seq.ptr()) || PyByteArray_Check(seq.ptr()))
    throw py::type_error(std::string(name) + " must be a sequence, not a str/bytes object");
  PyObject* fast = PySequence_Fast(seq.ptr(), (std::string(name) + " must be a sequence").c_str());
  if (!fast) throw py::error_already_set();
  Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  std::vector<py::object> items;
  items.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i)
    items.push_back(py::reinterpret_borrow<py::object>(PySequence_Fast_GET_ITEM(fast, i)));
  Py_DECREF(fast);
  return items;
}

// A C-contiguous buffer export, held for the lifetime of the object.
class BufView {
 public:
  BufView(py::handle obj, bool writable, const std::string& role) {
    if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_C_CONTIGUOUS) != 0) {
      std::string why;
      {
        py::error_already_set e;  // fetches and clears the Python error
        why = e.what();
      }
      if (!PyObject_CheckBuffer(obj.ptr()))
        throw py::type_error(role + " must support the buffer protocol (got " +
                             std::string(Py_TYPE(obj.ptr())->tp_name) + ")");
      fail(role + " is not a C-contiguous buffer (" + why + ")");
    }
    if (writable && view_.readonly) {
      PyBuffer_Release(&view_);
      fail(role + " is a read-only buffer; a writable one is needed");
    }
  }
  ~BufView() { PyBuffer_Release(&view_); }
  BufView(const BufView&) = delete;
  BufView& operator=(const BufView&) = delete;

  unsigned char* data() const { return static_cast<unsigned char*>(view_.buf); }
  uint64_t len() const { return static_cast<uint64_t>(view_.len); }

 private:
  Py_buffer view_{};
};

std::vector<DType> to_kernel_dtypes(py::handle seq, const char* name, size_t expected,
                                    const char* of) {
  auto items = to_items(seq, name);
  if (items.size() != expected)
    fail(std::string(name) + " has " + std::to_string(items.size()) + " entries but " + of +
         " has " + std::to_string(expected));
  std::vector<DType> out;
  for (size_t i = 0; i < items.size(); ++i) {
    std::string role = std::string(name) + "[" + std::to_string(i) + "]";
    out.push_back(lsf::parse_kernel_dtype(to_string_arg(items[i], role), role));
  }
  return out;
}

std::vector<float> to_weights(py::handle seq, size_t expected) {
  auto items = to_items(seq, "weights");
  if (items.size() != expected)
    fail("weights has " + std::to_string(items.size()) + " entries but inputs has " +
         std::to_string(expected));
  std::vector<float> w;
  for (auto& it : items) {
    double d = PyFloat_AsDouble(it.ptr());
    if (d == -1.0 && PyErr_Occurred()) throw py::error_already_set();
    w.push_back(static_cast<float>(d));  // rounded to float32 once, as torch does
  }
  return w;
}

struct Slices {
  std::vector<std::shared_ptr<lsf::InputFile>> keep;  // keeps the files alive without the GIL
  std::vector<lsf::FileSlice> slices;
};

lsf::FileSlice to_slice(py::handle item, const std::string& role,
                        std::vector<std::shared_ptr<lsf::InputFile>>& keep) {
  auto parts = to_items(item, role.c_str());
  if (parts.size() != 2)
    throw py::type_error(role + " must be a (InputFile, offset) pair");
  if (!py::isinstance<lsf::InputFile>(parts[0]))
    throw py::type_error(role + "[0] must be an InputFile");
  auto f = parts[0].cast<std::shared_ptr<lsf::InputFile>>();
  uint64_t off = to_u64(parts[1], (role + " offset").c_str());
  keep.push_back(f);
  return lsf::FileSlice{f.get(), off};
}

Slices to_slices(py::handle seq, const char* name) {
  Slices s;
  auto items = to_items(seq, name);
  for (size_t i = 0; i < items.size(); ++i)
    s.slices.push_back(to_slice(items[i], std::string(name) + "[" + std::to_string(i) + "]", s.keep));
  return s;
}

// ---- functions ---------------------------------------------------------------------------------

py::int_ dtype_size_py(py::handle name) {
  std::string s = to_string_arg(name, "dtype");
  DType d;
  if (!lsf::parse_dtype(s, &d)) fail("unknown dtype '" + lsf::show(s) + "'");
  return py::int_(lsf::dtype_size(d));
}

void blend_buffers_py(py::handle inputs, py::handle input_dtypes, py::handle weights,
                      py::handle out, py::handle out_dtype, py::handle threads) {
  auto items = to_items(inputs, "inputs");
  const size_t n = items.size();
  if (n == 0) fail("blend_buffers: at least one input is required");
  auto dts = to_kernel_dtypes(input_dtypes, "input_dtypes", n, "inputs");
  auto w = to_weights(weights, n);
  DType odt = lsf::parse_kernel_dtype(to_string_arg(out_dtype, "out_dtype"), "out_dtype");
  int64_t nthreads = to_i64(threads, "threads");

  BufView ov(out, true, "out");
  const uint64_t osz = lsf::dtype_size(odt);
  if (ov.len() % osz != 0)
    fail("blend_buffers: out has " + std::to_string(ov.len()) + " bytes, not a multiple of " +
         std::to_string(osz) + " (" + lsf::dtype_name(odt) + ")");
  const uint64_t numel = ov.len() / osz;
  std::vector<std::unique_ptr<BufView>> views;
  std::vector<const unsigned char*> ptrs;
  for (size_t i = 0; i < n; ++i) {
    std::string role = "inputs[" + std::to_string(i) + "]";
    views.emplace_back(new BufView(items[i], false, role));
    const uint64_t want = numel * lsf::dtype_size(dts[i]);
    if (views.back()->len() != want)
      fail("blend_buffers: " + role + " has " + std::to_string(views.back()->len()) +
           " bytes but " + std::to_string(numel) + " elements of " + lsf::dtype_name(dts[i]) +
           " need " + std::to_string(want));
    ptrs.push_back(views.back()->data());
  }
  py::gil_scoped_release nogil;
  lsf::blend_buffers_run(ptrs, dts, w, ov.data(), odt, numel, nthreads);
}

void blend_file_py(py::handle inputs, py::handle input_dtypes, py::handle weights,
                   std::shared_ptr<lsf::ShardWriter> out, py::handle out_offset,
                   py::handle out_dtype, py::handle numel, py::handle chunk_elems,
                   py::handle threads) {
  if (!out) throw py::type_error("out must be a ShardWriter");
  Slices in = to_slices(inputs, "inputs");
  const size_t n = in.slices.size();
  if (n == 0) fail("blend_file: at least one input is required");
  auto dts = to_kernel_dtypes(input_dtypes, "input_dtypes", n, "inputs");
  auto w = to_weights(weights, n);
  DType odt = lsf::parse_kernel_dtype(to_string_arg(out_dtype, "out_dtype"), "out_dtype");
  uint64_t ooff = to_u64(out_offset, "out_offset");
  uint64_t ne = to_u64(numel, "numel");
  int64_t chunk = to_i64(chunk_elems, "chunk_elems");
  if (chunk <= 0) fail("blend_file: chunk_elems must be >= 1 (got " + std::to_string(chunk) + ")");
  int64_t nthreads = to_i64(threads, "threads");
  py::gil_scoped_release nogil;
  lsf::blend_file_run(in.slices, dts, w, *out, ooff, odt, ne, static_cast<uint64_t>(chunk),
                      nthreads);
}

// ---- mergekit programs ---------------------------------------------------------------------------

double to_double(py::handle h, const std::string& role) {
  double d = PyFloat_AsDouble(h.ptr());
  if (d == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::type_error(role + " must be a number");
  }
  return d;
}

std::vector<uint64_t> to_u64s(py::handle seq, const char* name) {
  std::vector<uint64_t> out;
  auto items = to_items(seq, name);
  for (size_t i = 0; i < items.size(); ++i)
    out.push_back(to_u64(items[i], (std::string(name) + "[" + std::to_string(i) + "]").c_str()));
  return out;
}

// Per hist slot: None when a task had too many distinct bins, else (offsets: tasks + 1 int64,
// entries: uint64 bin << 32 | count, task by task).
py::list task_hists_py(const lsf::MkResult& res) {
  py::list slots;
  const size_t nh = res.task_overflow.size();  // a flag per histogram slot
  for (size_t h = 0; h < nh; ++h) {
    if (res.task_overflow[h]) {
      slots.append(py::none());
      continue;
    }
    py::array_t<int64_t> offsets(static_cast<py::ssize_t>(res.tasks + 1));
    int64_t* off = offsets.mutable_data();
    off[0] = 0;
    for (uint64_t t = 0; t < res.tasks; ++t)
      off[t + 1] = off[t] + static_cast<int64_t>(res.task_hists[h * res.tasks + t].size());
    py::array_t<uint64_t> entries(static_cast<py::ssize_t>(off[res.tasks]));
    uint64_t* e = entries.mutable_data();
    for (uint64_t t = 0; t < res.tasks; ++t)
      e = std::copy(res.task_hists[h * res.tasks + t].begin(), res.task_hists[h * res.tasks + t].end(), e);
    slots.append(py::make_tuple(offsets, entries));
  }
  return slots;
}

py::tuple mk_program_py(py::handle inputs, py::handle input_dtypes, py::handle numel,
                        py::handle code, py::handle consts, py::handle ints, py::handle ranks,
                        py::handle out, py::handle out_offset, py::handle out_dtype,
                        py::handle chunk_elems, py::handle segment_elems, py::handle index_base,
                        py::handle threads, bool task_hists, py::handle masks, bool whole_sums,
                        bool keep_mapped) {
  Slices in = to_slices(inputs, "inputs");
  auto dts = to_kernel_dtypes(input_dtypes, "input_dtypes", in.slices.size(), "inputs");
  const uint64_t ne = to_u64(numel, "numel");
  std::vector<lsf::MkInstr> prog;
  auto items = to_items(code, "code");
  for (size_t i = 0; i < items.size(); ++i) {
    const std::string role = "code[" + std::to_string(i) + "]";
    auto f = to_items(items[i], role.c_str());
    if (f.size() < 1 || f.size() > 5) fail(role + " must hold 1 to 5 integers");
    int32_t v[5] = {0, -1, -1, -1, -1};
    for (size_t j = 0; j < f.size(); ++j) {
      const int64_t x = to_i64(f[j], role.c_str());
      if (x < INT32_MIN || x > INT32_MAX) fail(role + " holds an integer out of range");
      v[j] = static_cast<int32_t>(x);
    }
    prog.push_back(lsf::MkInstr{v[0], v[1], v[2], v[3], v[4]});
  }
  std::vector<double> k;
  auto kitems = to_items(consts, "consts");
  for (size_t i = 0; i < kitems.size(); ++i) k.push_back(to_double(kitems[i], "consts[" + std::to_string(i) + "]"));
  auto n = to_u64s(ints, "ints");
  std::vector<lsf::MkRank> rk;
  auto ritems = to_items(ranks, "ranks");
  for (size_t i = 0; i < ritems.size(); ++i) {
    const std::string role = "ranks[" + std::to_string(i) + "]";
    auto f = to_items(ritems[i], role.c_str());
    if (f.size() != 7) fail(role + " must be (top, bottom, lo, hi, values, greater, seen)");
    lsf::MkRank r;
    const uint64_t top = to_u64(f[0], role.c_str()), bottom = to_u64(f[1], role.c_str());
    if (top > UINT32_MAX || bottom > UINT32_MAX) fail(role + ": top and bottom must fit in 32 bits");
    r.top = static_cast<uint32_t>(top);
    r.bottom = static_cast<uint32_t>(bottom);
    r.lo = to_u64(f[2], role.c_str());
    r.hi = to_u64(f[3], role.c_str());
    for (uint64_t v : to_u64s(f[4], role.c_str())) {
      if (v > UINT32_MAX) fail(role + ": values must fit in 32 bits");
      r.values.push_back(static_cast<uint32_t>(v));
    }
    r.greater = to_u64s(f[5], role.c_str());
    r.seen = to_u64s(f[6], role.c_str());
    rk.push_back(std::move(r));
  }
  std::shared_ptr<lsf::ShardWriter> w;
  if (!out.is_none()) {
    if (!py::isinstance<lsf::ShardWriter>(out)) throw py::type_error("out must be a ShardWriter or None");
    w = out.cast<std::shared_ptr<lsf::ShardWriter>>();
  }
  DType odt = lsf::parse_kernel_dtype(to_string_arg(out_dtype, "out_dtype"), "out_dtype");
  const uint64_t ooff = to_u64(out_offset, "out_offset");
  const int64_t chunk = to_i64(chunk_elems, "chunk_elems");
  if (chunk <= 0) fail("mk_program: chunk_elems must be >= 1 (got " + std::to_string(chunk) + ")");
  const int64_t segment = to_i64(segment_elems, "segment_elems");
  if (segment <= 0) fail("mk_program: segment_elems must be >= 1 (got " + std::to_string(segment) + ")");
  const uint64_t base = to_u64(index_base, "index_base");
  const int64_t nthreads = to_i64(threads, "threads");
  std::vector<std::unique_ptr<BufView>> mask_views;
  std::vector<lsf::MkMask> mk_masks;
  auto mitems = to_items(masks, "masks");
  for (size_t i = 0; i < mitems.size(); ++i) {
    mask_views.push_back(std::make_unique<BufView>(mitems[i], true, "masks[" + std::to_string(i) + "]"));
    mk_masks.push_back(lsf::MkMask{mask_views.back()->data(), mask_views.back()->len()});
  }
  lsf::MkResult res;
  {
    py::gil_scoped_release nogil;
    res = lsf::mk_program_run(in.slices, dts, ne, prog, k, n, rk, w.get(), ooff, odt,
                              static_cast<uint64_t>(chunk), static_cast<uint64_t>(segment), base,
                              nthreads, task_hists, mk_masks, whole_sums, keep_mapped);
  }
  const py::ssize_t tasks = static_cast<py::ssize_t>(res.tasks);
  const py::ssize_t ns = tasks ? static_cast<py::ssize_t>(res.sums.size()) / tasks : 0;
  const py::ssize_t nc = tasks ? static_cast<py::ssize_t>(res.eqcounts.size()) / tasks : 0;
  py::array_t<double> sums(std::vector<py::ssize_t>{tasks, ns});
  if (!res.sums.empty()) std::copy(res.sums.begin(), res.sums.end(), sums.mutable_data());
  // handed over, not copied: a copy is another fresh half megabyte per slot, faulted in page by page
  auto* counts_of = new std::vector<int64_t>(std::move(res.hists));
  py::capsule owner(counts_of, [](void* v) { delete static_cast<std::vector<int64_t>*>(v); });
  py::array_t<int64_t> hists(std::vector<py::ssize_t>{static_cast<py::ssize_t>(counts_of->size() / 65536), 65536},
                             counts_of->data(), owner);
  py::array_t<int64_t> counts(std::vector<py::ssize_t>{tasks, nc});
  if (!res.eqcounts.empty()) std::copy(res.eqcounts.begin(), res.eqcounts.end(), counts.mutable_data());
  if (!task_hists) return py::make_tuple(sums, hists, counts);
  return py::make_tuple(sums, hists, counts, task_hists_py(res));
}


void check_dims(uint64_t rows, uint64_t cols, uint64_t* numel, const char* fn) {
  if (rows < 1 || cols < 1)
    fail(std::string(fn) + ": rows and cols must be >= 1 (got " + std::to_string(rows) + " x " +
         std::to_string(cols) + ")");
  if (!lsf::mul_ok(rows, cols, numel))
    fail(std::string(fn) + ": rows x cols overflows a 64-bit size");
}

py::array_t<double> new_result(size_t n_experts, uint64_t rows) {
  if (rows > static_cast<uint64_t>(PY_SSIZE_T_MAX) / 8 / (n_experts ? n_experts : 1))
    fail("row_mav: result of " + std::to_string(n_experts) + " x " + std::to_string(rows) +
         " is too large");
  std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(n_experts),
                                 static_cast<py::ssize_t>(rows)};
  py::array_t<double> res(shape);
  if (res.size() > 0) std::fill(res.mutable_data(), res.mutable_data() + res.size(), 0.0);
  return res;
}

// CoreErr unless buffer v holds exactly numel elements of d; `count` is how the message states
// the number of elements (default: numel itself).
void check_len(const BufView& v, DType d, uint64_t numel, const std::string& role, const char* fn,
               const std::string& count = "") {
  uint64_t want;
  const bool fits = lsf::mul_ok(numel, lsf::dtype_size(d), &want);
  if (!fits || v.len() != want)
    fail(std::string(fn) + ": " + role + " has " + std::to_string(v.len()) + " bytes but " +
         (count.empty() ? std::to_string(numel) : count) + " elements of " + lsf::dtype_name(d) +
         " need " + (fits ? std::to_string(want) : std::string("more")));
}

// factors: a sequence of (B, A) float32 C-contiguous buffers, B rows x r and A r x cols (r >= 1
// taken from B's length); weights one float per factor.
void blend_lowrank_file_py(py::handle inputs, py::handle input_dtypes, py::handle weights,
                           py::handle factors, py::handle factor_weights,
                           std::shared_ptr<lsf::ShardWriter> out, py::handle out_offset,
                           py::handle out_dtype, py::handle rows, py::handle cols,
                           py::handle chunk_elems, py::handle threads) {
  if (!out) throw py::type_error("out must be a ShardWriter");
  Slices in = to_slices(inputs, "inputs");
  const size_t n = in.slices.size();
  if (n == 0) fail("blend_lowrank_file: at least one input is required");
  auto dts = to_kernel_dtypes(input_dtypes, "input_dtypes", n, "inputs");
  auto w = to_weights(weights, n);
  DType odt = lsf::parse_kernel_dtype(to_string_arg(out_dtype, "out_dtype"), "out_dtype");
  uint64_t ooff = to_u64(out_offset, "out_offset");
  uint64_t r = to_u64(rows, "rows"), c = to_u64(cols, "cols");
  int64_t chunk = to_i64(chunk_elems, "chunk_elems");
  if (chunk <= 0)
    fail("blend_lowrank_file: chunk_elems must be >= 1 (got " + std::to_string(chunk) + ")");
  int64_t nthreads = to_i64(threads, "threads");
  uint64_t numel;
  check_dims(r, c, &numel, "blend_lowrank_file");

  auto pairs = to_items(factors, "factors");
  auto fw_items = to_items(factor_weights, "factor_weights");
  if (fw_items.size() != pairs.size())
    fail("factor_weights has " + std::to_string(fw_items.size()) + " entries but factors has " +
         std::to_string(pairs.size()));
  std::vector<std::unique_ptr<BufView>> views;
  std::vector<lsf::LowRankFactor> fs;
  for (size_t f = 0; f < pairs.size(); ++f) {
    const std::string role = "factors[" + std::to_string(f) + "]";
    auto ba = to_items(pairs[f], role.c_str());
    if (ba.size() != 2) throw py::type_error(role + " must be a (B, A) pair of buffers");
    views.emplace_back(new BufView(ba[0], false, role + "[0] (B)"));
    const BufView& bv = *views.back();
    views.emplace_back(new BufView(ba[1], false, role + "[1] (A)"));
    const BufView& av = *views.back();
    // r from B: rows x r float32
    if (bv.len() == 0 || bv.len() % 4 != 0 || (bv.len() / 4) % r != 0)
      fail("blend_lowrank_file: " + role + "[0] (B) has " + std::to_string(bv.len()) +
           " bytes, not rows (" + std::to_string(r) + ") x rank >= 1 float32 values");
    const uint64_t rank = bv.len() / 4 / r;
    uint64_t a_elems;
    if (!lsf::mul_ok(rank, c, &a_elems))
      fail("blend_lowrank_file: " + role + " rank x cols overflows a 64-bit size");
    check_len(av, DType::F32, a_elems, role + "[1] (A)", "blend_lowrank_file",
              std::to_string(rank) + " x " + std::to_string(c));
    for (const BufView* v : {&bv, &av})
      if (reinterpret_cast<uintptr_t>(v->data()) % alignof(float) != 0)
        fail("blend_lowrank_file: " + role + (v == &bv ? "[0] (B)" : "[1] (A)") +
             " is not aligned to 4 bytes (float32)");
    double d = PyFloat_AsDouble(fw_items[f].ptr());
    if (d == -1.0 && PyErr_Occurred()) throw py::error_already_set();
    fs.push_back(lsf::LowRankFactor{reinterpret_cast<const float*>(bv.data()),
                                    reinterpret_cast<const float*>(av.data()), rank,
                                    static_cast<float>(d)});
  }
  py::gil_scoped_release nogil;
  lsf::blend_lowrank_file_run(in.slices, dts, w, fs, *out, ooff, odt, r, c,
                              static_cast<uint64_t>(chunk), nthreads);
}

py::array_t<double> row_mav_buffers_py(py::handle experts, py::handle expert_dtypes,
                                       py::handle base, py::handle base_dtype, py::handle rows,
                                       py::handle cols, py::handle threads) {
  auto items = to_items(experts, "experts");
  const size_t n = items.size();
  auto dts = to_kernel_dtypes(expert_dtypes, "expert_dtypes", n, "experts");
  DType bdt = lsf::parse_kernel_dtype(to_string_arg(base_dtype, "base_dtype"), "base_dtype");
  uint64_t r = to_u64(rows, "rows"), c = to_u64(cols, "cols");
  int64_t nthreads = to_i64(threads, "threads");
  uint64_t numel;
  check_dims(r, c, &numel, "row_mav_buffers");

  const std::string shape = std::to_string(r) + " x " + std::to_string(c);
  BufView bv(base, false, "base");
  check_len(bv, bdt, numel, "base", "row_mav_buffers", shape);
  std::vector<std::unique_ptr<BufView>> views;
  std::vector<const unsigned char*> ptrs;
  for (size_t i = 0; i < n; ++i) {
    std::string role = "experts[" + std::to_string(i) + "]";
    views.emplace_back(new BufView(items[i], false, role));
    check_len(*views.back(), dts[i], numel, role, "row_mav_buffers", shape);
    ptrs.push_back(views.back()->data());
  }
  auto res = new_result(n, r);
  double* out = res.mutable_data();
  {
    py::gil_scoped_release nogil;
    lsf::row_mav_buffers_run(ptrs, dts, bv.data(), bdt, r, c, out, nthreads);
  }
  return res;
}

py::array_t<double> row_mav_file_py(py::handle experts, py::handle expert_dtypes,
                                    py::handle base, py::handle base_dtype, py::handle rows,
                                    py::handle cols, py::handle chunk_elems, py::handle threads) {
  Slices ex = to_slices(experts, "experts");
  const size_t n = ex.slices.size();
  auto dts = to_kernel_dtypes(expert_dtypes, "expert_dtypes", n, "experts");
  std::vector<std::shared_ptr<lsf::InputFile>> keep_base;
  lsf::FileSlice bs = to_slice(base, "base", keep_base);
  DType bdt = lsf::parse_kernel_dtype(to_string_arg(base_dtype, "base_dtype"), "base_dtype");
  uint64_t r = to_u64(rows, "rows"), c = to_u64(cols, "cols");
  int64_t chunk = to_i64(chunk_elems, "chunk_elems");
  if (chunk <= 0)
    fail("row_mav_file: chunk_elems must be >= 1 (got " + std::to_string(chunk) + ")");
  int64_t nthreads = to_i64(threads, "threads");
  uint64_t numel;
  check_dims(r, c, &numel, "row_mav_file");
  // The result (experts x rows doubles) is allocated from numbers the caller passed: check that
  // every slice holds rows x cols elements first, so they are bounded by the files' sizes.
  lsf::check_slice(bs, numel, bdt, "row_mav_file: base");
  lsf::check_slices(ex.slices, dts, numel, "row_mav_file: experts");
  auto res = new_result(n, r);
  double* out = res.mutable_data();
  {
    py::gil_scoped_release nogil;
    lsf::row_mav_file_run(ex.slices, dts, bs, bdt, r, c, out, static_cast<uint64_t>(chunk),
                          nthreads);
  }
  return res;
}

// ---- TIES-merging ------------------------------------------------------------------------------

float to_lam(py::handle h) {
  double d = PyFloat_AsDouble(h.ptr());
  if (d == -1.0 && PyErr_Occurred()) throw py::error_already_set();
  return static_cast<float>(d);  // rounded to float32 once, as torch does
}

// The buffers of `base` and `experts` with their lengths checked against numel elements.
struct TiesBuffers {
  DType bdt;
  std::vector<DType> edt;
  std::unique_ptr<BufView> base;
  std::vector<std::unique_ptr<BufView>> views;
  std::vector<const unsigned char*> ptrs;
};

// numel == UINT64_MAX: take it from the base buffer (which must hold whole elements).
TiesBuffers ties_inputs(py::handle base, py::handle base_dtype, py::handle experts,
                        py::handle expert_dtypes, uint64_t* numel, const char* fn) {
  TiesBuffers t;
  auto items = to_items(experts, "experts");
  const size_t n = items.size();
  if (n == 0) fail(std::string(fn) + ": at least one expert is required");
  t.bdt = lsf::parse_kernel_dtype(to_string_arg(base_dtype, "base_dtype"), "base_dtype");
  t.edt = to_kernel_dtypes(expert_dtypes, "expert_dtypes", n, "experts");
  t.base.reset(new BufView(base, false, "base"));
  if (*numel == UINT64_MAX) {
    const uint64_t bsz = lsf::dtype_size(t.bdt);
    if (t.base->len() % bsz != 0)
      fail(std::string(fn) + ": base has " + std::to_string(t.base->len()) +
           " bytes, not a multiple of " + std::to_string(bsz) + " (" + lsf::dtype_name(t.bdt) +
           ")");
    *numel = t.base->len() / bsz;
  }
  check_len(*t.base, t.bdt, *numel, "base", fn);
  for (size_t i = 0; i < n; ++i) {
    std::string role = "experts[" + std::to_string(i) + "]";
    t.views.emplace_back(new BufView(items[i], false, role));
    check_len(*t.views.back(), t.edt[i], *numel, role, fn);
    t.ptrs.push_back(t.views.back()->data());
  }
  return t;
}

py::list ties_thresholds_buffers_py(py::handle base, py::handle base_dtype, py::handle experts,
                                    py::handle expert_dtypes, py::handle keep,
                                    py::handle threads) {
  uint64_t numel = UINT64_MAX;
  TiesBuffers t =
      ties_inputs(base, base_dtype, experts, expert_dtypes, &numel, "ties_thresholds_buffers");
  uint64_t k = to_u64(keep, "keep");
  int64_t nthreads = to_i64(threads, "threads");
  std::vector<float> tau;
  {
    py::gil_scoped_release nogil;
    tau = lsf::ties_thresholds_buffers_run(t.base->data(), t.bdt, t.ptrs, t.edt, numel, k,
                                           nthreads);
  }
  py::list res;
  for (float f : tau) res.append(py::float_(static_cast<double>(f)));
  return res;
}

void ties_buffers_py(py::handle base, py::handle base_dtype, py::handle experts,
                     py::handle expert_dtypes, py::handle out, py::handle out_dtype,
                     py::handle keep, py::handle lam, py::handle threads) {
  DType odt = lsf::parse_kernel_dtype(to_string_arg(out_dtype, "out_dtype"), "out_dtype");
  BufView ov(out, true, "out");
  const uint64_t osz = lsf::dtype_size(odt);
  if (ov.len() % osz != 0)
    fail("ties_buffers: out has " + std::to_string(ov.len()) + " bytes, not a multiple of " +
         std::to_string(osz) + " (" + lsf::dtype_name(odt) + ")");
  uint64_t numel = ov.len() / osz;
  TiesBuffers t = ties_inputs(base, base_dtype, experts, expert_dtypes, &numel, "ties_buffers");
  uint64_t k = to_u64(keep, "keep");
  float l = to_lam(lam);
  int64_t nthreads = to_i64(threads, "threads");
  py::gil_scoped_release nogil;
  lsf::ties_buffers_run(t.base->data(), t.bdt, t.ptrs, t.edt, ov.data(), odt, numel, k, l,
                        nthreads);
}

void ties_file_py(py::handle base, py::handle base_dtype, py::handle experts,
                  py::handle expert_dtypes, std::shared_ptr<lsf::ShardWriter> out,
                  py::handle out_offset, py::handle out_dtype, py::handle numel, py::handle keep,
                  py::handle lam, py::handle chunk_elems, py::handle threads,
                  py::handle record_budget) {
  if (!out) throw py::type_error("out must be a ShardWriter");
  std::vector<std::shared_ptr<lsf::InputFile>> keep_base;
  lsf::FileSlice bs = to_slice(base, "base", keep_base);
  DType bdt = lsf::parse_kernel_dtype(to_string_arg(base_dtype, "base_dtype"), "base_dtype");
  Slices ex = to_slices(experts, "experts");
  const size_t n = ex.slices.size();
  if (n == 0) fail("ties_file: at least one expert is required");
  auto dts = to_kernel_dtypes(expert_dtypes, "expert_dtypes", n, "experts");
  DType odt = lsf::parse_kernel_dtype(to_string_arg(out_dtype, "out_dtype"), "out_dtype");
  uint64_t ooff = to_u64(out_offset, "out_offset");
  uint64_t ne = to_u64(numel, "numel");
  uint64_t k = to_u64(keep, "keep");
  float l = to_lam(lam);
  int64_t chunk = to_i64(chunk_elems, "chunk_elems");
  if (chunk <= 0) fail("ties_file: chunk_elems must be >= 1 (got " + std::to_string(chunk) + ")");
  int64_t nthreads = to_i64(threads, "threads");
  uint64_t budget = to_u64(record_budget, "record_budget");
  py::gil_scoped_release nogil;
  lsf::ties_file_run(bs, bdt, ex.slices, dts, *out, ooff, odt, ne, k, l,
                     static_cast<uint64_t>(chunk), nthreads, budget);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "The C++ core of layerswap-fast: bytes, files and kernels (see _core.pyi).";
  m.attr("__version__") = LSF_VERSION;

  g_core_error = PyErr_NewExceptionWithDoc(
      "layerswap_fast._core.CoreError",
      "Any failure of the core. str(e) is one line naming the file and the cause; errno is set "
      "when an OS call failed.",
      PyExc_OSError, nullptr);
  if (!g_core_error) throw py::error_already_set();
  m.add_object("CoreError", py::handle(g_core_error));

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const CoreErr& e) {
      set_core_error(e.err, e.msg);
    } catch (const std::bad_alloc&) {
      set_core_error(ENOMEM, "Cannot allocate memory: out of memory in layerswap_fast._core");
    }
  });

  m.attr("MAX_HEADER_BYTES") = py::int_(lsf::kMaxHeaderBytes);
  m.attr("WHOLE_NORM_ELEMS") = py::int_(lsf::kWholeNormElems);
  m.attr("KEEP_MAPPED_BYTES") = py::int_(lsf::kKeepMappedBytes);

  // ---- InputFile ----
  py::class_<lsf::InputFile, std::shared_ptr<lsf::InputFile>>(m, "InputFile")
      .def(py::init([](py::handle path, py::handle io) {
             std::string p = to_path(path);
             const lsf::IoMode mode = lsf::parse_io_mode(to_string_arg(io, "io"));
             py::gil_scoped_release nogil;
             return std::make_shared<lsf::InputFile>(p, mode);
           }),
           py::arg("path"), py::arg("io") = "auto")
      .def_property_readonly("path", [](lsf::InputFile& f) { return path_to_str(f.path()); })
      .def_property_readonly("io", [](lsf::InputFile& f) { return lsf::io_mode_name(f.io()); })
      .def(
          "set_io",
          [](lsf::InputFile& f, py::handle io) {
            const lsf::IoMode mode = lsf::parse_io_mode(to_string_arg(io, "io"));
            py::gil_scoped_release nogil;
            f.set_io(mode);
          },
          py::arg("io"))
      .def_property_readonly("size", [](lsf::InputFile& f) { return f.size(); })
      .def("read_header",
           [](lsf::InputFile& f) {
             uint64_t n;
             {
               py::gil_scoped_release nogil;
               n = f.header_length();
             }
             auto b = py::reinterpret_steal<py::bytes>(
                 PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(n)));
             if (!b) throw py::error_already_set();
             char* dst = PyBytes_AS_STRING(b.ptr());
             {
               py::gil_scoped_release nogil;
               f.read(8, dst, n);
             }
             return b;
           })
      .def(
          "read",
          [](lsf::InputFile& f, py::handle offset, py::handle nbytes) {
            uint64_t off = to_u64(offset, "offset");
            uint64_t n = to_u64(nbytes, "nbytes");
            f.check_range(off, n, "reading");
            auto b = py::reinterpret_steal<py::bytes>(
                PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(n)));
            if (!b) throw py::error_already_set();
            char* dst = PyBytes_AS_STRING(b.ptr());
            {
              py::gil_scoped_release nogil;
              f.read(off, dst, n);
            }
            return b;
          },
          py::arg("offset"), py::arg("nbytes"))
      .def(
          "read_into",
          [](lsf::InputFile& f, py::handle offset, py::handle out) {
            uint64_t off = to_u64(offset, "offset");
            BufView v(out, true, "out");
            py::gil_scoped_release nogil;
            f.read(off, v.data(), v.len());
          },
          py::arg("offset"), py::arg("out"))
      .def("check_unchanged",
           [](lsf::InputFile& f) {
             py::gil_scoped_release nogil;
             f.check_unchanged();
           })
      .def("close",
           [](lsf::InputFile& f) {
             py::gil_scoped_release nogil;
             f.close();
           })
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](lsf::InputFile& f, py::args) {
        py::gil_scoped_release nogil;
        f.close();
      })
      .def("__repr__", [](lsf::InputFile& f) {
        return py::str("<InputFile {!r} size={}>").format(path_to_str(f.path()), f.size());
      });

  // ---- ShardWriter ----
  py::class_<lsf::ShardWriter, std::shared_ptr<lsf::ShardWriter>>(m, "ShardWriter")
      .def(py::init([](py::handle path, py::handle size, bool reserve) {
             std::string p = to_path(path);
             uint64_t s = to_u64(size, "size");
             py::gil_scoped_release nogil;
             return std::make_shared<lsf::ShardWriter>(p, s, reserve);
           }),
           py::arg("path"), py::arg("size"), py::arg("reserve") = true)
      .def_property_readonly("path", [](lsf::ShardWriter& w) { return path_to_str(w.path()); })
      .def_property_readonly("size", [](lsf::ShardWriter& w) { return w.size(); })
      .def(
          "write",
          [](lsf::ShardWriter& w, py::handle offset, py::handle data) {
            uint64_t off = to_u64(offset, "offset");
            BufView v(data, false, "data");
            py::gil_scoped_release nogil;
            w.write(off, v.data(), v.len());
          },
          py::arg("offset"), py::arg("data"))
      .def(
          "copy_range",
          [](lsf::ShardWriter& w, std::shared_ptr<lsf::InputFile> src, py::handle src_offset,
             py::handle dst_offset, py::handle nbytes) {
            if (!src) throw py::type_error("src must be an InputFile");
            uint64_t so = to_u64(src_offset, "src_offset");
            uint64_t dof = to_u64(dst_offset, "dst_offset");
            uint64_t n = to_u64(nbytes, "nbytes");
            py::gil_scoped_release nogil;
            w.copy_range(*src, so, dof, n);
          },
          py::arg("src"), py::arg("src_offset"), py::arg("dst_offset"), py::arg("nbytes"))
      .def(
          "writeback",
          [](lsf::ShardWriter& w, py::handle offset, py::handle nbytes, bool wait, bool drop) {
            uint64_t off = to_u64(offset, "offset");
            uint64_t n = to_u64(nbytes, "nbytes");
            py::gil_scoped_release nogil;
            w.writeback(off, n, wait, drop);
          },
          py::arg("offset"), py::arg("nbytes"), py::arg("wait") = false, py::arg("drop") = false)
      .def(
          "close",
          [](lsf::ShardWriter& w, bool sync) {
            py::gil_scoped_release nogil;
            w.close(sync);
          },
          py::arg("sync") = true)
      .def("abort",
           [](lsf::ShardWriter& w) {
             py::gil_scoped_release nogil;
             w.abort();
           })
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__",
           [](lsf::ShardWriter& w, py::args exc) {
             if (exc.size() > 0 && !exc[0].is_none()) {
               py::gil_scoped_release nogil;
               w.abort();
             }
           })
      .def("__repr__", [](lsf::ShardWriter& w) {
        return py::str("<ShardWriter {!r} size={}>").format(path_to_str(w.path()), w.size());
      });

  // ---- functions ----
  m.def("dtype_size", &dtype_size_py, py::arg("dtype"));
  m.def("blend_buffers", &blend_buffers_py, py::arg("inputs"), py::arg("input_dtypes"),
        py::arg("weights"), py::arg("out"), py::arg("out_dtype"), py::arg("threads") = 0);
  m.def("blend_file", &blend_file_py, py::arg("inputs"), py::arg("input_dtypes"),
        py::arg("weights"), py::arg("out"), py::arg("out_offset"), py::arg("out_dtype"),
        py::arg("numel"), py::arg("chunk_elems") = 1 << 20, py::arg("threads") = 0);
  m.def("blend_lowrank_file", &blend_lowrank_file_py, py::arg("inputs"), py::arg("input_dtypes"),
        py::arg("weights"), py::arg("factors"), py::arg("factor_weights"), py::arg("out"),
        py::arg("out_offset"), py::arg("out_dtype"), py::arg("rows"), py::arg("cols"),
        py::arg("chunk_elems") = 1 << 18, py::arg("threads") = 0);
  m.def("row_mav_buffers", &row_mav_buffers_py, py::arg("experts"), py::arg("expert_dtypes"),
        py::arg("base"), py::arg("base_dtype"), py::arg("rows"), py::arg("cols"),
        py::arg("threads") = 0);
  m.def("row_mav_file", &row_mav_file_py, py::arg("experts"), py::arg("expert_dtypes"),
        py::arg("base"), py::arg("base_dtype"), py::arg("rows"), py::arg("cols"),
        py::arg("chunk_elems") = 1 << 20, py::arg("threads") = 0);
  m.def("ties_thresholds_buffers", &ties_thresholds_buffers_py, py::arg("base"),
        py::arg("base_dtype"), py::arg("experts"), py::arg("expert_dtypes"), py::arg("keep"),
        py::arg("threads") = 0);
  m.def("ties_buffers", &ties_buffers_py, py::arg("base"), py::arg("base_dtype"),
        py::arg("experts"), py::arg("expert_dtypes"), py::arg("out"), py::arg("out_dtype"),
        py::arg("keep"), py::arg("lam"), py::arg("threads") = 0);
  m.def("ties_file", &ties_file_py, py::arg("base"), py::arg("base_dtype"), py::arg("experts"),
        py::arg("expert_dtypes"), py::arg("out"), py::arg("out_offset"), py::arg("out_dtype"),
        py::arg("numel"), py::arg("keep"), py::arg("lam"), py::arg("chunk_elems") = 1 << 20,
        py::arg("threads") = 0, py::arg("record_budget") = 64 << 20);
  m.def("mk_program", &mk_program_py, py::arg("inputs"), py::arg("input_dtypes"),
        py::arg("numel"), py::arg("code"), py::arg("consts"), py::arg("ints"), py::arg("ranks"),
        py::arg("out"), py::arg("out_offset"), py::arg("out_dtype"),
        py::arg("chunk_elems") = 1 << 20, py::arg("segment_elems") = 1 << 20,
        py::arg("index_base") = 0, py::arg("threads") = 0, py::arg("task_hists") = false,
        py::arg("masks") = py::list(), py::arg("whole_sums") = false, py::arg("keep_mapped") = false);
  m.def("ties_file_stats", []() {
    const lsf::TiesFileStats s = lsf::ties_file_stats();
    py::dict d;
    d["one_pass"] = s.one_pass;
    d["rewritten"] = s.rewritten;
    d["fallback_budget"] = s.fallback_budget;
    d["fallback_miss"] = s.fallback_miss;
    d["records"] = s.records;
    d["patched"] = s.patched;
    return d;
  });
  m.def(
      "_set_copy_file_range_enabled",
      [](bool enabled) { lsf::set_copy_file_range_enabled(enabled); }, py::arg("enabled"),
      "Testing hook: False forces ShardWriter.copy_range onto its pread/pwrite fallback.");
  m.def(
      "_set_max_io_bytes", [](uint64_t n) { lsf::set_max_io_bytes(n); }, py::arg("n"),
      "Testing hook: at most n bytes per read, write or copy call (0: the default), so that "
      "every call comes back short and the retry loops run.");
  m.def(
      "_set_fault_hook",
      [](uint64_t after, py::handle path, uint64_t size, py::handle replace_with) {
        lsf::set_fault_hook(after, to_path(path), size,
                            replace_with.is_none() ? std::string() : to_path(replace_with));
      },
      py::arg("after"), py::arg("path"), py::arg("size") = 0, py::arg("replace_with") = py::none(),
      "Testing hook: once `after` more chunks of file kernels have been prepared (over all "
      "threads), the next one first truncates `path` to `size` bytes, or renames `replace_with` "
      "over it.");
  m.def(
      "_clear_fault_hook", []() { lsf::clear_fault_hook(); },
      "Testing hook: disarm _set_fault_hook if it has not fired.");
  m.def(
      "_set_lowrank_simd_enabled", [](bool enabled) { lsf::set_lowrank_simd_enabled(enabled); },
      py::arg("enabled"),
      "Testing hook: False makes blend_lowrank_file's products take their portable form, not AVX2.");
  m.def(
      "_set_ties_simd_enabled", [](bool enabled) { lsf::set_ties_simd_enabled(enabled); },
      py::arg("enabled"),
      "Testing hook: False makes the TIES BF16 merge loop take its portable form, not AVX-512.");
  m.def(
      "_set_mask_simd_enabled", [](bool enabled) { lsf::set_mask_simd_enabled(enabled); },
      py::arg("enabled"),
      "Testing hook: False makes mk_program's MaskOut and MaskIn take their portable form, not AVX-512.");
}
