/*
 * work-queue: distribute work to loop threads with a queue plus doorbells.
 *
 * The producer (main) appends items to one mutex-protected queue and rings
 * the doorbell of an idle worker. A worker's doorbell handler takes items
 * until the queue is empty, then marks itself idle again, under the same
 * mutex, so no wake-up is ever lost: an item queued after a worker found
 * the queue empty finds that worker on the idle list and rings it.
 * Rings coalesce, and ringing a spinning evpoll loop costs no syscall.
 *
 * Each worker is a tevent loop, so it can serve other events (sockets,
 * timers) between items. (When each item is meant for one particular loop,
 * send it as an evproxy message instead: evproxy_send(), see
 * request-reply.c. evproxy_pool.h packages this pattern for blocking
 * functions.)
 *
 *   work-queue [workers] [items]
 *
 * smoke-args: 3 20000
 *
 * Copy freely.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <evpoll.h>
#include <evproxy.h>

#define MAX_WORKERS 64

struct item {
	struct item *next;
	uint64_t n;
};

struct worker;

/* The queue and the idle list, under one mutex. */
static struct {
	pthread_mutex_t lock;
	struct item *head, *tail;
	bool closing;			/* no more items: stop when empty */
	struct worker *idle[MAX_WORKERS];
	unsigned nidle;
} q = { .lock = PTHREAD_MUTEX_INITIALIZER };

struct worker {
	pthread_t thread;
	struct tevent_context *ev;
	struct evproxy_doorbell *db;
	struct evproxy_ringer *ringer;	/* rung by the producer */
	atomic_bool ready;
	uint64_t items, sum;		/* this worker's share */
};

/* The "work": something that costs a little CPU. */
static uint64_t work(uint64_t n)
{
	uint64_t h = n, i;

	for (i = 0; i < 100; i++) {
		h = h * 6364136223846793005ULL + 1442695040888963407ULL;
	}
	return h >> 32;
}

/* Worker loop: take items until the queue is empty. */
static void on_ring(struct tevent_context *ev, struct evproxy_doorbell *db,
		    uint64_t rings, void *private_data)
{
	struct worker *w = private_data;
	struct item *it;

	for (;;) {
		pthread_mutex_lock(&q.lock);
		it = q.head;
		if (it == NULL) {
			if (q.closing) {
				/* done: without events the loop ends */
				pthread_mutex_unlock(&q.lock);
				TALLOC_FREE(w->db);
				return;
			}
			q.idle[q.nidle++] = w;	/* ring me for more */
			pthread_mutex_unlock(&q.lock);
			return;
		}
		q.head = it->next;
		if (q.head == NULL) {
			q.tail = NULL;
		}
		pthread_mutex_unlock(&q.lock);

		w->sum += work(it->n);
		w->items++;
		free(it);
	}
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;

	w->ev = evpoll_context_init(NULL, NULL);
	if (w->ev == NULL) {
		exit(1);
	}
	w->db = evproxy_add_doorbell(w->ev, w->ev, on_ring, w);
	if (w->db == NULL) {
		exit(1);
	}
	w->ringer = evproxy_doorbell_ringer(w->db);
	if (w->ringer == NULL) {
		exit(1);
	}
	pthread_mutex_lock(&q.lock);
	q.idle[q.nidle++] = w;
	pthread_mutex_unlock(&q.lock);
	atomic_store(&w->ready, true);

	tevent_loop_wait(w->ev);	/* until on_ring freed the doorbell */
	talloc_free(w->ev);
	return NULL;
}

/* Producer side: queue an item, wake an idle worker if there is one. */
static void submit(uint64_t n)
{
	struct item *it = malloc(sizeof(*it));
	struct worker *w = NULL;

	if (it == NULL) {
		exit(1);
	}
	it->n = n;
	it->next = NULL;
	pthread_mutex_lock(&q.lock);
	if (q.tail != NULL) {
		q.tail->next = it;
	} else {
		q.head = it;
	}
	q.tail = it;
	if (q.nidle > 0) {
		w = q.idle[--q.nidle];
	}
	pthread_mutex_unlock(&q.lock);
	if (w != NULL) {
		evproxy_ringer_ring(w->ringer);	/* outside the lock */
	}
}

int main(int argc, char **argv)
{
	unsigned nworkers = argc > 1 ? (unsigned)strtoul(argv[1], NULL, 10) : 3;
	uint64_t nitems = argc > 2 ? strtoull(argv[2], NULL, 10) : 100000;
	struct worker workers[MAX_WORKERS] = { 0 };
	uint64_t i, items = 0, sum = 0, want = 0;
	unsigned k;

	if (nworkers == 0 || nworkers > MAX_WORKERS) {
		fprintf(stderr, "usage: work-queue [1..%d] [items]\n",
			MAX_WORKERS);
		return 2;
	}
	alarm(30);	/* never hang a test run */

	for (k = 0; k < nworkers; k++) {
		if (pthread_create(&workers[k].thread, NULL, worker_main,
				   &workers[k]) != 0) {
			return 1;
		}
	}
	for (k = 0; k < nworkers; k++) {
		while (!atomic_load(&workers[k].ready)) {
			usleep(100);
		}
	}

	for (i = 1; i <= nitems; i++) {
		submit(i);
	}

	/* shutdown: close the queue and wake everybody */
	pthread_mutex_lock(&q.lock);
	q.closing = true;
	q.nidle = 0;
	pthread_mutex_unlock(&q.lock);
	for (k = 0; k < nworkers; k++) {
		evproxy_ringer_ring(workers[k].ringer);
	}
	for (k = 0; k < nworkers; k++) {
		pthread_join(workers[k].thread, NULL);
		evproxy_ringer_unref(workers[k].ringer);
		printf("worker %u: %llu items\n", k,
		       (unsigned long long)workers[k].items);
		items += workers[k].items;
		sum += workers[k].sum;
	}

	/* every item exactly once: the count, and the sum of the results */
	for (i = 1; i <= nitems; i++) {
		want += work(i);
	}
	if (items != nitems || sum != want) {
		printf("FAILED: %llu items, sum %llu\n",
		       (unsigned long long)items, (unsigned long long)sum);
		return 1;
	}
	printf("%llu items done\n", (unsigned long long)items);
	return 0;
}
