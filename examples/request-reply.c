/*
 * request-reply: two tevent loops on two threads exchange talloc messages
 * through evproxy. The main loop sends numbered requests to a worker loop;
 * the worker answers each with a reply carrying the square of the number.
 *
 *   request-reply [count]
 *
 * smoke-args: 20000
 *
 * Copy freely: this is the shape of a daemon handing work to another loop
 * and getting answers back, with clear ownership of every message.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <evpoll.h>
#include <evproxy.h>

struct request {
	unsigned long n;
};

struct reply {
	unsigned long n, square;
};

struct main_state;

struct worker {
	struct tevent_context *ev;
	struct main_state *m;		/* the main loop's state, for replies */
	struct evproxy *inbox;		/* requests arrive here */
	struct evproxy_sender *to_worker;
	struct evproxy_sender *to_main;	/* replies go there */
	atomic_bool ready;
	bool stop;
};

struct main_state {
	unsigned long received, expected_next;
	bool in_order;
};

/* On the main loop: check each reply. */
static void on_reply(struct tevent_context *ev, void *msg,
		     void *private_data)
{
	struct main_state *m = private_data;
	struct reply *rep = msg;

	if (rep->n != m->expected_next || rep->square != rep->n * rep->n) {
		m->in_order = false;
	}
	m->expected_next++;
	m->received++;
}

/* On the worker loop: answer a request. */
static void on_request(struct tevent_context *ev, void *msg,
		       void *private_data)
{
	struct worker *w = private_data;
	struct request *req = msg;
	struct reply *rep;
	int ret;

	if (req->n == 0) {
		w->stop = true;	/* request 0 means "shut down" */
		return;		/* req is freed when we return */
	}
	rep = evproxy_msg_new(sizeof(*rep), "struct reply");
	if (rep == NULL) {
		fprintf(stderr, "out of memory\n");
		exit(1);
	}
	rep->n = req->n;
	rep->square = req->n * req->n;
	ret = evproxy_send(w->to_main, on_reply, w->m, &rep);
	if (ret != 0) {
		/* on any error the reply is still ours */
		fprintf(stderr, "reply: %s\n", strerror(ret));
		talloc_free(rep);
	}
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;

	w->ev = evpoll_context_init(NULL, NULL);
	if (w->ev == NULL) {
		exit(1);
	}
	w->inbox = evproxy_create(w->ev, w->ev, NULL);
	if (w->inbox == NULL) {
		exit(1);
	}
	w->to_worker = evproxy_sender(w->inbox);
	atomic_store(&w->ready, true);
	while (!w->stop) {
		tevent_loop_once(w->ev);
	}
	talloc_free(w->ev);	/* frees the inbox; senders get ECANCELED */
	return NULL;
}

int main(int argc, char **argv)
{
	unsigned long count = argc > 1 ? strtoul(argv[1], NULL, 10) : 100000;
	struct main_state m = { .expected_next = 1, .in_order = true };
	struct worker w = { .m = &m };
	struct tevent_context *ev;
	struct evproxy *replies;
	struct evproxy_config cfg;
	struct request *req;
	pthread_t t;
	unsigned long i;
	int ret;

	/* messages move between threads: no global talloc parent */
	talloc_disable_null_tracking();

	ev = evpoll_context_init(NULL, NULL);
	if (ev == NULL) {
		return 1;
	}
	/* bounded: at most 1024 replies waiting for the main loop */
	evproxy_config_default(&cfg);
	cfg.capacity = 1024;
	replies = evproxy_create(ev, ev, &cfg);
	if (replies == NULL) {
		return 1;
	}
	w.to_main = evproxy_sender(replies);
	if (pthread_create(&t, NULL, worker_main, &w) != 0) {
		return 1;
	}
	while (!atomic_load(&w.ready)) {
	}

	for (i = 1; i <= count; i++) {
		req = evproxy_msg_new(sizeof(*req), "struct request");
		if (req == NULL) {
			return 1;
		}
		req->n = i;
		ret = evproxy_send(w.to_worker, on_request, &w, &req);
		if (ret != 0) {
			fprintf(stderr, "request: %s\n", strerror(ret));
			talloc_free(req);
			return 1;
		}
		/* keep the reply queue from filling: serve replies as we go */
		while (i - m.received >= 512) {
			tevent_loop_once(ev);
		}
	}
	while (m.received < count) {
		tevent_loop_once(ev);
	}

	req = evproxy_msg_new(sizeof(*req), "struct request");	/* n = 0 */
	if (req == NULL || evproxy_send(w.to_worker, on_request, &w,
					&req) != 0) {
		return 1;
	}
	pthread_join(t, NULL);
	evproxy_sender_unref(w.to_worker);
	evproxy_sender_unref(w.to_main);
	talloc_free(ev);

	printf("%lu requests, %lu replies, %s\n", count, m.received,
	       m.in_order ? "in order" : "OUT OF ORDER");
	return m.in_order && m.received == count ? 0 : 1;
}
