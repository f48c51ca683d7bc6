// Reading inputs straight from read-only mappings without letting a truncated file kill the
// process: a registry of the core's live input mappings, one process-wide SIGBUS handler and a
// per-thread recovery point. A fault inside a registered mapping on a thread that has a recovery
// point returns control there (siglongjmp) and becomes a CoreErr; any other SIGBUS goes on to the
// handler that was installed before ours (or the default action). No Python here.
//
// siglongjmp runs no destructors and releases no locks, so the code run under a recovery point
// (recoverable() below) must be plain loops over raw pointers and stack arrays: no allocation, no
// locks, no objects with destructors alive across a read of a mapping. The callers set up everything that needs
// those outside it, and the jump target lies outside it too.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

namespace lsf {

class InputFile;

// How an input file is read: pread into buffers, or straight from a read-only mapping.
enum class IoMode : uint8_t { Auto, Mmap, Pread };

// Parse "auto" / "mmap" / "pread"; CoreErr naming the value otherwise.
IoMode parse_io_mode(const std::string& name);
const char* io_mode_name(IoMode m);
// Auto resolved for the file behind fd: pread on network and FUSE filesystems (statfs f_type),
// where faulting pages in one at a time is far slower than large reads; mmap elsewhere.
IoMode resolve_io_mode(IoMode m, int fd);

// Make [begin, begin + len) of file's mapping known to the SIGBUS handler (installing it on first
// use); false when the registry is full (the caller then reads with pread). unregister before
// munmap.
bool register_mapping(const void* begin, uint64_t len, const InputFile* file);
void unregister_mapping(const void* begin);

// Put our handler back on top if someone (faulthandler.enable(), another library) replaced it
// since; the one found there becomes the handler we chain to. Called before each kernel call
// that reads a mapping.
void ensure_sigbus_handler();

// Run fn(ctx) under this thread's recovery point. Returns null, or the file whose mapping faulted
// (fn was abandoned at the fault). Recovery points nest; an exception from fn passes through.
const InputFile* run_recoverable(void (*fn)(void*), void* ctx);

// CoreErr for a fault in file's mapping: "input changed during the merge: FILE was truncated"
// when the file is now shorter than when it was opened.
[[noreturn]] void fail_mapping_fault(const InputFile* file);

// f() under a recovery point; a fault in an input mapping becomes CoreErr. f must follow the rules
// at the top of this file.
template <class F>
void recoverable(F&& f) {
  using Fn = std::remove_reference_t<F>;
  const InputFile* hit = run_recoverable([](void* p) { (*static_cast<Fn*>(p))(); },
                                         const_cast<void*>(static_cast<const void*>(&f)));
  if (hit) fail_mapping_fault(hit);
}

// ---- test hook ---------------------------------------------------------------------------------

// After `after` more chunks have been prepared for a kernel (ChunkReader::load, counted over all
// threads), the thread preparing the next one truncates the file at `path` to `size` bytes, or,
// with replace_with non-empty, renames that file over `path`, before that chunk is read. Once.
void set_fault_hook(uint64_t after, const std::string& path, uint64_t size,
                    const std::string& replace_with);
void clear_fault_hook();
// Called by ChunkReader::load.
void fault_hook_tick();

}  // namespace lsf
