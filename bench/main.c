/*
 * evproxy-bench: how evproxy compares with tevent's own cross-thread
 * mechanisms and with the hardware floor, measured in one run.
 *
 *   evproxy-bench [--quick|--full|--tiny] [--json] [--pin] [--only G,...]
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"
#include "evpoll.h"

#ifndef TEVENT_VERSION
#define TEVENT_VERSION "unknown"
#endif

struct bench_opts bench_opt = { .size = BENCH_FULL };

#define MAX_RESULTS 64
static struct bench_result results[MAX_RESULTS];
static unsigned nresults;

void bench_add(const struct bench_result *r)
{
	if (nresults == MAX_RESULTS) {
		fprintf(stderr, "too many results\n");
		exit(1);
	}
	results[nresults] = *r;
	results[nresults].ratio = NAN;
	nresults++;
	if (!bench_opt.json) {
		fprintf(stderr, "  measured %s\n", r->name);
	}
}

const struct bench_result *bench_find(const char *name)
{
	unsigned i;

	for (i = 0; i < nresults; i++) {
		if (strcmp(results[i].name, name) == 0) {
			return &results[i];
		}
	}
	return NULL;
}

/* rtt rows compare medians (lower is better), others values */
static void compute_ratios(void)
{
	unsigned i;

	for (i = 0; i < nresults; i++) {
		struct bench_result *r = &results[i];
		const struct bench_result *b;

		if (r->baseline == NULL) {
			continue;
		}
		b = bench_find(r->baseline);
		if (b == NULL) {
			continue;
		}
		if (r->is_rtt && b->p50 > 0) {
			r->ratio = r->p50 / b->p50;
		} else if (!r->is_rtt && b->value > 0) {
			r->ratio = r->value / b->value;
		}
	}
}

struct machine {
	char cpu[128];
	long cpus;
	char kernel[256];
	char date[32];
};

static void machine_read(struct machine *m)
{
	FILE *f = fopen("/proc/cpuinfo", "r");
	char line[512];
	struct utsname u;
	time_t now = time(NULL);

	snprintf(m->cpu, sizeof(m->cpu), "unknown");
	while (f != NULL && fgets(line, sizeof(line), f) != NULL) {
		char *colon = strchr(line, ':');

		if (strncmp(line, "model name", 10) == 0 && colon != NULL) {
			snprintf(m->cpu, sizeof(m->cpu), "%s", colon + 2);
			m->cpu[strcspn(m->cpu, "\n")] = '\0';
			break;
		}
	}
	if (f != NULL) {
		fclose(f);
	}
	m->cpus = sysconf(_SC_NPROCESSORS_ONLN);
	uname(&u);
	snprintf(m->kernel, sizeof(m->kernel), "%s %s", u.sysname, u.release);
	strftime(m->date, sizeof(m->date), "%Y-%m-%d", gmtime(&now));
}

static void json_string(const char *s)
{
	putchar('"');
	for (; *s != '\0'; s++) {
		if (*s == '"' || *s == '\\') {
			putchar('\\');
		}
		if ((unsigned char)*s < 0x20) {
			printf("\\u%04x", *s);
			continue;
		}
		putchar(*s);
	}
	putchar('"');
}

static void json_number(double v)
{
	if (isnan(v) || isinf(v)) {
		printf("null");
	} else {
		printf("%.6g", v);
	}
}

static void print_json(const struct machine *m)
{
	unsigned i;

	printf("{\"machine\": {\"cpu\": ");
	json_string(m->cpu);
	printf(", \"cpus\": %ld, \"kernel\": ", m->cpus);
	json_string(m->kernel);
	printf(", \"tevent\": ");
	json_string(TEVENT_VERSION);
	printf(", \"date\": ");
	json_string(m->date);
	printf(", \"mode\": \"%s\", \"pinned\": %s},\n \"results\": [\n",
	       bench_opt.size == BENCH_FULL ? "full" :
	       bench_opt.size == BENCH_QUICK ? "quick" : "tiny",
	       bench_opt.pin ? "true" : "false");
	for (i = 0; i < nresults; i++) {
		const struct bench_result *r = &results[i];

		printf("  {\"name\": ");
		json_string(r->name);
		printf(", \"unit\": ");
		json_string(r->unit);
		printf(", \"p50\": ");
		json_number(r->is_rtt ? r->p50 : NAN);
		printf(", \"p99\": ");
		json_number(r->is_rtt ? r->p99 : NAN);
		printf(", \"value\": ");
		json_number(r->is_rtt ? NAN : r->value);
		printf(", \"ratio\": ");
		json_number(r->ratio);
		printf(", \"baseline\": ");
		if (r->baseline != NULL) {
			json_string(r->baseline);
		} else {
			printf("null");
		}
		printf(", \"goal\": ");
		if (r->goal != NULL) {
			json_string(r->goal);
		} else {
			printf("null");
		}
		printf("}%s\n", i + 1 < nresults ? "," : "");
	}
	printf("]}\n");
}

static void fmt_value(char *buf, size_t len, const struct bench_result *r)
{
	if (r->is_rtt) {
		snprintf(buf, len, "%.0f / %.0f", r->p50, r->p99);
	} else if (strcmp(r->unit, "msg/s") == 0) {
		snprintf(buf, len, "%.2f M", r->value / 1e6);
	} else {
		snprintf(buf, len, "%.3g", r->value);
	}
}

static void print_table(void)
{
	unsigned i;

	printf("%-30s %17s %-6s %8s  %-30s %s\n", "scenario",
	       "p50 / p99 | value", "unit", "ratio", "baseline", "goal");
	for (i = 0; i < nresults; i++) {
		const struct bench_result *r = &results[i];
		char v[64], ratio[32];

		fmt_value(v, sizeof(v), r);
		if (isnan(r->ratio)) {
			snprintf(ratio, sizeof(ratio), "-");
		} else {
			snprintf(ratio, sizeof(ratio), "%.2fx", r->ratio);
		}
		printf("%-30s %17s %-6s %8s  %-30s %s\n", r->name, v, r->unit,
		       ratio, r->baseline != NULL ? r->baseline : "-",
		       r->goal != NULL ? r->goal : "");
	}
	printf("\nRound trips: p50 / p99 in ns, ratio = p50 / baseline p50 "
	       "(lower is better).\nThroughput: median msg/s, ratio = value "
	       "/ baseline (higher is better).\n");
}

/* --only: a comma-separated list of groups, NULL for all */
static const char *only;

static bool group_wanted(const char *group)
{
	size_t len = strlen(group);
	const char *p = only;

	if (only == NULL) {
		return true;
	}
	while (p != NULL && *p != '\0') {
		if (strncmp(p, group, len) == 0 &&
		    (p[len] == ',' || p[len] == '\0')) {
			return true;
		}
		p = strchr(p, ',');
		if (p != NULL) {
			p++;
		}
	}
	return false;
}

static void usage(FILE *f)
{
	fprintf(f, "usage: evproxy-bench [--quick|--full|--tiny] [--json] "
		"[--pin] [--only G,...] [--verbose]\n"
		"                     [--rows TEXT]\n"
		"  --quick  about 30 s in all (what 'make bench' runs)\n"
		"  --full   longer runs, for quoted figures (default)\n"
		"  --tiny   only checks that every scenario runs\n"
		"  --json   print JSON on standard output instead of a table\n"
		"  --pin    pin the two threads of each scenario to CPUs\n"
		"  --only   run only these groups: rtt, tput, misc, pool, "
		"uring\n"
		"  --verbose  print every throughput repetition\n"
		"  --rows   only the throughput rows whose name contains TEXT "
		"(for profiling);\n"
		"           a comma-separated list, 'NAME$' matches the end\n");
}

int main(int argc, char **argv)
{
	struct machine m;
	int i;

	for (i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--json") == 0) {
			bench_opt.json = true;
		} else if (strcmp(argv[i], "--pin") == 0) {
			bench_opt.pin = true;
		} else if (strcmp(argv[i], "--quick") == 0) {
			bench_opt.size = BENCH_QUICK;
		} else if (strcmp(argv[i], "--full") == 0) {
			bench_opt.size = BENCH_FULL;
		} else if (strcmp(argv[i], "--tiny") == 0) {
			bench_opt.size = BENCH_TINY;
		} else if (strcmp(argv[i], "--rows") == 0 && i + 1 < argc) {
			bench_opt.rows = argv[++i];
		} else if (strcmp(argv[i], "--verbose") == 0) {
			bench_opt.verbose = true;
		} else if (strcmp(argv[i], "--only") == 0 && i + 1 < argc) {
			only = argv[++i];
		} else if (strcmp(argv[i], "--help") == 0) {
			usage(stdout);
			return 0;
		} else {
			usage(stderr);
			return 2;
		}
	}

	/* messages cross threads: no global talloc parent */
	talloc_disable_null_tracking();
	if (!evpoll_init()) {
		fprintf(stderr, "evpoll_init failed\n");
		return 1;
	}
	machine_read(&m);
	if (!bench_opt.json) {
		printf("evproxy-bench %s on %s: %s, %ld CPUs, %s, tevent %s%s\n",
		       m.date, bench_opt.size == BENCH_FULL ? "full" :
		       bench_opt.size == BENCH_QUICK ? "quick" : "tiny",
		       m.cpu, m.cpus, m.kernel, TEVENT_VERSION,
		       bench_opt.pin ? ", pinned" : "");
		fflush(stdout);
	}
	if (group_wanted("rtt")) {
		bench_rtt();
	}
	if (group_wanted("tput")) {
		bench_tput();
	}
	if (group_wanted("misc")) {
		bench_misc();
	}
	if (group_wanted("pool")) {
		bench_pool();
	}
#ifdef BENCH_URING
	if (group_wanted("uring")) {
		bench_uring();
	}
#endif
	compute_ratios();
	if (bench_opt.json) {
		print_json(&m);
	} else {
		print_table();
	}
	return 0;
}
