// Products of a few float32 rows with a weight matrix at the speed of memory, and a decoder
// step's attention over its cache, on x86-64 CPUs.
//
// bf16_rows (AMX):     out[m, n] = sum_k bf16(x[m, k]) * w[n, k]       w: N x K bfloat16 bits
//                      or, x in three bfloat16 parts p0 + p1 + p2 = x exactly, sum_p sum_k p * w:
//                      float32 products over bfloat16 weights (bf16_split: the parts for MKL)
// wide_rows (AVX-512F): the same products without AMX, the weights widened to float32 in
//                      registers (bf16_widen: widened in memory, for MKL's float32 GEMM);
//                      f32_rows: the same passes over float32 weights (dequantized blocks)
// dot_rows (AVX-512 BF16): x rounded to bfloat16 (wide_rows' parts = 1), each pair of products
//                      summed into float32 by VDPBF16PS, twice the multiply-adds per instruction
// q_rows (AVX-512F):   out[m, n] = sum_k x[m, k] * (s[n, g] * q[n, k] + b[n, g])
//                      q: N x K unsigned 4- or 8-bit values packed as MLX packs them (a value
//                      per nibble or byte, lowest first), s and b: float32 per group of k
// q_amx (AMX):         the same sums as q_rows, as sum_g s[n, g] * (x . q)_g + b[n, g] * (sum x)_g,
//                      over the weights as q_pack stores them
// q_vnni (AVX-512 VNNI): q_amx's sums and numbers without AMX (VPDPBUSD), over the same weights
// q_dequantize:        the float32 s * q + b themselves, for products of many rows
// attend (AVX-512F):   softmax(q k^T scale) v for one position, per key head (at the end);
//                      attend_many for many (a prompt, an encoder chunk)
// rms_norm, layer_step: RMSNorm of rows; a transformer layer's positions (a decoder step, a
//                      speculative pass, a streaming encoder chunk) through the kernels above
//                      and SwiGLU and RoPE's in one call (at the end)
//
// For the decoder: one row per stream when files decode as a batch, or the positions of a
// speculative pass. MKL's bfloat16 GEMM halves its speed from two rows on, so four streams
// cost twice one; MLX's CPU quantized product is a scalar loop. bf16_rows: the weight is the
// AMX A operand, read straight from its row-major layout 16 rows x 32 values per tile, and
// the rows of x, rounded and interleaved in pairs once per call, are the B operand: each
// weight byte is loaded from memory once for every row, and up to 16 rows cost what one costs.
// q_rows: each weight value is widened to float32 once per four rows (s * q + b, the value
// mx.dequantize gives) and multiplied in float32, one multiply-add per row and value (the
// kernel of CPUs without AMX). q_amx: x in three or four 8-bit parts per group, multiplied by
// the integers q exactly in int32 by AMX and scaled after; up to five rows cost what one does.
//
// Each out[m, n] is accumulated in the same order whatever M, the row's group, the tile
// width or the thread count: a stream's numbers do not depend on the batch around it.
//
// Built by voxtral_mlx/cpu_kernels.py with the system C compiler on first use, on x86-64
// Linux CPUs with AVX-512 (bf16_rows and q_amx: with AMX; q_vnni: with VNNI); elsewhere, or
// without a compiler, MKL and MLX multiply instead.

#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
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

typedef struct Job Job;
struct Job {
    void (*run)(const Job *);
    const void *x;       // bf16_rows: x as bfloat16 pairs, per group of rows: [K / 2][g];
                         // q_rows: x as float32 rows (4 bits: each 32 values reordered, see q_rows)
    const void *w;       // bf16_rows: N x K bfloat16 bits; q_rows: N x K packed values
    const float *scales, *biases;  // q_rows: N x (K / group)
    float *out;          // M x N (wide_rows: rows `ldo` values apart)
    long M, N, K, n0, n1, ldo;
    int bits, group;
    // attend: x the queries, w the keys, v the values, out the outputs; N pairs of G = bits
    // query heads and one key head, M keys of K values each, `stride` values apart per pair.
    const float *v;
    const uint8_t *mask;  // mask_rows x M entries, 0 where a key is out of a query's view; NULL: all visible
    int mask_rows;        // query g of a pair reads mask row g % mask_rows
    long stride;
    float scale;
    float *scores;  // N x G x M
    const long *spans;  // attend_many: per block of queries, its first chunk of 16 keys and its last + 1
    // q_amx: x as 8-bit parts in tiles (see q_amx), the sums and scales 2^E of x per group
    // [K / group][rows], the rows of x (M rounded up to whole tiles of 16).
    const float *xsum, *xscale;
    long rows;
    int bits_rows, parts;  // q_amx: rows of x per tile, parts per value
    int half;              // q_amx: scales and biases as bfloat16 bits (else float32)
    int8_t *parts_out;  // q_amx's split of x: where the parts, sums and scales go
    float *sums_out, *scales_out;
};

// Tiles 0, 1: sums for a full group; 2, 3: weight rows; 4: a full group of x;
// 5, 6: sums for the last, narrower group; 7: that group of x. `full` and `last`: columns
// (rows of x times parts) of a full group and of the last one.
static void configure(int full, int last) {
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.rows[t] = 16;
    c.colsb[0] = c.colsb[1] = c.colsb[4] = (uint16_t)(full * 4);
    c.colsb[2] = c.colsb[3] = 64;
    c.colsb[5] = c.colsb[6] = c.colsb[7] = (uint16_t)(last * 4);
    __asm__ volatile("" : : "m"(c) : "memory");  // GCC 12 may drop the stores above without this
    _tile_loadconfig(&c);
}

// Column a P + p of the sums is part p of row m0 + a: out = p0 + (p1 + p2).
static void store(const Job *j, float *sums, long m0, int g, long n) {
    const int P = j->parts;
    for (int i = 0; i < 16; i++)
        for (int a = 0; a < g / P; a++) {
            const float *s = sums + i * g + a * P;
            j->out[(m0 + a) * j->N + n + i] = P == 1 ? s[0] : s[0] + (s[1] + s[2]);
        }
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

static void bf16_run(const Job *j) {
    const long K = j->K;
    const int P = j->parts, R = GROUP / P, last = (int)(j->M - (j->M - 1) / R * R);
    float sums[16 * GROUP];
    configure(R * P, last * P);  // per thread: a thread's tiles are off until it loads a configuration
    // Weight blocks outside, groups inside: a block (32 rows, at most 576 KB) stays in L2
    // while every group of x passes over it.
    for (long n = j->n0; n < j->n1; n += BLOCK) {
        const uint16_t *w = (const uint16_t *)j->w + n * K;
        for (long m0 = 0; m0 < j->M; m0 += R) {
            const uint32_t *xp = (const uint32_t *)j->x + m0 * P * (K / 2);
            if (j->M - m0 >= R)
                GROUP_PASS(0, 1, 4, R * P);
            else
                GROUP_PASS(5, 6, 7, last * P);
        }
    }
    _tile_release();
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
        pool.jobs[i].run(&pool.jobs[i]);
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

__attribute__((constructor)) static void loaded(void) { pthread_atfork(NULL, NULL, forked); }

// Asks Linux for the AMX tile state (once per process), which bf16_rows needs. 0 on success.
int bf16_rows_init(void) {
    static int status = 1;
    if (status == 1) status = (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */);
    return status;
}

// Runs `job` on `threads` threads (the caller's and up to threads - 1 workers), splitting N
// into shares of whole blocks of `align` rows. Returns the number of threads that took part
// (fewer than asked if a worker could not start).
static int dispatch(Job job, int threads, long align) {
    if (threads <= 1) {  // on the caller alone: the workers are left asleep
        job.n0 = 0;
        job.n1 = job.N;
        job.run(&job);
        return 1;
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
    const long N = job.N, per = (N / threads + align - 1) / align * align;
    for (int t = 0; t <= pool.size; t++) {  // workers beyond `threads` get nothing to do
        const long n0 = t < threads ? t * per : N, n1 = t < threads - 1 ? (t + 1) * per : N;
        pool.jobs[t] = job;
        pool.jobs[t].n0 = n0 < N ? n0 : N;
        pool.jobs[t].n1 = n1 < N ? n1 : N;
    }
    atomic_store(&pool.pending, pool.size);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add(&pool.generation, 1);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    pool.jobs[0].run(&pool.jobs[0]);
    for (int spin = 0; atomic_load(&pool.pending) > 0 && spin < 100000; spin++) _mm_pause();
    pthread_mutex_lock(&pool.mu);
    while (atomic_load(&pool.pending) > 0) pthread_cond_wait(&pool.idle, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&pool.call);
    return threads;
}

// x's 32 values from `row` (those past `left` zeros) in `parts` bfloat16 parts, each the
// nearest to what the parts before it left: x = p0 + p1 + p2 exactly for three (a float32 has
// 24 significant bits, a bfloat16 8; inputs and parts below 2^-126 count as zeros). Part p as
// pairs, 16 uint32 of values (k, k + 1), at to[p].
static inline __attribute__((always_inline)) void split32(const float *row, long left, int parts,
                                                          __m512i to[3]) {
    const __mmask16 m0 = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1),
                    m1 = left >= 32 ? 0xffff : left > 16 ? (__mmask16)((1u << (left - 16)) - 1) : 0;
    __m512 r0 = _mm512_maskz_loadu_ps(m0, row), r1 = _mm512_maskz_loadu_ps(m1, row + 16);
    for (int p = 0; p < parts; p++) {
        to[p] = (__m512i)_mm512_cvtne2ps_pbh(r1, r0);
        if (p + 1 == parts) break;
        // What the part left: its bfloat16 values widened (a shift) and taken away, exactly.
        const __m512i w0 = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(to[p], 0)), 16);
        const __m512i w1 = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(to[p], 1)), 16);
        r0 = _mm512_sub_ps(r0, _mm512_castsi512_ps(w0));
        r1 = _mm512_sub_ps(r1, _mm512_castsi512_ps(w1));
    }
}

// out = x @ w.T on `threads` threads, splitting N, with x rounded to bfloat16 (parts = 1) or
// in three bfloat16 parts (parts = 3: the float32 products of x and the bfloat16 w, each
// exact, summed in float32 per part and the parts added: float32 precision over weights
// of half its size). N and K must be multiples of 32; `scratch` holds parts x M x K uint16.
// Returns the number of threads that took part (1 for no rows), 0 for parts other than 1 or 3.
int bf16_rows(const float *x, const uint16_t *w, float *out, long M, long N, long K, int threads, uint32_t *scratch,
              int parts) {
    if (parts != 1 && parts != 3) return 0;
    if (M < 1) return 1;  // nothing to multiply (and no tile of zero columns to configure)
    // Each group of R rows is the B operand, a row and part per column: entry [k / 2][a P + p]
    // holds part p of row a's values k and k + 1, the layout AMX reads.
    const int R = GROUP / parts;
    for (long m0 = 0; m0 < M; m0 += R) {
        const int rows = M - m0 < R ? (int)(M - m0) : R, g = rows * parts;
        uint32_t *xp = scratch + m0 * parts * (K / 2);
        for (int a = 0; a < rows; a++) {
            const float *row = x + (m0 + a) * K;
            for (long k = 0; k < K; k += 32) {
                __m512i pairs[3];
                uint32_t tmp[16];
                split32(row + k, 32, parts, pairs);
                for (int p = 0; p < parts; p++) {
                    _mm512_storeu_si512((void *)tmp, pairs[p]);
                    for (int i = 0; i < 16; i++) xp[(k / 2 + i) * g + a * parts + p] = tmp[i];
                }
            }
        }
    }
    return dispatch((Job){.run = bf16_run, .x = scratch, .w = w, .out = out, .M = M, .N = N, .K = K, .parts = parts},
                    threads, BLOCK);
}

// x (M x K float32) in `parts` (1 or 3) bfloat16 parts as bits, out[p][M][K], for a GEMM of
// many rows (bf16_rows's parts). Returns 0 for other part counts, else 1.
int bf16_split(const float *x, uint16_t *out, long M, long K, int parts) {
    if (parts != 1 && parts != 3) return 0;
    for (long m = 0; m < M; m++)
        for (long k = 0; k < K; k += 32) {
            __m512i pairs[3];
            split32(x + m * K + k, K - k, parts, pairs);
            const __mmask32 in = K - k >= 32 ? 0xffffffffu : (__mmask32)((1u << (K - k)) - 1);
            for (int p = 0; p < parts; p++) _mm512_mask_storeu_epi16(out + (p * M + m) * K + k, in, pairs[p]);
        }
    return 1;
}

// bf16_rows without AMX (AVX-512F: Zen 4, Skylake-SP and later). Each 32 bfloat16 weights
// are widened to float32 in two registers (the even values shifted up, the odd ones masked:
// exact) and multiplied into the sums by FMA, with x as float32 (parts = 3: its own values,
// the products float32's) or rounded to bfloat16 (parts = 1), stored by `wide_rows` with each
// 32 values' even ones first. A pass multiplies R weight rows, loaded and widened once per 32
// values, by G rows of x: each four rows of x by 4 weight rows at a time, the one to three
// left by 8 (with G = 2 or 1), each 8 weight rows for all the rows of x in turn, so that
// they are read from memory once. The sums are added across lanes at the row's end; each
// takes the same terms in the same order whatever R and G. The loops are unrolled so that
// the sums stay in registers. (On a Zen 4, 4 by 4 passes widen half as often per
// multiply-add as 8 by 2: 376 rows of 9216 x 3072 at 106 GMAC/s against 95, four rows
// 1.84 against 2.19 ms.)
#define WIDE_ROWS 8  // weight rows per pass
#define WIDE_X (512 << 10)  // bytes of x a thread's passes go over before the next rows of x
// Each weight row's line WIDE_AHEAD values ahead is prefetched into L2, past a row's end the
// next pass's row: the hardware prefetcher starts each row's stream anew and, with the core
// busy multiplying several rows of x, falls behind (a Zen 4, two threads, 9216 x 3072: one
// row 1.6-2.3 -> 1.4-1.5 ms, four 2.1-2.7 -> 1.5-1.7 ms).
#define WIDE_AHEAD 1024
// dot_rows: the products of x rounded to bfloat16 (parts = 1) on CPUs with AVX-512 BF16 but
// no AMX (Zen 4, Cooper Lake): x is stored as bfloat16 pairs in the weights' order and each 32
// values of a weight row and a row of x go into the sums in one VDPBF16PS (two exact products
// per lane, added in float32), 32 multiply-adds per instruction where wide_rows widens and
// takes two FMA of 16. The passes are wide_rows' (4 by 4, the rest by 8), with its prefetch; a
// row's bits do not depend on the rows around it. (Zen 4, two threads: 376 rows of 9216 x 3072
// 108 -> 71 ms, 154 GMAC/s; one to four rows, which the weights' bytes bound, unchanged.)
enum { WIDEN, F32, DOT };  // how a pass takes the weights: bfloat16 widened, float32, VDPBF16PS

static inline __attribute__((always_inline)) void wide_pass(const Job *j, long n, long m0, const int R, const int G,
                                                            const int MODE) {
    const long K = j->K;
    const uint16_t *w = (const uint16_t *)j->w + n * K;
    const float *wf = (const float *)j->w + n * K;  // F32: float32 weights, loaded as they are
    const float *x = (const float *)j->x + m0 * K;
    const uint16_t *xb = (const uint16_t *)j->x + m0 * K;  // DOT: x as bfloat16 pairs
    const __m512i odd = _mm512_set1_epi32((int)0xffff0000u);
    __m512 acc[WIDE_ROWS][4];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int a = 0; a < G; a++) acc[r][a] = _mm512_setzero_ps();
    for (long k = 0; k < K; k += 32) {
        __m512 xe[4], xo[4];
        __m512bh xs[4];
#pragma GCC unroll 4
        for (int a = 0; a < G; a++) {
            if (MODE == DOT) {
                xs[a] = (__m512bh)_mm512_loadu_si512((const void *)(xb + a * K + k));
            } else {
                xe[a] = _mm512_loadu_ps(x + a * K + k);
                xo[a] = _mm512_loadu_ps(x + a * K + k + 16);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            __m512i v = _mm512_setzero_si512();
            if (MODE != F32) {
                const long ahead = r * K + k + WIDE_AHEAD + (k + WIDE_AHEAD < K ? 0 : (R - 1) * K);
                _mm_prefetch((const char *)((uintptr_t)w + 2 * ahead), _MM_HINT_T1);  // never faults, even past w
                v = _mm512_loadu_si512((const void *)(w + r * K + k));
            }
            if (MODE == DOT) {
#pragma GCC unroll 4
                for (int a = 0; a < G; a++) acc[r][a] = _mm512_dpbf16_ps(acc[r][a], (__m512bh)v, xs[a]);
                continue;
            }
            // The even values shifted up, the odd ones masked: float32 exactly.
            const __m512 we = MODE == F32 ? _mm512_loadu_ps(wf + r * K + k)
                                          : _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            const __m512 wo = MODE == F32 ? _mm512_loadu_ps(wf + r * K + k + 16)
                                          : _mm512_castsi512_ps(_mm512_and_si512(v, odd));
#pragma GCC unroll 4
            for (int a = 0; a < G; a++) acc[r][a] = _mm512_fmadd_ps(wo, xo[a], _mm512_fmadd_ps(we, xe[a], acc[r][a]));
        }
    }
#pragma GCC unroll 4
    for (int a = 0; a < G; a++)
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) j->out[(m0 + a) * j->ldo + n + r] = _mm512_reduce_add_ps(acc[r][a]);
}

// Rows of x a block at a time (as many as fit WIDE_X bytes, for the caches), each block over
// all of the thread's weight rows.
static inline __attribute__((always_inline)) void wide_blocks(const Job *j, const int MODE) {
    long block = WIDE_X / ((MODE == DOT ? 2 : 4) * j->K) / 4 * 4;
    if (block < 4) block = 4;
    for (long b0 = 0; b0 < j->M; b0 += block) {
        const long b1 = b0 + block < j->M ? b0 + block : j->M, b4 = b0 + (b1 - b0) / 4 * 4;
        for (long n = j->n0; n < j->n1; n += WIDE_ROWS) {
            for (long m0 = b0; m0 < b4; m0 += 4) {
                wide_pass(j, n, m0, 4, 4, MODE);
                wide_pass(j, n + 4, m0, 4, 4, MODE);
            }
            for (long m0 = b4; m0 < b1;) {
                if (b1 - m0 >= 2) {
                    wide_pass(j, n, m0, 8, 2, MODE);
                    m0 += 2;
                } else {
                    wide_pass(j, n, m0, 8, 1, MODE);
                    m0 += 1;
                }
            }
        }
    }
}

static void wide_run(const Job *j) { wide_blocks(j, WIDEN); }
static void f32_run(const Job *j) { wide_blocks(j, F32); }
static void dot_run(const Job *j) { wide_blocks(j, DOT); }

// x rounded to bfloat16 (to nearest, ties to even; finite x), as float32.
static inline __m512 round_bf16(__m512 x) {
    const __m512i b = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const __m512i up = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    return _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32((int)0xffff0000u)));
}

// bf16_rows's products without AMX, the same arguments but `scratch`: M x K float32.
int wide_rows(const float *x, const uint16_t *w, float *out, long M, long N, long K, int threads, float *scratch,
              int parts) {
    if (parts != 1 && parts != 3) return 0;
    if (M < 1) return 1;
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (long m = 0; m < M; m++)
        for (long k = 0; k < K; k += 32) {
            __m512 lo = _mm512_loadu_ps(x + m * K + k), hi = _mm512_loadu_ps(x + m * K + k + 16);
            if (parts == 1) {
                lo = round_bf16(lo);
                hi = round_bf16(hi);
            }
            _mm512_storeu_ps(scratch + m * K + k, _mm512_permutex2var_ps(lo, even, hi));
            _mm512_storeu_ps(scratch + m * K + k + 16, _mm512_permutex2var_ps(lo, odd, hi));
        }
    return dispatch((Job){.run = wide_run, .x = scratch, .w = w, .out = out, .M = M, .N = N, .K = K, .ldo = N,
                          .parts = parts},
                    threads, BLOCK);
}

// wide_rows' products with parts = 1 (the same arguments but parts; `scratch`: M x K uint16) by
// dot_run. Only on a CPU with AVX-512 BF16.
int dot_rows(const float *x, const uint16_t *w, float *out, long M, long N, long K, int threads, uint16_t *scratch) {
    if (M < 1) return 1;
    for (long m = 0; m < M; m++)
        for (long k = 0; k < K; k += 32) {
            const __m512 lo = _mm512_loadu_ps(x + m * K + k), hi = _mm512_loadu_ps(x + m * K + k + 16);
            _mm512_storeu_si512((void *)(scratch + m * K + k), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    return dispatch((Job){.run = dot_run, .x = scratch, .w = w, .out = out, .M = M, .N = N, .K = K, .ldo = N},
                    threads, BLOCK);
}

// The same passes over float32 weights (N x K; a block of a quantized layer's, dequantized),
// x as it is: out[m, n] at out + m * ldo + n. N a multiple of 8, K of 32. Returns the number of
// threads that took part.
int f32_rows(const float *x, const float *w, float *out, long M, long N, long K, long ldo, int threads) {
    if (M < 1) return 1;
    return dispatch((Job){.run = f32_run, .x = x, .w = w, .out = out, .M = M, .N = N, .K = K, .ldo = ldo}, threads,
                    BLOCK);
}

static void widen_run(const Job *j) {
    for (long n = j->n0; n < j->n1; n++) {
        const uint16_t *w = (const uint16_t *)j->w + n * j->K;
        long k = 0;
        for (; k + 16 <= j->K; k += 16) {
            const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + k)));
            _mm512_storeu_si512((void *)(j->out + n * j->K + k), _mm512_slli_epi32(v, 16));
        }
        for (; k < j->K; k++) {
            const uint32_t v = (uint32_t)w[k] << 16;
            memcpy(j->out + n * j->K + k, &v, 4);
        }
    }
}

// The float32 values of N x K bfloat16 bits, for MKL's float32 GEMM.
int bf16_widen(const uint16_t *w, float *out, long N, long K, int threads) {
    return dispatch((Job){.run = widen_run, .w = w, .out = out, .N = N, .K = K}, threads, 1);
}

// Quantized weights (q_rows). A pass takes up to QWEIGHTS weight rows (two for one row of x)
// and up to QROWS rows of x: each 32 weight values are widened once per pass (s * q + b in
// float32, rounded after the product as mx.dequantize rounds: the library is built with
// -ffp-contract=off) and each 32 values of x loaded once (the loads of x, not the widening,
// were what limited passes of one weight row: 4 rows took 2.8x one on a Zen 4); each row of x
// multiplies them into one sum per weight row (the first 16 values, then the other 16),
// added across lanes at the end of the row: the same order whatever the pass.
#define QROWS 4     // rows of x per pass
#define QWEIGHTS 4  // weight rows per pass
#define QBLOCK 32  // weight rows per block: the rows of x pass over a block while it is in L1/L2
// The weights are prefetched QFAR bytes ahead into L1 and QFAR2 bytes ahead into L2: one
// row's stream per thread, which the hardware prefetchers alone run at about half the speed.
#define QFAR 1024
#define QFAR2 8192

// A group's scale and bias, broadcast; for 4 bits, also the table of its 16 dequantized values.
typedef struct {
    __m512 s, b, table;
} QGroup;

static inline __attribute__((always_inline)) QGroup q_group(const int BITS, const float *s, const float *b,
                                                            long g) {
    QGroup p = {_mm512_set1_ps(s[g]), _mm512_set1_ps(b[g]), _mm512_setzero_ps()};
    if (BITS == 4)
        p.table = _mm512_add_ps(_mm512_mul_ps(_mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), p.s),
                                p.b);
    return p;
}

// The 32 weights of unit u (k = 32u ... 32u + 31) of a row, widened: lo holds the first 16
// values (8 bits) or the even ones (4 bits), hi the others.
static inline __attribute__((always_inline)) void q_widen(const int BITS, const uint8_t *q, long u,
                                                          const QGroup *p, __m512 *lo, __m512 *hi) {
    const long k = 32 * u;
    if (BITS == 8) {
        _mm_prefetch((const char *)(q + k + QFAR), _MM_HINT_T0);
        _mm_prefetch((const char *)(q + k + QFAR2), _MM_HINT_T1);
        const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + k))));
        const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + k + 16))));
        *lo = _mm512_add_ps(_mm512_mul_ps(q0, p->s), p->b);
        *hi = _mm512_add_ps(_mm512_mul_ps(q1, p->s), p->b);
    } else {
        // Byte i of the unit holds values 2i (low nibble) and 2i + 1 (high); the nibbles index
        // the group's table.
        if (u % 2 == 0) {
            _mm_prefetch((const char *)(q + k / 2 + QFAR), _MM_HINT_T0);
            _mm_prefetch((const char *)(q + k / 2 + QFAR2), _MM_HINT_T1);
        }
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + k / 2)));
        *lo = _mm512_permutexvar_ps(bytes, p->table);
        *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), p->table);
    }
}

static inline __attribute__((always_inline)) void q_pass(const Job *j, long n, long m0, const int BITS,
                                                         const int R, const int W) {
    const long K = j->K, groups = K / j->group, row = K * BITS / 8;
    const int shift = __builtin_ctz((unsigned)j->group) - 5;  // units of 32 values per group: 1, 2 or 4
    const float *x = (const float *)j->x + m0 * K;
    const uint8_t *q = (const uint8_t *)j->w + n * row;
    const float *s = j->scales + n * groups, *b = j->biases + n * groups;
    __m512 acc[QWEIGHTS][QROWS];
#pragma GCC unroll 4
    for (int w = 0; w < W; w++)
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) acc[w][r] = _mm512_setzero_ps();
    for (long g = 0; g < groups; g++) {
        QGroup p[QWEIGHTS];
#pragma GCC unroll 4
        for (int w = 0; w < W; w++) p[w] = q_group(BITS, s + w * groups, b + w * groups, g);
        for (long u = g << shift; u < (g + 1) << shift; u++) {
            __m512 lo[QWEIGHTS], hi[QWEIGHTS];
#pragma GCC unroll 4
            for (int w = 0; w < W; w++) q_widen(BITS, q + w * row, u, &p[w], &lo[w], &hi[w]);
            // Each 32 values of x are loaded once for the W weight rows.
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const __m512 xl = _mm512_loadu_ps(x + r * K + 32 * u), xh = _mm512_loadu_ps(x + r * K + 32 * u + 16);
#pragma GCC unroll 4
                for (int w = 0; w < W; w++)
                    acc[w][r] = _mm512_fmadd_ps(xh, hi[w], _mm512_fmadd_ps(xl, lo[w], acc[w][r]));
            }
        }
    }
#pragma GCC unroll 4
    for (int w = 0; w < W; w++)
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) j->out[(m0 + r) * j->N + n + w] = _mm512_reduce_add_ps(acc[w][r]);
}

static void q_run(const Job *j) {
    for (long nb = j->n0; nb < j->n1; nb += QBLOCK) {
        const long ne = nb + QBLOCK < j->n1 ? nb + QBLOCK : j->n1;
        for (long m0 = 0; m0 < j->M; m0 += QROWS) {
            // Constant bits, row counts and weight rows: the accumulators stay in registers.
            const int R = j->M - m0 < QROWS ? (int)(j->M - m0) : QROWS;
            // One row of x goes with two weight rows at a time (four were slower), more with four.
            const int most = R == 1 ? 2 : QWEIGHTS;
            for (long n = nb; n < ne; n += most) {
                const int W = ne - n < most ? (int)(ne - n) : most;
#define Q_CASE(B, WW, RR) \
    case ((B) == 8) * QROWS * QWEIGHTS + ((WW) - 1) * QROWS + (RR) - 1: q_pass(j, n, m0, B, RR, WW); break;
#define Q_CASES(B, WW) Q_CASE(B, WW, 1) Q_CASE(B, WW, 2) Q_CASE(B, WW, 3) Q_CASE(B, WW, 4)
                switch ((j->bits == 8) * QROWS * QWEIGHTS + (W - 1) * QROWS + R - 1) {
                    Q_CASES(4, 1) Q_CASES(4, 2) Q_CASES(4, 3) Q_CASES(4, 4)
                    Q_CASES(8, 1) Q_CASES(8, 2) Q_CASES(8, 3) Q_CASES(8, 4)
                }
#undef Q_CASES
#undef Q_CASE
            }
        }
    }
}

static void dequantize_run(const Job *j) {
    const long K = j->K, groups = K / j->group;
    const int shift = __builtin_ctz((unsigned)j->group);
    // 4 bits: the even values come in lo, the odd ones in hi; these put them back in order.
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    for (long n = j->n0; n < j->n1; n++) {
        float *row = j->out + n * K;
        const float *s = j->scales + n * groups, *b = j->biases + n * groups;
        __m512 lo, hi;
        for (long u = 0; u < K / 32; u++) {
            const QGroup p = q_group(j->bits, s, b, (32 * u) >> shift);
            if (j->bits == 8) {
                q_widen(8, (const uint8_t *)j->w + n * K, u, &p, &lo, &hi);
                _mm512_storeu_ps(row + 32 * u, lo);
                _mm512_storeu_ps(row + 32 * u + 16, hi);
            } else {
                q_widen(4, (const uint8_t *)j->w + n * (K / 2), u, &p, &lo, &hi);
                _mm512_storeu_ps(row + 32 * u, _mm512_permutex2var_ps(lo, first, hi));
                _mm512_storeu_ps(row + 32 * u + 16, _mm512_permutex2var_ps(lo, second, hi));
            }
        }
    }
}

// out = dequantize(w) (N x K float32, the values mx.dequantize gives) on `threads` threads, for
// products of many rows, which a float32 GEMM then does faster than q_rows. Returns the number
// of threads that took part.
int q_dequantize(const void *w, const float *scales, const float *biases, float *out, long N, long K, int bits,
                 int group, int threads) {
    Job job = {.run = dequantize_run, .w = w, .scales = scales, .biases = biases, .out = out, .N = N, .K = K,
               .bits = bits, .group = group};
    return dispatch(job, threads, 1);
}

// out = x @ dequantize(w).T on `threads` threads, splitting N. bits: 4 or 8; K a multiple of
// `group`, a multiple of 32. `scratch` holds M x K float32 (used for 4 bits). Returns the
// number of threads that took part.
int q_rows(const float *x, const void *w, const float *scales, const float *biases, float *out, long M, long N,
           long K, int bits, int group, int threads, float *scratch) {
    if (bits == 4) {  // each chunk of 32 values: the 16 even ones, then the 16 odd ones
        const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
        for (long i = 0; i < M * K; i += 32) {
            const __m512 lo = _mm512_loadu_ps(x + i), hi = _mm512_loadu_ps(x + i + 16);
            _mm512_storeu_ps(scratch + i, _mm512_permutex2var_ps(lo, evens, hi));
            _mm512_storeu_ps(scratch + i + 16, _mm512_permutex2var_ps(lo, odds, hi));
        }
        x = scratch;
    }
    Job job = {.run = q_run, .x = x, .w = w, .scales = scales, .biases = biases, .out = out, .M = M, .N = N,
               .K = K, .bits = bits, .group = group};
    return dispatch(job, threads, QBLOCK);
}

// Quantized products through AMX (q_amx), for any number of rows: a decoder step's, a batch's,
// the prompt's, an encoder chunk's. AMX multiplies 8-bit integers exactly, 16 x 16 x 64 per
// instruction. The weights are integers 0..15 or 0..255; each row of x is written, per group of
// 64 or 128 values, in P = 3 or 4 signed 8-bit parts,
//     x = 2^E (p0 + 2^-7 (p1 + 2^-7 (p2 + ...))),  2^E >= max |x| / 128
// (7P bits below the group's largest value, each part cut toward zero but the last, rounded:
// 21 or 28; float32 holds 24 bits below each value, so a value 2^f below its group's largest
// keeps 7P - f, at most 24). AMX sums q * p exactly in int32 per group and part, and
//     out[m, n] = sum over groups, in order, of  s * t + b * X,  t = 2^E ((.. S2 2^-7 + S1) 2^-7 + S0)
// (S the part sums, X the group's float32 sum of x; t and each term by fused multiply-adds,
// acc = fma(b, X, fma(s, t, acc)), so a one-hot x reads back s * q + b exactly as
// mx.dequantize rounds it, the product and the sum each rounded once). The sums are exact
// integers and the rest is done per (m, n) in the same order, so a row's numbers are the same
// whatever rows are multiplied with it (for the same P).
//
// The weights are stored for this kernel (q_pack, once, at load): per block of 16 weight rows,
// a chunk of 64 values is the unsigned B operand as AMX reads it (4 bits: its 1024 values in
// 512 bytes, split into bytes a group ahead of their use), and the blocks follow one another,
// so each thread reads one sequential stream. Up to 16 / P rows of x, their P parts each, are
// the rows of one signed A operand: one instruction per chunk serves all of them, and 4 rows
// cost about what one does. The sums come out a row of x and part per tile row, a vector over
// the block's 16 weight rows, with the block's scales and biases stored the same way. Two sets
// of tiles alternate between groups, so a group's sums are scaled while the next group
// multiplies. Many rows go over the weights in sets whose parts stay in L2. Scales and biases
// may be bfloat16 bits (half = 1: a bfloat16 checkpoint's, widened exactly). (Before, the
// weights in MLX's layout were rearranged per call, 16 rows x 64 bytes at a time, and a part
// of 16 rows of x was a tile: one row cost three times q_rows.)

#define QA_ROWS 5  // the most rows of x per A tile: 5 x 3 parts, or 4 x 4, of its 16 rows

// Tiles 0, 1: sums; 2, 3: the parts of x; 4, 5: weights. `rows` rows of A and C per tile.
static void qa_configure(int rows) {
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 6; t++) {
        c.rows[t] = t < 4 ? (uint8_t)rows : 16;
        c.colsb[t] = 64;
    }
    __asm__ volatile("" : : "m"(c) : "memory");  // GCC 12 may drop the stores above without this
    _tile_loadconfig(&c);
}

// A thread's buffer of at least `bytes`, kept between calls (worker threads live on).
static void *grow(void **buf, size_t *size, size_t bytes) {
    if (*size < bytes) {
        free(*buf);
        *buf = aligned_alloc(64, (bytes + 63) / 64 * 64);
        *size = *buf ? bytes : 0;
    }
    return *buf;
}

static __thread void *qa_buffer;
static __thread size_t qa_size;
static _Atomic int qa_short;  // a thread of the current call could not get its buffer

// A 16 x 16 matrix of 32-bit values, transposed in place.
static inline __attribute__((always_inline)) void transpose16(int32_t *a) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512((const void *)(a + 16 * i));
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
    }
    for (int i = 0; i < 16; i++) _mm512_storeu_si512((void *)(a + 16 * i), r[i]);
}

// Block b's weights and scales in q_amx's layout (see q_amx): tile byte 64 i + 4 r + c holds
// w[16 b + r, 64 u + 4 i + c] (i, r < 16, c < 4); 4 bits: byte i of the packed chunk holds tile
// bytes i (low nibble) and 512 + i (high). Scales and biases [G][16]. Rows past N are zeros.
// Each block is copied aside first, so the output may be the input (in place, N a multiple of
// 16: the block's bytes are where its rows were).
static __thread void *pack_buffer;
static __thread size_t pack_size;

static void pack_run(const Job *j) {
    const long K = j->K, N = j->N, G = K / j->group, chunks = K / 64, bytes = 16 * K * j->bits / 8;
    const long row = K * j->bits / 8;
    uint8_t *packed = (uint8_t *)j->parts_out;
    uint8_t *w = grow(&pack_buffer, &pack_size, bytes + 2 * 16 * G * sizeof(float));
    if (!w) {
        atomic_store(&qa_short, 1);
        return;
    }
    float *scales = (float *)(w + bytes), *biases = scales + 16 * G;
    const __m512i low = _mm512_set1_epi16(0x000f), high = _mm512_set1_epi16(0x0f00);
    __attribute__((aligned(64))) uint8_t tile[1024];
    for (long blk = j->n0 / 16; blk < (j->n1 + 15) / 16; blk++) {
        const long rows = N - 16 * blk < 16 ? N - 16 * blk : 16;
        memcpy(w, (const uint8_t *)j->w + 16 * blk * row, rows * row);
        memcpy(scales, j->scales + 16 * blk * G, rows * G * sizeof(float));
        memcpy(biases, j->biases + 16 * blk * G, rows * G * sizeof(float));
        for (long u = 0; u < chunks; u++) {
            // Row r's 64 values as bytes at tile[64 r], then transposed as 16 x 16 groups of 4.
            for (int r = 0; r < 16; r++) {
                __m512i v = _mm512_setzero_si512();
                if (r < rows && j->bits == 8) {
                    v = _mm512_loadu_si512((const void *)(w + r * row + 64 * u));
                } else if (r < rows) {  // byte i holds values 2i (low nibble) and 2i + 1: a word each
                    const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(w + r * row + 32 * u)));
                    v = _mm512_or_si512(_mm512_and_si512(b, low), _mm512_and_si512(_mm512_slli_epi16(b, 4), high));
                }
                _mm512_store_si512((void *)(tile + 64 * r), v);
            }
            transpose16((int32_t *)tile);
            uint8_t *to = packed + blk * bytes + u * (1024 * j->bits / 8);
            if (j->bits == 8) {
                memcpy(to, tile, 1024);
                continue;
            }
            for (int i = 0; i < 512; i += 64) {
                const __m512i lo = _mm512_load_si512((const void *)(tile + i));
                const __m512i hi = _mm512_load_si512((const void *)(tile + 512 + i));
                _mm512_storeu_si512((void *)(to + i), _mm512_or_si512(lo, _mm512_slli_epi16(hi, 4)));
            }
        }
        for (long g = 0; g < G; g++)
            for (int r = 0; r < 16; r++) {
                j->sums_out[(blk * G + g) * 16 + r] = r < rows ? scales[r * G + g] : 0;
                j->scales_out[(blk * G + g) * 16 + r] = r < rows ? biases[r * G + g] : 0;
            }
    }
}

// Stores w (N x K, MLX's packing), scales and biases (N x K / group) in q_amx's layout, on
// `threads` threads: `packed` holds ceil(N / 16) x 16 x K x bits / 8 bytes, `s` and `b` as many
// x K / group floats; they may be w, scales and biases themselves where N is a multiple of 16.
// Returns the number of threads that took part, or -1 where memory ran out.
int q_pack(const void *w, const float *scales, const float *biases, uint8_t *packed, float *s, float *b, long N,
           long K, int bits, int group, int threads) {
    Job job = {.run = pack_run, .w = w, .scales = scales, .biases = biases, .N = N, .K = K, .bits = bits,
               .group = group, .parts_out = (int8_t *)packed, .sums_out = s, .scales_out = b};
    atomic_store(&qa_short, 0);
    const int used = dispatch(job, threads, 16);
    return atomic_load(&qa_short) ? -1 : used;
}

// 4 bits: chunk u's weights split into bytes at slot(u), one group ahead of their use, so that a
// tile load does not wait for the stores (on the first tile of x of a set; the others read them
// back).
#define QA_SLOT(u) (t1 - t0 > 1 ? buf + 1024 * (u) : buf + 1024 * ((u) % 4))
#define QA_SPLIT(u)                                                                                          \
    do {                                                                                                     \
        if (j->bits == 4 && t == t0) {                                                                       \
            const uint8_t *q = wb + 512 * (u);                                                               \
            uint8_t *to = QA_SLOT(u);                                                                        \
            for (int l = 0; l < 8; l++) _mm_prefetch((const char *)(q + QA_FAR + 64 * l), _MM_HINT_T0);      \
            for (int l = 0; l < 8; l++) {                                                                    \
                const __m512i v = _mm512_loadu_si512((const void *)(q + 64 * l));                           \
                _mm512_store_si512((void *)(to + 64 * l), _mm512_and_si512(v, low));                        \
                _mm512_store_si512((void *)(to + 512 + 64 * l), _mm512_and_si512(_mm512_srli_epi16(v, 4), low)); \
            }                                                                                                \
        }                                                                                                    \
    } while (0)

// Group g's sums (tile C) for the tile of x t, chunk by chunk, through A and B; then the next
// group's weights split.
#define QA_GROUP(C, A, B, g)                                                                   \
    do {                                                                                       \
        _tile_zero(C);                                                                         \
        for (long u = (g) * per; u < ((g) + 1) * per; u++) {                                   \
            if (j->bits == 8) {                                                                \
                const uint8_t *q = wb + 1024 * u;                                              \
                for (int l = 0; l < 16; l++) _mm_prefetch((const char *)(q + QA_FAR + 64 * l), _MM_HINT_T0); \
                _tile_loadd(B, q, 64);                                                         \
            } else {                                                                           \
                _tile_loadd(B, QA_SLOT(u), 64);                                                \
            }                                                                                  \
            _tile_loadd(A, xa + (t * chunks + u) * P * R * 64, 64);                            \
            _tile_dpbsud(C, A, B);                                                             \
        }                                                                                      \
        for (long u = ((g) + 1) * per; u < ((g) + 2) * per && u < chunks; u++) QA_SPLIT(u);   \
    } while (0)

#define QA_FAR 4096  // weights prefetched this many bytes ahead into L1
#define QA_SET (1 << 20)  // bytes of x's parts per set of tiles (see qa_run)

// 16 scales or biases from entry i on: float32, or bfloat16 bits widened (exactly).
static inline __attribute__((always_inline)) __m512 qa_scales(const Job *j, const void *p, long i) {
    if (j->half) {
        const __m256i bits = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    }
    return _mm512_loadu_ps((const float *)p + i);
}

// Group g's sums (part p of row m at sums[P m + p][16]) into the accumulators.
// Group g of row `row` of x (its P part sums over the block's 16 weight rows) into acc, in the
// order that gives q_amx and q_vnni the same bits.
static inline __attribute__((always_inline)) __m512 qa_term(const Job *j, __m512 acc, const __m512i *parts, int P,
                                                            __m512 s, __m512 b, long g, long row) {
    __m512 total = _mm512_cvtepi32_ps(parts[P - 1]);
    for (int p = P - 2; p >= 0; p--)
        total = _mm512_fmadd_ps(total, _mm512_set1_ps(1.0f / 128), _mm512_cvtepi32_ps(parts[p]));
    total = _mm512_mul_ps(total, _mm512_set1_ps(j->xscale[g * j->rows + row]));  // 2^E: exact
    acc = _mm512_fmadd_ps(s, total, acc);
    return _mm512_fmadd_ps(b, _mm512_set1_ps(j->xsum[g * j->rows + row]), acc);
}

// Group g's sums (part p of row m at sums[P m + p][16]) into the accumulators.
static inline __attribute__((always_inline)) void qa_add(const Job *j, __m512 *acc, const int32_t *sums,
                                                         const void *sb, const void *bb, long g, long row0,
                                                         int valid) {
    const __m512 s = qa_scales(j, sb, g * 16), b = qa_scales(j, bb, g * 16);
#pragma GCC unroll 5
    for (int m = 0; m < QA_ROWS; m++) {
        if (m >= valid) break;
        __m512i parts[4];
        for (int p = 0; p < j->parts; p++) parts[p] = _mm512_load_si512(sums + 16 * (j->parts * m + p));
        acc[m] = qa_term(j, acc[m], parts, j->parts, s, b, g, row0 + m);
    }
}

// The `valid` rows of x from row0 on, times block blk, from the accumulators into out.
static inline __attribute__((always_inline)) void qa_store(const Job *j, const __m512 *acc, long blk, long row0,
                                                           int valid) {
    const long n = 16 * blk, N = j->N;
    const __mmask16 in = N - n >= 16 ? 0xffff : (__mmask16)((1u << (N - n)) - 1);
    for (int m = 0; m < valid; m++) _mm512_mask_storeu_ps(j->out + (row0 + m) * N + n, in, acc[m]);
}

static void qa_run(const Job *j) {
    const long K = j->K, G = K / j->group, chunks = K / 64, per = j->group / 64;
    const int R = j->bits_rows, P = j->parts;
    const long T = j->rows / R, bytes = 16 * K * j->bits / 8;
    const int8_t *xa = (const int8_t *)j->x;  // [T][chunks][R x P][64]
    // The tiles of x go over the weights in sets that stay in L2 (QA_SET bytes of parts).
    const long most = QA_SET / (chunks * P * R * 64) > 1 ? QA_SET / (chunks * P * R * 64) : 1;
    const long sets = (T + most - 1) / most, set = (T + sets - 1) / sets;
    // 4 bits: the block's weights as bytes, kept for the other tiles of x (one tile: four chunks).
    uint8_t *buf = j->bits == 4 ? grow(&qa_buffer, &qa_size, set > 1 && T > 1 ? 16 * K : 4096) : NULL;
    if (j->bits == 4 && !buf) {
        atomic_store(&qa_short, 1);
        return;
    }
    const __m512i low = _mm512_set1_epi8(0x0f);
    __attribute__((aligned(64))) int32_t sums[2][16 * 16];
    qa_configure(R * P);
    for (long t0 = 0; t0 < T; t0 += set) {
        const long t1 = t0 + set < T ? t0 + set : T;
        for (long blk = j->n0 / 16; blk < (j->n1 + 15) / 16; blk++) {
            const uint8_t *wb = (const uint8_t *)j->w + blk * bytes;
            const long at = blk * G * 16 * (j->half ? 2 : 4);  // bytes
            const void *sb = (const char *)j->scales + at, *bb = (const char *)j->biases + at;
            for (long t = t0; t < t1; t++) {
                const int valid = (int)(j->M - t * R < R ? j->M - t * R : R);
                __m512 acc[QA_ROWS];
                for (int m = 0; m < QA_ROWS; m++) acc[m] = _mm512_setzero_ps();
                for (long u = 0; u < per; u++) QA_SPLIT(u);
                for (long g = 0; g < G; g++) {
                    if (g % 2 == 0) {
                        QA_GROUP(0, 2, 4, g);
                        if (g > 0) qa_add(j, acc, sums[1], sb, bb, g - 1, t * R, valid);
                        _tile_stored(0, sums[0], 64);
                    } else {
                        QA_GROUP(1, 3, 5, g);
                        qa_add(j, acc, sums[0], sb, bb, g - 1, t * R, valid);
                        _tile_stored(1, sums[1], 64);
                    }
                }
                qa_add(j, acc, sums[(G - 1) % 2], sb, bb, G - 1, t * R, valid);
                qa_store(j, acc, blk, t * R, valid);
            }
        }
    }
    _tile_release();
}
#undef QA_GROUP
#undef QA_SPLIT
#undef QA_SLOT

// q_amx's rows m = n0..n1 of x (rows past M zeros): their parts in tiles, sums and scales.
static void qa_split_run(const Job *j) {
    const long K = j->K, G = K / j->group, group = j->group, chunks = K / 64, rows = j->rows, M = j->M;
    const int R = j->bits_rows, P = j->parts;
    const float *x = (const float *)j->x;
    for (long m = j->n0; m < j->n1; m++) {
        const float *row = x + (m < M ? m : 0) * K;
        for (long g = 0; g < G; g++) {
            __m512 sum = _mm512_setzero_ps(), top = _mm512_setzero_ps();
            if (m < M)
                for (long k = g * group; k < (g + 1) * group; k += 16) {
                    const __m512 v = _mm512_loadu_ps(row + k);
                    sum = _mm512_add_ps(sum, v);
                    top = _mm512_max_ps(top, _mm512_abs_ps(v));
                }
            j->sums_out[g * rows + m] = _mm512_reduce_add_ps(sum);
            // top = f 2^e, 0.5 <= f < 1 (e = 0 for 0, -126 below the normal floats), and
            // |x| 2^-E < 128 for E = e - 7
            const float high = _mm512_reduce_max_ps(top);
            uint32_t bits32;
            memcpy(&bits32, &high, 4);
            const int biased = (int)((bits32 >> 23) & 0xff), E = (high == 0 ? 0 : biased ? biased - 126 : -126) - 7;
            const uint32_t power = E >= -126 ? (uint32_t)(E + 127) << 23 : 1u << (E + 149);  // 2^E, exactly
            memcpy(&j->scales_out[g * rows + m], &power, 4);
            const __m512 down = _mm512_set1_ps((float)-E);
            for (long k = g * group; k < (g + 1) * group; k += 64) {
                int8_t *tile = j->parts_out + ((m / R) * chunks + k / 64) * P * R * 64 + P * (m % R) * 64;
                for (int i = 0; i < 4; i++) {
                    __m512 y = _mm512_scalef_ps(m < M ? _mm512_loadu_ps(row + k + 16 * i) : _mm512_setzero_ps(), down);
                    for (int p = 0; p < P; p++) {
                        __m512i q;
                        if (p < P - 1) {
                            q = _mm512_cvttps_epi32(y);  // toward zero: |q| <= 127
                            y = _mm512_mul_ps(_mm512_sub_ps(y, _mm512_cvtepi32_ps(q)), _mm512_set1_ps(128.0f));
                        } else {  // nearest; |y| < 128 but may round to 128
                            q = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(y), _mm512_set1_epi32(-127)),
                                                 _mm512_set1_epi32(127));
                        }
                        _mm_storeu_si128((__m128i *)(tile + p * 64 + 16 * i), _mm512_cvtepi32_epi8(q));
                    }
                }
            }
        }
    }
}

// q_vnni: q_amx's sums without AMX, through AVX-512 VNNI (Zen 4; Ice Lake and Cascade Lake
// Xeons). Tile row i of a chunk (4 values of each of a block's 16 weight rows, as q_pack stores
// them) is one vector, and VPDPBUSD adds to each weight row's int32 lane its 4 products with 4
// values of one part of one row of x, broadcast: 64 exact products an instruction, for R rows
// of x and P parts with each vector of weights loaded once. The sums are q_amx's (exact
// integers) and each group is scaled by the same steps (qa_term), so a row's bits are
// q_amx's for the same parts. (q_rows widens each weight to float32 first: a 4-bit step's
// products ran at 60% of the memory's speed there, bound by the widening's shuffles.)
#define QV_FAR 2048    // weights prefetched this many bytes ahead into L1
#define QV_FAR2 16384  // and this many into L2

// Tile t of x (R rows, `valid` of them real) times block blk; `first`: the tile that reads the
// block from memory (the others find it in L1 or L2).
static inline __attribute__((always_inline)) void qv_tile(const Job *j, long blk, long t, int valid, int first,
                                                          const int BITS, const int R, const int P) {
    const long K = j->K, G = K / j->group, chunks = K / 64, per = j->group / 64;
    const uint8_t *wb = (const uint8_t *)j->w + blk * 16 * K * BITS / 8;
    const long at = blk * G * 16 * (j->half ? 2 : 4);  // bytes
    const void *sb = (const char *)j->scales + at, *bb = (const char *)j->biases + at;
    const int32_t *xa = (const int32_t *)j->x;  // 4 values of a part a dword
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512 acc[QA_ROWS];
#pragma GCC unroll 5
    for (int m = 0; m < R; m++) acc[m] = _mm512_setzero_ps();
    for (long g = 0; g < G; g++) {
        __m512i sum[QA_ROWS][4];
#pragma GCC unroll 5
        for (int m = 0; m < R; m++)
#pragma GCC unroll 4
            for (int p = 0; p < P; p++) sum[m][p] = _mm512_setzero_si512();
        for (long u = g * per; u < (g + 1) * per; u++) {
            const int32_t *xu = xa + (t * chunks + u) * P * R * 16;  // [R x P][16]
            const uint8_t *q = wb + u * 128 * BITS;
            if (first)
#pragma GCC unroll 16
                for (int l = 0; l < 2 * BITS; l++) {
                    _mm_prefetch((const char *)(q + QV_FAR + 64 * l), _MM_HINT_T0);
                    _mm_prefetch((const char *)(q + QV_FAR2 + 64 * l), _MM_HINT_T1);
                }
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++) {
                __m512i w;
                if (BITS == 8) {
                    w = _mm512_loadu_si512((const void *)(q + 64 * i));
                } else {  // byte i of the chunk's 512 holds tile bytes i (low nibble) and 512 + i (high)
                    const __m512i v = _mm512_loadu_si512((const void *)(q + 64 * (i % 8)));
                    w = _mm512_and_si512(i < 8 ? v : _mm512_srli_epi16(v, 4), low);
                }
#pragma GCC unroll 5
                for (int m = 0; m < R; m++)
#pragma GCC unroll 4
                    for (int p = 0; p < P; p++)
                        sum[m][p] = _mm512_dpbusd_epi32(sum[m][p], w, _mm512_set1_epi32(xu[(P * m + p) * 16 + i]));
            }
        }
        const __m512 s = qa_scales(j, sb, g * 16), b = qa_scales(j, bb, g * 16);
#pragma GCC unroll 5
        for (int m = 0; m < R; m++) acc[m] = qa_term(j, acc[m], sum[m], P, s, b, g, t * R + m);
    }
    qa_store(j, acc, blk, t * R, valid);
}

static void qv_run(const Job *j) {
    const long K = j->K, P = j->parts, R = j->bits_rows, T = j->rows / R;
    // The tiles of x go over the weights in sets that stay in L2 (QA_SET bytes of parts).
    const long most = QA_SET / (K * P * R) > 1 ? QA_SET / (K * P * R) : 1;
    const long sets = (T + most - 1) / most, set = (T + sets - 1) / sets;
    for (long t0 = 0; t0 < T; t0 += set) {
        const long t1 = t0 + set < T ? t0 + set : T;
        for (long blk = j->n0 / 16; blk < (j->n1 + 15) / 16; blk++)
            for (long t = t0; t < t1; t++) {
                const int valid = (int)(j->M - t * R < R ? j->M - t * R : R), first = t == t0;
                // Constant bits, rows and parts: the sums stay in registers.
#define QV_CASE(B, RR, PP) \
    case ((B) == 8) * 16 + ((PP) == 4) * 8 + (RR): qv_tile(j, blk, t, valid, first, B, RR, PP); break;
#define QV_CASES(B, PP) QV_CASE(B, 1, PP) QV_CASE(B, 2, PP) QV_CASE(B, 3, PP) QV_CASE(B, 4, PP)
                switch ((j->bits == 8) * 16 + (P == 4) * 8 + (int)R) {
                    QV_CASES(4, 3) QV_CASES(4, 4) QV_CASES(8, 3) QV_CASES(8, 4)
                    QV_CASE(4, 5, 3) QV_CASE(8, 5, 3)
                }
#undef QV_CASES
#undef QV_CASE
            }
    }
}

// out = x @ dequantize(w).T (as q_rows) on `threads` threads splitting N; any M; K a multiple
// of `group`, 64 or 128; w, scales and biases as q_pack stores them, the scales and biases
// float32 or (half = 1) their bfloat16 bits in the same layout; x in `parts` parts, 3 or 4:
// through AMX (q_amx) or AVX-512 VNNI (q_vnni), the same numbers. Returns the number of threads
// that took part, 0 for what it does not take, or -1 where memory ran out.
static int q_packed(void (*run)(const Job *), const float *x, const void *w, const void *scales,
                    const void *biases, float *out, long M, long N, long K, int bits, int group, int parts,
                    int threads, int half) {
    if (parts < 3 || parts > 4 || (bits != 4 && bits != 8) || (group != 64 && group != 128) || K % group ||
        (half != 0 && half != 1))
        return 0;
    if (M < 1) return 1;  // nothing to multiply
    // Rows in tiles of R: as few tiles as the A tile holds, as even as can be.
    const long most = 16 / parts, tiles = (M + most - 1) / most, R = (M + tiles - 1) / tiles, rows = tiles * R;
    const long G = K / group;
    int8_t *xa = aligned_alloc(64, (size_t)rows * K * parts);
    float *xsum = aligned_alloc(64, (G * rows * sizeof(float) + 63) / 64 * 64);
    float *xscale = aligned_alloc(64, (G * rows * sizeof(float) + 63) / 64 * 64);
    if (!xa || !xsum || !xscale) {
        free(xa);
        free(xsum);
        free(xscale);
        return -1;
    }
    // x split on every thread, whole tiles each.
    Job split = {.run = qa_split_run, .x = x, .M = M, .N = rows, .K = K, .bits = bits, .group = group, .rows = rows,
                 .bits_rows = (int)R, .parts = parts, .parts_out = xa, .sums_out = xsum, .scales_out = xscale};
    dispatch(split, rows > R ? threads : 1, R);
    Job job = {.run = run, .x = xa, .w = w, .scales = scales, .biases = biases, .half = half, .out = out, .M = M,
               .N = N, .K = K, .bits = bits, .group = group, .xsum = xsum, .xscale = xscale, .rows = rows,
               .bits_rows = (int)R, .parts = parts};
    atomic_store(&qa_short, 0);
    const int used = dispatch(job, threads, 16);
    free(xa);
    free(xsum);
    free(xscale);
    return atomic_load(&qa_short) ? -1 : used;
}

int q_amx(const float *x, const void *w, const void *scales, const void *biases, float *out, long M, long N,
          long K, int bits, int group, int parts, int threads, int half) {
    return q_packed(qa_run, x, w, scales, biases, out, M, N, K, bits, group, parts, threads, half);
}

int q_vnni(const float *x, const void *w, const void *scales, const void *biases, float *out, long M, long N,
           long K, int bits, int group, int parts, int threads, int half) {
    return q_packed(qv_run, x, w, scales, biases, out, M, N, K, bits, group, parts, threads, half);
}

// Attention of one position (a decoder step) over a key/value cache, in float32: for each
// pair (a stream's key head and the G query heads that share it), the G x M scores, an exact
// softmax, and the weighted sum of the values. Each pair reads its keys and values from
// memory once. MLX's CPU attention and numpy read them at 3-6 GB/s (a scalar exponential,
// BLAS calls too thin for their blocking); a decoder step over a full 8192-position window
// then spent 300-470 ms in attention, more than in all its weights.

// e^x for x <= 0 (0 below -87.3, where float32 underflows): 2^n e^r with |r| <= ln 2 / 2 and a
// degree-6 Taylor polynomial for e^r (relative error under 2e-7).
static inline __m512 exp_nonpositive(__m512 x) {
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln 2, high bits
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);    // and the rest
    __m512 e = _mm512_set1_ps(1.0f / 720);
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 120));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 24));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 6));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(0.5f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps(e, n));
}

// The weighted sum of values m0..m1 [m][D] for G queries, weights p[g][m] (ldp apart per
// query), CH x 16 values of each row at a time (the accumulators stay in registers).
static inline __attribute__((always_inline)) void attend_values(const float *v, const float *p, long ldp, long m0,
                                                                long m1, long D, int G, float *out, const int CH) {
    for (int g0 = 0; g0 < G; g0 += 4) {
        const int gn = G - g0 < 4 ? G - g0 : 4;
        for (long d0 = 0; d0 < D; d0 += 16 * CH) {
            __m512 acc[4][4];
#pragma GCC unroll 4
            for (int g = 0; g < 4; g++)
#pragma GCC unroll 4
                for (int c = 0; c < CH; c++) acc[g][c] = _mm512_setzero_ps();
            for (long m = m0; m < m1; m++) {
                __m512 row[4];
#pragma GCC unroll 4
                for (int c = 0; c < CH; c++) row[c] = _mm512_loadu_ps(v + m * D + d0 + 16 * c);
#pragma GCC unroll 4
                for (int g = 0; g < 4; g++) {
                    if (g < gn) {
                        const __m512 w = _mm512_set1_ps(p[(g0 + g) * ldp + m]);
#pragma GCC unroll 4
                        for (int c = 0; c < CH; c++) acc[g][c] = _mm512_fmadd_ps(w, row[c], acc[g][c]);
                    }
                }
            }
            for (int g = 0; g < gn; g++)
                for (int c = 0; c < CH; c++) _mm512_storeu_ps(out + (g0 + g) * D + d0 + 16 * c, acc[g][c]);
        }
    }
}

static void attend_run(const Job *j) {
    const long M = j->M, D = j->K;
    const int G = j->bits;
    for (long pair = j->n0; pair < j->n1; pair++) {
        const float *q = (const float *)j->x + pair * G * D;
        const float *k = (const float *)j->w + pair * j->stride, *v = j->v + pair * j->stride;
        float *p = j->scores + pair * G * M, *out = j->out + pair * G * D;
        // Scores, each a dot product of D values in 16 lanes, summed across them.
        for (long m = 0; m < M; m++) {
            for (int g = 0; g < G; g++) {
                __m512 acc = _mm512_setzero_ps();
                for (long d = 0; d < D; d += 16)
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + d), _mm512_loadu_ps(k + m * D + d), acc);
                p[g * M + m] = j->mask && !j->mask[(g % j->mask_rows) * M + m] ? -INFINITY
                                                                               : _mm512_reduce_add_ps(acc) * j->scale;
            }
        }
        // Softmax numerators (e^(s - max)) in place; the sums divide the outputs.
        float sums[64];
        for (int g = 0; g < G; g++) {
            float *row = p + g * M;
            float top = -INFINITY;
            for (long m = 0; m < M; m++) top = row[m] > top ? row[m] : top;
            __m512 total = _mm512_setzero_ps();
            long m = 0;
            for (; m + 16 <= M; m += 16) {
                const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + m), _mm512_set1_ps(top)));
                _mm512_storeu_ps(row + m, e);
                total = _mm512_add_ps(total, e);
            }
            if (m < M) {
                const __mmask16 tail = (__mmask16)((1u << (M - m)) - 1);
                const __m512 e = exp_nonpositive(
                    _mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + m), _mm512_set1_ps(top)));
                _mm512_mask_storeu_ps(row + m, tail, e);
                total = _mm512_add_ps(total, _mm512_maskz_mov_ps(tail, e));
            }
            sums[g] = _mm512_reduce_add_ps(total);
        }
        if (D % 64 == 0)
            attend_values(v, p, M, 0, M, D, G, out, 4);
        else
            attend_values(v, p, M, 0, M, D, G, out, 1);
        for (int g = 0; g < G; g++)
            for (long d = 0; d < D; d++) out[g * D + d] /= sums[g];
    }
}

// out = softmax(q k^T scale + mask) v for N pairs of G <= 64 queries [G, D] and a cache [M, D]
// each (keys and values `stride` values apart per pair, D a multiple of 16), on `threads`
// threads splitting the pairs. `mask`: mask_rows x M bytes, 0 for a key that query g does not
// see (row g % mask_rows: the query heads of a key head, each over the same positions), or
// NULL. `scores` holds N x G x M floats. Returns the number of threads that took part, 0 for
// shapes it does not take.
int attend(const float *q, const float *k, const float *v, float *out, long N, int G, long M, long D, long stride,
           float scale, const uint8_t *mask, int mask_rows, float *scores, int threads) {
    if (G < 1 || G > 64 || D % 16 != 0 || M < 1 || mask_rows < 1) return 0;  // nothing computed
    Job job = {.run = attend_run, .x = q, .w = k, .out = out, .M = M, .N = N, .K = D, .bits = G, .v = v,
               .mask = mask, .mask_rows = mask_rows, .stride = stride, .scale = scale, .scores = scores};
    return dispatch(job, threads, 1);
}

// Attention of many queries per key head (a prompt, an encoder chunk of an offline pass):
// attend_run's dot products, one per query and key summed across lanes, cost more than the
// rest together there, and numpy took a pass over the scores per step of the softmax. Here
// each pair's keys are transposed once ([D][16 keys] per chunk of 16), and the scores of AM_Q
// queries come 16 keys at a time, a multiply-add per query and value; then an exact softmax
// and the weighted sum of the values, as attend_run. A block of queries reads only the chunks
// of 16 keys some query of it sees (`spans`, from the mask): half of a chunk attending to
// itself. A query's numbers do not depend on its block: the keys a block reads and its query
// does not see weigh an exact 0, and each sum runs over the keys in order.
#define AM_Q 8  // queries per block
static __thread void *am_buffer;
static __thread size_t am_size;

static void attend_many_run(const Job *j) {
    const long M = j->M, D = j->K, Mp = (M + 15) / 16 * 16;
    const int G = j->bits;
    float *kt = grow(&am_buffer, &am_size, (size_t)(D + AM_Q) * Mp * sizeof(float));
    if (!kt) {
        atomic_store(&qa_short, 1);
        return;
    }
    float *p = kt + D * Mp;  // [AM_Q][Mp] scores, then weights
    const __m512i across = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32((int)D));
    const long *spans = j->spans;
    for (long pair = j->n0; pair < j->n1; pair++) {
        const float *q = (const float *)j->x + pair * G * D;
        const float *k = (const float *)j->w + pair * j->stride, *v = j->v + pair * j->stride;
        float *out = j->out + pair * G * D;
        for (long m0 = 0; m0 < Mp; m0 += 16) {  // keys past M as zeros
            const __mmask16 in = M - m0 >= 16 ? 0xffff : (__mmask16)((1u << (M - m0)) - 1);
            for (long d = 0; d < D; d++)
                _mm512_store_ps(kt + (m0 / 16 * D + d) * 16,
                                _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, across, k + m0 * D + d, 4));
        }
        for (int g0 = 0; g0 < G; g0 += AM_Q) {
            const int gn = G - g0 < AM_Q ? G - g0 : AM_Q;
            const long c0 = spans[2 * (g0 / AM_Q)], c1 = spans[2 * (g0 / AM_Q) + 1];
            float sums[AM_Q];
            __m512 top[AM_Q];
            for (int g = 0; g < AM_Q; g++) top[g] = _mm512_set1_ps(-INFINITY);
            for (long c = c0; c < c1; c++) {
                // Each score in sums of 8 products, added alternately to two sums, not as one
                // chain of D: float32's error grows with the chain.
                __m512 acc[AM_Q], other[AM_Q];
#pragma GCC unroll 8
                for (int g = 0; g < AM_Q; g++) acc[g] = other[g] = _mm512_setzero_ps();
                const float *kc = kt + c * D * 16;
                for (long d0 = 0; d0 < D; d0 += 8) {
                    __m512 part[AM_Q];
#pragma GCC unroll 8
                    for (int g = 0; g < AM_Q; g++) part[g] = _mm512_setzero_ps();
                    for (long d = d0; d < d0 + 8; d++) {
                        const __m512 key = _mm512_load_ps(kc + d * 16);
#pragma GCC unroll 8
                        for (int g = 0; g < AM_Q; g++)
                            if (g < gn) part[g] = _mm512_fmadd_ps(_mm512_set1_ps(q[(g0 + g) * D + d]), key, part[g]);
                    }
#pragma GCC unroll 8
                    for (int g = 0; g < AM_Q; g++) {
                        if (d0 % 16 == 0)
                            acc[g] = _mm512_add_ps(acc[g], part[g]);
                        else
                            other[g] = _mm512_add_ps(other[g], part[g]);
                    }
                }
#pragma GCC unroll 8
                for (int g = 0; g < AM_Q; g++) acc[g] = _mm512_add_ps(acc[g], other[g]);
                const long m = 16 * c;
                const __mmask16 in = M - m >= 16 ? 0xffff : (__mmask16)((1u << (M - m)) - 1);
                for (int g = 0; g < gn; g++) {
                    __mmask16 seen = in;
                    if (j->mask) {
                        const uint8_t *row = j->mask + ((g0 + g) % j->mask_rows) * M + m;
                        __m128i flags;
                        if (in == 0xffff) {
                            flags = _mm_loadu_si128((const __m128i *)row);
                        } else {  // the last chunk: not a byte past the mask's end
                            uint8_t last[16] = {0};
                            memcpy(last, row, M - m);
                            flags = _mm_loadu_si128((const __m128i *)last);
                        }
                        const __m512i wide = _mm512_cvtepu8_epi32(flags);
                        seen = _mm512_mask_test_epi32_mask(in, wide, wide);
                    }
                    const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), seen,
                                                        _mm512_mul_ps(acc[g], _mm512_set1_ps(j->scale)));
                    _mm512_storeu_ps(p + g * Mp + m, s);
                    top[g] = _mm512_max_ps(top[g], s);
                }
            }
            for (int g = 0; g < gn; g++) {  // softmax numerators e^(s - max) in place
                float *row = p + g * Mp;
                const float most = _mm512_reduce_max_ps(top[g]);
                const __m512 high = _mm512_set1_ps(most);
                __m512 total = _mm512_setzero_ps();
                for (long m = 16 * c0; m < 16 * c1; m += 16) {
                    // A query that sees no key: weights 0 and their sum 0, its output 0 / 0 = NaN, as numpy's.
                    const __m512 e = most == -INFINITY ? _mm512_setzero_ps()
                                                       : exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + m), high));
                    _mm512_storeu_ps(row + m, e);
                    total = _mm512_add_ps(total, e);
                }
                sums[g] = _mm512_reduce_add_ps(total);
            }
            const long m1 = 16 * c1 < M ? 16 * c1 : M;
            float *to = out + g0 * D;
            if (D % 64 == 0)
                attend_values(v, p, Mp, 16 * c0, m1, D, gn, to, 4);
            else
                attend_values(v, p, Mp, 16 * c0, m1, D, gn, to, 1);
            for (int g = 0; g < gn; g++)
                for (long d = 0; d < D; d++) to[g * D + d] /= sums[g];
        }
    }
}

// attend for any G >= 1 queries per pair (blocks of AM_Q, see attend_many_run), with no
// `scores` buffer: each thread keeps its own. Returns the number of threads that took part, 0
// for shapes it does not take, -1 where memory ran out.
int attend_many(const float *q, const float *k, const float *v, float *out, long N, long G, long M, long D,
                long stride, float scale, const uint8_t *mask, int mask_rows, int threads) {
    if (G < 1 || G > (1L << 30) || D % 16 != 0 || M < 1 || mask_rows < 1) return 0;
    const long blocks = (G + AM_Q - 1) / AM_Q, chunks = (M + 15) / 16;
    long *spans = malloc(2 * blocks * sizeof(long));
    if (!spans) return -1;
    for (long b = 0; b < blocks; b++) {  // the chunks of keys some query of block b sees
        long lo = chunks, hi = 0;
        for (long g = b * AM_Q; g < (b + 1) * AM_Q && g < G && (lo > 0 || hi < chunks); g++) {
            if (!mask) {
                lo = 0, hi = chunks;
                break;
            }
            const uint8_t *row = mask + (g % mask_rows) * M;
            long a = 0, z = M;
            while (a < M && !row[a]) a++;
            while (z > a && !row[z - 1]) z--;
            if (a < z) {
                lo = a / 16 < lo ? a / 16 : lo;
                hi = (z + 15) / 16 > hi ? (z + 15) / 16 : hi;
            }
        }
        spans[2 * b] = lo < hi ? lo : 0;  // a block that sees nothing reads no key
        spans[2 * b + 1] = lo < hi ? hi : 0;
    }
    Job job = {.run = attend_many_run, .x = q, .w = k, .out = out, .M = M, .N = N, .K = D, .bits = (int)G, .v = v,
               .mask = mask, .mask_rows = mask_rows, .stride = stride, .scale = scale, .spans = spans};
    atomic_store(&qa_short, 0);
    const int used = dispatch(job, threads, 1);
    free(spans);
    return atomic_load(&qa_short) ? -1 : used;
}

// SwiGLU's silu(g) u = g u / (1 + e^-g) over 16-value chunks n0..n1 of K values: with
// e = e^-|g| (exp_nonpositive), g u / (1 + e) for g >= 0 and g u e / (1 + e) below, so that
// no exponential overflows (g < -87.3: e = 0 and the product is a signed zero, as numpy's
// g / inf gives). numpy spent four passes and three temporaries per value on it.
static void silu_run(const Job *j) {
    const float *g = (const float *)j->x, *u = j->v;
    const __m512 one = _mm512_set1_ps(1.0f);
    for (long c = j->n0; c < j->n1; c++) {
        const long i = 16 * c;
        const __mmask16 in = j->K - i >= 16 ? 0xffff : (__mmask16)((1u << (j->K - i)) - 1);
        const __m512 x = _mm512_maskz_loadu_ps(in, g + i), y = _mm512_maskz_loadu_ps(in, u + i);
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
        const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
        const __m512 top = _mm512_mask_mul_ps(_mm512_mul_ps(x, y), negative, _mm512_mul_ps(x, y), e);
        _mm512_mask_storeu_ps(j->out + i, in, _mm512_div_ps(top, _mm512_add_ps(one, e)));
    }
}

// out = silu(g) * u for n float32 values (out may be g or u), on `threads` threads. Returns
// the number of threads that took part.
int silu_mul(const float *g, const float *u, float *out, long n, int threads) {
    Job job = {.run = silu_run, .x = g, .v = u, .out = out, .N = (n + 15) / 16, .K = n};
    return dispatch(job, threads, 256);
}

// RoPE of a product's heads: x [B, L, H, D] (a row of H heads of D values per position,
// interleaved pairs) turned by the angles of its position, cos and sin [L, D / 2], into out
// [B, H, L, D] (heads first, as attention reads them): out[2i] = x[2i] cos_i - x[2i + 1] sin_i,
// out[2i + 1] = x[2i + 1] cos_i + x[2i] sin_i, each as one product and one fused multiply-add.
// Rows r = b L + l, n0..n1 of N = B L; K = D (a multiple of 16), M = L, bits = H.
static void rope_run(const Job *j) {
    const long L = j->M, D = j->K, H = j->bits;
    const float *x = (const float *)j->x, *cs = (const float *)j->w, *sn = j->v;
    const __m512i pairs = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    for (long r = j->n0; r < j->n1; r++) {
        const long b = r / L, l = r % L;
        for (long d = 0; d < D; d += 16) {
            // The 8 angles of these 16 values, each twice; sin negated for the even entries.
            const long at = l * D / 2 + d / 2;
            const __m512 c = _mm512_permutexvar_ps(pairs, _mm512_castps256_ps512(_mm256_loadu_ps(cs + at)));
            __m512 s = _mm512_permutexvar_ps(pairs, _mm512_castps256_ps512(_mm256_loadu_ps(sn + at)));
            s = _mm512_mask_sub_ps(s, 0x5555, _mm512_setzero_ps(), s);
            for (long h = 0; h < H; h++) {
                const __m512 v = _mm512_loadu_ps(x + (r * H + h) * D + d);
                const __m512 swapped = _mm512_permute_ps(v, 0xB1);  // (x[2i + 1], x[2i])
                _mm512_storeu_ps(j->out + ((b * H + h) * L + l) * D + d,
                                 _mm512_fmadd_ps(v, c, _mm512_mul_ps(swapped, s)));
            }
        }
    }
}

// out [B, H, L, D] = RoPE of x [B, L, H, D] by cos, sin [L, D / 2], on `threads` threads.
// Returns the number of threads that took part, 0 where D is not a multiple of 16.
int rope_heads(const float *x, const float *cos, const float *sin, float *out, long B, long L, long H, long D,
               int threads) {
    if (D % 16 != 0 || D < 16) return 0;
    Job job = {.run = rope_run, .x = x, .w = cos, .v = sin, .out = out, .N = B * L, .M = L, .K = D, .bits = (int)H};
    return dispatch(job, threads, 1);
}

// RMSNorm of rows of K values: out = (x r) w, r = 1 / sqrt(mean(x^2) + eps), and times s where
// s is given (the decoder's FFN norm: ((x r) w) s), each product rounded in that order; the
// squares summed in 16 lanes, in order, then across them. out may be x.
static void norm_run(const Job *j) {
    const long K = j->K;
    const float *x = (const float *)j->x, *w = (const float *)j->w, *s = j->v;
    for (long r = j->n0; r < j->n1; r++) {
        const float *row = x + r * K;
        __m512 acc = _mm512_setzero_ps();
        for (long k = 0; k < K; k += 16) {
            const __mmask16 in = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
            const __m512 v = _mm512_maskz_loadu_ps(in, row + k);
            acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
        }
        const __m512 scale = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)K + j->scale));
        for (long k = 0; k < K; k += 16) {
            const __mmask16 in = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
            __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(in, row + k), scale),
                                     _mm512_maskz_loadu_ps(in, w + k));
            if (s) y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(in, s + k));
            _mm512_mask_storeu_ps(j->out + r * K + k, in, y);
        }
    }
}

// out [rows, K] = RMSNorm of x [rows, K] by w [K] (eps), times s [K] where s is not NULL, on
// `threads` threads. Returns the number of threads that took part.
int rms_norm(const float *x, const float *w, const float *s, float *out, long rows, long K, float eps, int threads) {
    Job job = {.run = norm_run, .x = x, .w = w, .v = s, .out = out, .N = rows, .K = K, .scale = eps};
    return dispatch(job, threads, 1);
}

// A decoder step, a speculative pass or a streaming encoder chunk through one layer in one
// call: a 4-bit step of the 4B model had about 5 ms (a thirteenth of it) of Python, numpy and
// ctypes between its 182 products, about 30 us per operation on vectors of 3072 values; a
// streaming chunk of the encoder, about 9 ms of 75. The same kernels in the same order, so the
// numbers are those of host.py's (rms_norm, the products, rope_heads, attend, silu_mul).

// A weight as its row kernel takes it: bits 4 or 8, stored by q_pack (q_packed, x in `parts`
// parts), or bits 16, bfloat16 bits N x K (bf16_rows with AMX, else wide_rows, or dot_rows for
// x rounded to bfloat16 where the CPU has AVX-512 BF16, x in `parts` parts); `bias`: float32
// [N] added to the products, or NULL.
typedef struct {
    const void *w, *scales, *biases;
    const float *bias;
    long n, k;
    int bits, group, half, parts;
} StepWeight;

// A transformer layer whose products all go through the row kernels.
typedef struct {
    StepWeight wq, wk, wv, wo, w1, w3, w2;
    const float *attention_norm, *ffn_norm;  // [dim]
    float eps;
    long heads, kv_heads, head_dim;
} StepLayer;

#define STEP_AMX 1  // layer_step's flags: AMX for both kinds of weights
#define STEP_DOT 2  // dot_rows for bfloat16 weights and x rounded
#define SMALL_WORK (1L << 18)  // multiply-adds below which a call runs on one thread (cpu_kernels.SMALL)

static int threads_for(long work, int threads) { return work < SMALL_WORK ? 1 : threads; }

static int step_product(const float *x, const StepWeight *w, float *out, long M, int threads, int flags,
                        void *scratch) {
    const long N = w->n, K = w->k;
    int done;
    if (w->bits != 16)
        done = q_packed(flags & STEP_AMX ? qa_run : qv_run, x, w->w, w->scales, w->biases, out, M, N, K, w->bits,
                        w->group, w->parts, threads_for(M * N * K, threads), w->half);
    else if (flags & STEP_AMX)
        done = bf16_rows(x, w->w, out, M, N, K, threads_for(w->parts * M * N * K, threads), scratch, w->parts);
    else if (w->parts == 1 && flags & STEP_DOT)
        done = dot_rows(x, w->w, out, M, N, K, threads_for(M * N * K, threads), scratch);
    else
        done = wide_rows(x, w->w, out, M, N, K, threads_for(M * N * K, threads), scratch, w->parts);
    if (done > 0 && w->bias)
        for (long m = 0; m < M; m++)
            for (long n = 0; n < N; n++) out[m * N + n] += w->bias[n];
    return done;
}

// Floats of layer_step's `work` for `rows` rows (streams times positions) and `stored` slots.
long layer_step_work(const StepLayer *l, long rows, long stored) {
    const long dim = l->wq.k, HD = l->heads * l->head_dim, KD = l->kv_heads * l->head_dim, hidden = l->w1.n;
    const long widest = dim > HD ? (dim > hidden ? dim : hidden) : (HD > hidden ? HD : hidden);
    return rows * (2 * dim + 4 * HD + 3 * KD + 2 * hidden + l->heads * stored + 2 * widest);
}

// L positions of B streams through layer l: x [B, L, dim] += attention(rms_norm(x)), then
// x += ffn(rms_norm(x) s), s = ffn_scale [dim] (the decoder's) or 1 (NULL). Their keys and
// values (rotated by cos, sin [L, D / 2]) go into slots (slot + i) % capacity of the rings keys
// and values [B, Hk, slots, D], then the queries attend over their first `stored` slots
// (mask: L x stored bytes, 0 for a slot out of a position's view, or NULL). work:
// layer_step_work floats. Returns 1, 0 for what it does not take, or -1 where memory ran out.
int layer_step(const StepLayer *l, float *x, long B, long L, const float *ffn_scale, const float *cos,
               const float *sin, float *keys, float *values, long slots, long capacity, long slot, long stored,
               const uint8_t *mask, float scale, float *work, int threads, int flags) {
    const long dim = l->wq.k, H = l->heads, Hk = l->kv_heads, D = l->head_dim, hidden = l->w1.n, M = B * L;
    if (H < 1 || Hk < 1 || H % Hk || H / Hk * L > 64 || D % 16 || l->wq.n != H * D || l->wk.n != Hk * D ||
        l->wv.n != Hk * D || l->wo.k != H * D || l->wo.n != dim || l->w3.n != hidden || l->w2.k != hidden ||
        l->w2.n != dim || L < 1 || L > capacity || slot < 0 || slot >= capacity || stored < 1 || stored > slots ||
        (slot + L > slots && capacity > slots))
        return 0;
    float *h = work, *q = h + M * dim, *qh = q + M * H * D, *k = qh + M * H * D, *kh = k + M * Hk * D,
          *v = kh + M * Hk * D, *att = v + M * Hk * D, *at = att + M * H * D, *o = at + M * H * D, *g = o + M * dim,
          *u = g + M * hidden, *scores = u + M * hidden, *rows = scores + M * H * stored;
    int done = 1;
#define STEP(x, w, out)                                                     \
    do {                                                                    \
        const int r = step_product(x, &l->w, out, M, threads, flags, rows); \
        if (r <= 0) done = r < 0 ? -1 : 0;                                  \
    } while (0)
    rms_norm(x, l->attention_norm, NULL, h, M, dim, l->eps, 1);
    STEP(h, wq, q);
    STEP(h, wk, k);
    STEP(h, wv, v);
    if (done != 1) return done;
    rope_heads(q, cos, sin, qh, B, L, H, D, threads_for(16 * M * H * D, threads));   // [B, H, L, D]
    rope_heads(k, cos, sin, kh, B, L, Hk, D, threads_for(16 * M * Hk * D, threads));  // [B, Hk, L, D]
    for (long b = 0; b < B; b++)
        for (long j = 0; j < Hk; j++)
            for (long i = 0; i < L; i++) {
                const long at_slot = ((b * Hk + j) * slots + (slot + i) % capacity) * D;
                memcpy(keys + at_slot, kh + ((b * Hk + j) * L + i) * D, D * sizeof(float));
                memcpy(values + at_slot, v + ((b * L + i) * Hk + j) * D, D * sizeof(float));
            }
    attend(qh, keys, values, att, B * Hk, (int)(H / Hk * L), stored, D, slots * D, scale, mask, (int)L, scores,
           threads_for(2 * M * H * stored * D, threads));
    for (long b = 0; b < B; b++)  // [B, H, L, D] -> [B, L, H, D]
        for (long j = 0; j < H; j++)
            for (long i = 0; i < L; i++)
                memcpy(at + ((b * L + i) * H + j) * D, att + ((b * H + j) * L + i) * D, D * sizeof(float));
    STEP(at, wo, o);
    if (done != 1) return done;
    for (long i = 0; i < M * dim; i++) x[i] += o[i];
    rms_norm(x, l->ffn_norm, ffn_scale, h, M, dim, l->eps, 1);
    STEP(h, w1, g);
    STEP(h, w3, u);
    if (done != 1) return done;
    silu_mul(g, u, g, M * hidden, threads_for(64 * M * hidden, threads));
    STEP(g, w2, o);
    if (done != 1) return done;
    for (long i = 0; i < M * dim; i++) x[i] += o[i];
#undef STEP
    return 1;
}
