#include "mapped.hpp"

#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <mutex>

#include "common.hpp"
#include "io.hpp"

namespace lsf {

// ---- the read path -------------------------------------------------------------------------------

IoMode parse_io_mode(const std::string& name) {
  if (name == "auto") return IoMode::Auto;
  if (name == "mmap") return IoMode::Mmap;
  if (name == "pread") return IoMode::Pread;
  fail("io must be one of auto, mmap, pread (got '" + show(name) + "')");
}

const char* io_mode_name(IoMode m) {
  switch (m) {
    case IoMode::Mmap: return "mmap";
    case IoMode::Pread: return "pread";
    default: return "auto";
  }
}

namespace {

// statfs f_type of filesystems where every page fault is a round trip to a server or a user-space
// daemon (linux/magic.h and the filesystems' own sources; not all have a public header).
constexpr unsigned long kRemoteFs[] = {
    0x6969,      // NFS
    0x517B,      // SMB
    0xFF534D42,  // CIFS
    0xFE534D42,  // SMB2
    0x65735546,  // FUSE (sshfs, s3fs, gcsfuse, virtiofs, ...)
    0x01021997,  // 9p (v9fs)
    0x00C36400,  // Ceph
    0x0BD00BD0,  // Lustre
    0x47504653,  // GPFS
    0x5346414F,  // AFS
    0x6B414653,  // kAFS
    0x73757245,  // Coda
    0x564C,      // NCP
    0x19830326,  // BeeGFS
    0x20030528,  // OrangeFS
    0x013111A8,  // IBRIX
    0x7461636F,  // OCFS2
    0x01161970,  // GFS2
};

}  // namespace

// What auto picks on a local filesystem: mmap. Since the reader drops its page-table entries in
// large spans (chunk_reader.cpp) it measures as fast as pread or faster for every command, and it
// spares each input byte a copy (bench/RESULTS.md, issue 20).
constexpr IoMode kLocalDefault = IoMode::Mmap;

IoMode resolve_io_mode(IoMode m, int fd) {
  if (m != IoMode::Auto) return m;
  struct statfs sf;
  if (::fstatfs(fd, &sf) != 0) return IoMode::Pread;  // unknown: the path that always works
  const auto type = static_cast<unsigned long>(sf.f_type) & 0xFFFFFFFFUL;
  for (unsigned long r : kRemoteFs)
    if (type == r) return IoMode::Pread;
  return kLocalDefault;
}

// ---- the registry of mappings ------------------------------------------------------------------

namespace {

// Read by the signal handler, so plain atomics in static storage: no lock, no allocation.
// A slot is claimed through `busy`, filled, then published by storing `file`.
struct Slot {
  std::atomic<bool> busy{false};
  std::atomic<uintptr_t> lo{0}, hi{0};
  std::atomic<const InputFile*> file{nullptr};
};
constexpr size_t kSlots = 4096;
Slot g_slots[kSlots];
std::atomic<size_t> g_used{0};  // every published slot lies below this

// The recovery point of the running thread. initial-exec: the handler reads it, and a
// general-dynamic TLS access may allocate, which a signal handler must not.
struct Recovery {
  sigjmp_buf jb;
  const InputFile* volatile hit;
  Recovery* prev;
};
__attribute__((tls_model("initial-exec"))) thread_local Recovery* t_rec = nullptr;

// The handler found in place when ours went in; two copies so that a reinstall does not rewrite
// the one a running handler reads.
struct sigaction g_prev[2];
std::atomic<int> g_prev_i{0};
std::mutex g_install_m;

void chain(int sig, siginfo_t* si, void* uc) {
  const struct sigaction& p = g_prev[g_prev_i.load(std::memory_order_acquire)];
  if (p.sa_flags & SA_SIGINFO) {
    if (p.sa_sigaction) {
      p.sa_sigaction(sig, si, uc);
      return;
    }
  } else if (p.sa_handler != SIG_DFL && p.sa_handler != SIG_IGN) {
    p.sa_handler(sig);
    return;
  }
  // Default action (an ignored SIGBUS from a fault would only fault again): die of the signal,
  // as the process would have without us.
  struct sigaction dfl;
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  dfl.sa_flags = 0;
  ::sigaction(sig, &dfl, nullptr);
  ::raise(sig);
}

void on_sigbus(int sig, siginfo_t* si, void* uc) {
  if (si && si->si_code > 0) {  // a fault, not a signal someone sent
    const auto a = reinterpret_cast<uintptr_t>(si->si_addr);
    const size_t n = g_used.load(std::memory_order_acquire);
    for (size_t i = 0; i < n; ++i) {
      const InputFile* f = g_slots[i].file.load(std::memory_order_acquire);
      if (!f || a < g_slots[i].lo.load(std::memory_order_relaxed) ||
          a >= g_slots[i].hi.load(std::memory_order_relaxed))
        continue;
      Recovery* r = t_rec;
      if (!r) break;  // our mapping read outside a recovery point: a bug, handled as before us
      r->hit = f;
      // We are installed with SA_NODEFER, but a handler that chained to us may have run with
      // SIGBUS blocked, and siglongjmp(…, 0) does not restore the mask.
      sigset_t s;
      sigemptyset(&s);
      sigaddset(&s, SIGBUS);
      ::pthread_sigmask(SIG_UNBLOCK, &s, nullptr);
      siglongjmp(r->jb, 1);
    }
  }
  chain(sig, si, uc);
}

bool is_ours(const struct sigaction& sa) {
  return (sa.sa_flags & SA_SIGINFO) && sa.sa_sigaction == on_sigbus;
}

}  // namespace

void ensure_sigbus_handler() {
  std::lock_guard<std::mutex> g(g_install_m);
  struct sigaction cur;
  if (::sigaction(SIGBUS, nullptr, &cur) != 0 || is_ours(cur)) return;
  const int next = 1 - g_prev_i.load(std::memory_order_relaxed);
  g_prev[next] = cur;
  g_prev_i.store(next, std::memory_order_release);
  struct sigaction sa;
  sa.sa_sigaction = on_sigbus;
  sigemptyset(&sa.sa_mask);
  // No SA_ONSTACK: a SIGBUS from a mapped file arrives on a healthy stack, and leaving an
  // alternate stack by siglongjmp would cross stacks (ASan, which gives every thread one, warns).
  // SA_NODEFER: siglongjmp(…, 0) leaves the mask as it was, so SIGBUS must not be blocked here;
  // saving and restoring the mask instead would cost a system call per protected region.
  sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_RESTART;
  ::sigaction(SIGBUS, &sa, nullptr);
}

bool register_mapping(const void* begin, uint64_t len, const InputFile* file) {
  ensure_sigbus_handler();
  for (size_t i = 0; i < kSlots; ++i) {
    bool expected = false;
    if (!g_slots[i].busy.compare_exchange_strong(expected, true)) continue;
    const auto lo = reinterpret_cast<uintptr_t>(begin);
    g_slots[i].lo.store(lo, std::memory_order_relaxed);
    g_slots[i].hi.store(lo + len, std::memory_order_relaxed);
    g_slots[i].file.store(file, std::memory_order_release);
    size_t used = g_used.load(std::memory_order_relaxed);
    while (used < i + 1 && !g_used.compare_exchange_weak(used, i + 1)) {
    }
    return true;
  }
  return false;
}

void unregister_mapping(const void* begin) {
  const auto lo = reinterpret_cast<uintptr_t>(begin);
  const size_t n = g_used.load(std::memory_order_acquire);
  for (size_t i = 0; i < n; ++i) {
    if (!g_slots[i].file.load(std::memory_order_acquire) ||
        g_slots[i].lo.load(std::memory_order_relaxed) != lo)
      continue;
    g_slots[i].file.store(nullptr, std::memory_order_release);
    g_slots[i].busy.store(false, std::memory_order_release);
    return;
  }
}

// ---- recovery points ---------------------------------------------------------------------------

const InputFile* run_recoverable(void (*fn)(void*), void* ctx) {
  Recovery rec;
  rec.hit = nullptr;
  rec.prev = t_rec;
  if (sigsetjmp(rec.jb, 0) != 0) {
    t_rec = rec.prev;
    return rec.hit;
  }
  t_rec = &rec;
  try {
    fn(ctx);
  } catch (...) {  // an allocation that failed between two reads, say
    t_rec = rec.prev;
    throw;
  }
  t_rec = rec.prev;
  return nullptr;
}

void fail_mapping_fault(const InputFile* file) {
  auto* f = const_cast<InputFile*>(file);
  const int64_t now = f->current_size();
  const std::string name = show(f->path());
  if (now >= 0 && static_cast<uint64_t>(now) < f->size())
    fail("input changed during the merge: " + name + " was truncated while in use (it had " +
         std::to_string(f->size()) + " bytes when opened, " + std::to_string(now) + " now)");
  fail_os(EIO, "input changed during the merge: " + name +
                   " could not be read through its mapping (truncated while in use and grown "
                   "again, or a read error)");
}

// ---- test hook ---------------------------------------------------------------------------------

namespace {
std::atomic<bool> g_hook_armed{false};
std::atomic<int64_t> g_hook_left{0};
std::mutex g_hook_m;
std::string g_hook_path, g_hook_replace;
uint64_t g_hook_size = 0;
}  // namespace

void set_fault_hook(uint64_t after, const std::string& path, uint64_t size,
                    const std::string& replace_with) {
  std::lock_guard<std::mutex> g(g_hook_m);
  g_hook_path = path;
  g_hook_replace = replace_with;
  g_hook_size = size;
  g_hook_left.store(static_cast<int64_t>(after));
  g_hook_armed.store(true, std::memory_order_release);
}

void clear_fault_hook() {
  std::lock_guard<std::mutex> g(g_hook_m);
  g_hook_armed.store(false);
}

void fault_hook_tick() {
  if (!g_hook_armed.load(std::memory_order_acquire)) return;
  if (g_hook_left.fetch_sub(1) != 0) return;
  std::lock_guard<std::mutex> g(g_hook_m);
  if (!g_hook_armed.exchange(false)) return;
  int rc = g_hook_replace.empty() ? ::truncate(g_hook_path.c_str(), static_cast<off_t>(g_hook_size))
                                  : ::rename(g_hook_replace.c_str(), g_hook_path.c_str());
  if (rc != 0) std::perror("layerswap_fast._core fault hook");
}

}  // namespace lsf
