/*
 * evproxy-bench: evproxy throughput rows, on the tput.c harness.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "bench_tput.h"
#include "evpoll.h"
#include "evproxy.h"

#define PREALLOC_CAPACITY 65536

struct evx {
	bool evpoll;
	size_t capacity;	/* 0: unbounded (the default) */
	struct evproxy *p;
	struct evproxy_sender *s;
	void *keep;		/* prealloc: where the handler keeps messages */
	struct evproxy_stats stats;	/* of the last run */
	uint64_t wakeups, messages;	/* summed over runs, see evx_after */
};

static struct evx evx_epoll = { .evpoll = false };
static struct evx evx_evpoll = { .evpoll = true };
/*
 * Transport only: no allocation in the timed part, so a bounded queue (an
 * unbounded one allocates ring memory as it grows, and with millions of
 * messages outstanding its page faults dominate).
 */
static struct evx evx_evpoll_pre = { .evpoll = true,
				     .capacity = PREALLOC_CAPACITY };
static struct evx evx_evpoll_4p = { .evpoll = true };

static void evx_setup(struct tput *t)
{
	struct evx *x = t->mech;
	struct evproxy_config cfg;

	t->ev = x->evpoll ? evpoll_context_init(NULL, NULL) :
		tevent_context_init_byname(NULL, "epoll");
	if (t->ev == NULL) {
		abort();
	}
	evproxy_config_default(&cfg);
	cfg.capacity = x->capacity;
	x->p = evproxy_create(t->ev, t->ev, &cfg);
	x->s = evproxy_sender(x->p);
	x->keep = talloc_new(t->ev);
	if (x->p == NULL || x->s == NULL || x->keep == NULL) {
		abort();
	}
}

static void evx_consume(struct tput *t)
{
	while (t->received < t->n) {
		tevent_loop_once(t->ev);
	}
}

static void evx_teardown(struct tput *t)
{
	struct evx *x = t->mech;

	evproxy_get_stats(x->p, &x->stats);
	evproxy_sender_unref(x->s);
	TALLOC_FREE(t->ev);
}

static void count_handler(struct tevent_context *ev, void *msg,
			  void *private_data)
{
	struct tput *t = private_data;

	t->received++;	/* the message is freed when we return */
}

static void send_or_die(struct evproxy_sender *s, evproxy_msg_handler_t fn,
			void *private_data, void *pmsg)
{
	int ret = evproxy_send(s, fn, private_data, pmsg);

	if (ret != 0) {
		fprintf(stderr, "evproxy_send: %s\n", strerror(ret));
		abort();
	}
}

static void evx_produce(struct tput *t, unsigned idx)
{
	struct evx *x = t->mech;
	uint64_t i;

	for (i = 0; i < t->per_producer; i++) {
		void *msg = talloc_size(NULL, TPUT_MSG_SIZE);

		send_or_die(x->s, count_handler, t, &msg);
	}
}

static const struct tput_mech evx_mech = {
	.consumer_setup = evx_setup,
	.produce = evx_produce,
	.consume = evx_consume,
	.consumer_teardown = evx_teardown,
};

/* transport only: messages allocated before timing, kept by the handler */

static void keep_handler(struct tevent_context *ev, void *msg,
			 void *private_data)
{
	struct tput *t = private_data;
	struct evx *x = t->mech;

	talloc_steal(x->keep, msg);
	t->received++;
}

static void evx_pre_prepare(struct tput *t)
{
	uint64_t i;

	t->pre = malloc(t->n * sizeof(void *));
	if (t->pre == NULL) {
		abort();
	}
	for (i = 0; i < t->n; i++) {
		t->pre[i] = talloc_size(NULL, TPUT_MSG_SIZE);
	}
	tput_sort_by_address(t->pre, t->n);
}

static void evx_pre_produce(struct tput *t, unsigned idx)
{
	struct evx *x = t->mech;
	uint64_t i;

	for (i = 0; i < t->per_producer; i++) {
		int ret;

		/* bounded queue: a full queue is retried (the consumer spins) */
		while ((ret = evproxy_send(x->s, keep_handler, t,
					   &t->pre[i])) == EAGAIN) {
			bench_relax();
		}
		if (ret != 0) {
			fprintf(stderr, "evproxy_send: %s\n", strerror(ret));
			abort();
		}
	}
}

static void evx_pre_cleanup(struct tput *t)
{
	free(t->pre);
	t->pre = NULL;
}

static const struct tput_mech evx_pre_mech = {
	.prepare = evx_pre_prepare,
	.consumer_setup = evx_setup,
	.produce = evx_pre_produce,
	.consume = evx_consume,
	.consumer_teardown = evx_teardown,
	.cleanup = evx_pre_cleanup,
};

/* the tevent_thread_proxy drop-in, allocations as tput_tevent_proxy */

static void dropin_setup(struct tput *t)
{
	t->ev = tevent_context_init_byname(NULL, "epoll");
	if (t->ev == NULL) {
		abort();
	}
	t->mech = evproxy_thread_proxy_create(t->ev);
	if (t->mech == NULL) {
		abort();
	}
}

static void dropin_handler(struct tevent_context *ev,
			   struct tevent_immediate *im, void *msg)
{
	struct tput **pt = msg;

	(*pt)->received++;
}

static void dropin_produce(struct tput *t, unsigned idx)
{
	uint64_t i;

	for (i = 0; i < t->per_producer; i++) {
		struct tevent_immediate *im = tevent_create_immediate(NULL);
		struct tput **msg = talloc_size(NULL, TPUT_MSG_SIZE);

		*msg = t;
		evproxy_thread_proxy_schedule(t->mech, &im, dropin_handler,
					      &msg);
	}
}

static void dropin_teardown(struct tput *t)
{
	TALLOC_FREE(t->ev);
}

static const struct tput_mech dropin_mech = {
	.consumer_setup = dropin_setup,
	.produce = dropin_produce,
	.consume = evx_consume,
	.consumer_teardown = dropin_teardown,
};

static void evx_after(struct tput *t)
{
	struct evx *x = t->mech;

	x->wakeups += x->stats.kernel_wakeups;
	x->messages += t->n;
}

unsigned tput_evproxy_rows(struct tput_row *rows)
{
	const struct tput_row mine[] = {
		{ .name = "tput_evproxy_epoll", .m = &evx_mech,
		  .producers = 1, .mech = &evx_epoll,
		  .baseline = "tput_tevent_threaded", .goal = ">= 4x" },
		{ .name = "tput_evproxy_evpoll", .m = &evx_mech,
		  .producers = 1, .mech = &evx_evpoll,
		  .baseline = "floor_tput_talloc",
		  .goal = ">= 0.8x (and >= 6x tput_tevent_threaded)",
		  .after = evx_after },
		{ .name = "tput_evproxy_evpoll_prealloc", .m = &evx_pre_mech,
		  .producers = 1, .mech = &evx_evpoll_pre,
		  .baseline = "tput_tevent_threaded_prealloc",
		  .goal = ">= 30x (bounded queue of 65536)" },
		{ .name = "tput_evproxy_evpoll_4p", .m = &evx_mech,
		  .producers = 4, .mech = &evx_evpoll_4p,
		  .baseline = "tput_evproxy_evpoll", .goal = ">= 0.7x" },
		{ .name = "tput_dropin_proxy", .m = &dropin_mech,
		  .producers = 1, .baseline = "tput_tevent_proxy",
		  .goal = ">= 4x" },
	};
	unsigned i, n = sizeof(mine) / sizeof(mine[0]);

	for (i = 0; i < n; i++) {
		rows[i] = mine[i];
	}
	return n;
}

void tput_evproxy_report(void)
{
	struct bench_result r = {
		.name = "kernel_wakeups_per_msg", .unit = "per msg",
		.goal = "no syscall per message while awake",
	};

	if (evx_evpoll.messages == 0) {
		/* the row was left out (--rows) */
		return;
	}
	r.value = (double)evx_evpoll.wakeups / (double)evx_evpoll.messages;
	bench_add(&r);
}
