// Errors, checked arithmetic and dtype names shared by the whole core. No Python here.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <string>

namespace lsf {

// The one exception type the core throws. module.cpp translates it into the Python
// CoreError(errno, msg) (or CoreError(msg) when err == 0).
struct CoreErr : std::exception {
  int err;          // errno of the failed OS call, 0 when no OS call failed
  std::string msg;  // one line; when err != 0 it starts with strerror(err) + ": "
  CoreErr(int e, std::string m) : err(e), msg(std::move(m)) {}
  const char* what() const noexcept override { return msg.c_str(); }
};

// Throw CoreErr(0, msg).
[[noreturn]] void fail(const std::string& msg);
// Throw CoreErr(err, strerror(err) + ": " + context).
[[noreturn]] void fail_os(int err, const std::string& context);
// Translate std::bad_alloc into CoreErr(ENOMEM) for an allocation of `bytes` for `what`.
[[noreturn]] void fail_nomem(uint64_t bytes, const std::string& what);

// A path (or any user string) for a one-line message: control characters escaped.
std::string show(const std::string& s);

inline bool range_ok(uint64_t off, uint64_t len, uint64_t size) {
  return off <= size && len <= size - off;
}
inline bool mul_ok(uint64_t a, uint64_t b, uint64_t* r) { return !__builtin_mul_overflow(a, b, r); }
inline bool add_ok(uint64_t a, uint64_t b, uint64_t* r) { return !__builtin_add_overflow(a, b, r); }

// ---- dtypes ---------------------------------------------------------------------------------
enum class DType : uint8_t {
  BOOL, U8, I8, F8_E4M3, F8_E5M2, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64
};

// False when `name` is not a safetensors dtype name.
bool parse_dtype(const std::string& name, DType* out);
size_t dtype_size(DType d);
const char* dtype_name(DType d);
inline bool is_float_kernel_dtype(DType d) {
  return d == DType::BF16 || d == DType::F16 || d == DType::F32;
}
// Parse a dtype the blend / row-MAV kernels accept; CoreErr naming the dtype otherwise.
// `role` is used in the message ("input_dtypes[1]", "out_dtype", ...).
DType parse_kernel_dtype(const std::string& name, const std::string& role);

// Threads to use: t <= 0 means all cores; never more than `tasks` (and at least 1).
size_t resolve_threads(int64_t t, uint64_t tasks);

}  // namespace lsf
