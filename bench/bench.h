/*
 * evproxy-bench: shared definitions.
 */
#ifndef EVPROXY_BENCH_H
#define EVPROXY_BENCH_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct bench_opts {
	bool json;
	bool pin;
	bool verbose;	/* every repetition on standard error */
	const char *rows;	/* throughput rows whose name contains this */
	enum { BENCH_TINY, BENCH_QUICK, BENCH_FULL } size;
};
extern struct bench_opts bench_opt;

struct bench_result {
	const char *name;
	const char *unit;
	bool is_rtt;		/* p50/p99 in ns, else value */
	double p50, p99;
	double value;
	const char *baseline;	/* row name this is judged against, or NULL */
	double ratio;		/* to the baseline, NAN if none */
	const char *goal;	/* the goal stated in the issues, or NULL */
};

/* nanoseconds, CLOCK_MONOTONIC */
uint64_t bench_now_ns(void);

/* pick a count by run size */
uint64_t bench_count(uint64_t tiny, uint64_t quick, uint64_t full);

/* how many times a throughput run is repeated (median reported) */
unsigned bench_repeats(void);

/* pin the calling thread to cpu (modulo the CPU count) when --pin */
void bench_pin(unsigned cpu);

/* start a thread, pinned to cpu when --pin */
void bench_thread_start(pthread_t *t, unsigned cpu, void *(*fn)(void *),
			void *arg);

/* sort samples and fill p50/p99 of r */
void bench_percentiles(uint64_t *samples, size_t n, struct bench_result *r);

/* median of n values (sorts them) */
double bench_median(double *v, unsigned n);

/* spin-wait hint */
static inline void bench_relax(void)
{
	__builtin_ia32_pause();
}

/* scenario groups; each appends results through bench_add() */
void bench_add(const struct bench_result *r);
const struct bench_result *bench_find(const char *name);

void bench_rtt(void);
void bench_tput(void);
void bench_misc(void);
void bench_pool(void);
void bench_uring(void);	/* bench/uring.c, built with liburing */

#endif
