/*
 * evproxy-bench: messages per second, producer thread(s) -> one consumer.
 *
 * Each run: the consumer thread builds its loop and mechanism, the
 * producers send 'n' messages as fast as the mechanism accepts them, the
 * run ends when the consumer has handled the last one. The reported figure
 * is the median over bench_repeats() runs.
 */
#include <stdalign.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "bench_tput.h"


static int cmp_address(const void *a, const void *b)
{
	uintptr_t x = (uintptr_t)*(void *const *)a;
	uintptr_t y = (uintptr_t)*(void *const *)b;

	return x < y ? -1 : x > y;
}

void tput_sort_by_address(void **objs, uint64_t n)
{
	qsort(objs, n, sizeof(objs[0]), cmp_address);
}

uint64_t tput_count(void)
{
	return bench_count(2000, 300000, 2000000);
}

/* ---- generic run ---------------------------------------------------------- */

static void *consumer_main(void *arg)
{
	struct tput *t = arg;

	t->m->consumer_setup(t);
	atomic_store(&t->ready, true);
	t->m->consume(t);
	t->end_ns = bench_now_ns();
	/*
	 * tevent's senders touch the destination's wake-up fd after they
	 * queued the message: tear down only when they are out of it.
	 */
	while (atomic_load(&t->producers_done) != t->producers) {
		bench_relax();
	}
	if (t->m->consumer_teardown != NULL) {
		t->m->consumer_teardown(t);
	}
	return NULL;
}

struct producer_arg {
	struct tput *t;
	unsigned idx;
};

static void *producer_main(void *arg)
{
	struct producer_arg *a = arg;

	while (!atomic_load(&a->t->go)) {
		bench_relax();
	}
	a->t->m->produce(a->t, a->idx);
	atomic_fetch_add(&a->t->producers_done, 1);
	return NULL;
}

static double tput_once(const struct tput_row *row)
{
	const struct tput_mech *m = row->m;
	struct tput t = {
		.m = m,
		.n = tput_count(),
		.producers = row->producers,
		.mech = row->mech,
	};
	pthread_t c, p[TPUT_MAX_PRODUCERS];
	struct producer_arg pa[TPUT_MAX_PRODUCERS];
	unsigned i;

	t.per_producer = t.n / t.producers;
	t.n = t.per_producer * t.producers;
	if (m->prepare != NULL) {
		m->prepare(&t);
	}
	bench_thread_start(&c, 1, consumer_main, &t);
	while (!atomic_load(&t.ready)) {
		bench_relax();
	}
	for (i = 0; i < t.producers; i++) {
		pa[i].t = &t;
		pa[i].idx = i;
		bench_thread_start(&p[i], 0, producer_main, &pa[i]);
	}
	t.start_ns = bench_now_ns();
	atomic_store(&t.go, true);
	for (i = 0; i < t.producers; i++) {
		pthread_join(p[i], NULL);
	}
	pthread_join(c, NULL);
	if (m->cleanup != NULL) {
		m->cleanup(&t);
	}
	if (row->after != NULL) {
		row->after(&t);
	}
	return (double)t.n * 1e9 / (double)(t.end_ns - t.start_ns);
}

/*
 * --rows: comma-separated parts; a row is wanted if its name contains one
 * of them, or, for a part ending in '$', ends with the rest of it.
 */
static bool row_wanted(const struct tput_row *row)
{
	const char *part = bench_opt.rows;
	size_t name_len = strlen(row->name);

	if (part == NULL) {
		return true;
	}
	while (*part != '\0') {
		size_t len = strcspn(part, ",");

		if (len > 0 && part[len - 1] == '$') {
			if (len - 1 <= name_len &&
			    strncmp(row->name + name_len - (len - 1), part,
				    len - 1) == 0) {
				return true;
			}
		} else if (len > 0 &&
			   memmem(row->name, name_len, part, len) != NULL) {
			return true;
		}
		part += len;
		if (*part == ',') {
			part++;
		}
	}
	return false;
}

/* Every row bench_repeats() times, interleaved; report the medians. */
static void tput_run_rows(const struct tput_row *rows, unsigned nrows)
{
	static double v[TPUT_MAX_ROWS][16];
	unsigned rep, i, reps = bench_repeats();

	for (rep = 0; rep < reps; rep++) {
		for (i = 0; i < nrows; i++) {
			if (!row_wanted(&rows[i])) {
				continue;
			}
			v[i][rep] = tput_once(&rows[i]);
			if (bench_opt.verbose) {
				fprintf(stderr, "  %s run %u: %.2f M msg/s\n",
					rows[i].name, rep + 1,
					v[i][rep] / 1e6);
			}
		}
	}
	for (i = 0; i < nrows; i++) {
		struct bench_result r = {
			.name = rows[i].name, .unit = "msg/s",
			.value = bench_median(v[i], reps),
			.baseline = rows[i].baseline, .goal = rows[i].goal,
		};

		if (row_wanted(&rows[i])) {
			bench_add(&r);
		}
	}
}

/* ---- floor: a bare single-producer ring ------------------------------------ */

#define RING_SIZE 4096

static struct {
	alignas(64) atomic_size_t head;	/* written by the producer */
	alignas(64) atomic_size_t tail;	/* written by the consumer */
	alignas(64) void *slot[RING_SIZE];
} ring;

static void floor_setup(struct tput *t)
{
	atomic_store(&ring.head, 0);
	atomic_store(&ring.tail, 0);
}

/*
 * What one message of a floor row carries: 'objs' talloc objects, taking
 * that many consecutive slots (RING_SIZE is a multiple of both kinds).
 */
struct floor_kind {
	unsigned objs;
	bool immediate;		/* the first object is a tevent_immediate */
};

/* a bare message */
static const struct floor_kind floor_msg = { .objs = 1 };
/*
 * What a tevent_thread_proxy message carries: a tevent_immediate (too
 * large for glibc's fastbins, so every cross-thread free takes the arena
 * lock) and a message. The floor for the drop-in.
 */
static const struct floor_kind floor_im = { .objs = 2, .immediate = true };

/*
 * Each side caches the other's index and re-reads it only when the cached
 * value says full (producer) or empty (consumer): the shared lines move
 * once per batch of slots, not once per message.
 */
static void floor_produce(struct tput *t, unsigned idx)
{
	const struct floor_kind *k = t->mech;
	size_t head = 0, tail_seen = 0;
	uint64_t i;
	unsigned j;

	for (i = 0; i < t->per_producer; i++) {
		void *obj[2];

		for (j = 0; j < k->objs; j++) {
			obj[j] = (j == 0 && k->immediate) ?
				 (void *)tevent_create_immediate(NULL) :
				 talloc_size(NULL, TPUT_MSG_SIZE);
		}
		while (head - tail_seen > RING_SIZE - k->objs) {
			tail_seen = atomic_load_explicit(&ring.tail,
							 memory_order_acquire);
			if (head - tail_seen > RING_SIZE - k->objs) {
				bench_relax();
			}
		}
		for (j = 0; j < k->objs; j++) {
			ring.slot[(head + j) % RING_SIZE] = obj[j];
		}
		head += k->objs;
		atomic_store_explicit(&ring.head, head, memory_order_release);
	}
}

static void floor_consume(struct tput *t)
{
	const struct floor_kind *k = t->mech;
	size_t tail = 0, head_seen = 0;
	unsigned j;

	while (tail < k->objs * t->n) {
		while (head_seen == tail) {
			head_seen = atomic_load_explicit(&ring.head,
							 memory_order_acquire);
			if (head_seen == tail) {
				bench_relax();
			}
		}
		for (j = 0; j < k->objs; j++) {
			talloc_free(ring.slot[(tail + j) % RING_SIZE]);
		}
		tail += k->objs;
		if (tail % 64 == 0 || tail == head_seen) {
			atomic_store_explicit(&ring.tail, tail,
					      memory_order_release);
		}
	}
}

static const struct tput_mech floor_mech = {
	.consumer_setup = floor_setup,
	.produce = floor_produce,
	.consume = floor_consume,
};

/* ---- tevent_threaded_schedule_immediate ------------------------------------ */

static void tevent_consumer_setup(struct tput *t)
{
	t->ev = tevent_context_init_byname(NULL, "epoll");
	if (t->ev == NULL) {
		abort();
	}
	t->tctx = tevent_threaded_context_create(t->ev, t->ev);
	t->tp = tevent_thread_proxy_create(t->ev);
	if (t->tctx == NULL || t->tp == NULL) {
		abort();
	}
}

static void tevent_consume(struct tput *t)
{
	while (t->received < t->n) {
		tevent_loop_once(t->ev);
	}
}

static void tevent_consumer_teardown(struct tput *t)
{
	TALLOC_FREE(t->ev);
}

static void thr_alloc_handler(struct tevent_context *ev,
			      struct tevent_immediate *im, void *msg)
{
	struct tput **pt = msg;

	(*pt)->received++;
	talloc_free(msg);
	talloc_free(im);
}

static void thr_produce(struct tput *t, unsigned idx)
{
	uint64_t i;

	for (i = 0; i < t->per_producer; i++) {
		struct tevent_immediate *im = tevent_create_immediate(NULL);
		struct tput **msg = talloc_size(NULL, TPUT_MSG_SIZE);

		*msg = t;
		tevent_threaded_schedule_immediate(t->tctx, im,
						   thr_alloc_handler, msg);
	}
}

static const struct tput_mech thr_mech = {
	.consumer_setup = tevent_consumer_setup,
	.produce = thr_produce,
	.consume = tevent_consume,
	.consumer_teardown = tevent_consumer_teardown,
};

/* transport only: immediates allocated before timing, no message */

static void thr_pre_handler(struct tevent_context *ev,
			    struct tevent_immediate *im, void *private_data)
{
	struct tput *t = private_data;

	t->received++;
}

static void thr_pre_prepare(struct tput *t)
{
	uint64_t i;

	t->pre = talloc_array(NULL, void *, t->n);
	for (i = 0; i < t->n; i++) {
		t->pre[i] = tevent_create_immediate(t->pre);
	}
	tput_sort_by_address(t->pre, t->n);
}

static void thr_pre_produce(struct tput *t, unsigned idx)
{
	uint64_t i;

	for (i = 0; i < t->per_producer; i++) {
		tevent_threaded_schedule_immediate(t->tctx, t->pre[i],
						   thr_pre_handler, t);
	}
}

static void pre_cleanup(struct tput *t)
{
	TALLOC_FREE(t->pre);
}

static const struct tput_mech thr_pre_mech = {
	.prepare = thr_pre_prepare,
	.consumer_setup = tevent_consumer_setup,
	.produce = thr_pre_produce,
	.consume = tevent_consume,
	.consumer_teardown = tevent_consumer_teardown,
	.cleanup = pre_cleanup,
};

/* ---- tevent_thread_proxy_schedule ------------------------------------------ */

static void proxy_handler(struct tevent_context *ev,
			  struct tevent_immediate *im, void *msg)
{
	/* tevent owns and frees both the immediate and the message */
	struct tput **pt = msg;

	(*pt)->received++;
}

static void proxy_produce(struct tput *t, unsigned idx)
{
	uint64_t i;

	for (i = 0; i < t->per_producer; i++) {
		struct tevent_immediate *im = tevent_create_immediate(NULL);
		struct tput **msg = talloc_size(NULL, TPUT_MSG_SIZE);

		*msg = t;
		tevent_thread_proxy_schedule(t->tp, &im, proxy_handler, &msg);
	}
}

static const struct tput_mech proxy_mech = {
	.consumer_setup = tevent_consumer_setup,
	.produce = proxy_produce,
	.consume = tevent_consume,
	.consumer_teardown = tevent_consumer_teardown,
};

void bench_tput(void)
{
	struct tput_row rows[TPUT_MAX_ROWS] = {
		{ .name = "floor_tput_talloc", .m = &floor_mech,
		  .producers = 1, .mech = (void *)&floor_msg,
		  .goal = "the allocator floor" },
		{ .name = "tput_tevent_threaded", .m = &thr_mech,
		  .producers = 1, .baseline = "floor_tput_talloc" },
		{ .name = "tput_tevent_threaded_prealloc", .m = &thr_pre_mech,
		  .producers = 1, .baseline = "floor_tput_talloc" },
		{ .name = "tput_tevent_proxy", .m = &proxy_mech,
		  .producers = 1, .baseline = "floor_tput_talloc_im" },
		{ .name = "floor_tput_talloc_im", .m = &floor_mech,
		  .producers = 1, .mech = (void *)&floor_im,
		  .goal = "the allocator floor for an immediate + message" },
	};
	unsigned n = 5;

	n += tput_evproxy_rows(rows + n);
	tput_run_rows(rows, n);
	tput_evproxy_report();
}
