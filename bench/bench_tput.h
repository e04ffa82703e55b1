/*
 * evproxy-bench: the throughput harness shared by the mechanisms.
 */
#ifndef EVPROXY_BENCH_TPUT_H
#define EVPROXY_BENCH_TPUT_H

#include <stdatomic.h>
#include <stdint.h>
#include <talloc.h>
#include <tevent.h>

#define TPUT_MAX_PRODUCERS 8

/*
 * The payload of a benchmark message. Small on purpose: with glibc, a
 * talloc chunk of up to 24 bytes (120 with talloc's header) comes from the
 * fastbins, which a free on another thread returns to without the arena
 * lock; larger chunks take the arena lock on every cross-thread free and
 * the allocator floor drops to about a third (see README). Every row that
 * allocates messages uses this size, so their ratios compare transports.
 */
#define TPUT_MSG_SIZE 16

struct tput;

/* One mechanism: callbacks run on the consumer or producer threads. */
struct tput_mech {
	void (*prepare)(struct tput *t);		/* bench thread */
	void (*consumer_setup)(struct tput *t);		/* consumer */
	void (*produce)(struct tput *t, unsigned idx);	/* each producer */
	void (*consume)(struct tput *t);		/* until all arrived */
	void (*consumer_teardown)(struct tput *t);	/* consumer */
	void (*cleanup)(struct tput *t);		/* bench thread */
};

struct tput {
	const struct tput_mech *m;
	uint64_t n;		/* messages in all */
	uint64_t per_producer;
	unsigned producers;
	atomic_bool ready;	/* consumer set up */
	atomic_bool go;		/* producers may start */
	atomic_uint producers_done;	/* returned from their last send */
	uint64_t start_ns, end_ns;
	uint64_t received;	/* consumer thread only */

	/* mechanism state */
	struct tevent_context *ev;
	struct tevent_threaded_context *tctx;
	struct tevent_thread_proxy *tp;
	void **pre;		/* preallocated objects */
	void *mech;		/* anything else */
};

uint64_t tput_count(void);
double tput_median(const struct tput_mech *m, unsigned producers);
/* the same, with t->mech set to 'mech' in every run */
double tput_median_with(const struct tput_mech *m, unsigned producers,
			void *mech);
void bench_tput_evproxy(void);
void tput_report(const char *name, double value, const char *baseline,
		 const char *goal);

#endif
