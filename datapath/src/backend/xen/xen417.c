/*
 * wanmig's shim to Xen 4.17's libxenctrl and libxenforeignmemory.
 *
 * Compiled (cargo feature `xen`) against the headers of the patched Xen
 * tree that xen-patches/build produces, so every structure and constant is
 * the one that tree uses; the Rust side (sys.rs) sees only these small,
 * fixed-layout functions. Each returns 0 (or a count) on success and
 * -errno on failure. A new Xen version gets its own shim.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <xenctrl.h>
#include <xenforeignmemory.h>

/* Exported by libxenctrl 4.17 (VERS_4.17.0) but declared only in its
 * private headers. */
int xc_get_pfn_type_batch(xc_interface *xch, uint32_t dom, unsigned int num, xen_pfn_t *arr);

_Static_assert(sizeof(xen_pfn_t) == sizeof(uint64_t), "xen_pfn_t is 64-bit on x86_64");

static int neg_errno(void)
{
    return errno ? -errno : -EIO;
}

int wmx_xc_open(xc_interface **out)
{
    errno = 0;
    *out = xc_interface_open(NULL, NULL, 0);
    return *out ? 0 : neg_errno();
}

void wmx_xc_close(xc_interface *xch)
{
    if ( xch )
        xc_interface_close(xch);
}

int wmx_fmem_open(xenforeignmemory_handle **out)
{
    errno = 0;
    *out = xenforeignmemory_open(NULL, 0);
    return *out ? 0 : neg_errno();
}

void wmx_fmem_close(xenforeignmemory_handle *fmem)
{
    if ( fmem )
        xenforeignmemory_close(fmem);
}

struct wmx_dominfo {
    uint32_t domid;
    uint32_t shutdown_reason;
    uint8_t hvm, dying, shutdown, paused;
    uint32_t pad;
    uint64_t tot_pages;
    uint64_t max_pages;
};

/* 0, or -ESRCH if there is no domain `domid`. */
int wmx_domain_info(xc_interface *xch, uint32_t domid, struct wmx_dominfo *out)
{
    xc_domaininfo_t info;
    int rc;

    errno = 0;
    rc = xc_domain_getinfolist(xch, domid, 1, &info);
    if ( rc < 0 )
        return neg_errno();
    if ( rc != 1 || info.domain != domid )
        return -ESRCH;
    memset(out, 0, sizeof(*out));
    out->domid = info.domain;
    out->hvm = !!(info.flags & XEN_DOMINF_hvm_guest);
    out->dying = !!(info.flags & XEN_DOMINF_dying);
    out->shutdown = !!(info.flags & XEN_DOMINF_shutdown);
    out->paused = !!(info.flags & XEN_DOMINF_paused);
    out->shutdown_reason = (info.flags >> XEN_DOMINF_shutdownshift) & XEN_DOMINF_shutdownmask;
    out->tot_pages = info.tot_pages;
    out->max_pages = info.max_pages;
    return 0;
}

int wmx_max_gpfn(xc_interface *xch, uint32_t domid, uint64_t *out)
{
    xen_pfn_t gpfn = 0;

    errno = 0;
    if ( xc_domain_maximum_gpfn(xch, domid, &gpfn) < 0 )
        return neg_errno();
    *out = gpfn;
    return 0;
}

/* enable: 1 log-dirty on, 0 off. */
int wmx_log_dirty(xc_interface *xch, uint32_t domid, int enable)
{
    errno = 0;
    if ( xc_shadow_control(xch, domid,
                           enable ? XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY
                                  : XEN_DOMCTL_SHADOW_OP_OFF,
                           NULL, 0) < 0 )
        return neg_errno();
    return 0;
}

/* Copies and clears the dirty bitmap of pfns 0..pages into `bitmap`
 * (pages bits, LSB first in 64-bit words); final: the last clean of a
 * suspended domain. */
int wmx_log_dirty_clean(xc_interface *xch, uint32_t domid, uint64_t *bitmap,
                        uint64_t pages, int final)
{
    DECLARE_HYPERCALL_BUFFER(unsigned long, buf);
    size_t bytes = ((pages + 63) / 64) * 8;
    size_t nr = (bytes + XC_PAGE_SIZE - 1) / XC_PAGE_SIZE;
    long long rc;

    if ( nr == 0 )
        return 0;
    errno = 0;
    buf = xc_hypercall_buffer_alloc_pages(xch, buf, nr);
    if ( !buf )
        return neg_errno();
    memset(buf, 0, nr * XC_PAGE_SIZE);
    rc = xc_logdirty_control(xch, domid, XEN_DOMCTL_SHADOW_OP_CLEAN,
                             HYPERCALL_BUFFER(buf), pages,
                             final ? XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL : 0, NULL);
    if ( rc < 0 )
        rc = neg_errno();
    else if ( (uint64_t)rc != pages )
        rc = -EOVERFLOW; /* Xen answered for another number of pfns */
    else
    {
        memcpy(bitmap, buf, bytes);
        rc = 0;
    }
    xc_hypercall_buffer_free_pages(xch, buf, nr);
    return rc;
}

/* out[i]: 1 if pfn pfns[i] is backed by a frame of the domain, else 0. */
int wmx_pfn_populated(xc_interface *xch, uint32_t domid, const uint64_t *pfns,
                      uint32_t n, uint8_t *out)
{
    xen_pfn_t *arr;
    uint32_t i;
    int rc;

    if ( n == 0 )
        return 0;
    arr = malloc(n * sizeof(*arr));
    if ( !arr )
        return -ENOMEM;
    memcpy(arr, pfns, n * sizeof(*arr));
    errno = 0;
    rc = xc_get_pfn_type_batch(xch, domid, n, arr);
    if ( rc < 0 )
        rc = neg_errno();
    else
    {
        for ( i = 0; i < n; i++ )
        {
            xen_pfn_t type = arr[i] & XEN_DOMCTL_PFINFO_LTAB_MASK;

            out[i] = type != XEN_DOMCTL_PFINFO_XTAB &&
                     type != XEN_DOMCTL_PFINFO_BROKEN &&
                     type != XEN_DOMCTL_PFINFO_XALLOC;
        }
        rc = 0;
    }
    free(arr);
    return rc;
}

/* Maps pfns[0..n) of the domain; errs[i] is 0 or the -errno of frame i.
 * *out is NULL on failure (returned as -errno). */
int wmx_map(xenforeignmemory_handle *fmem, uint32_t domid, int write,
            const uint64_t *pfns, uint32_t n, int *errs, void **out)
{
    errno = 0;
    *out = xenforeignmemory_map(fmem, domid, PROT_READ | (write ? PROT_WRITE : 0),
                                n, (const xen_pfn_t *)pfns, errs);
    return *out ? 0 : neg_errno();
}

int wmx_unmap(xenforeignmemory_handle *fmem, void *addr, uint32_t n)
{
    errno = 0;
    return xenforeignmemory_unmap(fmem, addr, n) < 0 ? neg_errno() : 0;
}

static int with_pfns(const uint64_t *pfns, uint32_t n, xen_pfn_t **arr)
{
    *arr = malloc((n ? n : 1) * sizeof(**arr));
    if ( !*arr )
        return -ENOMEM;
    memcpy(*arr, pfns, n * sizeof(**arr));
    return 0;
}

int wmx_populate(xc_interface *xch, uint32_t domid, const uint64_t *pfns, uint32_t n)
{
    xen_pfn_t *arr;
    int rc = with_pfns(pfns, n, &arr);

    if ( rc )
        return rc;
    errno = 0;
    rc = xc_domain_populate_physmap_exact(xch, domid, n, 0, 0, arr) < 0 ? neg_errno() : 0;
    free(arr);
    return rc;
}

int wmx_depopulate(xc_interface *xch, uint32_t domid, const uint64_t *pfns, uint32_t n)
{
    xen_pfn_t *arr;
    int rc = with_pfns(pfns, n, &arr);

    if ( rc )
        return rc;
    errno = 0;
    rc = xc_domain_decrease_reservation_exact(xch, domid, n, 0, arr) < 0 ? neg_errno() : 0;
    free(arr);
    return rc;
}
