// cuda-emu's runtime: fibers (ucontext), the block scheduler with its three schedules, barriers,
// warp exchanges and the diagnostics. See include/emu.h for the execution model.
#include "emu.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <string>
#include <vector>

thread_local uint3 emu_threadIdx;
thread_local uint3 emu_blockIdx;
thread_local dim3 emu_blockDim;
thread_local dim3 emu_gridDim;

// The dynamic shared memory of a block: one array per name the kernels declare with
// `extern __shared__` (all alias one region on a GPU; each kernel uses one of them). Filled with
// 0xff bytes (NaN as f32 and f64) before each block; bytes past the launched size must stay so.
#define EMU_DYN_BYTES (227 * 1024)
alignas(16) thread_local double acc[EMU_DYN_BYTES / 8];  // mfac.cu pass 1
alignas(16) thread_local double sm[EMU_DYN_BYTES / 8];   // mfac.cu pass 2
alignas(16) thread_local float sh[EMU_DYN_BYTES / 4];    // pass.cu ln_bwd

namespace {

struct Dyn {
  const char* name;
  unsigned char* p;
};

enum State { RUN, AT_BLOCK, AT_WARP, DONE };

struct Fiber {
  ucontext_t ctx;
  State state;
  const char* file;
  int line;
  const char* what;
  unsigned mask;
  uint3 tid;
  int warp, lane;
  uint64_t xgen;
};

const size_t STACK = 256 * 1024;
const size_t GUARD = 4096;

struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  size_t below(size_t n) { return (size_t)(next() % n); }
  template <typename T>
  void shuffle(std::vector<T>& v) {
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[below(i)]);
  }
};

struct Launch {
  std::vector<Fiber> f;
  int n = 0, warps = 0;
  // Warp exchanges: two generations of 32 slots per warp, each slot tagged with its generation.
  std::vector<uint64_t> slot, tag;
  int sched = 0;
  Rng rng{0};
  ucontext_t main;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  int cur = -1;
  bool failed = false;
  std::string err;
  std::vector<int> ready;  // the shuffled schedule's runnable fibers
  std::vector<int> where;  // index of each fiber in `ready`, -1 when not there
};

thread_local Launch* L = nullptr;

// The fiber stacks of this OS thread, kept for its next launches and unmapped when it ends.
struct Stacks {
  std::vector<char*> v;
  ~Stacks();
};
thread_local Stacks stacks;

const char* base(const char* file) {
  const char* s = strrchr(file, '/');
  return s ? s + 1 : file;
}

void vrecord(const char* file, int line, const char* fmt, va_list ap) {
  if (L->failed) return;
  char msg[1024];
  vsnprintf(msg, sizeof msg, fmt, ap);
  char head[256];
  if (L->cur >= 0) {
    const Fiber& f = L->f[L->cur];
    snprintf(head, sizeof head, "%s:%d: block (%u,%u,%u) thread (%u,%u,%u): ", base(file), line,
             emu_blockIdx.x, emu_blockIdx.y, emu_blockIdx.z, f.tid.x, f.tid.y, f.tid.z);
  } else {
    snprintf(head, sizeof head, "block (%u,%u,%u): ", emu_blockIdx.x, emu_blockIdx.y,
             emu_blockIdx.z);
  }
  L->err = std::string(head) + msg;
  L->failed = true;
}

void record(const char* file, int line, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vrecord(file, line, fmt, ap);
  va_end(ap);
}

Fiber& me() {
  if (!L || L->cur < 0) {
    fprintf(stderr, "cuda-emu: a device function ran outside a launch\n");
    abort();
  }
  return L->f[L->cur];
}

// Back to the scheduler; a failed launch never resumes the fiber.
void to_scheduler() {
  Fiber& f = me();
  swapcontext(&f.ctx, &L->main);
}

void ready_add(int i) {
  if (L->sched != 1 || L->where[i] >= 0) return;
  L->where[i] = (int)L->ready.size();
  L->ready.push_back(i);
}

void ready_remove(int i) {
  if (L->sched != 1 || L->where[i] < 0) return;
  const int k = L->where[i], last = L->ready.back();
  L->ready[k] = last;
  L->where[last] = k;
  L->ready.pop_back();
  L->where[i] = -1;
}

void entry() {
  L->body(L->ctx);
  Fiber& f = me();
  f.state = DONE;
  swapcontext(&f.ctx, &L->main);
}

void run(int i) {
  Fiber& f = L->f[i];
  L->cur = i;
  emu_threadIdx = f.tid;
  swapcontext(&L->main, &f.ctx);
  L->cur = -1;
}

std::string lanes_of(unsigned bits) {
  std::string s;
  for (int l = 0; l < 32; ++l)
    if (bits >> l & 1u) {
      if (!s.empty()) s += ",";
      s += std::to_string(l);
    }
  return s;
}

// Releases warp w's barrier when every live lane waits at it; diagnoses what cannot be released.
void try_release_warp(int w) {
  const int a = w * 32, b = std::min(L->n, a + 32);
  unsigned exists = 0, done = 0;
  const Fiber* first = nullptr;
  for (int i = a; i < b; ++i) {
    const Fiber& f = L->f[i];
    exists |= 1u << (i - a);
    if (f.state == DONE) {
      done |= 1u << (i - a);
      continue;
    }
    if (f.state != AT_WARP) return;  // not yet (or a divergence the deadlock check names)
    if (!first) first = &f;
  }
  if (!first) return;
  for (int i = a; i < b; ++i) {
    const Fiber& f = L->f[i];
    if (f.state != AT_WARP) continue;
    if (f.line != first->line || strcmp(f.file, first->file) != 0) {
      L->cur = -1;
      record(f.file, f.line,
             "warp %d: lanes wait at different warp operations: %s at %s:%d and %s at %s:%d", w,
             f.what, base(f.file), f.line, first->what, base(first->file), first->line);
      return;
    }
    if (f.mask != exists) {
      L->cur = -1;
      record(f.file, f.line,
             "warp %d: %s with mask 0x%08x, but the warp's lanes are 0x%08x (partial masks are "
             "not emulated)",
             w, f.what, f.mask, exists);
      return;
    }
  }
  if (done) {
    L->cur = -1;
    record(first->file, first->line, "warp %d: %s after lane(s) %s exited", w, first->what,
           lanes_of(done).c_str());
    return;
  }
  for (int i = a; i < b; ++i) {
    L->f[i].state = RUN;
    ready_add(i);
  }
}

// Releases the block barrier when every live thread waits at it. Returns whether it did.
bool try_release_block() {
  const Fiber* first = nullptr;
  int done = 0;
  for (const Fiber& f : L->f) {
    if (f.state == DONE) {
      ++done;
      continue;
    }
    if (f.state != AT_BLOCK) return false;
    if (!first) first = &f;
  }
  if (!first) return false;
  for (const Fiber& f : L->f) {
    if (f.state != AT_BLOCK) continue;
    if (f.line != first->line || strcmp(f.file, first->file) != 0) {
      record(f.file, f.line,
             "__syncthreads reached from different lines: thread %u at %s:%d, thread %u at %s:%d",
             f.tid.x, base(f.file), f.line, first->tid.x, base(first->file), first->line);
      return false;
    }
  }
  if (done) {
    record(first->file, first->line, "__syncthreads after %d of %d threads exited", done, L->n);
    return false;
  }
  for (int i = 0; i < L->n; ++i) {
    L->f[i].state = RUN;
    ready_add(i);
  }
  return true;
}

bool all_done() {
  for (const Fiber& f : L->f)
    if (f.state != DONE) return false;
  return true;
}

void deadlock() {
  std::string s;
  int i = 0;
  while (i < L->n) {
    const Fiber& f = L->f[i];
    int j = i;
    while (j < L->n && L->f[j].state == f.state && L->f[j].line == f.line) ++j;
    char part[256];
    if (f.state == DONE)
      snprintf(part, sizeof part, "threads %d-%d exited", i, j - 1);
    else
      snprintf(part, sizeof part, "threads %d-%d wait at %s (%s:%d)", i, j - 1,
               f.state == AT_BLOCK ? "__syncthreads" : f.what, base(f.file), f.line);
    if (!s.empty()) s += "; ";
    s += part;
    i = j;
  }
  record("", 0, "deadlock: %s", s.c_str());
}

void after_run(int i) {
  const Fiber& f = L->f[i];
  if (f.state != RUN) ready_remove(i);
  if (f.state == AT_WARP || f.state == DONE) try_release_warp(f.warp);
}

// Fixed: every runnable fiber in thread order, to its next yield point, again and again.
void schedule_fixed() {
  for (;;) {
    bool ran = false;
    for (int i = 0; i < L->n && !L->failed; ++i)
      if (L->f[i].state == RUN) {
        run(i);
        after_run(i);
        ran = true;
      }
    if (L->failed) return;
    if (ran) continue;
    if (all_done()) return;
    if (!try_release_block()) {
      if (!L->failed) deadlock();
      return;
    }
  }
}

// Shuffled: at every yield point a runnable fiber at random.
void schedule_shuffled() {
  L->ready.clear();
  L->where.assign(L->n, -1);
  for (int i = 0; i < L->n; ++i) ready_add(i);
  for (;;) {
    while (!L->ready.empty() && !L->failed) {
      const int i = L->ready[L->rng.below(L->ready.size())];
      run(i);
      after_run(i);
    }
    if (L->failed) return;
    if (all_done()) return;
    if (!try_release_block()) {
      if (!L->failed) deadlock();
      return;
    }
  }
}

// Warp-serial: the warps in a random order, each run alone to its next block barrier (or its
// end), its lanes in a random order.
void schedule_warps() {
  std::vector<int> order(L->warps), lanes;
  for (int w = 0; w < L->warps; ++w) order[w] = w;
  for (;;) {
    L->rng.shuffle(order);
    for (int w : order) {
      const int a = w * 32, b = std::min(L->n, a + 32);
      lanes.clear();
      for (int i = a; i < b; ++i) lanes.push_back(i);
      for (;;) {
        L->rng.shuffle(lanes);
        bool ran = false;
        for (int i : lanes)
          if (L->f[i].state == RUN && !L->failed) {
            run(i);
            after_run(i);
            ran = true;
          }
        if (L->failed) return;
        if (!ran) break;
      }
    }
    if (all_done()) return;
    if (!try_release_block()) {
      if (!L->failed) deadlock();
      return;
    }
  }
}

void fill_dyn() {
  memset(acc, 0xff, sizeof acc);
  memset(sm, 0xff, sizeof sm);
  memset(sh, 0xff, sizeof sh);
}

void check_dyn(size_t shared) {
  const Dyn dyn[3] = {{"acc", (unsigned char*)acc}, {"sm", (unsigned char*)sm},
                      {"sh", (unsigned char*)sh}};
  for (const Dyn& d : dyn)
    for (size_t k = shared; k < EMU_DYN_BYTES; ++k)
      if (d.p[k] != 0xff) {
        record("", 0,
               "write past the launched dynamic shared memory: byte %zu of `extern __shared__ "
               "%s[]` (launched with %zu bytes)",
               k, d.name, shared);
        return;
      }
}

Stacks::~Stacks() {
  for (char* p : v) munmap(p, STACK + GUARD);
}

char* stack(size_t i) {
  while (stacks.v.size() <= i) {
    void* p = mmap(nullptr, STACK + GUARD, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (p == MAP_FAILED) {
      fprintf(stderr, "cuda-emu: cannot map a fiber stack\n");
      abort();
    }
    mprotect(p, GUARD, PROT_NONE);  // stacks grow down: an overflow faults, never corrupts
    stacks.v.push_back((char*)p);
  }
  return stacks.v[i];
}

}  // namespace

namespace emu {

void fail(const char* file, int line, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vrecord(file, line, fmt, ap);
  va_end(ap);
  to_scheduler();
}

void check_aligned(const void* p, unsigned align, const char* file, int line, const char* what) {
  if ((uintptr_t)p % align != 0)
    fail(file, line, "misaligned %s: address %p is not a multiple of %u", what, p, align);
}

void syncthreads(const char* file, int line) {
  Fiber& f = me();
  f.state = AT_BLOCK;
  f.file = file;
  f.line = line;
  f.what = "__syncthreads";
  to_scheduler();
}

void warp_barrier(unsigned mask, const char* file, int line, const char* what) {
  Fiber& f = me();
  f.state = AT_WARP;
  f.file = file;
  f.line = line;
  f.what = what;
  f.mask = mask;
  to_scheduler();
}

void yield_point() {
  if (L && L->sched != 0 && L->cur >= 0) to_scheduler();
}

int lane() { return me().lane; }

void exchange_put(uint64_t bits) {
  Fiber& f = me();
  const uint64_t g = ++f.xgen;
  const size_t k = ((size_t)(g & 1) * L->warps + f.warp) * 32 + f.lane;
  L->slot[k] = bits;
  L->tag[k] = g;
}

uint64_t exchange_get(int src, const char* file, int line, const char* what) {
  Fiber& f = me();
  const uint64_t g = f.xgen;
  const size_t k = ((size_t)(g & 1) * L->warps + f.warp) * 32 + src;
  if (src < 0 || src > 31 || f.warp * 32 + src >= L->n || L->tag[k] != g)
    fail(file, line, "%s reads lane %d, which did not take part", what, src);
  return L->slot[k];
}

unsigned vote(unsigned mask, int pred, int kind, const char* file, int line) {
  exchange_put((uint64_t)pred);
  warp_barrier(mask, file, line, kind == 0 ? "__ballot_sync" : kind == 1 ? "__any_sync" : "__all_sync");
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u)
      if (exchange_get(l, file, line, "a warp vote")) bits |= 1u << l;
  if (kind == 0) return bits;
  if (kind == 1) return bits != 0;
  return bits == mask;
}

}  // namespace emu

// UBSan's hook for -fsanitize=alignment (no sanitizer runtime is linked): a misaligned plain
// load or store in a kernel (e.g. through a uint4*) becomes a diagnostic of the launch.
struct EmuSourceLocation {
  const char* file;
  uint32_t line, column;
};
struct EmuTypeMismatch {
  EmuSourceLocation loc;
  const void* type;
  unsigned char log_alignment;
  unsigned char kind;
};
extern "C" void __ubsan_handle_type_mismatch_v1(EmuTypeMismatch* data, uintptr_t ptr) {
  const unsigned align = 1u << data->log_alignment;
  if (L && L->cur >= 0) {
    emu::fail(data->loc.file, (int)data->loc.line,
              "misaligned access: address 0x%llx is not a multiple of %u",
              (unsigned long long)ptr, align);
  } else {
    fprintf(stderr, "cuda-emu: misaligned access at %s:%u (0x%llx, %u)\n", data->loc.file,
            data->loc.line, (unsigned long long)ptr, align);
    abort();
  }
}

// Runs `body(ctx)` as every thread of a grid. sched: 0 fixed, 1 shuffled, 2 warp-serial (1 and 2
// also shuffle the order of the blocks). Returns 0, or 1 with the first diagnostic in err.
extern "C" int emu_launch(const unsigned* grid, const unsigned* block, size_t shared, int sched,
                          uint64_t seed, void (*body)(void*), void* ctx, char* err,
                          size_t err_len) {
  const size_t nt = (size_t)block[0] * block[1] * block[2];
  if (nt == 0 || nt > 1024 || shared > EMU_DYN_BYTES || L) {
    snprintf(err, err_len,
             L ? "a launch from inside a launch"
               : "bad launch: %zu threads per block (1..1024), %zu bytes of dynamic shared "
                 "memory (at most %d)",
             nt, shared, EMU_DYN_BYTES);
    return 1;
  }
  Launch launch;
  L = &launch;
  launch.n = (int)nt;
  launch.warps = (int)((nt + 31) / 32);
  launch.f.resize(nt);
  launch.slot.assign((size_t)2 * launch.warps * 32, 0);
  launch.tag.assign((size_t)2 * launch.warps * 32, 0);
  launch.sched = sched;
  launch.rng.s = seed;
  launch.body = body;
  launch.ctx = ctx;
  emu_gridDim = dim3{grid[0], grid[1], grid[2]};
  emu_blockDim = dim3{block[0], block[1], block[2]};
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < grid[2]; ++z)
    for (unsigned y = 0; y < grid[1]; ++y)
      for (unsigned x = 0; x < grid[0]; ++x) blocks.push_back(uint3{x, y, z});
  if (sched != 0) launch.rng.shuffle(blocks);
  for (const uint3& bi : blocks) {
    emu_blockIdx = bi;
    for (size_t t = 0; t < nt; ++t) {
      Fiber& f = launch.f[t];
      f.state = RUN;
      f.tid = uint3{(unsigned)(t % block[0]), (unsigned)(t / block[0] % block[1]),
                    (unsigned)(t / ((size_t)block[0] * block[1]))};
      f.warp = (int)(t / 32);
      f.lane = (int)(t % 32);
      f.xgen = 0;
      f.file = "";
      f.line = 0;
      f.what = "";
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = stack(t) + GUARD;
      f.ctx.uc_stack.ss_size = STACK;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, entry, 0);
    }
    fill_dyn();
    if (sched == 1)
      schedule_shuffled();
    else if (sched == 2)
      schedule_warps();
    else
      schedule_fixed();
    if (!launch.failed) check_dyn(shared);
    if (launch.failed) break;
  }
  L = nullptr;
  if (launch.failed) {
    snprintf(err, err_len, "%s", launch.err.c_str());
    return 1;
  }
  return 0;
}

extern "C" uint16_t emu_double2bfloat16(double v) { return __double2bfloat16(v).x; }
extern "C" uint16_t emu_float2bfloat16(float v) { return __float2bfloat16(v).x; }
