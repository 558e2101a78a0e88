/* Work shared with helper threads on cores the executor borrows from the other services.
 *
 * `pagedserve up` on a CPU machine pins the executor to every core but the last and the gateway,
 * scheduler, tokenizer and Redis to the last one, which they keep busy only part of each step.
 * A helper thread on that core takes a share of the executor's decode attention and linears.
 * Not with OpenMP: a team's barrier waits for every thread, so a step would stall whenever a
 * service held the helper's core (measured: two torch threads per decode step made served decodes
 * slower, not faster). Here the caller and the helpers take items one at a time from one atomic
 * counter; a helper that is not running takes none, and the caller waits only for the items a
 * helper has begun.
 *
 * The claim word holds the generation (a call), the number of items and the next item; a helper
 * reads the call's job, then claims with a compare-and-swap that fails if that call has ended, so
 * it never runs an item of a finished call. Idle helpers spin briefly (a forward's calls come
 * tens of microseconds apart), then sleep on a futex.
 */
#define _GNU_SOURCE
#include "core_share.h"

#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_ITEMS 0xFFFF
#define SPIN_NS 50000 /* how long an idle helper looks for the next call before it sleeps */
#define HELPER_NICE 19

typedef void (*item_fn)(void *ctx, int64_t i);

struct helper_pool {
    _Atomic uint64_t claim;   /* generation << 32 | items << 16 | next item */
    _Atomic int64_t done;     /* items of this generation the helpers have finished */
    _Atomic uint32_t wake;    /* futex word, bumped with each generation */
    _Atomic int sleepers;     /* helpers asleep on `wake`, or about to be */
    _Atomic int stop;
    _Atomic(uintptr_t) fn;    /* the generation's job, stored before its claim word */
    _Atomic(uintptr_t) ctx;
    uint32_t gen;             /* the caller's: the last generation published */
    int num_threads;
    _Atomic int tids[64];     /* each helper's kernel thread id, once it runs (0 before) */
    pthread_t threads[];
};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* the next unclaimed item of generation `gen`, or -1 when there is none (or `gen` has ended) */
static int64_t claim_item(helper_pool *p, uint32_t gen) {
    uint64_t c = atomic_load_explicit(&p->claim, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(c >> 32) != gen || (c & 0xFFFF) >= ((c >> 16) & 0xFFFF)) return -1;
        if (atomic_compare_exchange_weak_explicit(&p->claim, &c, c + 1, memory_order_acq_rel, memory_order_acquire))
            return (int64_t)(c & 0xFFFF);
    }
}

typedef struct {
    helper_pool *pool;
    int index;
} start_args;

static void *helper_main(void *arg) {
    start_args args = *(start_args *)arg;
    free(arg);
    helper_pool *p = args.pool;
#ifdef _OPENMP
    omp_set_num_threads(1); /* MKL called here runs on this thread alone (a new thread's default is every core) */
#endif
    /* The lowest priority: a service that wakes on this core takes it at once, so the stack's
     * token path is not slowed (at nice 0 the bundled model's served throughput fell ~10%); the
     * helper takes items in the gaps. One preempted mid-item holds the caller until it runs again
     * (the services' bursts are short: measured, nice 19 lost little of nice 0's gain). */
    setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), HELPER_NICE);
    atomic_store(&p->tids[args.index], (int)syscall(SYS_gettid));
    while (!atomic_load(&p->stop)) {
        const uint64_t c = atomic_load_explicit(&p->claim, memory_order_acquire);
        const uint32_t gen = (uint32_t)(c >> 32);
        /* this generation's job; claim_item's compare-and-swap fails unless it is still current */
        const item_fn fn = (item_fn)atomic_load_explicit(&p->fn, memory_order_relaxed);
        void *ctx = (void *)atomic_load_explicit(&p->ctx, memory_order_relaxed);
        for (int64_t i; (i = claim_item(p, gen)) >= 0;) {
            fn(ctx, i);
            atomic_fetch_add_explicit(&p->done, 1, memory_order_release);
        }
        const int64_t until = now_ns() + SPIN_NS;
        int spins = 0;
        while ((uint32_t)(atomic_load_explicit(&p->claim, memory_order_acquire) >> 32) == gen && !atomic_load(&p->stop)) {
            cpu_relax();
            if (++spins % 64 == 0 && now_ns() > until) {
                atomic_fetch_add(&p->sleepers, 1);
                const uint32_t w = atomic_load(&p->wake);
                if ((uint32_t)(atomic_load(&p->claim) >> 32) == gen && !atomic_load(&p->stop))
                    syscall(SYS_futex, &p->wake, FUTEX_WAIT_PRIVATE, w, NULL, NULL, 0);
                atomic_fetch_sub(&p->sleepers, 1);
            }
        }
    }
    return NULL;
}

static void wake_all(helper_pool *p) {
    atomic_fetch_add(&p->wake, 1);
    if (atomic_load(&p->sleepers) > 0) syscall(SYS_futex, &p->wake, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

void pagedserve_share(helper_pool *p, void (*fn)(void *ctx, int64_t i), void *ctx, int64_t n) {
    if (p == NULL || n <= 1 || n > MAX_ITEMS) {
        for (int64_t i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    const uint32_t gen = ++p->gen;
    atomic_store_explicit(&p->fn, (uintptr_t)fn, memory_order_relaxed);
    atomic_store_explicit(&p->ctx, (uintptr_t)ctx, memory_order_relaxed);
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    atomic_store(&p->claim, (uint64_t)gen << 32 | (uint64_t)n << 16); /* publishes the job */
    wake_all(p);
    int64_t mine = 0;
    for (int64_t i; (i = claim_item(p, gen)) >= 0; mine++) fn(ctx, i);
    while (atomic_load_explicit(&p->done, memory_order_acquire) < n - mine) cpu_relax();
}

/* Starts `num_threads` helpers allowed on `cpus` (none: anywhere); NULL on failure. */
helper_pool *pagedserve_helpers_start(int num_threads, const int *cpus, int num_cpus) {
    if (num_threads < 1 || num_threads > 64) return NULL;
    helper_pool *p = calloc(1, sizeof(helper_pool) + sizeof(pthread_t) * (size_t)num_threads);
    if (p == NULL) return NULL;
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int i = 0; i < num_cpus; i++) CPU_SET(cpus[i], &set);
    for (int t = 0; t < num_threads; t++) {
        start_args *args = malloc(sizeof(start_args));
        pthread_attr_t attr;
        int failed = args == NULL || pthread_attr_init(&attr) != 0;
        if (!failed) {
            *args = (start_args){p, t};
            if (num_cpus > 0) pthread_attr_setaffinity_np(&attr, sizeof(set), &set);
            failed = pthread_create(&p->threads[t], &attr, helper_main, args) != 0;
            pthread_attr_destroy(&attr);
        }
        if (failed) {
            free(args);
            p->num_threads = t;
            pagedserve_helpers_stop(p);
            return NULL;
        }
        p->num_threads = t + 1;
    }
    return p;
}

/* The kernel thread ids of the helpers, waiting until each has started; returns how many. */
int pagedserve_helpers_tids(helper_pool *p, int *out, int max) {
    int n = p->num_threads < max ? p->num_threads : max;
    for (int t = 0; t < n; t++) {
        while (atomic_load(&p->tids[t]) == 0) sched_yield();
        out[t] = atomic_load(&p->tids[t]);
    }
    return n;
}

void pagedserve_helpers_stop(helper_pool *p) {
    if (p == NULL) return;
    atomic_store(&p->stop, 1);
    wake_all(p);
    for (int t = 0; t < p->num_threads; t++) pthread_join(p->threads[t], NULL);
    free(p);
}

/* C[:, slices] = A @ B_s for each packed column slice s of a weight (MKL's cblas_sgemm_compute,
 * row-major, B packed, beta 0), the slices shared out. `compute` is MKL's function; A is m x k
 * (row stride k), C is m x n (row stride n), slice s covers columns starts[s] .. starts[s + 1]. */
typedef void (*sgemm_compute_fn)(int, int, int, int, int, int, const float *, int, const float *, int, float, float *,
                                 int);
typedef struct {
    sgemm_compute_fn compute;
    const float *a;
    const float *const *packed;
    const int64_t *starts;
    float *c;
    int m, n, k;
} gemm_job;

static void gemm_slice(void *ctx, int64_t s) {
    const gemm_job *j = ctx;
    const int64_t c0 = j->starts[s];
    /* 101 row-major, 111 no transpose, 151 packed */
    j->compute(101, 111, 151, j->m, (int)(j->starts[s + 1] - c0), j->k, j->a, j->k, j->packed[s], j->k, 0.0f,
               j->c + c0, j->n);
}

void pagedserve_sgemm_slices(helper_pool *p, void *compute, int m, int n, int k, const float *a,
                             const float *const *packed, const int64_t *starts, int64_t num_slices, float *c) {
    gemm_job job = {(sgemm_compute_fn)compute, a, packed, starts, c, m, n, k};
    pagedserve_share(p, gemm_slice, &job, num_slices);
}
