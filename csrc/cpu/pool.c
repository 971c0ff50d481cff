/* The worker pool of pool.h.
 *
 * Why a pool and not threads per call: a SmolLM2 decode step makes ~210 qmatmul calls of tens of
 * microseconds each; starting threads costs tens of microseconds per call, waking a sleeping one a few.
 *
 * Why the caller never waits for a worker to wake up: on a loaded machine (this one is shared) a
 * woken thread may not run for milliseconds. Chunks are handed out from one atomic ticket, and
 * the caller takes chunks itself from the start; it then waits only for chunks that some thread
 * has actually begun. A worker that wakes late finds no chunk left and goes back to sleep.
 * The ticket holds the job's generation in its high 32 bits, so a worker still holding an old
 * job's arguments can never take a chunk of a newer job.
 *
 * Why chunks shrink (guided self-scheduling): a chunk is 1 / (4 x threads) of the grains left, at
 * least one grain, so the first ones are as large as the fixed chunks before (few hand-offs) and
 * the last ones one grain each. With fixed chunks of 1 / (4 x threads) of the rows (until issue
 * 12's sixth round), a thread that ran a little slower, or started late, left the other alone for
 * up to a whole chunk at the end: an eighth of a two-thread call, in which an M = 1 call reads
 * DRAM at one thread's rate. (1 / (2 x threads) would hand out fewer, larger first chunks, and a
 * thread preempted in one of them, as happens on a loaded machine, holds up the call longer.)
 *
 * Why a worker spins a little before it sleeps: a decode step's calls come one after another with
 * tens of microseconds of Python between them, and a worker woken through the condition variable
 * arrives after a call of that size is over (the caller has taken every chunk), so two threads ran
 * a SmolLM2 call barely faster than one. After a job a worker watches `posted` for IDLE_SPIN_SECONDS
 * before it sleeps, so the next call of a step finds it awake (llama.cpp's workers spin likewise). */
#define _GNU_SOURCE
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#define QL_MAX_THREADS 256

typedef struct {
    ql_chunk_fn fn;
    void *context;
    int64_t total, grain;
    uint32_t grains;       /* ceil(total / grain): what the ticket counts */
    uint32_t split;        /* a chunk takes (grains left) / split grains, at least one */
    uint32_t generation;
} ql_job;

typedef struct {
    pthread_mutex_t lock;        /* guards job, generation, wanted, n_workers */
    pthread_cond_t work_ready;   /* a new job was posted */
    pthread_mutex_t call_lock;   /* one ql_parallel_for at a time */
    int n_workers;               /* threads started besides the caller */
    int wanted;                  /* workers (by index) that take part in the current job */
    ql_job job;
    _Atomic uint64_t ticket;     /* generation << 32 | next grain */
    _Atomic uint32_t completed;  /* grains of the current job finished */
    _Atomic uint32_t posted;     /* generation of the newest job, read by spinning workers */
    pthread_cond_t job_done;     /* the caller sleeps on it while a worker ends a long-running chunk */
    _Atomic int caller_sleeping;
} ql_pool;

static ql_pool pool = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .work_ready = PTHREAD_COND_INITIALIZER,
    .call_lock = PTHREAD_MUTEX_INITIALIZER,
    .job_done = PTHREAD_COND_INITIALIZER,
};

int ql_available_cores(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int count = CPU_COUNT(&set);
        if (count > 0) return count;
    }
    return 1;
}

static double seconds_now(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + 1e-9 * (double)now.tv_nsec;
}

/* Runs chunks of `job` until none is left or a newer job has replaced it; returns how long the
 * last chunk this thread ran took (0: none). A worker that ends the job's last running chunk wakes
 * the caller if it sleeps (wait_for_running_chunks). */
static double run_chunks(const ql_job *job, int thread_index) {
    double last_chunk_seconds = 0.0;
    uint64_t ticket = atomic_load(&pool.ticket);
    for (;;) {
        const uint32_t first = (uint32_t)ticket;
        if ((uint32_t)(ticket >> 32) != job->generation || first >= job->grains) return last_chunk_seconds;
        uint32_t take = (job->grains - first) / job->split;
        if (take < 1) take = 1;
        if (!atomic_compare_exchange_weak(&pool.ticket, &ticket, ticket + take)) continue;
        const int64_t begin = (int64_t)first * job->grain;
        const int64_t end = begin + take * job->grain < job->total ? begin + take * job->grain : job->total;
        const double start = seconds_now();
        job->fn(job->context, begin, end, thread_index);
        last_chunk_seconds = seconds_now() - start;
        /* sequentially consistent, as is the caller's store of caller_sleeping before it reads
         * `completed`: one of the two sees the other's write, so the caller is never left asleep */
        if (atomic_fetch_add(&pool.completed, take) + take == job->grains && thread_index != 0 &&
            atomic_load(&pool.caller_sleeping)) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_broadcast(&pool.job_done);
            pthread_mutex_unlock(&pool.lock);
        }
        ticket = atomic_load(&pool.ticket);
    }
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* How long an idle worker watches for the next job before it sleeps: longer than the gap between
 * two calls of a decode step (the Python between them), short enough that a pool left idle stops
 * taking a core at once. */
#define IDLE_SPIN_SECONDS 3e-4

/* Spins until a job newer than `seen` is posted or IDLE_SPIN_SECONDS pass (then it sleeps). */
static void spin_for_next_job(uint32_t seen) {
    const double give_up = seconds_now() + IDLE_SPIN_SECONDS;
    for (unsigned spins = 1; atomic_load_explicit(&pool.posted, memory_order_acquire) == seen; ++spins) {
        cpu_relax();
        if (spins % 256 == 0 && seconds_now() > give_up) return;
    }
}

static void *worker_main(void *arg) {
    const int index = (int)(intptr_t)arg;
    uint32_t seen = 0;
    int took_part = 0;  /* in the last job: only then spin for the next (a worker a small call left out sleeps) */
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        if (took_part && pool.job.generation == seen) {
            pthread_mutex_unlock(&pool.lock);
            spin_for_next_job(seen);
            pthread_mutex_lock(&pool.lock);
        }
        while (pool.job.generation == seen) pthread_cond_wait(&pool.work_ready, &pool.lock);
        seen = pool.job.generation;
        took_part = index < pool.wanted;
        if (!took_part) continue;  /* this job asked for fewer threads */
        const ql_job job = pool.job;         /* a snapshot: the caller may post the next job meanwhile */
        pthread_mutex_unlock(&pool.lock);
        run_chunks(&job, index + 1);
        pthread_mutex_lock(&pool.lock);
    }
    return NULL;
}

/* A forked child has none of the parent's workers (e.g. a conversion's process pool): forget them,
 * and reset the locks, which the fork may have copied while held. */
static void forget_workers_after_fork(void) {
    pthread_mutex_init(&pool.lock, NULL);
    pthread_mutex_init(&pool.call_lock, NULL);
    pthread_cond_init(&pool.work_ready, NULL);
    pthread_cond_init(&pool.job_done, NULL);
    pool.n_workers = 0;
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

/* Only chunks that a worker has begun are left. A chunk normally ends within about as long as the
 * caller's own last chunk took (chunks shrink, so the worker's is no larger by more than a grain):
 * spin that long, twice over, plus SPIN_EXTRA_SECONDS, which also covers a worker interrupted
 * briefly. Yielding or sleeping at once would hand this core to another process for a time slice
 * (on the shared 2-core machine, a 2 ms GEMV then took 12 ms of wall time). A worker still busy
 * after that was preempted in its chunk (issue 12, seventh round: in an M = 1 loop, 1 call in 10
 * took 4 ms or more instead of 0.5, the caller spinning while the worker waited for a core): the
 * caller then sleeps until the worker wakes it, so its core goes idle and the scheduler can move
 * the waiting worker onto it instead of leaving it queued behind another process until that
 * one's time slice ends (before, the caller spun for 2 ms, then yielded, keeping its core busy).
 * Waking a sleeping thread costs 10-35 us here. */
#define SPIN_EXTRA_SECONDS 5e-4

static void wait_for_running_chunks(uint32_t grains, double last_chunk_seconds) {
    if (atomic_load(&pool.completed) == grains) return;
    const double give_up = seconds_now() + SPIN_EXTRA_SECONDS + 2.0 * last_chunk_seconds;
    for (unsigned spins = 1; atomic_load_explicit(&pool.completed, memory_order_acquire) < grains; ++spins) {
        cpu_relax();
        if (spins % 256 == 0 && seconds_now() > give_up) break;
    }
    if (atomic_load(&pool.completed) == grains) return;
    pthread_mutex_lock(&pool.lock);
    atomic_store(&pool.caller_sleeping, 1);
    while (atomic_load(&pool.completed) < grains) pthread_cond_wait(&pool.job_done, &pool.lock);
    atomic_store(&pool.caller_sleeping, 0);
    pthread_mutex_unlock(&pool.lock);
}

void ql_parallel_for(int64_t total, int64_t grain, int n_threads, ql_chunk_fn fn, void *context) {
    if (total <= 0) return;
    if (grain < 1) grain = 1;
    if (n_threads <= 0) n_threads = ql_available_cores();
    if (n_threads > QL_MAX_THREADS) n_threads = QL_MAX_THREADS;
    const int64_t grains = (total + grain - 1) / grain;
    int helpers = (int)(grains < n_threads ? grains : n_threads) - 1;
    if (helpers <= 0 || grains > UINT32_MAX) {
        fn(context, 0, total, 0);  /* one chunk or one thread: no hand-off at all */
        return;
    }

    pthread_mutex_lock(&pool.call_lock);
    pthread_mutex_lock(&pool.lock);
    start_workers(helpers);
    if (pool.n_workers < helpers) helpers = pool.n_workers;  /* a thread failed to start: run with fewer */
    const ql_job job = {fn, context, total, grain, (uint32_t)grains, 4 * (uint32_t)(helpers + 1), pool.job.generation + 1};
    pool.job = job;
    pool.wanted = helpers;
    atomic_store(&pool.completed, 0);
    atomic_store(&pool.ticket, (uint64_t)job.generation << 32);
    atomic_store_explicit(&pool.posted, job.generation, memory_order_release);
    pthread_cond_broadcast(&pool.work_ready);
    pthread_mutex_unlock(&pool.lock);

    const double last_chunk_seconds = run_chunks(&job, 0);
    wait_for_running_chunks(job.grains, last_chunk_seconds);
    pthread_mutex_unlock(&pool.call_lock);
}
