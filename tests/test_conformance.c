/*
 * Backend conformance suite.
 *
 * One set of behaviour tests runs unchanged against tevent's stock "epoll"
 * and "poll" backends and against "evpoll" in each mode (never, auto,
 * always): fd events, timers, immediates, signals, cross-thread immediates,
 * thread proxies, nested loops, tevent_loop_wait, fork with
 * tevent_re_initialise, several contexts on one thread and contexts on
 * several threads. Every backend must pass every test; there are no
 * per-backend cases. Tests are named "<backend>/<test>", so a failure
 * names the backend; an optional argument is a cmocka test filter, e.g.
 * "evpoll-always/test_fd_*".
 *
 * Tests never assert tight timing: timers may fire late by a generous
 * bound, never early. Waits that could hang are bounded by a guard timer
 * or a watchdog.
 */

/* for tevent_loop_allow_nesting() */
#define TEVENT_DEPRECATED 1

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include <talloc.h>
#include <tevent.h>

#include "evpoll.h"
#include "testutil.h"

#if defined(__has_include)
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#endif
#endif
#ifndef RUNNING_ON_VALGRIND
#define RUNNING_ON_VALGRIND 0
#endif

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define UNDER_SANITIZER 1
#else
#define UNDER_SANITIZER 0
#endif

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* upper bound for anything the tests wait for */
#define LOOP_TIMEOUT_MS 10000
/* how long a test watches for something that must not happen */
#define WINDOW_MS 25
/* the watchdog for calls that cannot be bounded otherwise */
#define WATCHDOG_S 60

/*
 * The "not too late" bound for timers: generous, the machine is noisy, and
 * more so under a sanitizer or valgrind (whose runs also set
 * EVPROXY_TEST_SCALE=small).
 */
static unsigned late_bound_ms(void)
{
	const char *s = getenv("EVPROXY_TEST_SCALE");

	if (UNDER_SANITIZER || RUNNING_ON_VALGRIND ||
	    (s != NULL && strcmp(s, "small") == 0)) {
		return 1000;
	}
	return 100;
}

static struct timeval ofs_ms(unsigned ms)
{
	return tevent_timeval_current_ofs(ms / 1000, (ms % 1000) * 1000);
}

static int64_t tv_diff_us(const struct timeval *later,
			  const struct timeval *earlier)
{
	return ((int64_t)later->tv_sec - (int64_t)earlier->tv_sec) * 1000000 +
	       ((int64_t)later->tv_usec - (int64_t)earlier->tv_usec);
}

/* ------------------------------------------------------------------ */
/* Fixture: one context of the backend under test, fds to close. */

#define FX_MAX_FDS 16

struct fixture {
	const char *spec;
	struct tevent_context *ev;
	struct tevent_context *ev2;	/* for tests with two contexts */
	TALLOC_CTX *mem;		/* freed before the contexts */
	int fds[FX_MAX_FDS];
	unsigned num_fds;
};

static int fx_setup(void **state)
{
	/* not talloc: a forked child leaves it behind */
	struct fixture *fx = calloc(1, sizeof(*fx));

	assert_non_null(fx);
	fx->spec = *state;
	fx->mem = talloc_new(NULL);
	assert_non_null(fx->mem);
	/* on the NULL context, as tevent_thread_proxy_create() requires */
	fx->ev = tu_context(NULL, fx->spec);
	*state = fx;
	return 0;
}

static int fx_teardown(void **state)
{
	struct fixture *fx = *state;
	unsigned i;

	TALLOC_FREE(fx->mem);
	TALLOC_FREE(fx->ev2);
	TALLOC_FREE(fx->ev);
	for (i = 0; i < fx->num_fds; i++) {
		if (fx->fds[i] != -1) {
			close(fx->fds[i]);
		}
	}
	free(fx);
	return 0;
}

static void fx_track(struct fixture *fx, const int fds[2])
{
	assert_true(fx->num_fds + 2 <= FX_MAX_FDS);
	fx->fds[fx->num_fds++] = fds[0];
	fx->fds[fx->num_fds++] = fds[1];
}

static void fx_pipe(struct fixture *fx, int fds[2])
{
	assert_int_equal(pipe2(fds, O_NONBLOCK | O_CLOEXEC), 0);
	fx_track(fx, fds);
}

static void fx_socketpair(struct fixture *fx, int fds[2])
{
	assert_int_equal(socketpair(AF_UNIX,
				    SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
				    0, fds), 0);
	fx_track(fx, fds);
}

/* close a tracked fd early */
static void fx_close(struct fixture *fx, int fd)
{
	unsigned i;

	for (i = 0; i < fx->num_fds; i++) {
		if (fx->fds[i] == fd) {
			close(fd);
			fx->fds[i] = -1;
			return;
		}
	}
	fail_msg("fd %d is not tracked", fd);
}

static void put_byte(int fd, char c)
{
	assert_int_equal(write(fd, &c, 1), 1);
}

/* read everything available; the number of bytes read */
static size_t drain(int fd)
{
	char buf[4096];
	size_t total = 0;
	ssize_t n;

	while ((n = read(fd, buf, sizeof(buf))) > 0) {
		total += (size_t)n;
	}
	return total;
}

/* ------------------------------------------------------------------ */
/* Loop helpers */

static void flag_timer_handler(struct tevent_context *ev,
			       struct tevent_timer *te,
			       struct timeval current_time,
			       void *private_data)
{
	bool *flag = private_data;

	if (flag != NULL) {
		*flag = true;
	}
}

/*
 * A timer that only makes a sleeping loop return, so that a lost event
 * fails the test after LOOP_TIMEOUT_MS instead of tevent's 30 s wait.
 */
static struct tevent_timer *add_guard(struct tevent_context *ev)
{
	return tevent_add_timer(ev, ev, ofs_ms(LOOP_TIMEOUT_MS + 100),
				flag_timer_handler, NULL);
}

/* run ev until *done, fail after LOOP_TIMEOUT_MS */
static void wait_for(struct tevent_context *ev, const bool *done)
{
	struct tevent_timer *guard = add_guard(ev);

	assert_non_null(guard);
	tu_loop_until(ev, done, LOOP_TIMEOUT_MS);
	talloc_free(guard);
}

/*
 * The same without cmocka: for use while other threads run, and in a
 * forked child. False on a loop error or timeout.
 */
static bool wait_for_quietly(struct tevent_context *ev, const bool *done)
{
	uint64_t deadline = tu_now_ns() + LOOP_TIMEOUT_MS * 1000000ULL;
	struct tevent_timer *guard = add_guard(ev);
	bool ok = true;

	if (guard == NULL) {
		return false;
	}
	while (!*done) {
		if (tevent_loop_once(ev) != 0 || tu_now_ns() > deadline) {
			ok = false;
			break;
		}
	}
	talloc_free(guard);
	return ok;
}

/* run ev for ms milliseconds */
static void run_window(struct tevent_context *ev, unsigned ms)
{
	bool over = false;
	struct tevent_timer *te;

	te = tevent_add_timer(ev, ev, ofs_ms(ms), flag_timer_handler, &over);
	assert_non_null(te);
	tu_loop_until(ev, &over, LOOP_TIMEOUT_MS);
}

/* kill the process, naming the cause, if a call never returns */
static const char *watchdog_spec = "";
static const char *watchdog_what = "";

static void watchdog_say(const char *text)
{
	if (write(2, text, strlen(text)) < 0) {
		/* nothing to do */
	}
}

static void watchdog_fired(int sig)
{
	watchdog_say("test_conformance: ");
	watchdog_say(watchdog_spec);
	watchdog_say(": watchdog expired, ");
	watchdog_say(watchdog_what);
	watchdog_say(" did not return\n");
	_exit(1);
}

static void watchdog_arm(const char *spec, const char *what)
{
	watchdog_spec = spec;
	watchdog_what = what;
	signal(SIGALRM, watchdog_fired);
	alarm(WATCHDOG_S);
}

static void watchdog_disarm(void)
{
	alarm(0);
	signal(SIGALRM, SIG_DFL);
}

/* ------------------------------------------------------------------ */
/* An ordered log of handler ids */

#define LOG_MAX 32

struct event_log {
	int ids[LOG_MAX];
	unsigned n;
};

static void log_add(struct event_log *log, int id)
{
	if (log->n < LOG_MAX) {
		log->ids[log->n] = id;
	}
	log->n++;
}

static void assert_log(const struct event_log *log, const int *want,
		       unsigned n)
{
	unsigned i;

	assert_int_equal(log->n, n);
	for (i = 0; i < n; i++) {
		assert_int_equal(log->ids[i], want[i]);
	}
}

/* ------------------------------------------------------------------ */
/* 1. fd events */

struct fd_probe {
	int fd;
	unsigned calls;
	uint16_t flags;
	char buf[64];
	size_t len;
	bool eof;
	bool done;
};

/* reads what is there; disables itself at end of file */
static void read_handler(struct tevent_context *ev, struct tevent_fd *fde,
			 uint16_t flags, void *private_data)
{
	struct fd_probe *p = private_data;
	ssize_t n;

	p->calls++;
	p->flags = flags;
	n = read(p->fd, p->buf + p->len, sizeof(p->buf) - p->len);
	if (n > 0) {
		p->len += (size_t)n;
	} else if (n == 0) {
		p->eof = true;
		tevent_fd_set_flags(fde, 0);
	}
	p->done = true;
}

static void test_fd_read(void **state)
{
	struct fixture *fx = *state;
	struct fd_probe p = { .calls = 0 };
	struct tevent_fd *fde;
	int fds[2];

	fx_pipe(fx, fds);
	p.fd = fds[0];
	fde = tevent_add_fd(fx->ev, fx->ev, fds[0], TEVENT_FD_READ,
			    read_handler, &p);
	assert_non_null(fde);
	assert_int_equal(tevent_fd_get_flags(fde), TEVENT_FD_READ);

	/* nothing to read: no call */
	run_window(fx->ev, WINDOW_MS);
	assert_int_equal(p.calls, 0);

	assert_int_equal(write(fds[1], "hello", 5), 5);
	wait_for(fx->ev, &p.done);
	assert_int_equal(p.calls, 1);
	assert_int_equal(p.flags, TEVENT_FD_READ);
	assert_int_equal(p.len, 5);
	assert_memory_equal(p.buf, "hello", 5);

	/* drained: no further call */
	run_window(fx->ev, WINDOW_MS);
	assert_int_equal(p.calls, 1);

	/* end of file is reported as readable */
	p.done = false;
	fx_close(fx, fds[1]);
	wait_for(fx->ev, &p.done);
	assert_int_equal(p.calls, 2);
	assert_true(p.flags & TEVENT_FD_READ);
	assert_true(p.eof);
	assert_int_equal(tevent_fd_get_flags(fde), 0);

	talloc_free(fde);
}

/* writes one byte, then stops asking for write readiness */
static void write_handler(struct tevent_context *ev, struct tevent_fd *fde,
			  uint16_t flags, void *private_data)
{
	struct fd_probe *p = private_data;

	p->calls++;
	p->flags = flags;
	if (write(p->fd, "x", 1) == 1) {
		p->len++;
	}
	tevent_fd_set_flags(fde, 0);
	p->done = true;
}

static void test_fd_write(void **state)
{
	struct fixture *fx = *state;
	struct fd_probe p = { .calls = 0 };
	struct tevent_fd *fde;
	char buf[4096] = { 0 };
	size_t filled = 0;
	ssize_t n;
	char c;
	int sv[2];

	fx_socketpair(fx, sv);
	p.fd = sv[0];

	/* fill the socket: not writable */
	while ((n = write(sv[0], buf, sizeof(buf))) > 0) {
		filled += (size_t)n;
	}
	assert_int_equal(errno, EAGAIN);
	while (write(sv[0], buf, 1) == 1) {
		filled++;
	}
	assert_true(filled > 0);

	fde = tevent_add_fd(fx->ev, fx->ev, sv[0], TEVENT_FD_WRITE,
			    write_handler, &p);
	assert_non_null(fde);
	run_window(fx->ev, WINDOW_MS);
	assert_int_equal(p.calls, 0);

	/* make room: writable */
	assert_int_equal(drain(sv[1]), filled);
	wait_for(fx->ev, &p.done);
	assert_int_equal(p.calls, 1);
	assert_int_equal(p.flags, TEVENT_FD_WRITE);
	assert_int_equal(p.len, 1);

	/* the handler cleared the flags: no further call */
	run_window(fx->ev, WINDOW_MS);
	assert_int_equal(p.calls, 1);
	assert_int_equal(read(sv[1], &c, 1), 1);
	assert_int_equal(c, 'x');

	talloc_free(fde);
}

/* counts, does not read, disables itself */
static void disable_handler(struct tevent_context *ev, struct tevent_fd *fde,
			    uint16_t flags, void *private_data)
{
	struct fd_probe *p = private_data;

	p->calls++;
	p->flags = flags;
	tevent_fd_set_flags(fde, 0);
	p->done = true;
}

static void test_fd_set_flags(void **state)
{
	struct fixture *fx = *state;
	struct fd_probe p = { .calls = 0 };
	struct tevent_fd *fde;
	int fds[2];

	fx_pipe(fx, fds);
	p.fd = fds[0];
	fde = tevent_add_fd(fx->ev, fx->ev, fds[0], TEVENT_FD_READ,
			    disable_handler, &p);
	assert_non_null(fde);

	/* data pending, reading disabled: no call */
	put_byte(fds[1], 'a');
	tevent_fd_set_flags(fde, 0);
	assert_int_equal(tevent_fd_get_flags(fde), 0);
	run_window(fx->ev, WINDOW_MS);
	assert_int_equal(p.calls, 0);

	/* enabled again: called */
	tevent_fd_set_flags(fde, TEVENT_FD_READ);
	assert_int_equal(tevent_fd_get_flags(fde), TEVENT_FD_READ);
	wait_for(fx->ev, &p.done);
	assert_int_equal(p.calls, 1);
	assert_int_equal(p.flags, TEVENT_FD_READ);

	/* disabled inside the handler, data still pending: no call */
	assert_int_equal(tevent_fd_get_flags(fde), 0);
	run_window(fx->ev, WINDOW_MS);
	assert_int_equal(p.calls, 1);

	/* READ|WRITE on a pipe's read end: only READ is reported */
	p.done = false;
	tevent_fd_set_flags(fde, TEVENT_FD_READ | TEVENT_FD_WRITE);
	wait_for(fx->ev, &p.done);
	assert_int_equal(p.calls, 2);
	assert_int_equal(p.flags, TEVENT_FD_READ);

	/* enabled, then disabled again before the loop ran: no call */
	tevent_fd_set_flags(fde, TEVENT_FD_READ);
	tevent_fd_set_flags(fde, 0);
	run_window(fx->ev, WINDOW_MS);
	assert_int_equal(p.calls, 2);

	/* drained while enabled: no call */
	assert_int_equal(drain(fds[0]), 1);
	tevent_fd_set_flags(fde, TEVENT_FD_READ);
	run_window(fx->ev, WINDOW_MS);
	assert_int_equal(p.calls, 2);

	talloc_free(fde);
}

struct free_pair {
	struct tevent_fd *fde[2];
	unsigned calls[2];
	bool free_other;
};

struct free_slot {
	struct free_pair *pair;
	unsigned idx;
};

/*
 * Never reads, so a level-triggered fd stays ready: a handler that is
 * still registered would be called again.
 */
static void free_handler(struct tevent_context *ev, struct tevent_fd *fde,
			 uint16_t flags, void *private_data)
{
	struct free_slot *s = private_data;
	struct free_pair *pair = s->pair;

	pair->calls[s->idx]++;
	if (pair->free_other) {
		TALLOC_FREE(pair->fde[1 - s->idx]);
	}
	TALLOC_FREE(pair->fde[s->idx]);
}

static void run_free_pair(struct fixture *fx, bool free_other)
{
	struct free_pair pair = { .free_other = free_other };
	struct free_slot slots[2];
	unsigned i;
	int fds[2][2];

	for (i = 0; i < 2; i++) {
		fx_pipe(fx, fds[i]);
		put_byte(fds[i][1], 'a');
		slots[i] = (struct free_slot) { .pair = &pair, .idx = i };
		pair.fde[i] = tevent_add_fd(fx->ev, fx->ev, fds[i][0],
					    TEVENT_FD_READ, free_handler,
					    &slots[i]);
		assert_non_null(pair.fde[i]);
	}
	run_window(fx->ev, WINDOW_MS);
	if (free_other) {
		/* the first handler freed both: the other never ran */
		assert_int_equal(pair.calls[0] + pair.calls[1], 1);
		assert_true(pair.fde[0] == NULL && pair.fde[1] == NULL);
	} else {
		assert_int_equal(pair.calls[0], 1);
		assert_int_equal(pair.calls[1], 1);
	}
	run_window(fx->ev, WINDOW_MS);
	assert_int_equal(pair.calls[0] + pair.calls[1], free_other ? 1 : 2);
}

static void test_fd_free_self(void **state)
{
	run_free_pair(*state, false);
}

static void test_fd_free_other(void **state)
{
	run_free_pair(*state, true);
}

static int closed_fd = -1;

static void close_fn(struct tevent_context *ev, struct tevent_fd *fde,
		     int fd, void *private_data)
{
	closed_fd = fd;
	close(fd);
}

/* close_fn and auto-close run when the fd handler is freed */
static void test_fd_close(void **state)
{
	struct fixture *fx = *state;
	struct fd_probe p = { .calls = 0 };
	struct tevent_fd *fde;
	int a[2], b[2];

	assert_int_equal(pipe2(a, O_NONBLOCK | O_CLOEXEC), 0);
	fx_pipe(fx, b);
	p.fd = a[0];
	fde = tevent_add_fd(fx->ev, fx->ev, a[0], TEVENT_FD_READ,
			    read_handler, &p);
	assert_non_null(fde);
	tevent_fd_set_close_fn(fde, close_fn);
	put_byte(a[1], 'a');
	wait_for(fx->ev, &p.done);
	closed_fd = -1;
	TALLOC_FREE(fde);
	assert_int_equal(closed_fd, a[0]);
	assert_int_equal(fcntl(a[0], F_GETFD), -1);

	fde = tevent_add_fd(fx->ev, fx->ev, a[1], TEVENT_FD_WRITE,
			    disable_handler, &p);
	assert_non_null(fde);
	tevent_fd_set_auto_close(fde);
	TALLOC_FREE(fde);
	assert_int_equal(fcntl(a[1], F_GETFD), -1);

	/* the loop still works, with a new fd that may reuse a number */
	p = (struct fd_probe) { .fd = b[0] };
	fde = tevent_add_fd(fx->ev, fx->ev, b[0], TEVENT_FD_READ,
			    read_handler, &p);
	assert_non_null(fde);
	put_byte(b[1], 'b');
	wait_for(fx->ev, &p.done);
	assert_int_equal(p.len, 1);
	talloc_free(fde);
}

/* two fd handlers on one fd, one for reading and one for writing */
static void test_fd_shared(void **state)
{
	struct fixture *fx = *state;
	struct fd_probe r = { .calls = 0 }, w = { .calls = 0 };
	struct tevent_fd *fde_r, *fde_w;
	int sv[2];

	fx_socketpair(fx, sv);
	r.fd = sv[0];
	w.fd = sv[0];
	fde_r = tevent_add_fd(fx->ev, fx->ev, sv[0], TEVENT_FD_READ,
			      read_handler, &r);
	fde_w = tevent_add_fd(fx->ev, fx->ev, sv[0], TEVENT_FD_WRITE,
			      write_handler, &w);
	assert_non_null(fde_r);
	assert_non_null(fde_w);

	/* writable at once; write_handler writes "x" and stops */
	wait_for(fx->ev, &w.done);
	assert_int_equal(w.calls, 1);
	assert_int_equal(w.flags, TEVENT_FD_WRITE);
	run_window(fx->ev, WINDOW_MS);
	assert_int_equal(r.calls, 0);
	assert_int_equal(w.calls, 1);

	/* readable: only the read handler */
	put_byte(sv[1], 'y');
	wait_for(fx->ev, &r.done);
	assert_int_equal(r.calls, 1);
	assert_int_equal(r.flags, TEVENT_FD_READ);
	assert_int_equal(r.len, 1);
	assert_int_equal(r.buf[0], 'y');

	/* the write handler is freed, the read handler still works */
	TALLOC_FREE(fde_w);
	r.done = false;
	put_byte(sv[1], 'z');
	wait_for(fx->ev, &r.done);
	assert_int_equal(r.calls, 2);
	assert_int_equal(w.calls, 1);
	talloc_free(fde_r);
}

/* ------------------------------------------------------------------ */
/* 2. timers */

struct timer_probe {
	struct event_log *log;
	int id;
	struct timeval deadline;
	struct timeval fired_at;
	unsigned calls;
	bool done;
};

static void timer_handler(struct tevent_context *ev, struct tevent_timer *te,
			  struct timeval current_time, void *private_data)
{
	struct timer_probe *p = private_data;

	p->fired_at = tevent_timeval_current();
	p->calls++;
	p->done = true;
	if (p->log != NULL) {
		log_add(p->log, p->id);
	}
}

static struct tevent_timer *add_probe_timer(struct tevent_context *ev,
					    struct timer_probe *p,
					    unsigned ms)
{
	struct tevent_timer *te;

	p->deadline = ofs_ms(ms);
	te = tevent_add_timer(ev, ev, p->deadline, timer_handler, p);
	assert_non_null(te);
	return te;
}

/* fired once, not before its deadline, not much after it */
static void assert_timely(const struct timer_probe *p)
{
	int64_t late_us;

	assert_int_equal(p->calls, 1);
	late_us = tv_diff_us(&p->fired_at, &p->deadline);
	if (late_us < 0) {
		fail_msg("timer %d fired %lld us before its deadline", p->id,
			 (long long)-late_us);
	}
	if (late_us > (int64_t)late_bound_ms() * 1000) {
		fail_msg("timer %d fired %lld us after its deadline", p->id,
			 (long long)late_us);
	}
}

static void test_timer_order(void **state)
{
	struct fixture *fx = *state;
	struct event_log log = { .n = 0 };
	struct timer_probe p[3] = {
		{ .log = &log, .id = 30 },
		{ .log = &log, .id = 10 },
		{ .log = &log, .id = 20 },
	};
	const int want[] = { 10, 20, 30 };
	unsigned i;

	for (i = 0; i < ARRAY_SIZE(p); i++) {
		add_probe_timer(fx->ev, &p[i], (unsigned)p[i].id);
	}
	wait_for(fx->ev, &p[0].done);
	assert_log(&log, want, ARRAY_SIZE(want));
	for (i = 0; i < ARRAY_SIZE(p); i++) {
		assert_timely(&p[i]);
	}
}

static void test_timer_accuracy(void **state)
{
	struct fixture *fx = *state;
	const unsigned delays[] = { 0, 1, 7, 15, 40 };
	struct timer_probe p[ARRAY_SIZE(delays)];
	unsigned i;

	memset(p, 0, sizeof(p));
	for (i = 0; i < ARRAY_SIZE(delays); i++) {
		p[i].id = (int)delays[i];
		add_probe_timer(fx->ev, &p[i], delays[i]);
	}
	wait_for(fx->ev, &p[ARRAY_SIZE(p) - 1].done);
	for (i = 0; i < ARRAY_SIZE(p); i++) {
		assert_timely(&p[i]);
	}
}

struct mover {
	struct tevent_timer *target;
	struct timer_probe *probe;
	unsigned delay_ms;
};

/* moves another timer to delay_ms from now */
static void mover_handler(struct tevent_context *ev, struct tevent_timer *te,
			  struct timeval current_time, void *private_data)
{
	struct mover *m = private_data;

	m->probe->deadline = ofs_ms(m->delay_ms);
	tevent_update_timer(m->target, m->probe->deadline);
}

static void test_timer_update(void **state)
{
	struct fixture *fx = *state;
	struct timer_probe far = { .id = 1 };
	struct timer_probe near = { .id = 2 };
	struct mover m1, m2;
	struct timeval original;
	struct tevent_timer *te;

	/* earlier: 5 s away, moved to 20 ms away while the loop runs */
	te = add_probe_timer(fx->ev, &far, 5000);
	original = far.deadline;
	m1 = (struct mover) { .target = te, .probe = &far, .delay_ms = 20 };
	assert_non_null(tevent_add_timer(fx->ev, fx->ev, ofs_ms(10),
					 mover_handler, &m1));
	wait_for(fx->ev, &far.done);
	assert_timely(&far);
	assert_true(tv_diff_us(&original, &far.fired_at) > 1000000);

	/* later: 15 ms away, moved to 60 ms away after 5 ms */
	te = add_probe_timer(fx->ev, &near, 15);
	m2 = (struct mover) { .target = te, .probe = &near, .delay_ms = 60 };
	assert_non_null(tevent_add_timer(fx->ev, fx->ev, ofs_ms(5),
					 mover_handler, &m2));
	wait_for(fx->ev, &near.done);
	assert_timely(&near);

	/* moved before the loop ever saw it */
	near = (struct timer_probe) { .id = 3 };
	te = add_probe_timer(fx->ev, &near, 5000);
	near.deadline = ofs_ms(10);
	tevent_update_timer(te, near.deadline);
	wait_for(fx->ev, &near.done);
	assert_timely(&near);
}

struct killer {
	struct tevent_timer **victim;
	bool done;
};

static void killer_handler(struct tevent_context *ev, struct tevent_timer *te,
			   struct timeval current_time, void *private_data)
{
	struct killer *k = private_data;

	TALLOC_FREE(*k->victim);
	k->done = true;
}

static void test_timer_free(void **state)
{
	struct fixture *fx = *state;
	struct timer_probe a = { .id = 1 };
	struct timer_probe c = { .id = 3 };
	struct timer_probe d = { .id = 4 };
	struct tevent_timer *te_a, *te_c, *te_self;
	struct killer k = { .victim = &te_c };
	struct killer self = { .victim = &te_self };

	/* freed before the loop runs */
	te_a = add_probe_timer(fx->ev, &a, 10);
	TALLOC_FREE(te_a);
	/* freed by an earlier timer */
	te_c = add_probe_timer(fx->ev, &c, 30);
	assert_non_null(tevent_add_timer(fx->ev, fx->ev, ofs_ms(10),
					 killer_handler, &k));
	/* freed by its own handler */
	te_self = tevent_add_timer(fx->ev, fx->ev, ofs_ms(20), killer_handler,
				   &self);
	assert_non_null(te_self);
	/* a sentinel after all deadlines */
	add_probe_timer(fx->ev, &d, 60);

	wait_for(fx->ev, &d.done);
	assert_true(k.done);
	assert_null(te_c);
	assert_true(self.done);
	assert_null(te_self);
	assert_int_equal(a.calls, 0);
	assert_int_equal(c.calls, 0);
	assert_timely(&d);
}

static void test_timer_zero(void **state)
{
	struct fixture *fx = *state;
	struct event_log log = { .n = 0 };
	struct timer_probe p[3] = {
		{ .log = &log, .id = 1 },
		{ .log = &log, .id = 2 },
		{ .log = &log, .id = 3 },
	};
	const int want[] = { 1, 2, 3 };
	unsigned i;

	for (i = 0; i < ARRAY_SIZE(p); i++) {
		assert_non_null(tevent_add_timer(fx->ev, fx->ev,
						 tevent_timeval_zero(),
						 timer_handler, &p[i]));
	}
	/* a zero timer is due at once: the next iteration runs it */
	assert_int_equal(tevent_loop_once(fx->ev), 0);
	assert_int_equal(p[0].calls, 1);
	/* zero timers run in the order they were added */
	wait_for(fx->ev, &p[2].done);
	assert_log(&log, want, ARRAY_SIZE(want));
}

/* ------------------------------------------------------------------ */
/* 3. immediates */

struct im_probe {
	struct event_log *log;
	int id;
	/* optionally schedule another immediate ... */
	struct tevent_immediate *then_im;
	struct im_probe *then;
	/* ... or free one */
	struct tevent_immediate **victim;
	unsigned calls;
	bool done;
};

static void im_handler(struct tevent_context *ev, struct tevent_immediate *im,
		       void *private_data)
{
	struct im_probe *p = private_data;

	p->calls++;
	p->done = true;
	log_add(p->log, p->id);
	if (p->then_im != NULL) {
		tevent_schedule_immediate(p->then_im, ev, im_handler, p->then);
	}
	if (p->victim != NULL) {
		TALLOC_FREE(*p->victim);
	}
}

static struct tevent_immediate *schedule_probe(struct tevent_context *ev,
					       struct im_probe *p)
{
	struct tevent_immediate *im = tevent_create_immediate(ev);

	assert_non_null(im);
	tevent_schedule_immediate(im, ev, im_handler, p);
	return im;
}

static void test_immediate_fifo(void **state)
{
	struct fixture *fx = *state;
	struct event_log log = { .n = 0 };
	struct im_probe p[5];
	const int want[] = { 0, 1, 2, 3, 4 };
	unsigned i;

	for (i = 0; i < ARRAY_SIZE(p); i++) {
		p[i] = (struct im_probe) { .log = &log, .id = (int)i };
		schedule_probe(fx->ev, &p[i]);
	}
	/* the next iteration runs (at least) the first one */
	assert_int_equal(tevent_loop_once(fx->ev), 0);
	assert_true(log.n >= 1);
	assert_int_equal(log.ids[0], 0);
	wait_for(fx->ev, &p[4].done);
	assert_log(&log, want, ARRAY_SIZE(want));
}

static void test_immediate_chain(void **state)
{
	struct fixture *fx = *state;
	struct event_log log = { .n = 0 };
	struct im_probe a = { .log = &log, .id = 1 };
	struct im_probe b = { .log = &log, .id = 2 };
	struct im_probe c = { .log = &log, .id = 3 };
	struct im_probe d = { .log = &log, .id = 4 };
	const int want[] = { 1, 2, 3, 4 };

	/* a schedules c, which schedules d: they queue up behind b */
	a.then_im = tevent_create_immediate(fx->ev);
	a.then = &c;
	c.then_im = tevent_create_immediate(fx->ev);
	c.then = &d;
	assert_non_null(a.then_im);
	assert_non_null(c.then_im);
	schedule_probe(fx->ev, &a);
	schedule_probe(fx->ev, &b);
	wait_for(fx->ev, &d.done);
	assert_log(&log, want, ARRAY_SIZE(want));

	/* an immediate that reschedules itself runs again */
	log.n = 0;
	a = (struct im_probe) { .log = &log, .id = 5, .then = &a };
	a.then_im = schedule_probe(fx->ev, &a);
	assert_int_equal(tevent_loop_once(fx->ev), 0);
	a.then_im = NULL;
	assert_int_equal(tevent_loop_once(fx->ev), 0);
	assert_int_equal(a.calls, 2);
	run_window(fx->ev, WINDOW_MS);
	assert_int_equal(a.calls, 2);
}

static void test_immediate_before_timer(void **state)
{
	struct fixture *fx = *state;
	struct event_log log = { .n = 0 };
	struct timer_probe t = { .log = &log, .id = 1 };
	struct im_probe im = { .log = &log, .id = 2 };
	struct timeval past = tevent_timeval_current();
	const int want[] = { 2, 1 };

	/* a timer that is overdue, added before the immediate */
	past.tv_sec -= 1;
	t.deadline = past;
	assert_non_null(tevent_add_timer(fx->ev, fx->ev, past, timer_handler,
					 &t));
	schedule_probe(fx->ev, &im);
	wait_for(fx->ev, &t.done);
	assert_log(&log, want, ARRAY_SIZE(want));
}

static void test_immediate_free(void **state)
{
	struct fixture *fx = *state;
	struct event_log log = { .n = 0 };
	struct im_probe freed = { .log = &log, .id = 1 };
	struct im_probe cancelled = { .log = &log, .id = 2 };
	struct im_probe killer = { .log = &log, .id = 3 };
	struct im_probe victim = { .log = &log, .id = 4 };
	struct im_probe sentinel = { .log = &log, .id = 5 };
	struct im_probe selfish = { .log = &log, .id = 6 };
	struct tevent_immediate *im, *victim_im, *selfish_im;
	const int want[] = { 3, 6, 5 };

	/* freed after scheduling */
	im = schedule_probe(fx->ev, &freed);
	talloc_free(im);
	/* cancelled by scheduling it without a handler */
	im = schedule_probe(fx->ev, &cancelled);
	tevent_schedule_immediate(im, fx->ev, NULL, NULL);
	/* freed by an immediate that runs before it */
	killer.victim = &victim_im;
	schedule_probe(fx->ev, &killer);
	victim_im = schedule_probe(fx->ev, &victim);
	/* freed by its own handler */
	selfish.victim = &selfish_im;
	selfish_im = schedule_probe(fx->ev, &selfish);
	schedule_probe(fx->ev, &sentinel);

	wait_for(fx->ev, &sentinel.done);
	assert_log(&log, want, ARRAY_SIZE(want));
	assert_null(victim_im);
	assert_null(selfish_im);
	run_window(fx->ev, WINDOW_MS);
	assert_log(&log, want, ARRAY_SIZE(want));
}

/* ------------------------------------------------------------------ */
/* 4. signals */

struct sig_probe {
	unsigned calls;
	int signum;
	int count_sum;
	bool have_info;
	int si_signo;
	int si_code;
	int sival;
	bool done;
};

static void sig_handler(struct tevent_context *ev, struct tevent_signal *se,
			int signum, int count, void *siginfo,
			void *private_data)
{
	struct sig_probe *p = private_data;

	p->calls++;
	p->signum = signum;
	p->count_sum += count;
	if (siginfo != NULL) {
		const siginfo_t *si = siginfo;

		p->have_info = true;
		p->si_signo = si->si_signo;
		p->si_code = si->si_code;
		p->sival = si->si_value.sival_int;
	}
	p->done = true;
}

/* tevent restores the previous disposition when its last handler goes */
static void assert_disposition(const struct sigaction *want)
{
	struct sigaction now;

	assert_int_equal(sigaction(SIGUSR1, NULL, &now), 0);
	assert_ptr_equal((void *)now.sa_handler, (void *)want->sa_handler);
}

static void test_signal(void **state)
{
	struct fixture *fx = *state;
	struct sig_probe p = { .calls = 0 };
	struct tevent_signal *se;
	struct sigaction before;

	assert_int_equal(sigaction(SIGUSR1, NULL, &before), 0);
	se = tevent_add_signal(fx->ev, fx->ev, SIGUSR1, 0, sig_handler, &p);
	assert_non_null(se);

	assert_int_equal(raise(SIGUSR1), 0);
	wait_for(fx->ev, &p.done);
	assert_int_equal(p.calls, 1);
	assert_int_equal(p.signum, SIGUSR1);
	assert_int_equal(p.count_sum, 1);
	assert_false(p.have_info);

	/* once only */
	run_window(fx->ev, WINDOW_MS);
	assert_int_equal(p.calls, 1);

	TALLOC_FREE(se);
	assert_disposition(&before);
	sigaction(SIGUSR1, &before, NULL);
}

static void test_signal_info(void **state)
{
	struct fixture *fx = *state;
	struct sig_probe p = { .calls = 0 };
	struct tevent_signal *se;
	struct sigaction before;
	union sigval val = { .sival_int = 4242 };

	assert_int_equal(sigaction(SIGUSR1, NULL, &before), 0);
	se = tevent_add_signal(fx->ev, fx->ev, SIGUSR1, SA_SIGINFO,
			       sig_handler, &p);
	assert_non_null(se);

	assert_int_equal(pthread_sigqueue(pthread_self(), SIGUSR1, val), 0);
	wait_for(fx->ev, &p.done);
	assert_int_equal(p.calls, 1);
	assert_int_equal(p.signum, SIGUSR1);
	assert_int_equal(p.count_sum, 1);
	assert_true(p.have_info);
	assert_int_equal(p.si_signo, SIGUSR1);
	assert_int_equal(p.si_code, SI_QUEUE);
	assert_int_equal(p.sival, 4242);

	TALLOC_FREE(se);
	assert_disposition(&before);
	sigaction(SIGUSR1, &before, NULL);
}

struct kicker {
	pthread_t target;
	unsigned delay_ms;
};

static void *kicker_main(void *arg)
{
	struct kicker *k = arg;
	struct timespec ts = {
		.tv_sec = k->delay_ms / 1000,
		.tv_nsec = (long)(k->delay_ms % 1000) * 1000000L,
	};

	nanosleep(&ts, NULL);
	pthread_kill(k->target, SIGUSR1);
	return NULL;
}

/* a signal that arrives while the loop waits wakes it */
static void test_signal_wakes_loop(void **state)
{
	struct fixture *fx = *state;
	struct sig_probe p = { .calls = 0 };
	struct kicker k = { .target = pthread_self(), .delay_ms = 20 };
	struct tevent_signal *se;
	struct sigaction before;
	pthread_t thread;
	bool ok;

	assert_int_equal(sigaction(SIGUSR1, NULL, &before), 0);
	se = tevent_add_signal(fx->ev, fx->ev, SIGUSR1, 0, sig_handler, &p);
	assert_non_null(se);

	assert_int_equal(pthread_create(&thread, NULL, kicker_main, &k), 0);
	ok = wait_for_quietly(fx->ev, &p.done);
	assert_int_equal(pthread_join(thread, NULL), 0);
	assert_true(ok);
	assert_int_equal(p.calls, 1);
	assert_int_equal(p.count_sum, 1);

	TALLOC_FREE(se);
	assert_disposition(&before);
	sigaction(SIGUSR1, &before, NULL);
}

/*
 * A chain of immediates (each handler schedules the next) keeps every
 * iteration busy. Stock backends still check signals and move cross-thread
 * immediates onto the queue first in every iteration, so both are served
 * at once; fds and timers wait for the chain to end in every backend.
 * (evpoll once ran queued immediates first and starved both.)
 */

#define CHAIN_MAX 10000
#define CHAIN_FAIR 100

struct chain {
	unsigned runs;
	bool stop;
	bool sig_seen;
	unsigned sig_at;
	bool tim_seen;
	unsigned tim_at;
	bool both;
};

static void chain_handler(struct tevent_context *ev,
			  struct tevent_immediate *im, void *private_data)
{
	struct chain *c = private_data;

	c->runs++;
	if (!c->stop && c->runs < CHAIN_MAX) {
		tevent_schedule_immediate(im, ev, chain_handler, c);
	}
}

static void chain_sig_handler(struct tevent_context *ev,
			      struct tevent_signal *se, int signum, int count,
			      void *siginfo, void *private_data)
{
	struct chain *c = private_data;

	if (!c->sig_seen) {
		c->sig_seen = true;
		c->sig_at = c->runs;
	}
	c->both = c->sig_seen && c->tim_seen;
}

static void chain_tim_handler(struct tevent_context *ev,
			      struct tevent_immediate *im, void *private_data)
{
	struct chain *c = private_data;

	c->tim_seen = true;
	c->tim_at = c->runs;
	c->both = c->sig_seen && c->tim_seen;
}

static void test_immediate_chain_fairness(void **state)
{
	struct fixture *fx = *state;
	struct chain c = { .runs = 0 };
	struct tevent_threaded_context *tctx;
	struct tevent_immediate *im, *tim;
	struct tevent_signal *se;
	struct sigaction before;

	assert_int_equal(sigaction(SIGUSR1, NULL, &before), 0);
	se = tevent_add_signal(fx->ev, fx->ev, SIGUSR1, 0, chain_sig_handler,
			       &c);
	assert_non_null(se);
	tctx = tevent_threaded_context_create(fx->mem, fx->ev);
	assert_non_null(tctx);
	/* not freed while queued (that aborts): leaked if the test fails */
	tim = tevent_create_immediate(NULL);
	assert_non_null(tim);
	im = tevent_create_immediate(fx->ev);
	assert_non_null(im);
	tevent_schedule_immediate(im, fx->ev, chain_handler, &c);

	assert_int_equal(raise(SIGUSR1), 0);
	tevent_threaded_schedule_immediate(tctx, tim, chain_tim_handler, &c);
	while (!c.both && c.runs < CHAIN_MAX) {
		assert_int_equal(tevent_loop_once(fx->ev), 0);
	}
	c.stop = true;
	/* served after the chain ended at the latest */
	wait_for(fx->ev, &c.both);
	talloc_free(tim);
	TALLOC_FREE(se);
	TALLOC_FREE(tctx);
	sigaction(SIGUSR1, &before, NULL);

	if (c.sig_at > CHAIN_FAIR || c.tim_at > CHAIN_FAIR) {
		fail_msg("served after this many chained immediates: "
			 "signal %u, cross-thread immediate %u",
			 c.sig_at, c.tim_at);
	}
}

/* ------------------------------------------------------------------ */
/* 5. threaded immediates */

struct tim_test;

struct tim_slot {
	struct tim_test *t;
	unsigned id;
};

struct tim_test {
	/* set before the sender starts, read-only afterwards */
	struct tevent_threaded_context *tctx;
	struct tevent_immediate **ims;
	struct tim_slot *slots;
	unsigned n;
	/* owner thread only */
	unsigned calls;
	unsigned next_id;
	unsigned out_of_order;
	bool done;
};

static void tim_handler(struct tevent_context *ev, struct tevent_immediate *im,
			void *private_data)
{
	struct tim_slot *s = private_data;
	struct tim_test *t = s->t;

	t->calls++;
	if (s->id != t->next_id) {
		t->out_of_order++;
	}
	t->next_id = s->id + 1;
	if (t->calls == t->n) {
		t->done = true;
	}
}

static void *tim_sender(void *arg)
{
	struct tim_test *t = arg;
	unsigned i;

	for (i = 0; i < t->n; i++) {
		tevent_threaded_schedule_immediate(t->tctx, t->ims[i],
						   tim_handler, &t->slots[i]);
	}
	return NULL;
}

static void test_threaded_immediates(void **state)
{
	struct fixture *fx = *state;
	struct tim_test t = { .n = (unsigned)tu_scale(1000) };
	TALLOC_CTX *mem = talloc_new(fx->mem);
	pthread_t thread;
	unsigned i;
	bool ok;

	assert_non_null(mem);
	t.tctx = tevent_threaded_context_create(mem, fx->ev);
	assert_non_null(t.tctx);
	/*
	 * Freeing a threaded immediate that is still queued aborts, even
	 * when its context is freed first: if the test fails, leak them.
	 */
	t.ims = talloc_array(NULL, struct tevent_immediate *, t.n);
	t.slots = talloc_array(mem, struct tim_slot, t.n);
	assert_non_null(t.ims);
	assert_non_null(t.slots);
	for (i = 0; i < t.n; i++) {
		t.ims[i] = tevent_create_immediate(t.ims);
		assert_non_null(t.ims[i]);
		t.slots[i] = (struct tim_slot) { .t = &t, .id = i };
	}

	assert_int_equal(pthread_create(&thread, NULL, tim_sender, &t), 0);
	ok = wait_for_quietly(fx->ev, &t.done);
	assert_int_equal(pthread_join(thread, NULL), 0);
	if (!ok) {
		fail_msg("%u of %u threaded immediates ran", t.calls, t.n);
	}
	assert_int_equal(t.calls, t.n);
	assert_int_equal(t.out_of_order, 0);

	/* exactly n */
	run_window(fx->ev, WINDOW_MS);
	assert_int_equal(t.calls, t.n);

	TALLOC_FREE(t.tctx);
	talloc_free(t.ims);
	talloc_free(mem);
}

/* ------------------------------------------------------------------ */
/* 6. thread proxies */

struct proxy_test {
	/* set before the sender starts */
	struct tevent_thread_proxy *tp;
	unsigned n;
	/* sender thread only */
	unsigned send_failures;
	/* owner thread only */
	unsigned calls;
	unsigned dups;
	unsigned bad_ids;
	bool *seen;
	bool done;
};

struct proxy_msg {
	struct proxy_test *t;
	unsigned id;
};

static void proxy_handler(struct tevent_context *ev,
			  struct tevent_immediate *im, void *private_data)
{
	struct proxy_msg *msg = private_data;
	struct proxy_test *t = msg->t;

	t->calls++;
	if (msg->id >= t->n) {
		t->bad_ids++;
	} else if (t->seen[msg->id]) {
		t->dups++;
	} else {
		t->seen[msg->id] = true;
	}
	if (t->calls == t->n) {
		t->done = true;
	}
}

static void *proxy_sender(void *arg)
{
	struct proxy_test *t = arg;
	unsigned i;

	for (i = 0; i < t->n; i++) {
		/* talloc on the NULL context of this thread */
		struct tevent_immediate *im = tevent_create_immediate(NULL);
		struct proxy_msg *msg = talloc(NULL, struct proxy_msg);

		if (im == NULL || msg == NULL) {
			TALLOC_FREE(im);
			TALLOC_FREE(msg);
			t->send_failures++;
			continue;
		}
		msg->t = t;
		msg->id = i;
		tevent_thread_proxy_schedule(t->tp, &im, proxy_handler, &msg);
		if (im != NULL || msg != NULL) {
			TALLOC_FREE(im);
			TALLOC_FREE(msg);
			t->send_failures++;
		}
	}
	return NULL;
}

static void test_thread_proxy(void **state)
{
	struct fixture *fx = *state;
	struct proxy_test t = { .n = (unsigned)tu_scale(1000) };
	pthread_t thread;
	unsigned i;
	bool ok;

	t.seen = talloc_zero_array(fx->mem, bool, t.n);
	assert_non_null(t.seen);
	t.tp = tevent_thread_proxy_create(fx->ev);
	assert_non_null(t.tp);

	assert_int_equal(pthread_create(&thread, NULL, proxy_sender, &t), 0);
	ok = wait_for_quietly(fx->ev, &t.done);
	assert_int_equal(pthread_join(thread, NULL), 0);
	assert_int_equal(t.send_failures, 0);
	if (!ok) {
		fail_msg("%u of %u proxied immediates ran", t.calls, t.n);
	}

	/* exactly n, each once; tevent delivers a batch in reverse order */
	run_window(fx->ev, WINDOW_MS);
	assert_int_equal(t.calls, t.n);
	assert_int_equal(t.dups, 0);
	assert_int_equal(t.bad_ids, 0);
	for (i = 0; i < t.n; i++) {
		assert_true(t.seen[i]);
	}

	TALLOC_FREE(t.tp);
}

/* ------------------------------------------------------------------ */
/* 7. nested loops */

struct nest_state {
	int outer_fd;
	int inner_wfd;
	int inner_fd;
	unsigned depth;
	unsigned outer_calls;
	bool outer_done;
	bool nested_failed;
	bool inner_fd_done;
	bool inner_fd_nested;
	bool inner_timer_done;
	bool inner_timer_nested;
};

static void inner_fd_handler(struct tevent_context *ev,
			     struct tevent_fd *fde, uint16_t flags,
			     void *private_data)
{
	struct nest_state *s = private_data;

	drain(s->inner_fd);
	s->inner_fd_done = true;
	s->inner_fd_nested = s->depth > 0;
}

static void inner_timer_handler(struct tevent_context *ev,
				struct tevent_timer *te,
				struct timeval current_time,
				void *private_data)
{
	struct nest_state *s = private_data;

	s->inner_timer_done = true;
	s->inner_timer_nested = s->depth > 0;
}

/* runs a nested loop until an fd event and a timer were processed */
static void outer_fd_handler(struct tevent_context *ev,
			     struct tevent_fd *fde, uint16_t flags,
			     void *private_data)
{
	struct nest_state *s = private_data;
	uint64_t deadline = tu_now_ns() + LOOP_TIMEOUT_MS * 1000000ULL;
	struct tevent_timer *guard = add_guard(ev);
	char c = 'b';

	s->outer_calls++;
	drain(s->outer_fd);
	s->depth++;
	if (guard == NULL || write(s->inner_wfd, &c, 1) != 1 ||
	    tevent_add_timer(ev, ev, ofs_ms(5), inner_timer_handler,
			     s) == NULL) {
		s->nested_failed = true;
	}
	while (!s->nested_failed &&
	       !(s->inner_fd_done && s->inner_timer_done)) {
		if (tevent_loop_once(ev) != 0 || tu_now_ns() > deadline) {
			s->nested_failed = true;
		}
	}
	s->depth--;
	talloc_free(guard);
	s->outer_done = true;
}

static void test_nested_loop(void **state)
{
	struct fixture *fx = *state;
	struct nest_state s = { .depth = 0 };
	int a[2], b[2];

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
	tevent_loop_allow_nesting(fx->ev);
#pragma GCC diagnostic pop

	fx_pipe(fx, a);
	fx_pipe(fx, b);
	s.outer_fd = a[0];
	s.inner_fd = b[0];
	s.inner_wfd = b[1];
	assert_non_null(tevent_add_fd(fx->ev, fx->ev, a[0], TEVENT_FD_READ,
				      outer_fd_handler, &s));
	assert_non_null(tevent_add_fd(fx->ev, fx->ev, b[0], TEVENT_FD_READ,
				      inner_fd_handler, &s));
	put_byte(a[1], 'a');

	wait_for(fx->ev, &s.outer_done);
	assert_false(s.nested_failed);
	assert_int_equal(s.outer_calls, 1);
	assert_true(s.inner_fd_done);
	assert_true(s.inner_fd_nested);
	assert_true(s.inner_timer_done);
	assert_true(s.inner_timer_nested);

	/* the outer loop still works */
	s.inner_fd_done = false;
	put_byte(b[1], 'c');
	wait_for(fx->ev, &s.inner_fd_done);
	assert_false(s.inner_fd_nested);
	assert_int_equal(s.outer_calls, 1);
}

/* ------------------------------------------------------------------ */
/* 8. tevent_loop_wait */

static uint64_t last_handler_ns;

static void wait_timer_handler(struct tevent_context *ev,
			       struct tevent_timer *te,
			       struct timeval current_time, void *private_data)
{
	unsigned *calls = private_data;

	(*calls)++;
	last_handler_ns = tu_now_ns();
}

static void wait_im_handler(struct tevent_context *ev,
			    struct tevent_immediate *im, void *private_data)
{
	unsigned *calls = private_data;

	(*calls)++;
	last_handler_ns = tu_now_ns();
}

struct wait_fd {
	int fd;
	unsigned calls;
	struct tevent_fd *fde;
};

static void wait_fd_handler(struct tevent_context *ev, struct tevent_fd *fde,
			    uint16_t flags, void *private_data)
{
	struct wait_fd *w = private_data;

	w->calls++;
	drain(w->fd);
	TALLOC_FREE(w->fde);
	last_handler_ns = tu_now_ns();
}

/* tevent_loop_wait() returns 0 soon after the last event is gone */
static void run_loop_wait(const char *spec, struct tevent_context *ev)
{
	uint64_t lag_ms;
	int ret;

	last_handler_ns = 0;
	watchdog_arm(spec, "tevent_loop_wait");
	ret = tevent_loop_wait(ev);
	watchdog_disarm();
	assert_int_equal(ret, 0);
	assert_true(last_handler_ns != 0);
	lag_ms = (tu_now_ns() - last_handler_ns) / 1000000;
	if (lag_ms > 10 * late_bound_ms()) {
		fail_msg("tevent_loop_wait returned %llu ms after the last "
			 "event", (unsigned long long)lag_ms);
	}
}

static void test_loop_wait(void **state)
{
	struct fixture *fx = *state;
	struct tevent_immediate *im = tevent_create_immediate(fx->ev);
	struct tevent_threaded_context *tctx;
	struct wait_fd w = { .calls = 0 };
	unsigned timer_calls = 0, im_calls = 0;
	int fds[2];

	/* a timer and an immediate */
	assert_non_null(im);
	assert_non_null(tevent_add_timer(fx->ev, fx->ev, ofs_ms(20),
					 wait_timer_handler, &timer_calls));
	tevent_schedule_immediate(im, fx->ev, wait_im_handler, &im_calls);
	run_loop_wait(fx->spec, fx->ev);
	assert_int_equal(timer_calls, 1);
	assert_int_equal(im_calls, 1);

	/* an fd event that removes itself */
	fx_pipe(fx, fds);
	w.fd = fds[0];
	w.fde = tevent_add_fd(fx->ev, fx->ev, fds[0], TEVENT_FD_READ,
			      wait_fd_handler, &w);
	assert_non_null(w.fde);
	put_byte(fds[1], 'a');
	run_loop_wait(fx->spec, fx->ev);
	assert_int_equal(w.calls, 1);

	/* a threaded context's internal wakeup fd is not an event */
	tctx = tevent_threaded_context_create(fx->mem, fx->ev);
	assert_non_null(tctx);
	tevent_schedule_immediate(im, fx->ev, wait_im_handler, &im_calls);
	run_loop_wait(fx->spec, fx->ev);
	assert_int_equal(im_calls, 2);
	TALLOC_FREE(tctx);

	/* nothing at all */
	watchdog_arm(fx->spec, "tevent_loop_wait");
	assert_int_equal(tevent_loop_wait(fx->ev), 0);
	watchdog_disarm();
}

/* ------------------------------------------------------------------ */
/* 9. tevent_re_initialise, in this process and after fork */

/* re-initialised in place: old events are gone, new ones work */
static void test_reinit(void **state)
{
	struct fixture *fx = *state;
	struct fd_probe old_fd = { .calls = 0 }, new_fd = { .calls = 0 };
	struct timer_probe old_timer = { .id = 1 }, new_timer = { .id = 2 };
	struct event_log log = { .n = 0 };
	struct im_probe old_im = { .log = &log, .id = 1 };
	struct im_probe new_im = { .log = &log, .id = 2 };
	struct tevent_fd *old_fde;
	const int want[] = { 2 };
	int a[2], b[2];

	fx_pipe(fx, a);
	fx_pipe(fx, b);
	old_fd.fd = a[0];
	new_fd.fd = b[0];
	old_fde = tevent_add_fd(fx->ev, fx->ev, a[0], TEVENT_FD_READ,
				read_handler, &old_fd);
	assert_non_null(old_fde);
	add_probe_timer(fx->ev, &old_timer, 0);
	schedule_probe(fx->ev, &old_im);
	/*
	 * A loop that has run (for evpoll: spinning); the immediate runs
	 * first, the timer and the fd are still pending.
	 */
	put_byte(a[1], 'a');
	wait_for(fx->ev, &old_im.done);

	assert_int_equal(tevent_re_initialise(fx->ev), 0);
	/* a detached fd handler can still be freed */
	TALLOC_FREE(old_fde);
	add_probe_timer(fx->ev, &new_timer, 5);
	assert_non_null(tevent_add_fd(fx->ev, fx->ev, b[0], TEVENT_FD_READ,
				      read_handler, &new_fd));
	schedule_probe(fx->ev, &new_im);
	log.n = 0;
	put_byte(b[1], 'c');
	wait_for(fx->ev, &new_timer.done);
	wait_for(fx->ev, &new_fd.done);
	run_window(fx->ev, WINDOW_MS);
	assert_log(&log, want, ARRAY_SIZE(want));
	assert_timely(&new_timer);
	assert_int_equal(new_fd.len, 1);
	assert_int_equal(new_fd.buf[0], 'c');
	/* the pending events from before were dropped */
	assert_int_equal(old_im.calls, 1);
	assert_int_equal(old_timer.calls, 0);
	assert_int_equal(old_fd.calls, 0);
}

/* exit codes of the child */
enum {
	CHILD_OK = 0,
	CHILD_REINIT = 10,
	CHILD_SETUP,
	CHILD_LOOP,
	CHILD_WRONG_DATA,
	CHILD_RAN_PARENT_HANDLER,
};

static int child_main(struct tevent_context *ev, struct tevent_fd *inherited,
		      const struct fd_probe *parent_probe)
{
	struct fd_probe p = { .calls = 0 };
	struct timer_probe t = { .id = 1 };
	unsigned parent_calls = parent_probe->calls;
	int fds[2];

	if (tevent_re_initialise(ev) != 0) {
		return CHILD_REINIT;
	}
	/* the parent's fd handler is detached: freeing it is harmless */
	talloc_free(inherited);

	if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) {
		return CHILD_SETUP;
	}
	p.fd = fds[0];
	t.deadline = ofs_ms(10);
	if (tevent_add_fd(ev, ev, fds[0], TEVENT_FD_READ, read_handler,
			  &p) == NULL ||
	    tevent_add_timer(ev, ev, t.deadline, timer_handler, &t) == NULL ||
	    write(fds[1], "c", 1) != 1) {
		return CHILD_SETUP;
	}
	if (!wait_for_quietly(ev, &p.done) || !wait_for_quietly(ev, &t.done)) {
		return CHILD_LOOP;
	}
	if (p.len != 1 || p.buf[0] != 'c' || t.calls != 1 ||
	    tv_diff_us(&t.fired_at, &t.deadline) < 0) {
		return CHILD_WRONG_DATA;
	}
	/* the byte pending on the parent's pipe is not ours to handle */
	if (parent_probe->calls != parent_calls) {
		return CHILD_RAN_PARENT_HANDLER;
	}
	return CHILD_OK;
}

static void test_fork_reinit(void **state)
{
	struct fixture *fx = *state;
	struct fd_probe p = { .calls = 0 };
	struct tevent_fd *fde;
	int status = 0;
	pid_t pid;
	int fds[2];

	fx_pipe(fx, fds);
	p.fd = fds[0];
	fde = tevent_add_fd(fx->ev, fx->ev, fds[0], TEVENT_FD_READ,
			    read_handler, &p);
	assert_non_null(fde);
	/* a live loop (for evpoll: spinning) at the time of the fork */
	put_byte(fds[1], 'a');
	wait_for(fx->ev, &p.done);
	assert_int_equal(p.len, 1);

	/* pending for the parent across the fork */
	put_byte(fds[1], 'b');
	fflush(stdout);
	fflush(stderr);
	pid = fork();
	assert_true(pid != -1);
	if (pid == 0) {
		int code;

		alarm(WATCHDOG_S);
		code = child_main(fx->ev, fde, &p);
		/* for valgrind's leak check at the child's exit */
		talloc_free(fx->mem);
		talloc_free(fx->ev);
		_exit(code);
	}
	assert_int_equal(waitpid(pid, &status, 0), pid);
	if (!WIFEXITED(status)) {
		fail_msg("child died with status 0x%x", (unsigned)status);
	}
	assert_int_equal(WEXITSTATUS(status), CHILD_OK);

	/* the parent's loop still serves its fd */
	p.done = false;
	wait_for(fx->ev, &p.done);
	assert_int_equal(p.calls, 2);
	assert_int_equal(p.len, 2);
	assert_memory_equal(p.buf, "ab", 2);
}

/* ------------------------------------------------------------------ */
/* 10. several contexts on one thread, contexts on several threads */

struct relay {
	int in_fd;
	int out_fd;	/* -1: do not forward */
	unsigned calls;
	bool done;
};

/* reads a byte and forwards it */
static void relay_handler(struct tevent_context *ev, struct tevent_fd *fde,
			  uint16_t flags, void *private_data)
{
	struct relay *r = private_data;
	char c;

	if (read(r->in_fd, &c, 1) != 1) {
		return;
	}
	r->calls++;
	r->done = true;
	if (r->out_fd != -1 && write(r->out_fd, &c, 1) != 1) {
		r->calls += 1000000;	/* shows up in the asserts */
	}
}

static void test_two_contexts(void **state)
{
	struct fixture *fx = *state;
	struct relay r1 = { .out_fd = -1 }, r2 = { .out_fd = -1 };
	struct relay r3 = { .out_fd = -1 };
	struct timer_probe t1 = { .id = 1 }, t2 = { .id = 2 };
	unsigned rounds = (unsigned)tu_scale(200);
	unsigned i;
	int p1[2], p2[2], p3[2];

	fx->ev2 = tu_context(NULL, fx->spec);
	fx_pipe(fx, p1);
	fx_pipe(fx, p2);
	r1.in_fd = p1[0];
	r2.in_fd = p2[0];
	assert_non_null(tevent_add_fd(fx->ev, fx->ev, p1[0], TEVENT_FD_READ,
				      relay_handler, &r1));
	assert_non_null(tevent_add_fd(fx->ev2, fx->ev2, p2[0], TEVENT_FD_READ,
				      relay_handler, &r2));

	/* each context runs only its own events */
	put_byte(p1[1], 'a');
	put_byte(p2[1], 'b');
	add_probe_timer(fx->ev, &t1, 10);
	add_probe_timer(fx->ev2, &t2, 0);
	wait_for(fx->ev, &t1.done);
	assert_int_equal(r1.calls, 1);
	assert_int_equal(r2.calls, 0);
	assert_int_equal(t2.calls, 0);
	wait_for(fx->ev2, &t2.done);
	wait_for(fx->ev2, &r2.done);
	assert_int_equal(r1.calls, 1);
	assert_int_equal(r2.calls, 1);
	assert_timely(&t1);

	/* ping-pong between the two, run alternately */
	r1.out_fd = p2[1];
	r2.out_fd = p1[1];
	put_byte(p1[1], 'x');
	for (i = 0; i < rounds; i++) {
		r1.done = false;
		wait_for(fx->ev, &r1.done);
		r2.done = false;
		wait_for(fx->ev2, &r2.done);
	}
	assert_int_equal(r1.calls, rounds + 1);
	assert_int_equal(r2.calls, rounds + 1);
	assert_int_equal(drain(p1[0]), 1);

	/* a context freed, a new one (maybe at the same address) works */
	TALLOC_FREE(fx->ev2);
	fx->ev2 = tu_context(NULL, fx->spec);
	fx_pipe(fx, p3);
	r3.in_fd = p3[0];
	assert_non_null(tevent_add_fd(fx->ev2, fx->ev2, p3[0], TEVENT_FD_READ,
				      relay_handler, &r3));
	put_byte(p3[1], 'c');
	wait_for(fx->ev2, &r3.done);
	r1.done = false;
	r1.out_fd = -1;
	put_byte(p1[1], 'd');
	wait_for(fx->ev, &r1.done);
	assert_int_equal(r3.calls, 1);
	assert_int_equal(r1.calls, rounds + 2);
}

#define NUM_THREADS 4

struct worker {
	const char *spec;
	pthread_barrier_t *start;
	unsigned rounds;
	int sv[2];
	unsigned pongs;
	bool timer_done;
	struct timeval deadline;
	struct timeval fired_at;
	const char *error;	/* NULL on success */
};

/* a context for spec, without cmocka: its asserts are not thread-safe */
static struct tevent_context *thread_context(const char *spec)
{
	static const struct {
		const char *spec;
		enum evpoll_mode mode;
	} modes[] = {
		{ "evpoll-never", EVPOLL_MODE_NEVER },
		{ "evpoll-auto", EVPOLL_MODE_AUTO },
		{ "evpoll-always", EVPOLL_MODE_ALWAYS },
	};
	struct evpoll_config cfg;
	size_t i;

	for (i = 0; i < ARRAY_SIZE(modes); i++) {
		if (strcmp(spec, modes[i].spec) == 0) {
			evpoll_config_default(&cfg);
			cfg.mode = modes[i].mode;
			return evpoll_context_init(NULL, &cfg);
		}
	}
	return tevent_context_init_byname(NULL, spec);
}

/* sv[1]: sends every byte back */
static void echo_handler(struct tevent_context *ev, struct tevent_fd *fde,
			 uint16_t flags, void *private_data)
{
	struct worker *w = private_data;
	char c;

	if (read(w->sv[1], &c, 1) == 1 && write(w->sv[1], &c, 1) != 1) {
		w->error = "echo write failed";
	}
}

/* sv[0]: counts a pong, sends the next ping */
static void pong_handler(struct tevent_context *ev, struct tevent_fd *fde,
			 uint16_t flags, void *private_data)
{
	struct worker *w = private_data;
	char c;

	if (read(w->sv[0], &c, 1) != 1) {
		return;
	}
	w->pongs++;
	if (w->pongs < w->rounds && write(w->sv[0], &c, 1) != 1) {
		w->error = "ping write failed";
	}
}

static void worker_timer_handler(struct tevent_context *ev,
				 struct tevent_timer *te,
				 struct timeval current_time,
				 void *private_data)
{
	struct worker *w = private_data;

	w->fired_at = tevent_timeval_current();
	w->timer_done = true;
}

static void worker_run(struct worker *w)
{
	uint64_t deadline;
	struct tevent_context *ev;

	pthread_barrier_wait(w->start);
	/* all threads create their first context at the same time */
	ev = thread_context(w->spec);
	if (ev == NULL) {
		w->error = "no context";
		return;
	}
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0,
		       w->sv) != 0) {
		w->error = "socketpair failed";
		talloc_free(ev);
		return;
	}
	w->deadline = ofs_ms(10);
	if (tevent_add_fd(ev, ev, w->sv[0], TEVENT_FD_READ, pong_handler,
			  w) == NULL ||
	    tevent_add_fd(ev, ev, w->sv[1], TEVENT_FD_READ, echo_handler,
			  w) == NULL ||
	    tevent_add_timer(ev, ev, w->deadline, worker_timer_handler,
			     w) == NULL ||
	    add_guard(ev) == NULL ||
	    write(w->sv[0], "p", 1) != 1) {
		w->error = "setup failed";
	}
	deadline = tu_now_ns() + LOOP_TIMEOUT_MS * 1000000ULL;
	while (w->error == NULL &&
	       !(w->pongs == w->rounds && w->timer_done)) {
		if (tevent_loop_once(ev) != 0) {
			w->error = "tevent_loop_once failed";
		} else if (tu_now_ns() > deadline) {
			w->error = "timeout";
		}
	}
	if (w->error == NULL &&
	    tv_diff_us(&w->fired_at, &w->deadline) < 0) {
		w->error = "timer fired early";
	}
	talloc_free(ev);
	close(w->sv[0]);
	close(w->sv[1]);
}

static void *worker_main(void *arg)
{
	worker_run(arg);
	return NULL;
}

static void test_threads(void **state)
{
	struct fixture *fx = *state;
	struct worker w[NUM_THREADS];
	pthread_t threads[NUM_THREADS];
	pthread_barrier_t start;
	unsigned i;

	assert_int_equal(pthread_barrier_init(&start, NULL, NUM_THREADS), 0);
	for (i = 0; i < NUM_THREADS; i++) {
		w[i] = (struct worker) {
			.spec = fx->spec,
			.start = &start,
			.rounds = (unsigned)tu_scale(200),
		};
	}
	for (i = 0; i < NUM_THREADS; i++) {
		assert_int_equal(pthread_create(&threads[i], NULL,
						worker_main, &w[i]), 0);
	}
	for (i = 0; i < NUM_THREADS; i++) {
		assert_int_equal(pthread_join(threads[i], NULL), 0);
	}
	pthread_barrier_destroy(&start);
	for (i = 0; i < NUM_THREADS; i++) {
		if (w[i].error != NULL) {
			fail_msg("thread %u: %s (%u of %u pongs)", i,
				 w[i].error, w[i].pongs, w[i].rounds);
		}
		assert_int_equal(w[i].pongs, w[i].rounds);
		assert_true(w[i].timer_done);
	}

	/* this thread's context is unaffected */
	run_window(fx->ev, 1);
}

/* ------------------------------------------------------------------ */

#define CT(spec, fn) {						\
	.name = spec "/" #fn,					\
	.test_func = fn,					\
	.setup_func = fx_setup,					\
	.teardown_func = fx_teardown,				\
	.initial_state = (void *)spec,				\
}

#define CONFORMANCE_TESTS(spec)					\
	CT(spec, test_fd_read),					\
	CT(spec, test_fd_write),				\
	CT(spec, test_fd_set_flags),				\
	CT(spec, test_fd_free_self),				\
	CT(spec, test_fd_free_other),				\
	CT(spec, test_fd_close),				\
	CT(spec, test_fd_shared),				\
	CT(spec, test_timer_order),				\
	CT(spec, test_timer_accuracy),				\
	CT(spec, test_timer_update),				\
	CT(spec, test_timer_free),				\
	CT(spec, test_timer_zero),				\
	CT(spec, test_immediate_fifo),				\
	CT(spec, test_immediate_chain),				\
	CT(spec, test_immediate_before_timer),			\
	CT(spec, test_immediate_free),				\
	CT(spec, test_immediate_chain_fairness),		\
	CT(spec, test_signal),					\
	CT(spec, test_signal_info),				\
	CT(spec, test_signal_wakes_loop),			\
	CT(spec, test_threaded_immediates),			\
	CT(spec, test_thread_proxy),				\
	CT(spec, test_nested_loop),				\
	CT(spec, test_loop_wait),				\
	CT(spec, test_reinit),					\
	CT(spec, test_fork_reinit),				\
	CT(spec, test_two_contexts),				\
	CT(spec, test_threads)

int main(int argc, char **argv)
{
	static const struct CMUnitTest epoll_tests[] = {
		CONFORMANCE_TESTS("epoll"),
	};
	static const struct CMUnitTest poll_tests[] = {
		CONFORMANCE_TESTS("poll"),
	};
	static const struct CMUnitTest never_tests[] = {
		CONFORMANCE_TESTS("evpoll-never"),
	};
	static const struct CMUnitTest auto_tests[] = {
		CONFORMANCE_TESTS("evpoll-auto"),
	};
	static const struct CMUnitTest always_tests[] = {
		CONFORMANCE_TESTS("evpoll-always"),
	};
	int failed = 0;

	if (argc > 1) {
		cmocka_set_test_filter(argv[1]);
	}
	/* thread proxies move talloc memory between threads */
	talloc_disable_null_tracking();
	/*
	 * Also does tevent's one-time backend setup, which is not
	 * thread-safe in stock tevent (for every backend), before
	 * test_threads creates contexts on several threads at once.
	 */
	if (!evpoll_init()) {
		fprintf(stderr, "evpoll_init failed\n");
		return 1;
	}

	failed += cmocka_run_group_tests_name("epoll", epoll_tests,
					      NULL, NULL);
	failed += cmocka_run_group_tests_name("poll", poll_tests,
					      NULL, NULL);
	failed += cmocka_run_group_tests_name("evpoll-never", never_tests,
					      NULL, NULL);
	failed += cmocka_run_group_tests_name("evpoll-auto", auto_tests,
					      NULL, NULL);
	failed += cmocka_run_group_tests_name("evpoll-always", always_tests,
					      NULL, NULL);
	return failed == 0 ? 0 : 1;
}
