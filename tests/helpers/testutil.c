/*
 * Helpers shared by the cmocka test programs.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <cmocka.h>

#include "evpoll.h"
#include "testutil.h"

const char *const tu_all_backends[] = {
	"epoll", "poll", "poll_mt", "standard",
	"evpoll-never", "evpoll-auto", "evpoll-always", NULL,
};

const char *const tu_evpoll_modes[] = {
	"evpoll-never", "evpoll-auto", "evpoll-always", NULL,
};

struct tevent_context *tu_context_try(TALLOC_CTX *mem_ctx, const char *spec)
{
	struct evpoll_config cfg;

	if (strncmp(spec, "evpoll-", 7) != 0) {
		return tevent_context_init_byname(mem_ctx, spec);
	}
	evpoll_config_default(&cfg);
	if (strcmp(spec, "evpoll-never") == 0) {
		cfg.mode = EVPOLL_MODE_NEVER;
	} else if (strcmp(spec, "evpoll-auto") == 0) {
		cfg.mode = EVPOLL_MODE_AUTO;
	} else if (strcmp(spec, "evpoll-always") == 0) {
		cfg.mode = EVPOLL_MODE_ALWAYS;
	} else {
		errno = EINVAL;
		return NULL;
	}
	return evpoll_context_init(mem_ctx, &cfg);
}

struct tevent_context *tu_context(TALLOC_CTX *mem_ctx, const char *spec)
{
	struct tevent_context *ev = tu_context_try(mem_ctx, spec);

	if (ev == NULL) {
		fail_msg("cannot create a context for backend spec %s", spec);
	}
	return ev;
}

uint64_t tu_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

void tu_loop_until(struct tevent_context *ev, const bool *done,
		   unsigned timeout_ms)
{
	uint64_t deadline = tu_now_ns() + (uint64_t)timeout_ms * 1000000ULL;

	while (!*done) {
		assert_int_equal(tevent_loop_once(ev), 0);
		if (tu_now_ns() > deadline) {
			fail_msg("condition not reached within %u ms",
				 timeout_ms);
		}
	}
}

uint64_t tu_scale(uint64_t n)
{
	const char *s = getenv("EVPROXY_STRESS");
	const char *small = getenv("EVPROXY_TEST_SCALE");

	if (s != NULL && strcmp(s, "full") == 0) {
		return n * 10;
	}
	if (small != NULL && strcmp(small, "small") == 0) {
		return n / 10 > 0 ? n / 10 : 1;
	}
	return n;
}

static void capture(void *context, enum tevent_debug_level level,
		    const char *fmt, va_list ap)
{
	struct tu_debug_log *log = context;
	size_t used = strlen(log->text);

	if (level > TEVENT_DEBUG_WARNING) {
		return;
	}
	log->count++;
	if (used < sizeof(log->text) - 1) {
		vsnprintf(log->text + used, sizeof(log->text) - used, fmt, ap);
	}
}

void tu_capture_debug(struct tevent_context *ev, struct tu_debug_log *log)
{
	memset(log, 0, sizeof(*log));
	tevent_set_debug(ev, capture, log);
}

static atomic_uint check_failures;

void tu_check_failed(const char *file, int line, const char *expr)
{
	unsigned n = atomic_fetch_add(&check_failures, 1);

	if (n < 20) {
		fprintf(stderr, "%s:%d: check failed: %s\n", file, line, expr);
	}
}

void tu_checks_reset(void)
{
	atomic_store(&check_failures, 0);
}

void tu_checks_assert(void)
{
	assert_int_equal(atomic_load(&check_failures), 0);
}

unsigned tu_check_failures(void)
{
	return atomic_load(&check_failures);
}
