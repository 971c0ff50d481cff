/* The worker pool of pool.h: one mutex, two condition variables, an atomic chunk counter.
 *
 * Why a pool and not threads per call: a SmolLM2 decode step makes ~210 qmatmul calls of ~50 us
 * each; starting threads costs tens of microseconds per call, waking a sleeping worker a few. */
#define _GNU_SOURCE
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#define QL_MAX_THREADS 256

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t work_ready;   /* a new job (generation changed) */
    pthread_cond_t work_done;    /* the last busy worker left the job */
    pthread_mutex_t call_lock;   /* one ql_parallel_for at a time */
    int n_workers;               /* threads started besides the caller */
    uint64_t generation;         /* bumped once per job */
    int wanted;                  /* workers that take part in the current job */
    int busy;                    /* workers still inside the current job */
    /* the current job */
    ql_chunk_fn fn;
    void *context;
    int64_t total, grain;
    atomic_int_fast64_t next;
} ql_pool;

static ql_pool pool = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .work_ready = PTHREAD_COND_INITIALIZER,
    .work_done = PTHREAD_COND_INITIALIZER,
    .call_lock = PTHREAD_MUTEX_INITIALIZER,
};

int ql_available_cores(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int count = CPU_COUNT(&set);
        if (count > 0) return count;
    }
    return 1;
}

static void run_chunks(int thread_index) {
    for (;;) {
        int64_t begin = atomic_fetch_add(&pool.next, pool.grain);
        if (begin >= pool.total) return;
        int64_t end = begin + pool.grain < pool.total ? begin + pool.grain : pool.total;
        pool.fn(pool.context, begin, end, thread_index);
    }
}

static void *worker_main(void *arg) {
    const int index = (int)(intptr_t)arg;
    uint64_t seen = 0;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        while (pool.generation == seen) pthread_cond_wait(&pool.work_ready, &pool.lock);
        seen = pool.generation;
        if (index >= pool.wanted) continue;  /* this job asked for fewer threads */
        pthread_mutex_unlock(&pool.lock);
        run_chunks(index + 1);
        pthread_mutex_lock(&pool.lock);
        if (--pool.busy == 0) pthread_cond_signal(&pool.work_done);
    }
    return NULL;
}

/* A forked child has none of the parent's workers (e.g. a conversion's process pool): forget them,
 * and reset the locks, which the fork may have copied while held. */
static void forget_workers_after_fork(void) {
    pthread_mutex_init(&pool.lock, NULL);
    pthread_mutex_init(&pool.call_lock, NULL);
    pthread_cond_init(&pool.work_ready, NULL);
    pthread_cond_init(&pool.work_done, NULL);
    pool.n_workers = 0;
    pool.generation = 0;
    pool.busy = 0;
}

static void start_workers(int count) {
    static int fork_handler_installed = 0;
    if (!fork_handler_installed) {
        pthread_atfork(NULL, NULL, forget_workers_after_fork);
        fork_handler_installed = 1;
    }
    while (pool.n_workers < count) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&thread, &attr, worker_main, (void *)(intptr_t)pool.n_workers);
        pthread_attr_destroy(&attr);
        if (failed) return;
        pool.n_workers++;
    }
}

void ql_parallel_for(int64_t total, int64_t grain, int n_threads, ql_chunk_fn fn, void *context) {
    if (total <= 0) return;
    if (grain < 1) grain = 1;
    if (n_threads <= 0) n_threads = ql_available_cores();
    if (n_threads > QL_MAX_THREADS) n_threads = QL_MAX_THREADS;
    int64_t chunks = (total + grain - 1) / grain;
    int helpers = (int)(chunks < n_threads ? chunks : n_threads) - 1;
    if (helpers <= 0) {
        fn(context, 0, total, 0);  /* one chunk or one thread: no hand-off at all */
        return;
    }

    pthread_mutex_lock(&pool.call_lock);
    pthread_mutex_lock(&pool.lock);
    start_workers(helpers);
    if (pool.n_workers < helpers) helpers = pool.n_workers;  /* a thread failed to start: run with fewer */
    pool.fn = fn;
    pool.context = context;
    pool.total = total;
    pool.grain = grain;
    atomic_store(&pool.next, 0);
    pool.wanted = helpers;
    pool.busy = helpers;
    pool.generation++;
    pthread_cond_broadcast(&pool.work_ready);
    pthread_mutex_unlock(&pool.lock);

    run_chunks(0);

    pthread_mutex_lock(&pool.lock);
    while (pool.busy > 0) pthread_cond_wait(&pool.work_done, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool.call_lock);
}
