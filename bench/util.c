/*
 * evproxy-bench: timing, pinning and statistics helpers.
 */
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

uint64_t bench_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

uint64_t bench_count(uint64_t tiny, uint64_t quick, uint64_t full)
{
	switch (bench_opt.size) {
	case BENCH_TINY:
		return tiny;
	case BENCH_QUICK:
		return quick;
	case BENCH_FULL:
		break;
	}
	return full;
}

unsigned bench_repeats(void)
{
	return (unsigned)bench_count(1, 3, 7);
}

void bench_pin(unsigned cpu)
{
	cpu_set_t set;
	long n = sysconf(_SC_NPROCESSORS_ONLN);

	if (!bench_opt.pin || n < 1) {
		return;
	}
	CPU_ZERO(&set);
	CPU_SET(cpu % (unsigned)n, &set);
	sched_setaffinity(0, sizeof(set), &set);
}

struct start_arg {
	unsigned cpu;
	void *(*fn)(void *);
	void *arg;
};

static void *thread_main(void *p)
{
	struct start_arg a = *(struct start_arg *)p;

	free(p);
	bench_pin(a.cpu);
	return a.fn(a.arg);
}

void bench_thread_start(pthread_t *t, unsigned cpu, void *(*fn)(void *),
			void *arg)
{
	struct start_arg *a = malloc(sizeof(*a));

	if (a == NULL) {
		perror("malloc");
		exit(1);
	}
	a->cpu = cpu;
	a->fn = fn;
	a->arg = arg;
	if (pthread_create(t, NULL, thread_main, a) != 0) {
		perror("pthread_create");
		exit(1);
	}
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x > y) - (x < y);
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

void bench_percentiles(uint64_t *samples, size_t n, struct bench_result *r)
{
	if (n == 0) {
		return;
	}
	qsort(samples, n, sizeof(samples[0]), cmp_u64);
	r->is_rtt = true;
	r->p50 = (double)samples[n / 2];
	r->p99 = (double)samples[(n * 99) / 100];
}

double bench_median(double *v, unsigned n)
{
	qsort(v, n, sizeof(v[0]), cmp_double);
	if (n % 2 == 1) {
		return v[n / 2];
	}
	return (v[n / 2 - 1] + v[n / 2]) / 2;
}
