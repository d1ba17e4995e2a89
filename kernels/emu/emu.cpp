// swk's CPU emulator of its own CUDA kernels (cargo feature `cuda-emu`).
//
// build.rs compiles this file as C++ together with every kernels/*.cu (through the
// generated swk_emu_kernels.inc) and cuda_emu.h, which turns the CUDA dialect into host C++.
// The Rust side (src/backend/cuda/emu.rs) calls swk_emu_launch with a kernel's name, its
// launch configuration and its parameters exactly as it would hand them to cuLaunchKernel.
//
// Execution model: blocks run one after another; the threads of a block are fibers run in
// turn on this OS thread (a few instructions of hand-written context switch on x86-64,
// ucontext elsewhere). A fiber runs until it finishes or reaches a
// barrier: __syncthreads waits for every live thread of the block, a warp shuffle for every
// live thread of its warp (warps are 32 consecutive threads; mma.sync's warp-wide exchange
// likewise). When no fiber can run, the scheduler releases the first warp (in run order)
// whose live threads all wait at a shuffle, so that warp runs ahead of the others as far as
// it can, the schedule that exposes a missing __syncthreads; else the block if all its live
// threads wait at __syncthreads; anything else is a deadlock, reported as an error. A
// shuffle that reads a lane which has already returned is reported too.
//
// What is checked beyond the kernel's arithmetic: the parameter count and each parameter's
// size against the kernel's C++ signature, block shape and dynamic shared memory limits,
// and writes past the launch's dynamic shared memory (a red zone of 64 KiB after it, checked
// when the launch ends: a GPU faults on such an access).
//
// Order: threads run in index order between barriers, and blocks in grid order, unless
// swk_emu_set_reverse(1) reverses both. A kernel whose result depends on that order has a
// race on a GPU (threads communicating without a barrier, or blocks through memory): tests
// compare the two orders bit for bit.
#include "cuda_emu.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

// Every kernels/*.cu, and SWK_EMU_KERNEL_LIST(X): X(name) for each kernel.
#include "swk_emu_kernels.inc"

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace swk_emu {
namespace {

enum class State { Runnable, AtBlock, AtWarp, Done };

constexpr std::size_t kStackBytes = 128 * 1024;
constexpr unsigned kMaxThreads = 1024;
constexpr std::size_t kMaxDynamicShared = 227 * 1024;
// The dynamic shared memory buffer: the launch's bytes, then a red zone of kRedZone bytes
// of kRedZoneByte.
constexpr std::size_t kRedZone = 64 * 1024;
constexpr unsigned char kRedZoneByte = 0xa5;

void fiber_main();

#if defined(__x86_64__)
// A suspended context is its stack pointer; the callee-saved registers sit on its stack.
// swk_emu_switch(save, load) saves the caller's context into *save and resumes `load`. The
// floating-point control state (MXCSR, x87 control word) is shared, not switched: no
// kernel changes it.
extern "C" void swk_emu_switch(void** save, void* load);
asm(R"(
    .text
    .p2align 4
    .type swk_emu_switch,@function
swk_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size swk_emu_switch, .-swk_emu_switch
)");

struct Context {
    void* sp = nullptr;
};

// A fresh context on `stack` that starts in fiber_main: a frame as swk_emu_switch leaves
// it, whose return address is fiber_main (entered with the stack aligned as after a call).
void make_context(Context& c, char* stack, std::size_t bytes) {
    auto top = reinterpret_cast<std::uintptr_t>(stack + bytes) & ~static_cast<std::uintptr_t>(15);
    auto* sp = reinterpret_cast<std::uint64_t*>(top);
    *--sp = 0;                                            // fiber_main's caller slot (unused)
    *--sp = reinterpret_cast<std::uint64_t>(&fiber_main);  // "return" address
    for (int i = 0; i < 6; ++i) {
        *--sp = 0;  // rbp rbx r12 r13 r14 r15
    }
    c.sp = sp;
}

void switch_context(Context& save, Context& load) { swk_emu_switch(&save.sp, load.sp); }
#else
struct Context {
    ucontext_t uc;
};

void make_context(Context& c, char* stack, std::size_t bytes) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, fiber_main, 0);
}

void switch_context(Context& save, Context& load) { swapcontext(&save.uc, &load.uc); }
#endif

struct Fiber {
    Context ctx;
    State state = State::Done;
    unsigned shuffles = 0;  // shuffles done: their parity picks the slot bank
    std::unique_ptr<char[]> stack;
};

// The scheduler's state. One launch at a time (g_mutex), so plain globals.
std::mutex g_mutex;
Context g_sched;
std::vector<Fiber> g_fibers;
unsigned g_threads = 0;  // threads of the current block
unsigned g_cur = 0;      // the fiber running now
std::atomic<bool> g_reverse{false};  // run threads and blocks in reverse order
const std::function<void()>* g_body = nullptr;
unsigned long long g_slots[2][kMaxThreads];  // two banks, alternating per shuffle
// The banks of swk_emu::warp_all, alternating with the same count as the shuffles'.
constexpr std::size_t kGatherBytes = 32;
unsigned char g_gather[2][kMaxThreads][kGatherBytes];
std::vector<unsigned char> g_dynamic;
std::string g_error;

void fail(const std::string& what) {
    if (g_error.empty()) {
        g_error = what + " (block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
                  std::to_string(blockIdx.z) + ", thread " + std::to_string(g_cur) + ")";
    }
}

void wait_at(State s) {
    Fiber& f = g_fibers[g_cur];
    f.state = s;
    switch_context(f.ctx, g_sched);
}

// Every fiber's first frame: run the kernel, then hand control back for good.
void fiber_main() {
    (*g_body)();
    Fiber& f = g_fibers[g_cur];
    f.state = State::Done;
    switch_context(f.ctx, g_sched);
    std::abort();  // a finished fiber is never resumed
}

void set_thread(unsigned i) {
    g_cur = i;
    if (blockDim.y == 1 && blockDim.z == 1) {
        threadIdx.x = i;
        return;
    }
    threadIdx.x = i % blockDim.x;
    threadIdx.y = (i / blockDim.x) % blockDim.y;
    threadIdx.z = i / (blockDim.x * blockDim.y);
}

// Run one block of g_threads fibers to completion. False on deadlock (g_error says why).
bool run_block() {
    const unsigned n = g_threads;
    while (g_fibers.size() < n) {
        g_fibers.emplace_back();
        g_fibers.back().stack.reset(new char[kStackBytes]);
    }
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = g_fibers[i];
        make_context(f.ctx, f.stack.get(), kStackBytes);
        f.state = State::Runnable;
        f.shuffles = 0;
    }
    const bool reverse = g_reverse.load();
    for (;;) {
        for (unsigned k = 0; k < n; ++k) {
            const unsigned i = reverse ? n - 1 - k : k;
            if (g_fibers[i].state == State::Runnable) {
                set_thread(i);
                switch_context(g_sched, g_fibers[i].ctx);
            }
        }
        // Release one warp whose live lanes all wait at a warp-collective: the first in run
        // order. So that warp runs ahead of the others as far as it can (to its next
        // __syncthreads, or its end), the schedule that exposes a missing block barrier.
        bool any_live = false;
        bool released = false;
        const unsigned warps = (n + 31) / 32;
        for (unsigned wi = 0; wi < warps; ++wi) {
            const unsigned w = 32 * (reverse ? warps - 1 - wi : wi);
            const unsigned end = w + 32 < n ? w + 32 : n;
            bool live = false;
            bool all_warp = true;
            for (unsigned i = w; i < end; ++i) {
                const State s = g_fibers[i].state;
                if (s != State::Done) {
                    live = true;
                    all_warp = all_warp && s == State::AtWarp;
                }
            }
            any_live = any_live || live;
            if (live && all_warp && !released) {
                for (unsigned i = w; i < end; ++i) {
                    if (g_fibers[i].state == State::AtWarp) {
                        g_fibers[i].state = State::Runnable;
                    }
                }
                released = true;
            }
        }
        if (!any_live) {
            return true;
        }
        if (released) {
            continue;
        }
        bool all_block = true;
        for (unsigned i = 0; i < n; ++i) {
            const State s = g_fibers[i].state;
            all_block = all_block && (s == State::Done || s == State::AtBlock);
        }
        if (!all_block) {
            g_cur = 0;
            fail("deadlock: the threads of a block wait at different barriers");
            return false;
        }
        for (unsigned i = 0; i < n; ++i) {
            if (g_fibers[i].state == State::AtBlock) {
                g_fibers[i].state = State::Runnable;
            }
        }
    }
}

// One kernel of the table: its name, parameter sizes, and a caller that unpacks
// cuLaunchKernel-style parameters (an array of pointers to the values).
struct Entry {
    const char* name;
    std::vector<std::size_t> sizes;
    std::function<void(const void* const*)> call;
};

template <typename... A, std::size_t... I>
void call_with(void (*k)(A...), const void* const* p, std::index_sequence<I...>) {
    k(*static_cast<const A*>(p[I])...);
}

template <typename... A>
Entry entry(const char* name, void (*k)(A...)) {
    return Entry{name, {sizeof(A)...},
                 [k](const void* const* p) { call_with(k, p, std::index_sequence_for<A...>{}); }};
}

const std::vector<Entry>& table() {
#define SWK_EMU_ENTRY(k) entry(#k, k),
    static const std::vector<Entry> t = {SWK_EMU_KERNEL_LIST(SWK_EMU_ENTRY)};
#undef SWK_EMU_ENTRY
    return t;
}

void copy_error(const std::string& what, char* err, std::size_t err_len) {
    if (err != nullptr && err_len > 0) {
        std::snprintf(err, err_len, "%s", what.c_str());
    }
}

}  // namespace

void barrier_block() { wait_at(State::AtBlock); }

// One barrier per shuffle: the lanes write their values into this shuffle's bank, wait for
// the warp, and read their partner's. Consecutive shuffles use alternate banks, so a lane
// that runs ahead into the next shuffle never overwrites a value still to be read: it
// writes the other bank, and the bank after that only once the whole warp has passed the
// next barrier, which every lane reaches only after its read.
void shuffle_xor(const void* in, void* out, std::size_t size, int lane_mask) {
    const unsigned me = g_cur;
    const unsigned src = (me & ~31u) | ((me & 31u) ^ (static_cast<unsigned>(lane_mask) & 31u));
    const unsigned count = ++g_fibers[me].shuffles;
    const unsigned bank = count & 1u;
    std::memcpy(&g_slots[bank][me], in, size);
    wait_at(State::AtWarp);
    // The partner took part in this shuffle if it has done as many (it cannot be further
    // ahead than one: its next barrier waits for this lane).
    if (src >= g_threads || g_fibers[src].shuffles < count) {
        fail("a warp shuffle reads lane " + std::to_string(src) + ", which has returned or does not exist");
        std::memcpy(out, in, size);
    } else {
        std::memcpy(out, &g_slots[bank][src], size);
    }
}

// A warp-wide exchange: every lane of the warp deposits `size` bytes and receives all 32
// lanes' deposits, in lane order. Banks alternate as the shuffles' do (the same count), and
// every lane of the warp must take part (a warp-collective instruction such as mma.sync
// needs the whole warp).
void warp_all(const void* in, void* all, std::size_t size) {
    const unsigned me = g_cur;
    const unsigned first = me & ~31u;
    const unsigned count = ++g_fibers[me].shuffles;
    const unsigned bank = count & 1u;
    if (size > kGatherBytes) {
        fail("a warp-wide exchange of " + std::to_string(size) + " bytes per lane (at most " +
             std::to_string(kGatherBytes) + ")");
        size = kGatherBytes;
    }
    std::memcpy(g_gather[bank][me], in, size);
    wait_at(State::AtWarp);
    auto* out = static_cast<unsigned char*>(all);
    for (unsigned lane = 0; lane < 32; ++lane) {
        const unsigned src = first + lane;
        if (src >= g_threads || g_fibers[src].shuffles < count) {
            fail("a warp-wide exchange without lane " + std::to_string(lane) +
                 ", which has returned or does not exist");
            std::memcpy(out + lane * size, in, size);
        } else {
            std::memcpy(out + lane * size, g_gather[bank][src], size);
        }
    }
}

void* dynamic_shared() { return g_dynamic.data(); }

}  // namespace swk_emu

// Run kernel `name` over grid x block threads. params[i] points at parameter i, whose size
// the caller gives in sizes[i]. 0 on success; otherwise 1 and a message in err.
extern "C" int swk_emu_launch(const char* name, const unsigned* grid, const unsigned* block,
                              unsigned shared_bytes, const void* const* params, const std::size_t* sizes,
                              std::size_t n_params, char* err, std::size_t err_len) {
    using namespace swk_emu;
    std::lock_guard<std::mutex> lock(g_mutex);
    const Entry* e = nullptr;
    for (const Entry& t : table()) {
        if (std::strcmp(t.name, name) == 0) {
            e = &t;
        }
    }
    if (e == nullptr) {
        copy_error(std::string("no kernel named ") + name, err, err_len);
        return 1;
    }
    if (n_params != e->sizes.size()) {
        copy_error(std::string(name) + " takes " + std::to_string(e->sizes.size()) + " parameters, launched with " +
                       std::to_string(n_params),
                   err, err_len);
        return 1;
    }
    for (std::size_t i = 0; i < n_params; ++i) {
        if (sizes[i] != e->sizes[i]) {
            copy_error(std::string(name) + ": parameter " + std::to_string(i) + " is " + std::to_string(e->sizes[i]) +
                           " bytes, launched with " + std::to_string(sizes[i]),
                       err, err_len);
            return 1;
        }
    }
    const unsigned long long threads = 1ull * block[0] * block[1] * block[2];
    if (threads == 0 || threads > kMaxThreads || grid[0] == 0 || grid[1] == 0 || grid[2] == 0) {
        copy_error(std::string(name) + ": bad launch shape", err, err_len);
        return 1;
    }
    if (shared_bytes > kMaxDynamicShared) {
        copy_error(std::string(name) + ": " + std::to_string(shared_bytes) + " bytes of dynamic shared memory",
                   err, err_len);
        return 1;
    }
    // Poisoned (NaN as f32): a kernel that reads shared memory it never wrote shows it. The
    // red zone follows.
    static const std::vector<unsigned char> zone(kRedZone, kRedZoneByte);
    g_dynamic.resize(kMaxDynamicShared + kRedZone);
    std::memset(g_dynamic.data(), 0xff, shared_bytes);
    std::memcpy(g_dynamic.data() + shared_bytes, zone.data(), kRedZone);
    gridDim = dim3{grid[0], grid[1], grid[2]};
    blockDim = dim3{block[0], block[1], block[2]};
    g_threads = static_cast<unsigned>(threads);
    g_error.clear();
    const std::function<void()> body = [e, params] { e->call(params); };
    g_body = &body;
    const bool reverse = g_reverse.load();
    const auto at = [reverse](unsigned k, unsigned n) { return reverse ? n - 1 - k : k; };
    for (unsigned z = 0; z < grid[2]; ++z) {
        for (unsigned y = 0; y < grid[1]; ++y) {
            for (unsigned x = 0; x < grid[0]; ++x) {
                blockIdx = uint3{at(x, grid[0]), at(y, grid[1]), at(z, grid[2])};
                if (!run_block() || !g_error.empty()) {
                    g_body = nullptr;
                    copy_error(std::string(name) + ": " + g_error, err, err_len);
                    return 1;
                }
            }
        }
    }
    g_body = nullptr;
    if (std::memcmp(g_dynamic.data() + shared_bytes, zone.data(), kRedZone) != 0) {
        std::size_t i = shared_bytes;
        while (g_dynamic[i] == kRedZoneByte) {
            ++i;
        }
        copy_error(std::string(name) + ": wrote past its " + std::to_string(shared_bytes) +
                       " bytes of dynamic shared memory (byte " + std::to_string(i) + ")",
                   err, err_len);
        return 1;
    }
    return 0;
}

// Run the threads of every block, and the blocks of every grid, in reverse order (on != 0)
// or in index order (see the header).
extern "C" void swk_emu_set_reverse(int on) {
    swk_emu::g_reverse.store(on != 0);
}
