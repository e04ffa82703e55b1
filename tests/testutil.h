/*
 * Helpers shared by the cmocka test programs.
 */
#ifndef EVPROXY_TESTUTIL_H
#define EVPROXY_TESTUTIL_H

#include <stdbool.h>
#include <stdint.h>
#include <talloc.h>
#include <tevent.h>

/*
 * Backend specs the tests iterate over: the stock backends by name, and
 * "evpoll-never", "evpoll-auto", "evpoll-always" for the evpoll modes.
 */
extern const char *const tu_all_backends[];	/* NULL-terminated */
extern const char *const tu_evpoll_modes[];	/* NULL-terminated */

/* Create a context for a backend spec; fails the test on error. */
struct tevent_context *tu_context(TALLOC_CTX *mem_ctx, const char *spec);

/*
 * The same without cmocka (whose asserts are not thread-safe), for other
 * threads: NULL on error (errno EINVAL for an unknown spec).
 */
struct tevent_context *tu_context_try(TALLOC_CTX *mem_ctx, const char *spec);

/* CLOCK_MONOTONIC in nanoseconds */
uint64_t tu_now_ns(void);

/*
 * Run tevent_loop_once(ev) until *done is true; fails the test if that
 * takes longer than timeout_ms.
 */
void tu_loop_until(struct tevent_context *ev, const bool *done,
		   unsigned timeout_ms);

/*
 * Scale for loop counts: 1 normally, smaller under valgrind or a
 * sanitizer (EVPROXY_TEST_SCALE=small), larger for 'make stress'
 * (EVPROXY_STRESS=full). Returns n adjusted.
 */
uint64_t tu_scale(uint64_t n);

/*
 * Checks usable off the cmocka thread (cmocka's asserts are not
 * thread-safe): TU_CHECK records and prints a failure, tu_checks_assert()
 * fails the test on the cmocka thread if any check failed since
 * tu_checks_reset().
 */
#define TU_CHECK(cond) do {						\
	if (!(cond)) {							\
		tu_check_failed(__FILE__, __LINE__, #cond);		\
	}								\
} while (0)

void tu_check_failed(const char *file, int line, const char *expr);
void tu_checks_reset(void);
void tu_checks_assert(void);
unsigned tu_check_failures(void);

/* Debug messages tevent reported for a context, collected by tu_capture. */
struct tu_debug_log {
	char text[4096];
	unsigned count;
};
void tu_capture_debug(struct tevent_context *ev, struct tu_debug_log *log);

#endif
