/*
 * A C client of libwanmig.so, compiled against ffi/include/wanmig.h: every
 * check prints one line, and the program exits non-zero if any failed.
 *
 *   abi_client                       the calls' error paths (any host)
 *   abi_client --dom0 KEY LIVE_DOMID on a Xen dom0: a missing domain, dom0,
 *                                    and opening a live guest's save side
 *
 * Built and run by ffi/capi/tests/c_client.rs (and by the nested Xen lab
 * with --dom0).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wanmig.h"

static int failures;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if ( cond )                                                        \
            printf("ok: ");                                                \
        else                                                               \
        {                                                                  \
            printf("FAILED: ");                                            \
            failures++;                                                    \
        }                                                                  \
        printf(__VA_ARGS__);                                               \
        printf("\n");                                                      \
    } while ( 0 )

/* The call returned `want` and its message contains `needle`. */
static void expect(const char *what, wanmig_status got, wanmig_status want,
                   const char *needle)
{
    const char *msg = wanmig_last_error();

    CHECK(got == want && msg && strstr(msg, needle),
          "%s: %s (want %s) \"%s\" (want it to name \"%s\")", what,
          wanmig_status_name(got), wanmig_status_name(want), msg ? msg : "(null)",
          needle);
}

static void *other_thread(void *arg)
{
    (void)arg;
    /* The last error is per thread: this one has made no call yet. */
    return (void *)(strcmp(wanmig_last_error(), "") == 0 ? (void *)1 : NULL);
}

static int suspend_never(void *opaque)
{
    (void)opaque;
    return -1;
}

static void error_paths(void)
{
    wanmig_save *s = (wanmig_save *)0x1;
    wanmig_restore *r = (wanmig_restore *)0x1;
    uint8_t buf[WANMIG_HANDOFF_MAX];
    size_t len = 0;
    wanmig_status st;
    pthread_t t;
    void *seen = NULL;

    CHECK(wanmig_abi_version() == WANMIG_ABI_VERSION, "ABI version %u",
          wanmig_abi_version());
    CHECK(strcmp(wanmig_status_name(WANMIG_ERR_XEN), "WANMIG_ERR_XEN") == 0 &&
          strcmp(wanmig_status_name(12345), "unknown") == 0,
          "status names");

    expect("save_open out=NULL", wanmig_save_open(1, "key=/k", NULL),
           WANMIG_ERR_INVALID_ARGUMENT, "out is NULL");
    st = wanmig_save_open(1, NULL, &s);
    expect("save_open options=NULL", st, WANMIG_ERR_INVALID_ARGUMENT,
           "options is NULL");
    CHECK(s == NULL, "a failed open leaves *out NULL");
    expect("save_open unknown option", wanmig_save_open(1, "key=/k,bogus=1", &s),
           WANMIG_ERR_INVALID_ARGUMENT, "bogus");
    expect("save_open without key", wanmig_save_open(1, "m=1", &s),
           WANMIG_ERR_INVALID_ARGUMENT, "key");
    expect("save_open m=2", wanmig_save_open(1, "key=/k,m=2", &s),
           WANMIG_ERR_INVALID_ARGUMENT, "m");
    expect("save_open m=0.5", wanmig_save_open(1, "key=/k,m=0.5", &s),
           WANMIG_ERR_UNSUPPORTED, "post-copy");
    expect("save_open s=0.5", wanmig_save_open(1, "key=/k,s=0.5", &s),
           WANMIG_ERR_UNSUPPORTED, "disks");
    expect("save_open not UTF-8", wanmig_save_open(1, "key=\xff", &s),
           WANMIG_ERR_INVALID_ARGUMENT, "UTF-8");

    expect("save_handoff NULL handle", wanmig_save_handoff(NULL, buf, sizeof(buf), &len),
           WANMIG_ERR_BAD_HANDLE, "null save handle");
    expect("save_handoff forged handle",
           wanmig_save_handoff((wanmig_save *)0x1230, buf, sizeof(buf), &len),
           WANMIG_ERR_BAD_HANDLE, "not an open save handle");
    expect("save_handoff len=NULL",
           wanmig_save_handoff((wanmig_save *)0x1230, buf, sizeof(buf), NULL),
           WANMIG_ERR_INVALID_ARGUMENT, "len is NULL");
    expect("save_memory NULL handle", wanmig_save_memory(NULL, suspend_never, NULL),
           WANMIG_ERR_BAD_HANDLE, "null save handle");
    expect("save_memory suspend=NULL",
           wanmig_save_memory((wanmig_save *)0x1230, NULL, NULL),
           WANMIG_ERR_INVALID_ARGUMENT, "suspend is NULL");
    expect("save_close forged handle", wanmig_save_close((wanmig_save *)0x1230),
           WANMIG_ERR_BAD_HANDLE, "not an open save handle");
    CHECK(wanmig_save_close(NULL) == WANMIG_OK && strcmp(wanmig_last_error(), "") == 0,
          "save_close(NULL) is a no-op and clears the message");

    expect("restore_open options=NULL", wanmig_restore_open(2, NULL, &r),
           WANMIG_ERR_INVALID_ARGUMENT, "options is NULL");
    expect("restore_open m=1 (a save option)", wanmig_restore_open(2, "key=/k,m=1", &r),
           WANMIG_ERR_INVALID_ARGUMENT, "m");
    expect("restore_memory handoff=NULL",
           wanmig_restore_memory((wanmig_restore *)0x1232, NULL, 10, NULL, NULL),
           WANMIG_ERR_INVALID_ARGUMENT, "handoff is NULL");
    expect("restore_memory oversized handoff",
           wanmig_restore_memory((wanmig_restore *)0x1232, buf, 1 << 20, NULL, NULL),
           WANMIG_ERR_INVALID_ARGUMENT, "bytes");
    expect("restore_memory forged handle",
           wanmig_restore_memory((wanmig_restore *)0x1232, buf, 8, NULL, NULL),
           WANMIG_ERR_BAD_HANDLE, "not an open restore handle");
    expect("restore_close a save-kind handle", wanmig_restore_close((wanmig_restore *)0x1231),
           WANMIG_ERR_BAD_HANDLE, "restore");

    CHECK(pthread_create(&t, NULL, other_thread, NULL) == 0 &&
          pthread_join(t, &seen) == 0 && seen == (void *)1,
          "wanmig_last_error is per thread");
}

/* Opening a real domain: without Xen (or its build) the call says so. */
static void open_without_xen(const char *key)
{
    wanmig_save *s = NULL;
    char opts[512];
    wanmig_status st;

    snprintf(opts, sizeof(opts), "key=%s,listen=127.0.0.1:0", key);
    st = wanmig_save_open(7, opts, &s);
    CHECK((st == WANMIG_ERR_UNSUPPORTED && strstr(wanmig_last_error(), "without Xen")) ||
          (st == WANMIG_ERR_XEN && strstr(wanmig_last_error(), "Xen control interfaces")),
          "save_open on a host without Xen: %s \"%s\"", wanmig_status_name(st),
          wanmig_last_error());
    CHECK(s == NULL, "no handle");
}

static void on_dom0(const char *key, uint32_t live)
{
    wanmig_save *s = NULL;
    uint8_t buf[WANMIG_HANDOFF_MAX];
    size_t len = 0;
    char opts[512];

    snprintf(opts, sizeof(opts), "key=%s,listen=127.0.0.1:0", key);
    expect("save_open of a missing domain", wanmig_save_open(32000, opts, &s),
           WANMIG_ERR_XEN, "does not exist");
    expect("save_open of dom0", wanmig_save_open(0, opts, &s), WANMIG_ERR_UNSUPPORTED,
           "dom0");
    expect("save_open with a missing key file",
           wanmig_save_open(live, "key=/nonexistent/key,listen=127.0.0.1:0", &s),
           WANMIG_ERR_KEY, "/nonexistent/key");
    expect("save_open of a live guest", wanmig_save_open(live, opts, &s), WANMIG_OK, "");
    expect("save_memory before save_handoff", wanmig_save_memory(s, suspend_never, NULL),
           WANMIG_ERR_STATE, "handoff");
    expect("save_handoff with a small buffer", wanmig_save_handoff(s, buf, 8, &len),
           WANMIG_ERR_INVALID_ARGUMENT, "bytes");
    CHECK(len > 64 && len <= WANMIG_HANDOFF_MAX, "the needed length is reported: %zu", len);
    expect("save_handoff", wanmig_save_handoff(s, buf, sizeof(buf), &len), WANMIG_OK, "");
    CHECK(len > 64 && memcmp(buf, "WMHANDOF", 8) == 0, "hand-off body of %zu bytes", len);
    expect("save_close of a save that never migrated the memory", wanmig_save_close(s),
           WANMIG_ERR_STATE, "never handed the memory to the engine");
    expect("save_handoff on the closed handle", wanmig_save_handoff(s, buf, sizeof(buf), &len),
           WANMIG_ERR_BAD_HANDLE, "not an open save handle");
}

int main(int argc, char **argv)
{
    error_paths();
    if ( argc == 3 && strcmp(argv[1], "--no-xen") == 0 )
        open_without_xen(argv[2]);
    else if ( argc == 4 && strcmp(argv[1], "--dom0") == 0 )
        on_dom0(argv[2], (uint32_t)strtoul(argv[3], NULL, 0));
    else if ( argc != 1 )
    {
        fprintf(stderr, "usage: %s [--no-xen KEY | --dom0 KEY LIVE_DOMID]\n", argv[0]);
        return 2;
    }
    printf("%s: %d failed\n", failures ? "FAILED" : "passed", failures);
    return failures ? 1 : 0;
}
