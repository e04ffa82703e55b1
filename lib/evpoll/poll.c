/*
 * Poll callbacks: registration, removal from anywhere (including their own
 * callback), and the walks that call them.
 */
#include <errno.h>

#include "evlist.h"
#include "evpoll_internal.h"

/* Move every walk in progress off a poll that is leaving the list. */
static void cursors_skip(struct evpoll_state *st, struct evpoll_poll *p)
{
	struct evpoll_cursor *c;

	for (c = st->cursors; c != NULL; c = c->prev) {
		if (c->cur == p) {
			c->cur = NULL;
		}
		if (c->next == p) {
			c->next = p->next;
		}
	}
}

static int poll_destructor(struct evpoll_poll *p)
{
	struct evpoll_state *st = p->st;

	if (st == NULL) {
		return 0;
	}
	cursors_skip(st, p);
	EVLIST_REMOVE(st->polls, st->polls_tail, p);
	p->st = NULL;
	if (p->entered) {
		p->entered = false;
		if (p->exit != NULL) {
			p->exit(st->ev, p->private_data);
		}
	}
	return 0;
}

typedef void (*poll_step_fn)(struct evpoll_state *st, struct evpoll_poll *p);

/* Walk the polls, safe against any poll being freed by the step. */
static void polls_walk(struct evpoll_state *st, poll_step_fn step)
{
	struct evpoll_cursor c = { .prev = st->cursors };

	st->cursors = &c;
	for (c.cur = st->polls; c.cur != NULL; c.cur = c.next) {
		c.next = c.cur->next;
		step(st, c.cur);
	}
	st->cursors = c.prev;
}

static void poll_enter(struct evpoll_state *st, struct evpoll_poll *p)
{
	if (p->entered) {
		return;
	}
	p->entered = true;
	if (p->enter != NULL) {
		p->enter(st->ev, p->private_data);
	}
}

static void poll_exit(struct evpoll_state *st, struct evpoll_poll *p)
{
	if (!p->entered) {
		return;
	}
	p->entered = false;
	if (p->exit != NULL) {
		p->exit(st->ev, p->private_data);
	}
}

void evpoll_polls_enter(struct evpoll_state *st)
{
	polls_walk(st, poll_enter);
}

void evpoll_polls_exit(struct evpoll_state *st)
{
	polls_walk(st, poll_exit);
}

/* The context is going away: its polls stay valid but inert. */
void evpoll_polls_detach(struct evpoll_state *st)
{
	struct evpoll_poll *p;

	while ((p = st->polls) != NULL) {
		cursors_skip(st, p);
		EVLIST_REMOVE(st->polls, st->polls_tail, p);
		p->st = NULL;
		p->entered = false;
	}
}

int evpoll_run_polls(struct evpoll_state *st)
{
	struct evpoll_cursor c = { .prev = st->cursors };
	int work = 0;

	st->cursors = &c;
	for (c.cur = st->polls; c.cur != NULL; c.cur = c.next) {
		struct evpoll_poll *p = c.cur;
		int n;

		c.next = p->next;
		if (p->running || !p->entered) {
			continue;
		}
		p->running = true;
		n = p->poll(st->ev, p->private_data);
		st->stats.poll_calls++;
		if (c.cur != NULL) {
			/* not freed by its own callback */
			c.cur->running = false;
		}
		if (n > 0) {
			st->stats.poll_work++;
			work += n;
		}
	}
	st->cursors = c.prev;
	return work;
}

_PUBLIC_ struct evpoll_poll *evpoll_add_poll(struct tevent_context *ev,
					     TALLOC_CTX *mem_ctx,
					     evpoll_enter_fn enter,
					     evpoll_exit_fn exit,
					     evpoll_poll_fn poll,
					     void *private_data)
{
	struct evpoll_state *st = evpoll_state_get(ev);
	struct evpoll_poll *p;

	if (st == NULL || poll == NULL) {
		errno = EINVAL;
		return NULL;
	}
	p = talloc_zero(mem_ctx, struct evpoll_poll);
	if (p == NULL) {
		errno = ENOMEM;
		return NULL;
	}
	p->st = st;
	p->enter = enter;
	p->exit = exit;
	p->poll = poll;
	p->private_data = private_data;
	EVLIST_APPEND(st->polls, st->polls_tail, p);
	talloc_set_destructor(p, poll_destructor);
	if (st->spinning) {
		/* keep enter/exit balanced: a poll joining a spin enters now */
		poll_enter(st, p);
	}
	return p;
}
