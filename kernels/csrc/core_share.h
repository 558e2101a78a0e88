/* Work shared with helper threads on cores the executor borrows (see core_share.c). */
#ifndef PAGEDSERVE_CORE_SHARE_H
#define PAGEDSERVE_CORE_SHARE_H

#include <stdint.h>

typedef struct helper_pool helper_pool;

/* Runs fn(ctx, i) for every i < n: the caller takes items one at a time, and so do the pool's
 * helpers that are awake; returns when all are done (every item runs exactly once). With
 * pool == NULL, or n == 1, the caller runs them all. Not reentrant: one caller at a time. */
void pagedserve_share(helper_pool *pool, void (*fn)(void *ctx, int64_t i), void *ctx, int64_t n);

/* Starts `num_threads` helper threads allowed on `cpus` (num_cpus == 0: anywhere); NULL on failure. */
helper_pool *pagedserve_helpers_start(int num_threads, const int *cpus, int num_cpus);
int pagedserve_helpers_tids(helper_pool *pool, int *out, int max);
void pagedserve_helpers_stop(helper_pool *pool);

#endif
