#include "common.hpp"

#include <cstdio>
#include <cstring>
#include <thread>

namespace lsf {

void fail(const std::string& msg) { throw CoreErr(0, msg); }

void fail_os(int err, const std::string& context) {
  char buf[256];
  // GNU strerror_r returns a pointer to the message (possibly not into buf).
  const char* s = strerror_r(err, buf, sizeof buf);
  throw CoreErr(err, std::string(s ? s : "unknown error") + ": " + context);
}

void fail_nomem(uint64_t bytes, const std::string& what) {
  fail_os(ENOMEM, "allocating " + std::to_string(bytes) + " bytes for " + what);
}

std::string show(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7f) {
      char b[8];
      std::snprintf(b, sizeof b, "\\x%02x", c);
      out += b;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

namespace {
struct DTypeInfo {
  const char* name;
  DType d;
  size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {"BOOL", DType::BOOL, 1}, {"U8", DType::U8, 1},   {"I8", DType::I8, 1},
    {"F8_E4M3", DType::F8_E4M3, 1}, {"F8_E5M2", DType::F8_E5M2, 1},
    {"I16", DType::I16, 2},   {"U16", DType::U16, 2}, {"F16", DType::F16, 2},
    {"BF16", DType::BF16, 2}, {"I32", DType::I32, 4}, {"U32", DType::U32, 4},
    {"F32", DType::F32, 4},   {"I64", DType::I64, 8}, {"U64", DType::U64, 8},
    {"F64", DType::F64, 8},
};
}  // namespace

bool parse_dtype(const std::string& name, DType* out) {
  for (const auto& info : kDTypes) {
    if (name == info.name) {
      *out = info.d;
      return true;
    }
  }
  return false;
}

size_t dtype_size(DType d) {
  for (const auto& info : kDTypes)
    if (info.d == d) return info.size;
  return 0;
}

const char* dtype_name(DType d) {
  for (const auto& info : kDTypes)
    if (info.d == d) return info.name;
  return "?";
}

DType parse_kernel_dtype(const std::string& name, const std::string& role) {
  DType d;
  if (!parse_dtype(name, &d))
    fail(role + ": unknown dtype '" + show(name) + "' (supported: BF16, F16, F32)");
  if (!is_float_kernel_dtype(d))
    fail(role + ": unsupported dtype '" + show(name) + "' (supported: BF16, F16, F32)");
  return d;
}

size_t resolve_threads(int64_t t, uint64_t tasks) {
  uint64_t n;
  if (t <= 0) {
    unsigned hw = std::thread::hardware_concurrency();
    n = hw ? hw : 1;
  } else {
    n = static_cast<uint64_t>(t);
  }
  if (n > 1024) n = 1024;
  if (n > tasks) n = tasks;
  if (n < 1) n = 1;
  return static_cast<size_t>(n);
}

}  // namespace lsf
