/*
 * evproxy-bench: the throughput harness shared by the mechanisms.
 */
#ifndef EVPROXY_BENCH_TPUT_H
#define EVPROXY_BENCH_TPUT_H

#include <stdalign.h>
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
	/*
	 * consumer thread only, written per message: on a line of its own,
	 * or every producer's read of the fields around it would miss
	 */
	alignas(64) uint64_t received;

	/* mechanism state */
	alignas(64) struct tevent_context *ev;
	struct tevent_threaded_context *tctx;
	struct tevent_thread_proxy *tp;
	void **pre;		/* preallocated objects */
	void *mech;		/* anything else */
};

/*
 * One row of the throughput table. The rows of a group run interleaved:
 * repetition 1 of every row, then repetition 2, ... so that a change of
 * the machine's state (this VM's vCPUs move between host cores: the bare
 * ring alone measures from 3 to 22 M msg/s depending on where they land)
 * hits every row alike, and the ratios of medians stay meaningful.
 */
struct tput_row {
	const char *name;
	const struct tput_mech *m;
	unsigned producers;
	void *mech;		/* t->mech in every run */
	const char *baseline;
	const char *goal;
	/* called after each run of this row, on the bench thread */
	void (*after)(struct tput *t);
};

#define TPUT_MAX_ROWS 16

uint64_t tput_count(void);
/*
 * Sort preallocated objects by address. Transport-only rows send objects
 * allocated before timing; where the allocator put them depends on what
 * the rows before left behind, and scattered objects cost a cache miss
 * each that sequential ones do not. Sorted, every such row touches memory
 * in the same order whatever ran before it.
 */
void tput_sort_by_address(void **objs, uint64_t n);
/* The evproxy rows (tput_evproxy.c); returns how many were added. */
unsigned tput_evproxy_rows(struct tput_row *rows);
/* After the rows ran: results derived from them. */
void tput_evproxy_report(void);

#endif
