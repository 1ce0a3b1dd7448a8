//! With the `xen` feature: compiles the Xen 4.17 shim (`xen417.c`) against
//! the patched Xen tree that `xen-patches/build` installs, and links its
//! libxenctrl and libxenforeignmemory. Without it: nothing.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "xen")]
    xen::build();
}

#[cfg(feature = "xen")]
mod xen {
    use std::path::{Path, PathBuf};

    /// Where the patched tree is installed (`xen-patches/build --print-dist`).
    const DIST_VAR: &str = "WANMIG_XEN_DIST";

    pub fn build() {
        println!("cargo:rerun-if-env-changed={DIST_VAR}");
        println!("cargo:rerun-if-changed=src/backend/xen/xen417.c");
        let Some(dist) = std::env::var_os(DIST_VAR).map(PathBuf::from) else {
            panic!(
                "the `xen` feature builds against the patched Xen tree: run \
                 `{DIST_VAR}=$(xen-patches/build --print-dist) cargo build --features xen` \
                 (xen-patches/build builds and caches it)"
            );
        };
        let include = dist.join("usr/include");
        let header = include.join("xenctrl.h");
        assert!(
            header.is_file(),
            "{DIST_VAR}={}: no {} (not a Xen dist tree)",
            dist.display(),
            header.display()
        );
        println!("cargo:rerun-if-changed={}", header.display());
        let lib = ["usr/lib64", "usr/lib/x86_64-linux-gnu", "usr/lib"]
            .iter()
            .map(|d| dist.join(d))
            .find(|d| d.join("libxenctrl.so").exists())
            .unwrap_or_else(|| {
                panic!(
                    "{DIST_VAR}={}: no libxenctrl.so under usr/lib*",
                    dist.display()
                )
            });
        cc::Build::new()
            .file("src/backend/xen/xen417.c")
            .include(&include)
            .warnings(true)
            .extra_warnings(true)
            .flag("-Werror")
            .flag("-Wno-unused-parameter")
            .compile("wanmig_xen417");
        link(&lib);
    }

    fn link(lib: &Path) {
        println!("cargo:rustc-link-search=native={}", lib.display());
        for l in ["xenctrl", "xenforeignmemory"] {
            println!("cargo:rustc-link-lib=dylib={l}");
        }
    }
}
