/* A persistent pool of worker threads for the CPU kernels.
 *
 * ql_parallel_for splits [0, total) into chunks of `grain` items; the calling thread and the workers
 * take chunks from one atomic counter until none are left, then the call returns. Workers are
 * started on first use; between calls they spin briefly (the next call of a decode step finds them
 * awake), then sleep. Calls from several threads run one after another. */
#ifndef QL_POOL_H
#define QL_POOL_H

#include <stdint.h>

/* thread_index: 0 for the caller, 1..n_threads-1 for workers; lets a chunk use per-thread scratch. */
typedef void (*ql_chunk_fn)(void *context, int64_t begin, int64_t end, int thread_index);

/* Cores this process may run on (sched_getaffinity), at least 1. */
int ql_available_cores(void);

/* n_threads <= 0: ql_available_cores(). If a worker cannot be started, runs with fewer threads. */
void ql_parallel_for(int64_t total, int64_t grain, int n_threads, ql_chunk_fn fn, void *context);

#endif
