// KVAttention: one layer's decode attention over a shared key/value pool, as a LiteRT custom op.
//
// Inputs (C-contiguous):
//   0 q      fp32 [K, G*B, D]  row g*B + b: query head k*G + g of batch row b
//   1 k_new  fp32 [K, B, D]    each row's new token's key (already rotated where the model is)
//   2 v_new  fp32 [K, B, D]    its value
//   3 key    fp16 or fp32 [K, S, D]  the pool, read in place
//   4 value  same type and shape as key
//   5 mask   fp32 [1, B, S + 1] additive; column s < S is pool slot s, column S the row's new
//            token. A column below KV_EXCLUDE (-1000) is left out: never read, weight exactly 0.
// Output:   fp32 [K, G*B, D]  softmax(q.k / sqrt(D) + mask) . v over each row's included slots
//           and its new token; a row with nothing included gets zeros.
//
// The LiteRT side is the C ABI of litert/c/litert_custom_op_kernel.h: four callbacks and one
// user_data pointer per registration, shared by every node of the op (the dispatcher discards
// what Init returns, so there is no per-node state). The two tensor-buffer functions it needs
// are handed over by kvattn_set_api() (the host resolves them in the libLiteRt.so it loaded),
// so this library does not link against LiteRT. The dispatcher ignores the status Run returns,
// so every error is also counted where the host reads it (kvattn_errors).
//
// Work: a call lists each batch row's included slots once (the mask is shared by the K heads),
// then one work item per (head, row) takes the row's G query rows over its slots and its new
// token. Items are shared by the calling thread and the context's own small thread pool (not
// OpenMP: its idle workers spin and starve XNNPACK's threads on a small machine). The AVX2 +
// FMA + F16C path is chosen at run time; a portable C path serves every other CPU and every
// shape the fast path does not take.
//
// Build: build.py (plain `cc -O3 -shared -fPIC`; the fast path's instructions are enabled per
// function with target attributes, not for the whole library).

#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) && !defined(KVATTN_PORTABLE_ONLY)
#define KV_X86 1
#include <immintrin.h>
#else
#define KV_X86 0
#endif

// --- the LiteRT C ABI pieces this needs (litert_layout.h, litert_model_types.h,
//     litert_custom_op_kernel.h; ai-edge-litert 2.x) ----------------------------------------
typedef int LiteRtStatus;
typedef void* LiteRtTensorBuffer;
#define LITERT_TENSOR_MAX_RANK 8
typedef struct {
  unsigned int rank : 7;
  unsigned int has_strides : 1;
  int32_t dimensions[LITERT_TENSOR_MAX_RANK];
  uint32_t strides[LITERT_TENSOR_MAX_RANK];
} LiteRtLayout;
typedef struct {
  int element_type;
  LiteRtLayout layout;
} LiteRtRankedTensorType;
typedef struct {
  LiteRtStatus (*Init)(void* user_data, const void* init_data, size_t init_data_size);
  LiteRtStatus (*GetOutputLayouts)(void* user_data, size_t num_inputs, const LiteRtLayout* input_layouts,
                                   size_t num_outputs, LiteRtLayout* output_layouts);
  LiteRtStatus (*Run)(void* user_data, size_t num_inputs, const LiteRtTensorBuffer* inputs, size_t num_outputs,
                      LiteRtTensorBuffer* outputs);
  LiteRtStatus (*Destroy)(void* user_data);
} LiteRtCustomOpKernel;

_Static_assert(sizeof(LiteRtLayout) == 68, "LiteRtLayout size");
_Static_assert(sizeof(LiteRtRankedTensorType) == 72, "LiteRtRankedTensorType size");

enum { kOk = 0, kInvalidArgument = 1, kAllocFailure = 2, kRuntimeFailure = 3 };
enum { kFloat32 = 1, kFloat16 = 10 };

static LiteRtStatus (*g_get_host_memory)(LiteRtTensorBuffer, void**);
static LiteRtStatus (*g_get_tensor_type)(LiteRtTensorBuffer, LiteRtRankedTensorType*);

// LiteRtGetTensorBufferHostMemory and LiteRtGetTensorBufferTensorType.
void kvattn_set_api(LiteRtStatus (*get_host_memory)(LiteRtTensorBuffer, void**),
                    LiteRtStatus (*get_tensor_type)(LiteRtTensorBuffer, LiteRtRankedTensorType*)) {
  g_get_host_memory = get_host_memory;
  g_get_tensor_type = get_tensor_type;
}

#define KV_EXCLUDE (-1000.0f)
#define KV_MAX_D 256      // fast path: D a multiple of 8 up to this
#define KV_MAX_G 8        // fast path: query rows per pass over a row's slots
#define KV_MAX_THREADS 64
// A call whose work (K * G * (included slots + new tokens)) is below this runs on the calling
// thread alone. Measured on 2 KVM vCPUs (bench.py --threshold), one thread against two: calls
// back to back, sharing ties at ~3.5k and wins from ~7k (52 -> 47 us; 22k: 211 -> 117 us); after
// 300 us idle (the other vCPU halted: waking a worker then costs the caller ~12 us and the worker
// starts ~36 us later) it loses ~16 us up to ~35k. In a model the other vCPU is busy with
// XNNPACK's threads between these calls, which is the first case.
#ifndef KV_SERIAL_WORK
#define KV_SERIAL_WORK 4096
#endif
#ifndef KV_WORKER_SPIN_NS
#define KV_WORKER_SPIN_NS 5000  // how long an idle worker spins before it blocks
#endif
#ifndef KV_CALLER_SPIN_NS
#define KV_CALLER_SPIN_NS 50000  // how long the caller spins for the workers' last items
#endif

// --- CPU dispatch ----------------------------------------------------------------------------

static atomic_int g_force_portable;

// AVX2, FMA and F16C, and an OS that saves the YMM registers, read with CPUID and XGETBV itself:
// __builtin_cpu_supports needs libgcc's __cpu_model, which zig's clang (the image's compiler)
// cannot link into a shared library.
static int cpu_probe(void) {
#if KV_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
  if (!(fma && osxsave && avx && f16c)) return 0;
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & 6) != 6) return 0;  // XMM and YMM state enabled
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
  return (b >> 5) & 1;  // AVX2
#else
  return 0;
#endif
}

static int cpu_has_fast_path(void) {
  static atomic_int known = -1;  // probed once (a race probes twice, to the same answer)
  int v = atomic_load(&known);
  if (v < 0) atomic_store(&known, v = cpu_probe());
  return v;
}

// Whether calls take the AVX2 path (where the shape allows it).
int kvattn_fast_path(void) { return !atomic_load(&g_force_portable) && cpu_has_fast_path(); }

// Forces the portable path (tests); returns the previous setting.
int kvattn_force_portable(int on) { return atomic_exchange(&g_force_portable, on != 0); }

// --- a small persistent thread pool ------------------------------------------------------------
//
// The calling thread takes items too; N-1 workers take the rest from one atomic counter. An idle
// worker spins for a few microseconds, then blocks on a condition variable.
//
// A worker joins a job (state: job number, closed flag, workers in it) only while the job is
// open; the caller closes it when it runs out of items and then waits only for the workers that
// joined, never for one still waking up (that one finds the job closed and goes back to wait).
// The seq_cst store-then-load pairs (state/sleepers, state/caller_waiting) make a missed
// wake-up impossible: of the two sides, at least one sees the other's write, and the side that
// sleeps re-checks under the mutex the other side takes before it signals.

typedef void (*KvTask)(void* arg, int item, int thread);

#define KV_JOB(state) ((unsigned)((state) >> 32))
#define KV_CLOSED ((uint64_t)1 << 31)
#define KV_JOINED(state) ((unsigned)((state)&0x7fffffffu))

typedef struct {
  int workers;  // threads besides the caller
  pthread_t threads[KV_MAX_THREADS];
  pthread_mutex_t mu;
  pthread_cond_t wake, done;
  _Atomic uint64_t state;  // job number << 32 | KV_CLOSED | workers joined
  atomic_int next;         // next item of the job
  atomic_int sleepers;
  atomic_int caller_waiting;
  atomic_int stop;
  KvTask fn;  // the job; written only while no worker is in a job
  void* arg;
  int items;
  unsigned fork_gen;
} KvPool;

typedef struct {
  KvPool* pool;
  int id;
} KvWorkerArg;

static atomic_uint g_fork_gen;  // a forked child has no workers: its pools are abandoned
static void on_fork_child(void) { atomic_fetch_add(&g_fork_gen, 1); }
static pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;
static void register_atfork(void) { pthread_atfork(NULL, NULL, on_fork_child); }

static inline void cpu_relax(void) {
#if KV_X86
  _mm_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

static inline uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int worker_should_wake(KvPool* p, unsigned seen) {
  return KV_JOB(atomic_load(&p->state)) != seen || atomic_load(&p->stop);
}

static void* worker_main(void* a) {
  KvWorkerArg* wa = (KvWorkerArg*)a;
  KvPool* p = wa->pool;
  const int id = wa->id;
  free(wa);
  unsigned seen = 0;  // the job number at the pool's creation (reading it here could miss job 1)
  for (;;) {
    int ready = 0;
    const uint64_t t0 = now_ns();
    for (int i = 0; !ready; i++) {
      ready = worker_should_wake(p, seen);
      if (!ready && (i & 63) == 63 && now_ns() - t0 > KV_WORKER_SPIN_NS) break;
      cpu_relax();
    }
    if (!ready) {
      pthread_mutex_lock(&p->mu);
      atomic_fetch_add(&p->sleepers, 1);
      while (!worker_should_wake(p, seen)) pthread_cond_wait(&p->wake, &p->mu);
      atomic_fetch_sub(&p->sleepers, 1);
      pthread_mutex_unlock(&p->mu);
    }
    if (atomic_load(&p->stop)) break;
    uint64_t st = atomic_load(&p->state);
    seen = KV_JOB(st);
    while (!(st & KV_CLOSED) && KV_JOB(st) == seen && !atomic_compare_exchange_weak(&p->state, &st, st + 1)) {
    }
    if ((st & KV_CLOSED) || KV_JOB(st) != seen) continue;  // too late for that job
    for (int i; (i = atomic_fetch_add(&p->next, 1)) < p->items;) p->fn(p->arg, i, id);
    st = atomic_fetch_sub(&p->state, 1) - 1;
    if (KV_JOINED(st) == 0 && atomic_load(&p->caller_waiting)) {
      pthread_mutex_lock(&p->mu);
      pthread_cond_signal(&p->done);
      pthread_mutex_unlock(&p->mu);
    }
  }
  return NULL;
}

static void pool_free(KvPool* p) {
  if (!p) return;
  atomic_store(&p->stop, 1);
  pthread_mutex_lock(&p->mu);
  pthread_cond_broadcast(&p->wake);
  pthread_mutex_unlock(&p->mu);
  for (int i = 0; i < p->workers; i++) pthread_join(p->threads[i], NULL);
  pthread_cond_destroy(&p->wake);
  pthread_cond_destroy(&p->done);
  pthread_mutex_destroy(&p->mu);
  free(p);
}

// A pool of `threads` threads in all (the caller and threads-1 workers); fewer workers if some
// cannot be started, NULL if none can.
static KvPool* pool_new(int threads) {
  pthread_once(&g_atfork_once, register_atfork);
  KvPool* p = (KvPool*)calloc(1, sizeof(KvPool));
  if (!p) return NULL;
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->wake, NULL);
  pthread_cond_init(&p->done, NULL);
  p->fork_gen = atomic_load(&g_fork_gen);
  for (int i = 0; i < threads - 1; i++) {
    KvWorkerArg* wa = (KvWorkerArg*)malloc(sizeof(KvWorkerArg));
    if (!wa) break;
    wa->pool = p;
    wa->id = i + 1;
    if (pthread_create(&p->threads[i], NULL, worker_main, wa) != 0) {
      free(wa);
      break;
    }
    pthread_setname_np(p->threads[i], "kvattn");  // tells them apart in top -H, and in tests
    p->workers++;
  }
  if (p->workers == 0) {
    pool_free(p);
    return NULL;
  }
  return p;
}

// Runs fn(arg, i, thread) for i in [0, items), the caller as thread 0.
static void pool_run(KvPool* p, KvTask fn, void* arg, int items) {
  p->fn = fn;
  p->arg = arg;
  p->items = items;
  atomic_store(&p->next, 0);
  atomic_store(&p->state, (uint64_t)(KV_JOB(atomic_load(&p->state)) + 1) << 32);
  if (atomic_load(&p->sleepers) > 0) {
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
  }
  for (int i; (i = atomic_fetch_add(&p->next, 1)) < items;) fn(arg, i, 0);
  // no item left: close the job and wait for the workers in it to finish theirs
  if (KV_JOINED(atomic_fetch_or(&p->state, KV_CLOSED)) == 0) return;
  const uint64_t t0 = now_ns();
  for (int i = 0; KV_JOINED(atomic_load(&p->state)) > 0; i++) {
    if ((i & 63) == 63 && now_ns() - t0 > KV_CALLER_SPIN_NS) {
      pthread_mutex_lock(&p->mu);
      atomic_store(&p->caller_waiting, 1);
      while (KV_JOINED(atomic_load(&p->state)) > 0) pthread_cond_wait(&p->done, &p->mu);
      atomic_store(&p->caller_waiting, 0);
      pthread_mutex_unlock(&p->mu);
      break;
    }
    cpu_relax();
  }
}

// --- per-registration state ----------------------------------------------------------------------

typedef struct {
  int num_threads;
  long serial_work;      // calls with less work than this run on the calling thread alone
  pthread_mutex_t call;  // calls through one context are serialized (they share its scratch)
  KvPool* pool;          // started at the first call that shares work
  int32_t* index;        // [B, S] each row's included slots
  int32_t* count;        // [B]
  size_t index_cap, count_cap;
  float* scores;  // [num_threads, scores_stride]
  size_t scores_cap;
  atomic_long errors;
} KvContext;

static atomic_long g_errors;  // every context's errors, and those with no context

static void count_error(KvContext* c) {
  atomic_fetch_add(&g_errors, 1);
  if (c) atomic_fetch_add(&c->errors, 1);
}

// A context for `num_threads` threads in all (the calling thread included); < 1 means 2.
KvContext* kvattn_context_new(int num_threads) {
  KvContext* c = (KvContext*)calloc(1, sizeof(KvContext));
  if (!c) return NULL;
  if (num_threads < 1) num_threads = 2;
  c->num_threads = num_threads > KV_MAX_THREADS ? KV_MAX_THREADS : num_threads;
  c->serial_work = KV_SERIAL_WORK;
  pthread_mutex_init(&c->call, NULL);
  return c;
}

// Stops the context's workers and frees it; no compiled model may use it any more.
void kvattn_context_free(KvContext* c) {
  if (!c) return;
  if (c->pool && c->pool->fork_gen == atomic_load(&g_fork_gen)) pool_free(c->pool);
  pthread_mutex_destroy(&c->call);
  free(c->index);
  free(c->count);
  free(c->scores);
  free(c);
}

// Errors counted by `c` (NULL: by every context, and calls without one).
long kvattn_errors(const KvContext* c) { return c ? atomic_load(&c->errors) : atomic_load(&g_errors); }

int kvattn_context_threads(const KvContext* c) { return c->num_threads; }

// Sets the work below which a call runs on the calling thread alone (0: always share; tests and
// measurements); returns the previous value.
long kvattn_context_set_serial_work(KvContext* c, long work) {
  pthread_mutex_lock(&c->call);
  const long old = c->serial_work;
  c->serial_work = work < 0 ? 0 : work;
  pthread_mutex_unlock(&c->call);
  return old;
}

static int grow(void** p, size_t* cap, size_t bytes) {
  if (*cap >= bytes) return 1;
  void* n = NULL;
  if (posix_memalign(&n, 64, bytes) != 0) return 0;
  free(*p);
  *p = n;
  *cap = bytes;
  return 1;
}

// --- one call's arguments, shared by its work items ------------------------------------------------

typedef struct {
  const float* q;
  const float* k_new;
  const float* v_new;
  const void* key;
  const void* value;
  const float* mask;
  float* out;
  int fp16, K, G, B, S, D;
  float scale;
  const int32_t* index;  // [B, S]
  const int32_t* count;  // [B]
  float* scores;         // [threads, scores_stride]
  size_t scores_stride;
} KvCall;

// What a work item (head k, row b) reads, the same on both paths: the row's n included slots
// (idx), its mask row, whether its new token is included, its new key and value, and where
// head k's slots begin in the pool (in elements).
typedef struct {
  int n, with_new;
  const int32_t* idx;
  const float* mrow;
  const float* kn;
  const float* vn;
  size_t base;
} KvItem;

static inline KvItem item_of(const KvCall* c, int k, int b) {
  const int S = c->S, B = c->B, D = c->D;
  const float* mrow = c->mask + (size_t)b * (S + 1);
  const KvItem it = {.n = c->count[b], .with_new = mrow[S] >= KV_EXCLUDE, .idx = c->index + (size_t)b * S,
                     .mrow = mrow, .kn = c->k_new + ((size_t)k * B + b) * D, .vn = c->v_new + ((size_t)k * B + b) * D,
                     .base = (size_t)k * S * D};
  return it;
}

// --- portable path --------------------------------------------------------------------------------

static inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in fp32
    const float f = (float)man * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  if (exp == 31)
    bits = sign | 0x7f800000u | (man << 13);
  else
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

static inline float pool_at(const void* pool, int fp16, size_t i) {
  return fp16 ? half_to_float(((const uint16_t*)pool)[i]) : ((const float*)pool)[i];
}

// One (head k, row b) item: each of its G query rows in turn over the row's slots.
static void item_portable(const KvCall* c, int k, int b, float* sc) {
  const int D = c->D, S = c->S, B = c->B, G = c->G;
  const KvItem it = item_of(c, k, b);
  const int n = it.n, with_new = it.with_new;
  const int32_t* idx = it.idx;
  const float *mrow = it.mrow, *kn = it.kn, *vn = it.vn;
  const size_t base = it.base;
  for (int g = 0; g < G; g++) {
    const float* q = c->q + ((size_t)k * G * B + (size_t)g * B + b) * D;
    float* o = c->out + ((size_t)k * G * B + (size_t)g * B + b) * D;
    if (n == 0 && !with_new) {
      memset(o, 0, sizeof(float) * D);
      continue;
    }
    float m = -INFINITY;
    for (int j = 0; j < n; j++) {
      const size_t row = base + (size_t)idx[j] * D;
      float s = 0.f;
      for (int d = 0; d < D; d++) s += q[d] * pool_at(c->key, c->fp16, row + d);
      s = s * c->scale + mrow[idx[j]];
      sc[j] = s;
      m = s > m ? s : m;
    }
    float s_new = 0.f;
    if (with_new) {
      for (int d = 0; d < D; d++) s_new += q[d] * kn[d];
      s_new = s_new * c->scale + mrow[S];
      m = s_new > m ? s_new : m;
    }
    float sum = 0.f;
    memset(o, 0, sizeof(float) * D);
    for (int j = 0; j < n; j++) {
      const float w = expf(sc[j] - m);
      const size_t row = base + (size_t)idx[j] * D;
      sum += w;
      for (int d = 0; d < D; d++) o[d] += w * pool_at(c->value, c->fp16, row + d);
    }
    if (with_new) {
      const float w = expf(s_new - m);
      sum += w;
      for (int d = 0; d < D; d++) o[d] += w * vn[d];
    }
    const float inv = 1.0f / sum;
    for (int d = 0; d < D; d++) o[d] *= inv;
  }
}

// --- AVX2 + FMA + F16C path ----------------------------------------------------------------------

#if KV_X86
#define KV_FAST __attribute__((target("avx2,fma,f16c")))

// exp(x) for x <= 0 (scores minus their max): Cephes' polynomial, ~1 ulp.
static inline KV_FAST __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Eight pool elements as fp32.
static inline KV_FAST __m256 load8(const void* pool, int fp16, size_t i) {
  if (fp16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)pool + i)));
  return _mm256_loadu_ps((const float*)pool + i);
}

// {sum a, sum b, sum c, sum d}
static inline KV_FAST __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

static inline KV_FAST float hsum1(__m256 a) { return _mm_cvtss_f32(hsum4(a, a, a, a)); }

// Query rows g0 .. g0+G-1 of item (k, b) over the row's n slots and its new token. D is a
// multiple of 8 up to KV_MAX_D, G at most KV_MAX_G; inlined with constants for common shapes,
// so the accumulators stay in registers.
static inline KV_FAST void attend_fast(const KvCall* c, int k, int b, int g0, int G, int D, int fp16, float* sc) {
  const int DV = D / 8, S = c->S, B = c->B, GB = c->G * c->B;
  const KvItem it = item_of(c, k, b);
  const int n = it.n, with_new = it.with_new;
  const int32_t* idx = it.idx;
  const float *mrow = it.mrow, *kn = it.kn, *vn = it.vn;
  const size_t base = it.base;
  float* orows[KV_MAX_G];
  for (int g = 0; g < G; g++) orows[g] = c->out + ((size_t)k * GB + (size_t)(g0 + g) * B + b) * D;
  if (n == 0 && !with_new) {
    for (int g = 0; g < G; g++) memset(orows[g], 0, sizeof(float) * D);
    return;
  }
  // scores (scaled, masked) of the slots, then the new token's, and each query row's max
  float mx[KV_MAX_G], s_new[KV_MAX_G];
  for (int g = 0; g < G; g++) {
    const float* q = c->q + ((size_t)k * GB + (size_t)(g0 + g) * B + b) * D;
    float* s_out = sc + (size_t)g * n;
    __m256 qv[KV_MAX_D / 8];
    for (int v = 0; v < DV; v++) qv[v] = _mm256_mul_ps(_mm256_loadu_ps(q + 8 * v), _mm256_set1_ps(c->scale));
    __m128 vmax = _mm_set1_ps(-INFINITY);
    int j = 0;
    for (; j + 4 <= n; j += 4) {
      const size_t r0 = base + (size_t)idx[j] * D, r1 = base + (size_t)idx[j + 1] * D;
      const size_t r2 = base + (size_t)idx[j + 2] * D, r3 = base + (size_t)idx[j + 3] * D;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int v = 0; v < DV; v++) {
        a0 = _mm256_fmadd_ps(qv[v], load8(c->key, fp16, r0 + 8 * v), a0);
        a1 = _mm256_fmadd_ps(qv[v], load8(c->key, fp16, r1 + 8 * v), a1);
        a2 = _mm256_fmadd_ps(qv[v], load8(c->key, fp16, r2 + 8 * v), a2);
        a3 = _mm256_fmadd_ps(qv[v], load8(c->key, fp16, r3 + 8 * v), a3);
      }
      __m128 s4 = _mm_add_ps(hsum4(a0, a1, a2, a3),
                             _mm_setr_ps(mrow[idx[j]], mrow[idx[j + 1]], mrow[idx[j + 2]], mrow[idx[j + 3]]));
      _mm_storeu_ps(s_out + j, s4);
      vmax = _mm_max_ps(vmax, s4);
    }
    float t[4], m = -INFINITY;
    _mm_storeu_ps(t, vmax);
    for (int i = 0; i < 4; i++) m = t[i] > m ? t[i] : m;
    for (; j < n; j++) {
      const size_t r0 = base + (size_t)idx[j] * D;
      __m256 a0 = _mm256_setzero_ps();
      for (int v = 0; v < DV; v++) a0 = _mm256_fmadd_ps(qv[v], load8(c->key, fp16, r0 + 8 * v), a0);
      const float s = hsum1(a0) + mrow[idx[j]];
      s_out[j] = s;
      m = s > m ? s : m;
    }
    if (with_new) {
      __m256 a0 = _mm256_setzero_ps();
      for (int v = 0; v < DV; v++) a0 = _mm256_fmadd_ps(qv[v], _mm256_loadu_ps(kn + 8 * v), a0);
      s_new[g] = hsum1(a0) + mrow[S];
      m = s_new[g] > m ? s_new[g] : m;
    }
    mx[g] = m;
  }
  // weights exp(score - max) and their sums
  float inv[KV_MAX_G], w_new[KV_MAX_G];
  for (int g = 0; g < G; g++) {
    float* s = sc + (size_t)g * n;
    const __m256 vm = _mm256_set1_ps(mx[g]);
    __m256 vs = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= n; j += 8) {
      __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
      _mm256_storeu_ps(s + j, e);
      vs = _mm256_add_ps(vs, e);
    }
    float sum = hsum1(vs);
    for (; j < n; j++) {
      s[j] = expf(s[j] - mx[g]);
      sum += s[j];
    }
    w_new[g] = with_new ? expf(s_new[g] - mx[g]) : 0.f;
    inv[g] = 1.0f / (sum + w_new[g]);
  }
  // weighted values
  __m256 acc[KV_MAX_G][KV_MAX_D / 8];
  for (int g = 0; g < G; g++)
    for (int v = 0; v < DV; v++) acc[g][v] = _mm256_setzero_ps();
  for (int j = 0; j < n; j++) {
    const size_t r = base + (size_t)idx[j] * D;
    for (int v = 0; v < DV; v++) {
      const __m256 vv = load8(c->value, fp16, r + 8 * v);
      for (int g = 0; g < G; g++) acc[g][v] = _mm256_fmadd_ps(_mm256_set1_ps(sc[(size_t)g * n + j]), vv, acc[g][v]);
    }
  }
  for (int g = 0; g < G; g++) {
    const __m256 wn = _mm256_set1_ps(w_new[g]), vi = _mm256_set1_ps(inv[g]);
    for (int v = 0; v < DV; v++) {
      __m256 a = with_new ? _mm256_fmadd_ps(wn, _mm256_loadu_ps(vn + 8 * v), acc[g][v]) : acc[g][v];
      _mm256_storeu_ps(orows[g] + 8 * v, _mm256_mul_ps(a, vi));
    }
  }
}

static KV_FAST void item_fast(const KvCall* c, int k, int b, float* sc) {
  const int G = c->G, D = c->D;
  if (c->fp16) {
    if (D == 64 && G == 1) {
      attend_fast(c, k, b, 0, 1, 64, 1, sc);
      return;
    }
    if (D == 64 && G == 3) {
      attend_fast(c, k, b, 0, 3, 64, 1, sc);
      return;
    }
  } else {
    if (D == 64 && G == 1) {
      attend_fast(c, k, b, 0, 1, 64, 0, sc);
      return;
    }
    if (D == 64 && G == 3) {
      attend_fast(c, k, b, 0, 3, 64, 0, sc);
      return;
    }
  }
  for (int g0 = 0; g0 < G; g0 += KV_MAX_G) {
    const int gc = G - g0 < KV_MAX_G ? G - g0 : KV_MAX_G;
    if (D == 64 && c->fp16)
      attend_fast(c, k, b, g0, gc, 64, 1, sc);
    else if (D == 64)
      attend_fast(c, k, b, g0, gc, 64, 0, sc);
    else if (c->fp16)
      attend_fast(c, k, b, g0, gc, D, 1, sc);
    else
      attend_fast(c, k, b, g0, gc, D, 0, sc);
  }
}
#endif

// The included slots of one row (mask row m) into ix; returns how many.
static int row_index(const float* m, int S, int32_t* ix) {
  int n = 0;
  for (int s = 0; s < S; s++) {
    ix[n] = s;
    n += m[s] >= KV_EXCLUDE;
  }
  return n;
}

#if KV_X86
static KV_FAST int row_index_fast(const float* m, int S, int32_t* ix) {
  const __m256 threshold = _mm256_set1_ps(KV_EXCLUDE);
  int n = 0, s = 0;
  for (; s + 8 <= S; s += 8) {
    unsigned bits = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(m + s), threshold, _CMP_GE_OQ));
    for (; bits; bits &= bits - 1) ix[n++] = s + __builtin_ctz(bits);
  }
  for (; s < S; s++) {
    ix[n] = s;
    n += m[s] >= KV_EXCLUDE;
  }
  return n;
}
#endif

static void task_portable(void* arg, int item, int thread) {
  const KvCall* c = (const KvCall*)arg;
  item_portable(c, item / c->B, item % c->B, c->scores + (size_t)thread * c->scores_stride);
}

#if KV_X86
static void task_fast(void* arg, int item, int thread) {
  const KvCall* c = (const KvCall*)arg;
  item_fast(c, item / c->B, item % c->B, c->scores + (size_t)thread * c->scores_stride);
}
#endif

// --- the op over raw arrays --------------------------------------------------------------------

static int compute_locked(KvContext* ctx, KvCall* c) {
  const int K = c->K, G = c->G, B = c->B, S = c->S, D = c->D;
  if (K == 0 || G == 0 || B == 0 || D == 0) return kOk;  // nothing to compute (and out is empty)
  const size_t S1 = S > 0 ? (size_t)S : 1;
  if (!grow((void**)&ctx->index, &ctx->index_cap, sizeof(int32_t) * (size_t)B * S1) ||
      !grow((void**)&ctx->count, &ctx->count_cap, sizeof(int32_t) * (size_t)B))
    return kAllocFailure;
  // each row's included slots, and how much work the call is
  size_t total = 0;
  int nmax = 0;
  const int cpu_fast = kvattn_fast_path();
  const int fast = cpu_fast && D % 8 == 0 && D <= KV_MAX_D;
  for (int b = 0; b < B; b++) {
    const float* m = c->mask + (size_t)b * (S + 1);
    int32_t* ix = ctx->index + (size_t)b * S;
#if KV_X86
    const int n = cpu_fast ? row_index_fast(m, S, ix) : row_index(m, S, ix);
#else
    const int n = row_index(m, S, ix);
#endif
    ctx->count[b] = n;
    total += (size_t)n + 1;
    nmax = n > nmax ? n : nmax;
  }
  const size_t rows_per_pass = fast ? (G < KV_MAX_G ? G : KV_MAX_G) : 1;
  c->scores_stride = (rows_per_pass * (size_t)(nmax > 0 ? nmax : 1) + 15) & ~(size_t)15;
  const size_t work = total * (size_t)K * (size_t)G;
  int threads = work < (size_t)ctx->serial_work || K * B < 2 ? 1 : ctx->num_threads;
  if (!grow((void**)&ctx->scores, &ctx->scores_cap, sizeof(float) * c->scores_stride * (size_t)threads))
    return kAllocFailure;
  c->index = ctx->index;
  c->count = ctx->count;
  c->scores = ctx->scores;
  c->scale = 1.0f / sqrtf((float)D);
  KvTask task = task_portable;
#if KV_X86
  if (fast) task = task_fast;
#endif
  if (threads > 1 && ctx->pool && ctx->pool->fork_gen != atomic_load(&g_fork_gen))
    ctx->pool = NULL;  // inherited over fork(): its workers do not exist here
  if (threads > 1 && !ctx->pool) ctx->pool = pool_new(ctx->num_threads);
  const int items = K * B;
  if (threads > 1 && ctx->pool)
    pool_run(ctx->pool, task, c, items);
  else
    for (int i = 0; i < items; i++) task(c, i, 0);
  return kOk;
}

static int compute(KvContext* ctx, KvCall* c) {
  pthread_mutex_lock(&ctx->call);
  const int rc = compute_locked(ctx, c);
  pthread_mutex_unlock(&ctx->call);
  return rc;
}

// The op over raw C-contiguous arrays (shapes as in the header; pool_is_fp16: key and value are
// fp16, else fp32). Returns 0, or a LiteRT status after counting the error.
int kvattn_compute(KvContext* ctx, const float* q, const float* k_new, const float* v_new, const void* key,
                   const void* value, int pool_is_fp16, const float* mask, float* out, int K, int G, int B, int S,
                   int D) {
  if (!ctx || K < 0 || G < 0 || B < 0 || S < 0 || D < 0) {
    count_error(ctx);
    return kInvalidArgument;
  }
  KvCall c = {.q = q, .k_new = k_new, .v_new = v_new, .key = key, .value = value, .mask = mask, .out = out,
              .fp16 = pool_is_fp16 != 0, .K = K, .G = G, .B = B, .S = S, .D = D};
  const int rc = compute(ctx, &c);
  if (rc != kOk) count_error(ctx);
  return rc;
}

// --- LiteRT custom op callbacks ----------------------------------------------------------------

static LiteRtStatus op_init(void* user_data, const void* init_data, size_t init_data_size) {
  (void)user_data;
  (void)init_data;
  (void)init_data_size;
  return kOk;
}

static LiteRtStatus op_layouts(void* user_data, size_t num_inputs, const LiteRtLayout* in, size_t num_outputs,
                               LiteRtLayout* out) {
  if (num_inputs != 6 || num_outputs != 1 || in[0].rank != 3) {
    count_error((KvContext*)user_data);
    return kInvalidArgument;
  }
  out[0] = in[0];  // [K, G*B, D]
  out[0].has_strides = 0;
  return kOk;
}

static int dims_are(const LiteRtRankedTensorType* t, int d0, int d1, int d2) {
  return t->layout.rank == 3 && t->layout.dimensions[0] == d0 && t->layout.dimensions[1] == d1 &&
         t->layout.dimensions[2] == d2;
}

static size_t elements(const LiteRtRankedTensorType* t) {
  size_t n = 1;
  for (unsigned i = 0; i < t->layout.rank && i < LITERT_TENSOR_MAX_RANK; i++)
    n *= t->layout.dimensions[i] > 0 ? (size_t)t->layout.dimensions[i] : 0;
  return n;
}

static LiteRtStatus op_run(void* user_data, size_t num_inputs, const LiteRtTensorBuffer* inputs, size_t num_outputs,
                           LiteRtTensorBuffer* outputs) {
  KvContext* ctx = (KvContext*)user_data;
  if (!ctx || num_inputs != 6 || num_outputs != 1 || !g_get_host_memory || !g_get_tensor_type) {
    count_error(ctx);
    return kInvalidArgument;
  }
  void* ptr[7];
  LiteRtRankedTensorType t[7];
  for (int i = 0; i < 7; i++) {
    LiteRtTensorBuffer buf = i < 6 ? inputs[i] : outputs[0];
    if (g_get_host_memory(buf, &ptr[i]) != kOk || g_get_tensor_type(buf, &t[i]) != kOk) {
      count_error(ctx);
      return kRuntimeFailure;
    }
  }
  const LiteRtRankedTensorType *tq = &t[0], *tk = &t[1], *tv = &t[2], *tkey = &t[3], *tval = &t[4];
  const LiteRtRankedTensorType *tm = &t[5], *to = &t[6];
  const int32_t* qd = tq->layout.dimensions;
  const int K = qd[0], GB = qd[1], D = qd[2], B = tk->layout.dimensions[1], S = tkey->layout.dimensions[1];
  const int pool_type = tkey->element_type;
  int ok = tq->layout.rank == 3 && K >= 0 && GB >= 0 && D >= 0 && tq->element_type == kFloat32 &&
           tk->element_type == kFloat32 && tv->element_type == kFloat32 && tm->element_type == kFloat32 &&
           to->element_type == kFloat32 && (pool_type == kFloat16 || pool_type == kFloat32) &&
           tval->element_type == pool_type && tk->layout.rank == 3 && B >= 0 && dims_are(tk, K, B, D) &&
           dims_are(tv, K, B, D) && tkey->layout.rank == 3 && S >= 0 && S < INT32_MAX && dims_are(tkey, K, S, D) &&
           dims_are(tval, K, S, D) && dims_are(tm, 1, B, S + 1) && dims_are(to, K, GB, D) &&
           (B > 0 ? GB % B == 0 : GB == 0);
  if (!ok) {
    count_error(ctx);
    if (to->element_type == kFloat32 && ptr[6]) memset(ptr[6], 0, sizeof(float) * elements(to));
    return kInvalidArgument;
  }
  KvCall c = {.q = ptr[0], .k_new = ptr[1], .v_new = ptr[2], .key = ptr[3], .value = ptr[4], .mask = ptr[5],
              .out = ptr[6], .fp16 = pool_type == kFloat16, .K = K, .G = B > 0 ? GB / B : 0, .B = B, .S = S,
              .D = D};
  const int rc = compute(ctx, &c);
  if (rc != kOk) {
    count_error(ctx);
    memset(ptr[6], 0, sizeof(float) * elements(to));
  }
  return rc;
}

static LiteRtStatus op_destroy(void* user_data) {
  (void)user_data;  // shared by every node: the host frees it (kvattn_context_free)
  return kOk;
}

static const LiteRtCustomOpKernel kKernel = {op_init, op_layouts, op_run, op_destroy};

const LiteRtCustomOpKernel* kvattn_kernel(void) { return &kKernel; }

// --- float32 -> float16, for the host's writes into a float16 pool ------------------------------
//
// numpy converts float32 to float16 one value at a time (about 2.3 ns a value here): a 400-token
// prompt's keys and values took 10 ms of its prefill. Rounding is to nearest, ties to even, as
// numpy's (`astype(np.float16)`), so either writes the same bits.

static inline uint16_t float_to_half(float f) {  // F. Giesen's float_to_half_fast3_rtne
  const uint32_t f32_infinity = 255u << 23, f16_max = (127u + 16u) << 23;
  const uint32_t denorm_magic_bits = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t x;
  memcpy(&x, &f, sizeof x);
  const uint32_t sign = x & 0x80000000u;
  x ^= sign;
  uint16_t o;
  if (x >= f16_max) {
    o = x > f32_infinity ? 0x7e00 : 0x7c00;  // NaN, or too large: infinity
  } else if (x < (113u << 23)) {  // a float16 subnormal (or zero): rounded by a float add
    float fx, magic;
    memcpy(&fx, &x, sizeof fx);
    memcpy(&magic, &denorm_magic_bits, sizeof magic);
    fx += magic;
    uint32_t r;
    memcpy(&r, &fx, sizeof r);
    o = (uint16_t)(r - denorm_magic_bits);
  } else {
    const uint32_t mantissa_odd = (x >> 13) & 1u;
    x += ((uint32_t)(15 - 127) << 23) + 0xfffu;
    x += mantissa_odd;
    o = (uint16_t)(x >> 13);
  }
  return (uint16_t)(o | (sign >> 16));
}

static void to_half_portable(const float* src, uint16_t* dst, long n) {
  for (long i = 0; i < n; i++) dst[i] = float_to_half(src[i]);
}

#if KV_X86
KV_FAST static void to_half_fast(const float* src, uint16_t* dst, long n) {
  long i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128((__m128i*)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; i++) dst[i] = float_to_half(src[i]);
}
#endif

// Converts `blocks` runs of `block` floats, run b from src + b * src_stride to dst + b * dst_stride
// (strides in elements): a [K, n, D] slice of a [K, S, D] pool is K runs of n * D.
void kvattn_to_half(const float* src, long src_stride, uint16_t* dst, long dst_stride, long blocks, long block) {
#if KV_X86
  const int fast = kvattn_fast_path();
#endif
  for (long b = 0; b < blocks; b++) {
#if KV_X86
    if (fast) {
      to_half_fast(src + b * src_stride, dst + b * dst_stride, block);
      continue;
    }
#endif
    to_half_portable(src + b * src_stride, dst + b * dst_stride, block);
  }
}
