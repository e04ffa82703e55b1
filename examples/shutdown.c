/*
 * shutdown: stop N event-loop threads with doorbells.
 *
 * Each thread runs a tevent loop with some work on it (a periodic timer)
 * and a "stop" doorbell. A SIGTERM/SIGINT handler rings every thread's
 * doorbell (ringing is async-signal-safe); each loop then removes its own
 * events, so tevent_loop_wait() returns and the thread ends. No flag
 * polling, no pipe per thread, no pthread_cancel().
 *
 *   shutdown [nthreads]
 *
 * For the smoke test the program sends itself SIGTERM once every loop has
 * done some work; run it without that line (see main) and press Ctrl-C.
 *
 * smoke-args: 4
 *
 * Copy freely.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <evpoll.h>
#include <evproxy.h>

#define MAX_THREADS 64

struct loop_thread {
	pthread_t thread;
	struct tevent_context *ev;
	struct tevent_timer *tick;	/* the loop's "work" */
	struct evproxy_doorbell *stop;
	struct evproxy_ringer *ringer;	/* for other threads */
	atomic_uint ticks;
	atomic_bool ready;
};

static struct loop_thread threads[MAX_THREADS];
static unsigned nthreads;

/*
 * Ringers are the handles other threads (and signal handlers) ring through;
 * they stay valid after the doorbell is gone (a ring then returns
 * ECANCELED), so the signal handler never touches freed memory.
 */
static struct evproxy_ringer *ringers[MAX_THREADS];
static atomic_uint nringers;

static void on_signal(int sig)
{
	unsigned i, n = atomic_load(&nringers);

	for (i = 0; i < n; i++) {
		evproxy_ringer_ring(ringers[i]);	/* async-signal-safe */
	}
}

/* The loop's work: a timer every millisecond. */
static void on_tick(struct tevent_context *ev, struct tevent_timer *te,
		    struct timeval now, void *private_data)
{
	struct loop_thread *t = private_data;

	atomic_fetch_add(&t->ticks, 1);
	t->tick = tevent_add_timer(ev, ev, tevent_timeval_current_ofs(0, 1000),
				   on_tick, t);
}

/* On the loop's own thread: remove every event, so the loop ends. */
static void on_stop(struct tevent_context *ev, struct evproxy_doorbell *db,
		    uint64_t rings, void *private_data)
{
	struct loop_thread *t = private_data;

	TALLOC_FREE(t->tick);
	TALLOC_FREE(t->stop);	/* allowed from inside its own handler */
}

static void *loop_main(void *arg)
{
	struct loop_thread *t = arg;
	sigset_t all;

	/* signals go to the main thread, whose handler rings the doorbells */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);

	/* evpoll: a spinning loop sees a ring without a syscall */
	t->ev = evpoll_context_init(NULL, NULL);
	if (t->ev == NULL) {
		perror("evpoll_context_init");
		exit(1);
	}
	t->stop = evproxy_add_doorbell(t->ev, t->ev, on_stop, t);
	if (t->stop == NULL) {
		perror("evproxy_add_doorbell");
		exit(1);
	}
	/* taken on the owner thread; main publishes it for the handler */
	t->ringer = evproxy_doorbell_ringer(t->stop);
	if (t->ringer == NULL) {
		exit(1);
	}
	t->tick = tevent_add_timer(t->ev, t->ev, tevent_timeval_current(),
				   on_tick, t);
	if (t->tick == NULL) {
		exit(1);
	}
	atomic_store(&t->ready, true);

	tevent_loop_wait(t->ev);	/* returns once on_stop ran */

	talloc_free(t->ev);
	return NULL;
}

int main(int argc, char **argv)
{
	struct sigaction sa;
	unsigned i;

	nthreads = argc > 1 ? (unsigned)strtoul(argv[1], NULL, 10) : 4;
	if (nthreads == 0 || nthreads > MAX_THREADS) {
		fprintf(stderr, "usage: shutdown [1..%d]\n", MAX_THREADS);
		return 2;
	}
	alarm(30);	/* never hang a test run */

	for (i = 0; i < nthreads; i++) {
		if (pthread_create(&threads[i].thread, NULL, loop_main,
				   &threads[i]) != 0) {
			return 1;
		}
	}
	/* wait until each loop is set up, then publish its ringer */
	for (i = 0; i < nthreads; i++) {
		while (!atomic_load(&threads[i].ready)) {
			usleep(100);
		}
		ringers[i] = threads[i].ringer;
	}
	atomic_store(&nringers, nthreads);

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	/* smoke test: let every loop work a little, then stop them all */
	for (i = 0; i < nthreads; i++) {
		while (atomic_load(&threads[i].ticks) < 3) {
			usleep(1000);
		}
	}
	raise(SIGTERM);

	for (i = 0; i < nthreads; i++) {
		pthread_join(threads[i].thread, NULL);
		evproxy_ringer_unref(ringers[i]);
	}
	for (i = 0; i < nthreads; i++) {
		printf("thread %u: %u ticks\n", i,
		       atomic_load(&threads[i].ticks));
	}
	printf("%u loops stopped\n", nthreads);
	return 0;
}
