/*
 * Tests of the evpoll-specific API and behaviour: registration and opt-in,
 * configuration (including the environment overrides), poll callbacks and
 * their removal from anywhere, spin mode and its exits, pins, activity, the
 * waker, statistics and several contexts on one or more threads.
 *
 * Spin-mode facts are proven structurally with evpoll_get_stats() (spin
 * entries and exits, sleeps, dispatch counts), never with tight timing:
 * the only time limits are generous timeouts against hangs.
 */
/* for tevent_loop_allow_nesting(), needed by the nested loop test */
#define TEVENT_DEPRECATED 1

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "evpoll.h"
#include "testutil.h"

/* generous: valgrind, sanitizers and a loaded 2-core machine */
#define TIMEOUT_MS 10000U
/* a spin that ends quickly once nothing happens */
#define SHORT_SPIN_NS 2000000ULL
/*
 * A spin long enough that only a broken implementation (or a pause of the
 * test thread of this length, which would take a very loaded machine) ends
 * it while activity keeps coming.
 */
#define LONG_SPIN_NS 50000000ULL

#define RACE_CHILD_ARG "--evpoll-init-race-child"
#define RACE_THREADS 8

/* ---------------------------------------------------------------------- */
/* small helpers */

static void sleep_ms(unsigned ms)
{
	struct timespec ts = {
		.tv_sec = ms / 1000,
		.tv_nsec = (long)(ms % 1000) * 1000000L,
	};

	while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
	}
}

static void unset_env_overrides(void)
{
	unsetenv("EVPOLL_MODE");
	unsetenv("EVPOLL_SPIN_NS");
	unsetenv("EVPOLL_POLL_ITERATIONS");
}

static struct tevent_context *new_ev(TALLOC_CTX *mem_ctx,
				     enum evpoll_mode mode, uint64_t spin_ns)
{
	struct evpoll_config cfg;
	struct tevent_context *ev;

	evpoll_config_default(&cfg);
	cfg.mode = mode;
	cfg.spin_ns = spin_ns;
	ev = evpoll_context_init(mem_ctx, &cfg);
	assert_non_null(ev);
	assert_true(evpoll_is_evpoll(ev));
	return ev;
}

static void get_stats(struct tevent_context *ev, struct evpoll_stats *st)
{
	assert_int_equal(evpoll_get_stats(ev, st), 0);
}

static void loop_once(struct tevent_context *ev)
{
	assert_int_equal(tevent_loop_once(ev), 0);
}

static void noop_immediate(struct tevent_context *ev,
			   struct tevent_immediate *im, void *private_data)
{
}

/*
 * One iteration that returns while the loop spins: a spinning loop_once
 * returns only when something ran (or the spin ended), so give it an
 * immediate to run.
 */
static void loop_once_spinning(struct tevent_context *ev)
{
	struct tevent_immediate *im = tevent_create_immediate(ev);

	assert_non_null(im);
	tevent_schedule_immediate(im, ev, noop_immediate, NULL);
	loop_once(ev);
	talloc_free(im);
}

/* Run the loop while it spins; fails if the spin does not end. */
static void loop_until_idle(struct tevent_context *ev)
{
	uint64_t deadline = tu_now_ns() + TIMEOUT_MS * 1000000ULL;

	while (evpoll_is_spinning(ev)) {
		loop_once(ev);
		if (tu_now_ns() > deadline) {
			fail_msg("the loop kept spinning for %u ms",
				 TIMEOUT_MS);
		}
	}
}

/*
 * Run a spinning loop for at least ms milliseconds; fails if it stops
 * spinning meanwhile.
 */
static void spin_for_ms(struct tevent_context *ev, unsigned ms)
{
	uint64_t end = tu_now_ns() + (uint64_t)ms * 1000000ULL;

	while (tu_now_ns() < end) {
		loop_once(ev);
		assert_true(evpoll_is_spinning(ev));
	}
}

static void make_pipe(int fds[2])
{
	assert_int_equal(pipe2(fds, O_NONBLOCK | O_CLOEXEC), 0);
}

static void close_pipe(int fds[2])
{
	close(fds[0]);
	close(fds[1]);
}

static bool write_byte(int fd)
{
	return write(fd, "x", 1) == 1;
}

static void flag_immediate(struct tevent_context *ev,
			   struct tevent_immediate *im, void *private_data)
{
	bool *done = private_data;

	*done = true;
}

static void flag_timer(struct tevent_context *ev, struct tevent_timer *te,
		       struct timeval now, void *private_data)
{
	bool *done = private_data;

	*done = true;
}

static void schedule_flag(struct tevent_context *ev, TALLOC_CTX *mem_ctx,
			  bool *done)
{
	struct tevent_immediate *im = tevent_create_immediate(mem_ctx);

	assert_non_null(im);
	tevent_schedule_immediate(im, ev, flag_immediate, done);
}

static struct tevent_timer *add_flag_timer(struct tevent_context *ev,
					   TALLOC_CTX *mem_ctx,
					   uint32_t usecs, bool *done)
{
	struct tevent_timer *te;

	te = tevent_add_timer(ev, mem_ctx, tevent_timeval_current_ofs(0, usecs),
			      flag_timer, done);
	assert_non_null(te);
	return te;
}

struct fd_state {
	int fd;
	bool drain;
	bool done;
	unsigned count;
};

static void fd_handler(struct tevent_context *ev, struct tevent_fd *fde,
		       uint16_t flags, void *private_data)
{
	struct fd_state *s = private_data;
	char buf[64];

	s->count++;
	s->done = true;
	if (s->drain) {
		while (read(s->fd, buf, sizeof(buf)) > 0) {
		}
	}
}

static void add_fd(struct tevent_context *ev, TALLOC_CTX *mem_ctx,
		   struct fd_state *s, int fd, bool drain)
{
	struct tevent_fd *fde;

	memset(s, 0, sizeof(*s));
	s->fd = fd;
	s->drain = drain;
	fde = tevent_add_fd(ev, mem_ctx, fd, TEVENT_FD_READ, fd_handler, s);
	assert_non_null(fde);
}

/* A thread that writes one byte to a pipe after a delay. */
struct writer {
	pthread_t tid;
	int fd;
	unsigned delay_ms;
	bool ok;
};

static void *writer_main(void *arg)
{
	struct writer *w = arg;

	sleep_ms(w->delay_ms);
	w->ok = write_byte(w->fd);
	return NULL;
}

static void writer_start(struct writer *w, int fd, unsigned delay_ms)
{
	w->fd = fd;
	w->delay_ms = delay_ms;
	w->ok = false;
	assert_int_equal(pthread_create(&w->tid, NULL, writer_main, w), 0);
}

static void writer_join(struct writer *w)
{
	assert_int_equal(pthread_join(w->tid, NULL), 0);
	assert_true(w->ok);
}

/* ---------------------------------------------------------------------- */
/* a poll that records its callbacks */

struct tracker {
	struct tevent_context *ev;	/* the context it belongs to */
	struct evpoll_poll *handle;
	unsigned enters, exits, polls;
	/* enter twice, exit without enter, poll outside a spin, wrong ev */
	unsigned errors;
	bool entered;
	bool in_poll;
	int ret;		/* what the poll callback returns ... */
	unsigned work_left;	/* ... after this many calls returning 1 */
	/* handles to free from a callback (TALLOC_FREE: they become NULL) */
	struct evpoll_poll **free_in_poll;
	struct evpoll_poll **free_in_enter;
	struct evpoll_poll **free_in_exit;
	/* nested loop: run this many tevent_loop_once() in the next poll */
	unsigned nested_loops;
	struct tracker *watch;	/* its polls are counted during nesting */
	unsigned watch_polls_nested;
};

static void tr_enter(struct tevent_context *ev, void *private_data)
{
	struct tracker *t = private_data;

	if (t->entered || ev != t->ev) {
		t->errors++;
	}
	t->entered = true;
	t->enters++;
	if (t->free_in_enter != NULL) {
		TALLOC_FREE(*t->free_in_enter);
		t->free_in_enter = NULL;
	}
}

static void tr_exit(struct tevent_context *ev, void *private_data)
{
	struct tracker *t = private_data;

	if (!t->entered || ev != t->ev) {
		t->errors++;
	}
	t->entered = false;
	t->exits++;
	if (t->free_in_exit != NULL) {
		TALLOC_FREE(*t->free_in_exit);
		t->free_in_exit = NULL;
	}
}

static int tr_poll(struct tevent_context *ev, void *private_data)
{
	struct tracker *t = private_data;

	if (!t->entered || t->in_poll || ev != t->ev) {
		t->errors++;
	}
	t->in_poll = true;
	t->polls++;
	if (t->free_in_poll != NULL) {
		TALLOC_FREE(*t->free_in_poll);
		t->free_in_poll = NULL;
	}
	if (t->nested_loops > 0) {
		unsigned n = t->nested_loops;
		unsigned before = t->watch != NULL ? t->watch->polls : 0;

		t->nested_loops = 0;
		while (n-- > 0) {
			if (tevent_loop_once(ev) != 0) {
				t->errors++;
			}
		}
		if (t->watch != NULL) {
			t->watch_polls_nested = t->watch->polls - before;
		}
	}
	t->in_poll = false;
	if (t->work_left > 0) {
		t->work_left--;
		return 1;
	}
	return t->ret;
}

static void tr_add(struct tevent_context *ev, TALLOC_CTX *mem_ctx,
		   struct tracker *t)
{
	t->ev = ev;
	t->handle = evpoll_add_poll(ev, mem_ctx, tr_enter, tr_exit, tr_poll,
				    t);
	assert_non_null(t->handle);
}

/*
 * One tevent_loop_once() of a spinning loop runs poll passes or, when one
 * is due, the check of fds and timers only (on a slow machine, such as
 * under valgrind, often the latter): run it until a condition holds.
 */
static void loop_until_polled(struct tevent_context *ev,
			      const struct tracker *t, unsigned n)
{
	uint64_t deadline = tu_now_ns() + TIMEOUT_MS * 1000000ULL;

	while (t->polls < n) {
		loop_once(ev);
		if (tu_now_ns() > deadline) {
			fail_msg("poll not called %u times", n);
		}
	}
}

static void loop_until_freed(struct tevent_context *ev,
			     struct evpoll_poll *const *handle)
{
	uint64_t deadline = tu_now_ns() + TIMEOUT_MS * 1000000ULL;

	while (*handle != NULL) {
		loop_once(ev);
		if (tu_now_ns() > deadline) {
			fail_msg("poll not freed");
		}
	}
}

/* ---------------------------------------------------------------------- */
/* 1. evpoll_init() */

static void test_init_idempotent(void **state)
{
	assert_true(evpoll_init());
	assert_true(evpoll_init());
	assert_true(evpoll_init());
}

struct race_arg {
	pthread_t tid;
	pthread_barrier_t *barrier;
	unsigned idx;
	bool ok;
};

static void *race_thread(void *arg)
{
	struct race_arg *a = arg;
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = NULL;
	bool done = false;

	if (mem == NULL) {
		return NULL;
	}
	pthread_barrier_wait(a->barrier);
	switch (a->idx % 3) {
	case 0:
		/* the context init calls evpoll_init() itself */
		ev = evpoll_context_init(mem, NULL);
		break;
	case 1:
		if (evpoll_init()) {
			ev = tevent_context_init_byname(mem, "evpoll");
		}
		break;
	default:
		if (evpoll_init() && evpoll_init()) {
			ev = evpoll_context_init(mem, NULL);
		}
		break;
	}
	if (ev != NULL && evpoll_is_evpoll(ev)) {
		struct tevent_immediate *im = tevent_create_immediate(mem);

		if (im != NULL) {
			tevent_schedule_immediate(im, ev, flag_immediate,
						  &done);
			a->ok = tevent_loop_once(ev) == 0 && done;
		}
	}
	talloc_free(mem);
	return NULL;
}

/*
 * The body of a fresh process (exec'ed by test_init_race): 8 threads call
 * evpoll_init() and create evpoll contexts at once, before anything else in
 * the process touched tevent. Exit status: the number of failed threads.
 */
static int race_child(void)
{
	struct race_arg args[RACE_THREADS];
	pthread_barrier_t barrier;
	unsigned i;
	int failed = 0;

	/* talloc's lazy fill setup is racy by itself; do it first */
	talloc_free(talloc_new(NULL));
	if (pthread_barrier_init(&barrier, NULL, RACE_THREADS) != 0) {
		return 100;
	}
	for (i = 0; i < RACE_THREADS; i++) {
		args[i] = (struct race_arg) {
			.barrier = &barrier,
			.idx = i,
		};
		if (pthread_create(&args[i].tid, NULL, race_thread,
				   &args[i]) != 0) {
			return 101;
		}
	}
	for (i = 0; i < RACE_THREADS; i++) {
		pthread_join(args[i].tid, NULL);
		if (!args[i].ok) {
			failed++;
		}
	}
	pthread_barrier_destroy(&barrier);
	return failed;
}

static void test_init_race(void **state)
{
	char self[PATH_MAX];
	char arg[] = RACE_CHILD_ARG;
	char *argv[] = { self, arg, NULL };
	unsigned rounds = (unsigned)tu_scale(50);
	ssize_t len;
	unsigned r;

	len = readlink("/proc/self/exe", self, sizeof(self) - 1);
	assert_true(len > 0);
	self[len] = '\0';

	for (r = 0; r < rounds; r++) {
		pid_t pid;
		int status;

		fflush(NULL);
		pid = fork();
		assert_true(pid != -1);
		if (pid == 0) {
			/*
			 * exec, not just fork: a fresh process whose one-time
			 * initialisations (evpoll's and tevent's) really race
			 */
			execv(self, argv);
			_exit(127);
		}
		assert_int_equal(waitpid(pid, &status, 0), pid);
		if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
			fail_msg("round %u: child status 0x%x (exit code = "
				 "number of threads whose context failed)",
				 r, (unsigned)status);
		}
	}
}

/* ---------------------------------------------------------------------- */
/* 2. opt-in paths */

static void test_opt_in_paths(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev, *def_ev, *after_ev, *stock;
	struct evpoll_config cfg;
	const char **list;
	bool found = false;
	bool done = false;
	size_t i;

	assert_true(evpoll_init());

	list = tevent_backend_list(mem);
	assert_non_null(list);
	for (i = 0; list[i] != NULL; i++) {
		if (strcmp(list[i], "evpoll") == 0) {
			found = true;
		}
	}
	assert_true(found);

	ev = tevent_context_init_byname(mem, "evpoll");
	assert_non_null(ev);
	assert_true(evpoll_is_evpoll(ev));
	assert_int_equal(evpoll_get_config(ev, &cfg), 0);
	assert_int_equal(cfg.mode, EVPOLL_MODE_AUTO);
	schedule_flag(ev, mem, &done);
	tu_loop_until(ev, &done, TIMEOUT_MS);

	tevent_set_default_backend("evpoll");
	def_ev = tevent_context_init(mem);
	/* tevent's own default ("standard") is restored by NULL */
	tevent_set_default_backend(NULL);
	after_ev = tevent_context_init(mem);
	assert_non_null(def_ev);
	assert_true(evpoll_is_evpoll(def_ev));
	assert_non_null(after_ev);
	assert_false(evpoll_is_evpoll(after_ev));

	stock = tevent_context_init_byname(mem, "epoll");
	assert_non_null(stock);
	assert_false(evpoll_is_evpoll(stock));
	stock = tevent_context_init_byname(mem, "standard");
	assert_non_null(stock);
	assert_false(evpoll_is_evpoll(stock));
	stock = tevent_context_init_byname(mem, "poll");
	assert_non_null(stock);
	assert_false(evpoll_is_evpoll(stock));
	assert_false(evpoll_is_evpoll(NULL));

	/* a freed evpoll context is no longer one (registry removal) */
	talloc_free(ev);
	stock = tevent_context_init_byname(mem, "epoll");
	assert_non_null(stock);
	assert_false(evpoll_is_evpoll(stock));

	talloc_free(mem);
}

/* ---------------------------------------------------------------------- */
/* 3. configuration */

static void assert_default_config(const struct evpoll_config *cfg)
{
	assert_int_equal(cfg->mode, EVPOLL_MODE_AUTO);
	assert_int_equal(cfg->spin_ns, 200000);
	assert_int_equal(cfg->poll_iterations, 64);
}

static void test_config_default(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev;
	struct evpoll_config cfg;

	unset_env_overrides();
	memset(&cfg, 0xff, sizeof(cfg));
	evpoll_config_default(&cfg);
	assert_default_config(&cfg);
	evpoll_config_default(NULL);

	ev = evpoll_context_init(mem, NULL);
	assert_non_null(ev);
	memset(&cfg, 0xff, sizeof(cfg));
	assert_int_equal(evpoll_get_config(ev, &cfg), 0);
	assert_default_config(&cfg);
	talloc_free(mem);
}

static void test_config_roundtrip(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_AUTO, 200000);
	static const struct evpoll_config cfgs[] = {
		{ EVPOLL_MODE_ALWAYS, 12345, 3 },
		{ EVPOLL_MODE_NEVER, 0, 1 },
		{ EVPOLL_MODE_AUTO, UINT64_MAX, UINT_MAX },
	};
	struct evpoll_config got;
	size_t i;

	for (i = 0; i < sizeof(cfgs) / sizeof(cfgs[0]); i++) {
		assert_int_equal(evpoll_set_config(ev, &cfgs[i]), 0);
		memset(&got, 0, sizeof(got));
		assert_int_equal(evpoll_get_config(ev, &got), 0);
		assert_int_equal(got.mode, cfgs[i].mode);
		assert_int_equal(got.spin_ns, cfgs[i].spin_ns);
		assert_int_equal(got.poll_iterations, cfgs[i].poll_iterations);
	}

	/* evpoll_context_init() applies its cfg */
	ev = evpoll_context_init(mem, &cfgs[0]);
	assert_non_null(ev);
	assert_int_equal(evpoll_get_config(ev, &got), 0);
	assert_int_equal(got.mode, cfgs[0].mode);
	assert_int_equal(got.spin_ns, cfgs[0].spin_ns);
	assert_int_equal(got.poll_iterations, cfgs[0].poll_iterations);
	talloc_free(mem);
}

static void test_config_invalid(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_ALWAYS, 4242);
	struct tevent_context *stock = tevent_context_init_byname(mem, "epoll");
	struct evpoll_config good, bad_mode, bad_iter, got;

	assert_non_null(stock);
	evpoll_config_default(&good);
	bad_mode = good;
	bad_mode.mode = (enum evpoll_mode)7;
	bad_iter = good;
	bad_iter.poll_iterations = 0;

	assert_int_equal(evpoll_set_config(ev, &bad_mode), EINVAL);
	assert_int_equal(evpoll_set_config(ev, &bad_iter), EINVAL);
	assert_int_equal(evpoll_set_config(ev, NULL), EINVAL);
	assert_int_equal(evpoll_set_config(NULL, &good), EINVAL);
	assert_int_equal(evpoll_set_config(stock, &good), EINVAL);
	assert_int_equal(evpoll_get_config(NULL, &got), EINVAL);
	assert_int_equal(evpoll_get_config(ev, NULL), EINVAL);
	assert_int_equal(evpoll_get_config(stock, &got), EINVAL);

	/* the failed calls changed nothing */
	assert_int_equal(evpoll_get_config(ev, &got), 0);
	assert_int_equal(got.mode, EVPOLL_MODE_ALWAYS);
	assert_int_equal(got.spin_ns, 4242);
	assert_int_equal(got.poll_iterations, good.poll_iterations);

	errno = 0;
	assert_null(evpoll_context_init(mem, &bad_mode));
	assert_int_equal(errno, EINVAL);
	errno = 0;
	assert_null(evpoll_context_init(mem, &bad_iter));
	assert_int_equal(errno, EINVAL);
	talloc_free(mem);
}

static void test_config_env(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev;
	struct evpoll_config cfg;
	static const struct {
		const char *value;
		enum evpoll_mode mode;
	} modes[] = {
		{ "never", EVPOLL_MODE_NEVER },
		{ "auto", EVPOLL_MODE_AUTO },
		{ "always", EVPOLL_MODE_ALWAYS },
	};
	size_t i;

	unset_env_overrides();
	setenv("EVPOLL_MODE", "always", 1);
	setenv("EVPOLL_SPIN_NS", "1234", 1);
	setenv("EVPOLL_POLL_ITERATIONS", "7", 1);

	evpoll_config_default(&cfg);
	assert_int_equal(cfg.mode, EVPOLL_MODE_ALWAYS);
	assert_int_equal(cfg.spin_ns, 1234);
	assert_int_equal(cfg.poll_iterations, 7);

	ev = evpoll_context_init(mem, NULL);
	assert_non_null(ev);
	assert_int_equal(evpoll_get_config(ev, &cfg), 0);
	assert_int_equal(cfg.mode, EVPOLL_MODE_ALWAYS);
	assert_int_equal(cfg.spin_ns, 1234);
	assert_int_equal(cfg.poll_iterations, 7);

	ev = tevent_context_init_byname(mem, "evpoll");
	assert_non_null(ev);
	assert_int_equal(evpoll_get_config(ev, &cfg), 0);
	assert_int_equal(cfg.mode, EVPOLL_MODE_ALWAYS);
	assert_int_equal(cfg.spin_ns, 1234);
	assert_int_equal(cfg.poll_iterations, 7);

	/* an explicit cfg wins over the environment */
	ev = new_ev(mem, EVPOLL_MODE_NEVER, 999);
	assert_int_equal(evpoll_get_config(ev, &cfg), 0);
	assert_int_equal(cfg.mode, EVPOLL_MODE_NEVER);
	assert_int_equal(cfg.spin_ns, 999);

	/* limits */
	setenv("EVPOLL_SPIN_NS", "18446744073709551615", 1);
	setenv("EVPOLL_POLL_ITERATIONS", "4294967295", 1);
	evpoll_config_default(&cfg);
	assert_int_equal(cfg.spin_ns, UINT64_MAX);
	assert_int_equal(cfg.poll_iterations, 4294967295U);
	setenv("EVPOLL_SPIN_NS", "0", 1);
	evpoll_config_default(&cfg);
	assert_int_equal(cfg.spin_ns, 0);

	for (i = 0; i < sizeof(modes) / sizeof(modes[0]); i++) {
		setenv("EVPOLL_MODE", modes[i].value, 1);
		ev = evpoll_context_init(mem, NULL);
		assert_non_null(ev);
		assert_int_equal(evpoll_get_config(ev, &cfg), 0);
		assert_int_equal(cfg.mode, modes[i].mode);
	}

	unset_env_overrides();
	talloc_free(mem);
}

/*
 * The environment is read while tevent creates the context, before anyone
 * can set a debug hook on it, so bad values are reported at the context's
 * first iteration. Returns the number of reports there; fails if a later
 * iteration reports again.
 */
static unsigned env_reports(struct tevent_context *ev, TALLOC_CTX *mem,
			    const char *expect)
{
	struct tu_debug_log dlog;
	unsigned count;
	bool done = false;

	tu_capture_debug(ev, &dlog);
	schedule_flag(ev, mem, &done);
	loop_once(ev);
	assert_true(done);
	count = dlog.count;
	if (expect != NULL && strstr(dlog.text, expect) == NULL) {
		fail_msg("no report of %s: %s", expect, dlog.text);
	}
	done = false;
	schedule_flag(ev, mem, &done);
	loop_once(ev);
	assert_int_equal(dlog.count, count);
	return count;
}

static void test_config_env_bad(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	static const char *const vars[] = {
		"EVPOLL_MODE", "EVPOLL_SPIN_NS", "EVPOLL_POLL_ITERATIONS",
	};
	static const char *const bad[] = {
		"bogus", "12x", "-1", "", "99999999999999999999999",
		" 5", "5 ", "+5", "0x10",
	};
	struct tevent_context *ev;
	struct evpoll_config cfg;
	size_t v, b;

	unset_env_overrides();
	for (v = 0; v < sizeof(vars) / sizeof(vars[0]); v++) {
		for (b = 0; b < sizeof(bad) / sizeof(bad[0]); b++) {
			setenv(vars[v], bad[b], 1);

			evpoll_config_default(&cfg);
			assert_default_config(&cfg);

			ev = evpoll_context_init(mem, NULL);
			assert_non_null(ev);
			assert_int_equal(evpoll_get_config(ev, &cfg), 0);
			assert_default_config(&cfg);
			if (env_reports(ev, mem, vars[v]) != 1) {
				fail_msg("%s=\"%s\": not reported once",
					 vars[v], bad[b]);
			}
			talloc_free(ev);

			/* the opt-in path too */
			ev = tevent_context_init_byname(mem, "evpoll");
			assert_non_null(ev);
			assert_int_equal(evpoll_get_config(ev, &cfg), 0);
			assert_default_config(&cfg);
			assert_int_equal(env_reports(ev, mem, vars[v]), 1);
			talloc_free(ev);
		}
		unsetenv(vars[v]);
	}

	/* out of range */
	setenv("EVPOLL_POLL_ITERATIONS", "0", 1);
	ev = evpoll_context_init(mem, NULL);
	assert_non_null(ev);
	assert_int_equal(evpoll_get_config(ev, &cfg), 0);
	assert_default_config(&cfg);
	assert_int_equal(env_reports(ev, mem, "EVPOLL_POLL_ITERATIONS"), 1);

	setenv("EVPOLL_POLL_ITERATIONS", "4294967296", 1);
	setenv("EVPOLL_SPIN_NS", "18446744073709551616", 1);
	ev = evpoll_context_init(mem, NULL);
	assert_non_null(ev);
	assert_int_equal(evpoll_get_config(ev, &cfg), 0);
	assert_default_config(&cfg);
	/* both are reported */
	assert_int_equal(env_reports(ev, mem, "EVPOLL_SPIN_NS"), 2);

	/* good values produce no report */
	setenv("EVPOLL_MODE", "never", 1);
	setenv("EVPOLL_SPIN_NS", "5", 1);
	setenv("EVPOLL_POLL_ITERATIONS", "9", 1);
	ev = evpoll_context_init(mem, NULL);
	assert_non_null(ev);
	assert_int_equal(env_reports(ev, mem, NULL), 0);

	unset_env_overrides();
	talloc_free(mem);
}

/* ---------------------------------------------------------------------- */
/* 9. NEVER and ALWAYS modes */

struct tim_arg {
	pthread_t tid;
	struct tevent_threaded_context *tctx;
	struct tevent_immediate *im;
	bool *done;
	unsigned delay_ms;
};

static void *tim_main(void *arg)
{
	struct tim_arg *a = arg;

	sleep_ms(a->delay_ms);
	tevent_threaded_schedule_immediate(a->tctx, a->im, flag_immediate,
					   a->done);
	return NULL;
}

/*
 * Serve an immediate, a timer, an fd written by another thread and a
 * cross-thread immediate, one after the other.
 */
static void serve_events(struct tevent_context *ev, TALLOC_CTX *mem)
{
	struct fd_state fs;
	struct writer w;
	struct tim_arg ta;
	bool im_done = false, te_done = false, tim_done = false;
	int fds[2];

	schedule_flag(ev, mem, &im_done);
	tu_loop_until(ev, &im_done, TIMEOUT_MS);

	add_flag_timer(ev, mem, 3000, &te_done);
	tu_loop_until(ev, &te_done, TIMEOUT_MS);

	make_pipe(fds);
	add_fd(ev, mem, &fs, fds[0], true);
	writer_start(&w, fds[1], 3);
	tu_loop_until(ev, &fs.done, TIMEOUT_MS);
	writer_join(&w);

	ta = (struct tim_arg) {
		.tctx = tevent_threaded_context_create(mem, ev),
		.im = tevent_create_immediate(mem),
		.done = &tim_done,
		.delay_ms = 3,
	};
	assert_non_null(ta.tctx);
	assert_non_null(ta.im);
	assert_int_equal(pthread_create(&ta.tid, NULL, tim_main, &ta), 0);
	tu_loop_until(ev, &tim_done, TIMEOUT_MS);
	assert_int_equal(pthread_join(ta.tid, NULL), 0);

	TALLOC_FREE(ta.tctx);
	close_pipe(fds);
}

static void test_never_mode(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_NEVER, 1000000);
	struct tracker t = { 0 };
	struct evpoll_stats st;
	struct evpoll_waker *w;

	tr_add(ev, mem, &t);
	w = evpoll_waker_get(ev);
	assert_non_null(w);
	/* neither pins nor activity make a NEVER loop spin */
	evpoll_pin(ev);
	evpoll_activity(ev);
	serve_events(ev, mem);
	assert_false(evpoll_is_spinning(ev));
	assert_true(evpoll_waker_may_sleep(w));
	evpoll_unpin(ev);

	get_stats(ev, &st);
	assert_int_equal(st.spin_entries, 0);
	assert_int_equal(st.spin_exits, 0);
	assert_int_equal(st.spin_ns, 0);
	assert_int_equal(st.poll_calls, 0);
	assert_int_equal(st.poll_work, 0);
	assert_true(st.sleeps > 0);
	assert_int_equal(t.polls, 0);
	assert_int_equal(t.enters, 0);
	assert_int_equal(t.exits, 0);
	evpoll_waker_unref(w);
	talloc_free(mem);
}

static void test_always_mode(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_ALWAYS, 1000);
	struct tracker t = { 0 };
	struct evpoll_stats st;

	tr_add(ev, mem, &t);
	serve_events(ev, mem);
	assert_true(evpoll_is_spinning(ev));

	get_stats(ev, &st);
	assert_int_equal(st.sleeps, 0);
	assert_int_equal(st.spin_entries, 1);
	assert_int_equal(st.spin_exits, 0);
	assert_true(st.poll_calls > 0);
	assert_int_equal(st.poll_calls, t.polls);
	assert_int_equal(t.enters, 1);
	assert_int_equal(t.exits, 0);
	assert_int_equal(t.errors, 0);

	/* switching to NEVER ends the spin at once, with the exit callback */
	{
		struct evpoll_config cfg;

		assert_int_equal(evpoll_get_config(ev, &cfg), 0);
		cfg.mode = EVPOLL_MODE_NEVER;
		assert_int_equal(evpoll_set_config(ev, &cfg), 0);
	}
	assert_false(evpoll_is_spinning(ev));
	assert_int_equal(t.exits, 1);
	assert_int_equal(t.errors, 0);
	talloc_free(mem);
}

/* ---------------------------------------------------------------------- */
/* 4. poll callbacks and spin mode in AUTO */

static void test_auto_spin_and_idle(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_AUTO,
					   SHORT_SPIN_NS);
	struct tracker t = { 0 };
	struct evpoll_stats st0, st1, st2;
	struct fd_state fs;
	bool done = false;
	int fds[2];
	unsigned round;

	tr_add(ev, mem, &t);
	make_pipe(fds);
	add_fd(ev, mem, &fs, fds[0], true);
	assert_false(evpoll_is_spinning(ev));
	get_stats(ev, &st0);
	assert_int_equal(st0.spin_entries, 0);

	for (round = 0; round < 3; round++) {
		/* activity: an immediate */
		done = false;
		schedule_flag(ev, mem, &done);
		loop_once(ev);
		assert_true(done);
		assert_true(evpoll_is_spinning(ev));
		assert_int_equal(t.enters, round + 1);

		loop_until_idle(ev);
		assert_true(t.polls > 0);
		assert_int_equal(t.exits, round + 1);
		assert_int_equal(t.enters, t.exits);
		assert_int_equal(t.errors, 0);
	}
	get_stats(ev, &st1);
	assert_int_equal(st1.spin_entries, 3);
	assert_int_equal(st1.spin_exits, 3);
	assert_int_equal(st1.poll_calls, t.polls);
	assert_true(st1.spin_ns > 0);

	/* not spinning: the next event is waited for with a sleep */
	assert_true(write_byte(fds[1]));
	loop_once(ev);
	assert_true(fs.done);
	get_stats(ev, &st2);
	assert_int_equal(st2.sleeps, st1.sleeps + 1);
	/* and whatever woke the loop starts a spin */
	assert_true(evpoll_is_spinning(ev));
	assert_int_equal(st2.spin_entries, 4);
	loop_until_idle(ev);
	assert_int_equal(t.enters, 4);
	assert_int_equal(t.exits, 4);
	assert_int_equal(t.errors, 0);

	close_pipe(fds);
	talloc_free(mem);
}

static void test_poll_work_keeps_spinning(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_AUTO,
					   LONG_SPIN_NS);
	struct tracker t = { 0 };
	struct evpoll_stats st0, st1;

	tr_add(ev, mem, &t);
	t.ret = 1;
	evpoll_activity(ev);
	loop_once(ev);
	assert_true(evpoll_is_spinning(ev));
	get_stats(ev, &st0);

	/* three spin_ns long: without the work the spin would have ended */
	spin_for_ms(ev, (unsigned)(3 * LONG_SPIN_NS / 1000000));
	get_stats(ev, &st1);
	assert_int_equal(st1.spin_exits, st0.spin_exits);
	assert_true(st1.poll_work > st0.poll_work);
	assert_int_equal(st1.poll_work, st1.poll_calls);

	/* no more work: the spin ends */
	t.ret = 0;
	loop_until_idle(ev);
	get_stats(ev, &st1);
	assert_int_equal(st1.spin_exits, st0.spin_exits + 1);
	assert_int_equal(t.enters, t.exits);
	assert_int_equal(t.errors, 0);
	talloc_free(mem);
}

static void test_enter_exit_add_remove(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_AUTO,
					   SHORT_SPIN_NS);
	struct tracker a = { 0 }, b = { 0 }, c = { 0 };

	/* added to an idle loop: no enter; removed: no exit */
	tr_add(ev, mem, &a);
	assert_int_equal(a.enters, 0);
	TALLOC_FREE(a.handle);
	assert_int_equal(a.exits, 0);

	/* added to a spinning loop: enter at once */
	evpoll_pin(ev);
	loop_once(ev);
	assert_true(evpoll_is_spinning(ev));
	tr_add(ev, mem, &b);
	assert_int_equal(b.enters, 1);
	loop_until_polled(ev, &b, 1);

	/* removed from a spinning loop: exit at once */
	TALLOC_FREE(b.handle);
	assert_int_equal(b.exits, 1);

	/* exit when the spin ends, no exit when removed afterwards */
	tr_add(ev, mem, &c);
	assert_int_equal(c.enters, 1);
	evpoll_unpin(ev);
	loop_until_idle(ev);
	assert_int_equal(c.exits, 1);
	TALLOC_FREE(c.handle);
	assert_int_equal(c.exits, 1);

	assert_int_equal(a.errors + b.errors + c.errors, 0);
	assert_int_equal(a.polls, 0);
	talloc_free(mem);
}

/* ---------------------------------------------------------------------- */
/* 5. removal safety */

static struct tevent_context *always_with_three(TALLOC_CTX *mem,
						struct tracker t[3])
{
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_ALWAYS, 1000);
	unsigned i;

	for (i = 0; i < 3; i++) {
		tr_add(ev, mem, &t[i]);
	}
	return ev;
}

/* Run passes until every poll still registered ran n more times. */
static void run_passes(struct tevent_context *ev, struct tracker t[3],
		       unsigned n)
{
	uint64_t deadline = tu_now_ns() + TIMEOUT_MS * 1000000ULL;
	unsigned base[3];
	unsigned i;

	for (i = 0; i < 3; i++) {
		base[i] = t[i].polls;
	}
	for (;;) {
		bool all = true;

		for (i = 0; i < 3; i++) {
			if (t[i].handle != NULL && t[i].polls < base[i] + n) {
				all = false;
			}
		}
		if (all) {
			return;
		}
		loop_once(ev);
		if (tu_now_ns() > deadline) {
			fail_msg("polls did not run");
		}
	}
}

static void check_removed(struct tevent_context *ev, struct tracker t[3],
			  unsigned gone)
{
	unsigned frozen = t[gone].polls;
	unsigned i;

	assert_null(t[gone].handle);
	assert_int_equal(t[gone].exits, 1);
	run_passes(ev, t, 10);
	assert_int_equal(t[gone].polls, frozen);
	for (i = 0; i < 3; i++) {
		assert_int_equal(t[i].errors, 0);
	}
}

static void test_free_self_in_poll(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tracker t[3] = { { 0 } };
	struct tevent_context *ev = always_with_three(mem, t);
	struct evpoll_stats st0, st1;
	unsigned i;

	run_passes(ev, t, 2);
	t[1].free_in_poll = &t[1].handle;
	run_passes(ev, t, 1);
	check_removed(ev, t, 1);

	/* the first and the last one too */
	t[0].free_in_poll = &t[0].handle;
	t[2].free_in_poll = &t[2].handle;
	loop_until_freed(ev, &t[0].handle);
	/* freed in the same pass */
	assert_null(t[2].handle);
	assert_int_equal(t[0].exits, 1);
	assert_int_equal(t[2].exits, 1);

	/* no poll is left: none is called any more */
	get_stats(ev, &st0);
	for (i = 0; i < 20; i++) {
		loop_once(ev);
	}
	get_stats(ev, &st1);
	assert_int_equal(st1.poll_calls, st0.poll_calls);
	assert_int_equal(st1.poll_calls, t[0].polls + t[1].polls + t[2].polls);
	assert_int_equal(t[0].errors + t[1].errors + t[2].errors, 0);
	talloc_free(mem);
}

static void test_free_next_in_poll(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tracker t[3] = { { 0 } };
	struct tevent_context *ev = always_with_three(mem, t);
	unsigned c_before;

	run_passes(ev, t, 2);
	c_before = t[2].polls;
	t[0].free_in_poll = &t[1].handle;
	t[0].work_left = 1;	/* loop_once returns after that pass */
	while (t[1].handle != NULL) {
		loop_once(ev);
	}
	/* the rest of that pass went on after the removed poll */
	assert_true(t[2].polls > c_before);
	assert_int_equal(t[0].polls, t[2].polls);
	check_removed(ev, t, 1);

	/* the last one, freed by its predecessor: end of the list */
	t[0].free_in_poll = &t[2].handle;
	loop_until_freed(ev, &t[2].handle);
	assert_int_equal(t[2].exits, 1);
	loop_once(ev);
	assert_int_equal(t[0].errors + t[2].errors, 0);
	talloc_free(mem);
}

static void test_free_prev_in_poll(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tracker t[3] = { { 0 } };
	struct tevent_context *ev = always_with_three(mem, t);

	run_passes(ev, t, 2);
	t[2].free_in_poll = &t[1].handle;
	run_passes(ev, t, 1);
	check_removed(ev, t, 1);

	/* the head of the list, freed by the tail */
	t[2].free_in_poll = &t[0].handle;
	loop_until_freed(ev, &t[0].handle);
	assert_int_equal(t[0].exits, 1);
	loop_once(ev);
	assert_int_equal(t[0].errors + t[2].errors, 0);
	talloc_free(mem);
}

static void test_free_in_enter(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_AUTO,
					   SHORT_SPIN_NS);
	struct tracker t[4] = { { 0 } };
	unsigned i;

	for (i = 0; i < 4; i++) {
		tr_add(ev, mem, &t[i]);
	}
	/* itself */
	t[0].free_in_enter = &t[0].handle;
	/* the next one, not entered yet */
	t[1].free_in_enter = &t[2].handle;
	/* the previous one, already entered */
	t[3].free_in_enter = &t[1].handle;

	evpoll_activity(ev);
	loop_once_spinning(ev);
	assert_true(evpoll_is_spinning(ev));

	assert_null(t[0].handle);
	assert_int_equal(t[0].enters, 1);
	assert_int_equal(t[0].exits, 1);	/* exit follows the enter */
	assert_null(t[2].handle);
	assert_int_equal(t[2].enters, 0);
	assert_int_equal(t[2].exits, 0);
	assert_null(t[1].handle);
	assert_int_equal(t[1].enters, 1);
	assert_int_equal(t[1].exits, 1);
	assert_int_equal(t[3].enters, 1);

	loop_until_idle(ev);
	assert_int_equal(t[3].exits, 1);
	assert_true(t[3].polls > 0);
	for (i = 0; i < 3; i++) {
		assert_int_equal(t[i].polls, 0);
	}
	for (i = 0; i < 4; i++) {
		assert_int_equal(t[i].errors, 0);
	}
	talloc_free(mem);
}

static void test_free_in_exit(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_AUTO,
					   SHORT_SPIN_NS);
	struct tracker t[4] = { { 0 } };
	unsigned i;

	for (i = 0; i < 4; i++) {
		tr_add(ev, mem, &t[i]);
	}
	t[0].free_in_exit = &t[0].handle;	/* itself */
	t[1].free_in_exit = &t[2].handle;	/* the next one */
	t[3].free_in_exit = &t[1].handle;	/* the previous one */

	evpoll_activity(ev);
	loop_once(ev);
	loop_until_idle(ev);

	for (i = 0; i < 3; i++) {
		assert_null(t[i].handle);
		assert_int_equal(t[i].enters, 1);
		assert_int_equal(t[i].exits, 1);
	}
	assert_int_equal(t[3].exits, 1);

	/* a new spin only sees the survivor */
	evpoll_activity(ev);
	loop_once_spinning(ev);
	assert_true(evpoll_is_spinning(ev));
	loop_until_idle(ev);
	for (i = 0; i < 3; i++) {
		assert_int_equal(t[i].enters, 1);
	}
	assert_int_equal(t[3].enters, 2);
	assert_int_equal(t[3].exits, 2);

	/* freed from its own exit while being removed: one exit only */
	t[3].free_in_exit = &t[3].handle;
	evpoll_activity(ev);
	loop_once_spinning(ev);
	assert_true(evpoll_is_spinning(ev));
	TALLOC_FREE(t[3].handle);
	assert_int_equal(t[3].exits, 3);
	loop_until_idle(ev);
	for (i = 0; i < 4; i++) {
		assert_int_equal(t[i].errors, 0);
	}
	talloc_free(mem);
}

#define MANY 1000

struct many {
	struct tracker *t;
	unsigned n;
	bool free_odd;
	unsigned *snap;		/* polls of each tracker when freed */
};

static int free_odd_poll(struct tevent_context *ev, void *private_data)
{
	struct many *m = private_data;
	unsigned i;

	if (!m->free_odd) {
		return 0;
	}
	m->free_odd = false;
	for (i = 1; i < m->n; i += 2) {
		TALLOC_FREE(m->t[i].handle);
	}
	for (i = 0; i < m->n; i++) {
		m->snap[i] = m->t[i].polls;
	}
	/* work: loop_once returns right after this pass */
	return 1;
}

static void test_many_polls(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	TALLOC_CTX *pmem = talloc_new(mem);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_ALWAYS, 1000);
	struct many m = {
		.t = talloc_zero_array(mem, struct tracker, MANY),
		.snap = talloc_zero_array(mem, unsigned, MANY),
		.n = MANY,
	};
	struct evpoll_poll *freer;
	struct evpoll_stats st0, st1;
	unsigned i;

	assert_non_null(m.t);
	assert_non_null(m.snap);
	freer = evpoll_add_poll(ev, pmem, NULL, NULL, free_odd_poll, &m);
	assert_non_null(freer);
	for (i = 0; i < MANY; i++) {
		tr_add(ev, pmem, &m.t[i]);
	}

	/* every one of them is called (a pass calls them in order) */
	loop_until_polled(ev, &m.t[MANY - 1], 1);
	for (i = 0; i < MANY; i++) {
		assert_int_equal(m.t[i].enters, 1);
		assert_true(m.t[i].polls >= 1);
	}
	get_stats(ev, &st0);
	assert_int_equal(st0.poll_calls % (MANY + 1), 0);

	/* half of them freed during a pass */
	m.free_odd = true;
	while (m.free_odd) {
		loop_once(ev);
	}
	for (i = 0; i < MANY; i++) {
		if (i % 2 == 1) {
			assert_null(m.t[i].handle);
			assert_int_equal(m.t[i].exits, 1);
			/* not called after its removal, in that pass either */
			assert_int_equal(m.t[i].polls, m.snap[i]);
		} else {
			/* the rest of the pass went on */
			assert_int_equal(m.t[i].polls, m.snap[i] + 1);
			assert_int_equal(m.t[i].exits, 0);
		}
	}

	/* the survivors stay valid: every pass calls exactly them */
	get_stats(ev, &st0);
	loop_until_polled(ev, &m.t[MANY - 2], m.t[MANY - 2].polls + 3);
	get_stats(ev, &st1);
	assert_true(st1.poll_calls > st0.poll_calls);
	assert_int_equal((st1.poll_calls - st0.poll_calls) % (MANY / 2 + 1),
			 0);
	for (i = 0; i < MANY; i += 2) {
		assert_int_equal(talloc_free(m.t[i].handle), 0);
		m.t[i].handle = NULL;
		assert_int_equal(m.t[i].exits, 1);
	}
	for (i = 0; i < MANY; i++) {
		assert_int_equal(m.t[i].errors, 0);
	}
	assert_int_equal(talloc_free(freer), 0);
	talloc_free(mem);
}

static void test_free_context_with_polls(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	TALLOC_CTX *pmem = talloc_new(mem);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_ALWAYS, 1000);
	struct tracker t[2] = { { 0 } };
	unsigned i;

	for (i = 0; i < 2; i++) {
		tr_add(ev, pmem, &t[i]);
	}
	loop_once(ev);
	assert_true(evpoll_is_spinning(ev));
	assert_int_equal(t[0].enters, 1);

	talloc_free(ev);
	/* the polls are inert: freeing them calls nothing */
	for (i = 0; i < 2; i++) {
		unsigned exits = t[i].exits;

		assert_int_equal(talloc_free(t[i].handle), 0);
		t[i].handle = NULL;
		assert_int_equal(t[i].exits, exits);
		assert_int_equal(t[i].errors, 0);
	}

	/* an idle context, polls freed with their parent afterwards */
	ev = new_ev(mem, EVPOLL_MODE_AUTO, SHORT_SPIN_NS);
	for (i = 0; i < 2; i++) {
		t[i] = (struct tracker) { 0 };
		tr_add(ev, pmem, &t[i]);
	}
	talloc_free(ev);
	talloc_free(pmem);
	assert_int_equal(t[0].exits + t[1].exits, 0);
	talloc_free(mem);
}

/*
 * Freeing a spinning context: a poll whose handle is a talloc child of the
 * context gets the same callbacks as one parented elsewhere (the library
 * makes the latter inert, without an exit callback).
 */
static void test_free_context_parented_poll(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	TALLOC_CTX *pmem = talloc_new(mem);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_ALWAYS, 1000);
	struct tracker t[2] = { { 0 } };

	tr_add(ev, ev, &t[0]);
	tr_add(ev, pmem, &t[1]);
	loop_once(ev);
	assert_int_equal(t[0].enters, 1);
	assert_int_equal(t[1].enters, 1);
	talloc_free(ev);
	assert_int_equal(talloc_free(t[1].handle), 0);
	t[1].handle = NULL;
	talloc_free(mem);
	if (t[0].exits != t[1].exits) {
		fail_msg("context freed: exit callbacks %u for a poll on the "
			 "context, %u for a poll elsewhere", t[0].exits,
			 t[1].exits);
	}
	assert_int_equal(t[0].errors + t[1].errors, 0);
}

/* ---------------------------------------------------------------------- */
/* 6. pin and unpin */

static void test_pin(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_AUTO,
					   SHORT_SPIN_NS);
	struct evpoll_stats st0, st1;

	/* a pin alone makes the next iteration spin */
	evpoll_pin(ev);
	loop_once(ev);
	assert_true(evpoll_is_spinning(ev));
	get_stats(ev, &st0);
	assert_int_equal(st0.sleeps, 0);

	/* ten spin_ns without any activity: still spinning */
	spin_for_ms(ev, (unsigned)(10 * SHORT_SPIN_NS / 1000000));
	get_stats(ev, &st1);
	assert_int_equal(st1.spin_exits, 0);
	assert_int_equal(st1.sleeps, 0);
	assert_int_equal(st1.spin_entries, 1);

	evpoll_unpin(ev);
	loop_until_idle(ev);
	get_stats(ev, &st1);
	assert_int_equal(st1.spin_exits, 1);
	talloc_free(mem);
}

static void test_pin_refcount(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_AUTO,
					   SHORT_SPIN_NS);
	struct evpoll_stats st;

	evpoll_pin(ev);
	evpoll_pin(ev);
	loop_once(ev);
	evpoll_unpin(ev);
	spin_for_ms(ev, (unsigned)(10 * SHORT_SPIN_NS / 1000000));
	get_stats(ev, &st);
	assert_int_equal(st.spin_exits, 0);

	evpoll_unpin(ev);
	loop_until_idle(ev);
	get_stats(ev, &st);
	assert_int_equal(st.spin_exits, 1);
	talloc_free(mem);
}

static void test_unpin_unbalanced(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_AUTO,
					   SHORT_SPIN_NS);
	struct tu_debug_log dlog;
	struct evpoll_stats st;

	tu_capture_debug(ev, &dlog);
	evpoll_unpin(ev);
	assert_int_equal(dlog.count, 1);
	assert_non_null(strstr(dlog.text, "unpin"));

	/* the count did not underflow: one pin, one unpin is balanced */
	evpoll_pin(ev);
	loop_once(ev);
	spin_for_ms(ev, (unsigned)(5 * SHORT_SPIN_NS / 1000000));
	evpoll_unpin(ev);
	assert_int_equal(dlog.count, 1);
	loop_until_idle(ev);
	get_stats(ev, &st);
	assert_int_equal(st.spin_exits, 1);

	/* unbalanced while spinning: reported, the spin ends normally */
	evpoll_activity(ev);
	loop_once_spinning(ev);
	assert_true(evpoll_is_spinning(ev));
	evpoll_unpin(ev);
	assert_int_equal(dlog.count, 2);
	loop_until_idle(ev);
	talloc_free(mem);
}

static void test_pin_noop(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *stock = tevent_context_init_byname(mem, "epoll");
	struct tu_debug_log dlog;
	bool done = false;

	assert_non_null(stock);
	tu_capture_debug(stock, &dlog);
	evpoll_pin(stock);
	evpoll_pin(stock);
	evpoll_unpin(stock);
	evpoll_unpin(stock);
	evpoll_unpin(stock);
	evpoll_activity(stock);
	assert_false(evpoll_is_spinning(stock));
	assert_int_equal(dlog.count, 0);
	schedule_flag(stock, mem, &done);
	tu_loop_until(stock, &done, TIMEOUT_MS);

	evpoll_pin(NULL);
	evpoll_unpin(NULL);
	evpoll_activity(NULL);
	assert_false(evpoll_is_spinning(NULL));
	talloc_free(mem);
}

/* ---------------------------------------------------------------------- */
/* 7. evpoll_activity() */

static void test_activity_starts_spin(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_AUTO,
					   SHORT_SPIN_NS);
	struct evpoll_stats st0, st1;
	struct fd_state fs;
	int fds[2];

	/* without activity an iteration sleeps (here, until an fd) */
	make_pipe(fds);
	add_fd(ev, mem, &fs, fds[0], true);
	assert_true(write_byte(fds[1]));
	loop_once(ev);
	assert_true(fs.done);
	get_stats(ev, &st0);
	assert_int_equal(st0.sleeps, 1);
	loop_until_idle(ev);

	/* with it, the next iteration spins instead */
	get_stats(ev, &st0);
	evpoll_activity(ev);
	assert_false(evpoll_is_spinning(ev));
	loop_once_spinning(ev);
	get_stats(ev, &st1);
	assert_true(evpoll_is_spinning(ev));
	assert_int_equal(st1.spin_entries, st0.spin_entries + 1);
	assert_int_equal(st1.sleeps, st0.sleeps);
	loop_until_idle(ev);
	close_pipe(fds);
	talloc_free(mem);
}

static void test_activity_extends_spin(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_AUTO,
					   LONG_SPIN_NS);
	struct evpoll_stats st0, st1;
	uint64_t end;

	evpoll_activity(ev);
	loop_once_spinning(ev);
	assert_true(evpoll_is_spinning(ev));
	get_stats(ev, &st0);

	end = tu_now_ns() + 3 * LONG_SPIN_NS;
	while (tu_now_ns() < end) {
		evpoll_activity(ev);
		loop_once_spinning(ev);
		assert_true(evpoll_is_spinning(ev));
	}
	get_stats(ev, &st1);
	assert_int_equal(st1.spin_exits, st0.spin_exits);
	assert_int_equal(st1.spin_entries, st0.spin_entries);

	loop_until_idle(ev);
	get_stats(ev, &st1);
	assert_int_equal(st1.spin_exits, st0.spin_exits + 1);
	talloc_free(mem);
}

/* ---------------------------------------------------------------------- */
/* 8. events served while spinning, without sleeping */

struct spin_setup {
	const char *name;
	enum evpoll_mode mode;
	bool pin;
};

static const struct spin_setup spin_setups[] = {
	{ "always", EVPOLL_MODE_ALWAYS, false },
	{ "auto, pinned", EVPOLL_MODE_AUTO, true },
};
#define N_SETUPS (sizeof(spin_setups) / sizeof(spin_setups[0]))

static struct tevent_context *spinning_ev(TALLOC_CTX *mem,
					  const struct spin_setup *s)
{
	struct tevent_context *ev = new_ev(mem, s->mode, SHORT_SPIN_NS);

	if (s->pin) {
		evpoll_pin(ev);
	}
	loop_once_spinning(ev);
	assert_true(evpoll_is_spinning(ev));
	return ev;
}

static void test_spin_serves_fd_from_thread(void **state)
{
	size_t i;

	for (i = 0; i < N_SETUPS; i++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev = spinning_ev(mem, &spin_setups[i]);
		struct evpoll_stats st0, st1;
		struct fd_state fs;
		struct writer w;
		int fds[2];
		unsigned n;

		make_pipe(fds);
		add_fd(ev, mem, &fs, fds[0], true);
		for (n = 0; n < 3; n++) {
			get_stats(ev, &st0);
			fs.done = false;
			writer_start(&w, fds[1], 5);
			tu_loop_until(ev, &fs.done, TIMEOUT_MS);
			writer_join(&w);
			get_stats(ev, &st1);
			assert_int_equal(st1.sleeps, st0.sleeps);
			assert_int_equal(st1.spin_exits, 0);
			assert_true(st1.fd_dispatches > st0.fd_dispatches);
		}
		close_pipe(fds);
		talloc_free(mem);
	}
}

static void test_spin_serves_timers(void **state)
{
	size_t i;

	for (i = 0; i < N_SETUPS; i++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev = spinning_ev(mem, &spin_setups[i]);
		struct evpoll_stats st0, st1;
		struct tevent_timer *te;
		bool done = false, moved = false, never = false;

		get_stats(ev, &st0);
		add_flag_timer(ev, mem, 5000, &done);
		tu_loop_until(ev, &done, TIMEOUT_MS);

		/* a timer moved with tevent_update_timer(), bypassing ops */
		te = tevent_add_timer(ev, mem,
				      tevent_timeval_current_ofs(60, 0),
				      flag_timer, &moved);
		assert_non_null(te);
		loop_once(ev);
		tevent_update_timer(te, tevent_timeval_current_ofs(0, 5000));
		tu_loop_until(ev, &moved, TIMEOUT_MS);

		/* moved later: does not fire early */
		te = add_flag_timer(ev, mem, 1000, &never);
		tevent_update_timer(te, tevent_timeval_current_ofs(60, 0));
		spin_for_ms(ev, 10);
		assert_false(never);
		TALLOC_FREE(te);

		get_stats(ev, &st1);
		assert_int_equal(st1.sleeps, st0.sleeps);
		assert_int_equal(st1.spin_exits, 0);
		/* both handlers counted (which counter: see stats tests) */
		assert_true(st1.timer_dispatches + st1.fd_dispatches >=
			    st0.timer_dispatches + st0.fd_dispatches + 2);
		talloc_free(mem);
	}
}

static void test_spin_serves_threaded_immediate(void **state)
{
	size_t i;

	for (i = 0; i < N_SETUPS; i++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev = spinning_ev(mem, &spin_setups[i]);
		struct evpoll_stats st0, st1;
		bool done = false;
		struct tim_arg ta = {
			.tctx = tevent_threaded_context_create(mem, ev),
			.im = tevent_create_immediate(mem),
			.done = &done,
			.delay_ms = 5,
		};

		assert_non_null(ta.tctx);
		assert_non_null(ta.im);
		get_stats(ev, &st0);
		assert_int_equal(pthread_create(&ta.tid, NULL, tim_main, &ta),
				 0);
		tu_loop_until(ev, &done, TIMEOUT_MS);
		assert_int_equal(pthread_join(ta.tid, NULL), 0);
		get_stats(ev, &st1);
		assert_int_equal(st1.sleeps, st0.sleeps);
		assert_int_equal(st1.spin_exits, 0);
		talloc_free(mem);
	}
}

struct signal_arg {
	pthread_t tid;
	unsigned delay_ms;
};

static void *signal_main(void *arg)
{
	struct signal_arg *a = arg;

	sleep_ms(a->delay_ms);
	kill(getpid(), SIGUSR1);
	return NULL;
}

static void flag_signal(struct tevent_context *ev, struct tevent_signal *se,
			int signum, int count, void *siginfo,
			void *private_data)
{
	bool *done = private_data;

	*done = true;
}

static void test_spin_serves_signal(void **state)
{
	size_t i;

	for (i = 0; i < N_SETUPS; i++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev = spinning_ev(mem, &spin_setups[i]);
		struct evpoll_stats st0, st1;
		struct signal_arg sa = { .delay_ms = 5 };
		bool done = false;

		assert_non_null(tevent_add_signal(ev, mem, SIGUSR1, 0,
						  flag_signal, &done));
		loop_once(ev);
		get_stats(ev, &st0);
		assert_int_equal(pthread_create(&sa.tid, NULL, signal_main,
						&sa), 0);
		tu_loop_until(ev, &done, TIMEOUT_MS);
		assert_int_equal(pthread_join(sa.tid, NULL), 0);
		get_stats(ev, &st1);
		assert_int_equal(st1.sleeps, st0.sleeps);
		assert_int_equal(st1.spin_exits, 0);
		talloc_free(mem);
	}
}

/* polls that always report work do not starve fds and timers */
static void test_fds_do_not_starve(void **state)
{
	size_t i;

	for (i = 0; i < N_SETUPS; i++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev = spinning_ev(mem, &spin_setups[i]);
		struct tracker t = { 0 };
		struct evpoll_stats st0, st1;
		struct fd_state fs;
		struct writer w;
		bool done = false;
		int fds[2];

		tr_add(ev, mem, &t);
		t.ret = 1;
		make_pipe(fds);
		add_fd(ev, mem, &fs, fds[0], true);
		get_stats(ev, &st0);

		assert_true(write_byte(fds[1]));
		tu_loop_until(ev, &fs.done, TIMEOUT_MS);
		add_flag_timer(ev, mem, 2000, &done);
		tu_loop_until(ev, &done, TIMEOUT_MS);
		fs.done = false;
		writer_start(&w, fds[1], 3);
		tu_loop_until(ev, &fs.done, TIMEOUT_MS);
		writer_join(&w);

		get_stats(ev, &st1);
		assert_true(t.polls > 0);
		assert_int_equal(st1.sleeps, st0.sleeps);
		assert_int_equal(t.errors, 0);
		close_pipe(fds);
		talloc_free(mem);
	}
}

/* a busy fd (always readable) does not starve polls */
static void test_polls_do_not_starve(void **state)
{
	size_t i;

	for (i = 0; i < N_SETUPS; i++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev = spinning_ev(mem, &spin_setups[i]);
		struct tracker t = { 0 };
		struct fd_state fs;
		uint64_t deadline = tu_now_ns() + TIMEOUT_MS * 1000000ULL;
		unsigned polls0;
		int fds[2];

		make_pipe(fds);
		add_fd(ev, mem, &fs, fds[0], false);
		assert_true(write_byte(fds[1]));
		tr_add(ev, mem, &t);

		/* the fd is served ... */
		while (fs.count < 100) {
			loop_once(ev);
			assert_true(tu_now_ns() < deadline);
		}
		/* ... and the poll still runs between its dispatches */
		polls0 = t.polls;
		fs.count = 0;
		while (t.polls < polls0 + 100 || fs.count < 100) {
			loop_once(ev);
			assert_true(tu_now_ns() < deadline);
		}
		assert_int_equal(t.errors, 0);
		close_pipe(fds);
		talloc_free(mem);
	}
}

/*
 * A caller that spends longer than the fd check interval (20 us) between
 * two tevent_loop_once() calls (its own work, other contexts driven by the
 * same thread, valgrind) still gets its polls called.
 */
static void test_polls_run_despite_slow_caller(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_ALWAYS, 1000);
	struct tracker t = { 0 };
	unsigned i, polls0;

	tr_add(ev, mem, &t);
	loop_until_polled(ev, &t, 1);
	polls0 = t.polls;
	for (i = 0; i < 200; i++) {
		uint64_t until;

		loop_once(ev);
		until = tu_now_ns() + 100000;
		while (tu_now_ns() < until) {
			/* the caller's own work */
		}
	}
	if (t.polls - polls0 < 100) {
		fail_msg("200 iterations, poll called %u times",
			 t.polls - polls0);
	}
	assert_int_equal(t.errors, 0);
	talloc_free(mem);
}

/* ---------------------------------------------------------------------- */
/* 10. the waker */

struct waker_reader {
	pthread_t tid;
	const struct evpoll_waker *w;
	atomic_bool stop;
	unsigned long sleeping;
};

static void *waker_reader_main(void *arg)
{
	struct waker_reader *r = arg;

	do {
		if (evpoll_waker_may_sleep(r->w)) {
			r->sleeping++;
		}
	} while (!atomic_load(&r->stop));
	return NULL;
}

static void test_waker(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *stock = tevent_context_init_byname(mem, "epoll");
	struct tevent_context *ev;
	struct evpoll_waker *w, *w2, *w3;
	struct waker_reader r = { 0 };

	assert_non_null(stock);
	w = evpoll_waker_get(stock);
	assert_non_null(w);
	assert_true(evpoll_waker_may_sleep(w));
	evpoll_waker_unref(w);

	ev = new_ev(mem, EVPOLL_MODE_AUTO, SHORT_SPIN_NS);
	w = evpoll_waker_get(ev);
	assert_non_null(w);
	assert_true(evpoll_waker_may_sleep(w));

	/* another thread reads the flag meanwhile (for the sanitizers) */
	r.w = w;
	atomic_init(&r.stop, false);
	assert_int_equal(pthread_create(&r.tid, NULL, waker_reader_main, &r),
			 0);

	evpoll_pin(ev);
	loop_once_spinning(ev);
	assert_true(evpoll_is_spinning(ev));
	assert_false(evpoll_waker_may_sleep(w));
	evpoll_unpin(ev);
	loop_until_idle(ev);
	assert_true(evpoll_waker_may_sleep(w));

	/* a second reference, and a context freed while it spins */
	w2 = evpoll_waker_get(ev);
	assert_true(w2 == w);
	w3 = evpoll_waker_get(ev);
	evpoll_waker_unref(w3);
	evpoll_activity(ev);
	loop_once_spinning(ev);
	assert_false(evpoll_waker_may_sleep(w2));
	talloc_free(ev);
	assert_true(evpoll_waker_may_sleep(w));
	assert_true(evpoll_waker_may_sleep(w2));

	atomic_store(&r.stop, true);
	assert_int_equal(pthread_join(r.tid, NULL), 0);
	evpoll_waker_unref(w);
	/* still valid through the last reference */
	assert_true(evpoll_waker_may_sleep(w2));
	evpoll_waker_unref(w2);

	/* NEVER mode: always true */
	ev = new_ev(mem, EVPOLL_MODE_NEVER, SHORT_SPIN_NS);
	w = evpoll_waker_get(ev);
	assert_non_null(w);
	evpoll_pin(ev);
	evpoll_activity(ev);
	{
		bool done = false;

		schedule_flag(ev, mem, &done);
		tu_loop_until(ev, &done, TIMEOUT_MS);
	}
	assert_true(evpoll_waker_may_sleep(w));
	evpoll_unpin(ev);
	evpoll_waker_unref(w);

	evpoll_waker_unref(NULL);
	errno = 0;
	assert_null(evpoll_waker_get(NULL));
	assert_int_equal(errno, EINVAL);
	talloc_free(mem);
}

/* ---------------------------------------------------------------------- */
/* 11. a nested loop from inside a poll callback */

static void test_nested_loop(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_ALWAYS, 1000);
	struct tracker a = { 0 }, b = { 0 }, c = { 0 };
	bool done = false;

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
	tevent_loop_allow_nesting(ev);
#pragma GCC diagnostic pop

	tr_add(ev, mem, &a);
	tr_add(ev, mem, &b);
	tr_add(ev, mem, &c);
	loop_until_polled(ev, &a, 1);

	/* b runs a nested loop: it is skipped there, a and c are not */
	b.nested_loops = 20;
	b.watch = &c;
	schedule_flag(ev, mem, &done);
	while (b.nested_loops > 0) {
		loop_once(ev);
	}
	assert_true(b.watch_polls_nested > 0);
	/* the immediate was served in the nested loop */
	assert_true(done);

	/* a, the first poll, nests too; the others run inside */
	a.nested_loops = 20;
	a.watch = &b;
	while (a.nested_loops > 0) {
		loop_once(ev);
	}
	assert_true(a.watch_polls_nested > 0);

	loop_once(ev);
	assert_int_equal(a.errors + b.errors + c.errors, 0);
	assert_int_equal(a.enters + b.enters + c.enters, 3);
	talloc_free(mem);
}

/* ---------------------------------------------------------------------- */
/* 12. several contexts */

static void test_several_contexts_one_thread(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev[3];
	struct tracker t[3] = { { 0 } };
	struct fd_state fs[3];
	bool te_done[3] = { false, false, false };
	int fds[3][2];
	uint64_t deadline = tu_now_ns() + TIMEOUT_MS * 1000000ULL;
	unsigned i;

	ev[0] = new_ev(mem, EVPOLL_MODE_ALWAYS, SHORT_SPIN_NS);
	ev[1] = new_ev(mem, EVPOLL_MODE_AUTO, SHORT_SPIN_NS);
	evpoll_pin(ev[1]);
	ev[2] = new_ev(mem, EVPOLL_MODE_AUTO, SHORT_SPIN_NS);
	evpoll_pin(ev[2]);
	for (i = 0; i < 3; i++) {
		tr_add(ev[i], mem, &t[i]);
		make_pipe(fds[i]);
		add_fd(ev[i], mem, &fs[i], fds[i][0], true);
		add_flag_timer(ev[i], mem, 3000 + i * 1000, &te_done[i]);
	}
	for (i = 0; i < 3; i++) {
		assert_true(write_byte(fds[i][1]));
	}
	for (;;) {
		bool all = true;

		for (i = 0; i < 3; i++) {
			loop_once(ev[i]);
			if (!fs[i].done || !te_done[i]) {
				all = false;
			}
		}
		if (all) {
			break;
		}
		assert_true(tu_now_ns() < deadline);
	}
	for (i = 0; i < 3; i++) {
		struct evpoll_stats st;

		get_stats(ev[i], &st);
		assert_true(evpoll_is_spinning(ev[i]));
		assert_int_equal(st.sleeps, 0);
		assert_int_equal(st.spin_entries, 1);
		assert_true(st.poll_calls > 0);
		/* each poll ran on its own context only */
		assert_int_equal(st.poll_calls, t[i].polls);
		assert_int_equal(t[i].errors, 0);
	}
	/* one of them ends its spin; the others are not affected */
	evpoll_unpin(ev[2]);
	loop_until_idle(ev[2]);
	assert_true(evpoll_is_spinning(ev[0]));
	assert_true(evpoll_is_spinning(ev[1]));
	assert_int_equal(t[2].exits, 1);
	assert_int_equal(t[0].exits + t[1].exits, 0);
	for (i = 0; i < 3; i++) {
		close_pipe(fds[i]);
	}
	talloc_free(mem);
}

#define CTX_THREADS 4

struct ctx_thread {
	pthread_t tid;
	unsigned idx;
	int fds[2];
	pthread_barrier_t *barrier;
	char why[160];
	struct evpoll_stats st;
	unsigned polls;
};

static void *ctx_thread_main(void *arg)
{
	struct ctx_thread *c = arg;
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev;
	struct evpoll_config cfg;
	struct tracker t = { 0 };
	struct fd_state fs = { .fd = c->fds[0], .drain = true };
	struct tevent_immediate *im;
	bool im_done = false, te_done = false;
	uint64_t deadline;

	pthread_barrier_wait(c->barrier);
	if (mem == NULL) {
		snprintf(c->why, sizeof(c->why), "no memory");
		return NULL;
	}
	evpoll_config_default(&cfg);
	cfg.mode = c->idx % 2 == 0 ? EVPOLL_MODE_ALWAYS : EVPOLL_MODE_AUTO;
	cfg.spin_ns = SHORT_SPIN_NS;
	ev = evpoll_context_init(mem, &cfg);
	if (ev == NULL) {
		snprintf(c->why, sizeof(c->why), "context: %s",
			 strerror(errno));
		goto done;
	}
	evpoll_pin(ev);
	t.ev = ev;
	t.handle = evpoll_add_poll(ev, mem, tr_enter, tr_exit, tr_poll, &t);
	im = tevent_create_immediate(mem);
	if (t.handle == NULL || im == NULL ||
	    tevent_add_fd(ev, mem, c->fds[0], TEVENT_FD_READ, fd_handler,
			  &fs) == NULL ||
	    tevent_add_timer(ev, mem, tevent_timeval_current_ofs(0, 5000),
			     flag_timer, &te_done) == NULL) {
		snprintf(c->why, sizeof(c->why), "setup failed");
		goto done;
	}
	tevent_schedule_immediate(im, ev, flag_immediate, &im_done);

	deadline = tu_now_ns() + TIMEOUT_MS * 1000000ULL;
	while (!(im_done && te_done && fs.done)) {
		if (tevent_loop_once(ev) != 0) {
			snprintf(c->why, sizeof(c->why), "loop_once failed");
			goto done;
		}
		if (tu_now_ns() > deadline) {
			snprintf(c->why, sizeof(c->why),
				 "timeout: im %d te %d fd %d", im_done,
				 te_done, fs.done);
			goto done;
		}
	}
	if (!evpoll_is_spinning(ev)) {
		snprintf(c->why, sizeof(c->why), "not spinning");
	}
	evpoll_get_stats(ev, &c->st);
	c->polls = t.polls;
	if (t.errors != 0) {
		snprintf(c->why, sizeof(c->why), "%u poll errors", t.errors);
	}
done:
	talloc_free(mem);
	return NULL;
}

static void test_contexts_on_threads(void **state)
{
	struct ctx_thread c[CTX_THREADS];
	pthread_barrier_t barrier;
	unsigned i;

	assert_int_equal(pthread_barrier_init(&barrier, NULL,
					      CTX_THREADS + 1), 0);
	for (i = 0; i < CTX_THREADS; i++) {
		memset(&c[i], 0, sizeof(c[i]));
		c[i].idx = i;
		c[i].barrier = &barrier;
		make_pipe(c[i].fds);
		assert_int_equal(pthread_create(&c[i].tid, NULL,
						ctx_thread_main, &c[i]), 0);
	}
	pthread_barrier_wait(&barrier);
	sleep_ms(3);
	for (i = 0; i < CTX_THREADS; i++) {
		assert_true(write_byte(c[i].fds[1]));
	}
	for (i = 0; i < CTX_THREADS; i++) {
		assert_int_equal(pthread_join(c[i].tid, NULL), 0);
		close_pipe(c[i].fds);
	}
	pthread_barrier_destroy(&barrier);
	for (i = 0; i < CTX_THREADS; i++) {
		if (c[i].why[0] != '\0') {
			fail_msg("thread %u: %s", i, c[i].why);
		}
		assert_int_equal(c[i].st.sleeps, 0);
		assert_int_equal(c[i].st.spin_entries, 1);
		assert_true(c[i].polls > 0);
		assert_int_equal(c[i].st.poll_calls, c[i].polls);
	}
}

/* ---------------------------------------------------------------------- */
/* statistics and argument checks */

static void test_stats_exact(void **state)
{
	static const enum evpoll_mode modes[] = {
		EVPOLL_MODE_NEVER, EVPOLL_MODE_AUTO, EVPOLL_MODE_ALWAYS,
	};
	size_t m;

	for (m = 0; m < sizeof(modes) / sizeof(modes[0]); m++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev = new_ev(mem, modes[m],
						   SHORT_SPIN_NS);
		struct tracker t = { 0 };
		struct evpoll_stats st0, st1;
		bool done[3] = { false, false, false };
		unsigned i, n;

		tr_add(ev, mem, &t);
		t.work_left = 5;
		get_stats(ev, &st0);
		assert_int_equal(st0.iterations, 0);

		/* every tevent_loop_once() is one iteration */
		for (i = 0; i < 3; i++) {
			schedule_flag(ev, mem, &done[i]);
		}
		for (i = 0; i < 3; i++) {
			loop_once(ev);
			assert_true(done[i]);
		}
		get_stats(ev, &st1);
		assert_int_equal(st1.iterations, 3);
		assert_int_equal(st1.immediate_dispatches, 3);

		if (modes[m] == EVPOLL_MODE_NEVER) {
			talloc_free(mem);
			continue;
		}
		evpoll_pin(ev);
		n = 3;
		while (t.polls < 10) {
			loop_once(ev);
			n++;
		}
		get_stats(ev, &st0);
		assert_int_equal(st0.iterations, n);
		assert_int_equal(st0.poll_calls, t.polls);
		assert_int_equal(st0.poll_work, 5);

		/* spin_ns includes the current spin */
		loop_once(ev);
		get_stats(ev, &st1);
		assert_true(st1.spin_ns > st0.spin_ns);
		talloc_free(mem);
	}
}

/*
 * A timer handler is counted in timer_dispatches, not in fd_dispatches,
 * also when the timer ends a sleep (the loop sleeps until it, unless the
 * test thread is paused for 20 ms); a loop without fds has no fd dispatch.
 */
static void test_stats_timer_after_sleep(void **state)
{
	static const enum evpoll_mode modes[] = {
		EVPOLL_MODE_NEVER, EVPOLL_MODE_AUTO,
	};
	size_t m;

	for (m = 0; m < sizeof(modes) / sizeof(modes[0]); m++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev = new_ev(mem, modes[m],
						   SHORT_SPIN_NS);
		struct evpoll_stats st;
		bool done = false;

		add_flag_timer(ev, mem, 20000, &done);
		tu_loop_until(ev, &done, TIMEOUT_MS);
		get_stats(ev, &st);
		talloc_free(mem);
		assert_int_equal(st.timer_dispatches, 1);
		assert_int_equal(st.fd_dispatches, 0);
	}
}

static void test_bad_args(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_AUTO,
					   SHORT_SPIN_NS);
	struct tevent_context *stock = tevent_context_init_byname(mem, "epoll");
	struct evpoll_stats st;
	struct tracker t = { 0 };

	assert_non_null(stock);
	assert_int_equal(evpoll_get_stats(NULL, &st), EINVAL);
	assert_int_equal(evpoll_get_stats(ev, NULL), EINVAL);
	assert_int_equal(evpoll_get_stats(stock, &st), EINVAL);

	errno = 0;
	assert_null(evpoll_add_poll(ev, mem, tr_enter, tr_exit, NULL, &t));
	assert_int_equal(errno, EINVAL);
	errno = 0;
	assert_null(evpoll_add_poll(NULL, mem, tr_enter, tr_exit, tr_poll,
				    &t));
	assert_int_equal(errno, EINVAL);
	errno = 0;
	assert_null(evpoll_add_poll(stock, mem, tr_enter, tr_exit, tr_poll,
				    &t));
	assert_int_equal(errno, EINVAL);

	/* optional enter and exit */
	t.ev = ev;
	t.entered = true;
	t.handle = evpoll_add_poll(ev, mem, NULL, NULL, tr_poll, &t);
	assert_non_null(t.handle);
	evpoll_activity(ev);
	loop_once(ev);
	loop_until_idle(ev);
	assert_true(t.polls > 0);
	TALLOC_FREE(t.handle);
	talloc_free(mem);
}

/* tevent_loop_wait() returns once no events are left */
static void test_loop_wait_returns(void **state)
{
	static const enum evpoll_mode modes[] = {
		EVPOLL_MODE_NEVER, EVPOLL_MODE_AUTO, EVPOLL_MODE_ALWAYS,
	};
	size_t m;

	for (m = 0; m < sizeof(modes) / sizeof(modes[0]); m++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev = new_ev(mem, modes[m],
						   SHORT_SPIN_NS);
		bool im_done = false, te_done = false;

		schedule_flag(ev, mem, &im_done);
		add_flag_timer(ev, mem, 2000, &te_done);
		assert_int_equal(tevent_loop_wait(ev), 0);
		assert_true(im_done);
		assert_true(te_done);

		/* a pin does not keep loop_wait going without events */
		evpoll_pin(ev);
		te_done = false;
		add_flag_timer(ev, mem, 2000, &te_done);
		assert_int_equal(tevent_loop_wait(ev), 0);
		assert_true(te_done);
		evpoll_unpin(ev);
		talloc_free(mem);
	}
}

/* tevent_re_initialise() while spinning: balanced, and it spins again */
static void test_re_initialise(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = new_ev(mem, EVPOLL_MODE_ALWAYS, 1000);
	struct tracker t = { 0 };
	struct evpoll_stats st;
	struct fd_state fs;
	int fds[2];

	tr_add(ev, mem, &t);
	loop_once(ev);
	assert_true(evpoll_is_spinning(ev));
	assert_int_equal(tevent_re_initialise(ev), 0);
	assert_true(evpoll_is_evpoll(ev));
	assert_false(evpoll_is_spinning(ev));
	assert_int_equal(t.exits, 1);

	make_pipe(fds);
	add_fd(ev, mem, &fs, fds[0], true);
	assert_true(write_byte(fds[1]));
	tu_loop_until(ev, &fs.done, TIMEOUT_MS);
	assert_true(evpoll_is_spinning(ev));
	assert_int_equal(t.enters, 2);
	loop_once(ev);
	get_stats(ev, &st);
	assert_int_equal(st.sleeps, 0);
	assert_int_equal(t.errors, 0);
	close_pipe(fds);
	talloc_free(mem);
}

/*
 * A broken loop may block in epoll_wait() or spin in one loop_once()
 * forever, where no TIMEOUT_MS check runs: a per-test alarm ends the
 * program instead (SIGALRM's default action; the last "[ RUN ]" line names
 * the test).
 */
#ifndef WATCHDOG_S
#define WATCHDOG_S 120
#endif

static int test_setup(void **state)
{
	alarm(WATCHDOG_S);
	return 0;
}

static int test_teardown(void **state)
{
	alarm(0);
	/* some tests set the environment overrides */
	unset_env_overrides();
	return 0;
}

#define TEST(fn) cmocka_unit_test_setup_teardown(fn, test_setup, \
						 test_teardown)

int main(int argc, char *argv[])
{
	const struct CMUnitTest tests[] = {
		TEST(test_init_race),
		TEST(test_init_idempotent),
		TEST(test_opt_in_paths),
		TEST(test_config_default),
		TEST(test_config_roundtrip),
		TEST(test_config_invalid),
		TEST(test_config_env),
		TEST(test_config_env_bad),
		TEST(test_never_mode),
		TEST(test_always_mode),
		TEST(test_auto_spin_and_idle),
		TEST(test_poll_work_keeps_spinning),
		TEST(test_enter_exit_add_remove),
		TEST(test_free_self_in_poll),
		TEST(test_free_next_in_poll),
		TEST(test_free_prev_in_poll),
		TEST(test_free_in_enter),
		TEST(test_free_in_exit),
		TEST(test_many_polls),
		TEST(test_free_context_with_polls),
		TEST(test_free_context_parented_poll),
		TEST(test_pin),
		TEST(test_pin_refcount),
		TEST(test_unpin_unbalanced),
		TEST(test_pin_noop),
		TEST(test_activity_starts_spin),
		TEST(test_activity_extends_spin),
		TEST(test_spin_serves_fd_from_thread),
		TEST(test_spin_serves_timers),
		TEST(test_spin_serves_threaded_immediate),
		TEST(test_spin_serves_signal),
		TEST(test_fds_do_not_starve),
		TEST(test_polls_do_not_starve),
		TEST(test_polls_run_despite_slow_caller),
		TEST(test_waker),
		TEST(test_nested_loop),
		TEST(test_several_contexts_one_thread),
		TEST(test_contexts_on_threads),
		TEST(test_stats_exact),
		TEST(test_stats_timer_after_sleep),
		TEST(test_bad_args),
		TEST(test_loop_wait_returns),
		TEST(test_re_initialise),
	};

	if (argc == 2 && strcmp(argv[1], RACE_CHILD_ARG) == 0) {
		return race_child();
	}
	/* the tests set the configuration; operator overrides would skew */
	unset_env_overrides();
	return cmocka_run_group_tests(tests, NULL, NULL);
}
