/*
 * uring-cat: copy a file to standard output, reading it with io_uring on a
 * tevent loop through the evpoll_uring adapter.
 *
 *   uring-cat FILE
 *
 * One read is in flight at a time: its completion handler writes the data
 * out and submits the next read, until end of file. The adapter delivers
 * the completion through an eventfd while the loop sleeps and by polling
 * the ring while the evpoll loop spins; with "pin in-flight" the loop keeps
 * spinning while a read is outstanding.
 *
 * Exit status: 0 done, 1 error, 2 usage.
 *
 * smoke-args: ABI/evpoll-0.1.0.sigs
 */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "evpoll.h"
#include "evpoll_uring.h"

#define CHUNK (128 * 1024)

struct cat {
	struct io_uring *ring;
	struct evpoll_uring *u;
	int fd;
	uint64_t offset;
	bool done;
	int status;
	char buf[CHUNK];
};

static void finish(struct cat *c, int status, const char *what, int err)
{
	if (what != NULL) {
		fprintf(stderr, "uring-cat: %s: %s\n", what, strerror(err));
	}
	c->status = status;
	c->done = true;
}

/* Queue a read of the next chunk; the completion comes to on_read(). */
static void read_next(struct cat *c)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(c->ring);
	int ret;

	if (sqe == NULL) {
		finish(c, 1, "io_uring_get_sqe", EBUSY);
		return;
	}
	io_uring_prep_read(sqe, c->fd, c->buf, sizeof(c->buf), c->offset);
	io_uring_sqe_set_data(sqe, c);
	ret = evpoll_uring_submit(c->u);
	if (ret < 0) {
		finish(c, 1, "io_uring_submit", -ret);
	}
}

static bool write_all(const char *p, size_t len)
{
	while (len > 0) {
		ssize_t n = write(STDOUT_FILENO, p, len);

		if (n == -1 && errno == EINTR) {
			continue;
		}
		if (n <= 0) {
			return false;
		}
		p += n;
		len -= (size_t)n;
	}
	return true;
}

/* Runs on the loop for every completion. */
static void on_read(struct tevent_context *ev, struct io_uring_cqe *cqe,
		    void *private_data)
{
	struct cat *c = io_uring_cqe_get_data(cqe);

	if (cqe->res < 0) {
		finish(c, 1, "read", -cqe->res);
		return;
	}
	if (cqe->res == 0) {
		finish(c, 0, NULL, 0);	/* end of file */
		return;
	}
	if (!write_all(c->buf, (size_t)cqe->res)) {
		finish(c, 1, "write", errno);
		return;
	}
	c->offset += (uint64_t)cqe->res;
	read_next(c);
}

int main(int argc, char **argv)
{
	TALLOC_CTX *mem;
	struct tevent_context *ev;
	struct io_uring ring;
	struct cat *c;
	int ret, status;

	if (argc != 2) {
		fprintf(stderr, "usage: uring-cat FILE\n");
		return 2;
	}
	mem = talloc_new(NULL);
	ev = evpoll_context_init(mem, NULL);	/* the default: AUTO */
	if (ev == NULL) {
		perror("uring-cat: evpoll_context_init");
		return 1;
	}
	ret = io_uring_queue_init(4, &ring, 0);
	if (ret < 0) {
		fprintf(stderr, "uring-cat: io_uring_queue_init: %s\n",
			strerror(-ret));
		return 1;
	}
	c = talloc_zero(mem, struct cat);
	if (c == NULL) {
		fprintf(stderr, "uring-cat: out of memory\n");
		return 1;
	}
	c->ring = &ring;
	c->fd = open(argv[1], O_RDONLY | O_CLOEXEC);
	if (c->fd == -1) {
		fprintf(stderr, "uring-cat: %s: %s\n", argv[1],
			strerror(errno));
		return 1;
	}
	/* the adapter is a child of c: freed (detached) with it */
	c->u = evpoll_uring_attach(ev, c, &ring, on_read, NULL);
	if (c->u == NULL) {
		perror("uring-cat: evpoll_uring_attach");
		return 1;
	}
	evpoll_uring_set_pin_inflight(c->u, true);

	read_next(c);
	while (!c->done) {
		if (tevent_loop_once(ev) != 0) {
			finish(c, 1, "tevent_loop_once", errno);
		}
	}

	status = c->status;
	close(c->fd);
	talloc_free(c);		/* detach before the ring goes */
	io_uring_queue_exit(&ring);
	talloc_free(mem);
	return status;
}
