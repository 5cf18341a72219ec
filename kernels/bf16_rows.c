// Products of a few float32 rows with a bfloat16 weight matrix, at the speed of memory (AMX).
//
//   out[m, n] = sum_k bf16(x[m, k]) * w[n, k]        x: M x K float32, w: N x K bfloat16 bits
//
// For the decoder: one row per stream when files decode as a batch, or the positions of a
// speculative pass. MKL's bfloat16 GEMM halves its speed from two rows on, so four streams
// cost twice one. Here the weight is the AMX A operand, read straight from its row-major
// layout 16 rows x 32 values per tile, and the rows of x, rounded and interleaved in pairs
// once per call, are the B operand: each weight byte is loaded from memory once for every
// row, and up to 16 rows cost what one costs.
//
// Each out[m, n] is accumulated in the same order whatever M, the row's group, the tile
// width or the thread count: a stream's numbers do not depend on the batch around it.
//
// Built by voxtral_mlx/cpu_kernels.py with the system C compiler on first use, on x86-64
// Linux CPUs with AMX; elsewhere, or without a compiler, MKL multiplies instead.

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define GROUP 16    // rows of x per B tile (the most a tile holds)
#define BLOCK 32    // rows of w per step: two A tiles
#define THREADS 16  // most threads per call
#ifndef SPIN_NS
#define SPIN_NS 5000000L  // how long an idle worker stays awake (5 ms), yielding the CPU
#endif
// A tile load waits for all its 16 rows, so the weights are prefetched: the next step's line
// of each row into L1, the line FAR values ahead into L2 (without, the loads run at 2/3 speed).
#define FAR 256

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

typedef struct {
    const uint32_t *xp;  // x as bfloat16 pairs, per group of rows: [K / 2][g]
    const uint16_t *w;   // N x K bfloat16 bits
    float *out;          // M x N
    long M, N, K, n0, n1;
} Job;

// Tiles 0, 1: sums for a full group; 2, 3: weight rows; 4: a full group of x;
// 5, 6: sums for the last, narrower group; 7: that group of x.
static void configure(int last) {
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.rows[t] = 16;
    c.colsb[0] = c.colsb[1] = c.colsb[4] = GROUP * 4;
    c.colsb[2] = c.colsb[3] = 64;
    c.colsb[5] = c.colsb[6] = c.colsb[7] = (uint16_t)(last * 4);
    _tile_loadconfig(&c);
}

static void store(const Job *j, float *sums, long m0, int g, long n) {
    for (int i = 0; i < 16; i++)
        for (int a = 0; a < g; a++) j->out[(m0 + a) * j->N + n + i] = sums[i * g + a];
}

// The tile numbers are immediates, so the two group widths are two copies of the loop.
#define GROUP_PASS(C0, C1, X, G)                                        \
    do {                                                                \
        _tile_zero(C0);                                                 \
        _tile_zero(C1);                                                 \
        for (long k = 0; k < K; k += 32) {                              \
            for (int r = 0; k + FAR < K && r < BLOCK; r++) {            \
                _mm_prefetch((const char *)(w + r * K + k + 32), _MM_HINT_T0);  \
                _mm_prefetch((const char *)(w + r * K + k + FAR), _MM_HINT_T1); \
            }                                                           \
            _tile_loadd(2, w + k, K * 2);                               \
            _tile_loadd(3, w + 16 * K + k, K * 2);                      \
            _tile_loadd(X, xp + (k / 2) * (G), (G) * 4);                \
            _tile_dpbf16ps(C0, 2, X);                                   \
            _tile_dpbf16ps(C1, 3, X);                                   \
        }                                                               \
        _tile_stored(C0, sums, (G) * 4);                                \
        store(j, sums, m0, G, n);                                       \
        _tile_stored(C1, sums, (G) * 4);                                \
        store(j, sums, m0, G, n + 16);                                  \
    } while (0)

static void *run(void *arg) {
    const Job *j = arg;
    const long K = j->K;
    const int last = (int)(j->M - (j->M - 1) / GROUP * GROUP);
    float sums[16 * GROUP];
    configure(last);  // per thread: a thread's tiles are off until it loads a configuration
    // Weight blocks outside, groups inside: a block (32 rows, at most 576 KB) stays in L2
    // while every group of x passes over it.
    for (long n = j->n0; n < j->n1; n += BLOCK) {
        const uint16_t *w = j->w + n * K;
        for (long m0 = 0; m0 < j->M; m0 += GROUP) {
            const uint32_t *xp = j->xp + m0 * (K / 2);
            if (j->M - m0 > GROUP || last == GROUP)
                GROUP_PASS(0, 1, 4, GROUP);
            else
                GROUP_PASS(5, 6, 7, last);
        }
    }
    _tile_release();
    return NULL;
}

// Worker threads, started on first use and kept: a thread's first AMX instruction makes Linux
// allocate its tile state, so threads made per call would pay that every product. Between
// calls a worker stays awake for SPIN_NS, yielding its CPU to any other thread that wants it
// (a decoder step calls about 180 times with MLX's work in between; waking a sleeping thread
// costs more than that work on a virtual machine), then sleeps.
static struct {
    pthread_mutex_t mu, call;
    pthread_cond_t wake, idle;
    int size;                 // workers running
    _Atomic long generation;  // bumped by each call
    _Atomic int pending;      // workers still on this call
    long born[THREADS];       // the generation each worker was started in
    Job jobs[THREADS];        // [0] the caller's share, [1..size] the workers'
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
          PTHREAD_COND_INITIALIZER, 0, 0, 0, {0}, {{0}}};

static long clock_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void *worker(void *arg) {
    const long i = (long)arg;
    long seen = pool.born[i], now;  // the call that started it is yet to come
    for (;;) {
        const long until = clock_ns() + SPIN_NS;
        for (int spin = 1; (now = atomic_load(&pool.generation)) == seen; spin++) {
            _mm_pause();
            if (spin % 64 == 0) {
                if (clock_ns() > until) break;
                sched_yield();
            }
        }
        if (now == seen) {
            pthread_mutex_lock(&pool.mu);
            while ((now = atomic_load(&pool.generation)) == seen) pthread_cond_wait(&pool.wake, &pool.mu);
            pthread_mutex_unlock(&pool.mu);
        }
        seen = now;
        run(&pool.jobs[i]);
        if (atomic_fetch_sub(&pool.pending, 1) == 1) {
            pthread_mutex_lock(&pool.mu);
            pthread_cond_signal(&pool.idle);
            pthread_mutex_unlock(&pool.mu);
        }
    }
    return NULL;
}

// A forked child has none of the parent's threads.
static void forked(void) {
    pthread_mutex_init(&pool.mu, NULL);
    pthread_mutex_init(&pool.call, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.idle, NULL);
    pool.size = 0;
}

// Asks Linux for the AMX tile state (once per process). 0 on success.
int bf16_rows_init(void) {
    static int status = 1;
    if (status == 1) {
        status = (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */);
        if (status == 0) pthread_atfork(NULL, NULL, forked);
    }
    return status;
}

// out = bf16(x) @ w.T on `threads` threads (the caller's and up to threads - 1 workers),
// splitting N. N and K must be multiples of 32; `scratch` holds M x K uint16. Returns the
// number of threads that took part (fewer than asked if a worker could not start).
int bf16_rows(const float *x, const uint16_t *w, float *out, long M, long N, long K, int threads,
              uint32_t *scratch) {
    // Round each row to bfloat16 (nearest, ties to even) and interleave: for each group of
    // rows, entry [k / 2][a] holds row a's values k and k + 1, the B layout AMX reads.
    for (long m0 = 0; m0 < M; m0 += GROUP) {
        const int g = M - m0 < GROUP ? (int)(M - m0) : GROUP;
        uint32_t *xp = scratch + m0 * (K / 2);
        for (int a = 0; a < g; a++) {
            const float *row = x + (m0 + a) * K;
            for (long k = 0; k < K; k += 32) {
                __m512i pairs = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + k + 16), _mm512_loadu_ps(row + k));
                uint32_t tmp[16];
                _mm512_storeu_si512((void *)tmp, pairs);
                for (int i = 0; i < 16; i++) xp[(k / 2 + i) * g + a] = tmp[i];
            }
        }
    }
    pthread_mutex_lock(&pool.call);  // one call at a time: the workers and jobs are shared
    if (threads > THREADS) threads = THREADS;
    while (pool.size < threads - 1) {
        pthread_t id;
        pool.born[pool.size + 1] = atomic_load(&pool.generation);
        if (pthread_create(&id, NULL, worker, (void *)(long)(pool.size + 1)) != 0) break;
        pthread_detach(id);
        pool.size++;
    }
    if (threads > pool.size + 1) threads = pool.size + 1;
    if (threads < 1) threads = 1;
    const long per = (N / threads + BLOCK - 1) / BLOCK * BLOCK;
    for (int t = 0; t <= pool.size; t++) {  // workers beyond `threads` get nothing to do
        long n0 = t < threads ? t * per : N, n1 = t < threads - 1 ? (t + 1) * per : N;
        pool.jobs[t] = (Job){scratch, w, out, M, N, K, n0 < N ? n0 : N, n1 < N ? n1 : N};
    }
    atomic_store(&pool.pending, pool.size);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add(&pool.generation, 1);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    run(&pool.jobs[0]);
    for (int spin = 0; atomic_load(&pool.pending) > 0 && spin < 100000; spin++) _mm_pause();
    pthread_mutex_lock(&pool.mu);
    while (atomic_load(&pool.pending) > 0) pthread_cond_wait(&pool.idle, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&pool.call);
    return threads;
}
