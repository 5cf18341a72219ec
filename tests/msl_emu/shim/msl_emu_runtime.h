// The emulator's runtime: the threads of a Metal dispatch as fibers on a few OS threads.
//
// Each worker OS thread takes whole threadgroups. The Metal threads of a threadgroup are
// fibers that take turns: a fiber runs until it reaches a barrier or a SIMD operation (which
// waits for every lane of its simdgroup), then the next one runs. When a full round over the
// fibers moves none of them, the threadgroup is deadlocked (a barrier inside divergent
// control flow, or a thread that returned before a barrier) and the launch reports it.
//
// Included by metal_stdlib before Metal's address-space keywords are defined as macros, since
// the standard headers use some of those words (`thread`) as names.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace msl_emu {

// Where a Metal thread is: what the kernel attributes are computed from.
struct Where {
  unsigned group[3];       // threadgroup_position_in_grid
  unsigned local[3];       // thread_position_in_threadgroup
  unsigned group_size[3];  // threads_per_threadgroup (smaller at the grid's edge)
  unsigned tg[3];          // the dispatch's threadgroup size
  unsigned grid[3];        // threads_per_grid
  unsigned groups[3];      // threadgroups_per_grid
  unsigned flat;           // thread_index_in_threadgroup
  unsigned simds;          // simdgroups_per_threadgroup
};

using Body = void (*)(void* closure, const Where& where);

constexpr unsigned kSimdWidth = 32;
constexpr std::size_t kStackSize = 64 * 1024;

struct Fiber {
  ucontext_t context;
  Where where;
  bool done = false;
  unsigned long long simd_ops = 0;  // SIMD exchanges passed; their parity picks the buffer
  const char* waiting = nullptr;    // the barrier it waits at, for the deadlock report
};

struct Simd {
  unsigned width = 0;
  unsigned arrived = 0;
  unsigned long long generation = 0;
  double values[2][kSimdWidth];  // double buffered: a lane can be one exchange ahead
};

struct Group {
  unsigned size = 0;
  unsigned arrived = 0;
  unsigned long long generation = 0;
  unsigned long long progress = 0;  // bumped whenever a fiber arrives, passes or returns
  std::vector<Fiber> fibers;
  std::vector<Simd> simds;
  std::vector<const void*> fresh;  // threadgroup arrays already poisoned in this threadgroup
  std::unique_ptr<char[]> stacks;
  std::size_t stack_count = 0;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  Body body = nullptr;
  void* closure = nullptr;
};

inline thread_local Group* group = nullptr;

inline Fiber& current() { return *group->current; }

inline void yield() { swapcontext(&group->current->context, &group->scheduler); }

inline void wait_for(const unsigned long long& generation, unsigned long long seen, const char* what) {
  current().waiting = what;
  while (generation == seen) yield();
  current().waiting = nullptr;
  ++group->progress;
}

inline void threadgroup_barrier() {
  Group& g = *group;
  ++g.progress;
  const unsigned long long seen = g.generation;
  if (++g.arrived == g.size) {
    g.arrived = 0;
    ++g.generation;
    return;
  }
  wait_for(g.generation, seen, "threadgroup_barrier");
}

inline void simd_barrier(Simd& s, const char* what) {
  ++group->progress;
  const unsigned long long seen = s.generation;
  if (++s.arrived == s.width) {
    s.arrived = 0;
    ++s.generation;
    return;
  }
  wait_for(s.generation, seen, what);
}

inline Simd& my_simd() { return group->simds[current().where.flat / kSimdWidth]; }

inline unsigned lane() { return current().where.flat % kSimdWidth; }

// Every lane's value of `x` once all lanes of the simdgroup have given theirs.
inline const double* simd_exchange(double x) {
  Fiber& f = current();
  Simd& s = my_simd();
  double* values = s.values[f.simd_ops++ & 1];
  values[lane()] = x;
  simd_barrier(s, "a SIMD operation");
  return values;
}

// Metal leaves threadgroup memory undefined: fill it with 0xFF bytes (NaN for floats) the
// first time a threadgroup reaches its declaration, so that reading unwritten memory shows.
inline void fresh(void* memory, std::size_t bytes) {
  Group& g = *group;
  if (std::find(g.fresh.begin(), g.fresh.end(), memory) != g.fresh.end()) return;
  std::memset(memory, 0xFF, bytes);
  g.fresh.push_back(memory);
}

inline void fiber_main() {
  Group& g = *group;
  Fiber& f = *g.current;
  g.body(g.closure, f.where);
  f.done = true;
  ++g.progress;
}

inline std::string describe_deadlock(const Group& g) {
  unsigned returned = 0, at_threadgroup = 0, at_simd = 0;
  for (const Fiber& f : g.fibers) {
    if (f.done) ++returned;
    else if (f.waiting && std::strcmp(f.waiting, "threadgroup_barrier") == 0) ++at_threadgroup;
    else ++at_simd;
  }
  const unsigned* p = g.fibers[0].where.group;
  return "deadlock in threadgroup (" + std::to_string(p[0]) + ", " + std::to_string(p[1]) + ", " +
         std::to_string(p[2]) + ") of " + std::to_string(g.size) + " threads: " +
         std::to_string(at_threadgroup) + " wait at threadgroup_barrier, " + std::to_string(at_simd) +
         " wait at a SIMD operation or simdgroup_barrier, " + std::to_string(returned) +
         " returned (a barrier or SIMD operation in divergent control flow?)";
}

// Runs one threadgroup to the end; returns an error message, empty on success.
inline std::string run_group(Group& g, const Where& first) {
  g.size = first.group_size[0] * first.group_size[1] * first.group_size[2];
  g.arrived = 0;
  g.fresh.clear();
  if (g.stack_count < g.size) {
    g.stacks.reset(new char[g.size * kStackSize]);
    g.stack_count = g.size;
  }
  g.fibers.assign(g.size, Fiber{});
  g.simds.assign((g.size + kSimdWidth - 1) / kSimdWidth, Simd{});
  for (unsigned s = 0; s < g.simds.size(); ++s) g.simds[s].width = std::min(kSimdWidth, g.size - s * kSimdWidth);
  for (unsigned i = 0; i < g.size; ++i) {
    Fiber& f = g.fibers[i];
    f.where = first;
    f.where.flat = i;
    f.where.local[0] = i % first.group_size[0];
    f.where.local[1] = (i / first.group_size[0]) % first.group_size[1];
    f.where.local[2] = i / (first.group_size[0] * first.group_size[1]);
    f.where.simds = static_cast<unsigned>(g.simds.size());
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = g.stacks.get() + i * kStackSize;
    f.context.uc_stack.ss_size = kStackSize;
    f.context.uc_link = &g.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  for (;;) {
    const unsigned long long before = g.progress;
    bool running = false;
    for (Fiber& f : g.fibers) {
      if (f.done) continue;
      running = true;
      g.current = &f;
      swapcontext(&g.scheduler, &f.context);
    }
    if (!running) return {};
    if (g.progress == before) return describe_deadlock(g);
  }
}

// Runs every threadgroup of the grid on `workers` OS threads; returns the first error.
inline std::string launch(const unsigned grid[3], const unsigned tg[3], unsigned workers, Body body, void* closure) {
  unsigned groups[3];
  for (int d = 0; d < 3; ++d) groups[d] = (grid[d] + tg[d] - 1) / tg[d];
  const unsigned long long total = 1ull * groups[0] * groups[1] * groups[2];
  std::atomic<unsigned long long> next{0};
  std::atomic<bool> failed{false};
  std::mutex lock;
  std::string error;
  auto work = [&] {
    Group g;
    g.body = body;
    g.closure = closure;
    group = &g;
    for (unsigned long long i; !failed && (i = next++) < total;) {
      Where w{};
      w.group[0] = static_cast<unsigned>(i % groups[0]);
      w.group[1] = static_cast<unsigned>((i / groups[0]) % groups[1]);
      w.group[2] = static_cast<unsigned>(i / (1ull * groups[0] * groups[1]));
      for (int d = 0; d < 3; ++d) {
        w.group_size[d] = std::min(tg[d], grid[d] - w.group[d] * tg[d]);
        w.tg[d] = tg[d];
        w.grid[d] = grid[d];
        w.groups[d] = groups[d];
      }
      std::string e = run_group(g, w);
      if (!e.empty()) {
        std::lock_guard<std::mutex> hold(lock);
        if (error.empty()) error = e;
        failed = true;
      }
    }
    group = nullptr;
  };
  workers = static_cast<unsigned>(std::max<unsigned long long>(1, std::min<unsigned long long>(workers, total)));
  std::vector<std::thread> pool;
  for (unsigned i = 1; i < workers; ++i) pool.emplace_back(work);
  work();
  for (std::thread& t : pool) t.join();
  return error;
}

}  // namespace msl_emu

// float -> bfloat conversions, rounding to nearest even as the GPU does. clang calls these
// compiler-rt builtins, which libgcc before GCC 13 lacks; weak, so that a runtime's own wins.
extern "C" __attribute__((weak)) __bf16 __truncsfbf2(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const std::uint16_t bits =
      nan ? std::uint16_t((u >> 16) | 0x40u) : std::uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  __bf16 r;
  std::memcpy(&r, &bits, sizeof r);
  return r;
}
extern "C" __attribute__((weak)) __bf16 __truncdfbf2(double x) { return __truncsfbf2(static_cast<float>(x)); }
