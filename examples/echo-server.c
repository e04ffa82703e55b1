/*
 * echo-server: a TCP echo server on one tevent loop that hands blocking
 * work to an evproxy_pool.
 *
 * For each line a client sends, the server computes a checksum on a worker
 * thread (standing in for blocking work: a disk read, a name lookup, a
 * crypto call; here a checksum and a short sleep) and answers with the
 * line followed by the checksum. The loop never blocks: it reads, starts
 * jobs, and writes answers when they complete.
 *
 *   echo-server [lines]
 *
 * It listens on 127.0.0.1 on an ephemeral port and, to be testable on its
 * own, starts a client thread that opens two connections, sends the lines
 * (several per write), checks every answer, closes, and rings the server's
 * stop doorbell. The stop handler removes the listener and frees the pool;
 * once the connections are closed the loop has no events left and
 * tevent_loop_wait() returns. Exit status 0 if every answer was right.
 *
 * smoke-args: 20
 *
 * Copy freely.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <evpoll.h>
#include <evproxy.h>
#include <evproxy_pool.h>

#define LINE_MAX_LEN 256
#define NCONNS 2

/* FNV-1a: the "blocking work"; the client computes it too, to check. */
static uint32_t checksum(const char *s, size_t len)
{
	uint32_t h = 2166136261u;
	size_t i;

	for (i = 0; i < len; i++) {
		h = (h ^ (unsigned char)s[i]) * 16777619u;
	}
	return h;
}

static int write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);

		if (n < 0 && errno == EINTR) {
			continue;
		}
		if (n <= 0) {
			return -1;
		}
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

/* ---- server -------------------------------------------------------------- */

struct conn;

struct server {
	struct tevent_context *ev;
	struct evproxy_pool *pool;
	int lfd;
	struct tevent_fd *listener;	/* closes lfd when freed */
	struct evproxy_doorbell *stop;
	struct conn *conns;		/* open connections */
	unsigned lines_served;
};

struct conn {
	struct conn *prev, *next;
	struct server *srv;
	int fd;
	struct tevent_fd *fde;
	char in[4 * LINE_MAX_LEN];
	size_t inlen;
	/* at most one job per connection, so answers keep the line order */
	struct tevent_req *job_req;
	struct checksum_job *job;
	bool eof;
};

/*
 * What the worker thread sees: only this, a child of the connection. A
 * connection is never freed while its job runs (see conn_next), so the
 * job's memory outlives the function.
 */
struct checksum_job {
	char line[LINE_MAX_LEN];
	size_t len;
	uint32_t sum;			/* the worker's result */
};

/* Worker thread: may block; touches nothing but its job. */
static void checksum_fn(void *private_data)
{
	struct checksum_job *job = private_data;

	job->sum = checksum(job->line, job->len);
	usleep(1000);			/* pretend this was slow I/O */
}

static int conn_destructor(struct conn *c)
{
	if (c->prev != NULL) {
		c->prev->next = c->next;
	} else {
		c->srv->conns = c->next;
	}
	if (c->next != NULL) {
		c->next->prev = c->prev;
	}
	return 0;	/* the fde closes the fd (tevent_fd_set_auto_close) */
}

static void job_done(struct tevent_req *req);

/* Start the job for the next complete line, or close when done. */
static void conn_next(struct conn *c)
{
	char *nl;
	size_t len;

	if (c->job_req != NULL) {
		return;			/* one at a time */
	}
	nl = memchr(c->in, '\n', c->inlen);
	if (nl == NULL) {
		if (c->eof || c->inlen == sizeof(c->in)) {
			talloc_free(c);	/* closed, or a line too long */
		}
		return;
	}
	len = (size_t)(nl - c->in);
	if (len >= LINE_MAX_LEN) {
		talloc_free(c);
		return;
	}
	c->job = talloc_zero(c, struct checksum_job);
	if (c->job == NULL) {
		talloc_free(c);
		return;
	}
	memcpy(c->job->line, c->in, len);
	c->job->len = len;
	c->job_req = evproxy_pool_job_send(c, c->srv->ev, c->srv->pool,
					   checksum_fn, c->job);
	if (c->job_req == NULL) {
		talloc_free(c);
		return;
	}
	tevent_req_set_callback(c->job_req, job_done, c);
}

/* Back on the loop: the worker is done with the line. */
static void job_done(struct tevent_req *req)
{
	struct conn *c = tevent_req_callback_data(req, struct conn);
	struct checksum_job *job = c->job;
	char out[LINE_MAX_LEN + 16];
	int ret, n;

	ret = evproxy_pool_job_recv(req);
	TALLOC_FREE(c->job_req);
	if (ret != 0) {
		/* ECANCELED: the pool is shutting down */
		talloc_free(c);
		return;
	}
	n = snprintf(out, sizeof(out), "%.*s %08x\n", (int)job->len,
		     job->line, job->sum);
	/*
	 * A short line to a loopback peer: a plain write. A real server
	 * queues its output and writes on TEVENT_FD_WRITE.
	 */
	if (write_all(c->fd, out, (size_t)n) != 0) {
		talloc_free(c);
		return;
	}
	c->srv->lines_served++;
	memmove(c->in, c->in + job->len + 1, c->inlen - job->len - 1);
	c->inlen -= job->len + 1;
	TALLOC_FREE(c->job);
	conn_next(c);
}

static void conn_readable(struct tevent_context *ev, struct tevent_fd *fde,
			  uint16_t flags, void *private_data)
{
	struct conn *c = private_data;
	ssize_t n;

	n = read(c->fd, c->in + c->inlen, sizeof(c->in) - c->inlen);
	if (n < 0 && errno == EINTR) {
		return;
	}
	if (n <= 0) {
		c->eof = true;
		TEVENT_FD_NOT_READABLE(c->fde);
	} else {
		c->inlen += (size_t)n;
	}
	if (c->inlen == sizeof(c->in)) {
		TEVENT_FD_NOT_READABLE(c->fde);	/* until a line is done */
	}
	conn_next(c);
}

static void accept_handler(struct tevent_context *ev, struct tevent_fd *fde,
			   uint16_t flags, void *private_data)
{
	struct server *srv = private_data;
	struct conn *c;
	int fd = accept4(srv->lfd, NULL, NULL, SOCK_CLOEXEC);
	int one = 1;

	if (fd == -1) {
		return;
	}
	/* answers are small writes: don't let Nagle hold them back */
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	c = talloc_zero(ev, struct conn);
	if (c == NULL) {
		close(fd);
		return;
	}
	c->srv = srv;
	c->fd = fd;
	c->fde = tevent_add_fd(ev, c, fd, TEVENT_FD_READ, conn_readable, c);
	if (c->fde == NULL) {
		close(fd);
		talloc_free(c);
		return;
	}
	tevent_fd_set_auto_close(c->fde);
	c->next = srv->conns;
	if (srv->conns != NULL) {
		srv->conns->prev = c;
	}
	srv->conns = c;
	talloc_set_destructor(c, conn_destructor);
}

/*
 * Stop: no new connections, no pool. Jobs still queued complete with
 * ECANCELED, which closes their connections; idle connections are shut
 * down, so their reads see end-of-file. Then the loop runs dry.
 */
static void stop_handler(struct tevent_context *ev,
			 struct evproxy_doorbell *db, uint64_t rings,
			 void *private_data)
{
	struct server *srv = private_data;
	struct conn *c;

	TALLOC_FREE(srv->listener);
	TALLOC_FREE(srv->stop);
	TALLOC_FREE(srv->pool);		/* joins the workers */
	for (c = srv->conns; c != NULL; c = c->next) {
		shutdown(c->fd, SHUT_RDWR);
	}
}

/* ---- client (a thread of its own, blocking sockets) ---------------------- */

struct client {
	uint16_t port;
	unsigned lines;
	struct evproxy_ringer *stop;	/* the server's stop doorbell */
	bool ok;
};

/* Read one line (without '\n') from fd through a small buffer. */
struct reader {
	int fd;
	char buf[1024];
	size_t len;
};

static int read_line(struct reader *r, char *line, size_t size)
{
	for (;;) {
		char *nl = memchr(r->buf, '\n', r->len);
		ssize_t n;

		if (nl != NULL) {
			size_t len = (size_t)(nl - r->buf);

			if (len >= size) {
				return -1;
			}
			memcpy(line, r->buf, len);
			line[len] = '\0';
			memmove(r->buf, nl + 1, r->len - len - 1);
			r->len -= len + 1;
			return 0;
		}
		if (r->len == sizeof(r->buf)) {
			return -1;
		}
		n = read(r->fd, r->buf + r->len, sizeof(r->buf) - r->len);
		if (n <= 0) {
			return -1;	/* error, timeout or EOF */
		}
		r->len += (size_t)n;
	}
}

static int client_connect(uint16_t port)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	struct timeval tv = { .tv_sec = 10 };
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd == -1) {
		return -1;
	}
	sin.sin_port = htons(port);
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	if (connect(fd, (struct sockaddr *)&sin, sizeof(sin)) != 0) {
		close(fd);
		return -1;
	}
	return fd;
}

static bool client_run(struct client *cl)
{
	struct reader r[NCONNS];
	char batch[3 * LINE_MAX_LEN], line[LINE_MAX_LEN], want[LINE_MAX_LEN];
	unsigned i, k, j;
	bool ok = true;

	for (k = 0; k < NCONNS; k++) {
		r[k].len = 0;
		r[k].fd = client_connect(cl->port);
		if (r[k].fd == -1) {
			while (k-- > 0) {
				close(r[k].fd);
			}
			return false;
		}
	}
	/* up to three lines per write, on each connection in turn */
	for (i = 0; ok && i < cl->lines; i += 3) {
		for (k = 0; ok && k < NCONNS; k++) {
			size_t len = 0;

			for (j = i; j < i + 3 && j < cl->lines; j++) {
				len += (size_t)snprintf(batch + len,
					sizeof(batch) - len,
					"conn %u line %u hello\n", k, j);
			}
			ok = write_all(r[k].fd, batch, len) == 0;
		}
		for (k = 0; ok && k < NCONNS; k++) {
			for (j = i; ok && j < i + 3 && j < cl->lines; j++) {
				int n = snprintf(want, sizeof(want),
						 "conn %u line %u hello", k,
						 j);

				snprintf(want + n, sizeof(want) - (size_t)n,
					 " %08x", checksum(want, (size_t)n));
				ok = read_line(&r[k], line,
					       sizeof(line)) == 0 &&
				     strcmp(line, want) == 0;
				if (!ok) {
					fprintf(stderr, "client: got '%s', "
						"want '%s'\n", line, want);
				}
			}
		}
	}
	for (k = 0; k < NCONNS; k++) {
		close(r[k].fd);
	}
	return ok;
}

static void *client_main(void *arg)
{
	struct client *cl = arg;

	cl->ok = client_run(cl);
	/* whatever happened, let the server stop */
	evproxy_ringer_ring(cl->stop);
	return NULL;
}

int main(int argc, char **argv)
{
	struct server srv = { 0 };
	struct client cl = { 0 };
	struct sockaddr_in sin = { .sin_family = AF_INET };
	socklen_t slen = sizeof(sin);
	pthread_t t;
	int lfd;

	cl.lines = argc > 1 ? (unsigned)strtoul(argv[1], NULL, 10) : 100;
	alarm(30);	/* fail rather than hang */

	/* messages cross threads: no global talloc parent */
	talloc_disable_null_tracking();

	/*
	 * Any tevent backend works. evpoll spins for a while after activity,
	 * so completions that follow closely arrive without a wake-up.
	 */
	srv.ev = evpoll_context_init(NULL, NULL);
	if (srv.ev == NULL) {
		return 1;
	}
	srv.pool = evproxy_pool_create(srv.ev, 2, NULL);
	if (srv.pool == NULL) {
		perror("evproxy_pool_create");
		return 1;
	}

	lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	sin.sin_port = 0;	/* ephemeral */
	if (lfd == -1 || bind(lfd, (struct sockaddr *)&sin, sizeof(sin)) != 0 ||
	    listen(lfd, 16) != 0 ||
	    getsockname(lfd, (struct sockaddr *)&sin, &slen) != 0) {
		perror("listen");
		return 1;
	}
	srv.lfd = lfd;
	srv.listener = tevent_add_fd(srv.ev, srv.ev, lfd, TEVENT_FD_READ,
				     accept_handler, &srv);
	if (srv.listener == NULL) {
		return 1;
	}
	tevent_fd_set_auto_close(srv.listener);

	srv.stop = evproxy_add_doorbell(srv.ev, srv.ev, stop_handler, &srv);
	if (srv.stop == NULL) {
		perror("evproxy_add_doorbell");
		return 1;
	}
	cl.stop = evproxy_doorbell_ringer(srv.stop);
	cl.port = ntohs(sin.sin_port);
	if (cl.stop == NULL ||
	    pthread_create(&t, NULL, client_main, &cl) != 0) {
		return 1;
	}
	printf("listening on 127.0.0.1:%u\n", (unsigned)cl.port);

	tevent_loop_wait(srv.ev);	/* until the loop has no events */

	pthread_join(t, NULL);
	evproxy_ringer_unref(cl.stop);
	talloc_free(srv.ev);
	printf("%u lines served, client %s\n", srv.lines_served,
	       cl.ok ? "ok" : "FAILED");
	return cl.ok && srv.lines_served == NCONNS * cl.lines ? 0 : 1;
}
