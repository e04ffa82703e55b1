# Wrapper around waf, as Samba's standalone libraries have.
# 'make test' and 'make bench' do all set-up: dependencies, waf, configure.

PYTHON ?= python3
WAF = $(PYTHON) ./buildtools/bin/waf
CONFIGURE_FLAGS ?=
# configured once; reconfigure with ./configure [options]
CONFIGURED = bin/c4che/_cache.py
SAN_ASAN = WAFLOCK=.lock-waf-asan
SAN_TSAN = WAFLOCK=.lock-waf-tsan
BENCH_FLAGS ?= --quick

all: $(CONFIGURED)
	$(WAF) build

$(CONFIGURED):
	./configure $(CONFIGURE_FLAGS)

install: all
	$(WAF) install

uninstall:
	$(WAF) uninstall

test: $(CONFIGURED)
	$(WAF) test

# tevent's own suites (smbtorture local.event, local.tevent_req) on evpoll;
# 'make test' runs them too when samba-testsuite is installed
test-tevent: all
	./buildtools/install-deps samba-testsuite
	$(PYTHON) tests/tevent_suite.py --preload bin/preload/evpoll-preload.so

bench: all
	./bin/evproxy-bench $(BENCH_FLAGS)

abi-update: $(CONFIGURED)
	$(WAF) abi-update

# Sanitizer builds live in their own output folders and waf lock files.
bin/asan/c4che/_cache.py:
	./buildtools/install-deps && ./buildtools/bootstrap-waf
	$(SAN_ASAN) $(WAF) configure -o bin/asan --enable-developer \
		--with-sanitizer=address,undefined

bin/tsan/c4che/_cache.py:
	./buildtools/install-deps && ./buildtools/bootstrap-waf
	$(SAN_TSAN) $(WAF) configure -o bin/tsan --enable-developer \
		--with-sanitizer=thread

# sanitizer and valgrind runs use the same tests with smaller loop counts
test-asan: bin/asan/c4che/_cache.py
	EVPROXY_TEST_SCALE=small $(SAN_ASAN) $(WAF) test

test-tsan: bin/tsan/c4che/_cache.py
	EVPROXY_TEST_SCALE=small $(SAN_TSAN) $(WAF) test

# valgrind memcheck over every test program (normal build)
test-valgrind: $(CONFIGURED)
	./buildtools/install-deps valgrind
	EVPROXY_TEST_SCALE=small EVPROXY_TEST_WRAPPER="valgrind -q --error-exitcode=99 \
		--leak-check=full --errors-for-leak-kinds=definite \
		--show-leak-kinds=definite" $(WAF) test

stress: $(CONFIGURED)
	EVPROXY_STRESS=full $(WAF) test

clean:
	-$(WAF) clean
	-$(SAN_ASAN) $(WAF) clean
	-$(SAN_TSAN) $(WAF) clean

distclean:
	rm -rf bin .lock-waf* buildtools/waf-*/ evproxy-*.tar.gz
	find . -name __pycache__ -prune -exec rm -rf {} +

dist:
	@v=$$(sed -n "s/^VERSION = '\(.*\)'/\1/p" wscript); \
	git archive --format=tar.gz --prefix=evproxy-$$v/ \
		-o evproxy-$$v.tar.gz HEAD && echo "wrote evproxy-$$v.tar.gz"

.PHONY: all install uninstall test test-tevent bench abi-update test-asan test-tsan \
	test-valgrind stress clean distclean dist
